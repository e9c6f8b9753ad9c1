"""Learn2Reg submission folders (edge code of the ``learn2reg-submission`` stage and ``slicreg learn2reg``).

Writing: a field computed on the preprocessed grids is carried back to the fixed image's own grid with the map
back ``slicreg register`` uses for raw scans (:func:`slicreg.geometry.field_to_original_grid`): voxel ``x`` of
the fixed image as stored corresponds to voxel ``x + u(x)`` of the moving image as stored, whatever their
orientation and spacing. Saved ``(X, Y, Z, 3)`` float32 under Learn2Reg's name
(:func:`preprocessing.learn2reg.displacement_filename`).

Scoring (:func:`score_submission`): what Learn2Reg's evaluation does with the folder -- for each pair of the list,
the file by its Learn2Reg name, its shape checked against the fixed image's, the moving labels (found by
Learn2Reg's rule) warped with ``map_coordinates(order=0)`` at identity + field
(:func:`slicreg.metrics.warp_labels_learn2reg`), Dice per label with absent labels skipped and NaN-averaged
(:func:`slicreg.metrics.dice` with ``absent="learn2reg"``, through :func:`slicreg.metrics.evaluate_pair`, the
function the ``evaluate`` stage's report uses), SDlogJ; mean, std and 30th percentile over pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def field_to_submission(job: dict[str, Any]) -> dict[str, Any]:
    """Carry one field from the preprocessed grids to the original ones and write it (module level: ``ctx.map``).

    ``job``: ``field`` (a field file on the preprocessed fixed grid, voxels, fixed -> moving), ``fixed_crop``,
    ``moving_crop`` (the two subjects' crop records, ``crops/<id>.json``), ``out`` (the submission file)."""
    from slicreg.errors import InputError
    from slicreg.geometry import CropRecord, field_to_original_grid
    from slicreg.io import load_field, read_json, save_field

    started = time.perf_counter()
    fixed = CropRecord.from_json(read_json(job["fixed_crop"]), name=job["fixed_crop"])
    moving = CropRecord.from_json(read_json(job["moving_crop"]), name=job["moving_crop"])
    field = load_field(job["field"])
    if field.shape != tuple(fixed.crop_shape):
        raise InputError(f"{job['field']}: field grid {field.shape} is not the preprocessed fixed grid "
                         f"{tuple(fixed.crop_shape)} of {job['fixed_crop']}")
    disp = field_to_original_grid(field.array, fixed, moving)
    save_field(disp, fixed.original_affine, job["out"])
    return {"file": Path(job["out"]).name, "shape": [*fixed.original_shape, 3], "dtype": "float32",
            "seconds": round(time.perf_counter() - started, 3)}


def score_submission_pair(job: dict[str, Any]) -> dict[str, Any]:
    """Score one submitted field as Learn2Reg does (module level: ``ctx.map``).

    ``job``: ``fixed``, ``moving`` (ids), ``file`` (the submission file), ``fixed_labels``, ``moving_labels``,
    ``labels`` (ids), ``hd95`` (bool). Returns ``{"fixed", "moving", "file", "dice", "dice_per_label",
    "hd95_vox", "sdlogj", "folding_percent"}`` (NaN where undefined)."""
    from slicreg.errors import InputError
    from slicreg.io import load_field, load_labels
    from slicreg.metrics import evaluate_pair, mean_learn2reg, warp_labels_learn2reg

    fixed = load_labels(job["fixed_labels"])
    moving = load_labels(job["moving_labels"])
    field = load_field(job["file"])
    if field.shape != fixed.shape:
        raise InputError(f"{job['file']}: field shape {(*field.shape, 3)}, but Learn2Reg expects the fixed image's "
                         f"shape + (3,) = {(*fixed.shape, 3)} (fixed labels {job['fixed_labels']})")
    disp = field.array.astype(np.float64)  # Learn2Reg reads the field with get_fdata(): float64
    warped = warp_labels_learn2reg(moving.array, disp)
    labels = [int(v) for v in job["labels"]]
    result = evaluate_pair(fixed.array, moving.array, warped, disp_vox=disp, labels=labels, affine=fixed.affine,
                           hd95=bool(job["hd95"]))
    per_label = {str(lab): result["per_label"][str(lab)]["dice_learn2reg"] for lab in labels}
    hd = [result["per_label"][str(lab)]["hd95_vox"] for lab in labels]
    return {"fixed": job["fixed"], "moving": job["moving"], "file": Path(job["file"]).name,
            "dice": mean_learn2reg(list(per_label.values())), "dice_per_label": per_label,
            "hd95_vox": mean_learn2reg(hd) if job["hd95"] else float("nan"),
            "sdlogj": result["jacobian"]["sdlogj_learn2reg"], "folding_percent": result["jacobian"]["folding_percent"]}


def score_submission(folder: str | Path, pairs: Sequence[Any], *, labels: Sequence[int], hd95: bool = False,
                     mapper: Callable[[Callable, list, str], list] | None = None) -> dict[str, Any]:
    """Score a submission folder the way Learn2Reg's evaluation does.

    Args:
        folder: the submission folder (``disp_*.nii.gz``).
        pairs: :class:`preprocessing.learn2reg.SubmissionPair` entries (one Learn2Reg list).
        labels: label ids to score (the task's labels).
        hd95: also the 95th percentile Hausdorff distance (voxels, Learn2Reg's definition; slow on full scans).
        mapper: ``mapper(fn, items, desc)`` (a stage passes ``ctx.map``); default a plain loop.

    Returns:
        ``{"set", "labels", "pairs": [per pair], "aggregate": {"dice": {mean, std, p30, n, n_nan}, "sdlogj": ...,
        "hd95_vox": ...}}``.

    Raises:
        InputError: missing submission files or label maps (all listed), a field of the wrong shape.
    """
    from slicreg.errors import InputError
    from slicreg.metrics import aggregate

    folder = Path(folder)
    mapper = mapper or (lambda fn, items, desc: [fn(x) for x in items])
    problems = []
    jobs = []
    for p in pairs:
        file = folder / p.file
        if not file.is_file():
            problems.append(f"{file} (pair {p.fixed} <- {p.moving}) is missing")
        for side, path in (("fixed", p.fixed_labels), ("moving", p.moving_labels)):
            if path is None:
                image = p.fixed_image if side == "fixed" else p.moving_image
                problems.append(f"no label map for the {side} image {image} (Learn2Reg's rule: the image path with "
                                f"'images' replaced by 'labels')")
        jobs.append({"fixed": p.fixed, "moving": p.moving, "file": str(file), "fixed_labels": str(p.fixed_labels),
                     "moving_labels": str(p.moving_labels), "labels": [int(v) for v in labels], "hd95": bool(hd95)})
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"submission {folder}: cannot be scored: {shown}")
    results = mapper(score_submission_pair, jobs, "scoring")
    return {
        "set": pairs[0].set_name if pairs else None, "labels": [int(v) for v in labels], "pairs": results,
        "aggregate": {key: aggregate([r[key] for r in results]) for key in ("dice", "sdlogj", "hd95_vox")},
        "definition": "Learn2Reg evaluation: labels warped with map_coordinates(order=0) at identity + field, Dice "
                      "per label (absent from fixed or moving: skipped), NaN-mean per pair; SDlogJ = "
                      "std(log(clip(det J + 3))) on the field cropped by 2 voxels; mean, std, 30th percentile",
    }


def format_scores(scores: dict[str, Any]) -> str:
    """A plain-text table of :func:`score_submission`'s result (one row per pair, then the aggregate)."""
    from slicreg.report import text_table

    def pct(v: Any) -> str:
        return "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"

    rows = [[r["file"], r["fixed"], r["moving"], pct(r["dice"]),
             "-" if not np.isfinite(r["sdlogj"]) else f"{r['sdlogj']:.3f}"] for r in scores["pairs"]]
    d, j = scores["aggregate"]["dice"], scores["aggregate"]["sdlogj"]
    rows.append(["mean (std; p30)", "", "", f"{pct(d['mean'])} ({pct(d['std'])}; {pct(d['p30'])})",
                 f"{j['mean']:.3f}" if np.isfinite(j["mean"]) else "-"])
    return text_table(["file", "fixed", "moving", "Dice %", "SDlogJ"], rows, align="lllrr")
