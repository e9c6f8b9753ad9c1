"""Reports of registration results: tables (terminal text, Markdown, CSV) and figures (matplotlib, Agg).

Pure functions: results in (the dicts of :func:`slicreg.metrics.evaluate_pair`, with ``method``, ``fixed``,
``moving`` and ``runtime_s`` added per pair), text or :class:`matplotlib.figure.Figure` out. Nothing here
writes a file; :func:`figure_png` turns a figure into PNG bytes for the caller to write atomically.
Figures are built on :class:`matplotlib.figure.Figure` directly, so no pyplot state or GUI backend is
involved.

Dice is shown in percent (the paper's tables), stored as fractions (Learn2Reg's files). ``n/a`` marks a value
that is undefined (a label absent from the fixed or moving scan, Learn2Reg's rule), ``inf`` an HD95 whose label
the warp lost entirely.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from slicreg.errors import InputError
from slicreg.metrics import aggregate

__all__ = [
    "json_ready",
    "fmt",
    "markdown_table",
    "text_table",
    "pair_table",
    "pair_csv_rows",
    "flatten_result",
    "csv_text",
    "aggregate_results",
    "render_index",
    "paper_table",
    "PAPER_TABLE1",
    "figure_png",
    "dice_boxplot",
    "overlay_panel",
    "jacobian_panel",
    "choose_slices",
]

GROUP_TITLES = {"all13": "mean 13 organs", "large4": "mean 4 large organs", "selected": "mean of the labels"}
DICE_KEYS = ("dice_learn2reg", "dice_reference")
HD_KEYS = ("hd95_vox", "hd95_mm")
JAC_KEYS = ("sdlogj_learn2reg", "std_log_det", "folding_percent", "det_min", "det_max")
ERR_KEYS = ("mean_mm", "median_mm", "p95_mm", "max_mm")


# --------------------------------------------------------------------------------------------- values
def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def json_ready(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: numpy scalars/arrays to Python, NaN and +-inf to ``None``.

    ``None`` in the metrics files therefore means "undefined" (NaN) or "infinite" (an HD95 whose label the warp
    lost; the matching ``present_warped`` is false)."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def fmt(value: Any, *, digits: int = 1, scale: float = 1.0) -> str:
    """A number for a table: ``n/a`` for NaN/None, ``inf`` for infinity, else ``value * scale`` rounded."""
    v = _float(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v * scale:.{digits}f}"


def _mean_std(stats: Mapping[str, Any], *, digits: int = 1, scale: float = 1.0) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "n/a"
    text = fmt(stats["mean"], digits=digits, scale=scale)
    if stats.get("n", 0) > 1 and not math.isnan(_float(stats["std"])):
        text += f" ± {fmt(stats['std'], digits=digits, scale=scale)}"
    return text


# --------------------------------------------------------------------------------------------- tables
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table. ``align``: one character per column, ``l``/``r``/``c`` (default:
    first column left, the others right)."""
    headers = [str(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise InputError(f"markdown_table: align {align!r} has {len(align)} columns, headers have {len(headers)}")
    marks = {"l": ":--", "r": "--:", "c": ":-:"}

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise InputError(f"markdown_table: a row has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cell(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> str:
    """A monospace table for the terminal (columns padded; first column left-aligned by default)."""
    headers = [str(h) for h in headers]
    rows = [[str(x) for x in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(headers[c])] + [len(r[c]) for r in rows]) for c in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"


def _label_note(entry: Mapping[str, Any]) -> str:
    if not entry["present_fixed"] and not entry["present_moving"]:
        return "absent from both"
    if not entry["present_fixed"]:
        return "absent from fixed"
    if not entry["present_moving"]:
        return "absent from moving"
    if not entry["present_warped"]:
        return "lost by the warp"
    return ""


def pair_table(result: Mapping[str, Any], names: Mapping[int, str], *, markdown: bool = False) -> str:
    """Per-organ table of one pair: Dice (Learn2Reg and reference, %), HD95 (voxels, mm), volumes, notes,
    followed by the group means."""
    headers = ["id", "organ", "Dice L2R %", "Dice ref %", "HD95 vox", "HD95 mm", "fixed ml", "warped ml", "note"]
    rows = []
    for lab in result["labels"]:
        e = result["per_label"][str(lab)]
        rows.append([lab, names.get(int(lab), f"label {lab}"), fmt(e["dice_learn2reg"], scale=100),
                     fmt(e["dice_reference"], scale=100), fmt(e["hd95_vox"], digits=2), fmt(e["hd95_mm"], digits=2),
                     fmt(e["volume_fixed_ml"]), fmt(e["volume_warped_ml"]), _label_note(e)])
    s = result["summary"]
    for group in result["groups"]:
        rows.append(["", GROUP_TITLES.get(group, group), fmt(s["dice_learn2reg"][group], scale=100),
                     fmt(s["dice_reference"][group], scale=100), fmt(s["hd95_vox"][group], digits=2),
                     fmt(s["hd95_mm"][group], digits=2), "", "", ""])
    align = "rlrrrrrrl"
    return markdown_table(headers, rows, align=align) if markdown else text_table(headers, rows, align=align)


def pair_csv_rows(result: Mapping[str, Any], names: Mapping[int, str]) -> list[dict[str, Any]]:
    """CSV rows of one pair: one per label (``label``, ``name``, the per-label metrics) then one per group
    (``label`` = ``mean:<group>``). Dice as fractions, as in Learn2Reg's files."""
    rows = []
    for lab in result["labels"]:
        e = result["per_label"][str(lab)]
        rows.append({"label": lab, "name": names.get(int(lab), ""), **e})
    for group in result["groups"]:
        rows.append({"label": f"mean:{group}", "name": GROUP_TITLES.get(group, group),
                     **{k: result["summary"][k][group] for k in DICE_KEYS + HD_KEYS}})
    return rows


def flatten_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """One flat CSV row for a pair: identity columns, group means, per-label Dice / HD95, Jacobian, field error.

    Column names: ``dice_learn2reg_all13``, ``dice_learn2reg_<label id>``, ``hd95_mm_<label id>``,
    ``jac_sdlogj_learn2reg``, ``err_mean_mm`` ... (label ids, not names, so that they hold no spaces)."""
    row: dict[str, Any] = {k: result.get(k) for k in ("method", "fixed", "moving", "runtime_s")}
    for key in DICE_KEYS + HD_KEYS:
        for group, value in result["summary"][key].items():
            row[f"{key}_{group}"] = value
    for key in DICE_KEYS + HD_KEYS:
        for lab in result["labels"]:
            row[f"{key}_{lab}"] = result["per_label"][str(lab)][key]
    for key in JAC_KEYS:
        row[f"jac_{key}"] = (result.get("jacobian") or {}).get(key)
    for key in ERR_KEYS:
        row[f"err_{key}"] = (result.get("field_error") or {}).get(key)
    return row


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with the union of the rows' keys as header (in first-seen order); NaN as ``nan``, None empty."""
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in header})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- aggregation
def aggregate_results(results: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Learn2Reg aggregates (mean, std, p30; :func:`slicreg.metrics.aggregate`) over the pairs of each method.

    Returns:
        ``{method: {"n_pairs", "summary": {metric: {group: stats}}, "per_label": {metric: {"<id>": stats}},
        "jacobian": {key: stats} | None, "field_error": {key: stats} | None, "runtime_s": stats}}``.
    """
    out: dict[str, Any] = {}
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        entry: dict[str, Any] = {"n_pairs": len(rs), "summary": {}, "per_label": {}}
        if rs:
            for key in DICE_KEYS + HD_KEYS:
                groups = rs[0]["summary"][key]
                entry["summary"][key] = {g: aggregate([_float(r["summary"][key][g]) for r in rs]) for g in groups}
                entry["per_label"][key] = {str(lab): aggregate([_float(r["per_label"][str(lab)][key]) for r in rs])
                                           for lab in rs[0]["labels"]}
        jac = [r["jacobian"] for r in rs if r.get("jacobian")]
        entry["jacobian"] = {k: aggregate([_float(j[k]) for j in jac]) for k in JAC_KEYS} if jac else None
        err = [r["field_error"] for r in rs if r.get("field_error")]
        entry["field_error"] = {k: aggregate([_float(e[k]) for e in err]) for k in ERR_KEYS} if err else None
        entry["runtime_s"] = aggregate([_float(r.get("runtime_s")) for r in rs])
        out[method] = entry
    return out


def _stats_cell(stats: Mapping[str, Any] | None, *, digits: int = 1, scale: float = 1.0) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "n/a"
    text = _mean_std(stats, digits=digits, scale=scale)
    if stats.get("n", 0) > 1:
        text += f" (p30 {fmt(stats['p30'], digits=digits, scale=scale)})"
    return text


PAPER_TABLE1: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("initial (no registration)", (18.0, 12.5, 9.0, 26.2, 16.4, 8.8)),
    ("PDD-Net", (48.8, 49.0, 42.3, 60.2, 50.1, 29.1)),
    ("3D DeepLab + regression", (31.1, 45.6, 43.2, 57.7, 44.4, 25.1)),
    ("3D UNet + supervoxels + Adam", (57.1, 38.4, 41.8, 71.8, 52.3, 30.0)),
    ("SLIC-Reg (DeepLab + supervoxels + Adam)", (62.4, 50.8, 49.1, 74.1, 59.1, 31.8)),
)
"""Heinrich & Hansen, MIDL 2021, Table 1: BTCV, 9 validation scans -> template #38, Dice % (spleen, right kidney,
left kidney, liver, mean of these 4, mean of 13 organs; the reference definition, absent labels = 0)."""


def paper_table(doc: Mapping[str, Any]) -> str:
    """The SLIC-Reg paper's Table 1 layout for this run's methods, with the published rows beneath (Markdown).

    Cells: Dice in % by the reference definition (absent label = 0), per organ the mean over pairs, then the
    means over the 4 large organs and over the 13 organs; ``n/a`` where the run did not score those labels."""
    agg = doc["aggregates"]
    rows = []
    for m in doc["methods"]:
        a = agg[m]
        if not a["n_pairs"]:
            continue
        per = a["per_label"].get("dice_reference", {})
        groups = a["summary"].get("dice_reference", {})
        cells = [per.get(str(lab), {}).get("mean") for lab in (1, 2, 3, 6)]
        cells += [groups.get("large4", {}).get("mean"), groups.get("all13", {}).get("mean")]
        rows.append([f"{m} (this run, {a['n_pairs']} pairs)"] + [fmt(c, scale=100) for c in cells])
    rows += [[f"paper: {name}"] + [f"{v:.1f}" for v in values] for name, values in PAPER_TABLE1]
    return markdown_table(["method", "spleen", "right kidney", "left kidney", "liver", "mean 4", "mean 13"], rows)


def render_index(doc: Mapping[str, Any], *, figures: Mapping[str, str] | None = None) -> str:
    """The report page (Markdown) from a metrics document.

    Args:
        doc: ``{"title", "dataset", "methods": [...], "labels": {"<id>": name}, "results": [pair results],
            "aggregates": aggregate_results(...), "notes": [...]}`` (what the evaluate stage writes as
            metrics.json, before :func:`json_ready`).
        figures: caption -> relative PNG path, shown in order; keys starting with ``"pair:"`` are shown under
            the chosen pair's heading (the text after the colon is the caption).
    """
    figures = dict(figures or {})
    methods = list(doc["methods"])
    names = {int(k): v for k, v in doc["labels"].items()}
    agg = doc["aggregates"]
    results = doc["results"]
    out: list[str] = [f"# {doc.get('title', 'Registration report')}\n"]
    n_pairs = max((agg[m]["n_pairs"] for m in methods), default=0)
    out.append(
        f"Dataset `{doc.get('dataset', '?')}`: {n_pairs} registration pair(s) (fixed <- moving), methods: "
        f"{', '.join(methods)}. Dice in % by the Learn2Reg definition (a label absent from the fixed or moving "
        f"scan is skipped) unless marked *ref* (SLIC-Reg reference: absent = 0, still averaged). HD95 as "
        f"Learn2Reg computes it, in voxels and mm. Cells: mean ± std over pairs (p30 = 30th percentile, "
        f"Learn2Reg's robustness figure). Definitions: docs/evaluation.md.\n")
    for note in doc.get("notes", []):
        out.append(f"> {note}\n")

    # --- summary: metrics x methods
    out.append("## Summary\n")
    rows = []
    first = next((agg[m] for m in methods if agg[m]["n_pairs"]), None)
    groups = list(first["summary"]["dice_learn2reg"]) if first else []
    for key, title, scale, digits in (("dice_learn2reg", "Dice", 100, 1), ("dice_reference", "Dice ref", 100, 1),
                                      ("hd95_vox", "HD95 vox", 1, 2), ("hd95_mm", "HD95 mm", 1, 2)):
        for g in groups:
            rows.append([f"{title}, {GROUP_TITLES.get(g, g)}"] +
                        [_stats_cell(agg[m]["summary"].get(key, {}).get(g), digits=digits, scale=scale)
                         for m in methods])
    for key, title, digits in (("sdlogj_learn2reg", "SDlogJ (Learn2Reg, log(det+3))", 3),
                               ("std_log_det", "std log det J (det > 0)", 3),
                               ("folding_percent", "det J <= 0 (% voxels)", 3)):
        rows.append([title] + [_stats_cell((agg[m]["jacobian"] or {}).get(key), digits=digits) for m in methods])
    if any(agg[m]["field_error"] for m in methods):
        for key, title in (("mean_mm", "field error, mean (mm)"), ("p95_mm", "field error, 95th pct (mm)")):
            rows.append([title] + [_stats_cell((agg[m]["field_error"] or {}).get(key), digits=2) for m in methods])
    rows.append(["runtime per pair (s)"] + [_stats_cell(agg[m]["runtime_s"], digits=2) for m in methods])
    rows.append(["pairs"] + [str(agg[m]["n_pairs"]) for m in methods])
    out.append(markdown_table(["metric"] + methods, rows))

    if doc.get("paper_table"):
        out.append("\n## The SLIC-Reg paper's Table 1 layout\n")
        out.append("Dice %, reference definition (absent label = 0), mean over pairs; the paper's rows are its "
                   "published BTCV results (9 validation scans -> template #38). Comparable only for that split "
                   "and data.\n")
        out.append(paper_table(doc))

    # --- per organ
    if first:
        for key, title, scale, digits in (("dice_learn2reg", "Dice per organ (%, Learn2Reg)", 100, 1),
                                          ("hd95_mm", "HD95 per organ (mm)", 1, 2)):
            out.append(f"\n## {title}\n")
            rows = []
            for lab in first["per_label"][key]:
                rows.append([lab, names.get(int(lab), f"label {lab}")] +
                            [_mean_std(agg[m]["per_label"].get(key, {}).get(lab, {}), digits=digits, scale=scale)
                             for m in methods])
            for g in groups:
                rows.append(["", f"**{GROUP_TITLES.get(g, g)}**"] +
                            [_mean_std(agg[m]["summary"].get(key, {}).get(g, {}), digits=digits, scale=scale)
                             for m in methods])
            if key == "dice_learn2reg":
                for g in groups:
                    rows.append(["", f"{GROUP_TITLES.get(g, g)} (ref, absent = 0)"] +
                                [_mean_std(agg[m]["summary"].get("dice_reference", {}).get(g, {}), scale=100)
                                 for m in methods])
            out.append(markdown_table(["id", "organ"] + methods, rows, align="rl" + "r" * len(methods)))

    # --- per pair
    out.append("\n## Per pair\n")
    rows = []
    for r in results:
        s = r["summary"]
        g13 = "all13" if "all13" in s["dice_learn2reg"] else next(iter(s["dice_learn2reg"]), None)
        jac = r.get("jacobian") or {}
        err = r.get("field_error") or {}
        rows.append([r["method"], r["fixed"], r["moving"],
                     fmt(s["dice_learn2reg"].get(g13), scale=100), fmt(s["dice_learn2reg"].get("large4"), scale=100),
                     fmt(s["dice_reference"].get(g13), scale=100), fmt(s["hd95_mm"].get(g13), digits=2),
                     fmt(jac.get("sdlogj_learn2reg"), digits=3), fmt(jac.get("folding_percent"), digits=3),
                     fmt(err.get("mean_mm"), digits=2), fmt(err.get("p95_mm"), digits=2),
                     fmt(r.get("runtime_s"), digits=2)])
    out.append(markdown_table(
        ["method", "fixed", "moving", "Dice 13", "Dice 4", "Dice 13 ref", "HD95 mm", "SDlogJ", "det<=0 %",
         "err mean mm", "err p95 mm", "runtime s"], rows, align="lll" + "r" * 9))

    # --- figures
    general = {k: v for k, v in figures.items() if not k.startswith("pair:")}
    pair_figs = {k[5:]: v for k, v in figures.items() if k.startswith("pair:")}
    if general or pair_figs:
        out.append("\n## Figures\n")
    for caption, path in general.items():
        out.append(f"### {caption}\n\n![{caption}]({path})\n")
    if pair_figs:
        chosen = doc.get("figure_pair") or {}
        out.append(f"### Pair {chosen.get('fixed', '?')} <- {chosen.get('moving', '?')}\n")
        for caption, path in pair_figs.items():
            out.append(f"**{caption}**\n\n![{caption}]({path})\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- figures
def figure_png(fig: Any, *, dpi: int = 110) -> bytes:
    """PNG bytes of a :class:`matplotlib.figure.Figure` (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _method_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def dice_boxplot(dice: Mapping[str, Any], label_ids: Sequence[int], names: Mapping[int, str], *,
                 title: str = "Dice per organ (Learn2Reg definition)") -> Any:
    """Box plots of Dice (%) per organ, one box per method side by side.

    Args:
        dice: method -> array ``(P, L)`` of Dice fractions (pairs x labels, NaN = undefined, left out).
        label_ids: the ``L`` label ids (column order).
        names: label id -> organ name (x tick labels).

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = list(dice)
    if not methods:
        raise InputError("dice_boxplot: no method given")
    n_lab = len(label_ids)
    fig = Figure(figsize=(min(14.0, max(6.0, 1.5 + 0.9 * n_lab)), 4.6))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colours = _method_colours(len(methods))
    for m_i, method in enumerate(methods):
        arr = np.asarray(dice[method], dtype=np.float64).reshape(-1, n_lab) * 100.0
        data = [col[~np.isnan(col)] for col in arr.T]
        pos = np.arange(n_lab) - 0.4 + width * (m_i + 0.5)
        keep = [i for i, d in enumerate(data) if d.size]
        if keep:
            bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=width * 0.85, patch_artist=True,
                            manage_ticks=False, showfliers=True, flierprops={"markersize": 3})
            for patch in bp["boxes"]:
                patch.set_facecolor(colours[m_i])
                patch.set_alpha(0.75)
            for median in bp["medians"]:
                median.set_color("black")
        # every pair as a point (jittered deterministically), so small samples stay visible
        for i in keep:
            offsets = (np.arange(data[i].size) - (data[i].size - 1) / 2) * min(0.6 * width / max(data[i].size, 1), 0.04)
            ax.scatter(pos[i] + offsets, data[i], s=12, color=colours[m_i], edgecolors="black", linewidths=0.4,
                       zorder=3)
    ax.set_xticks(np.arange(n_lab))
    ax.set_xticklabels([names.get(int(i), str(i)) for i in label_ids], rotation=40, ha="right")
    ax.set_xlim(-0.6, n_lab - 0.4)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("Dice (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Patch(facecolor=colours[i], alpha=0.75, label=m) for i, m in enumerate(methods)],
              loc="upper right", fontsize="small", framealpha=0.8)
    fig.tight_layout()
    return fig


# ---- slices, orientation and outlines
def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder / flip the last three axes of ``array`` to RAS for display; returns it and its spacing."""
    import nibabel as nib

    from slicreg.conventions import spacing_from_affine

    ornt = nib.orientations.io_orientation(affine)
    spacing = spacing_from_affine(affine)
    out = array
    lead = array.ndim - 3
    # ornt[i] = (target axis, flip) for input axis i
    perm = [0] * 3
    for i, (target, flip) in enumerate(ornt):
        if flip < 0:
            out = np.flip(out, axis=lead + i)
        perm[int(target)] = i
    out = np.transpose(out, list(range(lead)) + [lead + p for p in perm])
    return out, spacing[perm]


def choose_slices(labels: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Slice indices (axis 0, 1, 2) through the centre of mass of the labelled voxels, else the grid centre."""
    if labels is not None and np.any(labels > 0):
        idx = np.argwhere(labels > 0).mean(axis=0)
        return tuple(int(round(v)) for v in idx)  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def _outline_rgba(lab2d: np.ndarray, colours: Mapping[int, Any], *, white: bool = False) -> np.ndarray:
    """RGBA image of the outlines of every label of a 2-D label slice (4-neighbour boundary pixels)."""
    out = np.zeros(lab2d.shape + (4,), dtype=np.float32)
    pad = np.pad(lab2d, 1, mode="edge")
    boundary = np.zeros(lab2d.shape, dtype=bool)
    for di, dj in ((0, 1), (2, 1), (1, 0), (1, 2)):
        boundary |= pad[di:di + lab2d.shape[0], dj:dj + lab2d.shape[1]] != lab2d
    boundary &= lab2d > 0
    for lab in np.unique(lab2d[boundary]):
        sel = boundary & (lab2d == lab)
        out[sel] = (1.0, 1.0, 1.0, 0.9) if white else colours.get(int(lab), (1.0, 1.0, 0.0, 1.0))
    return out


def _views(vol: np.ndarray, slices: Sequence[int]) -> list[np.ndarray]:
    """Axial (z), coronal (y), sagittal (x) slices of a RAS volume, transposed for ``imshow(origin="lower")``."""
    i, j, k = slices
    return [vol[:, :, k].T, vol[:, j, :].T, vol[i, :, :].T]


VIEW_NAMES = ("axial", "coronal", "sagittal")
# screen left/right and bottom/top letters of each view after the radiological flip (patient right on the left)
VIEW_CODES = (("R", "L", "P", "A"), ("R", "L", "I", "S"), ("A", "P", "I", "S"))


def _view_aspect(spacing: np.ndarray, view: int) -> float:
    h, v = ((0, 1), (0, 2), (1, 2))[view]
    return float(spacing[v] / spacing[h])


def _label_colours(label_ids: Iterable[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {int(lab): cmap((int(lab) - 1) % 20) for lab in label_ids}


def overlay_panel(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    titles: Sequence[str],
    *,
    affine: np.ndarray,
    slices: Sequence[int] | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    reference: int | None = 0,
    reference_on: Sequence[int] | None = None,
) -> Any:
    """Image panels with label outlines: one column per volume, rows axial / coronal / sagittal.

    Typical use: fixed, moving, warped moving (all on the fixed grid for the first and last; the moving scan on
    its own grid of the same shape).

    Args:
        images: ``(X, Y, Z)`` intensity volumes in HU, one per column.
        labels: label maps ``(X, Y, Z)`` (or ``None``) drawn as coloured outlines on the column's image.
        titles: column titles.
        affine: voxel -> mm affine of the grid (orientation and aspect); all columns are shown with it.
        slices: voxel indices ``(i, j, k)`` of the sagittal, coronal and axial planes (default: centre of mass of
            the first label map).
        window: grey-value window in HU (default soft tissue, W 400 / L 40).
        reference: column whose labels are also drawn in white on the columns ``reference_on`` (default the
            first column, the fixed scan), so the fit of the warped labels can be judged; ``None`` for none.
        reference_on: columns that get the white reference outlines (default: the last column).

    Returns:
        A :class:`matplotlib.figure.Figure`. Views are radiological (patient right on the screen's left).
    """
    from matplotlib.figure import Figure

    if not (len(images) == len(labels) == len(titles)) or not images:
        raise InputError("overlay_panel: give as many images, label maps (or None) and titles, at least one")
    shape = np.shape(images[0])
    for n, (img, lab) in enumerate(zip(images, labels)):
        if np.shape(img) != shape or (lab is not None and np.shape(lab) != shape):
            raise InputError(f"overlay_panel: column {n} has shape {np.shape(img)} / "
                             f"{None if lab is None else np.shape(lab)}, expected {shape}")
    if slices is None:
        slices = choose_slices(labels[0], shape)
    # reorient the slice position like the volumes
    pos = np.zeros(shape, dtype=bool)
    pos[tuple(int(s) for s in slices)] = True
    pos_ras, spacing = _to_ras(pos, affine)
    s_ras = tuple(int(v) for v in np.argwhere(pos_ras)[0])
    all_labels = sorted({int(v) for lab in labels if lab is not None for v in np.unique(lab) if v > 0})
    colours = _label_colours(all_labels)
    n_col = len(images)
    fig = Figure(figsize=(3.2 * n_col, 9.0))
    axes = fig.subplots(3, n_col, squeeze=False)
    ref = None
    ref_cols = set(range(n_col)[-1:] if reference_on is None else (int(c) for c in reference_on))
    if reference is not None and labels[reference] is not None and ref_cols - {reference}:
        ref = _views(_to_ras(np.asarray(labels[reference]), affine)[0], s_ras)
    for c in range(n_col):
        img_views = _views(_to_ras(np.asarray(images[c], dtype=np.float32), affine)[0], s_ras)
        lab_views = (_views(_to_ras(np.asarray(labels[c]), affine)[0], s_ras) if labels[c] is not None
                     else [None] * 3)
        for r in range(3):
            ax = axes[r][c]
            ax.imshow(img_views[r], cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                      aspect=_view_aspect(spacing, r), interpolation="nearest")
            if ref is not None and c in ref_cols and c != reference:  # white first: colour wins where they agree
                ax.imshow(_outline_rgba(ref[r], colours, white=True), origin="lower",
                          aspect=_view_aspect(spacing, r), interpolation="nearest")
            if lab_views[r] is not None:
                ax.imshow(_outline_rgba(lab_views[r], colours), origin="lower", aspect=_view_aspect(spacing, r),
                          interpolation="nearest")
            ax.invert_xaxis()  # radiological: patient right (or anterior, sagittal) on the left
            ax.set_xticks([])
            ax.set_yticks([])
            left, right, bottom, top = VIEW_CODES[r]
            ax.set_xlabel(f"{left}  <->  {right}", fontsize="x-small")
            if c == 0:
                ax.set_ylabel(f"{VIEW_NAMES[r]}  ({bottom} -> {top})", fontsize="small")
            if r == 0:
                ax.set_title(titles[c], fontsize="medium")
    if ref is not None:
        fig.text(0.5, 0.005, f"coloured: each column's labels; white: the labels of {titles[reference]!r} where "
                 f"they differ", ha="center", fontsize="x-small")
    fig.tight_layout()
    return fig


def jacobian_panel(det: np.ndarray, *, affine: np.ndarray, slices: Sequence[int] | None = None,
                   title: str = "Jacobian determinant", vmax: float = 2.0, crop: int = 2) -> Any:
    """Axial / coronal / sagittal maps of ``det(J)`` (1 = volume kept) with folding voxels (det <= 0) in black.

    Args:
        det: ``(X, Y, Z)`` determinant (:func:`slicreg.metrics.jacobian_determinant`).
        affine: voxel -> mm affine of the grid.
        slices: voxel indices ``(i, j, k)`` (default the grid centre).
        vmax: the colour scale spans ``[0, vmax]`` centred on 1 (blue shrink, red growth).
        crop: border width left out of the statistics (grey in the maps), as in
            :func:`slicreg.metrics.jacobian_stats` (default 2, Learn2Reg's).
    """
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    det = np.array(det, dtype=np.float64)
    if det.ndim != 3:
        raise InputError(f"jacobian_panel: det must be (X, Y, Z), got shape {det.shape}")
    if crop > 0:
        if min(det.shape) <= 2 * crop:
            raise InputError(f"jacobian_panel: grid {det.shape} is too small to crop {crop} voxels")
        inner = det[crop:-crop, crop:-crop, crop:-crop].copy()
        det[:] = np.nan
        det[crop:-crop, crop:-crop, crop:-crop] = inner
    interior = det[~np.isnan(det)]
    if slices is None:
        slices = choose_slices(None, det.shape)
    pos = np.zeros(det.shape, dtype=bool)
    pos[tuple(int(s) for s in slices)] = True
    pos_ras, spacing = _to_ras(pos, affine)
    s_ras = tuple(int(v) for v in np.argwhere(pos_ras)[0])
    views = _views(_to_ras(det, affine)[0], s_ras)
    fig = Figure(figsize=(11.0, 3.8))
    axes = fig.subplots(1, 3)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(vmax, 1.0 + 1e-6))
    im = None
    cmap = colormaps["RdBu_r"].with_extremes(bad=(0.8, 0.8, 0.8, 1.0))
    for r, ax in enumerate(axes):
        im = ax.imshow(np.ma.masked_invalid(views[r]), cmap=cmap, norm=norm, origin="lower",
                       aspect=_view_aspect(spacing, r), interpolation="nearest")
        fold = np.zeros(views[r].shape + (4,), dtype=np.float32)
        fold[views[r] <= 0] = (0.0, 0.0, 0.0, 1.0)
        ax.imshow(fold, origin="lower", aspect=_view_aspect(spacing, r), interpolation="nearest")
        ax.invert_xaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        left, right, bottom, top = VIEW_CODES[r]
        ax.set_title(VIEW_NAMES[r], fontsize="small")
        ax.set_xlabel(f"{left}  <->  {right}", fontsize="x-small")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="det J (black: <= 0, folding)")
    n_fold = int(np.count_nonzero(interior <= 0))
    fig.suptitle(f"{title}: interior (border {crop} voxels grey) min {interior.min():.2f}, max {interior.max():.2f}, "
                 f"{n_fold} voxels <= 0 ({100.0 * n_fold / interior.size:.3g} %)", fontsize="medium")
    return fig
