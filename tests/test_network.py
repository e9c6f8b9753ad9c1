"""Tests of slicreg.network: architecture, parameter counts, logit layout, sparse head, fast backward, checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slicreg.errors import InputError
from slicreg.network import (
    LOGIT_LAYOUT,
    N_CLASSES,
    N_LAYERS,
    SlicRegNet,
    architecture_spec,
    build_model,
    count_parameters,
    neighbour_rows,
    network_input,
)
from slicreg.network_kernels import depthwise_conv3d, depthwise_weight_grad, dilated_conv3d_weight_grad

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(**kw) -> SlicRegNet:
    return build_model(seed=0, backward=kw.pop("backward", "eager"), **kw)


def test_parameter_counts_per_part():
    counts = count_parameters(_model())
    # exact values of this implementation (the paper's architecture, docs/method.md section 5: ~217k, ~1.0M, ~590k,
    # ~1.81M)
    assert counts == {"backbone": 216_768, "aspp": 1_001_088, "head": 589_824, "total": 1_807_680}
    assert abs(counts["backbone"] - 217e3) / 217e3 < 0.01
    assert abs(counts["aspp"] - 1.0e6) / 1.0e6 < 0.02
    assert abs(counts["head"] - 590e3) / 590e3 < 0.01
    assert abs(counts["total"] - 1.81e6) / 1.81e6 < 0.01


def test_block_structure_follows_the_table():
    m = _model()
    blocks = m.backbone.blocks
    assert [b.residual for b in blocks] == [False, True, False, False, True, True, False, True]
    assert tuple(blocks[0].expand.kernel_size) == (3, 3, 3) and tuple(blocks[0].expand.stride) == (2, 2, 2)
    assert [b.depthwise.stride for b in blocks] == [1, 1, 1, 2, 1, 1, 1, 1]
    assert [b.depthwise.channels for b in blocks] == [64, 128, 192, 192, 256, 256, 256, 384]
    assert [br[0].dilation[0] for br in m.aspp.branches[1:]] == [2, 4, 8, 16]
    assert m.head.conv2.groups == 16 and m.head.conv3.groups == 16
    assert m.head.conv3.out_channels == N_LAYERS * N_CLASSES


def test_output_shape_and_batch_one_in_train_mode():
    m = _model()
    x = torch.randn(1, 1, 8, 12, 16)
    m.train()
    out = m(x)  # batch 1 in train mode: the image-pooling branch has no BatchNorm
    assert out.shape == (1, 2048, 4, 6, 8)
    assert torch.isfinite(out).all()
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 8, 8, 12)).shape == (2, 2048, 4, 4, 6)
    with pytest.raises(InputError, match="multiples of 4"):
        m(torch.randn(1, 1, 8, 10, 12))
    with pytest.raises(InputError, match=r"\(B, 1, X, Y, Z\)"):
        m(torch.randn(1, 2, 8, 8, 8))


def test_grouped_head_layout_one_group_per_layer():
    """Channel 128 * l + c belongs to layer l: changing head group 3 changes exactly channels 384..511."""
    m = _model().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        before = m(x)
        g = 3
        m.head.conv2.weight[g * 32:(g + 1) * 32] += 0.5  # conv2's group 3 (out channels 96..127)
        after = m(x)
    changed = (after - before).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    expect = torch.zeros(2048, dtype=torch.bool)
    expect[128 * g:128 * (g + 1)] = True
    assert torch.equal(changed, expect)
    assert "128 * layer + class" in LOGIT_LAYOUT
    assert architecture_spec()["logit_layout"] == LOGIT_LAYOUT


@pytest.mark.parametrize("channels_last", [False, True])
def test_head_at_voxels_equals_dense_head_in_eval_mode(channels_last):
    m = _model(channels_last=channels_last).eval()
    x = torch.randn(2, 1, 8, 12, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    gen = torch.Generator().manual_seed(1)
    voxels = torch.stack([torch.randperm(4 * 6 * 8, generator=gen)[:40] for _ in range(2)])
    voxels[0, :6] = torch.tensor([0, 7, 8 * 6 - 1, 4 * 6 * 8 - 1, 100, 47])  # corners and edges: zero padding
    with torch.no_grad():
        dense = m(x).flatten(2)
        sparse = m(x, voxels=voxels)
    assert sparse.shape == (2, 2048, 40)
    ref = dense.gather(2, voxels[:, None, :].expand(-1, 2048, -1))
    assert torch.allclose(sparse, ref, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(InputError, match="voxel indices"):
        m(x, voxels=torch.full((2, 3), 4 * 6 * 8))


def test_neighbour_rows_padding_and_order():
    rows, valid = neighbour_rows(torch.tensor([[0], [5]]), (2, 2, 2))
    assert rows.shape == (27 * 2,) and valid.shape == (27 * 2,)
    # sample 0, voxel (0,0,0): offsets with any -1 are padding; offset (0,0,0) is index 13
    v0 = valid.view(27, 2)[:, 0]
    assert int(v0.sum()) == 8 and bool(v0[13])
    assert int(rows.view(27, 2)[13, 0]) == 0
    # sample 1, voxel 5 = (1, 0, 1): its own row is 8 (sample offset) + 5
    assert int(rows.view(27, 2)[13, 1]) == 8 + 5


@pytest.mark.parametrize("stride,shape", [(1, (2, 3, 5, 6, 7)), (2, (1, 2, 6, 5, 7)), (2, (2, 2, 4, 4, 4))])
def test_depthwise_gradcheck_and_torch_agreement(stride, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(shape[1], 1, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda a, b: depthwise_conv3d(a, b, stride=stride, backend="eager")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    y = fn(x, w)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    y2 = F.conv3d(x, w, stride=stride, padding=1, groups=shape[1])
    gx2, gw2 = torch.autograd.grad(y2, (x, w), g)
    assert torch.allclose(y, y2) and torch.allclose(gx, gx2) and torch.allclose(gw, gw2)
    assert torch.allclose(depthwise_weight_grad(x.detach(), g, stride=stride), gw2)


def test_depthwise_channels_last_bf16_autocast_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 8, 10, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w = torch.randn(8, 1, 3, 3, 3, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv3d(x, w, backend="eager")
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32  # gradients in the parameters' dtype
    xr, wr = x.detach().to(torch.bfloat16).double(), w.detach().to(torch.bfloat16).double()
    xr.requires_grad_(True)
    wr.requires_grad_(True)
    gx2, gw2 = torch.autograd.grad(F.conv3d(xr, wr, padding=1, groups=8), (xr, wr), g.double())
    assert float((gw.double() - gw2).abs().max() / gw2.abs().max()) < 1e-5  # float32 accumulation
    assert float((gx.double() - gx2).abs().max() / gx2.abs().max()) < 2e-2  # bf16 result


def test_dilated_weight_grad_matches_torch_including_out_of_range_taps():
    gen = torch.Generator().manual_seed(0)
    for r in (1, 2, 5):  # dilation 5 on a 4-voxel axis: some taps see only padding
        x = torch.randn(2, 3, 4, 6, 7, dtype=torch.float64, generator=gen)
        w = torch.randn(5, 3, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        y = F.conv3d(x, w, padding=r, dilation=r)
        g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        (ref,) = torch.autograd.grad(y, w, g)
        assert torch.allclose(dilated_conv3d_weight_grad(x, g, dilation=r), ref)


def test_model_fast_backward_equals_native_backward():
    x = torch.randn(2, 1, 8, 8, 12, generator=torch.Generator().manual_seed(2))
    grads = {}
    for backward in ("eager", "native"):
        m = _model(backward=backward)
        out = m(x, generator=torch.Generator().manual_seed(3))
        out.square().mean().backward()
        grads[backward] = {n: p.grad.clone() for n, p in m.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads["native"].values())
    for name, g in grads["native"].items():
        assert torch.allclose(grads["eager"][name], g, atol=1e-4 * scale, rtol=1e-3), name


def test_checkpointing_gives_the_same_gradients_and_running_stats():
    x = torch.randn(2, 1, 8, 8, 12, generator=torch.Generator().manual_seed(4))
    voxels = torch.stack([torch.randperm(4 * 4 * 6, generator=torch.Generator().manual_seed(i))[:20] for i in range(2)])
    results = {}
    for ckpt in (False, True):
        m = _model(checkpointing=ckpt)
        logits_dense = m(x, generator=torch.Generator().manual_seed(5))
        logits_sparse = m(x, voxels=voxels, generator=torch.Generator().manual_seed(6))
        (logits_dense.square().mean() + logits_sparse.square().mean()).backward()
        results[ckpt] = ({n: p.grad.clone() for n, p in m.named_parameters()},
                         {n: b.clone() for n, b in m.named_buffers()})
    (g0, b0), (g1, b1) = results[False], results[True]
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-7), name
    for name in b0:  # recomputation must not update BatchNorm statistics a second time
        assert torch.allclose(b0[name].float(), b1[name].float(), rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("kind", ["deeplab", "unet"])
def test_dropout_uses_the_generator_and_is_off_in_eval(kind):
    m = _model(model=kind)
    x = torch.randn(2, 1, 16, 16, 16) if kind == "unet" else torch.randn(1, 1, 8, 8, 8)  # BN: 2 values at 1^3
    a = m(x, generator=torch.Generator().manual_seed(7))
    b = m(x, generator=torch.Generator().manual_seed(7))
    c = m(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


@pytest.mark.parametrize("kind", ["deeplab", "unet"])
def test_init_is_seeded(kind):
    a, b, c = build_model(seed=1, model=kind), build_model(seed=1, model=kind), build_model(seed=2, model=kind)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.conv2.weight"], sc["head.conv2.weight"])


def test_network_input_pools_and_scales():
    img = np.zeros((4, 6, 8), dtype=np.float32)
    img[:2, :2, :2] = 1000.0  # one 2x2x2 block
    img[2, 0, 0] = 800.0  # one voxel of another block
    out = network_input(img)
    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx(2.0)
    assert out[1, 0, 0] == pytest.approx(800.0 / 8 / 500)
    assert network_input(img, from_2mm=False).shape == (4, 6, 8)
    with pytest.raises(InputError, match="even"):
        network_input(np.zeros((3, 4, 4)))
    with pytest.raises(InputError, match="NaN"):
        network_input(np.full((2, 2, 2), np.nan))


def test_bf16_autocast_training_step_runs_with_fp32_master_weights():
    m = _model(channels_last=True)
    x = torch.randn(2, 1, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    voxels = torch.randint(0, 64, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, voxels=voxels, generator=torch.Generator().manual_seed(0))
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in m.parameters())


@pytest.mark.slow
def test_compiled_depthwise_weight_gradient_matches_torch():
    """The fused kernel (torch.compile) of the default backend, on one small layer of each stride."""
    from slicreg.network_kernels import _COMPILED_WEIGHT_GRAD

    gen = torch.Generator().manual_seed(0)
    for stride in (1, 2):
        x = torch.randn(2, 16, 6, 8, 10, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        w = torch.randn(16, 1, 3, 3, 3, generator=gen, requires_grad=True)
        y = depthwise_conv3d(x, w, stride=stride, backend="compiled")
        if _COMPILED_WEIGHT_GRAD.failed is not None:
            pytest.skip(f"torch.compile unavailable here: {_COMPILED_WEIGHT_GRAD.failed[:200]}")
        g = torch.randn(y.shape, generator=gen)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        if _COMPILED_WEIGHT_GRAD.failed is not None:
            pytest.skip(f"torch.compile unavailable here: {_COMPILED_WEIGHT_GRAD.failed[:200]}")
        gx2, gw2 = torch.autograd.grad(F.conv3d(x, w, stride=stride, padding=1, groups=16), (x, w), g)
        assert torch.allclose(gw, gw2, rtol=1e-4, atol=1e-4) and torch.allclose(gx, gx2, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_computes_the_same_function_and_refuses_the_sparse_head():
    from slicreg.network import fold_batchnorm

    model = build_model(seed=3, backward="native")
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():  # trained-looking statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    model.eval()
    x = torch.randn(1, 1, 8, 8, 12, generator=gen)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
        out = folded(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(InputError, match="folded BatchNorm"):
        folded(x, voxels=torch.zeros(1, 3, dtype=torch.int64))


def test_fold_batchnorm_keeps_channels_last_and_bf16_labels():
    from slicreg.network import fold_batchnorm
    from slicreg.registration import network_labels

    model = build_model(seed=1, backward="native", channels_last=True).eval()
    image = np.random.default_rng(0).normal(0, 300, (8, 8, 12)).astype(np.float32)
    ref = network_labels(model, image, dtype=torch.float32)
    folded = fold_batchnorm(model)
    assert folded.backbone.blocks[1].expand.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert (network_labels(folded, image, dtype=torch.float32) == ref).mean() > 0.999
