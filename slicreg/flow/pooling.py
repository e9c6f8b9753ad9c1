"""Fast box pooling of one-hot supervoxel channels: exact integer counts, bit-packed and banded.

The reference of everything here is ``avg_pool3d(one_hot(lut[labels]), kernel, stride, padding=kernel // 2,
count_include_pad=True)`` applied pool after pool (tests/test_flow.py compares them). :func:`box_pool3d` is the
float version; :func:`_pooled_onehot` and :func:`_pooled_onehot_coarse` compute the pooled one-hot of label maps
as integer box counts in bit fields of int64 words, bitwise equal to the reference's counts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from slicreg.errors import InputError
from slicreg.flow._common import N_LABELS, _torch
from slicreg.flow.keypoints import _nearest_index, upsample_labels

if TYPE_CHECKING:
    import torch

__all__ = ["box_pool3d"]


def box_pool3d(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
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


def _box_pool(x: torch.Tensor, kernel: int, stride: int, axes: Sequence[int]) -> torch.Tensor:
    """Box average over ``axes`` (zero padding ``kernel // 2``, counted), output voxel o at input stride * o."""
    return _box_sum(x, kernel, stride, axes) / float(int(kernel) ** len(axes))


def _box_sum(x: torch.Tensor, kernel: int, stride: int, axes: Sequence[int]) -> torch.Tensor:
    """Box sum over ``axes`` with zero padding ``kernel // 2``; output voxel o is centred on input ``stride * o``.

    Separable shifted in-place additions; works for floating and integer tensors (exact for integers)."""
    if int(kernel) < 1 or int(kernel) % 2 == 0 or int(stride) < 1:
        raise InputError(f"box pooling: expected an odd kernel >= 1 and stride >= 1, got {kernel}, {stride}")
    s, half = int(stride), int(kernel) // 2
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


def _box_sum_stride1(x: torch.Tensor, kernel: int, axes: Sequence[int], buf: torch.Tensor) -> torch.Tensor:
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
    index: list[slice] = [slice(None)] * ndim
    index[axis] = slice(None, None, step)
    return tuple(index)


# Layers pooled together in _pooled_onehot. One layer keeps every temporary small enough for the allocator to
# reuse; several layers at once were slower (page faults; docs/measurements.md, "Pooling one layer at a time").
_LAYERS_PER_PASS = 1


def _field_layout(bits: int, n_channels: int, per: int | None = None) -> tuple[int, int]:
    """Bit fields of width ``bits`` in an int64 word (62 bits used unless ``per`` says how many fields):
    (fields per word, words for n_channels)."""
    per = 62 // int(bits) if per is None else int(per)
    return per, -(-int(n_channels) // per)


def _unpack_fields(packed: torch.Tensor, bits: int, n_channels: int) -> torch.Tensor:
    """``(..., W)`` int64 words -> ``(..., n_channels)`` int64 field values."""
    torch = _torch()
    per, n_words = _field_layout(bits, n_channels)
    shifts = torch.arange(per, device=packed.device) * int(bits)
    parts = torch.bitwise_and(packed[..., None] >> shifts, (1 << int(bits)) - 1)  # (..., W, per)
    return parts.reshape(*packed.shape[:-1], n_words * per)[..., :n_channels]


def _pack_fields(counts: torch.Tensor, bits: int, per: int | None = None) -> torch.Tensor:
    """``(..., n_channels)`` int64 non-negative values < 2^bits -> ``(..., W)`` int64 words."""
    torch = _torch()
    n_channels = counts.shape[-1]
    per, n_words = _field_layout(bits, n_channels, per)
    pad = torch.zeros(*counts.shape[:-1], n_words * per - n_channels, dtype=torch.int64, device=counts.device)
    fields = torch.cat([counts, pad], dim=-1).reshape(*counts.shape[:-1], n_words, per)
    return (fields << (torch.arange(per, device=counts.device) * int(bits))).sum(dim=-1)


def _onehot_table(lut: torch.Tensor, n_channels: int, bits: int, per: int | None = None) -> torch.Tensor:
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


def _pooled_onehot(labels: torch.Tensor, lut: torch.Tensor, n_channels: int, pools: Sequence[tuple[int, int]],
                   upsample: int = 1) -> torch.Tensor:
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
    16-bit fields, a bounding box and cached buffers (faster; docs/measurements.md) -- does not apply. With
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


def _band_sum(x: torch.Tensor, axis: int, ratio: int, runs: Sequence[tuple[int, int, int, int]], *, in_lo: int = 0,
              out_lo: int = 0, out_n: int, out: torch.Tensor | None = None) -> torch.Tensor:
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


def _pooled_onehot_coarse(labels: torch.Tensor, lut: torch.Tensor, n_channels: int, pools: Sequence[tuple[int, int]],
                          factor: int) -> torch.Tensor | None:
    """:func:`_pooled_onehot` of the nearest-upsampled labels, from the coarse labels (None if not applicable).

    The first pooling of the upsampled one-hot is, per axis, a banded operator with small integer weights on the
    coarse axis (:func:`_band_runs`; for the network's stride-2 maps and the (3, stride 2) pooling: output ``o``
    = 2 x coarse voxel ``o`` + 1 x coarse voxel ``o + 1``, other weights at the edges). It is applied to packed
    one-hot words whose fields are wide enough for the final counts (16 bits, 4 fields per word, for 27 * 125 =
    3375), and the remaining poolings add the same words (:func:`_box_sum`), so everything up to the final
    unpacking is integer arithmetic on the 8x smaller grid: bitwise the same features as pooling the upsampled
    maps. Only the bounding box of the voxels whose label has a channel (supervoxels, not the background), grown
    by the poolings' reach, is computed (the rest is exactly zero; its share: docs/measurements.md).
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
