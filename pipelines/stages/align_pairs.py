"""The ``align-pairs`` stage: register pairs of a dataset with the built-in toolkit (:mod:`slicreg.alignment`).

Input ``dataset``: a (preprocessed) dataset folder (docs/CONTRACTS.md), read with
``preprocessing.datasets.load_dataset``. Parameters:

- ``preset``: registration preset of :data:`slicreg.alignment.PRESETS` (default ``"abdomen-ct"``);
- ``device``: torch device (default ``"cpu"``);
- ``pairs``: ``"registration_pairs"`` (default: the dataset's list), ``"atlas"`` (the listed pairs whose moving
  scan is the template) or ``"template"`` (every training subject as fixed with the template as moving, the
  direction the supervoxel transfer needs);
- ``fov_mask``: (default true) pass each scan's field of view to the registration as a mask, read from its
  crop record (``crops/<id>.json`` of a preprocessed dataset, the subject's ``"crop"`` file): the similarity
  then ignores the preprocessing's -1000 HU padding (:func:`slicreg.alignment.register_pair`). A subject without
  a crop record counts as covering its whole grid (logged). false: the whole grids, as before.

Outputs (docs/CONTRACTS.md, "Registration results")::

    fields/disp_<fixed>_<moving>.nii.gz   (X, Y, Z, 3) float32, voxels, fixed -> moving, on the fixed grid
    runs/<fixed>_<moving>.json            per pair: runtime, iterations, losses, affine, folding, field of view
    registrations.json                    {"method": "slicreg-align/<preset>", "pairs": [...]}

Pairs run in parallel with ``--jobs`` (``ctx.map``); a pair whose field and record an interrupted attempt
already wrote is not registered again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage

PAIR_SOURCES = ("registration_pairs", "atlas", "template")


def align_one(job: dict[str, Any]) -> dict[str, Any]:
    """Register one pair and write its field and record; returns the record (module level: runs in workers)."""
    import time

    from slicreg.alignment import register_pair
    from slicreg.geometry import load_fov_mask
    from slicreg.io import atomic_write_json, load_image, save_field

    t0 = time.perf_counter()
    fixed = load_image(job["fixed_image"])
    moving = load_image(job["moving_image"])
    masks = {}
    for side, image in (("fixed", fixed), ("moving", moving)):
        crop = job.get(f"{side}_crop")
        masks[f"{side}_mask"] = load_fov_mask(crop, image.shape, f"{side} crop record") if crop else None
    result = register_pair(fixed.array, moving.array, **masks, spacing_mm=tuple(float(s) for s in fixed.spacing_mm),
                           preset=job["preset"], device=job["device"], seed=job["seed"])
    save_field(result.disp_vox, fixed.affine, job["field_path"])
    record = {"fixed": job["fixed"], "moving": job["moving"], "field": job["field"],
              "runtime_s": round(time.perf_counter() - t0, 3), "registration_s": result.info["seconds"],
              "iterations": result.info["iterations"], "final_loss": result.info["final_loss"],
              "folding_fraction": result.info["folding_fraction"], "stages_s": result.info["stages"],
              "affine_vox": result.affine_vox.tolist(), "levels": result.info["levels"],
              "fov": result.info.get("fov"), "thin": result.info.get("thin")}
    atomic_write_json(job["record_path"], record)
    return record


def _pairs(dataset: Any, source: str) -> list[tuple[str, str]]:
    from slicreg.errors import ConfigError

    if source == "registration_pairs":
        pairs = [(p.fixed, p.moving) for p in dataset.pairs]
        if not pairs:
            raise ConfigError(f"align-pairs: dataset {dataset.root} lists no registration_pairs "
                              "(use pairs = \"template\" to register the training subjects to the template)")
        return pairs
    if source == "atlas":  # the listed pairs whose moving scan is the template (test -> template)
        pairs = [(p.fixed, p.moving) for p in dataset.pairs if p.moving == dataset.template]
        if not pairs:
            raise ConfigError(f"align-pairs: dataset {dataset.root} lists no pairs with the template as moving scan")
        return pairs
    if source == "template":
        if not dataset.template:
            raise ConfigError(f"align-pairs: dataset {dataset.root} names no template")
        return [(sid, dataset.template) for sid in dataset.training]
    raise ConfigError(f"align-pairs: pairs must be one of {PAIR_SOURCES}, got {source!r}")


@stage("align-pairs", version="2",
       params={"preset": "abdomen-ct", "device": "cpu", "pairs": "registration_pairs", "fov_mask": True},
       inputs={"dataset": True})
def align_pairs_stage(ctx: StageContext) -> None:
    """Register dataset pairs with the built-in toolkit; fields + registrations.json (docs/CONTRACTS.md)."""
    from pipelines.pair_jobs import run_pair_jobs
    from preprocessing.datasets import load_dataset
    from slicreg.alignment import resolve_preset
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json

    preset = str(ctx.params["preset"])
    resolve_preset(preset)  # fail before any work on an unknown preset
    use_fov = ctx.params["fov_mask"]
    if not isinstance(use_fov, bool):
        raise ConfigError(f"align-pairs: fov_mask must be true or false, got {use_fov!r}")
    dataset = load_dataset(Path(ctx.inputs["dataset"]))
    pairs = _pairs(dataset, str(ctx.params["pairs"]))
    crops: dict[str, str | None] = {}
    if use_fov:
        for sid in sorted({s for pair in pairs for s in pair}):
            crop = dataset.subject(sid).files.get("crop")
            crops[sid] = None if crop is None else str(dataset.path(crop))
        missing = [sid for sid, c in crops.items() if c is None]
        if missing:
            ctx.log(f"fov_mask: no crop record for {len(missing)} subject(s) ({', '.join(missing[:5])}"
                    f"{', ...' if len(missing) > 5 else ''}): their whole grids count as field of view")
    ordered = run_pair_jobs(ctx, pairs, lambda fixed, moving: {
        "fixed_image": str(dataset.path(dataset.subject(fixed).image)),
        "moving_image": str(dataset.path(dataset.subject(moving).image)),
        "preset": preset, "device": str(ctx.params["device"]), "seed": int(ctx.seed),
        "fixed_crop": crops.get(fixed), "moving_crop": crops.get(moving)}, align_one, desc="align")
    atomic_write_json(ctx.path("registrations.json"), {
        "method": f"slicreg-align/{preset}", "preset": preset, "fov_mask": use_fov,
        "pairs": [{"fixed": r["fixed"], "moving": r["moving"], "field": r["field"], "runtime_s": r["runtime_s"]}
                  for r in ordered]})
    times = [r["runtime_s"] for r in ordered]
    worst = max(r["folding_fraction"] for r in ordered)
    ctx.log(f"registered {len(ordered)} pairs with preset {preset}: mean {sum(times) / len(times):.1f} s per pair, "
            f"worst folding {100 * worst:.3f} % of voxels")
