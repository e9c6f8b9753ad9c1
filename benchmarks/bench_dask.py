"""Benchmark of the Dask executor: per-case stages on --jobs 1, --jobs 2, 1 and 2 Dask workers, in one run.

Usage (from the repository root; needs the example CT, ``slicreg fetch-example``, and the extra ``.[dask]``)::

    nice -n 10 .venv/bin/python benchmarks/bench_dask.py [--n-train 8] [--stages cohort,prep] [--repeats 1]
        [--noop-items 200] [--work-dir runs/bench-dask] [--out benchmarks/results/dask.json]

What it does:

1. makes (once; cached in ``--work-dir``) a small cohort from the example CT (template, ``--n-train`` training
   subjects and 1 test subject, no true fields) and its preprocessing, with the pipeline runner;
2. runs each stage of ``--stages`` -- real per-case stages, one ``ctx.map`` item per subject: ``cohort`` (making a
   subject, ~2.7 CPU-s) and ``prep`` (preprocessing one, ~0.6 CPU-s) -- four times, forced: ``--jobs 1``,
   ``--jobs 2``, ``--scheduler local:1``, ``--scheduler local:2``. The Dask cluster is started before the stage and
   its start-up is timed apart, so the stage's wall time (from its ``_stage.json``) is the per-case work plus the
   executor's cost. The four runs must give the same output hashes (checked, except a file that records the stage's
   own timings: the cohort's ``cohort_stats.json`` and ``transforms/*.npz``; exit status 1 if not). ``--repeats R``
   interleaves R rounds of the four and keeps the least wall time of each, to damp a shared machine's noise;
3. maps a no-op (``abs``) over ``--noop-items`` integers on a ``--jobs 2`` pool and on a started 2-worker cluster:
   the pure cost of handing an item out and its result back.

Printed: wall time per configuration, the ratios to ``--jobs 1`` and of ``--jobs 2`` to ``local:2``, the overhead
per item (``(wall[local:1] - wall[--jobs 1]) / items`` on each stage: shipping, scheduling and a fresh worker's
imports; and the no-op wall time per item), the cluster start-up. The same go to ``--out`` (JSON) with the machine
facts and the load average; ``benchmarks/cost_model.py`` reads them. The machine may be shared: compare the
figures of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = [("--jobs 1", 1, None), ("--jobs 2", 2, None), ("local:1", 1, "local:1"), ("local:2", 1, "local:2")]


def _pipeline(work: Path, n_train: int) -> Path:
    text = textwrap.dedent(f"""
        [pipeline]
        name = "bench-dask"
        work_dir = "{work}"
        seed = 0

        [stages.example]
        type = "fetch-example"

        [stages.cohort]
        inputs = {{ source = "example" }}
        n_train = {n_train}
        n_test = 1
        ground_truth_fields = false
        montage = false

        [stages.prep]
        type = "preprocess"
        inputs = {{ dataset = "cohort" }}
        """)
    path = work / "bench-dask.toml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _noop_wall(executor, n: int) -> float:
    started = time.perf_counter()
    out = executor.map(abs, list(range(-n, 0)), desc="no-op", progress=lambda it, desc, total: it)
    wall = time.perf_counter() - started
    if out != list(range(n, 0, -1)):
        raise RuntimeError("no-op map returned wrong results")
    return wall


# how many ctx.map items a stage had, from its output list
ITEMS = {
    "cohort": lambda outputs: sum(1 for k in outputs if k.startswith("imagesTr/")),
    "prep": lambda outputs: sum(1 for k in outputs if k.startswith("crops/")),
}


# outputs that record the stage's own timings (and so differ between any two runs, on any executor), left out of
# the comparison: the cohort's statistics and each subject's transform file, whose summary holds its seconds
TIMING_OUTPUTS = {"cohort": ("cohort_stats.json", "transforms/*.npz"), "prep": ()}


def _timing_output(stage_id: str, name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in TIMING_OUTPUTS[stage_id])


def _measure_stage(pipeline, work: Path, stage_id: str, repeats: int) -> dict:
    """The stage forced on each configuration, ``repeats`` rounds interleaved: wall times (the least of the rounds
    is used), ratios, overhead per item, and whether the outputs are identical."""
    import resource

    from pipelines.runner import MANIFEST, Runner

    walls: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    cpus: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in CONFIGS}
    starts: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    hashes: dict[str, dict] = {}
    executors: dict[str, dict] = {}
    for _ in range(repeats):
        for name, jobs, scheduler in CONFIGS:
            usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            runner = Runner(pipeline, jobs=jobs, quiet=True, scheduler=scheduler)
            if scheduler is not None:
                t0 = time.perf_counter()
                _ = runner.executor.client  # start the cluster now, so that the stage's time is the work alone
                starts[name].append(round(time.perf_counter() - t0, 3))
            runner.run(only=[stage_id], force=[stage_id])
            manifest = json.loads((work / stage_id / "current" / MANIFEST).read_text())
            walls[name].append(manifest["wall_s"])
            # CPU of this process and of its reaped children (pool or cluster workers, closed at the end of the run):
            # the work done, including each worker's start, and much less sensitive to other jobs than wall time
            after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            cpus[name].append({
                "user_s": round(sum(a.ru_utime - b.ru_utime for a, b in zip(after, usage)), 2),
                "sys_s": round(sum(a.ru_stime - b.ru_stime for a, b in zip(after, usage)), 2)})
            executors[name] = manifest["executor"]
            reference = hashes.setdefault("--jobs 1", manifest["outputs"])
            hashes[name] = manifest["outputs"]
            print(f"  {stage_id}: {name:<9} {manifest['wall_s']:.2f} s wall, {cpus[name][-1]['user_s']:.1f} + "
                  f"{cpus[name][-1]['sys_s']:.1f} s CPU (user + system)"
                  + (f" (cluster start {starts[name][-1]:.2f} s, not included)" if scheduler else ""), flush=True)
            differ = sorted(k for k in set(reference) | set(manifest["outputs"])
                            if reference.get(k) != manifest["outputs"].get(k) and not _timing_output(stage_id, k))
            if differ:
                print(f"ERROR: {stage_id} on {name}: outputs differ from --jobs 1: {differ[:5]}", file=sys.stderr)
                hashes["differ"] = differ
    items = ITEMS[stage_id](hashes["--jobs 1"])
    wall = {name: min(v) for name, v in walls.items()}
    ratios = {f"--jobs 1 / {k}": round(wall["--jobs 1"] / wall[k], 3) for k in wall if k != "--jobs 1"}
    ratios["--jobs 2 / local:2"] = round(wall["--jobs 2"] / wall["local:2"], 3)
    cpu = {name: min(c["user_s"] + c["sys_s"] for c in v) for name, v in cpus.items()}
    rows = [{"config": name, "wall_s": wall[name], "wall_s_rounds": walls[name], "cpu_s": round(cpu[name], 2),
             "cpu_rounds": cpus[name],
             "cluster_start_s": starts[name] or None, "executor": executors[name]} for name, _, _ in CONFIGS]
    return {"items": items, "rows": rows, "ratios": ratios, "identical_outputs": "differ" not in hashes,
            "compared_without": list(TIMING_OUTPUTS[stage_id]),
            "overhead_per_item_s": round((wall["local:1"] - wall["--jobs 1"]) / items, 4),
            "cpu_overhead_per_item_s": round((cpu["local:1"] - cpu["--jobs 1"]) / items, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=8, help="training subjects of the cohort (items = n_train + 2)")
    ap.add_argument("--stages", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                    default=["cohort", "prep"], help="per-case stages to measure, of: cohort, prep (default both)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the four configurations (interleaved; the "
                                                           "least wall time of each is used)")
    ap.add_argument("--noop-items", type=int, default=200, help="items of the no-op map")
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "bench-dask"), help="cohort and stage outputs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dask.json"), help="JSON results")
    args = ap.parse_args(argv)
    if min(args.n_train, args.noop_items, args.repeats) < 1:
        ap.error(f"--n-train, --repeats and --noop-items must be >= 1, got {args.n_train}, {args.repeats}, "
                 f"{args.noop_items}")
    unknown = [s for s in args.stages if s not in ITEMS]
    if unknown or not args.stages:
        ap.error(f"--stages: expected some of {sorted(ITEMS)}, got {args.stages}")

    from run_all import machine_info

    from pipelines.executors import DaskExecutor, ProcessExecutor, parse_scheduler
    from pipelines.runner import Runner, load_pipeline

    machine = machine_info(threads=os.cpu_count() or 1)
    work = Path(args.work_dir).resolve()
    pipeline = load_pipeline(_pipeline(work, args.n_train))
    print(f"cohort (template, {args.n_train} training + 1 test subject) and its preprocessing in {work} (made once, "
          f"then cached) ...", flush=True)
    Runner(pipeline, jobs=2, quiet=True).run()
    stages = {stage_id: _measure_stage(pipeline, work, stage_id, args.repeats) for stage_id in args.stages}

    print(f"no-op map of {args.noop_items} items ...", flush=True)
    noop_pool = _noop_wall(ProcessExecutor(2), args.noop_items)
    dask2 = DaskExecutor(parse_scheduler("local:2"))
    t0 = time.perf_counter()
    _ = dask2.client  # start the cluster (the property connects)
    dask_start = time.perf_counter() - t0
    try:
        _noop_wall(dask2, 4)  # the first contact of each worker is not the per-item cost
        noop_dask = _noop_wall(dask2, args.noop_items)
    finally:
        dask2.close()

    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_dask.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "stages": stages,
        "noop_items": args.noop_items,
        "noop_overhead_per_item_s": {"--jobs 2": round(noop_pool / args.noop_items, 5),
                                     "local:2": round(noop_dask / args.noop_items, 5)},
        "dask_local2_start_s": round(dask_start, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nload average {machine['loadavg_start']} -> {machine['loadavg_end']}")
    for stage_id, st in stages.items():
        wall = {r["config"]: r["wall_s"] for r in st["rows"]}
        print(f"\n{stage_id} stage, {st['items']} items; outputs identical across the four: {st['identical_outputs']}"
              + (f" (without {', '.join(st['compared_without'])}: they record timings)"
                 if st["compared_without"] else ""))
        print(f"| configuration | wall s (least of {args.repeats}) | speed-up vs --jobs 1 | CPU s (all processes) |")
        print("|---|---|---|---|")
        for r in st["rows"]:
            print(f"| {r['config']} | {r['wall_s']:.2f} | {wall['--jobs 1'] / r['wall_s']:.2f}x | {r['cpu_s']:.1f} |")
        print(f"local:2 against --jobs 2: {st['ratios']['--jobs 2 / local:2']:.2f}x (> 1: Dask faster); overhead per "
              f"item ((local:1 - --jobs 1) / items): {st['overhead_per_item_s'] * 1000:.0f} ms wall, "
              f"{st['cpu_overhead_per_item_s'] * 1000:.0f} ms CPU")
    print(f"\nno-op map: {noop_dask / args.noop_items * 1000:.1f} ms per item on local:2 (started workers), "
          f"{noop_pool / args.noop_items * 1000:.1f} ms on a --jobs 2 pool (including its start); local:2 cluster "
          f"start {dask_start:.2f} s")
    print(f"written: {out}")
    return 0 if all(st["identical_outputs"] for st in stages.values()) else 1


if __name__ == "__main__":
    from pipelines.cli import ensure_fast_allocator

    ensure_fast_allocator()  # as run_pipeline.py does, so the stages run as they would in a pipeline
    sys.exit(main())
