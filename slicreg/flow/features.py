"""Supervoxel features: labels compressed to a few channels per layer, then box-pooled (SLIC-Reg step 2).

:func:`supervoxel_features` maps ``(L, X, Y, Z)`` label maps or ``(L, 128, X, Y, Z)`` probabilities to
``(L * n_channels, X', Y', Z')`` float32 features at half the supervoxel grid; the pooling itself lives in
:mod:`slicreg.flow.pooling`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from slicreg.errors import InputError
from slicreg.flow._common import (
    DEFAULTS,
    N_LABELS,
    _as_tensor,
    _check_labels,
    _check_probabilities,
    _is_tensor,
    _out,
    _torch,
)
from slicreg.flow.pooling import _box_pool, _pooled_onehot

if TYPE_CHECKING:
    import torch

    from slicreg.flow._common import Array, Device

__all__ = ["label_channel_map", "supervoxel_features"]


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


def _pooled_probabilities(prob: torch.Tensor, lut: torch.Tensor, n_channels: int, first: tuple[int, int], upsample: int
                          ) -> torch.Tensor:
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


def supervoxel_features(sv: Array, *, seed: int = 0, n_channels: int = DEFAULTS["n_channels"],
                        include_background: bool = DEFAULTS["include_background"],
                        pools: Sequence[tuple[int, int]] = DEFAULTS["pools"], upsample: int = 1,
                        device: Device = "cpu") -> Array:
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
            network's argmax maps as :func:`slicreg.registration.upsample_labels_stride2` upsamples them); the
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
