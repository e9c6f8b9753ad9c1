"""Tables, figures, the `slicreg evaluate` command and the `evaluate` stage (tiny synthetic data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.runner import Runner, StageContext, load_pipeline
from slicreg import report as R
from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import save_field, save_volume
from slicreg.labels import BTCV_LABELS
from slicreg.metrics import evaluate_pair

SHAPE = (16, 18, 20)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
SHIFT = 2  # voxels along axis 0: moving = fixed shifted by +2, so the true pull field is u = (+2, 0, 0)


def strict_json(path: Path) -> object:
    def no_constants(name: str) -> object:
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(Path(path).read_text(), parse_constant=no_constants)


def make_subject():
    """A body (40 HU) in air with three organs; label 2 is a single voxel."""
    img = np.full(SHAPE, -1000, np.int16)
    img[2:14, 2:16, 2:18] = 40
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:8, 4:10, 4:12] = 1
    lab[8:12, 6:12, 8:15] = 6
    lab[5, 13, 6] = 2
    img[lab == 1] = 100
    img[lab == 6] = 60
    return img, lab


def shifted(a, fill):
    out = np.full_like(a, fill)
    out[SHIFT:] = a[:-SHIFT]
    return out


@pytest.fixture()
def dataset_dir(tmp_path):
    """A slicreg dataset: fixed subjects f1, f2 and a moving subject m (= f1 shifted by +2 on axis 0)."""
    root = tmp_path / "ds"
    img, lab = make_subject()
    subjects = {"f1": (img, lab), "f2": (img, lab), "m": (shifted(img, -1000), shifted(lab, 0))}
    for sid, (image, labels) in subjects.items():
        save_volume(Volume(image, AFF), root / f"imagesTr/{sid}_0000.nii.gz")
        save_volume(Volume(labels, AFF), root / f"labelsTr/{sid}.nii.gz")
    truth = np.zeros((3, *SHAPE), np.float32)
    truth[0] = SHIFT  # m[p + 2] = f1[p]: fixed voxel p corresponds to moving voxel p + 2
    save_field(truth, AFF, root / "ground_truth_fields/disp_f1_m.nii.gz")
    doc = {
        "name": "tiny", "format": "slicreg-dataset/1", "template": "m",
        "labels": {"0": "background", **{str(k): v for k, v in BTCV_LABELS.items()}},
        "subjects": {sid: {"image": f"imagesTr/{sid}_0000.nii.gz", "labels": f"labelsTr/{sid}.nii.gz",
                           "role": "template" if sid == "m" else "test"} for sid in subjects},
        "training": [], "test": ["f1", "f2"],
        "registration_pairs": [
            {"fixed": "f1", "moving": "m", "ground_truth_field": "ground_truth_fields/disp_f1_m.nii.gz"},
            {"fixed": "f2", "moving": "m"},
        ],
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


# ------------------------------------------------------------------------------------------ tables
def test_markdown_and_text_tables():
    md = R.markdown_table(["a", "b"], [["x|y", 1.5]])
    assert md.splitlines() == ["| a | b |", "|:--|--:|", "| x\\|y | 1.5 |"]
    txt = R.text_table(["name", "v"], [["liver", "1.0"], ["x", "10.0"]])
    assert txt.splitlines()[2] == "liver   1.0"
    with pytest.raises(InputError):
        R.markdown_table(["a"], [[1, 2]])


def test_fmt_and_json_ready():
    assert R.fmt(math.nan) == "n/a" and R.fmt(None) == "n/a" and R.fmt(math.inf) == "inf"
    assert R.fmt(0.5, scale=100) == "50.0"
    out = R.json_ready({"a": np.float32(0.5), "b": [math.nan, math.inf, np.int64(3)], "c": np.array([True])})
    assert out == {"a": 0.5, "b": [None, None, 3], "c": [True]}


def test_pair_table_and_csv_rows_name_organs_and_notes():
    img, lab = make_subject()
    mov = shifted(lab, 0)
    mov[mov == 2] = 0  # right kidney absent from moving
    res = evaluate_pair(lab, mov, mov, labels=[1, 2, 3, 6], affine=AFF)
    table = R.pair_table(res, BTCV_LABELS)
    assert "spleen" in table and "absent from moving" in table and "absent from both" in table
    assert "mean 4 large organs" in table and "mean of the labels" in table
    rows = R.pair_csv_rows(res, BTCV_LABELS)
    assert [r["label"] for r in rows] == [1, 2, 3, 6, "mean:large4", "mean:selected"]
    # spleen: 5x6x8 box shifted by 2 along its 5-voxel side -> overlap 3/5
    assert rows[0]["dice_learn2reg"] == pytest.approx(0.6)
    assert rows[0]["hd95_mm"] == pytest.approx(2 * rows[0]["hd95_vox"])
    text = R.csv_text(rows)
    assert text.splitlines()[0].startswith("label,name,dice_learn2reg,dice_reference")


def test_aggregate_results_over_pairs():
    res = []
    for n, d in enumerate([0.2, 0.4, 0.6]):
        res.append({"method": "x", "fixed": f"f{n}", "moving": "m", "runtime_s": 1.0 + n, "labels": [1],
                    "groups": {"selected": [1]}, "per_label": {"1": {k: d for k in R.DICE_KEYS + R.HD_KEYS}},
                    "summary": {k: {"selected": d} for k in R.DICE_KEYS + R.HD_KEYS},
                    "jacobian": None, "field_error": None})
    agg = R.aggregate_results(res, ["x", "empty"])
    s = agg["x"]["summary"]["dice_learn2reg"]["selected"]
    assert s["mean"] == pytest.approx(0.4) and s["p30"] == pytest.approx(0.32) and s["n"] == 3
    assert agg["x"]["runtime_s"]["mean"] == pytest.approx(2.0)
    assert agg["x"]["jacobian"] is None and agg["empty"]["n_pairs"] == 0


# ------------------------------------------------------------------------------------------ figures
def test_figures_render_to_png():
    img, lab = make_subject()
    fig = R.dice_boxplot({"initial": np.array([[0.1, np.nan], [0.3, 0.2]]), "method": np.array([[0.8, 0.9]])},
                         [1, 6], BTCV_LABELS)
    png = R.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    fig = R.overlay_panel([img, shifted(img, -1000)], [lab, shifted(lab, 0)], ["fixed", "moving"], affine=AFF)
    assert R.figure_png(fig)[:4] == b"\x89PNG"
    det = np.ones(SHAPE)
    det[4:6, 4:6, 4:6] = -0.5
    assert R.figure_png(R.jacobian_panel(det, affine=AFF))[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="column 1"):
        R.overlay_panel([img, img[:-1]], [None, None], ["a", "b"], affine=AFF)


def test_display_orientation_follows_the_affine():
    # an LPS-like affine (axes 0 and 1 flipped): the voxel at index 0 on axis 0 is the most *right* one,
    # so after reorientation to RAS it must sit at the highest index
    vol = np.zeros((4, 5, 6))
    vol[0, 1, 2] = 1
    aff = np.diag([-2.0, -3.0, 4.0, 1.0])
    ras, spacing = R._to_ras(vol, aff)
    assert ras.shape == (4, 5, 6) and tuple(np.argwhere(ras)[0]) == (3, 3, 2)
    assert spacing.tolist() == [2.0, 3.0, 4.0]
    # a permuted affine (axis 0 runs superior): the volume is transposed
    perm = np.array([[0, 0, 2.0, 0], [0, 3.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    ras, spacing = R._to_ras(vol, perm)
    assert ras.shape == (6, 5, 4) and tuple(np.argwhere(ras)[0]) == (2, 1, 0)
    assert spacing.tolist() == [2.0, 3.0, 5.0]


# ------------------------------------------------------------------------------------------ command
def test_evaluate_command_table_json_csv(tmp_path, dataset_dir, capsys):
    f = dataset_dir / "labelsTr/f1.nii.gz"
    m = dataset_dir / "labelsTr/m.nii.gz"
    gt = dataset_dir / "ground_truth_fields/disp_f1_m.nii.gz"
    # initial (no field)
    assert main(["evaluate", "--fixed-labels", str(f), "--moving-labels", str(m), "--labels", "1..3,6",
                 "--json", str(tmp_path / "init.json")]) == 0
    out = capsys.readouterr().out
    assert "spleen" in out and "liver" in out and "none (initial" in out
    init = strict_json(tmp_path / "init.json")
    assert init["per_label"]["1"]["dice_learn2reg"] == pytest.approx(0.6)
    assert init["per_label"]["3"]["dice_learn2reg"] is None          # absent from both: null in JSON
    assert init["jacobian"] is None
    # registered with the true field: every organ matches exactly
    assert main(["evaluate", "--fixed-labels", str(f), "--moving-labels", str(m), "--field", str(gt),
                 "--gt-field", str(gt), "--json", str(tmp_path / "reg.json"), "--csv", str(tmp_path / "reg.csv")]) == 0
    out = capsys.readouterr().out
    assert "SDlogJ (Learn2Reg) 0.0000" in out and "Field error" in out
    reg = strict_json(tmp_path / "reg.json")
    assert reg["summary"]["dice_learn2reg"]["all13"] == 1.0
    assert reg["summary"]["dice_learn2reg"]["large4"] == 1.0
    assert reg["summary"]["dice_reference"]["all13"] == pytest.approx(3 / 13)  # 3 organs present of 13
    assert reg["field_error"]["mean_mm"] == 0.0
    assert reg["jacobian"]["folding_percent"] == 0.0
    csv_lines = (tmp_path / "reg.csv").read_text().splitlines()
    assert csv_lines[1].startswith("1,spleen,1.0,1.0,0.0,0.0")


def test_evaluate_command_bad_input(tmp_path, dataset_dir, capsys):
    f = dataset_dir / "labelsTr/f1.nii.gz"
    m = dataset_dir / "labelsTr/m.nii.gz"
    small = tmp_path / "small.nii.gz"
    far = AFF.copy()
    far[:3, 3] += 500.0  # a grid 500 mm away: nothing to compare in world space
    save_volume(Volume(np.zeros((4, 4, 4), np.uint8), far), small)
    assert main(["evaluate", "--fixed-labels", str(f), "--moving-labels", str(small)]) == 2
    assert "do not overlap" in capsys.readouterr().err
    bad_field = tmp_path / "u.nii.gz"
    save_field(np.zeros((3, 16, 18, 19), np.float32), AFF, bad_field)
    assert main(["evaluate", "--fixed-labels", str(f), "--moving-labels", str(m), "--field", str(bad_field)]) == 2
    assert "does not match the fixed image grid" in capsys.readouterr().err
    floats = tmp_path / "float.nii.gz"
    save_volume(Volume(np.full(SHAPE, 0.25, np.float32), AFF), floats)
    assert main(["evaluate", "--fixed-labels", str(floats), "--moving-labels", str(m)]) == 2
    assert "integer label map" in capsys.readouterr().err
    ct = tmp_path / "ct.nii.gz"
    save_volume(Volume(make_subject()[0], AFF), ct)
    assert main(["evaluate", "--fixed-labels", str(ct), "--moving-labels", str(m)]) == 2
    assert "intensity image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--fixed-labels", str(f), "--moving-labels", str(m), "--labels", "0..3"])


# ------------------------------------------------------------------------------------------ stage
def _ctx(tmp_path, inputs, **params) -> StageContext:
    from pipelines.runner import load_stage_types

    st = load_stage_types()["evaluate"]
    out = tmp_path / "out"
    out.mkdir()
    return StageContext("evaluate", {**st.params, **params}, inputs, out, tmp_path, quiet=True)


def test_stage_initial_only_renders(tmp_path, dataset_dir):
    from pipelines.stages.evaluate import evaluate_stage

    ctx = _ctx(tmp_path, {"dataset": dataset_dir, "methods": None})
    evaluate_stage(ctx)
    rep = ctx.out_dir / "report"
    index = (rep / "index.md").read_text()
    assert "| metric | initial |" in index and "spleen" in index and "Per pair" in index
    assert "figures/dice_boxplot.png" in index and "figures/overlay.png" in index
    for name in ("dice_boxplot.png", "overlay.png"):
        assert (rep / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    doc = strict_json(rep / "metrics.json")
    assert doc["methods"] == ["initial"]
    by_pair = {(r["fixed"], r["moving"]): r for r in doc["results"]}
    assert by_pair[("f1", "m")]["per_label"]["1"]["dice_learn2reg"] == pytest.approx(0.6)
    # initial field error = the true displacement itself: 2 voxels = 4 mm inside the body
    assert by_pair[("f1", "m")]["field_error"]["mean_mm"] == pytest.approx(4.0)
    assert by_pair[("f2", "m")]["field_error"] is None
    assert doc["aggregates"]["initial"]["n_pairs"] == 2
    csv_lines = (rep / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("method,fixed,moving,runtime_s,dice_learn2reg_all13")


def test_stage_with_a_method_and_ground_truth(tmp_path, dataset_dir):
    from pipelines.stages.evaluate import evaluate_stage
    from slicreg.io import load_field, load_labels
    from slicreg.metrics import warp_labels_learn2reg

    # the sign of the true field: warping m with it gives f1 back
    truth = load_field(dataset_dir / "ground_truth_fields/disp_f1_m.nii.gz").array
    f1 = load_labels(dataset_dir / "labelsTr/f1.nii.gz").array
    m = load_labels(dataset_dir / "labelsTr/m.nii.gz").array
    np.testing.assert_array_equal(warp_labels_learn2reg(m, truth), f1)
    method = tmp_path / "method"
    half = truth.copy()
    half[0] = SHIFT / 2  # a method that gets half of the way: 1 voxel = 2 mm off everywhere
    save_field(truth, AFF, method / "fields/disp_f1_m.nii.gz")
    save_field(half, AFF, method / "fields/disp_f2_m.nii.gz")
    (method / "registrations.json").write_text(json.dumps({"method": "shift", "pairs": [
        {"fixed": "f1", "moving": "m", "field": "fields/disp_f1_m.nii.gz", "runtime_s": 1.5},
        {"fixed": "f2", "moving": "m", "field": "fields/disp_f2_m.nii.gz", "runtime_s": 2.5},
        {"fixed": "zz", "moving": "m", "field": "fields/none.nii.gz", "runtime_s": 1.0}]}))
    ctx = _ctx(tmp_path, {"dataset": dataset_dir, "methods": [method]})
    evaluate_stage(ctx)
    doc = strict_json(ctx.out_dir / "report/metrics.json")
    assert doc["methods"] == ["initial", "shift"]
    by = {(r["method"], r["fixed"]): r for r in doc["results"]}
    assert by[("shift", "f1")]["summary"]["dice_learn2reg"]["all13"] == 1.0
    assert by[("shift", "f1")]["field_error"]["mean_mm"] == 0.0
    assert by[("initial", "f1")]["field_error"]["mean_mm"] == pytest.approx(4.0)
    # spleen (5 voxels long on axis 0) off by 1 voxel: Dice 4/5
    assert by[("shift", "f2")]["per_label"]["1"]["dice_learn2reg"] == pytest.approx(0.8)
    agg = doc["aggregates"]["shift"]
    assert agg["runtime_s"]["mean"] == pytest.approx(2.0)
    assert agg["jacobian"]["folding_percent"]["mean"] == 0.0
    assert agg["jacobian"]["sdlogj_learn2reg"]["mean"] == 0.0
    assert agg["field_error"]["mean_mm"]["n"] == 1          # only f1 <- m has a true field
    assert any("not in the dataset" in n for n in doc["notes"])
    index = (ctx.out_dir / "report/index.md").read_text()
    assert "| metric | initial | shift |" in index and "jacobian_shift.png" in index
    assert (ctx.out_dir / "report/figures/jacobian_shift.png").read_bytes()[:4] == b"\x89PNG"
    # an interrupted run resumes from the per-pair files: a rerun in the same folder reads them back
    cached = ctx.out_dir / "pairs/shift/f1__m.json"
    record = json.loads(cached.read_text())
    record["runtime_s"] = 99.0
    cached.write_text(json.dumps(record))
    evaluate_stage(ctx)
    doc2 = strict_json(ctx.out_dir / "report/metrics.json")
    assert {(r["method"], r["fixed"]): r["runtime_s"] for r in doc2["results"]}[("shift", "f1")] == 99.0


def test_stage_scores_a_partial_scan_inside_its_field_of_view(tmp_path, dataset_dir):
    """A fixed scan that is a slab (its crop record marks the rest as padding) has unknown labels outside the slab:
    the warped moving labels there are not false positives (``fov_only``, the default)."""
    from pipelines.stages.evaluate import evaluate_stage

    doc = json.loads((dataset_dir / "dataset.json").read_text())
    fov = np.zeros(SHAPE, np.uint8)
    fov[:, :, 6:11] = 1  # a slab of 5 voxels along axis 2
    save_volume(Volume(fov, AFF), dataset_dir / "crops/f2_fov.nii.gz")
    from slicreg.io import load_labels

    lab = load_labels(dataset_dir / "labelsTr/f2.nii.gz").array
    save_volume(Volume(np.where(fov > 0, lab, 0).astype(np.uint8), AFF), dataset_dir / "labelsTr/f2.nii.gz")
    doc["subjects"]["f2"]["crop"] = "crops/f2_fov.nii.gz"
    (dataset_dir / "dataset.json").write_text(json.dumps(doc))
    truth = np.zeros((3, *SHAPE), np.float32)
    truth[0] = SHIFT
    method = tmp_path / "method"
    save_field(truth, AFF, method / "fields/disp_f2_m.nii.gz")
    (method / "registrations.json").write_text(json.dumps({"method": "truth", "pairs": [
        {"fixed": "f2", "moving": "m", "field": "fields/disp_f2_m.nii.gz", "runtime_s": 1.0}]}))
    scores = {}
    for fov_only in (True, False):
        out = tmp_path / f"fov_{fov_only}"
        out.mkdir()
        ctx = _ctx(out, {"dataset": dataset_dir, "methods": [method]}, fov_only=fov_only)
        evaluate_stage(ctx)
        by = {(r["method"], r["fixed"]): r for r in strict_json(ctx.out_dir / "report/metrics.json")["results"]}
        scores[fov_only] = by[("truth", "f2")]["summary"]["dice_learn2reg"]["all13"]
    assert scores[True] == 1.0  # the true field, scored where the slab has data
    assert scores[False] < 0.8  # every organ voxel the field carries beyond the slab counted as a false positive


def test_stage_through_the_runner_report_location(tmp_path, dataset_dir):
    toml = tmp_path / "p.toml"
    toml.write_text(f"""
[pipeline]
name = "t"
work_dir = "{tmp_path / 'work'}"

[stages.data]
type = "dataset"
folder = "{dataset_dir}"

[stages.evaluate]
inputs = {{ dataset = "data" }}
labels = [1, 2, 6]
""")
    Runner(load_pipeline(toml), quiet=True).run()
    index = tmp_path / "work/evaluate/current/report/index.md"
    assert index.is_file()
    text = index.read_text()
    assert "right kidney" in text and "mean of the labels" in text
