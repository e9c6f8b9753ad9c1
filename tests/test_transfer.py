"""Supervoxel transfer: identity, known shifts and scalings, dtype, the label check, the command and the stage."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from pipelines.cli import main
from pipelines.runner import Runner, StageContext, load_pipeline
from slicreg import deeds
from slicreg.conventions import Volume, downsample_affine
from slicreg.errors import InputError
from slicreg.io import atomic_write_json, load_field, load_volume, save_field, save_volume
from slicreg.transfer import check_transfer, reached_region, sample_layers, template_positions, transfer_supervoxels

COARSE = (6, 7, 8)  # template / subject 4 mm grid
FINE = (12, 14, 16)  # 2 mm grid


def _layers(seed=0, n_layers=3, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, size=(n_layers, *COARSE)).astype(dtype)


def _field(**components):
    u = np.zeros((3, *FINE), np.float32)
    for axis, value in components.items():
        u[int(axis[1])] = value
    return u


def test_identity_keeps_labels_and_dtype():
    sv = _layers()
    out = transfer_supervoxels(sv, _field())
    assert out.dtype == np.uint8 and out.shape == sv.shape
    np.testing.assert_array_equal(out, sv)
    sv16 = _layers(dtype=np.int16) * 50
    out16 = transfer_supervoxels(sv16, _field())
    assert out16.dtype == np.int16
    np.testing.assert_array_equal(out16, sv16)
    # torch in -> torch out
    out_t = transfer_supervoxels(torch.from_numpy(sv), torch.from_numpy(_field()))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8
    np.testing.assert_array_equal(out_t.numpy(), sv)


@pytest.mark.parametrize("axis,shift_2mm", [(0, 4.0), (1, -2.0), (2, 6.0), (1, 2.6)])
def test_known_shift_moves_supervoxels(axis, shift_2mm):
    sv = _layers(1)
    out = transfer_supervoxels(sv, _field(**{f"u{axis}": shift_2mm}))
    s = int(np.floor(shift_2mm / 2 + 0.5))  # template 4 mm index = q + shift/2, rounded
    n = COARSE[axis]
    src = [slice(None)] * 4
    dst = [slice(None)] * 4
    src[axis + 1] = slice(max(0, s), n + min(0, s))
    dst[axis + 1] = slice(max(0, -s), n - max(0, s))
    np.testing.assert_array_equal(out[tuple(dst)], sv[tuple(src)])
    outside = np.ones(out.shape, bool)
    outside[tuple(dst)] = False
    assert not out[outside].any()  # zero padding beyond the template's grid


def test_field_is_read_at_the_2mm_centre_of_each_4mm_voxel():
    """u(x) = 0.5 x along axis 0: the template position of 4 mm voxel q is (1.5 (2q + 0.5) - 0.5) / 2."""
    sv = np.broadcast_to(np.arange(1, COARSE[0] + 1, dtype=np.uint8)[None, :, None, None], (1, *COARSE)).copy()
    x = np.arange(FINE[0], dtype=np.float32)
    u = _field(u0=0.5 * x[:, None, None])
    out = transfer_supervoxels(sv, u)
    q = np.arange(COARSE[0])
    pos = (1.5 * (2 * q + 0.5) - 0.5) / 2
    idx = np.floor(pos + 0.5).astype(int)
    expected = np.where(idx < COARSE[0], np.minimum(idx, COARSE[0] - 1) + 1, 0)
    np.testing.assert_array_equal(out[0, :, 0, 0], expected)
    np.testing.assert_allclose(template_positions(u)[0, :, 0, 0], pos, atol=1e-6)


def test_check_reports_labels_lost_at_the_edge():
    # labels = slabs along axis 1: label y + 1 at template 4 mm row y
    sv = np.broadcast_to(np.arange(1, COARSE[1] + 1, dtype=np.uint8)[None, None, :, None], (2, *COARSE)).copy()
    u = _field(u1=4.0)  # 4 mm shift of 2 rows: template rows 0 and 1 are never reached
    pos = template_positions(u)
    out = sample_layers(sv, pos)
    checks = check_transfer(sv, out, reached=reached_region(u, COARSE))
    for c in checks:
        assert c.n_template == COARSE[1] and c.n_kept == COARSE[1] - 2
        assert c.lost_at_edge == [1, 2] and c.lost_inside == []
        assert c.voxels[0] == 2 * COARSE[0] * COARSE[2]  # two background rows at the far side
    identity = transfer_supervoxels(sv, _field())
    assert check_transfer(sv, identity, reached=reached_region(_field(), COARSE))[0].lost == []
    # without the reached region every loss counts as inside
    assert check_transfer(sv, out)[0].lost_inside == [1, 2]


def test_check_reports_labels_squeezed_out_inside():
    # u(x) = x along axis 2 (the subject is the template shrunk by 2): every other template row is skipped
    sv = np.broadcast_to(np.arange(1, COARSE[2] + 1, dtype=np.uint8)[None, None, None, :], (1, *COARSE)).copy()
    z = np.arange(FINE[2], dtype=np.float32)
    u = _field(u2=z[None, None, :])
    pos = template_positions(u)
    out = sample_layers(sv, pos)
    assert reached_region(u, COARSE).all()
    [c] = check_transfer(sv, out, reached=reached_region(u, COARSE))
    assert c.lost_inside == [2, 4, 6, 8] and c.lost_at_edge == []  # rows 1, 3, 5, 7
    assert c.n_kept == 4


def test_bad_inputs():
    with pytest.raises(InputError, match="supervoxel layers"):
        transfer_supervoxels(np.zeros(COARSE, np.uint8), _field())
    with pytest.raises(InputError, match=r"\(3, X, Y, Z\)"):
        transfer_supervoxels(_layers(), np.zeros((2, *FINE), np.float32))
    with pytest.raises(InputError, match="integer labels"):
        sample_layers(np.zeros((1, *COARSE), np.float32), np.zeros((3, 2, 2, 2), np.float32))


def test_transfer_command(tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    sv = _layers(2)
    save_volume(Volume(sv, downsample_affine(aff, 2)), tmp_path / "sv.nii.gz")
    save_volume(Volume(np.zeros(FINE, np.int16), aff), tmp_path / "subject.nii.gz")
    save_field(_field(u0=4.0), aff, tmp_path / "u.nii.gz")
    assert main(["transfer", "--supervoxels", str(tmp_path / "sv.nii.gz"), "--field", str(tmp_path / "u.nii.gz"),
                 "--fixed", str(tmp_path / "subject.nii.gz"), "--out", str(tmp_path / "out.nii.gz")]) == 0
    assert "lost" in capsys.readouterr().out
    out = load_volume(tmp_path / "out.nii.gz", kind="labels", channels=True)
    assert out.array.dtype == np.uint8 and out.array.shape == sv.shape
    np.testing.assert_allclose(out.affine, downsample_affine(aff, 2))
    np.testing.assert_array_equal(out.array[:, :-2], sv[:, 2:])


# -------------------------------------------------------------------------------------------- the stage
TEMPLATE, SUBJECTS = "case_0000", ["case_0001", "case_0002"]
SHIFTS = {"case_0001": (4.0, 0.0, 0.0), "case_0002": (0.0, -4.0, 2.0)}  # 2 mm voxels, subject -> template


def _dataset(root):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10, 5, 3]
    ds = root / "dataset"
    rng = np.random.default_rng(3)
    subjects = {}
    for sid in [TEMPLATE, *SUBJECTS]:
        save_volume(Volume(rng.integers(-1000, 1000, size=FINE).astype(np.int16), aff),
                    ds / "imagesTr" / f"{sid}_0000.nii.gz")
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "role": "template" if sid == TEMPLATE else "train"}
    (ds / "dataset.json").write_text(json.dumps({
        "name": "t", "format": "slicreg-dataset/1", "template": TEMPLATE, "subjects": subjects,
        "training": SUBJECTS, "test": [], "registration_pairs": []}))
    sv = _layers(4, n_layers=2)
    save_volume(Volume(sv, downsample_affine(aff, 2)), root / "sv" / "supervoxels.nii.gz")
    folder = root / "deeds"
    folder.mkdir()
    for sid, shift in SHIFTS.items():  # a pure translation in the matrix file, zero displacements
        ctrl = np.zeros((3, *deeds.control_shape(FINE, 4)), np.float32)
        a = np.eye(4)
        a[:3, 3] = shift
        deeds.write_deeds(folder / f"F{sid}", ctrl, a)
    return ds, root / "sv", folder, sv, aff


def _expected(sv, shift):
    s = [int(v / 2) for v in shift]
    out = np.zeros_like(sv)
    n = sv.shape[1:]
    dst = tuple(slice(max(0, -k), m - max(0, k)) for k, m in zip(s, n))
    src = tuple(slice(max(0, k), m + min(0, k)) for k, m in zip(s, n))
    out[(slice(None), *dst)] = sv[(slice(None), *src)]
    return out


def _check_outputs(out_dir, sv, aff):
    report = json.loads((out_dir / "transfer.json").read_text())
    assert report["template"] == TEMPLATE and set(report["subjects"]) == set(SUBJECTS)
    for sid, shift in SHIFTS.items():
        got = load_volume(out_dir / "transferred" / f"{sid}.nii.gz", kind="labels", channels=True)
        assert got.array.dtype == np.uint8
        np.testing.assert_allclose(got.affine, downsample_affine(aff, 2))
        np.testing.assert_array_equal(got.array, _expected(sv, shift))
        field = load_field(out_dir / "fields" / f"disp_{sid}_{TEMPLATE}.nii.gz")
        np.testing.assert_allclose(field.array, np.broadcast_to(np.reshape(shift, (3, 1, 1, 1)), field.array.shape),
                                   atol=1e-5)
        rec = report["subjects"][sid]
        assert len(rec["layers"]) == 2
        lost = {v for layer in rec["layers"] for v in layer["lost"]}
        assert rec["n_lost"] == sum(len(layer["lost"]) for layer in rec["layers"])
        kept = [set(np.unique(got.array[i])) - {0} for i in range(2)]
        assert all(layer["n_kept"] == len(k) for layer, k in zip(rec["layers"], kept))
        assert lost.isdisjoint(set().union(*kept)) or rec["n_lost"] == 0
    return report


def test_stage_with_deeds_fields_through_the_runner(tmp_path):
    ds, sv_dir, folder, sv, aff = _dataset(tmp_path)
    (tmp_path / "p.toml").write_text(f"""
[pipeline]
name = "t"
work_dir = "{tmp_path / 'work'}"
[stages.data]
type = "t-copy"
path = "{ds}"
[stages.sv]
type = "t-copy"
path = "{sv_dir}"
[stages.transfer]
inputs = {{ dataset = "data", supervoxels = "sv" }}
field_source = "deeds"
deeds_folder = "{folder}"
""")
    _register_copy_stage()
    runner = Runner(load_pipeline(tmp_path / "p.toml"), quiet=True)
    runner.run()
    out_dir = tmp_path / "work" / "transfer" / "current"
    report = _check_outputs(out_dir.resolve(), sv, aff)
    assert report["field_source"] == "deeds" and report["grid_spacing"] == 4
    assert report["subjects"]["case_0001"]["deeds"]["matrix"].endswith("Fcase_0001_matrix.txt")


def _register_copy_stage():
    from pipelines.runner import REGISTRY, stage

    if "t-copy" in REGISTRY:
        return

    @stage("t-copy", version="1", params={"path": None}, path_params=["path"])
    def copy_stage(ctx):
        """Copies a folder (test helper)."""
        import shutil

        shutil.copytree(ctx.params["path"], ctx.out_dir, dirs_exist_ok=True)


def _ctx(tmp_path, ds, sv_dir, **params):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    full = {"field_source": "deeds", "deeds_folder": None, "grid_spacing": 4, "align_preset": "abdomen-ct",
            "fov_mask": True, **params}
    return StageContext("transfer", full, {"dataset": ds, "supervoxels": sv_dir}, out, tmp_path, quiet=True)


def test_stage_resumes_done_subjects(tmp_path):
    from pipelines.stages.transfer import transfer_stage

    ds, sv_dir, folder, sv, aff = _dataset(tmp_path)
    ctx = _ctx(tmp_path, ds, sv_dir, deeds_folder=str(folder))
    transfer_stage(ctx)
    done = ctx.out_dir / "transferred" / "case_0001.nii.gz"
    stamp = done.stat().st_mtime_ns
    (ctx.out_dir / "transferred" / "case_0002.nii.gz").unlink()  # as if killed before the second subject
    (folder / "Fcase_0001_displacements.dat").write_bytes(b"")  # would fail if case_0001 were recomputed
    ctx2 = _ctx(tmp_path, ds, sv_dir, deeds_folder=str(folder))
    transfer_stage(ctx2)
    assert done.stat().st_mtime_ns == stamp
    report = _check_outputs(ctx.out_dir, sv, aff)
    assert report["subjects"]["case_0001"].get("resumed_transferred") is True
    assert "1 of 2 subjects already transferred" in " ".join(ctx2.notes)


def test_stage_missing_deeds_files_is_a_clear_error(tmp_path):
    from pipelines.stages.transfer import transfer_stage

    ds, sv_dir, folder, sv, aff = _dataset(tmp_path)
    (folder / "Fcase_0002_displacements.dat").unlink()
    with pytest.raises(InputError, match="Fcase_0002_displacements.dat"):
        transfer_stage(_ctx(tmp_path, ds, sv_dir, deeds_folder=str(folder)))
    with pytest.raises(InputError, match="needs deeds_folder"):
        transfer_stage(_ctx(tmp_path, ds, sv_dir))


def test_stage_with_align(tmp_path, monkeypatch):
    """The align branch; register_pair is replaced by a stand-in returning the known shifts."""
    from pipelines.stages.transfer import transfer_stage

    ds, sv_dir, folder, sv, aff = _dataset(tmp_path)
    images = {sid: load_volume(ds / "imagesTr" / f"{sid}_0000.nii.gz").array for sid in [TEMPLATE, *SUBJECTS]}
    calls = []
    masks = {}
    # the first subject has a crop record whose field of view is a slab: its mask reaches register_pair
    from slicreg.geometry import CropRecord

    vol = load_volume(ds / "imagesTr" / f"{SUBJECTS[0]}_0000.nii.gz")
    pad = ((0, 0), (0, 0), (2, 3))
    record = CropRecord(
        original_shape=vol.shape, original_affine=vol.affine, original_axcodes="RAS", spacing_mm=2.0,
        resampled_shape=vol.shape, resampled_affine=vol.affine, crop_start=(0, 0, 0), crop_shape=vol.shape,
        affine=vol.affine, centre_vox=None, padded_vox=pad, dropped_vox=((0, 0), (0, 0), (0, 0)), clipped_voxels=0,
        ct_check={}, source={})
    (ds / "crops").mkdir(exist_ok=True)
    atomic_write_json(ds / "crops" / f"{SUBJECTS[0]}.json", record.to_json())

    class Result:
        def __init__(self, disp, info):
            self.disp_vox, self.info = disp, info

    def fake_register_pair(fixed, moving, *, spacing_mm=(2, 2, 2), preset="abdomen-ct", device="cpu", seed=0,
                           progress=False, fixed_mask=None, moving_mask=None):
        sid = next(s for s in SUBJECTS if np.array_equal(images[s], fixed))
        assert np.array_equal(moving, images[TEMPLATE])
        masks[sid] = (fixed_mask, moving_mask)
        calls.append((sid, tuple(spacing_mm), preset, device, seed))
        disp = np.broadcast_to(np.reshape(SHIFTS[sid], (3, 1, 1, 1)), (3, *fixed.shape)).astype(np.float32)
        return Result(disp, {"preset": preset, "runtime_s": 0.0})

    try:
        import slicreg.alignment as align_module
        monkeypatch.setattr(align_module, "register_pair", fake_register_pair)
    except ImportError:  # the toolkit is being written in parallel; a stand-in module keeps this test honest
        module = types.ModuleType("slicreg.alignment")
        module.register_pair = fake_register_pair
        monkeypatch.setitem(sys.modules, "slicreg.alignment", module)
    ctx = _ctx(tmp_path, ds, sv_dir, field_source="align", align_preset="fast")
    transfer_stage(ctx)
    assert sorted(c[0] for c in calls) == SUBJECTS
    assert all(c[1:] == ((2.0, 2.0, 2.0), "fast", "cpu", 0) for c in calls)
    fixed_mask, moving_mask = masks[SUBJECTS[0]]
    assert moving_mask is None and fixed_mask is not None and fixed_mask.shape == images[SUBJECTS[0]].shape
    assert fixed_mask[..., 2:-3].all() and not fixed_mask[..., :2].any() and not fixed_mask[..., -3:].any()
    assert all(m == (None, None) for sid, m in masks.items() if sid != SUBJECTS[0])
    report = _check_outputs(ctx.out_dir, sv, aff)
    assert report["field_source"] == "align" and report["subjects"]["case_0001"]["align"]["preset"] == "fast"
