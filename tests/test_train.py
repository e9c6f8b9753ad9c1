"""Tests of slicreg.train: augmentation, loss, a tiny overfit, identical resume, data loading, the run, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slicreg.bundle import portable_paths
from slicreg.conventions import Volume, downsample_affine
from slicreg.errors import ConfigError, InputError
from slicreg.io import atomic_write_json, read_json, save_volume
from slicreg.train import (
    SupervoxelData,
    TrainConfig,
    Trainer,
    augment_batch,
    choose_foreground_voxels,
    load_checkpoint,
    load_training_data,
    random_affines,
    run_training,
    save_checkpoint,
    split_validation,
    supervoxel_loss,
    train_loop,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layers(shape4: tuple[int, int, int], shift: int = 0) -> np.ndarray:
    """16 label layers 0..127 on a 4 mm grid: boxes of 2 voxels, cut differently per layer."""
    q = np.stack(np.meshgrid(*[np.arange(s) for s in shape4], indexing="ij"))
    out = []
    for layer in range(16):
        lab = ((q[0] + layer + shift) // 2) * 37 + ((q[1] + layer % 3) // 2) * 5 + (q[2] + layer % 2) // 2
        out.append((lab % 127 + 1) * (q[0] > 0))  # background in the first slab
    return np.stack(out).astype(np.uint8)


def _image(shape2: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape2], indexing="ij")).astype(np.float32)
    centre = np.array(shape2, dtype=np.float32)[:, None, None, None] / 2
    body = ((g - centre) ** 2).sum(0) < (min(shape2) / 2.5) ** 2
    out = np.where(body, 40.0, -1000.0) + 300 * np.sin(g[0] / 2) * body + rng.normal(0, 10, shape2)
    return out.astype(np.float32)


def make_dataset(root: Path, n: int = 3, shape2: tuple[int, int, int] = (16, 16, 24)) -> dict[str, Path]:
    """A dataset folder in the contract layout + transferred supervoxels + template supervoxels."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10.0, 4.0, 7.0]
    shape4 = tuple(s // 2 for s in shape2)
    ids = [f"sub{i}" for i in range(n)]
    subjects = {"tmpl": {"image": "imagesTr/tmpl_0000.nii.gz", "role": "template"}}
    for i, sid in enumerate(["tmpl", *ids]):
        save_volume(Volume(_image(shape2, i).astype(np.int16), aff), root / "data" / "imagesTr" / f"{sid}_0000.nii.gz")
        if sid != "tmpl":
            subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "role": "train"}
            save_volume(Volume(_layers(shape4, i), downsample_affine(aff, 2)),
                        root / "transfer" / "transferred" / f"{sid}.nii.gz")
    save_volume(Volume(_layers(shape4), downsample_affine(aff, 2)), root / "sv" / "supervoxels.nii.gz")
    atomic_write_json(root / "data" / "dataset.json", {
        "name": "toy", "format": "slicreg-dataset/1", "template": "tmpl", "subjects": subjects, "training": ids,
        "test": []})
    return {"dataset": root / "data", "transferred": root / "transfer",
            "supervoxels": root / "sv" / "supervoxels.nii.gz"}


def _tiny_data(n: int = 2, shape: tuple[int, int, int] = (8, 8, 12)) -> SupervoxelData:
    images = torch.stack([torch.from_numpy(_image(shape, i) / 500.0)[None] for i in range(n)])
    targets = torch.stack([torch.from_numpy(_layers(shape, i)) for i in range(n)])
    return SupervoxelData([f"t{i}" for i in range(n)], images.float(), targets)


TINY = dict(batch_size=2, head_voxels=48, backward="eager", channels_last=False, val_subjects=0)


# ------------------------------------------------------------------------------------------------ config


def test_config_validation_and_stage_defaults_in_sync():
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"iterationz": 3})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    from pipelines.stages.train import TRAIN_PARAMS

    stage = {k: v for k, v in TRAIN_PARAMS.items() if k != "threads"}
    stage["seed"] = TrainConfig().seed
    assert stage == TrainConfig().to_dict()


# ------------------------------------------------------------------------------------------ augmentation


def test_identity_augmentation_keeps_image_and_takes_targets_at_even_voxels():
    data = _tiny_data()
    theta = random_affines(2, sigma=0.0)
    x, t = augment_batch(data.images, data.targets, theta)
    assert torch.allclose(x, data.images, atol=1e-5)
    assert torch.equal(t, data.targets[:, :, ::2, ::2, ::2].long())
    voxels = torch.tensor([[0, 5, 47], [1, 2, 3]])
    _, tv = augment_batch(data.images, data.targets, theta, voxels=voxels)
    assert torch.equal(tv, t.flatten(2).gather(2, voxels[:, None, :].expand(-1, 16, -1)))


def test_translation_augmentation_border_image_zero_targets():
    data = _tiny_data(1)
    z = data.images.shape[-1]
    theta = torch.eye(3, 4)[None].clone()
    theta[0, 0, 3] = 2 * 2.0 / z  # normalised x = last array axis: +2 voxels
    x, t = augment_batch(data.images, data.targets, theta)
    img = data.images[0, 0]
    assert torch.allclose(x[0, 0, :, :, :z - 2], img[:, :, 2:], atol=1e-5)
    assert torch.allclose(x[0, 0, :, :, z - 2:], img[:, :, -1:].expand(-1, -1, 2), atol=1e-5)  # border padding
    tq = data.targets[0, :, ::2, ::2, :].long()
    assert torch.equal(t[0, :, :, :, :-1], tq[:, :, :, 2::2])
    assert int(t[0, :, :, :, -1].abs().sum()) == 0  # zero padding outside


def test_random_affines_are_seeded():
    a = random_affines(3, sigma=0.07, generator=torch.Generator().manual_seed(1))
    b = random_affines(3, sigma=0.07, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 3, 4)
    assert 0.02 < float((a - torch.eye(3, 4)).std()) < 0.15


# -------------------------------------------------------------------------------------------------- loss


def _per_layer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b = logits.shape[0]
    flat = logits.reshape(b, 2048, -1)
    tf = targets.reshape(b, 16, -1)
    return sum(F.cross_entropy(flat[:, 128 * layer:128 * (layer + 1)], tf[:, layer]) for layer in range(16)) / 16


def test_loss_is_the_mean_over_layers_of_the_cross_entropy_in_every_layout():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2048, 3, 4, 5, generator=gen)
    targets = torch.randint(0, 128, (2, 16, 3, 4, 5), generator=gen)
    ref = _per_layer_loss(logits, targets)
    assert torch.allclose(supervoxel_loss(logits, targets), ref)
    cl = logits.contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(supervoxel_loss(cl, targets), ref)
    sparse = logits.flatten(2)[:, :, :7]
    assert torch.allclose(supervoxel_loss(sparse, targets.flatten(2)[:, :, :7]),
                          _per_layer_loss(sparse, targets.flatten(2)[:, :, :7]))
    # perfect logits -> loss ~ 0
    onehot = F.one_hot(targets, 128).permute(0, 1, 5, 2, 3, 4).reshape(2, 2048, 3, 4, 5).float() * 50
    assert float(supervoxel_loss(onehot, targets)) < 1e-6
    with pytest.raises(InputError, match="targets"):
        supervoxel_loss(logits, targets[:, :8])


# -------------------------------------------------------------------------------------- trainer, resume


def test_loss_decreases_on_a_tiny_overfit_case():
    data = _tiny_data(2)
    cfg = TrainConfig(iterations=20, augment_sigma=0.0, precision="fp32", **TINY)
    tr = Trainer(cfg)
    losses = []
    for _ in range(cfg.iterations):
        losses.append(tr.step(*tr.sample_batch(data)))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 4.0  # ~ln(128) at the start
    assert last < 0.8 * first, (first, last)


def test_resume_continues_identically(tmp_path):
    data = _tiny_data(3)
    cfg = TrainConfig(iterations=4, **TINY)
    straight = train_loop(Trainer(cfg), data, progress=False)
    half = train_loop(Trainer(replace_iterations(cfg, 2)), data, progress=False)
    save_checkpoint(tmp_path / "c.pt", half.state_dict())
    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    assert resumed.iteration == 2
    train_loop(resumed, data, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other settings cannot be resumed
    with pytest.raises(ConfigError, match="head_voxels"):
        Trainer(TrainConfig(iterations=4, **{**TINY, "head_voxels": 7})).load_state_dict(half.state_dict())


def test_foreground_share_of_head_voxels():
    # 4 scans' candidates in random order; scan 1 has only 3 foreground candidates, scan 3 none
    cand = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2], [0, 1, 2, 3, 4, 5, 6, 7],
                         [5, 6, 7, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 0]])
    fg = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 1, 0],
                       [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    labels = torch.stack([fg * (3 + torch.arange(8))] * 16, dim=1)  # (4, 16, 8)
    chosen, lab = choose_foreground_voxels(cand, labels, 4, 0.5)
    assert chosen.shape == (4, 4) and lab.shape == (4, 16, 4)
    assert chosen[0].tolist() == [8, 6, 9, 7]  # 2 foreground first, then the first background ones
    assert chosen[1].tolist() == [0, 3, 1, 2]
    assert chosen[2].tolist() == [5, 6, 7, 0]  # all foreground: first foreground, then the next ones
    assert chosen[3].tolist() == [1, 2, 3, 4]  # no foreground: background fills
    assert (lab[0, :, :2] > 0).all() and (lab[0, :, 2:] == 0).all()
    # the labels travel with their voxels
    for i in range(4):
        for j in range(4):
            pos = cand[i].tolist().index(int(chosen[i, j]))
            assert torch.equal(lab[i, :, j], labels[i, :, pos])
    with pytest.raises(ConfigError, match="foreground_fraction"):
        TrainConfig(foreground_fraction=1.5)
    with pytest.raises(ConfigError, match="foreground_fraction"):
        TrainConfig(head_voxels=0, foreground_fraction=0.5)


def test_foreground_sampling_trains_and_resumes_from_older_checkpoints(tmp_path):
    data = _tiny_data(2)
    cfg = TrainConfig(iterations=2, **{**TINY, "foreground_fraction": 0.5})
    tr = Trainer(cfg)
    losses = [tr.step(*tr.sample_batch(data)) for _ in range(2)]
    assert all(np.isfinite(losses))
    # a checkpoint written before foreground_fraction existed resumes under the default (0.0) only
    state = Trainer(TrainConfig(iterations=2, **TINY)).state_dict()
    del state["config"]["foreground_fraction"]
    Trainer(TrainConfig(iterations=2, **TINY)).load_state_dict(state)
    with pytest.raises(ConfigError, match="foreground_fraction"):
        Trainer(cfg).load_state_dict(state)


def replace_iterations(cfg: TrainConfig, n: int) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, iterations=n)


def test_validation_metrics_and_split():
    data = _tiny_data(3)
    train, val = split_validation(data, TrainConfig(val_subjects=1))
    assert val.ids == ["t2"] and train.ids == ["t0", "t1"]
    tr = Trainer(TrainConfig(**{**TINY, "val_subjects": 1}))
    m = tr.validate(val)
    assert set(m) == {"val_loss", "val_accuracy", "val_foreground_accuracy"}
    assert 3.0 < m["val_loss"] < 20 and 0 <= m["val_accuracy"] <= 1
    assert tr.model.training  # restored after validation
    with pytest.raises(ConfigError, match="val_ids"):
        split_validation(data, TrainConfig(val_ids=("nope",)))


# ------------------------------------------------------------------------------------------------- files


def test_load_training_data_and_its_errors(tmp_path):
    paths = make_dataset(tmp_path)
    data = load_training_data(paths["dataset"], paths["transferred"])
    assert data.ids == ["sub0", "sub1", "sub2"]
    assert data.images.shape == (3, 1, 8, 8, 12) and data.targets.shape == (3, 16, 8, 8, 12)
    assert data.targets.dtype == torch.uint8
    assert np.allclose(data.affines[0][:3, :3], np.eye(3) * 4)
    bad = paths["transferred"] / "transferred" / "sub1.nii.gz"
    save_volume(Volume(np.zeros((16, 8, 8, 10), np.uint8), np.eye(4)), bad)
    with pytest.raises(InputError, match="sub1.nii.gz.*expected supervoxels of shape"):
        load_training_data(paths["dataset"], paths["transferred"])
    save_volume(Volume(np.full((16, 8, 8, 12), 200, np.uint8), np.eye(4)), bad)
    with pytest.raises(InputError, match="labels must be in 0..127"):
        load_training_data(paths["dataset"], paths["transferred"])
    bad.unlink()
    with pytest.raises(InputError, match="sub1"):
        load_training_data(paths["dataset"], paths["transferred"], ids=["sub0", "sub1"])


def test_run_training_writes_bundle_logs_and_resumes(tmp_path):
    paths = make_dataset(tmp_path)
    cfg = TrainConfig(iterations=3, val_every=2, checkpoint_every=2, **{**TINY, "val_subjects": 1})
    kwargs = dict(dataset=paths["dataset"], transferred=paths["transferred"],
                  template_supervoxels=paths["supervoxels"], quiet=True)
    out = tmp_path / "run"
    r = run_training(cfg, out_dir=out, **kwargs)
    assert r.iterations == 3 and r.bundle == out / "bundle" and (out / "bundle" / "model.pt").is_file()
    for name in ("log.csv", "log.json", "curves.png", "config.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert rows[1]["val_loss"] and rows[2]["val_loss"] and not rows[0]["val_loss"]
    card = read_json(out / "bundle" / "model_card.json")
    assert card["training"]["iterations"] == 3 and card["training"]["val_ids"] == ["sub2"]
    assert card["training"]["config"]["head_voxels"] == 48
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg, out_dir=out, **kwargs)
    r2 = run_training(replace_iterations(cfg, 5), out_dir=out, resume=True, **kwargs)
    assert r2.iterations == 5
    assert [int(r["iteration"]) for r in csv.DictReader(open(out / "log.csv"))] == [1, 2, 3, 4, 5]


def test_init_weights_starts_from_a_bundle(tmp_path):
    """Fine-tuning: the first step starts from the bundle's weights (not the seeded init); a bad bundle is one
    clear error before any data are loaded; the model card records where the weights came from."""
    from slicreg.bundle import load_weights

    paths = make_dataset(tmp_path)
    kwargs = dict(dataset=paths["dataset"], transferred=paths["transferred"],
                  template_supervoxels=paths["supervoxels"], quiet=True)
    base = run_training(TrainConfig(iterations=2, **{**TINY, "val_subjects": 0}), out_dir=tmp_path / "base",
                        **kwargs)
    start = load_weights(base.bundle)
    scratch = Trainer(TrainConfig(**{**TINY, "seed": 5}))
    tuned = Trainer(TrainConfig(**{**TINY, "seed": 5, "init_weights": str(base.bundle)}))
    for key, value in start.items():
        assert torch.equal(tuned.model.state_dict()[key].cpu(), value), key
    assert any(not torch.equal(scratch.model.state_dict()[k].cpu(), v) for k, v in start.items()
               if v.is_floating_point())
    r = run_training(TrainConfig(iterations=1, **{**TINY, "val_subjects": 0, "init_weights": str(base.bundle)}),
                     out_dir=tmp_path / "tuned", **kwargs)
    card = read_json(r.bundle / "model_card.json")
    # the card names no machine folder: a path outside the working folder and the repository keeps its name only
    assert card["training"]["init_weights"]["bundle"] == portable_paths(str(base.bundle.resolve())) == "bundle"
    assert len(card["training"]["init_weights"]["model_sha256"]) == 64
    assert "started from the weights of" in (r.bundle / "MODEL_CARD.md").read_text()
    with pytest.raises(InputError, match="nowhere"):
        run_training(TrainConfig(iterations=1, **{**TINY, "init_weights": str(tmp_path / "nowhere")}),
                     out_dir=tmp_path / "bad", **kwargs)


def test_train_stage_fine_tunes_from_another_train_stage(tmp_path):
    """The train stage's input ``init`` (an earlier train stage) starts the run from that stage's bundle; giving
    both ``init`` and ``init_weights`` is a ConfigError."""
    from pipelines.runner import StageContext
    from pipelines.stages.train import TRAIN_PARAMS, train_stage

    paths = make_dataset(tmp_path)
    params = {**TRAIN_PARAMS, **TINY, "iterations": 1, "val_subjects": 0, "fov_crop_mm": [32.0, 120.0]}
    inputs = {"dataset": paths["dataset"], "transferred": paths["transferred"],
              "supervoxels": paths["supervoxels"].parent, "cohort": None, "init": None}
    first = StageContext("train", dict(params), dict(inputs), tmp_path / "first", tmp_path, quiet=True)
    train_stage(first)
    second = StageContext("finetune", dict(params), {**inputs, "init": first.out_dir}, tmp_path / "second", tmp_path,
                          quiet=True)
    train_stage(second)
    card = read_json(second.out_dir / "bundle" / "model_card.json")
    assert card["training"]["init_weights"]["bundle"] == portable_paths(str((first.out_dir / "bundle").resolve()))
    both = StageContext("both", {**params, "init_weights": str(first.out_dir / "bundle")},
                        {**inputs, "init": first.out_dir}, tmp_path / "both", tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="not both"):
        train_stage(both)


def ddp_config(tmp_path, paths):
    """A 2-step training config on the tiny data set of :func:`make_dataset` for DDP runs (gloo, 1 thread)."""
    config = tmp_path / "train.toml"
    config.write_text(f"""
[data]
dataset = "{paths['dataset']}"
transferred = "{paths['transferred']}"
template_supervoxels = "{paths['supervoxels']}"
[output]
dir = "{tmp_path / 'run'}"
[run]
threads = 1
[train]
iterations = 2
batch_size = 2
head_voxels = 32
backward = "eager"
channels_last = false
val_subjects = 1
val_every = 2
checkpoint_every = 1
""")
    return config


def test_train_command_under_torchrun_two_processes(tmp_path):
    """DDP smoke test: `torchrun --nproc_per_node 2 -m pipelines.cli train` for 2 steps on gloo."""
    paths = make_dataset(tmp_path, n=4)
    config = ddp_config(tmp_path, paths)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipelines.cli", "train", "--config", str(config), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "run"
    assert read_json(run / "config.json")["world_size"] == 2
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and state["world_size"] == 2 and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])  # one stream per process
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert (run / "bundle" / "model_card.json").is_file()
    assert read_json(run / "bundle" / "model_card.json")["training"]["hardware"]["processes"] == 2


def test_crop_field_of_view_keeps_a_centred_slab():
    from slicreg.network import HU_SCALE
    from slicreg.train import AIR_HU, crop_field_of_view

    z = 40
    images = torch.arange(2 * 6 * 5 * z, dtype=torch.float32).reshape(2, 1, 6, 5, z)
    targets = torch.zeros(2, 16, 6, 5, z, dtype=torch.uint8)
    targets[:, :, 2:4, 1:4, 10:30] = 7  # foreground planes 10..29
    gen = torch.Generator().manual_seed(3)
    out_i, out_t = crop_field_of_view(images, targets, probability=1.0, thickness_vox=(6, 6), generator=gen)
    assert torch.equal(images, torch.arange(2 * 6 * 5 * z, dtype=torch.float32).reshape(2, 1, 6, 5, z))  # untouched
    air = AIR_HU / HU_SCALE
    for i in range(2):
        kept = (out_i[i, 0] != air).any(dim=0).any(dim=0)
        planes = torch.nonzero(kept).flatten()
        assert len(planes) == 6 and int(planes[-1] - planes[0]) == 5  # one slab of 6 planes
        assert int(planes[0] + planes[-1] + 1) // 2 == z // 2  # moved to the middle
        shift = int(planes[0]) - int(torch.nonzero((images[i, 0] == out_i[i, 0, :, :, planes[0]][..., None])
                                                    .all(0).all(0)).flatten()[0])
        # image and targets moved together, and the slab's planes are the original planes
        assert torch.equal(out_i[i, ..., planes], torch.roll(images[i], shift, dims=-1)[..., planes])
        assert torch.equal(out_t[i, ..., planes], torch.roll(targets[i], shift, dims=-1)[..., planes])
        assert (out_t[i][..., ~kept] == 0).all()
        # the slab passes through the organs' planes
        assert (out_t[i] > 0).any()
    # probability 0: unchanged, and nothing drawn
    gen0 = torch.Generator().manual_seed(3)
    same_i, same_t = crop_field_of_view(images, targets, probability=0.0, thickness_vox=(6, 6), generator=gen0)
    assert same_i is images and same_t is targets
    assert torch.equal(gen0.get_state(), torch.Generator().manual_seed(3).get_state())
    # no foreground: unchanged
    empty = torch.zeros_like(targets)
    e_i, e_t = crop_field_of_view(images, empty, probability=1.0, thickness_vox=(6, 6), generator=gen)
    assert torch.equal(e_i, images) and torch.equal(e_t, empty)


def test_fov_crop_trains_and_can_be_switched_on_when_resuming(tmp_path):
    data = _tiny_data(2)
    base = TrainConfig(iterations=2, **TINY)
    tr = Trainer(base)
    train_loop(tr, data, progress=False)
    cropped = TrainConfig(iterations=4, **{**TINY, "fov_crop_probability": 0.5, "fov_crop_mm": [16, 40]})
    assert cropped.fov_crop_mm == (16.0, 40.0)
    resumed = Trainer(cropped)
    resumed.load_state_dict(tr.state_dict())
    assert resumed.config_changes == [{"iteration": 2, "fov_crop_probability": [0.0, 0.5],
                                       "fov_crop_mm": [[32.0, 120.0], [16.0, 40.0]]}]
    train_loop(resumed, data, progress=False)
    assert resumed.iteration == 4 and all(np.isfinite(h["loss"]) for h in resumed.history if "loss" in h)
    # the record survives the next checkpoint
    again = Trainer(cropped)
    again.load_state_dict(resumed.state_dict())
    assert again.config_changes == resumed.config_changes
    with pytest.raises(ConfigError, match="fov_crop_probability"):
        TrainConfig(fov_crop_probability=2.0)
    with pytest.raises(ConfigError, match="fov_crop_mm"):
        TrainConfig.from_dict({"fov_crop_mm": [40, 10]})
