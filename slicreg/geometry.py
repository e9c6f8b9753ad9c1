"""The method's inference geometry: a raw scan -> RAS, 2 mm, 192 x 160 x 256, and the way back.

Everything ``slicreg register`` needs to bring a user's scan onto the network's grid and to map the result
back to the scan's own grid; the data-set stages use the same functions.

SLIC-Reg (docs/method.md, section 1) resamples every scan to 2 mm isotropic and crops or pads it to
192 x 160 x 256 voxels around the centre of mass of a soft-tissue weight. Here that is four pure steps on
:class:`~slicreg.conventions.Volume` objects, and one function that runs them in order:

1. :func:`reorient_ras` -- a pure axis permutation / flip to the closest canonical (RAS+) voxel order;
2. :func:`resample_isotropic` -- images trilinear (Gaussian anti-aliasing when the grid gets coarser), labels
   nearest; the new grid covers the same field of view, voxel centres follow ``align_corners=False`` semantics;
3. :func:`soft_tissue_centre` -- ``w = sigmoid(10 - 10 |HU / 125 - 1|)`` eroded by a 3x3x3 minimum filter,
   centre ``sum(x w) / sum(w)`` in voxels;
4. :func:`crop_start` + :func:`crop_or_pad` -- a window of ``crop_shape`` voxels centred on that point, padded
   with air (-1000 HU) or background (0).

:func:`preprocess_volume` runs 1-4 and returns a :class:`CropRecord` beside the new volumes. Every step is an
affine map of voxel indices, so the whole preprocessing is one: preprocessed voxel ``p`` sits at world
position ``record.affine @ p`` and at original voxel ``inv(record.original_affine) @ record.affine @ p``
(:meth:`CropRecord.prep_to_original_vox`). :func:`to_original_grid` maps a preprocessed volume back,
:func:`field_to_original_grid` / :func:`field_to_preprocessed_grid` re-express displacement fields between the
two grids (:func:`reexpress_field` is the general rule).

Nothing is clipped silently: a field of view longer than the crop loses slices (recorded per side in
``record.dropped_vox`` and logged); an axis shorter than the crop is kept whole (the window moves just
enough); HU values outside the int16 range are counted in ``record.clipped_voxels`` and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slicreg.checks import check_ct_like
from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.fields import sample_affine
from slicreg.grid import Grid, spacing_index_map

__all__ = [
    "CROP_SHAPE",
    "SPACING_MM",
    "AIR_HU",
    "CROP_FORMAT",
    "CropRecord",
    "Preprocessed",
    "check_ct_like",
    "reorient_ras",
    "resample_isotropic",
    "resample_grid",
    "soft_tissue_weight",
    "soft_tissue_centre",
    "crop_start",
    "crop_or_pad",
    "hu_to_int16",
    "preprocess_volume",
    "to_original_grid",
    "reexpress_field",
    "field_to_preprocessed_grid",
    "field_to_original_grid",
    "load_fov_mask",
]

log = logging.getLogger(__name__)

CROP_SHAPE: tuple[int, int, int] = (192, 160, 256)
"""Preprocessed grid in voxels, NIfTI array order (SLIC-Reg and Learn2Reg AbdomenCTCT)."""
SPACING_MM = 2.0
"""Isotropic voxel size of the preprocessed grid in mm."""
AIR_HU = -1000.0
"""Padding value of images (air); label maps are padded with 0."""
CROP_FORMAT = "slicreg-crop/1"
"""The ``format`` tag of a crops/<id>.json file."""


# ------------------------------------------------------------------------------------------------ checks
# check_ct_like lives in slicreg.checks (shared by every command that assumes CT); it is re-exported here.


def _check_labels_grid(image: Volume, labels: Volume | None, name: str) -> None:
    if labels is None:
        return
    if labels.n_channels is not None:
        raise InputError(f"{name}: label map must be 3-D (X, Y, Z), got shape {np.shape(labels.array)}")
    if np.asarray(labels.array).dtype.kind not in "iub":
        raise InputError(f"{name}: label map must hold integers, got dtype {np.asarray(labels.array).dtype}")
    if not image.same_grid(labels, atol_mm=1e-2):
        raise InputError(f"{name}: the label map's grid (shape {labels.shape}, spacing "
                         f"{np.round(labels.spacing_mm, 4).tolist()} mm) differs from the image's (shape "
                         f"{image.shape}, spacing {np.round(image.spacing_mm, 4).tolist()} mm) or their affines "
                         f"differ by more than 0.01 mm; expected labels on the image grid")


# ------------------------------------------------------------------------------------------ reorientation
def _apply_spatial(array: np.ndarray, fn: Any) -> np.ndarray:
    """Apply ``fn`` to a 3-D array, or to every channel of a ``(C, X, Y, Z)`` array."""
    array = np.asarray(array)
    if array.ndim == 3:
        return fn(array)
    return np.stack([fn(channel) for channel in array])


def reorient_ras(volume: Volume) -> Volume:
    """Reorder and flip the voxel axes to the closest canonical orientation (RAS+); no resampling.

    Array axis 0 then runs roughly left -> Right, axis 1 posterior -> Anterior, axis 2 inferior -> Superior. An
    oblique scan keeps its (small) rotation in the affine: only permutations and flips are applied, so every
    voxel value is kept exactly.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` with any orientation.

    Returns:
        The same voxels in RAS+ order, affine updated so every voxel keeps its world position;
        ``meta["original_axcodes"]`` holds the input's axis codes (e.g. ``"LPS"``).
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(volume.affine)
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    codes = "".join(nio.aff2axcodes(volume.affine))
    array = _apply_spatial(volume.array, lambda a: nio.apply_orientation(a, transform))
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.shape)
    return Volume(np.ascontiguousarray(array), affine, {**volume.meta, "original_axcodes": codes})


# ---------------------------------------------------------------------------------------------- resampling
def resample_grid(shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]
                  ) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of spacing ``target_mm`` that covers the same field of view as a grid of ``shape`` x ``spacing_mm``.

    The field of view of an axis is ``n * d`` mm (voxel faces); the new grid has ``m = max(1, round(n d / s))``
    voxels centred on the same midpoint, so new voxel ``x`` sits at old voxel position
    ``(s / d) * (x + 0.5 - m / 2) + n / 2 - 0.5`` (``align_corners=False`` semantics).

    Returns:
        ``(new_shape, index_map)`` where ``index_map`` is the 4x4 matrix taking new voxel indices to old ones
        (so the new affine is ``old_affine @ index_map``): :func:`slicreg.grid.spacing_index_map`, the rule of
        :meth:`slicreg.grid.Grid.with_spacing`.
    """
    return spacing_index_map(shape, spacing_mm, target_mm)


def resample_isotropic(volume: Volume, *, spacing_mm: float = SPACING_MM, labels: bool = False,
                       antialias: bool = True) -> Volume:
    """Resample to isotropic voxels of ``spacing_mm`` covering the same field of view.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)``; any spacing (e.g. 0.7 x 0.7 x 5 mm), any orientation.
        spacing_mm: target voxel size in mm (default 2.0).
        labels: ``True`` for a label map: nearest neighbour, dtype kept. Otherwise trilinear, float32 out.
        antialias: images only: when an axis gets coarser by a factor ``f > 1``, smooth it first with a Gaussian
            of sigma ``(f - 1) / 2`` input voxels (scikit-image's rule), so that thin slices do not alias.

    Returns:
        The resampled volume; its affine is ``volume.affine @ index_map`` (see :func:`resample_grid`), so its
        columns have norm ``spacing_mm`` and its direction cosines are those of the input.
    """
    from scipy import ndimage

    spacing = volume.spacing_mm
    target = np.full(3, float(spacing_mm))
    shape, index_map = resample_grid(volume.shape, spacing, target)
    factor = target / spacing
    if np.allclose(index_map, np.eye(4), atol=1e-9):
        return Volume(np.array(volume.array, copy=True), volume.affine, dict(volume.meta))
    if labels:
        array = np.asarray(volume.array)
        if array.dtype.kind not in "iub":
            raise InputError(f"resample_isotropic: a label map must hold integers, got dtype {array.dtype}")

        def one(a: np.ndarray) -> np.ndarray:  # scipy's nearest, border (edge labels continue)
            return sample_affine(a, index_map, shape, interpolation="nearest", padding="border", backend="scipy")
    else:
        sigma = np.where(factor > 1, (factor - 1) / 2.0, 0.0) if antialias else np.zeros(3)

        def one(a: np.ndarray) -> np.ndarray:
            a = a.astype(np.float32, copy=False)
            if np.any(sigma > 0):
                a = ndimage.gaussian_filter(a, sigma=sigma, mode="nearest", truncate=3.0)
            return sample_affine(a, index_map, shape, interpolation="linear", padding="border", backend="scipy")

    array = _apply_spatial(volume.array, one)
    return Volume(array, volume.affine @ index_map, dict(volume.meta))


# ----------------------------------------------------------------------------------------- centre and crop
def soft_tissue_weight(hu: np.ndarray) -> np.ndarray:
    """SLIC-Reg's soft-tissue weight ``sigmoid(10 - 10 |HU / 125 - 1|)`` (about 1 for 0..250 HU), float32."""
    hu = np.asarray(hu, dtype=np.float32)
    z = 10.0 - 10.0 * np.abs(hu / 125.0 - 1.0)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # = 1 / (1 + exp(-z)), without overflow


def soft_tissue_centre(hu: np.ndarray, *, erode: bool = True) -> np.ndarray | None:
    """Centre of mass of the soft-tissue weight, in voxels.

    Args:
        hu: ``(X, Y, Z)`` intensities in HU.
        erode: apply the 3x3x3 minimum filter to the weight first (as SLIC-Reg does; removes thin rims such as
            the skin or partial-volume edges). Borders replicate the edge value.

    Returns:
        ``(3,)`` float64 position ``sum(x w) / sum(w)`` in voxels, or ``None`` if the weight is (numerically)
        zero everywhere, i.e. there is no soft tissue.
    """
    from scipy import ndimage

    w = soft_tissue_weight(hu)
    if erode:
        w = ndimage.minimum_filter(w, size=3, mode="nearest")
    total = float(w.sum(dtype=np.float64))
    if total <= 1e-6:
        return None
    centre = [float((w.sum(axis=tuple(b for b in range(3) if b != a), dtype=np.float64)
                     * np.arange(w.shape[a])).sum() / total) for a in range(3)]
    return np.asarray(centre)


def crop_start(shape: Sequence[int], centre_vox: Sequence[float], crop_shape: Sequence[int]) -> tuple[int, ...]:
    """First voxel (per axis, may be negative) of a ``crop_shape`` window centred on ``centre_vox``.

    The window's middle ``start + (S - 1) / 2`` is put at the voxel nearest the centre. Where an axis of the
    input is no longer than the window (a thin slab, a short scan), the window is moved just enough to hold
    the whole axis, so nothing is cut; a longer axis loses what falls outside (the caller records it).
    """
    starts = []
    for n, c, s in zip(shape, centre_vox, crop_shape):
        start = int(np.floor(float(c) - (s - 1) / 2.0 + 0.5))
        if n <= s:
            start = min(0, max(n - s, start))
        starts.append(start)
    return tuple(starts)


def crop_or_pad(volume: Volume, start: Sequence[int], crop_shape: Sequence[int], *, fill: float) -> Volume:
    """Take the window ``[start, start + crop_shape)`` of the grid; voxels outside the input become ``fill``.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)``.
        start: first voxel per axis (negative = padding before the data).
        crop_shape: window size in voxels.
        fill: value of voxels outside the input (air -1000 HU for images, 0 for labels).

    Returns:
        The window as a volume with affine ``volume.affine @ translate(start)`` (every voxel keeps its world
        position), same dtype.
    """
    array = np.asarray(volume.array)
    lead = array.shape[:-3]
    out = np.full(lead + tuple(int(s) for s in crop_shape), fill, dtype=array.dtype)
    src, dst = [], []
    for n, st, s in zip(volume.shape, start, crop_shape):
        lo, hi = max(0, st), min(n, st + s)
        if hi <= lo:
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            src.append(slice(lo, hi))
            dst.append(slice(lo - st, hi - st))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return Volume(out, volume.grid.crop(start, crop_shape).affine, dict(volume.meta))


def hu_to_int16(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """Round HU to int16; values beyond the int16 range are clipped and *counted*.

    Returns:
        ``(array int16, number of clipped voxels)``.
    """
    hu = np.asarray(hu)
    info = np.iinfo(np.int16)
    rounded = np.rint(hu)
    n_clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
    return np.clip(rounded, info.min, info.max).astype(np.int16), n_clipped


# ----------------------------------------------------------------------------------------------- the record
def _mat(value: Any, name: str) -> np.ndarray:
    m = np.asarray(value, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"crop record: {name} must be a finite 4x4 matrix, got {np.shape(value)}")
    return m


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if len(value) != 3:
        raise InputError(f"crop record: {name} must have 3 entries, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class CropRecord:
    """How a preprocessed volume relates to its original grid (written as ``crops/<id>.json``).

    Attributes:
        original_shape: ``(X, Y, Z)`` of the original image.
        original_affine: its voxel -> world matrix (mm), as stored in the file (any orientation).
        original_axcodes: its orientation, e.g. ``"LPS"``.
        spacing_mm: isotropic voxel size of the resampled grid.
        resampled_shape: shape of the RAS, isotropic grid covering the whole original field of view.
        resampled_affine: its affine.
        crop_start: first voxel of the window in the resampled grid (negative = padding).
        crop_shape: shape of the preprocessed grid.
        affine: the preprocessed grid's affine, ``resampled_affine @ translate(crop_start)``.
        centre_vox: soft-tissue centre of mass in resampled voxels (``None`` if none was found and forced).
        padded_vox: voxels of padding per axis, ``((before, after), ...)``.
        dropped_vox: resampled voxels cut away per axis, ``((before, after), ...)``.
        clipped_voxels: voxels whose HU did not fit int16 (normally 0).
        ct_check: ``None`` if the input looked like CT, else the reason it did not (preprocessed with force).
        source: free-form provenance (file names).
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    original_axcodes: str
    spacing_mm: float
    resampled_shape: tuple[int, int, int]
    resampled_affine: np.ndarray
    crop_start: tuple[int, int, int]
    crop_shape: tuple[int, int, int]
    affine: np.ndarray
    centre_vox: tuple[float, float, float] | None
    padded_vox: tuple[tuple[int, int], ...]
    dropped_vox: tuple[tuple[int, int], ...]
    clipped_voxels: int = 0
    ct_check: str | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def prep_to_original_vox(self) -> np.ndarray:
        """4x4 map from preprocessed voxel indices to original voxel indices."""
        return Grid(self.crop_shape, self.affine).vox_map(Grid(self.original_shape, self.original_affine))

    def original_to_prep_vox(self) -> np.ndarray:
        """4x4 map from original voxel indices to preprocessed voxel indices."""
        return Grid(self.original_shape, self.original_affine).vox_map(Grid(self.crop_shape, self.affine))

    def fov_mask(self) -> np.ndarray:
        """``(X, Y, Z)`` bool on the preprocessed grid: True where the original scan had data, False in the padding.

        Use it to restrict comparisons (e.g. field errors: a re-expressed field is extrapolated in the padding)."""
        mask = np.zeros(self.crop_shape, dtype=bool)
        inside = tuple(slice(before, size - after) for (before, after), size in zip(self.padded_vox, self.crop_shape))
        mask[inside] = True
        return mask

    @property
    def centre_mm(self) -> tuple[float, float, float] | None:
        """The soft-tissue centre in world coordinates (mm)."""
        if self.centre_vox is None:
            return None
        return tuple(float(v) for v in (self.resampled_affine @ np.append(self.centre_vox, 1.0))[:3])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of ``crops/<id>.json``)."""
        return {
            "format": CROP_FORMAT,
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "original_axcodes": self.original_axcodes,
            "spacing_mm": float(self.spacing_mm),
            "resampled_shape": list(self.resampled_shape),
            "resampled_affine": self.resampled_affine.tolist(),
            "crop_start": list(self.crop_start),
            "crop_shape": list(self.crop_shape),
            "affine": self.affine.tolist(),
            "prep_to_original_vox": self.prep_to_original_vox().tolist(),
            "centre_vox": None if self.centre_vox is None else list(self.centre_vox),
            "centre_mm": None if self.centre_mm is None else list(self.centre_mm),
            "padded_vox": [list(p) for p in self.padded_vox],
            "dropped_vox": [list(p) for p in self.dropped_vox],
            "clipped_voxels": int(self.clipped_voxels),
            "ct_check": self.ct_check,
            "source": dict(self.source),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, name: str = "crop record") -> CropRecord:
        """Inverse of :meth:`to_json`; a malformed record raises :class:`InputError` naming ``name``."""
        if not isinstance(obj, dict) or obj.get("format") != CROP_FORMAT:
            raise InputError(f"{name}: expected a crop record with format {CROP_FORMAT!r}, got "
                             f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}")
        try:
            centre = obj.get("centre_vox")
            return cls(
                original_shape=_triple(obj["original_shape"], "original_shape"),
                original_affine=_mat(obj["original_affine"], "original_affine"),
                original_axcodes=str(obj.get("original_axcodes", "")),
                spacing_mm=float(obj["spacing_mm"]),
                resampled_shape=_triple(obj["resampled_shape"], "resampled_shape"),
                resampled_affine=_mat(obj["resampled_affine"], "resampled_affine"),
                crop_start=_triple(obj["crop_start"], "crop_start"),
                crop_shape=_triple(obj["crop_shape"], "crop_shape"),
                affine=_mat(obj["affine"], "affine"),
                centre_vox=None if centre is None else tuple(float(v) for v in centre),  # type: ignore[arg-type]
                padded_vox=tuple(tuple(int(v) for v in p) for p in obj["padded_vox"]),
                dropped_vox=tuple(tuple(int(v) for v in p) for p in obj["dropped_vox"]),
                clipped_voxels=int(obj.get("clipped_voxels", 0)),
                ct_check=obj.get("ct_check"),
                source=dict(obj.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{name}: malformed crop record ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Preprocessed:
    """Output of :func:`preprocess_volume`: image (int16 HU), labels (or ``None``) and the record."""

    image: Volume
    labels: Volume | None
    record: CropRecord


def preprocess_volume(image: Volume, labels: Volume | None = None, *, spacing_mm: float = SPACING_MM,
                      crop_shape: Sequence[int] = CROP_SHAPE, force: bool = False, antialias: bool = True,
                      name: str = "image") -> Preprocessed:
    """The SLIC-Reg preprocessing of one scan (see the module docstring).

    Args:
        image: ``(X, Y, Z)`` CT in HU, any orientation and spacing.
        labels: optional ``(X, Y, Z)`` integer label map on the image's grid.
        spacing_mm: isotropic target spacing (default 2.0 mm).
        crop_shape: target shape (default 192 x 160 x 256).
        force: preprocess an image that does not look like CT (see :func:`check_ct_like`); with force, an image
            without soft tissue is centred on its grid centre instead of failing.
        antialias: Gaussian anti-aliasing of the image when a spacing gets coarser (see
            :func:`resample_isotropic`).
        name: how to call the input in messages (e.g. its file name).

    Returns:
        :class:`Preprocessed` with the image as int16 HU padded with -1000, labels (dtype kept) padded with 0,
        both on the grid ``record.affine`` of shape ``crop_shape``.

    Raises:
        InputError: non-CT-like input without force, labels on another grid, no soft tissue without force.
    """
    if image.n_channels is not None:
        raise InputError(f"{name}: expected a 3-D image (X, Y, Z), got shape {np.shape(image.array)}")
    crop_shape = _triple(crop_shape, "crop_shape")
    if min(crop_shape) < 1:
        raise InputError(f"crop_shape: expected positive sizes, got {crop_shape}")
    _check_labels_grid(image, labels, name)
    ct_check = check_ct_like(image.array, name=name, force=force)

    ras = reorient_ras(image)
    codes = ras.meta["original_axcodes"]
    res = resample_isotropic(ras, spacing_mm=spacing_mm, antialias=antialias)
    centre = soft_tissue_centre(res.array)
    if centre is None:
        if not force:
            raise InputError(f"{name}: no soft tissue (about 0..250 HU) found, so the crop cannot be centred; "
                             f"expected an abdominal CT in HU (use force to centre on the grid instead)")
        log.warning("%s: no soft tissue found; centring the crop on the grid centre", name)
        centre_for_crop = (np.asarray(res.shape, dtype=np.float64) - 1) / 2.0
    else:
        centre_for_crop = centre
    start = crop_start(res.shape, centre_for_crop, crop_shape)
    cropped = crop_or_pad(res, start, crop_shape, fill=AIR_HU)
    array16, n_clipped = hu_to_int16(cropped.array)
    if n_clipped:
        log.warning("%s: %d voxels outside the int16 range were clipped to -32768..32767 HU", name, n_clipped)

    padded, dropped = [], []
    for n, st, s in zip(res.shape, start, crop_shape):
        padded.append((max(0, -st), max(0, st + s - n)))
        dropped.append((max(0, st), max(0, n - (st + s))))
    if any(a or b for a, b in dropped):
        mm = [(a * spacing_mm, b * spacing_mm) for a, b in dropped]
        log.info("%s: the field of view is larger than the crop; cut away (mm, before/after per axis): %s",
                 name, mm)

    out_labels = None
    if labels is not None:
        lab_ras = reorient_ras(labels)
        lab_res = resample_isotropic(lab_ras, spacing_mm=spacing_mm, labels=True)
        out_labels = crop_or_pad(lab_res, start, crop_shape, fill=0)
        if not np.allclose(out_labels.affine, cropped.affine, atol=1e-6):  # same rule on the same grid
            raise AssertionError("label and image grids diverged during preprocessing")

    record = CropRecord(
        original_shape=image.shape, original_affine=image.affine, original_axcodes=codes,
        spacing_mm=float(spacing_mm), resampled_shape=res.shape, resampled_affine=res.affine,
        crop_start=start, crop_shape=crop_shape, affine=cropped.affine,
        centre_vox=None if centre is None else tuple(float(v) for v in centre),
        padded_vox=tuple(padded), dropped_vox=tuple(dropped), clipped_voxels=n_clipped, ct_check=ct_check,
        source={k: v for k, v in image.meta.items() if k == "source"},
    )
    meta = {"preprocessed_from": image.meta.get("source")}
    return Preprocessed(Volume(array16, cropped.affine, meta),
                        None if out_labels is None else Volume(out_labels.array, out_labels.affine, meta), record)


# ------------------------------------------------------------------------------------------- mapping back
def to_original_grid(volume: Volume | np.ndarray, record: CropRecord, *, labels: bool = False,
                     fill: float | None = None) -> Volume:
    """Map a volume on the preprocessed grid back onto the original image grid.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the preprocessed grid (a :class:`Volume` whose affine must
            be ``record.affine``, or a bare array).
        record: the subject's :class:`CropRecord`.
        labels: nearest neighbour (dtype kept) instead of trilinear (float32).
        fill: value where the original grid lies outside the preprocessed window (default: 0 for labels,
            -1000 HU for images).

    Returns:
        A volume of shape ``record.original_shape`` with affine ``record.original_affine``.
    """
    if isinstance(volume, Volume):
        if not np.allclose(volume.affine, record.affine, atol=1e-3):
            raise InputError("to_original_grid: the volume's affine is not the preprocessed grid of this record")
        array = volume.array
    else:
        array = np.asarray(volume)
    if tuple(np.shape(array)[-3:]) != tuple(record.crop_shape):
        raise InputError(f"to_original_grid: expected a volume of shape {record.crop_shape} (the preprocessed "
                         f"grid), got {np.shape(array)}")
    fill = (0 if labels else AIR_HU) if fill is None else fill
    index_map = record.original_to_prep_vox()

    def one(a: np.ndarray) -> np.ndarray:
        if labels:
            if a.dtype.kind not in "iub":
                raise InputError(f"to_original_grid: a label map must hold integers, got dtype {a.dtype}")
            return sample_affine(a, index_map, record.original_shape, interpolation="nearest", padding="zeros",
                                 fill=fill, backend="scipy")
        return sample_affine(a.astype(np.float32, copy=False), index_map, record.original_shape,
                             interpolation="linear", padding="zeros", fill=fill, backend="scipy")

    return Volume(_apply_spatial(array, one), record.original_affine, {"mapped_back": True})


def reexpress_field(disp_vox: np.ndarray, *, fixed_affine: np.ndarray, moving_affine: np.ndarray,
                    new_fixed_affine: np.ndarray, new_fixed_shape: Sequence[int], new_moving_affine: np.ndarray
                    ) -> np.ndarray:
    """Re-express a displacement field given between two grids on another pair of grids.

    A field ``u`` on the fixed grid ``F`` (voxel -> world affine) maps fixed voxel ``q`` to moving voxel
    ``q + u(q)`` of the moving grid ``M`` (the project's convention, voxels, fixed -> moving). The same
    correspondence seen from new grids ``F'`` and ``M'`` (e.g. the preprocessed grids) is

        ``u'(p) = M'^-1 M (q + u(q)) - p``  with  ``q = F^-1 F' p``,

    so that warping a volume resampled onto ``M'`` with ``u'`` equals resampling the volume warped with ``u``
    onto ``F'``. ``u`` is sampled trilinearly at ``q`` (``q`` is an affine function of ``p``, so this is
    :func:`slicreg.fields.sample_affine`, one ``scipy.ndimage.affine_transform`` per component); where ``q``
    lies outside the fixed grid the edge value continues (the field is extrapolated constantly).

    Args:
        disp_vox: ``(3, X, Y, Z)`` float on the grid of ``fixed_affine``.
        fixed_affine, moving_affine: 4x4 affines of the grids ``u`` relates.
        new_fixed_affine, new_fixed_shape, new_moving_affine: the grids to express the field on.

    Returns:
        ``(3, *new_fixed_shape)`` float32, voxels of the new grids, fixed -> moving.
    """
    disp = np.asarray(disp_vox)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(f"reexpress_field: expected a field (3, X, Y, Z), got {disp.shape}")
    shape = _triple(new_fixed_shape, "new_fixed_shape")
    to_src = np.linalg.inv(np.asarray(fixed_affine, np.float64)) @ np.asarray(new_fixed_affine, np.float64)
    to_new = np.linalg.inv(np.asarray(new_moving_affine, np.float64)) @ np.asarray(moving_affine, np.float64)
    # u(q) per component, then rotate it into the new moving grid: B u(q)
    sampled = sample_affine(disp.astype(np.float32, copy=False), to_src, shape, interpolation="linear",
                            padding="border", backend="scipy")
    b = to_new[:3, :3]
    out = np.empty((3, *shape), np.float32)
    # the part without displacement: (B A - I) p + (B t_A + t_B), written with broadcast index ramps
    lin = (to_new @ to_src)[:3] - np.hstack([np.eye(3), np.zeros((3, 1))])
    ramps = [np.arange(n, dtype=np.float32).reshape([-1 if a == k else 1 for k in range(3)])
             for a, n in enumerate(shape)]
    for c in range(3):
        acc = b[c, 0] * sampled[0] + b[c, 1] * sampled[1] + b[c, 2] * sampled[2]
        acc += np.float32(lin[c, 3])
        for a in range(3):
            if lin[c, a] != 0:
                acc += np.float32(lin[c, a]) * ramps[a]
        out[c] = acc
    return out


def field_to_preprocessed_grid(disp_vox: np.ndarray, fixed: CropRecord, moving: CropRecord) -> np.ndarray:
    """A field between two original scans -> the same correspondence on their preprocessed grids.

    ``disp_vox`` is ``(3, *fixed.original_shape)``, fixed original voxel -> moving original voxel; the result is
    ``(3, *fixed.crop_shape)``, preprocessed fixed voxel -> preprocessed moving voxel (:func:`reexpress_field`).
    """
    if tuple(np.shape(disp_vox)[1:]) != tuple(fixed.original_shape):
        raise InputError(f"field_to_preprocessed_grid: field grid {np.shape(disp_vox)[1:]} is not the fixed "
                         f"subject's original grid {fixed.original_shape}")
    return reexpress_field(disp_vox, fixed_affine=fixed.original_affine, moving_affine=moving.original_affine,
                           new_fixed_affine=fixed.affine, new_fixed_shape=fixed.crop_shape,
                           new_moving_affine=moving.affine)


def field_to_original_grid(disp_vox: np.ndarray, fixed: CropRecord, moving: CropRecord) -> np.ndarray:
    """A field between two preprocessed scans -> the same correspondence between the original scans.

    ``disp_vox`` is ``(3, *fixed.crop_shape)``; the result is ``(3, *fixed.original_shape)``, original fixed
    voxel -> original moving voxel (:func:`reexpress_field`). Outside the preprocessed window the field is
    continued from its edge."""
    if tuple(np.shape(disp_vox)[1:]) != tuple(fixed.crop_shape):
        raise InputError(f"field_to_original_grid: field grid {np.shape(disp_vox)[1:]} is not the preprocessed "
                         f"grid {fixed.crop_shape}")
    return reexpress_field(disp_vox, fixed_affine=fixed.affine, moving_affine=moving.affine,
                           new_fixed_affine=fixed.original_affine, new_fixed_shape=fixed.original_shape,
                           new_moving_affine=moving.original_affine)


def load_fov_mask(path: str | Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A field-of-view mask ``(X, Y, Z)`` bool for an image of ``shape``, from a crop record (``*.json``,
    :class:`CropRecord`: True where the original scan had data) or a mask NIfTI on the image's grid
    (non-zero = inside).

    Args:
        path: the crop record or the mask file.
        shape: the image's grid ``(X, Y, Z)``; the mask must have exactly this shape.
        what: the argument or file role named in errors (``"--fixed-fov"``, ``"fixed crop record"``).

    Raises:
        InputError: unreadable file, an empty mask, or a record / mask for another grid (``what`` names the
            argument).
    """
    from slicreg.io import load_image, read_json

    path = Path(path)
    if path.suffix.lower() == ".json":
        mask = CropRecord.from_json(read_json(path), name=f"{what} {path}").fov_mask()
    else:
        mask = np.asarray(load_image(path).array) != 0
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"{what} {path}: the field of view is for a grid of shape {tuple(mask.shape)}, the image has "
                         f"{tuple(shape)}")
    if not mask.any():
        raise InputError(f"{what} {path}: the field of view is empty (no voxel inside)")
    return mask
