"""``slicreg cohort``: make the synthetic labelled cohort from one real CT (see :mod:`preprocessing.cohort`)."""

from __future__ import annotations

import argparse

NAME = "cohort"
HELP = ("make a synthetic labelled cohort (template + training + test subjects with known true fields) from one "
        "real CT and its BTCV labels")


def _knob(text: str) -> tuple[str, object]:
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. deform_mm=12), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _acquisition(text: str) -> object:
    """A preset name, true/false/on/off, or a JSON table of AcquisitionConfig fields (checked in run)."""
    import json

    lowered = text.strip().lower()
    if lowered in ("on", "true"):
        return True
    if lowered in ("off", "false", "none"):
        return False
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON table: {exc}") from None
    return text.strip()


ACQUISITION_HELP = ("a preset (varied, low-dose-sharp, standard-soft), on (the defaults), off, or a JSON table of "
                    "preprocessing.acquisition.AcquisitionConfig fields, e.g. "
                    "'{\"preset\": \"varied\", \"n_angles\": 180}'")


INPUTS = ("source_image", "source_labels", "source_tissue")
OUTPUTS = ()
OUTPUT_DIRS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-image", default=None, metavar="FILE",
                   help="the real CT in HU (NIfTI; default: the cached example CT of `slicreg fetch-example`)")
    p.add_argument("--source-labels", default=None, metavar="FILE",
                   help="its organ labels, BTCV ids 0..13, same grid (default: the cached example's)")
    p.add_argument("--source-tissue", default=None, metavar="FILE",
                   help="optional TotalSegmentator 'total' labels on the same grid (adds the iliac vessels to the "
                        "contrast enhancement; default: the cached example's when the example is used)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (must be empty or new)")
    p.add_argument("--n-train", type=int, default=20, metavar="N", help="training subjects (default 20)")
    p.add_argument("--n-test", type=int, default=10, metavar="N", help="test subjects (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same cohort")
    p.add_argument("--ground-truth-fields", action="store_true",
                   help="also write the true displacement field of every registration pair")
    p.add_argument("--set", dest="knobs", type=_knob, action="append", default=[], metavar="KEY=VALUE",
                   help="a realism knob of preprocessing.cohort.CohortConfig, e.g. --set deform_mm=12 "
                        "--set 'noise_hu=[5, 10]' (repeatable)")
    p.add_argument("--acquisition", type=_acquisition, default=None, metavar="SPEC",
                   help="simulated CT acquisition of every subject (default off; docs/ct.md): " + ACQUISITION_HELP)
    p.add_argument("--test-acquisition", type=_acquisition, default=None, metavar="SPEC",
                   help="the test subjects' acquisition instead (default: as --acquisition), e.g. low-dose-sharp "
                        "for scans unlike the training ones")
    p.add_argument("--template-acquisition", type=_acquisition, default=None, metavar="SPEC",
                   help="the template's acquisition instead (default: as --acquisition)")
    p.add_argument("--no-montage", action="store_true", help="do not draw cohort_montage.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the cohort files in a non-empty --out folder")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


COHORT_ENTRIES = ("dataset.json", "cohort_stats.json", "cohort_montage.png", "LICENSE", "imagesTr", "labelsTr",
                  "transforms", "ground_truth_fields")


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from pipelines.runner import StageContext
    from pipelines.stages.cohort import KNOBS, resolve_acquisitions, write_cohort
    from slicreg.errors import InputError

    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    licence = None
    image, labels, tissue = args.source_image, args.source_labels, args.source_tissue
    if image is None or labels is None:
        if image is not None or labels is not None:
            raise InputError("--source-image and --source-labels go together (or leave both out to use the cached "
                             "example CT)")
        from preprocessing.example import cached_example, default_example_dir

        files = cached_example()
        if files is None:
            raise InputError(f"no --source-image/--source-labels given and no example CT cached in "
                             f"{default_example_dir()}; run `slicreg fetch-example` first or pass both files")
        image, labels, licence = files.image, files.labels, files.licence
        tissue = tissue or files.labels_totalseg
    knobs = dict(args.knobs)
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise InputError(f"--set: unknown knob(s) {unknown}; known: {', '.join(KNOBS)}")
    acquisitions = {"acquisition": args.acquisition, "test_acquisition": args.test_acquisition,
                    "template_acquisition": args.template_acquisition}
    resolve_acquisitions(**acquisitions)  # bad values fail here, before anything is written

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise InputError(f"--out {out}: folder is not empty; choose a new folder or pass --overwrite")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in COHORT_ENTRIES)
        if foreign:
            raise InputError(f"--out {out}: holds files that are not a cohort's ({', '.join(foreign[:5])}); "
                             f"refusing to overwrite")
        for name in COHORT_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage_id="cohort", params={}, inputs={}, out_dir=out, work_dir=out, jobs=args.jobs,
                       quiet=args.quiet, seed=args.seed)
    summary = write_cohort(ctx, image=Path(image), labels=Path(labels), tissue=Path(tissue) if tissue else None,
                           n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                           ground_truth_fields=args.ground_truth_fields, montage=not args.no_montage, knobs=knobs,
                           licence=licence, **acquisitions)
    print(f"wrote {out}: dataset.json, {summary['subjects']} subjects, cohort_stats.json"
          f"{', ground_truth_fields/' if args.ground_truth_fields else ''}"
          f"{'' if args.no_montage else ', cohort_montage.png'} in {summary['seconds']['total']:.0f} s")
    return 0
