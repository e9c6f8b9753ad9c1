"""Benchmark of pairwise registration by supervoxels at real size (2 mm scans 192 x 160 x 256, network input
96 x 80 x 128 at 4 mm): what each step of ``slicreg register`` costs on preprocessed scans.

Part 1 -- ``network``: one network pass with the per-layer argmax on the stride-2 grid, by
``slicreg.bundle.predict(..., grid="output")`` and by ``slicreg.registration.network_labels`` (the registration's
path: the same labels, argmax over the contiguous classes of the channels-last logits), in each setting: fp32
or bf16 autocast, contiguous or channels-last 3-D memory, 1 or 2 torch threads; median of ``--repeats`` after
a warm-up. Weights: ``--weights BUNDLE`` or random (``build_model(seed=0)``; the time does not depend on the
weights). Each part runs in a fresh process, by default with the ``slicreg`` command's allocator setting
(``pipelines.cli.ALLOCATOR_ENV``; ``--allocator default`` for glibc's own).

Part 2 -- ``pair``: the whole registration of one pair, step by step: network pass of the fixed and of the
moving scan (bf16 autocast, channels-last, as ``slicreg register`` runs it), keypoints, features, Adam flow,
dense field, optionally ``--refine``, warping the moving image (linear) and a label map (nearest), saving the
field. Median wall and CPU time per step over ``--repeats`` runs, and the peak RSS of the process that ran
them (a fresh process per part). The maps the flow works on:

- ``--maps synthetic`` (default without ``--weights``): random weights give meaningless maps, so the flow
  runs on synthetic supervoxel maps (16 layers of 127 Voronoi cells; the moving maps are the fixed ones pulled
  through a known smooth map, as in ``bench_flow.py``) and the keypoint error against the known displacement
  is printed -- the check that speed changes leave the result alone;
- ``--maps network``: the maps the network predicted (meaningful with trained ``--weights``); the whole
  registration then runs as ``slicreg register`` runs it (``slicreg.registration.register_preprocessed`` with the
  model: network passes on the stride-2 grid, ``label_upsample=2``).

``--compare`` (with ``--maps network``) also runs the previous algorithms -- ``network_labels(argmax="torch")``,
4 mm maps, the flow's ``gradient="autograd", evaluation="points"`` -- alternately with the current
ones in the same process (the same machine load), and prints both tables and the largest field difference.
The machine is shared: compare CPU seconds and ratios from one run, not wall times across runs.

Images: ``--fixed``/``--moving`` preprocessed CT files (e.g. two of the cohort's ``prep`` subjects), or a
synthetic CT-like pair.

    .venv/bin/python benchmarks/bench_register.py [--part network pair] [--repeats 3] [--threads 2]
        [--weights BUNDLE] [--fixed F --moving M] [--maps synthetic|network] [--refine] [--compare]
        [--allocator command|default] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (192, 160, 256)
NET_SHAPE = tuple(s // 2 for s in SHAPE)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def synthetic_ct(shape: tuple[int, ...], seed: int, shift: tuple[float, ...] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """A CT-like volume in HU: air, an ellipsoidal body (fat/soft tissue), a few organ-like blobs and a spine."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(s, dtype=np.float32) - shift[a] for a, s in enumerate(shape)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = (np.array(shape) - 1) / 2
    body = ((x - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.4 * shape[1])) ** 2 <= 1
    img = np.where(body, -80.0, -1000.0).astype(np.float32) + rng.normal(0, 15, shape).astype(np.float32)
    for _ in range(12):
        p = c + rng.uniform(-0.3, 0.3, 3) * np.array(shape)
        r = rng.uniform(8, 30)
        blob = ((x - p[0]) ** 2 + (y - p[1]) ** 2 + ((z - p[2]) * 0.7) ** 2) <= r * r
        img = np.where(blob & body, rng.uniform(30, 180), img)
    spine = ((x - c[0]) ** 2 + (y - 0.75 * shape[1]) ** 2) <= 12 ** 2
    img = np.where(spine, 700.0, img)
    return img.astype(np.float32)


def _load_model(weights: str | None, channels_last: bool) -> Any:
    import torch

    if weights:
        from slicreg.bundle import load_bundle

        return load_bundle(weights, channels_last=channels_last)
    from slicreg.network import build_model

    model = build_model(seed=0, backward="native").eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _timed(fn: Any) -> tuple[Any, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


# ---------------------------------------------------------------------------------------------- network
def part_network(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from slicreg.bundle import predict
    from slicreg.registration import network_labels

    image = synthetic_ct(NET_SHAPE, seed=0)
    rows = []
    paths = {"bundle.predict": lambda model, dtype: predict(model, image, output="labels", grid="output",
                                                            dtype=dtype),
             "network_labels": lambda model, dtype: network_labels(model, image, dtype=dtype)}
    for threads in args.net_threads:
        torch.set_num_threads(threads)
        for channels_last in (False, True):
            model = _load_model(args.weights, channels_last)
            for name, dtype in (("fp32", torch.float32), ("bf16", None)):
                for path, fn in paths.items():
                    fn(model, dtype)  # warm-up
                    times = [_timed(partial(fn, model, dtype))[1:] for _ in range(args.repeats)]
                    wall, cpu = np.median([t[0] for t in times]), np.median([t[1] for t in times])
                    rows.append({"path": path, "precision": name, "threads": threads,
                                 "memory": "channels-last" if channels_last else "contiguous",
                                 "wall_s": round(float(wall), 3), "cpu_s": round(float(cpu), 3)})
                    print(f"  {path:15s} {name:5s} {rows[-1]['memory']:13s} {threads} thread(s): wall {wall:6.2f} s, "
                          f"CPU {cpu:6.2f} s", flush=True)
    return {"rows": rows, "peak_rss_gb": round(_rss_gb(), 3)}


# ---------------------------------------------------------------------------------------------- pair
def _synthetic_maps(seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_flow import pull, smooth_map, voronoi_maps

    fixed = voronoi_maps(NET_SHAPE, 16, 127, seed=seed)
    v = smooth_map(NET_SHAPE, 2.0, (4.0, -3.0, 5.0), seed=seed + 1)
    return fixed, pull(fixed, v), v


PREVIOUS_FLOW = {"label_upsample": 1, "gradient": "autograd", "evaluation": "points"}
"""The flow's previous algorithms (``--compare``): 4 mm maps, autograd Adam, TPS at points + interpolate."""


def _register_previous(model: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, seed: int) -> Any:
    """The registration as before the speed work, through the keyword switches that keep the old algorithms:
    network labels with ``argmax="torch"`` (whole logits, ``torch.max``), upsampled to 4 mm maps, flow with
    :data:`PREVIOUS_FLOW`. (Keypoints, features and the kNN graph use today's implementations on the 4 mm maps --
    bitwise the same values, and already faster than the original code; see docs/register.md for its numbers.)"""
    import torch

    from slicreg.registration import _predict_stride2, register_preprocessed, upsample_labels_stride2

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    maps = []
    for side, hu in (("fixed", fixed_hu), ("moving", moving_hu)):
        t, c = time.perf_counter(), time.process_time()
        lab = _predict_stride2(model, hu, argmax="torch")
        maps.append(upsample_labels_stride2(torch.from_numpy(lab)).numpy())
        wall[f"network {side}"], cpu[f"network {side}"] = time.perf_counter() - t, time.process_time() - c
    result = register_preprocessed(None, fixed_hu, moving_hu, fixed_sv=maps[0], moving_sv=maps[1], seed=seed,
                                   **PREVIOUS_FLOW)
    result.info["timings_s"] = {**wall, **result.info["timings_s"]}
    result.info["cpu_s"] = {**cpu, **result.info["cpu_s"]}
    return result


def part_pair(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from slicreg.fields import warp_image, warp_labels
    from slicreg.io import load_image, save_field
    from slicreg.registration import _predict_stride2, register_preprocessed

    torch.set_num_threads(args.threads)
    if args.fixed:
        fixed, moving = load_image(args.fixed), load_image(args.moving)
        fixed_hu, moving_hu, affine = fixed.array, moving.array, fixed.affine
    else:
        fixed_hu, moving_hu = synthetic_ct(SHAPE, seed=1), synthetic_ct(SHAPE, seed=1, shift=(6.0, -4.0, 8.0))
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_hu = np.asarray(fixed_hu, dtype=np.float32)
    moving_hu = np.asarray(moving_hu, dtype=np.float32)
    if fixed_hu.shape != moving_hu.shape or any(s % 8 for s in fixed_hu.shape):
        raise SystemExit(f"--fixed/--moving: expected preprocessed scans of one shape divisible by 8, got "
                         f"{fixed_hu.shape} and {moving_hu.shape}")
    moving_labels = (np.digitize(moving_hu, [0.0, 100.0, 400.0])).astype(np.uint8)  # 4 intensity classes
    model = _load_model(args.weights, channels_last=True)
    maps = args.maps or ("network" if args.weights else "synthetic")
    if maps == "synthetic":
        t = time.perf_counter()
        syn_fixed, syn_moving, v = _synthetic_maps(args.seed)
        print(f"  synthetic maps made in {time.perf_counter() - t:.1f} s", flush=True)
        if args.compare:
            raise SystemExit("--compare needs --maps network")
    _predict_stride2(model, fixed_hu)  # warm-up (first oneDNN calls)

    def current() -> Any:
        if maps == "network":  # as `slicreg register`: both network passes inside
            return register_preprocessed(model, fixed_hu, moving_hu, refine=args.refine, seed=args.seed)
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for side, hu in (("fixed", fixed_hu), ("moving", moving_hu)):
            _, wall[f"network {side}"], cpu[f"network {side}"] = _timed(partial(_predict_stride2, model, hu))
        result = register_preprocessed(None, fixed_hu, moving_hu, fixed_sv=syn_fixed, moving_sv=syn_moving,
                                       refine=args.refine, seed=args.seed)
        result.info["timings_s"] = {**wall, **result.info["timings_s"]}
        result.info["cpu_s"] = {**cpu, **result.info["cpu_s"]}
        return result

    variants = {"current": current}
    if args.compare:
        variants["previous"] = lambda: _register_previous(model, fixed_hu, moving_hu, args.seed)
    runs: dict[str, list] = {name: [] for name in variants}
    fields: dict[str, np.ndarray] = {}
    out_dir = Path(tempfile.mkdtemp(prefix="bench_register_"))
    for rep in range(args.repeats):
        for name, fn in variants.items():  # alternating: the same machine load for both
            result = fn()
            wall = dict(result.info["timings_s"])
            cpu = dict(result.info["cpu_s"])
            disp = result.disp_vox
            fields[name] = disp

            # as `slicreg register --out-warped`: the fast trilinear path for the image; the defaults bind this
            # iteration's field and backend (the timed call runs at once either way)
            def warp(disp: Any = disp, backend: str = "grid_sample" if name == "current" else "gather") -> None:
                warp_image(moving_hu, disp, backend=backend)
                warp_labels(moving_labels, disp)

            _, wall["warp (image + labels)"], cpu["warp (image + labels)"] = _timed(warp)
            if name == "current":
                _, wall["save field"], cpu["save field"] = _timed(partial(save_field, disp, affine,
                                                                                  out_dir / "u.nii.gz"))
            runs[name].append((wall, cpu, result.info))
            print(f"  run {rep + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in wall.items())
                  + f" | CPU total {sum(cpu.values()):.2f}", flush=True)

    def summary(name: str) -> dict[str, Any]:
        rs = runs[name]
        steps = list(rs[0][0])
        table = [{"step": step, "wall_s": round(float(np.median([r[0][step] for r in rs])), 3),
                  "cpu_s": round(float(np.median([r[1][step] for r in rs])), 3)} for step in steps]
        core = [k for k in steps if k != "save field"]
        totals = [sum(r[0][k] for k in core) for r in rs]
        cpu_totals = [sum(r[1][k] for k in core) for r in rs]
        return {"steps": table, "registration_wall_s_median": round(float(np.median(totals)), 3),
                "registration_wall_s_all": [round(t, 3) for t in totals],
                "registration_cpu_s_median": round(float(np.median(cpu_totals)), 3),
                "adam_iterations_run": rs[-1][2].get("adam_iterations_run"),
                "n_keypoints": rs[-1][2].get("n_keypoints")}

    out: dict[str, Any] = {"maps": maps, "refine": bool(args.refine), "threads": torch.get_num_threads(),
                           **summary("current"), "peak_rss_gb": round(_rss_gb(), 3)}
    if args.compare:
        out["previous"] = summary("previous")
        diff = np.abs(fields["current"] - fields["previous"])
        out["field_difference_vox"] = {"max": float(diff.max()), "mean": float(diff.mean())}
    if maps == "synthetic":
        from slicreg import flow

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_flow import true_disp

        disp_kp, info = flow.supervoxel_flow(syn_fixed, syn_moving, seed=args.seed, init="centres")
        pts = info["keypoints_sv_vox"].astype(float)
        err = np.linalg.norm(info["disp_sv_vox"] - true_disp(pts, v), axis=1)
        out["keypoint_error_sv_vox"] = {"mean": round(float(err.mean()), 4), "median": round(float(np.median(err)), 4),
                                        "p90": round(float(np.percentile(err, 90)), 4)}
    return out


def _run_part(name: str, args: argparse.Namespace, queue: Any) -> None:
    queue.put(PARTS[name](args))


PARTS = {"network": part_network, "pair": part_pair}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the pair (default 2)")
    parser.add_argument("--net-threads", type=int, nargs="+", default=[1, 2], help="thread counts for part 1")
    parser.add_argument("--weights", default=None, help="weights bundle (default: random weights)")
    parser.add_argument("--fixed", default=None, help="preprocessed fixed CT (default: synthetic)")
    parser.add_argument("--moving", default=None, help="preprocessed moving CT")
    parser.add_argument("--maps", choices=["synthetic", "network"], default=None)
    parser.add_argument("--refine", action="store_true", help="include the MIND-SSC refinement")
    parser.add_argument("--compare", action="store_true",
                        help="pair: also run the previous algorithms (keyword switches) alternately in the same "
                             "process, and print both and the difference of the fields")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=["command", "default"], default="command",
                        help="command: the parts run with the `slicreg` command's allocator setting "
                             "(pipelines.cli.ALLOCATOR_ENV, a high glibc mmap threshold); default: glibc's")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if bool(args.fixed) != bool(args.moving):
        parser.error("--fixed and --moving go together")
    import torch

    print(f"torch {torch.__version__}, {mp.cpu_count()} CPUs; shapes: scans {SHAPE}, network input {NET_SHAPE}",
          flush=True)
    import os

    if args.allocator == "command":  # read by glibc when each part's fresh process starts
        from pipelines.cli import ALLOCATOR_ENV

        os.environ.update(ALLOCATOR_ENV)
    else:
        from pipelines.cli import ALLOCATOR_ENV

        for key in ALLOCATOR_ENV:
            os.environ.pop(key, None)
    print(f"allocator: {args.allocator}", flush=True)
    results: dict[str, Any] = {"torch": torch.__version__, "cpus": mp.cpu_count(), "argv": sys.argv[1:],
                               "allocator": args.allocator}
    ctx = mp.get_context("spawn")
    for name in args.part:
        print(f"[{name}]", flush=True)
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_part, args=(name, args, queue))  # a fresh process: its own peak RSS
        proc.start()
        results[name] = queue.get()
        proc.join()
    if "network" in results:
        print("\n| labels by | precision | memory | threads | wall s | CPU s |\n|---|---|---|---|---|---|")
        for r in results["network"]["rows"]:
            print(f"| {r['path']} | {r['precision']} | {r['memory']} | {r['threads']} | {r['wall_s']:.2f} | "
                  f"{r['cpu_s']:.2f} |")
        print(f"peak RSS {results['network']['peak_rss_gb']:.2f} GB")
    if "pair" in results:
        pr = results["pair"]
        print(f"\npair ({pr['threads']} threads, maps: {pr['maps']}, refine: {pr['refine']}, {pr['n_keypoints']} "
              f"keypoints, {pr['adam_iterations_run']} Adam iterations), median of {args.repeats}:")
        prev = pr.get("previous")
        if prev:
            print("| step | wall s | CPU s | previous wall s | previous CPU s |\n|---|---|---|---|---|")
            before = {r["step"]: r for r in prev["steps"]}
            for r in pr["steps"]:
                b = before.get(r["step"])
                print(f"| {r['step']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                      + (f"{b['wall_s']:.2f} | {b['cpu_s']:.2f} |" if b else "- | - |"))
            print(f"| **registration incl. warping (all but saving)** | **{pr['registration_wall_s_median']:.2f}** | "
                  f"**{pr['registration_cpu_s_median']:.2f}** | **{prev['registration_wall_s_median']:.2f}** | "
                  f"**{prev['registration_cpu_s_median']:.2f}** |")
            d = pr["field_difference_vox"]
            print(f"fields, current vs previous: max |difference| {d['max']:.2e}, mean {d['mean']:.2e} voxels")
        else:
            print("| step | wall s | CPU s |\n|---|---|---|")
            for r in pr["steps"]:
                print(f"| {r['step']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |")
            print(f"| **registration incl. warping (all but saving)** | **{pr['registration_wall_s_median']:.2f}** | "
                  f"**{pr['registration_cpu_s_median']:.2f}** |")
        print(f"all runs, wall s: {pr['registration_wall_s_all']}")
        print(f"peak RSS {pr['peak_rss_gb']:.2f} GB")
        if "keypoint_error_sv_vox" in pr:
            e = pr["keypoint_error_sv_vox"]
            print(f"keypoint error (synthetic maps, known displacement): mean {e['mean']:.3f}, median "
                  f"{e['median']:.3f}, 90th pct {e['p90']:.3f} sv voxels (4 mm)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
