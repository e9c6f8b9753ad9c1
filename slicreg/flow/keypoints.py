"""Keypoints on supervoxel maps: supervoxel centres, seeded foreground voxels, the centre-matching start.

Also the nearest upsampling of label maps (:func:`upsample_labels`), which the keypoints and the features
compute exactly on the coarse grid without building the upsampled maps, and the supervoxel-grid -> fine-grid
voxel rule (:func:`coarse_to_fine_vox`). Points are ``(N, 3)`` in voxels (axis order X, Y, Z) of the grid of
the maps they come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slicreg.errors import InputError
from slicreg.flow._common import (
    DEFAULTS,
    N_LABELS,
    _as_tensor,
    _check_labels,
    _check_points,
    _is_tensor,
    _out,
    _torch,
)

if TYPE_CHECKING:
    import torch

    from slicreg.flow._common import Array, Device

__all__ = ["centre_matching_init", "coarse_to_fine_vox", "content_offset", "foreground_keypoints",
           "supervoxel_centres", "upsample_labels"]


def _nearest_index(n_coarse: int, factor: int) -> np.ndarray:
    """Nearest upsampling by ``factor``: fine voxel ``p`` (``0 <= p < factor * n_coarse``) takes coarse voxel
    ``min(floor(p / factor + 1/2), n_coarse - 1)`` -- coarse voxel ``q`` is centred on fine voxel ``factor * q``
    (the network's stride-2 output, :func:`slicreg.registration.upsample_labels_stride2`)."""
    p = np.arange(int(n_coarse) * int(factor))
    return np.minimum((2 * p + int(factor)) // (2 * int(factor)), int(n_coarse) - 1)


def content_offset(is_labels: bool, factor: int) -> float:
    """Where a map's content truly sits relative to where the flow sees it, in supervoxel-grid voxels per axis.

    A map on a grid ``factor`` times coarser than the supervoxel grid holds, in coarse voxel ``q``, what the
    network read at supervoxel-grid voxel ``factor * q`` (its output voxel ``q`` is centred on input voxel
    ``2 q``, :mod:`slicreg.network`). Nearest upsampling (:func:`_nearest_index`) spreads ``q`` over the
    supervoxel voxels ``factor * q - factor / 2 .. factor * q + factor / 2 - 1``, centred on ``factor * q - 1/2``
    for an even factor; the probabilities' trilinear upsampling (``align_corners=False``) and
    :func:`coarse_to_fine_vox` centre it on ``factor * q + (factor - 1) / 2``. The content the flow sees at ``p``
    was therefore read at ``p + content_offset``: +1/2 for labels with an even factor, ``-(factor - 1) / 2`` for
    probabilities, 0 for maps on the supervoxel grid itself (the template's own maps). :func:`supervoxel_flow`
    adds it to the fixed keypoints and takes it out of their displacements (fixed minus moving), so that maps of
    different kinds -- a scan's predicted maps against the template's own -- are compared where their content is.
    """
    f = int(factor)
    if f <= 1:
        return 0.0
    if is_labels:
        return 0.5 if f % 2 == 0 else 0.0
    return -(f - 1) / 2.0


def upsample_labels(labels: Array, factor: int) -> Array:
    """Nearest upsampling of label maps ``(..., x, y, z)`` by an integer ``factor`` along the last three axes.

    Fine voxel ``p`` takes coarse voxel ``min(floor(p / factor + 1/2), x - 1)`` (coarse voxel ``q`` is centred on
    fine voxel ``factor * q``; for ``factor = 2`` the rule of :func:`slicreg.registration.upsample_labels_stride2`).
    The functions that take ``upsample=`` for label maps give exactly the result they would give for these
    upsampled maps, without building them. numpy or torch (same type out)."""
    torch = _torch()
    f = int(factor)
    if f < 1:
        raise InputError(f"factor: expected an integer >= 1, got {factor}")
    numpy_out = not _is_tensor(labels)
    x = _as_tensor(labels, "labels", "cpu" if numpy_out else labels.device)
    if x.ndim < 3:
        raise InputError(f"labels: expected (..., X, Y, Z), got {tuple(x.shape)}")
    for axis in range(x.ndim - 3, x.ndim):
        idx = torch.from_numpy(_nearest_index(x.shape[axis], f)).to(x.device)
        x = x.index_select(axis, idx)
    return _out(x, numpy_out)


def _centre_sums(lab: torch.Tensor, factor: int) -> torch.Tensor:
    """``(L * 128, 4)`` float64: per (layer, label) the voxel count and the sums of the three coordinates, on
    the grid ``factor`` times finer than ``lab`` (nearest upsampling, :func:`upsample_labels`).

    Every coarse voxel stands for ``w_x w_y w_z`` fine voxels whose coordinate sums factorise (``s_x w_y w_z``
    etc., per-axis counts ``w`` and coordinate sums ``s`` of :func:`_nearest_index`). All terms are integers, so
    the float64 sums are exact whatever the order of the additions (``index_add_`` over all layers)."""
    torch = _torch()
    dev = lab.device
    n_layers, size = lab.shape[0], tuple(int(s) for s in lab.shape[1:])
    counts, sums = [], []
    for n in size:
        q = _nearest_index(n, factor)
        counts.append(torch.from_numpy(np.bincount(q, minlength=n).astype(np.float64)).to(dev))
        sums.append(torch.from_numpy(np.bincount(q, weights=np.arange(q.size, dtype=np.float64),
                                                 minlength=n)).to(dev))

    def outer(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (a[:, None, None] * b[None, :, None] * c[None, None, :]).reshape(-1)

    wx, wy, wz = counts
    sx, sy, sz = sums
    weights = torch.stack([outer(wx, wy, wz), outer(sx, wy, wz), outer(wx, sy, wz), outer(wx, wy, sz)], dim=1)
    out = torch.zeros(n_layers * N_LABELS, 4, dtype=torch.float64, device=dev)
    for layer in range(n_layers):  # one layer at a time: the int64 index stays small
        out.index_add_(0, lab[layer].reshape(-1).long() + layer * N_LABELS, weights)
    return out


def supervoxel_centres(labels: Array, *, min_voxels: int = 1, device: Device = "cpu",
                       upsample: int = 1) -> tuple[Array, Array]:
    """Centres of mass of all supervoxels of all layers (deterministic keypoints).

    Args:
        labels: ``(L, X, Y, Z)`` integer supervoxel maps (uint8, 0 = background, 1..127), numpy or torch.
        min_voxels: supervoxels with fewer voxels are skipped (default 1: every present supervoxel).
        device: where to compute.
        upsample: ``labels`` are on a grid ``upsample`` times coarser than the supervoxel grid (2 for the
            network's stride-2 argmax, 48 x 40 x 64): the centres (and ``min_voxels``) are those of the nearest-
            upsampled maps (:func:`upsample_labels`), in voxels of the supervoxel grid -- exactly, computed on the
            coarse grid (8x fewer voxels). Default 1.

    Returns:
        ``(points, ids)``: ``points (N, 3)`` float32, centres in voxels of the grid of ``labels`` (for the
        standard 96 x 80 x 128 maps: 4 mm voxels), ordered by layer, then label; ``ids (N, 2)`` int64 with
        ``(layer, label)`` of each centre. N <= L * 127 (2032 for 16 layers). numpy in -> numpy out.

    The sums are exact (integer coordinates summed in float64), so the result does not depend on the order
    of the reduction, also on CUDA.
    """
    torch = _torch()
    numpy_out = not _is_tensor(labels)
    lab = _as_tensor(labels, "labels", device)
    _check_labels(lab, "labels")
    if int(min_voxels) < 1:
        raise InputError(f"min_voxels: expected an integer >= 1, got {min_voxels}")
    if int(upsample) < 1:
        raise InputError(f"upsample: expected an integer >= 1, got {upsample}")
    totals = _centre_sums(lab, int(upsample))
    counts, sums = totals[:, 0].reshape(-1, N_LABELS), totals[:, 1:]
    keep = torch.nonzero(counts[:, 1:] >= int(min_voxels))  # (layer, label - 1): background is not a supervoxel
    layer, label = keep[:, 0], keep[:, 1] + 1
    rows = layer * N_LABELS + label
    points = (sums[rows] / totals[rows, 0, None]).float()
    ids = torch.stack([layer, label], dim=1)
    return _out(points, numpy_out), _out(ids, numpy_out)


def foreground_keypoints(labels: Array, *, n: int = DEFAULTS["n_random"], seed: int = 0, layer: int = 0,
                         stride: int = DEFAULTS["random_stride"], device: Device = "cpu") -> Array:
    """Seeded random foreground voxels as keypoints (the reference code's choice, but seeded).

    Args:
        labels: ``(L, X, Y, Z)`` integer supervoxel maps (0 = background).
        n: number of points (fewer if there are fewer candidates).
        seed: seed of ``numpy.random.default_rng``.
        layer: the layer whose foreground (label > 0) is used.
        stride: candidates are the voxels whose indices are multiples of ``stride``.
        device: where to compute.

    Returns:
        ``(N, 3)`` float32 in voxels of the grid of ``labels``, sorted in raster order. numpy in -> numpy out.
    """
    torch = _torch()
    numpy_out = not _is_tensor(labels)
    lab = _as_tensor(labels, "labels", device)
    _check_labels(lab, "labels")
    if not 0 <= int(layer) < lab.shape[0]:
        raise InputError(f"layer: expected 0..{lab.shape[0] - 1}, got {layer}")
    if int(n) < 1 or int(stride) < 1:
        raise InputError(f"n and stride: expected integers >= 1, got n={n}, stride={stride}")
    sub = lab[int(layer), :: int(stride), :: int(stride), :: int(stride)]
    cand = torch.nonzero(sub > 0).cpu().numpy()
    if len(cand) == 0:
        raise InputError(f"labels: layer {layer} has no foreground voxel to draw keypoints from")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(cand), size=min(int(n), len(cand)), replace=False))
    pts = torch.as_tensor(cand[pick] * int(stride), dtype=torch.float32, device=lab.device)
    return _out(pts, numpy_out)


def centre_matching_init(fixed_labels: Array, moving_labels: Array, points_vox: Array, *,
                         n_neighbours: int = 16, min_voxels: int = 1, device: Device = "cpu") -> Array:
    """Global starting displacements from corresponding supervoxel centres (no capture-range limit).

    The same supervoxel (layer, label) in both maps gives a direct correspondence: its moving centre minus its
    fixed centre. Each keypoint takes the component-wise median of these displacements over the
    ``n_neighbours`` supervoxels whose fixed centres are nearest to it, which discards supervoxels cut by a
    partial field of view or mispredicted. This is an option beyond the reference (which starts at 0). On
    synthetic 16-layer maps (benchmarks/bench_flow.py) Adam from 0 recovered translations of up to ~14 sv
    voxels (56 mm) -- and 25 voxels along one axis -- but failed at ~28-40 voxels (112-160 mm), where this
    initialisation alone was within ~0.4-0.9 sv voxels in the interior and Adam from it within ~0.2-0.4.

    Args:
        fixed_labels, moving_labels: ``(L, X, Y, Z)`` integer supervoxel maps on the same grid.
        points_vox: ``(N, 3)`` keypoints in voxels of that grid.
        n_neighbours: supervoxels per median.
        min_voxels: supervoxels smaller than this on either side are ignored.
        device: where to compute.

    Returns:
        ``(N, 3)`` float32 displacements in voxels of that grid (fixed -> moving), type of ``points_vox``.
    """
    numpy_out = not _is_tensor(points_vox)
    pts = _as_tensor(points_vox, "points_vox", device)
    _check_points(pts, "points_vox")
    fl = _as_tensor(fixed_labels, "fixed_labels", device)
    ml = _as_tensor(moving_labels, "moving_labels", device)
    _check_labels(fl, "fixed_labels")
    _check_labels(ml, "moving_labels")
    if fl.shape[0] != ml.shape[0]:
        raise InputError(f"fixed_labels, moving_labels: layer counts differ ({fl.shape[0]} vs {ml.shape[0]})")
    cf, idf = supervoxel_centres(fl, min_voxels=min_voxels, device=device)
    cm, idm = supervoxel_centres(ml, min_voxels=min_voxels, device=device)
    return _out(_match_init(cf, idf, cm, idm, pts, n_neighbours, fl.shape[0]), numpy_out)


def _match_init(cf: torch.Tensor, idf: torch.Tensor, cm: torch.Tensor, idm: torch.Tensor, pts: torch.Tensor,
                n_neighbours: int, n_layers: int) -> torch.Tensor:
    """:func:`centre_matching_init` from centres ``(K, 3)`` and ids ``(K, 2)`` on one grid -> ``(N, 3)``."""
    torch = _torch()
    slot_m = torch.full((n_layers * N_LABELS,), -1, dtype=torch.long, device=pts.device)
    slot_m[idm[:, 0] * N_LABELS + idm[:, 1]] = torch.arange(idm.shape[0], device=pts.device)
    match = slot_m[idf[:, 0] * N_LABELS + idf[:, 1]]
    ok = match >= 0
    if int(ok.sum()) == 0:
        raise InputError("fixed_labels, moving_labels: no supervoxel present in both maps")
    anchors, d0 = cf[ok].double(), (cm[match[ok]] - cf[ok]).double()
    m = min(int(n_neighbours), anchors.shape[0])
    out = []
    for start in range(0, pts.shape[0], 4096):
        d2 = torch.cdist(pts[start: start + 4096].double(), anchors)
        near = torch.topk(d2, m, dim=1, largest=False, sorted=False).indices  # the median ignores the order
        out.append(d0[near].median(dim=1).values)
    return torch.cat(out).float()


def coarse_to_fine_vox(points_vox: Array, disp_vox: Array | None = None, *, factor: int = DEFAULTS["factor"]
                       ) -> Array | tuple[Array, Array]:
    """Supervoxel-grid voxels -> fine-grid voxels: ``p_fine = factor * p + (factor - 1) / 2``, ``d_fine = factor * d``.

    The rule of :func:`slicreg.grid.downsample_index_map` (4 mm voxel q = 2 mm voxel 2 q + 0.5), applied to
    ``(N, 3)`` rows. Returns the points, or ``(points, disp)`` if ``disp_vox`` is given; same types as the inputs."""
    from slicreg.grid import downsample_index_map

    if isinstance(factor, bool) or int(factor) != factor or int(factor) < 1:
        raise InputError(f"factor: expected an integer >= 1, got {factor}")
    to_fine = downsample_index_map(int(factor))  # diagonal: every axis scales by f and shifts by (f - 1) / 2
    scale, offset = float(to_fine[0, 0]), float(to_fine[0, 3])
    p = points_vox * scale + offset
    return p if disp_vox is None else (p, disp_vox * scale)
