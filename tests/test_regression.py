"""Tests of the Regression baseline: slicreg.regression (network, inference) and slicreg.train's displacement target
(targets, augmentation, field-of-view cut, loss, learning, resume, loading, the run and the stage)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from test_train import TINY, _image, _layers, make_dataset  # the tiny data of the training tests
from torch import nn

from slicreg.conventions import downsample_affine
from slicreg.errors import ConfigError, InputError
from slicreg.io import atomic_write_json, read_json, save_field
from slicreg.network import architecture_spec, build_model, count_parameters
from slicreg.regression import (
    OUTPUT_TO_2MM,
    RegressionNet,
    build_regression,
    predict_displacement,
    regression_architecture_spec,
)
from slicreg.train import (
    DISPLACEMENT_CHANNELS,
    SupervoxelData,
    TrainConfig,
    Trainer,
    augment_displacement_batch,
    crop_field_of_view,
    displacement_loss,
    load_checkpoint,
    load_training_data,
    random_affines,
    run_training,
    save_checkpoint,
    smoothness_penalty,
    train_loop,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE4 = (8, 8, 12)  # the tiny 4 mm input grid
DISP = dict(TINY, target="displacement")


def _ramps(shape: tuple[int, ...]) -> torch.Tensor:
    """``(3, *shape)`` float64 voxel coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


def _affine_field_2mm(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``U(s) = a s + b`` at 2 mm positions ``s`` ``(3, ...)``."""
    return torch.einsum("ij,j...->i...", a, s) + b.view(3, *[1] * (s.dim() - 1))


def _packed(u4: torch.Tensor, fg: torch.Tensor | None = None) -> torch.Tensor:
    """Displacement targets (DISPLACEMENT_CHANNELS) of one scan from its 4 mm-stored field ``(3, X, Y, Z)``."""
    fg = torch.ones(u4.shape[1:]) if fg is None else fg
    return torch.cat([fg[None], torch.ones(1, *u4.shape[1:]), u4]).float()


A_FIELD = torch.tensor([[0.2, 0.0, 0.05], [0.0, -0.1, 0.0], [0.03, 0.0, 0.15]], dtype=torch.float64)
B_FIELD = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)


def _u4_affine(shape4: tuple[int, int, int] = SHAPE4) -> torch.Tensor:
    """The affine 2 mm field ``U`` stored on the 4 mm grid: ``U4(m) = U(2 m + 0.5)``."""
    return _affine_field_2mm(A_FIELD, B_FIELD, 2.0 * _ramps(shape4) + 0.5)


def _tiny_displacement_data(n: int = 2) -> SupervoxelData:
    images = torch.stack([torch.from_numpy(_image(SHAPE4, i) / 500.0)[None] for i in range(n)]).float()
    u4 = _u4_affine().float()
    targets = torch.stack([_packed(u4, torch.from_numpy(_layers(SHAPE4, i)[0] > 0).float()) for i in range(n)])
    return SupervoxelData([f"t{i}" for i in range(n)], images, targets, target="displacement")


def _input_map(theta: torch.Tensor, p: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """By hand, the original input voxel ``m(p)`` an augmented input voxel ``p`` ``(3, ...)`` shows under ``theta``
    ``(3, 4)``: ``grid_sample``'s normalised coordinates with ``align_corners=False`` (voxel ``p`` <-> ``(2 p + 1) /
    S - 1``) in reversed component order (x = last array axis)."""
    sz = torch.tensor(size, dtype=torch.float64).view(3, *[1] * (p.dim() - 1))
    n = (2 * p + 1) / sz - 1
    n_in = torch.einsum("ij,j...->i...", theta[:, :3].double(), n.flip(0)) + theta[:, 3].double().view(
        3, *[1] * (p.dim() - 1))
    return ((n_in.flip(0) + 1) * sz - 1) / 2


# ----------------------------------------------------------------------------------------------- network


def test_output_layout_units_and_sparse_head():
    model = build_regression(seed=0, backward="eager")
    assert isinstance(model, RegressionNet)
    x = torch.randn(2, 1, *SHAPE4, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 3, 4, 4, 6)  # stride 2: (B, 3, X/2, Y/2, Z/2)
    assert torch.count_nonzero(out) == 0  # the zero-initialised last layer: training starts at u = 0
    with torch.no_grad():
        model.head.conv3.weight.normal_(generator=torch.Generator().manual_seed(1))
    model.eval()
    voxels = torch.tensor([[0, 7, 95], [3, 50, 17]])
    with torch.no_grad():
        dense = model(x).flatten(2)
        sparse = model(x, voxels=voxels)
    assert sparse.shape == (2, 3, 3)
    assert torch.allclose(sparse, dense.gather(2, voxels[:, None].expand(-1, 3, -1)), atol=1e-4)
    parts = count_parameters(model)
    assert parts["head"] == 152 * 128 + 2 * 128 + 128 * 128 * 27 + 2 * 128 + 128 * 3 + 3
    spec = regression_architecture_spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["output_channels"] == 3 and "2 mm" in spec["output"]["unit"]
    assert spec["name"] == "slicreg-deeplab3d-regression" and architecture_spec(target="displacement") == spec
    # build_model's dispatch builds the same network (same initialisation)
    same = build_model(seed=0, backward="eager", target="displacement")
    ref = build_regression(seed=0, backward="eager")
    assert isinstance(same, RegressionNet)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in same.state_dict().items())


def test_output_voxels_sit_at_their_2mm_positions():
    """Output voxel q = 4 mm voxel 2q = 2 mm voxel 4q + 0.5, the same as the world-affine chain."""
    a2 = np.diag([2.0, 2.0, 2.0, 1.0])
    a2[:3, 3] = [-10.0, 4.0, 7.0]
    out_affine = downsample_affine(a2, 2) @ np.diag([2.0, 2.0, 2.0, 1.0])  # 4 mm grid, every second voxel
    assert np.allclose(a2 @ OUTPUT_TO_2MM, out_affine)
    assert np.allclose(OUTPUT_TO_2MM @ [1.0, 2.0, 3.0, 1.0], [4.5, 8.5, 12.5, 1.0])


class _FieldStub(nn.Module):
    """A stand-in network returning a fixed ``(1, 3, X', Y', Z')`` output whatever the input."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, image: torch.Tensor, *, voxels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        assert image.shape[2:] == tuple(2 * s for s in self.out.shape[2:])
        return self.out.to(image.device)


def test_predict_displacement_upsampling_is_centred_and_clamped():
    shape2 = (16, 16, 24)
    out_shape = tuple(s // 4 for s in shape2)  # (4, 4, 6)
    a = torch.tensor([[0.5, 0.1, 0.0], [0.0, -0.25, 0.2], [0.3, 0.0, 0.75]], dtype=torch.float64)
    b = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    # the stub's output voxel q holds an affine field at its 2 mm position 4q + 0.5
    coarse = _affine_field_2mm(a, b, 4.0 * _ramps(out_shape) + 0.5)
    image = np.zeros(shape2, np.float32)
    got = predict_displacement(_FieldStub(coarse[None].float()), image, dtype=torch.float32)
    assert got.shape == (3, *shape2) and got.dtype == np.float32
    p = _ramps(shape2)
    hi = torch.tensor(out_shape, dtype=torch.float64).view(3, 1, 1, 1) - 1
    o = ((p - 0.5) / 4).clamp(min=torch.zeros_like(hi), max=hi)  # 2 mm voxel p at output coordinate (p - 0.5)/4
    want = _affine_field_2mm(a, b, 4.0 * o + 0.5)
    assert np.allclose(got, want.numpy(), atol=1e-4)
    inside = ((p >= 0.5) & (p <= 4 * hi + 0.5)).all(0)
    assert np.allclose(got[:, inside.numpy()], _affine_field_2mm(a, b, p)[:, inside].numpy(), atol=1e-4)
    # the real network: zero at initialisation, the same layout; bad images are refused
    model = build_regression(backward="eager")
    real = predict_displacement(model, np.random.default_rng(0).normal(0, 300, shape2).astype(np.float32))
    assert real.shape == (3, *shape2) and not np.any(real)
    with pytest.raises(InputError, match="divisible by 8"):
        predict_displacement(model, np.zeros((16, 16, 20), np.float32))


# ------------------------------------------------------------------------------------------ augmentation


def test_augmented_target_is_the_analytic_composition():
    """A known affine field, a random augmentation: the target equals ``2 (m(p) - p) + U(2 m(p) + 0.5)`` with
    ``m`` derived by hand from theta, wherever m(p) lies on the grid; outside, the target is invalid."""
    u4 = _u4_affine()
    targets = torch.stack([_packed(u4.float())] * 2)
    images = torch.zeros(2, 1, *SHAPE4)
    theta = random_affines(2, sigma=0.08, generator=torch.Generator().manual_seed(3))
    _, t = augment_displacement_batch(images, targets, theta)
    assert t.shape == (2, len(DISPLACEMENT_CHANNELS), 4, 4, 6) and t.dtype == torch.float32
    centres = 2.0 * _ramps((4, 4, 6))  # output voxel q is centred on input voxel 2q
    size = torch.tensor(SHAPE4, dtype=torch.float64).view(3, 1, 1, 1)
    n_inside = 0
    for i in range(2):
        m = _input_map(theta[i], centres, SHAPE4)
        want = 2.0 * (m - centres) + _affine_field_2mm(A_FIELD, B_FIELD, 2.0 * m + 0.5)
        inside = ((m >= 0) & (m <= size - 1)).all(0)
        assert torch.allclose(t[i, 2:][:, inside].double(), want[:, inside], atol=2e-3)
        nearest = torch.floor(m + 0.5)
        on_grid = ((nearest >= 0) & (nearest <= size - 1)).all(0)
        assert torch.equal(t[i, 1] == 1, on_grid) and torch.equal(t[i, 0] == 1, on_grid)
        n_inside += int(inside.sum())
    assert n_inside > 50
    # the voxel subset reads the same values
    voxels = torch.tensor([[0, 13, 95], [5, 6, 70]])
    _, tv = augment_displacement_batch(images, targets, theta, voxels=voxels)
    assert torch.allclose(tv, t.flatten(2).gather(2, voxels[:, None].expand(-1, 5, -1)), atol=1e-5)
    # the identity keeps the targets at the even voxels
    _, t0 = augment_displacement_batch(images, targets, random_affines(2, sigma=0.0))
    assert torch.allclose(t0, targets[:, :, ::2, ::2, ::2], atol=1e-4)


def _template_coded(u4: torch.Tensor) -> torch.Tensor:
    """A 3-channel image of the 4 mm grid whose channel a is the template 2 mm coordinate a of each voxel / 10."""
    return ((2.0 * _ramps(u4.shape[1:]) + 0.5 + u4) / 10.0).float()


@pytest.mark.parametrize("crop", [False, True])
def test_image_and_target_stay_consistent(crop):
    """An image whose intensity is its template coordinate: after the field-of-view cut (the slab rolled to the
    middle) and the affine augmentation, at every valid output voxel the target points where the image says."""
    u4 = _u4_affine()
    images = torch.stack([_template_coded(u4)] * 2)  # (B, 3, X, Y, Z): the three coordinates at once
    targets = torch.stack([_packed(u4.float())] * 2)
    gen = torch.Generator().manual_seed(7)
    if crop:
        images, targets = crop_field_of_view(images, targets, probability=1.0, thickness_vox=(4.0, 6.0),
                                             generator=gen, displacement=True)
        for i in range(2):
            kept = targets[i, 1].flatten(0, 1).amax(0) > 0  # planes with valid targets = the slab
            assert 1 <= int(kept.sum()) <= 6
            assert (images[i][..., ~kept] == -2.0).all()  # air outside
            assert (targets[i, :2][..., ~kept] == 0).all()  # foreground and valid off outside
            assert torch.count_nonzero(targets[i, 2:][..., ~kept]) > 0  # the field is kept (not set to 0)
    theta = random_affines(2, sigma=0.06, generator=gen)
    x, t = augment_displacement_batch(images, targets, theta)
    centres = 2.0 * _ramps((4, 4, 6))
    checked = 0
    size = torch.tensor(SHAPE4).view(3, 1, 1, 1)
    for i in range(2):
        # compare where the image is an exact trilinear read: m(2q) with its 8 neighbours on the grid, all valid
        m = _input_map(theta[i], centres, SHAPE4)
        lo = torch.floor(m).long()
        ok = ((lo >= 0) & (lo + 1 <= size - 1)).all(0) & (t[i, 1] > 0)
        for corner in itertools.product((0, 1), repeat=3):
            idx = [(lo[a] + corner[a]).clamp(0, SHAPE4[a] - 1) for a in range(3)]
            ok &= targets[i, 1][idx[0], idx[1], idx[2]] > 0
        template = (2.0 * centres + 0.5 + t[i, 2:].double()) / 10.0  # where the target says the voxel goes
        shown = x[i][:, ::2, ::2, ::2].double()  # what the augmented image shows at input voxel 2q
        assert torch.allclose(template[:, ok], shown[:, ok], atol=1e-3)
        checked += int(ok.sum())
    assert checked >= 10


# ------------------------------------------------------------------------------------------------- loss


def test_displacement_loss_and_smoothness():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 4, 4, 6, generator=gen)
    pred = target + torch.randn(2, 3, 4, 4, 6, generator=gen)
    valid = torch.ones(2, 4, 4, 6)
    valid[1, :2] = 0
    err = torch.sqrt(((pred - target) ** 2).sum(1) + 0.01) - 0.1
    assert torch.allclose(displacement_loss(pred, target, valid), err[valid > 0].mean())
    assert torch.allclose(displacement_loss(pred, target), err.mean())
    assert float(displacement_loss(target, target)) < 1e-6
    far = pred.clone()
    far[1, :, :2] = 1e6  # where the target is unknown nothing counts
    assert torch.allclose(displacement_loss(far, target, valid), displacement_loss(pred, target, valid))
    none = pred.clone().requires_grad_()
    zero = displacement_loss(none, target, torch.zeros_like(valid))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.count_nonzero(none.grad) == 0
    with pytest.raises(InputError, match="valid"):
        displacement_loss(pred, target, valid[:, :2])
    # diffusion penalty: 0 for a translation; a ramp of slope s along axis 0 in component 0: s^2 / 3
    assert float(smoothness_penalty(torch.ones(1, 3, 4, 4, 6) * 3.0)) == 0.0
    ramp = torch.zeros(1, 3, 4, 4, 6)
    ramp[0, 0] = 0.5 * torch.arange(4.0).view(4, 1, 1)
    assert abs(float(smoothness_penalty(ramp)) - 0.25 / 3) < 1e-6


# ---------------------------------------------------------------------------------------------- config


def test_config_validation():
    for kwargs, message in [({"model": "resnet"}, "model must be one of"),
                            ({"target": "labels"}, "target must be one of"),
                            ({"model": "unet", "target": "displacement"}, "not available"),
                            ({"target": "displacement", "smoothness": -1.0}, "smoothness must be >= 0"),
                            ({"target": "displacement", "smoothness": 0.1}, "dense head"),
                            ({"head_voxels": 0, "smoothness": 0.1}, "applies to target .displacement. only")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)
    cfg = TrainConfig.from_dict({"model": "deeplab", "target": "displacement", "head_voxels": 0, "smoothness": 0.5})
    assert cfg.to_dict()["target"] == "displacement" and cfg.to_dict()["model"] == "deeplab"
    TrainConfig(model="unet")  # unet / supervoxels is a valid pair
    tr = Trainer(TrainConfig(**DISP))
    assert isinstance(tr.model, RegressionNet)
    sv = SupervoxelData(["a"], torch.zeros(1, 1, *SHAPE4), torch.zeros(1, 16, *SHAPE4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="target 'displacement'.*'supervoxels'"):
        tr.sample_batch(sv)
    with pytest.raises(InputError, match="float32"):
        SupervoxelData(["a"], torch.zeros(1, 1, *SHAPE4), torch.zeros(1, 16, *SHAPE4), target="displacement")


# ------------------------------------------------------------------------------------- learning, resume


def test_an_affine_displacement_is_learnt_in_a_few_steps():
    data = _tiny_displacement_data(2)
    cfg = TrainConfig(iterations=30, augment_sigma=0.0, precision="fp32", **DISP)
    tr = Trainer(cfg)
    before = tr.validate(data)
    losses = [tr.step(*tr.sample_batch(data)) for _ in range(cfg.iterations)]
    after = tr.validate(data)
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert first > 2.0  # |u| of the target field at the start (u = 0)
    assert last < 0.25 * first, (first, last)
    assert set(after) == {"val_loss", "val_epe_mm", "val_foreground_epe_mm"}
    mean_norm_mm = float(data.targets[:, 2:, ::2, ::2, ::2].norm(dim=1).mean()) * 2.0
    assert abs(before["val_epe_mm"] - mean_norm_mm) < 1e-4  # u = 0: the error is the field itself
    assert after["val_epe_mm"] < 0.5 * before["val_epe_mm"], (before, after)
    assert tr.model.training


def test_checkpoint_resume_is_identical_for_the_displacement_target(tmp_path):
    data = _tiny_displacement_data(3)
    val = data.subset(["t2"])
    cfg = TrainConfig(iterations=4, val_every=2, **{**DISP, "foreground_fraction": 0.5, "fov_crop_probability": 0.5,
                                                    "fov_crop_mm": [16.0, 24.0]})
    straight = train_loop(Trainer(cfg), data, validation=val, progress=False)
    half = train_loop(Trainer(dataclasses.replace(cfg, iterations=2)), data, validation=val, progress=False)
    save_checkpoint(tmp_path / "c.pt", half.state_dict())
    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    train_loop(resumed, data, validation=val, progress=False)
    strip = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in straight.history]
    assert [{k: v for k, v in h.items() if k != "elapsed_s"} for h in resumed.history] == strip
    assert any("val_epe_mm" in h for h in strip)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="target"):
        Trainer(TrainConfig(iterations=4, **TINY)).load_state_dict(half.state_dict())


# ------------------------------------------------------------------------------------------------- files


def _write_fields(paths: dict, shape2: tuple[int, int, int] = (16, 16, 24), template: str = "tmpl") -> np.ndarray:
    """Transfer fields for the subjects of make_dataset (the same affine field for each); returns it."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10.0, 4.0, 7.0]
    u = _affine_field_2mm(A_FIELD, B_FIELD, _ramps(shape2)).numpy().astype(np.float32)
    for i in range(3):
        save_field(u, aff, paths["transferred"] / "fields" / f"disp_sub{i}_{template}.nii.gz")
    return u


def test_load_training_data_displacement_and_its_errors(tmp_path):
    paths = make_dataset(tmp_path)
    u = _write_fields(paths)
    data = load_training_data(paths["dataset"], paths["transferred"], target="displacement")
    assert data.target == "displacement" and data.ids == ["sub0", "sub1", "sub2"]
    assert data.targets.shape == (3, 5, *SHAPE4) and data.targets.dtype == torch.float32
    block_mean = u.reshape(3, 8, 2, 8, 2, 12, 2).mean(axis=(2, 4, 6))  # 4 mm voxel m = 2 mm 2m + 0.5
    assert np.allclose(data.targets[0, 2:].numpy(), block_mean, atol=1e-5)
    assert torch.equal(data.targets[1, 0] > 0, torch.from_numpy(_layers(SHAPE4, 1)[0] > 0))
    assert bool((data.targets[:, 1] == 1).all())
    # the transferred/ folder itself also finds fields/ beside it; a split keeps the kind
    again = load_training_data(paths["dataset"], paths["transferred"] / "transferred", target="displacement")
    assert torch.equal(again.targets, data.targets) and data.subset(["sub2"]).target == "displacement"
    # the template id of transfer.json names the files
    atomic_write_json(paths["transferred"] / "transfer.json", {"template": "other"})
    with pytest.raises(InputError, match=r"disp_sub0_other\.nii\.gz: file not found"):
        load_training_data(paths["dataset"], paths["transferred"], target="displacement")
    _write_fields(paths, template="other")
    load_training_data(paths["dataset"], paths["transferred"], target="displacement")
    # a field of another shape is refused in one line naming the file
    bad = paths["transferred"] / "fields" / "disp_sub1_other.nii.gz"
    save_field(np.zeros((3, 16, 16, 20), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), bad)
    with pytest.raises(InputError, match=r"disp_sub1_other\.nii\.gz: field grid") as err:
        load_training_data(paths["dataset"], paths["transferred"], target="displacement")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="target must be"):
        load_training_data(paths["dataset"], paths["transferred"], target="fields")


def test_train_stage_and_run_for_the_displacement_target(tmp_path):
    """The train stage takes model / target and trains on the transfer folder's fields; logs, curves, config and
    the model card say so."""
    from pipelines.runner import StageContext
    from pipelines.stages.train import TRAIN_PARAMS, train_stage

    paths = make_dataset(tmp_path)
    _write_fields(paths)
    params = {**TRAIN_PARAMS, **DISP, "iterations": 3, "val_every": 2, "checkpoint_every": 2, "val_subjects": 1,
              "fov_crop_mm": [32.0, 120.0]}
    inputs = {"dataset": paths["dataset"], "transferred": paths["transferred"],
              "supervoxels": paths["supervoxels"].parent, "cohort": None, "init": None}
    ctx = StageContext("train", params, inputs, tmp_path / "stage", tmp_path, quiet=True)
    train_stage(ctx)
    out = ctx.out_dir / "training"
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert rows[1]["val_epe_mm"] and rows[2]["val_epe_mm"] and not rows[1]["val_accuracy"]
    assert (out / "curves.png").is_file()
    config = read_json(out / "config.json")
    assert config["target"] == "displacement" and config["fields"]["files"] == "disp_<id>_tmpl.nii.gz"
    card = read_json(ctx.out_dir / "bundle" / "model_card.json")
    assert card["training"]["config"]["target"] == "displacement"
    assert "val_epe_mm" in card["training"]["validation"]
    assert card["training"]["validation_curve"][0]["val_epe_mm"] > 0
    # run_training with an explicit fields folder
    r = run_training(TrainConfig(iterations=1, **{**DISP, "val_subjects": 0}), dataset=paths["dataset"],
                     transferred=paths["transferred"], template_supervoxels=paths["supervoxels"], quiet=True,
                     out_dir=tmp_path / "run", fields=paths["transferred"] / "fields")
    assert r.iterations == 1 and np.isfinite(r.final_loss)


def test_train_command_config_accepts_the_keys(tmp_path):
    from pipelines.commands.train import read_config

    config = tmp_path / "train.toml"
    config.write_text('[data]\ndataset = "d"\ntransferred = "t"\ntemplate_supervoxels = "s"\nfields = "t/fields"\n'
                      '[train]\nmodel = "deeplab"\ntarget = "displacement"\nsmoothness = 0.0\n')
    doc = read_config(str(config))
    cfg = TrainConfig.from_dict(doc["train"])
    assert cfg.target == "displacement" and doc["data"]["fields"] == "t/fields"
