"""``slicreg preprocess``: the SLIC-Reg preprocessing of one scan, or of a whole dataset folder."""

from __future__ import annotations

import argparse
import re

NAME = "preprocess"
HELP = ("reorient to RAS, resample to 2 mm and crop/pad to 192x160x256 around the soft-tissue centre "
        "(one scan with --image, or every subject of --dataset)")


INPUTS = ("image", "dataset", "labels")
OUTPUTS = ()
OUTPUT_DIRS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="CT in Hounsfield units (NIfTI)")
    src.add_argument("--dataset", metavar="DIR",
                     help="a dataset folder (dataset.json, BTCV img/ + label/, or Learn2Reg imagesTr/)")
    p.add_argument("--labels", help="label map on the image's grid (with --image; the same grid stored in another "
                                    "axis order is reoriented to the image's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (created or extended)")
    p.add_argument("--id", dest="subject_id", default=None,
                   help="subject id for --image (default: from the file name)")
    p.add_argument("--role", default="test", choices=["template", "train", "test", "unused"],
                   help="role of the --image subject in DIR/dataset.json (default test)")
    p.add_argument("--layout", default="auto", choices=["auto", "slicreg", "btcv", "learn2reg"],
                   help="layout of --dataset (default: detected)")
    p.add_argument("--spacing-mm", type=float, default=2.0, help="isotropic voxel size (default 2.0)")
    p.add_argument("--shape", type=int, nargs=3, default=[192, 160, 256], metavar=("X", "Y", "Z"),
                   help="output shape in voxels (default 192 160 256)")
    p.add_argument("--no-antialias", action="store_true", help="no Gaussian smoothing before downsampling")
    p.add_argument("--force", action="store_true", help="preprocess images that do not look like CT in HU")


def _subject_id(image: str) -> str:
    from pathlib import Path

    stem = re.sub(r"\.nii(\.gz)?$", "", Path(image).name)
    stem = re.sub(r"_0000$", "", stem)
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "subject"


def _labels_on_image_grid(image_path: str, labels_path: str):
    """Check that ``labels_path`` lies on ``image_path``'s grid before any work.

    Returns:
        ``None`` when the labels are on the image's grid (same shape and affine) or the image header cannot be
        read (the preprocessing then reports that); the labels reoriented to the image's axis order (a
        :class:`~slicreg.conventions.Volume`) when they are the same world grid stored in another axis order.

    Raises:
        InputError: the labels lie on another world grid (both files and orientations named).
    """
    import nibabel as nib
    import numpy as np

    from slicreg.checks import match_grid
    from slicreg.conventions import Volume
    from slicreg.io import load_labels

    try:  # the header only: the image itself is read once, by the preprocessing
        header = nib.load(image_path)
        shape = tuple(int(s) for s in header.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        grid = Volume(np.broadcast_to(np.zeros((), np.uint8), shape), header.affine)
    except Exception:  # unreadable or not 3-D: preprocess_subject_files raises the proper one-line error
        return None
    labels = load_labels(labels_path)
    # the preprocessing's own rule for labels on the image grid is 0.01 mm
    matched = match_grid(labels, grid, name=labels_path, reference_name=image_path, what="labels",
                         reference_what="image", tol_mm=1e-2)
    return None if matched is labels else matched


def _preprocess_with_reoriented_labels(item: dict, labels) -> dict:
    """:func:`pipelines.stages.data.preprocess_subject_files` with labels already reoriented to the image's axis
    order: they go through a temporary file, and the crop record names the original labels file."""
    import tempfile
    from pathlib import Path

    from pipelines.stages.data import preprocess_subject_files
    from slicreg.io import atomic_write_json, read_json, save_volume

    with tempfile.TemporaryDirectory(prefix="slicreg-labels-") as tmp:
        path = save_volume(labels, Path(tmp) / "labels.nii.gz")
        summary = preprocess_subject_files({**item, "labels": str(path)})
    crop = read_json(item["out_crop"])
    crop.setdefault("source", {})["labels"] = str(Path(item["labels"]).absolute())
    crop["source"]["labels_reoriented_from"] = labels.meta.get("reoriented_from")
    atomic_write_json(item["out_crop"], crop)
    return summary


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from pipelines.stages.data import preprocess_dataset, preprocess_subject_files
    from preprocessing.datasets import (
        DATASET_JSON,
        Dataset,
        Subject,
        image_relpath,
        labels_relpath,
        load_dataset,
        write_dataset_json,
    )
    from slicreg.errors import InputError

    out = Path(args.out).expanduser()
    common = {"spacing_mm": args.spacing_mm, "shape": args.shape, "force": args.force,
              "antialias": not args.no_antialias}
    if args.dataset:
        if args.labels or args.subject_id:
            raise InputError("--labels and --id go with --image, not with --dataset")
        dataset = load_dataset(args.dataset, layout=args.layout)
        for note in dataset.notes:  # e.g. Learn2Reg json entries that are not on disk
            print(f"note: {note}")
        # a rerun keeps the subjects already preprocessed from the same files with the same parameters
        new = preprocess_dataset(dataset, out, done=lambda rel: False, reuse=True, **common)
        print(f"wrote {len(new.subjects)} preprocessed subjects and {out / DATASET_JSON}")
        return 0

    sid = args.subject_id or _subject_id(args.image)
    item = {"id": sid, "image": args.image, "labels": args.labels, "out_image": str(out / image_relpath(sid)),
            "out_labels": str(out / labels_relpath(sid)), "out_crop": str(out / f"crops/{sid}.json"), **common}
    labels_r = _labels_on_image_grid(args.image, args.labels) if args.labels else None
    if labels_r is None:
        summary = preprocess_subject_files(item)
    else:
        summary = _preprocess_with_reoriented_labels(item, labels_r)
    if (out / DATASET_JSON).is_file():
        dataset = load_dataset(out, layout="slicreg", check=False)
    else:
        dataset = Dataset(root=out, name=out.name, subjects={}, description="scans preprocessed by slicreg")
    subject = Subject(sid, Path(image_relpath(sid)), Path(labels_relpath(sid)) if args.labels else None,
                      args.role, files={"crop": Path(f"crops/{sid}.json")},
                      extra={"original": {k: str(Path(v).absolute()) for k, v in
                                          (("image", args.image), ("labels", args.labels)) if v}})
    subjects = {**dataset.subjects, sid: subject}
    lists = {"training": [s for s in dataset.training if s != sid], "test": [s for s in dataset.test if s != sid]}
    template = dataset.template if dataset.template != sid else None
    if args.role == "template":
        if template is not None:
            subjects[template] = replace(subjects[template], role="test")
            lists["test"].append(template)
        template = sid
    elif args.role in ("train", "test"):
        lists["training" if args.role == "train" else "test"].append(sid)
    write_dataset_json(replace(dataset, subjects=subjects, template=template, **lists), out)
    pad = summary["padded_vox"]
    print(f"wrote {item['out_image']}" + (f", {item['out_labels']}" if args.labels else "") +
          f", {item['out_crop']} ({summary['seconds']:.1f} s)")
    print(f"padding (voxels before/after per axis): {pad}; cut: {summary['dropped_vox']}")
    print(f"subject {sid!r} ({args.role}) listed in {out / DATASET_JSON}")
    return 0
