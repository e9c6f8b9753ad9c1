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
  image's affine (the Learn2Reg layout; see :mod:`slicreg.conventions`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    The temporary name keeps the suffix (``.nii.gz`` stays ``.nii.gz``) so writers that look at the extension
    behave. ``os.replace`` is atomic on one file system, so readers see the old file or the complete new one.
    """
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_publications(path.parent)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=TMP_MARK + _full_suffix(path),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
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
        check_output_path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        _recover_publications(final.parent)
        remove_stale_temporaries(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.", suffix=TMP_MARK + _full_suffix(final),
                                   dir=final.parent)
        os.close(fd)
        os.unlink(tmp)  # writers create it; an unwritten output is detected at publication
        self.pending[final] = Path(tmp)
        return Path(tmp)


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
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
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
        raise InputError(f"{path}: is a directory, expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
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
            if total < 2**32 and isize < total:
                raise InputError(f"{path}: the header declares {declared}, but the compressed file holds only "
                                 f"{max(isize - offset, 0)} bytes of voxel data (truncated, or a wrong header)")
        elif size < offset + nbytes:
            raise InputError(f"{path}: the header declares {declared}, but the file holds only "
                             f"{max(size - offset, 0)} bytes of voxel data (truncated, or a wrong header)")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    available = _available_memory()
    if available is not None and nbytes > available:
        raise InputError(f"{path}: the header declares {declared}, more than the {available / 2**30:.1f} GiB of "
                         f"memory available")


def _read_data(img: Any, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
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
        path: ``.nii`` or ``.nii.gz`` file.
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
    meta = {"source": str(path), "original_axcodes": original}
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
    img = nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def load_field(path: str | os.PathLike, *, fixed: Volume | None = None) -> Volume:
    """Read a displacement-field file ``(X, Y, Z, 3)`` -> :class:`Volume` with array ``(3, X, Y, Z)`` float32.

    If ``fixed`` is given, the field's grid must be ``fixed``'s: the same shape, and every voxel at the same world
    position within 1e-3 mm (:func:`slicreg.checks.same_grid`); a field stored with the identity affine
    (``np.eye(4)``, "no geometry recorded", as many Learn2Reg submissions are written) is accepted when its shape
    matches, with a logged note, and returned with ``fixed``'s affine.

    Raises:
        InputError: not a field file, NaN/Inf values, or (with ``fixed``) a field on another grid; the message
            names the file and both grids (orientation, shape, spacing, origin)."""
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
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_intent("vector", (), "disp_vox_f2m")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
