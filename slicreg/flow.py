"""Registration by supervoxels: keypoints, supervoxel features, the Adam kNN flow and the dense field.

SLIC-Reg (SLICREG_SPEC.md section 7) turns two sets of 16 supervoxel maps -- the template's own, or maps
predicted by the network -- into a displacement field in four steps:

1. **keypoints** on the fixed side: the centres of its supervoxels (:func:`supervoxel_centres`, deterministic,
   16 layers x 127 supervoxels -> up to 2032 points) or seeded random foreground voxels
   (:func:`foreground_keypoints`);
2. **features** for both sides (:func:`supervoxel_features`): per layer a seeded permutation compresses the 128
   labels to 16 channels (8 labels share a channel), one-hot from label maps or summed probabilities, box
   pooling (3, stride 2) then (5, stride 1) -> 16 x 16 = 256 channels at half the supervoxel grid
   (96 x 80 x 128 -> 48 x 40 x 64);
3. **Adam kNN flow** (:func:`adam_keypoint_flow`): one displacement per keypoint, initialised at 0 (or, as an
   option, from corresponding supervoxel centres, :func:`centre_matching_init`), minimising the feature MSE
   between moving (at keypoint + displacement) and fixed (at keypoint) plus ``alpha`` times a kNN-graph
   diffusion penalty; the MSE and its gradient come from per-point 8 x 8 Gram matrices of the trilinear
   cell's corner features (:class:`_GramSampler`, recomputed only when a point changes cell), or with
   ``gradient="autograd"`` from a trilinear gather from the channels-last features
   (:func:`sample_channels_last`, the same values and gradients as ``grid_sample``, several times faster on a
   CPU with 256 channels);
4. **dense field** (:func:`tps_dense_field`): a regularised thin-plate spline (3-D kernel ``r``, or the
   reference's ``r^2 log r``) with an affine part through the keypoint displacements, evaluated on a coarse
   grid (step 5; separable squared distances) and upsampled trilinearly to the full grid.

Label maps may be given on the network's stride-2 grid (``label_upsample=2``, :func:`upsample_labels`): steps 1
and 2 then run there, with bitwise the result for the upsampled 4 mm maps and ~8x less work.

:func:`supervoxel_flow` chains the four.

Grids and units (all isotropic, so every penalty is isotropic):

- the **supervoxel grid**: the grid of the supervoxel maps, 96 x 80 x 128 at 4 mm for the standard
  preprocessed scan. Keypoints and keypoint displacements are in voxels of this grid ("sv voxels"), so with
  the standard data one unit is 4 mm. The Adam defaults below (``lr``, ``alpha``) are in these units.
- the **feature grid**: the output of the pooling, 48 x 40 x 64. Pooling with an odd kernel ``k``, padding
  ``k // 2`` and stride ``s`` centres output voxel ``o`` on input voxel ``s * o``, so feature voxel ``o`` sits
  at supervoxel-grid voxel ``2 * o`` (``feature_stride = 2``); the samplers get ``p / feature_stride``.
  The same pooling is applied to fixed and moving, so this choice does not bias the displacement.
- the **fine grid**: the grid of the output field, 192 x 160 x 256 at 2 mm, ``factor = 2`` times the
  supervoxel grid. Supervoxel-grid voxel ``q`` is fine voxel ``factor * q + (factor - 1) / 2`` (the contract's
  rule, :func:`slicreg.conventions.downsample_affine`), and a displacement scales by ``factor``
  (:func:`coarse_to_fine_vox`). The output field is ``(3, X, Y, Z)`` in fine voxels, fixed -> moving
  (``warped(p) = moving(p + u(p))``, see :mod:`slicreg.conventions`).

Parameters taken from the spec and converted to sv voxels (the reference worked in ``grid_sample``'s
normalised units, in which one unit is ``S / 2`` voxels along an axis of ``S`` voxels, i.e. 48, 40 and 64 sv
voxels for 96 x 80 x 128 -- an anisotropic unit):

- Adam ``lr = 0.05`` normalised ~ 2.5 sv voxels (10 mm);
- ``alpha`` of a squared displacement difference scales by the mean of ``(2 / S_a)^2`` = 4.34e-4: the final
  reference code's ``k = 5, alpha = 0.15`` becomes ``alpha = 6.5e-5``; the README's ``k = 8, alpha = 0.015``
  becomes ``6.5e-6``.

The defaults (:data:`DEFAULTS`) were chosen on synthetic supervoxel maps (docs/flow.md). Registration uses
:data:`slicreg.register.FLOW_DEFAULTS` on top of them, tuned on the cohort's training pairs only with the shipped
weights (``benchmarks/tune_flow.py``, docs/flow_tuning.md: random keypoints, ``alpha = 6.5e-6``, ``lam = 10``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from slicreg.conventions import vox_to_normalised
from slicreg.errors import InputError

__all__ = [
    "DEFAULTS",
    "N_LABELS",
    "upsample_labels",
    "supervoxel_centres",
    "foreground_keypoints",
    "label_channel_map",
    "supervoxel_features",
    "box_pool3d",
    "to_channels_last",
    "sample_channels_last",
    "sample_points_grid_sample",
    "knn_graph",
    "knn_penalty",
    "centre_matching_init",
    "Adam",
    "adam_keypoint_flow",
    "ThinPlateSpline",
    "tps_fit",
    "tps_evaluate",
    "tps_dense_field",
    "coarse_to_fine_vox",
    "supervoxel_flow",
]

N_LABELS = 128
"""Labels per supervoxel layer: background 0 plus supervoxels 1..127."""

Kernel = Literal["r", "r2logr"]

#: Default knobs of the method, in one place (units: sv voxels for lr; fine voxels for lam and step).
DEFAULTS: dict[str, Any] = {
    "n_channels": 16,  # channels per layer after compressing 128 labels (8 labels per channel)
    "pools": ((3, 2), (5, 1)),  # (kernel, stride) of the box poolings, in order
    "include_background": False,  # label 0 contributes no channel (the outside of the grid is background too)
    "k": 5,  # neighbours in the kNN graph (final reference code: 5; README: 8)
    "alpha": 6.5e-5,  # penalty weight in sv voxels (= reference 0.15 in normalised units)
    "lr": 1.0,  # Adam step in sv voxels (reference 0.05 normalised ~ 2.5 sv voxels)
    "iterations": 100,
    "patience": 0,  # early stop: end when the loss has not improved by tol (relative) for this many iterations; 0 = off
    "tol": 1e-3,
    "kernel": "r",  # 3-D biharmonic TPS kernel; "r2logr" is the reference's 2-D kernel
    "lam": 100.0,  # TPS regularisation for kernel "r" (fine voxels; 0 = exact interpolation)
    "step": 5,  # TPS evaluation grid step in fine voxels
    "factor": 2,  # fine grid / supervoxel grid (2 mm / 4 mm)
    "n_random": 2048,  # random foreground keypoints (keypoints="random")
    "random_stride": 2,  # candidate voxels for random keypoints: every 2nd voxel of the supervoxel grid
}


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------- helpers
def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "device")


def _as_tensor(x: Any, name: str, device: Any) -> Any:
    torch = _torch()
    if _is_tensor(x):
        return x.to(device)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(st < 0 for st in arr.strides) or not arr.flags.aligned or not arr.flags.writeable:
        arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr).to(device)


def _out(x: Any, numpy_out: bool) -> Any:
    return x.detach().cpu().numpy() if numpy_out else x


def _check_labels(labels: Any, name: str) -> None:
    """Labels: integer (L, X, Y, Z) with values in 0..127 and every spatial size >= 2."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == _torch().bool:
        raise InputError(f"{name}: expected integer supervoxel labels (uint8), got dtype {labels.dtype}")
    if labels.ndim != 4:
        raise InputError(f"{name}: expected supervoxel labels of shape (L, X, Y, Z), got {tuple(labels.shape)}")
    if min(labels.shape[1:]) < 2 or labels.shape[0] < 1:
        raise InputError(f"{name}: expected at least one layer and >= 2 voxels per axis, got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= N_LABELS):
        raise InputError(
            f"{name}: supervoxel labels must lie in 0..{N_LABELS - 1}, got {int(labels.min())}..{int(labels.max())}"
        )


def _check_probabilities(prob: Any, name: str) -> None:
    """Probabilities: floating (L, 128, X, Y, Z), finite, non-negative."""
    if not prob.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating probabilities, got dtype {prob.dtype}")
    if prob.ndim != 5 or prob.shape[1] != N_LABELS:
        raise InputError(
            f"{name}: expected probabilities of shape (L, {N_LABELS}, X, Y, Z), got {tuple(prob.shape)}"
        )
    if min(prob.shape[2:]) < 2 or prob.shape[0] < 1:
        raise InputError(f"{name}: expected at least one layer and >= 2 voxels per axis, got {tuple(prob.shape)}")
    for layer in prob:  # one layer at a time: the checks' temporaries stay small
        if not bool(_torch().isfinite(layer).all()) or bool((layer < 0).any()):
            raise InputError(f"{name}: probabilities must be finite and non-negative")


def _check_points(points: Any, name: str) -> None:
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 1:
        raise InputError(f"{name}: expected points of shape (N, 3) with N >= 1, got {tuple(points.shape)}")
    if not points.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating point coordinates, got dtype {points.dtype}")
    if not bool(_torch().isfinite(points).all()):
        raise InputError(f"{name}: coordinates must be finite")


def _check_shape3(shape: Any, name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected three positive integers, got {shape!r}") from exc
    if len(out) != 3 or min(out) < 2:
        raise InputError(f"{name}: expected three integers >= 2, got {shape!r}")
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- keypoints
def _nearest_index(n_coarse: int, factor: int) -> np.ndarray:
    """Nearest upsampling by ``factor``: fine voxel ``p`` (``0 <= p < factor * n_coarse``) takes coarse voxel
    ``min(floor(p / factor + 1/2), n_coarse - 1)`` -- coarse voxel ``q`` is centred on fine voxel ``factor * q``
    (the network's stride-2 output, :func:`slicreg.register.upsample_labels_stride2`)."""
    p = np.arange(int(n_coarse) * int(factor))
    return np.minimum((2 * p + int(factor)) // (2 * int(factor)), int(n_coarse) - 1)


def upsample_labels(labels: Any, factor: int) -> Any:
    """Nearest upsampling of label maps ``(..., x, y, z)`` by an integer ``factor`` along the last three axes.

    Fine voxel ``p`` takes coarse voxel ``min(floor(p / factor + 1/2), x - 1)`` (coarse voxel ``q`` is centred on
    fine voxel ``factor * q``; for ``factor = 2`` the rule of :func:`slicreg.register.upsample_labels_stride2`).
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


def _centre_sums(lab: Any, factor: int) -> Any:
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

    def outer(a: Any, b: Any, c: Any) -> Any:
        return (a[:, None, None] * b[None, :, None] * c[None, None, :]).reshape(-1)

    wx, wy, wz = counts
    sx, sy, sz = sums
    weights = torch.stack([outer(wx, wy, wz), outer(sx, wy, wz), outer(wx, sy, wz), outer(wx, wy, sz)], dim=1)
    out = torch.zeros(n_layers * N_LABELS, 4, dtype=torch.float64, device=dev)
    for layer in range(n_layers):  # one layer at a time: the int64 index stays small
        out.index_add_(0, lab[layer].reshape(-1).long() + layer * N_LABELS, weights)
    return out


def supervoxel_centres(labels: Any, *, min_voxels: int = 1, device: Any = "cpu",
                       upsample: int = 1) -> tuple[Any, Any]:
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


def foreground_keypoints(labels: Any, *, n: int = DEFAULTS["n_random"], seed: int = 0, layer: int = 0,
                         stride: int = DEFAULTS["random_stride"], device: Any = "cpu") -> Any:
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


# ---------------------------------------------------------------------------------------------- features
def label_channel_map(n_layers: int, *, n_channels: int = DEFAULTS["n_channels"], seed: int = 0,
                      include_background: bool = DEFAULTS["include_background"]) -> np.ndarray:
    """The fixed compression of 128 labels to ``n_channels`` channels, one seeded permutation per layer.

    Args:
        n_layers: number of supervoxel layers L.
        n_channels: channels per layer; ``128 / n_channels`` labels share a channel (default 16 -> 8).
        seed: seed of ``numpy.random.default_rng``; layer ``l`` uses the ``l``-th permutation drawn.
        include_background: if False (default), label 0 maps to no channel (-1): background then has an
            all-zero feature, like the zero padding outside the grid, instead of sharing a channel with 7
            supervoxels. True reproduces the reference.

    Returns:
        ``(L, 128)`` int64: the channel ``0..n_channels-1`` of each label, or -1.
    """
    if int(n_layers) < 1:
        raise InputError(f"n_layers: expected >= 1, got {n_layers}")
    if int(n_channels) < 1 or N_LABELS % int(n_channels):
        raise InputError(f"n_channels: expected a divisor of {N_LABELS}, got {n_channels}")
    per = N_LABELS // int(n_channels)
    rng = np.random.default_rng(seed)
    out = np.stack([rng.permutation(N_LABELS) // per for _ in range(int(n_layers))]).astype(np.int64)
    if not include_background:
        out[:, 0] = -1
    return out


def box_pool3d(x: Any, kernel: int, stride: int) -> Any:
    """Average pooling with a cubic box, zero padding ``kernel // 2`` counted in the mean.

    Equal to ``avg_pool3d(x, kernel, stride, padding=kernel // 2, count_include_pad=True)``; output voxel
    ``o`` is centred on input voxel ``stride * o``. Computed separably by shifted in-place additions, which on
    a CPU is 2-4 times faster than ``avg_pool3d`` for the 256-channel features.

    Args:
        x: ``(B, C, X, Y, Z)`` floating tensor.
        kernel: odd box width.
        stride: output step.

    Returns:
        ``(B, C, X', Y', Z')`` with ``X' = (X - 1) // stride + 1``.
    """
    if x.ndim != 5 or not x.dtype.is_floating_point:
        raise InputError(f"box_pool3d: expected a floating (B, C, X, Y, Z) tensor, got {tuple(x.shape)} {x.dtype}")
    return _box_pool(x, kernel, stride, (2, 3, 4))


def _box_pool(x: Any, kernel: int, stride: int, axes: Sequence[int]) -> Any:
    """Box average over ``axes`` (zero padding ``kernel // 2``, counted), output voxel o at input stride * o."""
    return _box_sum(x, kernel, stride, axes) / float(int(kernel) ** len(axes))


def _box_sum(x: Any, kernel: int, stride: int, axes: Sequence[int]) -> Any:
    """Box sum over ``axes`` with zero padding ``kernel // 2``; output voxel o is centred on input ``stride * o``.

    Separable shifted in-place additions; works for floating and integer tensors (exact for integers)."""
    if int(kernel) < 1 or int(kernel) % 2 == 0 or int(stride) < 1:
        raise InputError(f"box pooling: expected an odd kernel >= 1 and stride >= 1, got {kernel}, {stride}")
    k, s, half = int(kernel), int(stride), int(kernel) // 2
    for axis in axes:
        n = x.shape[axis]
        n_out = (n - 1) // s + 1
        acc = x.narrow(axis, 0, s * (n_out - 1) + 1)[_step(x.ndim, axis, s)].clone()  # offset 0
        for t in range(-half, half + 1):
            if t == 0:
                continue
            # outputs o with 0 <= s * o + t < n (outside the grid counts as zero)
            first = (-t + s - 1) // s if t < 0 else 0
            last = min(n_out - 1, (n - 1 - t) // s)
            if last < first:
                continue
            count = last - first + 1
            src = x.narrow(axis, s * first + t, s * (count - 1) + 1)[_step(x.ndim, axis, s)]
            acc.narrow(axis, first, count).add_(src)
        x = acc
    return x


def _box_sum_stride1(x: Any, kernel: int, axes: Sequence[int], buf: Any) -> Any:
    """:func:`_box_sum` with stride 1, ping-ponging between ``x`` and ``buf`` (same shape; both overwritten).

    Returns the tensor holding the result (``x`` or ``buf``)."""
    half = int(kernel) // 2
    src, dst = x, buf
    for axis in axes:
        n = x.shape[axis]
        dst.copy_(src)
        for t in range(1, half + 1):
            if t >= n:
                break
            dst.narrow(axis, 0, n - t).add_(src.narrow(axis, t, n - t))  # output o += input o + t
            dst.narrow(axis, t, n - t).add_(src.narrow(axis, 0, n - t))  # output o += input o - t
        src, dst = dst, src
    return src


def _step(ndim: int, axis: int, step: int) -> tuple:
    """Index taking every ``step``-th element along ``axis``."""
    index: list[Any] = [slice(None)] * ndim
    index[axis] = slice(None, None, step)
    return tuple(index)


# Layers pooled together in _pooled_onehot. One layer keeps every temporary under ~16 MB, which the allocator
# reuses; larger ones (4 layers: 63 MB) are mapped afresh each time and cost ~2x in page faults (measured).
_LAYERS_PER_PASS = 1


def _field_layout(bits: int, n_channels: int, per: int | None = None) -> tuple[int, int]:
    """Bit fields of width ``bits`` in an int64 word (62 bits used unless ``per`` says how many fields):
    (fields per word, words for n_channels)."""
    per = 62 // int(bits) if per is None else int(per)
    return per, -(-int(n_channels) // per)


def _unpack_fields(packed: Any, bits: int, n_channels: int) -> Any:
    """``(..., W)`` int64 words -> ``(..., n_channels)`` int64 field values."""
    torch = _torch()
    per, n_words = _field_layout(bits, n_channels)
    shifts = torch.arange(per, device=packed.device) * int(bits)
    parts = torch.bitwise_and(packed[..., None] >> shifts, (1 << int(bits)) - 1)  # (..., W, per)
    return parts.reshape(*packed.shape[:-1], n_words * per)[..., :n_channels]


def _pack_fields(counts: Any, bits: int, per: int | None = None) -> Any:
    """``(..., n_channels)`` int64 non-negative values < 2^bits -> ``(..., W)`` int64 words."""
    torch = _torch()
    n_channels = counts.shape[-1]
    per, n_words = _field_layout(bits, n_channels, per)
    pad = torch.zeros(*counts.shape[:-1], n_words * per - n_channels, dtype=torch.int64, device=counts.device)
    fields = torch.cat([counts, pad], dim=-1).reshape(*counts.shape[:-1], n_words, per)
    return (fields << (torch.arange(per, device=counts.device) * int(bits))).sum(dim=-1)


def _onehot_table(lut: Any, n_channels: int, bits: int, per: int | None = None) -> Any:
    """``(L * 128, W)`` packed one-hot words of every (layer, label) (all zero for labels without a channel)."""
    torch = _torch()
    onehot = torch.zeros(lut.shape[0], lut.shape[1], n_channels + 1, dtype=torch.int64, device=lut.device)
    onehot.scatter_(2, (lut + 1)[..., None], 1)
    return _pack_fields(onehot[..., 1:], bits, per).reshape(-1, _field_layout(bits, n_channels, per)[1])


def _pool_totals(pools: Sequence[tuple[int, int]]) -> list[int]:
    """Largest box count after each pooling (checks the pools)."""
    totals, total = [], 1
    for k, s in pools:
        if int(k) < 1 or int(k) % 2 == 0 or int(s) < 1:
            raise InputError(f"pools: expected odd kernels >= 1 and strides >= 1, got {list(pools)}")
        total *= int(k) ** 3
        totals.append(total)
    if total.bit_length() > 62:
        raise InputError(f"pools: windows of {total} voxels are too large to count")
    return totals


def _pooled_onehot(labels: Any, lut: Any, n_channels: int, pools: Sequence[tuple[int, int]],
                   upsample: int = 1) -> Any:
    """All poolings of ``one_hot(lut[labels])``, exactly, with channel counts packed into int64 words.

    The pooled one-hot is a box count: how many voxels of each channel fall in the window. After the first
    (3, stride 2) pooling those counts are small integers (at most 27: 5 bits), so for the first pooling --
    the one on the full grid -- several channels share one int64 word in bit fields of that width (16
    channels in 2 words instead of 16 floats). A box sum then adds whole words -- one addition moves 12
    channels, and no field can overflow into the next. The counts are then unpacked once, on the 8x smaller
    grid, and the remaining poolings add them as float32, which is exact for integers below 2^24 (27 * 125 =
    3375 after the second pooling); repacking them into wider fields instead costs more than it saves.
    Exact and deterministic, with several times less memory traffic than pooling a float one-hot volume.

    This general path runs only where :func:`_pooled_onehot_coarse` -- the same counts with banded operators,
    16-bit fields, a bounding box and cached buffers (1.7x faster on 4 mm maps) -- does not apply. With
    ``upsample > 1`` the labels are on a grid that many times coarser (nearest upsampling,
    :func:`upsample_labels`); the banded path never upsamples them.

    Args:
        labels: ``(L, X, Y, Z)`` integer tensor.
        lut: ``(L, 128)`` int64 channel of each label (-1 = none).
        n_channels: channels per layer.
        pools: ``(kernel, stride)`` pairs, odd kernels.
        upsample: see above (default 1).

    Returns:
        Channels-last ``(X', Y', Z', L * n_channels)`` float32.
    """
    torch = _torch()
    dev = labels.device
    totals = _pool_totals(pools)
    banded = _pooled_onehot_coarse(labels, lut, n_channels, pools, int(upsample))
    if banded is not None:
        return banded
    if int(upsample) > 1:
        labels = upsample_labels(labels, int(upsample))
    total = totals[-1] if totals else 1
    bits0 = max(1, totals[0].bit_length()) if totals else 1
    table = _onehot_table(lut, n_channels, bits0)  # (L * 128, W)
    n_layers = labels.shape[0]
    group = _LAYERS_PER_PASS
    out = None
    for g0 in range(0, n_layers, group):
        g1 = min(n_layers, g0 + group)
        rows = labels[g0:g1].long() + (torch.arange(g0, g1, device=dev) * N_LABELS).reshape(-1, 1, 1, 1)
        packed = table[rows]  # (G, X, Y, Z, W)
        if pools:
            packed = _box_sum(packed, pools[0][0], pools[0][1], (1, 2, 3))
        counts = _unpack_fields(packed, bits0, n_channels).to(torch.float32 if total < 2 ** 24 else torch.int64)
        for k, s in pools[1:]:
            counts = _box_sum(counts, k, s, (1, 2, 3))  # (G, X', Y', Z', n_channels)
        if out is None:
            out = torch.empty(*counts.shape[1:4], n_layers, n_channels, dtype=torch.float32, device=dev)
        out[..., g0:g1, :] = counts.permute(1, 2, 3, 0, 4)
    out /= float(total)
    return out.reshape(*out.shape[:3], n_layers * n_channels)


def _band_runs(n_coarse: int, factor: int, kernel: int, stride: int) -> tuple[int, int, list] | None:
    """The first box sum over a nearest-upsampled axis as a banded operator on the coarse axis.

    Output ``o`` sums the fine voxels ``stride * o + t`` (``|t| <= kernel // 2``, inside the fine axis of
    ``factor * n_coarse`` voxels); fine voxel ``p`` holds coarse voxel ``q(p)`` (:func:`_nearest_index`), so
    ``out[o] = sum_q A[o, q] x[q]`` with small integer counts ``A``. With ``r = stride / factor`` (an integer, else
    None is returned) the non-zero entries sit at ``q = r * o + d`` for a few offsets ``d``; they are returned as
    runs ``(o0, o1, d, w)``: ``out[o0:o1] += w * x[r * o + d]`` -- shifted additions of whole sub-volumes.

    Returns:
        ``(n_out, r, runs)`` or None.
    """
    if int(stride) % int(factor):
        return None
    ratio, half = int(stride) // int(factor), int(kernel) // 2
    q = _nearest_index(n_coarse, factor)
    n_fine = q.size
    n_out = (n_fine - 1) // int(stride) + 1
    band: dict[int, np.ndarray] = {}
    for o in range(n_out):
        for p in range(int(stride) * o - half, int(stride) * o + half + 1):
            if 0 <= p < n_fine:
                d = int(q[p]) - ratio * o
                band.setdefault(d, np.zeros(n_out, np.int64))[o] += 1
    runs = []
    for d in sorted(band):
        w = band[d]
        o = 0
        while o < n_out:
            if w[o] == 0:
                o += 1
                continue
            o1 = o + 1
            while o1 < n_out and w[o1] == w[o]:
                o1 += 1
            runs.append((o, o1, d, int(w[o])))
            o = o1
    return n_out, ratio, runs


def _band_sum(x: Any, axis: int, ratio: int, runs: Sequence[tuple[int, int, int, int]], *, in_lo: int = 0,
              out_lo: int = 0, out_n: int, out: Any = None) -> Any:
    """Apply the runs of :func:`_band_runs` along ``axis`` of ``x`` (integer tensors: exact).

    ``x`` holds input voxels ``in_lo ..`` of the axis (zero elsewhere); the result holds outputs
    ``out_lo .. out_lo + out_n - 1`` (written into ``out`` if given: a buffer of that shape, overwritten)."""
    torch = _torch()
    shape = list(x.shape)
    n_in = shape[axis]
    shape[axis] = int(out_n)
    if out is None:
        out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    else:
        out.zero_()
    for o0, o1, d, w in runs:
        # outputs o of the run inside the window whose input r * o + d lies in the held input range
        first = max(o0, out_lo, -((d - in_lo) // ratio))  # ceil((in_lo - d) / r)
        last = min(o1 - 1, out_lo + out_n - 1, (in_lo + n_in - 1 - d) // ratio)
        if last < first:
            continue
        count = last - first + 1
        src = x.narrow(axis, ratio * first + d - in_lo, ratio * (count - 1) + 1)
        if ratio > 1:
            src = src[_step(x.ndim, axis, ratio)]
        dst = out.narrow(axis, first - out_lo, count)
        if w == 1:
            dst.add_(src)
        else:
            dst.add_(src, alpha=w)
    return out


def _pooled_onehot_coarse(labels: Any, lut: Any, n_channels: int, pools: Sequence[tuple[int, int]],
                          factor: int) -> Any:
    """:func:`_pooled_onehot` of the nearest-upsampled labels, from the coarse labels (None if not applicable).

    The first pooling of the upsampled one-hot is, per axis, a banded operator with small integer weights on the
    coarse axis (:func:`_band_runs`; for the network's stride-2 maps and the (3, stride 2) pooling: output ``o``
    = 2 x coarse voxel ``o`` + 1 x coarse voxel ``o + 1``, other weights at the edges). It is applied to packed
    one-hot words whose fields are wide enough for the final counts (16 bits, 4 fields per word, for 27 * 125 =
    3375), and the remaining poolings add the same words (:func:`_box_sum`), so everything up to the final
    unpacking is integer arithmetic on the 8x smaller grid: bitwise the same features as pooling the upsampled
    maps. Only the bounding box of the voxels whose label has a channel (supervoxels, not the background), grown
    by the poolings' reach, is computed (the rest is exactly zero; ~40 % of the grid for the cohort's scans).
    Also used with ``factor = 1`` (labels on the supervoxel grid). None -- the caller then uses the general path
    -- when the first stride is not a multiple of ``factor``, a later pooling has a stride, or the counts need
    more than 15 bits."""
    torch = _torch()
    dev = labels.device
    if not pools:
        return None
    k0, s0 = (int(v) for v in pools[0])
    size = tuple(int(n) for n in labels.shape[1:])
    axes = [_band_runs(n, factor, k0, s0) for n in size]
    total = _pool_totals(pools)[-1]
    # 16-bit fields, 4 per word, while every count stays below 2^15 (the word never reaches the sign bit): the
    # fields are then unpacked by viewing the words as int16 (little-endian), without shifts
    if any(a is None for a in axes) or total >= 2 ** 15 or sys.byteorder != "little" \
            or any(int(s) != 1 for _, s in pools[1:]):
        return None
    table = _onehot_table(lut, n_channels, 16, per=4)  # (L * 128, 4 words)
    n_layers = labels.shape[0]
    n_out = [a[0] for a in axes]
    # the region that can be non-zero: inputs with a channel, and the outputs they reach
    keyed = (table != 0).any(dim=1).reshape(n_layers, N_LABELS)
    support = keyed[torch.arange(n_layers, device=dev).reshape(-1, 1, 1, 1), labels.long()].any(dim=0)
    out = torch.zeros(*n_out, n_layers, n_channels, dtype=torch.float32, device=dev)
    if not bool(support.any()):
        return out.reshape(*n_out, n_layers * n_channels)
    reach = sum(int(k) // 2 for k, _ in pools[1:])  # the later (stride-1) poolings' reach
    in_win, out_win = [], []
    for a, (n_o, ratio, runs) in enumerate(axes):
        present = torch.nonzero(support.any(dim=tuple(j for j in range(3) if j != a))).reshape(-1)
        lo, hi = int(present[0]), int(present[-1]) + 1
        hit = [o for o0, o1, d, _ in runs for o in range(o0, o1) if lo <= ratio * o + d < hi]
        in_win.append((lo, hi))
        out_win.append((max(0, min(hit) - reach), min(n_o, max(hit) + 1 + reach)))
    crop = labels[:, in_win[0][0]: in_win[0][1], in_win[1][0]: in_win[1][1], in_win[2][0]: in_win[2][1]]
    # one layer at a time through buffers allocated once: a layer's temporaries (~2 MB) stay in cache and no
    # fresh memory is touched per step
    shapes, shape = [], [1, *(hi - lo for lo, hi in in_win), table.shape[1]]
    for a in range(3):
        shape[a + 1] = out_win[a][1] - out_win[a][0]
        shapes.append(tuple(shape))
    bufs = [torch.empty(s, dtype=torch.int64, device=dev) for s in shapes]
    spare = torch.empty(shapes[-1], dtype=torch.int64, device=dev)
    for layer in range(n_layers):
        packed = table[crop[layer: layer + 1].long() + layer * N_LABELS]  # (1, x, y, z, 4)
        for a, (_, ratio, runs) in enumerate(axes):
            packed = _band_sum(packed, a + 1, ratio, runs, in_lo=in_win[a][0], out_lo=out_win[a][0],
                               out_n=out_win[a][1] - out_win[a][0], out=bufs[a])
        for k, _ in pools[1:]:
            packed = _box_sum_stride1(packed, k, (1, 2, 3), spare if packed is bufs[2] else bufs[2])
        counts = packed.view(torch.int16)[..., :n_channels]  # (1, x', y', z', n_channels)
        out[out_win[0][0]: out_win[0][1], out_win[1][0]: out_win[1][1], out_win[2][0]: out_win[2][1], layer] = \
            counts[0]
    out /= float(total)
    return out.reshape(*n_out, n_layers * n_channels)


def _pooled_probabilities(prob: Any, lut: Any, n_channels: int, first: tuple[int, int], upsample: int) -> Any:
    """Per layer: sum the probabilities of the labels sharing a channel, upsample, first pooling.

    ``prob (L, 128, X, Y, Z)`` -> channels-last ``(X', Y', Z', L * n_channels)`` float32; one layer at a time, so
    the 128 probabilities are never upsampled."""
    torch = _torch()
    out = None
    for layer in range(prob.shape[0]):
        p = prob[layer].float()
        valid = lut[layer] >= 0
        member = torch.zeros(n_channels, N_LABELS, dtype=torch.float32, device=prob.device)
        member[lut[layer][valid], torch.nonzero(valid).reshape(-1)] = 1.0
        maps = (member @ p.reshape(N_LABELS, -1)).reshape(1, n_channels, *p.shape[1:])
        if upsample > 1:
            maps = torch.nn.functional.interpolate(maps, scale_factor=upsample, mode="trilinear",
                                                   align_corners=False)
        maps = _box_pool(maps, *first, (2, 3, 4))[0]
        if out is None:
            out = torch.empty(*maps.shape[1:], prob.shape[0] * n_channels, dtype=torch.float32, device=prob.device)
        out[..., layer * n_channels: (layer + 1) * n_channels] = maps.permute(1, 2, 3, 0)
    return out


def supervoxel_features(sv: Any, *, seed: int = 0, n_channels: int = DEFAULTS["n_channels"],
                        include_background: bool = DEFAULTS["include_background"],
                        pools: Sequence[tuple[int, int]] = DEFAULTS["pools"], upsample: int = 1,
                        device: Any = "cpu") -> Any:
    """Compressed, pooled supervoxel features (the same mapping for fixed and moving).

    Per layer, the labels are compressed to ``n_channels`` channels by :func:`label_channel_map` (one-hot of
    the channel for label maps; for probabilities, the sum of the probabilities of the labels sharing a
    channel, i.e. the expected one-hot), then box-pooled as ``pools`` says ((3, stride 2) then (5, stride 1),
    zero padding counted: the outside of the grid has no label).

    Args:
        sv: label maps ``(L, X, Y, Z)`` or ``(B, L, X, Y, Z)`` of integer dtype (0..127), or probabilities
            ``(L, 128, X, Y, Z)`` or ``(B, L, 128, X, Y, Z)`` of floating dtype (softmax over the 128 labels).
            numpy or torch.
        seed: seed of the label permutations.
        n_channels: channels per layer (default 16).
        include_background: see :func:`label_channel_map` (default False).
        pools: ``(kernel, stride)`` pairs applied in order (odd kernels).
        upsample: the input is on a grid ``upsample`` times coarser than the supervoxel grid (2 for the
            network's stride-2 output, 48 x 40 x 64). Probabilities: the compressed channels are upsampled
            trilinearly (``align_corners=False``, i.e. coarse voxel q = fine voxel ``f q + (f - 1) / 2``) first;
            upsampling the compressed maps instead of the 128 probabilities keeps memory at ~60 MB per layer.
            Label maps: nearest upsampling (:func:`upsample_labels`: coarse voxel q = fine voxel ``f q``, the
            network's argmax maps as :func:`slicreg.register.upsample_labels_stride2` upsamples them); the
            result is bitwise that of the upsampled maps, computed on the coarse grid (integer counts; for the
            standard 48 x 40 x 64 maps ~10x less work). Default 1.
        device: where to compute.

    Returns:
        ``(L * n_channels, X', Y', Z')`` float32 (``(B, ...)`` for batched input), channel ``l * n_channels + c``
        = channel ``c`` of layer ``l``. For 16 layers at 96 x 80 x 128: ``(256, 48, 40, 64)``. Feature voxel
        ``o`` is centred on supervoxel-grid voxel ``prod(strides) * o``. The memory is channels-last (the
        array is a permuted view of ``(X', Y', Z', C)``), so :func:`to_channels_last` needs no copy.
        numpy in -> numpy out.
    """
    torch = _torch()
    numpy_out = not _is_tensor(sv)
    x = _as_tensor(sv, "sv", device)
    is_labels = not (x.dtype.is_floating_point or x.dtype.is_complex)
    batched = x.ndim == (5 if is_labels else 6)
    xb = x if batched else x[None]
    if is_labels:
        for b in range(xb.shape[0]):
            _check_labels(xb[b], "sv")
    else:
        if xb.ndim != 6:
            raise InputError(f"sv: expected probabilities of shape (L, {N_LABELS}, X, Y, Z) or "
                             f"(B, L, {N_LABELS}, X, Y, Z), got {tuple(x.shape)}")
        for b in range(xb.shape[0]):
            _check_probabilities(xb[b], "sv")
    if int(upsample) < 1:
        raise InputError(f"upsample: expected an integer >= 1, got {upsample}")
    pools = [(int(k), int(s)) for k, s in pools]
    lut = torch.as_tensor(
        label_channel_map(xb.shape[1], n_channels=n_channels, seed=seed, include_background=include_background),
        device=x.device,
    )
    first, rest = (pools[0], pools[1:]) if pools else ((1, 1), [])
    outs = []
    for b in range(xb.shape[0]):
        if is_labels:
            maps = _pooled_onehot(xb[b], lut, n_channels, pools, int(upsample))
        else:
            maps = _pooled_probabilities(xb[b], lut, n_channels, first, int(upsample))
            for k, s in rest:
                maps = _box_pool(maps, k, s, (0, 1, 2))
        outs.append(maps)
    feats = torch.stack(outs).permute(0, 4, 1, 2, 3) if batched else outs[0].permute(3, 0, 1, 2)
    return _out(feats, numpy_out)


# ---------------------------------------------------------------------------------------------- sampling
def to_channels_last(feats: Any) -> Any:
    """``(C, X, Y, Z)`` -> a contiguous ``(X, Y, Z, C)`` copy for :func:`sample_channels_last`."""
    if feats.ndim != 4:
        raise InputError(f"feats: expected (C, X, Y, Z), got {tuple(feats.shape)}")
    return feats.permute(1, 2, 3, 0).contiguous()


def sample_channels_last(feats_cl: Any, points_vox: Any) -> Any:
    """Trilinear sampling of many channels at points, by a gather from a channels-last volume.

    Each point reads its 8 neighbouring rows of ``C`` contiguous values; autograd flows through
    ``points_vox`` (not through ``feats_cl``). Positions are clamped to the grid (border padding), which is
    ``grid_sample(..., mode="bilinear", padding_mode="border", align_corners=True)`` -- see
    :func:`sample_points_grid_sample`, which the tests compare it with.

    Args:
        feats_cl: ``(X, Y, Z, C)`` floating torch tensor (see :func:`to_channels_last`), every size >= 2.
        points_vox: ``(N, 3)`` torch tensor, positions in voxels of that grid (axis order X, Y, Z).

    Returns:
        ``(N, C)`` values at the points, dtype of ``feats_cl``.
    """
    torch = _torch()
    if feats_cl.ndim != 4 or min(feats_cl.shape[:3]) < 2:
        raise InputError(f"feats_cl: expected (X, Y, Z, C) with X, Y, Z >= 2, got {tuple(feats_cl.shape)}")
    if points_vox.ndim != 2 or points_vox.shape[1] != 3:
        raise InputError(f"points_vox: expected (N, 3), got {tuple(points_vox.shape)}")
    size = feats_cl.shape[:3]
    n_ch = feats_cl.shape[3]
    dev = points_vox.device
    upper = torch.tensor([s - 1 for s in size], dtype=feats_cl.dtype, device=dev)
    pos = torch.clamp(points_vox.to(feats_cl.dtype), min=torch.zeros_like(upper), max=upper)  # border
    lo = torch.minimum(torch.floor(pos.detach()), upper - 1)  # lo + 1 stays on the grid
    frac = pos - lo  # in [0, 1]; differentiable in pos
    strides = torch.tensor([size[1] * size[2], size[2], 1], dtype=torch.long, device=dev)
    # corner (b0, b1, b2), b0 slowest: linear offset and trilinear weight
    bits = torch.tensor([[(c >> (2 - a)) & 1 for a in range(3)] for c in range(8)], dtype=torch.long, device=dev)
    idx = (lo.long() * strides).sum(dim=1, keepdim=True) + (bits * strides).sum(dim=1)[None]  # (N, 8)
    w_axis = torch.stack([1.0 - frac, frac], dim=2)  # (N, 3, 2)
    weights = (w_axis[:, 0, :, None, None] * w_axis[:, 1, None, :, None] * w_axis[:, 2, None, None, :])
    corners = feats_cl.reshape(-1, n_ch).index_select(0, idx.reshape(-1)).reshape(-1, 8, n_ch)  # (N, 8, C)
    return torch.bmm(weights.reshape(-1, 1, 8), corners)[:, 0]


def sample_points_grid_sample(feats: Any, points_vox: Any) -> Any:
    """The same as :func:`sample_channels_last` with ``grid_sample`` (reference and benchmark baseline).

    Args:
        feats: ``(C, X, Y, Z)`` floating torch tensor.
        points_vox: ``(N, 3)`` torch tensor in voxels of that grid.

    Returns:
        ``(N, C)``.
    """
    torch = _torch()
    if feats.ndim != 4 or points_vox.ndim != 2 or points_vox.shape[1] != 3:
        raise InputError(f"expected feats (C, X, Y, Z) and points (N, 3), got {tuple(feats.shape)}, "
                         f"{tuple(points_vox.shape)}")
    grid = vox_to_normalised(points_vox.to(feats.dtype).t(), feats.shape[1:], align_corners=True)
    out = torch.nn.functional.grid_sample(
        feats[None], grid.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True
    )
    return out.reshape(feats.shape[0], -1).t()


# ---------------------------------------------------------------------------------------------- Adam flow
def knn_graph(points: Any, k: int) -> Any:
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


def knn_penalty(knn: Any, n: int) -> Any:
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

    def penalty(d: Any) -> tuple[Any, Any]:
        lap_d = deg[:, None] * d - d[knn].sum(dim=1) - (d[rev_t] * mask_t[..., None]).sum(dim=1)
        return (d * lap_d).sum(), 2.0 * lap_d

    return penalty


def centre_matching_init(fixed_labels: Any, moving_labels: Any, points_vox: Any, *, n_neighbours: int = 16,
                         min_voxels: int = 1, device: Any = "cpu") -> Any:
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
    torch = _torch()
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


def _match_init(cf: Any, idf: Any, cm: Any, idm: Any, pts: Any, n_neighbours: int, n_layers: int) -> Any:
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


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) for one tensor: the update of ``torch.optim.Adam`` (its single-tensor
    path, the CPU default; the same operations in the same order, so the same numbers), without
    ``torch.optim``, whose first use in a process imports ``torch._dynamo`` -- about 1.2 s here, paid by every
    ``slicreg register`` run.

    Args:
        param: the tensor to optimise (updated in place).
        lr: step size; may be changed between steps (``adam.lr = ...``).
        betas: decay of the first and second moment averages.
        eps: added to the root of the second moment.
    """

    def __init__(self, param: Any, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        torch = _torch()
        self.param, self.lr, self.betas, self.eps = param, float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = 0

    def step(self, grad: Any) -> None:
        """One update of ``param`` with the gradient ``grad`` (same shape)."""
        torch = _torch()
        beta1, beta2 = self.betas
        with torch.no_grad():
            self.steps += 1
            self.exp_avg.lerp_(grad, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = float(self.steps)
            step_size = self.lr / (1 - beta1 ** step)
            denom = (self.exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
            self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


class _GramSampler:
    """The feature MSE at moving points and its gradient, from per-point 8 x 8 Gram matrices of the corners.

    For a point in the cell with corner features ``c_1..c_8`` (rows of ``C`` channels) and trilinear weights
    ``w`` (which sum to 1), the squared error against its target ``t`` is
    ``|sum_k w_k c_k - t|^2 = |sum_k w_k (c_k - t)|^2 = w^T E w`` with ``E = e e^T``, ``e_k = c_k - t``, and its
    gradient with respect to ``w`` is ``2 E w``. ``E`` depends only on the cell, so it is computed only for points
    that entered another cell since the previous call -- after the first Adam iterations 5-10 % of them -- and
    every call costs a few 8 x 8 products per point instead of reading 8 x ``C`` features twice. Everything is
    float64 (from the float32 features): ``E`` is formed from the differences, so there is no cancellation; where
    the moving features equal the target the gradient is set to exactly zero, as the float32 autograd path
    computes it (Adam's steps ignore a gradient's scale, so rounding noise would otherwise move such points).
    The same function as :func:`sample_channels_last` followed by the mean squared error (border clamping,
    gradient zero outside the grid); the targets are sampled in float64 by :meth:`sample`.
    """

    def __init__(self, feats_cl: Any, target: Any = None) -> None:
        """``feats_cl (X, Y, Z, C)`` float32 features; ``target (N, C)`` (float64) for :meth:`__call__` (None for
        :meth:`sample` alone)."""
        torch = _torch()
        self.size = tuple(int(s) for s in feats_cl.shape[:3])
        self.n_ch = int(feats_cl.shape[3])
        self.rows = feats_cl.reshape(-1, self.n_ch)
        dev = feats_cl.device
        self.upper = torch.tensor([s - 1 for s in self.size], dtype=feats_cl.dtype, device=dev)
        self.strides = torch.tensor([self.size[1] * self.size[2], self.size[2], 1], dtype=torch.long, device=dev)
        bits = torch.tensor([[(c >> (2 - a)) & 1 for a in range(3)] for c in range(8)], dtype=torch.long, device=dev)
        self.offsets = (bits * self.strides).sum(dim=1)  # (8,) corner offsets, b0 slowest
        n = 0 if target is None else target.shape[0]
        self.target = None if target is None else target.double()
        self.gram = torch.zeros(n, 8, 8, dtype=torch.float64, device=dev)
        self.cell = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.denom = float(n * self.n_ch)
        self.updated = 0  # Gram matrices computed so far (diagnostics)

    def _locate(self, points: Any) -> tuple[Any, Any]:
        """Positions (clamped to the grid) -> (cell index (N,), trilinear weights per axis (N, 3, 2) float64), as
        :func:`sample_channels_last` computes them."""
        torch = _torch()
        pos = torch.clamp(points, min=torch.zeros_like(self.upper), max=self.upper)
        lo = torch.minimum(torch.floor(pos), self.upper - 1)
        frac = (pos - lo).double()  # (N, 3) in [0, 1]
        return (lo.long() * self.strides).sum(dim=1), torch.stack([1.0 - frac, frac], dim=2)

    def _corners(self, cell: Any) -> Any:
        """``(M,)`` cell indices -> ``(M, 8, C)`` float64 corner features."""
        idx = (cell[:, None] + self.offsets[None]).reshape(-1)
        return self.rows.index_select(0, idx).reshape(-1, 8, self.n_ch).double()

    @staticmethod
    def _weights(wa: Any) -> tuple[Any, Any]:
        w01 = wa[:, 0, :, None] * wa[:, 1, None, :]  # (N, 2, 2)
        return (w01[:, :, :, None] * wa[:, 2, None, None, :]).reshape(-1, 8), w01

    def sample(self, points: Any) -> Any:
        """Trilinear samples ``(N, C)`` float64 at ``points (N, 3)`` (feature voxels, border clamping)."""
        cell, wa = self._locate(points)
        w, _ = self._weights(wa)
        return (self._corners(cell) * w[:, :, None]).sum(dim=1)

    def __call__(self, points: Any) -> tuple[Any, Any]:
        """``points (N, 3)`` float32 in feature voxels -> (mean squared error (float64 scalar), gradient
        ``(N, 3)`` float64 with respect to the points)."""
        torch = _torch()
        cell, wa = self._locate(points)
        moved = torch.nonzero(cell != self.cell).reshape(-1)
        if moved.numel():
            diff = self._corners(cell[moved]).sub_(self.target[moved, None, :])
            self.gram[moved] = torch.bmm(diff, diff.transpose(1, 2))
            self.cell[moved] = cell[moved]
            self.updated += int(moved.numel())
        w, w01 = self._weights(wa)
        ew = (self.gram * w[:, None, :]).sum(dim=2)  # (N, 8): E w = e (e^T w), e^T w = the residual
        mse = (ew * w).sum() / self.denom
        # a residual that is zero up to rounding (moving features equal to the target, e.g. an identical pair)
        # leaves ~1e-16 |e|^2 in E w; Adam would blow such noise up (its step ignores the gradient's scale), where
        # the float32 path computes an exact zero -- so it is set to zero (1e-11: far below float32 resolution)
        exact = ew.abs().amax(dim=1) <= 1e-11 * torch.diagonal(self.gram, dim1=1, dim2=2).amax(dim=1)
        ew.masked_fill_(exact[:, None], 0.0)
        g = ew.reshape(-1, 2, 2, 2) * (2.0 / self.denom)  # d mse / d w
        w02 = wa[:, 0, :, None] * wa[:, 2, None, :]
        w12 = wa[:, 1, :, None] * wa[:, 2, None, :]
        grad = torch.stack([((g[:, 1] - g[:, 0]) * w12).sum(dim=(1, 2)),
                            ((g[:, :, 1] - g[:, :, 0]) * w02).sum(dim=(1, 2)),
                            ((g[:, :, :, 1] - g[:, :, :, 0]) * w01).sum(dim=(1, 2))], dim=1)
        inside = (points >= 0) & (points <= self.upper)  # the clamp passes no gradient outside the grid
        return mse, grad * inside


def adam_keypoint_flow(fixed_feats: Any, moving_feats: Any, points_vox: Any, *, feature_stride: int = 2,
                       k: int = DEFAULTS["k"], alpha: float = DEFAULTS["alpha"], lr: float = DEFAULTS["lr"],
                       iterations: int = DEFAULTS["iterations"], init_disp: Any = None,
                       patience: int = DEFAULTS["patience"], tol: float = DEFAULTS["tol"],
                       device: Any = "cpu", gradient: Literal["gram", "autograd"] = "gram") -> tuple[Any, dict]:
    """Keypoint displacements by Adam on feature MSE + kNN-graph diffusion (SLIC-Reg's optimisation).

    Minimises over the displacements ``d (N, 3)`` (initialised at 0)::

        mean_{i, c} (M_c((p_i + d_i) / s) - F_c(p_i / s))^2  +  alpha / N * sum_i sum_{j in kNN(i)} |d_i - d_j|^2

    with ``F``, ``M`` the fixed and moving features (sampled trilinearly, border-clamped, by
    :func:`sample_channels_last`) and ``s = feature_stride``; the kNN graph is built on the fixed keypoints.

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
            :func:`sample_channels_last` and autograd in float32 (the previous path). The same function; the
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
        target = sample_channels_last(fixed_cl, pts * scale)
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

    def mse_of(d: Any) -> Any:
        return torch.nn.functional.mse_loss(sample_channels_last(moving_cl, (pts + d) * scale), target)

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


# ---------------------------------------------------------------------------------------------- TPS
def _phi_from_sq(d2: Any, kernel: str) -> Any:
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

    centres: Any
    weights: Any
    affine: Any
    origin: Any
    kernel: str


def tps_fit(points: Any, values: Any, *, kernel: Kernel = DEFAULTS["kernel"], lam: float = DEFAULTS["lam"],
            device: Any = "cpu") -> ThinPlateSpline:
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


def tps_evaluate(tps: ThinPlateSpline, points: Any, *, chunk: int = 1024, fast: bool = False) -> Any:
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


def _tps_grid_r(tps: ThinPlateSpline, axes: Sequence[Any], *, block: int = 8) -> Any:
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


def _interp_matrix(n_out: int, step: int, n_nodes: int, dtype: Any, device: Any) -> Any:
    """``(n_out, n_nodes)`` linear interpolation weights: output ``i`` at node position ``i / step``."""
    torch = _torch()
    pos = np.arange(int(n_out), dtype=np.float64) / int(step)
    q = np.minimum(np.floor(pos).astype(np.int64), int(n_nodes) - 1)
    frac = pos - q
    mat = np.zeros((int(n_out), int(n_nodes)), np.float64)
    mat[np.arange(int(n_out)), q] = 1.0 - frac
    nxt = frac > 0
    mat[np.arange(int(n_out))[nxt], q[nxt] + 1] = frac[nxt]
    return torch.as_tensor(mat, dtype=dtype, device=device)


def _upsample_separable(coarse: Any, step: int, shape: Sequence[int]) -> Any:
    """``(D, m0, m1, m2)`` node values -> ``(D, X, Y, Z)``, voxel ``i`` at node position ``i / step`` per axis.

    Trilinear interpolation (``interpolate(..., align_corners=True)`` on the grid of ``step * (m - 1) + 1``
    voxels, cropped to ``shape``) as three matrix products with the per-axis weights, smallest result first,
    the last one writing the output once; equal to it up to float32 rounding (tested)."""
    d = coarse.shape[0]
    mx, my, mz = (_interp_matrix(s, step, m, coarse.dtype, coarse.device) for s, m in zip(shape, coarse.shape[1:]))
    t = coarse @ mz.t()  # (D, m0, m1, Z)
    t = my @ t  # (D, m0, Y, Z)
    out = mx @ t.reshape(d, t.shape[1], -1)  # (D, X, Y * Z)
    return out.reshape(d, *shape)


def tps_dense_field(points_vox: Any, disp_vox: Any, shape: Sequence[int], *, kernel: Kernel = DEFAULTS["kernel"],
                    lam: float = DEFAULTS["lam"], step: int = DEFAULTS["step"], device: Any = "cpu",
                    evaluation: Literal["grid", "points"] = "grid") -> Any:
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


def coarse_to_fine_vox(points_vox: Any, disp_vox: Any | None = None, *, factor: int = DEFAULTS["factor"]):
    """Supervoxel-grid voxels -> fine-grid voxels: ``p_fine = factor * p + (factor - 1) / 2``, ``d_fine = factor * d``.

    The rule of :func:`slicreg.conventions.downsample_affine` (4 mm voxel q = 2 mm voxel 2 q + 0.5).
    Returns the points, or ``(points, disp)`` if ``disp_vox`` is given; same types as the inputs."""
    f = int(factor)
    if f < 1:
        raise InputError(f"factor: expected an integer >= 1, got {factor}")
    p = points_vox * f + (f - 1) / 2.0
    return p if disp_vox is None else (p, disp_vox * f)


# ---------------------------------------------------------------------------------------------- chain
def _prepare_sv(sv: Any, name: str, prob_upsample: int, label_upsample: int,
                device: Any) -> tuple[Any, bool, tuple[int, int, int]]:
    """Tensor, is_labels, supervoxel-grid shape (after upsampling probabilities or labels)."""
    x = _as_tensor(sv, name, device)
    if x.dtype.is_floating_point:
        _check_probabilities(x, name)
        return x, False, tuple(int(s) * int(prob_upsample) for s in x.shape[2:])  # type: ignore[return-value]
    _check_labels(x, name)
    return x, True, tuple(int(s) * int(label_upsample) for s in x.shape[1:])  # type: ignore[return-value]


def _label_factors(label_upsample: Any) -> tuple[int, int]:
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


def _argmax_labels(prob: Any) -> Any:
    """``(L, 128, X, Y, Z)`` probabilities -> ``(L, X, Y, Z)`` uint8 argmax, one layer at a time."""
    torch = _torch()
    return torch.stack([p.argmax(dim=0).to(torch.uint8) for p in prob])


def supervoxel_flow(fixed_sv: Any, moving_sv: Any, *, keypoints: Literal["centres", "random"] = "centres",
                    seed: int = 0, n_random: int = DEFAULTS["n_random"], min_voxels: int = 1,
                    n_channels: int = DEFAULTS["n_channels"],
                    include_background: bool = DEFAULTS["include_background"], prob_upsample: int = 1,
                    init: Literal["zero", "centres"] = "zero", n_init_neighbours: int = 16,
                    k: int = DEFAULTS["k"], alpha: float = DEFAULTS["alpha"], lr: float = DEFAULTS["lr"],
                    iterations: int = DEFAULTS["iterations"], patience: int = DEFAULTS["patience"],
                    tol: float = DEFAULTS["tol"], kernel: Kernel = DEFAULTS["kernel"],
                    lam: float = DEFAULTS["lam"], step: int = DEFAULTS["step"], factor: int = DEFAULTS["factor"],
                    device: Any = "cpu", label_upsample: int | Sequence[int] = 1,
                    gradient: Literal["gram", "autograd"] = "gram",
                    evaluation: Literal["grid", "points"] = "grid") -> tuple[Any, dict]:
    """Displacement field between two scans from their supervoxel maps (SLIC-Reg inference, spec section 7).

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
            whose 4 mm maps are :func:`slicreg.register.upsample_labels_stride2` of it); one integer for both
            sides or ``(fixed, moving)`` (e.g. ``(2, 1)``: predicted fixed maps, the template's own 4 mm maps).
            Keypoints, the centre initialisation and the features are computed on the coarse maps -- bitwise the
            same as for the upsampled maps, with ~8x less work. Ignored for probabilities. Default 1.
        gradient: the Adam flow's MSE gradient (:func:`adam_keypoint_flow`; ``"gram"`` default).
        evaluation: the dense field's evaluation (:func:`tps_dense_field`; ``"grid"`` default).
            ``gradient="autograd", evaluation="points"`` with ``label_upsample=1`` on upsampled maps are the
            previous algorithms (benchmarks/bench_register.py ``--compare``).

    Returns:
        ``(disp_vox, info)``: ``disp_vox (3, factor X, factor Y, factor Z)`` float32, displacement in voxels of
        the fine grid of the fixed scan, fixed -> moving (project convention); numpy if ``fixed_sv`` is numpy.
        ``info``: ``"keypoints_sv_vox"``/``"disp_sv_vox"`` ``(N, 3)`` (supervoxel grid),
        ``"keypoints_vox"``/``"disp_keypoints_vox"`` ``(N, 3)`` (fine grid), ``"keypoint_ids"`` ``(N, 2)``
        (layer, label) or None, ``"init_disp_sv_vox"`` or None, ``"loss"`` per iteration, ``"mse"``, ``"penalty"``,
        ``"timings_s"`` (wall) and ``"cpu_s"`` (process CPU time, all threads) per step,
        ``"params"`` (the resolved knobs).
    """
    torch = _torch()
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
    timings["keypoints"], cpu["keypoints"] = time.perf_counter() - t0, time.process_time() - c0

    # features
    t1, c1 = time.perf_counter(), time.process_time()
    common = dict(seed=seed, n_channels=n_channels, include_background=include_background, device=device)
    f_feat = supervoxel_features(fix, upsample=up_f if fix_is_labels else prob_upsample, **common)
    m_feat = supervoxel_features(mov, upsample=up_m if mov_is_labels else prob_upsample, **common)
    del fix, mov, fix_labels
    stride = int(np.prod([s for _, s in DEFAULTS["pools"]]))
    timings["features"], cpu["features"] = time.perf_counter() - t1, time.process_time() - c1

    # Adam kNN flow (sv voxels)
    t2, c2 = time.perf_counter(), time.process_time()
    disp_sv, flow_info = adam_keypoint_flow(f_feat, m_feat, pts, feature_stride=stride, k=k, alpha=alpha, lr=lr,
                                            iterations=iterations, init_disp=init_disp, patience=patience, tol=tol,
                                            device=device, gradient=gradient)
    del f_feat, m_feat
    timings["adam"], cpu["adam"] = time.perf_counter() - t2, time.process_time() - c2

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
        "params": {
            "keypoints": keypoints, "seed": int(seed), "n_random": int(n_random), "min_voxels": int(min_voxels),
            "n_channels": int(n_channels), "include_background": bool(include_background),
            "prob_upsample": int(prob_upsample), "init": init, "n_init_neighbours": int(n_init_neighbours),
            "k": int(k), "alpha": float(alpha), "lr": float(lr), "iterations": int(iterations),
            "patience": int(patience), "tol": float(tol), "kernel": kernel, "lam": float(lam), "step": int(step),
            "factor": int(factor), "n_keypoints": int(pts.shape[0]),
            "label_upsample": [lab_up_f, lab_up_m], "gradient": gradient, "evaluation": evaluation,
        },
    }
    return _out(field, numpy_out), info
