"""The ``learn2reg-submission`` stage: a registration's fields as a Learn2Reg submission folder, checked.

Inputs:

- ``dataset`` (required): the preprocessed dataset the registration ran on, made from a Learn2Reg folder (the
  ``preprocess`` stage after a ``dataset`` stage with ``layout = "learn2reg"``): its crop records say how each
  preprocessed grid relates to the image as shipped, and each subject keeps its Learn2Reg case number and
  modality;
- ``registration`` (required): a registration result folder (``registrations.json``, fields on the preprocessed
  fixed grids; e.g. the ``register`` stage).

Parameters: ``set`` (``"registration_val"`` or ``"registration_test"``: the pairs written), ``check`` (default
true: score the folder as Learn2Reg's evaluation does, :func:`pipelines.learn2reg.score_submission`; needs label
maps, so switch it off for ``registration_test``), ``labels`` (ids to score; default the task's labels),
``hd95`` (default false).

Outputs::

    submission/disp_{FFFF}_{fmod}_{MMMM}_{mmod}.nii.gz   (X, Y, Z, 3) float32 on each fixed image's own grid,
                                                        voxels of the moving image as stored, fixed -> moving
    submission.json       the list, the files, their shapes, the source registration
    registrations.json    {"method", "pairs": [{"fixed", "moving", "field": "submission/...", "runtime_s"}]}: an
                          ``evaluate`` stage given the *original* dataset (the ``dataset`` stage) scores these
                          fields on the original grids (docs/CONTRACTS.md, "Registration results")
    check.json            the Learn2Reg scores (with check = true)

Zip the ``submission/`` folder's files to upload them. Pairs run on ``--jobs`` processes.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.runner import StageContext, stage


@stage("learn2reg-submission", version="1",
       params={"set": "registration_val", "check": True, "labels": None, "hd95": False},
       inputs={"dataset": True, "registration": True}, param_types={"labels": (list, type(None))})
def submission_stage(ctx: StageContext) -> None:
    """Write the fields of one Learn2Reg list on the original grids under Learn2Reg's names; score them."""
    from pipelines.learn2reg import field_to_submission, format_scores, score_submission
    from preprocessing.datasets import LEARN2REG_SETS, load_dataset
    from preprocessing.learn2reg import FIELD_DTYPE, submission_pairs
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json, read_json
    from slicreg.report import json_ready

    p = ctx.params
    where = f"[stages.{ctx.stage_id}]"
    if p["set"] not in LEARN2REG_SETS:
        raise ConfigError(f"{where} set = {p['set']!r}: expected one of {', '.join(LEARN2REG_SETS)}")
    dataset = load_dataset(Path(ctx.inputs["dataset"]))
    pairs = submission_pairs(dataset, p["set"])
    folder = Path(ctx.inputs["registration"])
    doc = read_json(folder / "registrations.json")
    fields = {(e["fixed"], e["moving"]): e for e in doc.get("pairs", []) if isinstance(e, dict)}
    missing = [f"{q.fixed} <- {q.moving}" for q in pairs if (q.fixed, q.moving) not in fields]
    if missing:
        raise ConfigError(f"{where}: the registration {folder} has no field for {len(missing)} of the {len(pairs)} "
                          f"{p['set']} pairs (e.g. {missing[0]}); register them (register stage: pairs = "
                          f"\"{p['set']}\")")
    jobs = []
    for q in pairs:
        crops = {}
        for side, sid in (("fixed", q.fixed), ("moving", q.moving)):
            crop = dataset.subject(sid).files.get("crop")
            if crop is None:
                raise ConfigError(f"{where}: subject {sid} of {dataset.root} has no crop record (crops/{sid}.json); "
                                  f"the dataset input must be the preprocess stage's output")
            crops[side] = str(dataset.path(crop))
        entry = fields[(q.fixed, q.moving)]
        field = Path(entry["field"])
        rel = f"submission/{q.file}"
        ctx.path(rel)
        jobs.append({"field": str(field if field.is_absolute() else folder / field), "fixed_crop": crops["fixed"],
                     "moving_crop": crops["moving"], "out": str(ctx.out_dir / rel), "rel": rel})
    todo = [j for j in jobs if not ctx.done(j["rel"])]
    written = ctx.map(field_to_submission, todo, desc="fields to the original grids")
    atomic_write_json(ctx.path("submission.json"), {
        "format": "learn2reg-submission/1", "set": p["set"], "dtype": FIELD_DTYPE,
        "naming": "disp_{fixed case}_{fixed modality}_{moving case}_{moving modality}.nii.gz",
        "grid": "each fixed image's own voxel grid as shipped; displacements in voxels of the moving image as "
                "shipped, fixed -> moving",
        "registration": {"folder": str(folder), "method": doc.get("method")},
        "files": [{"fixed": q.fixed, "moving": q.moving, "file": q.file, "fixed_image": str(q.fixed_image),
                   "moving_image": str(q.moving_image)} for q in pairs],
    })
    atomic_write_json(ctx.path("registrations.json"), {
        "method": doc.get("method") or "submission",
        "note": f"the {p['set']} fields of {folder} on each fixed image's original grid (Learn2Reg submission)",
        "pairs": [{"fixed": q.fixed, "moving": q.moving, "field": f"submission/{q.file}",
                   "runtime_s": fields[(q.fixed, q.moving)].get("runtime_s")} for q in pairs],
    })
    ctx.log(f"{len(pairs)} {p['set']} fields written to submission/ ({len(written)} now, "
            f"{len(jobs) - len(todo)} by an earlier attempt)")
    if not p["check"]:
        return
    labels = [int(v) for v in (p["labels"] if p["labels"] is not None else sorted(dataset.labels))]
    scores = score_submission(ctx.out_dir / "submission", pairs, labels=labels, hd95=bool(p["hd95"]), mapper=ctx.map)
    atomic_write_json(ctx.path("check.json"), json_ready(scores))  # NaN (undefined) -> null
    for line in format_scores(scores).rstrip().splitlines():
        ctx.log(line)
