"""The ``supervoxels`` stage: the template's SLIC supervoxel layers (docs/method.md, section 3).

Input ``dataset``: a preprocessed dataset folder (docs/CONTRACTS.md); its ``template`` subject is used. Outputs
(docs/CONTRACTS.md)::

    supervoxels.nii.gz   uint8, stored (96, 80, 128, 16), values 0..127, affine downsample_affine(template, 2)
    supervoxels.json     template sha256, mask, parameters, library versions, per-layer statistics
    supervoxels.png      three layers' boundaries over the template, axial and coronal

Parameters: ``mask`` = ``"organs"`` (distance to the template's organ labels < ``distance_vox`` voxels, the
reference's mask; needs template labels) or ``"body"`` (:func:`slicreg.supervoxels.body_mask`: HU >
``body_threshold_hu``, default -400, largest component, holes filled; no labels needed); ``layers``,
``n_supervoxels``, ``n_segments``, ``compactness`` (``None`` = the library default), ``max_num_iter``,
``min_size_factor``, ``affine_sigma``, ``seed`` (``None`` = the pipeline seed). Layers run on ``--jobs``
processes; the result does not depend on that number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def template_files(folder: Path) -> tuple[str, Path, Path | None]:
    """``(template id, image path, labels path or None)`` of a dataset folder (docs/CONTRACTS.md).

    Uses ``preprocessing.datasets.load_dataset`` when it exists and returns what the contract describes (a mapping
    or an object with ``template`` and ``subjects``); otherwise reads ``dataset.json`` itself."""
    from slicreg.errors import InputError
    from slicreg.io import read_json

    folder = Path(folder)
    where = folder / "dataset.json"
    doc: Any = None
    try:
        from preprocessing.datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        loaded = load_dataset(folder)
        subjects = _field(loaded, "subjects")
        if isinstance(_field(loaded, "template"), str) and hasattr(subjects, "get"):
            doc = loaded
    if doc is None:
        doc = read_json(where)
    template, subjects = _field(doc, "template"), _field(doc, "subjects")
    if not isinstance(template, str) or not hasattr(subjects, "get"):
        raise InputError(f"{where}: expected 'template' (a subject id) and 'subjects' (id -> entry); "
                         "see docs/CONTRACTS.md")
    entry = subjects.get(template)
    image = _field(entry, "image") if entry is not None else None
    if image is None:
        raise InputError(f"{where}: the template {template!r} has no subject entry with an 'image'")
    labels = _field(entry, "labels")

    def resolve(p: Any) -> Path:
        p = Path(p)
        return p if p.is_absolute() else folder / p

    return template, resolve(image), resolve(labels) if labels else None


@stage(
    "supervoxels",
    version="1",
    params={
        "mask": "organs", "distance_vox": 30.0, "body_threshold_hu": -400.0, "layers": 16, "n_supervoxels": 127,
        "n_segments": 208, "compactness": None, "max_num_iter": 5, "min_size_factor": 0.85, "affine_sigma": 0.05,
        "seed": None,
    },
    inputs={"dataset": True},
)
def supervoxels_stage(ctx: StageContext) -> None:
    """Template supervoxels: 16 SLIC layers of exactly 127 + background at 4 mm, with statistics and a figure."""
    from pipelines.commands.supervoxels import write_supervoxels
    from slicreg.errors import ConfigError
    from slicreg.supervoxels import DEFAULT_COMPACTNESS

    p = ctx.params
    where = f"[stages.{ctx.stage_id}]"
    if p["mask"] not in ("organs", "body"):
        raise ConfigError(f"{where} mask = {p['mask']!r}: expected 'organs' or 'body'")
    template, image, labels = template_files(Path(ctx.inputs["dataset"]))
    if p["mask"] == "organs" and labels is None:
        raise ConfigError(f"{where} mask = 'organs' needs organ labels for the template {template!r}, and the dataset "
                          "has none; set mask = \"body\"")
    options = {
        "n_layers": int(p["layers"]), "n_supervoxels": int(p["n_supervoxels"]), "n_segments": int(p["n_segments"]),
        "compactness": DEFAULT_COMPACTNESS if p["compactness"] is None else float(p["compactness"]),
        "max_num_iter": int(p["max_num_iter"]), "min_size_factor": float(p["min_size_factor"]),
        "affine_sigma": float(p["affine_sigma"]), "seed": int(ctx.seed if p["seed"] is None else p["seed"]),
    }
    # per-layer resume: each finished layer is kept in the partial folder; an interrupted run continues from them
    # (a layer depends only on its own seed, so the result is bit-identical to an uninterrupted run)
    options["done_layers"] = _finished_layers(ctx, options["n_layers"])
    options["on_layer"] = lambda i, labels, info: _keep_layer(ctx, i, labels, info)
    if options["done_layers"]:
        ctx.log(f"resuming: {len(options['done_layers'])} of {options['n_layers']} layers were finished before")
    bar = ctx.progress(range(options["n_layers"]), "layers")
    it = iter(bar)

    def progress(done: int) -> None:
        next(it, None)

    sidecar = write_supervoxels(
        image, labels if p["mask"] == "organs" else None, ctx.path("supervoxels.nii.gz"), mask_kind=p["mask"],
        distance_vox=float(p["distance_vox"]), body_threshold_hu=float(p["body_threshold_hu"]), options=options,
        jobs=ctx.jobs, progress=progress, log=ctx.log)
    close = getattr(bar, "close", None)
    if close is not None:
        close()
    import shutil

    shutil.rmtree(ctx.path(LAYER_DIR), ignore_errors=True)  # the finished layers are in supervoxels.nii.gz now
    ctx.log(f"template {template}: mask {p['mask']} ({sidecar['mask']['voxels']} voxels)")


LAYER_DIR = "layers.partial"
"""Per-layer results of an unfinished stage (inside its partial folder), removed when the stage completes."""


def _keep_layer(ctx: StageContext, index: int, labels: Any, info: dict[str, Any]) -> None:
    import io

    import numpy as np

    from slicreg.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, labels=np.asarray(labels, dtype=np.uint8), info=np.array(json.dumps(info, default=_plain)))
    atomic_write_bytes(ctx.path(f"{LAYER_DIR}/layer_{index:03d}.npz"), buf.getvalue())


def _finished_layers(ctx: StageContext, n_layers: int) -> dict[int, tuple[Any, dict[str, Any]]]:
    import numpy as np

    done = {}
    for i in range(n_layers):
        rel = f"{LAYER_DIR}/layer_{i:03d}.npz"
        if ctx.done(rel):
            try:
                with np.load(ctx.path(rel)) as z:
                    done[i] = (z["labels"], json.loads(str(z["info"])))
            except (OSError, ValueError, KeyError):  # damaged: compute the layer again
                continue
    return done


def _plain(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
