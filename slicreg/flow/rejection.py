"""Optional rejection of unreliable keypoints (issue 18, item 2; every option is off by default).

Three scores per keypoint, each with a threshold option of :func:`slicreg.flow.supervoxel_flow`:

- **layer spread** (:func:`layer_spread`, option ``reject_spread``, sv voxels): each of the 16 layers gives its
  own estimate of the keypoint's displacement -- the moving centre minus the fixed centre of the supervoxel
  (layer, label) the keypoint lies in (the correspondences behind :func:`centre_matching_init`). The spread is the
  median distance of these estimates from their component-wise median; keypoints whose layers disagree by more
  than the threshold are dropped before the Adam flow;
- **confidence** (:func:`confidence_at`, option ``reject_confidence`` with ``fixed_confidence``): a per-voxel
  confidence map of the fixed prediction (e.g. the mean over the layers of the largest softmax probability, or
  the agreement of test-time augmented passes) read at the keypoints; keypoints below the threshold are dropped
  before the Adam flow;
- **flow residual** (:func:`keypoint_residuals`, option ``reject_residual``, a fraction): the feature MSE of every
  keypoint at its final displacement; the given fraction of keypoints with the largest residual is dropped before
  the dense interpolation (the thin-plate spline).

:func:`keep_mask` turns scores and a threshold into the kept keypoints, never fewer than ``min_keep`` (then the
best-scored ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slicreg.errors import InputError
from slicreg.flow._common import N_LABELS, _torch
from slicreg.flow.keypoints import _nearest_index

if TYPE_CHECKING:
    import torch

__all__ = ["confidence_at", "keep_mask", "keypoint_residuals", "layer_spread"]


def _voxel_index(points: torch.Tensor, size: tuple[int, ...], upsample: int, rule: str) -> torch.Tensor:
    """Flat index into a map of ``size`` of the voxel holding each point ``(N, 3)`` (sv voxels).

    ``rule="nearest"``: the map is on a grid ``upsample`` times coarser whose nearest upsampling
    (:func:`slicreg.flow.upsample_labels`) is the supervoxel grid -- sv voxel ``p`` (rounded) takes coarse voxel
    ``min(floor(p / f + 1/2), n - 1)``; ``rule="linear"``: coarse voxel ``q`` sits at sv voxel ``f q + (f - 1) / 2``
    (:func:`slicreg.flow.coarse_to_fine_vox`, the probabilities' convention) -- the nearest such voxel."""
    torch = _torch()
    f = int(upsample)
    idx = []
    for a, n in enumerate(size):
        p = points[:, a].double()
        if rule == "nearest":
            fine = torch.round(p).clamp_(0, n * f - 1).long()
            lut = torch.from_numpy(_nearest_index(n, f)).to(points.device)
            q = lut[fine]
        else:
            q = torch.round((p - (f - 1) / 2.0) / f).clamp_(0, n - 1).long()
        idx.append(q)
    return (idx[0] * size[1] + idx[1]) * size[2] + idx[2]


def layer_spread(fixed_labels: torch.Tensor, points: torch.Tensor, fixed_centres: tuple[torch.Tensor, torch.Tensor],
                 moving_centres: tuple[torch.Tensor, torch.Tensor], *, upsample: int = 1, rule: str = "nearest",
                 min_layers: int = 3) -> torch.Tensor:
    """How much the 16 layers disagree on each keypoint's displacement (sv voxels).

    Per layer, the keypoint's supervoxel (its fixed label there) gives the estimate ``c_moving - c_fixed`` of the
    centres of that (layer, label) in both maps (layers where the keypoint is background, or whose supervoxel is
    missing from the moving maps, give none). The spread is the median over the layers of the distance of the
    estimates from their component-wise median -- robust to a few cut or mispredicted supervoxels.

    Args:
        fixed_labels: ``(L, X, Y, Z)`` integer fixed maps (possibly ``upsample`` times coarser than the sv grid).
        points: ``(N, 3)`` keypoints in sv voxels.
        fixed_centres, moving_centres: ``(centres (K, 3) sv voxels, ids (K, 2) (layer, label))`` of
            :func:`slicreg.flow.supervoxel_centres` (on the sv grid).
        upsample, rule: how ``fixed_labels`` relate to the sv grid (see :func:`_voxel_index`).
        min_layers: keypoints with fewer estimates get an infinite spread.

    Returns:
        ``(N,)`` float32 spread (``inf`` with fewer than ``min_layers`` estimates).
    """
    torch = _torch()
    n_layers = fixed_labels.shape[0]
    size = tuple(int(s) for s in fixed_labels.shape[1:])
    flat = _voxel_index(points, size, upsample, rule)
    labels = fixed_labels.reshape(n_layers, -1)[:, flat].long()  # (L, N)
    cf, idf = fixed_centres
    cm, idm = moving_centres
    dev = points.device
    table_f = torch.full((n_layers * N_LABELS, 3), float("nan"), dtype=torch.float64, device=dev)
    table_m = torch.full((n_layers * N_LABELS, 3), float("nan"), dtype=torch.float64, device=dev)
    table_f[idf[:, 0] * N_LABELS + idf[:, 1]] = cf.double()
    table_m[idm[:, 0] * N_LABELS + idm[:, 1]] = cm.double()
    rows = labels + torch.arange(n_layers, device=dev)[:, None] * N_LABELS
    est = (table_m[rows] - table_f[rows]).permute(1, 0, 2)  # (N, L, 3); NaN: no estimate
    est[(labels == 0).t()] = float("nan")
    med = torch.nanmedian(est, dim=1).values  # (N, 3)
    dist = (est - med[:, None, :]).norm(dim=2)  # (N, L), NaN where no estimate
    spread = torch.nanmedian(dist, dim=1).values
    count = (~torch.isnan(dist)).sum(dim=1)
    spread[count < int(min_layers)] = float("inf")
    return spread.float()


def confidence_at(confidence: torch.Tensor, points: torch.Tensor, *, upsample: int = 1, rule: str = "nearest"
                  ) -> torch.Tensor:
    """A confidence map ``(X, Y, Z)`` (on the fixed maps' own grid) at the keypoints ``(N, 3)`` (sv voxels),
    nearest voxel -> ``(N,)`` float32."""
    if confidence.ndim != 3:
        raise InputError(f"fixed_confidence: expected an (X, Y, Z) map, got {tuple(confidence.shape)}")
    size = tuple(int(s) for s in confidence.shape)
    flat = _voxel_index(points, size, upsample, rule)
    return confidence.reshape(-1)[flat].float()


def keypoint_residuals(fixed_feats: torch.Tensor, moving_feats: torch.Tensor, points: torch.Tensor,
                       disp: torch.Tensor, *, feature_stride: int) -> torch.Tensor:
    """Per keypoint the feature MSE of the Adam flow at its displacement: ``mean_c (M_c((p + d) / s) - F_c(p / s))^2``
    -> ``(N,)`` float32 (the flow's loss term, per point; trilinear, border-clamped)."""
    from slicreg.flow.keypoint_flow import _read
    from slicreg.flow.sampling import to_channels_last

    torch = _torch()
    scale = 1.0 / int(feature_stride)
    with torch.no_grad():
        target = _read(to_channels_last(fixed_feats.float()), points.float() * scale)
        moved = _read(to_channels_last(moving_feats.float()), (points.float() + disp.float()) * scale)
        return (moved - target).square_().mean(dim=1)


def keep_mask(scores: torch.Tensor, threshold: float, *, keep_above: bool, min_keep: int) -> torch.Tensor:
    """Keypoints to keep: ``scores >= threshold`` (``keep_above``) or ``scores <= threshold``; at least
    ``min_keep`` of them (the best-scored ones when the threshold keeps fewer). ``(N,)`` bool."""
    torch = _torch()
    n = scores.shape[0]
    s = scores.double()
    good = s >= float(threshold) if keep_above else s <= float(threshold)
    good &= ~torch.isnan(s)
    m = min(int(min_keep), n)
    if int(good.sum()) < m:
        key = torch.nan_to_num(s, nan=-np.inf if keep_above else np.inf)
        order = torch.argsort(key, descending=keep_above, stable=True)
        good = torch.zeros(n, dtype=torch.bool, device=scores.device)
        good[order[:m]] = True
    return good
