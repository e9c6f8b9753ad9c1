"""Data stages: ``fetch-example``, ``dataset`` and ``preprocess``.

- ``fetch-example`` (no inputs; params ``dest``, ``sdist``): the real example CT (see
  :mod:`preprocessing.example`), copied from the user's cache into the stage folder: ``example_ct.nii.gz``,
  ``example_labels_btcv.nii.gz``, ``example_labels_totalseg.nii.gz``, ``LICENSE``, ``provenance.json``.
- ``dataset`` (no inputs; params ``layout`` = slicreg | btcv | learn2reg | auto, ``folder``, ``template``,
  ``partial``): reads and validates a user's dataset folder and writes ``dataset.json`` with absolute paths, so
  every later stage reads one format. ``partial = true`` accepts a BTCV / Learn2Reg folder holding only some of
  the scans its split or json lists (inference on the scans a user has); the absent ones are logged.
- ``preprocess`` (input ``dataset``: a dataset folder; params ``spacing_mm``, ``shape``, ``force``,
  ``antialias``): the SLIC-Reg preprocessing of every subject (:func:`slicreg.geometry.preprocess_volume`)
  into ``imagesTr/``, ``labelsTr/``, ``crops/<id>.json``; ground-truth fields of the input are re-expressed on
  the preprocessed grids (``ground_truth_fields/``); ``dataset.json`` lists it all (docs/CONTRACTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage

PREPROCESS_DEFAULTS = {"spacing_mm": 2.0, "shape": [192, 160, 256], "force": False, "antialias": True}


# ------------------------------------------------------------------------------------------- fetch-example
@stage("fetch-example", version="1", params={"dest": None, "sdist": None}, path_params=("sdist",))
def fetch_example_stage(ctx: StageContext) -> None:
    """The real example CT (TotalSegmentator 2.18.0 sdist, Apache-2.0) with BTCV labels, from the user's cache."""
    from preprocessing.example import fetch_example
    from slicreg.io import atomic_write_bytes, read_json

    files = fetch_example(ctx.params["dest"], sdist=ctx.params["sdist"])
    for src in files.all():
        atomic_write_bytes(ctx.path(src.name), src.read_bytes())
    prov = read_json(files.provenance)
    present = prov["labels"]["btcv_present"]
    ctx.log(f"example CT {prov['image']['shape']} at {prov['image']['spacing_mm']} mm from {prov['source']['file']} "
            f"(cache {files.folder}); {len(present)} of 13 BTCV organs present; labels are TotalSegmentator "
            f"output (silver standard), licence Apache-2.0")


# ------------------------------------------------------------------------------------------------- dataset
@stage("dataset", version="1", params={"layout": "slicreg", "folder": None, "template": None, "partial": False},
       path_params=("folder",), param_types={"template": (str, int)})
def dataset_stage(ctx: StageContext) -> None:
    """Read and validate a dataset folder (slicreg / btcv / learn2reg layout); write dataset.json (absolute paths)."""
    from preprocessing.datasets import load_dataset, write_dataset_json
    from slicreg.errors import ConfigError

    folder = ctx.params["folder"]
    if folder is None:
        raise ConfigError(f"stage {ctx.stage_id!r}: parameter 'folder' is required (the dataset folder)")
    if not isinstance(ctx.params["partial"], bool):
        raise ConfigError(f"[stages.{ctx.stage_id}] partial = {ctx.params['partial']!r}: expected true or false")
    template = ctx.params["template"]
    dataset = load_dataset(Path(str(folder)).expanduser(), layout=ctx.params["layout"],
                           template=None if template is None else str(template), partial=ctx.params["partial"])
    write_dataset_json(dataset, ctx.out_dir, absolute=True)
    for note in dataset.notes:
        ctx.log(note)
    ctx.log(f"{dataset.layout} dataset {dataset.name!r}: {len(dataset.subjects)} subjects, template "
            f"{dataset.template}, {len(dataset.training)} training, {len(dataset.test)} test, "
            f"{len(dataset.pairs)} pairs ({len(dataset.ground_truth_fields)} with a true field)")


# ---------------------------------------------------------------------------------------------- preprocess
def preprocess_subject_files(item: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one subject from files to files (module level, so ``ctx.map`` can run it in a worker).

    ``item`` keys: ``id``, ``image``, ``labels`` (or None), ``out_image``, ``out_labels``, ``out_crop`` (paths as
    strings), ``spacing_mm``, ``shape``, ``force``, ``antialias``. The crop record is written last, so its
    existence means the subject is complete. Returns a small summary (id, seconds, padded/dropped voxels)."""
    import numpy as np

    from slicreg.geometry import preprocess_volume
    from slicreg.io import atomic_write_json, load_image, load_labels, save_volume

    started = time.perf_counter()
    image = load_image(item["image"])
    labels = load_labels(item["labels"]) if item.get("labels") else None
    result = preprocess_volume(image, labels, spacing_mm=float(item["spacing_mm"]), crop_shape=item["shape"],
                               force=bool(item["force"]), antialias=bool(item["antialias"]), name=item["image"])
    save_volume(result.image, item["out_image"], dtype=np.int16)
    if result.labels is not None:
        lab = result.labels.array
        dtype = np.uint8 if lab.size == 0 or (lab.min() >= 0 and lab.max() <= 255) else None
        save_volume(result.labels, item["out_labels"], dtype=dtype)
    doc = result.record.to_json()
    doc["source"] = _source_of(item)
    doc["parameters"] = _parameters_of(item)
    atomic_write_json(item["out_crop"], doc)
    return {"id": item["id"], "seconds": round(time.perf_counter() - started, 3),
            "padded_vox": doc["padded_vox"], "dropped_vox": doc["dropped_vox"], "ct_check": doc["ct_check"]}


def _source_of(item: dict[str, Any]) -> dict[str, str]:
    source = {"image": str(Path(item["image"]).absolute())}
    if item.get("labels"):
        source["labels"] = str(Path(item["labels"]).absolute())
    return source


def _parameters_of(item: dict[str, Any]) -> dict[str, Any]:
    return {"spacing_mm": float(item["spacing_mm"]), "shape": [int(v) for v in item["shape"]],
            "force": bool(item["force"]), "antialias": bool(item["antialias"])}


def preprocessed_already(item: dict[str, Any]) -> bool:
    """True when a subject's outputs (``item`` as for :func:`preprocess_subject_files`) were written by an earlier
    run from the same source files with the same parameters, and are newer than those files.

    The crop record, written last, says which sources and parameters made them; a record without parameters (an
    older slicreg), a changed source path or parameter, a missing output or a source modified since means the
    subject is preprocessed again."""
    from slicreg.errors import InputError
    from slicreg.io import read_json

    crop = Path(item["out_crop"])
    if not crop.is_file():
        return False
    try:
        doc = read_json(crop)
    except (InputError, OSError):
        return False
    if not isinstance(doc, dict) or doc.get("source") != _source_of(item) \
            or doc.get("parameters") != _parameters_of(item):
        return False
    outputs = [Path(item["out_image"])] + ([Path(item["out_labels"])] if item.get("labels") else [])
    sources = [Path(item["image"])] + ([Path(item["labels"])] if item.get("labels") else [])
    if not all(p.is_file() for p in outputs):
        return False
    written = min(p.stat().st_mtime for p in [crop, *outputs])
    return written >= max(p.stat().st_mtime for p in sources)


def reexpress_field_files(item: dict[str, Any]) -> dict[str, Any]:
    """Re-express one ground-truth field on the preprocessed grids (module level, for ``ctx.map``).

    ``item`` keys: ``field`` (input NIfTI (X, Y, Z, 3) on the fixed subject's original grid), ``fixed_crop``,
    ``moving_crop`` (crop-record JSON paths), ``out`` (output path)."""
    import numpy as np

    from slicreg.errors import InputError
    from slicreg.geometry import CropRecord, field_to_preprocessed_grid
    from slicreg.io import load_field, read_json, save_field

    fixed = CropRecord.from_json(read_json(item["fixed_crop"]), name=item["fixed_crop"])
    moving = CropRecord.from_json(read_json(item["moving_crop"]), name=item["moving_crop"])
    field = load_field(item["field"])
    if field.shape != fixed.original_shape:
        raise InputError(f"{item['field']}: field grid {field.shape} is not the fixed image's grid "
                         f"{fixed.original_shape}")
    if not np.allclose(field.affine, fixed.original_affine, atol=1e-2):
        raise InputError(f"{item['field']}: the field's affine differs from the fixed image's affine; expected a "
                         f"field on the fixed image's grid")
    disp = field_to_preprocessed_grid(field.array, fixed, moving)
    save_field(disp, fixed.affine, item["out"])
    return {"out": item["out"], "max_abs_vox": float(np.abs(disp).max())}


def preprocess_dataset(dataset: Any, out_dir: Path, *, spacing_mm: float = 2.0,
                       shape: Sequence[int] = (192, 160, 256), force: bool = False, antialias: bool = True,
                       mapper: Callable[[Callable, list, str], list] | None = None,
                       done: Callable[[str], bool] | None = None, reuse: bool = False,
                       log: Callable[[str], None] = print) -> Any:
    """Preprocess every subject of ``dataset`` into the dataset folder ``out_dir``; returns the new Dataset.

    Args:
        dataset: a :class:`preprocessing.datasets.Dataset` (validated).
        out_dir: output folder (``imagesTr/``, ``labelsTr/``, ``crops/``, ``ground_truth_fields/``,
            ``dataset.json``).
        spacing_mm, shape, force, antialias: see :func:`slicreg.geometry.preprocess_volume`.
        mapper: ``mapper(fn, items, desc) -> results`` (a stage passes ``ctx.map``); default a plain loop.
        done: ``done(relative_path) -> bool``: outputs already complete (a stage passes ``ctx.done``).
        reuse: also keep the subjects an earlier run into ``out_dir`` preprocessed from the same files with the
            same parameters (:func:`preprocessed_already`), and the ground-truth fields re-expressed between two
            such subjects (``slicreg preprocess --dataset`` run again).
        log: where summary lines go.
    """
    from dataclasses import replace

    from preprocessing.datasets import (
        Dataset,
        Pair,
        Subject,
        field_relpath,
        image_relpath,
        labels_relpath,
        write_dataset_json,
    )
    from slicreg.io import read_json

    out_dir = Path(out_dir)
    mapper = mapper or (lambda fn, items, desc: [fn(x) for x in items])
    done = done or (lambda rel: (out_dir / rel).exists())
    shape = [int(s) for s in shape]
    todo, skipped = [], []
    for sid, s in dataset.subjects.items():
        item = {
            "id": sid, "image": str(dataset.path(s.image)),
            "labels": str(dataset.path(s.labels)) if s.labels is not None else None,
            "out_image": str(out_dir / image_relpath(sid)), "out_labels": str(out_dir / labels_relpath(sid)),
            "out_crop": str(out_dir / f"crops/{sid}.json"), "spacing_mm": float(spacing_mm), "shape": shape,
            "force": bool(force), "antialias": bool(antialias),
        }
        (out_dir / "crops").mkdir(parents=True, exist_ok=True)
        kept = done(f"crops/{sid}.json") or (reuse and preprocessed_already(item))
        (skipped if kept else todo).append(item)
    results = mapper(preprocess_subject_files, todo, "preprocess") if todo else []
    if skipped:
        log(f"{len(skipped)} subject(s) already preprocessed (an earlier or interrupted run, same source files and "
            f"parameters): kept")
    for r in results:
        if r["ct_check"]:
            log(f"{r['id']}: preprocessed with force although {r['ct_check']}")
        if any(a or b for a, b in r["dropped_vox"]):
            log(f"{r['id']}: field of view larger than the crop; cut voxels (before, after) per axis: "
                f"{r['dropped_vox']}")
    if results:
        secs = [r["seconds"] for r in results]
        log(f"preprocessed {len(results)} subject(s): {sum(secs) / len(secs):.2f} s per subject "
            f"(max {max(secs):.2f} s)")

    field_items = []
    for p in dataset.pairs:
        if p.ground_truth_field is None:
            continue
        rel = field_relpath(p.fixed, p.moving)
        redone = {item["id"] for item in todo}
        if done(rel) or (reuse and p.fixed not in redone and p.moving not in redone and (out_dir / rel).is_file()
                         and (out_dir / rel).stat().st_mtime >= dataset.path(p.ground_truth_field).stat().st_mtime):
            continue
        field_items.append({"field": str(dataset.path(p.ground_truth_field)),
                            "fixed_crop": str(out_dir / f"crops/{p.fixed}.json"),
                            "moving_crop": str(out_dir / f"crops/{p.moving}.json"), "out": str(out_dir / rel)})
    if field_items:
        mapper(reexpress_field_files, field_items, "ground-truth fields")
        log(f"re-expressed {len(field_items)} ground-truth field(s) on the preprocessed grids")

    subjects = {}
    for sid, s in dataset.subjects.items():
        crop = read_json(out_dir / f"crops/{sid}.json")
        files = {k: dataset.path(v).absolute() for k, v in s.files.items() if k != "crop"}
        files["crop"] = Path(f"crops/{sid}.json")
        extra = dict(s.extra)
        extra["original"] = crop["source"]
        subjects[sid] = Subject(sid, Path(image_relpath(sid)),
                                Path(labels_relpath(sid)) if s.labels is not None else None, s.role, s.tags,
                                files, extra)
    pairs = [Pair(p.fixed, p.moving, Path(field_relpath(p.fixed, p.moving)) if p.ground_truth_field else None,
                  dict(p.extra)) for p in dataset.pairs]
    extra = dict(dataset.extra)
    extra["preprocessing"] = {"spacing_mm": float(spacing_mm), "shape": shape, "force": bool(force),
                              "antialias": bool(antialias), "padding_hu": -1000, "orientation": "RAS",
                              "source_dataset": str(dataset.root)}
    new = replace(dataset, root=out_dir, subjects=subjects, pairs=pairs, extra=extra, layout="slicreg", notes=[])
    assert isinstance(new, Dataset)
    write_dataset_json(new, out_dir)
    return new


@stage("preprocess", version="1", params=dict(PREPROCESS_DEFAULTS), inputs={"dataset": True})
def preprocess_stage(ctx: StageContext) -> None:
    """SLIC-Reg preprocessing of a dataset: RAS, 2 mm, 192x160x256 around the soft-tissue centre; fields follow."""
    from preprocessing.datasets import load_dataset

    dataset = load_dataset(ctx.inputs["dataset"], layout="slicreg")
    p = ctx.params
    new = preprocess_dataset(dataset, ctx.out_dir, spacing_mm=p["spacing_mm"], shape=p["shape"], force=p["force"],
                             antialias=p["antialias"], mapper=ctx.map, done=ctx.done, log=ctx.log)
    ctx.log(f"{len(new.subjects)} subjects at {p['spacing_mm']} mm, shape {list(p['shape'])}; "
            f"{len(new.ground_truth_fields)} ground-truth fields")
