"""``slicreg evaluate``: score one registration the Learn2Reg way (Dice, HD95, Jacobian, field error).

The command parses the arguments, calls :func:`slicreg.api.evaluate` and prints the per-organ table."""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = ("score a registration: warp the moving labels with the field (nearest, as Learn2Reg), print Dice / HD95 "
        "per organ and Jacobian statistics; without --field score the unregistered pair")


def parse_labels(text: str) -> list[int]:
    """``"1..13"``, ``"1,2,3,6"`` or a mix such as ``"1..4,6"`` -> sorted unique label ids (> 0)."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if ".." in part:
                lo, hi = part.split("..", 1)
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected label ids like 1..13 or 1,2,3,6, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected label ids >= 1 (0 is background), got {text!r}")
    return sorted(out)


INPUTS = ("fixed_labels", "moving_labels", "field", "gt_field", "mask")
OUTPUTS = ("json", "csv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed-labels", required=True, metavar="F", help="fixed label map (NIfTI, integer ids)")
    p.add_argument("--moving-labels", required=True, metavar="M", help="moving label map (NIfTI, integer ids)")
    p.add_argument("--field", metavar="U", default=None,
                   help="displacement field (X, Y, Z, 3) in voxels, fixed -> moving, on the fixed grid; "
                        "omitted: score the unregistered pair (the 'initial' row)")
    p.add_argument("--labels", type=parse_labels, default=list(range(1, 14)), metavar="IDS",
                   help="label ids to score, e.g. 1..13 (default) or 1,2,3,6")
    p.add_argument("--gt-field", metavar="G", default=None,
                   help="ground-truth field (same layout as --field): report the field error in mm")
    p.add_argument("--mask", metavar="MASK", default=None,
                   help="mask on the fixed grid (NIfTI, non-zero = inside) for the field error (default: all voxels)")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (surface distances)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every score as JSON")
    p.add_argument("--csv", metavar="OUT", default=None, help="write the per-organ table as CSV")


def run(args: argparse.Namespace) -> int:
    from slicreg.api import evaluate
    from slicreg.io import atomic_outputs, atomic_write_json, atomic_write_text
    from slicreg.labels import BTCV_LABELS
    from slicreg.report import csv_text, fmt, json_ready, pair_csv_rows, pair_table

    evaluation = evaluate(args.fixed_labels, args.moving_labels, args.field, labels=args.labels,
                          gt_field=args.gt_field, mask=args.mask, hd95=not args.no_hd95,
                          names={"labels": "--labels", "mask": "--mask", "gt_field": "--gt-field"})
    result, notes, fixed = evaluation.scores, evaluation.notes, evaluation.fixed
    names = dict(BTCV_LABELS)
    print(f"fixed   {args.fixed_labels}\nmoving  {args.moving_labels}\n"
          f"field   {args.field or 'none (initial: the unregistered pair)'}\n"
          f"grid    {fixed.shape}, spacing {', '.join(f'{s:.3g}' for s in fixed.spacing_mm)} mm\n")
    for note in notes:
        print(note)
    print(pair_table(result, names))
    jac = result["jacobian"]
    if jac is not None:
        print(f"Jacobian (interior, {jac['n_voxels']} voxels): SDlogJ (Learn2Reg) "
              f"{fmt(jac['sdlogj_learn2reg'], digits=4)} | std log det J (det > 0) "
              f"{fmt(jac['std_log_det'], digits=4)} | det J <= 0: {fmt(jac['folding_percent'], digits=4)} % | "
              f"det min {fmt(jac['det_min'], digits=3)}, max {fmt(jac['det_max'], digits=3)}")
    err = result["field_error"]
    if err is not None:
        print(f"Field error vs ground truth ({err['n_voxels']} voxels): mean {fmt(err['mean_mm'], digits=2)} mm, "
              f"median {fmt(err['median_mm'], digits=2)} mm, 95th percentile {fmt(err['p95_mm'], digits=2)} mm, "
              f"max {fmt(err['max_mm'], digits=2)} mm")
    print("Dice L2R: Learn2Reg (labels absent from fixed or moving skipped); Dice ref: absent = 0, still averaged")
    with atomic_outputs() as out:  # both files or neither
        if args.json:
            doc = {"format": "slicreg-evaluate/1", "fixed_labels": args.fixed_labels,
                   "moving_labels": args.moving_labels, "field": args.field, "gt_field": args.gt_field,
                   "mask": args.mask, "names": {str(k): v for k, v in names.items()}, **result}
            atomic_write_json(out.path(args.json), json_ready(doc))
        if args.csv:
            atomic_write_text(out.path(args.csv), csv_text(pair_csv_rows(result, names)))
    for written in (args.json, args.csv):
        if written:
            print(f"wrote {written}")
    return 0
