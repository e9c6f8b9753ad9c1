"""Benchmark of the cohort maker: the default cohort (template + 20 training + 10 test subjects, true fields for
the 55 listed pairs) from the real example CT, timed end to end.

Usage (from the repository root; needs the example CT: ``slicreg fetch-example``)::

    .venv/bin/python benchmarks/bench_cohort.py [--jobs 2] [--n-train 20] [--n-test 10] [--no-fields]
                                                [--out DIR] [--keep]

Prints the time per subject and per pair, the total, the initial Dice between subjects, the check of the true
fields and the disk use. Machines are noisy (the machine load is printed); compare runs made back to back.
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
    args = ap.parse_args(argv)

    from pipelines.cli import main as slicreg

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_cohort_")) / "cohort"
    load_before = os.getloadavg()
    started = time.perf_counter()
    cmd = ["cohort", "--out", str(out), "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--seed",
           str(args.seed), "--jobs", str(args.jobs), "--quiet"] + ([] if args.no_fields else ["--ground-truth-fields"])
    status = slicreg(cmd)
    wall = time.perf_counter() - started
    if status != 0:
        return status
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
    print(f"  disk: {_size_mb(out):.0f} MB total; " + ", ".join(
        f"{d} {_size_mb(out / d):.0f} MB" for d in ("imagesTr", "labelsTr", "transforms", "ground_truth_fields")
        if (out / d).is_dir()))
    if args.out is None and not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    else:
        print(f"  kept: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
