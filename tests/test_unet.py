"""Tests of slicreg.unet: the U-Net baseline has the DeepLab's call contract, output grid, size and head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slicreg.errors import ConfigError, InputError
from slicreg.network import GroupedHead, architecture_spec, build_model, count_parameters
from slicreg.unet import DECODER_CHANNELS, ENCODER_CHANNELS, SlicUNet, build_unet, unet_architecture_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unet(**kw) -> SlicUNet:
    return build_model(seed=0, model="unet", **kw)


def test_build_model_dispatches_and_refuses_unknown_kinds():
    m = _unet()
    assert type(m) is SlicUNet and type(m.head) is GroupedHead
    assert type(build_model(seed=0)).__name__ == "SlicRegNet"  # the default is unchanged
    with pytest.raises(ConfigError, match=r"model must be one of \('deeplab', 'unet'\), got 'bogus'"):
        build_model(model="bogus")
    with pytest.raises(ConfigError, match=r"target must be one of .*got 'labels'"):
        build_model(target="labels")
    with pytest.raises(ConfigError, match="'deeplab' only, got model 'unet'"):
        build_model(model="unet", target="displacement")
    with pytest.raises(InputError, match="backward must be one of"):
        build_unet(backward="fast")
    for value in ("compiled", "eager", "native"):  # accepted for one configuration of both networks; no effect
        m.backward = value
        assert m.backward == value


def test_parameter_count_is_within_15_percent_of_the_deeplab():
    unet, deeplab = count_parameters(_unet()), count_parameters(build_model(seed=0))
    assert set(unet) == {"encoder", "decoder", "head", "total"}
    assert unet["total"] == sum(v for k, v in unet.items() if k != "total") == 1_810_096
    assert abs(unet["total"] - deeplab["total"]) / deeplab["total"] <= 0.15
    # the head is the DeepLab's GroupedHead on 16 + 32 input channels instead of 24 + 128
    assert unet["head"] == deeplab["head"] - (24 + 128 - 16 - 32) * 512


def test_architecture_spec_is_json_and_dispatched():
    spec = architecture_spec(model="unet")
    assert spec == unet_architecture_spec() and json.loads(json.dumps(spec)) == spec
    assert spec["name"] == "slicreg-unet3d" and spec["encoder_channels"] == list(ENCODER_CHANNELS)
    assert spec["decoder_channels"] == list(DECODER_CHANNELS) and spec["logit_layout"] == architecture_spec()[
        "logit_layout"]
    assert architecture_spec()["name"] == "slicreg-deeplab3d"
    with pytest.raises(ConfigError, match="architecture_spec: model"):
        architecture_spec(model="vnet")


@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_and_head_at_voxels_equal_the_dense_head_in_eval_mode(channels_last):
    m = _unet(channels_last=channels_last).eval()
    x = torch.randn(2, 1, 16, 16, 24, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    gen = torch.Generator().manual_seed(1)
    n_out = 8 * 8 * 12
    voxels = torch.stack([torch.randperm(n_out, generator=gen)[:40] for _ in range(2)])
    voxels[0, :4] = torch.tensor([0, 11, 8 * 12 - 1, n_out - 1])  # corners: the head's zero padding
    with torch.no_grad():
        dense = m(x)
        sparse = m(x, voxels=voxels)
    assert dense.shape == (2, 2048, 8, 8, 12) and sparse.shape == (2, 2048, 40)
    ref = dense.flatten(2).gather(2, voxels[:, None, :].expand(-1, 2048, -1))
    assert torch.allclose(sparse, ref, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(InputError, match="voxel indices"):
        m(x, voxels=torch.full((2, 3), n_out))
    with pytest.raises(InputError, match="multiples of 4"):
        m(torch.randn(1, 1, 16, 18, 16))
    with pytest.raises(InputError, match=r"\(B, 1, X, Y, Z\)"):
        m(torch.randn(1, 2, 16, 16, 16))


def test_channels_last_gives_the_channels_first_output():
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = _unet().eval()(x)
        b = _unet(channels_last=True).eval()(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))


def test_output_voxel_q_is_centred_on_input_voxel_2q():
    """Two checks in eval mode (float64): (1) the output grid is the first encoder level's: changing input voxel 2q
    changes that level's voxels q-1..q+1 only (symmetric about q), input voxel 2q + 1 changes q-1..q+2; (2) the whole
    network is shift-equivariant on its grid: the input shifted by 16 voxels (the coarsest stride) gives the output
    shifted by exactly 8 away from the borders (a half-voxel offset anywhere on the path would break this)."""
    m = _unet().double().eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        base = m.features(x)[0]
        for p, expect in ((8, [3, 4, 5]), (9, [3, 4, 5, 6])):
            y = x.clone()
            y[0, 0, p, 8, 8] += 100.0
            changed = (m.features(y)[0] - base).abs().amax(dim=(0, 1, 3, 4)) > 0
            assert torch.nonzero(changed).flatten().tolist() == expect
        # a long thin volume: borders along y and z are the same in both inputs, those along x are far away
        big = torch.randn(1, 1, 272, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        out0, out1 = m(big[:, :, :256]), m(big[:, :, 16:])
    interior = slice(56, 72)  # output voxels 56..71 of out1 = 64..79 of out0: inputs 112..158 +- the receptive field
    assert torch.allclose(out1[:, :, interior], out0[:, :, 64:80], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(out1[:, :, interior], out0[:, :, 56:72], rtol=1e-3, atol=1e-3)


def test_checkpointing_gives_the_same_gradients_and_running_stats():
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    voxels = torch.stack([torch.randperm(512, generator=torch.Generator().manual_seed(i))[:20] for i in range(2)])
    results = {}
    for ckpt in (False, True):
        m = _unet(checkpointing=ckpt).double()
        dense = m(x, generator=torch.Generator().manual_seed(6))
        sparse = m(x, voxels=voxels, generator=torch.Generator().manual_seed(7))
        (dense.square().mean() + sparse.square().mean()).backward()
        results[ckpt] = ({n: p.grad.clone() for n, p in m.named_parameters()},
                         {n: b.clone() for n, b in m.named_buffers()})
    (g0, b0), (g1, b1) = results[False], results[True]
    assert set(g0) == set(g1) and all(g is not None for g in g0.values())
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-9, atol=1e-12), name
    for name in b0:  # the recomputation must not update the BatchNorm statistics a second time
        assert torch.equal(b0[name], b1[name]), name


# dropout and seeded initialisation: tests/test_network.py, parametrised over both networks


def test_bf16_autocast_training_step_at_voxels_runs_with_fp32_master_weights():
    m = _unet(channels_last=True)
    x = torch.randn(2, 1, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    voxels = torch.randint(0, 512, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, voxels=voxels, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2048, 10)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in m.parameters())


def test_prediction_paths_take_the_unet():
    """The registration's cheap label path (features + head by slabs) and bundle.predict agree for the U-Net."""
    from slicreg.bundle import predict
    from slicreg.registration import network_labels

    image = np.random.default_rng(0).normal(0, 300, (16, 16, 24)).astype(np.float32)
    for channels_last in (True, False):
        m = _unet(channels_last=channels_last).eval()
        ours = network_labels(m, image, dtype=torch.float32)
        ref = predict(m, image, output="labels", grid="output", dtype=torch.float32)
        assert ours.shape == (16, 8, 8, 12) and np.array_equal(ours, ref)
