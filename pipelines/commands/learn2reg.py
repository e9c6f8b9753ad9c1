"""``slicreg learn2reg``: a Learn2Reg submission folder from a task's folder, and its check.

``slicreg learn2reg submit --dataset DIR --out SUB`` registers every pair of a list of the task's
``*_dataset.json`` (``registration_val`` by default) as ``pipelines/learn2reg.toml`` does (each scan preprocessed
the paper's way -- also when it is already 2 mm at the preprocessed shape -- and passed through the network once;
the field mapped back to the fixed image's own grid as ``slicreg register`` maps back raw scans) and writes
``SUB/disp_{FFFF}_{fmod}_{MMMM}_{mmod}.nii.gz``: ``(X, Y, Z, 3)`` float32 on the fixed image's grid as shipped,
voxels of the moving image as shipped, fixed -> moving.

``slicreg learn2reg check --dataset DIR --submission SUB`` scores a submission folder as Learn2Reg's evaluation
does (labels found by its rule, warped with ``map_coordinates(order=0)`` at identity + field; Dice with absent
labels skipped; SDlogJ) and prints one row per pair and the mean (``--out-json`` keeps every number).
"""

from __future__ import annotations

import argparse
from typing import Any

NAME = "learn2reg"
HELP = "write a Learn2Reg submission folder for a task's pairs (submit), or score one as Learn2Reg does (check)"

INPUTS = ("dataset", "submission", "weights")
OUTPUTS = ("out_json",)
OUTPUT_DIRS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = sub.add_parser("submit", help="register the pairs of a list and write the submission folder",
                            description="register the pairs of a Learn2Reg list and write the submission folder")
    check = sub.add_parser("check", help="score a submission folder exactly as Learn2Reg's evaluation does",
                           description="score a submission folder exactly as Learn2Reg's evaluation does")
    for q in (submit, check):
        q.add_argument("--dataset", required=True, metavar="DIR",
                       help="the task's folder (imagesTr/, labelsTr/, *_dataset.json) or its *_dataset.json")
        q.add_argument("--set", default="registration_val", choices=["registration_val", "registration_test"],
                       help="which pairs (default registration_val)")
    submit.add_argument("--out", required=True, metavar="DIR", help="the submission folder (created)")
    submit.add_argument("--weights", default=None, help="weights bundle folder (default: the shipped weights)")
    submit.add_argument("--refine", action="store_true", help="MIND-SSC refinement of each field (slicreg register "
                                                              "--refine)")
    submit.add_argument("--force", action="store_true", help="accept images that do not look like CT")
    submit.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    submit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    submit.add_argument("--seed", type=int, default=0, help="seed of the flow (default 0)")
    submit.add_argument("--check", action="store_true", help="then score the folder (as `learn2reg check`)")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    check.add_argument("--submission", required=True, metavar="DIR", help="the submission folder")
    check.add_argument("--hd95", action="store_true", help="also HD95 (voxels; slow on full-size scans)")
    check.add_argument("--out-json", default=None, help="write every score to this JSON file")


def _dataset(path: str) -> Any:
    """The task's folder, read as Learn2Reg ships it (absent scans and their pairs left out and printed)."""
    from preprocessing.datasets import load_dataset

    dataset = load_dataset(path, layout="learn2reg", partial=True)
    for note in dataset.notes:
        print(f"note: {note}")
    return dataset


def _check(dataset: Any, pairs: list[Any], folder: Any, *, hd95: bool, out_json: str | None) -> None:
    from pipelines.learn2reg import format_scores, score_submission
    from slicreg.io import atomic_write_json
    from slicreg.report import json_ready

    scores = score_submission(folder, pairs, labels=sorted(dataset.labels), hd95=hd95)
    print(format_scores(scores), end="")
    if out_json:
        atomic_write_json(out_json, json_ready(scores))
        print(f"wrote {out_json}")


def _submit(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from preprocessing.learn2reg import submission_pairs
    from slicreg.api import (
        bundle_crop_shape,
        load_weights,
        prepared_to_original_grid,
        preprocess_for_registration,
        register_preprocessed,
    )
    from slicreg.errors import InputError
    from slicreg.io import load_image, save_field
    from slicreg.registration import predict_supervoxels

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads {args.threads}: expected a positive number")
        torch.set_num_threads(int(args.threads))
    dataset = _dataset(args.dataset)
    pairs = submission_pairs(dataset, args.set)
    for q in pairs:
        for image in (q.fixed_image, q.moving_image):
            if not Path(image).is_file():
                raise InputError(f"{image}: file not found (an image of the {args.set} pair {q.fixed} <- {q.moving})")
    bundle = load_weights(args.weights, device=args.device)
    from slicreg.bundle import require_target

    require_target(bundle, what="`slicreg learn2reg submit` (pairs of two scans, registered by supervoxels)")
    crop_shape = bundle_crop_shape(bundle)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # each scan is preprocessed and passed through the network once; its image is kept while a later pair needs it
    uses: dict[str, int] = {}
    for q in pairs:
        for sid in (q.fixed, q.moving):
            uses[sid] = uses.get(sid, 0) + 1
    images = {sid: img for q in pairs for sid, img in ((q.fixed, q.fixed_image), (q.moving, q.moving_image))}
    prepared: dict[str, Any] = {}
    maps: dict[str, Any] = {}
    started = time.perf_counter()
    seconds = []
    for q in tqdm(pairs, desc="register", disable=args.quiet, leave=False):
        t0 = time.perf_counter()
        for sid in (q.fixed, q.moving):
            if sid not in prepared:
                # always the paper's preprocessing (as the pipeline's preprocess stage): the same scan stored in
                # any orientation gives the same preprocessed grid, hence the same field on its own grid
                prepared[sid] = preprocess_for_registration(load_image(images[sid]), name=str(images[sid]),
                                                            force=args.force, crop_shape=crop_shape,
                                                            keep_preprocessed=False)
                maps[sid] = predict_supervoxels(bundle, prepared[sid].image.array, device=args.device)
        fixed, moving = prepared[q.fixed], prepared[q.moving]
        masks = {f"{side}_mask": None if prep.identity else prep.record.fov_mask()
                 for side, prep in (("fixed", fixed), ("moving", moving))}
        result = register_preprocessed(bundle, fixed.image.array, moving.image.array, device=args.device,
                                       seed=args.seed, refine=args.refine, fixed_sv=maps[q.fixed],
                                       moving_sv=maps[q.moving], **masks)
        save_field(prepared_to_original_grid(result.disp_vox, fixed, moving), fixed.record.original_affine,
                   out / q.file)
        seconds.append(time.perf_counter() - t0)
        for sid in (q.fixed, q.moving):
            uses[sid] -= 1
            if not uses[sid]:
                prepared.pop(sid)
                maps.pop(sid)
    print(f"wrote {len(pairs)} {args.set} fields to {out} in {time.perf_counter() - started:.0f} s "
          f"({sum(seconds) / len(seconds):.1f} s per pair, network passes included)")
    if args.check:
        _check(dataset, pairs, out, hd95=False, out_json=None)


def run(args: argparse.Namespace) -> int:
    if args.action == "submit":
        _submit(args)
        return 0
    from preprocessing.learn2reg import submission_pairs

    dataset = _dataset(args.dataset)
    _check(dataset, submission_pairs(dataset, args.set), args.submission, hd95=args.hd95, out_json=args.out_json)
    return 0
