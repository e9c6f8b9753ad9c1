"""The refinement of ``slicreg register --refine``: the previous ``refine_field`` against the align engine's
presets, on the cohort's TRAINING pairs only, in one run.

Pairs are those of ``benchmarks/tune_flow.py`` (its pair selection, caches and scoring are reused): each
training subject (fixed) <- the template (moving), atlas mode as the demo registers its test pairs -- the fixed
maps predicted by the bundle (cached), the moving side the bundle's own template supervoxels -- plus optional
slabs simulated from training subjects (``--slabs``; the cohort's real slabs are test subjects). Test subjects
are refused.

Per pair: the supervoxel field (``slicreg.registration.register_supervoxel_maps`` with the registration defaults,
what the ``register`` stage runs), then every method refines that same field with the fields of view as the
stage passes them (the crop records: ``fixed_mask`` / ``moving_mask``):

- ``old``: ``refine_field`` of the git revision ``--old`` (default ``HEAD``), loaded from ``git show`` into a
  private module -- the previous implementation with its own optimisation loop, not kept in the tree;
- each ``--variant NAME=PRESET[:key=value;...]``: today's ``slicreg.registration.refine_field`` (the align engine),
  e.g. ``new=refine``, ``4-2=refine:levels=(4,2);iterations=(80,40)``, ``budget2=refine:budget_s=2.0``;
  ``iterations``, ``budget_s`` and ``clip_hu`` are ``refine_field`` arguments, every other key a field of the
  deformable stage (``slicreg.alignment.StageConfig``).

The methods run alternately in the same process (their order rotates from pair to pair) after one warm-up
call each on a small volume; seconds are wall and process CPU of the refinement call alone. Scores (every
voxel, ``tune_flow.Tuner._score_fields(full=True)``): Dice over the 13 organs (Learn2Reg definition; in brackets
inside the fixed scan's field of view), % of voxels with det J <= 0 and SDlogJ (Learn2Reg: 2-voxel border crop,
log(J + 3)), field error in mm against the cohort's true field inside the body (every ``--eval-stride``-th
voxel). Writes ``<out>.json`` and ``<out>.md`` and prints the table.

Usage (the machine is shared: nice it, one thread)::

    nice -n 10 env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_refine.py \\
        --dataset runs/demo/prep/current --weights weights/slicreg-cohort-v3 --cache runs/helper-refine/cache \\
        --slabs 4 --threads 1 --variant new=refine --out runs/helper-refine/bench_refine
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

REFINE_ARGS = ("iterations", "budget_s", "clip_hu", "slab_preset")


def load_old_refine(rev: str) -> Any:
    """``refine_field`` of ``slicreg/registration.py`` at git revision ``rev``, as a private module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:slicreg/registration.py"], check=True,
                            capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="bench_refine_")) / "register_old.py"
    tmp.write_text(source)
    spec = importlib.util.spec_from_file_location("register_old", tmp)
    module = importlib.util.module_from_spec(spec)
    sys.modules["register_old"] = module
    spec.loader.exec_module(module)
    return module.refine_field


def parse_variant(text: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """``NAME=PRESET[:k=v;...]`` -> (name, preset, refine_field arguments, deformable stage fields); ``slab.k=v``
    sets a field of the slab preset's deformable stage (``refine_field(slab_deformable=)``)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--variant {text!r}: expected NAME=PRESET[:key=value;...]")
    preset, _, knobs = rest.partition(":")
    args: dict[str, Any] = {}
    stage: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in knobs.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if key.startswith("slab."):  # a field of the slab preset's deformable stage
            args.setdefault("slab_deformable", {})[key[len("slab."):]] = parsed
        else:
            (args if key in REFINE_ARGS else stage)[key] = parsed
    return name, preset, args, stage


def _f(v: Any, nd: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def summarise(rows: list[dict[str, Any]], kind: str) -> dict[str, float | None]:
    sel = [r for r in rows if r["kind"] == kind]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in sel
                if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(np.mean(vals)) if vals else None

    its = [r["iterations"] for r in sel if r.get("iterations")]
    width = max((len(i) for i in its), default=0)
    per_level = [float(np.mean([i[k] if k < len(i) else 0 for i in its])) for k in range(width)]
    return {"n": len(sel), "dice": mean("dice"), "dice_fov": mean("dice_fov"), "iterations": per_level,
            "field_error_mm": mean("field_error_mm"), "folding_percent": mean("folding_percent"),
            "folding_max": max((r["folding_percent"] for r in sel if r.get("folding_percent") is not None),
                               default=None),
            "sdlogj": mean("sdlogj"), "wall_s": mean("wall_s"), "cpu_s": mean("cpu_s")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from tune_flow import add_pair_arguments, add_run_arguments, prepared_tuner, score_columns, write_outputs

    add_pair_arguments(ap, dataset=str(ROOT / "runs/demo/prep/current"),
                       weights=str(ROOT / "weights/slicreg-cohort-v3"), cache=str(ROOT / "runs/flow_tuning_cache"))
    ap.add_argument("--old", default="HEAD", help="git revision of the previous refine_field ('none': skip it)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=PRESET[:key=value;...] (repeatable; default new=refine)")
    ap.add_argument("--no-masks", action="store_true", help="refine without the crop records' fields of view")
    ap.add_argument("--align", action="store_true",
                    help="also the built-in align (preset abdomen-ct from the identity, no supervoxel field) as a "
                         "reference row")
    add_run_arguments(ap, threads=0, out=str(ROOT / "runs/helper-refine/bench_refine"))
    args = ap.parse_args(argv)

    import torch

    from slicreg.alignment import PRESETS
    from slicreg.registration import FLOW_DEFAULTS, refine_field, register_supervoxel_maps

    variants = [parse_variant(v) for v in (args.variant or ["new=refine"])]
    for name, preset, _, _ in variants:
        if preset not in PRESETS:
            raise SystemExit(f"--variant {name}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    methods: list[tuple[str, Any]] = []
    if args.old.lower() != "none":
        old_refine = load_old_refine(args.old)
        methods.append(("old", lambda f, m, u, fm, mm: old_refine(f, m, u, fixed_mask=fm, moving_mask=mm,
                                                                   seed=args.seed, device=args.device)))
    for name, preset, kw, stage in variants:
        def run(f, m, u, fm, mm, preset=preset, kw=kw, stage=stage):
            return refine_field(f, m, u, preset=preset, deformable=stage or None, fixed_mask=fm, moving_mask=mm,
                                seed=args.seed, device=args.device, **kw)
        methods.append((name, run))

    if args.align:
        from slicreg.alignment import register_pair

        def align(f, m, u, fm, mm):
            res = register_pair(f, m, fixed_mask=fm, moving_mask=mm, preset="abdomen-ct", seed=args.seed,
                                device=args.device)
            return res.disp_vox, res.info
        methods.append(("align", align))

    tuner = prepared_tuner(args)
    ds = tuner.dataset
    from slicreg.io import load_image

    template_hu = np.asarray(load_image(ds.path(ds.subject(ds.template).image)).array, dtype=np.float32)
    template_fov = None if args.no_masks else tuner.crop_fov(ds.template)

    # warm-up: every method once on a small volume (lazy imports, first-call kernels)
    rng = np.random.default_rng(0)
    small = rng.normal(0, 200, (32, 32, 32)).astype(np.float32)
    for _, run in methods:
        run(small, small, np.zeros((3, 32, 32, 32), np.float32), None, None)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, pair in enumerate(tuner.pairs):
        flow = register_supervoxel_maps(pair.fixed_sv, tuner.template_sv, device=args.device, seed=args.seed)
        hu = tuner.fixed_image(pair)
        fixed_fov = None if args.no_masks else pair.fov
        base = {"pair": pair.pid, "kind": pair.kind}
        sc = tuner._score_fields(pair, flow.disp_vox, full=True)
        rows.append({**base, "method": "slicreg (flow)", **score_columns(sc), "wall_s": None, "cpu_s": None})
        order = methods[n % len(methods):] + methods[: n % len(methods)]
        line = []
        for name, run in order:
            w, c = time.perf_counter(), time.process_time()
            disp, info = run(hu, template_hu, flow.disp_vox, fixed_fov, template_fov)
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            sc = tuner._score_fields(pair, np.asarray(disp, dtype=np.float32), full=True)
            its = [lv["iterations"] for lv in info.get("levels", [])] if name != "old" else \
                [info["params"]["iterations"]]
            rows.append({**base, "method": name, **score_columns(sc), "wall_s": wall, "cpu_s": cpu, "iterations": its})
            line.append(f"{name} {sc['dice']:.3f} ({wall:.1f} s)")
        print(f"[{n + 1}/{len(tuner.pairs)}] {pair.pid}: flow {rows[-len(order) - 1]['dice']:.3f}; "
              + "; ".join(line) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)

    names = ["slicreg (flow)"] + [name for name, _ in methods]
    kinds = [k for k in ("full", "slab") if any(p.kind == k for p in tuner.pairs)]
    summary = {k: {name: summarise([r for r in rows if r["method"] == name], k) for name in names} for k in kinds}
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    lines = [f"# Refinement: previous refine_field vs the align engine ({stamp})",
             "", "Command: `" + " ".join(["python", "benchmarks/bench_refine.py", *argv]) + "`", "",
             f"Bundle {tuner.bundle.path} (model sha256 {tuner.bundle_sha[:16]}), torch threads "
             f"{torch.get_num_threads()}, masks {'off' if args.no_masks else 'on (crop records)'}; variants: "
             + "; ".join(f"{n}={p}{' ' + str(kw) if kw else ''}{' ' + str(st) if st else ''}"
                         for n, p, kw, st in variants), ""]
    for kind in kinds:
        lines += [f"## {kind} pairs (n = {summary[kind][names[0]]['n']})", "",
                  "| method | Dice 13 (in FOV) | field error mm | det J <= 0 % mean / max | SDlogJ | wall s | CPU s | "
                  "iterations per level (mean) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in names:
            s = summary[kind][name]
            lines.append(f"| {name} | {_f(s['dice'], 4)} ({_f(s['dice_fov'], 4)}) | {_f(s['field_error_mm'], 2)} | "
                         f"{_f(s['folding_percent'], 4)} / {_f(s['folding_max'], 4)} | {_f(s['sdlogj'], 4)} | "
                         f"{_f(s['wall_s'], 2)} | {_f(s['cpu_s'], 2)} | "
                         f"{' / '.join(f'{v:.1f}' for v in s['iterations']) or '-'} |")
        lines.append("")
    lines += ["## Per pair: Dice 13", "", "| pair | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for pair in tuner.pairs:
        vals = {r["method"]: r["dice"] for r in rows if r["pair"] == pair.pid}
        lines.append(f"| {pair.pid} | " + " | ".join(_f(vals.get(nm), 3) for nm in names) + " |")
    text = "\n".join(lines) + "\n"
    write_outputs(args.out, {"argv": argv, "rows": rows, "summary": summary, "flow_defaults": FLOW_DEFAULTS}, text,
                  (time.perf_counter() - t0) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
