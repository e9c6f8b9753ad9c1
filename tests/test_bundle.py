"""Tests of slicreg.bundle: save/load round trip, load errors, prediction, the predict command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slicreg.bundle import (
    BUNDLE_FORMAT,
    load_bundle,
    model_card_markdown,
    predict,
    save_bundle,
    upsample_logits_x2,
    verify_bundle,
)
from slicreg.conventions import Volume, downsample_affine
from slicreg.errors import InputError
from slicreg.io import save_volume, sha256_file
from slicreg.network import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _supervoxels(path: Path, shape=(8, 8, 12)) -> Path:
    rng = np.random.default_rng(0)
    save_volume(Volume(rng.integers(0, 128, (16, *shape)).astype(np.uint8), np.diag([4.0, 4.0, 4.0, 1.0])), path)
    return path


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    model = build_model(seed=3, backward="eager")
    model.train()
    model(torch.randn(2, 1, 8, 8, 12))  # move the BatchNorm running statistics away from their defaults
    sv = _supervoxels(tmp_path / "src" / "supervoxels.nii.gz")
    (tmp_path / "src" / "supervoxels.json").write_text(
        json.dumps({"template": {"sha256": "ab" * 32}, "parameters": {}}))
    return save_bundle(tmp_path / "bundle", model.eval(), template_supervoxels=sv,
                       training={"iterations": 7, "wall_s": 12.5, "config": {"lr": 0.004},
                                 "validation": {"val_loss": 3.2, "val_accuracy": 0.4}},
                       data_provenance={"name": "toy", "cohort": {"seed": 0}})


def _rewrite(bundle: Path, name: str, data: bytes) -> None:
    """Replace a file and update the card's and SHA256SUMS' hashes (a consistent but different bundle)."""
    (bundle / name).write_bytes(data)
    card = json.loads((bundle / "model_card.json").read_text())
    if name in card["files"]:
        card["files"][name]["sha256"] = sha256_file(bundle / name)
    (bundle / "model_card.json").write_text(json.dumps(card))
    sums = [f"{sha256_file(bundle / n)}  {n}" for n in [*card["files"], "model_card.json", "MODEL_CARD.md"]]
    (bundle / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def test_round_trip_predicts_the_same(bundle_dir):
    b = load_bundle(bundle_dir, channels_last=False)
    assert b.card["format"] == BUNDLE_FORMAT
    assert b.card["template"]["image_sha256"] == "ab" * 32
    assert b.card["parameters"]["total"] == 1_807_680
    assert b.template_supervoxels.array.shape == (16, 8, 8, 12) and b.template_supervoxels.array.dtype == np.uint8
    assert not b.model.training
    # built on the meta device and given the file's tensors: nothing left without storage
    assert all(t.device.type == "cpu" for t in [*b.model.parameters(), *b.model.buffers()])
    ref = build_model(seed=3, backward="eager")
    ref.load_state_dict(torch.load(bundle_dir / "model.pt", weights_only=True))
    x = np.random.default_rng(1).normal(0, 300, (8, 8, 12)).astype(np.float32)
    a = predict(b, x, output="logits", grid="output", dtype=torch.float32)
    r = predict(ref, x, output="logits", grid="output", dtype=torch.float32)
    assert a.shape == (16, 128, 4, 4, 6) and np.array_equal(a, r)
    md = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "128 * layer + class" in md and "model.pt" in md


def test_every_file_is_hashed(bundle_dir):
    card = verify_bundle(bundle_dir)
    assert set(card["files"]) == {"model.pt", "supervoxels.nii.gz"}
    listed = {line.split("  ")[1] for line in (bundle_dir / "SHA256SUMS").read_text().splitlines()}
    assert listed == {"model.pt", "supervoxels.nii.gz", "model_card.json", "MODEL_CARD.md"}
    assert card["files"]["model.pt"]["sha256"] == sha256_file(bundle_dir / "model.pt")


def test_corrupted_weights_fail_clearly(bundle_dir):
    data = bytearray((bundle_dir / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_dir / "model.pt").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model.pt: sha256 does not match"):
        load_bundle(bundle_dir)


def test_missing_file_and_not_a_bundle(bundle_dir, tmp_path):
    (bundle_dir / "supervoxels.nii.gz").unlink()
    with pytest.raises(InputError, match="supervoxels.nii.gz is missing"):
        load_bundle(bundle_dir)
    with pytest.raises(InputError, match="not a weights bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_edited_card_fails_on_its_hash_then_on_architecture(bundle_dir):
    card = json.loads((bundle_dir / "model_card.json").read_text())
    card["architecture"]["aspp_rates"] = [6, 12, 18]
    (bundle_dir / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="model_card.json: sha256 does not match"):
        load_bundle(bundle_dir)
    _rewrite(bundle_dir, "model_card.json", json.dumps(card).encode())
    with pytest.raises(InputError, match=r"architecture differs.*aspp_rates"):
        load_bundle(bundle_dir)


def test_weights_of_another_shape_fail_clearly(bundle_dir):
    state = torch.load(bundle_dir / "model.pt", weights_only=True)
    state["head.conv3.weight"] = state["head.conv3.weight"][:1024]
    del state["aspp.pool_conv.bias"]
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    _rewrite(bundle_dir, "model.pt", buf.getvalue())
    with pytest.raises(InputError, match=r"missing \['aspp.pool_conv.bias'\].*shape mismatch head.conv3.weight"):
        load_bundle(bundle_dir)


def test_wrong_format_and_template_values(bundle_dir):
    save_volume(Volume(np.full((16, 8, 8, 12), 130, np.uint8), np.eye(4)), bundle_dir / "x.nii.gz")
    _rewrite(bundle_dir, "supervoxels.nii.gz", (bundle_dir / "x.nii.gz").read_bytes())
    b = load_bundle(bundle_dir)  # hashes checked at load; the layers' values when first used (atlas mode)
    assert b.template_shape == (8, 8, 12)
    with pytest.raises(InputError, match="labels must be in 0..127"):
        _ = b.template_supervoxels
    card = json.loads((bundle_dir / "model_card.json").read_text())
    card["format"] = "something-else/9"
    _rewrite(bundle_dir, "model_card.json", json.dumps(card).encode())
    with pytest.raises(InputError, match="format 'something-else/9'"):
        load_bundle(bundle_dir)


def test_predict_outputs_and_errors(bundle_dir):
    b = load_bundle(bundle_dir)
    x = np.random.default_rng(2).normal(0, 300, (8, 8, 12)).astype(np.float32)
    labels = predict(b, x)
    assert labels.shape == (16, 8, 8, 12) and labels.dtype == np.uint8
    coarse = predict(b, x, grid="output")
    assert coarse.shape == (16, 4, 4, 6)
    assert np.array_equal(labels[:, ::2, ::2, ::2], coarse)  # even voxels are the output voxels themselves
    probs = predict(b, x, output="probs", grid="output")
    assert probs.shape == (16, 128, 4, 4, 6) and np.allclose(probs.sum(1), 1, atol=1e-4)
    with pytest.raises(InputError, match="divisible by 4"):
        predict(b, x[:6])
    with pytest.raises(InputError, match="grid='output'"):
        predict(b, x, output="probs")


def test_upsample_logits_x2_is_linear_between_output_voxels():
    z = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    up = upsample_logits_x2(z)
    assert up.shape == (2, 6, 4, 4)
    assert torch.equal(up[0, :, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2]))


def test_predict_command(bundle_dir, tmp_path):
    from pipelines.cli import main
    from slicreg.io import load_volume

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img = np.random.default_rng(3).normal(0, 300, (16, 16, 24)).astype(np.float32)
    save_volume(Volume(img, aff), tmp_path / "ct.nii.gz")
    assert main(["predict", "--weights", str(bundle_dir), "--image", str(tmp_path / "ct.nii.gz"),
                 "--out", str(tmp_path / "sv.nii.gz")]) == 0
    out = load_volume(tmp_path / "sv.nii.gz", kind="labels", channels=True)
    assert out.array.shape == (16, 8, 8, 12)
    assert np.allclose(out.affine, downsample_affine(aff, 2))
    save_volume(Volume(img, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "raw.nii.gz")
    assert main(["predict", "--weights", str(bundle_dir), "--image", str(tmp_path / "raw.nii.gz"),
                 "--out", str(tmp_path / "sv2.nii.gz")]) == 2  # not preprocessed: one-line error


def test_card_markdown_mentions_the_facts():
    card = {"input": {"normalisation": "HU / 500", "spacing_mm": 4.0, "from_preprocessed_2mm": "pool"},
            "output": {"layers": 16, "classes": 128, "stride": 2, "voxel_centres": "2q"},
            "logit_layout": "L", "parameters": {"total": 5}, "template": {"image_sha256": "cafe"},
            "training_data": {"name": "toy"}, "training": {"iterations": 9, "wall_s": 60.0, "config": {"lr": 1}},
            "files": {"model.pt": {"sha256": "beef", "bytes": 10}}}
    md = model_card_markdown(card)
    for text in ("iterations: 9", "cafe", "beef", "name: toy", '"lr": 1'):
        assert text in md


def test_upsampled_argmax_equals_argmax_of_upsampled_logits():
    from slicreg.bundle import upsampled_argmax_x2

    z = torch.randn(128, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(upsampled_argmax_x2(z), upsample_logits_x2(z).argmax(0))


def test_predict_stage_writes_maps(bundle_dir, tmp_path):
    """The `predict` stage through the runner: a dataset stage, then predict with a bundle parameter."""
    from pipelines.runner import Runner, load_pipeline
    from slicreg.io import atomic_write_json, load_volume, read_json

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = tmp_path / "data"
    subjects = {}
    for i, sid in enumerate(["t0", "s1"]):
        img = np.random.default_rng(i).normal(0, 300, (16, 16, 24)).astype(np.int16)
        save_volume(Volume(img, aff), data / "imagesTr" / f"{sid}_0000.nii.gz")
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "role": "template" if i == 0 else "test"}
    atomic_write_json(data / "dataset.json", {"name": "toy", "format": "slicreg-dataset/1", "template": "t0",
                                              "subjects": subjects, "training": [], "test": ["s1"]})
    toml = tmp_path / "p.toml"
    toml.write_text(f'[pipeline]\nname = "t"\nwork_dir = "{tmp_path / "work"}"\n'
                    f'[stages.data]\ntype = "dataset"\nfolder = "{data}"\n'
                    f'[stages.predict]\ninputs = {{ dataset = "data" }}\nweights = "{bundle_dir}"\n')
    Runner(load_pipeline(toml), quiet=True).run()
    out = tmp_path / "work" / "predict" / "current"
    record = read_json(out / "predict.json")
    assert list(record["subjects"]) == ["s1"]
    sv = load_volume(out / "predicted" / "s1.nii.gz", kind="labels", channels=True)
    assert sv.array.shape == (16, 8, 8, 12) and np.allclose(sv.affine, downsample_affine(aff, 2))
