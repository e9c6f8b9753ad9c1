"""Two-volume commands work in world space: one tiny anatomy stored as RAS, LPS, PLS and with permuted axes.

Every storage holds the same voxels at the same world positions (the array is permuted / flipped and the affine
adjusted), so a correct command gives the same answer for every storage, and a command that compares voxel
arrays gives a flipped or transposed one.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main
from slicreg.conventions import Volume
from slicreg.io import load_field, load_labels, load_volume, save_field, save_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (24, 20, 16)
SPACING = (2.0, 2.0, 2.5)  # anisotropic, so a permuted file has its voxel sizes in another order
ORIGIN = (-23.0, -19.0, -18.75)
# name -> (axis permutation, flips): new array axis a is old axis perm[a], reversed if flips[a]
STORAGES = {"LPS": ((0, 1, 2), (1, 1, 0)), "PLS": ((1, 0, 2), (1, 1, 0)), "SRA": ((2, 0, 1), (0, 0, 0))}
ORGANS = (6, 1, 2, 3)


def anatomy(seed: int = 0, shift=(0, 0, 0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An 'abdomen' in HU on the RAS grid ``SHAPE``: air (-1000) around an ellipsoidal body (40 HU) with four
    asymmetric 'organs' (labels 6, 1, 2, 3), noise; ``shift`` moves the body by whole voxels (air comes in).

    Returns ``(image float32, labels uint8, affine)``."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"))
    g -= np.asarray(shift, dtype=float)[:, None, None, None]
    c = (np.asarray(SHAPE) - 1) / 2
    r = np.asarray(SHAPE) * 0.42
    body = (((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) < 1
    img = np.where(body, 40.0, -1000.0)
    lab = np.zeros(SHAPE, np.uint8)
    for centre, radius, label, hu in (((6, 8, 9), 3.5, 6, 60.0), ((15, 12, 5), 2.5, 1, 120.0),
                                      ((10, 5, 11), 2.0, 2, 200.0), ((16, 6, 9), 1.8, 3, -60.0)):
        inside = (((g - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0) < radius ** 2) & body
        img[inside] = hu
        lab[inside] = label
    img += rng.normal(0, 5, SHAPE)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return img.astype(np.float32), lab, affine


def store(array: np.ndarray, affine: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in another axis order: ``new[q] = array[T q]``, new affine ``affine @ T``."""
    perm, flips = STORAGES[storage]
    new = np.transpose(array, perm)
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for a in range(3):
        if flips[a]:
            new = np.flip(new, a)
            t[perm[a], a] = -1.0
            t[perm[a], 3] = new.shape[a] - 1
        else:
            t[perm[a], a] = 1.0
    return np.ascontiguousarray(new), affine @ t


def dice(a: np.ndarray, b: np.ndarray, labels=ORGANS) -> float:
    """Mean Dice over ``labels`` of two label maps on one grid."""
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def _run(argv) -> int:
    return main([str(a) for a in argv])


def _write(tmp_path, name, array, affine) -> str:
    path = tmp_path / f"{name}.nii.gz"
    save_volume(Volume(array, affine), path)
    return str(path)


def test_the_storages_hold_the_same_voxels_at_the_same_world_positions():
    img, lab, aff = anatomy()
    for storage, (perm, _) in STORAGES.items():
        arr, a2 = store(img, aff, storage)
        assert "".join(nib.aff2axcodes(a2)) == storage and arr.shape == tuple(SHAPE[p] for p in perm)
        for q in ((0, 0, 0), (3, 5, 7), tuple(n - 1 for n in arr.shape)):
            world = a2 @ [*q, 1.0]
            p = np.linalg.solve(aff, world)[:3]
            assert np.allclose(p, np.round(p)) and arr[q] == img[tuple(int(v) for v in np.round(p))]


def test_reorientation_helpers_are_lossless_and_map_fields_between_the_storages():
    from slicreg.checks import apply_index_map_to_field, match_grid, orientation_index_map, reorient_like
    from slicreg.metrics import warp_labels_learn2reg

    img, lab, aff = anatomy()
    rng = np.random.default_rng(0)
    u_ras = rng.integers(-2, 3, (3, *SHAPE)).astype(np.float32)  # whole voxels: nearest sampling is exact
    for storage in STORAGES:
        arr, a2 = store(lab, aff, storage)
        vol = Volume(arr, a2)
        back = reorient_like(vol, aff)
        np.testing.assert_array_equal(back.array, lab)
        assert back.array.dtype == lab.dtype and np.allclose(back.affine, aff)
        t = orientation_index_map(vol, aff)
        assert np.allclose(vol.affine @ t, aff)
        # a field whose targets are RAS voxels, re-expressed in the stored file's voxels, samples the same labels
        u_file = apply_index_map_to_field(u_ras, t)
        np.testing.assert_array_equal(warp_labels_learn2reg(arr, u_file), warp_labels_learn2reg(lab, u_ras))
        np.testing.assert_allclose(apply_index_map_to_field(u_file, np.linalg.inv(t)), u_ras, atol=1e-4)
        assert match_grid(vol, Volume(lab, aff), name="l", reference_name="i").array.shape == SHAPE
    assert reorient_like(Volume(lab, aff), aff).array is lab  # nothing to do: the same object


# ------------------------------------------------------------------------------------------------- align
@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_align_registers_a_moving_image_stored_in_another_axis_order(tmp_path, storage, capsys):
    img, lab, aff = anatomy()
    fixed = _write(tmp_path, "f", img, aff)
    # the same anatomy with other noise. (A shifted body is no test of orientation, and the presets' coarse
    # translation search, made for 192 x 160 x 256 grids, is unreliable on a 3 x 3 x 2 level of this tiny grid.)
    m_img, m_lab, _ = anatomy(seed=1)
    moving = _write(tmp_path, "m", *store(m_img, aff, storage))
    # labels stored RAS for an image stored otherwise: the same world grid, reoriented to the moving image
    m_labels = _write(tmp_path, "ml", m_lab, aff)
    if storage == "LPS":  # compared voxel by voxel, the two files disagree: the test can tell
        assert dice(store(m_lab, aff, storage)[0], lab) < 0.5
    out = tmp_path / "u.nii.gz"
    extra = ["--deeds-out", tmp_path / "D"] if storage == "LPS" else []  # deeds needs equal array shapes
    assert _run(["align", "--fixed", fixed, "--moving", moving, "--out-field", out, "--preset", "affine",
                 "--moving-labels", m_labels, "--out-warped-labels", tmp_path / "wl.nii.gz",
                 "--out-warped", tmp_path / "w.nii.gz", "--out-json", tmp_path / "info.json",
                 "--quiet", "--threads", "1", *extra]) == 0
    assert f"moving image {storage} registered in the fixed image's axis order RAS" in capsys.readouterr().out
    warped = load_labels(tmp_path / "wl.nii.gz")
    assert np.allclose(warped.affine, aff) and dice(warped.array, lab) > 0.9
    # the field is on the fixed grid and x + u(x) indexes the moving FILE's array: sampling it there by hand
    # (nearest) gives the same labels, and the warped image is close to the fixed one
    field = load_field(out)
    assert field.shape == SHAPE and np.allclose(field.affine, aff)
    m_file_labels, _ = store(m_lab, aff, storage)
    from slicreg.metrics import warp_labels_learn2reg

    assert dice(warp_labels_learn2reg(m_file_labels, field.array), lab) > 0.9
    body = lab > 0
    warped_img = load_volume(tmp_path / "w.nii.gz").array
    assert np.abs(warped_img - img)[body].mean() < 15.0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["orientation"]["moving"] == storage and info["orientation"]["registered_as"] == "RAS"
    # an initial field is read in the moving file's voxels too: with the affine preset it comes back unchanged
    assert _run(["align", "--fixed", fixed, "--moving", moving, "--out-field", tmp_path / "again.nii.gz",
                 "--preset", "affine", "--init-field", out, "--quiet", "--threads", "1"]) == 0
    np.testing.assert_allclose(load_field(tmp_path / "again.nii.gz").array, field.array, atol=1e-4)
    if storage == "LPS":  # the deeds export reads back to the same field, matrix included
        from slicreg.deeds import read_deeds

        back = read_deeds(tmp_path / "D_displacements.dat", SHAPE, matrix_path=tmp_path / "D_matrix.txt").to_field()
        np.testing.assert_allclose(back, field.array, atol=1e-3)


def test_align_refuses_other_voxel_sizes_and_labels_on_another_grid(tmp_path, capsys):
    img, lab, aff = anatomy()
    fixed = _write(tmp_path, "f", img, aff)
    arr, a2 = store(img, aff, "SRA")
    coarse = a2.copy()
    coarse[:3, :3] *= 1.5  # another voxel size: refused, naming both files
    moving = _write(tmp_path, "m", arr, coarse)
    capsys.readouterr()
    assert _run(["align", "--fixed", fixed, "--moving", moving, "--out-field", tmp_path / "u.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "m.nii.gz" in err and "f.nii.gz" in err and "voxel size" in err
    # labels on another world grid than the moving image (shifted by 3 mm): refused, both files and grids named
    moving = _write(tmp_path, "m", arr, a2)
    shifted = aff.copy()
    shifted[:3, 3] += (3.0, 0.0, 0.0)
    labels = _write(tmp_path, "ml", lab, shifted)
    assert _run(["align", "--fixed", fixed, "--moving", moving, "--out-field", tmp_path / "u.nii.gz",
                 "--moving-labels", labels, "--out-warped-labels", tmp_path / "wl.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ml.nii.gz" in err and "m.nii.gz" in err and "RAS" in err and "SRA" in err
    assert not (tmp_path / "u.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_without_a_field_compares_in_world_space(tmp_path, capsys):
    _, lab, aff = anatomy()
    lps = _write(tmp_path, "lps", *store(lab, aff, "LPS"))
    pls = _write(tmp_path, "pls", *store(lab, aff, "PLS"))
    assert _run(["evaluate", "--fixed-labels", lps, "--moving-labels", pls, "--labels", "1,2,3,6", "--no-hd95",
                 "--json", tmp_path / "e.json"]) == 0
    out = capsys.readouterr().out
    assert "resampled onto the fixed grid (LPS" in out and "by world coordinates" in out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert all(doc["per_label"][str(k)]["dice_learn2reg"] == 1.0 for k in ORGANS)
    # the ground-truth correspondence of the unregistered pair is the world identity: no error
    f_arr, f_aff = store(lab, aff, "LPS")
    m_arr, m_aff = store(lab, aff, "PLS")
    world = np.linalg.inv(m_aff) @ f_aff
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in f_arr.shape], indexing="ij"))
    truth = np.einsum("ab,b...->a...", world[:3, :3], grid) + world[:3, 3, None, None, None] - grid
    save_field(truth.astype(np.float32), f_aff, tmp_path / "gt.nii.gz")
    assert _run(["evaluate", "--fixed-labels", lps, "--moving-labels", pls, "--gt-field", tmp_path / "gt.nii.gz",
                 "--no-hd95", "--json", tmp_path / "g.json"]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["field_error"]["max_mm"] == pytest.approx(0.0, abs=1e-4)
    # one grid: exactly today's voxel comparison (the arrays as they are)
    shifted = anatomy(shift=(2, 0, 0))[1]
    ras = _write(tmp_path, "ras", lab, aff)
    ras2 = _write(tmp_path, "ras2", shifted, aff)
    assert _run(["evaluate", "--fixed-labels", ras, "--moving-labels", ras2, "--no-hd95", "--labels", "1,2,3,6",
                 "--json", tmp_path / "r.json"]) == 0
    got = json.loads((tmp_path / "r.json").read_text())["per_label"]
    for k in ORGANS:
        expected = 2 * np.sum((lab == k) & (shifted == k)) / (np.sum(lab == k) + np.sum(shifted == k))
        assert got[str(k)]["dice_learn2reg"] == pytest.approx(expected, abs=1e-12)
    # grids that do not overlap in world space: refused
    far = aff.copy()
    far[:3, 3] += 500.0
    away = _write(tmp_path, "away", lab, far)
    capsys.readouterr()
    assert _run(["evaluate", "--fixed-labels", ras, "--moving-labels", away]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not overlap" in err and "away.nii.gz" in err


def test_a_field_on_another_grid_is_refused_and_an_identity_affine_is_accepted(tmp_path, capsys, caplog):
    _, lab, aff = anatomy()
    ras = _write(tmp_path, "ras", lab, aff)
    zero = np.zeros((3, *SHAPE), np.float32)
    _, lps_aff = store(lab, aff, "LPS")  # the same shape as the RAS grid, another affine
    save_field(zero, lps_aff, tmp_path / "foreign.nii.gz")
    capsys.readouterr()
    assert _run(["evaluate", "--fixed-labels", ras, "--moving-labels", ras, "--field",
                 tmp_path / "foreign.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "foreign.nii.gz" in err and "LPS" in err and "RAS" in err
    # the same for the ground-truth field and for transfer's field
    save_field(zero, aff, tmp_path / "ok.nii.gz")
    assert _run(["evaluate", "--fixed-labels", ras, "--moving-labels", ras, "--field", tmp_path / "ok.nii.gz",
                 "--gt-field", tmp_path / "foreign.nii.gz"]) == 2
    assert "foreign.nii.gz" in capsys.readouterr().err
    sv = np.random.default_rng(0).integers(0, 5, (2, 12, 10, 8)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 5.0, 1.0])), tmp_path / "sv.nii.gz")
    assert _run(["transfer", "--supervoxels", tmp_path / "sv.nii.gz", "--field", tmp_path / "foreign.nii.gz",
                 "--fixed", ras, "--out", tmp_path / "t.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "foreign.nii.gz" in err and "LPS" in err and not (tmp_path / "t.nii.gz").exists()
    assert _run(["transfer", "--supervoxels", tmp_path / "sv.nii.gz", "--field", tmp_path / "ok.nii.gz",
                 "--fixed", ras, "--out", tmp_path / "t.nii.gz"]) == 0
    # no geometry recorded (identity affine, as many Learn2Reg submissions): accepted with a note
    save_field(zero, np.eye(4), tmp_path / "bare.nii.gz")
    with caplog.at_level("WARNING"):
        assert _run(["evaluate", "--fixed-labels", ras, "--moving-labels", ras, "--field", tmp_path / "bare.nii.gz",
                     "--no-hd95"]) == 0
    assert "records no geometry" in caplog.text
    field = load_field(tmp_path / "bare.nii.gz", fixed=load_labels(ras))
    assert np.allclose(field.affine, aff)


# --------------------------------------------------------------------------------- supervoxels, preprocess
SV_ARGS = ["--layers", "1", "--supervoxels", "9", "--segments", "14", "--distance-vox", "4", "--quiet"]


def test_supervoxels_with_labels_in_another_axis_order_give_the_same_layers(tmp_path, capsys):
    img, lab, aff = anatomy()
    image = _write(tmp_path, "t", img, aff)
    ras = _write(tmp_path, "l", lab, aff)
    assert _run(["supervoxels", "--image", image, "--labels", ras, "--out", tmp_path / "a.nii.gz", *SV_ARGS]) == 0
    ref = load_volume(tmp_path / "a.nii.gz", kind="labels", channels=True)
    for storage in STORAGES:
        other = _write(tmp_path, f"l_{storage}", *store(lab, aff, storage))
        out = tmp_path / f"b_{storage}.nii.gz"
        assert _run(["supervoxels", "--image", image, "--labels", other, "--out", out, *SV_ARGS]) == 0
        got = load_volume(out, kind="labels", channels=True)
        np.testing.assert_array_equal(got.array, ref.array)
        assert np.allclose(got.affine, ref.affine)
    shifted = aff.copy()
    shifted[:3, 3] += (0.0, 4.0, 0.0)
    elsewhere = _write(tmp_path, "l_far", lab, shifted)
    capsys.readouterr()
    assert _run(["supervoxels", "--image", image, "--labels", elsewhere, "--out", tmp_path / "c.nii.gz",
                 *SV_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "l_far.nii.gz" in err and "t.nii.gz" in err and "origin" in err
    assert not (tmp_path / "c.nii.gz").exists()


def test_preprocess_with_labels_in_another_axis_order_gives_the_same_result(tmp_path, capsys):
    img, lab, aff = anatomy()
    image = _write(tmp_path, "scan", img, aff)
    common = ["--image", image, "--shape", "16", "16", "16", "--id", "s"]
    assert _run(["preprocess", *common, "--labels", _write(tmp_path, "lab", lab, aff), "--out", tmp_path / "a"]) == 0
    ref = load_volume(tmp_path / "a" / "labelsTr" / "s.nii.gz")
    for storage in STORAGES:
        other = _write(tmp_path, f"lab_{storage}", *store(lab, aff, storage))
        out = tmp_path / storage
        assert _run(["preprocess", *common, "--labels", other, "--out", out]) == 0
        got = load_volume(out / "labelsTr" / "s.nii.gz")
        np.testing.assert_array_equal(got.array, ref.array)
        assert np.allclose(got.affine, ref.affine) and got.array.any()
        crop = json.loads((out / "crops" / "s.json").read_text())
        assert crop["source"]["labels"].endswith(f"lab_{storage}.nii.gz")
    shifted = aff.copy()
    shifted[:3, 3] += (0.0, 0.0, 5.0)
    elsewhere = _write(tmp_path, "lab_far", lab, shifted)
    capsys.readouterr()
    assert _run(["preprocess", *common, "--labels", elsewhere, "--out", tmp_path / "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lab_far.nii.gz" in err and "scan.nii.gz" in err
    assert not (tmp_path / "c" / "imagesTr").exists()
