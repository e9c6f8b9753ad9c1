"""Registration by supervoxels (SLIC-Reg inference, docs/method.md "Registration") for preprocessed scans.

Both scans are preprocessed CT (2 mm, typically 192 x 160 x 256, HU). The network predicts the 16 supervoxel
maps of each scan; the template's own supervoxels may stand for the template side (atlas mode). The maps are
put in correspondence by the Adam keypoint flow of :mod:`slicreg.flow`, whose thin-plate spline gives the dense
field on the fixed 2 mm grid (voxels, fixed -> moving). :func:`refine_field` optionally polishes that field by
a short instance optimisation on MIND-SSC image features (``refine=True``): the align engine
(:func:`slicreg.alignment.register_pair`, preset ``"refine"``) started from the supervoxel field.

Prediction: the network's logits ``(16, 128, X/4, Y/4, Z/4)`` (stride 2 of its 4 mm input) -> per-layer argmax ->
nearest upsampling to the 4 mm supervoxel grid. Output voxel ``q`` of the network is centred on 4 mm voxel
``2q`` (see :mod:`slicreg.network`), so 4 mm voxel ``p`` takes the label of output voxel ``floor(p / 2 + 0.5)``.
Argmax maps rather than softmax probabilities: the features are average-pooled to the same stride-2 grid
anyway, the label path keeps memory at a few hundred MB (probabilities are 1 GB in float32) and it is the path
tested against known displacements. The reference's rule (logits upsampled linearly, then argmax) is
``upsample="linear"``. :func:`register_preprocessed` never builds the 4 mm maps: it keeps the argmax maps on the
network's stride-2 grid and the flow computes keypoints and features from them as for their nearest upsampling
(``label_upsample=2``, bitwise the same result); 4 mm maps passed in that are such an upsampling are recognised
(:func:`stride2_labels`).

Timings: every function here reports wall seconds per step in ``info["timings_s"]`` and process CPU seconds
(all threads) in ``info["cpu_s"]``, with the same keys: ``network fixed``, ``network moving``, ``keypoints``,
``features``, ``adam``, ``dense field``, ``refine``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slicreg.errors import InputError

__all__ = ["RegistrationResult", "network_labels", "predict_supervoxels", "upsample_labels_stride2",
           "stride2_labels", "register_supervoxel_maps", "register_preprocessed", "refine_field", "FLOW_DEFAULTS",
           "REFINE_PRESET"]

FLOW_DEFAULTS: dict[str, Any] = {"init": "centres", "patience": 10, "tol": 3e-3,
                                 "keypoints": "random", "alpha": 6.5e-6, "lam": 10.0}
"""Flow settings used by registration, on top of :data:`slicreg.flow.DEFAULTS`.

``init="centres"`` starts the Adam flow from matched supervoxel centres, so that scans need no affine
pre-alignment (the capture range of the flow from zero is ~15-25 supervoxel voxels, 60-100 mm).
``keypoints="random"`` (2048 seeded foreground points), ``alpha=6.5e-6`` and ``lam=10`` were chosen on the
cohort's 20 training pairs with the shipped weights (``benchmarks/tune_flow.py``; the scores are in
docs/flow_tuning.md, "Conclusions")."""

REFINE_PRESET = "refine"
"""The align engine preset of :func:`refine_field` (``slicreg.alignment.PRESETS``: its settings live there, in one
place; the ``register`` stage's ``refine_options`` override them)."""

SLAB_PRESET = "refine-slab"
"""The align engine preset of :func:`refine_field` when a field of view is thin (a slab): started from the affine
map closest to the initial field (``slicreg.alignment.PRESETS``)."""


@dataclass
class RegistrationResult:
    """A registration on the fixed grid.

    Attributes:
        disp_vox: ``(3, X, Y, Z)`` float32, voxels of the fixed grid, fixed -> moving.
        info: timings (``timings_s`` wall, ``cpu_s`` process CPU), flow diagnostics and parameters (JSON-ready).
    """

    disp_vox: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class _Clock:
    """Wall and CPU seconds per named step (``timings_s`` / ``cpu_s``)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(self, name: str, started: tuple[float, float]) -> None:
        self.wall[name] = round(self.wall.get(name, 0.0) + time.perf_counter() - started[0], 4)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - started[1], 4)


def upsample_labels_stride2(labels: Any) -> Any:
    """Nearest upsampling of network-output labels ``(L, x, y, z)`` to the input grid ``(L, 2x, 2y, 2z)``.

    Input-grid voxel ``p`` takes output voxel ``floor(p / 2 + 0.5)`` (clamped): output voxel ``q`` is centred on
    input voxel ``2q`` -- :func:`slicreg.flow.upsample_labels` with factor 2, the one implementation of the rule."""
    from slicreg.flow import upsample_labels

    if labels.dim() != 4:
        raise InputError(f"upsample_labels_stride2: expected (L, x, y, z), got {tuple(labels.shape)}")
    return upsample_labels(labels, 2)


def _argmax_rows(rows: Any, *, chunk: int = 4096) -> Any:
    """First index of the maximum of every row of ``rows (M, K)`` (K <= 256) -> ``(M,)`` int64, as
    ``rows.max(dim=-1).indices`` (ties to the lowest index).

    For bfloat16 rows (the CPU network's logits), ``torch.max`` along the rows runs a scalar loop (its cost:
    docs/register.md, "What was made faster"). Instead, in chunks that stay in cache, every value's int16 bit
    pattern ``v`` becomes the int32 key ``256 v + (K - 1 - index)`` and a vectorised ``amax`` picks the largest:
    for rows whose maximum is positive the bit patterns of the non-negative values order like the values (the
    negative ones are negative integers, below every positive pattern), equal values have equal patterns, and the
    index part makes the lowest index win a tie -- the same answer. Rows whose maximum is zero or negative
    (none in the cohort's logits) are redone with ``torch.max``. Other dtypes use ``torch.max`` directly."""
    import torch

    n_rows, width = rows.shape
    if rows.dtype != torch.bfloat16 or width > 256 or rows.stride(-1) != 1:
        return rows.max(dim=-1).indices
    bits = rows.view(torch.int16)
    rank = (width - 1) - torch.arange(width, dtype=torch.int32, device=rows.device)
    best = torch.empty(n_rows, dtype=torch.int32, device=rows.device)
    buf = torch.empty(min(chunk, n_rows), width, dtype=torch.int32, device=rows.device)
    for start in range(0, n_rows, chunk):
        part = bits[start: start + chunk]
        key = buf[: part.shape[0]]
        key.copy_(part)
        key.mul_(256).add_(rank)
        torch.amax(key, dim=1, out=best[start: start + part.shape[0]])
    index = (width - 1) - torch.bitwise_and(best, 255).long()
    redo = torch.nonzero(best < 256).reshape(-1)  # the row's largest bit pattern is not a positive value
    if redo.numel():
        index[redo] = rows[redo].max(dim=-1).indices
    return index


def _head_labels(head: Any, skip: Any, aspp_up: Any, *, slab: int = 2) -> Any:
    """The dense :class:`slicreg.network.GroupedHead` and the per-layer argmax -> ``(16, X', Y', Z')`` int64.

    The head's layers in its own order (concatenation, 1x1x1 conv + BN + ReLU, grouped 3x3x3 conv + BN + ReLU),
    then the last 1x1x1 grouped convolution a few x-planes at a time, each slab's logits reduced to labels
    (:func:`_argmax_rows`) while they are in cache: the 2048-channel logits (0.5 GB in bf16 for 48 x 40 x 64) are
    never held at once. Each output voxel of a 1x1x1 convolution depends on its own input only, so the slabs'
    logits are those of the whole volume (checked bitwise in tests/test_register.py through
    :func:`network_labels` = ``bundle.predict``). Channels-last tensors only."""
    import torch
    import torch.nn.functional as F

    from slicreg.network import N_CLASSES, N_LAYERS

    x = torch.cat([skip, aspp_up.to(skip.dtype)], 1).contiguous(memory_format=torch.channels_last_3d)
    h = F.relu_(head.bn1(head.conv1(x)))  # in place: inference only, the conv / BN output is not kept
    del x
    h = F.relu_(head.bn2(head.conv2(h)))
    size = tuple(h.shape[2:])
    labels = torch.empty(*size, N_LAYERS, dtype=torch.int64, device=h.device)
    for x0 in range(0, size[0], slab):
        logits = head.conv3(h[:, :, x0: x0 + slab])  # (1, 2048, n, Y', Z'), channels-last
        rows = logits[0].permute(1, 2, 3, 0).reshape(-1, N_CLASSES)  # a view: channel = 128 * layer + class
        labels[x0: x0 + slab] = _argmax_rows(rows).view(-1, size[1], size[2], N_LAYERS)
    return labels.permute(3, 0, 1, 2)


def network_labels(model: Any, image_hu_4mm: np.ndarray, *, device: Any = "cpu", dtype: Any = None,
                   argmax: str = "fast") -> np.ndarray:
    """Per-layer argmax labels on the network's output grid: ``(16, X/2, Y/2, Z/2)`` uint8 from a 4 mm image.

    The same result as ``slicreg.bundle.predict(model, image, output="labels", grid="output", dtype=dtype)``
    (eval mode; bf16 autocast on CPU, fp16 on CUDA unless ``dtype=torch.float32``; channels-last input when the
    model is channels-last), computed more cheaply, under ``torch.inference_mode``:

    - ``argmax="fast"`` (default) with a channels-last model (the CPU default of
      :func:`slicreg.bundle.load_bundle`): the head's last convolution runs a few x-planes at a time and each
      slab's logits are reduced at once (:func:`_head_labels`), the argmax over the 128 contiguous classes of
      the bf16 logits by integer keys (:func:`_argmax_rows`); cheaper than ``"torch"`` (measured in
      docs/register.md, "What was made faster");
    - ``argmax="torch"``: the whole logits, then ``torch.max`` over the 128 contiguous classes of each (voxel,
      layer) for channels-last logits (instead of a copy to class-major order and an argmax across a strided
      axis, which costs more) or along the class axis for contiguous ones.

    Ties go to the lowest class in every path.

    Args:
        model: :class:`slicreg.network.SlicRegNet` or :class:`slicreg.bundle.Bundle`.
        image_hu_4mm: ``(X, Y, Z)`` HU on the 4 mm grid (:func:`slicreg.network.network_input`), sizes divisible
            by 4.
        device: where the network runs (the model is moved there).
        dtype: ``None`` (autocast as above) or ``torch.float32``.
        argmax: ``"fast"`` (default) or ``"torch"`` (the previous path; same labels).
    """
    import torch

    from slicreg.network import N_CLASSES, N_LAYERS, GroupedHead

    if argmax not in ("fast", "torch"):
        raise InputError(f"network_labels: argmax must be 'fast' or 'torch', got {argmax!r}")
    from slicreg.bundle import require_target

    require_target(model, what="supervoxel prediction (slicreg.registration.network_labels)")
    net = getattr(model, "model", model)
    img = np.asarray(image_hu_4mm)
    if img.ndim != 3 or any(s % 4 for s in img.shape):
        raise InputError(f"network_labels: expected a 4 mm image (X, Y, Z) with sizes divisible by 4, got shape "
                         f"{img.shape}")
    if not np.all(np.isfinite(img)):
        raise InputError("network_labels: the image contains NaN or Inf values")
    from slicreg.bundle import network_pass_input

    net, x, dtype, channels_last = network_pass_input(net, img, device=device, dtype=dtype)
    dev = x.device
    slabs = argmax == "fast" and channels_last and type(getattr(net, "head", None)) is GroupedHead
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        if slabs:
            skip, aspp_up = net.features(x)
            labels = _head_labels(net.head, skip, aspp_up)
        else:
            logits = net(x)
            spatial = tuple(logits.shape[2:])
            if logits.is_contiguous(memory_format=torch.channels_last_3d) and not logits.is_contiguous():
                # (X', Y', Z', 2048) view of channels-last memory; channel = 128 * layer + class
                per_voxel = logits[0].permute(1, 2, 3, 0).reshape(*spatial, N_LAYERS, N_CLASSES)
                labels = per_voxel.max(dim=-1).indices.permute(3, 0, 1, 2)  # (16, X', Y', Z')
            else:
                labels = logits[0].reshape(N_LAYERS, N_CLASSES, *spatial).max(dim=1).indices
    return labels.to(torch.uint8).contiguous().cpu().numpy()


def predict_supervoxels(model: Any, image_hu: np.ndarray, *, device: Any = "cpu",
                        upsample: str = "nearest", dtype: Any = None) -> np.ndarray:
    """Predict the supervoxel maps of a preprocessed scan on its 4 mm grid.

    Args:
        model: a :class:`slicreg.network.SlicRegNet` or a :class:`slicreg.bundle.Bundle` (eval mode, bf16
            autocast on CPU / fp16 on CUDA: see :func:`slicreg.bundle.predict`).
        image_hu: ``(X, Y, Z)`` preprocessed 2 mm image in HU (sizes divisible by 8, e.g. 192 x 160 x 256).
        device: where to run.
        upsample: ``"nearest"`` (default): per-layer argmax on the network's stride-2 grid
            (:func:`network_labels`), then nearest upsampling (:func:`upsample_labels_stride2`);
            ``"linear"``: logits upsampled x2 linearly per layer, then argmax (the reference's rule; ~16
            full-size 128-channel volumes, several times the cost: docs/performance.md, stage table).
        dtype: network precision (``None``: bf16 autocast on CPU, fp16 on CUDA; ``torch.float32``: full).

    Returns:
        uint8 ``(16, X/2, Y/2, Z/2)``: labels 0..127 per layer on the 4 mm grid of the scan.
    """
    import torch

    from slicreg.bundle import predict
    from slicreg.network import HU_SCALE, network_input

    if upsample not in ("nearest", "linear"):
        raise InputError(f"predict_supervoxels: upsample must be 'nearest' or 'linear', got {upsample!r}")
    if upsample == "linear":
        hu_4mm = network_input(_check_2mm(image_hu), from_2mm=True) * np.float32(HU_SCALE)
        return predict(model, hu_4mm, output="labels", grid="input", device=device, dtype=dtype)
    labels = _predict_stride2(model, image_hu, device=device, dtype=dtype)
    return upsample_labels_stride2(torch.from_numpy(labels)).numpy()


def _check_2mm(image_hu: Any) -> np.ndarray:
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3 or any(s % 8 for s in image_hu.shape):
        raise InputError(f"predict_supervoxels: expected a 2 mm image (X, Y, Z) with sizes divisible by 8, "
                         f"got shape {image_hu.shape}")
    return image_hu


def _predict_stride2(model: Any, image_hu: Any, *, device: Any = "cpu", dtype: Any = None,
                     argmax: str = "fast") -> np.ndarray:
    """The network's argmax maps of a preprocessed 2 mm scan on its stride-2 grid: ``(16, X/4, Y/4, Z/4)`` uint8
    (:func:`predict_supervoxels` before the nearest upsampling)."""
    from slicreg.network import HU_SCALE, network_input

    hu_4mm = network_input(_check_2mm(image_hu), from_2mm=True) * np.float32(HU_SCALE)
    return network_labels(model, hu_4mm, device=device, dtype=dtype, argmax=argmax)


def stride2_labels(sv: Any) -> np.ndarray | None:
    """The stride-2 maps ``(L, X/2, Y/2, Z/2)`` whose :func:`upsample_labels_stride2` is ``sv (L, X, Y, Z)``, or
    None when ``sv`` is not such an upsampling (e.g. the template's own 4 mm supervoxels, or odd sizes).

    Maps predicted by :func:`predict_supervoxels` (and the ``predict`` stage) are; passing their stride-2 version
    to the flow with ``label_upsample=2`` gives bitwise the same keypoints and features with ~8x less work."""
    import torch

    sv = np.asarray(sv)
    if sv.ndim != 4 or any(s % 2 for s in sv.shape[1:]) or not np.issubdtype(sv.dtype, np.integer):
        return None
    coarse = np.ascontiguousarray(sv[:, ::2, ::2, ::2])  # 4 mm voxel 2q takes output voxel q
    if not np.array_equal(upsample_labels_stride2(torch.from_numpy(coarse)).numpy(), sv):
        return None
    return coarse


def register_supervoxel_maps(fixed_sv: np.ndarray, moving_sv: np.ndarray, *, device: Any = "cpu",
                             seed: int = 0, **flow_options: Any) -> RegistrationResult:
    """Field between two scans from their supervoxel maps ``(16, 96, 80, 128)`` uint8 (4 mm grids).

    ``flow_options`` go to :func:`slicreg.flow.supervoxel_flow` (on top of :data:`FLOW_DEFAULTS`). Maps that are
    the nearest upsampling of stride-2 maps (the network's, :func:`stride2_labels`) are handed to the flow on
    their stride-2 grid with ``label_upsample=2`` (the same result, less work), unless ``label_upsample`` is
    given; stride-2 maps ``(16, 48, 40, 64)`` may also be passed directly with ``label_upsample=2`` (or
    ``(2, 1)`` etc. per side). Returns the field on the fixed 2 mm grid (twice the supervoxel grid);
    ``info["timings_s"]`` / ``info["cpu_s"]`` hold ``keypoints``, ``features``, ``adam`` and ``dense field``
    (the check for stride-2 maps counts to ``keypoints``)."""
    from slicreg.flow import supervoxel_flow

    for name, sv in (("fixed_sv", fixed_sv), ("moving_sv", moving_sv)):
        if np.ndim(sv) != 4:
            raise InputError(f"register_supervoxel_maps: {name} must be (L, X, Y, Z) label maps, got "
                             f"{np.shape(sv)}")
    options = {**FLOW_DEFAULTS, **flow_options}
    t0, c0 = time.perf_counter(), time.process_time()
    if "label_upsample" not in options:
        factors, maps = [], []
        for sv in (fixed_sv, moving_sv):
            coarse = stride2_labels(sv)
            factors.append(1 if coarse is None else 2)
            maps.append(sv if coarse is None else coarse)
        fixed_sv, moving_sv = maps
        options["label_upsample"] = tuple(factors)
    detect_wall, detect_cpu = time.perf_counter() - t0, time.process_time() - c0
    disp, info = supervoxel_flow(fixed_sv, moving_sv, seed=seed, device=device, **options)
    info["timings_s"]["keypoints"] += detect_wall
    info["cpu_s"]["keypoints"] += detect_cpu
    rename = {"keypoints": "keypoints", "features": "features", "adam": "adam", "dense": "dense field"}
    keep: dict[str, Any] = {
        "timings_s": {rename[k]: round(float(v), 4) for k, v in info["timings_s"].items() if k in rename},
        "cpu_s": {rename[k]: round(float(v), 4) for k, v in info["cpu_s"].items() if k in rename},
        "params": info["params"],
        "final_loss": float(info["loss"][-1]) if len(info.get("loss", [])) else None,
        "adam_iterations_run": len(info.get("loss", [])),
        "n_keypoints": int(len(info["keypoints_vox"])),
        "flow_s": round(time.perf_counter() - t0, 3),
    }
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


# ------------------------------------------------------------------------------------------------ refinement
def _numpy(x: Any) -> Any:
    """A torch tensor as a numpy array (CPU); anything else as it is (the engine checks it)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def refine_field(fixed_hu: Any, moving_hu: Any, init_disp_vox: Any, *, preset: str = REFINE_PRESET,
                 slab_preset: str | None = SLAB_PRESET,
                 iterations: int | tuple[int, ...] | None = None, budget_s: float | None = None,
                 deformable: dict[str, Any] | None = None, slab_deformable: dict[str, Any] | None = None,
                 clip_hu: tuple[float, float] | None = None,
                 fixed_mask: Any = None, moving_mask: Any = None, seed: int = 0,
                 device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """Instance refinement of a dense field: the align engine (:func:`slicreg.alignment.register_pair`) started from
    ``init_disp_vox`` with the preset ``preset`` (default ``"refine"``, :data:`slicreg.alignment.PRESETS`).

    The default preset compares MIND-SSC descriptors of both images (clipped to [-400, 600] HU, on the 8, 4 and
    2 mm pyramid levels; the features only on each field of view's box) by SSD, optimises a dense displacement on
    nodes every 16 mm (8 mm level) and 8 mm (4 and 2 mm levels) by Adam on a random
    sub-lattice of the level voxels per iteration, and penalises the diffusion of the change it makes
    (``penalise="increment"``): the result is ``init_disp_vox`` plus the upsampled change, so the initial field's
    fine detail is kept. With field-of-view masks the engine compares only fixed voxels inside ``fixed_mask``
    whose warped position lands inside ``moving_mask`` and fills each image's padding with its nearest
    field-of-view voxel before the features (:func:`slicreg.alignment.register_pair`), so the preprocessing's padding
    around a partial scan pulls nothing (``mask_norm="grid"``: a slab is held by the regulariser as a full scan
    is). Its settings and how they were chosen: docs/register.md ("Refinement").

    When the masks make a field of view thin (a slab of a scan against a scan: the shorter extent along an axis
    below ``thin_fov`` = 0.35 of the longer, :func:`slicreg.alignment.engine.thin_axes`), ``slab_preset`` (default
    ``"refine-slab"``) runs instead, started from the affine map closest to ``init_disp_vox`` over the fixed
    field of view where it lands in the moving one (:func:`slicreg.alignment.engine.affine_from_field`; along the
    thin axis only a translation): a slab's supervoxel field places it well as a whole but is poor in its
    detail, which the ``"refine"`` preset keeps (docs/register.md, "Slabs"). ``info["slab"]`` then says so;
    ``iterations`` and ``deformable`` apply to ``preset`` only, ``slab_deformable`` to ``slab_preset``'s deformable
    stage only. ``slab_preset=None``: always ``preset``.

    Args:
        fixed_hu: ``(X, Y, Z)`` fixed image in HU (preprocessed, 2 mm), numpy or torch.
        moving_hu: ``(X', Y', Z')`` moving image in HU (the same voxel size).
        init_disp_vox: ``(3, X, Y, Z)`` initial field, voxels, fixed -> moving (e.g. the supervoxel flow's).
        preset: an engine preset; its affine stages are skipped (the initial field holds the global alignment).
        iterations: Adam steps per level of the deformable stage (an int for every level or one per level);
            default: the preset's (30, 35 and 40 for ``"refine"``).
        budget_s: optional wall-clock budget in seconds, honoured approximately: the engine scales the
            iterations per level (and drops the finest levels if needed) to fit it (``register_pair(budget_s=)``;
            ``iterations`` stays the upper limit).
        deformable: other :class:`slicreg.alignment.StageConfig` fields of the deformable stage, e.g.
            ``{"levels": (4, 2), "weight": 0.05}``.
        slab_deformable: the same for ``slab_preset``'s deformable stage (when a field of view is thin).
        clip_hu: ``(lo, hi)`` intensity window (default: the preset's).
        fixed_mask, moving_mask: optional bool arrays of the images' shapes, True where the scan has data (e.g.
            :meth:`slicreg.geometry.CropRecord.fov_mask`); default None: everywhere.
        seed: seed of the random sub-lattices (``torch.Generator``): the result is reproducible (without a
            budget).
        device: where to compute.

    Returns:
        ``(disp_vox, info)``: ``(3, X, Y, Z)`` float32 refined field (numpy if ``init_disp_vox`` is numpy, else a
        CPU torch tensor) and the engine's ``info`` (per-level iterations, losses and seconds, ``final_loss``,
        ``folding_fraction``, ``fov``, ``budget``, the resolved ``config``).

    Raises:
        InputError: bad shapes or values, unknown preset or stage fields.
    """
    from slicreg.alignment import register_pair

    torch_out = hasattr(init_disp_vox, "detach")
    fixed, moving, init = _numpy(fixed_hu), _numpy(moving_hu), _numpy(init_disp_vox)
    if np.ndim(fixed) == 3 and np.shape(init) != (3, *np.shape(fixed)):
        raise InputError(f"refine_field: init_disp_vox must be (3, {', '.join(map(str, np.shape(fixed)))}) on the "
                         f"fixed grid, got {tuple(np.shape(init))}")
    stage = dict(deformable or {})
    if iterations is not None:
        stage["iterations"] = tuple(iterations) if isinstance(iterations, (list, tuple)) else int(iterations)
    overrides: dict[str, Any] = {"deformable": stage} if stage else {}
    if clip_hu is not None:
        overrides["clip_hu"] = tuple(clip_hu)
    fixed_mask, moving_mask = _numpy(fixed_mask), _numpy(moving_mask)
    init = np.asarray(init, dtype=np.float32)
    thin = _thin(fixed_mask, moving_mask, np.shape(fixed), np.shape(moving), slab_preset) if slab_preset else None
    if thin is not None and any(thin):
        from slicreg.alignment.engine import affine_from_field

        start = affine_from_field(init, fixed_mask, moving_mask=moving_mask, thin=thin)
        slab_overrides: dict[str, Any] = {"clip_hu": overrides["clip_hu"]} if "clip_hu" in overrides else {}
        if slab_deformable:
            slab_overrides["deformable"] = dict(slab_deformable)
        result = register_pair(fixed, moving, init_affine=start, fixed_mask=fixed_mask, moving_mask=moving_mask,
                               preset=slab_preset, device=str(device), seed=int(seed), budget_s=budget_s,
                               **slab_overrides)
        result.info["slab"] = {"axes": [a for a in range(3) if thin[a]], "preset": slab_preset,
                               "init_affine": np.round(start, 6).tolist()}
    else:
        result = register_pair(fixed, moving, init_disp=init, fixed_mask=fixed_mask,
                               moving_mask=moving_mask, preset=preset, device=str(device), seed=int(seed),
                               budget_s=budget_s, **overrides)
    disp = result.disp_vox
    if torch_out:
        import torch

        disp = torch.from_numpy(disp)
    return disp, result.info


def _thin(fixed_mask: Any, moving_mask: Any, fixed_shape: tuple, moving_shape: tuple,
          slab_preset: Any) -> tuple[bool, ...] | None:
    """Per axis: is a field of view thin (``thin_fov`` of the slab preset's first stage)? ``None`` without masks
    (or with shapes the engine will refuse)."""
    from slicreg.alignment import resolve_preset
    from slicreg.alignment.engine import mask_box, thin_axes

    if fixed_mask is None and moving_mask is None:
        return None
    if len(fixed_shape) != 3 or len(moving_shape) != 3 or any(
            m is not None and np.shape(m) != s for m, s in ((fixed_mask, fixed_shape), (moving_mask, moving_shape))):
        return None
    boxes = [None if m is None or not np.any(m) else mask_box(np.asarray(m, dtype=bool))
             for m in (fixed_mask, moving_mask)]
    fraction = float(resolve_preset(slab_preset).stages[0][1].thin_fov)
    return thin_axes(boxes[0], boxes[1], fixed_shape, moving_shape, fraction)


# ------------------------------------------------------------------------------------------------ one pair
def register_preprocessed(model: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *,
                          template_supervoxels: np.ndarray | None = None, moving_is_template: bool = False,
                          fixed_sv: np.ndarray | None = None, moving_sv: np.ndarray | None = None,
                          refine: bool = False, refine_options: dict[str, Any] | None = None,
                          fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                          network_dtype: Any = None, device: Any = "cpu", seed: int = 0,
                          **flow_options: Any) -> RegistrationResult:
    """Register two preprocessed scans (2 mm, same shape) with a trained network.

    Args:
        model: :class:`slicreg.network.SlicRegNet` or :class:`slicreg.bundle.Bundle` with trained weights (may
            be None when both maps are given); a supervoxel network of either kind (DeepLab or U-Net). A
            displacement-regression network or bundle (the Regression baseline) registers in atlas mode only
            (``moving_is_template``): its regressed field fixed -> template, optionally refined, no supervoxels or
            flow (``fixed_sv``, ``moving_sv`` and flow options are refused; ``template_supervoxels`` is not used).
        fixed_hu, moving_hu: ``(X, Y, Z)`` HU arrays on their preprocessed grids.
        template_supervoxels: the template's own maps ``(16, X/2, Y/2, Z/2)``; used for the moving side when
            ``moving_is_template`` (atlas mode, as the paper registers scans to its template).
        fixed_sv, moving_sv: maps predicted earlier (skips the network for that side).
        refine: polish the supervoxel field with :func:`refine_field` (MIND-SSC instance optimisation).
        refine_options: keyword arguments of :func:`refine_field` (``iterations``, ``budget_s``, ``preset``, ...).
        fixed_mask, moving_mask: fields of view for the refinement (see :func:`refine_field`).
        network_dtype: precision of the network passes (see :func:`predict_supervoxels`).
        device, seed, flow_options: see :func:`register_supervoxel_maps` (``label_upsample`` is set here: 2 for
            maps predicted here or recognised as upsampled stride-2 maps, 1 for the template's own maps).

    Returns:
        :class:`RegistrationResult` on the fixed grid; ``info["timings_s"]`` / ``info["cpu_s"]`` per step
        (``network fixed``, ``network moving``, ``keypoints``, ``features``, ``adam``, ``dense field``,
        ``refine``); ``info["refine"]`` the refinement's diagnostics.
    """
    fixed_hu = np.asarray(fixed_hu)
    moving_hu = np.asarray(moving_hu)
    if fixed_hu.shape != moving_hu.shape:
        raise InputError(f"register_preprocessed: fixed {fixed_hu.shape} and moving {moving_hu.shape} must be "
                         f"preprocessed to the same shape")
    if model is not None:
        from slicreg.bundle import model_kind

        if model_kind(model).target == "displacement":  # the Regression baseline: no supervoxels, no flow
            if fixed_sv is not None or moving_sv is not None or flow_options:
                given = [k for k, v in (("fixed_sv", fixed_sv), ("moving_sv", moving_sv)) if v is not None]
                raise InputError(f"register_preprocessed: {', '.join(given + sorted(flow_options))} do not apply to "
                                 f"a displacement-regression network (no supervoxel maps, no keypoint flow)")
            return _register_displacement(model, fixed_hu, moving_hu, moving_is_template=moving_is_template,
                                          refine=refine, refine_options=refine_options, fixed_mask=fixed_mask,
                                          moving_mask=moving_mask, network_dtype=network_dtype, device=device,
                                          seed=seed)
    clock = _Clock()
    # maps predicted here stay on the network's stride-2 grid (label_upsample 2: the flow gives the result of
    # their nearest upsampling, predict_supervoxels' 4 mm maps, without building them); maps passed in that are
    # such an upsampling are taken back to it (stride2_labels); the template's own maps are 4 mm maps
    def maps(sv: Any, hu: Any, side: str) -> tuple[Any, int]:
        """``(maps, factor)``: predicted on the stride-2 grid, or given (taken back to it when they are such an
        upsampling)."""
        if sv is None:
            started = clock.start()
            sv = _predict_stride2(model, hu, device=device, dtype=network_dtype)
            clock.stop(f"network {side}", started)
            return sv, 2
        if "label_upsample" not in flow_options and (coarse := stride2_labels(sv)) is not None:
            return coarse, 2
        return sv, 1

    fixed_sv, f_fixed = maps(fixed_sv, fixed_hu, "fixed")
    if moving_sv is None and moving_is_template:  # the template's own 4 mm maps, as they are
        if template_supervoxels is None:
            raise InputError("register_preprocessed: moving_is_template needs template_supervoxels")
        moving_sv, f_moving = np.asarray(template_supervoxels), 1
    else:
        moving_sv, f_moving = maps(moving_sv, moving_hu, "moving")
    factors = [f_fixed, f_moving]
    sizes = [tuple(np.shape(sv)[:1]) + tuple(f * s for s in np.shape(sv)[1:])
             for f, sv in zip(factors, (fixed_sv, moving_sv))]
    if sizes[0] != sizes[1]:
        raise InputError(f"register_preprocessed: supervoxel maps differ in shape: {sizes[0]} vs {sizes[1]}"
                         + (" (the bundle's template supervoxels do not match the preprocessed grid)"
                            if moving_is_template else ""))
    if "label_upsample" not in flow_options:
        flow_options = {**flow_options, "label_upsample": tuple(factors)}
    result = register_supervoxel_maps(fixed_sv, moving_sv, device=device, seed=seed, **flow_options)
    wall = {**clock.wall, **result.info.get("timings_s", {})}
    cpu = {**clock.cpu, **result.info.get("cpu_s", {})}
    return _finished(result, fixed_hu, moving_hu, wall, cpu, refine=refine, refine_options=refine_options,
                     fixed_mask=fixed_mask, moving_mask=moving_mask, device=device, seed=seed)


def _finished(result: RegistrationResult, fixed_hu: np.ndarray, moving_hu: np.ndarray, wall: dict[str, float],
              cpu: dict[str, float], *, refine: bool, refine_options: dict[str, Any] | None, fixed_mask: Any,
              moving_mask: Any, device: Any, seed: int) -> RegistrationResult:
    """``result`` polished by :func:`refine_field` when ``refine`` (its diagnostics in ``info["refine"]``), with the
    steps' wall and CPU seconds (``wall`` / ``cpu``, the refinement's as ``"refine"``) in ``info``."""
    if refine:
        started = time.perf_counter(), time.process_time()
        disp, rinfo = refine_field(fixed_hu, moving_hu, result.disp_vox, device=device, seed=seed,
                                   fixed_mask=fixed_mask, moving_mask=moving_mask, **(refine_options or {}))
        wall["refine"] = round(time.perf_counter() - started[0], 4)
        cpu["refine"] = round(time.process_time() - started[1], 4)
        result = RegistrationResult(np.asarray(disp, dtype=np.float32), result.info)
        result.info["refine"] = _jsonable(rinfo)
    result.info["timings_s"] = wall
    result.info["cpu_s"] = cpu
    return result


def _register_displacement(model: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *, moving_is_template: bool,
                           refine: bool, refine_options: dict[str, Any] | None, fixed_mask: Any, moving_mask: Any,
                           network_dtype: Any, device: Any, seed: int) -> RegistrationResult:
    """:func:`register_preprocessed` with a displacement-regression network (the paper's Regression baseline,
    :mod:`slicreg.regression`): one network pass on the fixed scan regresses the field fixed -> template on the
    fixed 2 mm grid (:func:`slicreg.regression.predict_displacement`), optionally refined (:func:`refine_field`).

    Atlas mode only (``moving_is_template``: the moving scan is the bundle's template, which the caller has
    checked): a pair of two scans would need the composition with the inverse of the moving scan's regressed field,
    which slicreg does not compute. ``info``: ``method``, ``kind``, ``timings_s`` / ``cpu_s`` (``network fixed``,
    ``refine``), ``refine``."""
    from slicreg.bundle import model_kind
    from slicreg.regression import predict_displacement

    kind = model_kind(model)
    if not moving_is_template:
        name = getattr(model, "path", None) or "register_preprocessed"
        raise InputError(f"{name}: a {kind.noun} network (kind {kind}) registers a scan to its template only "
                         f"(atlas mode, moving_is_template=True); a pair of two scans would need the inverse of a "
                         f"regressed field, which slicreg does not compute")
    clock = _Clock()
    started = clock.start()
    disp = predict_displacement(model, fixed_hu, device=device, dtype=network_dtype)
    clock.stop("network fixed", started)
    result = RegistrationResult(np.asarray(disp, dtype=np.float32), {"method": "displacement regression",
                                                                      "kind": str(kind)})
    wall, cpu = dict(clock.wall), dict(clock.cpu)
    return _finished(result, fixed_hu, moving_hu, wall, cpu, refine=refine, refine_options=refine_options,
                     fixed_mask=fixed_mask, moving_mask=moving_mask, device=device, seed=seed)
