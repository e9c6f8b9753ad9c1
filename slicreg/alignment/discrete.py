"""A discrete search for a displacement, coupled to its own smoothing (the engine's optional first step on a level).

Gradient descent on a similarity only sees the optimum it starts next to: a field that is wrong by more than the
features' reach (MIND-SSC at 8 mm: about a voxel) stays wrong. A discrete search does not have that limit. On
cells of ``pool`` x ``pool`` x ``pool`` level voxels it scores every whole-voxel displacement ``delta`` within
``+-radius`` level voxels per axis *on top of the current map*, then picks one displacement per cell by a coupled
minimisation that trades each cell's cost against agreement with its neighbours:

1. cost: ``C(c, delta)`` = the mean over the cell's fixed voxels ``y`` of ``|F(y) - W(y + delta)|^2 / channels``
   where ``F`` are the fixed features and ``W`` the moving features already warped by the current map (so
   ``W(y + delta)`` is the moving image at ``phi(y + delta)``: exact for a locally constant field). With weights
   (fields of view) the mean is weighted by ``w_f(y) w_m(y + delta)``; a displacement that takes more than half
   of a cell's weight outside the moving field of view gets the cell's worst cost, and a cell without fixed
   weight gets no preference (cost 0 for every ``delta``). The costs are divided by their mean contrast
   (mean over cells of mean minus minimum over ``delta``) so that the coupling weights below do not depend on
   the features' scale; a small ``|delta|^2`` term breaks ties towards the current map.
2. coupling: start from the per-cell minimum ``d``; then for each weight ``theta`` of ``couplings`` (increasing):
   ``v = smooth(d)`` (two box means of radius 1 over cells), ``d(c) = argmin_delta C(c, delta) + theta |delta -
   v(c)|^2``. A cell with a clear optimum keeps it; a cell with a flat or ambiguous cost follows its
   neighbours. Cells without fixed weight take the nearest cell's with data, before each smoothing (so that
   they neither pull their neighbours towards the current map nor stay at it). The result is ``smooth(d)``
   (sub-voxel, smooth).

This is the idea behind ConvexAdam's discrete step (Siebert, Hansen and Heinrich, 2021) written for this engine:
features on the level grid, a cell cost from shifted slices of one warped feature tensor (no per-displacement
resampling), fields of view as weights. Cost: ``(2 radius + 1)^3`` slices of ``channels x voxels`` each, e.g.
343 x 12 x ~75k at 8 mm (radius 3, the cohort's fields of view): ~0.3 s on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.alignment.similarity import box_filter
from slicreg.errors import InputError

__all__ = ["COUPLINGS", "discrete_displacement", "displacement_offsets"]

COUPLINGS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
"""The coupling weights (per level voxel squared, costs divided by their mean contrast), increasing."""

_TIE = 1e-4  # the |delta|^2 tie-break, far below any contrast that matters
_CHUNK_VOXELS = 1 << 17  # voxels per slab of the cost pass (~0.5 MB per float buffer)


def displacement_offsets(radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every whole-voxel displacement within ``+-radius`` per axis, ``(K, 3)`` int64, K = (2 radius + 1)^3, in
    C order over (x, y, z) offsets from ``-radius``."""
    r = torch.arange(-int(radius), int(radius) + 1, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def _cells(shape: Sequence[int], pool: int) -> tuple[int, int, int]:
    return tuple(-(-int(n) // pool) for n in shape)  # ceil: a partial cell at the end counts


def _nearest_informative(informative: torch.Tensor) -> torch.Tensor | None:
    """For every cell the flat index of the nearest cell with data (``None``: all have data, or none has)."""
    if bool(informative.all()) or not bool(informative.any()):
        return None
    idx = torch.nonzero(informative)
    lo, hi = idx.amin(0), idx.amax(0)
    if int(idx.shape[0]) == int(torch.prod(hi - lo + 1)):
        # a box (the usual field of view): the nearest cell is the clamped one -- what the distance transform below
        # gives, without its cost
        axes = [torch.arange(n, device=informative.device).clamp(int(a), int(b))
                for n, a, b in zip(informative.shape, lo, hi)]
        grid = torch.meshgrid(*axes, indexing="ij")
        return ((grid[0] * informative.shape[1] + grid[1]) * informative.shape[2] + grid[2]).reshape(-1)
    from scipy.ndimage import distance_transform_edt

    idx = distance_transform_edt(~informative.cpu().numpy(), return_distances=False, return_indices=True)
    flat = np.ravel_multi_index(tuple(idx), informative.shape)
    return torch.from_numpy(flat.reshape(-1)).to(informative.device)


def discrete_displacement(fixed: torch.Tensor, warped: torch.Tensor, *, radius: int, pool: int = 2,
                          fixed_weight: torch.Tensor | None = None, warped_weight: torch.Tensor | None = None,
                          couplings: Sequence[float] = COUPLINGS) -> torch.Tensor:
    """The coupled discrete displacement of ``fixed`` against ``warped`` (see the module docstring).

    Args:
        fixed: ``(1, C, X, Y, Z)`` fixed features.
        warped: ``(1, C, X + 2 radius, Y + 2 radius, Z + 2 radius)``: the moving features warped by the current
            map at the fixed voxels ``-radius .. X - 1 + radius`` per axis (the fixed grid with a margin of
            ``radius``), so that ``warped[..., radius + i + dx, ...]`` is the moving image at ``phi(i + dx)``.
        radius: search range in voxels per axis (>= 1).
        pool: cell size in voxels per axis (>= 1): one displacement per cell.
        fixed_weight: optional ``(1, 1, X, Y, Z)`` weights >= 0 of the fixed voxels (a field of view).
        warped_weight: optional weights ``(1, 1, *warped.shape[2:])`` of the warped voxels (the moving field of
            view carried by the current map).
        couplings: increasing coupling weights; ``()`` gives the smoothed per-cell minimum.

    Returns:
        ``(1, 3, X, Y, Z)`` float32 displacement in voxels (to add to the current map's displacement), the
        cells' result interpolated trilinearly to the voxels (``align_corners=False``: a cell's value at its
        centre).
    """
    radius, pool = int(radius), int(pool)
    if radius < 1 or pool < 1:
        raise InputError(f"discrete_displacement: radius and pool must be >= 1, got {radius}, {pool}")
    if fixed.ndim != 5 or fixed.shape[0] != 1:
        raise InputError(f"discrete_displacement: fixed must be (1, C, X, Y, Z), got {tuple(fixed.shape)}")
    shape = tuple(int(n) for n in fixed.shape[2:])
    want = (1, fixed.shape[1], *(n + 2 * radius for n in shape))
    if tuple(warped.shape) != want:
        raise InputError(f"discrete_displacement: warped must be {want} (the fixed grid + {radius} voxels on each "
                         f"side), got {tuple(warped.shape)}")
    device = fixed.device
    cells = _cells(shape, pool)
    # pad the fixed side to whole cells (weight 0 in the padding) and the warped side to match, once: the cell
    # sums are then reshapes, not pooling calls, in the loop below
    extra = [c * pool - n for c, n in zip(cells, shape)]
    pad = [v for e in reversed(extra) for v in (0, e)]
    wf = torch.ones((1, 1, *shape), device=device) if fixed_weight is None else fixed_weight.float()
    fixed_p, wf_p = F.pad(fixed.float(), pad)[0], F.pad(wf, pad)[0, 0]
    warped_p = F.pad(warped.float(), pad)[0]
    wm_p = None if warped_weight is None else F.pad(warped_weight.float(), pad)[0, 0]
    full = tuple(c * pool for c in cells)

    def cell_sum(x: torch.Tensor) -> torch.Tensor:  # (..., X', Y', Z') -> (..., cells) by strided additions
        for axis in (-1, -2, -3):
            dim = x.ndim + axis
            parts = [x.narrow(dim, j, x.shape[dim] - j)[(slice(None),) * dim + (slice(None, None, pool),)]
                     for j in range(pool)]
            x = torch.stack(parts).sum(0) if pool > 2 else (parts[0] + parts[1] if pool == 2 else parts[0])
        return x

    side = 2 * radius + 1

    def z_shifts(x: torch.Tensor) -> torch.Tensor:
        """``(..., X', Y', full_z + 2 radius)`` -> ``(side, ..., X', Y', full_z)``: the ``side`` shifts along the last
        axis as one view (no copy), so that one operation covers every z offset of a displacement's (x, y)."""
        return x.as_strided((side, *x.shape[:-1], full[2]), (x.stride(-1), *x.stride()), x.storage_offset())

    offsets = displacement_offsets(radius, device)
    channels = float(fixed.shape[1])
    wf_cells = cell_sum(wf_p)
    weighted = fixed_weight is not None or wm_p is not None or any(extra)  # the padding has weight 0
    cost = torch.empty((len(offsets), *cells), device=device)
    valid = torch.ones_like(cost, dtype=torch.bool)
    # slabs of whole cells along the first axis, ~_CHUNK_VOXELS fixed voxels each: every pass over a slab then
    # stays in the CPU's cache (the whole grid's buffers would not; ~1.7x faster, the same numbers)
    rows = max(pool, _CHUNK_VOXELS // (full[1] * full[2]) // pool * pool)
    # sum_c (F_c - W_c)^2 = |F|^2 + |W|^2 - 2 sum_c F_c W_c: the squared norms once, then one multiply-add per
    # channel and displacement (the difference and its square were two passes; ~1.15x faster, the same minima to
    # float rounding); the displacements that differ only along z in one operation each (``z_shifts``: a fifth of
    # the operations for radius 2, whose per-call overhead was a third of the pass)
    warped_z = z_shifts(warped_p)  # (side, C, X', Y', full_z)
    wsq_z = z_shifts(warped_p.square().sum(0))
    wm_z = None if wm_p is None else z_shifts(wm_p)
    fsq = fixed_p.square().sum(0)
    f2 = fixed_p * -2.0
    for x0 in range(0, full[0], rows):
        n = min(rows, full[0] - x0)
        c0, c1 = x0 // pool, (x0 + n) // pool
        f2_rows, fsq_rows = f2[:, x0: x0 + n], fsq[x0: x0 + n]
        wf_rows, wf_cells_rows = wf_p[x0: x0 + n], wf_cells[c0:c1]
        ssd = torch.empty((side, n, full[1], full[2]), device=device)
        for dx in range(side):
            for dy in range(side):
                k = (dx * side + dy) * side  # the first of this (dx, dy)'s displacements in ``offsets``' order
                cut = (slice(x0 + dx, x0 + dx + n), slice(dy, dy + full[1]))
                torch.add(fsq_rows, wsq_z[(slice(None), *cut)], out=ssd)
                for c in range(fixed_p.shape[0]):
                    ssd.addcmul_(f2_rows[c], warped_z[(slice(None), c, *cut)])
                if not weighted:
                    cost[k: k + side, c0:c1] = cell_sum(ssd)
                    continue
                w = wf_rows if wm_z is None else wf_rows * wm_z[(slice(None), *cut)]
                den = wf_cells_rows if wm_z is None else cell_sum(w)
                cost[k: k + side, c0:c1] = cell_sum(ssd.mul_(w)) / den.clamp_min(1e-12)
                if wm_z is not None:
                    valid[k: k + side, c0:c1] = den >= 0.5 * wf_cells_rows
    if not weighted:
        cost /= wf_cells
    cost /= channels
    informative = wf_cells > 0
    if not bool(valid.all()):  # (full scans: every displacement valid, every cell informative -- no passes)
        worst = torch.where(valid, cost, torch.zeros_like(cost)).amax(0)
        cost = torch.where(valid, cost, worst)
    if not bool(informative.all()):
        cost.mul_(informative)
    contrast = (cost.mean(0) - cost.amin(0))[informative]
    scale = float(contrast.mean()) if contrast.numel() and float(contrast.mean()) > 0 else 1.0
    off = offsets.float()  # (K, 3)
    cost = cost.reshape(len(offsets), -1).div_(scale).add_(_TIE * off.square().sum(1, keepdim=True))  # (K, n_cells)

    def smooth(d: torch.Tensor) -> torch.Tensor:  # (3, n_cells) -> (3, n_cells)
        return box_filter(box_filter(d.reshape(1, 3, *cells), 1), 1).reshape(3, -1)

    has_data = informative.reshape(1, -1).float()
    data_share = smooth(has_data.expand(3, -1)).clamp_min(1e-6)  # the same every round: once
    nearest = _nearest_informative(informative)

    def neighbours(d: torch.Tensor) -> torch.Tensor:  # the smoothed field of the cells with data, filled
        v = smooth(d * has_data) / data_share
        return v if nearest is None else v[:, nearest]

    # (min(0).indices: the first minimum, as argmin(0) gives it, and ~2.5x faster on CPU in this layout)
    d = off[cost.min(0).indices].T  # (3, n_cells)
    if nearest is not None:
        d = d[:, nearest]
    # |delta - v|^2 = |delta|^2 - 2 delta.v + |v|^2, the last term does not change the argmin: cost + theta (|delta|^2
    # - 2 delta.v) is one matrix product added to the cost, [delta, |delta|^2] @ [-2 theta v; theta] (one pass)
    off_sq = torch.cat([off, off.square().sum(1, keepdim=True)], dim=1)  # (K, 4)
    for theta in couplings:
        v = neighbours(d)
        rhs = torch.cat([-2.0 * float(theta) * v, torch.full_like(v[:1], float(theta))])  # (4, n_cells)
        d = off[torch.addmm(cost, off_sq, rhs).min(0).indices].T
    out = smooth(d if nearest is None else d[:, nearest]).reshape(1, 3, *cells)
    if pool == 1:
        return out
    # cell c covers voxels pool c .. pool c + pool - 1: the cells' grid spans pool * cells voxels (align_corners
    # False), of which the first ``shape`` are the fixed grid
    big = F.interpolate(out, size=tuple(pool * c for c in cells), mode="trilinear", align_corners=False)
    return big[:, :, : shape[0], : shape[1], : shape[2]].contiguous()
