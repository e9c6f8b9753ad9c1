"""Voxel grids and every map between them, written once.

A :class:`Grid` is a spatial shape ``(X, Y, Z)`` and the 4x4 voxel -> world (mm) affine of that shape, axis
order ``(i, j, k)`` as in NIfTI (see :mod:`slicreg.conventions`): voxel ``p`` sits at world ``affine @ [p, 1]``.
Everything else is derived from those two: the spacing (column norms), the direction cosines, the orientation
codes, and the *voxel maps* -- 4x4 matrices that take voxel indices of one grid to voxel indices of another.

Grid-to-grid rules (all voxel-centre positions, ``align_corners=False`` semantics for grids that cover the same
field of view):

- **downsampling by an integer factor f** (pooling f-cubed blocks from voxel 0; :meth:`Grid.downsample`,
  :func:`downsample_index_map`): coarse voxel ``q`` is fine voxel ``f q + (f - 1) / 2``, the centre of its
  block -- for f = 2 the network's 4 mm voxel ``q`` is the 2 mm voxel ``2 q + 0.5``; the coarse shape is
  ``floor(n / f)``;
- **the same field of view on another shape** (:meth:`Grid.resize`, :func:`fov_index_map`): voxel ``q`` of a
  grid of ``n`` voxels is voxel ``r q + (r - 1) / 2`` of a grid of ``N`` voxels, ``r = N / n`` (as
  ``torch.nn.functional.interpolate(..., align_corners=False)`` and pyramid levels);
- **another spacing over the same field of view** (:meth:`Grid.with_spacing`, :func:`spacing_index_map`):
  ``m = max(1, round(n d / s))`` voxels of size ``s`` centred on the same midpoint, new voxel ``x`` at old
  voxel ``(s / d) (x + 0.5 - m / 2) + n / 2 - 0.5``;
- **cropping or padding** (:meth:`Grid.crop`): new voxel ``p`` is old voxel ``p + start`` (``start`` may be
  negative: padding);
- **any two grids** (:meth:`Grid.vox_map`): ``inv(to.affine) @ self.affine``.

``grid_sample``'s normalised coordinates (``[-1, 1]``, components in *reversed* order, the last one indexing the
first array axis) exist for one grid and one ``align_corners`` setting:

- ``align_corners=True``:  voxel ``p`` <-> ``2 p / (S - 1) - 1``  (centres of the first and last voxel at -1, 1);
- ``align_corners=False``: voxel ``p`` <-> ``(2 p + 1) / S - 1``  (outer faces of the first and last voxel at -1, 1).

:func:`vox_to_normalised` / :func:`normalised_to_vox` (and :meth:`Grid.normalised_matrix` as a 4x4 matrix) are
the only place these formulas are written; normalised coordinates exist only inside the function that calls
``grid_sample``. This module knows nothing of images, fields or algorithms; :mod:`slicreg.conventions`
re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slicreg.errors import InputError

__all__ = [
    "Grid",
    "spacing_from_affine",
    "identity_grid_vox",
    "downsample_index_map",
    "downsample_affine",
    "fov_index_map",
    "spacing_index_map",
    "translation_index_map",
    "map_points",
    "map_vectors",
    "normalised_scale_offset",
    "vox_to_normalised",
    "normalised_to_vox",
    "disp_vox_to_normalised",
    "disp_normalised_to_vox",
]


# ------------------------------------------------------------------------------------------ the voxel maps
def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm along array axes 0, 1, 2: the column norms of ``affine[:3, :3]``."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def identity_grid_vox(shape: Sequence[int], *, dtype: Any = np.float32) -> np.ndarray:
    """Voxel coordinates of every voxel: array ``(3, X, Y, Z)`` with ``grid[a, i, j, k] = (i, j, k)[a]``."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=dtype) for s in shape], indexing="ij"))


def displaced_positions(disp_vox: Any) -> Any:
    """``identity_grid_vox + disp_vox``: the voxel position every voxel of a field ``(3, X, Y, Z)`` points to.

    A numpy array or torch tensor in, the same type, dtype and device out (a new array; ``disp_vox`` is not changed):
    a copy of the field with each axis' voxel index added in place along that axis -- the same numbers as adding the
    identity grid, without making it (one copy and three in-place passes instead of building ``(3, X, Y, Z)`` indices
    and adding them)."""
    if _is_tensor(disp_vox):
        import torch

        pos = disp_vox.clone()
        index = lambda n: torch.arange(n, dtype=pos.dtype, device=pos.device)  # noqa: E731
    else:
        pos = np.array(disp_vox, copy=True)
        index = lambda n: np.arange(n, dtype=pos.dtype)  # noqa: E731
    if pos.ndim < 2 or pos.shape[0] != pos.ndim - 1:
        raise InputError(f"disp_vox: expected a field (D, *S) with D spatial axes, got shape {tuple(pos.shape)}")
    for a, n in enumerate(pos.shape[1:]):
        pos[a] += index(n).reshape([n if b == a else 1 for b in range(pos.ndim - 1)])
    return pos


def _diagonal_map(scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = np.diag([*np.asarray(scale, dtype=np.float64), 1.0])
    out[:3, 3] = offset
    return out


def _factor(factor: Any) -> int:
    if isinstance(factor, bool) or int(factor) != factor or int(factor) < 1:
        raise InputError(f"factor: expected an integer >= 1, got {factor!r}")
    return int(factor)


def downsample_index_map(factor: int) -> np.ndarray:
    """4x4 map from the voxels of the grid made by pooling ``factor``-cubed blocks to the fine voxels.

    Coarse voxel ``q`` sits at the centre of its block, fine voxel ``factor * q + (factor - 1) / 2``
    (``align_corners=False`` semantics): the network's 4 mm voxel ``q`` is the 2 mm voxel ``2 q + 0.5``."""
    f = float(_factor(factor))
    return _diagonal_map(np.full(3, f), np.full(3, (f - 1) / 2.0))


def downsample_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid made by pooling ``factor``-cubed blocks of voxels: ``affine @ downsample_index_map``.

    The network's 4 mm input (96 x 80 x 128) relates to the 2 mm scan (192 x 160 x 256) this way with
    ``factor=2``, and its stride-2 output to the 4 mm grid the same way (:meth:`Grid.downsample`)."""
    return np.asarray(affine, dtype=np.float64) @ downsample_index_map(factor)


def fov_index_map(from_shape: Sequence[int], to_shape: Sequence[int]) -> np.ndarray:
    """4x4 map from the voxels of a grid of ``from_shape`` to those of a grid of ``to_shape`` covering the same
    field of view: ``x = r q + (r - 1) / 2`` per axis with ``r = N / n`` (``align_corners=False`` semantics; the
    map of :func:`downsample_index_map` when ``factor`` divides the shape)."""
    n = np.asarray(_shape3(from_shape, "from_shape"), dtype=np.float64)
    r = np.asarray(_shape3(to_shape, "to_shape"), dtype=np.float64) / n
    return _diagonal_map(r, (r - 1) / 2)


def spacing_index_map(shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]
                      ) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of spacing ``target_mm`` that covers the same field of view as ``shape`` voxels of ``spacing_mm``.

    The field of view of an axis is ``n * d`` mm (voxel faces); the new grid has ``m = max(1, round(n d / s))``
    voxels centred on the same midpoint, so new voxel ``x`` sits at old voxel ``(s / d) (x + 0.5 - m / 2) + n / 2
    - 0.5`` (``align_corners=False`` semantics).

    Returns:
        ``(new_shape, index_map)``: ``index_map`` (4x4) takes new voxel indices to old ones, so the new affine is
        ``old_affine @ index_map``.
    """
    n = np.asarray(_shape3(shape, "shape"), dtype=np.float64)
    d = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    s = np.asarray(target_mm, dtype=np.float64).reshape(-1)
    if d.shape != (3,) or np.any(d <= 0) or np.any(~np.isfinite(d)):
        raise InputError(f"spacing_mm: expected three positive voxel sizes, got {d.tolist()}")
    if s.shape != (3,) or np.any(s <= 0) or np.any(~np.isfinite(s)):
        raise InputError(f"spacing_mm: expected positive voxel sizes, got {s.tolist()}")
    m = np.maximum(1, np.round(n * d / s)).astype(int)
    scale = s / d
    return tuple(int(v) for v in m), _diagonal_map(scale, scale * (0.5 - m / 2.0) + n / 2.0 - 0.5)  # type: ignore


def translation_index_map(start: Sequence[float]) -> np.ndarray:
    """4x4 map ``p -> p + start`` (a window starting at voxel ``start`` of the old grid; negative = padding)."""
    start = np.asarray(start, dtype=np.float64).reshape(-1)
    if start.shape != (3,) or not np.all(np.isfinite(start)):
        raise InputError(f"start: expected three finite voxel offsets, got {start.tolist()}")
    return _diagonal_map(np.ones(3), start)


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach")


def map_points(matrix: Any, points: Any) -> Any:
    """Apply a 4x4 voxel (or world) map to points ``(3, *S)``: ``matrix[:3, :3] @ p + matrix[:3, 3]``.

    numpy in -> float64 numpy; a torch tensor stays a tensor on its device and in its dtype (the matrix is cast
    to it)."""
    if _is_tensor(points):
        import torch

        m = torch.tensor(np.asarray(matrix, dtype=np.float64), dtype=points.dtype, device=points.device)
        flat = points.reshape(3, -1)
        return (m[:3, :3] @ flat + m[:3, 3:4]).reshape(points.shape)
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"matrix: expected a 4x4 matrix, got {m.shape}")
    pts = np.asarray(points)
    if pts.shape[0] != 3:
        raise InputError(f"points: expected 3 components first, got shape {pts.shape}")
    return (m[:3, :3] @ pts.reshape(3, -1) + m[:3, 3:4]).reshape(pts.shape)


def map_vectors(matrix: Any, vectors: Any) -> Any:
    """Apply the linear part of a 4x4 map to displacement vectors ``(3, *S)`` (a difference of two points moves
    without the translation): voxel displacements of one grid -> those of another, or -> world mm."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((4, 4), (3, 3)):
        raise InputError(f"matrix: expected a 4x4 (or 3x3) matrix, got {m.shape}")
    if _is_tensor(vectors):
        import torch

        lin = torch.as_tensor(m[:3, :3], dtype=vectors.dtype, device=vectors.device)
        return (lin @ vectors.reshape(3, -1)).reshape(vectors.shape)
    return np.einsum("ab,b...->a...", m[:3, :3], np.asarray(vectors))


def _shape3(shape: Any, name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected three positive integers, got {shape!r}") from None
    if len(out) != 3 or min(out) < 1 or any(int(s) != s for s in shape):
        raise InputError(f"{name}: expected three positive integers, got {shape!r}")
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ normalised coordinates
def normalised_scale_offset(shape: Sequence[int], align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis ``(scale, offset)`` with ``normalised = scale * voxel + offset``, in the *array* axis order (X, Y,
    Z): ``align_corners=False``: ``2 / S`` and ``1 / S - 1``; ``True``: ``2 / (S - 1)`` and ``-1`` (0 and 0 for a
    single voxel). The one place the formulas are written."""
    size = np.asarray(shape, dtype=np.float64)
    if align_corners:
        scale = np.where(size > 1, 2.0 / np.maximum(size - 1, 1), 0.0)
        offset = np.where(size > 1, -1.0, 0.0)
    else:
        scale = 2.0 / size
        offset = 1.0 / size - 1.0
    return scale, offset


def _as_float_array(x: Any) -> Any:
    """Keep torch tensors as they are (so conversions work on any device); turn anything else into numpy."""
    return x if _is_tensor(x) else np.asarray(x, dtype=np.float64)


def _stack(parts: list, axis: int) -> Any:
    if _is_tensor(parts[0]):
        import torch

        return torch.stack(parts, dim=axis)
    return np.stack(parts, axis=axis)


def vox_to_normalised(coords_vox: Any, shape: Sequence[int], *, align_corners: bool) -> Any:
    """Voxel coordinates ``(3, *S)`` (axis order X, Y, Z) -> a ``grid_sample`` grid ``(*S, 3)`` (order Z, Y, X).

    Works on numpy arrays and torch tensors (returned as the same type, torch in the dtype of ``coords_vox``)."""
    coords_vox = _as_float_array(coords_vox)
    if coords_vox.shape[0] != 3:
        raise InputError(f"coords_vox: expected 3 components first, got shape {tuple(coords_vox.shape)}")
    scale, offset = normalised_scale_offset(shape, align_corners)
    return _stack([coords_vox[a] * float(scale[a]) + float(offset[a]) for a in (2, 1, 0)], -1)


def normalised_to_vox(grid: Any, shape: Sequence[int], *, align_corners: bool) -> Any:
    """Inverse of :func:`vox_to_normalised`: a ``grid_sample`` grid ``(*S, 3)`` -> voxel coordinates ``(3, *S)``."""
    grid = _as_float_array(grid)
    scale, offset = normalised_scale_offset(shape, align_corners)
    safe = np.where(scale == 0, 1.0, scale)
    return _stack([(grid[..., 2 - a] - float(offset[a])) / float(safe[a]) for a in range(3)], 0)


def _check_disp(disp: Any, name: str) -> None:
    if np.ndim(disp) != 4 or np.shape(disp)[0] != 3:
        raise InputError(f"{name}: expected a displacement field of shape (3, X, Y, Z), got {tuple(np.shape(disp))}")


def disp_vox_to_normalised(disp_vox: Any, *, align_corners: bool) -> Any:
    """Displacement ``(3, X, Y, Z)`` in voxels -> ``(X, Y, Z, 3)`` in normalised units, order (Z, Y, X).

    A displacement is a difference of positions, so only the scale of :func:`vox_to_normalised` applies."""
    _check_disp(disp_vox, "disp_vox")
    disp_vox = _as_float_array(disp_vox)
    scale, _ = normalised_scale_offset(disp_vox.shape[1:], align_corners)
    return _stack([disp_vox[a] * float(scale[a]) for a in (2, 1, 0)], -1)


def disp_normalised_to_vox(disp_norm: Any, *, align_corners: bool) -> Any:
    """Inverse of :func:`disp_vox_to_normalised`: ``(X, Y, Z, 3)`` normalised -> ``(3, X, Y, Z)`` voxels."""
    disp_norm = _as_float_array(disp_norm)
    if disp_norm.ndim != 4 or disp_norm.shape[-1] != 3:
        raise InputError(f"disp_norm: expected (X, Y, Z, 3), got {tuple(disp_norm.shape)}")
    scale, _ = normalised_scale_offset(disp_norm.shape[:3], align_corners)
    safe = np.where(scale == 0, 1.0, scale)
    return _stack([disp_norm[..., 2 - a] / float(safe[a]) for a in range(3)], 0)


# ------------------------------------------------------------------------------------------------ the Grid
@dataclass(frozen=True)
class Grid:
    """A voxel grid: spatial shape ``(X, Y, Z)`` and 4x4 voxel -> world affine (mm), NIfTI axis order.

    Args:
        shape: three positive sizes.
        affine: ``(4, 4)`` finite, non-singular voxel -> world matrix (default: identity, i.e. 1 mm voxels at
            the origin -- for grids that exist only in index space, such as pyramid levels).

    Immutable; every method returns a new grid or a matrix. ``Grid.of(volume)`` takes the grid of anything with
    ``shape`` and ``affine`` (a :class:`slicreg.conventions.Volume`, a nibabel image).

    Examples:
        The network's 4 mm grid of a 2 mm scan, and where its voxel ``q`` lies on the scan's grid::

            g2 = Grid((192, 160, 256), affine)
            g4 = g2.downsample(2)                        # (96, 80, 128), affine @ [2 q + 0.5]
            g4.vox_map(g2)                               # diag(2, 2, 2) + 0.5
    """

    shape: tuple[int, int, int]
    affine: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape3(self.shape, "Grid.shape"))
        affine = np.eye(4) if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"Grid.affine: expected a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("Grid.affine: singular (zero voxel size or collinear axes)")
        object.__setattr__(self, "affine", affine)

    @classmethod
    def of(cls, obj: Any) -> Grid:
        """The grid of anything with a ``shape`` whose first three entries are spatial and an ``affine`` (a
        :class:`slicreg.conventions.Volume`, whose ``shape`` is spatial, or a nibabel image)."""
        return cls(tuple(obj.shape)[:3], obj.affine)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and self.shape == other.shape and bool(np.array_equal(self.affine,
                                                                                              other.affine))

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes()))

    def same_as(self, other: Grid, *, atol_mm: float = 1e-3) -> bool:
        """Same shape and (to ``atol_mm``) the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))

    # --------------------------------------------------------------------------------------- properties
    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size in mm along array axes 0, 1, 2."""
        return spacing_from_affine(self.affine)

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` direction cosines: column ``a`` is the unit world vector of array axis ``a``."""
        return self.affine[:3, :3] / self.spacing_mm[None, :]

    @property
    def origin_mm(self) -> np.ndarray:
        """World position of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    @property
    def axcodes(self) -> str:
        """Orientation codes of the array axes, e.g. ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        from nibabel.orientations import aff2axcodes

        return "".join(aff2axcodes(self.affine))

    @property
    def fov_mm(self) -> np.ndarray:
        """Extent of each axis in mm between the outer voxel faces: ``shape * spacing``."""
        return np.asarray(self.shape, dtype=np.float64) * self.spacing_mm

    # ------------------------------------------------------------------------------------- derived grids
    def downsample(self, factor: int) -> Grid:
        """The grid of ``factor``-cubed blocks from voxel 0: shape ``floor(n / factor)``, coarse voxel ``q`` at
        fine voxel ``factor * q + (factor - 1) / 2`` (:func:`downsample_index_map`)."""
        f = _factor(factor)
        shape = tuple(s // f for s in self.shape)
        if min(shape) < 1:
            raise InputError(f"factor: {f} is larger than the grid {self.shape}")
        return Grid(shape, self.affine @ downsample_index_map(f))

    def resize(self, shape: Sequence[int]) -> Grid:
        """The same field of view on ``shape`` voxels (:func:`fov_index_map`)."""
        shape = _shape3(shape, "shape")
        return Grid(shape, self.affine @ fov_index_map(shape, self.shape))

    def with_spacing(self, spacing_mm: float | Sequence[float]) -> Grid:
        """The grid of voxel size ``spacing_mm`` covering the same field of view, centred on the same midpoint;
        direction cosines kept (:func:`spacing_index_map`)."""
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        shape, index_map = spacing_index_map(self.shape, self.spacing_mm, target)
        return Grid(shape, self.affine @ index_map)

    def crop(self, start: Sequence[int], shape: Sequence[int]) -> Grid:
        """The window of ``shape`` voxels starting at voxel ``start`` (negative or beyond the end = padding);
        every voxel keeps its world position."""
        start_i = np.asarray(start).reshape(-1)
        if start_i.shape != (3,) or np.any(start_i != np.round(start_i)):
            raise InputError(f"start: expected three integer voxel offsets, got {list(np.ravel(start))}")
        return Grid(_shape3(shape, "shape"), self.affine @ translation_index_map(start_i))

    # -------------------------------------------------------------------------------------------- maps
    def vox_map(self, to: Grid) -> np.ndarray:
        """4x4 map from voxel indices of this grid to voxel indices of ``to`` (through world space):
        ``inv(to.affine) @ self.affine``. Apply it with :func:`map_points` (positions) or :func:`map_vectors`
        (displacements)."""
        return np.linalg.inv(to.affine) @ self.affine

    def vox_to_world(self, points_vox: Any) -> Any:
        """Voxel positions ``(3, *S)`` -> world mm ``(3, *S)``."""
        return map_points(self.affine, points_vox)

    def world_to_vox(self, points_mm: Any) -> Any:
        """World mm ``(3, *S)`` -> voxel positions ``(3, *S)``."""
        return map_points(np.linalg.inv(self.affine), points_mm)

    def coords(self, *, dtype: Any = np.float32) -> np.ndarray:
        """Voxel coordinates of every voxel, ``(3, X, Y, Z)`` (:func:`identity_grid_vox`)."""
        return identity_grid_vox(self.shape, dtype=dtype)

    def normalised_matrix(self, *, align_corners: bool) -> np.ndarray:
        """4x4 map from voxel ``(i, j, k)`` to ``grid_sample``'s normalised coordinates of this grid, in its
        order (``(k, j, i)``: the first component indexes the last array axis). With ``theta`` of
        ``F.affine_grid`` (output normalised -> input normalised, as a 4x4), the voxel map output -> input is
        ``inv(input.normalised_matrix) @ theta @ output.normalised_matrix``."""
        scale, offset = normalised_scale_offset(self.shape, bool(align_corners))
        out = np.zeros((4, 4))
        for a in range(3):
            out[2 - a, a] = scale[a]
            out[2 - a, 3] = offset[a]
        out[3, 3] = 1.0
        return out

    def to_normalised(self, coords_vox: Any, *, align_corners: bool) -> Any:
        """Voxel positions ``(3, *S)`` -> a ``grid_sample`` grid ``(*S, 3)`` (:func:`vox_to_normalised`)."""
        return vox_to_normalised(coords_vox, self.shape, align_corners=align_corners)

    def from_normalised(self, grid: Any, *, align_corners: bool) -> Any:
        """A ``grid_sample`` grid ``(*S, 3)`` -> voxel positions ``(3, *S)`` (:func:`normalised_to_vox`)."""
        return normalised_to_vox(grid, self.shape, align_corners=align_corners)

    def __repr__(self) -> str:
        sp = "x".join(f"{v:g}" for v in np.round(self.spacing_mm, 4))
        return f"Grid(shape={self.shape}, spacing_mm={sp}, axcodes={self.axcodes!r})"
