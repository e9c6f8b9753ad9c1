"""Template supervoxels: exact counts, connectivity, coverage, determinism, edge cases; command and stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slicreg import supervoxels as sv
from slicreg.errors import InputError


def _components(labels: np.ndarray) -> int:
    from skimage.measure import label

    return int(label(labels, background=0, connectivity=3).max())


def _phantom(shape=(28, 24, 32), seed=0):
    """An 'abdomen': ellipsoid body (fat -80 HU) with two 'organs' (60 and 200 HU) and noise, air outside."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    c = (np.asarray(shape, dtype=float) - 1) / 2
    r = np.asarray(shape, dtype=float) * 0.42
    body = (((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) < 1
    organ1 = ((g[0] - c[0] + 4) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2] - 3) ** 2) < 30
    organ2 = ((g[0] - c[0] - 5) ** 2 + (g[1] - c[1] - 2) ** 2 + (g[2] - c[2] + 5) ** 2) < 16
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -80
    img[organ1] = 60
    img[organ2] = 200
    img += rng.normal(0, 15, shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[organ1] = 6
    labels[organ2] = 1
    return img, body, labels


def _check_layers(layers: np.ndarray, mask4: np.ndarray, k: int) -> None:
    assert layers.dtype == np.uint8
    for layer in layers:
        assert np.array_equal(np.unique(layer), np.arange(k + 1))  # exactly K + background, values 0..K
        assert np.array_equal(layer > 0, mask4)  # covers the mask exactly
        assert _components(layer) == k  # each of the K labels is one 26-connected piece


# --------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("k,segments", [(5, 8), (12, 20), (30, 48)])
def test_exact_count_connected_and_covering(k, segments):
    img, body, _ = _phantom()
    res = sv.build_supervoxel_layers(img, body, n_layers=2, n_supervoxels=k, n_segments=segments, seed=3)
    assert res.layers.shape == (2, 14, 12, 16)
    assert np.array_equal(res.mask, sv.downsample_mask(body))
    _check_layers(res.layers, res.mask, k)
    for info in res.layer_info:  # the merge removed exactly the surplus
        assert info["splits"] > 0 or info["labels_after_fix"] - info["merges"] == k


def test_layers_differ_and_seed_determinism():
    img, body, _ = _phantom()
    kw = dict(n_layers=3, n_supervoxels=10, n_segments=16)
    a = sv.template_supervoxels(img, body, seed=5, **kw)
    b = sv.template_supervoxels(img, body, seed=5, **kw)
    c = sv.template_supervoxels(img, body, seed=6, **kw)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the random affines give different layers
    # layer l depends on (seed, l) only: the first two of three layers equal a two-layer run
    assert np.array_equal(a[:2], sv.template_supervoxels(img, body, seed=5, **{**kw, "n_layers": 2}))


def test_same_result_for_any_number_of_jobs():
    img, body, _ = _phantom()
    kw = dict(n_layers=3, n_supervoxels=10, n_segments=16, seed=11)
    serial = sv.build_supervoxel_layers(img, body, jobs=1, **kw)
    done = []
    parallel = sv.build_supervoxel_layers(img, body, jobs=2, progress=done.append, **kw)
    assert np.array_equal(serial.layers, parallel.layers)
    assert serial.layer_info == parallel.layer_info
    assert sorted(done) == [1, 2, 3]


def test_fewer_segments_than_k_splits_instead_of_failing():
    img, body, _ = _phantom()
    res = sv.build_supervoxel_layers(img, body, n_layers=2, n_supervoxels=25, n_segments=6, seed=0)
    assert all(info["splits"] > 0 for info in res.layer_info)
    _check_layers(res.layers, res.mask, 25)


def test_mask_with_several_components():
    img, _, _ = _phantom(shape=(32, 20, 24))
    mask = np.zeros(img.shape, dtype=bool)
    mask[2:12, 4:16, 4:20] = True
    mask[18:30, 4:16, 4:20] = True  # a second block, 6 voxels (3 at 4 mm) away
    mask[14:16, 2:4, 2:4] = True  # a tiny third piece: one 4 mm voxel
    res = sv.build_supervoxel_layers(img, mask, n_layers=2, n_supervoxels=12, n_segments=16, seed=1)
    _check_layers(res.layers, res.mask, 12)
    from scipy import ndimage

    parts, n_parts = ndimage.label(res.mask, structure=np.ones((3, 3, 3)))
    assert n_parts == 3
    for layer in res.layers:
        for lab in range(1, 13):  # no supervoxel spans two components
            assert np.unique(parts[layer == lab]).size == 1
        assert all(np.any(layer[parts == p] > 0) for p in range(1, 4))


def test_bad_masks_raise_input_error():
    img, body, _ = _phantom()
    with pytest.raises(InputError, match="empty"):
        sv.template_supervoxels(img, np.zeros_like(body), n_layers=1)
    small = np.zeros_like(body)
    small[4:8, 4:8, 4:8] = True  # 8 voxels at 4 mm
    with pytest.raises(InputError, match="fewer than"):
        sv.template_supervoxels(img, small, n_layers=1, n_supervoxels=10)
    blocks = np.zeros(img.shape, dtype=bool)
    for i in range(0, img.shape[0] - 1, 4):
        for j in range(0, img.shape[1] - 1, 4):
            blocks[i:i + 2, j:j + 2, 0:2] = True  # isolated 4 mm voxels, 7 x 6 = 42 components
    with pytest.raises(InputError, match="separate components"):
        sv.template_supervoxels(img, blocks, n_layers=1, n_supervoxels=20, n_segments=30)
    with pytest.raises(InputError, match="shape"):
        sv.template_supervoxels(img, body[:-2], n_layers=1)
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        sv.template_supervoxels(bad, body, n_layers=1)


# --------------------------------------------------------------------------------------------- pieces
def test_merge_is_transitive_smallest_into_smallest_neighbour():
    # a bar of regions of sizes 1, 2, 4, 8 (in this order along axis 0)
    lab = np.zeros((15, 1, 1), dtype=np.int32)
    lab[0:1], lab[1:3], lab[3:7], lab[7:15] = 1, 2, 3, 4
    out, info = sv.merge_to_count(lab, 2)
    # 1 -> 2 (size 3), then 2 -> 3 (size 7): region 1 must follow 2 into 3 (union-find, not a stale map)
    assert info == {"splits": 0, "merges": 2}
    assert np.array_equal(out[:, 0, 0], [1] * 7 + [2] * 8)
    # smallest neighbour: region 5 (size 1) touches 6 (size 3) and 7 (size 2) -> joins 7
    lab = np.zeros((6, 1, 1), dtype=np.int32)
    lab[0:3], lab[3:4], lab[4:6] = 6, 5, 7
    out, _ = sv.merge_to_count(lab, 2)
    assert np.array_equal(out[:, 0, 0], [1, 1, 1, 2, 2, 2])


def test_merge_never_joins_separate_regions_and_counts_them():
    lab = np.zeros((9, 1, 1), dtype=np.int32)
    lab[0:1], lab[1:3], lab[5:9] = 1, 2, 3  # regions 1-2 touch; 3 is apart
    out, _ = sv.merge_to_count(lab, 2)
    assert np.array_equal(out[:, 0, 0], [1, 1, 1, 0, 0, 2, 2, 2, 2])
    with pytest.raises(InputError, match="components"):
        sv.merge_to_count(lab, 1)


def test_split_along_principal_axis():
    lab = np.zeros((12, 2, 2), dtype=np.int32)
    lab[:] = 1
    out, info = sv.merge_to_count(lab, 2)
    assert info["splits"] == 1
    assert np.array_equal(out[:6], np.ones((6, 2, 2))) and np.array_equal(out[6:], np.full((6, 2, 2), 2))


def test_make_connected_reassigns_fragments_and_fills_the_mask():
    lab = np.zeros((9, 5, 5), dtype=np.int32)
    mask = np.zeros(lab.shape, dtype=bool)
    mask[0:4] = True
    mask[6:9] = True  # a second mask piece, unlabelled
    lab[0:2] = 1
    lab[2:4] = 2
    lab[3, 2, 2] = 1  # a stray fragment of label 1 inside label 2 (not touching label 1's main piece)
    lab[2, 0, 0] = 0  # a hole
    out, info = sv.make_connected(lab, mask)
    assert info["fragment_voxels"] == 1 and info["new_labels"] == 1
    assert np.array_equal(out > 0, mask)
    assert out[3, 2, 2] == out[3, 0, 0]  # the fragment took its surroundings' label
    assert _components(out) == 3 and np.unique(out).size == 4


def test_theta_to_voxel_affine():
    m, o = sv.theta_to_voxel_affine(np.eye(3, 4), (10, 20, 30))
    assert np.allclose(m, np.eye(3)) and np.allclose(o, 0)
    theta = np.eye(3, 4)
    theta[:, 3] = (0.2, -0.1, 0.5)  # shifts in half-extents: 0.2 * 10 / 2 = 1 voxel, -1, 7.5
    m, o = sv.theta_to_voxel_affine(theta, (10, 20, 30))
    assert np.allclose(m, np.eye(3)) and np.allclose(o, (1.0, -1.0, 7.5))
    theta = np.eye(3, 4) * 2.0  # zoom about the grid centre: centre maps to itself
    m, o = sv.theta_to_voxel_affine(theta[:, :4], (10, 20, 30))
    centre = (np.asarray((10, 20, 30)) - 1) / 2
    assert np.allclose(m @ centre + o, centre)


def test_masks():
    labels = np.zeros((21, 21, 21), dtype=np.uint8)
    labels[10, 10, 10] = 3
    m = sv.organ_mask(labels, distance_vox=4)
    g = np.indices(labels.shape) - 10
    assert np.array_equal(m, (g ** 2).sum(0) < 16)
    from scipy import ndimage

    labels = np.zeros((30, 26, 34), dtype=np.uint8)
    labels[2, 20, 30] = 1  # near the border: the computation inside the organs' box must match the full one
    labels[14, 5, 9:12] = 2
    full = ndimage.distance_transform_edt(labels == 0) < 6.5
    assert np.array_equal(sv.organ_mask(labels, distance_vox=6.5), full)
    with pytest.raises(InputError, match="no organ"):
        sv.organ_mask(np.zeros_like(labels))

    img = np.full((20, 22, 20), -1000.0, dtype=np.float32)
    img[3:17, 3:17, :] = 40  # body running through the whole scan range
    img[8:12, 8:12, 8:12] = -900  # enclosed gas
    img[6:9, 6:9, 15:] = -950  # a lung opening through the top of the field of view
    img[0:2, 0:2, 0:2] = 500  # a separate small object: not the largest component
    img[3:17, 19:21, :] = 0  # a thin table ...
    img[9:11, 17:19, :] = 0  # ... touching the body along a strip: removed by the opening
    body = sv.body_mask(img)
    box = np.zeros(img.shape, dtype=bool)
    box[3:17, 3:17, :] = True
    assert not body[:, 18:, :].any() and not body[:2, :2, :2].any()  # table and small object excluded
    assert not np.any(body & ~box & (img != 0))  # (a 1-voxel stub of the strip may stay)
    assert body[5:15, 5:15, :].all()  # gas and lung filled, body kept (edges may be rounded off)
    assert body.sum() > 0.85 * box.sum()  # a 3-voxel opening rounds the edges of a 14-voxel box
    no_opening = sv.body_mask(img, opening_vox=0)
    assert not no_opening[0, 0, 0] and no_opening[3:17, 19:21].all()
    with pytest.raises(InputError, match="no voxel"):
        sv.body_mask(np.full((4, 4, 4), -1000.0))


def test_body_mask_fills_across_every_axis_and_is_the_one_threshold():
    import inspect

    from pipelines.commands.supervoxels import write_supervoxels
    from pipelines.runner import load_stage_types

    img = np.full((16, 18, 20), -1000.0, dtype=np.float32)
    img[2:14, 2:16, 2:18] = 30
    # a gas tunnel entering from the y = 0 side: open in 3-D and in every axial (axis 2) and axis-0 slice, but
    # enclosed in every axis-1 slice inside the body -> filled (a 3-D + axial fill alone would leave it open)
    img[5:9, 0:10, 8:12] = -950
    img[2, 2, 2] = -450  # a surface voxel between -500 and -400 HU: outside the body at the -400 HU threshold
    body = sv.body_mask(img, opening_vox=0)
    expected = np.zeros(img.shape, dtype=bool)
    expected[2:14, 2:16, 2:18] = True
    expected[2, 2, 2] = False
    assert np.array_equal(body, expected)
    assert sv.body_mask(img, threshold=-500.0, opening_vox=0)[2, 2, 2]
    # every default of the body threshold (core, stages, command) is the one constant
    assert sv.BODY_THRESHOLD_HU == -400.0
    assert inspect.signature(sv.body_mask).parameters["threshold"].default == sv.BODY_THRESHOLD_HU
    assert inspect.signature(write_supervoxels).parameters["body_threshold_hu"].default == sv.BODY_THRESHOLD_HU
    stages = load_stage_types()
    assert stages["supervoxels"].params["body_threshold_hu"] == sv.BODY_THRESHOLD_HU
    assert stages["evaluate"].params["body_threshold_hu"] == sv.BODY_THRESHOLD_HU


def test_downsampling_follows_the_grid_convention():
    fine = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    coarse = sv.downsample_image(fine)
    assert coarse.shape == (2, 3, 1)
    assert coarse[1, 2, 0] == fine[2:4, 4:6, 0:2].mean()
    m = np.zeros((4, 4, 4), dtype=bool)
    m[0:2, 0:2, 0] = True  # 4 of 8 -> in
    m[2, 2, 2] = m[3, 3, 3] = m[2, 3, 2] = True  # 3 of 8 -> out
    assert np.array_equal(np.argwhere(sv.downsample_mask(m)), [[0, 0, 0]])


def test_statistics_and_png():
    layers = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    layers[0, :4, :4, :4] = 1  # a cube: score 0.9236 (ball = 1)
    layers[0, 4:, :, :] = 2  # a 4 x 8 x 8 slab
    st = sv.supervoxel_statistics(layers, spacing_mm=(4, 4, 4))[0]
    assert st["labels"] == 2
    assert st["volume_ml"]["min"] == pytest.approx(64 * 0.064)
    assert st["volume_ml"]["max"] == pytest.approx(256 * 0.064)
    ball = 3.0 / 5.0 * (3.0 / (4.0 * np.pi)) ** (2.0 / 3.0)
    assert st["compactness_score"]["max"] == pytest.approx(ball * 4, rel=1e-9)  # a^2 / (a^2 / 4)
    assert st["compactness_score"]["min"] < st["compactness_score"]["max"]
    img = np.zeros((16, 16, 16), dtype=np.float32)
    png = sv.overlay_png(img, layers)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# ------------------------------------------------------------------------------------- command and stage
def _write_template(tmp_path):
    import nibabel as nib

    img, body, labels = _phantom()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    nib.save(nib.Nifti1Image(img.astype(np.int16), affine), str(tmp_path / "t.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "l.nii.gz"))
    return affine


def test_command_writes_nifti_json_png(tmp_path, capsys):
    from pipelines.cli import main
    from slicreg.conventions import downsample_affine
    from slicreg.io import load_volume, sha256_file

    affine = _write_template(tmp_path)
    out = tmp_path / "sv" / "SV.nii.gz"
    code = main(["supervoxels", "--image", str(tmp_path / "t.nii.gz"), "--labels", str(tmp_path / "l.nii.gz"),
                 "--out", str(out), "--layers", "2", "--supervoxels", "9", "--segments", "14", "--distance-vox", "6",
                 "--seed", "4", "--quiet"])
    assert code == 0
    vol = load_volume(out, kind="labels", channels=True)
    assert vol.array.shape == (2, 14, 12, 16) and vol.array.dtype == np.uint8
    assert np.allclose(vol.affine, downsample_affine(affine, 2))
    assert all(np.unique(layer).size == 10 for layer in vol.array)
    side = json.loads((tmp_path / "sv" / "SV.json").read_text())
    assert side["template"]["sha256"] == sha256_file(tmp_path / "t.nii.gz")
    assert side["parameters"]["seed"] == 4 and side["parameters"]["n_supervoxels"] == 9
    assert "scikit-image" in side["library_versions"]
    assert side["statistics"]["summary"]["labels_per_layer"] == [9]
    assert (tmp_path / "sv" / "SV.png").read_bytes()[:4] == b"\x89PNG"

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((28, 24, 32), np.uint8), affine), str(tmp_path / "zero.nii.gz"))
    capsys.readouterr()
    code = main(["supervoxels", "--image", str(tmp_path / "t.nii.gz"), "--labels", str(tmp_path / "zero.nii.gz"),
                 "--out", str(tmp_path / "b.nii.gz"), "--layers", "1", "--quiet"])
    assert code == 2  # no organ in the labels: one line, no traceback, no output
    err = capsys.readouterr().err
    assert "error" in err and "no organ" in err and "Traceback" not in err
    assert not (tmp_path / "b.nii.gz").exists()
    code = main(["supervoxels", "--image", str(tmp_path / "t.nii.gz"), "--body-mask", "--out",
                 str(tmp_path / "b.nii.gz"), "--layers", "1", "--supervoxels", "20", "--segments", "30", "--quiet"])
    assert code == 0 and json.loads((tmp_path / "b.json").read_text())["mask"]["kind"] == "body"


def _template_dataset(tmp_path):
    """A preprocessed-dataset folder (docs/CONTRACTS.md) holding only the phantom template ``c0``."""
    _write_template(tmp_path)
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    (tmp_path / "t.nii.gz").rename(ds / "imagesTr" / "c0_0000.nii.gz")
    (tmp_path / "l.nii.gz").rename(ds / "labelsTr" / "c0.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "format": "slicreg-dataset/1", "template": "c0",
        "subjects": {"c0": {"image": "imagesTr/c0_0000.nii.gz", "labels": "labelsTr/c0.nii.gz", "role": "template"}},
    }))
    return ds


def test_stage_on_a_dataset_folder(tmp_path):
    from pipelines.runner import StageContext, load_stage_types
    from slicreg.io import load_volume

    ds = _template_dataset(tmp_path)
    st = load_stage_types()["supervoxels"]
    out = tmp_path / "out"
    out.mkdir()
    params = {**st.params, "layers": 2, "n_supervoxels": 8, "n_segments": 12, "distance_vox": 5.0}
    ctx = StageContext("supervoxels", params, {"dataset": ds}, out, tmp_path, jobs=1, quiet=True, seed=2)
    st.run(ctx)
    vol = load_volume(out / "supervoxels.nii.gz", kind="labels", channels=True)
    assert vol.array.shape == (2, 14, 12, 16)
    assert json.loads((out / "supervoxels.json").read_text())["parameters"]["seed"] == 2
    assert (out / "supervoxels.png").is_file()

    from slicreg.errors import ConfigError

    doc = json.loads((ds / "dataset.json").read_text())
    del doc["subjects"]["c0"]["labels"]
    (ds / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="body"):
        st.run(StageContext("supervoxels", params, {"dataset": ds}, out, tmp_path, quiet=True))


def test_interrupted_layers_resume_bit_identical():
    img, body, _ = _phantom()
    kw = dict(n_layers=3, n_supervoxels=10, n_segments=16, seed=4)
    whole = sv.build_supervoxel_layers(img, body, **kw)
    kept: dict = {}

    def keep_then_die(i, labels, info):
        kept[i] = (labels.copy(), json.loads(json.dumps(info, default=lambda o: np.asarray(o).tolist())))
        if len(kept) == 2:
            raise KeyboardInterrupt  # killed after two layers

    with pytest.raises(KeyboardInterrupt):
        sv.build_supervoxel_layers(img, body, on_layer=keep_then_die, **kw)
    computed = []
    resumed = sv.build_supervoxel_layers(img, body, done_layers=kept, on_layer=lambda i, *_: computed.append(i), **kw)
    assert computed == [2]  # only the missing layer is computed again
    assert np.array_equal(resumed.layers, whole.layers)


def test_stage_resumes_per_layer(tmp_path, monkeypatch):
    from pipelines.runner import StageContext, load_stage_types
    from pipelines.stages import supervoxels as stage_module

    ds = _template_dataset(tmp_path)
    st = load_stage_types()["supervoxels"]
    params = {**st.params, "layers": 3, "n_supervoxels": 8, "n_segments": 12, "distance_vox": 5.0}
    reference = tmp_path / "ref"
    reference.mkdir()
    st.run(StageContext("supervoxels", params, {"dataset": ds}, reference, tmp_path, quiet=True, seed=2))

    out = tmp_path / "out"
    out.mkdir()
    keep = stage_module._keep_layer
    calls = []

    def keep_then_die(ctx, i, labels, info):
        keep(ctx, i, labels, info)
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(stage_module, "_keep_layer", keep_then_die)
    with pytest.raises(KeyboardInterrupt):
        st.run(StageContext("supervoxels", params, {"dataset": ds}, out, tmp_path, quiet=True, seed=2))
    assert len(list((out / stage_module.LAYER_DIR).glob("layer_*.npz"))) == 2
    monkeypatch.setattr(stage_module, "_keep_layer", keep)
    calls.clear()
    st.run(StageContext("supervoxels", params, {"dataset": ds}, out, tmp_path, quiet=True, seed=2))
    assert (out / "supervoxels.nii.gz").read_bytes() == (reference / "supervoxels.nii.gz").read_bytes()
    assert not (out / stage_module.LAYER_DIR).exists()
