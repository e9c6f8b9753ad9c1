"""Benchmark of one SLIC-Reg training step (batch 4, input 96 x 80 x 128) and of inference, on the CPU.

Every configuration runs in its own fresh process (so its peak RSS is its own) and reports wall and CPU time per
step; all configurations of one invocation run back to back, so compare the *ratios* of one run (the machine is
shared and absolute times drift by tens of per cent).

Configurations:

- ``faithful``: the reference recipe -- fp32, channels-first, dense head, the loss taken layer by layer on the
  ``(B, 128, 16, ...)`` view (``logits[:, :, l]``, which makes full-size copies and zero-filled gradients), gradient
  checkpointing (without it the dense head does not fit in memory), torch's own convolution backward;
- ``faithful + <lever>``: one lever switched on at a time: ``view-loss`` (cross-entropy on a ``(B * 16, 128, S)``
  view, no per-layer copies), ``voxels`` (head and loss at 2048 random output voxels per scan), ``bf16`` (autocast),
  ``channels-last``, ``fast-backward`` (compiled depthwise weight-gradient kernel + GEMM dilated-conv gradient);
- ``optimised``: all levers, no checkpointing (the shipped training setting), and ``optimised - <lever>`` with
  one lever switched off at a time, plus ``optimised, 1 thread`` / ``2 threads`` and ``+ checkpointing``;
- inference: eval-mode forward at batch 1, fp32 vs bf16, channels-first vs channels-last, and :func:`predict`.

``--model unet`` runs the same configurations with the U-Net baseline (:mod:`slicreg.unet`; its ``backward`` setting
changes nothing), ``--model both`` runs every configuration with the DeepLab and then the U-Net back to back and
adds a table of their ratios (the fair comparison on a shared machine: the two steps of a pair see the same load).

    .venv/bin/python benchmarks/bench_train_step.py                     # everything (slow: the faithful steps)
    .venv/bin/python benchmarks/bench_train_step.py --only optimised    # names containing a substring
    .venv/bin/python benchmarks/bench_train_step.py --check-kernels     # fast backward vs torch's, real sizes
    .venv/bin/python benchmarks/bench_train_step.py --names optimised --model both --no-inference
        # the shipped training step, DeepLab vs U-Net side by side
    .venv/bin/python benchmarks/bench_train_step.py --weights weights/slicreg-cohort \\
        --dataset runs/demo/preprocess/current --transferred runs/demo/transfer/current
        # bf16 vs fp32 argmax agreement, time per scan, accuracy on the held-out scans

Output: a table (and ``--json FILE``) with per-step wall and CPU seconds, peak RSS, and the ratio to the faithful
step measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

SHAPE = (96, 80, 128)
BATCH = 4


@dataclass(frozen=True)
class StepConfig:
    name: str
    head_voxels: int = 0  # 0 = dense head
    view_loss: bool = False
    bf16: bool = False
    channels_last: bool = False
    checkpointing: bool = True
    backward: str = "native"
    threads: int = 2
    warmup: int = 1
    steps: int = 1
    model: str = "deeplab"  # slicreg.network.build_model(model=...): "deeplab" or "unet"


FAITHFUL = StepConfig("faithful")
OPTIMISED = StepConfig("optimised", head_voxels=2048, view_loss=True, bf16=True, channels_last=True,
                       checkpointing=False, backward="compiled", warmup=2, steps=3)


def configurations(threads: int) -> list[StepConfig]:
    f = replace(FAITHFUL, threads=threads)
    o = replace(OPTIMISED, threads=threads)
    fast = dict(warmup=1, steps=2)
    once = dict(warmup=0, steps=1)  # slow configurations: one step, its one-time setup included (see faithful's)
    levers = [
        replace(f, name="faithful + view-loss", view_loss=True, **once),
        replace(f, name="faithful + voxels", head_voxels=2048, **fast),
        replace(f, name="faithful + bf16", bf16=True, **once),
        replace(f, name="faithful + channels-last", channels_last=True, **once),
        replace(f, name="faithful + fast-backward", backward="compiled", warmup=1, steps=1),  # warm-up compiles
    ]
    without = [
        replace(o, name="optimised - voxels (dense head)", head_voxels=0, checkpointing=True, **once),
        replace(o, name="optimised - bf16", bf16=False),
        replace(o, name="optimised - channels-last", channels_last=False),
        replace(o, name="optimised - fast-backward", backward="native"),
        replace(o, name="optimised, 1024 voxels", head_voxels=1024),
        replace(o, name="optimised, 4096 voxels", head_voxels=4096),
        replace(o, name="optimised + checkpointing", checkpointing=True),
        replace(o, name=f"optimised, {3 - threads} thread(s)", threads=3 - threads),
    ]
    return [f, *levers, o, *without]


# ------------------------------------------------------------------------------------------- one step


def faithful_loss(logits: Any, targets: Any) -> Any:
    """The reference's loss: logits viewed (B, 128, 16, ...) and the cross-entropy taken layer by layer."""
    import torch.nn.functional as F

    b = logits.shape[0]
    z = logits.view(b, 128, 16, *logits.shape[2:])
    return sum(F.cross_entropy(z[:, :, layer], targets[:, layer]) for layer in range(16)) / 16


def _step_worker(cfg: StepConfig, queue: Any) -> None:
    try:
        queue.put(_run_steps(cfg))
    except Exception as exc:  # report instead of hanging the parent
        queue.put({"name": cfg.name, "error": f"{type(exc).__name__}: {exc}"})


def _run_steps(cfg: StepConfig) -> dict[str, Any]:
    import numpy as np
    import torch

    from slicreg.network import build_model
    from slicreg.train import augment_batch, random_affines, random_voxels, supervoxel_loss

    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 1, *SHAPE, generator=gen)
    targets = torch.randint(0, 128, (BATCH, 16, *SHAPE), generator=gen, dtype=torch.uint8)
    model = build_model(seed=0, backward=cfg.backward, checkpointing=cfg.checkpointing,
                        channels_last=cfg.channels_last, model=cfg.model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.004)
    out_size = int(np.prod([s // 2 for s in SHAPE]))

    def step() -> float:
        theta = random_affines(BATCH, sigma=0.07, generator=gen)
        voxels = random_voxels(BATCH, cfg.head_voxels, out_size, generator=gen) if cfg.head_voxels else None
        x, t = augment_batch(images, targets, theta, voxels=voxels)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = model(x, voxels=voxels, generator=gen)
        if voxels is not None:
            logits = logits.float()
        if cfg.view_loss:
            loss = supervoxel_loss(logits, t)
        elif voxels is not None:
            loss = faithful_loss(logits.reshape(BATCH, 2048, -1, 1, 1), t.reshape(BATCH, 16, -1, 1, 1))
        else:
            loss = faithful_loss(logits, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    warm = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(cfg.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"name": cfg.name, "config": asdict(cfg), "wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
            "walls": walls, "warmup_s": warm, "loss": loss,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_isolated(fn: Any, arg: Any, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(arg, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"name": getattr(arg, "name", str(arg)), "error": f"no result within {timeout:.0f} s "
                  f"(exit code {proc.exitcode})"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"exit code {proc.exitcode}"
    return result


# ------------------------------------------------------------------------------------------- inference


def _inference_worker(arg: tuple[int, str], queue: Any) -> None:
    try:
        queue.put(_inference(*arg))
    except Exception as exc:
        queue.put({"name": "inference", "error": f"{type(exc).__name__}: {exc}"})


def _inference(threads: int, model_name: str = "deeplab") -> dict[str, Any]:
    import numpy as np
    import torch

    from slicreg.bundle import predict
    from slicreg.network import build_model

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *SHAPE, generator=gen)
    out = {}
    for name, cl, bf16 in (("fp32, channels-first", False, False), ("fp32, channels-last", True, False),
                           ("bf16, channels-first", False, True), ("bf16, channels-last", True, True)):
        model = build_model(seed=0, channels_last=cl, model=model_name).eval()
        xi = x.contiguous(memory_format=torch.channels_last_3d) if cl else x
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                if bf16:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        model(xi)
                else:
                    model(xi)
                times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times[1:]))
    model = build_model(seed=0, channels_last=True, model=model_name).eval()
    img = (x[0, 0] * 300).numpy()
    predict(model, img)
    t0 = time.perf_counter()
    predict(model, img)
    out["predict() labels on the 4 mm grid, bf16"] = time.perf_counter() - t0
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"name": f"inference [{model_name}]", "forward_s": out}


# --------------------------------------------------------------------------------------- kernel checks


def check_kernels() -> None:
    """Fast backward vs torch's own at real layer sizes: time and agreement of the weight gradients.

    Depthwise: errors against a float64 evaluation of the same sums (channels 0..31, to bound memory); dilated:
    the GEMM gradient against torch's float32 gradient. (float64 through torch's own CPU convolution backward
    falls back to an unfolded implementation that needs tens of GB at these sizes.)"""
    import torch
    import torch.nn.functional as F

    from slicreg.network_kernels import _COMPILED_WEIGHT_GRAD, depthwise_weight_grad, dilated_conv3d_weight_grad

    gen = torch.Generator().manual_seed(0)
    for b, c, size, stride in ((4, 192, (48, 40, 64), 1), (4, 192, (48, 40, 64), 2), (4, 384, (24, 20, 32), 1)):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(b, c, *size, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last_3d)
            w = (torch.randn(c, 1, 3, 3, 3, generator=gen) * 0.1).to(dtype)
            g = torch.randn_like(F.conv3d(x, w, stride=stride, padding=1, groups=c))
            ref = depthwise_weight_grad(x[:, :32].double(), g[:, :32].double(), stride=stride)
            t0 = time.process_time()
            native = torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 3, [1] * 3, [1] * 3, False,
                                                         [0] * 3, c, [False, True, False])[1]
            t_native = time.process_time() - t0
            _COMPILED_WEIGHT_GRAD(x.permute(0, 2, 3, 4, 1), g.permute(0, 2, 3, 4, 1), stride)  # compile
            t0 = time.process_time()
            fast = _COMPILED_WEIGHT_GRAD(x.permute(0, 2, 3, 4, 1), g.permute(0, 2, 3, 4, 1), stride)
            t_fast = time.process_time() - t0
            fast = fast.t().reshape(c, 1, 3, 3, 3)
            err = lambda a, ref=ref: float((a[:32].double() - ref).abs().max() / ref.abs().max())  # noqa: E731
            print(f"depthwise {b}x{c}x{'x'.join(map(str, size))} stride {stride} {str(dtype)[6:]:>8}: "
                  f"torch {t_native:6.2f} s CPU (rel. err {err(native):.1e}), compiled {t_fast:6.2f} s CPU "
                  f"(rel. err {err(fast):.1e})", flush=True)
    for r in (2, 16):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(4, 64, 24, 20, 32, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last_3d)
            w = (torch.randn(128, 64, 3, 3, 3, generator=gen) * 0.05).to(dtype)
            g = torch.randn_like(F.conv3d(x, w, padding=r, dilation=r))
            t0 = time.process_time()
            native = torch.ops.aten.convolution_backward(g, x, w, None, [1] * 3, [r] * 3, [r] * 3, False, [0] * 3, 1,
                                                         [False, True, False])[1]
            t_native = time.process_time() - t0
            t0 = time.process_time()
            fast = dilated_conv3d_weight_grad(x, g, dilation=r)
            t_fast = time.process_time() - t0
            diff = float((fast.double() - native.double()).abs().max() / native.double().abs().max())
            print(f"ASPP 3x3x3 dilation {r:2d} {str(dtype)[6:]:>8}: torch {t_native:6.2f} s CPU, GEMM {t_fast:6.2f} s "
                  f"CPU, max relative difference {diff:.1e}", flush=True)


# ------------------------------------------------------------------------------------- agreement check


def agreement(weights: str, dataset: str, transferred: str | None, limit: int, *, truth: bool = False) -> None:
    """bf16 vs fp32 argmax agreement and inference time per scan; with ``transferred``, the accuracy of the predicted
    supervoxels against the transferred ones on the bundle's held-out (validation) scans; with ``truth``, on the
    dataset's test scans against the template supervoxels carried through the true test -> template field."""
    import numpy as np
    import torch

    from preprocessing.datasets import load_dataset
    from slicreg.bundle import load_bundle, predict
    from slicreg.io import load_field, load_image, load_volume
    from slicreg.network import network_input
    from slicreg.transfer import transfer_supervoxels

    bundle = load_bundle(weights)
    ds = load_dataset(Path(dataset))
    held_out = list(bundle.card.get("training", {}).get("val_ids") or [])
    ids = held_out if transferred and held_out and not truth else (list(ds.test) or list(ds.subjects))
    truth_fields = ds.ground_truth_fields if truth else {}
    template_sv = np.asarray(bundle.template_supervoxels.array)
    scores = []
    for sid in ids[:limit]:
        img = load_image(ds.subject(sid).image)
        x = network_input(img.array) * 500.0  # 4 mm HU
        t0 = time.perf_counter()
        lab_bf = predict(bundle, x)
        t_bf = time.perf_counter() - t0
        t0 = time.perf_counter()
        lab_32 = predict(bundle, x, dtype=torch.float32)
        t_32 = time.perf_counter() - t0
        line = (f"{sid}: bf16 vs fp32 argmax agreement {100 * float((lab_bf == lab_32).mean()):.2f} % "
                f"(predict on the 4 mm grid: bf16 {t_bf:.1f} s, fp32 {t_32:.1f} s)")
        ref = None
        if truth and (sid, ds.template) in truth_fields:
            field = load_field(truth_fields[(sid, ds.template)])
            ref = transfer_supervoxels(template_sv, np.asarray(field.array))
            what = "true-field supervoxels"
        elif transferred:
            tp = Path(transferred) / "transferred" / f"{sid}.nii.gz"
            tp = tp if tp.is_file() else Path(transferred) / f"{sid}.nii.gz"
            if tp.is_file():
                ref = load_volume(tp, kind="labels", channels=True).array
                what = "transferred"
        if ref is not None:
            hit = lab_bf == ref
            fg = ref > 0
            acc, acc_fg = 100 * float(hit.mean()), 100 * float(hit[fg].mean())
            scores.append((acc, acc_fg))
            line += f"; vs {what}: accuracy {acc:.1f} %, foreground {acc_fg:.1f} % (mean over 16 layers)"
        print(line, flush=True)
    if scores:
        a = np.array(scores)
        print(f"mean over {len(a)} scans: accuracy {a[:, 0].mean():.1f} %, foreground {a[:, 1].mean():.1f} % "
              f"(min {a[:, 1].min():.1f}, max {a[:, 1].max():.1f})", flush=True)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the main configurations (default 2)")
    ap.add_argument("--only", default=None, help="run only configurations whose name contains this text")
    ap.add_argument("--names", default=None, help="run only these configurations (comma-separated exact names)")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference timings")
    ap.add_argument("--check-kernels", action="store_true", help="only compare fast and torch weight gradients")
    ap.add_argument("--weights", default=None, help="a bundle: measure bf16 vs fp32 argmax agreement")
    ap.add_argument("--dataset", default=None, help="preprocessed dataset folder for --weights")
    ap.add_argument("--transferred", default=None, help="transfer output: also score predictions on held-out scans")
    ap.add_argument("--limit", type=int, default=4, help="scans for --weights (default 4)")
    ap.add_argument("--truth", action="store_true",
                    help="score the test scans against the template supervoxels carried by the true fields")
    ap.add_argument("--model", choices=("deeplab", "unet", "both"), default="deeplab",
                    help="the network: the DeepLab (default), the U-Net baseline, or both side by side (each "
                         "configuration with the DeepLab, then with the U-Net)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration (default 3600)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.check_kernels:
        check_kernels()
        return 0
    if args.weights:
        if not args.dataset:
            ap.error("--weights needs --dataset")
        agreement(args.weights, args.dataset, args.transferred, args.limit, truth=args.truth)
        return 0
    cfgs = [c for c in configurations(args.threads) if args.only is None or args.only in c.name]
    if args.names:
        wanted = [n.strip() for n in args.names.split(",")]
        known = {c.name: c for c in cfgs}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            ap.error(f"--names: unknown configuration(s) {unknown}; known: {sorted(known)}")
        cfgs = [known[n] for n in wanted]
    models = ("deeplab", "unet") if args.model == "both" else (args.model,)
    cfgs = [replace(c, model=m, name=c.name if m == "deeplab" and args.model != "both" else f"{c.name} [{m}]")
            for c in cfgs for m in models]
    print(f"training step, batch {BATCH}, input {'x'.join(map(str, SHAPE))}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start", flush=True)
    results = []
    for cfg in cfgs:
        r = run_isolated(_step_worker, cfg, args.timeout)
        results.append(r)
        if "error" in r:
            print(f"  {cfg.name:<34} FAILED: {r['error']}", flush=True)
        else:
            print(f"  {cfg.name:<34} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU  peak RSS "
                  f"{r['peak_rss_gb']:5.2f} GB  (warm-up {cfg.warmup} step(s) {r['warmup_s']:.0f} s; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    for model in models:
        faithful = "faithful" if model == "deeplab" and args.model != "both" else f"faithful [{model}]"
        base = next((r for r in results if r["name"] == faithful and "error" not in r), None)
        if base is not None:
            print(f"\nratio to the {faithful} step of this run (wall, CPU):")
            for r in results:
                if "error" not in r and r["config"]["model"] == model:
                    print(f"  {r['name']:<34} {base['wall_s'] / r['wall_s']:6.1f}x "
                          f"{base['cpu_s'] / r['cpu_s']:6.1f}x")
    if args.model == "both":
        print("\nU-Net / DeepLab per configuration (wall, CPU; > 1: the U-Net is slower):")
        done = {r["name"]: r for r in results if "error" not in r}
        for cfg in cfgs:
            if cfg.model == "unet":
                name = cfg.name[: -len(" [unet]")]
                d, u = done.get(f"{name} [deeplab]"), done.get(cfg.name)
                if d is not None and u is not None:
                    print(f"  {name:<34} {u['wall_s'] / d['wall_s']:6.2f}x {u['cpu_s'] / d['cpu_s']:6.2f}x")
    inference = None
    if not args.no_inference and (args.only is None or "inference" in args.only):
        inference = []
        for model in models:
            result = run_isolated(_inference_worker, (args.threads, model), args.timeout)
            inference.append(result)
            print(f"\ninference, batch 1, eval mode, dense head ({model}):")
            if "error" in result:
                print(f"  FAILED: {result['error']}")
            else:
                for k, v in result["forward_s"].items():
                    print(f"  {k:<42} {v:6.2f} {'GB' if k == 'peak_rss_gb' else 's'}")
        inference = inference[0] if len(inference) == 1 else inference
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": results, "inference": inference,
                                               "load_average_end": os.getloadavg()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
