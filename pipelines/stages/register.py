"""The ``register`` stage: SLIC-Reg registration of the listed pairs of a preprocessed dataset.

Inputs:

- ``dataset`` (required): a preprocessed dataset folder (docs/CONTRACTS.md);
- ``bundle`` (optional): a weights bundle folder made by an earlier stage (e.g. ``"train/bundle"``); otherwise
  the ``weights`` parameter (default: the shipped ``weights/slicreg-cohort-v3``);
- ``predicted`` (optional): the output of a ``predict`` stage (``predicted/<id>.nii.gz`` on the 4 mm grid and
  ``predict.json`` with the network time per subject). Subjects it lacks are predicted here.
- ``supervoxels`` (optional, atlas mode): the template supervoxels (a ``supervoxels`` stage's output) the bundle
  was trained on, e.g. when this pipeline trains its own bundle on them (pipelines/btcv.toml).

Parameters: ``weights``, ``device``, ``pairs`` (``"registration_pairs"``: every listed pair; ``"atlas"``: only the
pairs whose moving scan is the template; ``"registration_val"`` / ``"registration_test"``: the pairs of that
Learn2Reg list), ``atlas`` (the template side uses the template's own supervoxels, no network pass; valid only for
the template the bundle was trained on -- the dataset's template image is the bundle's, or the ``supervoxels``
input proves it, :func:`slicreg.bundle.atlas_template_problem` -- anything else is refused before any work),
``seed``, ``flow`` (options of :func:`slicreg.flow.supervoxel_flow`), ``refine`` (false by default: the MIND-SSC
instance refinement, :func:`slicreg.registration.refine_field`), ``refine_options`` (its keyword arguments),
``fov_mask`` (default true: the refinement ignores the preprocessing's padding, i.e. compares only inside each
scan's field of view, from its crop record ``crops/<id>.json``; a subject without one counts as whole),
``method`` (the name in registrations.json; default ``"slicreg"`` or ``"slicreg+refine"``).

A displacement-regression bundle (kind ``deeplab/displacement``, the paper's Regression baseline) needs
``atlas = true`` and pairs whose moving scan is the template: each pair is then one network pass on the fixed scan
(its regressed field to the template) and the optional refinement, through the same function as ``slicreg
register`` (:func:`slicreg.registration.register_preprocessed`), in the pair jobs (:func:`register_one_displacement`;
no supervoxel maps, ``predicted`` and ``flow`` are not used; method ``"regression"`` / ``"regression+refine"``).

Outputs (docs/CONTRACTS.md, "Registration results")::

    supervoxels/<id>.nii.gz               maps predicted here (16 layers, 4 mm), when not given as input
    predict.json                          {"subjects": {id: {"file", "seconds"}}}: the ``predict`` stage's
                                          format, so a later register stage can take ``predicted = "<this id>"``
    fields/disp_<fixed>_<moving>.nii.gz   (X, Y, Z, 3) float32, voxels, fixed -> moving, on the fixed grid
    runs/<fixed>_<moving>.json            per pair: timings per step, flow and refinement diagnostics
    registrations.json                    {"method": ..., "pairs": [{"fixed", "moving", "field", "runtime_s"}]}

``runtime_s`` of a pair = network passes of both scans (0 for the template in atlas mode) + keypoints +
features + Adam + dense field (+ refinement): what ``slicreg register`` spends on preprocessed scans, without
file reading and writing. Pairs run on ``--jobs`` processes (``ctx.map``); the network passes run first, once
per scan, in the main process.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage

PAIR_CHOICES = ("registration_pairs", "atlas", "registration_val", "registration_test")


def register_one(job: dict[str, Any]) -> dict[str, Any]:
    """Register one pair from its supervoxel files, write its field and record (module level: runs in workers)."""
    import numpy as np

    from slicreg.io import atomic_write_json, load_image, load_volume, save_field
    from slicreg.registration import refine_field, register_supervoxel_maps

    t0 = time.perf_counter()
    fixed_sv = load_volume(job["fixed_sv"], kind="labels", channels=True).array
    moving_sv = load_volume(job["moving_sv"], kind="labels", channels=True).array
    fixed = load_image(job["fixed_image"])
    read_s = time.perf_counter() - t0
    result = register_supervoxel_maps(fixed_sv, moving_sv, device=job["device"], seed=job["seed"], **job["flow"])
    wall, cpu = dict(result.info["timings_s"]), dict(result.info["cpu_s"])
    refine_info = None
    disp = result.disp_vox
    if job["refine"]:
        from slicreg.geometry import load_fov_mask

        moving = load_image(job["moving_image"])
        masks = {f"{side}_mask": load_fov_mask(job[f"{side}_crop"], image.shape, f"{side} crop record")
                 if job.get(f"{side}_crop") else None for side, image in (("fixed", fixed), ("moving", moving))}
        t1, c1 = time.perf_counter(), time.process_time()
        disp, refine_info = refine_field(fixed.array, moving.array, disp, device=job["device"], seed=job["seed"],
                                         **masks, **job["refine_options"])
        wall["refine"], cpu["refine"] = time.perf_counter() - t1, time.process_time() - c1
    save_field(np.asarray(disp, dtype=np.float32), fixed.affine, job["field_path"])
    network = {"network fixed": job["network_fixed_s"], "network moving": job["network_moving_s"]}
    runtime = sum(v for v in network.values() if v is not None) + sum(wall.values())
    record = {
        "fixed": job["fixed"], "moving": job["moving"], "field": job["field"], "runtime_s": round(runtime, 3),
        "timings_s": {**network, **{k: round(v, 4) for k, v in wall.items()}},
        "cpu_s": {k: round(v, 4) for k, v in cpu.items()},
        "read_s": round(read_s, 3), "total_wall_s": round(time.perf_counter() - t0, 3),
        "n_keypoints": result.info["n_keypoints"], "adam_iterations_run": result.info["adam_iterations_run"],
        "final_flow_loss": result.info["final_loss"], "flow_params": result.info["params"],
        "refine": refine_info,
    }
    atomic_write_json(job["record_path"], record)
    return record


def register_one_displacement(job: dict[str, Any]) -> dict[str, Any]:
    """Register one pair (moving = the template) with a displacement-regression bundle: the network pass and the
    optional refinement of :func:`slicreg.registration.register_preprocessed`; write its field and record (module
    level: runs in workers, each loading the bundle once, :func:`slicreg.api.cached_weights`)."""
    import numpy as np

    from slicreg.api import cached_weights
    from slicreg.geometry import load_fov_mask
    from slicreg.io import atomic_write_json, load_image, save_field
    from slicreg.registration import register_preprocessed

    t0 = time.perf_counter()
    bundle = cached_weights(job["weights"], device=job["device"])
    fixed, moving = load_image(job["fixed_image"]), load_image(job["moving_image"])
    masks = {f"{side}_mask": load_fov_mask(job[f"{side}_crop"], image.shape, f"{side} crop record")
             if job.get(f"{side}_crop") else None for side, image in (("fixed", fixed), ("moving", moving))}
    read_s = time.perf_counter() - t0
    result = register_preprocessed(bundle, fixed.array, moving.array, moving_is_template=True, refine=job["refine"],
                                   refine_options=job["refine_options"], device=job["device"], seed=job["seed"],
                                   **masks)
    save_field(np.asarray(result.disp_vox, dtype=np.float32), fixed.affine, job["field_path"])
    wall, cpu = result.info["timings_s"], result.info["cpu_s"]
    record = {
        "fixed": job["fixed"], "moving": job["moving"], "field": job["field"],
        "runtime_s": round(sum(wall.values()), 3),
        "timings_s": {"network moving": 0.0, **{k: round(v, 4) for k, v in wall.items()}},
        "cpu_s": {k: round(v, 4) for k, v in cpu.items()},
        "read_s": round(read_s, 3), "total_wall_s": round(time.perf_counter() - t0, 3),
        "method": result.info["method"], "kind": result.info["kind"], "refine": result.info.get("refine"),
    }
    atomic_write_json(job["record_path"], record)
    return record


def _check_options(options: Any, fn: Any, key: str, where: str, reserved: tuple[str, ...]) -> dict[str, Any]:
    from slicreg.errors import ConfigError

    if not isinstance(options, dict):
        raise ConfigError(f"{where} {key}: expected a table of options, got {options!r}")
    allowed = [name for name, par in inspect.signature(fn).parameters.items()
               if par.kind == inspect.Parameter.KEYWORD_ONLY and name not in reserved]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} {key}: unknown option(s) {unknown}; allowed: {allowed}")
    return dict(options)


@stage("register", version="3",
       params={"weights": None, "device": "cpu", "pairs": "registration_pairs", "atlas": False, "seed": 0,
               "flow": {}, "refine": False, "refine_options": {}, "fov_mask": True, "method": None},
       inputs={"dataset": True, "bundle": False, "predicted": False, "supervoxels": False}, path_params=["weights"])
def register_stage(ctx: StageContext) -> None:
    """Predict supervoxels of every scan once, then register each pair by the keypoint flow (CONTRACTS.md)."""
    import numpy as np

    from pipelines.pair_jobs import run_pair_jobs
    from preprocessing.datasets import load_dataset
    from slicreg.api import atlas_advice, atlas_template, default_weights, load_weights
    from slicreg.bundle import displacement_atlas_problem
    from slicreg.conventions import Volume, downsample_affine
    from slicreg.errors import ConfigError
    from slicreg.flow import supervoxel_flow
    from slicreg.io import (
        atomic_write_json,
        load_image,
        load_volume,
        read_json,
        save_volume,
    )
    from slicreg.registration import predict_supervoxels, refine_field

    p = ctx.params
    where = f"[stages.{ctx.stage_id}]"
    if p["pairs"] not in PAIR_CHOICES:
        raise ConfigError(f"{where} pairs = {p['pairs']!r}: expected one of {PAIR_CHOICES}")
    flow = _check_options(p["flow"], supervoxel_flow, "flow", where, ("seed", "device"))
    refine_options = _check_options(p["refine_options"], refine_field, "refine_options", where,
                                    ("seed", "device", "fixed_mask", "moving_mask"))
    if not isinstance(p["fov_mask"], bool):
        raise ConfigError(f"{where} fov_mask = {p['fov_mask']!r}: expected true or false")
    method = str(p["method"] or ("slicreg+refine" if p["refine"] else "slicreg"))
    dataset = load_dataset(Path(ctx.inputs["dataset"]))
    pairs = [(q.fixed, q.moving) for q in dataset.pairs]
    if p["pairs"] == "atlas":
        pairs = [(f, m) for f, m in pairs if m == dataset.template]
    elif p["pairs"] != "registration_pairs":  # one Learn2Reg list
        pairs = [(q.fixed, q.moving) for q in dataset.pairs if q.extra.get("learn2reg") == p["pairs"]]
    if not pairs:
        raise ConfigError(f"{where}: the dataset {dataset.root} lists no {p['pairs']} pairs")
    source = ctx.inputs.get("bundle") or p["weights"] or default_weights()
    bundle = load_weights(Path(str(source)), device=p["device"])
    template_sv_file = Path(bundle.path) / "supervoxels.nii.gz"
    displacement = bundle.kind.target == "displacement"  # the Regression baseline: atlas pairs, no supervoxels
    if displacement:
        if not p["atlas"]:
            raise ConfigError(f"{where}: {displacement_atlas_problem(bundle)}; set atlas = true (with pairs whose "
                              f"moving scan is the dataset's template)")
        others = [(f, m) for f, m in pairs if m != dataset.template]
        if others:
            raise ConfigError(f"{where}: {len(others)} pair(s) (e.g. {others[0][0]} <- {others[0][1]}) have a moving "
                              f"scan other than the template {dataset.template}, which a {bundle.kind.noun} bundle "
                              f"cannot register; use pairs = \"atlas\"")
        method = str(p["method"] or ("regression+refine" if p["refine"] else "regression"))

    def image_path(sid: str) -> Path:
        return Path(dataset.path(dataset.subject(sid).image))

    if p["atlas"]:  # before any work: a template the bundle was not trained on would give wrong fields silently
        if not dataset.template:
            raise ConfigError(f"{where}: atlas = true needs a dataset with a template ({dataset.root})")
        template_sv, problem = atlas_template(bundle, image_path(dataset.template), ctx.inputs.get("supervoxels"))
        if problem is not None:
            raise ConfigError(f"{where}: atlas = true refused for the template {dataset.template}: {problem}; "
                              f"{atlas_advice('atlas = false')}")
        t_shape = tuple(np.shape(template_sv)[1:])
        want = tuple(s // 2 for s in load_image(image_path(dataset.template)).shape)
        if t_shape != want:
            raise ConfigError(f"{where}: atlas mode: the template supervoxels are on a {t_shape} grid, the "
                              f"dataset's template {dataset.template} needs {want}")
    elif ctx.inputs.get("supervoxels"):
        ctx.log("note: the supervoxels input is used in atlas mode only (atlas = false here): not used")

    # supervoxel maps: given by a predict stage, predicted here, or (atlas) the template's own
    given: dict[str, Path] = {}
    given_s: dict[str, float | None] = {}
    if ctx.inputs.get("predicted"):
        folder = Path(ctx.inputs["predicted"])
        record = read_json(folder / "predict.json") if (folder / "predict.json").is_file() else {"subjects": {}}
        for sid, entry in record.get("subjects", {}).items():
            if (folder / entry["file"]).is_file():
                given[sid] = folder / entry["file"]
                given_s[sid] = entry.get("seconds")
    maps: dict[str, Path] = {}
    network_s: dict[str, float | None] = {}
    needed = sorted({s for pair in pairs for s in pair})
    if p["atlas"]:
        maps[dataset.template] = template_sv_file
        network_s[dataset.template] = 0.0
        needed = [s for s in needed if s != dataset.template]
    if displacement:  # the network passes run in the pair jobs (register_one_displacement)
        needed = []
        if ctx.inputs.get("predicted"):
            ctx.log("note: the predicted input holds supervoxel maps, which a displacement bundle does not use")
    for sid in ctx.progress(needed, "predict"):
        image = load_image(image_path(sid))
        expected = tuple(s // 2 for s in image.shape)
        if sid in given:
            shape = load_volume(given[sid], kind="labels", channels=True).array.shape
            if tuple(shape[1:]) != expected:
                raise ConfigError(f"{where}: predicted maps {given[sid]} have grid {shape[1:]}, expected the 4 mm grid "
                                  f"{expected} of {sid} (use grid = \"input\" in the predict stage)")
            maps[sid], network_s[sid] = given[sid], given_s[sid]
            continue
        rel = f"supervoxels/{sid}.nii.gz"
        maps[sid] = ctx.out_dir / rel
        if ctx.done(rel):
            earlier = read_json(ctx.out_dir / "predict.json").get("subjects", {}) if ctx.done("predict.json") else {}
            network_s[sid] = earlier.get(sid, {}).get("seconds")
            continue
        t0 = time.perf_counter()
        labels = predict_supervoxels(bundle, image.array, device=p["device"])
        network_s[sid] = round(time.perf_counter() - t0, 3)
        save_volume(Volume(labels, downsample_affine(image.affine, 2)), ctx.path(rel), dtype=np.uint8)
        own = {k: {"file": f"supervoxels/{k}.nii.gz", "seconds": network_s[k]} for k in needed
               if k in network_s and k not in given}
        atomic_write_json(ctx.path("predict.json"), {"bundle": str(Path(str(source)).resolve()),
                                                     "grid": "input", "upsample": "nearest", "subjects": own})
    del bundle

    def crop(sid: str) -> str | None:
        found = dataset.subject(sid).files.get("crop")
        return str(dataset.path(found)) if (p["fov_mask"] and p["refine"] and found) else None

    if displacement:
        ordered = run_pair_jobs(ctx, pairs, lambda fixed, moving: {
            "weights": str(Path(str(source)).resolve()), "fixed_image": str(image_path(fixed)),
            "moving_image": str(image_path(moving)), "device": str(p["device"]), "seed": int(p["seed"]),
            "refine": bool(p["refine"]), "refine_options": refine_options, "fixed_crop": crop(fixed),
            "moving_crop": crop(moving)}, register_one_displacement, desc="register")
    else:
        ordered = run_pair_jobs(ctx, pairs, lambda fixed, moving: {
            "fixed_sv": str(maps[fixed]), "moving_sv": str(maps[moving]), "fixed_image": str(image_path(fixed)),
            "moving_image": str(image_path(moving)), "network_fixed_s": network_s.get(fixed),
            "network_moving_s": network_s.get(moving), "device": str(p["device"]), "seed": int(p["seed"]),
            "flow": flow, "refine": bool(p["refine"]), "refine_options": refine_options,
            "fixed_crop": crop(fixed), "moving_crop": crop(moving)}, register_one, desc="register")
    atomic_write_json(ctx.path("registrations.json"), {
        "method": method, "weights": str(Path(str(source)).resolve()), "atlas": bool(p["atlas"]),
        "refine": bool(p["refine"]), "flow": flow, "refine_options": refine_options, "fov_mask": bool(p["fov_mask"]),
        "pairs": [{"fixed": r["fixed"], "moving": r["moving"], "field": r["field"], "runtime_s": r["runtime_s"],
                   "timings_s": r["timings_s"]} for r in ordered],
        "network_s": network_s,
        "note": "runtime_s = network passes of both scans (0 for the template in atlas mode; missing when the maps "
                "came from an earlier attempt without a record) + keypoints + features + Adam + dense field "
                "(+ refine); file reading and writing excluded"})
    times = [r["runtime_s"] for r in ordered]
    ctx.log(f"{method}: registered {len(ordered)} pairs; runtime per pair median {float(np.median(times)):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f})")
