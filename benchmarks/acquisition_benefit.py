"""Does training on a cohort with simulated CT acquisitions help on scans from another scanner? (docs/ct.md)

Compares networks ("arms") trained on cohorts that differ only in the training subjects' simulated acquisition,
on the same test subjects (given another acquisition, e.g. ``test_acquisition = "low-dose-sharp"``; the test
subjects and the template are bit-identical in every arm, see docs/ct.md). For every arm it reports

- supervoxel prediction accuracy on the test subjects: each test subject's predicted supervoxels (the
  ``predict`` stage's ``predicted/<id>.nii.gz``) against its true supervoxels -- the template supervoxels carried
  onto the subject through the cohort's true field (fixed = test subject, moving = template) with
  :func:`slicreg.transfer.transfer_supervoxels`. ``accuracy`` counts every voxel of the 4 mm grid,
  ``foreground`` only the voxels whose true label is a supervoxel (not background); both are means over the
  16 layers and the subjects (as :func:`slicreg.train.supervoxel_accuracy` defines them for logits);
- registration Dice (Learn2Reg definition, mean over the 13 organs and the pairs) of each arm's ``register``
  output, read from an ``evaluate`` stage's ``report/metrics.json`` that scored them (``--metrics``).

Usage (the folders of the pipeline in docs/ct.md; ``current`` is each stage's latest output)::

    .venv/bin/python benchmarks/acquisition_benefit.py --dataset runs/acq/prep_off/current \\
        --supervoxels runs/acq/supervoxels/current/supervoxels.nii.gz \\
        --arm off=runs/acq/predict_off/current --arm on=runs/acq/predict_on/current \\
        --metrics runs/acq/evaluate/current/report/metrics.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def label_accuracy(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """``accuracy`` (all voxels) and ``foreground`` (voxels with ``true > 0``) of ``predicted == true``, each the
    mean over the layers of ``(L, X, Y, Z)`` label maps."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    if predicted.shape != true.shape or predicted.ndim != 4:
        raise ValueError(f"expected two (L, X, Y, Z) label maps of one shape, got {predicted.shape} and {true.shape}")
    correct = predicted == true
    fg = true > 0
    per_layer_fg = [float(c[f].mean()) for c, f in zip(correct, fg) if f.any()]
    return {"accuracy": float(correct.reshape(len(correct), -1).mean(axis=1).mean()),
            "foreground": float(np.mean(per_layer_fg)) if per_layer_fg else float("nan")}


def true_supervoxels(dataset: Any, subject: str, template_layers: np.ndarray) -> np.ndarray:
    """The template supervoxels on ``subject``'s 4 mm grid through the dataset's true field (subject <- template)."""
    from slicreg.io import load_field, load_image
    from slicreg.transfer import transfer_supervoxels

    fields = dataset.ground_truth_fields
    key = (subject, dataset.template)
    if key not in fields:
        raise SystemExit(f"{dataset.root}: no ground-truth field for {subject} <- {dataset.template}; make the cohort "
                         f"with ground_truth_fields = true")
    image = load_image(dataset.path(dataset.subjects[subject].image))
    disp = load_field(fields[key], fixed=image).array
    return transfer_supervoxels(template_layers, disp)


def score_arm(dataset: Any, predicted_dir: Path, template_layers: np.ndarray,
              truth: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy of one arm's predictions on the test subjects (``truth``: subject -> true supervoxels, filled in
    on first use and shared between arms)."""
    from slicreg.io import load_volume

    per_subject = {}
    for sid in dataset.test:
        candidates = [predicted_dir / sub / f"{sid}.nii.gz" for sub in ("predicted", "supervoxels")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise SystemExit(f"{candidates[0]}: missing (run the predict stage with subjects = \"test\" on this "
                             f"dataset, or give a register stage's folder with supervoxels/<id>.nii.gz)")
        if sid not in truth:
            truth[sid] = true_supervoxels(dataset, sid, template_layers)
        pred = np.asarray(load_volume(path, kind="labels", channels=True).array)
        per_subject[sid] = label_accuracy(pred, truth[sid])
    return {"per_subject": per_subject,
            **{k: float(np.nanmean([v[k] for v in per_subject.values()])) for k in ("accuracy", "foreground")}}


def registration_dice(metrics_path: Path) -> dict[str, dict[str, float]]:
    """Method -> mean and std over the pairs of the mean Dice over the 13 organs (Learn2Reg), from metrics.json."""
    doc = json.loads(metrics_path.read_text())
    out = {}
    for name in doc["methods"]:
        agg = doc["aggregates"].get(name, {})
        dice = (agg.get("summary", {}).get("dice_learn2reg", {}) or {})
        group = dice.get("all13") or next(iter(dice.values()), None)
        if agg.get("n_pairs") and group:
            out[name] = {"mean": group["mean"], "std": group.get("std"), "pairs": agg["n_pairs"]}
    return out


def pair_scores(metrics_path: Path) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
    """Method -> (fixed, moving) -> Dice 13 (Learn2Reg) and mean field error (mm, nan without a true field)."""
    doc = json.loads(metrics_path.read_text())
    out: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    for r in doc["results"]:
        dice = (r.get("summary") or {}).get("dice_learn2reg", {}).get("all13")
        err = (r.get("field_error") or {}).get("mean_mm")
        out.setdefault(r["method"], {})[(r["fixed"], r["moving"])] = {
            "dice13": float("nan") if dice is None else float(dice),
            "field_error_mm": float("nan") if err is None else float(err)}
    return out


def paired(base: dict[Any, Any], other: dict[Any, Any], key: str | None = None) -> dict[str, float]:
    """Paired difference ``other - base`` over the keys both have: mean, sample SD, standard error, n and the
    number of keys where ``other`` is higher / lower. With ``key`` the values are mappings and ``value[key]`` is
    compared."""
    if key is not None:
        base, other = {k: v[key] for k, v in base.items()}, {k: v[key] for k, v in other.items()}
    keys = sorted(k for k in base if k in other and np.isfinite(base[k]) and np.isfinite(other[k]))
    d = np.array([other[k] - base[k] for k in keys], dtype=float)
    if len(d) == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "se": float("nan"), "higher": 0, "lower": 0}
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {"n": int(len(d)), "mean": float(d.mean()), "sd": sd, "se": sd / np.sqrt(len(d)),
            "higher": int((d > 0).sum()), "lower": int((d < 0).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True,
                    help="the preprocessed dataset whose test subjects were predicted (a prep stage's output)")
    ap.add_argument("--supervoxels", type=Path, required=True, help="the template's supervoxels.nii.gz")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=FOLDER", required=True,
                    help="a predict stage's output folder (predicted/<id>.nii.gz) or a register stage's "
                    "(supervoxels/<id>.nii.gz); repeat per arm")
    ap.add_argument("--metrics", type=Path, help="an evaluate stage's report/metrics.json scoring the arms' "
                    "registrations")
    ap.add_argument("--baseline", help="arm (and registration method, --baseline-method) the others are compared "
                    "with pair by pair (default: the first --arm / the first registration method after initial)")
    ap.add_argument("--baseline-method", help="registration method name of the baseline in metrics.json")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    from preprocessing.datasets import load_dataset
    from slicreg.io import load_volume

    arms = {}
    for text in args.arm:
        name, sep, folder = text.partition("=")
        if not sep or not name:
            ap.error(f"--arm: expected NAME=FOLDER, got {text!r}")
        arms[name] = Path(folder)
    base = args.baseline or next(iter(arms))
    if base not in arms:
        ap.error(f"--baseline {base!r}: not one of the arms {list(arms)}")
    dataset = load_dataset(args.dataset)
    template_layers = np.asarray(load_volume(args.supervoxels, kind="labels", channels=True).array)
    truth: dict[str, np.ndarray] = {}
    results = {name: score_arm(dataset, folder, template_layers, truth) for name, folder in arms.items()}
    print(f"supervoxel prediction on the {len(dataset.test)} test subjects of {args.dataset} "
          f"(mean over 16 layers and the subjects):")
    print("| arm | accuracy % | foreground accuracy % |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['foreground']:.1f} |")
    doc: dict[str, Any] = {"dataset": str(args.dataset), "arms": {k: str(v) for k, v in arms.items()},
                           "supervoxel_prediction": results}
    doc["paired_prediction"] = {}
    print(f"\npaired by test subject, each arm minus {base!r} (points of foreground accuracy):")
    print("| arm | mean difference | SD | subjects higher / lower |")
    print("|---|---|---|---|")
    for name, r in results.items():
        if name == base:
            continue
        q = paired(results[base]["per_subject"], r["per_subject"], "foreground")
        doc["paired_prediction"][name] = q
        print(f"| {name} | {100 * q['mean']:+.1f} | {100 * q['sd']:.1f} | {q['higher']} / {q['lower']} of {q['n']} |")
    if args.metrics:
        dice = registration_dice(args.metrics)
        doc["registration_dice13"] = dice
        print(f"\nregistration Dice over 13 organs (Learn2Reg), from {args.metrics}:")
        print("| method | Dice % | pairs |")
        print("|---|---|---|")
        for name, d in dice.items():
            std = "" if d["std"] is None else f" ± {100 * d['std']:.1f}"
            print(f"| {name} | {100 * d['mean']:.1f}{std} | {d['pairs']} |")
        scores = pair_scores(args.metrics)
        methods = [m for m in scores if m != "initial"]
        base_method = args.baseline_method or (methods[0] if methods else None)
        if base_method is not None:
            if base_method not in scores:
                ap.error(f"--baseline-method {base_method!r}: not one of {list(scores)}")
            doc["paired_registration"] = {}
            print(f"\npaired by registration pair, each method minus {base_method!r}:")
            print("| method | Dice 13 difference (points) | SD | pairs higher / lower | field error difference mm |")
            print("|---|---|---|---|---|")
            for m in methods:
                if m == base_method:
                    continue
                q = paired(scores[base_method], scores[m], "dice13")
                e = paired(scores[base_method], scores[m], "field_error_mm")
                doc["paired_registration"][m] = {"dice13": q, "field_error_mm": e}
                print(f"| {m} | {100 * q['mean']:+.1f} | {100 * q['sd']:.1f} | {q['higher']} / {q['lower']} of "
                      f"{q['n']} | {e['mean']:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
