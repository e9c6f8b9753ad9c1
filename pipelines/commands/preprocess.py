"""``slicreg preprocess``: the SLIC-Reg preprocessing of one scan, or of a whole dataset folder."""

from __future__ import annotations

import argparse
import re

NAME = "preprocess"
HELP = ("reorient to RAS, resample to 2 mm and crop/pad to 192x160x256 around the soft-tissue centre "
        "(one scan with --image, or every subject of --dataset)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="CT in Hounsfield units (NIfTI)")
    src.add_argument("--dataset", metavar="DIR",
                     help="a dataset folder (dataset.json, BTCV img/ + label/, or Learn2Reg imagesTr/)")
    p.add_argument("--labels", help="label map on the image's grid (with --image)")
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


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from pipelines.stages.data import preprocess_dataset, preprocess_subject_files
    from preprocessing.datasets import (DATASET_JSON, Dataset, Subject, image_relpath, labels_relpath,
                                        load_dataset, write_dataset_json)
    from slicreg.errors import InputError

    out = Path(args.out).expanduser()
    common = {"spacing_mm": args.spacing_mm, "shape": args.shape, "force": args.force,
              "antialias": not args.no_antialias}
    if args.dataset:
        if args.labels or args.subject_id:
            raise InputError("--labels and --id go with --image, not with --dataset")
        dataset = load_dataset(args.dataset, layout=args.layout)
        new = preprocess_dataset(dataset, out, done=lambda rel: False, **common)
        print(f"wrote {len(new.subjects)} preprocessed subjects and {out / DATASET_JSON}")
        return 0

    sid = args.subject_id or _subject_id(args.image)
    item = {"id": sid, "image": args.image, "labels": args.labels, "out_image": str(out / image_relpath(sid)),
            "out_labels": str(out / labels_relpath(sid)), "out_crop": str(out / f"crops/{sid}.json"), **common}
    summary = preprocess_subject_files(item)
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
