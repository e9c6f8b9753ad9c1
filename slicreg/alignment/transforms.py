"""Transformation models of the registration toolkit (torch, differentiable), and the one warp function.

Units: every displacement here is in voxels along array axes 0, 1, 2 (``(B, 3, X, Y, Z)``, component ``a``
along axis ``a``), fixed -> moving, as in :mod:`slicreg.conventions`. A model may keep its parameters on a
coarser grid than the image it deforms; its output is always the displacement on the requested grid, and the
*values* keep whatever voxel unit the caller chose (the engine uses full-resolution voxels on every level).

Grids of different resolution that cover the same field of view are related with ``align_corners=False``
semantics, as ``torch.nn.functional.interpolate`` and :func:`slicreg.conventions.downsample_affine` do: voxel
``q`` of a grid of ``n`` voxels covers the same place as voxel ``(q + 0.5) * N / n - 0.5`` of a grid of ``N``.

Models (``torch.nn.Module``; call ``model(shape)`` for the displacement on a grid of that shape):

- :class:`AffineTransform` -- 12 parameters around the image centres; gives a 4x4 voxel matrix;
- :class:`DenseDisplacement` -- one free vector per node of a (possibly coarser) grid, trilinear in between;
- :class:`BSplineDisplacement` -- cubic B-spline free-form deformation (Rueckert et al., IEEE TMI 1999) on a
  control grid of a given spacing, evaluated exactly with separable transposed convolutions;
- :class:`StationaryVelocity` -- a stationary velocity field integrated by scaling and squaring
  (:func:`slicreg.fields.scaling_and_squaring`; Arsigny et al., MICCAI 2006; Ashburner, NeuroImage 2007), which
  gives diffeomorphic (fold-free) maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.errors import InputError
from slicreg.fields import sample, scaling_and_squaring

__all__ = [
    "grid_warp",
    "identity_grid",
    "resize_field",
    "AffineTransform",
    "affine_displacement",
    "DenseDisplacement",
    "bspline_control_shape",
    "bspline_evaluate",
    "BSplineDisplacement",
    "StationaryVelocity",
]


def identity_grid(shape: Sequence[int], *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel, ``(1, 3, X, Y, Z)`` with ``grid[0, a, i, j, k] = (i, j, k)[a]``."""
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def grid_warp(
    image: torch.Tensor,
    coords_vox: torch.Tensor,
    *,
    align_corners: bool = True,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``image`` at voxel positions, differentiable in image and positions: the toolkit's name for the
    one sampler's ``"grid_sample"`` backend (:func:`slicreg.fields.sample`), in ``grid_sample``'s vocabulary.

    Args:
        image: ``(B, C, X', Y', Z')`` float tensor (the moving image or its features).
        coords_vox: ``(B, 3, X, Y, Z)`` positions in voxels of ``image``'s grid (axis order 0, 1, 2).
        align_corners: passed to ``grid_sample``; the conversion accounts for it, so the result is the same
            either way for positions inside the grid (default True).
        mode: ``"bilinear"`` (trilinear in 3-D; the sampler's ``"linear"``) or ``"nearest"``.
        padding_mode: ``"border"`` (default, edge values continue) or ``"zeros"`` (the grid surrounded by
            zero-valued voxels: the sampler's ``"zero_voxels"``).

    Returns:
        ``(B, C, X, Y, Z)``.
    """
    if image.ndim != 5 or coords_vox.ndim != 5 or coords_vox.shape[1] != 3:
        raise InputError(f"grid_warp: expected image (B, C, X, Y, Z) and coords (B, 3, X, Y, Z), got "
                         f"{tuple(image.shape)} and {tuple(coords_vox.shape)}")
    if coords_vox.shape[0] != image.shape[0]:
        raise InputError(f"grid_warp: batch sizes differ: image {image.shape[0]}, coords {coords_vox.shape[0]}")
    interpolation = {"bilinear": "linear", "nearest": "nearest"}.get(mode)
    padding = {"border": "border", "zeros": "zero_voxels"}.get(padding_mode)
    if interpolation is None or padding is None:
        raise InputError(f"grid_warp: expected mode 'bilinear' or 'nearest' and padding_mode 'border' or 'zeros', "
                         f"got {mode!r}, {padding_mode!r}")
    return sample(image, coords_vox, interpolation=interpolation, padding=padding, backend="grid_sample",  # type: ignore[arg-type]
                  align_corners=align_corners)


def resize_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample ``(B, C, X, Y, Z)`` onto a grid of ``shape`` over the same field of view (trilinear,
    ``align_corners=False`` semantics, edges clamped). Values are interpolated, not rescaled: a displacement
    stored in full-resolution voxels stays in full-resolution voxels."""
    shape = tuple(int(s) for s in shape)
    if tuple(field.shape[2:]) == shape:
        return field
    return F.interpolate(field, size=shape, mode="trilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------- affine
def affine_displacement(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The displacement ``(1, 3, X, Y, Z)`` of the voxel map ``p -> M p`` (``matrix`` 4x4, fixed -> moving)."""
    grid = identity_grid(shape, device=matrix.device, dtype=matrix.dtype)
    moved = torch.einsum("ab,nb...->na...", matrix[:3, :3], grid) + matrix[:3, 3].reshape(1, 3, 1, 1, 1)
    return moved - grid


class AffineTransform(torch.nn.Module):
    """An affine voxel map ``x -> (I + L)(x - c_fixed) + c_moving + t`` (fixed voxel -> moving voxel).

    ``L`` (3x3) and ``t`` (3, voxels) start at zero, so the initial map takes the centre of the fixed grid to
    the centre of the moving grid (the identity for grids of the same shape). Parameterising around the
    centres keeps rotations and translations decoupled, which helps first-order optimisers.

    Args:
        fixed_shape, moving_shape: spatial shapes of the two grids.
        translation: initial ``t`` in voxels (default zero).
        translation_scale: the parameter ``translation`` holds ``t / translation_scale``. With a scale near the
            grid's half-size, a unit change of any parameter moves the grid's edge by a similar amount, so one
            step size (Adam) or one quasi-Newton metric (L-BFGS) suits all 12 parameters (default 1).
    """

    def __init__(self, fixed_shape: Sequence[int], moving_shape: Sequence[int], *,
                 translation: Sequence[float] | None = None, translation_scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("centre_fixed", torch.tensor([(s - 1) / 2.0 for s in fixed_shape], dtype=torch.float64))
        self.register_buffer("centre_moving",
                             torch.tensor([(s - 1) / 2.0 for s in moving_shape], dtype=torch.float64))
        self.linear = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float32))
        self.translation_scale = float(translation_scale)
        t0 = torch.zeros(3) if translation is None else torch.as_tensor(translation, dtype=torch.float32)
        self.translation = torch.nn.Parameter(t0.clone().float() / self.translation_scale)

    def matrix(self) -> torch.Tensor:
        """The 4x4 homogeneous matrix (float32, differentiable), fixed voxel -> moving voxel."""
        lin = torch.eye(3, dtype=self.linear.dtype, device=self.linear.device) + self.linear
        cf = self.centre_fixed.to(lin.dtype)
        cm = self.centre_moving.to(lin.dtype)
        offset = cm + self.translation * self.translation_scale - lin @ cf
        top = torch.cat([lin, offset[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=lin.dtype, device=lin.device)
        return torch.cat([top, bottom], dim=0)

    def forward(self, shape: Sequence[int]) -> torch.Tensor:
        return affine_displacement(self.matrix(), shape)


# ------------------------------------------------------------------------------------- dense displacement
class DenseDisplacement(torch.nn.Module):
    """A free displacement vector per node of a grid of ``grid_shape``; ``model(shape)`` interpolates it
    (trilinear, :func:`resize_field`) to ``shape`` (``model()``: the node values). With ``grid_shape`` equal to
    the image grid it is the classic non-parametric model. Starts at zero, or at ``init`` ``(1, 3, *grid_shape)``."""

    def __init__(self, grid_shape: Sequence[int], *, init: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = (1, 3, *[int(s) for s in grid_shape])
        value = torch.zeros(shape) if init is None else resize_field(init.detach().float(), shape[2:]).clone()
        self.disp = torch.nn.Parameter(value)

    def forward(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.disp if shape is None else resize_field(self.disp, shape)


# ------------------------------------------------------------------------------------------------ B-spline
def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The uniform cubic B-spline basis function beta3(t), support (-2, 2), sum over integer shifts = 1."""
    a = np.abs(t)
    out = np.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, 0.0)
    return np.where((a >= 1) & (a < 2), (2 - a) ** 3 / 6, out)


def bspline_control_shape(shape: Sequence[int], spacing: Sequence[int] | int) -> tuple[int, int, int]:
    """Control-grid shape for an image grid ``shape`` and integer control spacing (voxels).

    Control node ``q`` sits at voxel ``(q - 1) * spacing``; ``ceil((n - 1) / spacing) + 3`` nodes per axis cover
    the support of every voxel ``0..n-1``."""
    sp = [int(spacing)] * 3 if isinstance(spacing, (int, np.integer)) else [int(s) for s in spacing]
    if min(sp) < 1:
        raise InputError(f"bspline: control spacing must be >= 1 voxel, got {spacing}")
    return tuple(int(math.ceil((int(n) - 1) / s)) + 3 for n, s in zip(shape, sp))  # type: ignore[return-value]


def bspline_evaluate(control: torch.Tensor, shape: Sequence[int], spacing: Sequence[int] | int) -> torch.Tensor:
    """Dense field of a cubic B-spline control grid: ``u(x) = sum_q c_q prod_a beta3(x_a / s_a - q_a + 1)``.

    Exact evaluation as three separable transposed convolutions (stride = spacing, kernel = beta3 sampled
    at the ``4 s - 1`` voxel offsets inside its support), cropped to ``shape``.

    Args:
        control: ``(B, C, *bspline_control_shape(shape, spacing))``.
        shape: output grid ``(X, Y, Z)``.
        spacing: control spacing in voxels (int or one per axis).

    Returns:
        ``(B, C, X, Y, Z)``.
    """
    sp = [int(spacing)] * 3 if isinstance(spacing, (int, np.integer)) else [int(s) for s in spacing]
    expected = bspline_control_shape(shape, sp)
    if control.ndim != 5 or tuple(control.shape[2:]) != expected:
        raise InputError(f"bspline_evaluate: control grid must be (B, C, {expected}) for shape {tuple(shape)} and "
                         f"spacing {sp}, got {tuple(control.shape)}")
    n_ch = control.shape[1]
    out = control.reshape(-1, 1, *control.shape[2:])
    for axis in range(3):
        s = sp[axis]
        taps = _cubic_bspline((np.arange(4 * s - 1) + 1 - 2 * s) / s)
        ksize = [1, 1, 1]
        ksize[axis] = taps.size
        kernel = torch.as_tensor(taps, dtype=control.dtype, device=control.device).reshape(1, 1, *ksize)
        stride = [1, 1, 1]
        stride[axis] = s
        out = F.conv_transpose3d(out, kernel, stride=stride)
        # output index o corresponds to voxel o - (3 s - 1)
        out = out.narrow(2 + axis, 3 * s - 1, int(shape[axis]))
    return out.reshape(control.shape[0], n_ch, *[int(n) for n in shape])


class BSplineDisplacement(torch.nn.Module):
    """Cubic B-spline free-form deformation on a control grid with ``spacing`` voxels between nodes (of the
    grid ``shape`` it is built for). ``model(shape)`` evaluates it on that grid, or on another grid by
    trilinear resizing. Starts at zero."""

    def __init__(self, shape: Sequence[int], *, spacing: Sequence[int] | int = 4) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.spacing = spacing
        self.control = torch.nn.Parameter(torch.zeros(1, 3, *bspline_control_shape(self.shape, spacing)))

    def forward(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        dense = bspline_evaluate(self.control, self.shape, self.spacing)
        return dense if shape is None else resize_field(dense, shape)


# -------------------------------------------------------------------------------------- velocity fields
class StationaryVelocity(torch.nn.Module):
    """A stationary velocity field on a grid of ``grid_shape``; ``model(shape)`` integrates it by scaling and
    squaring on that grid and resizes the displacement to ``shape``.

    Args:
        grid_shape: grid of the velocity parameters (may be coarser than the image).
        voxel_size: size of one velocity-grid voxel in the unit of the values, per axis (see
            :func:`slicreg.fields.scaling_and_squaring`).
        steps: squaring steps (default 7).
        init: optional initial velocity ``(1, 3, ...)`` (any grid; resized).
    """

    def __init__(self, grid_shape: Sequence[int], *, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), steps: int = 7,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = (1, 3, *[int(s) for s in grid_shape])
        value = torch.zeros(shape) if init is None else resize_field(init.detach().float(), shape[2:]).clone()
        self.velocity = torch.nn.Parameter(value)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.steps = int(steps)

    def forward(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        disp = scaling_and_squaring(self.velocity, steps=self.steps, voxel_size=self.voxel_size)
        return disp if shape is None else resize_field(disp, shape)
