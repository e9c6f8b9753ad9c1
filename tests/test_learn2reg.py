"""Learn2Reg submissions: the shipped pipelines/learn2reg.toml on a tiny AbdomenCTCT-layout folder stored RAS, LAS,
LPS and at 1.5 mm; the fields as Learn2Reg reads them (names, shape, grid); the check against an independent
``map_coordinates`` scorer and against the report; ``slicreg learn2reg``; the reader; ``slicreg preprocess
--dataset`` reruns; ``slicreg run --set``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import helpers_own_data as h
import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from slicreg.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STORAGES = {"ras": ((), 2.0), "las": ((0,), 2.0), "lps": ((0, 1), 2.0), "ras_1.5mm": ((), 1.5),
            "lps_1.5mm": ((0, 1), 1.5)}
VAL_FILES = ["disp_0004_0000_0005_0000.nii.gz", "disp_0004_0000_0006_0000.nii.gz", "disp_0005_0000_0006_0000.nii.gz"]


def _main(args) -> int:
    from pipelines.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return h.tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bundle):
    """The shipped learn2reg.toml, run with the README's command on each storage of the same subjects."""
    out = {}
    for name, (axes, spacing) in STORAGES.items():
        tmp = tmp_path_factory.mktemp(name)
        data = h.make_learn2reg(tmp / "AbdomenCTCT", axes=axes, spacing_mm=spacing)
        code = _main(["run", ROOT / "pipelines/learn2reg.toml", "--work-dir", tmp / "work", "--quiet",
                      "--set", f"data.folder={data}", "--set", "prep.shape=[16,16,24]",
                      "--set", f"register.weights={bundle}"])
        assert code == 0
        out[name] = (data, tmp / "work")
    return out


def independent_scores(data: Path, submission: Path) -> list[float]:
    """Learn2Reg's evaluation written out with nibabel and scipy only: label maps by its rule, the field read with
    get_fdata, map_coordinates(order=0) at identity + field, Dice per label (absent: skipped), nan-mean."""
    doc = json.loads((data / "AbdomenCTCT_dataset.json").read_text())
    scores = []
    for pair in doc["registration_val"]:
        def labels_of(image: str) -> np.ndarray:
            path = data / image.replace("images", "labels")
            if not path.is_file():  # older releases
                path = data / image.replace("images", "labels").replace("_0000.nii.gz", ".nii.gz")
            return nib.load(str(path)).get_fdata()

        fixed, moving = labels_of(pair["fixed"]), labels_of(pair["moving"])
        f_case, m_case = (Path(pair[k]).name.split("_")[1] for k in ("fixed", "moving"))
        disp = nib.load(str(submission / f"disp_{f_case}_0000_{m_case}_0000.nii.gz")).get_fdata()
        assert disp.shape == (*fixed.shape, 3)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.shape], indexing="ij"), axis=-1)
        warped = map_coordinates(moving, np.moveaxis(grid + disp, -1, 0), order=0)
        dice = [2 * np.sum((fixed == k) & (warped == k)) / (np.sum(fixed == k) + np.sum(warped == k))
                if np.any(fixed == k) and np.any(moving == k) else np.nan for k in range(1, 14)]
        scores.append(float(np.nanmean(dice)))
    return scores


def test_pipeline_submission_is_what_learn2reg_reads_and_scores_as_the_report(runs):
    by_storage = {}
    for name, (data, work) in runs.items():
        sub = work / "submission" / "current" / "submission"
        assert sorted(p.name for p in sub.iterdir()) == VAL_FILES
        for file in VAL_FILES:  # the fixed image's shape + (3,), float32, the fixed image's grid
            fixed_case = file.split("_")[1]
            fixed = nib.load(str(data / f"imagesTr/AbdomenCTCT_{fixed_case}_0000.nii.gz"))
            field = nib.load(str(sub / file))
            assert field.shape == (*fixed.shape, 3) and field.get_data_dtype() == np.float32
            assert np.allclose(field.affine, fixed.affine, atol=1e-4)
        check = json.loads((work / "submission" / "current" / "check.json").read_text())
        ours = [p["dice"] for p in check["pairs"]]
        np.testing.assert_allclose(ours, independent_scores(data, sub), rtol=0, atol=1e-12)
        report = json.loads((work / "evaluate" / "current" / "report" / "metrics.json").read_text())
        rows = {(r["fixed"], r["moving"]): r["summary"]["dice_learn2reg"]["all13"] for r in report["results"]
                if r["method"] == "slicreg"}
        assert [rows[(p["fixed"], p["moving"])] for p in check["pairs"]] == ours  # one Dice, the same numbers
        by_storage[name] = ours
    # the same data stored RAS, LAS or LPS scores identically (a field left on the preprocessed grid would not)
    assert by_storage["las"] == by_storage["ras"] and by_storage["lps"] == by_storage["ras"]
    assert by_storage["lps_1.5mm"] == by_storage["ras_1.5mm"]
    assert any(v > 0.05 for v in by_storage["ras"])


def _known_field(prep: Path, fixed: str, moving: str, shift_mm: np.ndarray) -> np.ndarray:
    """The true field between two preprocessed subjects that differ by a world translation (voxels, fixed ->
    moving, on the fixed subject's preprocessed grid), from their crop records."""
    from slicreg.io import read_json

    a_f = np.array(read_json(prep / f"crops/{fixed}.json")["affine"])
    a_m = np.array(read_json(prep / f"crops/{moving}.json")["affine"])
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in h.PREP_SHAPE], indexing="ij"), axis=-1)
    q = (p @ a_f[:3, :3].T + a_f[:3, 3] + shift_mm - a_m[:3, 3]) @ np.linalg.inv(a_m[:3, :3]).T
    return np.moveaxis(q - p, -1, 0)


def test_fields_go_back_to_each_storage_exactly(runs, tmp_path):
    """The map back on known correspondences: the subjects differ by whole-voxel translations, so the true field
    on any storage grid is known; the submitted field must be it, and must score as it does."""
    from pipelines.learn2reg import field_to_submission, score_submission
    from preprocessing.datasets import load_dataset
    from preprocessing.learn2reg import submission_pairs
    from slicreg.io import save_field

    for name, (data, work) in runs.items():
        prep = work / "prep" / "current"
        sub = tmp_path / name
        worst = 0.0
        for file in VAL_FILES:
            a, b = int(file.split("_")[1]), int(file.split("_")[3])
            fixed, moving = f"AbdomenCTCT_{a:04d}", f"AbdomenCTCT_{b:04d}"
            shift = h.l2r_translation_mm(b) - h.l2r_translation_mm(a)
            prep_field = _known_field(prep, fixed, moving, shift)
            save_field(prep_field, np.array(json.loads((prep / f"crops/{fixed}.json").read_text())["affine"]),
                       tmp_path / "u.nii.gz")
            field_to_submission({"field": str(tmp_path / "u.nii.gz"), "fixed_crop": str(prep / f"crops/{fixed}.json"),
                                 "moving_crop": str(prep / f"crops/{moving}.json"), "out": str(sub / file)})
            img_f = nib.load(str(data / f"imagesTr/{fixed}_0000.nii.gz"))
            img_m = nib.load(str(data / f"imagesTr/{moving}_0000.nii.gz"))
            x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in img_f.shape], indexing="ij"), axis=-1)
            truth = ((x @ img_f.affine[:3, :3].T + img_f.affine[:3, 3] + shift - img_m.affine[:3, 3])
                     @ np.linalg.inv(img_m.affine[:3, :3]).T) - x
            got = nib.load(str(sub / file)).get_fdata()
            worst = max(worst, float(np.abs(got - truth).max()))
            if name == "las":  # the preprocessed field taken as the submission (the wrong way) is far off
                assert float(np.abs(np.moveaxis(prep_field, 0, -1) - truth).max()) >= 1.0
        assert worst < 1e-4, (name, worst)
        scores = score_submission(sub, submission_pairs(load_dataset(data), "registration_val"),
                                  labels=range(1, 14))
        dice = [p["dice"] for p in scores["pairs"]]
        np.testing.assert_allclose(dice, independent_scores(data, sub), rtol=0, atol=1e-12)
        if name in ("ras", "las", "lps"):  # whole-voxel translations: every organ lands exactly
            assert dice == [1.0, 1.0, 1.0]
        else:  # 2 mm steps on a 1.5 mm grid: nearest-neighbour rounding at the organ borders
            assert min(dice) > 0.75


def test_learn2reg_command_submit_and_check(runs, bundle, tmp_path, capsys):
    data = h.make_learn2reg(tmp_path / "AbdomenCTCT", axes=(0,), old_label_names=True, test_cases=(31, 32))
    out = tmp_path / "submission"
    assert _main(["learn2reg", "submit", "--dataset", data, "--out", out, "--weights", bundle, "--check",
                  "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "wrote 3 registration_val fields" in text and "mean (std; p30)" in text
    assert sorted(p.name for p in out.iterdir()) == VAL_FILES
    # the test pairs (imagesTs/, no labels): the fields are written, nothing to score
    test_out = tmp_path / "test_submission"
    assert _main(["learn2reg", "submit", "--dataset", data, "--set", "registration_test", "--out", test_out,
                  "--weights", bundle, "--quiet"]) == 0
    assert [p.name for p in test_out.iterdir()] == ["disp_0031_0000_0032_0000.nii.gz"]
    capsys.readouterr()

    assert _main(["learn2reg", "check", "--dataset", data, "--submission", out, "--out-json", tmp_path / "s.json"]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    np.testing.assert_allclose([p["dice"] for p in scores["pairs"]], independent_scores(data, out), atol=1e-12)
    # the check of the pipeline's folder reproduces the stage's check.json
    ras_data, ras_work = runs["ras"]
    assert _main(["learn2reg", "check", "--dataset", ras_data, "--submission",
                  ras_work / "submission" / "current" / "submission", "--out-json", tmp_path / "r.json"]) == 0
    stage_check = json.loads((ras_work / "submission" / "current" / "check.json").read_text())
    assert [p["dice"] for p in json.loads((tmp_path / "r.json").read_text())["pairs"]] == \
        [p["dice"] for p in stage_check["pairs"]]
    capsys.readouterr()

    def error_line() -> str:
        err = capsys.readouterr().err.strip()
        assert err.startswith("slicreg learn2reg: error:") and "\n" not in err and "Traceback" not in err
        return err

    (out / VAL_FILES[1]).unlink()
    assert _main(["learn2reg", "check", "--dataset", data, "--submission", out]) == 2
    assert VAL_FILES[1] in error_line()
    src = nib.load(str(out / VAL_FILES[0]))
    nib.save(nib.Nifti1Image(np.zeros((*src.shape[:2], src.shape[2] - 1, 3), np.float32), src.affine),
             str(out / VAL_FILES[1]))
    assert _main(["learn2reg", "check", "--dataset", data, "--submission", out]) == 2
    assert "fixed image's shape + (3,)" in error_line()


def test_learn2reg_reader_label_names_test_pairs_and_partial_folders(tmp_path):
    from preprocessing.datasets import load_dataset
    from preprocessing.learn2reg import displacement_filename, parse_displacement_filename, submission_pairs

    new = load_dataset(h.make_learn2reg(tmp_path / "new", test_cases=(31, 32)))
    old = load_dataset(h.make_learn2reg(tmp_path / "old", old_label_names=True))
    assert new.subjects["AbdomenCTCT_0002"].labels.name == "AbdomenCTCT_0002_0000.nii.gz"
    assert old.subjects["AbdomenCTCT_0002"].labels.name == "AbdomenCTCT_0002.nii.gz"
    assert new.subjects["AbdomenCTCT_0004"].extra["learn2reg"] == {"task": "AbdomenCTCT", "case": "0004",
                                                                   "modality": "0000"}
    sets = [p.extra["learn2reg"] for p in new.pairs]
    assert sets == ["registration_val"] * 3 + ["registration_test"]
    assert new.subjects["AbdomenCTCT_0031"].role == "test" and "AbdomenCTCT_0031" not in new.training
    test_pairs = submission_pairs(new, "registration_test")
    assert [q.file for q in test_pairs] == ["disp_0031_0000_0032_0000.nii.gz"] and test_pairs[0].fixed_labels is None
    with pytest.raises(InputError, match="no registration_test pairs"):
        submission_pairs(old, "registration_test")
    assert displacement_filename("0001", "0000", "0002", "0001") == "disp_0001_0000_0002_0001.nii.gz"
    assert parse_displacement_filename("disp_0001_0000_0002_0001.nii.gz") == ("0001", "0000", "0002", "0001")
    with pytest.raises(InputError, match="4 digits"):
        displacement_filename("1", "0000", "0002", "0000")

    # a training image listed in the json but absent: an error naming it, or (partial) a note and its pairs left out
    root = tmp_path / "new"
    (root / "imagesTr/AbdomenCTCT_0005_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="AbdomenCTCT_0005_0000.nii.gz"):
        load_dataset(root)
    partial = load_dataset(root, partial=True)
    assert "AbdomenCTCT_0005" not in partial.subjects
    assert [(p.fixed, p.moving) for p in partial.pairs if p.extra["learn2reg"] == "registration_val"] == \
        [("AbdomenCTCT_0004", "AbdomenCTCT_0006")]
    assert any("imagesTr/AbdomenCTCT_0005_0000.nii.gz" in n for n in partial.notes)
    assert any("2 of the 3 registration_val pair(s) are left out" in n for n in partial.notes)


def test_preprocess_command_reruns_keep_done_subjects_and_report_absent_entries(tmp_path, capsys):
    data = h.make_learn2reg(tmp_path / "AbdomenCTCT", n_train=1, n_val=2, test_cases=(31,))
    (data / "imagesTs/AbdomenCTCT_0031_0000.nii.gz").unlink()  # listed in the json, not shipped
    out = tmp_path / "prep"
    args = ["preprocess", "--dataset", data, "--out", out, "--shape", "16", "16", "24"]
    assert _main(args) == 0
    first = capsys.readouterr().out
    assert "imagesTs/AbdomenCTCT_0031_0000.nii.gz" in first and "note:" in first
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "imagesTr").iterdir()}
    assert len(stamps) == 3
    assert _main(args) == 0
    assert "3 subject(s) already preprocessed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "imagesTr").iterdir()} == stamps
    # a changed source or parameter is preprocessed again
    src = data / "imagesTr/AbdomenCTCT_0002_0000.nii.gz"
    os.utime(src, ns=(src.stat().st_atime_ns, max(stamps.values()) + 10**9))
    assert _main(args) == 0
    assert "2 subject(s) already preprocessed" in capsys.readouterr().out
    assert _main([*args[:-3], "16", "16", "32"]) == 0
    assert "already preprocessed" not in capsys.readouterr().out


def test_run_set_overrides(tmp_path):
    from pipelines.runner import load_pipeline

    pipe = load_pipeline(ROOT / "pipelines/learn2reg.toml",
                         overrides=[f"data.folder={tmp_path}", "prep.shape=[16, 16, 24]", "register.flow.iterations=5",
                                    "evaluate.hd95=false"])
    params = {s.stage_id: s.params for s in pipe.stages}
    assert params["data"]["folder"] == str(tmp_path) and params["prep"]["shape"] == [16, 16, 24]
    assert params["register"]["flow"] == {"iterations": 5} and params["evaluate"]["hd95"] is False
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_pipeline(ROOT / "pipelines/learn2reg.toml", overrides=["nope.folder=x"])
    with pytest.raises(ConfigError, match="STAGE.KEY=VALUE"):
        load_pipeline(ROOT / "pipelines/learn2reg.toml", overrides=["data.folder"])
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_pipeline(ROOT / "pipelines/learn2reg.toml", overrides=[f"data.folder={tmp_path}", "prep.shap=[1]"])


def test_command_and_pipeline_write_the_same_submission(runs, bundle, tmp_path):
    for name in ("ras", "lps_1.5mm"):
        data, work = runs[name]
        out = tmp_path / name
        assert _main(["learn2reg", "submit", "--dataset", data, "--out", out, "--weights", bundle, "--quiet"]) == 0
        for file in VAL_FILES:
            ours = nib.load(str(out / file)).get_fdata()
            stage = nib.load(str(work / "submission" / "current" / "submission" / file)).get_fdata()
            np.testing.assert_allclose(ours, stage, rtol=0, atol=1e-4)


def test_pipeline_writes_the_registration_test_list(bundle, tmp_path):
    data = h.make_learn2reg(tmp_path / "AbdomenCTCT", axes=(0, 1), test_cases=(31, 32, 33))
    sets = [f"data.folder={data}", "prep.shape=[16,16,24]", f"register.weights={bundle}",
            "register.pairs=registration_test", "submission.set=registration_test", "submission.check=false"]
    args = ["run", ROOT / "pipelines/learn2reg.toml", "--work-dir", tmp_path / "work", "--quiet",
            "--until", "submission"]
    for s in sets:
        args += ["--set", s]
    assert _main(args) == 0
    sub = tmp_path / "work" / "submission" / "current" / "submission"
    assert sorted(p.name for p in sub.iterdir()) == [
        "disp_0031_0000_0032_0000.nii.gz", "disp_0031_0000_0033_0000.nii.gz", "disp_0032_0000_0033_0000.nii.gz"]
    fixed = nib.load(str(data / "imagesTs/AbdomenCTCT_0031_0000.nii.gz"))
    field = nib.load(str(sub / "disp_0031_0000_0032_0000.nii.gz"))
    assert field.shape == (*fixed.shape, 3) and np.allclose(field.affine, fixed.affine)
    assert not (tmp_path / "work" / "submission" / "current" / "check.json").exists()
