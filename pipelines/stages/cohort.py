"""The ``cohort`` stage: a labelled synthetic cohort made from the real example CT (:mod:`preprocessing.cohort`).

Input ``source``: a folder holding ``example_ct.nii.gz``, ``example_labels_btcv.nii.gz`` and (optional)
``example_labels_totalseg.nii.gz`` -- the output of the ``fetch-example`` stage.

Parameters: ``n_train`` (20), ``n_test`` (10), ``seed`` (0), ``ground_truth_fields`` (true), ``montage`` (true),
every realism knob of :class:`preprocessing.cohort.CohortConfig` (``null`` = that class's default), and the
simulated CT acquisition (:mod:`preprocessing.acquisition`, docs/ct.md), off by default:

- ``acquisition``: every subject's acquisition -- absent / ``false`` / ``"off"`` = none; ``true`` = the defaults;
  a preset name (``"varied"``, ``"low-dose-sharp"``, ``"standard-soft"``); or a table of
  :class:`~preprocessing.acquisition.AcquisitionConfig` fields, optionally with ``preset = "..."`` under them.
- ``test_acquisition``, ``template_acquisition``: the same for the test subjects / the template only; absent =
  as ``acquisition``. A test acquisition unlike the training one measures robustness to an unseen scanner.

Subject ``i``'s acquisition (dose, kernel, beam hardening, noise) is drawn from
``numpy.random.default_rng([seed, i, 1])``, a generator of its own: switching it on changes the images it is
applied to and nothing else (labels, transforms, true fields and every other subject stay bit-identical).

Outputs (docs/CONTRACTS.md, "A dataset folder")::

    dataset.json                                   template, training, test, registration_pairs
    imagesTr/<id>_0000.nii.gz                      int16 HU, 2 mm RAS grid
    labelsTr/<id>.nii.gz                           uint8 BTCV ids
    transforms/<id>.npz                            the subject's map to the source scan (SubjectTransform)
    ground_truth_fields/disp_<fixed>_<moving>.nii.gz   per listed pair (if ground_truth_fields)
    cohort_stats.json                              per subject and per pair figures, initial Dice, checks
    cohort_montage.png                             a few subjects with label outlines (if montage)
    LICENSE                                        the source data's licence (copied when the source has one)

:func:`write_cohort` does the work for the stage and for ``slicreg cohort``; the per-subject and per-pair
functions are module level so that :meth:`~pipelines.runner.StageContext.map` can run them in workers.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage

KNOBS = (
    "spacing_mm", "max_rotation_deg", "max_scale", "max_translation_mm", "deform_mm", "deform_smoothness_mm",
    "organ_scale", "organ_shift_mm", "velocity_spacing_mm", "squaring_steps", "phase_probabilities",
    "enhancement_jitter", "hu_offset", "noise_hu", "blur_mm", "fov_min_fraction", "fov_top_share",
    "slab_fraction", "slab_mm", "margin_mm",
)
"""The realism knobs (fields of :class:`preprocessing.cohort.CohortConfig`) that are stage parameters."""

ACQUISITION_PARAMS = ("acquisition", "test_acquisition", "template_acquisition")
"""The simulated-acquisition parameters (values for :meth:`preprocessing.acquisition.AcquisitionConfig.from_value`;
``None`` for the role-specific two = as ``acquisition``)."""

COHORT_PARAMS: dict[str, Any] = {
    "n_train": 20, "n_test": 10, "seed": 0, "ground_truth_fields": True, "montage": True,
    **{k: None for k in KNOBS}, **{k: None for k in ACQUISITION_PARAMS},
}

SOURCE_IMAGE = "example_ct.nii.gz"
SOURCE_LABELS = "example_labels_btcv.nii.gz"
SOURCE_TISSUE = "example_labels_totalseg.nii.gz"
LARGE_ORGAN_ML = 50.0  # the issue's criterion: true fields reproduce every organ larger than this with Dice > 0.9

DESCRIPTION = (
    "Synthetic cohort derived from ONE patient's CT (the TotalSegmentator 2.18.0 example scan, Apache-2.0): every "
    "subject is that scan under a random global affine, a diffeomorphic deformation (stationary velocity field) "
    "with organ size changes, a contrast phase, noise, blur and its own field of view. Labels are TotalSegmentator "
    "model output (silver standard). transforms/<id>.npz gives each subject's exact map to the source scan. Scores "
    "on this cohort are not comparable with BTCV results."
)


# ------------------------------------------------------------------------------------------------- workers
@functools.lru_cache(maxsize=1)
def _load_source(image: str, labels: str, tissue: str | None, config_json: str) -> Any:
    """The prepared source scan (cached per process: every subject of a worker shares it)."""
    from preprocessing.cohort import CohortConfig, prepare_source
    from slicreg.io import load_image, load_labels

    config = CohortConfig.from_mapping(json.loads(config_json))
    tis = load_labels(tissue) if tissue else None
    return prepare_source(load_image(image), load_labels(labels), tis, config=config, name=image)


def make_subject_files(job: dict[str, Any]) -> dict[str, Any]:
    """Generate one subject and write its image, labels and transform (the transform last: it marks completion).

    ``job`` keys: ``index``, ``id``, ``role``, ``slab``, ``seed``, ``image``, ``labels``, ``tissue`` (source paths
    or None), ``config`` (JSON string), ``out`` (the cohort folder), optional ``acquisition`` (JSON string of an
    enabled :class:`~preprocessing.acquisition.AcquisitionConfig`, or None). Returns the subject's summary."""
    import numpy as np

    from preprocessing.cohort import CohortConfig, make_subject, sample_subject_params
    from preprocessing.datasets import image_relpath, labels_relpath
    from slicreg.io import atomic_path, save_volume

    started, cpu0 = time.perf_counter(), time.process_time()
    config = CohortConfig.from_mapping(json.loads(job["config"]))
    source = _load_source(job["image"], job["labels"], job["tissue"], job["config"])
    rng = np.random.default_rng([int(job["seed"]), int(job["index"])])
    params = sample_subject_params(rng, config=config, full_fov=job["role"] == "template", slab=bool(job["slab"]))
    subject = make_subject(source, params, rng=rng, config=config)
    acquisition = simulate_subject_acquisition(subject, job) if job.get("acquisition") else None
    out = Path(job["out"])
    save_volume(subject.image, out / image_relpath(job["id"]), dtype=np.int16)
    save_volume(subject.labels, out / labels_relpath(job["id"]), dtype=np.uint8)
    summary = {
        "id": job["id"], "index": job["index"], "role": job["role"], "tags": ["slab"] if params.slab else [],
        "seconds": round(time.perf_counter() - started, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
        "info": subject.info, "params": params.to_json(),
    }
    if acquisition is not None:
        summary["acquisition"] = acquisition
    arrays = subject.transform.to_npz_dict()
    arrays["subject_affine"] = subject.image.affine
    arrays["subject_shape"] = np.asarray(subject.image.shape)
    arrays["source_affine"] = source.affine
    arrays["source_shape"] = np.asarray(source.shape)
    arrays["summary_json"] = np.array(json.dumps(summary))
    with atomic_path(out / transform_relpath(job["id"])) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return summary


def simulate_subject_acquisition(subject: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Pass ``subject.image`` through the simulated CT acquisition of ``job["acquisition"]`` (in place: the image
    and the soft-tissue centre in ``subject.info`` are replaced) with the generator ``[seed, index, 1]``.

    Returns what was drawn, with the wall and CPU seconds it took."""
    import numpy as np

    from preprocessing.acquisition import AcquisitionConfig, apply_to_subject
    from preprocessing.cohort import soft_tissue_centre_mm

    started, cpu0 = time.perf_counter(), time.process_time()
    config = AcquisitionConfig.from_value(json.loads(job["acquisition"]))
    rng = np.random.default_rng([int(job["seed"]), int(job["index"]), 1])
    subject.image, info = apply_to_subject(subject.image, rng, config)
    centre = soft_tissue_centre_mm(subject.image)  # what the preprocessing will crop around now
    subject.info["soft_tissue_centre_mm"] = None if centre is None else [round(float(c), 3) for c in centre]
    info["seconds"] = round(time.perf_counter() - started, 2)
    info["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    return info


def resolve_acquisitions(acquisition: Any = None, test_acquisition: Any = None,
                         template_acquisition: Any = None) -> dict[str, Any]:
    """The :class:`~preprocessing.acquisition.AcquisitionConfig` of each role (``"template"``, ``"train"``,
    ``"test"``) from the three parameters (``None`` for the last two = as ``acquisition``); bad values raise
    :class:`~slicreg.errors.InputError` naming the parameter."""
    from preprocessing.acquisition import AcquisitionConfig

    base = AcquisitionConfig.from_value(acquisition, name="acquisition")
    return {
        "template": base if template_acquisition is None else
        AcquisitionConfig.from_value(template_acquisition, name="template_acquisition"),
        "train": base,
        "test": base if test_acquisition is None else AcquisitionConfig.from_value(test_acquisition,
                                                                                    name="test_acquisition"),
    }


def transform_relpath(subject_id: str) -> str:
    """Where a cohort folder keeps a subject's transform: ``transforms/<id>.npz``."""
    return f"transforms/{subject_id}.npz"


def load_transform(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A ``transforms/<id>.npz`` file -> (:class:`preprocessing.cohort.SubjectTransform`, its stored extras:
    ``subject_affine``, ``subject_shape``, ``source_affine``, ``source_shape``, ``summary``)."""
    import numpy as np

    from preprocessing.cohort import SubjectTransform
    from slicreg.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: transform file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    transform = SubjectTransform.from_npz_dict(arrays, name=str(path))
    extras = {k: arrays[k] for k in ("subject_affine", "subject_shape", "source_affine", "source_shape")
              if k in arrays}
    extras["summary"] = json.loads(str(arrays["summary_json"])) if "summary_json" in arrays else {}
    return transform, extras


def pair_files(job: dict[str, Any]) -> dict[str, Any]:
    """Initial Dice of one pair and, if asked, its true field (written) with the field's own check.

    ``job`` keys: ``fixed``, ``moving`` (ids), ``out`` (cohort folder), ``centres`` (id -> soft-tissue centre mm),
    ``ground_truth`` (bool), ``field`` (relative path). The check warps the moving labels with the true field
    and scores them against the fixed labels where the moving scan has data (``overlap``)."""
    import numpy as np

    from preprocessing.cohort import initial_dice, true_field
    from preprocessing.datasets import labels_relpath
    from slicreg.conventions import identity_grid_vox
    from slicreg.fields import warp_labels
    from slicreg.io import load_field, load_labels, save_field
    from slicreg.labels import BTCV_IDS
    from slicreg.metrics import dice

    started, cpu0 = time.perf_counter(), time.process_time()
    out = Path(job["out"])
    fixed = load_labels(out / labels_relpath(job["fixed"]))
    moving = load_labels(out / labels_relpath(job["moving"]))
    centres = job["centres"]
    com = initial_dice(fixed, moving, fixed_centre_mm=centres.get(job["fixed"]),
                       moving_centre_mm=centres.get(job["moving"]))
    world = initial_dice(fixed, moving)
    result: dict[str, Any] = {
        "fixed": job["fixed"], "moving": job["moving"],
        "initial_dice_centre_aligned": _rounded(com), "initial_dice_world": _rounded(world),
        "initial_mean_dice_centre_aligned": _nanmean(com.values()), "initial_mean_dice_world": _nanmean(world.values()),
    }
    if job["ground_truth"]:
        path = out / job["field"]
        if path.is_file():
            disp = load_field(path, fixed=fixed).array
        else:
            t_fixed, _ = load_transform(out / transform_relpath(job["fixed"]))
            t_moving, _ = load_transform(out / transform_relpath(job["moving"]))
            disp = true_field(t_fixed, fixed.affine, fixed.shape, t_moving, moving.affine)
            save_field(disp, fixed.affine, path)
        warped = warp_labels(moving.array, disp)
        pos = identity_grid_vox(fixed.shape, dtype=np.float32) + disp
        overlap = np.all([(pos[a] >= -0.5) & (pos[a] < moving.shape[a] - 0.5) for a in range(3)], axis=0)
        check = dict(zip(BTCV_IDS, dice(fixed.array, warped, BTCV_IDS, absent="nan", mask=overlap).tolist()))
        voxel_ml = float(abs(np.linalg.det(fixed.affine[:3, :3]))) / 1000.0
        volumes = {lab: float(np.count_nonzero((fixed.array == lab) & overlap)) * voxel_ml for lab in check}
        large = [check[lab] for lab in check if volumes[lab] > LARGE_ORGAN_ML and not math.isnan(check[lab])]
        length = np.sqrt((np.einsum("ab,b...->a...", fixed.affine[:3, :3], disp) ** 2).sum(axis=0))
        result.update({
            "ground_truth_field": job["field"],
            "field_check_dice": _rounded(check),
            "field_check_volume_ml": {str(k): round(v, 1) for k, v in volumes.items() if v > 0},
            "field_check_min_dice_large_organs": round(min(large), 4) if large else None,
            "overlap_fraction": round(float(overlap.mean()), 4),
            "displacement_mm_inside_overlap": ({"mean": round(float(length[overlap].mean()), 2),
                                                "max": round(float(length[overlap].max()), 2)}
                                               if overlap.any() else None),
        })
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    return result


def _rounded(scores: dict[int, float]) -> dict[str, float | None]:
    return {str(k): (None if math.isnan(v) else round(float(v), 4)) for k, v in scores.items()}


def _nanmean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return round(sum(vals) / len(vals), 4) if vals else None


# ------------------------------------------------------------------------------------------------- montage
def save_montage(path: Path, subjects: list[dict[str, Any]]) -> Path:
    """A PNG with an axial and a coronal slice of each subject, organ outlines on top (radiological display:
    the patient's right on the left, anterior / cranial up; window 400/40 HU).

    ``subjects``: dicts with ``id``, ``image`` and ``labels`` (:class:`~slicreg.conventions.Volume`, RAS grid)
    and ``title``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from slicreg.io import atomic_path
    from slicreg.labels import BTCV_LABELS

    colours = {lab: _organ_colour(lab) for lab in BTCV_LABELS}
    n = len(subjects)
    fig = Figure(figsize=(4.2 * n, 8.6))
    FigureCanvasAgg(fig)
    for col, subj in enumerate(subjects):
        img = np.asarray(subj["image"].array, dtype=np.float32)
        lab = np.asarray(subj["labels"].array)
        organ = lab > 0
        z = int(np.argmax(organ.sum(axis=(0, 1)))) if organ.any() else img.shape[2] // 2
        kidneys = np.argwhere((lab == 2) | (lab == 3))
        y = int(kidneys[:, 1].mean()) if kidneys.size else img.shape[1] // 2
        for row, (im, lb, what) in enumerate(((img[:, :, z], lab[:, :, z], f"axial z={z}"),
                                              (img[:, y, :], lab[:, y, :], f"coronal y={y}"))):
            ax = fig.add_subplot(2, n, row * n + col + 1)
            ax.imshow(im.T, cmap="gray", vmin=-160, vmax=240, origin="lower", interpolation="nearest")
            for value in np.unique(lb):
                if value == 0 or int(value) not in colours:
                    continue
                ax.contour((lb == value).T.astype(np.float32), levels=[0.5], colors=[colours[int(value)]],
                           linewidths=0.9, origin="lower")
            ax.invert_xaxis()  # patient's right (+x in RAS) on the viewer's left
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{subj['title']}\n{what}" if row == 0 else what, fontsize=8)
    handles = [Line2D([], [], color=colours[k], lw=2, label=f"{k} {v}") for k, v in BTCV_LABELS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.08, wspace=0.03, hspace=0.12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


def _organ_colour(label: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["tab20"]((2 * (label - 1)) % 20 / 20 + ((label - 1) // 10) / 20 + 0.025)


# ----------------------------------------------------------------------------------------------- the writer
def write_cohort(ctx: StageContext, *, image: Path, labels: Path, tissue: Path | None, n_train: int, n_test: int,
                 seed: int, ground_truth_fields: bool, montage: bool = True,
                 knobs: dict[str, Any] | None = None, licence: Path | None = None,
                 acquisition: Any = None, test_acquisition: Any = None,
                 template_acquisition: Any = None) -> dict[str, Any]:
    """Make the cohort into ``ctx.out_dir`` (see the module docstring); returns the summary of cohort_stats.json.

    ``acquisition``, ``test_acquisition``, ``template_acquisition``: the simulated CT acquisition of the
    subjects (see the module docstring and :func:`resolve_acquisitions`); off by default.

    Subjects already written by an interrupted attempt (their transform exists) are kept. Subject ``i`` depends
    only on ``(seed, i)``, the knobs and its role's acquisition, so the result does not depend on ``ctx.jobs``."""
    from preprocessing.cohort import CohortConfig, registration_pairs, subject_ids
    from preprocessing.datasets import (
        Dataset,
        Pair,
        Subject,
        field_relpath,
        image_relpath,
        labels_relpath,
        write_dataset_json,
    )
    from slicreg.errors import InputError
    from slicreg.io import atomic_write_bytes, atomic_write_json, load_volume, sha256_file
    from slicreg.labels import BTCV_LABELS

    started = time.perf_counter()
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}")
    config = CohortConfig.from_mapping({k: v for k, v in (knobs or {}).items() if v is not None})
    acquisitions = resolve_acquisitions(acquisition, test_acquisition, template_acquisition)
    acq_json = {role: json.dumps(a.to_dict()) if a.enabled else None for role, a in acquisitions.items()}
    ids = subject_ids(n_train, n_test)
    for path, what in ((image, "source image"), (labels, "source labels"), (tissue, "source tissue labels")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what}: {path}: file not found")
    # check the source once here, so that bad input fails before any worker starts
    _load_source(str(image), str(labels), str(tissue) if tissue else None, json.dumps(config.to_dict()))
    config_json = json.dumps(config.to_dict())
    template = ids["template"][0]
    n_slab = int(round(config.slab_fraction * len(ids["test"])))
    slabs = set(ids["test"][len(ids["test"]) - n_slab:]) if n_slab else set()
    roles = {template: "template", **{s: "train" for s in ids["training"]}, **{s: "test" for s in ids["test"]}}
    out = ctx.out_dir
    jobs = [{"index": i, "id": sid, "role": roles[sid], "slab": sid in slabs, "seed": seed, "image": str(image),
             "labels": str(labels), "tissue": str(tissue) if tissue else None, "config": config_json, "out": str(out),
             "acquisition": acq_json[roles[sid]]}
            for i, sid in enumerate(ids["template"] + ids["training"] + ids["test"])]

    summaries: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        done = ctx.done(transform_relpath(job["id"])) and ctx.done(image_relpath(job["id"])) and \
            ctx.done(labels_relpath(job["id"]))
        if done:
            summaries[job["id"]] = load_transform(out / transform_relpath(job["id"]))[1]["summary"]
        else:
            todo.append(job)
    if len(todo) < len(jobs):
        ctx.log(f"{len(jobs) - len(todo)} subjects already written by an earlier attempt; making {len(todo)}")
    t_subjects = time.perf_counter()
    for summary in ctx.map(make_subject_files, todo, "subjects"):
        summaries[summary["id"]] = summary
    t_subjects = time.perf_counter() - t_subjects

    pairs = registration_pairs(template, ids["test"])
    centres = {sid: s["info"].get("soft_tissue_centre_mm") for sid, s in summaries.items()}
    pair_jobs = [{"fixed": p["fixed"], "moving": p["moving"], "out": str(out), "centres": centres,
                  "ground_truth": bool(ground_truth_fields), "field": field_relpath(p["fixed"], p["moving"])}
                 for p in pairs]
    train_jobs = [{"fixed": s, "moving": template, "out": str(out), "centres": centres, "ground_truth": False,
                   "field": ""} for s in ids["training"]]
    t_pairs = time.perf_counter()
    pair_results = ctx.map(pair_files, pair_jobs + train_jobs,
                           "true fields and initial Dice" if ground_truth_fields else "initial Dice")
    t_pairs = time.perf_counter() - t_pairs
    listed, train_results = pair_results[:len(pair_jobs)], pair_results[len(pair_jobs):]

    subjects = {}
    for sid in ids["template"] + ids["training"] + ids["test"]:
        subjects[sid] = Subject(
            id=sid, image=Path(image_relpath(sid)), labels=Path(labels_relpath(sid)), role=roles[sid],
            tags=tuple(summaries[sid].get("tags", [])), files={"transform": Path(transform_relpath(sid))})
    dataset = Dataset(
        root=out, name="slicreg-cohort", subjects=subjects, template=template, training=list(ids["training"]),
        test=list(ids["test"]), labels=dict(BTCV_LABELS), description=DESCRIPTION,
        pairs=[Pair(p["fixed"], p["moving"], Path(p["field"]) if ground_truth_fields else None) for p in pair_jobs],
    )
    write_dataset_json(dataset, out)
    if licence is not None and Path(licence).is_file():
        atomic_write_bytes(ctx.path("LICENSE"), Path(licence).read_bytes())

    summary = _summarise(summaries, listed, train_results, ground_truth_fields)
    summary["seconds"] = {"total": round(time.perf_counter() - started, 1), "subjects": round(t_subjects, 1),
                          "pairs": round(t_pairs, 1), "jobs": ctx.jobs}
    src_vol = load_volume(image)
    # recorded only when used, so that a cohort without it has the same stats file as before the option existed
    acq_record = ({role: a.to_dict() for role, a in acquisitions.items()}
                  if any(a.enabled for a in acquisitions.values()) else None)
    atomic_write_json(ctx.path("cohort_stats.json"), {
        "format": "slicreg-cohort-stats/1", "seed": seed, "n_train": n_train, "n_test": n_test,
        "config": config.to_dict(), **({"acquisition": acq_record} if acq_record else {}),
        "ground_truth_fields": bool(ground_truth_fields),
        "source": {"image": str(image), "image_sha256": sha256_file(image), "labels": str(labels),
                   "labels_sha256": sha256_file(labels), "tissue": str(tissue) if tissue else None,
                   "shape": list(src_vol.shape), "spacing_mm": [round(float(v), 4) for v in src_vol.spacing_mm]},
        "summary": summary,
        "subjects": [summaries[j["id"]] for j in jobs],
        "pairs": listed, "training_to_template": train_results,
    })
    if montage:
        _write_montage(ctx, out, template, ids, slabs, summaries)
    _log_summary(ctx, summary, len(jobs), len(pairs))
    return summary


def _summarise(summaries: dict[str, dict[str, Any]], listed: list[dict[str, Any]],
               train_results: list[dict[str, Any]], gt: bool) -> dict[str, Any]:
    import numpy as np

    from slicreg.labels import BTCV_LABELS

    def organ_means(results: list[dict[str, Any]], key: str) -> dict[str, float | None]:
        return {str(k): _nanmean(r[key].get(str(k)) for r in results) for k in BTCV_LABELS}

    secs = [s["seconds"] for s in summaries.values() if "seconds" in s]
    cpu = [s["cpu_seconds"] for s in summaries.values() if "cpu_seconds" in s]
    out: dict[str, Any] = {
        "subjects": len(summaries),
        "seconds_per_subject": round(float(np.mean(secs)), 2) if secs else None,
        "cpu_seconds_per_subject": round(float(np.mean(cpu)), 2) if cpu else None,
        "initial_mean_dice_centre_aligned": _nanmean(r["initial_mean_dice_centre_aligned"] for r in listed),
        "initial_mean_dice_world": _nanmean(r["initial_mean_dice_world"] for r in listed),
        "initial_dice_centre_aligned_per_organ": organ_means(listed, "initial_dice_centre_aligned"),
        "initial_mean_dice_training_to_template": _nanmean(r["initial_mean_dice_centre_aligned"]
                                                           for r in train_results),
        "max_inverse_error_mm": max((s["info"]["inverse_error_max_mm"] for s in summaries.values()), default=None),
        "min_jacobian_det": min((s["info"]["min_jacobian_det"] for s in summaries.values()), default=None),
        "phases": {p: sum(1 for s in summaries.values() if s["info"]["phase"] == p)
                   for p in ("native", "arterial", "portal-venous")},
    }
    acq_cpu = [s["acquisition"]["cpu_seconds"] for s in summaries.values() if "cpu_seconds" in s.get("acquisition", {})]
    if acq_cpu:
        out["acquisition_subjects"] = len(acq_cpu)
        out["acquisition_cpu_seconds_per_subject"] = round(float(np.mean(acq_cpu)), 2)
    if gt:
        mins = [r["field_check_min_dice_large_organs"] for r in listed
                if r.get("field_check_min_dice_large_organs") is not None]
        out["field_check_min_dice_large_organs"] = min(mins) if mins else None
        out["field_check_mean_dice"] = _nanmean(_nanmean(r["field_check_dice"].values()) for r in listed)
        out["seconds_per_pair"] = round(float(np.mean([r["seconds"] for r in listed])), 2) if listed else None
        out["cpu_seconds_per_pair"] = round(float(np.mean([r["cpu_seconds"] for r in listed])), 2) if listed else None
    return out


def _write_montage(ctx: StageContext, out: Path, template: str, ids: dict[str, list[str]], slabs: set[str],
                   summaries: dict[str, dict[str, Any]]) -> None:
    from preprocessing.datasets import image_relpath, labels_relpath
    from slicreg.io import load_volume

    normal_tests = [s for s in ids["test"] if s not in slabs]
    chosen = [template] + ids["training"][:2] + normal_tests[:1] + sorted(slabs)[:1]
    panels = []
    for sid in chosen:
        info = summaries[sid]["info"]
        tags = summaries[sid].get("tags", [])
        title = f"{sid} ({summaries[sid]['role']}{', slab' if tags else ''})\n{info['phase']}, " \
                f"{info['fov_cc_mm']:.0f} mm cranio-caudal"
        acq = summaries[sid].get("acquisition")
        if acq:
            title += f"\nscan: {acq['kernel']}, I0 {acq['dose_photons']:.2g}"
        panels.append({"id": sid, "image": load_volume(out / image_relpath(sid)),
                       "labels": load_volume(out / labels_relpath(sid), kind="labels"), "title": title})
    save_montage(ctx.path("cohort_montage.png"), panels)


def _log_summary(ctx: StageContext, summary: dict[str, Any], n_subjects: int, n_pairs: int) -> None:
    ctx.log(f"{n_subjects} subjects in {summary['seconds']['subjects']:.0f} s ({summary['seconds_per_subject']} s, "
            f"{summary['cpu_seconds_per_subject']} CPU-s per subject in a worker), phases {summary['phases']}")
    ctx.log(f"initial mean Dice over organs, {n_pairs} listed pairs: {summary['initial_mean_dice_centre_aligned']} "
            f"with the scans' soft-tissue centres aligned (as the paper's crop does), "
            f"{summary['initial_mean_dice_world']} in world coordinates; training -> template "
            f"{summary['initial_mean_dice_training_to_template']}")
    ctx.log(f"deformations: smallest Jacobian determinant {summary['min_jacobian_det']}, "
            f"largest inverse error {summary['max_inverse_error_mm']} mm")
    if "acquisition_cpu_seconds_per_subject" in summary:
        ctx.log(f"simulated acquisition on {summary['acquisition_subjects']} subjects: "
                f"{summary['acquisition_cpu_seconds_per_subject']} CPU-s per subject (included above)")
    if "field_check_min_dice_large_organs" in summary:
        ctx.log(f"true fields: warped moving labels vs fixed labels, smallest Dice of an organ > {LARGE_ORGAN_ML:.0f} "
                f"mL {summary['field_check_min_dice_large_organs']}, mean Dice {summary['field_check_mean_dice']} "
                f"({summary['seconds_per_pair']} s, {summary['cpu_seconds_per_pair']} CPU-s per pair)")


# --------------------------------------------------------------------------------------------------- stage
@stage("cohort", version="1", params=COHORT_PARAMS, inputs={"source": True})
def cohort_stage(ctx: StageContext) -> None:
    """Make the synthetic labelled cohort (template + training + test subjects, true fields) from the example CT."""
    from slicreg.errors import ConfigError

    folder = Path(ctx.inputs["source"])
    image, labels, tissue = folder / SOURCE_IMAGE, folder / SOURCE_LABELS, folder / SOURCE_TISSUE
    for path in (image, labels):
        if not path.is_file():
            raise ConfigError(f"stage {ctx.stage_id!r}: input 'source' ({folder}) has no {path.name}; expected the "
                              f"output of the fetch-example stage")
    p = ctx.params
    write_cohort(ctx, image=image, labels=labels, tissue=tissue if tissue.is_file() else None,
                 n_train=p["n_train"], n_test=p["n_test"], seed=p["seed"],
                 ground_truth_fields=bool(p["ground_truth_fields"]), montage=bool(p["montage"]),
                 knobs={k: p[k] for k in KNOBS}, licence=folder / "LICENSE",
                 **{k: p[k] for k in ACQUISITION_PARAMS})
