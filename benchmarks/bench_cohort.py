"""Benchmark of the cohort maker: the default cohort (template + 20 training + 10 test subjects, true fields for
the 55 listed pairs) from the real example CT, timed end to end.

Usage (from the repository root; needs the example CT: ``slicreg fetch-example``)::

    .venv/bin/python benchmarks/bench_cohort.py [--jobs 2] [--n-train 20] [--n-test 10] [--no-fields]
                                                [--out DIR] [--keep] [--threads N]
                                                [--acquisition SPEC] [--test-acquisition SPEC] [--compare]

Prints the time per subject and per pair, the total, the initial Dice between subjects, the check of the true
fields and the disk use. Machines are noisy (the machine load is printed); compare runs made back to back.

``--acquisition`` / ``--test-acquisition`` switch on the simulated CT acquisition (docs/ct.md); with
``--compare`` the same cohort is made twice, without and then with it, and the cost per subject of each role is
printed side by side with the ratio, e.g. (the figures in docs/ct.md)::

    nice -n 19 .venv/bin/python benchmarks/bench_cohort.py --n-train 2 --n-test 2 --no-fields --jobs 1 \
        --threads 1 --acquisition varied --test-acquisition low-dose-sharp --compare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2,
                    help="worker processes (default 2 = the cores of the target machine)")
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fields", action="store_true", help="skip the ground-truth fields")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (with --jobs 1; workers of --jobs N get cores / N)")
    ap.add_argument("--acquisition", default=None, metavar="SPEC", help="simulated acquisition (slicreg cohort)")
    ap.add_argument("--test-acquisition", default=None, metavar="SPEC", help="the test subjects' acquisition")
    ap.add_argument("--compare", action="store_true",
                    help="make the cohort without and then with the acquisition; print the cost ratio per subject")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.compare:
        if args.acquisition is None and args.test_acquisition is None:
            ap.error("--compare needs --acquisition and/or --test-acquisition")
        off = run_cohort(args, acquisition=False)
        if off is None:
            return 2
        on = run_cohort(args, acquisition=True)
        if on is None:
            return 2
        print_comparison(args, off, on)
        return 0
    return 0 if run_cohort(args, acquisition=True) is not None else 2


def _role_costs(stats: dict) -> dict[str, tuple[int, float, float, float]]:
    """role -> (subjects, mean wall s, mean CPU s, mean CPU s of the acquisition) per subject."""
    out = {}
    for role in ("template", "train", "test"):
        subj = [s for s in stats["subjects"] if s["role"] == role]
        if subj:
            n = len(subj)
            out[role] = (n, sum(s["seconds"] for s in subj) / n, sum(s["cpu_seconds"] for s in subj) / n,
                         sum(s.get("acquisition", {}).get("cpu_seconds", 0.0) for s in subj) / n)
    return out


def print_comparison(args: argparse.Namespace, off: dict, on: dict) -> None:
    a, b = _role_costs(off), _role_costs(on)
    print(f"\nsimulated acquisition {args.acquisition!r} (test subjects: "
          f"{args.test_acquisition or args.acquisition!r}); per subject, inside the cohort maker, "
          f"{args.threads or 'default'} torch thread(s):")
    print("  role      n | off: wall s  CPU s |  on: wall s  CPU s  (acquisition CPU s) | CPU ratio on/off")
    for role in b:
        n, w0, c0, _ = a[role]
        _, w1, c1, acq = b[role]
        print(f"  {role:8s} {n:2d} | {w0:11.2f} {c0:6.2f} | {w1:11.2f} {c1:6.2f}  ({acq:8.2f})           | "
              f"{c1 / max(c0, 1e-9):6.1f}x")
    shifts = {}
    centres = {s["id"]: s["info"].get("soft_tissue_centre_mm") for s in off["subjects"]}
    for s in on["subjects"]:
        a, b = centres.get(s["id"]), s["info"].get("soft_tissue_centre_mm")
        if a is not None and b is not None:
            shifts.setdefault(s["role"], []).append(sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5)
    print("  soft-tissue centre (what the preprocessing crops around) moved by, mm: " + "; ".join(
        f"{role} " + ", ".join(f"{v:.1f}" for v in vals) for role, vals in shifts.items()))
    c0 = off["summary"]["cpu_seconds_per_subject"]
    c1 = on["summary"]["cpu_seconds_per_subject"]
    print(f"  all subjects: {c0:.2f} -> {c1:.2f} CPU-s per subject ({c1 / max(c0, 1e-9):.1f}x); subject grids "
          f"{sorted({tuple(s['info']['shape']) for s in on['subjects']})[:3]} ...")


def run_cohort(args: argparse.Namespace, *, acquisition: bool) -> dict | None:
    """One cohort (with the acquisition options if ``acquisition``); prints its figures, returns its stats."""
    from pipelines.cli import main as slicreg

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_cohort_")) / "cohort"
    load_before = os.getloadavg()
    started = time.perf_counter()
    cmd = ["cohort", "--out", str(out), "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--seed",
           str(args.seed), "--jobs", str(args.jobs), "--quiet"] + ([] if args.no_fields else ["--ground-truth-fields"])
    if args.out and out.is_dir():
        cmd.append("--overwrite")
    for flag, value in (("--acquisition", args.acquisition), ("--test-acquisition", args.test_acquisition)):
        if acquisition and value is not None:
            cmd += [flag, value]
    status = slicreg(cmd)
    wall = time.perf_counter() - started
    if status != 0:
        return None
    stats = json.loads((out / "cohort_stats.json").read_text())
    s = stats["summary"]
    n_subjects = s["subjects"]
    n_pairs = len(stats["pairs"])
    print()
    print(f"cohort: {n_subjects} subjects, {n_pairs} listed pairs, seed {args.seed}, jobs {args.jobs}, "
          f"{os.cpu_count()} cores, load average before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"  total wall time             {wall:7.1f} s  ({wall / 60:.1f} min)")
    sub_wall = s["seconds"]["subjects"]
    print(f"  subjects (wall)             {sub_wall:7.1f} s  -> {sub_wall / n_subjects:.2f} s "
          f"per subject on {args.jobs} workers; inside a worker {s['seconds_per_subject']:.2f} s wall, "
          f"{s['cpu_seconds_per_subject']:.2f} s CPU per subject")
    print(f"  pairs (wall)                {s['seconds']['pairs']:7.1f} s  ({n_pairs} listed + "
          f"{len(stats['training_to_template'])} training->template initial-Dice pairs)")
    if "seconds_per_pair" in s:
        print(f"  one listed pair in a worker {s['seconds_per_pair']:7.2f} s wall, "
              f"{s['cpu_seconds_per_pair']:.2f} s CPU "
              f"(true field + file + checks)")
    print(f"  initial mean Dice, listed pairs: {s['initial_mean_dice_centre_aligned']} (soft-tissue centres aligned), "
          f"{s['initial_mean_dice_world']} (world); training->template {s['initial_mean_dice_training_to_template']}")
    per_organ = ", ".join(f"{k}:{v}" for k, v in s["initial_dice_centre_aligned_per_organ"].items() if v is not None)
    print(f"  per organ (centres aligned): {per_organ}")
    if "field_check_min_dice_large_organs" in s:
        print(f"  true fields: smallest Dice of an organ > 50 mL {s['field_check_min_dice_large_organs']}, "
              f"mean Dice {s['field_check_mean_dice']}")
    print(f"  deformations: smallest det J {s['min_jacobian_det']}, "
          f"largest inverse error {s['max_inverse_error_mm']} mm")
    if "acquisition_cpu_seconds_per_subject" in s:
        print(f"  simulated acquisition: {s['acquisition_cpu_seconds_per_subject']:.2f} CPU-s per subject on "
              f"{s['acquisition_subjects']} subjects (included in the subject figures above)")
    print(f"  disk: {_size_mb(out):.0f} MB total; " + ", ".join(
        f"{d} {_size_mb(out / d):.0f} MB" for d in ("imagesTr", "labelsTr", "transforms", "ground_truth_fields")
        if (out / d).is_dir()))
    if args.out is None and not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    else:
        print(f"  kept: {out}")
    return stats


if __name__ == "__main__":
    sys.exit(main())
