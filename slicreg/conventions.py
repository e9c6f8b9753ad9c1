"""The conventions of slicreg, stated once.

Axis order
    Every spatial array is indexed in the NIfTI voxel order ``(i, j, k)``, called ``(X, Y, Z)`` in shapes.
    ``volume.array[i, j, k]`` is the voxel whose world position (millimetres, RAS+ for canonical images) is
    ``affine @ [i, j, k, 1]``. Arrays with several channels (displacement components, supervoxel layers,
    network features) put the channel axis first: ``(C, X, Y, Z)``. Files put it last (see :mod:`slicreg.io`).

Displacement fields
    A field ``u`` is an array of shape ``(3, X, Y, Z)`` on the grid of the *fixed* image. Component ``u[a]`` is
    the displacement along array axis ``a``, in voxels of that grid. It maps fixed to moving (a pull field):

        ``warped(p) = moving(p + u(p))``  for every voxel ``p`` of the fixed grid,

    which is the Learn2Reg convention. The Learn2Reg file layout is ``(X, Y, Z, 3)`` in voxels
    (:func:`to_learn2reg_layout`); world millimetres are ``affine[:3, :3] @ u`` (:func:`disp_vox_to_mm`).

torch's ``grid_sample``
    ``grid_sample`` wants normalised coordinates in ``[-1, 1]`` in *reversed* component order (the last
    component indexes the first spatial axis) and an explicit ``align_corners``:

    - ``align_corners=True``:  voxel ``p`` <-> ``2 p / (S - 1) - 1``  (voxel centres of the first and last voxel at -1, 1);
    - ``align_corners=False``: voxel ``p`` <-> ``(2 p + 1) / S - 1``  (outer faces of the first and last voxel at -1, 1).

    Normalised coordinates exist only inside the function that calls ``grid_sample``; everything else works
    in voxels. The conversions below are the only place these formulas are written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from slicreg.errors import InputError

__all__ = [
    "Volume",
    "spacing_from_affine",
    "identity_grid_vox",
    "disp_vox_to_mm",
    "disp_mm_to_vox",
    "to_learn2reg_layout",
    "from_learn2reg_layout",
    "vox_to_normalised",
    "normalised_to_vox",
    "disp_vox_to_normalised",
    "disp_normalised_to_vox",
    "downsample_affine",
]


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm along array axes 0, 1, 2: the column norms of ``affine[:3, :3]``."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class Volume:
    """An array on a voxel grid together with the 4x4 voxel -> world (mm) affine of that grid.

    Args:
        array: ``(X, Y, Z)`` or, for several channels, ``(C, X, Y, Z)``; any numeric dtype.
        affine: ``(4, 4)`` voxel -> world matrix in mm, as in NIfTI (``affine @ [i, j, k, 1]``).
        meta: free-form provenance (source file, original orientation, ...); not used for computation.

    The spacing is derived from the affine and never stored separately, so the two cannot disagree.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"Volume: affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("Volume: affine is singular (zero voxel size or collinear axes)")
        if np.ndim(self.array) not in (3, 4):
            raise InputError(
                f"Volume: array must be (X, Y, Z) or (C, X, Y, Z), got {np.ndim(self.array)}-D shape "
                f"{np.shape(self.array)}"
            )
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` (channels excluded)."""
        return tuple(int(s) for s in np.shape(self.array)[-3:])  # type: ignore[return-value]

    @property
    def n_channels(self) -> int | None:
        """Number of channels for a ``(C, X, Y, Z)`` array, ``None`` for a plain ``(X, Y, Z)`` volume."""
        return int(np.shape(self.array)[0]) if np.ndim(self.array) == 4 else None

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size in mm along array axes 0, 1, 2."""
        return spacing_from_affine(self.affine)

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A volume on the same grid with another array (its spatial shape must match)."""
        if tuple(np.shape(array)[-3:]) != self.shape:
            raise InputError(f"Volume.with_array: spatial shape {np.shape(array)[-3:]} != grid {self.shape}")
        return Volume(array, self.affine, {**self.meta, **meta})

    def same_grid(self, other: "Volume", *, atol_mm: float = 1e-3) -> bool:
        """True if both volumes have the same spatial shape and (to ``atol_mm``) the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))


def identity_grid_vox(shape: Sequence[int], *, dtype: Any = np.float32) -> np.ndarray:
    """Voxel coordinates of every voxel: array ``(3, X, Y, Z)`` with ``grid[a, i, j, k] = (i, j, k)[a]``."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=dtype) for s in shape], indexing="ij"))


def _check_disp(disp: Any, name: str = "disp") -> None:
    if np.ndim(disp) != 4 or np.shape(disp)[0] != 3:
        raise InputError(f"{name}: expected a displacement field of shape (3, X, Y, Z), got {tuple(np.shape(disp))}")


def disp_vox_to_mm(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacements ``(3, X, Y, Z)`` -> world displacement vectors in mm, ``affine[:3, :3] @ u``."""
    _check_disp(disp_vox, "disp_vox")
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.einsum("ab,b...->a...", lin, disp_vox).astype(np.result_type(disp_vox, np.float32))


def disp_mm_to_vox(disp_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`disp_vox_to_mm`: world mm vectors -> voxel displacements of the grid of ``affine``."""
    _check_disp(disp_mm, "disp_mm")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.einsum("ab,b...->a...", inv, disp_mm).astype(np.result_type(disp_mm, np.float32))


def to_learn2reg_layout(disp_vox: np.ndarray) -> np.ndarray:
    """``(3, X, Y, Z)`` -> the Learn2Reg file layout ``(X, Y, Z, 3)`` (voxels, fixed -> moving, unchanged values)."""
    _check_disp(disp_vox, "disp_vox")
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp_vox), 0, -1))


def from_learn2reg_layout(disp_xyz3: np.ndarray) -> np.ndarray:
    """The Learn2Reg layout ``(X, Y, Z, 3)`` -> ``(3, X, Y, Z)``."""
    if np.ndim(disp_xyz3) != 4 or np.shape(disp_xyz3)[-1] != 3:
        raise InputError(f"disp: expected the Learn2Reg layout (X, Y, Z, 3), got {tuple(np.shape(disp_xyz3))}")
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp_xyz3), -1, 0))


def _scale_offset(shape: Sequence[int], align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis ``(scale, offset)`` with ``normalised = scale * voxel + offset`` (axis order X, Y, Z)."""
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
    return x if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def vox_to_normalised(coords_vox: Any, shape: Sequence[int], *, align_corners: bool) -> Any:
    """Voxel coordinates ``(3, *S)`` (axis order X, Y, Z) -> a ``grid_sample`` grid ``(*S, 3)`` (order Z, Y, X).

    Works on numpy arrays and torch tensors (returned as the same type)."""
    coords_vox = _as_float_array(coords_vox)
    if coords_vox.shape[0] != 3:
        raise InputError(f"coords_vox: expected 3 components first, got shape {tuple(coords_vox.shape)}")
    scale, offset = _scale_offset(shape, align_corners)
    comps = [coords_vox[a] * float(scale[a]) + float(offset[a]) for a in (2, 1, 0)]
    return _stack_last(comps)


def normalised_to_vox(grid: Any, shape: Sequence[int], *, align_corners: bool) -> Any:
    """Inverse of :func:`vox_to_normalised`: a ``grid_sample`` grid ``(*S, 3)`` -> voxel coordinates ``(3, *S)``."""
    grid = _as_float_array(grid)
    scale, offset = _scale_offset(shape, align_corners)
    safe = np.where(scale == 0, 1.0, scale)
    comps = [(grid[..., 2 - a] - float(offset[a])) / float(safe[a]) for a in range(3)]
    return _stack_first(comps)


def disp_vox_to_normalised(disp_vox: Any, *, align_corners: bool) -> Any:
    """Displacement ``(3, X, Y, Z)`` in voxels -> ``(X, Y, Z, 3)`` in normalised units, order (Z, Y, X).

    A displacement is a difference of positions, so only the scale of :func:`vox_to_normalised` applies."""
    _check_disp(disp_vox, "disp_vox")
    disp_vox = _as_float_array(disp_vox)
    scale, _ = _scale_offset(disp_vox.shape[1:], align_corners)
    return _stack_last([disp_vox[a] * float(scale[a]) for a in (2, 1, 0)])


def disp_normalised_to_vox(disp_norm: Any, *, align_corners: bool) -> Any:
    """Inverse of :func:`disp_vox_to_normalised`: ``(X, Y, Z, 3)`` normalised -> ``(3, X, Y, Z)`` voxels."""
    disp_norm = _as_float_array(disp_norm)
    if disp_norm.ndim != 4 or disp_norm.shape[-1] != 3:
        raise InputError(f"disp_norm: expected (X, Y, Z, 3), got {tuple(disp_norm.shape)}")
    scale, _ = _scale_offset(disp_norm.shape[:3], align_corners)
    safe = np.where(scale == 0, 1.0, scale)
    return _stack_first([disp_norm[..., 2 - a] / float(safe[a]) for a in range(3)])


def _stack_last(parts: list) -> Any:
    if hasattr(parts[0], "detach"):
        import torch

        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def _stack_first(parts: list) -> Any:
    if hasattr(parts[0], "detach"):
        import torch

        return torch.stack(parts, dim=0)
    return np.stack(parts, axis=0)


def downsample_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid made by pooling ``factor``-cubed blocks of voxels.

    Voxel ``q`` of the coarse grid sits at the centre of its block, fine voxel ``factor * q + (factor - 1) / 2``
    (``align_corners=False`` semantics). The network's 4 mm input (96 x 80 x 128) relates to the 2 mm scan
    (192 x 160 x 256) this way with ``factor=2``, and its stride-2 output to the 4 mm grid the same way."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale
