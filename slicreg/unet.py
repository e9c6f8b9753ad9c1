"""Slic-UNet: the supervoxel classification of SLIC-Reg with a plain 3-D U-Net in place of the DeepLab (a baseline).

The paper compares SLIC-Reg's DeepLab with a U-Net of about the same size that predicts the same thing: the 16
layers x 128 template supervoxel classes at stride 2 of the 4 mm input, through the same grouped head, trained
with the same loss and budget. :class:`SlicUNet` is that network; it has exactly the call contract of
:class:`slicreg.network.SlicRegNet`, so training (:mod:`slicreg.train`), bundles (:mod:`slicreg.bundle`) and
prediction (:mod:`slicreg.registration`) use it unchanged.

Architecture (:func:`unet_architecture_spec`), input ``(B, 1, X, Y, Z)`` at 4 mm (96 x 80 x 128 in training):

- **Encoder** (:data:`ENCODER_CHANNELS` = 16, 32, 64, 112 channels at strides 2, 4, 8, 16): per level a 3x3x3
  convolution with stride 2 and padding 1, then a 3x3x3 convolution with stride 1 (each conv without bias + BN +
  ReLU). The first level's output (stride 2, 16 channels) is the head's skip input, as the DeepLab's blocks 0-1.
- **Decoder** (:data:`DECODER_CHANNELS` = 64, 32 channels at strides 8, 4): per level the coarser features
  upsampled x2 trilinearly (``align_corners=False``, as the DeepLab's ASPP upsampling), concatenated with the
  encoder's features of that level, then two 3x3x3 conv + BN + ReLU.
- **Dropout** 0.5 on the decoder's stride-4 output (training only; the mask from the call's ``generator``), then
  trilinear x2 upsampling to stride 2: the same place and rate as the DeepLab's dropout on its ASPP output, so
  that the two networks differ in the feature extractor only.
- **Head**: :class:`slicreg.network.GroupedHead` on concat(skip 16, decoder 32) = 48 channels -> 512 (1x1x1) ->
  512 (3x3x3, groups 16) -> 2048 (1x1x1, groups 16): the same code, logit layout (channel ``128 * l + c`` = class
  ``c`` of layer ``l``) and sparse evaluation at voxels (:meth:`GroupedHead.at_voxels`) as the DeepLab's. The
  head's concatenation + 1x1x1 convolution is the U-Net's last (stride-2) decoder fusion.
- 1,810,096 parameters in total (the DeepLab: 1,807,680): encoder 747,824, decoder 525,696, head 536,576.

Output voxel ``q`` is centred on input voxel ``2 q`` as the DeepLab's: the output grid is the first encoder
level's, made by a 3x3x3 convolution with stride 2 and padding 1; every coarser level halves the grid the same
way, and each trilinear x2 upsampling (``align_corners=False``) maps a shift by one coarse voxel to a shift by two
fine ones, so a shift of the input by 16 voxels shifts the output by exactly 8 away from the borders
(tests/test_unet.py). Sizes divisible by 16 (96 x 80 x 128 is) keep every level's grid exactly half the finer one;
other multiples of 4 work too (the coarse grids round up and the upsampling goes to the finer level's exact size).
In training mode the stride-16 level needs more than one value per channel for its BatchNorm (batch x voxels > 1:
inputs of at least 16 voxels a side with batch 2, or 32 with batch 1).

Speed features: channels-last 3-D input and weights, bf16 autocast, ``voxels=`` (the head at chosen voxels only)
and gradient checkpointing (:attr:`SlicUNet.checkpointing`: every encoder and decoder level and the head, the
same gradients) work as in the DeepLab. The U-Net has no custom convolution kernels: its :attr:`SlicUNet.backward`
accepts the DeepLab's values (``"compiled"``, ``"eager"``, ``"native"``) so that one configuration drives both
networks, and changes nothing (torch's own backward everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slicreg.errors import InputError
from slicreg.network import (
    DEPTHWISE_BACKENDS,
    DROPOUT,
    CheckpointedNet,
    GroupedHead,
    check_network_input,
    dropout,
    initialised,
    run_head,
    supervoxel_head_spec,
)

__all__ = ["ENCODER_CHANNELS", "DECODER_CHANNELS", "UNET_ARCHITECTURE_VERSION", "ConvBNReLU", "EncoderLevel",
           "DecoderLevel", "SlicUNet", "build_unet", "unet_architecture_spec"]

ENCODER_CHANNELS: tuple[int, ...] = (16, 32, 64, 112)
"""Encoder widths at strides 2, 4, 8, 16 (chosen for a parameter count within 0.2 % of the DeepLab's)."""
DECODER_CHANNELS: tuple[int, ...] = (64, 32)
"""Decoder widths at strides 8 and 4 (the stride-4 output, upsampled, is the head's second input)."""
UNET_ARCHITECTURE_VERSION = 1


def unet_architecture_spec() -> dict[str, Any]:
    """A JSON-able description of :class:`SlicUNet` with the default widths; equal specs, equal state_dict shapes."""
    return {
        "name": "slicreg-unet3d",
        "version": UNET_ARCHITECTURE_VERSION,
        "encoder_channels": list(ENCODER_CHANNELS),
        "encoder_strides": [2 ** (i + 1) for i in range(len(ENCODER_CHANNELS))],
        "encoder_level": "3x3x3 conv stride 2 padding 1 + BN + ReLU, 3x3x3 conv + BN + ReLU (convs without bias)",
        "decoder_channels": list(DECODER_CHANNELS),
        "decoder_level": "trilinear x2 upsampling (align_corners=False), concat encoder level, "
                         "2 x (3x3x3 conv + BN + ReLU)",
        "dropout": DROPOUT,
        "head_inputs": [ENCODER_CHANNELS[0], DECODER_CHANNELS[-1]],
        **supervoxel_head_spec(),
    }


class ConvBNReLU(nn.Sequential):
    """3x3x3 convolution (padding 1, no bias; stride 1 or 2) + BatchNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1) -> None:
        super().__init__(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out),
                         nn.ReLU(inplace=True))


class EncoderLevel(nn.Sequential):
    """One encoder level: :class:`ConvBNReLU` with stride 2 (halves the grid; output voxel ``q`` is centred on
    input voxel ``2 q``), then one with stride 1."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(ConvBNReLU(c_in, c_out, stride=2), ConvBNReLU(c_out, c_out))


def _up_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` upsampled trilinearly (``align_corners=False``) to the grid of ``like``, in ``like``'s dtype."""
    return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False).to(like.dtype)


class DecoderLevel(nn.Module):
    """One decoder level: ``deep`` upsampled to the grid of ``skip``, concatenated with it, then two
    :class:`ConvBNReLU`."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.fuse = ConvBNReLU(c_deep + c_skip, c_out)
        self.conv = ConvBNReLU(c_out, c_out)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([_up_to(deep, skip), skip], 1)
        if skip.is_contiguous(memory_format=torch.channels_last_3d) and not skip.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.conv(self.fuse(x))


class SlicUNet(CheckpointedNet):
    """The U-Net baseline (see the module docstring), with the call contract of :class:`slicreg.network.SlicRegNet`.

    Args:
        backward: accepted for the DeepLab's configuration (``"compiled"``, ``"eager"``, ``"native"``); the U-Net
            has no custom kernels, so every value means torch's own backward.
        checkpointing: gradient checkpointing of every encoder and decoder level and the head in training (less
            memory, more compute; the same gradients and BatchNorm statistics).
        encoder_channels, decoder_channels: the widths (default :data:`ENCODER_CHANNELS`,
            :data:`DECODER_CHANNELS`; bundles hold the defaults only, :func:`unet_architecture_spec`).

    Call: ``model(image, voxels=None, generator=None)`` as :class:`slicreg.network.SlicRegNet`: ``image``
    ``(B, 1, X, Y, Z)`` normalised (:func:`slicreg.network.network_input`), X, Y, Z multiples of 4 -> logits
    ``(B, 2048, X/2, Y/2, Z/2)``, or ``(B, 2048, N)`` at ``voxels`` ``(B, N)`` (flat indices into the output grid);
    ``generator`` draws the dropout mask in training.
    """

    parameter_parts = ("encoder", "decoder", "head")
    """The parts :func:`slicreg.network.count_parameters` counts."""

    def __init__(self, *, backward: str = "compiled", checkpointing: bool = False,
                 encoder_channels: Sequence[int] = ENCODER_CHANNELS,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS) -> None:
        super().__init__()
        enc, dec = tuple(int(c) for c in encoder_channels), tuple(int(c) for c in decoder_channels)
        if len(enc) < 3 or len(dec) != len(enc) - 2 or min(enc + dec) < 1:
            raise InputError(f"SlicUNet: expected >= 3 encoder widths (strides 2, 4, 8, ...) and one decoder width per "
                             f"level from the second-coarsest down to stride 4 (len(encoder) - 2), all positive, got "
                             f"encoder {enc}, decoder {dec}")
        self.encoder = nn.ModuleList(EncoderLevel(c_in, c_out) for c_in, c_out in zip((1, *enc[:-1]), enc))
        levels, deep = [], enc[-1]
        for skip, c_out in zip(enc[-2:0:-1], dec):  # encoder levels at strides 2^(L-1) .. 4
            levels.append(DecoderLevel(deep, skip, c_out))
            deep = c_out
        self.decoder = nn.ModuleList(levels)
        self.head = GroupedHead(c_skip=enc[0], c_aspp=dec[-1])
        self.checkpointing = checkpointing
        self._backward = "compiled"
        self.backward = backward

    @property
    def backward(self) -> str:
        """The DeepLab's gradient setting, kept for one configuration of both networks; no effect here (no custom
        kernels: torch's own backward for every value)."""
        return self._backward

    @backward.setter
    def backward(self, value: str) -> None:
        if value not in DEPTHWISE_BACKENDS:
            raise InputError(f"backward must be one of {DEPTHWISE_BACKENDS}, got {value!r}")
        self._backward = value

    def features(self, image: torch.Tensor, *, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's inputs at stride 2: the first encoder level ``(B, 16, X/2, Y/2, Z/2)`` and the (dropped-out)
        stride-4 decoder output upsampled x2 trilinearly ``(B, 32, X/2, Y/2, Z/2)``."""
        check_network_input(image, type(self).__name__)
        skips = []
        x = image
        for level in self.encoder:
            x = self._run(level, level, x)
            skips.append(x)
        for level, skip in zip(self.decoder, skips[-2:0:-1]):
            x = self._run(level, level, x, skip)
        x = dropout(x, training=self.training, generator=generator)
        return skips[0], _up_to(x, skips[0])

    def forward(self, image: torch.Tensor, *, voxels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return run_head(self, *self.features(image, generator=generator), voxels)


def build_unet(*, seed: int | None = 0, checkpointing: bool = False, device: Any = "cpu", channels_last: bool = False,
               backward: str = "compiled") -> SlicUNet:
    """A freshly initialised :class:`SlicUNet` (``seed`` makes the initialisation reproducible), initialised as the
    DeepLab (:func:`slicreg.network.init_weights`); the arguments as :func:`slicreg.network.build_model`'s."""
    return initialised(SlicUNet(backward=backward, checkpointing=checkpointing), seed=seed, device=device,
                       channels_last=channels_last)
