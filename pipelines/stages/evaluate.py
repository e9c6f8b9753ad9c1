"""The ``evaluate`` stage: score every registration pair of a run and write the report.

Inputs
    ``dataset`` (required): a dataset folder (docs/CONTRACTS.md; read with
    :func:`preprocessing.datasets.load_dataset`); its ``registration_pairs`` are scored, fixed <- moving.
    ``methods`` (optional): one or a list of registration-result folders, each with ``registrations.json``
    (``{"method": name, "pairs": [{"fixed", "moving", "field", "runtime_s"}]}``, fields relative to the folder,
    on the fixed subject's grid). Without it only the unregistered pairs ("initial") are scored.

Parameters
    ``labels`` (default 1..13), ``figure_pair`` (index into the dataset's pairs for the overlay and Jacobian
    figures, default 0), ``hd95`` (default true), ``body_threshold_hu`` (the field-error mask is the fixed
    scan's body, :func:`slicreg.supervoxels.body_mask`, default -400 HU), ``fov_only`` (default true: Dice and
    HD95 inside the fixed scan's field of view when the dataset has its crop record -- the warped moving labels
    outside it are cleared: there the fixed scan has no data, so its labels are unknown, not background; a slab
    of 40 mm would otherwise count every organ the field carries beyond the slab as a false positive), ``title``,
    ``paper_table`` (default false: add the SLIC-Reg paper's Table 1 layout with its published BTCV rows,
    :func:`slicreg.report.paper_table`).

Outputs (in the stage folder)
    ``report/index.md`` -- the page: summary (initial vs each method: Dice, HD95, Jacobian, field error,
    runtime; mean ± std and 30th percentile), per-organ tables, per-pair table, figures;
    ``report/metrics.json`` (every score, NaN/inf as null), ``report/metrics.csv`` (one row per method and
    pair), ``report/figures/*.png``; ``pairs/<method>/<fixed>__<moving>.json`` (per-pair scores, kept so that an
    interrupted run resumes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.runner import StageContext, stage

INITIAL = "initial"


def _safe(name: str) -> str:
    """A method name usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read_methods(folders: list[Path]) -> list[dict[str, Any]]:
    """Parse each method folder's registrations.json -> ``{"name", "folder", "pairs": {(fixed, moving): entry}}``."""
    from slicreg.errors import InputError
    from slicreg.io import read_json

    methods: list[dict[str, Any]] = []
    names: set[str] = {INITIAL}
    for folder in folders:
        path = Path(folder) / "registrations.json"
        doc = read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("pairs"), list):
            raise InputError(f"{path}: expected {{\"method\": name, \"pairs\": [{{fixed, moving, field, "
                             f"runtime_s}}]}} (docs/CONTRACTS.md)")
        name = str(doc.get("method") or Path(folder).parent.name)
        base, n = name, 2
        while name in names:  # two folders of one method (e.g. two settings): keep both, distinguishable
            name = f"{base}-{n}"
            n += 1
        names.add(name)
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for i, entry in enumerate(doc["pairs"]):
            keys = ("fixed", "moving", "field")
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in keys):
                raise InputError(f"{path}: pairs[{i}]: expected {{\"fixed\": id, \"moving\": id, \"field\": path}}, "
                                 f"got {entry!r}")
            field = Path(entry["field"])
            field = field if field.is_absolute() else Path(folder) / field
            runtime = entry.get("runtime_s")
            pairs[(entry["fixed"], entry["moving"])] = {
                "field": str(field), "runtime_s": float(runtime) if isinstance(runtime, (int, float)) else None}
        methods.append({"name": name, "folder": str(folder), "pairs": pairs})
    return methods


def score_pair_files(item: dict[str, Any]) -> dict[str, Any]:
    """Score one (method, pair) from files (module level, so ``ctx.map`` can run it in a worker process).

    ``item``: ``method``, ``fixed``, ``moving`` (ids), ``fixed_labels``, ``moving_labels``, ``field`` (or None),
    ``gt_field`` (or None), ``fixed_image`` (for the body mask, or None), ``labels``, ``hd95``,
    ``body_threshold_hu``, ``runtime_s``, ``cache`` (per-pair JSON path, or None: no cache), ``fixed_crop`` (the
    fixed crop record, or None: Dice and HD95 on the whole grid). Also what ``benchmarks/peers.py`` scores with.
    Returns the
    :func:`slicreg.metrics.evaluate_pair` dict with ``method``, ``fixed``, ``moving``, ``runtime_s`` added."""
    import json

    import numpy as np

    from slicreg.io import atomic_write_text, load_field, load_image, load_labels
    from slicreg.metrics import evaluate_pair, warp_labels_learn2reg
    from slicreg.supervoxels import body_mask

    cache = None if item.get("cache") is None else Path(item["cache"])
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    fixed = load_labels(item["fixed_labels"])
    moving = load_labels(item["moving_labels"])
    disp = None
    if item["field"] is not None:
        disp = load_field(item["field"], fixed=fixed).array.astype(np.float64)
        warped = warp_labels_learn2reg(moving.array, disp)
    else:
        if moving.shape != fixed.shape:
            from slicreg.errors import InputError

            raise InputError(f"pair {item['fixed']} <- {item['moving']}: label grids {fixed.shape} and "
                             f"{moving.shape} differ; the unregistered pair needs one shape")
        warped = moving.array
    fov = None
    if item.get("fixed_crop"):  # score inside the fixed field of view only (see the module docstring, fov_only)
        from slicreg.geometry import load_fov_mask

        fov = load_fov_mask(item["fixed_crop"], fixed.shape, f"fixed crop record of {item['fixed']}")
    truth = mask = None
    if item["gt_field"] is not None:
        truth = load_field(item["gt_field"], fixed=fixed).array
        if item["fixed_image"] is not None:
            mask = body_mask(load_image(item["fixed_image"]).array, threshold=float(item["body_threshold_hu"]))
    result = evaluate_pair(fixed.array, moving.array, warped, disp_vox=disp, labels=item["labels"],
                           affine=fixed.affine, true_disp_vox=truth, error_mask=mask, hd95=bool(item["hd95"]),
                           fov_mask=fov)
    result = {"method": item["method"], "fixed": item["fixed"], "moving": item["moving"],
              "runtime_s": item["runtime_s"], "field": item["field"], **result}
    if cache is not None:
        atomic_write_text(cache, json.dumps(result, allow_nan=True))  # internal file: NaN / Infinity kept exactly
    return result


def _figures(ctx: StageContext, dataset: Any, pair: Any, methods: list[dict[str, Any]],
             results: list[dict[str, Any]], labels: list[int], names: dict[int, str]) -> dict[str, str]:
    """Write the PNG figures; returns caption -> path relative to report/."""
    import numpy as np

    from slicreg.fields import warp_image
    from slicreg.io import atomic_write_bytes, load_field, load_image, load_labels
    from slicreg.metrics import jacobian_determinant, warp_labels_learn2reg
    from slicreg.report import choose_slices, dice_boxplot, figure_png, jacobian_panel, overlay_panel

    figures: dict[str, str] = {}
    order = [INITIAL] + [m["name"] for m in methods]
    dice = {}
    for name in order:
        rows = [[r["per_label"][str(lab)]["dice_learn2reg"] for lab in labels] for r in results if r["method"] == name]
        if rows:
            dice[name] = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    if dice:
        atomic_write_bytes(ctx.path("report/figures/dice_boxplot.png"),
                           figure_png(dice_boxplot(dice, labels, names)))
        figures["Dice per organ and method (Learn2Reg definition, one point per pair)"] = "figures/dice_boxplot.png"
    if pair is None:
        return figures
    fs, ms = dataset.subject(pair.fixed), dataset.subject(pair.moving)
    fixed_img = load_image(fs.image)
    moving_img = load_image(ms.image)
    fixed_lab = load_labels(fs.labels).array if fs.labels else None
    moving_lab = load_labels(ms.labels).array if ms.labels else None
    slices = choose_slices(fixed_lab, fixed_img.shape)
    images, labs, titles = [fixed_img.array], [fixed_lab], [f"fixed {pair.fixed}"]
    if moving_img.shape == fixed_img.shape:
        images.append(moving_img.array)
        labs.append(moving_lab)
        titles.append(f"moving {pair.moving} (initial)")
    dets = {}
    for m in methods:
        entry = m["pairs"].get((pair.fixed, pair.moving))
        if entry is None:
            continue
        disp = load_field(entry["field"], fixed=fixed_img).array
        images.append(warp_image(moving_img.array, disp))
        labs.append(warp_labels_learn2reg(moving_lab, disp) if moving_lab is not None else None)
        titles.append(f"warped by {m['name']}")
        dets[m["name"]] = jacobian_determinant(disp)
    fig = overlay_panel(images, labs, titles, affine=fixed_img.affine, slices=slices,
                        reference_on=list(range(1, len(images))))
    atomic_write_bytes(ctx.path("report/figures/overlay.png"), figure_png(fig, dpi=90))
    figures["pair:fixed, moving and warped moving (outlines: each column's labels; white: the fixed labels)"] = \
        "figures/overlay.png"
    for name, det in dets.items():
        rel = f"figures/jacobian_{_safe(name)}.png"
        atomic_write_bytes(ctx.path(f"report/{rel}"),
                           figure_png(jacobian_panel(det, affine=fixed_img.affine, slices=slices,
                                                     title=f"det J, {name}"), dpi=90))
        figures[f"pair:Jacobian determinant of {name}'s field"] = rel
    return figures


PAIR_CHOICES = ("all", "atlas", "methods")


def _select_pairs(dataset: Any, methods: list[dict[str, Any]], choice: str, stage_id: str) -> list[Any]:
    """The dataset pairs to score: ``all``; ``atlas`` (moving = the template); ``methods`` (pairs that every
    method registered, so that all rows of the report average over the same pairs)."""
    from slicreg.errors import ConfigError

    if choice == "all":
        return list(dataset.pairs)
    if choice == "atlas":
        return [p for p in dataset.pairs if p.moving == dataset.template]
    if choice == "methods":
        return [p for p in dataset.pairs if all((p.fixed, p.moving) in m["pairs"] for m in methods)]
    raise ConfigError(f"stage {stage_id!r}: pairs must be one of {PAIR_CHOICES}, got {choice!r}")


@stage(
    "evaluate",
    version="2",
    params={"labels": list(range(1, 14)), "figure_pair": 0, "hd95": True, "body_threshold_hu": -400.0,
            "fov_only": True, "title": None, "pairs": "all", "paper_table": False},
    inputs={"dataset": True, "methods": False},
)
def evaluate_stage(ctx: StageContext) -> None:
    """Score every registration pair (initial + each method): Dice, HD95, Jacobian, field error; report + figures."""
    from preprocessing.datasets import load_dataset
    from slicreg.errors import ConfigError
    from slicreg.io import atomic_write_json, atomic_write_text
    from slicreg.report import aggregate_results, csv_text, flatten_result, json_ready, render_index

    labels = [int(v) for v in ctx.params["labels"]]
    if not labels or min(labels) < 1:
        raise ConfigError(f"stage {ctx.stage_id!r}: labels must be ids >= 1, got {ctx.params['labels']!r}")
    dataset = load_dataset(ctx.inputs["dataset"])
    if not dataset.pairs:
        raise ConfigError(f"stage {ctx.stage_id!r}: dataset {dataset.root} lists no registration_pairs to evaluate")
    raw = ctx.inputs.get("methods")
    folders = [] if raw is None else [Path(p) for p in (raw if isinstance(raw, list) else [raw])]
    methods = _read_methods(folders)
    names = {int(k): v for k, v in dataset.labels.items()}
    notes: list[str] = []

    items: list[dict[str, Any]] = []
    scored_pairs = []
    dataset_pairs = {(p.fixed, p.moving) for p in dataset.pairs}
    selected = _select_pairs(dataset, methods, str(ctx.params["pairs"]), ctx.stage_id)
    missing: dict[str, int] = {}
    for pair in selected:
        fs, ms = dataset.subject(pair.fixed), dataset.subject(pair.moving)
        if fs.labels is None or ms.labels is None:
            notes.append(f"pair {pair.fixed} <- {pair.moving} skipped: "
                         f"{pair.fixed if fs.labels is None else pair.moving} has no label map")
            continue
        scored_pairs.append(pair)
        gt = str(dataset.path(pair.ground_truth_field)) if pair.ground_truth_field is not None else None
        common = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": str(fs.labels),
                  "moving_labels": str(ms.labels), "gt_field": gt, "fixed_image": str(fs.image),
                  "labels": labels, "hd95": bool(ctx.params["hd95"]),
                  "body_threshold_hu": float(ctx.params["body_threshold_hu"]),
                  "fixed_crop": str(dataset.path(fs.files["crop"])) if ctx.params["fov_only"] and fs.files.get("crop")
                  else None}
        items.append({**common, "method": INITIAL, "field": None, "runtime_s": None,
                      "cache": str(ctx.path(f"pairs/{INITIAL}/{pair.fixed}__{pair.moving}.json"))})
        for m in methods:
            entry = m["pairs"].get((pair.fixed, pair.moving))
            if entry is None:
                missing[m["name"]] = missing.get(m["name"], 0) + 1
                continue
            items.append({**common, "method": m["name"], "field": entry["field"], "runtime_s": entry["runtime_s"],
                          "cache": str(ctx.path(f"pairs/{_safe(m['name'])}/{pair.fixed}__{pair.moving}.json"))})
    for name, n in missing.items():
        notes.append(f"method {name} has no field for {n} of the {len(selected)} evaluated pairs "
                     f"(only 'initial' is scored there)")
    for m in methods:
        extra = sorted(set(m["pairs"]) - dataset_pairs)
        if extra:
            notes.append(f"method {m['name']}: {len(extra)} pair(s) not in the dataset's registration_pairs "
                         f"were ignored (e.g. {extra[0][0]} <- {extra[0][1]})")
    if not items:
        raise ConfigError(f"stage {ctx.stage_id!r}: no pair has label maps for both scans; nothing to evaluate")
    for note in notes:
        ctx.log(note)

    results = ctx.map(score_pair_files, items, desc="scoring pairs")
    order = [INITIAL] + [m["name"] for m in methods]
    aggregates = aggregate_results(results, order)
    chosen = None
    if scored_pairs:
        idx = int(ctx.params["figure_pair"])
        if not 0 <= idx < len(scored_pairs):
            notes.append(f"figure_pair {idx} is outside 0..{len(scored_pairs) - 1}; pair 0 is shown")
            idx = 0
        chosen = scored_pairs[idx]
    figures = _figures(ctx, dataset, chosen, methods, results, labels, names)

    doc = {
        "format": "slicreg-metrics/1",
        "title": ctx.params["title"] or f"Registration report: {dataset.name}",
        "dataset": dataset.name,
        "dataset_root": str(dataset.root),
        "methods": order,
        "method_folders": {m["name"]: m["folder"] for m in methods},
        "labels": {str(lab): names.get(lab, f"label {lab}") for lab in labels},
        "figure_pair": {"fixed": chosen.fixed, "moving": chosen.moving} if chosen else None,
        "definitions": {
            "dice_learn2reg": "Dice; a label absent from the fixed or the moving scan is NaN (null) and skipped "
                              "in means (Learn2Reg)",
            "dice_reference": "Dice; an absent label scores 0 and is still averaged (SLIC-Reg reference)",
            "hd95_vox": "95th percentile Hausdorff distance in voxels, Learn2Reg's surface-distance definition",
            "hd95_mm": "the same in mm (fixed grid spacing)",
            "sdlogj_learn2reg": "std(log(clip(det J + 3, 1e-9, 1e9))) over the field cropped by 2 voxels",
            "std_log_det": "std(log det J) over the cropped voxels with det J > 0",
            "folding_percent": "% of the cropped voxels with det J <= 0",
            "field_error": "|A (u - u_true)| in mm inside the fixed scan's body mask",
            "aggregates": "mean, std (ddof 0) and 30th percentile over pairs; NaN values left out",
            "null": "undefined (NaN) or infinite (HD95 of a label lost by the warp)",
        },
        "notes": notes,
        "paper_table": bool(ctx.params["paper_table"]),
        "results": results,
        "aggregates": aggregates,
    }
    atomic_write_json(ctx.path("report/metrics.json"), json_ready(doc))
    atomic_write_text(ctx.path("report/metrics.csv"), csv_text([flatten_result(r) for r in results]))
    atomic_write_text(ctx.path("report/index.md"), render_index(doc, figures=figures))
    for name in order:
        a = aggregates[name]
        if a["n_pairs"]:
            d = a["summary"]["dice_learn2reg"]
            group = "all13" if "all13" in d else next(iter(d))
            ctx.log(f"{name}: {a['n_pairs']} pair(s), Dice ({group}, Learn2Reg) mean "
                    f"{100 * d[group]['mean']:.1f} %")
    ctx.log(f"report written: WORK/{ctx.stage_id}/current/report/index.md (with metrics.json, metrics.csv, figures/)")
