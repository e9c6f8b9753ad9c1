"""Evaluation metrics of a registration, computed the way Learn2Reg computes them (and the SLIC-Reg way beside).

All functions are pure: arrays in, numbers out; nothing here reads a file. Label maps are integer arrays
``(X, Y, Z)`` on the fixed grid; fields are ``(3, X, Y, Z)`` in voxels, fixed -> moving (see
:mod:`slicreg.conventions`). numpy arrays and torch tensors are accepted (tensors are copied to the CPU).

Definitions (docs/evaluation.md; docs/method.md, section 8)
-----------------------------------------------------------
Warping
    Learn2Reg warps the moving segmentation with ``scipy.ndimage.map_coordinates(moving, identity + disp,
    order=0)``: nearest neighbour rounding half up, and -- because of ``mode="constant"`` -- a sampling
    position outside ``[0, n - 1]`` on any axis gives background, even within half a voxel of the edge.
    :func:`warp_labels_learn2reg` calls exactly that. :func:`slicreg.fields.warp_labels` agrees except at
    exact .5 ties and in that half-voxel band outside the grid, which it maps to the edge voxel.

Dice (:func:`dice`): ``2 |F & W| / (|F| + |W|)`` per label; the rules differ only for absent labels
(``absent=``)
    - ``"learn2reg"``: a label absent from the fixed *or the (unwarped) moving* segmentation is skipped: NaN,
      and means are NaN-means. A label present in both but lost by the warp scores 0.
    - ``"zero"`` (the SLIC-Reg reference): every label counts; an absent label scores 0 and is still averaged
      (also when it is absent from both).
    - ``"nan"``: NaN only where the ratio is undefined (absent from both maps compared); used where no
      unwarped moving map is at hand (the cohort's checks of its true fields).

HD95 (:func:`hausdorff`, :func:`hd95_learn2reg`)
    The definition of the surface-distance library Learn2Reg uses. Surfaces live on the grid of voxel
    *corners*: a corner is a surface point when the 8 voxels around it are neither all inside nor all outside
    the mask, and it carries the area of the marching-cubes surface inside that 2x2x2 cell (its *surfel*
    area, in mm^2 with the spacing). The distance of each surface point of one mask to the nearest surface
    point of the other comes from a Euclidean distance transform (``scipy.ndimage.distance_transform_edt``,
    ``sampling`` = voxel spacing). The directed 95th percentile is the smallest distance ``d`` such that the
    surface points with distance ``<= d`` carry at least 95 % of the surface area; HD95 is the larger of the
    two directions. The per-cell areas come from scikit-image's classic (Lorensen) marching cubes run on the
    cell's minority side (inside when at most 4 of the 8 voxels are inside, else outside), which is the table
    the surface-distance library ships (checked for all 256 cells). Learn2Reg reports HD95 in voxels
    (spacing 1); :func:`hd95_learn2reg` gives voxels and millimetres. A mask that is empty while the other is
    not gives ``inf`` (as in that library); two empty masks give NaN.

Jacobian (:func:`jacobian_determinant`, :func:`jacobian_stats`)
    ``det(I + grad u)`` with ``grad u`` from central differences ``(u[i+1] - u[i-1]) / 2`` (one-sided at the
    outermost voxels, as :func:`numpy.gradient`): :func:`slicreg.fields.jacobian_determinant`, the project's
    one Jacobian, importable from here too (numpy in, float64 out). Statistics use the field cropped by 2 voxels at
    every border (Learn2Reg's crop, which also removes the one-sided edge differences):
    ``sdlogj_learn2reg = std(log(clip(det + 3, 1e-9, 1e9)))`` exactly as Learn2Reg computes it (the "+ 3" is
    theirs), ``std_log_det = std(log det)`` over the voxels with ``det > 0``, ``folding_percent`` = the
    percentage of voxels with ``det <= 0``.

Field error (:func:`field_error_mm`)
    ``|A (u - u_true)|`` in mm per voxel (``A`` = the linear part of the fixed grid's affine), summarised by
    mean / median / 95th percentile (linear interpolation) / max inside a mask.

Aggregation over pairs (:func:`aggregate`)
    mean, standard deviation (``ddof=0``, as numpy and Learn2Reg) and the 30th percentile (``numpy.quantile``
    with linear interpolation, Learn2Reg's robustness figure) of the finite-or-infinite values; NaN values
    (undefined for a pair) are left out and counted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from slicreg.errors import InputError
from slicreg.fields import jacobian_determinant  # the one Jacobian, re-exported for the evaluation
from slicreg.labels import BTCV_IDS, LARGE_ORGANS

__all__ = [
    "DEFAULT_GROUPS",
    "warp_labels_learn2reg",
    "overlap_counts",
    "ABSENT_RULES",
    "dice",
    "mean_learn2reg",
    "mean_reference",
    "group_means",
    "SurfaceDistances",
    "surface_distances",
    "hausdorff",
    "hd95_learn2reg",
    "score_labels",
    "jacobian_determinant",
    "crop_border",
    "sdlogj_learn2reg",
    "jacobian_stats",
    "field_error_mm",
    "aggregate",
    "groups_for",
    "evaluate_pair",
]

DEFAULT_GROUPS: dict[str, tuple[int, ...]] = {"all13": BTCV_IDS, "large4": LARGE_ORGANS}
"""The label groups every report averages over: the 13 BTCV organs and the paper's 4 large organs
(spleen, kidneys, liver; :data:`slicreg.labels.LARGE_ORGANS`)."""

LEARN2REG_CROP = 2
"""Voxels cropped at every border before the Jacobian statistics (Learn2Reg)."""


# ---------------------------------------------------------------------------------------------- helpers
def _np(x: Any) -> np.ndarray:
    """numpy view of an array or a (CPU copy of a) torch tensor."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_array(x: Any, name: str) -> np.ndarray:
    arr = _np(x)
    if arr.ndim != 3:
        raise InputError(f"{name}: expected a 3-D label map (X, Y, Z), got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise InputError(f"{name}: expected an integer label map, got dtype {arr.dtype}")
    return arr


def _mask_array(x: Any, name: str) -> np.ndarray:
    arr = _np(x)
    if arr.ndim != 3:
        raise InputError(f"{name}: expected a 3-D mask (X, Y, Z), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _disp_array(x: Any, name: str) -> np.ndarray:
    arr = _np(x)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise InputError(f"{name}: expected a displacement field (3, X, Y, Z) in voxels, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return arr


def _same_shape(arrays: Mapping[str, np.ndarray]) -> None:
    shapes = {name: tuple(a.shape[-3:]) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise InputError(f"grids do not match: {desc} (expected the same spatial shape)")


def _label_list(labels: Iterable[int] | None) -> list[int]:
    out = [int(v) for v in (BTCV_IDS if labels is None else labels)]
    if not out:
        raise InputError("labels: expected at least one label id, got none")
    return out


def _spacing(spacing: Sequence[float] | None) -> np.ndarray:
    s = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"spacing: expected 3 positive voxel sizes, got {spacing!r}")
    return s


# ---------------------------------------------------------------------------------------------- warping
def warp_labels_learn2reg(moving: Any, disp_vox: Any) -> np.ndarray:
    """Warp a label map exactly as Learn2Reg does: ``map_coordinates(moving, identity + disp, order=0)``.

    Nearest neighbour, rounding half up, computed in float64 (Learn2Reg's ``get_fdata()``); a position outside
    ``[0, n - 1]`` on any axis is background (``mode="constant"``): :func:`slicreg.fields.warp_labels` with the
    one sampler's ``"scipy"`` backend. The default gather backend gives the same labels except where a float32
    position rounds across a half-voxel boundary (checked in the tests); ``map_coordinates`` is also several
    times faster on a CPU.

    Args:
        moving: integer label map ``(X', Y', Z')``.
        disp_vox: field ``(3, X, Y, Z)`` in voxels, fixed -> moving.

    Returns:
        The warped label map ``(X, Y, Z)`` with the dtype of ``moving``.
    """
    from slicreg.fields import warp_labels

    mov = _labels_array(moving, "moving")
    disp = _disp_array(disp_vox, "disp_vox")
    return warp_labels(mov, disp, padding="zeros", backend="scipy")


# ------------------------------------------------------------------------------------------------- Dice
def overlap_counts(fixed: Any, warped: Any, *, labels: Iterable[int] | None = None) -> np.ndarray:
    """Voxel counts per label: array ``(L, 3)`` with columns ``|F|``, ``|W|``, ``|F & W|`` (int64).

    Args:
        fixed, warped: integer label maps ``(X, Y, Z)`` on the same grid.
        labels: label ids (default the 13 BTCV ids 1..13).
    """
    f = _labels_array(fixed, "fixed")
    w = _labels_array(warped, "warped")
    _same_shape({"fixed": f, "warped": w})
    out = np.zeros((len(_label_list(labels)), 3), dtype=np.int64)
    for n, lab in enumerate(_label_list(labels)):
        fm = f == lab
        wm = w == lab
        out[n] = (np.count_nonzero(fm), np.count_nonzero(wm), np.count_nonzero(fm & wm))
    return out


def _dice_from_counts(counts: np.ndarray) -> np.ndarray:
    total = counts[:, 0] + counts[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * counts[:, 2] / np.maximum(total, 1), np.nan)


ABSENT_RULES: tuple[str, ...] = ("learn2reg", "zero", "nan")
"""The rules :func:`dice` knows for a label absent from a segmentation (see the module docstring)."""


def _dice_rule(counts: np.ndarray, absent: str, present_moving: np.ndarray | None) -> np.ndarray:
    """Dice from :func:`overlap_counts` with the absent-label rule applied (``present_moving`` for Learn2Reg)."""
    d = _dice_from_counts(counts)
    if absent == "zero":
        return np.nan_to_num(d, nan=0.0)
    if absent == "learn2reg":
        return np.where((counts[:, 0] > 0) & present_moving, d, np.nan)
    return d


def dice(
    fixed: Any,
    warped: Any,
    labels: Iterable[int] | None = None,
    *,
    absent: Literal["learn2reg", "zero", "nan"],
    moving: Any = None,
    mask: Any = None,
) -> np.ndarray:
    """Dice ``2 |F & W| / (|F| + |W|)`` per label, with the rule for absent labels chosen by ``absent``.

    Args:
        fixed: fixed label map ``(X, Y, Z)``.
        warped: the moving label map warped onto the fixed grid ``(X, Y, Z)``.
        labels: label ids (default the 13 BTCV ids 1..13).
        absent: ``"learn2reg"`` (NaN where the label is absent from ``fixed`` or from the unwarped ``moving``;
            average with :func:`mean_learn2reg`), ``"zero"`` (the SLIC-Reg reference: an absent label scores 0,
            never NaN; average with :func:`mean_reference`) or ``"nan"`` (NaN only where absent from both
            ``fixed`` and ``warped``). Keyword-only and required: every score says which rule it follows.
        moving: the *unwarped* moving label map (any shape); required for ``"learn2reg"``, which uses it only to
            decide which labels are absent.
        mask: optional boolean ``(X, Y, Z)`` region to count in (e.g. where the moving scan has data); voxels
            outside it count as background in ``fixed`` and ``warped`` (``moving`` is not masked).

    Returns:
        ``(L,)`` float64 in [0, 1] or NaN, in the order of ``labels``.
    """
    if absent not in ABSENT_RULES:
        raise InputError(f"dice: absent must be one of {', '.join(map(repr, ABSENT_RULES))}, got {absent!r}")
    labs = _label_list(labels)
    f = _labels_array(fixed, "fixed")
    w = _labels_array(warped, "warped")
    _same_shape({"fixed": f, "warped": w})
    if mask is not None:
        m = _mask_array(mask, "mask")
        if m.shape != f.shape:
            raise InputError(f"mask: shape {m.shape} does not match the label maps {f.shape}")
        f, w = np.where(m, f, 0), np.where(m, w, 0)
    present_moving = None
    if absent == "learn2reg":
        if moving is None:
            raise InputError('dice: absent="learn2reg" needs the unwarped moving label map (moving=...)')
        mov = _labels_array(moving, "moving")
        present_moving = np.array([np.any(mov == lab) for lab in labs], dtype=bool)
    return _dice_rule(overlap_counts(f, w, labels=labs), absent, present_moving)


def mean_learn2reg(values: Any) -> float:
    """NaN-mean (Learn2Reg's ``np.nanmean``); NaN when every value is NaN (without numpy's warning)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(v)
    return float(np.mean(v[keep])) if keep.any() else math.nan


def mean_reference(values: Any) -> float:
    """Plain mean over all labels (the SLIC-Reg reference average; absent labels enter as 0)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return float(np.mean(v)) if v.size else math.nan


def group_means(
    per_label: Mapping[int, float],
    groups: Mapping[str, Sequence[int]],
    *,
    nan_mean: bool,
) -> dict[str, float]:
    """Averages of per-label values over label groups (e.g. ``{"all13": 1..13, "large4": (1, 2, 3, 6)}``).

    Args:
        per_label: label id -> value.
        groups: group name -> label ids; every id must be in ``per_label``.
        nan_mean: True for Learn2Reg values (NaN-mean), False for the reference Dice (plain mean).
    """
    out = {}
    for name, ids in groups.items():
        missing = [i for i in ids if int(i) not in per_label]
        if missing:
            raise InputError(f"group {name!r}: labels {missing} were not scored (scored: {sorted(per_label)})")
        vals = [per_label[int(i)] for i in ids]
        out[name] = mean_learn2reg(vals) if nan_mean else mean_reference(vals)
    return out


# ------------------------------------------------------------------------------------------------- HD95
def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


# the 8 voxels of a 2x2x2 cell, (di, dj, dk) -> bit of the cell code
_CELL_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    (di, dj, dk) for di in (0, 1) for dj in (0, 1) for dk in (0, 1)
)


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Marching-cubes surface area (in units of ``spacing`` squared) inside a 2x2x2 cell, for each of the 256
    cell codes (bit ``n`` = voxel ``_CELL_OFFSETS[n]`` inside). Codes 0 and 255 have no surface (area 0)."""
    from skimage.measure import marching_cubes, mesh_surface_area

    table = np.zeros(256, dtype=np.float64)
    for code in range(1, 255):
        cell = np.zeros((2, 2, 2), dtype=np.float32)
        for bit, offset in enumerate(_CELL_OFFSETS):
            cell[offset] = (code >> bit) & 1
        if bin(code).count("1") > 4:  # triangulate the minority side, as the surface-distance table does
            cell = 1.0 - cell
        verts, faces, _, _ = marching_cubes(cell, 0.5, method="lorensen")
        # vertices are exact edge midpoints on the unit grid; scale in float64 for exact areas
        table[code] = mesh_surface_area(verts.astype(np.float64) * np.asarray(spacing), faces)
    return table


def _cell_codes(mask: np.ndarray) -> np.ndarray:
    """Cell code of every corner of a mask padded by one voxel of background on every side.

    For a padded mask of shape ``(n0, n1, n2)`` the corner grid has shape ``(n0 - 1, n1 - 1, n2 - 1)``;
    corner ``c`` is the centre of the cell of voxels ``c .. c + 1`` on each axis."""
    shape = tuple(s - 1 for s in mask.shape)
    codes = np.zeros(shape, dtype=np.uint8)
    for bit, (di, dj, dk) in enumerate(_CELL_OFFSETS):
        codes |= mask[di:di + shape[0], dj:dj + shape[1], dk:dk + shape[2]].astype(np.uint8) << bit
    return codes


class SurfaceDistances(NamedTuple):
    """Directed surface distances of two masks, each sorted ascending, with the surfel areas of its points.

    ``distances_ab[n]`` is the distance of surface point ``n`` of mask a to the surface of mask b and
    ``areas_a[n]`` its surfel area; likewise for b -> a. Units: those of the spacing (mm, or voxels)."""

    distances_ab: np.ndarray
    areas_a: np.ndarray
    distances_ba: np.ndarray
    areas_b: np.ndarray


def surface_distances(mask_a: Any, mask_b: Any, *, spacing: Sequence[float] | None = None) -> SurfaceDistances:
    """Directed surface distances between two masks (corner-grid surfaces with surfel areas, module docstring).

    Args:
        mask_a, mask_b: boolean masks ``(X, Y, Z)`` on the same grid.
        spacing: voxel size along axes 0, 1, 2 (mm); default 1 (distances in voxels).

    Returns:
        :class:`SurfaceDistances` (float64 arrays). A mask without surface has empty arrays; when the *other*
        mask is empty, the distances are ``inf``.
    """
    from scipy.ndimage import distance_transform_edt

    a = _mask_array(mask_a, "mask_a")
    b = _mask_array(mask_b, "mask_b")
    _same_shape({"mask_a": a, "mask_b": b})
    step = _spacing(spacing)
    box = _bounding_box(a | b)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    # crop to the union's bounding box (every surface point lies inside it, so distances are unchanged)
    code_a = _cell_codes(np.pad(a[box], 1))
    code_b = _cell_codes(np.pad(b[box], 1))
    surf_a = (code_a != 0) & (code_a != 255)
    surf_b = (code_b != 0) & (code_b != 255)
    table = _surfel_area_table(tuple(float(v) for v in step))

    def directed(src: np.ndarray, codes: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        areas = table[codes[src]]
        if not dst.any():
            return np.full(areas.size, np.inf), areas
        dist = distance_transform_edt(~dst, sampling=step)[src].astype(np.float64)
        order = np.argsort(dist, kind="stable")
        return dist[order], areas[order]

    d_ab, area_a = directed(surf_a, code_a, surf_b)
    d_ba, area_b = directed(surf_b, code_b, surf_a)
    return SurfaceDistances(d_ab, area_a, d_ba, area_b)


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    """Smallest distance whose surface points (distances sorted ascending) carry >= ``percentile`` % of the area."""
    if distances.size == 0:
        return math.nan
    cumulative = np.cumsum(areas) / np.sum(areas)
    idx = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(distances[min(idx, distances.size - 1)])


def hausdorff(
    mask_a: Any, mask_b: Any, *, spacing: Sequence[float] | None = None, percentile: float = 95.0
) -> float:
    """Symmetric robust Hausdorff distance (HD95 by default) between two masks, Learn2Reg's definition.

    The larger of the two directed area-weighted ``percentile``-th surface distances (module docstring);
    ``percentile=100`` is the classical Hausdorff distance between the corner-grid surfaces.

    Args:
        mask_a, mask_b: boolean masks ``(X, Y, Z)`` on the same grid.
        spacing: voxel size (mm) along axes 0, 1, 2; default 1 = voxel units (Learn2Reg's HD95).
        percentile: in (0, 100].

    Returns:
        The distance in the units of ``spacing``; ``inf`` if exactly one mask is empty, NaN if both are.
    """
    if not 0 < float(percentile) <= 100:
        raise InputError(f"percentile: expected a value in (0, 100], got {percentile}")
    sd = surface_distances(mask_a, mask_b, spacing=spacing)
    if sd.distances_ab.size == 0 and sd.distances_ba.size == 0:
        return math.nan
    if sd.distances_ab.size == 0 or sd.distances_ba.size == 0:  # one mask empty
        return math.inf
    return max(_directed_percentile(sd.distances_ab, sd.areas_a, percentile),
               _directed_percentile(sd.distances_ba, sd.areas_b, percentile))


def hd95_learn2reg(
    fixed: Any,
    moving: Any,
    warped: Any,
    *,
    labels: Iterable[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """HD95 per label, Learn2Reg rule: NaN where the label is absent from ``fixed`` or ``moving``.

    A label present in both but lost by the warp gives ``inf`` (as in Learn2Reg).

    Args:
        fixed, warped: label maps ``(X, Y, Z)`` on the fixed grid; ``moving`` the unwarped moving map.
        labels: label ids (default 1..13).
        spacing: voxel size in mm for millimetres; default 1 = voxels (what Learn2Reg reports).

    Returns:
        ``(L,)`` float64.
    """
    labs = _label_list(labels)
    f = _labels_array(fixed, "fixed")
    m = _labels_array(moving, "moving")
    w = _labels_array(warped, "warped")
    _same_shape({"fixed": f, "warped": w})
    out = np.full(len(labs), np.nan)
    for n, lab in enumerate(labs):
        fm = f == lab
        if fm.any() and np.any(m == lab):
            out[n] = hausdorff(fm, w == lab, spacing=spacing)
    return out


def score_labels(
    fixed: Any,
    moving: Any,
    warped: Any,
    *,
    labels: Iterable[int] | None = None,
    spacing_mm: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[str, np.ndarray]:
    """All per-label scores of one registered pair, each an array ``(L,)`` in the order of ``labels``.

    Args:
        fixed: fixed label map ``(X, Y, Z)``.
        moving: unwarped moving label map (decides Learn2Reg's absent labels).
        warped: moving labels warped onto the fixed grid (for the unregistered pair: ``moving`` itself).
        labels: label ids (default the 13 BTCV ids).
        spacing_mm: voxel size of the fixed grid in mm (for ``hd95_mm`` and the volumes); default 1 mm.
        hd95: False skips the surface distances (then ``hd95_vox``/``hd95_mm`` are NaN).

    Returns:
        ``{"label", "dice_learn2reg", "dice_reference", "hd95_vox", "hd95_mm", "present_fixed",
        "present_moving", "present_warped", "volume_fixed_ml", "volume_warped_ml"}``.
    """
    labs = _label_list(labels)
    f = _labels_array(fixed, "fixed")
    m = _labels_array(moving, "moving")
    w = _labels_array(warped, "warped")
    _same_shape({"fixed": f, "warped": w})
    step = _spacing(spacing_mm)
    counts = overlap_counts(f, w, labels=labs)
    present_moving = np.array([np.any(m == lab) for lab in labs], dtype=bool)
    present_fixed = counts[:, 0] > 0
    valid = present_fixed & present_moving
    hd_vox = np.full(len(labs), np.nan)
    hd_mm = np.full(len(labs), np.nan)
    if hd95:
        isotropic = bool(np.allclose(step, step[0], rtol=1e-6, atol=0))
        for n, lab in enumerate(labs):
            if not valid[n]:
                continue
            fm, wm = f == lab, w == lab
            hd_vox[n] = hausdorff(fm, wm)
            hd_mm[n] = hd_vox[n] * step[0] if isotropic else hausdorff(fm, wm, spacing=step)
    ml = float(np.prod(step)) / 1000.0
    return {
        "label": np.asarray(labs, dtype=np.int64),
        "dice_learn2reg": _dice_rule(counts, "learn2reg", present_moving),
        "dice_reference": _dice_rule(counts, "zero", None),
        "hd95_vox": hd_vox,
        "hd95_mm": hd_mm,
        "present_fixed": present_fixed,
        "present_moving": present_moving,
        "present_warped": counts[:, 1] > 0,
        "volume_fixed_ml": counts[:, 0] * ml,
        "volume_warped_ml": counts[:, 1] * ml,
    }


# --------------------------------------------------------------------------------------------- Jacobian
def crop_border(volume: Any, width: int = LEARN2REG_CROP) -> np.ndarray:
    """``volume[..., w:-w, w:-w, w:-w]`` (the last three axes); ``width=0`` returns it unchanged."""
    v = _np(volume)
    if width == 0:
        return v
    if min(v.shape[-3:]) <= 2 * width:
        raise InputError(f"crop_border: grid {v.shape[-3:]} is too small to crop {width} voxels at each border")
    return v[..., width:-width, width:-width, width:-width]


def sdlogj_learn2reg(det: Any, *, mask: Any = None) -> float:
    """Learn2Reg's SDlogJ of an already cropped determinant: ``std(log(clip(det + 3, 1e-9, 1e9)))``.

    Args:
        det: Jacobian determinant (cropped as wanted, see :func:`jacobian_stats`).
        mask: optional boolean mask of the same shape (Learn2Reg's masked evaluation).
    """
    d = _np(det).astype(np.float64, copy=False)
    if mask is not None:
        d = d[_np(mask).astype(bool)]
    if d.size == 0:
        return math.nan
    return float(np.std(np.log(np.clip(d + 3.0, 1e-9, 1e9))))


def jacobian_stats(disp_vox: Any, *, mask: Any = None, crop: int = LEARN2REG_CROP) -> dict[str, float]:
    """Jacobian statistics of a field over its interior (``crop`` voxels removed at every border).

    Args:
        disp_vox: field ``(3, X, Y, Z)`` in voxels, fixed -> moving.
        mask: optional boolean mask ``(X, Y, Z)`` (full grid; cropped here like the field).
        crop: border width removed before the statistics (default 2, Learn2Reg's).

    Returns:
        ``sdlogj_learn2reg`` (Learn2Reg's figure), ``std_log_det`` (std of ``log det`` over ``det > 0``),
        ``folding_percent`` (% of voxels with ``det <= 0``), ``det_min``, ``det_mean``, ``det_max``,
        ``n_voxels`` (voxels counted). NaN values (and ``n_voxels = 0``) for an empty mask.
    """
    det = crop_border(jacobian_determinant(_disp_array(disp_vox, "disp_vox")), crop)
    if mask is not None:
        m = _mask_array(mask, "mask")
        if m.shape != tuple(_np(disp_vox).shape[1:]):
            raise InputError(f"mask: shape {m.shape} does not match the field grid {tuple(_np(disp_vox).shape[1:])}")
        det = det[crop_border(m, crop)]
    det = det.reshape(-1)
    if det.size == 0:
        return {k: math.nan for k in ("sdlogj_learn2reg", "std_log_det", "folding_percent", "det_min",
                                       "det_mean", "det_max")} | {"n_voxels": 0}
    positive = det[det > 0]
    return {
        "sdlogj_learn2reg": sdlogj_learn2reg(det),
        "std_log_det": float(np.std(np.log(positive))) if positive.size else math.nan,
        "folding_percent": 100.0 * float(np.count_nonzero(det <= 0)) / det.size,
        "det_min": float(det.min()),
        "det_mean": float(det.mean()),
        "det_max": float(det.max()),
        "n_voxels": int(det.size),
    }


# ------------------------------------------------------------------------------------------ field error
def field_error_mm(
    disp_vox: Any, true_disp_vox: Any, *, affine: Any = None, spacing: Sequence[float] | None = None,
    mask: Any = None,
) -> dict[str, float]:
    """Error of a field against the true one, in mm: ``|A (u - u_true)|`` per voxel, summarised.

    Args:
        disp_vox: estimated field ``(3, X, Y, Z)`` in voxels, fixed -> moving.
        true_disp_vox: ground-truth field, same shape and convention.
        affine: ``(4, 4)`` voxel -> mm affine of the fixed grid (its linear part converts voxels to mm,
            directions included); or give ``spacing`` (mm per voxel along axes 0, 1, 2). Default: 1 mm voxels.
        mask: optional boolean mask ``(X, Y, Z)`` (e.g. the body); default every voxel.

    Returns:
        ``mean_mm``, ``median_mm``, ``p95_mm`` (linear percentile), ``max_mm``, ``n_voxels``; NaN values and
        ``n_voxels = 0`` for an empty mask.
    """
    u = _disp_array(disp_vox, "disp_vox")
    t = _disp_array(true_disp_vox, "true_disp_vox")
    if u.shape != t.shape:
        raise InputError(f"true_disp_vox: shape {t.shape} does not match the field {u.shape}")
    if affine is not None and spacing is not None:
        raise InputError("field_error_mm: give affine or spacing, not both")
    if affine is not None:
        lin = np.asarray(affine, dtype=np.float64)
        if lin.shape != (4, 4):
            raise InputError(f"affine: expected a 4x4 matrix, got shape {lin.shape}")
        lin = lin[:3, :3]
    else:
        lin = np.diag(_spacing(spacing))
    diff = u.astype(np.float64) - t.astype(np.float64)
    err = np.sqrt(np.sum(np.einsum("ab,b...->a...", lin, diff) ** 2, axis=0))
    if mask is not None:
        m = _mask_array(mask, "mask")
        if m.shape != err.shape:
            raise InputError(f"mask: shape {m.shape} does not match the field grid {err.shape}")
        err = err[m]
    err = err.reshape(-1)
    if err.size == 0:
        return {"mean_mm": math.nan, "median_mm": math.nan, "p95_mm": math.nan, "max_mm": math.nan, "n_voxels": 0}
    return {
        "mean_mm": float(err.mean()),
        "median_mm": float(np.median(err)),
        "p95_mm": float(np.percentile(err, 95)),
        "max_mm": float(err.max()),
        "n_voxels": int(err.size),
    }


# ------------------------------------------------------------------------------------------ aggregation
def aggregate(values: Any) -> dict[str, float]:
    """Learn2Reg's aggregate over pairs: ``mean``, ``std`` (ddof 0), ``p30`` (30th percentile, linear).

    NaN values (a score undefined for a pair) are left out; ``n`` counts the values used and ``n_nan`` those
    left out. ``inf`` values (e.g. HD95 of a lost label) are kept, so they show in the mean as in Learn2Reg.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = v[~np.isnan(v)]
    if keep.size == 0:
        return {"mean": math.nan, "std": math.nan, "p30": math.nan, "n": 0, "n_nan": int(v.size)}
    with np.errstate(invalid="ignore"):
        std = float(np.std(keep)) if np.all(np.isfinite(keep)) else math.nan
        p30 = float(np.quantile(keep, 0.3))
    return {"mean": float(np.mean(keep)), "std": std, "p30": p30, "n": int(keep.size),
            "n_nan": int(v.size - keep.size)}


# ------------------------------------------------------------------------------------------ one pair
def groups_for(labels: Iterable[int]) -> dict[str, tuple[int, ...]]:
    """The label groups to average over for the scored ``labels``.

    :data:`DEFAULT_GROUPS` entries (``all13``, ``large4``) whose labels were all scored, plus ``selected``
    (every scored label) when the labels are not exactly the 13 BTCV organs."""
    labs = tuple(_label_list(labels))
    groups = {name: ids for name, ids in DEFAULT_GROUPS.items() if set(ids) <= set(labs)}
    if set(labs) != set(BTCV_IDS):
        groups["selected"] = labs
    return groups


def evaluate_pair(
    fixed: Any,
    moving: Any,
    warped: Any,
    *,
    disp_vox: Any = None,
    labels: Iterable[int] | None = None,
    affine: Any = None,
    true_disp_vox: Any = None,
    error_mask: Any = None,
    hd95: bool = True,
    fov_mask: Any = None,
) -> dict[str, Any]:
    """Every score of one pair in one JSON-ready dict (floats; NaN where undefined).

    Args:
        fixed: fixed label map ``(X, Y, Z)``.
        moving: unwarped moving label map.
        warped: moving labels on the fixed grid (:func:`warp_labels_learn2reg`; ``moving`` for the initial pair).
        disp_vox: the field ``(3, X, Y, Z)`` that made ``warped`` (voxels, fixed -> moving); ``None`` for the
            unregistered pair (no Jacobian; a zero field for the field error).
        labels: label ids (default the 13 BTCV organs).
        affine: ``(4, 4)`` voxel -> mm affine of the fixed grid (spacing for HD95 in mm, volumes, field error);
            default 1 mm voxels.
        true_disp_vox: ground-truth field for the field error (optional).
        error_mask: mask ``(X, Y, Z)`` for the field error (e.g. the body); default every voxel.
        hd95: False skips the surface distances.
        fov_mask: optional bool ``(X, Y, Z)``: the fixed scan's field of view (e.g. its crop record's,
            :func:`slicreg.geometry.load_fov_mask`). Dice and HD95 are then computed inside it: outside, the fixed
            scan has no data, so its labels are unknown rather than background, and the warped labels there are
            not counted (the fixed and warped labels are cleared outside). Which labels are absent is still
            decided on the whole maps. The Jacobian and the field error do not use it.

    Returns:
        ``{"labels": [...], "groups": {name: [...]}, "per_label": {"<id>": {metric: value}},
        "summary": {metric: {group: value}}, "jacobian": {...} | None, "field_error": {...} | None}``;
        ``summary`` uses the Learn2Reg NaN-mean for ``dice_learn2reg``, ``hd95_vox``, ``hd95_mm`` and the plain
        mean for ``dice_reference``.
    """
    from slicreg.conventions import spacing_from_affine

    labs = _label_list(labels)
    spacing = None if affine is None else spacing_from_affine(np.asarray(affine, dtype=np.float64))
    if fov_mask is not None:
        fov = _mask_array(fov_mask, "fov_mask")
        if fov.shape != _np(fixed).shape:
            raise InputError(f"fov_mask: shape {fov.shape} does not match the fixed labels {_np(fixed).shape}")
        fixed = np.where(fov, _np(fixed), 0).astype(_np(fixed).dtype, copy=False)
        warped = np.where(fov, _np(warped), 0).astype(_np(warped).dtype, copy=False)
    scores = score_labels(fixed, moving, warped, labels=labs, spacing_mm=spacing, hd95=hd95)
    groups = groups_for(labs)
    per_label: dict[str, dict[str, Any]] = {}
    for n, lab in enumerate(labs):
        per_label[str(lab)] = {
            key: (bool(val[n]) if val.dtype == bool else float(val[n]))
            for key, val in scores.items() if key != "label"
        }
    summary: dict[str, dict[str, float]] = {}
    for key in ("dice_learn2reg", "dice_reference", "hd95_vox", "hd95_mm"):
        values = {lab: float(v) for lab, v in zip(labs, scores[key])}
        summary[key] = group_means(values, groups, nan_mean=key != "dice_reference")
    jac = None
    if disp_vox is not None:
        disp = _disp_array(disp_vox, "disp_vox")
        if disp.shape[1:] != _np(fixed).shape:
            raise InputError(f"disp_vox: field grid {disp.shape[1:]} does not match the fixed grid {_np(fixed).shape}")
        jac = jacobian_stats(disp)
    err = None
    if true_disp_vox is not None:
        truth = _disp_array(true_disp_vox, "true_disp_vox")
        est = np.zeros_like(truth) if disp_vox is None else _disp_array(disp_vox, "disp_vox")
        err = field_error_mm(est, truth, affine=affine, mask=error_mask)
    return {"labels": labs, "groups": {k: list(v) for k, v in groups.items()}, "per_label": per_label,
            "summary": summary, "jacobian": jac, "field_error": err}
