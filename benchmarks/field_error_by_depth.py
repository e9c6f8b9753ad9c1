"""Where a method's field error lies: the demo's fields against the true ones, by depth below the body surface.

For each test pair of a finished demo run (``runs/demo``: the preprocessed cohort with its true fields, and the
``register``-type stages' fields) the error ``|A (u - u_true)|`` in mm (:func:`slicreg.metrics.field_error_mm`) inside
the fixed scan's body (:func:`slicreg.supervoxels.body_mask` at -400 HU, the evaluate stage's field-error region),
split by the distance to the body's surface, and inside the organs. Prints one table (means over the pairs) per
run; no file is written. Usage::

    python benchmarks/field_error_by_depth.py [--run runs/demo] [--stages register register-refine align]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BANDS_MM = (0, 6, 16, 30, 60, np.inf)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs/demo"), help="a finished demo run")
    ap.add_argument("--stages", nargs="+", default=["register", "register-refine", "align"],
                    help="register-type stages whose fields/ to score")
    ap.add_argument("--moving", default="cohort_0000", help="the moving subject of the pairs (the template)")
    args = ap.parse_args(argv)

    from scipy import ndimage as ndi

    from slicreg.io import load_field, load_image, load_labels
    from slicreg.metrics import field_error_mm
    from slicreg.supervoxels import body_mask

    run = Path(args.run)
    prep = run / "prep" / "current"
    truths = sorted((prep / "ground_truth_fields").glob(f"disp_*_{args.moving}.nii.gz"))
    pairs = [p.name[len("disp_"): -len(f"_{args.moving}.nii.gz")] for p in truths]
    pairs = [p for p in pairs if all((run / s / "current" / "fields" / f"disp_{p}_{args.moving}.nii.gz").is_file()
                                     for s in args.stages)]
    if not pairs:
        raise SystemExit(f"--run {run}: no pair has a true field and a field of every stage in {args.stages}")
    regions = [f"{lo:g}-{hi:g} mm" for lo, hi in zip(BANDS_MM[:-1], BANDS_MM[1:])] + ["organs", "body"]
    errors: dict[str, list[list[float]]] = {s: [] for s in args.stages}  # per pair, per region (NaN: empty)
    shares = []
    for pair in pairs:
        fixed = load_image(prep / "imagesTr" / f"{pair}_0000.nii.gz")
        labels = load_labels(prep / "labelsTr" / f"{pair}.nii.gz").array
        truth = load_field(prep / "ground_truth_fields" / f"disp_{pair}_{args.moving}.nii.gz", fixed=fixed).array
        body = body_mask(fixed.array, threshold=-400.0)
        depth = ndi.distance_transform_edt(body, sampling=fixed.spacing_mm)  # mm, per-axis voxel sizes
        masks = [body & (depth > lo) & (depth <= hi) for lo, hi in zip(BANDS_MM[:-1], BANDS_MM[1:])]
        masks += [body & (labels > 0), body]
        shares.append([m.sum() / body.sum() for m in masks])
        for stage in args.stages:
            u = load_field(run / stage / "current" / "fields" / f"disp_{pair}_{args.moving}.nii.gz", fixed=fixed).array
            errors[stage].append([field_error_mm(u, truth, affine=fixed.affine, mask=m)["mean_mm"] for m in masks])
    share = np.mean(shares, axis=0)
    means = {s: np.nanmean(np.asarray(e, dtype=float), axis=0) for s, e in errors.items()}  # a slab lacks deep bands
    print(f"{run}: field error (mm), mean over {len(pairs)} pairs <- {args.moving} (over the pairs that have the "
          "region), by depth below the body surface")
    print(f"{'region':>12} {'share':>6} " + " ".join(f"{s:>16}" for s in args.stages))
    for i, name in enumerate(regions):
        print(f"{name:>12} {share[i]:6.0%} " + " ".join(f"{means[s][i]:16.2f}" for s in args.stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
