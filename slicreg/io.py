"""File input and output: NIfTI volumes, displacement-field files, atomic writes.

This is the edge of the library: everything here takes paths; nothing below it does. Files are checked on
the way in (existence, format, dimensionality, finite values, integer labels) and every problem is raised as
one :class:`~slicreg.errors.InputError` naming the file. Every write goes to a temporary file in the target
folder first and is renamed into place, so a killed process never leaves a half-written file under the final
name.

File layouts:

- images and label maps: 3-D NIfTI, array order ``(i, j, k)`` as stored;
- multi-channel volumes (e.g. 16 supervoxel layers): 4-D NIfTI ``(X, Y, Z, C)``; in memory ``(C, X, Y, Z)``;
- displacement fields: NIfTI ``(X, Y, Z, 3)`` float32, voxels of the fixed grid, fixed -> moving, with the fixed
  image's affine (the Learn2Reg layout; see :mod:`slicreg.conventions`); on request also as an ITK displacement
  field (``(X, Y, Z, 1, 3)``, millimetres, LPS) or deeds' files (:data:`FIELD_FORMATS`, :func:`save_field_as`,
  docs/formats.md).

``.nii.gz`` files are compressed with ISA-L at gzip level 1 when ``isal`` is installed (:func:`_write_nifti`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slicreg.conventions import Volume, from_learn2reg_layout, to_learn2reg_layout
from slicreg.errors import InputError

__all__ = [
    "atomic_path",
    "atomic_outputs",
    "check_output_path",
    "check_outputs_not_inputs",
    "remove_stale_temporaries",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "sha256_file",
    "load_image",
    "load_labels",
    "load_volume",
    "save_volume",
    "load_field",
    "save_field",
    "FIELD_FORMATS",
    "save_field_itk",
    "save_field_as",
    "field_output_files",
    "check_field_format",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


# --------------------------------------------------------------------------------------------- atomic writes
def _full_suffix(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".tar.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


def _new_temporary(path: Path) -> Path:
    """Create an empty temporary beside ``path`` (its suffix kept), after checking the target and tidying the
    folder (publications a killed process started are finished, its stale temporaries of ``path`` removed)."""
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_publications(path.parent)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=TMP_MARK + _full_suffix(path),
                               dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    The temporary name keeps the suffix (``.nii.gz`` stays ``.nii.gz``) so writers that look at the extension
    behave. ``os.replace`` is atomic on one file system, so readers see the old file or the complete new one.
    """
    path = Path(path)
    tmp_path = _new_temporary(path)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


TMP_MARK = ".tmp"
"""Temporary files of :func:`atomic_path` are named ``.<name>.<host>-<pid>.<random>.tmp<suffix>`` beside the target."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner() -> str:
    """``<host>-<pid>`` of this process, as put into temporary names (dots in the host name become ``_``)."""
    import socket

    host = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _owner_gone(owner: str) -> bool:
    """True if the process named by ``owner`` (see :func:`_owner`) ran on this host and is no longer running.

    A temporary written from another machine (a shared file system, e.g. a Dask worker on another node) is never
    judged here: its process cannot be seen from this one."""
    host, _, pid = owner.rpartition("-")
    if not pid.isdigit() or host != _owner().rpartition("-")[0]:
        return False
    return not _pid_alive(int(pid))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of :func:`atomic_path` for ``path`` left by a killed process of this host.

    Only files of this module's own naming (``.<name>.<host>-<pid>.<random>.tmp<suffix>``) are touched; the
    temporary of a writer that is still running, or of one on another host, is kept. Returns the removed paths."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and TMP_MARK in p.name]
    except OSError:
        return removed
    for p in candidates:
        rest = p.name[len(prefix):]
        if not _owner_gone(rest.split(".", 1)[0]):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
            log.info("removed %s (left by an interrupted write)", p)
    return removed


def check_output_path(path: str | os.PathLike, *, what: str | None = None) -> Path:
    """Check that ``path`` can be written as a file, before any work: raise one :class:`InputError` otherwise.

    Refused: an existing folder at ``path``; a parent that is a regular file (or under one); a parent folder
    that exists but is not writable. A missing parent is fine (it is created on write)."""
    path = Path(path)
    name = what or str(path)
    if path.is_dir():
        raise InputError(f"{name}: is an existing folder, expected a file name to write")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{name}: cannot write there, {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{name}: cannot write there, folder {probe} is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_not_inputs(inputs: dict[str, Any], outputs: dict[str, Any],
                             output_dirs: dict[str, Any] | None = None) -> None:
    """Refuse, before any work, an output that would overwrite an input.

    ``inputs``, ``outputs`` (files) and ``output_dirs`` (folders) map an argument name (``"--fixed"``) to a path
    (``None`` = not given). An output file is refused when it resolves to an input file (also through symlinks
    and hard links); an output folder when it is an input folder. Raises one :class:`InputError` naming both."""
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    for kind, group in (("file", outputs), ("folder", output_dirs or {})):
        for arg, out in group.items():
            if out is None:
                continue
            for in_arg, src in ins.items():
                if _same_file(Path(out), src):
                    raise InputError(f"{arg} {out}: is the input {in_arg} {src}; refusing to overwrite an input, "
                                     f"choose another output {kind}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


JOURNAL_PREFIX = ".slicreg-publish."


class OutputSet:
    """Temporaries of several outputs that are published together (see :func:`atomic_outputs`)."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}

    def path(self, final: str | os.PathLike) -> Path:
        """A temporary path to write the output ``final`` to (same folder, same suffix)."""
        final = Path(final)
        if final in self.pending:
            return self.pending[final]
        tmp = _new_temporary(final)
        tmp.unlink()  # writers create it; an unwritten output is detected at publication
        self.pending[final] = tmp
        return tmp


def _roll_forward(journal: Path, pairs: list[tuple[str, str]]) -> None:
    for tmp, final in pairs:
        if os.path.exists(tmp):
            os.replace(tmp, final)
    journal.unlink()


def _recover_publications(folder: Path) -> None:
    """Finish publications that a killed process had started (its journal lists temporaries and targets)."""
    try:
        journals = [p for p in folder.iterdir() if p.name.startswith(JOURNAL_PREFIX) and p.name.endswith(".json")]
    except OSError:
        return
    for journal in journals:
        if not _owner_gone(journal.name[len(JOURNAL_PREFIX):].split(".", 1)[0]):
            continue
        try:
            pairs = [(str(a), str(b)) for a, b in json.loads(journal.read_text())["outputs"]]
            _roll_forward(journal, pairs)
            log.info("finished the publication of %s that an interrupted run had started",
                     ", ".join(b for _, b in pairs))
        except (OSError, ValueError, KeyError, TypeError):
            continue


@contextlib.contextmanager
def atomic_outputs() -> Iterator[OutputSet]:
    """Write several outputs all-or-nothing: ``with atomic_outputs() as out: save_volume(v, out.path(final))``.

    Every output is written to a temporary beside its target. Only when the block succeeds are they renamed into
    place, after a journal listing them was written (fsynced); a process killed during the renames leaves the
    journal, and the next write into that folder finishes the renames. A failure inside the block removes every
    temporary and publishes nothing, so an existing set of outputs is either kept whole or replaced whole."""
    outputs = OutputSet()
    try:
        yield outputs
    except BaseException:
        for tmp in outputs.pending.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    missing = [str(final) for final, tmp in outputs.pending.items() if not tmp.exists()]
    if missing:
        for tmp in outputs.pending.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise RuntimeError(f"outputs not written: {missing}")
    pairs = [(str(tmp.resolve()), str(final.resolve())) for final, tmp in outputs.pending.items()]
    if not pairs:
        return
    for tmp, _ in pairs:
        os.chmod(tmp, 0o666 & ~_umask())
    first = Path(pairs[0][1]).parent
    journal = first / f"{JOURNAL_PREFIX}{_owner()}.{os.urandom(4).hex()}.json"
    with open(journal, "w") as fh:
        json.dump({"outputs": pairs}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _roll_forward(journal, pairs)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars/arrays and paths are converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content; of a folder (e.g. a DICOM series): of its files' relative names and
    contents, in sorted order (hidden files left out), so the same series copied elsewhere hashes the same."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        for p in files:
            digest.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
        return digest.hexdigest()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ reading
Kind = Literal["image", "labels", "any"]


def _open_nifti(path: Path) -> Any:
    import nibabel as nib

    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a NIfTI file (.nii or .nii.gz) here (a folder is read as a "
                         f"DICOM series only where an image or label map is expected)")
    try:
        img = nib.load(str(path))
        if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and path.name.endswith(".gz"):
            img = _gzip_reread(img, path)
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    _check_declared_size(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise InputError(f"{path}: the voxel-to-world matrix is degenerate (a voxel size of 0 or NaN in the header: "
                         f"{np.round(affine[:3, :3], 4).tolist()}); the file has no usable geometry")
    return img


def _gzip_reader() -> Any:
    """The module that reads gzip files: ISA-L's ``isal.igzip`` (~3x faster than the standard library's zlib on a
    2 mm abdominal CT, the same bytes), or ``gzip`` where ``isal`` is missing."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel falls back
        return gzip
    return igzip


def _gzip_reread(img: Any, path: Path) -> Any:
    """The NIfTI image ``img`` (as ``nib.load`` opened it from the ``.nii.gz`` file ``path``), its voxel data to be
    decompressed by :func:`_gzip_reader` instead (``img`` itself if that is the standard library's, as nibabel's
    own). The header is read again from the stream, the data stays lazy (read by :func:`_read_data`)."""
    reader = _gzip_reader()
    return img if reader is gzip else type(img).from_stream(reader.open(path, "rb"))


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_declared_size(img: Any, path: Path) -> None:
    """Compare the voxel data the header declares with what the file holds and what memory can take.

    A header that declares far more voxels than the file holds would otherwise be read into a huge allocation
    (MemoryError) or fail deep inside the reader. Uncompressed files are checked against their size; gzip files
    against the uncompressed size gzip records (modulo 2**32, its last four bytes)."""
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: the header declares a negative dimension {shape}")
    itemsize = int(np.dtype(header.get_data_dtype()).itemsize)
    nbytes = int(np.prod(shape, dtype=object)) * itemsize if shape else 0
    offset = int(header.get_data_offset())
    declared = f"{' x '.join(str(s) for s in shape)} voxels of {header.get_data_dtype()} ({nbytes / 2**30:.2f} GiB)"
    try:
        size = path.stat().st_size
        if path.name.endswith(".gz"):
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = int.from_bytes(fh.read(4), "little")
            total = offset + nbytes
            # gzip's trailer records the size of the last member only: a file of several members (bgzip, files
            # joined by cat) records less than it holds, so a short trailer is checked by counting
            if total < 2**32 and isize < total and (held := _gunzipped_size(path, total)) < total:
                raise InputError(f"{path}: the header declares {declared}, but the compressed file holds only "
                                 f"{max(held - offset, 0)} bytes of voxel data (truncated, or a wrong header)")
        elif size < offset + nbytes:
            raise InputError(f"{path}: the header declares {declared}, but the file holds only "
                             f"{max(size - offset, 0)} bytes of voxel data (truncated, or a wrong header)")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    available = _available_memory()
    if available is not None and nbytes > available:
        raise InputError(f"{path}: the header declares {declared}, more than the {available / 2**30:.1f} GiB of "
                         f"memory available")


def _gzip_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or cut gzip stream raises: the standard library's errors and ISA-L's (``isal``)."""
    try:
        from isal.isal_zlib import error as isal_error
    except ImportError:  # pragma: no cover - isal is a dependency
        return EOFError, OSError, zlib.error
    return EOFError, OSError, zlib.error, isal_error


def _gunzipped_size(path: Path, limit: int) -> int:
    """The bytes the gzip file ``path`` decompresses to (every member), counted up to ``limit`` in 4 MiB blocks
    without keeping them; a damaged or cut stream ends the count."""
    n = 0
    try:
        with _gzip_reader().open(path, "rb") as fh:
            while n < limit and (block := fh.read(min(1 << 22, limit - n))):
                n += len(block)
    except _gzip_errors():
        pass
    return n


def _read_data(img: Any, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except (*_gzip_errors(), ValueError) as exc:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: truncated or corrupt NIfTI data ({type(exc).__name__}: {exc})") from None


def load_volume(
    path: str | os.PathLike,
    *,
    kind: Kind = "any",
    canonical: bool = False,
    channels: bool = False,
) -> Volume:
    """Read a NIfTI file into a :class:`Volume`, validating it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file, or a folder holding one DICOM series (:mod:`slicreg.dicom`).
        kind: ``"image"`` returns float32; ``"labels"`` requires integer values and returns the smallest
            unsigned/signed integer dtype that holds them; ``"any"`` keeps the stored dtype (scaled if the header
            says so).
        canonical: reorient to the closest canonical (RAS+) voxel order with nibabel (a pure axis permutation and
            flip, no resampling); the original axis codes are logged and kept in ``meta["original_axcodes"]``.
        channels: accept a 4-D file ``(X, Y, Z, C)``, returned as ``(C, X, Y, Z)``; otherwise only 3-D is accepted.

    Raises:
        InputError: missing file, not NIfTI, truncated data, wrong dimensionality, NaN/Inf values, or (labels)
            non-integer values; the message names the file.
    """
    import nibabel as nib

    path = Path(path)
    dicom_meta: dict[str, Any] = {}
    if path.is_dir():  # a folder holding one DICOM series (slicreg.dicom): stacked, in RAS, then as a NIfTI file
        from slicreg.dicom import read_dicom_series

        series = read_dicom_series(path)
        img, dicom_meta = nib.Nifti1Image(series.array, series.affine), series.meta
    else:
        if not path.name.endswith(NIFTI_SUFFIXES) and path.is_file():
            from slicreg.dicom import is_dicom_file

            if is_dicom_file(path):
                raise InputError(f"{path}: is a single DICOM file; expected a NIfTI file or the folder that holds "
                                 f"the whole DICOM series (pass {path.parent})")
        img = _open_nifti(path)
    original = "".join(nib.aff2axcodes(img.affine))
    if canonical:
        img = nib.as_closest_canonical(img)
        now = "".join(nib.aff2axcodes(img.affine))
        if now != original:
            log.info("%s: reoriented from %s to %s (closest canonical)", path, original, now)
    shape = tuple(int(s) for s in img.shape)
    # a trailing singleton 4th/5th axis (common in 3-D files written as 4-D) is harmless
    while len(shape) > 3 and shape[-1] == 1 and not (channels and len(shape) == 4):
        shape = shape[:-1]
    wanted = "3-D (X, Y, Z) or 4-D (X, Y, Z, C)" if channels else "3-D (X, Y, Z)"
    if len(shape) not in ((3, 4) if channels else (3,)):
        raise InputError(f"{path}: expected a {wanted} volume, got {len(img.shape)}-D shape {tuple(img.shape)}")
    data = _read_data(img, path).reshape(shape)
    if data.dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported voxel type {data.dtype} (expected integer or float)")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(f"{path}: {n_bad} voxels are NaN or Inf (expected finite values)")
    if kind == "image":
        data = data.astype(np.float32, copy=False)
    elif kind == "labels":
        data = _as_integer_labels(data, path)
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    meta = {**dicom_meta, "source": str(path), "original_axcodes": original}
    return Volume(np.ascontiguousarray(data), img.affine, meta)


def _as_integer_labels(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype.kind == "f":
        if not np.all(data == np.round(data)):
            example = float(data[data != np.round(data)].flat[0])
            raise InputError(f"{path}: expected an integer label map, got non-integer values (e.g. {example})")
        if data.size and (data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max):
            raise InputError(f"{path}: label values outside the int32 range")
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
        raise InputError(f"{path}: label values {lo}..{hi} lie outside the int32 range (expected organ ids)")
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return data.astype(dtype, copy=False)
    raise InputError(f"{path}: label values {lo}..{hi} do not fit an integer type")


def load_image(path: str | os.PathLike, *, canonical: bool = False) -> Volume:
    """Read a 3-D intensity image as float32 (see :func:`load_volume`)."""
    return load_volume(path, kind="image", canonical=canonical)


def load_labels(path: str | os.PathLike, *, canonical: bool = False) -> Volume:
    """Read a 3-D integer label map (see :func:`load_volume`)."""
    return load_volume(path, kind="labels", canonical=canonical)


# ------------------------------------------------------------------------------------------------ writing
def save_volume(volume: Volume, path: str | os.PathLike, *, dtype: Any = None) -> Path:
    """Write a :class:`Volume` as NIfTI atomically, keeping its affine.

    ``(C, X, Y, Z)`` arrays are written as ``(X, Y, Z, C)``. ``dtype`` casts before writing (integer label maps
    keep their integer type unless told otherwise). The suffix decides compression (``.nii.gz`` or ``.nii``).
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"{path}: output name must end in .nii or .nii.gz")
    data = np.asarray(volume.array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:  # nibabel refuses 64-bit integers by default
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if not (np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max):
            raise InputError(f"{path}: integer values {lo}..{hi} do not fit the int32 type written")
        data = data.astype(np.int32)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
    img = nib.Nifti1Image(_fortran_order(data), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        _write_nifti(img, tmp)
    return path


def load_field(path: str | os.PathLike, *, fixed: Volume | None = None,
               moving: Volume | np.ndarray | None = None) -> Volume:
    """Read a displacement-field file -> :class:`Volume`: array ``(3, X, Y, Z)`` float32 in voxels (fixed ->
    moving) and the file's affine (the fixed grid's).

    The file holds ``(X, Y, Z, 3)`` voxel displacements (Learn2Reg's layout, :func:`save_field`), or the same as
    ``(X, Y, Z, 1, 3)`` as some tools write it. An ITK displacement field (a vector image ``(X, Y, Z, 1, 3)`` with
    intent vector / displacement vector, in millimetres, LPS, as :func:`save_field_itk`, SimpleITK and ANTs write
    it; :func:`is_itk_displacement`) is recognised and converted to voxels of the moving grid, which needs
    ``moving`` (the moving image or its affine); without it the file is refused with a message saying so.

    If ``fixed`` is given, the field's grid must be ``fixed``'s: the same shape, and every voxel at the same world
    position within :data:`slicreg.checks.GRID_TOL_MM` (1e-3 mm; :func:`slicreg.checks.same_grid`); a field stored
    with the identity affine (``np.eye(4)``, "no geometry recorded", as many Learn2Reg submissions are written) is
    accepted when its shape matches, with a logged note, and returned with ``fixed``'s affine. Without ``fixed``
    the grid is not checked.

    Raises:
        InputError: not a NIfTI field of those shapes, NaN/Inf values, an ITK field without ``moving``, or (with
            ``fixed``) a field of another shape or on another grid; the message names the file and both grids
            (orientation, shape, spacing, origin)."""
    path = Path(path)
    img = _open_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 5 and shape[3] == 1:  # some tools write (X, Y, Z, 1, 3)
        shape = shape[:3] + shape[4:]
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(
            f"{path}: expected a displacement field of shape (X, Y, Z, 3) in voxels, got {tuple(img.shape)}"
        )
    data = _read_data(img, path).reshape(shape).astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: displacement field contains NaN or Inf values")
    field = Volume(from_learn2reg_layout(data), img.affine, {"source": str(path)})
    if is_itk_displacement(img):
        field = _itk_field_to_voxels(field, moving, path)
    if fixed is None:
        return field
    from slicreg.checks import GRID_TOL_MM, grid_description, same_grid

    where = fixed.meta.get("source", "the fixed image")
    if field.shape != fixed.shape:
        raise InputError(f"{path}: field grid {field.shape} does not match the fixed image grid {fixed.shape} "
                         f"({where})")
    if same_grid(field, fixed, tol_mm=GRID_TOL_MM):
        return field
    if np.allclose(field.affine, np.eye(4), atol=1e-6):
        log.warning("%s: note: the field records no geometry (identity affine); it is taken to be on the fixed "
                    "grid of %s (%s) as its shape says", path, where, grid_description(fixed))
        return Volume(field.array, fixed.affine, {"source": str(path), "geometry": "none recorded (identity affine)"})
    raise InputError(f"{path}: the field's grid is {grid_description(field)}, the fixed grid ({where}) is "
                     f"{grid_description(fixed)}; expected a field on the fixed grid (voxels, fixed -> moving; the "
                     f"same voxels in world space within {GRID_TOL_MM:g} mm)")


def save_field(disp_vox: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a field ``(3, X, Y, Z)`` (voxels, fixed -> moving) as NIfTI ``(X, Y, Z, 3)`` float32 with ``affine``."""
    import nibabel as nib

    path = Path(path)
    data = to_learn2reg_layout(np.asarray(disp_vox, dtype=np.float32))
    img = nib.Nifti1Image(_fortran_order(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_intent("vector", (), VOXEL_INTENT_NAME)
    with atomic_path(path) as tmp:
        _write_nifti(img, tmp)
    return path


# ------------------------------------------------------------------------------------ fast gzip, field formats
GZIP_LEVEL = 1
"""gzip level of every ``.nii.gz`` written (nibabel's own default); ISA-L's level 1 gives files of the same size."""


def _gzip_writer(fileobj: Any) -> Any:
    """A gzip stream into ``fileobj``: ISA-L (``isal``; several times faster than zlib at level 1, measured in
    docs/measurements.md) on up to :func:`_gzip_threads` threads (blocks compressed in parallel into one gzip
    member) when installed, else the standard library's. No file name and mtime 0 in the gzip header, and the same
    bytes for the same data whatever the number of threads."""
    try:
        from isal import igzip_threaded
    except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel falls back
        import gzip

        return gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=fileobj, mtime=0)
    return igzip_threaded.open(fileobj, "wb", compresslevel=GZIP_LEVEL, threads=_gzip_threads())


def _gzip_threads() -> int:
    """Compression threads: the CPUs this process may use, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _fortran_order(data: np.ndarray) -> np.ndarray:
    """``data`` as an F-contiguous array (the order of a NIfTI file's voxel data, so that nibabel writes it by a
    plain copy): the same values and shape. Large arrays are reordered by torch's threaded copy when torch is
    already imported (~2x numpy's single thread on 2 cores), others by numpy."""
    import sys

    data = np.asarray(data)
    if data.flags.f_contiguous:
        return data
    if (data.nbytes >= 1 << 24 and "torch" in sys.modules and min(data.strides) > 0
            and data.dtype in (np.float32, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64)):
        torch = sys.modules["torch"]
        return torch.from_numpy(data).permute(*reversed(range(data.ndim))).contiguous().numpy().T
    return np.asfortranarray(data)


class _ForwardOnly(io.RawIOBase):
    """A write-only stream over a compressor that nibabel can write a NIfTI file into: ``tell`` counts the bytes
    written, ``seek`` moves forward only (padding with zeros), as nibabel asks for the data offset."""

    def __init__(self, fileobj: Any) -> None:
        super().__init__()
        self.fileobj, self.written = fileobj, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.fileobj.write(data)
        self.written += n
        return n

    def tell(self) -> int:
        return self.written

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos + (self.written if whence == 1 else 0)
        if whence not in (0, 1) or target < self.written:
            raise io.UnsupportedOperation("a compressed NIfTI stream is written forward only")
        if target > self.written:
            self.write(bytes(target - self.written))
        return self.written


def _write_nifti(img: Any, path: Path) -> None:
    """``nib.save(img, path)``; a ``.nii.gz`` is streamed by nibabel into :func:`_gzip_writer` (no whole-file copy in
    memory; the same bytes as ``nib.save``'s, decompressed)."""
    if not str(path).endswith(".gz"):
        import nibabel as nib

        nib.save(img, str(path))
        return
    with open(path, "wb") as fh, _gzip_writer(fh) as gz:
        img.to_stream(_ForwardOnly(gz))


FIELD_FORMATS = ("voxels", "itk", "deeds")
"""Field file formats: ``voxels`` -- NIfTI ``(X, Y, Z, 3)`` float32, voxels, fixed -> moving (Learn2Reg);
``itk`` -- ITK displacement field: NIfTI vector image ``(X, Y, Z, 1, 3)`` float32, millimetres in LPS+, on the fixed
grid (SimpleITK's ``DisplacementFieldTransform``, ANTs' ``antsApplyTransforms``, 3D Slicer); ``deeds`` --
``STEM_displacements.dat`` + ``STEM_matrix.txt`` (:mod:`slicreg.deeds`; fixed and moving of one grid size).
See docs/formats.md."""
VOXEL_INTENT_NAME = "disp_vox_f2m"
ITK_INTENT_NAME = "disp_mm_lps"
DEEDS_SUFFIX = "_displacements.dat"


def deeds_stem(path: str | os.PathLike) -> str:
    """The deeds stem of an output name: ``u_displacements.dat`` -> ``u``; any other name is the stem itself."""
    path = str(path)
    return path[: -len(DEEDS_SUFFIX)] if path.endswith(DEEDS_SUFFIX) else path


def field_output_files(path: str | os.PathLike, fmt: str) -> list[Path]:
    """The files a field written as ``fmt`` to ``path`` consists of (one NIfTI file, or deeds' two files)."""
    check_field_format(fmt, path)
    if fmt == "deeds":
        stem = deeds_stem(path)
        return [Path(f"{stem}{DEEDS_SUFFIX}"), Path(f"{stem}_matrix.txt")]
    return [Path(path)]


def check_field_format(fmt: str, path: str | os.PathLike | None = None, *, flag: str = "--field-format") -> None:
    """Raise :class:`InputError` for an unknown format, or a NIfTI format whose file name does not end in .nii or
    .nii.gz (before any work)."""
    if fmt not in FIELD_FORMATS:
        raise InputError(f"{flag} {fmt}: expected one of {', '.join(FIELD_FORMATS)}")
    if path is not None and fmt != "deeds" and not str(path).endswith(NIFTI_SUFFIXES):
        raise InputError(f"{path}: a field in the {fmt!r} format is a NIfTI file; the name must end in .nii or "
                         f".nii.gz (deeds' files: {flag} deeds)")


def save_field_itk(disp_vox: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray | None,
                   path: str | os.PathLike) -> Path:
    """Write a field ``(3, X, Y, Z)`` (voxels, fixed -> moving) as an ITK displacement field, atomically.

    The file holds, at every fixed voxel ``x`` (world point ``p = A_f x``), ``d(p) = A_m (x + u(x)) - A_f x`` in
    millimetres with components in LPS+ (ITK's frame; :func:`slicreg.conventions.disp_vox_to_world`), as a NIfTI
    vector image ``(X, Y, Z, 1, 3)`` float32 with intent "vector" and the fixed grid's geometry: ITK maps a fixed
    point ``p`` to the moving point ``p + d(p)`` (resampling the moving image onto the fixed grid with it gives the
    warped image). ITK's NIfTI reader converts the geometry from RAS to LPS but not the vector components (checked
    with SimpleITK 2.5), hence the LPS components on disk. ``moving_affine=None``: the moving scan is on the fixed
    grid."""
    import nibabel as nib

    from slicreg.conventions import RAS_TO_LPS, disp_vox_to_world, to_itk_layout

    path = Path(path)
    check_field_format("itk", path)
    affine = np.asarray(fixed_affine, dtype=np.float64)
    # world displacements in the LPS frame directly: both affines composed with RAS -> LPS (one pass)
    lps_moving = None if moving_affine is None else RAS_TO_LPS @ np.asarray(moving_affine, dtype=np.float64)
    world = disp_vox_to_world(np.asarray(disp_vox, dtype=np.float32), RAS_TO_LPS @ affine, lps_moving)
    img = nib.Nifti1Image(_fortran_order(to_itk_layout(world)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_intent("vector", (), ITK_INTENT_NAME)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        _write_nifti(img, tmp)
    return path


def save_field_as(disp_vox: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray | None,
                  path: str | os.PathLike, fmt: str = "voxels", *, outputs: Any = None,
                  moving_shape: tuple[int, ...] | None = None, deeds_grid_spacing: int = 4) -> list[Path]:
    """Write a field (voxels, fixed -> moving, on the fixed grid) in one of :data:`FIELD_FORMATS`.

    Args:
        disp_vox: ``(3, X, Y, Z)``; ``x + u(x)`` is a voxel of the moving scan.
        fixed_affine, moving_affine: the two scans' voxel -> world matrices (``moving_affine=None``: the fixed one).
        path: the output file (``deeds``: the stem, or ``STEM_displacements.dat``).
        fmt: ``"voxels"`` (Learn2Reg layout, :func:`save_field`), ``"itk"`` (:func:`save_field_itk`) or
            ``"deeds"`` (control grid of ``deeds_grid_spacing`` + a least-squares affine in the matrix file).
        outputs: an :class:`OutputSet` (:func:`atomic_outputs`) to publish the file(s) with a command's other
            outputs; by default each format's file(s) are published on their own.
        moving_shape: the moving grid's shape; deeds needs it equal to the fixed one.

    Returns the final path(s) written."""
    check_field_format(fmt, path)
    disp = np.asarray(disp_vox)
    finals = field_output_files(path, fmt)
    if fmt == "deeds":
        from slicreg import deeds

        if moving_shape is not None and tuple(moving_shape) != tuple(disp.shape[1:]):
            raise InputError(f"{path}: deeds' format needs fixed and moving scans of one grid size, got fixed "
                             f"{tuple(disp.shape[1:])} and moving {tuple(moving_shape)}; write --field-format itk "
                             f"or voxels instead")
        ctrl, matrix = deeds.deeds_from_field(disp, grid_spacing=deeds_grid_spacing, affine="fit")
        return list(deeds.write_deeds(deeds_stem(path), ctrl, matrix, outputs=outputs))
    target = outputs.path(finals[0]) if outputs is not None else finals[0]
    if fmt == "itk":
        save_field_itk(disp, fixed_affine, moving_affine, target)
    else:
        save_field(disp, fixed_affine, target)
    return finals


def is_itk_displacement(img: Any) -> bool:
    """True for a NIfTI vector image ``(X, Y, Z, 1, 3)`` as ITK writes displacement fields (intent vector or
    displacement vector), except slicreg's own voxel fields in that layout."""
    header = img.header
    if len(img.shape) != 5 or tuple(img.shape[3:]) != (1, 3) or int(header["intent_code"]) not in (1006, 1007):
        return False
    name = np.asarray(header["intent_name"]).tobytes().split(b"\0", 1)[0].decode("latin-1")
    return name != VOXEL_INTENT_NAME


def _itk_field_to_voxels(field: Volume, moving: Volume | np.ndarray | None, path: Path) -> Volume:
    """An ITK displacement field read as ``(3, X, Y, Z)`` (mm, LPS, the file's grid = the fixed grid) -> voxels."""
    from slicreg.conventions import disp_world_to_vox, world_ras_to_lps

    if moving is None:
        raise InputError(f"{path}: an ITK displacement field (millimetres, LPS); expressing it in voxels needs the "
                         f"moving image's grid, which this command does not have: write the field with "
                         f"--field-format voxels for it")
    moving_affine = moving.affine if isinstance(moving, Volume) else np.asarray(moving, dtype=np.float64)
    disp = disp_world_to_vox(world_ras_to_lps(field.array), field.affine, moving_affine)
    return Volume(disp, field.affine, {**field.meta, "file_format": "itk"})
