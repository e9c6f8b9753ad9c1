"""The SLIC-Reg network: a 3-D DeepLab (MobileNetV2 backbone + ASPP) with a grouped supervoxel head.

Architecture (docs/method.md, section 5), input ``(B, 1, X, Y, Z)`` at 4 mm (96 x 80 x 128 in training), every
spatial size divisible by 4:

- **Backbone** (:class:`Backbone`, 216,768 parameters): 8 inverted-residual blocks (:data:`BACKBONE_BLOCKS`).
  A block is 1x1x1 conv in->mid + BN + ReLU6, 3x3x3 depthwise conv (stride s, padding 1) + BN + ReLU6, 1x1x1 conv
  mid->out + BN; block 0's first conv is a full 3x3x3 conv with stride 2; a residual where in == out and s == 1.
  Skip = the 24-channel output of blocks 0-1 (stride 2); deep features = output of blocks 2-7 (stride 4).
- **ASPP** (:class:`ASPP`, 1,001,088 parameters): 64 -> 128 channels: a 1x1x1 branch, four 3x3x3 branches dilated
  by 2, 4, 8, 16 (each conv + BN + ReLU) and an image-pooling branch; concatenated (6 x 128) -> 1x1x1 conv
  768 -> 128 + BN + ReLU, then Dropout(0.5). **Image-pooling branch: global average pool -> 1x1x1 conv
  64 -> 128 with a bias -> ReLU, no normalisation** (BatchNorm on a ``(B, 128, 1, 1, 1)`` tensor fails for batch
  size 1 in train mode; without it the branch works for any batch size in both modes).
- **Head** (:class:`GroupedHead`, 589,824 parameters): concat(skip 24, ASPP upsampled x2 trilinear) = 152 ch ->
  1x1x1 conv 512 (no bias) + BN + ReLU -> 3x3x3 conv 512 -> 512, groups 16 + BN + ReLU -> 1x1x1 conv
  512 -> 16 * 128 = 2048, groups 16, with bias.
- 1,807,680 parameters in total.

Output: logits ``(B, 2048, X/2, Y/2, Z/2)``; output voxel ``q`` is centred on input voxel ``2 q`` (the stride-2
convolutions with padding 1 are centred there), so training targets are the input-grid labels at even voxels.

Logit channel layout (:data:`LOGIT_LAYOUT`): **channel ``128 * l + c`` holds class ``c`` of supervoxel layer
``l``** (``logits.view(B, 16, 128, ...)``). Group ``l`` of the head's last two grouped convolutions therefore
computes layer ``l`` alone. (The reference code used ``16 * c + l``, where every group mixes 8 classes of every
layer; the two layouts are a relabelling of output channels of the same architecture, but weights trained in
one are not valid in the other.)

Speed features (none changes the function computed):

- custom backward passes of the depthwise and the dilated convolutions (:class:`DepthwiseConv3d`,
  :class:`DilatedConv3d`), kept beside the model in :mod:`slicreg.network_kernels`;
- ``voxels=`` evaluates the head only at a set of output voxels (:meth:`SlicRegNet.forward`); in eval mode the
  result equals the dense head at those voxels.
- Channels-last 3-D memory format (``model.to(memory_format=torch.channels_last_3d)`` and a channels-last
  input), bf16 autocast and gradient checkpointing (:attr:`SlicRegNet.checkpointing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slicreg.errors import ConfigError, InputError
from slicreg.network_kernels import (  # the speed kernels, beside the model; re-exported for old imports
    DEPTHWISE_BACKENDS,
    DepthwiseConv3d,
    DilatedConv3d,
    depthwise_conv3d,
    depthwise_weight_grad,
    dilated_conv3d_weight_grad,
)

__all__ = [
    "N_LAYERS",
    "N_CLASSES",
    "LOGIT_LAYOUT",
    "ARCHITECTURE_VERSION",
    "BACKBONE_BLOCKS",
    "ASPP_RATES",
    "HU_SCALE",
    "MODELS",
    "TARGETS",
    "architecture_spec",
    "network_input",
    "depthwise_conv3d",
    "depthwise_weight_grad",
    "dilated_conv3d_weight_grad",
    "DilatedConv3d",
    "DepthwiseConv3d",
    "InvertedResidual",
    "Backbone",
    "ASPP",
    "GroupedHead",
    "CheckpointedNet",
    "SlicRegNet",
    "build_model",
    "initialised",
    "check_network_input",
    "dropout",
    "run_head",
    "init_weights",
    "count_parameters",
    "fold_batchnorm",
    "neighbour_rows",
]


N_LAYERS = 16
"""Supervoxel layers predicted by the network."""
N_CLASSES = 128
"""Classes per layer: 127 supervoxels + background (0)."""
LOGIT_LAYOUT = "channel = 128 * layer + class (layer-major; head group l = supervoxel layer l)"
"""The logit channel layout of :class:`SlicRegNet` (written into every model card and checked on load)."""
ARCHITECTURE_VERSION = 1
HU_SCALE = 500.0
"""Network input = HU / HU_SCALE (no clipping), as the reference."""

BACKBONE_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    # (in, mid, out, depthwise stride); block 0's first conv is a full 3x3x3 conv with stride 2
    (1, 64, 24, 1),
    (24, 128, 24, 1),
    (24, 192, 32, 1),
    (32, 192, 48, 2),
    (48, 256, 48, 1),
    (48, 256, 48, 1),
    (48, 256, 64, 1),
    (64, 384, 64, 1),
)
SKIP_BLOCKS = 2  # blocks 0-1 give the skip features (stride 2)
ASPP_RATES: tuple[int, ...] = (2, 4, 8, 16)
ASPP_CHANNELS = 128
HEAD_CHANNELS = 512
HEAD_GROUPS = N_LAYERS
DROPOUT = 0.5

MODELS = ("deeplab", "unet")
"""Feature extractors of :func:`build_model`: this module's DeepLab, or the U-Net baseline (:mod:`slicreg.unet`)."""
TARGETS = ("supervoxels", "displacement")
"""What a network predicts: template supervoxel logits (SLIC-Reg), or a dense displacement (the regression baseline,
:mod:`slicreg.regression`, DeepLab only)."""


def _check_kind(model: str, target: str, where: str) -> None:
    """One :class:`ConfigError` for a (model, target) pair :func:`build_model` cannot build."""
    if model not in MODELS:
        raise ConfigError(f"{where}: model must be one of {MODELS}, got {model!r}")
    if target not in TARGETS:
        raise ConfigError(f"{where}: target must be one of {TARGETS}, got {target!r}")
    if target == "displacement" and model != "deeplab":
        raise ConfigError(f"{where}: target 'displacement' (the regression baseline) is built on model 'deeplab' "
                          f"only, got model {model!r}")


def architecture_spec(model: str = "deeplab", target: str = "supervoxels") -> dict[str, Any]:
    """A JSON-able description of the architecture; two models with equal specs have equal state_dict shapes.

    ``model`` / ``target`` as :func:`build_model`'s: the default is this module's DeepLab; ``model="unet"`` gives
    :func:`slicreg.unet.unet_architecture_spec`, ``target="displacement"``
    :func:`slicreg.regression.regression_architecture_spec`."""
    _check_kind(model, target, "architecture_spec")
    if model == "unet":
        from slicreg.unet import unet_architecture_spec

        return unet_architecture_spec()
    if target == "displacement":
        from slicreg.regression import regression_architecture_spec

        return regression_architecture_spec()
    return {
        "name": "slicreg-deeplab3d",
        "version": ARCHITECTURE_VERSION,
        "backbone_blocks": [list(b) for b in BACKBONE_BLOCKS],
        "skip_blocks": SKIP_BLOCKS,
        "aspp_rates": list(ASPP_RATES),
        "aspp_channels": ASPP_CHANNELS,
        "aspp_pooling": "global average pool -> 1x1x1 conv with bias -> ReLU (no normalisation)",
        **supervoxel_head_spec(),
    }


def supervoxel_head_spec() -> dict[str, Any]:
    """The part of an architecture spec every supervoxel network shares: the grouped head, the logit layout, the
    output stride and the input (:func:`architecture_spec`, :func:`slicreg.unet.unet_architecture_spec`)."""
    return {
        "head_channels": HEAD_CHANNELS,
        "head_groups": HEAD_GROUPS,
        "n_layers": N_LAYERS,
        "n_classes": N_CLASSES,
        "output_stride": 2,
        "logit_layout": LOGIT_LAYOUT,
        "input": {"spacing_mm": 4.0, "normalisation": f"HU / {HU_SCALE:g}",
                  "from_2mm": "2x2x2 average pooling of the preprocessed 2 mm image"},
    }


# --------------------------------------------------------------------------------------------- input


def network_input(image_hu: Any, *, from_2mm: bool = True) -> np.ndarray:
    """The network's input array from an image in HU.

    Args:
        image_hu: ``(X, Y, Z)`` array in Hounsfield units: the preprocessed 2 mm image (192 x 160 x 256 in the
            contract) when ``from_2mm`` (default), otherwise an image already on the 4 mm grid.
        from_2mm: average-pool 2x2x2 blocks first (2 mm -> 4 mm; the 4 mm voxel ``q`` is the centre of 2 mm voxels
            ``2q, 2q + 1``, as :func:`slicreg.conventions.downsample_affine` with factor 2).

    Returns:
        float32 ``(X', Y', Z')`` = pooled HU / :data:`HU_SCALE`.

    Raises:
        InputError: not 3-D, not finite, or (``from_2mm``) an odd size.
    """
    a = np.asarray(image_hu, dtype=np.float32)
    if a.ndim != 3:
        raise InputError(f"network_input: expected an (X, Y, Z) image, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError("network_input: the image contains NaN or Inf values")
    if from_2mm:
        if any(s % 2 for s in a.shape):
            raise InputError(f"network_input: a 2 mm image needs even sizes to pool 2x2x2, got {a.shape}")
        x, y, z = (s // 2 for s in a.shape)
        a = a.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(a / np.float32(HU_SCALE))


# ------------------------------------------------------------------------------------------------ blocks


def _bn(c: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block (docs/method.md, section 5).

    ``first=True`` replaces the 1x1x1 expansion by a full 3x3x3 convolution with stride 2 (block 0)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, *, stride: int = 1, first: bool = False,
                 depthwise_backend: str = "compiled") -> None:
        super().__init__()
        if first:
            self.expand = nn.Conv3d(c_in, c_mid, 3, stride=2, padding=1, bias=False)
        else:
            self.expand = nn.Conv3d(c_in, c_mid, 1, bias=False)
        self.bn1 = _bn(c_mid)
        self.depthwise = DepthwiseConv3d(c_mid, stride=stride, backend=depthwise_backend)
        self.bn2 = _bn(c_mid)
        self.project = nn.Conv3d(c_mid, c_out, 1, bias=False)
        self.bn3 = _bn(c_out)
        self.residual = c_in == c_out and stride == 1 and not first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # inference: no copy (the conv / BN outputs are not kept)
        h = F.relu6(self.bn1(self.expand(x)), inplace=inplace)
        h = F.relu6(self.bn2(self.depthwise(h)), inplace=inplace)
        h = self.bn3(self.project(h))
        return x + h if self.residual else h


class Backbone(nn.Module):
    """The 8 inverted-residual blocks of :data:`BACKBONE_BLOCKS`; returns ``(skip, deep)``.

    ``skip``: ``(B, 24, X/2, Y/2, Z/2)`` after blocks 0-1; ``deep``: ``(B, 64, X/4, Y/4, Z/4)`` after blocks 2-7."""

    def __init__(self, *, depthwise_backend: str = "compiled") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            InvertedResidual(ci, cm, co, stride=s, first=(i == 0), depthwise_backend=depthwise_backend)
            for i, (ci, cm, co, s) in enumerate(BACKBONE_BLOCKS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == SKIP_BLOCKS - 1:
                skip = x
        return skip, x


class ASPP(nn.Module):
    """3-D atrous spatial pyramid pooling, 64 -> 128 channels (dropout is applied by :class:`SlicRegNet`).

    Branches: 1x1x1; 3x3x3 with dilation 2, 4, 8, 16 (padding = dilation), each conv + BN + ReLU; image pooling
    (global average -> 1x1x1 conv with bias -> ReLU, no normalisation, so batch size 1 trains); concatenation ->
    1x1x1 conv to 128 + BN + ReLU."""

    def __init__(self, c_in: int = BACKBONE_BLOCKS[-1][2], c_out: int = ASPP_CHANNELS,
                 rates: Sequence[int] = ASPP_RATES, *, backend: str = "compiled") -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv3d(c_in, c_out, 1, bias=False), _bn(c_out),
                                                     nn.ReLU(inplace=True))])
        for r in rates:
            self.branches.append(nn.Sequential(DilatedConv3d(c_in, c_out, dilation=r, backend=backend),
                                               _bn(c_out), nn.ReLU(inplace=True)))
        self.pool_conv = nn.Conv3d(c_in, c_out, 1, bias=True)
        n = len(self.branches) + 1
        self.project = nn.Sequential(nn.Conv3d(n * c_out, c_out, 1, bias=False), _bn(c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([b(x) for b in self.branches], 1)
        pooled = F.relu(self.pool_conv(x.mean(dim=(2, 3, 4), keepdim=True)))
        # project(concat(branches, broadcast pooled)): the pooled branch is constant over space, so its part of
        # the 1x1x1 projection is a per-sample bias -- the same function without a full-size broadcast copy
        conv, bn, relu = self.project
        n = cat.shape[1]
        y = F.conv3d(cat, conv.weight[:, :n], conv.bias) + F.conv3d(pooled.to(cat.dtype), conv.weight[:, n:])
        return relu(bn(y))


# -------------------------------------------------------------------------------------------------- head

_OFFSETS = torch.tensor([[i - 1, j - 1, k - 1] for i in range(3) for j in range(3) for k in range(3)])
"""The 27 neighbour offsets in the order of a 3x3x3 kernel's flattened (i, j, k) index."""


def neighbour_rows(voxels: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a flattened ``(B * X * Y * Z, C)`` feature map holding the 3x3x3 neighbours of voxels.

    Args:
        voxels: ``(B, N)`` int64 flat indices ``(x * Y + y) * Z + z`` into the ``(X, Y, Z)`` grid of each sample.
        shape: ``(X, Y, Z)``.

    Returns:
        ``rows`` ``(27 * B * N,)`` int64, ordered (kernel offset, sample, voxel) with the offsets in the order of
        :data:`_OFFSETS` (neighbours outside the grid are clamped onto it), and ``valid`` ``(27 * B * N,)`` bool
        (False where the neighbour lies outside the grid, i.e. in the zero padding).
    """
    x_size, y_size, z_size = (int(s) for s in shape)
    b = voxels.shape[0]
    v = voxels.reshape(1, b, -1)
    coords = torch.stack([v // (y_size * z_size), (v // z_size) % y_size, v % z_size], -1)  # (1, B, N, 3)
    nb = coords + _OFFSETS.to(voxels.device).view(27, 1, 1, 3)  # (27, B, N, 3)
    hi = torch.tensor([x_size, y_size, z_size], device=voxels.device)
    valid = ((nb >= 0) & (nb < hi)).all(-1)
    nb = torch.minimum(nb.clamp_min(0), hi - 1)
    flat = (nb[..., 0] * y_size + nb[..., 1]) * z_size + nb[..., 2]
    flat = flat + torch.arange(b, device=voxels.device).view(1, b, 1) * (x_size * y_size * z_size)
    return flat.reshape(-1), valid.reshape(-1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B * X * Y * Z, C)`` (a view for channels-last input, else one copy)."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _bn_relu_columns(h: torch.Tensor, bn: nn.BatchNorm3d, invalid: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm + ReLU of ``h`` ``(C, M)`` (one row per channel, one column per sample) with the module ``bn``.

    ``invalid``: optional int64 indices of columns that stand for a convolution's zero padding; they are 0 in the
    output. (In training mode they still enter the batch statistics: they hold clamped copies of border
    voxels' features, a few per cent of the columns.)"""
    c, m = h.shape
    z = bn(h.view(1, c, m, 1, 1))  # a fresh tensor: in-place ops on it (not on a view) stay cheap under autograd
    if invalid is not None and invalid.numel():
        z.index_fill_(2, invalid, 0.0)
    return torch.relu_(z).view(c, m)


class GroupedHead(nn.Module):
    """The supervoxel head: 152 -> 512 (1x1x1) -> 512 (3x3x3, groups 16) -> 2048 (1x1x1, groups 16).

    :meth:`forward` is the dense head on ``concat(skip, aspp_up)``; :meth:`at_voxels` evaluates the same
    function at chosen voxels only, from the 3x3x3 neighbourhood of each."""

    def __init__(self, c_skip: int = BACKBONE_BLOCKS[SKIP_BLOCKS - 1][2], c_aspp: int = ASPP_CHANNELS,
                 c_mid: int = HEAD_CHANNELS, groups: int = HEAD_GROUPS, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.groups, self.n_classes, self.c_skip = groups, n_classes, c_skip
        self.conv1 = nn.Conv3d(c_skip + c_aspp, c_mid, 1, bias=False)
        self.bn1 = _bn(c_mid)
        self.conv2 = nn.Conv3d(c_mid, c_mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = _bn(c_mid)
        self.conv3 = nn.Conv3d(c_mid, groups * n_classes, 1, groups=groups, bias=True)

    def forward(self, skip: torch.Tensor, aspp_up: torch.Tensor) -> torch.Tensor:
        """Dense head: ``skip`` ``(B, 24, X, Y, Z)``, ``aspp_up`` ``(B, 128, X, Y, Z)`` -> ``(B, 2048, X, Y, Z)``."""
        x = torch.cat([skip, aspp_up.to(skip.dtype)], 1)
        if skip.is_contiguous(memory_format=torch.channels_last_3d) and not skip.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last_3d)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.conv3(h)

    def at_voxels(self, skip: torch.Tensor, aspp_up: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        """The head at voxels: ``voxels`` ``(B, N)`` flat indices into ``(X, Y, Z)`` -> logits ``(B, 2048, N)``.

        In eval mode this equals :meth:`forward` at those voxels (same logit layout). In training mode the
        BatchNorm statistics come from the evaluated samples: the 3x3x3 neighbourhoods of the voxels for the
        first BN, the voxels themselves for the second -- a random sample of what the dense head would use."""
        if isinstance(self.bn1, nn.Identity):
            raise InputError("GroupedHead: a head with folded BatchNorm (fold_batchnorm) is evaluated densely only; "
                             "voxels= needs the trained model")
        b, n_vox = voxels.shape
        g, c_mid = self.groups, self.conv1.out_channels
        cg = c_mid // g
        rows, valid = neighbour_rows(voxels, skip.shape[2:])
        invalid = torch.nonzero(~valid).flatten()
        n = b * n_vox
        # 1x1x1 conv at the 27 * n neighbours, channel-major: (512, 27 * n), columns ordered (offset, voxel)
        x = torch.cat([_rows(skip).index_select(0, rows), _rows(aspp_up).index_select(0, rows).to(skip.dtype)], 1)
        h = torch.mm(self.conv1.weight.reshape(c_mid, -1), x.t())
        h = _bn_relu_columns(h, self.bn1, invalid)
        # grouped 3x3x3 conv: per group (cg, cg * 27) @ (cg * 27, n); rows of h per group are (channel, offset)
        h = torch.bmm(self.conv2.weight.reshape(g, cg, cg * 27).to(h.dtype), h.view(g, cg * 27, n))
        h = _bn_relu_columns(h.view(c_mid, n), self.bn2, None)
        w3 = self.conv3.weight.reshape(g, self.n_classes, cg).to(h.dtype)
        logits = torch.baddbmm(self.conv3.bias.view(g, self.n_classes, 1).to(h.dtype), w3, h.view(g, cg, n))
        return logits.view(g * self.n_classes, b, n_vox).permute(1, 0, 2)


# ------------------------------------------------------------------------------------------------- model


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics unchanged inside (for checkpoint recomputation)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _checkpointed(module: nn.Module, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` under non-reentrant gradient checkpointing; the recomputation does not touch BN stats."""
    from torch.utils.checkpoint import checkpoint

    calls = {"n": 0}

    def run(*a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            return fn(*a)
        with _frozen_batchnorm_stats(module):
            return fn(*a)

    return checkpoint(run, *args, use_reentrant=False)


class CheckpointedNet(nn.Module):
    """A network whose parts run under gradient checkpointing in training when :attr:`checkpointing` is set
    (:meth:`_run`); the base of :class:`SlicRegNet` and :class:`slicreg.unet.SlicUNet`."""

    checkpointing: bool = False

    def _run(self, module: nn.Module, fn: Any, *args: Any) -> Any:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return _checkpointed(module, fn, *args)
        return fn(*args)


class SlicRegNet(CheckpointedNet):
    """The full network (see the module docstring).

    Args:
        backward: gradient implementation (changes neither the function nor the state_dict):
            ``"compiled"`` (default): depthwise convolutions with the fused compiled weight-gradient kernel of
            :func:`depthwise_conv3d`, dilated ASPP convolutions with the GEMM weight gradient of
            :func:`dilated_conv3d_weight_grad`; ``"eager"``: the same without compilation (tests, float64);
            ``"native"``: torch's own backward everywhere (the faithful reference).
        checkpointing: gradient checkpointing of every backbone block, the ASPP and the head in training (less
            memory, more compute: docs/measurements.md; gradients are the same).

    Call: ``model(image, voxels=None, generator=None)``:

    - ``image``: ``(B, 1, X, Y, Z)`` normalised input (:func:`network_input`), X, Y, Z divisible by 4;
    - ``voxels``: optional ``(B, N)`` int64 flat indices ``(x * Y' + y) * Z' + z`` into the output grid
      ``(X', Y', Z') = (X/2, Y/2, Z/2)``; the head is then evaluated only there and the result is ``(B, 2048, N)``
      (the dense output ``(B, 2048, X', Y', Z')`` flattened and taken at those voxels);
    - ``generator``: optional ``torch.Generator`` for the dropout mask (training), for reproducible runs.
    """

    def __init__(self, *, backward: str = "compiled", checkpointing: bool = False) -> None:
        super().__init__()
        if backward not in DEPTHWISE_BACKENDS:
            raise InputError(f"SlicRegNet: backward must be one of {DEPTHWISE_BACKENDS}, got {backward!r}")
        self.backbone = Backbone(depthwise_backend=backward)
        self.aspp = ASPP(backend=backward)
        self.head = GroupedHead()
        self.checkpointing = checkpointing

    @property
    def backward(self) -> str:
        """How gradients of the depthwise and dilated convolutions are computed (see the class docstring)."""
        return self.backbone.blocks[0].depthwise.backend

    @backward.setter
    def backward(self, value: str) -> None:
        if value not in DEPTHWISE_BACKENDS:
            raise InputError(f"backward must be one of {DEPTHWISE_BACKENDS}, got {value!r}")
        for m in self.modules():
            if isinstance(m, (DepthwiseConv3d, DilatedConv3d)):
                m.backend = value

    def features(self, image: torch.Tensor, *, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's inputs at stride 2: skip features ``(B, 24, X/2, Y/2, Z/2)`` and the (dropped-out) ASPP
        output upsampled x2 trilinearly ``(B, 128, X/2, Y/2, Z/2)``."""
        check_network_input(image, type(self).__name__)
        x = image
        for i, block in enumerate(self.backbone.blocks):
            x = self._run(block, block, x)
            if i == SKIP_BLOCKS - 1:
                skip = x
        a = dropout(self._run(self.aspp, self.aspp, x), training=self.training, generator=generator)
        a = F.interpolate(a, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return skip, a

    def forward(self, image: torch.Tensor, *, voxels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return run_head(self, *self.features(image, generator=generator), voxels)


def check_network_input(image: torch.Tensor, who: str) -> None:
    """An input ``(B, 1, X, Y, Z)`` with X, Y, Z positive multiples of 4 (the networks' two stride-2 steps)."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise InputError(f"{who}: expected an image (B, 1, X, Y, Z), got shape {tuple(image.shape)}")
    if any(s % 4 for s in image.shape[2:]) or min(image.shape[2:]) < 4:
        raise InputError(f"{who}: spatial sizes must be positive multiples of 4, got {tuple(image.shape[2:])}")


def dropout(x: torch.Tensor, *, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dropout (:data:`DROPOUT`) of the features before the head, its mask drawn from ``generator``; identity in
    eval mode."""
    if not training or DROPOUT <= 0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - DROPOUT, generator=generator)
    return x * keep * (1.0 / (1.0 - DROPOUT))


def run_head(net: nn.Module, skip: torch.Tensor, feats: torch.Tensor, voxels: torch.Tensor | None) -> torch.Tensor:
    """``net.head`` on the stride-2 features: dense, or at ``voxels`` ``(B, N)`` (flat indices into the output
    grid, checked here) through the head's ``at_voxels``; under ``net``'s gradient checkpointing."""
    if voxels is None:
        return net._run(net.head, net.head, skip, feats)
    who = type(net).__name__
    out_size = int(np.prod(skip.shape[2:]))
    if voxels.dim() != 2 or voxels.shape[0] != skip.shape[0]:
        raise InputError(f"{who}: voxels must be (B, N) = ({skip.shape[0]}, N), got {tuple(voxels.shape)}")
    if voxels.numel() and (int(voxels.min()) < 0 or int(voxels.max()) >= out_size):
        raise InputError(f"{who}: voxel indices must lie in [0, {out_size}) for the output grid "
                         f"{tuple(skip.shape[2:])}")
    return net._run(net.head, net.head.at_voxels, skip, feats, voxels.to(torch.int64))


def init_weights(model: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """Kaiming-normal (fan_out, ReLU gain) for every convolution, zero biases, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, DepthwiseConv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build_model(*, seed: int | None = 0, backward: str = "compiled", checkpointing: bool = False,
                device: Any = "cpu", channels_last: bool = False, model: str = "deeplab",
                target: str = "supervoxels") -> nn.Module:
    """A freshly initialised network (``seed`` makes the initialisation reproducible).

    Args:
        seed, backward, checkpointing: see :class:`SlicRegNet`.
        device, channels_last: where the weights live, and whether in channels-last 3-D memory format.
        model: ``"deeplab"`` (default: :class:`SlicRegNet`) or ``"unet"`` (the U-Net baseline,
            :func:`slicreg.unet.build_unet`).
        target: ``"supervoxels"`` (default: the supervoxel logits) or ``"displacement"`` (the regression baseline on
            the DeepLab, :func:`slicreg.regression.build_regression`).

    Raises:
        ConfigError: an unknown ``model`` or ``target``, or ``target="displacement"`` with ``model="unet"``.
    """
    _check_kind(model, target, "build_model")
    if model == "unet":
        from slicreg.unet import build_unet

        return build_unet(seed=seed, checkpointing=checkpointing, device=device, channels_last=channels_last,
                          backward=backward)
    if target == "displacement":
        from slicreg.regression import build_regression

        return build_regression(seed=seed, checkpointing=checkpointing, device=device, channels_last=channels_last,
                                backward=backward)
    return initialised(SlicRegNet(backward=backward, checkpointing=checkpointing), seed=seed, device=device,
                       channels_last=channels_last)


def initialised(net: nn.Module, *, seed: int | None = 0, device: Any = "cpu", channels_last: bool = False) -> nn.Module:
    """``net`` initialised by :func:`init_weights` (seeded by ``seed``), moved to ``device``, optionally in
    channels-last 3-D memory format: the last step of every ``build_*`` function."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    init_weights(net, generator=gen)
    net = net.to(device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def _folded_conv(conv: nn.Module, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """A plain ``nn.Conv3d`` with a bias computing ``bn(conv(x))`` of an eval-mode pair (no grad path)."""
    groups = conv.channels if isinstance(conv, DepthwiseConv3d) else conv.groups
    stride = conv.stride if isinstance(conv, DepthwiseConv3d) else conv.stride[0]
    kernel, padding = conv.weight.shape[2], (1 if isinstance(conv, DepthwiseConv3d) else conv.padding[0])
    dilation = 1 if isinstance(conv, DepthwiseConv3d) else conv.dilation[0]
    w = conv.weight.detach()
    fused = nn.Conv3d(w.shape[1] * groups, w.shape[0], kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=True).to(device=w.device, dtype=w.dtype)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if getattr(conv, "bias", None) is not None else torch.zeros_like(scale)
    with torch.no_grad():
        fused.weight.copy_(w * scale.view(-1, 1, 1, 1, 1))
        fused.bias.copy_(bn.bias.detach() + (bias - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of a trained :class:`SlicRegNet` (or a model built on its backbone and ASPP) into the
    convolution before it, in place, for inference: ``bn(conv(x)) = conv'(x)`` with ``w' = w * s`` and
    ``b' = beta + (b - mean) * s``, ``s = gamma / sqrt(var + eps)`` per output channel; the BatchNorm becomes
    ``nn.Identity``. The function computed in eval mode is the same up to rounding (the network passes run in
    bf16 on the CPU; one fewer pass over every activation: docs/register.md, "What was made faster"). The
    result is for inference only: it is put in eval mode, has a different state_dict and refuses ``voxels=``
    (the sparse head is a training path). Modules it does not know are left as they are."""
    model.eval()
    channels_last = any(p.dim() == 5 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last_3d)
                        for p in model.parameters())
    for block in model.modules():
        if isinstance(block, InvertedResidual):
            for conv, bn in (("expand", "bn1"), ("depthwise", "bn2"), ("project", "bn3")):
                setattr(block, conv, _folded_conv(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
        elif isinstance(block, ASPP):
            for seq in [*block.branches, block.project]:
                if isinstance(seq[1], nn.BatchNorm3d):
                    seq[0], seq[1] = _folded_conv(seq[0], seq[1]), nn.Identity()
        elif isinstance(block, GroupedHead):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                setattr(block, conv, _folded_conv(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
    if channels_last:  # the new convolutions in the model's memory format
        model.to(memory_format=torch.channels_last_3d)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per part and ``total``: the parts a model names in its ``parameter_parts`` (the U-Net:
    ``encoder``, ``decoder``, ``head``), else those of ``backbone``, ``aspp``, ``head`` it has (the DeepLab's)."""
    names = getattr(model, "parameter_parts", None) or [n for n in ("backbone", "aspp", "head") if hasattr(model, n)]
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in names}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts
