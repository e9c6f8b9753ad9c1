"""Stage costs and scaling of slicreg: wall time, CPU time and peak RSS of every stage, in one run.

Every measurement runs the library function of a stage at the real sizes (192 x 160 x 256 at 2 mm for scans and
fields, 96 x 80 x 128 at 4 mm for supervoxels and the network input) in its **own child process**, one at a time,
so that the peak RSS belongs to that stage alone: the child builds its inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs the stage once and reports

- ``wall_s``: elapsed seconds (``time.perf_counter``);
- ``cpu_s``: CPU seconds of the process, all threads (``time.process_time``), plus its waited-for children;
- ``peak_rss_mb``: the process's peak resident memory during the stage (``VmHWM``), and ``base_rss_mb`` (the
  resident memory before it, i.e. the inputs and the imported libraries).

Inputs: the real example CT (TotalSegmentator 2.18.0, fetched once into the slicreg cache by
``slicreg fetch-example``) preprocessed to 192 x 160 x 256 is the template / fixed scan; a moving scan is the
same scan pulled through a smooth random field (about 3 voxels RMS) with CT-like noise; supervoxel maps for the
flow are 16 layers of 127 Voronoi cells (``benchmarks/bench_flow.py``). The network is untrained (costs do not
depend on the weights).

Stages (``--only`` takes these names): ``preprocess`` (reorient + 2 mm + crop of the example), ``cohort-source``
(preparation of the source scan), ``cohort-subject`` (one subject), ``cohort-true-field`` (one pair's true
field), ``supervoxels`` (16 template layers, one process), ``deeds-import`` (files -> dense field),
``align`` (:func:`slicreg.alignment.register_pair`), ``flow`` (:func:`slicreg.flow.supervoxel_flow`; keypoints,
features, Adam, dense field reported separately), ``warp`` (image + labels), ``evaluate`` (Learn2Reg warp, Dice,
HD95, Jacobian, field error), ``inference-fp32`` / ``inference-bf16`` (one scan's supervoxel maps as
:func:`slicreg.registration.predict_supervoxels` makes them: network, argmax on the stride-2 grid, nearest
upsampling), ``inference-linear`` (bf16 with the reference's linear upsampling of the logits, the ``"linear"``
option), ``train-step-faithful`` (fp32, dense head, torch's own backward, batch 1), ``train-step-optimised``
(the :class:`slicreg.train.TrainConfig` defaults -- bf16, channels-last, compiled depthwise backward, head on
2048 voxels -- at batch 1; its first, compiling step is reported apart), ``register-pair`` / ``register-atlas``
(what ``slicreg register`` computes for two new scans / a scan and the template with the shipped weights
``weights/slicreg-cohort-v3``: network pass(es), flow, dense field, warping the moving image).

Scaling (``--scales``, default 0.5, 1, 1.5 per axis): ``slic-layer`` (one SLIC layer), ``deeds-import``,
``align``, ``flow``, ``warp``, ``evaluate`` and ``inference-bf16`` at each scale (align at 1.5x only with
``--full``); ``flow`` also against the number of keypoints (``--keypoints``, random foreground keypoints).

Outputs in ``--out`` (default benchmarks/results/): ``runs/stages_<UTC time>.json`` (this run: machine, date,
every measurement), ``stages.json`` (a copy of the latest), ``stages.md`` (the tables), ``scaling.png``; then
``docs/benchmarks.md`` and the README's section ``docs/performance.md`` (``benchmarks/make_readme.py``) are
regenerated from ``stages.json`` and ``peers/peers.json`` (benchmarks/peers.py), unless ``--no-docs``.
``--docs-only`` only redraws the tables, the plot and the pages from the JSON.

    nice -n 19 .venv/bin/python benchmarks/run_all.py                # ~10-15 min on 2 shared cores
    nice -n 19 .venv/bin/python benchmarks/run_all.py --only warp,flow --scales 1
    .venv/bin/python benchmarks/run_all.py --docs-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from make_readme import write_section

from _common import SHAPE, example_template, example_volumes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results"
DOCS = REPO / "docs" / "benchmarks.md"
SV_SHAPE = (96, 80, 128)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")

STAGES = ("preprocess", "cohort-source", "cohort-subject", "cohort-true-field", "supervoxels", "deeds-import",
          "align", "flow", "warp", "evaluate", "inference-fp32", "inference-bf16", "inference-linear",
          "train-step-faithful", "train-step-optimised", "register-pair", "register-atlas")
SCALED = ("slic-layer", "deeds-import", "align", "flow", "warp", "evaluate", "inference-bf16")
KEYPOINTS = (512, 1024, 2048, 4096, 8192)


# ============================================================================================= machine
def machine_info(*, threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, library versions, thread settings, load average and the git commit."""
    cpu, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    versions: dict[str, str] = {}
    for mod in ("numpy", "scipy", "torch", "skimage", "nibabel"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a missing library is reported, not fatal
            versions[mod] = "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"cpu_model": cpu, "cpu_flags": flags, "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "memory_gb": mem_gb, "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "git_commit": commit, "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "niceness": os.nice(0)}


# ======================================================================================= child: measuring
def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once; return its result and wall / CPU seconds, base and peak RSS (MB)."""
    import gc
    import resource

    gc.collect()
    reset = _reset_peak_rss()
    base = _proc_status_mb("VmRSS")
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    return out, {"wall_s": wall, "cpu_s": cpu, "base_rss_mb": base, "peak_rss_mb": _proc_status_mb("VmHWM"),
                 "peak_reset": reset}


# ---------------------------------------------------------------------------------------- shared inputs
def _scaled_shape(shape: tuple[int, ...], scale: float, multiple: int) -> tuple[int, int, int]:
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in shape)  # type: ignore


def template(work: Path, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The preprocessed example (HU float32, BTCV labels uint8, affine), resampled to ``scale`` x 192 x 160 x 256
    (sizes multiples of 8, spacing 2 / scale mm); cached in ``work``."""
    cache = work / f"template_{scale:g}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["image"], z["labels"], z["affine"]
    if scale == 1.0:
        img, lab, affine = example_template()
    else:
        from scipy import ndimage

        img1, lab1, aff1 = template(work, 1.0)
        shape = _scaled_shape(SHAPE, scale, 8)
        factors = [n / s for n, s in zip(shape, SHAPE)]
        img = ndimage.zoom(img1, factors, order=1, mode="nearest", grid_mode=True).astype(np.float32)
        lab = ndimage.zoom(lab1, factors, order=0, mode="nearest", grid_mode=True).astype(np.uint8)
        affine = aff1 @ np.diag([1 / factors[0], 1 / factors[1], 1 / factors[2], 1.0])
    np.savez(cache, image=img, labels=lab, affine=np.asarray(affine, dtype=np.float64))
    return img, lab, np.asarray(affine, dtype=np.float64)


def smooth_field(shape: tuple[int, ...], *, rms_vox: float, seed: int) -> np.ndarray:
    """A smooth random displacement ``(3, X, Y, Z)`` float32 (voxels), about ``rms_vox`` RMS."""
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = tuple(max(4, s // 16) for s in shape)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), 1.5, mode="nearest") for _ in range(3)])
    field *= rms_vox / max(float(np.sqrt((field ** 2).sum(0).mean())), 1e-9)
    up = torch.nn.functional.interpolate(torch.from_numpy(field[None]).float(), size=tuple(shape),
                                         mode="trilinear", align_corners=False)
    return up[0].numpy()


def moving_scan(fixed: np.ndarray, *, seed: int) -> np.ndarray:
    """The fixed scan pulled through a smooth field (3 voxels RMS) plus 20 HU noise."""
    from slicreg.fields import warp_image

    disp = smooth_field(fixed.shape, rms_vox=3.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return (warp_image(fixed, disp, padding="border") + rng.normal(0, 20, fixed.shape)).astype(np.float32)


def voronoi_pair(scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16 layers of 127 Voronoi cells on the (scaled) 4 mm grid and the same maps pulled by a smooth map."""
    sys.path.insert(0, str(HERE))
    from bench_flow import pull, smooth_map, voronoi_maps

    shape = _scaled_shape(SV_SHAPE, scale, 4)
    fixed = voronoi_maps(shape, 16, 127, seed)
    moving = pull(fixed, smooth_map(shape, 1.5 * scale, (1.0, -1.0, 0.5), seed + 1))
    return fixed, moving


# ---------------------------------------------------------------------------------------------- the cases
def case_preprocess(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg.geometry import preprocess_volume

    image, labels, _ = example_volumes()
    res, m = measure(lambda: preprocess_volume(image, labels))
    return {**m, "size": f"{'x'.join(map(str, image.shape))} @ "
                         f"{'x'.join(f'{s:.2g}' for s in image.spacing_mm)} mm -> "
                         f"{'x'.join(map(str, res.image.shape))}"}


def _cohort_source(opts: dict[str, Any]) -> Any:
    from preprocessing.cohort import CohortConfig, prepare_source

    image, labels, tissue = example_volumes()
    return prepare_source(image, labels, tissue, config=CohortConfig()), image


def case_cohort_source(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from preprocessing.cohort import CohortConfig, prepare_source

    image, labels, tissue = example_volumes()
    _, m = measure(lambda: prepare_source(image, labels, tissue, config=CohortConfig()))
    return {**m, "size": f"source {'x'.join(map(str, image.shape))}"}


def case_cohort_subject(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from preprocessing.cohort import CohortConfig, make_subject, sample_subject_params

    source, _ = _cohort_source(opts)
    config = CohortConfig()
    rng = np.random.default_rng([0, 1])
    params = sample_subject_params(rng, config=config)
    subject, m = measure(lambda: make_subject(source, params, rng=rng, config=config))
    return {**m, "size": f"one training subject, {'x'.join(map(str, subject.image.shape))} @ 2 mm"}


def case_cohort_true_field(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from preprocessing.cohort import CohortConfig, make_subject, sample_subject_params, true_field

    source, _ = _cohort_source(opts)
    config = CohortConfig()
    subjects = []
    for index in (1, 2):
        rng = np.random.default_rng([0, index])
        subjects.append(make_subject(source, sample_subject_params(rng, config=config), rng=rng, config=config))
    f, mv = subjects
    _, m = measure(lambda: true_field(f.transform, f.image.affine, f.image.shape, mv.transform, mv.image.affine))
    return {**m, "size": f"field on {'x'.join(map(str, f.image.shape))}"}


def case_supervoxels(work: Path, scale: float, opts: dict[str, Any], *, n_layers: int = 16) -> dict[str, Any]:
    from slicreg import supervoxels as sv

    img, lab, _ = template(work, scale)
    mask = sv.organ_mask(lab, distance_vox=30 * scale)
    spacing = (2.0 / scale,) * 3
    res, m = measure(lambda: sv.build_supervoxel_layers(img, mask, n_layers=n_layers, seed=0, jobs=1,
                                                        spacing_mm=spacing))
    return {**m, "size": f"{n_layers} layer(s) of {res.layers.shape[1:]} from {img.shape}"}


def case_slic_layer(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return case_supervoxels(work, scale, opts, n_layers=1)


def case_deeds_import(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg import deeds

    shape = _scaled_shape(SHAPE, scale, 8)
    ctrl_shape = deeds.control_shape(shape, 4)
    rng = np.random.default_rng(0)
    ctrl = rng.normal(scale=2.0, size=(3, *ctrl_shape)).astype(np.float32)
    matrix = np.eye(4)
    matrix[:3, 3] = (2.0, -1.0, 3.0)
    dat, mat = deeds.write_deeds(work / f"deeds_{scale:g}", ctrl, matrix)
    _, m = measure(lambda: deeds.read_deeds(dat, shape, matrix_path=mat).to_field())
    return {**m, "size": f"control grid {ctrl_shape} -> {shape}"}


def case_align(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg.alignment import register_pair

    fixed, _, _ = template(work, scale)
    moving = moving_scan(fixed, seed=3)
    res, m = measure(lambda: register_pair(fixed, moving, spacing_mm=(2.0 / scale,) * 3, preset="abdomen-ct",
                                           seed=0))
    return {**m, "size": f"{fixed.shape} @ {2 / scale:.3g} mm", "parts_s": res.info.get("stages"),
            "iterations": res.info.get("iterations")}


def case_flow(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg.flow import supervoxel_flow

    fixed, moving = voronoi_pair(scale, seed=0)
    try:  # the settings registration uses on top of the flow's defaults
        from slicreg.registration import FLOW_DEFAULTS
    except ImportError:
        FLOW_DEFAULTS = {}
    kwargs: dict[str, Any] = dict(FLOW_DEFAULTS)
    if opts.get("keypoints"):
        kwargs.update(keypoints="random", n_random=int(opts["keypoints"]))
    (disp, info), m = measure(lambda: supervoxel_flow(fixed, moving, seed=0, **kwargs))
    return {**m, "size": f"16 x {fixed.shape[1:]} -> field {disp.shape[1:]}",
            "parts_s": {k: round(v, 3) for k, v in info["timings_s"].items()},
            "n_keypoints": int(info["params"]["n_keypoints"]), "settings": kwargs}


def case_warp(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg.fields import warp_image, warp_labels

    img, lab, _ = template(work, scale)
    disp = smooth_field(img.shape, rms_vox=3.0, seed=5)
    _, m = measure(lambda: (warp_image(img, disp, padding="border"), warp_labels(lab, disp)))
    return {**m, "size": f"image + labels {img.shape}"}


def case_evaluate(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    from slicreg.fields import warp_labels
    from slicreg.metrics import evaluate_pair, warp_labels_learn2reg
    from slicreg.supervoxels import body_mask

    img, lab, affine = template(work, scale)
    truth = smooth_field(img.shape, rms_vox=3.0, seed=6)
    moving = warp_labels(lab, -truth)  # roughly the inverse: any label map serves for the cost
    disp = truth + smooth_field(img.shape, rms_vox=1.0, seed=7)
    mask = body_mask(img)

    def run() -> Any:
        warped = warp_labels_learn2reg(moving, disp)
        return evaluate_pair(lab, moving, warped, disp_vox=disp, affine=affine, true_disp_vox=truth, error_mask=mask)

    _, m = measure(run)
    return {**m, "size": f"{img.shape}, 13 labels, HD95 + Jacobian + field error"}


def _network_image(work: Path, scale: float) -> np.ndarray:
    from slicreg.network import network_input

    img, _, _ = template(work, scale)
    return network_input(img) * 500.0  # back to HU on the 4 mm grid (predict divides by HU_SCALE)


def _inference(work: Path, scale: float, dtype_name: str) -> dict[str, Any]:
    """The registration's prediction path (:func:`slicreg.registration.predict_supervoxels`): network, per-layer
    argmax on the stride-2 grid, nearest upsampling to the 4 mm grid -- with the precision chosen here;
    ``linear`` = bf16 with the reference's linear upsampling of the logits before the argmax."""
    import torch

    from slicreg.bundle import predict
    from slicreg.network import build_model
    from slicreg.registration import upsample_labels_stride2

    img4 = _network_image(work, scale)
    model = build_model(seed=0, backward="native").eval().to(memory_format=torch.channels_last_3d)
    dtype = torch.float32 if dtype_name == "fp32" else None

    def run() -> np.ndarray:
        if dtype_name == "linear":
            return predict(model, img4, output="labels", grid="input")
        labels = predict(model, img4, output="labels", grid="output", dtype=dtype)
        return upsample_labels_stride2(torch.from_numpy(labels)).numpy()

    out, m = measure(run)
    return {**m, "size": f"input {img4.shape} -> labels {out.shape}", "precision": dtype_name}


def case_inference_fp32(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _inference(work, scale, "fp32")


def case_inference_bf16(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _inference(work, scale, "bf16")


def case_inference_linear(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _inference(work, scale, "linear")


def _train_step(work: Path, faithful: bool) -> dict[str, Any]:
    import torch

    from slicreg.network import N_LAYERS
    from slicreg.train import TrainConfig, Trainer

    img4 = _network_image(work, 1.0) / 500.0
    rng = np.random.default_rng(0)
    targets = torch.from_numpy(rng.integers(0, 128, size=(1, N_LAYERS, *img4.shape)).astype(np.uint8))
    images = torch.from_numpy(img4[None, None].astype(np.float32))
    if faithful:
        cfg = TrainConfig(batch_size=1, head_voxels=0, precision="fp32", channels_last=False, backward="native")
    else:
        cfg = TrainConfig(batch_size=1)
    trainer = Trainer(cfg)
    first = None
    if not faithful:  # the first step compiles the fused kernels: measured apart
        _, first = measure(lambda: trainer.step(images, targets))
    _, m = measure(lambda: trainer.step(images, targets))
    settings = {k: getattr(cfg, k) for k in ("batch_size", "head_voxels", "precision", "channels_last", "backward",
                                              "checkpointing")}
    out = {**m, "size": f"batch 1, input {img4.shape}", "settings": settings}
    if first is not None:
        out["first_step"] = first
    return out


def case_train_step_faithful(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _train_step(work, faithful=True)


def case_train_step_optimised(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _train_step(work, faithful=False)


SHIPPED_WEIGHTS = REPO / "weights" / "slicreg-cohort-v3"


def _register(work: Path, scale: float, atlas: bool) -> dict[str, Any]:
    """The whole ``slicreg register`` computation on preprocessed scans with the shipped weights bundle
    (:func:`slicreg.registration.register_preprocessed`: network pass(es) in bf16, keypoints, features, Adam, dense
    field) plus warping the moving image with the field; loading the bundle and the files is not included.
    ``atlas``: the moving scan is the template, whose own supervoxels stand for it (one network pass)."""
    from slicreg.bundle import load_bundle
    from slicreg.fields import warp_image
    from slicreg.registration import register_preprocessed

    fixed, _, _ = template(work, scale)
    moving = moving_scan(fixed, seed=3)
    bundle = load_bundle(SHIPPED_WEIGHTS)
    kwargs: dict[str, Any] = {}
    if atlas:
        kwargs = {"template_supervoxels": bundle.template_supervoxels.array, "moving_is_template": True}

    def run() -> Any:
        res = register_preprocessed(bundle.model, fixed, moving, seed=0, **kwargs)
        warp_image(moving, res.disp_vox, padding="border", backend="grid_sample")  # as `slicreg register --out-warped`
        return res

    res, m = measure(run)
    steps = {k: round(float(v), 3) for k, v in (res.info.get("timings_s") or {}).items()}
    return {**m, "size": f"{fixed.shape}, {'one network pass (atlas)' if atlas else 'two network passes'}",
            "parts_s": steps, "weights": SHIPPED_WEIGHTS.name}


def case_register_pair(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _register(work, scale, atlas=False)


def case_register_atlas(work: Path, scale: float, opts: dict[str, Any]) -> dict[str, Any]:
    return _register(work, scale, atlas=True)


CASES: dict[str, Callable[[Path, float, dict[str, Any]], dict[str, Any]]] = {
    "preprocess": case_preprocess, "cohort-source": case_cohort_source, "cohort-subject": case_cohort_subject,
    "cohort-true-field": case_cohort_true_field, "supervoxels": case_supervoxels, "slic-layer": case_slic_layer,
    "deeds-import": case_deeds_import, "align": case_align, "flow": case_flow, "warp": case_warp,
    "evaluate": case_evaluate, "inference-fp32": case_inference_fp32, "inference-bf16": case_inference_bf16,
    "inference-linear": case_inference_linear,
    "train-step-faithful": case_train_step_faithful, "train-step-optimised": case_train_step_optimised,
    "register-pair": case_register_pair, "register-atlas": case_register_atlas,
}
DESCRIPTIONS = {
    "preprocess": "preprocessing (reorient, 2 mm, crop) of the example CT",
    "cohort-source": "cohort: prepare the source scan (once per cohort)",
    "cohort-subject": "cohort: one subject (deformation, image, labels)",
    "cohort-true-field": "cohort: true field of one pair",
    "supervoxels": "template supervoxels, 16 layers, 1 process",
    "slic-layer": "one supervoxel layer (SLIC + fix + merge)",
    "deeds-import": "deeds import (files -> dense field)",
    "align": "built-in registration (align, abdomen-ct)",
    "flow": "supervoxel flow (keypoints, features, Adam, dense TPS field)",
    "warp": "warp image + labels",
    "evaluate": "evaluation of one pair (Dice, HD95, Jacobian, field error)",
    "inference-fp32": "network inference, one scan, fp32",
    "inference-bf16": "network inference, one scan, bf16 autocast",
    "inference-linear": "network inference, bf16, logits upsampled linearly before the argmax (reference rule)",
    "train-step-faithful": "training step, faithful (fp32, dense head, native backward)",
    "train-step-optimised": "training step, optimised (bf16, channels-last, compiled backward, head on 2048 voxels)",
    "register-pair": "slicreg register, two new scans (2 network passes, flow, dense field, warp)",
    "register-atlas": "slicreg register, scan -> template (1 network pass, flow, dense field, warp)",
}


def child_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    opts = json.loads(args.opts)
    row = CASES[args.case](Path(args.work), float(args.scale), opts)
    row.update(case=args.case, scale=float(args.scale), opts=opts, torch_threads=torch.get_num_threads())
    tmp = Path(args.result).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, args.result)
    return 0


# ============================================================================================ parent
def plan(only: list[str] | None, scales: list[float], keypoints: list[int],
         full: bool) -> list[tuple[str, float, dict]]:
    jobs: list[tuple[str, float, dict]] = []
    want = set(only) if only else None

    def add(case: str, scale: float, opts: dict | None = None) -> None:
        if want is None or case in want or (case == "slic-layer" and "supervoxels" in want):
            if (case, scale, json.dumps(opts or {})) not in [(c, s, json.dumps(o)) for c, s, o in jobs]:
                jobs.append((case, scale, opts or {}))

    for case in STAGES:
        add(case, 1.0)
    for case in SCALED:
        for s in scales:
            if case == "align" and s > 1.0 and not full:
                continue
            add(case, s)
    for n in keypoints:
        add("flow", 1.0, {"keypoints": n})
    return jobs


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env["PYTHONHASHSEED"] = "0"
    return env


def run_jobs(jobs: list[tuple[str, float, dict]], *, work: Path, threads: int, timeout_s: float) -> list[dict]:
    rows = []
    for i, (case, scale, opts) in enumerate(jobs, 1):
        result = work / f"result_{i}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--scale", str(scale), "--opts",
               json.dumps(opts), "--work", str(work), "--result", str(result), "--threads", str(threads)]
        label = f"[{i}/{len(jobs)}] {case} x{scale:g}" + (f" {opts}" if opts else "")
        print(f"{label} ...", end="", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(threads))
            status = proc.returncode
            err = proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            status, err = "timeout", f"killed after {timeout_s:.0f} s"
        if status == 0 and result.is_file():
            row = json.loads(result.read_text())
            row["child_s"] = time.perf_counter() - t0
            print(f" {row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} s CPU, {row['peak_rss_mb'] / 1024:.2f} GB peak",
                  flush=True)
        else:
            row = {"case": case, "scale": scale, "opts": opts, "error": f"status {status}: {err.strip()[-800:]}"}
            print(f" FAILED ({status})\n{err}", flush=True)
        rows.append(row)
    return rows


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def stage_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| stage | size | wall s | CPU s | CPU / wall | peak RSS GB | notes |", "|---|---|---|---|---|---|---|"]
    for row in doc["results"]:
        if row["scale"] != 1.0 or row.get("opts") or row["case"] == "slic-layer":
            continue
        name = DESCRIPTIONS.get(row["case"], row["case"])
        if "error" in row:
            lines.append(f"| {name} | - | failed | | | | {row['error'][:120]} |")
            continue
        notes = []
        if row.get("parts_s"):
            notes.append(", ".join(f"{k} {float(v):.1f}" for k, v in row["parts_s"].items() if k != "total"))
        if row.get("first_step"):
            notes.append(f"first step (compiling) {row['first_step']['wall_s']:.0f} s")
        ratio = row["cpu_s"] / row["wall_s"] if row["wall_s"] > 0 else float("nan")
        lines.append(f"| {name} | {row.get('size', '')} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {ratio:.2f} | "
                     f"{_gb(row['peak_rss_mb'])} | {'; '.join(notes)} |")
    return lines


def scaling_table(doc: dict[str, Any]) -> list[str]:
    scales = sorted({r["scale"] for r in doc["results"] if r["case"] in SCALED and not r.get("opts")})
    head = "| stage | " + " | ".join(f"{s:g}x: wall s / peak GB" for s in scales) + " |"
    lines = [head, "|---|" + "---|" * len(scales)]
    for case in SCALED:
        cells = []
        for s in scales:
            row = next((r for r in doc["results"] if r["case"] == case and r["scale"] == s and not r.get("opts")),
                       None)
            cells.append("-" if row is None else ("failed" if "error" in row else
                                                  f"{row['wall_s']:.2f} / {_gb(row['peak_rss_mb'])}"))
        if any(c != "-" for c in cells):
            lines.append(f"| {DESCRIPTIONS[case]} | " + " | ".join(cells) + " |")
    kp = [r for r in doc["results"] if r["case"] == "flow" and r.get("opts", {}).get("keypoints")]
    if kp:
        lines += ["", "| keypoints (flow at 1x) | wall s | Adam s | dense field s | peak RSS GB |",
                  "|---|---|---|---|---|"]
        for r in sorted(kp, key=lambda r: r["opts"]["keypoints"]):
            if "error" in r:
                lines.append(f"| {r['opts']['keypoints']} | failed | | | |")
                continue
            p = r.get("parts_s", {})
            lines.append(f"| {r.get('n_keypoints', r['opts']['keypoints'])} | {r['wall_s']:.2f} | "
                         f"{p.get('adam', float('nan')):.2f} | {p.get('dense', float('nan')):.2f} | "
                         f"{_gb(r['peak_rss_mb'])} |")
    return lines


def stages_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# Stage costs ({doc['date']})", "", hardware_line(m, doc), "", *stage_table(doc), "",
             "## Scaling with volume size (per-axis factor; 1x = 192 x 160 x 256 scans, 96 x 80 x 128 supervoxels "
             "and network input)", "", *scaling_table(doc), ""]
    return "\n".join(lines)


def hardware_line(m: dict[str, Any], doc: dict[str, Any]) -> str:
    v = m.get("versions", {})
    return (f"Machine: {m['cpu_model']} ({', '.join(m.get('cpu_flags', [])) or 'no AVX-512/AMX'}), "
            f"{m['cpus_usable']} cores, {m.get('memory_gb')} GB; {doc['threads']} threads per process; torch "
            f"{v.get('torch')}, numpy {v.get('numpy')}, scipy {v.get('scipy')}, Python {m['python']}; load "
            f"average {m['loadavg_start'][0]:.1f} at the start, {m.get('loadavg_end', [float('nan')])[0]:.1f} at "
            f"the end (the machine was shared with other jobs: wall times are upper bounds; CPU times are the "
            f"fairer figure). Commit {m.get('git_commit')}.")


def scaling_png(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for case in SCALED:
        rows = sorted([r for r in doc["results"] if r["case"] == case and not r.get("opts") and "error" not in r],
                      key=lambda r: r["scale"])
        if len(rows) < 2:
            continue
        x = [r["scale"] ** 3 for r in rows]
        axes[0].plot(x, [r["wall_s"] for r in rows], "o-", label=case)
        axes[1].plot(x, [r["peak_rss_mb"] / 1024 for r in rows], "o-", label=case)
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    scales = sorted({r["scale"] for r in doc["results"] if r["case"] in SCALED and not r.get("opts")})
    for ax, ylabel in ((axes[0], "wall time (s)"), (axes[1], "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator([s ** 3 for s in scales]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{s:g}x ({s ** 3:.3g})" for s in scales])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("size per axis (voxels relative to the real size)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    kp = sorted([r for r in doc["results"] if r["case"] == "flow" and r.get("opts", {}).get("keypoints")
                 and "error" not in r], key=lambda r: r["opts"]["keypoints"])
    if kp:
        n = [r.get("n_keypoints", r["opts"]["keypoints"]) for r in kp]
        axes[2].plot(n, [r["wall_s"] for r in kp], "o-", label="flow total")
        for part in ("adam", "dense"):
            axes[2].plot(n, [r.get("parts_s", {}).get(part, np.nan) for r in kp], "s--", label=part)
        ax2 = axes[2].twinx()
        ax2.plot(n, [r["peak_rss_mb"] / 1024 for r in kp], "k:", label="peak RSS (GB, right axis)")
        ax2.set_ylabel("peak RSS (GB)")
        axes[2].set_xscale("log")
        axes[2].xaxis.set_major_locator(FixedLocator(n))
        axes[2].xaxis.set_minor_locator(NullLocator())
        axes[2].set_xticklabels([str(v) for v in n])
        axes[2].set_xlabel("keypoints (random, flow at 1x)")
        axes[2].set_ylabel("wall time (s)")
        lines, labels = axes[2].get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        axes[2].legend(lines + lines2, labels + labels2, fontsize=7, loc="upper left")
        axes[2].grid(True, which="both", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"slicreg stage scaling; {m['cpu_model']}, {doc['threads']} threads; {doc['date']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the docs page
def _peer_lines(peers: dict[str, Any]) -> list[str]:
    """The peer table and the plain statements of where slicreg is behind, from peers.json."""
    from peers import markdown_table

    table = markdown_table(peers).splitlines()[2:]  # drop the title line of the standalone page
    lines = ["## slicreg beside its peers", "", *table, "",
             "![accuracy against time](../benchmarks/results/peers/peers.png)", ""]
    behind = behind_lines(peers)
    if behind:
        lines += ["### Where slicreg is behind", "", *behind, ""]
    return lines


def behind_lines(peers: dict[str, Any]) -> list[str]:
    """Plain statements of where slicreg is behind its peers (Markdown bullets), computed from peers.json."""
    methods = peers["methods"]
    ours = {k: v for k, v in methods.items() if k.startswith("slicreg")}
    others = {k: v for k, v in methods.items() if not k.startswith("slicreg") and k != "initial"}

    def mean(res: dict[str, Any], key: str) -> float:
        value = (res["summary"].get(key) or {}).get("mean")
        return float("nan") if value is None else float(value)

    behind = []
    if others:
        best_dice = max(others.items(), key=lambda kv: np.nan_to_num(mean(kv[1], "dice13"), nan=-1))
        best_err = min(others.items(), key=lambda kv: np.nan_to_num(mean(kv[1], "field_error_mm"), nan=1e9))
        fastest = min(others.items(), key=lambda kv: np.nan_to_num(mean(kv[1], "wall_s"), nan=1e9))
        for res in ours.values():
            d, e, t = mean(res, "dice13"), mean(res, "field_error_mm"), mean(res, "wall_s")
            bd, be, ft = mean(best_dice[1], "dice13"), mean(best_err[1], "field_error_mm"), mean(fastest[1], "wall_s")
            if np.isfinite(d) and d < bd:
                behind.append(f"- **{res['label']}** reaches Dice {100 * d:.1f} % where {best_dice[1]['label']} "
                              f"reaches {100 * bd:.1f} % ({100 * (bd - d):.1f} points behind).")
            if np.isfinite(e) and e > be:
                behind.append(f"- **{res['label']}**'s field error is {e:.2f} mm against {be:.2f} mm for "
                              f"{best_err[1]['label']}.")
            if np.isfinite(t) and t > ft:
                behind.append(f"- **{res['label']}** takes {t:.0f} s per pair; {fastest[1]['label']} takes {ft:.0f} s.")
            cheapest = min(others.items(), key=lambda kv: np.nan_to_num(mean(kv[1], "cpu_s"), nan=1e9))
            c, cc = mean(res, "cpu_s"), mean(cheapest[1], "cpu_s")
            if np.isfinite(c) and c > 1.2 * cc:
                behind.append(f"- **{res['label']}** uses {c:.0f} s of CPU per pair, {c / cc:.1f}x what "
                              f"{cheapest[1]['label']} uses ({cc:.0f} s): on a machine shared with other work, CPU "
                              f"time is the fairer cost.")
    if "slicreg" not in methods:
        why = peers.get("unavailable", {}).get("slicreg", "not run")
        behind.append(f"- **slicreg itself (network + supervoxel flow) is not in this table**: {why}. Until a "
                      "trained bundle is benchmarked here, the only slicreg row is the built-in conventional "
                      "registration (`slicreg align`), which is the transfer tool, not the method of the paper.")
    return behind


def _row(stages: dict[str, Any] | None, case: str, scale: float = 1.0) -> dict[str, Any] | None:
    if not stages:
        return None
    return next((r for r in stages["results"] if r["case"] == case and r["scale"] == scale and not r.get("opts")
                 and "error" not in r), None)


def _summary_lines(stages: dict[str, Any] | None, peers: dict[str, Any] | None) -> list[str]:
    """A few plain sentences computed from the measurements (nothing here is typed in by hand)."""
    out = []
    inf = _row(stages, "inference-bf16")
    for case, what in (("register-pair", "two new scans (both network passes in bf16"),
                       ("register-atlas", "a scan to the template (one network pass in bf16")):
        row = _row(stages, case)
        if row:
            parts = row.get("parts_s") or {}
            steps = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
            out.append(f"- Registering {what}, keypoints, features, Adam, dense field, warping the moving scan; "
                       f"shipped weights, preprocessed 192 x 160 x 256 inputs) measured {row['wall_s']:.1f} s wall, "
                       f"{row['cpu_s']:.1f} s CPU on 2 threads, peak {row['peak_rss_mb'] / 1024:.1f} GB"
                       + (f" (steps, s: {steps})." if steps else "."))
    fp32 = _row(stages, "inference-fp32")
    if inf and fp32:
        out.append(f"- bf16 autocast makes the prediction {fp32['cpu_s'] / max(inf['cpu_s'], 1e-9):.1f}x cheaper in "
                   f"CPU time than fp32 ({fp32['cpu_s']:.1f} s -> {inf['cpu_s']:.1f} s).")
    faithful, opt = _row(stages, "train-step-faithful"), _row(stages, "train-step-optimised")
    if faithful and opt:
        out.append(f"- One training step (batch 1, 96 x 80 x 128): faithful {faithful['wall_s']:.1f} s / "
                   f"{faithful['peak_rss_mb'] / 1024:.1f} GB, optimised {opt['wall_s']:.1f} s / "
                   f"{opt['peak_rss_mb'] / 1024:.1f} GB ({faithful['cpu_s'] / max(opt['cpu_s'], 1e-9):.1f}x less CPU "
                   f"time).")
    if peers:
        ms = peers["methods"]
        timed = {k: v for k, v in ms.items() if (v["summary"].get("wall_s") or {}).get("mean") is not None}
        if timed:
            def dice(v: dict[str, Any]) -> float:
                value = (v["summary"].get("dice13") or {}).get("mean")
                return float("nan") if value is None else float(value)

            parts = ", ".join(f"{v['label']} {v['summary']['wall_s']['mean']:.0f} s / {100 * dice(v):.1f} %"
                              for v in sorted(timed.values(), key=lambda v: v["summary"]["wall_s"]["mean"]))
            init = (ms.get("initial", {}).get("summary", {}).get("dice13") or {}).get("mean")
            load = peers["machine"].get("loadavg_start", [float("nan")])[0]
            out.append(f"- On {len(peers['pairs'])} cohort test -> template pairs (wall time per pair / Dice over 13 "
                       f"organs; {100 * init:.1f} % before registration; load average {load:.1f} when the run "
                       f"started, so compare these times with each other, not with the stage table): {parts}."
                       if init is not None else f"- On {len(peers['pairs'])} cohort test -> template pairs: {parts}.")
    return out


def write_docs(out: Path, docs: Path = DOCS) -> Path:
    """docs/benchmarks.md from ``out/stages.json`` and ``out/peers/peers.json`` (whichever exist)."""
    stages_path, peers_path = out / "stages.json", out / "peers" / "peers.json"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else None
    peers = json.loads(peers_path.read_text()) if peers_path.is_file() else None
    lines = ["# Performance", "",
             "Generated by `benchmarks/run_all.py` from `benchmarks/results/stages.json` and "
             "`benchmarks/results/peers/peers.json` (`benchmarks/peers.py`); do not edit by hand. How to reproduce: "
             "`benchmarks/README.md`.", ""]
    summary = _summary_lines(stages, peers)
    if summary:
        lines += ["## In short", "", *summary, ""]
    if stages:
        lines += [f"## Stage costs (measured {stages['date']})", "", hardware_line(stages["machine"], stages), "",
                  *stage_table(stages), "",
                  "## Scaling with volume size and keypoints", "",
                  "Per-axis factors 0.5x, 1x, 1.5x of the real sizes (1x = 192 x 160 x 256 at 2 mm for scans and "
                  "fields, 96 x 80 x 128 at 4 mm for the network input and the supervoxel grid).", "",
                  *scaling_table(stages), "", "![scaling](../benchmarks/results/scaling.png)", ""]
    if peers:
        m = peers["machine"]
        lines += [f"Peers measured {peers['date']} on {m['cpu_model']} ({m['cpus_usable']} cores, "
                  f"{peers['threads']} threads per method).", "", *_peer_lines(peers)]
    else:
        lines += ["## slicreg beside its peers", "", "Not measured yet: run `benchmarks/peers.py` (see "
                  "benchmarks/README.md).", ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, docs)
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated stages (default all): {', '.join(CASES)}")
    ap.add_argument("--scales", default="0.5,1,1.5", help="per-axis size factors for the scaling runs")
    ap.add_argument("--keypoints", default=",".join(map(str, KEYPOINTS)), help="keypoint counts for the flow "
                    "scaling ('' = none)")
    ap.add_argument("--full", action="store_true", help="also align at scales > 1 (several minutes each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement before it is killed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, help="scratch folder for cached inputs (default: a temporary one)")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not regenerate docs/benchmarks.md and docs/performance.md")
    ap.add_argument("--docs-only", action="store_true", help="only redraw stages.md, scaling.png and "
                    "docs/benchmarks.md from the JSON in --out")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        return child_main(args)
    if args.docs_only:
        if (args.out / "stages.json").is_file():  # tables and plot too: they are made from the same JSON
            doc = json.loads((args.out / "stages.json").read_text())
            (args.out / "stages.md").write_text(stages_markdown(doc))
            scaling_png(doc, args.out / "scaling.png")
        print(f"wrote {write_docs(args.out)}")
        print(f"wrote {write_section(args.out)}")
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only:
        bad = [s for s in only if s not in CASES]
        if bad:
            ap.error(f"unknown stage(s) {bad}; known: {list(CASES)}")
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    keypoints = [int(k) for k in args.keypoints.split(",") if k.strip()]
    jobs = plan(only, scales, keypoints, args.full)
    machine = machine_info(threads=args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{len(jobs)} measurements, {args.threads} threads each, one at a time; {machine['cpu_model']}, "
          f"load average {machine['loadavg_start'][0]:.1f}")
    tmpdir = None
    if args.work is None:
        tmpdir = tempfile.mkdtemp(prefix="slicreg_bench_")
        work = Path(tmpdir)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run_jobs(jobs, work=work, threads=args.threads, timeout_s=args.timeout)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = {"date": started, "machine": machine, "threads": args.threads, "total_s": time.perf_counter() - t0,
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": rows}
    out = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = json.dumps(doc, indent=1, default=str)
    (out / "runs" / f"stages_{stamp}.json").write_text(text)
    if only is None or not (out / "stages.json").is_file():
        (out / "stages.json").write_text(text)
    else:  # a partial run updates the matching rows of the latest full one
        latest = json.loads((out / "stages.json").read_text())
        key = lambda r: (r["case"], r["scale"], json.dumps(r.get("opts", {}), sort_keys=True))  # noqa: E731
        fresh = {key(r): r for r in rows}
        latest["results"] = [fresh.pop(key(r), r) for r in latest["results"]] + list(fresh.values())
        latest["partial_updates"] = latest.get("partial_updates", []) + [{"date": started, "only": only}]
        doc = latest
        (out / "stages.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "stages.md").write_text(stages_markdown(doc))
    scaling_png(doc, out / "scaling.png")
    print(stages_markdown(doc))
    print(f"total {doc.get('total_s', 0):.0f} s; wrote {out / 'stages.json'}, {out / 'stages.md'}, "
          f"{out / 'scaling.png'}, {out / 'runs' / f'stages_{stamp}.json'}")
    if not args.no_docs:
        print(f"wrote {write_docs(out)}")
        print(f"wrote {write_section(out)}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    from pipelines.cli import ensure_fast_allocator

    ensure_fast_allocator()  # measure what the slicreg command runs (SLICREG_ALLOCATOR=default: glibc's defaults)
    sys.exit(main())
