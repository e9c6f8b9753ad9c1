"""``slicreg register`` as a user feels it: process start to both files on disk, before and after, in one run.

Two preprocessed cohort scans (``runs/demo/prep/current/imagesTr``, the first two; or ``--fixed``/``--moving``)
are registered by the real command with the shipped weights, writing the field and the warped moving image
(``--out-field u.nii.gz --out-warped w.nii.gz``). Each variant switches the levers of issue 20 on or off:

- allocator: ``reexec`` -- the former way, the command re-executes itself once with ``MALLOC_MMAP_THRESHOLD_``
  (``SLICREG_ALLOCATOR=reexec``); ``mallopt`` -- the same threshold set in-process by ``mallopt`` (the default
  now; children inherit the variable); ``glibc`` -- no setting at all (``SLICREG_ALLOCATOR=default``);
- gzip: ``zlib`` -- ``nibabel.save`` as before (zlib level 1; patched in by the wrapper below); ``isal`` -- the
  default now (:func:`slicreg.io._write_nifti`, ISA-L level 1); ``.nii`` -- uncompressed outputs, asked for by
  the file names.

Runs are interleaved (variant 1, 2, ..., then again) so that the load of a shared machine falls on all of them
alike; the table gives medians ("best": the fastest run, the nearest to an idle machine). "wall" is measured by
this script around the process (start to exit, after both files are written), "CPU" is the process's user +
system time (less sensitive to other load); "in-process" is the command's own total (``--out-info``), the rest
("outside") is interpreter start-up, imports and the re-execution.

    python benchmarks/bench_cli_register.py [--repeat 3] [--dataset runs/demo/prep/current] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the command as `slicreg register` runs it (main() with the process arguments); BENCH_GZIP=zlib: nibabel.save
WRAPPER = r"""
import os, sys
if os.environ.get("BENCH_GZIP") == "zlib":
    import nibabel
    import slicreg.io as io
    io._write_nifti = lambda img, path: nibabel.save(img, str(path))
from pipelines.cli import main
sys.exit(main())
"""

VARIANTS = {
    # name: (allocator mode, gzip, output suffix, extra arguments); all but the last on the fast path (--fast), whose
    # wall time issue 20 asks for; the last is the command's default (the supervoxel field + the refinement)
    "before (reexec + zlib)": ("reexec", "zlib", ".nii.gz", ("--fast",)),
    "mallopt + zlib": ("mallopt", "zlib", ".nii.gz", ("--fast",)),
    "reexec + isal": ("reexec", "isal", ".nii.gz", ("--fast",)),
    "after (mallopt + isal)": ("mallopt", "isal", ".nii.gz", ("--fast",)),
    "after + .nii outputs": ("mallopt", "isal", ".nii", ("--fast",)),
    "glibc allocator + isal": ("glibc", "isal", ".nii.gz", ("--fast",)),
    "after + refine (default)": ("mallopt", "isal", ".nii.gz", ()),
}
"""Variants of this tree; ``--rev REV`` adds the command of git revision REV as it was (its own defaults, run
from a temporary worktree), e.g. ``--rev be06285`` for the state before issue 20."""
# the network pass alone, as benchmarks/bench_allocator.py measures it: one warm-up and REPEAT timed bf16 passes of a
# random 96 x 80 x 128 input with the shipped weights; the allocator set by the variable at start-up ("env"), by
# mallopt at run time ("mallopt") or not at all ("glibc"); also whether a 200 MB block came from the heap
NETWORK = r"""
import ctypes, json, resource, sys, time
mode, repeat = sys.argv[1], int(sys.argv[2])
if mode == "mallopt":
    from pipelines.cli import set_mmap_threshold
    assert set_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(200 << 20)
heap = not ctypes.c_size_t.from_address(p - 8).value & 2
libc.free(p)
import numpy as np
from slicreg.bundle import default_bundle_path, load_bundle, predict
bundle = load_bundle(default_bundle_path())
x = np.random.default_rng(0).normal(0, 300, (96, 80, 128)).astype(np.float32)
predict(bundle, x, grid="output")
walls = []
for _ in range(repeat):
    t0 = time.perf_counter(); predict(bundle, x, grid="output"); walls.append(time.perf_counter() - t0)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"walls": walls, "heap": heap, "user_s": r.ru_utime, "sys_s": r.ru_stime}))
"""
STEPS = ("imports + read scans", "load weights", "load images", "network fixed", "network moving", "flow", "refine",
         "registration", "warp", "save")
FLOW_STEPS = ("keypoints", "features", "adam", "dense field")


def run_once(name: str, fixed: Path, moving: Path, out: Path, threads: int | None,
             trees: dict[str, Path] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "SLICREG_ALLOCATOR")}
    if name in VARIANTS:
        allocator, gzip, suffix, extra = VARIANTS[name]
        env["SLICREG_ALLOCATOR"] = {"reexec": "reexec", "mallopt": "", "glibc": "default"}[allocator]
        env["BENCH_GZIP"] = gzip
        tree = REPO
    else:  # a git revision's own command in its worktree, with its defaults
        suffix, extra, tree = ".nii.gz", (), (trees or {})[name]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for old in out.iterdir():
        old.unlink()
    field, warped, info = out / f"u{suffix}", out / f"w{suffix}", out / "info.json"
    cmd = [sys.executable, "-c", WRAPPER, "register", "--fixed", str(fixed), "--moving", str(moving),
           "--out-field", str(field), "--out-warped", str(warped), "--out-info", str(info), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0 or not (field.is_file() and warped.is_file()):
        raise SystemExit(f"{name}: the command failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    doc = json.loads(info.read_text())
    steps = dict(doc["timings_s"])
    steps["flow"] = sum(steps.get(k, 0.0) for k in FLOW_STEPS)
    steps["registration"] = sum(steps.get(k, 0.0) for k in ("network fixed", "network moving", "refine", *FLOW_STEPS))
    return {"wall": wall, "cpu": cpu, "inside": doc["total_s"], "steps": steps,
            "bytes": field.stat().st_size + warped.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(REPO / "runs" / "demo" / "prep" / "current"),
                    help="a preprocessed dataset folder (imagesTr/*.nii.gz); the first two scans are registered")
    ap.add_argument("--fixed", default=None, help="fixed scan (instead of --dataset)")
    ap.add_argument("--moving", default=None, help="moving scan (instead of --dataset)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every variant (interleaved; default 3)")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the command (default: torch's choice)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--rev", action="append", default=[], metavar="REV",
                    help="also run the command of this git revision as it was (repeatable), e.g. be06285")
    ap.add_argument("--network-repeat", type=int, default=3,
                    help="timed network passes per allocator mode in the second table (0: skip it; default 3)")
    args = ap.parse_args(argv)
    if args.fixed and args.moving:
        fixed, moving = Path(args.fixed), Path(args.moving)
    else:
        scans = sorted((Path(args.dataset) / "imagesTr").glob("*.nii.gz"))
        if len(scans) < 2:
            raise SystemExit(f"{args.dataset}/imagesTr: fewer than two scans; run the demo's prep stage first "
                             f"(python run_pipeline.py --until prep) or pass --fixed and --moving")
        fixed, moving = scans[0], scans[1]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    revs = {f"git {rev}": rev for rev in args.rev}
    names = [*revs, *names]
    results: dict[str, list[dict]] = {n: [] for n in names}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_cli_register_") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        trees = {}
        for name, rev in revs.items():
            trees[name] = Path(tmp) / rev
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[name]), rev],
                           check=True, capture_output=True)
        try:
            run_once(names[-1], fixed, moving, out, args.threads, trees)  # warm the page cache and the file system
            for _ in range(args.repeat):
                for name in names:
                    results[name].append(run_once(name, fixed, moving, out, args.threads, trees))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False,
                               capture_output=True)
    load_after = os.getloadavg()[0]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"slicreg register, process start to both files on disk: {fixed.name} <- {moving.name}")
    print(f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}, median of {args.repeat} "
          f"interleaved runs, seconds")
    width = max(len(n) for n in names)
    head = f"{'variant':<{width}}  {'wall':>6} {'best':>6} {'CPU':>6} {'in-proc':>7} {'outside':>7}  " + " ".join(
        f"{s[:9]:>9}" for s in STEPS) + f"  {'MB':>5}"
    print(head)
    print("-" * len(head))
    for name in names:
        rows = results[name]
        wall, inside = med([r["wall"] for r in rows]), med([r["inside"] for r in rows])
        best, cpu = min(r["wall"] for r in rows), med([r["cpu"] for r in rows])
        steps = " ".join(f"{med([r['steps'].get(s, 0.0) for r in rows]):9.2f}" for s in STEPS)
        print(f"{name:<{width}}  {wall:6.2f} {best:6.2f} {cpu:6.2f} {inside:7.2f} {wall - inside:7.2f}  {steps}  "
              f"{rows[0]['bytes'] / 1e6:5.0f}")
    runs = {n: ", ".join(f"{r['wall']:.2f}" for r in results[n]) for n in names}
    print("all runs (wall): " + "; ".join(f"{n}: {v}" for n, v in runs.items()))
    if args.network_repeat > 0:
        network_table(args.network_repeat, rounds=args.repeat)
    after = "after (mallopt + isal)"
    for before in [*revs, "before (reexec + zlib)"]:
        if before not in results or after not in results:
            continue
        for what, pick in (("median wall", lambda rows: med([r["wall"] for r in rows])),
                           ("best wall", lambda rows: min(r["wall"] for r in rows)),
                           ("median CPU", lambda rows: med([r["cpu"] for r in rows])),
                           ("median save step",
                            lambda rows: med([r["steps"].get("save", float("nan")) for r in rows]))):
            b, a = pick(results[before]), pick(results[after])
            print(f"ratio {before} / after, {what}: {b / a:.2f}x ({b:.2f} s -> {a:.2f} s)")
    return 0


def network_table(repeat: int, *, rounds: int) -> None:
    """The network pass under the three allocator settings, ``rounds`` interleaved processes each."""
    env0 = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "SLICREG_ALLOCATOR")}
    env0["PYTHONPATH"] = os.pathsep.join([str(REPO), env0.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    modes = {"env (variable at start-up)": ("env", {**env0, "MALLOC_MMAP_THRESHOLD_": str(4 << 30)}),
             "mallopt (at run time)": ("mallopt", env0), "glibc default": ("glibc", env0)}
    rows: dict[str, list[dict]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, (mode, env) in modes.items():
            out = subprocess.run([sys.executable, "-c", NETWORK, mode, str(repeat)], env=env, capture_output=True,
                                 text=True, check=True).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"\nbf16 network pass of a 96 x 80 x 128 input (shipped weights): best of {repeat} passes after a warm-up, "
          f"median over {rounds} processes; load average {os.getloadavg()[0]:.1f}")
    for name, rs in rows.items():
        best = statistics.median([min(r["walls"]) for r in rs])
        user, system = (statistics.median([r[k] for r in rs]) for k in ("user_s", "sys_s"))
        print(f"  {name:<28} {best:6.2f} s per pass; process user {user:5.1f} s, system {system:5.1f} s; "
              f"200 MB block from the "
              f"{'heap' if all(r['heap'] for r in rs) else 'kernel (mmap)'}")


if __name__ == "__main__":
    sys.exit(main())
