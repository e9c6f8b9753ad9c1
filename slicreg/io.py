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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _full_suffix(path), dir=path.parent)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    return img


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
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
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

    If ``fixed`` is given, the field's grid must match it (shape; affine within 1e-3 mm)."""
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
    if fixed is not None and field.shape != fixed.shape:
        raise InputError(f"{path}: field grid {field.shape} does not match the fixed image grid {fixed.shape}")
    return field


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
