"""Registration by supervoxels (SLIC-Reg inference, SLICREG_SPEC.md section 7) for preprocessed scans.

Both scans are preprocessed CT (2 mm, typically 192 x 160 x 256, HU). The network predicts the 16 supervoxel
maps of each scan; the template's own supervoxels may stand for the template side (atlas mode). The maps are
put in correspondence by the Adam keypoint flow of :mod:`slicreg.flow`, whose thin-plate spline gives the dense
field on the fixed 2 mm grid (voxels, fixed -> moving).

Prediction: the network's logits ``(16, 128, X/4, Y/4, Z/4)`` (stride 2 of its 4 mm input) -> per-layer argmax ->
nearest upsampling to the 4 mm supervoxel grid. Output voxel ``q`` of the network is centred on 4 mm voxel
``2q`` (see :mod:`slicreg.network`), so 4 mm voxel ``p`` takes the label of output voxel ``floor(p / 2 + 0.5)``.
Argmax maps rather than softmax probabilities: the features are average-pooled to the same stride-2 grid
anyway, the label path keeps memory at a few hundred MB (probabilities are 1 GB in float32) and it is the path
tested against known displacements. The reference's rule (logits upsampled linearly, then argmax) is
``upsample="linear"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slicreg.errors import InputError

__all__ = ["RegistrationResult", "predict_supervoxels", "upsample_labels_stride2", "register_supervoxel_maps",
           "register_preprocessed", "FLOW_DEFAULTS"]

FLOW_DEFAULTS: dict[str, Any] = {"init": "centres"}
"""Flow settings used by registration, on top of :data:`slicreg.flow.DEFAULTS`.

``init="centres"`` starts the Adam flow from matched supervoxel centres, so that scans need no affine
pre-alignment (the capture range of the flow from zero is ~15-25 supervoxel voxels, 60-100 mm)."""


@dataclass
class RegistrationResult:
    """A registration on the fixed grid.

    Attributes:
        disp_vox: ``(3, X, Y, Z)`` float32, voxels of the fixed grid, fixed -> moving.
        info: timings (``timings_s``), flow diagnostics and parameters (JSON-ready values only).
    """

    disp_vox: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def upsample_labels_stride2(labels: Any) -> Any:
    """Nearest upsampling of network-output labels ``(L, x, y, z)`` to the input grid ``(L, 2x, 2y, 2z)``.

    Input-grid voxel ``p`` takes output voxel ``floor(p / 2 + 0.5)`` (clamped): output voxel ``q`` is centred on
    input voxel ``2q``."""
    import torch

    if labels.dim() != 4:
        raise InputError(f"upsample_labels_stride2: expected (L, x, y, z), got {tuple(labels.shape)}")
    out = labels
    for axis in (1, 2, 3):
        n = labels.shape[axis]
        idx = torch.clamp(torch.div(torch.arange(2 * n, device=labels.device) + 1, 2, rounding_mode="floor"),
                          max=n - 1)
        out = out.index_select(axis, idx)
    return out


def predict_supervoxels(model: Any, image_hu: np.ndarray, *, device: Any = "cpu",
                        upsample: str = "nearest") -> np.ndarray:
    """Predict the supervoxel maps of a preprocessed scan on its 4 mm grid.

    Args:
        model: a :class:`slicreg.network.SlicRegNet` or a :class:`slicreg.bundle.Bundle` (eval mode, bf16
            autocast on CPU / fp16 on CUDA: see :func:`slicreg.bundle.predict`).
        image_hu: ``(X, Y, Z)`` preprocessed 2 mm image in HU (sizes divisible by 8, e.g. 192 x 160 x 256).
        device: where to run.
        upsample: ``"nearest"`` (default): per-layer argmax on the network's stride-2 grid, then nearest
            upsampling (:func:`upsample_labels_stride2`; ~0.1 s); ``"linear"``: logits upsampled x2 linearly per
            layer, then argmax (the reference's rule; ~16 full-size 128-channel volumes, several seconds on a CPU).

    Returns:
        uint8 ``(16, X/2, Y/2, Z/2)``: labels 0..127 per layer on the 4 mm grid of the scan.
    """
    import torch

    from slicreg.bundle import predict
    from slicreg.network import HU_SCALE, network_input

    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3 or any(s % 8 for s in image_hu.shape):
        raise InputError(f"predict_supervoxels: expected a 2 mm image (X, Y, Z) with sizes divisible by 8, "
                         f"got shape {image_hu.shape}")
    if upsample not in ("nearest", "linear"):
        raise InputError(f"predict_supervoxels: upsample must be 'nearest' or 'linear', got {upsample!r}")
    hu_4mm = network_input(image_hu, from_2mm=True) * np.float32(HU_SCALE)
    if upsample == "linear":
        return predict(model, hu_4mm, output="labels", grid="input", device=device)
    labels = predict(model, hu_4mm, output="labels", grid="output", device=device)
    return upsample_labels_stride2(torch.from_numpy(labels)).numpy()


def register_supervoxel_maps(fixed_sv: np.ndarray, moving_sv: np.ndarray, *, device: Any = "cpu",
                             seed: int = 0, **flow_options: Any) -> RegistrationResult:
    """Field between two scans from their supervoxel maps ``(16, 96, 80, 128)`` uint8 (4 mm grids).

    ``flow_options`` go to :func:`slicreg.flow.supervoxel_flow` (on top of :data:`FLOW_DEFAULTS`). Returns the
    field on the fixed 2 mm grid (twice the supervoxel grid)."""
    from slicreg.flow import supervoxel_flow

    for name, sv in (("fixed_sv", fixed_sv), ("moving_sv", moving_sv)):
        if np.ndim(sv) != 4:
            raise InputError(f"register_supervoxel_maps: {name} must be (L, X, Y, Z) label maps, got "
                             f"{np.shape(sv)}")
    options = {**FLOW_DEFAULTS, **flow_options}
    t0 = time.perf_counter()
    disp, info = supervoxel_flow(fixed_sv, moving_sv, seed=seed, device=device, **options)
    keep = {k: v for k, v in info.items() if k in ("timings_s", "cpu_s", "params")}
    keep["final_loss"] = float(info["loss"][-1]) if len(info.get("loss", [])) else None
    keep["n_keypoints"] = int(len(info["keypoints_vox"]))
    keep["flow_s"] = round(time.perf_counter() - t0, 3)
    return RegistrationResult(np.asarray(disp, dtype=np.float32), _jsonable(keep))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "detach"):
        return obj.detach().cpu().tolist()
    return obj


def register_preprocessed(model: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *,
                          template_supervoxels: np.ndarray | None = None, moving_is_template: bool = False,
                          fixed_sv: np.ndarray | None = None, moving_sv: np.ndarray | None = None,
                          device: Any = "cpu", seed: int = 0, **flow_options: Any) -> RegistrationResult:
    """Register two preprocessed scans (2 mm, same shape) with a trained network.

    Args:
        model: :class:`slicreg.network.SlicRegNet` with trained weights.
        fixed_hu, moving_hu: ``(X, Y, Z)`` HU arrays on their preprocessed grids.
        template_supervoxels: the template's own maps ``(16, X/2, Y/2, Z/2)``; used for the moving side when
            ``moving_is_template`` (atlas mode, as the paper registers scans to its template).
        fixed_sv, moving_sv: maps predicted earlier (skips the network for that side).
        device, seed, flow_options: see :func:`register_supervoxel_maps`.

    Returns:
        :class:`RegistrationResult` on the fixed grid; ``info["timings_s"]`` has the prediction times.
    """
    fixed_hu = np.asarray(fixed_hu)
    moving_hu = np.asarray(moving_hu)
    if fixed_hu.shape != moving_hu.shape:
        raise InputError(f"register_preprocessed: fixed {fixed_hu.shape} and moving {moving_hu.shape} must be "
                         f"preprocessed to the same shape")
    timings: dict[str, float] = {}
    if fixed_sv is None:
        t0 = time.perf_counter()
        fixed_sv = predict_supervoxels(model, fixed_hu, device=device)
        timings["predict fixed"] = round(time.perf_counter() - t0, 3)
    if moving_sv is None:
        if moving_is_template:
            if template_supervoxels is None:
                raise InputError("register_preprocessed: moving_is_template needs template_supervoxels")
            moving_sv = np.asarray(template_supervoxels)
        else:
            t0 = time.perf_counter()
            moving_sv = predict_supervoxels(model, moving_hu, device=device)
            timings["predict moving"] = round(time.perf_counter() - t0, 3)
    if np.shape(moving_sv) != np.shape(fixed_sv):
        raise InputError(f"register_preprocessed: supervoxel maps differ in shape: {np.shape(fixed_sv)} vs "
                         f"{np.shape(moving_sv)}")
    result = register_supervoxel_maps(fixed_sv, moving_sv, device=device, seed=seed, **flow_options)
    result.info["timings_s"] = {**timings, **result.info.get("timings_s", {})}
    return result
