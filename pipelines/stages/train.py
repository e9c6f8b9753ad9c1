"""Stages ``train`` (transferred supervoxels -> weights bundle) and ``predict`` (bundle -> supervoxel maps)."""

from __future__ import annotations

from pathlib import Path

from pipelines.runner import StageContext, stage

# the training parameters are those of slicreg.train.TrainConfig (kept in sync by test_train.py), plus:
#   seed = None -> the pipeline's seed; threads = None -> torch's default
TRAIN_PARAMS = {
    "iterations": 400, "batch_size": 4, "lr": 0.004, "seed": None, "augment_sigma": 0.07, "head_voxels": 2048,
    "foreground_fraction": 0.0, "fov_crop_probability": 0.0, "fov_crop_mm": [32.0, 120.0],
    "precision": "auto", "channels_last": True, "checkpointing": False, "backward": "compiled", "val_every": 50,
    "val_subjects": 2, "val_ids": [], "checkpoint_every": 10, "device": "cpu", "init_weights": None, "threads": None,
    "model": "deeplab", "target": "supervoxels", "smoothness": 0.0, "lr_schedule": "constant", "warmup": 0,
}
# target = "displacement" (the Regression baseline) trains on the transfer stage's fields (its fields/ folder, beside
# transferred/): the input ``transferred`` is that stage's whole output, so nothing else is needed.


@stage("train", version="1", params=TRAIN_PARAMS,
       inputs={"dataset": True, "transferred": True, "supervoxels": True, "cohort": False, "init": False},
       path_params=("init_weights",))
def train_stage(ctx: StageContext) -> None:
    """Train the network on the transferred supervoxels (or, ``target = "displacement"``, on the transfer fields);
    writes bundle/ (weights + card) and training/ (logs).

    Starts from a weights bundle (fine-tuning) when given one: ``init_weights`` (a path), or the input ``init``
    (another train stage of the pipeline, whose ``bundle/`` is used)."""
    import torch

    from slicreg.errors import ConfigError
    from slicreg.io import read_json
    from slicreg.train import TrainConfig, run_training

    p = dict(ctx.params)
    threads = p.pop("threads")
    if p["seed"] is None:
        p["seed"] = ctx.seed
    if ctx.inputs.get("init") is not None:
        if p["init_weights"] is not None:
            raise ConfigError(f"[stages.{ctx.stage_id}]: give the starting weights once: init_weights = "
                              f"{p['init_weights']!r} or the input init, not both")
        p["init_weights"] = str(Path(ctx.inputs["init"]) / "bundle")
    config = TrainConfig.from_dict(p, where=f"[stages.{ctx.stage_id}]")
    if threads is not None:
        torch.set_num_threads(int(threads))
    provenance = None
    if ctx.inputs.get("cohort") is not None:
        stats_path = Path(ctx.inputs["cohort"]) / "cohort_stats.json"
        if stats_path.is_file():
            stats = read_json(stats_path)
            provenance = {"cohort": {k: stats[k] for k in ("format", "seed", "n_train", "n_test", "config", "source")
                                     if k in stats}}
    out = ctx.path("training")
    out.mkdir(parents=True, exist_ok=True)
    resume = ctx.done("training/checkpoints/last.pt")
    if resume:
        ctx.log("continuing from the checkpoint of an interrupted attempt")
    result = run_training(
        config, dataset=ctx.inputs["dataset"], transferred=ctx.inputs["transferred"],
        template_supervoxels=Path(ctx.inputs["supervoxels"]) / "supervoxels.nii.gz", out_dir=out, resume=resume,
        bundle_dir=ctx.out_dir / "bundle", provenance=provenance, quiet=ctx.quiet)
    val = result.validation or {}
    if config.target == "displacement":
        metric = (f"end-point error {val.get('val_epe_mm', float('nan')):.2f} mm "
                  f"(foreground {val.get('val_foreground_epe_mm', float('nan')):.2f} mm)")
    else:
        metric = (f"accuracy {val.get('val_accuracy', float('nan')):.3f} "
                  f"(foreground {val.get('val_foreground_accuracy', float('nan')):.3f})")
    ctx.log(f"{result.iterations} steps in {result.wall_s / 60:.1f} min, final loss {result.final_loss:.3f}, "
            f"validation loss {val.get('val_loss', float('nan')):.3f}, {metric}")


@stage("predict", version="1",
       params={"weights": None, "subjects": "test", "grid": "input", "precision": "auto", "device": "cpu"},
       inputs={"dataset": True, "bundle": False}, path_params=("weights",))
def predict_stage(ctx: StageContext) -> None:
    """Predict supervoxel maps (predicted/<id>.nii.gz, 4 mm) of dataset subjects with a weights bundle."""
    import time

    import numpy as np
    import torch

    from slicreg.bundle import load_bundle, predict, require_target
    from slicreg.conventions import Volume, downsample_affine
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json, load_image, read_json, save_volume
    from slicreg.network import HU_SCALE, network_input

    p = ctx.params
    where = f"[stages.{ctx.stage_id}]"
    source = ctx.inputs.get("bundle") or p["weights"]
    if source is None:
        raise ConfigError(f"{where}: needs a weights bundle: inputs = {{ bundle = \"train/bundle\" }} or "
                          f"weights = \"weights/...\"")
    if p["grid"] not in ("input", "output"):
        raise ConfigError(f"{where} grid = {p['grid']!r}: expected 'input' or 'output'")
    if p["precision"] not in ("auto", "fp32"):
        raise ConfigError(f"{where} precision = {p['precision']!r}: expected 'auto' or 'fp32'")
    bundle = load_bundle(Path(str(source)).expanduser(), device=p["device"])
    require_target(bundle, what=f"{where} (the predict stage, supervoxel maps)", error=ConfigError)
    root = Path(ctx.inputs["dataset"])
    doc = read_json(root / "dataset.json")
    subjects = doc.get("subjects", {})
    chosen = p["subjects"]
    if chosen == "all":
        ids = list(subjects)
    elif chosen in ("test", "training"):
        ids = list(doc.get(chosen) or [])
    elif isinstance(chosen, list):
        ids = [str(s) for s in chosen]
    else:
        raise ConfigError(f"{where} subjects = {chosen!r}: expected 'test', 'training', 'all' or a list of ids")
    unknown = [s for s in ids if s not in subjects]
    if unknown:
        raise ConfigError(f"{where}: unknown subject(s) {unknown} in {root / 'dataset.json'}")
    records = {}
    for sid in ctx.progress(ids, "predict"):
        rel = f"predicted/{sid}.nii.gz"
        if ctx.done(rel):
            records[sid] = {"file": rel, "seconds": None}
            continue
        img_path = Path(subjects[sid]["image"])
        img = load_image(img_path if img_path.is_absolute() else root / img_path)
        t0 = time.perf_counter()
        labels = predict(bundle, network_input(img.array) * np.float32(HU_SCALE), grid=p["grid"],
                         device=p["device"], dtype=torch.float32 if p["precision"] == "fp32" else None)
        seconds = time.perf_counter() - t0
        affine = downsample_affine(img.affine, 2)
        if p["grid"] == "output":
            affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        save_volume(Volume(labels, affine), ctx.path(rel), dtype=np.uint8)
        records[sid] = {"file": rel, "seconds": round(seconds, 3)}
    atomic_write_json(ctx.path("predict.json"), {
        "bundle": str(Path(str(source)).resolve()), "bundle_files": bundle.card.get("files", {}),
        "grid": p["grid"], "precision": p["precision"], "subjects": records})
    times = [r["seconds"] for r in records.values() if r["seconds"] is not None]
    if times:
        ctx.log(f"{len(times)} subjects predicted, {np.mean(times):.1f} s each")
