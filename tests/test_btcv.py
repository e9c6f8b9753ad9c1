"""BTCV with the shipped pipeline files on a tiny BTCV-layout folder (anisotropic raw scans stored LPS): the
paper's path (pipelines/btcv.toml: #38's supervoxels, transfer, training, atlas registration, the paper's table),
the inference-only variant on a partial folder, and atlas mode refused for a template the bundle was not trained
on -- by the pipeline and by ``slicreg register``."""

from __future__ import annotations

import json
from pathlib import Path

import helpers_own_data as h
import numpy as np
import pytest

from preprocessing.datasets import BTCV_TEMPLATE, BTCV_TEST, BTCV_TRAIN
from slicreg.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["prep.shape=[16,16,24]"]
TINY_TRAIN = ["train.iterations=2", "train.batch_size=2", "train.head_voxels=48", 'train.backward="eager"',
              "train.channels_last=false", "train.val_subjects=0", "train.checkpointing=false",
              'transfer.align_preset="affine"', "register-refine.refine_options={iterations=3}"]


def _main(args) -> int:
    from pipelines.cli import main

    return main([str(a) for a in args])


def _run(pipeline: str, work: Path, sets: list[str]) -> int:
    args = ["run", ROOT / "pipelines" / pipeline, "--work-dir", work, "--quiet"]
    for s in sets:
        args += ["--set", s]
    return _main(args)


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slicreg {command}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def foreign_bundle(tmp_path_factory):
    """Weights trained on some other template (as the shipped ones are, for a BTCV user)."""
    tmp = tmp_path_factory.mktemp("foreign")
    image, _ = h.scan(h.subject_params(999), h.PREP_SHAPE, np.diag([2.0, 2.0, 2.0, 1.0]))
    from slicreg.io import save_volume

    save_volume(image, tmp / "their_template_0000.nii.gz")
    return h.tiny_bundle(tmp, template=tmp / "their_template_0000.nii.gz")


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("btcv")
    data = h.make_btcv(tmp / "BTCV", [*BTCV_TRAIN, *BTCV_TEST, BTCV_TEMPLATE])
    assert _run("btcv.toml", tmp / "work", [f"data.folder={data}", *TINY, *TINY_TRAIN]) == 0
    return data, tmp / "work"


def test_btcv_paper_path_trains_on_38_and_registers_the_validation_scans_to_it(paper_run):
    data, work = paper_run
    prep = work / "prep" / "current"
    crop = json.loads((prep / "crops" / "btcv_0038.json").read_text())
    assert crop["original_axcodes"] == "LPS" and np.allclose(crop["spacing_mm"], 2.0)
    assert np.allclose(np.linalg.norm(np.array(crop["original_affine"])[:3, :3], axis=0), h.BTCV_SPACING_MM)
    card = json.loads((work / "train" / "current" / "bundle" / "model_card.json").read_text())
    assert card["template"]["image_sha256"] == sha256_file(prep / "imagesTr" / "btcv_0038_0000.nii.gz")
    for stage in ("register", "register-refine"):
        doc = json.loads((work / stage / "current" / "registrations.json").read_text())
        assert doc["atlas"] is True and doc["network_s"]["btcv_0038"] == 0.0  # #38's own supervoxels
        assert [(p["fixed"], p["moving"]) for p in doc["pairs"]] == [(f"btcv_{n:04d}", "btcv_0038") for n in BTCV_TEST]
    report = (work / "evaluate" / "current" / "report" / "index.md").read_text()
    assert "The SLIC-Reg paper's Table 1 layout" in report and "| paper: SLIC-Reg (DeepLab" in report
    assert "| slicreg (this run, 9 pairs) |" in report


def test_register_command_atlas_mode_with_the_trained_bundle_and_refusals(paper_run, foreign_bundle, tmp_path, capsys):
    data, work = paper_run
    prep = work / "prep" / "current" / "imagesTr"
    bundle = work / "train" / "current" / "bundle"
    common = ["register", "--fixed", prep / "btcv_0001_0000.nii.gz", "--out-field", tmp_path / "u.nii.gz"]
    # the template the bundle was trained on: by its image, and by the supervoxels it was trained on
    assert _main([*common, "--moving", prep / "btcv_0038_0000.nii.gz", "--atlas", "--weights", bundle]) == 0
    assert _main([*common, "--moving", prep / "btcv_0038_0000.nii.gz", "--atlas", "--weights", bundle,
                  "--template-supervoxels", work / "supervoxels" / "current"]) == 0
    capsys.readouterr()
    # the raw #38 (not the image the supervoxels were made on), and #38 with weights trained on another template
    raw38 = data / "RawData/Training/img/img0038.nii.gz"
    assert _main([*common, "--moving", raw38, "--atlas", "--weights", bundle]) == 2
    err = _error_line(capsys, "register")
    assert "--atlas refused" in err and "pairwise" in err
    assert _main([*common, "--moving", prep / "btcv_0038_0000.nii.gz", "--atlas", "--weights", foreign_bundle]) == 2
    assert "is not the image the bundle's template supervoxels were made on" in _error_line(capsys, "register")
    assert _main([*common, "--moving", prep / "btcv_0038_0000.nii.gz", "--atlas", "--weights", foreign_bundle,
                  "--template-supervoxels", work / "supervoxels" / "current"]) == 2
    assert "not the ones the bundle was trained on" in _error_line(capsys, "register")
    # without --atlas the same pair registers (pairwise)
    assert _main([*common, "--moving", raw38, "--weights", foreign_bundle]) == 0


def test_pipeline_refuses_atlas_mode_with_a_foreign_template_in_one_line(foreign_bundle, tmp_path, capsys):
    data = h.make_btcv(tmp_path / "BTCV", [BTCV_TEMPLATE, 1, 4])
    sets = [f"data.folder={data}", *TINY, f"register.weights={foreign_bundle}",
            f"register-refine.weights={foreign_bundle}", "register.atlas=true"]
    assert _run("btcv-inference.toml", tmp_path / "work", sets) == 2
    err = _error_line(capsys, "run")
    assert "atlas = true refused for the template btcv_0038" in err and "pairwise" in err
    assert not (tmp_path / "work" / "register" / "current").exists()  # no field, no number


def test_btcv_inference_accepts_a_partial_folder_and_training_names_the_missing_scans(foreign_bundle, tmp_path,
                                                                                      capsys):
    data = h.make_btcv(tmp_path / "BTCV", [BTCV_TEMPLATE, 1, 4, 7, 2])
    (data / "RawData/Training/label/label0007.nii.gz").unlink()
    sets = [f"data.folder={data}", *TINY, f"register.weights={foreign_bundle}",
            f"register-refine.weights={foreign_bundle}", "register-refine.refine_options={iterations=3}"]
    assert _run("btcv-inference.toml", tmp_path / "work", sets) == 0
    out = capsys.readouterr().out
    assert "25 scan(s) of the paper's split are not in" in out and "#3 (train)" in out
    doc = json.loads((tmp_path / "work" / "register" / "current" / "registrations.json").read_text())
    assert doc["atlas"] is False and doc["network_s"]["btcv_0038"] > 0  # pairwise: #38 has its own network pass
    assert [p["fixed"] for p in doc["pairs"]] == ["btcv_0001", "btcv_0004", "btcv_0007"]
    metrics = json.loads((tmp_path / "work" / "evaluate" / "current" / "report" / "metrics.json").read_text())
    assert {r["fixed"] for r in metrics["results"]} == {"btcv_0001", "btcv_0004"}  # #7 has no labels: not scored
    assert any("btcv_0007" in n and "no label map" in n for n in metrics["notes"])

    # the paper's path needs the whole split and says which scans are missing, before any work
    assert _run("btcv.toml", tmp_path / "train", [f"data.folder={data}", *TINY, *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert "img0003.nii.gz (scan #3 of the paper's split, role train)" in err
    assert "label0007.nii.gz (labels of scan #7)" in err
    assert not (tmp_path / "train" / "prep").exists()

    # without #38 the inference pipeline asks for another template
    for f in ("img/img0038.nii.gz", "label/label0038.nii.gz"):
        (data / "RawData/Training" / f).unlink()
    assert _run("btcv-inference.toml", tmp_path / "no38", sets) == 2
    assert "the template, scan #38 (img0038.nii.gz), is not in the folder" in capsys.readouterr().err
    assert _run("btcv-inference.toml", tmp_path / "no38", [*sets, "data.template=1"]) == 0


def test_atlas_template_rules(tmp_path):
    from slicreg.bundle import atlas_template_problem, load_bundle

    template = tmp_path / "t.nii.gz"
    template.write_bytes(b"template image")
    own = h.tiny_bundle(tmp_path / "own", template=template)
    b = load_bundle(own)
    sha = sha256_file(template)
    assert atlas_template_problem(b, template_sha256=sha) is None  # rule 1: the image itself
    assert "is not the image" in atlas_template_problem(b, template_sha256="0" * 64)
    sv = np.asarray(b.template_supervoxels.array)
    anonymous = load_bundle(h.tiny_bundle(tmp_path / "anonymous"))  # records no template image
    same_sv = np.asarray(anonymous.template_supervoxels.array)
    assert "does not record" in atlas_template_problem(anonymous, template_sha256=sha)
    # rule 2: the supervoxels it was trained on, made on this image
    assert atlas_template_problem(anonymous, template_sha256=sha, supervoxels=same_sv,
                                  supervoxels_template_sha256=sha) is None
    assert "made on another image" in atlas_template_problem(anonymous, template_sha256=sha, supervoxels=same_sv,
                                                             supervoxels_template_sha256="1" * 64)
    assert "do not record" in atlas_template_problem(anonymous, template_sha256=sha, supervoxels=same_sv)
    other = same_sv.copy()
    other[0, 0, 0, 0] = (int(other[0, 0, 0, 0]) + 1) % 128
    assert "not the ones the bundle was trained on" in atlas_template_problem(
        anonymous, template_sha256=sha, supervoxels=other, supervoxels_template_sha256=sha)
    assert sv.shape == same_sv.shape


def test_register_help_states_the_refinement_default(capsys):
    from slicreg.alignment import PRESETS
    from slicreg.registration import REFINE_PRESET

    with pytest.raises(SystemExit):
        _main(["register", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    stage = PRESETS[REFINE_PRESET].stage("deformable")
    levels = ", ".join(f"{n} at {2 * f} mm" for n, f in zip(stage.iterations, stage.levels))  # 2 mm scans
    assert f"Adam steps of --refine on each of its levels (default {levels}:" in text


@pytest.mark.parametrize("name", ["demo.toml", "demo-train.toml", "btcv.toml", "btcv-inference.toml",
                                  "learn2reg.toml"])
def test_shipped_pipelines_load(name, tmp_path):
    from pipelines.runner import load_pipeline

    text = (ROOT / "pipelines" / name).read_text()
    sets = [f"data.folder={tmp_path}"] if "[stages.data]" in text else []
    pipe = load_pipeline(ROOT / "pipelines" / name, overrides=sets)
    assert pipe.stages
