"""Bundle kinds (issue 19): U-Net and displacement-regression bundles are saved, checked and loaded as their kind;
what needs supervoxel maps refuses a displacement bundle in one line; registration runs its regression (atlas mode)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slicreg.bundle import (
    BundleKind,
    bundle_kind,
    load_bundle,
    load_weights,
    model_card_markdown,
    predict,
    require_target,
    save_bundle,
    verify_bundle,
)
from slicreg.conventions import Volume
from slicreg.errors import ConfigError, InputError
from slicreg.io import load_field, save_volume, sha256_file
from slicreg.network import architecture_spec, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SV_GRID = (8, 8, 12)  # the template supervoxel grid (4 mm) -> preprocessed 2 mm grid 16 x 16 x 24
PREP = tuple(2 * s for s in SV_GRID)
AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])
BIAS = (1.5, -0.5, 0.25)  # the toy regression network's constant field (2 mm voxels; exact in bf16)
REPO = Path(__file__).resolve().parents[1]


def _ct(seed: int) -> np.ndarray:
    """A small CT in HU on the preprocessed grid: an ellipsoid of soft tissue (40 HU) in air, a few denser spots."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in PREP], indexing="ij")
    inside = sum(a * a for a in axes) <= 0.7
    img = np.where(inside, 40.0, -1000.0) + rng.normal(0.0, 10.0, PREP)
    for _ in range(3):
        c = rng.uniform(-0.4, 0.4, 3)
        img += 250.0 * inside * np.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, c)) / 0.05)
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Template supervoxels and the template image they stand for (atlas mode is valid for that file only)."""
    folder = tmp_path_factory.mktemp("src")
    sv = np.random.default_rng(0).integers(0, 128, (16, *SV_GRID)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), folder / "supervoxels.nii.gz")
    save_volume(Volume(_ct(seed=1).astype(np.int16), AFFINE_2MM), folder / "template.nii.gz")
    save_volume(Volume(_ct(seed=2).astype(np.int16), AFFINE_2MM), folder / "scan.nii.gz")
    return folder


def _save(model: torch.nn.Module, folder: Path, src: Path, **kw) -> Path:
    return save_bundle(folder, model.eval(), template_supervoxels=src / "supervoxels.nii.gz",
                       training={"iterations": 1}, data_provenance={
                           "name": "toy", "template_image_sha256": sha256_file(src / "template.nii.gz")}, **kw)


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory, src) -> Path:
    model = build_model(seed=3, model="unet")
    model.train()
    model(torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)))  # move the BN statistics
    return _save(model, tmp_path_factory.mktemp("unet") / "bundle", src)


@pytest.fixture(scope="module")
def displacement_bundle(tmp_path_factory, src) -> Path:
    """A regression bundle whose network predicts the constant field :data:`BIAS` (its last convolution's weights
    are zero after build_regression; the bias is set here), so every registration result is known exactly."""
    model = build_model(seed=3, target="displacement")
    with torch.no_grad():
        model.head.conv3.bias.copy_(torch.tensor(BIAS))
    return _save(model, tmp_path_factory.mktemp("displacement") / "bundle", src)


def _rewrite_card(bundle: Path, card: dict) -> None:
    """Replace the card and update SHA256SUMS (a consistent bundle with an edited card)."""
    (bundle / "model_card.json").write_text(json.dumps(card))
    names = [*card["files"], "model_card.json", "MODEL_CARD.md"]
    (bundle / "SHA256SUMS").write_text("".join(f"{sha256_file(bundle / n)}  {n}\n" for n in names))


# ------------------------------------------------------------------------------------------------ save / load
def test_unet_bundle_round_trip(unet_bundle):
    from slicreg.unet import SlicUNet

    card = verify_bundle(unet_bundle)
    assert card["kind"] == {"model": "unet", "target": "supervoxels"}  # inferred from the model
    assert card["architecture"] == architecture_spec(model="unet") and card["architecture"]["name"] == "slicreg-unet3d"
    assert card["parameters"]["total"] == 1_810_096 and "encoder" in card["parameters"]
    b = load_bundle(unet_bundle, channels_last=False)
    assert b.kind == BundleKind("unet", "supervoxels") and str(b.kind) == "unet/supervoxels"
    assert type(b.model) is SlicUNet and not b.model.training
    ref = build_model(seed=0, model="unet")
    ref.load_state_dict(torch.load(unet_bundle / "model.pt", weights_only=True))
    x = np.random.default_rng(1).normal(0, 300, SV_GRID).astype(np.float32)
    a = predict(b, x, output="logits", grid="output", dtype=torch.float32)
    assert a.shape == (16, 128, 4, 4, 6)
    assert np.array_equal(a, predict(ref, x, output="logits", grid="output", dtype=torch.float32))
    md = (unet_bundle / "MODEL_CARD.md").read_text()
    assert "U-Net" in md and "kind: unet/supervoxels" in md and "encoder" in md
    require_target(b, what="anything")  # a supervoxel bundle: accepted


def test_displacement_bundle_round_trip(displacement_bundle):
    from slicreg.regression import RegressionNet

    card = verify_bundle(displacement_bundle)
    assert card["kind"] == {"model": "deeplab", "target": "displacement"}
    assert card["architecture"] == architecture_spec(target="displacement")
    assert "logit_layout" not in card and card["output"]["components"] == 3
    assert "supervoxels.nii.gz" in card["files"]  # the same format: the template's supervoxels travel along
    b = load_bundle(displacement_bundle)
    assert b.kind == BundleKind("deeplab", "displacement") and type(b.model) is RegressionNet
    assert torch.equal(b.model.head.conv3.bias, torch.tensor(BIAS))
    assert "Regression baseline" in (displacement_bundle / "MODEL_CARD.md").read_text()
    trained = {**card, "training": {"validation": {"val_loss": 0.5, "val_epe_mm": 2.25},
                                    "validation_curve": [{"iteration": 10, "val_loss": 0.5, "val_epe_mm": 2.25}]}}
    md = model_card_markdown(trained)  # the regression's validation metric, not the supervoxel accuracy
    assert "mean end-point error 2.25 mm" in md and "| 10 | 0.5 | 2.25 |" in md and "accuracy" not in md
    with pytest.raises(InputError, match=r"a displacement-regression bundle \(kind deeplab/displacement\); "
                                         r"supervoxel prediction .* needs a supervoxel bundle"):
        predict(b, np.zeros(SV_GRID, np.float32))


@pytest.mark.parametrize("name", ["slicreg-cohort-v2", "slicreg-cohort-v3"])
def test_shipped_bundles_load_as_deeplab_supervoxels(name):
    folder = REPO / "weights" / name
    if not (folder / "model_card.json").is_file():
        pytest.skip(f"{folder} is not in this checkout")
    assert "kind" not in json.loads((folder / "model_card.json").read_text())  # made before kinds
    b = load_bundle(folder)
    assert b.kind == BundleKind() and str(b.kind) == "deeplab/supervoxels"
    assert type(b.model).__name__ == "SlicRegNet"


def test_kinds_are_checked(tmp_path, src, unet_bundle):
    with pytest.raises(InputError, match=r"save_bundle: the model is not a unet/supervoxels network \(missing"):
        _save(build_model(seed=0), tmp_path / "wrong", src, kind="unet/supervoxels")
    assert bundle_kind({}) == BundleKind()
    for bad, match in (({"model": "vnet", "target": "supervoxels"}, "model must be one of"),
                       ({"model": "unet", "target": "displacement"}, "'deeplab' only"),
                       ("deeplab", "expected a kind")):
        with pytest.raises(InputError, match=match):
            bundle_kind({"kind": bad}, "card.json")
    # a card claiming another kind than its weights: the architecture check names the kind
    card = json.loads((unet_bundle / "model_card.json").read_text())
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in unet_bundle.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    _rewrite_card(edited, {**card, "kind": {"model": "deeplab", "target": "supervoxels"}})
    with pytest.raises(InputError, match="differs from this slicreg's deeplab/supervoxels network"):
        load_bundle(edited)
    _rewrite_card(edited, {**card, "kind": {"model": "unet", "target": "labels"}})
    with pytest.raises(InputError, match=r"model_card.json: entry 'kind': target must be one of"):
        load_bundle(edited)
    # a training run that needs other weights (TrainConfig.init_weights) is told in one line
    with pytest.raises(InputError, match=r"a supervoxel bundle \(kind unet/supervoxels\); a deeplab/supervoxels "
                                         r"network needs a deeplab/supervoxels bundle"):
        load_weights(unet_bundle, kind=("deeplab", "supervoxels"))
    assert set(load_weights(unet_bundle, kind="unet/supervoxels")) == set(build_model(model="unet").state_dict())


def test_model_card_markdown_of_a_card_without_kind_is_unchanged_in_form(unet_bundle):
    card = json.loads((REPO / "weights" / "slicreg-cohort-v3" / "model_card.json").read_text()) \
        if (REPO / "weights" / "slicreg-cohort-v3" / "model_card.json").is_file() else None
    if card is None:
        pytest.skip("the shipped bundle is not in this checkout")
    md = model_card_markdown(card)
    assert "3-D DeepLab (MobileNetV2 backbone" in md and "logit layout" in md and "kind:" not in md


# ------------------------------------------------------------------------------------------------ commands
def _main(args) -> int:
    from pipelines.cli import main

    return main([str(a) for a in args])


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slicreg {command}: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_predict_refuses_a_displacement_bundle_in_one_line(displacement_bundle, unet_bundle, src, tmp_path, capsys):
    out = tmp_path / "sv.nii.gz"
    assert _main(["predict", "--weights", displacement_bundle, "--image", src / "scan.nii.gz", "--out", out]) == 2
    err = _one_line(capsys, "predict")
    assert (f"{displacement_bundle}: a displacement-regression bundle (kind deeplab/displacement); `slicreg predict` "
            f"needs a supervoxel bundle") in err
    assert not out.exists()
    # a U-Net supervoxel bundle needs nothing special: it predicts as the DeepLab's
    assert _main(["predict", "--weights", unet_bundle, "--image", src / "scan.nii.gz", "--out", out]) == 0
    assert out.is_file()


def test_register_with_a_displacement_bundle(displacement_bundle, src, tmp_path, capsys):
    """Atlas mode: the regressed field (the toy network's constant) is the result, on the fixed grid, through the
    command, the API and slicreg.registration; a pair of two scans is refused before any work."""
    import slicreg
    from slicreg.registration import register_preprocessed

    res = slicreg.register(src / "scan.nii.gz", src / "template.nii.gz", weights=displacement_bundle, atlas=True,
                           refine=False)
    assert res.disp_vox.shape == (3, *PREP) and res.disp_vox.dtype == np.float32
    np.testing.assert_allclose(res.disp_vox, np.broadcast_to(np.array(BIAS, np.float32)[:, None, None, None],
                                                             res.disp_vox.shape), atol=1e-6)
    assert res.info["kind"] == "deeplab/displacement" and res.info["flow"]["method"] == "displacement regression"
    assert "network fixed" in res.info["timings_s"] and "adam" not in res.info["timings_s"]
    refined = slicreg.register(src / "scan.nii.gz", src / "template.nii.gz", weights=displacement_bundle, atlas=True,
                               refine=True, refine_iterations=2)
    assert refined.disp_vox.shape == (3, *PREP) and "refine" in refined.info["timings_s"]
    assert not np.array_equal(refined.disp_vox, res.disp_vox)

    out = tmp_path / "u.nii.gz"  # the command is the API's register with its defaults
    assert _main(["register", "--fixed", src / "scan.nii.gz", "--moving", src / "template.nii.gz", "--atlas",
                  "--weights", displacement_bundle, "--field-format", "voxels", "--out-field", out]) == 0
    default = slicreg.register(src / "scan.nii.gz", src / "template.nii.gz", weights=displacement_bundle, atlas=True)
    np.testing.assert_allclose(load_field(out).array, default.disp_vox, atol=1e-5)
    capsys.readouterr()

    refused = tmp_path / "refused.nii.gz"
    assert _main(["register", "--fixed", src / "scan.nii.gz", "--moving", src / "template.nii.gz",
                  "--weights", displacement_bundle, "--out-field", refused]) == 2
    err = _one_line(capsys, "register")
    assert "a displacement-regression bundle (kind deeplab/displacement) registers a scan to the bundle's own " \
           "template only" in err and "use --atlas" in err
    assert not refused.exists()
    bundle = load_bundle(displacement_bundle)
    image = np.zeros(PREP, np.float32)
    with pytest.raises(InputError, match="registers a scan to its template only"):
        register_preprocessed(bundle, image, image)
    with pytest.raises(InputError, match="fixed_sv do not apply"):
        register_preprocessed(bundle, image, image, moving_is_template=True,
                              fixed_sv=np.zeros((16, *SV_GRID), np.uint8))


def test_register_stage_with_a_displacement_bundle(displacement_bundle, src, tmp_path):
    from pipelines.runner import Runner, load_pipeline
    from slicreg.io import atomic_write_json, read_json

    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    for sid, name in (("t0", "template"), ("s1", "scan")):
        (data / "imagesTr" / f"{sid}_0000.nii.gz").write_bytes((src / f"{name}.nii.gz").read_bytes())
    atomic_write_json(data / "dataset.json", {
        "name": "toy", "format": "slicreg-dataset/1", "template": "t0", "training": [], "test": ["s1"],
        "subjects": {"t0": {"image": "imagesTr/t0_0000.nii.gz", "role": "template"},
                     "s1": {"image": "imagesTr/s1_0000.nii.gz", "role": "test"}},
        "registration_pairs": [{"fixed": "s1", "moving": "t0"}, {"fixed": "t0", "moving": "s1"}]})
    toml = tmp_path / "p.toml"
    toml.write_text(f'[pipeline]\nname = "t"\nwork_dir = "{tmp_path / "work"}"\n'
                    f'[stages.data]\ntype = "dataset"\nfolder = "{data}"\n'
                    f'[stages.register]\ninputs = {{ dataset = "data" }}\nweights = "{displacement_bundle}"\n'
                    f'atlas = true\npairs = "atlas"\n')
    Runner(load_pipeline(toml), quiet=True).run()
    done = tmp_path / "work" / "register" / "current"
    record = read_json(done / "registrations.json")
    assert record["method"] == "regression" and [(p["fixed"], p["moving"]) for p in record["pairs"]] == [("s1", "t0")]
    field = load_field(done / record["pairs"][0]["field"]).array
    np.testing.assert_allclose(field, np.broadcast_to(np.array(BIAS, np.float32)[:, None, None, None], field.shape),
                               atol=1e-6)
    assert not (done / "supervoxels").exists()
    for change, match in (('pairs = "atlas"', r"t0 <- s1\) have a moving scan other than the template"),
                          ("atlas = true", "registers a scan to the bundle's own template only.*set atlas = true")):
        bad = tmp_path / "bad.toml"
        bad.write_text(toml.read_text().replace(change, ""))
        with pytest.raises(ConfigError, match=match):
            Runner(load_pipeline(bad), quiet=True).run()
