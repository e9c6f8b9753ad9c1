"""The Adam kNN keypoint flow (SLIC-Reg step 3): feature MSE plus a kNN-graph diffusion penalty.

Displacements are ``(N, 3)`` in voxels of the supervoxel grid (sv voxels), fixed -> moving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np

from slicreg.errors import InputError
from slicreg.fields import sample
from slicreg.flow._common import (
    DEFAULTS,
    _as_tensor,
    _check_points,
    _is_tensor,
    _out,
    _torch,
)
from slicreg.flow.optim import Adam
from slicreg.flow.sampling import _GramSampler, to_channels_last

if TYPE_CHECKING:
    import torch

    from slicreg.flow._common import Array, Device

__all__ = ["adam_keypoint_flow", "knn_graph", "knn_penalty"]


def _read(feats_cl: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``feats_cl (X, Y, Z, C)`` at ``points (N, 3)`` -> ``(N, C)``: the one sampler's channels-last backend
    (trilinear, border; no copies, only transposed views)."""
    return sample(feats_cl.permute(3, 0, 1, 2), points.t(), interpolation="linear", padding="border",
                  backend="channels_last").t()


def knn_graph(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` nearest other points of every point.

    Args:
        points: ``(N, 3)`` floating torch tensor.
        k: neighbours per point, ``1 <= k < N``.

    Returns:
        ``(N, k)`` int64, nearest first (``topk``: deterministic for a given input and device).
    """
    torch = _torch()
    n = points.shape[0]
    if not 1 <= int(k) < n:
        raise InputError(f"k: expected 1 <= k < number of keypoints ({n}), got {k}")
    p = points.double()
    axes = [p[:, a].contiguous() for a in range(3)]
    out = []
    for start in range(0, n, 256):  # row blocks of squared distances, summed over the axes in order (x, y, z)
        diff = [c[start: start + 256, None] - c[None, :] for c in axes]
        d2 = diff[0].mul_(diff[0]).add_(diff[1].mul_(diff[1])).add_(diff[2].mul_(diff[2]))
        rows = torch.arange(d2.shape[0], device=p.device)
        d2[rows, rows + start] = float("inf")
        out.append(torch.topk(d2, int(k), dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def knn_penalty(knn: torch.Tensor, n: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The kNN-graph diffusion penalty as a function returning its value and gradient, by gathers only.

    ``P(d) = sum_i sum_{j in knn[i]} |d_i - d_j|^2 = trace(d^T L d)`` with the graph Laplacian
    ``L = diag(k + in-degree) - A - A^T``; its gradient is ``2 L d``. ``L d`` is computed with gathers over the
    neighbours and the reverse neighbours (no scatter-add, so deterministic also on CUDA, and no N x N matrix).

    Args:
        knn: ``(N, k)`` int64 neighbour indices (distinct per row, without the point itself).
        n: number of points N.

    Returns:
        ``penalty(d) -> (value, grad)`` for ``d (N, D)``: scalar tensor and ``(N, D)``.
    """
    torch = _torch()
    knn_np = knn.detach().cpu().numpy()
    k = knn_np.shape[1]
    src = np.repeat(np.arange(n), k)
    dst = knn_np.reshape(-1)
    order = np.argsort(dst, kind="stable")
    in_deg = np.bincount(dst, minlength=n)
    width = max(1, int(in_deg.max()))
    rev = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width), np.float32)
    slot = np.arange(len(dst)) - np.repeat(np.cumsum(in_deg) - in_deg, in_deg)
    rev[dst[order], slot] = src[order]
    mask[dst[order], slot] = 1.0
    dev = knn.device
    rev_t, mask_t = torch.from_numpy(rev).to(dev), torch.from_numpy(mask).to(dev)
    deg = torch.from_numpy((k + in_deg).astype(np.float32)).to(dev)

    def penalty(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lap_d = deg[:, None] * d - d[knn].sum(dim=1) - (d[rev_t] * mask_t[..., None]).sum(dim=1)
        return (d * lap_d).sum(), 2.0 * lap_d

    return penalty


def adam_keypoint_flow(fixed_feats: Array, moving_feats: Array, points_vox: Array, *, feature_stride: int = 2,
                       k: int = DEFAULTS["k"], alpha: float = DEFAULTS["alpha"], lr: float = DEFAULTS["lr"],
                       iterations: int = DEFAULTS["iterations"], init_disp: Array | None = None,
                       patience: int = DEFAULTS["patience"], tol: float = DEFAULTS["tol"],
                       device: Device = "cpu", gradient: Literal["gram", "autograd"] = "gram"
                       ) -> tuple[Array, dict]:
    """Keypoint displacements by Adam on feature MSE + kNN-graph diffusion (SLIC-Reg's optimisation).

    Minimises over the displacements ``d (N, 3)`` (initialised at 0)::

        mean_{i, c} (M_c((p_i + d_i) / s) - F_c(p_i / s))^2  +  alpha / N * sum_i sum_{j in kNN(i)} |d_i - d_j|^2

    with ``F``, ``M`` the fixed and moving features (sampled trilinearly, border-clamped, by
    :func:`slicreg.fields.sample`, ``backend="channels_last"``) and ``s = feature_stride``; the kNN graph is
    built on the fixed keypoints.

    Args:
        fixed_feats, moving_feats: ``(C, X', Y', Z')`` features of :func:`supervoxel_features` (same shape).
        points_vox: ``(N, 3)`` keypoints in voxels of the supervoxel grid (sv voxels).
        feature_stride: feature voxel ``o`` sits at supervoxel-grid voxel ``feature_stride * o`` (2 for the
            default pooling).
        k: neighbours in the kNN graph.
        alpha: weight of the diffusion penalty, for displacements in sv voxels.
        lr: Adam learning rate, in sv voxels.
        iterations: Adam steps.
        init_disp: ``(N, 3)`` starting displacements in sv voxels (default None: zeros, as the reference);
            see :func:`centre_matching_init`.
        patience, tol: early stop: after at least ``patience`` iterations, end when the lowest loss of the last
            ``patience`` iterations is not below ``(1 - tol)`` times the lowest loss before them (default
            ``patience=0``: run all ``iterations``, as the reference). The loss is read every iteration anyway.
        device: where to compute.
        gradient: how the MSE and its gradient are computed each iteration. ``"gram"`` (default): from per-point
            8 x 8 Gram matrices of the corner features' differences to the target, recomputed only for points that
            changed cell (:class:`_GramSampler`); ``"autograd"``:
            the channels-last sampler and autograd in float32 (the previous path). The same function; the
            two differ by float32 rounding, which Adam carries along: on the cohort pair of
            ``benchmarks/bench_register.py`` the keypoint displacements differ by at most ~1e-3 sv voxels and
            both stop after the same number of iterations (tests/test_flow.py checks < 0.02 on synthetic maps).

    Returns:
        ``(disp, info)``: ``disp (N, 3)`` float32 in sv voxels (fixed -> moving), same type as ``points_vox``;
        ``info`` with ``"loss"`` (per iteration run, before the step), ``"mse"`` and ``"penalty"`` of the final
        displacements, ``"knn"`` ``(N, k)``, ``"iterations_run"``, ``"gram_updates"`` (Gram matrices computed;
        0 for ``"autograd"``).
    """
    torch = _torch()
    numpy_out = not _is_tensor(points_vox)
    fix = _as_tensor(fixed_feats, "fixed_feats", device)
    mov = _as_tensor(moving_feats, "moving_feats", device)
    pts = _as_tensor(points_vox, "points_vox", device)
    if fix.ndim != 4 or fix.shape != mov.shape or not fix.dtype.is_floating_point:
        raise InputError(f"fixed_feats, moving_feats: expected floating (C, X, Y, Z) features of equal shape, "
                         f"got {tuple(fix.shape)} {fix.dtype} and {tuple(mov.shape)} {mov.dtype}")
    _check_points(pts, "points_vox")
    if int(iterations) < 0 or not float(lr) > 0 or not float(alpha) >= 0 or int(feature_stride) < 1 \
            or int(patience) < 0 or not 0 <= float(tol) < 1:
        raise InputError(f"expected iterations >= 0, lr > 0, alpha >= 0, feature_stride >= 1, patience >= 0, "
                         f"0 <= tol < 1, got {iterations}, {lr}, {alpha}, {feature_stride}, {patience}, {tol}")
    if gradient not in ("gram", "autograd"):
        raise InputError(f"gradient: expected 'gram' or 'autograd', got {gradient!r}")
    fix, mov, pts = fix.float(), mov.float(), pts.float()
    scale = 1.0 / int(feature_stride)
    fixed_cl = to_channels_last(fix)
    moving_cl = to_channels_last(mov)
    del fix, mov
    knn = knn_graph(pts, k)
    with torch.no_grad():
        target = _read(fixed_cl, pts * scale)
        if gradient == "gram":  # float64 samples for _GramSampler (the float32 ones for the reported "mse")
            target64 = _GramSampler(fixed_cl).sample(pts * scale)
    del fixed_cl
    n = pts.shape[0]
    if init_disp is None:
        disp = torch.zeros_like(pts)
    else:
        disp = _as_tensor(init_disp, "init_disp", pts.device).float().clone()
        if disp.shape != pts.shape or not bool(torch.isfinite(disp).all()):
            raise InputError(f"init_disp: expected finite (N, 3) = {tuple(pts.shape)}, got {tuple(disp.shape)}")
    use_autograd = gradient == "autograd"
    disp.requires_grad_(use_autograd)
    opt = Adam(disp, lr=float(lr))

    graph_penalty = knn_penalty(knn, n)
    sampler = None if use_autograd else _GramSampler(moving_cl, target64)

    def mse_of(d: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(_read(moving_cl, (pts + d) * scale), target)

    losses = torch.zeros(int(iterations), dtype=torch.float32, device=pts.device)
    wait, run = int(patience), int(iterations)
    for it in range(int(iterations)):
        if use_autograd:
            disp.grad = None
            mse = mse_of(disp)
            mse.backward()
            grad = disp.grad
        else:
            with torch.no_grad():
                mse, grad_pos = sampler((pts + disp) * scale)
                grad = (grad_pos * scale).float()
        with torch.no_grad():  # the penalty's gradient is added by hand (see knn_penalty)
            pen, pen_grad = graph_penalty(disp)
            grad.add_(pen_grad, alpha=float(alpha) / n)
            losses[it] = mse.detach().float() + float(alpha) * pen / n
        if wait and it >= 2 * wait and it % wait == 0:  # (a host sync only every `patience` iterations)
            recent, before = float(losses[it - wait + 1: it + 1].min()), float(losses[: it - wait + 1].min())
            if recent > (1.0 - float(tol)) * before:
                run = it + 1
                break
        opt.step(grad)
    with torch.no_grad():
        mse = mse_of(disp)
        penalty = graph_penalty(disp)[0] / n
    info = {
        "loss": [float(v) for v in losses[:run].cpu()],
        "iterations_run": run,
        "mse": float(mse),
        "penalty": float(penalty),
        "knn": _out(knn, numpy_out),
        "gram_updates": 0 if sampler is None else sampler.updated,
    }
    return _out(disp.detach(), numpy_out), info
