"""Registration by supervoxels: prediction plumbing, the flow wrapper, the MIND-SSC refinement, the
``slicreg register`` command end to end (raw and preprocessed inputs, bad inputs) and the ``register`` stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import load_field, load_labels, save_volume, sha256_file
from slicreg.registration import (
    predict_supervoxels,
    refine_field,
    register_preprocessed,
    register_supervoxel_maps,
    upsample_labels_stride2,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ prediction
def test_upsample_stride2_puts_output_voxel_q_at_input_voxel_2q():
    lab = torch.arange(3 * 4 * 5, dtype=torch.int64).reshape(1, 3, 4, 5)
    up = upsample_labels_stride2(lab)
    assert up.shape == (1, 6, 8, 10)
    for p in range(6):  # input voxel p takes output voxel floor(p / 2 + 0.5), clamped
        q = min((p + 1) // 2, 2)
        assert torch.equal(up[0, p, ::2, ::2], lab[0, q])
    with pytest.raises(InputError):
        upsample_labels_stride2(lab[0])


def test_predict_supervoxels_shapes_and_eval_mode():
    from slicreg.network import build_model

    model = build_model(seed=0, backward="eager")
    model.train()
    image = np.random.default_rng(0).normal(0, 200, size=(32, 32, 48)).astype(np.float32)
    sv = predict_supervoxels(model, image)
    assert sv.dtype == np.uint8 and sv.shape == (16, 16, 16, 24)
    assert not model.training  # BatchNorm running statistics, no dropout
    again = predict_supervoxels(model, image)
    np.testing.assert_array_equal(sv, again)  # deterministic in eval mode
    with pytest.raises(InputError, match="divisible by 8"):
        predict_supervoxels(model, image[:30])


# ------------------------------------------------------------------------------------------------ flow wrapper
def blocks(shape, size, offset=(0, 0, 0)):
    """16 layers of block supervoxels (labels 1..), shifted by `offset` voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    layers = []
    for layer in range(16):
        shift = np.array([layer % 3, (layer // 3) % 3, layer % 5])
        cells = [(grid[a] - offset[a] + shift[a]) // size for a in range(3)]
        ncell = [int(np.ceil((n + 8) / size)) + 1 for n in shape]
        lab = (cells[0] * ncell[1] * ncell[2] + cells[1] * ncell[2] + cells[2]) % 127 + 1
        layers.append(lab)
    return np.stack(layers).astype(np.uint8)


def test_identity_pair_gives_near_zero_field():
    sv = blocks((24, 20, 28), 6)
    result = register_supervoxel_maps(sv, sv, iterations=20, init="zero")
    assert result.disp_vox.shape == (3, 48, 40, 56)
    assert np.abs(result.disp_vox).max() < 0.5
    assert result.info["n_keypoints"] > 16
    assert set(result.info["timings_s"]) == {"keypoints", "features", "adam", "dense field"}


def test_register_preprocessed_needs_matching_shapes():
    with pytest.raises(InputError, match="same shape"):
        register_preprocessed(None, np.zeros((32, 32, 32)), np.zeros((32, 32, 40)))
    with pytest.raises(InputError, match="template_supervoxels"):
        register_preprocessed(None, np.zeros((32, 32, 32)), np.zeros((32, 32, 32)),
                              fixed_sv=np.zeros((16, 16, 16, 16), np.uint8), moving_is_template=True)


# ------------------------------------------------------------------------------------------------ refinement
def blob_texture(coords, seed=0, n=80, shape=(32, 32, 32)):
    """An analytic texture in HU at voxel positions ``coords`` ``(3, ...)``: a sum of random Gaussian blobs."""
    rng = np.random.default_rng(seed)
    out = np.zeros(coords.shape[1:])
    for _ in range(n):
        c = rng.uniform(0, np.array(shape))
        s, a = rng.uniform(1.5, 4.0), rng.uniform(-400, 600)
        out += a * np.exp(-sum((coords[i] - c[i]) ** 2 for i in range(3)) / (2 * s * s))
    return out.astype(np.float32)


SHAPE = (32, 32, 32)
GRID = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
SHIFT = np.array([1.5, -1.0, 2.0])


def smooth_field(amplitude, phase):
    """A smooth field: one period of a sine per axis, ``(3, 32, 32, 32)`` voxels."""
    return np.stack([amplitude * np.sin(2 * np.pi * GRID[(a + 1) % 3] / SHAPE[0] + phase + a) for a in range(3)])


@pytest.fixture(scope="module")
def deformed_pair():
    """``moving`` = the texture; ``fixed(x) = moving(x + u(x))`` for the known smooth field
    ``u = SHIFT + smooth_field(1.0, 0)``, evaluated analytically (no resampling error); ``init`` = ``u`` plus
    another smooth field of 1.5 voxels."""
    truth = (SHIFT[:, None, None, None] + smooth_field(1.0, 0.0)).astype(np.float32)
    fixed = blob_texture(GRID + truth)
    moving = blob_texture(GRID)
    init = (truth + smooth_field(1.5, 1.0)).astype(np.float32)
    return fixed, moving, truth, init


# one 4 mm level with a node per voxel (32^3 has few voxels at 8 mm), independent of the preset's tuning
KNOBS = {"iterations": 40, "deformable": {"levels": (2,), "grid_spacing": 1, "subsample": 2, "lr": 0.25,
                                          "weight": 0.03}}


def _interior_error(disp, truth):
    inner = (slice(None), *(slice(6, -6),) * 3)
    return float(np.linalg.norm(disp[inner] - truth[inner], axis=0).mean())


def test_refine_improves_a_known_smooth_deformation_from_a_given_init(deformed_pair):
    fixed, moving, truth, init = deformed_pair
    before = _interior_error(init, truth)
    out, info = refine_field(fixed, moving, init, **KNOBS)
    assert out.shape == init.shape and out.dtype == np.float32
    assert before > 1.0
    assert _interior_error(out, truth) < 0.5 * before, (before, _interior_error(out, truth))
    assert info["preset"] == "refine" and [lv["iterations"] for lv in info["levels"]] == [40]
    assert info["config"]["stages"]["deformable"]["penalise"] == "increment"
    again, _ = refine_field(fixed, moving, init, **KNOBS)
    np.testing.assert_array_equal(out, again)  # deterministic under the seed
    t_out, _ = refine_field(torch.from_numpy(fixed), torch.from_numpy(moving), torch.from_numpy(init), iterations=3)
    assert isinstance(t_out, torch.Tensor)  # torch in -> torch out


def test_refine_keeps_a_correct_field_and_zero_iterations_change_nothing(deformed_pair):
    fixed, moving, truth, init = deformed_pair
    out, _ = refine_field(fixed, moving, truth, **KNOBS)
    # the optimum stays near where it is (block averages of the 4 mm level do not commute exactly with a
    # non-constant deformation: ~0.3 voxels here, against 1.8 for the perturbed start)
    assert _interior_error(out, truth) < 0.4
    # the change is added to the initial field, which keeps its full-resolution detail: with no iteration the
    # result is the initial field (up to the float rounding of (x + u) - x)
    rough = init + np.random.default_rng(1).normal(0, 0.5, init.shape).astype(np.float32)
    same, info = refine_field(fixed, moving, rough, iterations=0)
    np.testing.assert_allclose(same, rough, atol=1e-4)
    assert info["iterations"] == 0


def test_refine_from_a_zero_field_equals_register_pair_with_its_preset(deformed_pair):
    from slicreg.alignment import register_pair

    fixed, moving, _, _ = deformed_pair
    zero = np.zeros((3, *SHAPE), np.float32)
    out, _ = refine_field(fixed, moving, zero, **KNOBS)
    engine = register_pair(fixed, moving, preset="refine", init_disp=zero, deformable=KNOBS["deformable"] | {
        "iterations": 40})
    np.testing.assert_array_equal(out, engine.disp_vox)
    # the preset has no affine stage, so without an initial field it starts from the identity: the same field
    cold = register_pair(fixed, moving, preset="refine", deformable=KNOBS["deformable"] | {"iterations": 40})
    np.testing.assert_array_equal(out, cold.disp_vox)
    assert np.abs(out).max() > 0.5  # it did move


def test_refine_budget_scales_the_iterations(deformed_pair):
    fixed, moving, truth, init = deformed_pair
    plain, _ = refine_field(fixed, moving, init, **KNOBS)
    # a budget that is never reached changes nothing (the timing probe uses its own generator)
    roomy, info = refine_field(fixed, moving, init, budget_s=1e6, **KNOBS)
    np.testing.assert_array_equal(roomy, plain)
    assert info["budget"]["planned"][0]["iterations"] == 40 and info["budget"]["skipped_levels"] == []
    # an exhausted budget runs no iteration on the first level and drops the finer ones before their features
    none, info = refine_field(fixed, moving, init, budget_s=0.0, iterations=40,
                              deformable={**KNOBS["deformable"], "levels": (4, 2, 1)})
    assert [lv["iterations"] for lv in info["levels"]] == [0]
    assert [s["factor"] for s in info["budget"]["skipped_levels"]] == [2, 1]
    np.testing.assert_allclose(none, init, atol=1e-4)


def test_refine_compares_only_inside_the_fields_of_view(deformed_pair):
    fixed, moving, truth, _ = deformed_pair
    slab = np.zeros(SHAPE, bool)
    slab[:, :, 8:24] = True  # a slab of data; the rest is the preprocessing's air padding
    outside = ~slab
    outside[:, :, 4:28] = False  # away from the slab

    def moved(out):
        return np.linalg.norm(out - truth, axis=0)[outside].mean()

    # a fixed slab: without its mask the padding (flat air) is matched against the moving scan's anatomy
    fixed_slab = np.where(slab, fixed, np.float32(-1000.0))
    masked, info = refine_field(fixed_slab, moving, truth, fixed_mask=slab, **KNOBS)
    unmasked, _ = refine_field(fixed_slab, moving, truth, **KNOBS)
    assert info["fov"]["fixed_fraction"] == pytest.approx(0.5)
    assert moved(masked) < 0.25 and moved(unmasked) > 2 * moved(masked), (moved(masked), moved(unmasked))
    # a moving slab: fixed voxels whose warped position lands in the moving padding compare nothing
    moving_slab = np.where(slab, moving, np.float32(-1000.0))
    masked, info = refine_field(fixed, moving_slab, truth, moving_mask=slab, **KNOBS)
    unmasked, _ = refine_field(fixed, moving_slab, truth, **KNOBS)
    assert info["fov"]["moving_fraction"] == pytest.approx(0.5)
    # (measured: 0.17 with the mask, 0.37 without; the masked field there follows the slab's by diffusion)
    assert moved(masked) < 0.25 and moved(unmasked) > 1.5 * moved(masked), (moved(masked), moved(unmasked))
    with pytest.raises(InputError, match="fixed_mask"):
        refine_field(fixed, moving, truth, fixed_mask=slab[:-1])


def test_refine_bad_inputs(deformed_pair):
    fixed, moving, _, init = deformed_pair
    with pytest.raises(InputError, match="init_disp_vox"):
        refine_field(fixed, moving, init[:, :-1])
    with pytest.raises(InputError, match="fixed"):
        refine_field(fixed[0], moving, init)
    with pytest.raises(InputError, match="NaN"):
        refine_field(np.full_like(fixed, np.nan), moving, init)
    with pytest.raises(InputError, match="penalise"):
        refine_field(fixed, moving, init, deformable={"penalise": "all"})
    with pytest.raises(InputError, match="speed"):
        refine_field(fixed, moving, init, deformable={"speed": 9})
    with pytest.raises(InputError, match="preset"):
        refine_field(fixed, moving, init, preset="fast")


# ------------------------------------------------------------------------------------------------ command
SV_GRID = (8, 8, 12)  # template supervoxel grid of the tiny bundle -> preprocessed grid 16 x 16 x 24 at 2 mm
PREP = tuple(2 * s for s in SV_GRID)


def ct_like(shape, seed=0, spacing=2.0):
    """A tiny CT in HU: air around an ellipsoidal body of soft tissue with a few denser blobs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre, radius = (np.array(shape) - 1) / 2, np.array(shape) * 0.4
    body = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
    img = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    for _ in range(4):
        c = centre + rng.uniform(-0.5, 0.5, 3) * radius
        img += 300 * body * np.exp(-(((grid - c[:, None, None, None]) * spacing / 6) ** 2).sum(0))
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from slicreg.bundle import save_bundle
    from slicreg.network import build_model

    tmp = tmp_path_factory.mktemp("bundle")
    model = build_model(seed=3, backward="eager")
    model.train()
    model(torch.randn(2, 1, *SV_GRID, generator=torch.Generator().manual_seed(0)))  # move BatchNorm statistics
    sv = np.random.default_rng(0).integers(0, 128, (16, *SV_GRID)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), tmp / "src" / "supervoxels.nii.gz")
    # the bundle's template image (atlas mode is valid for this file only; see template_of)
    save_volume(Volume(ct_like(PREP, seed=3).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0])),
                tmp / "src" / "template_0000.nii.gz")
    return save_bundle(tmp / "bundle", model.eval(), template_supervoxels=tmp / "src" / "supervoxels.nii.gz",
                       training={"iterations": 1},
                       data_provenance={"name": "test",
                                        "template_image_sha256": sha256_file(tmp / "src" / "template_0000.nii.gz")})


def template_of(bundle_dir):
    """The template image the test bundle's supervoxels stand for."""
    return Path(bundle_dir).parent / "src" / "template_0000.nii.gz"


def _main(args):
    from pipelines.cli import main

    return main([str(a) for a in args])


def test_register_command_identity_pair_preprocessed(bundle_dir, tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-10.0, 5.0, 3.0)
    img = ct_like(PREP)
    save_volume(Volume(img, aff), tmp_path / "ct.nii.gz")
    labels = (img > 100).astype(np.uint8) + (img > 250)
    save_volume(Volume(labels, aff), tmp_path / "lab.nii.gz")
    out = tmp_path / "out"
    code = _main(["register", "--fixed", tmp_path / "ct.nii.gz", "--moving", tmp_path / "ct.nii.gz",
                  "--weights", bundle_dir, "--out-field", out / "u.nii.gz", "--out-warped", out / "w.nii.gz",
                  "--moving-labels", tmp_path / "lab.nii.gz", "--out-warped-labels", out / "wl.nii.gz",
                  "--verbose", "--out-info", out / "info.json"])
    assert code == 0
    text = capsys.readouterr().out
    for step in ("load weights", "preprocess", "network fixed", "network moving", "keypoints", "features", "adam",
                 "dense field", "warp", "save", "total"):
        assert step in text
    field = load_field(out / "u.nii.gz", moving=aff)  # the default format: ITK, world mm (back to voxels here)
    assert field.array.shape == (3, *PREP) and np.allclose(field.affine, aff)
    # same scan, same predicted maps -> identity (the default refinement moves < 0.01 voxels on identical images)
    assert np.abs(field.array).max() < 1e-2
    np.testing.assert_array_equal(load_labels(out / "wl.nii.gz").array, labels)
    info = json.loads((out / "info.json").read_text())
    assert info["preprocessed_inputs"] == {"fixed": True, "moving": True}
    assert info["flow"]["n_keypoints"] > 5


def test_register_command_raw_inputs_map_back_to_the_original_grid(bundle_dir, tmp_path):
    # a raw scan: 2.5 mm voxels, LPS orientation, not the preprocessed shape
    aff = np.array([[-2.5, 0, 0, 20.0], [0, -2.5, 0, 30.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])
    raw = ct_like((12, 14, 18), seed=1, spacing=2.5)
    save_volume(Volume(raw, aff), tmp_path / "raw.nii.gz")
    out = tmp_path / "u.nii.gz"
    # identity pair, mapped back through both crop records. The refinement may move the field a little: Adam
    # normalises its steps, so where the similarity is nearly flat (little texture) it takes steps of ~lr from
    # gradients that are only rounding noise (measured on a real 2 mm scan: mean 0.1, max 1 voxel).
    for refine, tol in (([], 0.05), (["--refine", "--refine-iterations", "5"], 1.0)):
        code = _main(["register", "--fixed", tmp_path / "raw.nii.gz", "--moving", tmp_path / "raw.nii.gz",
                      "--weights", bundle_dir, "--out-field", out, "--out-warped", tmp_path / "w.nii.gz",
                      *refine])
        assert code == 0
        field = load_field(out, moving=aff)
        assert field.array.shape == (3, 12, 14, 18) and np.allclose(field.affine, aff)
        assert np.abs(field.array).max() < tol


def test_register_command_atlas_mode_uses_the_bundle_template(bundle_dir, tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(ct_like(PREP, seed=2), aff), tmp_path / "f.nii.gz")
    code = _main(["register", "--fixed", tmp_path / "f.nii.gz", "--moving", template_of(bundle_dir), "--atlas",
                  "--weights", bundle_dir, "--out-field", tmp_path / "u.nii.gz", "--verbose"])
    assert code == 0
    text = capsys.readouterr()
    assert "network fixed" in text.out and "network moving" not in text.out  # no network pass for the template
    from slicreg.io import load_image

    assert load_field(tmp_path / "u.nii.gz", moving=load_image(template_of(bundle_dir))).array.shape == (3, *PREP)


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("slicreg register: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_register_command_bad_inputs(bundle_dir, tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(ct_like(PREP), aff), tmp_path / "ct.nii.gz")
    ok = ["--moving", tmp_path / "ct.nii.gz", "--weights", bundle_dir, "--out-field", tmp_path / "u.nii.gz"]

    assert _main(["register", "--fixed", tmp_path / "missing.nii.gz", *ok]) == 2
    assert "missing.nii.gz" in _error_line(capsys)

    picture = np.random.default_rng(0).integers(0, 256, PREP).astype(np.float32)  # 8-bit intensities, not HU
    save_volume(Volume(picture, aff), tmp_path / "pic.nii.gz")
    assert _main(["register", "--fixed", tmp_path / "pic.nii.gz", *ok]) == 2
    assert "Hounsfield" in _error_line(capsys)

    save_volume(Volume(np.stack([ct_like(PREP)] * 2), aff), tmp_path / "4d.nii.gz")
    assert _main(["register", "--fixed", tmp_path / "4d.nii.gz", *ok]) == 2
    assert "3-D" in _error_line(capsys)

    assert _main(["register", "--fixed", tmp_path / "ct.nii.gz", *ok[:-1], tmp_path / "u.txt"]) == 2
    assert ".nii" in _error_line(capsys)

    assert _main(["register", "--fixed", tmp_path / "ct.nii.gz", *ok,
                  "--moving-labels", tmp_path / "ct.nii.gz"]) == 2
    assert "go together" in _error_line(capsys)

    args = ["register", "--fixed", tmp_path / "ct.nii.gz", "--moving", tmp_path / "ct.nii.gz",
            "--out-field", tmp_path / "u.nii.gz", "--weights"]
    assert _main([*args, tmp_path / "nope"]) == 2
    assert "not found" in _error_line(capsys)


def test_register_command_rejects_corrupt_and_mismatched_bundles(bundle_dir, tmp_path, capsys):
    import shutil

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(ct_like(PREP), aff), tmp_path / "ct.nii.gz")
    args = ["register", "--fixed", tmp_path / "ct.nii.gz", "--moving", tmp_path / "ct.nii.gz",
            "--out-field", tmp_path / "u.nii.gz", "--weights"]

    corrupt = Path(shutil.copytree(bundle_dir, tmp_path / "corrupt"))
    data = bytearray((corrupt / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.pt").write_bytes(bytes(data))
    assert _main([*args, corrupt]) == 2
    assert "sha256" in _error_line(capsys)

    other = Path(shutil.copytree(bundle_dir, tmp_path / "other"))
    card = json.loads((other / "model_card.json").read_text())
    card["architecture"]["aspp_rates"] = [1, 2, 3]
    (other / "model_card.json").write_text(json.dumps(card))
    (other / "SHA256SUMS").unlink()
    assert _main([*args, other]) == 2
    assert "architecture" in _error_line(capsys)

    # a bundle whose template grid does not fit the scans (atlas mode needs the template's grid)
    from slicreg.bundle import save_bundle
    from slicreg.network import build_model

    sv = np.random.default_rng(0).integers(0, 128, (16, 4, 4, 5)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "odd" / "supervoxels.nii.gz")
    odd = save_bundle(tmp_path / "odd_bundle", build_model(seed=0, backward="eager").eval(),
                      template_supervoxels=tmp_path / "odd" / "supervoxels.nii.gz", training={},
                      data_provenance={})
    assert _main([*args, odd]) == 2
    assert "divisible by 8" in _error_line(capsys)


# ------------------------------------------------------------------------------------------------ stage
def test_register_stage_plain_and_refined(bundle_dir, tmp_path):
    from pipelines.runner import Runner, load_pipeline
    from slicreg.io import atomic_write_json, read_json

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = tmp_path / "data"
    subjects = {}
    for i, sid in enumerate(["t0", "s1", "s2"]):
        save_volume(Volume(ct_like(PREP, seed=10 + i).astype(np.int16), aff), data / "imagesTr" / f"{sid}_0000.nii.gz")
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "role": "template" if i == 0 else "test"}
    # the template is the bundle's own (atlas mode is refused for any other: tests/test_btcv.py)
    (data / "imagesTr" / "t0_0000.nii.gz").write_bytes(template_of(bundle_dir).read_bytes())
    atomic_write_json(data / "dataset.json", {
        "name": "toy", "format": "slicreg-dataset/1", "template": "t0", "subjects": subjects, "training": [],
        "test": ["s1", "s2"], "registration_pairs": [{"fixed": "s1", "moving": "t0"}, {"fixed": "s2", "moving": "t0"},
                                                     {"fixed": "s1", "moving": "s2"}]})
    toml = tmp_path / "p.toml"
    toml.write_text(f'[pipeline]\nname = "t"\nwork_dir = "{tmp_path / "work"}"\n'
                    f'[stages.data]\ntype = "dataset"\nfolder = "{data}"\n'
                    f'[stages.register]\ninputs = {{ dataset = "data" }}\nweights = "{bundle_dir}"\n'
                    f'[stages.register-refine]\ntype = "register"\n'
                    f'inputs = {{ dataset = "data", predicted = "register" }}\n'
                    f'weights = "{bundle_dir}"\npairs = "atlas"\natlas = true\nrefine = true\n'
                    f'refine_options = {{ iterations = 4 }}\n')
    Runner(load_pipeline(toml), quiet=True).run()
    plain = read_json(tmp_path / "work" / "register" / "current" / "registrations.json")
    assert plain["method"] == "slicreg" and len(plain["pairs"]) == 3
    assert all(p["runtime_s"] > 0 for p in plain["pairs"])
    refined_dir = tmp_path / "work" / "register-refine" / "current"
    refined = read_json(refined_dir / "registrations.json")
    assert refined["method"] == "slicreg+refine" and [p["fixed"] for p in refined["pairs"]] == ["s1", "s2"]
    assert refined["network_s"]["t0"] == 0.0  # atlas mode: the template's own supervoxels
    for sid in ("s1", "s2"):  # the maps of the first stage were reused, with their network times
        assert refined["network_s"][sid] == plain["network_s"][sid] > 0
    assert not (refined_dir / "supervoxels").exists()
    record = read_json(refined_dir / "runs" / "s1_t0.json")
    assert [lv["iterations"] for lv in record["refine"]["levels"]] == [4, 4, 4]  # per level of the preset
    assert "refine" in record["timings_s"]
    assert record["refine"]["preset"] == "refine"
    field = load_field(refined_dir / refined["pairs"][0]["field"])
    assert field.array.shape == (3, *PREP)

    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace("iterations = 4", "iterations = 4, speed = 9"))
    from slicreg.errors import ConfigError

    with pytest.raises(ConfigError, match="speed"):
        Runner(load_pipeline(bad), quiet=True).run()


def test_network_labels_equal_bundle_predict_in_both_memory_formats():
    from slicreg.bundle import predict
    from slicreg.network import build_model
    from slicreg.registration import network_labels

    model = build_model(seed=1, backward="eager")
    model.train()
    model(torch.randn(2, 1, 8, 8, 12, generator=torch.Generator().manual_seed(1)))
    model.eval()
    image = ct_like((8, 8, 12), seed=4, spacing=4.0)
    for channels_last in (False, True):
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        for dtype in (None, torch.float32):
            ours = network_labels(model, image, dtype=dtype)
            ref = predict(model, image, output="labels", grid="output", dtype=dtype)
            assert ours.dtype == np.uint8 and ours.shape == (16, 4, 4, 6)
            np.testing.assert_array_equal(ours, ref)
    with pytest.raises(InputError, match="divisible by 4"):
        network_labels(model, image[:7])


def test_predict_command_output_grid_equals_bundle_predict(bundle_dir, tmp_path):
    from slicreg.bundle import load_bundle, predict
    from slicreg.io import load_volume
    from slicreg.network import HU_SCALE, network_input

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img = ct_like(PREP, seed=6)
    save_volume(Volume(img, aff), tmp_path / "ct.nii.gz")
    assert _main(["predict", "--weights", bundle_dir, "--image", tmp_path / "ct.nii.gz", "--grid", "output",
                  "--out", tmp_path / "sv.nii.gz"]) == 0
    got = load_volume(tmp_path / "sv.nii.gz", kind="labels", channels=True).array
    hu = network_input(img, from_2mm=True) * np.float32(HU_SCALE)
    ref = predict(load_bundle(bundle_dir), hu, output="labels", grid="output")
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------------------------------------ speed paths
def test_fast_argmax_equals_torch_max_with_ties_and_negative_rows():
    from slicreg.registration import _argmax_rows

    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(3000, 128, generator=g) * 4).to(torch.bfloat16)  # bf16: many exact ties
    rows[::7, 5] = rows[::7].max(dim=1).values  # a tie with the maximum at a lower index
    rows[::11] = -rows[::11].abs() - 0.25  # all negative: redone by torch.max
    rows[::13] = 0.0
    rows[::13, 40] = -0.0  # -0 ties with +0
    rows[::17] = -0.0
    rows[1::19] = -1.0
    rows[1::19, 9] = -0.0
    rows[1::19, 3] = 0.0
    rows[2::23, 127] = 1e30  # the last class
    ref = rows.max(dim=-1).indices
    for chunk in (4096, 100, 7):
        assert torch.equal(_argmax_rows(rows, chunk=chunk), ref)
    narrow = rows[:, :60].contiguous()
    assert torch.equal(_argmax_rows(narrow), narrow.max(dim=-1).indices)
    as_float = rows.float()
    assert torch.equal(_argmax_rows(as_float), ref)  # other dtypes: torch.max itself


def test_network_labels_fast_path_equals_the_whole_logits_path():
    from slicreg.network import build_model
    from slicreg.registration import network_labels

    model = build_model(seed=2, backward="eager", channels_last=True)
    model.train()
    model(torch.randn(1, 1, 12, 8, 16, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last_3d))
    model.eval()
    image = ct_like((12, 8, 16), seed=5, spacing=4.0)  # 6 output planes along x: 3 slabs of 2
    for dtype in (None, torch.float32):
        np.testing.assert_array_equal(network_labels(model, image, dtype=dtype),
                                      network_labels(model, image, dtype=dtype, argmax="torch"))
    with pytest.raises(InputError, match="argmax"):
        network_labels(model, image, argmax="numpy")


def test_stride2_labels_recognises_upsampled_network_maps():
    from slicreg.registration import stride2_labels

    coarse = np.random.default_rng(1).integers(0, 128, (16, 5, 4, 6)).astype(np.uint8)
    up = upsample_labels_stride2(torch.from_numpy(coarse)).numpy()
    np.testing.assert_array_equal(stride2_labels(up), coarse)
    other = up.copy()
    other[3, 1, 2, 3] = (other[3, 1, 2, 3] + 1) % 128
    assert stride2_labels(other) is None
    assert stride2_labels(up[:, :9]) is None  # odd size
    assert stride2_labels(up.astype(np.float32)) is None


def test_registration_on_stride2_maps_equals_the_registration_on_4mm_maps():
    from slicreg.network import build_model
    from slicreg.registration import _predict_stride2

    sv_f = blocks((24, 20, 28), 6)
    sv_m = blocks((24, 20, 28), 6, offset=(1, 0, 2))
    coarse_f, coarse_m = sv_f[:, ::2, ::2, ::2], sv_m[:, ::2, ::2, ::2]
    up_f = upsample_labels_stride2(torch.from_numpy(np.ascontiguousarray(coarse_f))).numpy()
    up_m = upsample_labels_stride2(torch.from_numpy(np.ascontiguousarray(coarse_m))).numpy()
    opts = dict(iterations=15, init="zero", patience=0)
    ref = register_supervoxel_maps(up_f, up_m, label_upsample=1, **opts)
    auto = register_supervoxel_maps(up_f, up_m, **opts)  # recognised as stride-2 maps
    assert auto.info["params"]["label_upsample"] == [2, 2] and ref.info["params"]["label_upsample"] == [1, 1]
    explicit = register_supervoxel_maps(coarse_f, coarse_m, label_upsample=2, **opts)
    np.testing.assert_array_equal(auto.disp_vox, explicit.disp_vox)
    # the 4 mm maps taken as they are: the same flow, with the keypoints half an sv voxel from where the network
    # read their content (slicreg.flow.content_offset), so a slightly different spline, not a shifted one
    assert explicit.info["params"]["content_offset_sv"] == [0.5, 0.5]
    assert ref.info["params"]["content_offset_sv"] == [0.0, 0.0]
    assert explicit.info["final_loss"] == ref.info["final_loss"]  # the flow itself: bitwise the same
    assert explicit.info["n_keypoints"] == ref.info["n_keypoints"]
    assert 0.0 < float(np.abs(explicit.disp_vox - ref.disp_vox).mean()) < 0.5
    # with the network inside: the same field as from predict_supervoxels' 4 mm maps
    model = build_model(seed=4, backward="eager", channels_last=True).eval()
    fixed, moving = ct_like((32, 24, 40), seed=1), ct_like((32, 24, 40), seed=2)
    result = register_preprocessed(model, fixed, moving, **opts)
    assert result.info["params"]["label_upsample"] == [2, 2]
    maps = [predict_supervoxels(model, img) for img in (fixed, moving)]
    np.testing.assert_array_equal(maps[0], upsample_labels_stride2(torch.from_numpy(_predict_stride2(model, fixed))))
    previous = register_preprocessed(None, fixed, moving, fixed_sv=maps[0], moving_sv=maps[1], **opts)
    assert previous.info["params"]["label_upsample"] == [2, 2]  # recognised as the network's upsampled maps
    np.testing.assert_array_equal(result.disp_vox, previous.disp_vox)
    assert set(result.info["timings_s"]) >= {"network fixed", "network moving", "keypoints", "features", "adam",
                                             "dense field"}
