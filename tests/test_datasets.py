"""Dataset folders (slicreg / BTCV / Learn2Reg), their validation, and the dataset / preprocess stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocessing.datasets import (
    BTCV_TEST,
    BTCV_TRAIN,
    DATASET_FORMAT,
    Dataset,
    Pair,
    Subject,
    dataset_to_json,
    detect_layout,
    load_dataset,
    write_dataset_json,
)
from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import save_volume

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def ct_and_labels(shape=(12, 10, 14), affine=AFF, seed=0):
    """A tiny CT (a soft-tissue box in air) and a label map with one organ."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, np.int16)
    hu[2:-2, 2:-2, 2:-2] = 40
    hu += rng.integers(-5, 5, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[3:6, 3:6, 4:8] = 6
    return Volume(hu, affine), Volume(lab, affine)


def write_pair(image_path: Path, labels_path: Path | None, *, shape=(12, 10, 14), affine=AFF, seed=0,
               labels_affine=None, labels_shape=None):
    image, labels = ct_and_labels(shape, affine, seed)
    save_volume(image, image_path)
    if labels_path is not None:
        if labels_shape is not None:
            labels = Volume(np.zeros(labels_shape, np.uint8), affine)
        save_volume(Volume(labels.array, labels_affine if labels_affine is not None else affine), labels_path)


def make_slicreg(root: Path, *, extra_subject=None) -> Path:
    """A dataset folder in the project's layout with a template, 2 training and 2 test subjects."""
    subjects = {}
    for i, role in enumerate(["template", "train", "train", "test", "test"]):
        sid = f"s{i}"
        write_pair(root / f"imagesTr/{sid}_0000.nii.gz", root / f"labelsTr/{sid}.nii.gz", seed=i)
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "labels": f"labelsTr/{sid}.nii.gz", "role": role}
    subjects["s4"]["tags"] = ["slab"]
    if extra_subject:
        subjects.update(extra_subject)
    doc = {"name": "tiny", "format": DATASET_FORMAT, "template": "s0", "subjects": subjects,
           "training": ["s1", "s2"], "test": ["s3", "s4"],
           "registration_pairs": [{"fixed": "s3", "moving": "s0"}, {"fixed": "s3", "moving": "s4"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


# ------------------------------------------------------------------------------------------ slicreg layout
def test_slicreg_layout_roundtrip(tmp_path):
    root = make_slicreg(tmp_path / "ds")
    ds = load_dataset(root)
    assert ds.layout == "slicreg" and ds.name == "tiny" and ds.template == "s0"
    assert ds.training == ["s1", "s2"] and ds.test == ["s3", "s4"]
    assert ds.subjects["s4"].tags == ("slab",) and ds.subjects["s1"].role == "train"
    assert ds.subjects["s0"].image == root / "imagesTr/s0_0000.nii.gz"
    assert [(p.fixed, p.moving) for p in ds.pairs] == [("s3", "s0"), ("s3", "s4")]
    assert ds.labels[1] == "spleen"
    # write elsewhere: paths outside that folder become absolute and the copy reads back the same
    out = write_dataset_json(ds, tmp_path / "copy")
    doc = json.loads(out.read_text())
    assert Path(doc["subjects"]["s0"]["image"]).is_absolute()
    again = load_dataset(tmp_path / "copy")
    assert again.subjects == ds.subjects and again.pairs == ds.pairs and again.template == ds.template
    # written in place: relative paths
    write_dataset_json(ds)
    assert json.loads((root / "dataset.json").read_text())["subjects"]["s0"]["image"] == "imagesTr/s0_0000.nii.gz"


def test_absolute_paths_roles_only_and_ground_truth_fields(tmp_path):
    root = tmp_path / "ds"
    elsewhere = tmp_path / "data"
    write_pair(elsewhere / "a.nii.gz", elsewhere / "a_lab.nii.gz")
    write_pair(elsewhere / "b.nii.gz", None, seed=1)
    (root / "ground_truth_fields").mkdir(parents=True)
    (root / "ground_truth_fields/disp_b_a.nii.gz").write_bytes(b"x")
    doc = {"subjects": {"a": {"image": str(elsewhere / "a.nii.gz"), "labels": str(elsewhere / "a_lab.nii.gz"),
                              "role": "template"},
                        "b": {"image": str(elsewhere / "b.nii.gz"), "role": "test", "transform": "t/b.npz"}},
           "registration_pairs": [{"fixed": "b", "moving": "a",
                                   "ground_truth_field": "ground_truth_fields/disp_b_a.nii.gz"}]}
    root.mkdir(exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"t/b\.npz \(transform of b\)"):
        load_dataset(root)
    (root / "t").mkdir()
    (root / "t/b.npz").write_bytes(b"")
    ds = load_dataset(root)
    assert ds.template == "a" and ds.test == ["b"] and ds.training == []
    assert ds.subjects["b"].labels is None and ds.subjects["b"].files["transform"] == root / "t/b.npz"
    assert ds.ground_truth_fields == {("b", "a"): root / "ground_truth_fields/disp_b_a.nii.gz"}


def test_all_problems_are_reported_together(tmp_path):
    root = make_slicreg(tmp_path / "ds")
    doc = json.loads((root / "dataset.json").read_text())
    doc["subjects"]["s5"] = {"image": "imagesTr/missing_0000.nii.gz", "role": "unused"}
    doc["subjects"]["s6"] = {"image": "imagesTr/s6_0000.nii.gz", "labels": "labelsTr/s6.nii.gz", "role": "unused"}
    doc["subjects"]["s7"] = {"image": "imagesTr/s7_0000.nii.gz", "labels": "labelsTr/s7.nii.gz", "role": "unused"}
    doc["registration_pairs"].append({"fixed": "s3", "moving": "nobody"})
    doc["training"].append("s1")
    write_pair(root / "imagesTr/s6_0000.nii.gz", root / "labelsTr/s6.nii.gz", labels_shape=(12, 10, 13))
    shifted = AFF.copy()
    shifted[2, 3] = 1.0
    write_pair(root / "imagesTr/s7_0000.nii.gz", root / "labelsTr/s7.nii.gz", labels_affine=shifted)
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(InputError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "problem(s) found before any work started" in msg
    assert "missing file" in msg and "missing_0000.nii.gz" in msg
    assert "grid mismatch for s6" in msg and "(12, 10, 13)" in msg
    assert "grid mismatch for s7" in msg and "affines differ" in msg
    assert "unknown subject 'nobody'" in msg
    assert "training: duplicate id 's1'" in msg


def test_duplicate_ids_in_json_and_bad_entries(tmp_path):
    root = make_slicreg(tmp_path / "ds")
    text = (root / "dataset.json").read_text()
    # a JSON object with the same key twice: json.loads would silently keep the last one
    text = text.replace('"subjects": {', '"subjects": {"s1": {"image": "imagesTr/s2_0000.nii.gz"}, ', 1)
    (root / "dataset.json").write_text(text)
    with pytest.raises(InputError, match="duplicate key 's1'"):
        load_dataset(root)
    make_slicreg(root)
    doc = json.loads((root / "dataset.json").read_text())
    doc["subjects"]["s2"]["image"] = "imagesTr/s1_0000.nii.gz"  # two ids, one file
    doc["subjects"]["bad/id"] = {"image": "imagesTr/s0_0000.nii.gz", "role": "boss"}
    doc["test"].append("s1")
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(InputError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "also used by s1" in msg and "'bad/id'" in msg and "role 'boss'" in msg
    assert "both training and test: s1" in msg


def test_write_refuses_an_inconsistent_dataset(tmp_path):
    ds = Dataset(root=tmp_path, name="x", subjects={"a": Subject("a", Path("a.nii.gz"), role="train")},
                 template="zz", pairs=[Pair("a", "a")])
    with pytest.raises(InputError) as err:
        write_dataset_json(ds)
    assert "template: unknown subject 'zz'" in str(err.value) and "same subject" in str(err.value)
    assert not (tmp_path / "dataset.json").exists()


# ---------------------------------------------------------------------------------------------------- BTCV
def make_btcv(root: Path, numbers) -> Path:
    for n in numbers:
        write_pair(root / f"img/img{n:04d}.nii.gz", root / f"label/label{n:04d}.nii.gz", shape=(4, 4, 3), seed=n)
    return root


def test_btcv_layout_has_the_paper_split(tmp_path):
    root = make_btcv(tmp_path / "RawData" / "Training", list(BTCV_TRAIN) + list(BTCV_TEST) + [38, 61])
    ds = load_dataset(tmp_path)  # found under RawData/Training
    assert detect_layout(tmp_path) == "btcv" and ds.layout == "btcv" and ds.root == root
    assert ds.template == "btcv_0038" and ds.subjects["btcv_0038"].role == "template"
    assert len(ds.training) == 20 and "btcv_0002" in ds.training and "btcv_0040" in ds.training
    assert ds.test == [f"btcv_{n:04d}" for n in (1, 4, 7, 10, 23, 26, 29, 32, 35)]
    assert all(p.moving == "btcv_0038" for p in ds.pairs) and [p.fixed for p in ds.pairs] == ds.test
    assert ds.subjects["btcv_0061"].role == "unused"
    assert ds.subjects["btcv_0001"].labels == root / "label/label0001.nii.gz"
    # another template: #38 becomes a test scan, the pairs follow
    other = load_dataset(tmp_path, layout="btcv", template="1")
    assert other.template == "btcv_0001" and "btcv_0038" in other.test and "btcv_0001" not in other.test
    assert {p.moving for p in other.pairs} == {"btcv_0001"} and len(other.pairs) == 9
    with pytest.raises(InputError, match="not a subject"):
        load_dataset(tmp_path, template="99")


def test_btcv_missing_and_duplicate_files(tmp_path):
    root = make_btcv(tmp_path, [n for n in list(BTCV_TRAIN) + list(BTCV_TEST) + [38] if n != 22])
    (root / "label/label0003.nii.gz").unlink()
    write_pair(root / "img/img0005.nii", None, shape=(4, 4, 3))  # the same scan twice (.nii and .nii.gz)
    write_pair(root / "img/img0070.nii.gz", root / "label/label0070.nii.gz", shape=(4, 4, 3))
    (root / "img/img0070.nii.gz").unlink()
    with pytest.raises(InputError) as err:
        load_dataset(root, layout="btcv")
    msg = str(err.value)
    assert "img0022.nii.gz (scan #22" in msg and "label0003.nii.gz (labels of scan #3)" in msg
    assert "duplicate id" in msg and "img0005" in msg
    assert "label0070.nii.gz: label map without an image" in msg


# ----------------------------------------------------------------------------------------------- Learn2Reg
def make_learn2reg(root: Path, n=6, val=(4, 5, 6)) -> Path:
    training = []
    for i in range(1, n + 1):
        img = f"imagesTr/AbdomenCTCT_{i:04d}_0000.nii.gz"
        lab = f"labelsTr/AbdomenCTCT_{i:04d}.nii.gz"
        write_pair(root / img, root / lab, shape=(6, 5, 4), seed=i)
        training.append({"image": f"./{img}", "label": f"./{lab}"})
    pairs = [{"fixed": f"./imagesTr/AbdomenCTCT_{a:04d}_0000.nii.gz",
              "moving": f"./imagesTr/AbdomenCTCT_{b:04d}_0000.nii.gz"} for a in val for b in val if a < b]
    doc = {"name": "AbdomenCTCT", "labels": {"0": {"1": "spleen", "6": "liver"}}, "numTraining": n,
           "training": training, "test": [{"image": "./imagesTs/AbdomenCTCT_0031_0000.nii.gz"}],
           "numRegistration_val": len(pairs), "registration_val": pairs}
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(doc))
    return root


def test_learn2reg_layout(tmp_path):
    root = make_learn2reg(tmp_path / "AbdomenCTCT")
    assert detect_layout(root) == "learn2reg"
    ds = load_dataset(root)
    assert ds.layout == "learn2reg" and ds.name == "AbdomenCTCT"
    assert ds.template == "AbdomenCTCT_0004"
    assert ds.training == ["AbdomenCTCT_0001", "AbdomenCTCT_0002", "AbdomenCTCT_0003"]
    assert ds.test == ["AbdomenCTCT_0005", "AbdomenCTCT_0006"]
    assert [(p.fixed, p.moving) for p in ds.pairs] == [("AbdomenCTCT_0004", "AbdomenCTCT_0005"),
                                                       ("AbdomenCTCT_0004", "AbdomenCTCT_0006"),
                                                       ("AbdomenCTCT_0005", "AbdomenCTCT_0006")]
    assert ds.subjects["AbdomenCTCT_0002"].labels == root / "labelsTr/AbdomenCTCT_0002.nii.gz"
    assert ds.labels == {1: "spleen", 6: "liver"}
    assert any("imagesTs" in n for n in ds.notes)  # the unshipped test image is noted, not an error
    # the json file itself can be given, and the template chosen
    ds2 = load_dataset(root / "AbdomenCTCT_dataset.json", template="AbdomenCTCT_0001")
    assert ds2.template == "AbdomenCTCT_0001" and "AbdomenCTCT_0004" in ds2.test
    # written as the project's dataset.json and read back
    write_dataset_json(ds, tmp_path / "as_slicreg", absolute=True)
    again = load_dataset(tmp_path / "as_slicreg")
    assert again.subjects == ds.subjects and again.pairs == ds.pairs


def test_learn2reg_bad_pair_and_missing_label(tmp_path):
    root = make_learn2reg(tmp_path / "l2r")
    doc = json.loads((root / "AbdomenCTCT_dataset.json").read_text())
    doc["registration_val"].append({"fixed": "./imagesTr/AbdomenCTCT_0099_0000.nii.gz",
                                    "moving": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz"})
    doc["training"].append(dict(doc["training"][0]))
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(doc))
    (root / "labelsTr/AbdomenCTCT_0002.nii.gz").unlink()
    with pytest.raises(InputError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "AbdomenCTCT_0099_0000.nii.gz' is not an image of the training list" in msg
    assert "duplicate id 'AbdomenCTCT_0001'" in msg and "AbdomenCTCT_0002.nii.gz (labels of AbdomenCTCT_0002)" in msg


def test_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot tell the dataset layout"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="layout: expected"):
        load_dataset(tmp_path / "empty", layout="nnunet")
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- the stages
def body(shape, affine, seed):
    """A tiny CT with a soft-tissue ellipsoid and two organs (for the preprocess stage)."""
    idx = np.indices(shape).astype(np.float64)
    c = (np.array(shape) - 1).reshape(3, 1, 1, 1) / 2
    r = (np.array(shape) * 0.4).reshape(3, 1, 1, 1)
    inside = (((idx - c) / r) ** 2).sum(0) <= 1
    rng = np.random.default_rng(seed)
    hu = np.where(inside, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[inside & (idx[0] < c[0, 0, 0, 0])] = 6
    lab[inside & (idx[0] >= c[0, 0, 0, 0]) & (idx[2] > c[2, 0, 0, 0])] = 1
    return Volume(hu, affine), Volume(lab, affine)


def make_stage_input(root: Path) -> Path:
    """A dataset with 3 subjects on different grids (one LPS) and a true field for the pair s2 <- s0."""
    from slicreg.io import save_field

    grids = {"s0": ((14, 12, 16), np.diag([2.0, 2.0, 2.0, 1.0])),
             "s1": ((16, 12, 8), np.diag([-1.8, -2.0, 4.0, 1.0])),
             "s2": ((12, 14, 16), np.diag([2.0, 2.0, 2.0, 1.0]))}
    grids["s2"][1][:3, 3] = (4.0, -2.0, 2.0)
    subjects = {}
    for i, (sid, (shape, aff)) in enumerate(grids.items()):
        image, labels = body(shape, aff, i)
        save_volume(image, root / f"imagesTr/{sid}_0000.nii.gz")
        save_volume(labels, root / f"labelsTr/{sid}.nii.gz")
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "labels": f"labelsTr/{sid}.nii.gz",
                         "role": ["template", "train", "test"][i]}
    # true field s2 -> s0 (fixed s2): the world identity plus a smooth shift, in s0's voxels
    f_shape, f_aff = grids["s2"]
    m_shape, m_aff = grids["s0"]
    idx = np.indices(f_shape).astype(np.float64)
    world = np.einsum("ab,b...->a...", f_aff[:3, :3], idx) + f_aff[:3, 3].reshape(3, 1, 1, 1)
    m_inv = np.linalg.inv(m_aff)
    q = np.einsum("ab,b...->a...", m_inv[:3, :3], world) + m_inv[:3, 3].reshape(3, 1, 1, 1)
    u = (q - idx + 0.7 * np.sin(idx[2] / 4.0)).astype(np.float32)
    save_field(u, f_aff, root / "ground_truth_fields/disp_s2_s0.nii.gz")
    doc = {"name": "stage-test", "format": DATASET_FORMAT, "template": "s0", "subjects": subjects,
           "training": ["s1"], "test": ["s2"],
           "registration_pairs": [{"fixed": "s2", "moving": "s0",
                                   "ground_truth_field": "ground_truth_fields/disp_s2_s0.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    np.save(root / "u_true.npy", u)
    return root


def test_dataset_and_preprocess_stages(tmp_path):
    from pipelines.runner import Runner, load_pipeline
    from slicreg.fields import warp_labels
    from slicreg.geometry import CropRecord, field_to_preprocessed_grid
    from slicreg.io import load_field, load_image, load_labels, read_json

    src = make_stage_input(tmp_path / "user_data")
    toml = tmp_path / "p.toml"
    toml.write_text(f"""
[pipeline]
name = "t"
work_dir = "{tmp_path / 'work'}"

[stages.data]
type = "dataset"
layout = "slicreg"
folder = "{src}"

[stages.prep]
type = "preprocess"
inputs = {{ dataset = "data" }}
spacing_mm = 2.0
shape = [16, 16, 16]
""")
    Runner(load_pipeline(toml), quiet=True).run()
    data_dir = tmp_path / "work/data/current"
    doc = json.loads((data_dir / "dataset.json").read_text())
    assert Path(doc["subjects"]["s0"]["image"]).is_absolute()  # the dataset stage writes absolute paths
    out = tmp_path / "work/prep/current"
    ds = load_dataset(out)
    assert ds.template == "s0" and ds.training == ["s1"] and ds.test == ["s2"]
    assert ds.extra["preprocessing"]["shape"] == [16, 16, 16]
    for sid in ("s0", "s1", "s2"):
        image = load_image(out / f"imagesTr/{sid}_0000.nii.gz")
        assert image.shape == (16, 16, 16) and np.allclose(image.spacing_mm, 2.0)
        rec = CropRecord.from_json(read_json(out / f"crops/{sid}.json"))
        assert np.allclose(rec.affine, image.affine)
        assert ds.subjects[sid].files["crop"] == out / f"crops/{sid}.json"
        assert ds.subjects[sid].extra["original"]["image"].endswith(f"{sid}_0000.nii.gz")
    s1 = CropRecord.from_json(read_json(out / "crops/s1.json"))
    assert s1.original_axcodes == "LPS"
    # the true field was re-expressed on the preprocessed grids
    gt = ds.ground_truth_fields[("s2", "s0")]
    assert gt == out / "ground_truth_fields/disp_s2_s0.nii.gz"
    field = load_field(gt)
    fixed = CropRecord.from_json(read_json(out / "crops/s2.json"))
    moving = CropRecord.from_json(read_json(out / "crops/s0.json"))
    expected = field_to_preprocessed_grid(np.load(src / "u_true.npy"), fixed, moving)
    assert np.allclose(field.array, expected, atol=1e-5) and np.allclose(field.affine, fixed.affine)
    # and it does what a true field should: warping the preprocessed template labels with it equals
    # preprocessing the template labels warped in the original space
    from slicreg.geometry import preprocess_volume

    orig_warp = warp_labels(load_labels(src / "labelsTr/s0.nii.gz").array, np.load(src / "u_true.npy"))
    s2_image = load_image(src / "imagesTr/s2_0000.nii.gz")
    reference = preprocess_volume(s2_image, Volume(orig_warp, s2_image.affine), crop_shape=(16, 16, 16)).labels
    warped = warp_labels(load_labels(out / "labelsTr/s0.nii.gz").array, field.array)
    target = field.array + np.indices((16, 16, 16))
    inside = np.all((target >= 0) & (target <= 15), axis=0) & (reference.array > 0)
    assert inside.sum() > 100 and np.array_equal(warped[inside], reference.array[inside])
    # a second run is cached
    plans = Runner(load_pipeline(toml), quiet=True).run()
    assert all(p.cached for p in plans)


def test_preprocess_skips_subjects_already_done(tmp_path):
    from pipelines.stages.data import preprocess_dataset

    src = make_stage_input(tmp_path / "in")
    ds = load_dataset(src)
    calls: list[list] = []

    def mapper(fn, items, desc):
        calls.append([x.get("id", x.get("out")) for x in items])
        return [fn(x) for x in items]

    out = tmp_path / "out"
    preprocess_dataset(ds, out, shape=(16, 16, 16), mapper=mapper, log=lambda m: None)
    assert calls == [["s0", "s1", "s2"], [str(out / "ground_truth_fields/disp_s2_s0.nii.gz")]]
    (out / "crops/s1.json").unlink()  # as if killed before s1 finished
    (out / "ground_truth_fields/disp_s2_s0.nii.gz").unlink()
    calls.clear()
    preprocess_dataset(ds, out, shape=(16, 16, 16), mapper=mapper, log=lambda m: None)
    assert calls[0] == ["s1"] and len(calls[1]) == 1
    assert load_dataset(out).subjects.keys() == ds.subjects.keys()


def test_preprocess_command_single_image(tmp_path, capsys):
    from pipelines.cli import main

    image, labels = body((14, 12, 10), np.diag([-2.0, 2.0, 3.0, 1.0]), 0)
    save_volume(image, tmp_path / "scan_0000.nii.gz")
    save_volume(labels, tmp_path / "scan_labels.nii.gz")
    out = tmp_path / "prep"
    code = main(["preprocess", "--image", str(tmp_path / "scan_0000.nii.gz"), "--labels",
                 str(tmp_path / "scan_labels.nii.gz"), "--out", str(out), "--shape", "16", "16", "16",
                 "--role", "template"])
    assert code == 0
    ds = load_dataset(out)
    assert ds.template == "scan" and ds.subjects["scan"].labels == out / "labelsTr/scan.nii.gz"
    # a second scan is added to the same folder
    save_volume(image, tmp_path / "other.nii.gz")
    assert main(["preprocess", "--image", str(tmp_path / "other.nii.gz"), "--out", str(out), "--shape", "16",
                 "16", "16"]) == 0
    ds = load_dataset(out)
    assert set(ds.subjects) == {"scan", "other"} and ds.test == ["other"] and ds.subjects["other"].labels is None
    # not a CT: one line, exit status 2
    photo = np.random.default_rng(0).integers(0, 256, (8, 8, 8)).astype(np.uint8)
    save_volume(Volume(photo, np.eye(4)), tmp_path / "photo.nii.gz")
    capsys.readouterr()
    assert main(["preprocess", "--image", str(tmp_path / "photo.nii.gz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "preprocess: error" in err and "0..255" in err and "--force" in err
    assert main(["preprocess", "--image", str(tmp_path / "photo.nii.gz"), "--out", str(out), "--force",
                 "--shape", "8", "8", "8"]) == 0


def test_dataset_json_keeps_unknown_keys(tmp_path):
    root = make_slicreg(tmp_path / "ds")
    doc = json.loads((root / "dataset.json").read_text())
    doc["subjects"]["s1"]["age"] = 61
    doc["cohort"] = {"seed": 3}
    doc["registration_pairs"][0]["note"] = "x"
    (root / "dataset.json").write_text(json.dumps(doc))
    ds = load_dataset(root)
    again = dataset_to_json(ds)
    assert again["subjects"]["s1"]["age"] == 61 and again["cohort"] == {"seed": 3}
    assert again["registration_pairs"][0]["note"] == "x"
