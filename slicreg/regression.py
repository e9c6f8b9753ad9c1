"""The "Regression" baseline of the paper: SLIC-Reg's DeepLab regressing the dense displacement to the template.

The network (:class:`RegressionNet`) is :class:`slicreg.network.SlicRegNet` with another head: the same
:class:`~slicreg.network.Backbone` and :class:`~slicreg.network.ASPP`, the same :meth:`~slicreg.network.SlicRegNet.
features` (inherited, not copied: skip features + dropped-out ASPP output upsampled x2, at stride 2), and a
:class:`~slicreg.network.GroupedHead` with one group and 3 outputs::

    concat(skip 24, ASPP up 128) = 152 -> 1x1x1 conv 128 (no bias) + BN + ReLU -> 3x3x3 conv 128 -> 128 + BN + ReLU
    -> 1x1x1 conv 128 -> 3 with a bias, zero-initialised (training starts at u = 0)

so the forward contract, ``voxels=`` (the head evaluated at chosen output voxels only, equal to the dense head in
eval mode), ``checkpointing`` and ``backward`` are SlicRegNet's.

Output: ``(B, 3, X/2, Y/2, Z/2)`` for a ``(B, 1, X, Y, Z)`` 4 mm input: **the displacement from the scan to the
template in voxels of the 2 mm grid** (channel ``a`` = array axis ``a``; fixed = the scan, moving = the template:
scan 2 mm voxel ``x`` corresponds to template 2 mm voxel ``x + u(x)``, :mod:`slicreg.conventions`). The unit is the
2 mm voxel because the training targets (the transfer stage's fields, ``fields/disp_<id>_<template>.nii.gz``) and
the registration both live on the preprocessed 2 mm grid, so neither side converts units.

Geometry: output voxel ``q`` is centred on 4 mm input voxel ``2 q`` (the stride-2 convolutions with padding 1), and
4 mm voxel ``m`` is the centre of 2 mm voxels ``2m, 2m + 1``, i.e. the 2 mm position ``2 m + 0.5``
(:func:`slicreg.grid.downsample_index_map`); so output voxel ``q`` predicts ``u`` at the 2 mm position ``4 q + 0.5``
(:data:`OUTPUT_TO_2MM`), and 2 mm voxel ``p`` sits at output coordinate ``(p - 0.5) / 4``. :func:`predict_displacement`
upsamples with exactly this map (trilinear, border clamping beyond the outermost output voxels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slicreg.errors import InputError
from slicreg.network import (
    BACKBONE_BLOCKS,
    SKIP_BLOCKS,
    GroupedHead,
    SlicRegNet,
    architecture_spec,
    initialised,
    network_input,
)

__all__ = [
    "REGRESSION_ARCHITECTURE_VERSION",
    "REGRESSION_HEAD_CHANNELS",
    "FIELD_SPACING_MM",
    "OUTPUT_TO_2MM",
    "RegressionNet",
    "build_regression",
    "regression_architecture_spec",
    "predict_displacement",
]

REGRESSION_ARCHITECTURE_VERSION = 1
REGRESSION_HEAD_CHANNELS = 128
"""Width of the displacement head's two hidden layers."""
N_COMPONENTS = 3
FIELD_SPACING_MM = 2.0
"""The voxel size of the grid whose voxels are the displacement's unit (the preprocessed 2 mm grid)."""


def _output_to_2mm() -> np.ndarray:
    from slicreg.grid import downsample_index_map

    # output voxel q -> 4 mm input voxel 2q -> 2 mm voxel 2 (2q) + 0.5
    return downsample_index_map(2) @ np.diag([2.0, 2.0, 2.0, 1.0])


OUTPUT_TO_2MM: np.ndarray = _output_to_2mm()
"""4x4 map from the network's output voxels to 2 mm voxels: ``q -> 4 q + 0.5``."""


class RegressionNet(SlicRegNet):
    """SLIC-Reg's DeepLab with a dense displacement head (see the module docstring).

    Args:
        backward, checkpointing: as :class:`slicreg.network.SlicRegNet`.

    Call: ``model(image, voxels=None, generator=None)`` exactly as :class:`~slicreg.network.SlicRegNet`; returns
    ``(B, 3, X/2, Y/2, Z/2)`` (or ``(B, 3, N)`` with ``voxels``): the displacement scan -> template in 2 mm voxels.
    """

    def __init__(self, *, backward: str = "compiled", checkpointing: bool = False) -> None:
        super().__init__(backward=backward, checkpointing=checkpointing)
        # the supervoxel head replaced by a one-group GroupedHead with 3 outputs: its dense forward and its
        # evaluation at voxels (at_voxels) are the same code as the supervoxel head's
        self.head = GroupedHead(c_mid=REGRESSION_HEAD_CHANNELS, groups=1, n_classes=N_COMPONENTS)


def build_regression(*, seed: int | None = 0, checkpointing: bool = False, device: Any = "cpu",
                     channels_last: bool = False, backward: str = "compiled") -> RegressionNet:
    """A freshly initialised :class:`RegressionNet`: :func:`slicreg.network.init_weights` (seeded by ``seed``), then
    the head's last convolution (weights and bias) set to zero, so the untrained network predicts ``u = 0``."""
    model = initialised(RegressionNet(backward=backward, checkpointing=checkpointing), seed=seed, device=device,
                        channels_last=channels_last)
    with torch.no_grad():
        model.head.conv3.weight.zero_()
        model.head.conv3.bias.zero_()
    return model


def regression_architecture_spec() -> dict[str, Any]:
    """A JSON-able description of :class:`RegressionNet` (backbone and ASPP entries from
    :func:`slicreg.network.architecture_spec`); two models with equal specs have equal state_dict shapes."""
    spec = architecture_spec()
    for key in ("head_channels", "head_groups", "n_layers", "n_classes", "logit_layout"):
        spec.pop(key, None)
    c_in = BACKBONE_BLOCKS[SKIP_BLOCKS - 1][2] + spec["aspp_channels"]
    spec.update({
        "name": "slicreg-deeplab3d-regression",
        "version": REGRESSION_ARCHITECTURE_VERSION,
        "head": f"concat(skip, aspp x2) {c_in} -> 1x1x1 conv {REGRESSION_HEAD_CHANNELS} + BN + ReLU -> 3x3x3 conv "
                f"{REGRESSION_HEAD_CHANNELS} + BN + ReLU -> 1x1x1 conv {N_COMPONENTS} with bias (zero-initialised)",
        "head_channels": REGRESSION_HEAD_CHANNELS,
        "output_channels": N_COMPONENTS,
        "output": {"quantity": "displacement scan -> template (fixed = scan, moving = template)",
                   "unit": f"voxels of the {FIELD_SPACING_MM:g} mm grid",
                   "channels": "array axes 0, 1, 2",
                   "voxel_centres": "output voxel q is centred on 4 mm input voxel 2q = 2 mm voxel 4q + 0.5"},
    })
    return spec


@torch.no_grad()
def predict_displacement(model: Any, image_hu_2mm: Any, *, device: Any = "cpu",
                         dtype: torch.dtype | None = None) -> np.ndarray:
    """The displacement from a preprocessed scan to the template on the scan's 2 mm grid (atlas mode).

    Args:
        model: a :class:`RegressionNet` (or an object holding one as ``.model``, e.g. a bundle); put in eval mode
            on ``device``.
        image_hu_2mm: ``(X, Y, Z)`` preprocessed 2 mm image in HU, sizes divisible by 8 (192 x 160 x 256).
        device: where the network runs.
        dtype: ``None`` (bf16 autocast on CPU, fp16 on CUDA, as supervoxel prediction; the head's output is then
            rounded to 8 significant bits, e.g. to 1/16 voxel between 8 and 16 voxels) or ``torch.float32``.

    Returns:
        float32 ``(3, X, Y, Z)``: ``u`` in 2 mm voxels, fixed = the scan, moving = the template (scan voxel ``p``
        corresponds to template voxel ``p + u(p)``).

    The input is prepared as for supervoxel prediction (:func:`slicreg.network.network_input` with ``from_2mm``,
    then :func:`slicreg.bundle.network_pass_input`). The stride-2 output is upsampled to the 2 mm grid with
    :func:`slicreg.fields.sample_affine` (trilinear, ``"border"`` padding: beyond the outermost output voxel
    centres the edge value continues) through :data:`OUTPUT_TO_2MM`: 2 mm voxel ``p`` reads output coordinate
    ``(p - 0.5) / 4``.

    Raises:
        InputError: not a 3-D image with sizes divisible by 8, or NaN/Inf values.
    """
    from slicreg.bundle import network_pass_input
    from slicreg.fields import sample_affine
    from slicreg.network import HU_SCALE

    net = getattr(model, "model", model)
    img = image_hu_2mm.detach().cpu().numpy() if isinstance(image_hu_2mm, torch.Tensor) else np.asarray(image_hu_2mm)
    if img.ndim != 3 or any(s % 8 for s in img.shape):
        raise InputError(f"predict_displacement: expected a 2 mm image (X, Y, Z) with sizes divisible by 8, got shape "
                         f"{img.shape}")
    hu_4mm = network_input(img, from_2mm=True) * np.float32(HU_SCALE)  # checks finiteness
    net, x, dtype, _ = network_pass_input(net, hu_4mm, device=device, dtype=dtype)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = net(x)
    if out.dim() != 5 or out.shape[:2] != (1, N_COMPONENTS):
        raise InputError(f"predict_displacement: the model returned {tuple(out.shape)}, expected a displacement "
                         f"(1, 3, X', Y', Z') (is it a regression model?)")
    coarse = out[0].float().contiguous()
    to_output = np.linalg.inv(OUTPUT_TO_2MM)  # 2 mm voxel p -> output coordinate (p - 0.5) / 4
    field = sample_affine(coarse, to_output, img.shape, interpolation="linear", padding="border",
                          backend="grid_sample", align_corners=False)
    return field.cpu().numpy().astype(np.float32, copy=False)

