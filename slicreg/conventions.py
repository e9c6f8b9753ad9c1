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
    When the moving scan has a grid of its own (``x + u(x)`` indexes *its* voxels), the world displacement is
    ``d(p) = A_m (x + u(x)) - A_f x`` at ``p = A_f x`` (:func:`disp_vox_to_world`); ITK's displacement files hold it
    in LPS+ (:func:`world_ras_to_lps`, :func:`to_itk_layout`). These forms exist only at the file edge.

torch's ``grid_sample``
    ``grid_sample`` wants normalised coordinates in ``[-1, 1]`` in *reversed* component order (the last
    component indexes the first spatial axis) and an explicit ``align_corners``:

    - ``align_corners=True``:  voxel ``p`` <-> ``2 p / (S - 1) - 1`` (centres of the first and last voxel at -1, 1);
    - ``align_corners=False``: voxel ``p`` <-> ``(2 p + 1) / S - 1`` (outer faces of the first and last voxel at -1, 1).

    Normalised coordinates exist only inside the function that calls ``grid_sample``; everything else works
    in voxels. The conversions (:func:`vox_to_normalised` and its inverses) are written once, in
    :mod:`slicreg.grid`, and re-exported here.

Grids
    A :class:`~slicreg.grid.Grid` is a shape and its affine; every map between two grids (downsampling by an
    integer factor: coarse voxel ``q`` = fine voxel ``f q + (f - 1) / 2``; the same field of view on another
    shape or spacing; crops; any two grids through world space) is a 4x4 voxel matrix from :mod:`slicreg.grid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slicreg.errors import InputError
from slicreg.grid import (
    Grid,
    _check_disp,
    disp_normalised_to_vox,
    disp_vox_to_normalised,
    displaced_positions,
    downsample_affine,
    identity_grid_vox,
    normalised_to_vox,
    spacing_from_affine,
    vox_to_normalised,
)

__all__ = [
    "Volume",
    "Grid",
    "spacing_from_affine",
    "identity_grid_vox",
    "displaced_positions",
    "disp_vox_to_mm",
    "disp_mm_to_vox",
    "to_learn2reg_layout",
    "from_learn2reg_layout",
    "vox_to_normalised",
    "normalised_to_vox",
    "disp_vox_to_normalised",
    "disp_normalised_to_vox",
    "downsample_affine",
    "RAS_TO_LPS",
    "disp_vox_to_world",
    "disp_world_to_vox",
    "world_ras_to_lps",
    "to_itk_layout",
    "from_itk_layout",
]


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

    @property
    def grid(self) -> Grid:
        """The volume's :class:`~slicreg.grid.Grid` (spatial shape and affine)."""
        return Grid(self.shape, self.affine)

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A volume on the same grid with another array (its spatial shape must match)."""
        if tuple(np.shape(array)[-3:]) != self.shape:
            raise InputError(f"Volume.with_array: spatial shape {np.shape(array)[-3:]} != grid {self.shape}")
        return Volume(array, self.affine, {**self.meta, **meta})

    def same_grid(self, other: Volume, *, atol_mm: float = 1e-3) -> bool:
        """True if both volumes have the same spatial shape and (to ``atol_mm``) the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))


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


# ------------------------------------------------------------------------------- world-space (ITK) fields
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""NIfTI world (RAS+: x towards the patient's right, y anterior, z superior) -> ITK / DICOM world (LPS+: left,
posterior, superior): the first two axes change sign. The matrix is its own inverse."""


def _vox_map(disp: np.ndarray, lin: np.ndarray, grid_lin: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``lin @ disp(x) + grid_lin @ x + offset`` per component, for ``disp`` ``(3, X, Y, Z)``, float32.

    One component at a time and without a full-size coordinate grid (the ``x`` term is a broadcast sum of three
    1-D ramps, computed in float64), so a field of a large original scan needs little more than its output."""
    shape = disp.shape[1:]
    out = np.empty(disp.shape, dtype=np.float32)
    for a in range(3):
        ramps = [(np.arange(s, dtype=np.float64) * grid_lin[a, b] + (offset[a] if b == 0 else 0.0))
                 .astype(np.float32).reshape([-1 if d == b else 1 for d in range(3)]) for b, s in enumerate(shape)]
        acc = out[a]
        np.add(ramps[0] + ramps[1], ramps[2], out=acc)
        for b in range(3):
            if lin[a, b] != 0.0:
                acc += np.float32(lin[a, b]) * np.asarray(disp[b], dtype=np.float32)
    return out


def _check_affine(affine: Any, name: str) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(f"{name}: expected a finite, invertible 4x4 voxel -> world matrix, got {a.tolist()!r:.80}")
    return a


def disp_vox_to_world(disp_vox: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray | None = None
                      ) -> np.ndarray:
    """A field in voxels (fixed -> moving, see the module docstring) -> world displacements in mm.

    For the fixed voxel ``x`` at world point ``p = A_f x``, the moving voxel ``x + u(x)`` lies at ``A_m (x + u(x))``,
    so the world displacement is ``d(p) = A_m (x + u(x)) - A_f x`` (in the frame of the affines: RAS+ for NIfTI;
    :func:`world_ras_to_lps` gives ITK's). With ``moving_affine=None`` (the moving scan on the fixed grid) this is
    ``A_f[:3, :3] @ u`` (:func:`disp_vox_to_mm`). Returns ``(3, X, Y, Z)`` float32 on the fixed grid."""
    _check_disp(disp_vox, "disp_vox")
    a_f = _check_affine(fixed_affine, "fixed_affine")
    a_m = a_f if moving_affine is None else _check_affine(moving_affine, "moving_affine")
    return _vox_map(np.asarray(disp_vox), a_m[:3, :3], a_m[:3, :3] - a_f[:3, :3], a_m[:3, 3] - a_f[:3, 3])


def disp_world_to_vox(disp_mm: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray | None = None
                      ) -> np.ndarray:
    """Inverse of :func:`disp_vox_to_world`: world displacements ``d(p)`` (mm, on the fixed grid) -> the voxel field
    ``u(x) = A_m^-1 (A_f x + d(A_f x)) - x`` (fixed -> moving, voxels of the moving grid), ``(3, X, Y, Z)`` float32."""
    _check_disp(disp_mm, "disp_mm")
    a_f = _check_affine(fixed_affine, "fixed_affine")
    a_m = a_f if moving_affine is None else _check_affine(moving_affine, "moving_affine")
    inv = np.linalg.inv(a_m)
    lin = inv[:3, :3]
    return _vox_map(np.asarray(disp_mm), lin, lin @ a_f[:3, :3] - np.eye(3), lin @ a_f[:3, 3] + inv[:3, 3])


def world_ras_to_lps(vectors: np.ndarray) -> np.ndarray:
    """Vectors ``(3, ...)`` between the RAS+ and LPS+ world frames (components 0 and 1 change sign; its own inverse)."""
    v = np.array(vectors, dtype=np.result_type(vectors, np.float32), copy=True)
    if v.ndim < 1 or v.shape[0] != 3:
        raise InputError(f"vectors: expected 3 components first, got shape {v.shape}")
    v[0] *= -1
    v[1] *= -1
    return v


def to_itk_layout(disp_mm_lps: np.ndarray) -> np.ndarray:
    """``(3, X, Y, Z)`` (mm, LPS) -> ITK's NIfTI vector-image layout ``(X, Y, Z, 1, 3)`` (the 4th axis is time), as
    a view of the input (no copy: a file writer reorders it once, into the file's order)."""
    _check_disp(disp_mm_lps, "disp_mm_lps")
    return np.moveaxis(np.asarray(disp_mm_lps), 0, -1)[:, :, :, None, :]


def from_itk_layout(disp_xyz13: np.ndarray) -> np.ndarray:
    """ITK's NIfTI vector layout ``(X, Y, Z, 1, 3)`` -> ``(3, X, Y, Z)`` (values unchanged)."""
    if np.ndim(disp_xyz13) != 5 or np.shape(disp_xyz13)[3:] != (1, 3):
        raise InputError(f"disp: expected ITK's vector layout (X, Y, Z, 1, 3), got {tuple(np.shape(disp_xyz13))}")
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp_xyz13)[:, :, :, 0, :], -1, 0))
