"""Field file formats: the ITK displacement field (mm, LPS) against SimpleITK, and the one format helper.

SimpleITK (a test-only dependency) resamples the moving image with the exported ITK field; the result must match
slicreg's own warp with the voxel field, for LPS, RAS and oblique grids, fixed and moving on different grids."""

from __future__ import annotations

import numpy as np
import pytest

from slicreg.conventions import (
    RAS_TO_LPS,
    Volume,
    disp_vox_to_mm,
    disp_vox_to_world,
    disp_world_to_vox,
    from_itk_layout,
    identity_grid_vox,
    to_itk_layout,
    world_ras_to_lps,
)
from slicreg.errors import InputError
from slicreg.fields import warp_image, warp_labels
from slicreg.io import (
    FIELD_FORMATS,
    field_output_files,
    load_field,
    load_volume,
    save_field,
    save_field_as,
    save_field_itk,
    save_volume,
)

sitk = pytest.importorskip("SimpleITK")


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid_affine(kind: str, shape, spacing, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A grid of ``shape`` voxels of ``spacing`` mm centred on ``centre`` (RAS world), oriented as ``kind``."""
    axes = {"RAS": np.eye(3), "LPS": np.diag([-1.0, -1.0, 1.0]),
            "oblique": rotation(0.2, -0.15, 0.35) @ np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
            "LIP": np.array([[-1.0, 0, 0], [0, 0, -1], [0, -1, 0]])}[kind]
    a = np.eye(4)
    a[:3, :3] = axes @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def body_phantom(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like body in world coordinates (so any grid samples the same anatomy): an ellipsoid of soft tissue with
    a bright 'bone', a dark 'lung' and smooth texture, air outside; and its labels (1 body, 2 bone, 3 lung)."""
    x = identity_grid_vox(shape, dtype=np.float64).reshape(3, -1)
    p = (affine[:3, :3] @ x + affine[:3, 3:4]).reshape(3, *shape)
    r = (p[0] / 32) ** 2 + (p[1] / 24) ** 2 + (p[2] / 36) ** 2
    bone = ((p[0] - 6) / 8) ** 2 + ((p[1] + 4) / 7) ** 2 + (p[2] / 20) ** 2 < 1
    lung = ((p[0] + 12) / 9) ** 2 + ((p[1] - 5) / 8) ** 2 + ((p[2] - 10) / 12) ** 2 < 1
    texture = 30 * np.sin(p[0] / 5.0) * np.cos(p[1] / 7.0) + 20 * np.sin(p[2] / 6.0)
    body = r < 1
    image = np.where(body, 40 + texture, -1000.0)
    image = np.where(bone, 700 + texture, image)
    image = np.where(lung, -800 + texture, image)
    labels = body.astype(np.uint8) + bone * 1 + lung * 2
    return image.astype(np.float32), labels.astype(np.uint8)


def world_map(p: np.ndarray) -> np.ndarray:
    """A smooth fixed -> moving world transform: a small rotation, a shift and a smooth deformation (mm)."""
    rot = rotation(0.05, -0.04, 0.08)
    q = np.einsum("ab,b...->a...", rot, p) + np.array([3.0, -2.0, 4.0]).reshape(3, *[1] * (p.ndim - 1))
    q[0] += 2.5 * np.sin(p[1] / 15.0)
    q[1] += 2.0 * np.cos(p[2] / 18.0)
    q[2] += 1.5 * np.sin(p[0] / 12.0)
    return q


def voxel_field(fixed_shape, fixed_affine, moving_affine) -> np.ndarray:
    """The voxel field (fixed -> moving voxels) of :func:`world_map` between two grids."""
    x = identity_grid_vox(fixed_shape, dtype=np.float64)
    p = np.einsum("ab,b...->a...", fixed_affine[:3, :3], x) + fixed_affine[:3, 3].reshape(3, 1, 1, 1)
    q = world_map(p)
    inv = np.linalg.inv(moving_affine)
    y = np.einsum("ab,b...->a...", inv[:3, :3], q) + inv[:3, 3].reshape(3, 1, 1, 1)
    return (y - x).astype(np.float32)


def sitk_resample(moving_path, field_path, fixed_path, *, labels: bool) -> np.ndarray:
    """Resample the moving file onto the fixed file's grid with the ITK field file, as a SimpleITK user would;
    returned in the NIfTI array order (X, Y, Z)."""
    moving = sitk.ReadImage(str(moving_path))
    reference = sitk.ReadImage(str(fixed_path))
    field = sitk.ReadImage(str(field_path))
    assert field.GetDimension() == 3 and field.GetNumberOfComponentsPerPixel() == 3  # a vector image, not 4-D
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.Resample(moving, reference, transform, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                        0 if labels else -1000.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))  # SimpleITK arrays are (Z, Y, X)


CASES = {
    # name: (fixed orientation, fixed shape, fixed spacing, moving orientation, moving shape, moving spacing)
    "LPS same grid": ("LPS", (36, 30, 40), (2.0, 2.0, 2.0), "LPS", (36, 30, 40), (2.0, 2.0, 2.0)),
    "RAS -> LPS, other spacing": ("RAS", (36, 30, 40), (2.0, 2.0, 2.0), "LPS", (30, 26, 30), (2.5, 2.4, 2.7)),
    "oblique -> LIP": ("oblique", (34, 32, 38), (2.2, 1.9, 2.1), "LIP", (34, 28, 36), (2.3, 2.6, 2.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_itk_field_resampled_by_simpleitk_matches_slicreg_warp(case, tmp_path):
    fo, fs, fsp, mo, ms, msp = CASES[case]
    a_f = grid_affine(fo, fs, fsp, centre=(1.0, -2.0, 3.0))
    a_m = grid_affine(mo, ms, msp, centre=(4.0, -3.0, 6.0))
    fixed_img, _ = body_phantom(fs, a_f)
    moving_img, moving_lab = body_phantom(ms, a_m)
    save_volume(Volume(fixed_img, a_f), tmp_path / "fixed.nii.gz")
    save_volume(Volume(moving_img, a_m), tmp_path / "moving.nii.gz")
    save_volume(Volume(moving_lab, a_m), tmp_path / "moving_labels.nii.gz")
    disp = voxel_field(fs, a_f, a_m)
    save_field_itk(disp, a_f, a_m, tmp_path / "u_itk.nii.gz")

    ours = warp_image(moving_img, disp)
    ours_lab = warp_labels(moving_lab, disp)
    theirs = sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "u_itk.nii.gz", tmp_path / "fixed.nii.gz",
                           labels=False)
    theirs_lab = sitk_resample(tmp_path / "moving_labels.nii.gz", tmp_path / "u_itk.nii.gz",
                               tmp_path / "fixed.nii.gz", labels=True)
    assert theirs.shape == fs
    # inside the body and well inside the moving grid (the two libraries treat the border differently)
    target = identity_grid_vox(fs) + disp
    inside = np.all([(target[a] > 1) & (target[a] < ms[a] - 2) for a in range(3)], axis=0) & (ours_lab > 0)
    assert inside.mean() > 0.2, "the phantom must fill a good part of the fixed grid for the test to mean anything"
    diff = np.abs(ours - theirs)[inside]
    assert diff.mean() < 0.5, f"mean |HU difference| {diff.mean():.3f} inside the body"
    agree = (ours_lab == theirs_lab)[inside].mean()
    assert agree >= 0.999, f"labels agree in {100 * agree:.3f} % of the body"
    print(f"{case}: mean |diff| {diff.mean():.4f} HU (max {diff.max():.3f}), labels {100 * agree:.3f} %, "
          f"{inside.sum()} voxels")
    # the field is far from trivial: the moving scan resampled by the grids alone (no displacement) differs
    identity = sitk.Resample(sitk.ReadImage(str(tmp_path / "moving.nii.gz")),
                             sitk.ReadImage(str(tmp_path / "fixed.nii.gz")), sitk.Transform(), sitk.sitkLinear, -1000.0)
    assert np.abs(np.transpose(sitk.GetArrayFromImage(identity), (2, 1, 0)) - ours)[inside].mean() > 20


def test_a_sign_error_in_the_lps_components_would_be_caught(tmp_path):
    """The frame matters: the same numbers written as RAS components give a visibly different resampling."""
    fo, fs, fsp, mo, ms, msp = CASES["RAS -> LPS, other spacing"]
    a_f, a_m = grid_affine(fo, fs, fsp), grid_affine(mo, ms, msp, centre=(4.0, -3.0, 6.0))
    fixed_img, _ = body_phantom(fs, a_f)
    moving_img, _ = body_phantom(ms, a_m)
    save_volume(Volume(fixed_img, a_f), tmp_path / "fixed.nii.gz")
    save_volume(Volume(moving_img, a_m), tmp_path / "moving.nii.gz")
    disp = voxel_field(fs, a_f, a_m)
    wrong = world_ras_to_lps(disp_vox_to_world(disp, a_f, a_m))  # undo the flip: RAS numbers in the file
    import nibabel as nib

    img = nib.Nifti1Image(to_itk_layout(world_ras_to_lps(wrong)), a_f)
    img.header.set_intent("vector", (), "")
    nib.save(img, str(tmp_path / "u_ras.nii.gz"))
    good = tmp_path / "u_itk.nii.gz"
    save_field_itk(disp, a_f, a_m, good)
    ours = warp_image(moving_img, disp)
    right = sitk_resample(tmp_path / "moving.nii.gz", good, tmp_path / "fixed.nii.gz", labels=False)
    bad = sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "u_ras.nii.gz", tmp_path / "fixed.nii.gz",
                        labels=False)
    body = fixed_img > -500
    assert np.abs(ours - right)[body].mean() < 0.5
    assert np.abs(ours - bad)[body].mean() > 50


def test_simpleitk_reads_the_itk_file_as_a_displacement_of_the_fixed_grid(tmp_path):
    a_f = grid_affine("RAS", (8, 9, 10), (2.0, 2.5, 3.0), centre=(5.0, 6.0, 7.0))
    disp = np.zeros((3, 8, 9, 10), np.float32)
    disp[0] = 1.0  # one voxel along the first axis: 2 mm towards the patient's right (RAS +x) = LPS -2 mm
    save_field_itk(disp, a_f, None, tmp_path / "u.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "u.nii.gz"))
    assert img.GetSize() == (8, 9, 10) and img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(img.GetSpacing(), (2.0, 2.5, 3.0))
    np.testing.assert_allclose(np.asarray(img.GetOrigin()), (RAS_TO_LPS @ a_f[:, 3])[:3], atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img)[0, 0, 0], [-2.0, 0.0, 0.0], atol=1e-6)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    p = img.TransformIndexToPhysicalPoint((3, 4, 5))
    np.testing.assert_allclose(transform.TransformPoint(p), np.asarray(p) + [-2.0, 0.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_world_conversion_round_trips_and_load_field_reads_itk_back(case, tmp_path):
    fo, fs, fsp, mo, ms, msp = CASES[case]
    a_f, a_m = grid_affine(fo, fs, fsp), grid_affine(mo, ms, msp, centre=(4.0, -3.0, 6.0))
    disp = voxel_field(fs, a_f, a_m)
    world = disp_vox_to_world(disp, a_f, a_m)
    np.testing.assert_allclose(disp_world_to_vox(world, a_f, a_m), disp, atol=2e-4)
    x = identity_grid_vox(fs, dtype=np.float64)
    p = np.einsum("ab,b...->a...", a_f[:3, :3], x) + a_f[:3, 3].reshape(3, 1, 1, 1)
    np.testing.assert_allclose(world, world_map(p) - p, atol=2e-4)  # d(p) = T(p) - p, in mm
    save_field_itk(disp, a_f, a_m, tmp_path / "u.nii.gz")
    back = load_field(tmp_path / "u.nii.gz", fixed=Volume(np.zeros(fs, np.float32), a_f), moving=a_m)
    np.testing.assert_allclose(back.array, disp, atol=2e-4)
    assert back.meta["file_format"] == "itk"
    with pytest.raises(InputError, match="ITK displacement field .*moving image"):
        load_field(tmp_path / "u.nii.gz")
    f = from_itk_layout(to_itk_layout(world))
    np.testing.assert_array_equal(f, world)


def test_same_grid_world_field_is_the_voxel_field_scaled():
    a = grid_affine("oblique", (6, 7, 8), (2.0, 1.5, 3.0))
    disp = np.random.default_rng(0).normal(size=(3, 6, 7, 8)).astype(np.float32)
    np.testing.assert_allclose(disp_vox_to_world(disp, a), disp_vox_to_mm(disp, a), atol=1e-5)
    np.testing.assert_allclose(disp_vox_to_world(disp, a, a), disp_vox_to_mm(disp, a), atol=1e-4)


def test_save_field_as_every_format(tmp_path):
    a_f = grid_affine("LPS", (16, 12, 20), (2.0, 2.0, 2.0))
    disp = voxel_field((16, 12, 20), a_f, a_f)
    assert FIELD_FORMATS == ("voxels", "itk", "deeds")
    written = save_field_as(disp, a_f, a_f, tmp_path / "v.nii.gz", "voxels")
    assert written == [tmp_path / "v.nii.gz"]
    np.testing.assert_array_equal(load_field(tmp_path / "v.nii.gz").array, disp)
    save_field_as(disp, a_f, a_f, tmp_path / "i.nii", "itk")
    np.testing.assert_allclose(load_field(tmp_path / "i.nii", moving=a_f).array, disp, atol=1e-4)
    files = save_field_as(disp, a_f, a_f, tmp_path / "d_displacements.dat", "deeds", moving_shape=(16, 12, 20))
    assert [p.name for p in files] == ["d_displacements.dat", "d_matrix.txt"] and all(p.is_file() for p in files)
    assert field_output_files(tmp_path / "d", "deeds") == files
    from slicreg.deeds import read_deeds

    back = read_deeds(files[0], (16, 12, 20), matrix_path=files[1]).to_field()
    assert np.abs(back - disp)[:, 2:-4, 2:-4, 2:-4].max() < 0.05  # smooth field: the control grid carries it
    with pytest.raises(InputError, match="one grid size"):
        save_field_as(disp, a_f, a_f, tmp_path / "e", "deeds", moving_shape=(16, 12, 21))
    with pytest.raises(InputError, match="must end in .nii or .nii.gz"):
        save_field_as(disp, a_f, a_f, tmp_path / "x.mha", "itk")
    with pytest.raises(InputError, match="--field-format mm: expected one of voxels, itk, deeds"):
        save_field_as(disp, a_f, a_f, tmp_path / "x.nii.gz", "mm")


def test_voxel_field_files_are_unchanged_and_gzip_is_deterministic(tmp_path):
    """The default layout stays the Learn2Reg one (X, Y, Z, 3), and equal data give equal bytes (stage hashes)."""
    import nibabel as nib

    a = grid_affine("RAS", (10, 11, 12), (2.0, 2.0, 2.0))
    disp = np.random.default_rng(1).normal(size=(3, 10, 11, 12)).astype(np.float32)
    save_field(disp, a, tmp_path / "a.nii.gz")
    save_field(disp, a, tmp_path / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    img = nib.load(str(tmp_path / "a.nii.gz"))
    assert img.shape == (10, 11, 12, 3) and img.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.moveaxis(np.asarray(img.dataobj), -1, 0), disp)
    vol = load_volume(tmp_path / "a.nii.gz", channels=True)
    np.testing.assert_array_equal(vol.array, disp)


# ------------------------------------------------------------------------------------------- the commands
def _ct(shape, affine):
    image, _ = body_phantom(shape, affine)
    return image


def test_register_command_field_formats(tmp_path, capsys):
    """``slicreg register`` writes ITK by default; voxels and deeds on request; all three are the same field."""
    from helpers_own_data import tiny_bundle

    from pipelines.cli import main

    bundle = tiny_bundle(tmp_path / "b")
    prep = (16, 16, 24)  # the tiny bundle's preprocessed grid, 2 mm RAS: used as it is
    a_f = np.diag([2.0, 2.0, 2.0, 1.0])
    a_f[:3, 3] = (-15.0, -15.0, -23.0)
    a_m = a_f.copy()
    a_m[:3, 3] += (4.0, -2.0, 2.0)  # the moving scan's grid elsewhere in the world
    save_volume(Volume(_ct(prep, a_f), a_f), tmp_path / "f.nii.gz")
    save_volume(Volume(_ct(prep, a_m), a_m), tmp_path / "m.nii.gz")
    base = ["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
            "--weights", str(bundle), "--threads", "1"]
    assert main([*base, "--out-field", str(tmp_path / "u_itk.nii.gz")]) == 0
    assert "ITK displacement, world mm" in capsys.readouterr().out
    assert main([*base, "--out-field", str(tmp_path / "u_vox.nii.gz"), "--field-format", "voxels"]) == 0
    assert main([*base, "--out-field", str(tmp_path / "u"), "--field-format", "deeds"]) == 0
    vox = load_field(tmp_path / "u_vox.nii.gz").array
    itk = load_field(tmp_path / "u_itk.nii.gz", moving=a_m).array
    np.testing.assert_allclose(itk, vox, atol=1e-3)
    assert np.abs(vox).max() > 0.5  # the grids differ by whole voxels: not the zero field
    assert sitk.ReadImage(str(tmp_path / "u_itk.nii.gz")).GetNumberOfComponentsPerPixel() == 3
    assert (tmp_path / "u_displacements.dat").is_file() and (tmp_path / "u_matrix.txt").is_file()
    capsys.readouterr()
    assert main([*base, "--out-field", str(tmp_path / "u.mha")]) == 2
    assert "must end in .nii or .nii.gz" in capsys.readouterr().err


def test_align_and_deeds_import_field_formats(tmp_path, capsys):
    from pipelines.cli import main

    shape = (20, 18, 22)
    a = grid_affine("LPS", shape, (2.0, 2.0, 2.0))
    save_volume(Volume(_ct(shape, a), a), tmp_path / "f.nii.gz")
    a_m = a.copy()
    a_m[:3, 3] += (2.0, 0.0, -2.0)
    save_volume(Volume(_ct(shape, a_m), a_m), tmp_path / "m.nii.gz")
    common = ["--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"), "--preset", "affine",
              "--quiet", "--threads", "1", "--force"]
    assert main(["align", *common, "--out-field", str(tmp_path / "v.nii.gz"), "--deeds-out",
                 str(tmp_path / "D")]) == 0
    assert main(["align", *common, "--out-field", str(tmp_path / "i.nii.gz"), "--field-format", "itk"]) == 0
    assert main(["align", *common, "--out-field", str(tmp_path / "E"), "--field-format", "deeds"]) == 0
    vox = load_field(tmp_path / "v.nii.gz").array
    np.testing.assert_allclose(load_field(tmp_path / "i.nii.gz", moving=a_m).array, vox, atol=1e-3)
    assert (tmp_path / "E_displacements.dat").read_bytes() == (tmp_path / "D_displacements.dat").read_bytes()
    assert (tmp_path / "E_matrix.txt").read_text() == (tmp_path / "D_matrix.txt").read_text()

    imp = ["deeds-import", "--dat", str(tmp_path / "D_displacements.dat"), "--matrix", str(tmp_path / "D_matrix.txt"),
           "--fixed", str(tmp_path / "f.nii.gz")]
    assert main([*imp, "--out", str(tmp_path / "di.nii.gz"), "--field-format", "itk"]) == 2
    assert "needs --moving" in capsys.readouterr().err
    assert main([*imp, "--out", str(tmp_path / "dv.nii.gz")]) == 0
    assert main([*imp, "--out", str(tmp_path / "di.nii.gz"), "--field-format", "itk", "--moving",
                 str(tmp_path / "m.nii.gz")]) == 0
    np.testing.assert_allclose(load_field(tmp_path / "di.nii.gz", moving=a_m).array,
                               load_field(tmp_path / "dv.nii.gz").array, atol=1e-3)


def test_load_field_tells_itk_files_from_voxel_files_in_the_5d_layout(tmp_path):
    import nibabel as nib

    a = grid_affine("RAS", (6, 7, 8), (2.0, 2.0, 2.0))
    disp = np.random.default_rng(2).normal(size=(3, 6, 7, 8)).astype(np.float32)
    five_d = np.moveaxis(disp, 0, -1)[:, :, :, None, :]
    nib.save(nib.Nifti1Image(five_d, a), str(tmp_path / "plain.nii.gz"))  # no intent: voxels, as before
    np.testing.assert_array_equal(load_field(tmp_path / "plain.nii.gz").array, disp)
    own = nib.Nifti1Image(five_d, a)
    own.header.set_intent("vector", (), "disp_vox_f2m")  # slicreg's voxel field, written 5-D by some tool
    nib.save(own, str(tmp_path / "own.nii.gz"))
    np.testing.assert_array_equal(load_field(tmp_path / "own.nii.gz").array, disp)
    itk = nib.Nifti1Image(five_d, a)
    itk.header.set_intent("vector", (), "")  # as SimpleITK and ANTs write displacement fields: mm, LPS
    nib.save(itk, str(tmp_path / "itk.nii.gz"))
    back = load_field(tmp_path / "itk.nii.gz", moving=a).array
    np.testing.assert_allclose(back, disp_world_to_vox(world_ras_to_lps(disp), a, a), atol=1e-5)
    assert not np.allclose(back, disp)


def test_warp_and_evaluate_commands_read_an_itk_field_like_its_voxel_field(tmp_path, capsys):
    """`slicreg register` writes ITK fields by default: warp and evaluate take them as they take voxel fields."""
    import json

    import nibabel as nib

    from pipelines.cli import main
    from slicreg.conventions import Volume
    from slicreg.io import save_field, save_field_as, save_volume

    fixed_shape, moving_shape = (20, 18, 16), (18, 20, 14)
    fa = grid_affine("RAS", fixed_shape, (2.0, 2.0, 2.5))
    ma = grid_affine("oblique", moving_shape, (2.2, 2.0, 2.6))
    image, labels = body_phantom(moving_shape, ma)
    _, fixed_labels = body_phantom(fixed_shape, fa)
    disp = voxel_field(fixed_shape, fa, ma)
    save_volume(Volume(image, ma), tmp_path / "m.nii.gz")
    save_volume(Volume(labels, ma), tmp_path / "ml.nii.gz")
    save_volume(Volume(fixed_labels, fa), tmp_path / "fl.nii.gz")
    save_field(disp, fa, tmp_path / "u_vox.nii.gz")
    save_field_as(disp, fa, ma, tmp_path / "u_itk.nii.gz", "itk")
    for kind in ("vox", "itk"):
        assert main(["warp", "--moving", str(tmp_path / "m.nii.gz"), "--field", str(tmp_path / f"u_{kind}.nii.gz"),
                     "--out", str(tmp_path / f"w_{kind}.nii.gz")]) == 0
        assert main(["evaluate", "--fixed-labels", str(tmp_path / "fl.nii.gz"), "--moving-labels",
                     str(tmp_path / "ml.nii.gz"), "--field", str(tmp_path / f"u_{kind}.nii.gz"), "--labels", "1..3",
                     "--no-hd95", "--json", str(tmp_path / f"e_{kind}.json")]) == 0
    a = nib.load(tmp_path / "w_vox.nii.gz").get_fdata()
    b = nib.load(tmp_path / "w_itk.nii.gz").get_fdata()
    assert np.abs(a - b).max() < 0.05
    scores = [json.loads((tmp_path / f"e_{k}.json").read_text()) for k in ("vox", "itk")]
    assert scores[0]["per_label"] == scores[1]["per_label"]
