"""Sampling and warping with displacement fields (voxels, fixed -> moving; see :mod:`slicreg.conventions`).

The sampler works in voxel coordinates directly (trilinear or nearest, with a gather), so an integer
position returns the stored value bit for bit: a zero field reproduces the input exactly and an integer shift
is an exact shift. ``grid_sample`` is used only where its speed on CUDA or its autograd matter (the
registration toolkit); :func:`sample_grid_sample` shows the one place where voxel coordinates become
normalised ones and is checked against :func:`sample` in the tests.

Boundary handling (``padding``):

- ``"border"``: positions are clamped to the grid, i.e. the edge value continues outwards (deeds' rule, and the
  right choice for intensities);
- ``"zeros"``: samples at positions outside ``[0, S - 1]`` on any axis are 0 (background; the right choice for
  label maps). This is exactly ``scipy.ndimage.map_coordinates(..., mode="constant", cval=0)``, which Learn2Reg's
  evaluation uses with ``order=0``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from slicreg.conventions import identity_grid_vox, vox_to_normalised
from slicreg.errors import InputError

__all__ = ["sample", "sample_grid_sample", "warp_image", "warp_labels", "compose", "apply_affine_vox"]

Padding = Literal["border", "zeros"]


def _torch():
    import torch

    return torch


def _to_tensor(x: Any, device: Any, dtype: Any = None) -> Any:
    torch = _torch()
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)


def sample(values: Any, coords_vox: Any, *, order: int = 1, padding: Padding = "border") -> Any:
    """Sample a volume at voxel coordinates.

    Args:
        values: torch tensor ``(X, Y, Z)`` or ``(C, X, Y, Z)``.
        coords_vox: torch tensor ``(3, *S)``: positions in voxels along array axes 0, 1, 2.
        order: 1 = trilinear, 0 = nearest (rounds half up: ``floor(x + 0.5)``, as ``scipy.ndimage``).
        padding: ``"border"`` (clamp positions to the grid) or ``"zeros"`` (0 outside ``[0, S - 1]``).

    Returns:
        ``(*S)`` or ``(C, *S)``, dtype of ``values`` for nearest, floating for trilinear.
    """
    torch = _torch()
    if order not in (0, 1):
        raise InputError(f"sample: order must be 0 (nearest) or 1 (linear), got {order}")
    if padding not in ("border", "zeros"):
        raise InputError(f"sample: padding must be 'border' or 'zeros', got {padding!r}")
    squeeze = values.ndim == 3
    vol = values[None] if squeeze else values
    if vol.ndim != 4 or coords_vox.shape[0] != 3:
        raise InputError(
            f"sample: expected values (X, Y, Z) or (C, X, Y, Z) and coords (3, ...), got "
            f"{tuple(values.shape)} and {tuple(coords_vox.shape)}"
        )
    n_ch, size = vol.shape[0], vol.shape[1:]
    out_shape = coords_vox.shape[1:]
    pos = coords_vox.reshape(3, -1)
    flat = vol.reshape(n_ch, -1)
    strides = (size[1] * size[2], size[2], 1)

    inside = None
    if padding == "zeros":
        inside = torch.ones(pos.shape[1], dtype=torch.bool, device=pos.device)
        for a in range(3):
            inside &= (pos[a] >= 0) & (pos[a] <= size[a] - 1)
    # clamping never changes a sample that counts: inside positions are unchanged, outside ones are zeroed
    pos = torch.stack([pos[a].clamp(0, size[a] - 1) for a in range(3)])

    if order == 0:
        idx = torch.floor(pos + 0.5).to(torch.int64)
        lin = idx[0] * strides[0] + idx[1] * strides[1] + idx[2]
        out = flat[:, lin]
        if inside is not None:
            out = out * inside.to(out.dtype)
        return out.reshape(n_ch, *out_shape)[0] if squeeze else out.reshape(n_ch, *out_shape)

    work_dtype = vol.dtype if vol.dtype.is_floating_point else torch.float32
    flat = flat.to(work_dtype)
    out = _trilinear(flat, pos.to(work_dtype), size, strides, inside).reshape(n_ch, *out_shape)
    return out[0] if squeeze else out


def _trilinear(flat: Any, pos: Any, size: Any, strides: tuple, inside: Any) -> Any:
    """Trilinear interpolation of ``flat`` (C, N_voxels) at clamped voxel positions ``pos`` (3, P)."""
    torch = _torch()
    work_dtype = flat.dtype
    vol_device = flat.device
    # lower corner clamped to [0, S - 2] so the upper corner is always on the grid; at the last voxel this
    # gives frac = 1, i.e. all weight on the upper corner. Weights of 0 and 1 are exact, so integer positions
    # return the stored values bit for bit.
    base = torch.zeros(pos.shape[1], dtype=torch.int64, device=vol_device)
    weights = []
    offsets = []
    for a in range(3):
        lo = torch.floor(pos[a]).clamp(0, max(size[a] - 2, 0))
        frac = pos[a] - lo
        base += lo.to(torch.int64) * strides[a]
        weights.append((1 - frac, frac))
        offsets.append((0, strides[a] if size[a] > 1 else 0))
    if inside is not None:
        mask = inside.to(work_dtype)
        weights[0] = (weights[0][0] * mask, weights[0][1] * mask)
    out = torch.zeros(flat.shape[0], pos.shape[1], dtype=work_dtype, device=vol_device)
    for b0 in (0, 1):
        for b1 in (0, 1):
            w01 = weights[0][b0] * weights[1][b1]
            off01 = offsets[0][b0] + offsets[1][b1]
            for b2 in (0, 1):
                out += flat[:, base + (off01 + offsets[2][b2])] * (w01 * weights[2][b2])
    return out


def sample_grid_sample(values: Any, coords_vox: Any, *, order: int = 1, padding: Padding = "border",
                       align_corners: bool = True) -> Any:
    """The same as :func:`sample` through ``torch.nn.functional.grid_sample`` (differentiable, fast on CUDA).

    Voxel coordinates become normalised ones here and nowhere else. With ``align_corners=True`` voxel
    centres map exactly to the normalised corners, which is what voxel coordinates mean; ``False`` is accepted
    for completeness and gives the same result because the conversion accounts for it."""
    torch = _torch()
    squeeze = values.ndim == 3
    vol = (values[None] if squeeze else values)[None]
    if not vol.dtype.is_floating_point:
        vol = vol.float()
    grid = vox_to_normalised(coords_vox.to(vol.dtype), vol.shape[2:], align_corners=align_corners)
    grid = grid.reshape(1, *coords_vox.shape[1:], 3) if coords_vox.ndim == 4 else grid.reshape(1, 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(
        vol, grid, mode="bilinear" if order == 1 else "nearest", padding_mode=padding, align_corners=align_corners
    )[0]
    out = out.reshape(out.shape[0], *coords_vox.shape[1:])
    return out[0] if squeeze else out


def _check_pair(moving_shape: tuple, disp: Any, name: str) -> None:
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(f"{name}: expected a displacement field (3, X, Y, Z) in voxels, got {tuple(disp.shape)}")
    if len(moving_shape) not in (3, 4):
        raise InputError(f"{name}: moving must be (X, Y, Z) or (C, X, Y, Z), got {tuple(moving_shape)}")


def _warp(moving: Any, disp_vox: Any, *, order: int, padding: Padding, device: Any, fast: bool = False) -> Any:
    torch = _torch()
    is_numpy = not isinstance(moving, torch.Tensor)
    mov = _to_tensor(moving, device)
    disp = _to_tensor(disp_vox, device)
    _check_pair(tuple(mov.shape), disp, "warp")
    if not disp.dtype.is_floating_point:
        disp = disp.float()
    grid = torch.as_tensor(identity_grid_vox(disp.shape[1:], dtype=np.float32), device=device, dtype=disp.dtype)
    if fast and order == 1 and padding == "border" and mov.dtype.is_floating_point:
        # the same values as `sample` to float rounding, ~3x cheaper on a CPU: torch's fused trilinear kernel
        out = sample_grid_sample(mov.to(disp.dtype), grid + disp, order=1, padding="border", align_corners=True)
    else:
        out = sample(mov, grid + disp, order=order, padding=padding)
    if order == 1 and mov.dtype.is_floating_point:
        out = out.to(mov.dtype)
    return out.cpu().numpy() if is_numpy else out


def warp_image(moving: Any, disp_vox: Any, *, padding: Padding = "border", device: Any = "cpu",
               fast: bool = False) -> Any:
    """Warp an intensity volume: ``warped(p) = moving(p + u(p))``, trilinear.

    Args:
        moving: ``(X', Y', Z')`` or ``(C, X', Y', Z')`` numpy array or torch tensor (any grid size).
        disp_vox: ``(3, X, Y, Z)`` displacement on the fixed grid, voxels of the moving grid's index space
            (for fixed and moving on the same grid, the usual case, simply voxels).
        padding: ``"border"`` (default) or ``"zeros"``.
        device: where to compute (``"cpu"`` or ``"cuda"``); numpy in -> numpy out.
        fast: with ``padding="border"``, interpolate with ``torch.nn.functional.grid_sample``
            (:func:`sample_grid_sample`): the same values to float rounding (largest difference 0.035 HU on a
            192 x 160 x 256 CT warped by a smooth field), about 3x cheaper on a 2-core CPU (0.26 s instead of
            0.8 s), but no longer exact for a zero or integer field (the normalised coordinates round).

    Returns:
        The warped volume on the fixed grid ``(X, Y, Z)`` (or ``(C, X, Y, Z)``), floating point.
    """
    return _warp(moving, disp_vox, order=1, padding=padding, device=device, fast=fast)


def warp_labels(moving: Any, disp_vox: Any, *, padding: Padding = "zeros", device: Any = "cpu") -> Any:
    """Warp a label map by nearest neighbour (dtype kept); outside the moving grid is background (0)."""
    return _warp(moving, disp_vox, order=0, padding=padding, device=device)


def compose(first: Any, second: Any) -> Any:
    """Composition of two pull fields on the same grid: ``w(p) = first(p) + second(p + first(p))``.

    Warping with ``w`` equals warping with ``second`` and then warping that result with ``first``; with
    ``first`` = fixed -> intermediate and ``second`` = intermediate -> moving, ``w`` is fixed -> moving."""
    torch = _torch()
    is_numpy = not isinstance(first, torch.Tensor)
    u = _to_tensor(first, "cpu" if is_numpy else first.device)
    v = _to_tensor(second, u.device, u.dtype)
    _check_pair(tuple(v.shape[1:]), u, "compose")
    if u.shape != v.shape:
        raise InputError(f"compose: fields must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    grid = torch.as_tensor(identity_grid_vox(u.shape[1:], dtype=np.float32), dtype=u.dtype, device=u.device)
    out = u + sample(v, grid + u, order=1, padding="border")
    return out.numpy() if is_numpy else out


def apply_affine_vox(matrix: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """The displacement field ``(3, X, Y, Z)`` of a voxel-space affine map ``p -> A p`` (4x4, fixed -> moving)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"apply_affine_vox: expected a 4x4 matrix, got {matrix.shape}")
    grid = identity_grid_vox(shape, dtype=np.float64)
    moved = np.einsum("ab,b...->a...", matrix[:3, :3], grid) + matrix[:3, 3].reshape(3, 1, 1, 1)
    return (moved - grid).astype(np.float32)
