"""SLIC-Reg inference from supervoxel maps to a dense field: keypoints -> features -> Adam flow -> spline.

:func:`supervoxel_flow` chains :mod:`slicreg.flow.keypoints`, :mod:`slicreg.flow.features`,
:mod:`slicreg.flow.keypoint_flow` and :mod:`slicreg.flow.tps`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from slicreg.errors import InputError
from slicreg.flow._common import (
    DEFAULTS,
    Kernel,
    _as_tensor,
    _check_labels,
    _check_probabilities,
    _is_tensor,
    _out,
    _torch,
)
from slicreg.flow.features import supervoxel_features
from slicreg.flow.keypoint_flow import adam_keypoint_flow
from slicreg.flow.keypoints import (
    _match_init,
    coarse_to_fine_vox,
    content_offset,
    foreground_keypoints,
    supervoxel_centres,
    upsample_labels,
)
from slicreg.flow.rejection import confidence_at, keep_mask, keypoint_residuals, layer_spread
from slicreg.flow.tps import tps_dense_field

if TYPE_CHECKING:
    import torch

    from slicreg.flow._common import Array, Device

__all__ = ["supervoxel_flow"]


def _prepare_sv(sv: Array, name: str, prob_upsample: int, label_upsample: int,
                device: Device) -> tuple[torch.Tensor, bool, tuple[int, int, int]]:
    """Tensor, is_labels, supervoxel-grid shape (after upsampling probabilities or labels)."""
    x = _as_tensor(sv, name, device)
    if x.dtype.is_floating_point:
        _check_probabilities(x, name)
        return x, False, tuple(int(s) * int(prob_upsample) for s in x.shape[2:])  # type: ignore[return-value]
    _check_labels(x, name)
    return x, True, tuple(int(s) * int(label_upsample) for s in x.shape[1:])  # type: ignore[return-value]


def _label_factors(label_upsample: int | Sequence[int]) -> tuple[int, int]:
    """``label_upsample`` of :func:`supervoxel_flow` -> (fixed, moving) integer factors >= 1."""
    try:
        pair = (label_upsample, label_upsample) if np.ndim(label_upsample) == 0 else tuple(label_upsample)
        out = tuple(int(v) for v in pair)
    except (TypeError, ValueError) as exc:
        raise InputError(f"label_upsample: expected an integer or a (fixed, moving) pair, got {label_upsample!r}"
                         ) from exc
    if len(out) != 2 or min(out) < 1:
        raise InputError(f"label_upsample: expected integers >= 1 (one, or one per side), got {label_upsample!r}")
    return out  # type: ignore[return-value]


def _argmax_labels(prob: torch.Tensor) -> torch.Tensor:
    """``(L, 128, X, Y, Z)`` probabilities -> ``(L, X, Y, Z)`` uint8 argmax, one layer at a time."""
    torch = _torch()
    return torch.stack([p.argmax(dim=0).to(torch.uint8) for p in prob])


def supervoxel_flow(fixed_sv: Array, moving_sv: Array, *, keypoints: Literal["centres", "random"] = "centres",
                    seed: int = 0, n_random: int = DEFAULTS["n_random"], min_voxels: int = 1,
                    n_channels: int = DEFAULTS["n_channels"],
                    include_background: bool = DEFAULTS["include_background"], prob_upsample: int = 1,
                    init: Literal["zero", "centres"] = "zero", n_init_neighbours: int = 16,
                    k: int = DEFAULTS["k"], alpha: float = DEFAULTS["alpha"], lr: float = DEFAULTS["lr"],
                    iterations: int = DEFAULTS["iterations"], patience: int = DEFAULTS["patience"],
                    tol: float = DEFAULTS["tol"], kernel: Kernel = DEFAULTS["kernel"],
                    lam: float = DEFAULTS["lam"], step: int = DEFAULTS["step"], factor: int = DEFAULTS["factor"],
                    device: Device = "cpu", label_upsample: int | Sequence[int] = 1,
                    gradient: Literal["gram", "autograd"] = "gram",
                    evaluation: Literal["grid", "points"] = "grid", fixed_features: Array | None = None,
                    reject_spread: float | None = None, reject_confidence: float | None = None,
                    fixed_confidence: Array | None = None, reject_residual: float | None = None,
                    min_keypoints: int = 64) -> tuple[Array, dict]:
    """Displacement field between two scans from their supervoxel maps (SLIC-Reg inference, docs/method.md section 7).

    Keypoints on the fixed maps -> features of both -> Adam kNN flow -> TPS on the fine grid.

    Args:
        fixed_sv, moving_sv: each either label maps ``(L, X, Y, Z)`` uint8 (0..127; standard: ``(16, 96, 80,
            128)`` at 4 mm) or probabilities ``(L, 128, X, Y, Z)`` float (softmax over the labels); the two may
            differ in kind but must give the same supervoxel grid and L. numpy or torch.
        keypoints: ``"centres"`` (default; supervoxel centres of the fixed maps, deterministic) or ``"random"``
            (``n_random`` seeded foreground voxels of layer 0 at stride 2). For fixed probabilities the
            keypoints come from their argmax.
        seed: seed of the label permutations and of random keypoints.
        n_random: number of random keypoints.
        min_voxels: smallest supervoxel whose centre is used.
        n_channels, include_background: feature compression (see :func:`supervoxel_features`).
        prob_upsample: probabilities are on a grid this many times coarser than the supervoxel grid (2 for the
            network's 48 x 40 x 64 output; label maps are always on the supervoxel grid).
        init: ``"zero"`` (default; the reference) or ``"centres"``: start Adam from corresponding supervoxel
            centres (:func:`centre_matching_init`, median over ``n_init_neighbours``) -- for misalignments
            beyond the flow's capture range (~15-25 sv voxels), e.g. without any pre-alignment.
        n_init_neighbours: supervoxels per median for ``init="centres"``.
        k, alpha, lr, iterations, patience, tol: the Adam flow (:func:`adam_keypoint_flow`; sv voxels; early stop
            off by default).
        kernel, lam, step: the dense field (:func:`tps_dense_field`; fine voxels).
        factor: fine grid = ``factor`` x supervoxel grid (2: 4 mm maps -> 2 mm field, 192 x 160 x 256).
        device: where to compute.
        label_upsample: label maps given on a grid this many times coarser than the supervoxel grid, to be
            nearest-upsampled (:func:`upsample_labels`; 2 for the network's stride-2 argmax ``(16, 48, 40, 64)``,
            whose 4 mm maps are :func:`slicreg.registration.upsample_labels_stride2` of it); one integer for both
            sides or ``(fixed, moving)`` (e.g. ``(2, 1)``: predicted fixed maps, the template's own 4 mm maps).
            Keypoints, the centre initialisation and the features are computed on the coarse maps -- bitwise the
            same as for the upsampled maps, with ~8x less work. Ignored for probabilities. Default 1.
        gradient: the Adam flow's MSE gradient (:func:`adam_keypoint_flow`; ``"gram"`` default).
        evaluation: the dense field's evaluation (:func:`tps_dense_field`; ``"grid"`` default).
            ``gradient="autograd", evaluation="points"`` with ``label_upsample=1`` on upsampled maps are the
            previous algorithms (benchmarks/bench_register.py ``--compare``).
        fixed_features: optional ``(L * n_channels, X', Y', Z')`` features of the fixed scan used instead of
            ``supervoxel_features(fixed_sv)`` (same shape as the moving features; e.g. from softmax probabilities
            or test-time augmented predictions, benchmarks/bench_init_levers.py); ``fixed_sv`` still gives the
            keypoints and the centre initialisation. Default None.
        reject_spread, reject_confidence, fixed_confidence, reject_residual, min_keypoints: optional keypoint
            rejection (:mod:`slicreg.flow.rejection`; all off by default): before the Adam flow, drop keypoints
            whose per-layer centre displacements spread more than ``reject_spread`` sv voxels
            (:func:`~slicreg.flow.rejection.layer_spread`) and keypoints whose confidence is below
            ``reject_confidence`` -- ``fixed_confidence`` is an ``(X, Y, Z)`` map on the grid of ``fixed_sv``
            (default for probabilities: the mean over the layers of the largest probability); after the flow,
            drop the fraction ``reject_residual`` (0..1) of keypoints with the largest feature residual before the
            spline. Never fewer than ``min_keypoints`` (nor ``k + 1``) keypoints remain (then the best-scored).

    Returns:
        ``(disp_vox, info)``: ``disp_vox (3, factor X, factor Y, factor Z)`` float32, displacement in voxels of
        the fine grid of the fixed scan, fixed -> moving (project convention); numpy if ``fixed_sv`` is numpy.
        ``info``: ``"keypoints_sv_vox"``/``"disp_sv_vox"`` ``(N, 3)`` (supervoxel grid),
        ``"keypoints_vox"``/``"disp_keypoints_vox"`` ``(N, 3)`` (fine grid), ``"keypoint_ids"`` ``(N, 2)``
        (layer, label) or None, ``"init_disp_sv_vox"`` or None, ``"loss"`` per iteration, ``"mse"``, ``"penalty"``,
        ``"timings_s"`` (wall) and ``"cpu_s"`` (process CPU time, all threads) per step,
        ``"params"`` (the resolved knobs), ``"rejected"`` (keypoints dropped per rejection option; the keypoint
        arrays above hold the kept ones).
    """
    numpy_out = not _is_tensor(fixed_sv)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if int(prob_upsample) < 1:
        raise InputError(f"prob_upsample: expected an integer >= 1, got {prob_upsample}")
    if keypoints not in ("centres", "random"):
        raise InputError(f"keypoints: expected 'centres' or 'random', got {keypoints!r}")
    if init not in ("zero", "centres"):
        raise InputError(f"init: expected 'zero' or 'centres', got {init!r}")
    if gradient not in ("gram", "autograd") or evaluation not in ("grid", "points"):
        raise InputError(f"gradient, evaluation: expected 'gram'/'autograd' and 'grid'/'points', got {gradient!r}, "
                         f"{evaluation!r}")
    if reject_residual is not None and not 0.0 <= float(reject_residual) < 1.0:
        raise InputError(f"reject_residual: expected a fraction in [0, 1), got {reject_residual}")
    lab_up_f, lab_up_m = _label_factors(label_upsample)
    fix, fix_is_labels, grid_f = _prepare_sv(fixed_sv, "fixed_sv", prob_upsample, lab_up_f, device)
    mov, mov_is_labels, grid_m = _prepare_sv(moving_sv, "moving_sv", prob_upsample, lab_up_m, device)
    if grid_f != grid_m or fix.shape[0] != mov.shape[0]:
        raise InputError(
            f"fixed_sv, moving_sv: expected the same layers and supervoxel grid, got {fix.shape[0]} layers on "
            f"{grid_f} and {mov.shape[0]} layers on {grid_m} (prob_upsample={prob_upsample}, "
            f"label_upsample={label_upsample})"
        )
    # label maps: centres on the upsampled grid directly (upsample=), probabilities: argmax on their own grid and
    # the linear upsampling's convention (coarse voxel q = fine voxel f q + (f - 1) / 2)
    up_f = lab_up_f if fix_is_labels else 1
    up_m = lab_up_m if mov_is_labels else 1
    # how many times coarser than the sv grid each side's maps are, whatever their kind
    coarse_f = lab_up_f if fix_is_labels else int(prob_upsample)
    coarse_m = lab_up_m if mov_is_labels else int(prob_upsample)

    # keypoints (supervoxel grid)
    kp_factor = 1 if fix_is_labels else int(prob_upsample)
    fix_labels = fix if fix_is_labels else _argmax_labels(fix)
    ids = None
    if keypoints == "centres":
        pts, ids = supervoxel_centres(fix_labels, min_voxels=min_voxels, device=device, upsample=up_f)
        fixed_centres = (pts, ids)
    else:
        fixed_centres = None
        pts = foreground_keypoints(upsample_labels(fix_labels, up_f) if up_f > 1 else fix_labels, n=n_random,
                                   seed=seed, device=device, stride=max(1, DEFAULTS["random_stride"] // kp_factor))
    pts = coarse_to_fine_vox(pts, factor=kp_factor)
    if pts.shape[0] <= int(k):
        raise InputError(f"fixed_sv: only {pts.shape[0]} keypoints found, need more than k = {k}")
    init_disp = None
    if init == "centres":
        cf, idf = fixed_centres or supervoxel_centres(fix_labels, min_voxels=min_voxels, device=device,
                                                      upsample=up_f)
        mov_labels = mov if mov_is_labels else _argmax_labels(mov)
        cm, idm = supervoxel_centres(mov_labels, min_voxels=min_voxels, device=device, upsample=up_m)
        del mov_labels
        init_disp = _match_init(coarse_to_fine_vox(cf, factor=kp_factor), idf,
                                coarse_to_fine_vox(cm, factor=1 if mov_is_labels else int(prob_upsample)), idm,
                                pts, int(n_init_neighbours), fix.shape[0])
    rejected: dict[str, int] = {}
    min_keep = max(int(min_keypoints), int(k) + 1)
    rule = "nearest" if fix_is_labels else "linear"  # how the fixed maps' grid relates to the sv grid

    def drop(keep: torch.Tensor, name: str) -> None:
        nonlocal pts, init_disp, ids
        rejected[name] = int((~keep).sum())
        pts = pts[keep]
        init_disp = None if init_disp is None else init_disp[keep]
        ids = None if ids is None else ids[keep]

    if reject_spread is not None:  # before the flow: the layers disagree on the displacement
        cf, idf = fixed_centres or supervoxel_centres(fix_labels, min_voxels=min_voxels, device=device,
                                                      upsample=up_f)
        if init != "centres":
            mov_labels = mov if mov_is_labels else _argmax_labels(mov)
            cm, idm = supervoxel_centres(mov_labels, min_voxels=min_voxels, device=device, upsample=up_m)
            del mov_labels
        spread = layer_spread(fix_labels, pts, (coarse_to_fine_vox(cf, factor=kp_factor), idf),
                              (coarse_to_fine_vox(cm, factor=1 if mov_is_labels else int(prob_upsample)), idm),
                              upsample=coarse_f, rule=rule)
        drop(keep_mask(spread, float(reject_spread), keep_above=False, min_keep=min_keep), "spread")
    if reject_confidence is not None:  # before the flow: the network is unsure there
        if fixed_confidence is not None:
            conf_map = _as_tensor(fixed_confidence, "fixed_confidence", pts.device)
        elif not fix_is_labels:
            conf_map = _torch().stack([p.max(dim=0).values.float() for p in fix]).mean(dim=0)
        else:
            raise InputError("reject_confidence: label maps need fixed_confidence (an (X, Y, Z) map on their grid)")
        conf = confidence_at(conf_map, pts, upsample=coarse_f, rule=rule)
        drop(keep_mask(conf, float(reject_confidence), keep_above=True, min_keep=min_keep), "confidence")
    timings["keypoints"], cpu["keypoints"] = time.perf_counter() - t0, time.process_time() - c0

    # features
    t1, c1 = time.perf_counter(), time.process_time()
    common = dict(seed=seed, n_channels=n_channels, include_background=include_background, device=device)
    m_feat = supervoxel_features(mov, upsample=coarse_m, **common)
    if fixed_features is None:
        f_feat = supervoxel_features(fix, upsample=coarse_f, **common)
    else:
        f_feat = _as_tensor(fixed_features, "fixed_features", device).float()
        if tuple(f_feat.shape) != tuple(m_feat.shape):
            raise InputError(f"fixed_features: expected the moving features' shape {tuple(m_feat.shape)}, got "
                             f"{tuple(f_feat.shape)}")
    del fix, mov, fix_labels
    stride = int(np.prod([s for _, s in DEFAULTS["pools"]]))
    timings["features"], cpu["features"] = time.perf_counter() - t1, time.process_time() - c1

    # Adam kNN flow (sv voxels)
    t2, c2 = time.perf_counter(), time.process_time()
    disp_sv, flow_info = adam_keypoint_flow(f_feat, m_feat, pts, feature_stride=stride, k=k, alpha=alpha, lr=lr,
                                            iterations=iterations, init_disp=init_disp, patience=patience, tol=tol,
                                            device=device, gradient=gradient)
    if reject_residual is not None:
        res = keypoint_residuals(f_feat, m_feat, pts, disp_sv, feature_stride=stride)
        n_keep = max(pts.shape[0] - int(float(reject_residual) * pts.shape[0]), min(min_keep, pts.shape[0]))
        keep = _torch().zeros(pts.shape[0], dtype=_torch().bool, device=pts.device)
        keep[_torch().argsort(res, stable=True)[:n_keep]] = True
        disp_sv = disp_sv[keep]
        drop(keep, "residual")
    del f_feat, m_feat
    timings["adam"], cpu["adam"] = time.perf_counter() - t2, time.process_time() - c2

    # where each side's content truly sits (content_offset): the fixed keypoints move by the fixed side's offset
    # and their displacements by the difference (0 when both sides are maps of the same kind)
    off_f, off_m = content_offset(fix_is_labels, coarse_f), content_offset(mov_is_labels, coarse_m)
    if off_f:
        pts = pts + off_f
    if off_f != off_m:
        disp_sv = disp_sv - (off_f - off_m)

    # dense field (fine voxels)
    t3, c3 = time.perf_counter(), time.process_time()
    fine_pts, fine_disp = coarse_to_fine_vox(pts, disp_sv, factor=factor)
    shape = tuple(int(factor) * s for s in grid_f)
    field = tps_dense_field(fine_pts, fine_disp, shape, kernel=kernel, lam=lam, step=step, device=device,
                            evaluation=evaluation)
    timings["dense"], cpu["dense"] = time.perf_counter() - t3, time.process_time() - c3
    timings["total"], cpu["total"] = time.perf_counter() - t0, time.process_time() - c0

    info = {
        "keypoints_sv_vox": _out(pts, numpy_out),
        "disp_sv_vox": _out(disp_sv, numpy_out),
        "keypoints_vox": _out(fine_pts, numpy_out),
        "disp_keypoints_vox": _out(fine_disp, numpy_out),
        "keypoint_ids": None if ids is None else _out(ids, numpy_out),
        "init_disp_sv_vox": None if init_disp is None else _out(init_disp, numpy_out),
        "loss": flow_info["loss"],
        "iterations_run": flow_info["iterations_run"],
        "mse": flow_info["mse"],
        "penalty": flow_info["penalty"],
        "timings_s": timings,
        "cpu_s": cpu,
        "rejected": rejected,
        "params": {
            "keypoints": keypoints, "seed": int(seed), "n_random": int(n_random), "min_voxels": int(min_voxels),
            "n_channels": int(n_channels), "include_background": bool(include_background),
            "prob_upsample": int(prob_upsample), "init": init, "n_init_neighbours": int(n_init_neighbours),
            "k": int(k), "alpha": float(alpha), "lr": float(lr), "iterations": int(iterations),
            "patience": int(patience), "tol": float(tol), "kernel": kernel, "lam": float(lam), "step": int(step),
            "factor": int(factor), "n_keypoints": int(pts.shape[0]),
            "label_upsample": [lab_up_f, lab_up_m], "gradient": gradient, "evaluation": evaluation,
            "content_offset_sv": [off_f, off_m],
            **({"reject_spread": float(reject_spread)} if reject_spread is not None else {}),
            **({"reject_confidence": float(reject_confidence)} if reject_confidence is not None else {}),
            **({"reject_residual": float(reject_residual)} if reject_residual is not None else {}),
            **({"fixed_features": "given"} if fixed_features is not None else {}),
        },
    }
    return _out(field, numpy_out), info
