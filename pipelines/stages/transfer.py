"""The ``transfer`` stage: template supervoxels onto every training subject (docs/method.md, section 4).

For each training subject S of a preprocessed dataset: the template-registration field (fixed = S, moving =
template, voxels of S's 2 mm grid) comes from deeds' files (``F{id}_displacements.dat`` and, if present,
``F{id}_matrix.txt`` in ``deeds_folder``) or from the built-in ``slicreg.alignment``; the template's 16 supervoxel
layers are sampled through it onto S's 4 mm grid (nearest). Outputs (docs/CONTRACTS.md)::

    transferred/<id>.nii.gz              uint8 (96, 80, 128, 16) on S's 4 mm grid
    fields/disp_<id>_<template>.nii.gz   the field used, (X, Y, Z, 3) float32 on S's 2 mm grid
    transfer.json                        per subject: labels kept / lost per layer, field source, runtime

Subjects run in parallel with ``--jobs``; a subject whose outputs an interrupted attempt already wrote is not
recomputed (its check is re-read from the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _from_loaded(ds: Any, folder: Path) -> tuple[str, list[str], dict[str, Path]] | None:
    """Template id, training ids and image paths from whatever ``load_dataset`` returned (mapping or object)."""
    template, subjects = _get(ds, "template"), _get(ds, "subjects")
    training = _get(ds, "training")
    if not isinstance(template, str) or subjects is None or training is None:
        return None
    images = {}
    for sid in [template, *training]:
        entry = subjects.get(sid) if hasattr(subjects, "get") else None
        image = _get(entry, "image") if entry is not None else None
        if image is None:
            return None
        image = Path(image)
        images[sid] = image if image.is_absolute() else folder / image
    return template, [str(t) for t in training], images


def read_dataset(folder: Path) -> tuple[str, list[str], dict[str, Path]]:
    """``(template id, training ids, {id: image path})`` of a dataset folder (docs/CONTRACTS.md).

    Uses ``preprocessing.datasets.load_dataset`` when it is available, otherwise reads ``dataset.json`` directly.
    """
    from slicreg.errors import InputError
    from slicreg.io import read_json

    folder = Path(folder)
    try:
        from preprocessing.datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        got = _from_loaded(load_dataset(folder), folder)
        if got is not None:
            return got
    doc = read_json(folder / "dataset.json")
    where = folder / "dataset.json"
    subjects = doc.get("subjects")
    template = doc.get("template")
    if not isinstance(subjects, dict) or not isinstance(template, str):
        raise InputError(f"{where}: expected 'template' (an id) and 'subjects' (id -> entry), see docs/CONTRACTS.md")
    training = doc.get("training")
    if training is None:
        training = [sid for sid, e in subjects.items() if isinstance(e, dict) and e.get("role") == "train"]
    images = {}
    for sid in [template, *training]:
        entry = subjects.get(sid)
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(f"{where}: subject {sid!r} is listed but has no entry with an 'image'")
        images[sid] = folder / entry["image"]
    return template, list(training), images


def _check_grid(sv: Any, template: Any, path: Path) -> None:
    import numpy as np

    from slicreg.conventions import downsample_affine
    from slicreg.errors import InputError

    want = tuple(s // 2 for s in template.shape)
    if sv.shape != want or not np.allclose(sv.affine, downsample_affine(template.affine, 2), atol=1e-3):
        raise InputError(f"{path}: expected supervoxels on the template's 4 mm grid {want} with affine "
                         f"downsample_affine(template, 2), got grid {sv.shape}")


def transfer_one(job: dict[str, Any]) -> dict[str, Any]:
    """Field, transfer and check for one subject (module level so that ``ctx.map`` can pickle it)."""
    import json
    import time

    import numpy as np

    from slicreg.conventions import Volume, downsample_affine
    from slicreg.io import load_field, load_image, load_volume, save_field, save_volume
    from slicreg.transfer import (
        check_transfer,
        reached_region,
        sample_layers,
        template_positions,
    )

    started = time.time()
    out_dir = Path(job["out_dir"])
    field_path, sv_path = out_dir / job["field_rel"], out_dir / job["transferred_rel"]
    subject = load_image(job["image"])
    sv = load_volume(job["supervoxels"], kind="labels", channels=True).array
    record: dict[str, Any] = {"field": job["field_rel"], "transferred": job["transferred_rel"],
                              "source": job["field_source"]}
    if job["field_done"]:
        field = load_field(field_path, fixed=subject).array
        record["resumed_field"] = True
    elif job["field_source"] == "deeds":
        from slicreg.deeds import read_deeds

        transform = read_deeds(job["dat"], subject.shape, matrix_path=job["matrix"], grid_spacing=job["grid_spacing"])
        field = transform.to_field()
        record.update(deeds={"displacements": job["dat"], "matrix": job["matrix"],
                             "grid_spacing": transform.grid_spacing,
                             "grid_spacing_inferred": transform.grid_spacing_inferred})
        save_field(field, subject.affine, field_path)
    else:
        from slicreg.alignment import register_pair
        from slicreg.geometry import load_fov_mask

        template = load_image(job["template_image"])
        masks = {f"{side}_mask": load_fov_mask(job[f"{side}_crop"], image.shape, f"{side} crop record")
                 if job.get(f"{side}_crop") else None
                 for side, image in (("fixed", subject), ("moving", template))}
        result = register_pair(subject.array, template.array, spacing_mm=tuple(float(s) for s in subject.spacing_mm),
                               preset=job["align_preset"], device="cpu", seed=job["seed"], progress=False, **masks)
        record["fov_mask"] = {k: v is not None for k, v in masks.items()}
        field = np.asarray(result.disp_vox, dtype=np.float32)
        record["align"] = json.loads(json.dumps(dict(getattr(result, "info", {}) or {}), default=str))
        save_field(field, subject.affine, field_path)
    pos = template_positions(field, factor=2)
    if job["transferred_done"]:
        out = load_volume(sv_path, kind="labels", channels=True).array
        record["resumed_transferred"] = True
    else:
        out = sample_layers(sv, pos)
        save_volume(Volume(out, downsample_affine(subject.affine, 2)), sv_path, dtype=np.uint8)
    checks = check_transfer(sv, out, reached=reached_region(field, sv.shape[1:]))
    outside = ~np.all((pos >= -0.5) & (pos < np.asarray(sv.shape[1:]).reshape(3, 1, 1, 1) - 0.5), axis=0)
    record.update(
        layers=[c.as_dict() for c in checks],
        n_lost=sum(len(c.lost) for c in checks),
        n_lost_at_edge=sum(len(c.lost_at_edge) for c in checks),
        fraction_outside_template=round(float(outside.mean()), 6),
        runtime_s=round(time.time() - started, 3),
    )
    return record


@stage(
    "transfer",
    version="1",
    params={"field_source": "deeds", "deeds_folder": None, "grid_spacing": 4, "align_preset": "abdomen-ct",
            "fov_mask": True},
    inputs={"dataset": True, "supervoxels": True},
    path_params=("deeds_folder",),
    param_types={"grid_spacing": (int, str)},
)
def transfer_stage(ctx: StageContext) -> None:
    """Template supervoxels -> every training subject through deeds or built-in template-registration fields."""
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json, load_image, load_volume, sha256_file

    source = ctx.params["field_source"]
    if source not in ("deeds", "align"):
        raise ConfigError(f"[stages.{ctx.stage_id}] field_source = {source!r}: expected 'deeds' or 'align'")
    spacing = ctx.params["grid_spacing"]
    if not (spacing == "auto" or (isinstance(spacing, int) and spacing >= 1)):
        raise ConfigError(f"[stages.{ctx.stage_id}] grid_spacing = {spacing!r}: expected a positive integer or 'auto'")
    dataset = Path(ctx.inputs["dataset"])
    template_id, training, images = read_dataset(dataset)
    sv_path = Path(ctx.inputs["supervoxels"]) / "supervoxels.nii.gz"
    _check_grid(load_volume(sv_path, kind="labels", channels=True), load_image(images[template_id]), sv_path)
    if not training:
        raise ConfigError(f"{dataset / 'dataset.json'}: no training subjects listed")

    deeds_folder = None
    if source == "deeds":
        if ctx.params["deeds_folder"] is None:
            raise ConfigError(f"[stages.{ctx.stage_id}] field_source = 'deeds' needs deeds_folder = \"...\" "
                              "(a folder of F<id>_displacements.dat / F<id>_matrix.txt)")
        deeds_folder = Path(str(ctx.params["deeds_folder"])).expanduser()
        missing = [f"F{sid}_displacements.dat" for sid in training
                   if not (deeds_folder / f"F{sid}_displacements.dat").is_file()]
        if missing:
            raise ConfigError(f"{deeds_folder}: missing deeds output for {len(missing)} training subject(s): "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def crop_record(sid: str) -> str | None:
        # field_source = "align" with fov_mask: the preprocessing's crop record (crops/<id>.json, CONTRACTS.md) masks
        # the padding out of the similarity, as in the align-pairs stage; without a record, the whole grid counts
        path = dataset / "crops" / f"{sid}.json"
        return str(path) if source == "align" and ctx.params["fov_mask"] and path.is_file() else None

    jobs = []
    for sid in training:
        field_rel, sv_rel = f"fields/disp_{sid}_{template_id}.nii.gz", f"transferred/{sid}.nii.gz"
        for rel in (field_rel, sv_rel):
            ctx.path(rel)  # creates the folder
        matrix = deeds_folder / f"F{sid}_matrix.txt" if deeds_folder else None
        jobs.append({
            "id": sid, "image": str(images[sid]), "template_image": str(images[template_id]),
            "supervoxels": str(sv_path), "out_dir": str(ctx.out_dir), "field_rel": field_rel,
            "transferred_rel": sv_rel, "field_done": ctx.done(field_rel), "transferred_done": ctx.done(sv_rel),
            "field_source": source, "grid_spacing": spacing, "align_preset": ctx.params["align_preset"],
            "seed": ctx.seed, "fixed_crop": crop_record(sid), "moving_crop": crop_record(template_id),
            "dat": str(deeds_folder / f"F{sid}_displacements.dat") if deeds_folder else None,
            "matrix": str(matrix) if matrix is not None and matrix.is_file() else None,
        })
    resumed = sum(j["transferred_done"] for j in jobs)
    if resumed:
        ctx.log(f"{resumed} of {len(jobs)} subjects already transferred by an earlier attempt; checking them only")
    records = ctx.map(transfer_one, jobs, desc="transfer")
    subjects = {j["id"]: r for j, r in zip(jobs, records)}
    n_lost = sum(r["n_lost"] for r in records)
    n_edge = sum(r["n_lost_at_edge"] for r in records)
    kept = [layer["n_kept"] for r in records for layer in r["layers"]]
    atomic_write_json(ctx.path("transfer.json"), {
        "template": template_id, "field_source": source,
        "grid_spacing": spacing if source == "deeds" else None,
        "align_preset": ctx.params["align_preset"] if source == "align" else None,
        "supervoxels_sha256": sha256_file(sv_path),
        "subjects": subjects,
        "summary": {"subjects": len(records), "labels_lost": n_lost, "labels_lost_at_edge": n_edge,
                    "min_labels_kept_per_layer": min(kept) if kept else None},
    })
    ctx.log(f"{len(records)} subjects transferred from {template_id} ({source}); labels kept per layer "
            f"min {min(kept)}, lost {n_lost} in total ({n_edge} at the field of view's edge)")
