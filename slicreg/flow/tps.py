"""The regularised thin-plate spline with an affine part, and the dense field built from it (SLIC-Reg step 4).

Points, values and fields are in voxels of the output (fine) grid; fields are ``(3, X, Y, Z)`` float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from slicreg.errors import InputError
from slicreg.fields import sample_affine
from slicreg.flow._common import (
    DEFAULTS,
    Kernel,
    _as_tensor,
    _check_points,
    _check_shape3,
    _is_tensor,
    _out,
    _torch,
)

if TYPE_CHECKING:
    import torch

    from slicreg.flow._common import Array, Device

__all__ = ["ThinPlateSpline", "tps_dense_field", "tps_evaluate", "tps_fit"]


def _phi_from_sq(d2: torch.Tensor, kernel: str) -> torch.Tensor:
    """Radial kernel of squared distances, in place, signed so that it is conditionally positive definite.

    ``"r"``: ``-r``, the 3-D biharmonic kernel (``|x|`` is the Green's function of the squared Laplacian in
    3-D up to a negative factor); ``"r2logr"``: ``r^2 log r = d2 log(d2) / 2`` (0 at r = 0), the 2-D thin-plate
    kernel the reference used. The sign does not change the interpolant, only makes ``lam >= 0`` smooth.
    ``d2`` is overwritten."""
    d2.clamp_(min=0.0)
    if kernel == "r":
        return d2.sqrt_().neg_()
    return d2.mul_(d2.clamp(min=1e-300).log_()).mul_(0.5)


@dataclass(frozen=True)
class ThinPlateSpline:
    """A fitted thin-plate spline ``f(x) = sum_i w_i phi(|x - c_i|) + A [x - o; 1]`` (see :func:`tps_fit`).

    Attributes:
        centres: ``(N, 3)`` float64 tensor, the fitted points (voxels).
        weights: ``(N, D)`` float64 radial weights.
        affine: ``(4, D)`` float64 coefficients of ``[x - origin, 1]``.
        origin: ``(3,)`` float64 centroid of the centres (conditioning of the affine part).
        kernel: ``"r"`` or ``"r2logr"``.
    """

    centres: torch.Tensor
    weights: torch.Tensor
    affine: torch.Tensor
    origin: torch.Tensor
    kernel: str


def tps_fit(points: Array, values: Array, *, kernel: Kernel = DEFAULTS["kernel"], lam: float = DEFAULTS["lam"],
            device: Device = "cpu") -> ThinPlateSpline:
    """Fit a regularised thin-plate spline with an affine part, by ``torch.linalg.solve`` in float64.

    Solves ``[[Phi + lam I, P], [P^T, 0]] [w; a] = [v; 0]`` with ``Phi_ij = phi(|x_i - x_j|)`` and
    ``P = [x - origin, 1]``. ``lam = 0`` interpolates; a larger ``lam`` trades fidelity at the points for
    smoothness (bending energy); as ``lam -> inf`` the fit tends to the least-squares affine map, which is
    also reproduced exactly for any ``lam`` when the values are affine in the points.

    Args:
        points: ``(N, 3)`` positions (any isotropic unit; voxels of the fine grid in :func:`tps_dense_field`).
        values: ``(N, D)`` values at the points (displacements, ``D = 3``).
        kernel: ``"r"`` (3-D biharmonic, default) or ``"r2logr"`` (the reference's 2-D kernel).
        lam: regularisation >= 0, in the units of ``phi`` (for ``"r"``: the unit of ``points``).
        device: where to solve.

    Returns:
        A :class:`ThinPlateSpline` with float64 tensors on ``device``.

    Raises:
        InputError: bad shapes, fewer than 4 points, or a singular system (e.g. coplanar points, or duplicate
            points with ``lam = 0``).
    """
    torch = _torch()
    pts = _as_tensor(points, "points", device)
    val = _as_tensor(values, "values", device)
    _check_points(pts, "points")
    if kernel not in ("r", "r2logr"):
        raise InputError(f"kernel: expected 'r' or 'r2logr', got {kernel!r}")
    if val.ndim != 2 or val.shape[0] != pts.shape[0] or not val.dtype.is_floating_point:
        raise InputError(f"values: expected floating (N, D) with N = {pts.shape[0]}, got {tuple(val.shape)}")
    if pts.shape[0] < 4:
        raise InputError(f"points: a 3-D spline with an affine part needs >= 4 points, got {pts.shape[0]}")
    if not float(lam) >= 0:
        raise InputError(f"lam: expected >= 0, got {lam}")
    pts, val = pts.double(), val.double()
    n, d = val.shape
    origin = pts.mean(dim=0)
    x = pts - origin
    phi = _phi_from_sq(torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square_(), kernel)
    phi.diagonal().add_(float(lam))
    poly = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    system = torch.zeros(n + 4, n + 4, dtype=x.dtype, device=x.device)
    system[:n, :n] = phi
    system[:n, n:] = poly
    system[n:, :n] = poly.t()
    rhs = torch.cat([val, torch.zeros(4, d, dtype=x.dtype, device=x.device)])
    try:
        sol = torch.linalg.solve(system, rhs)
    except RuntimeError as exc:  # torch raises a LinAlgError (a RuntimeError) for singular systems
        raise InputError(f"tps_fit: singular system ({exc}); points coplanar or duplicated with lam = 0?") from exc
    if not bool(torch.isfinite(sol).all()):
        raise InputError("tps_fit: the solution is not finite (ill-conditioned points)")
    return ThinPlateSpline(centres=pts, weights=sol[:n], affine=sol[n:], origin=origin, kernel=kernel)


def tps_evaluate(tps: ThinPlateSpline, points: Array, *, chunk: int = 1024, fast: bool = False) -> torch.Tensor:
    """Evaluate a :class:`ThinPlateSpline` at ``points (M, 3)`` -> ``(M, D)`` float64 torch tensor.

    Squared distances come from one matrix product per chunk, ``[x, |x|^2, 1] . [-2 c, 1, |c|^2]`` (float64:
    ~1e-11 absolute error), and the kernel is applied in place. With ``fast=True`` and the kernel ``"r"``, the
    square root and the weighted sum run in float32 (about half the time; the squared distances are exact before
    the cast, so the result differs from the float64 evaluation by ~1e-5: noise for a float32 field, which is
    what :func:`tps_dense_field` makes). Chunks of ``chunk`` points (``chunk x N`` float64, ~16 MB for the
    default with N = 2032) stay small enough for the allocator to reuse them."""
    torch = _torch()
    pts = _as_tensor(points, "points", tps.centres.device).double()
    _check_points(pts, "points")
    c = tps.centres - tps.origin
    right = torch.cat([-2.0 * c, torch.ones_like(c[:, :1]), (c * c).sum(dim=1, keepdim=True)], dim=1).t()
    single = bool(fast) and tps.kernel == "r"
    weights = -tps.weights if tps.kernel == "r" else tps.weights  # phi = -r: fold the sign into the weights
    if single:
        weights = weights.float()
    out = []
    for start in range(0, pts.shape[0], int(chunk)):
        x = pts[start: start + int(chunk)] - tps.origin
        left = torch.cat([x, (x * x).sum(dim=1, keepdim=True), torch.ones_like(x[:, :1])], dim=1)
        d2 = (left @ right).clamp_(min=0.0)
        if tps.kernel == "r":
            radial = d2.float().sqrt_() if single else d2.sqrt_()
        else:
            radial = _phi_from_sq(d2, tps.kernel)
        out.append(torch.addmm(tps.affine[3], x, tps.affine[:3]).add_(radial @ weights))
    return torch.cat(out)


def _tps_grid_r(tps: ThinPlateSpline, axes: Sequence[torch.Tensor], *, block: int = 8) -> torch.Tensor:
    """A kernel-``"r"`` spline on the grid ``axes[0] x axes[1] x axes[2]`` -> ``(m0, m1, m2, D)`` float32.

    The squared distance from grid node ``(i, j, l)`` to centre ``c`` is ``T0[i, c] + T1[j, c] + T2[l, c]`` with
    per-axis tables ``T_a = (axis_a - c_a)^2`` (float64, rounded to float32), so a block of nodes needs one
    broadcast addition, a square root and one matrix product -- no per-node coordinates, no float64 pass over the
    nodes x centres matrix. The affine part is separable too (float64). Relative to :func:`tps_evaluate` with
    ``fast=True`` the squared distances carry two more float32 roundings (~1e-7 relative); the field differs by
    ~1e-5 voxels (tested)."""
    torch = _torch()
    c = tps.centres
    tables = [((ax[:, None] - c[None, :, a]) ** 2).float() for a, ax in enumerate(axes)]  # (m_a, N)
    lin = [(ax - tps.origin[a])[:, None] * tps.affine[a][None, :] for a, ax in enumerate(axes)]  # (m_a, D)
    m0, m1, m2 = (int(ax.shape[0]) for ax in axes)
    n, d = tps.weights.shape
    weights = (-tps.weights).float()  # phi = -r: the sign folded into the weights
    radial = torch.empty(m0, m1, m2, d, dtype=torch.float32, device=c.device)
    buf = torch.empty(block, m2, n, dtype=torch.float32, device=c.device)
    for i in range(m0):
        for j0 in range(0, m1, block):
            j1 = min(m1, j0 + block)
            d2 = buf[: j1 - j0]
            torch.add((tables[0][i][None, :] + tables[1][j0:j1])[:, None, :], tables[2][None], out=d2)
            radial[i, j0:j1] = (d2.sqrt_().reshape(-1, n) @ weights).reshape(j1 - j0, m2, d)
    affine = tps.affine[3] + lin[0][:, None, None, :] + lin[1][None, :, None, :] + lin[2][None, None, :, :]
    return (affine + radial).float()


def _upsample_separable(coarse: torch.Tensor, step: int, shape: Sequence[int]) -> torch.Tensor:
    """``(D, m0, m1, m2)`` node values -> ``(D, X, Y, Z)``, voxel ``i`` at node position ``i / step`` per axis.

    Trilinear interpolation (``interpolate(..., align_corners=True)`` on the grid of ``step * (m - 1) + 1``
    voxels, cropped to ``shape``) as three matrix products with the per-axis weights: the one sampler's separable
    backend (:func:`slicreg.fields.sample_affine`); equal to it up to float32 rounding (tested)."""
    index_map = np.diag([1.0 / int(step)] * 3 + [1.0])
    return sample_affine(coarse, index_map, tuple(int(n) for n in shape), backend="separable")


def tps_dense_field(points_vox: Array, disp_vox: Array, shape: Sequence[int], *,
                    kernel: Kernel = DEFAULTS["kernel"], lam: float = DEFAULTS["lam"], step: int = DEFAULTS["step"],
                    device: Device = "cpu", evaluation: Literal["grid", "points"] = "grid") -> Array:
    """A dense displacement field from scattered displacements: TPS on a coarse grid, trilinear upsampling.

    The spline (:func:`tps_fit`) is evaluated at the voxels ``step * q`` (q = 0, 1, ..., up to the first node
    at or beyond the last voxel) and interpolated trilinearly in between, so voxel ``i`` takes the value at
    coarse position ``i / step`` (``step = 1`` evaluates every voxel).

    Args:
        points_vox: ``(N, 3)`` positions in voxels of the output grid.
        disp_vox: ``(N, 3)`` displacements at those points, voxels of the output grid.
        shape: output grid ``(X, Y, Z)``.
        kernel: ``"r"`` (default) or ``"r2logr"``.
        lam: regularisation (see :func:`tps_fit`).
        step: coarse-grid step in voxels (default 5, as the reference).
        device: where to compute.
        evaluation: ``"grid"`` (default): for kernel ``"r"``, separable squared distances on the grid nodes
            (:func:`_tps_grid_r`) and the upsampling as three matrix products (:func:`_upsample_separable`);
            ``"points"``: :func:`tps_evaluate` (``fast=True``) at every node and ``interpolate`` (the previous
            path; always used for ``"r2logr"``). The two agree to ~1e-5 voxels (tested: < 1e-3).

    Returns:
        ``(3, X, Y, Z)`` float32 field in voxels, same type as ``disp_vox`` (numpy in -> numpy out).
    """
    torch = _torch()
    numpy_out = not _is_tensor(disp_vox)
    shape = _check_shape3(shape, "shape")
    if int(step) < 1:
        raise InputError(f"step: expected an integer >= 1, got {step}")
    pts = _as_tensor(points_vox, "points_vox", device)
    dsp = _as_tensor(disp_vox, "disp_vox", device)
    if dsp.ndim != 2 or dsp.shape[1] != 3:
        raise InputError(f"disp_vox: expected (N, 3), got {tuple(dsp.shape)}")
    if evaluation not in ("grid", "points"):
        raise InputError(f"evaluation: expected 'grid' or 'points', got {evaluation!r}")
    tps = tps_fit(pts, dsp, kernel=kernel, lam=lam, device=device)
    step = int(step)
    nodes = [math.ceil((s - 1) / step) + 1 for s in shape]
    axes = [torch.arange(m, dtype=torch.float64, device=pts.device) * step for m in nodes]
    if evaluation == "grid" and tps.kernel == "r":
        coarse = _tps_grid_r(tps, axes).permute(3, 0, 1, 2)  # (3, m0, m1, m2)
        field = _upsample_separable(coarse.contiguous(), step, shape) if step > 1 else coarse.contiguous()
        return _out(field, numpy_out)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    coarse = tps_evaluate(tps, grid, fast=True).float().t().reshape(1, 3, *nodes)
    if step > 1:
        full = [step * (m - 1) + 1 for m in nodes]
        coarse = torch.nn.functional.interpolate(coarse, size=full, mode="trilinear", align_corners=True)
    field = coarse[0, :, : shape[0], : shape[1], : shape[2]].contiguous()
    return _out(field, numpy_out)
