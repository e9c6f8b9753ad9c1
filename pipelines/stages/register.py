"""The ``register`` stage: SLIC-Reg registration of every listed pair of a preprocessed dataset."""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.runner import StageContext, stage

PAIR_CHOICES = ("registration_pairs", "atlas")


@stage("register", version="1",
       params={"weights": None, "device": "cpu", "pairs": "registration_pairs", "atlas": False, "seed": 0,
               "flow": {}},
       inputs={"dataset": True}, path_params=["weights"])
def register_stage(ctx: StageContext) -> None:
    """Predict supervoxels of every scan once, then register each pair by the keypoint flow (CONTRACTS.md)."""
    import numpy as np

    from pipelines.registration import default_weights, load_weights
    from preprocessing.datasets import load_dataset
    from slicreg.conventions import Volume, downsample_affine
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json, load_image, load_volume, save_field, save_volume
    from slicreg.register import predict_supervoxels, register_supervoxel_maps

    p = ctx.params
    if p["pairs"] not in PAIR_CHOICES:
        raise ConfigError(f"stage {ctx.stage_id!r}: pairs must be one of {PAIR_CHOICES}, got {p['pairs']!r}")
    if not isinstance(p["flow"], dict):
        raise ConfigError(f"stage {ctx.stage_id!r}: flow must be a table of keypoint-flow options")
    dataset = load_dataset(Path(ctx.inputs["dataset"]))
    pairs = [(q.fixed, q.moving) for q in dataset.pairs]
    if p["pairs"] == "atlas":
        pairs = [(f, m) for f, m in pairs if m == dataset.template]
    if not pairs:
        raise ConfigError(f"stage {ctx.stage_id!r}: the dataset lists no {p['pairs']} pairs")
    bundle = load_weights(p["weights"] or default_weights(), device=p["device"])
    template_sv = np.asarray(bundle.template_supervoxels.array) if p["atlas"] else None

    needed = sorted({s for pair in pairs for s in pair if not (p["atlas"] and s == dataset.template)})
    predict_s: dict[str, float] = {}
    maps: dict[str, np.ndarray] = {}
    for sid in ctx.progress(needed, "predict"):
        rel = f"supervoxels/{sid}.nii.gz"
        image = load_image(dataset.subject(sid).image)
        if ctx.done(rel):
            maps[sid] = load_volume(ctx.out_dir / rel, kind="labels", channels=True).array
            predict_s[sid] = float("nan")
            continue
        t0 = time.perf_counter()
        maps[sid] = predict_supervoxels(bundle, image.array, device=p["device"])
        predict_s[sid] = time.perf_counter() - t0
        save_volume(Volume(maps[sid], downsample_affine(image.affine, 2)), ctx.path(rel))
    if p["atlas"]:
        maps[dataset.template] = template_sv
        predict_s[dataset.template] = 0.0

    records = []
    for fixed, moving in ctx.progress(pairs, "register"):
        rel = f"fields/disp_{fixed}_{moving}.nii.gz"
        fixed_img = load_image(dataset.subject(fixed).image)
        t0 = time.perf_counter()
        result = register_supervoxel_maps(maps[fixed], maps[moving], device=p["device"], seed=int(p["seed"]),
                                          **p["flow"])
        flow_s = time.perf_counter() - t0
        save_field(result.disp_vox, fixed_img.affine, ctx.path(rel))
        runtime = flow_s + np.nan_to_num(predict_s[fixed]) + np.nan_to_num(predict_s[moving])
        records.append({"fixed": fixed, "moving": moving, "field": rel, "runtime_s": round(float(runtime), 3),
                        "flow_s": round(flow_s, 3), "timings_s": result.info.get("timings_s", {})})
    atomic_write_json(ctx.path("registrations.json"), {
        "method": "slicreg", "weights": str(bundle.path), "atlas": bool(p["atlas"]), "pairs": records,
        "predict_s": {k: (None if v != v else round(v, 3)) for k, v in predict_s.items()},
        "note": "runtime_s = network passes of both scans (the template's maps are free in atlas mode) + flow"})
    ctx.log(f"registered {len(records)} pairs; median runtime "
            f"{float(np.median([r['runtime_s'] for r in records])):.2f} s per pair")
