"""The one sampler (slicreg.fields.sample / sample_affine): its backends against each other and against
references (scipy.ndimage, torch's grid_sample, deeds' rules written out in numpy), on tiny volumes."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from slicreg import fields
from slicreg.errors import InputError
from slicreg.fields import BACKENDS, sample, sample_affine, warp_labels
from slicreg.grid import Grid, map_points

SHAPE = (7, 6, 9)


@pytest.fixture
def volume():
    return torch.from_numpy(np.random.default_rng(0).normal(size=(2, *SHAPE)))  # float64, 2 channels


@pytest.fixture
def labels():
    return torch.from_numpy(np.random.default_rng(1).integers(0, 9, size=SHAPE).astype(np.uint8))


def _positions(n=400, lo=-1.6, hi=1.6, seed=2, ties=False):
    """Positions inside the grid and up to ``hi`` voxels beyond it; without exact half-voxel ties."""
    rng = np.random.default_rng(seed)
    size = np.array(SHAPE, float)[:, None]
    pos = lo + rng.uniform(0, 1, (3, n)) * (size - 1 + hi - lo)
    if not ties:
        frac = np.abs(pos - np.floor(pos) - 0.5)
        pos = pos[:, np.all(frac > 1e-3, axis=0)]
    return torch.from_numpy(pos)


# ------------------------------------------------------------------------------------- backends agree
def test_linear_border_all_backends_agree(volume):
    pos = _positions()
    ref = sample(volume, pos, interpolation="linear", padding="border")
    assert ref.shape == (2, pos.shape[1]) and ref.dtype == torch.float64
    for backend in ("grid_sample", "scipy", "channels_last"):
        for ac in (True, False):
            out = sample(volume, pos, interpolation="linear", padding="border", backend=backend, align_corners=ac)
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0, msg=f"{backend}, align_corners={ac}")
    assert float((ref - volume[:, 0, 0, 0, None]).abs().max()) > 0.5  # positions really differ


def test_linear_zeros_gather_equals_scipy_constant(volume):
    pos = _positions()
    out = sample(volume, pos, interpolation="linear", padding="zeros")
    ref = np.stack([ndi.map_coordinates(volume[c].numpy(), pos.numpy(), order=1, mode="constant", cval=0.0)
                    for c in range(2)])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12, rtol=0)
    outside = ~np.all([(pos[a] >= 0) & (pos[a] <= SHAPE[a] - 1) for a in range(3)], axis=0)
    assert outside.sum() > 50 and np.all(out.numpy()[:, outside] == 0)
    torch.testing.assert_close(sample(volume, pos, interpolation="linear", padding="zeros", backend="scipy"),
                               out, atol=1e-12, rtol=0)
    # a fill value other than 0 (images padded with air)
    filled = sample(volume, pos, interpolation="linear", padding="zeros", fill=-1000.0)
    np.testing.assert_array_equal(filled.numpy()[:, outside], -1000.0)
    np.testing.assert_array_equal(filled.numpy()[:, ~outside], out.numpy()[:, ~outside])
    torch.testing.assert_close(sample(volume, pos, interpolation="linear", padding="zeros", fill=-1000.0,
                                      backend="scipy"), filled, atol=1e-12, rtol=0)


def test_zero_voxels_gather_equals_grid_sample_zeros(volume, labels):
    pos = _positions()
    for ac in (True, False):
        ref = sample(volume, pos, interpolation="linear", padding="zero_voxels", backend="grid_sample",
                     align_corners=ac)
        torch.testing.assert_close(sample(volume, pos, interpolation="linear", padding="zero_voxels"), ref,
                                   atol=1e-10, rtol=0)
    # fades within one voxel outside: some values are strictly between 0 and the edge value
    lin = sample(volume, pos, interpolation="linear", padding="zero_voxels")
    zeros = sample(volume, pos, interpolation="linear", padding="zeros")
    assert float((lin - zeros).abs().max()) > 0.1
    near = sample(labels, pos, interpolation="nearest", padding="zero_voxels")
    assert near.dtype == torch.uint8
    torch.testing.assert_close(near, sample(labels, pos, interpolation="nearest", padding="zero_voxels",
                                            backend="grid_sample"), atol=0, rtol=0)


def test_nearest_backends_agree_away_from_ties(labels):
    pos = _positions()
    for padding, backends in (("border", ("grid_sample", "scipy")), ("zeros", ("scipy",))):
        ref = sample(labels, pos, interpolation="nearest", padding=padding)
        assert ref.dtype == torch.uint8
        for backend in backends:
            torch.testing.assert_close(sample(labels, pos, interpolation="nearest", padding=padding, backend=backend),
                                       ref, atol=0, rtol=0, msg=f"{padding}, {backend}")
    ref = ndi.map_coordinates(labels.numpy(), pos.numpy(), order=0, mode="constant", cval=0)
    np.testing.assert_array_equal(sample(labels, pos, interpolation="nearest", padding="zeros").numpy(), ref)


def test_nearest_rounds_halves_up_as_scipy():
    vol = torch.arange(5, dtype=torch.int64)[:, None, None].expand(5, 1, 1).contiguous()
    pos = torch.tensor([[0.5, 1.5, 2.5, -0.5, 3.5], [0.0] * 5, [0.0] * 5], dtype=torch.float64)
    out = sample(vol, pos, interpolation="nearest", padding="border")
    assert out.tolist() == [1, 2, 3, 0, 4]
    ref = ndi.map_coordinates(vol.numpy(), pos.numpy(), order=0, mode="nearest")
    np.testing.assert_array_equal(out.numpy(), ref)
    np.testing.assert_array_equal(sample(vol.numpy(), pos.numpy(), interpolation="nearest", backend="scipy"), ref)


# ------------------------------------------------------------------------------------------ deeds' rules
def _deeds_labels(moving, pos):
    """deeds' label rule written out: C round (halves away from zero), then the index clamped."""
    idx = []
    for a in range(3):
        r = np.where(pos[a] >= 0, np.floor(pos[a] + 0.5), np.ceil(pos[a] - 0.5))
        idx.append(np.clip(r, 0, moving.shape[a] - 1).astype(int))
    return moving[tuple(idx)]


def _deeds_image(moving, pos):
    """deeds' trilinear rule: float64 weights of the unclamped position, each neighbour index clamped."""
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float64)
    acc = np.zeros(pos.shape[1:])
    for corner in range(8):
        bits = [(corner >> (2 - a)) & 1 for a in range(3)]
        w = np.ones(())
        idx = []
        for a in range(3):
            w = w * (frac[a] if bits[a] else 1.0 - frac[a])
            idx.append(np.clip(lo[a].astype(int) + bits[a], 0, moving.shape[a] - 1))
        acc += w * moving[tuple(idx)].astype(np.float64)
    return acc


def test_round_clamp_is_deeds_label_rule_bit_for_bit(labels):
    pos = _positions(ties=True).float()
    pos[:, :8] = torch.tensor([-0.5, -1.5, 0.5, 1.5, 2.5, 5.5, 6.5, 7.5])  # exact halves on axis 0 ...
    pos[1:, :8] = 1.0
    out = sample(labels, pos, interpolation="round", padding="clamp")
    np.testing.assert_array_equal(out.numpy(), _deeds_labels(labels.numpy(), pos.numpy()))
    assert out[:8].tolist() == labels[[0, 0, 1, 2, 3, 6, 6, 6], 1, 1].tolist()


def test_linear_clamp_is_deeds_image_rule_bit_for_bit(volume):
    pos = _positions(ties=True).float()  # deeds computes positions in float32
    image = volume[0]
    out = sample(image, pos, interpolation="linear", padding="clamp")
    np.testing.assert_array_equal(out.numpy(), _deeds_image(image.numpy(), pos.numpy()))
    # and equals the border rule up to rounding, exactly inside the grid
    border = sample(image, pos, interpolation="linear", padding="border")
    torch.testing.assert_close(out, border, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------- exactness and shapes
@pytest.mark.parametrize("padding", ["border", "zeros", "zero_voxels", "clamp"])
@pytest.mark.parametrize("interpolation", ["linear", "nearest", "round"])
def test_gather_is_exact_at_voxel_centres(volume, interpolation, padding):
    g = Grid(SHAPE).coords(dtype=np.float32)
    out = sample(volume.float(), torch.from_numpy(g), interpolation=interpolation, padding=padding)
    torch.testing.assert_close(out, volume.float(), atol=0, rtol=0)


def test_batched_equals_one_by_one(volume):
    vols = torch.stack([volume, -2 * volume])  # (2, 2, X, Y, Z)
    pos = torch.stack([_positions(seed=3)[:, :100], _positions(seed=4)[:, :100]])
    for backend in ("gather", "grid_sample", "scipy"):
        out = sample(vols, pos, backend=backend)
        assert out.shape == (2, 2, 100)
        for b in range(2):
            torch.testing.assert_close(out[b], sample(vols[b], pos[b], backend=backend), atol=1e-12, rtol=0)


def test_numpy_in_numpy_out_and_shapes(volume):
    pos = _positions()[:, :60].reshape(3, 3, 4, 5)
    for backend in ("gather", "grid_sample", "scipy"):
        out = sample(volume.numpy()[0], pos.numpy(), backend=backend)
        assert isinstance(out, np.ndarray) and out.shape == (3, 4, 5)
    ints = sample(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), pos.numpy())
    assert ints.dtype == np.float32  # trilinear of integers is float32


def test_unsupported_rules_are_clear_errors(volume):
    pos = _positions()[:, :5]
    with pytest.raises(InputError, match="backend 'grid_sample'"):
        sample(volume, pos, padding="zeros", backend="grid_sample")
    with pytest.raises(InputError, match="backend 'scipy'"):
        sample(volume, pos, interpolation="round", backend="scipy")
    with pytest.raises(InputError, match="backend 'channels_last'"):
        sample(volume, pos, interpolation="nearest", backend="channels_last")
    with pytest.raises(InputError, match="backend: expected"):
        sample(volume, pos, backend="cuda")
    with pytest.raises(InputError, match="fill"):
        sample(volume, pos, padding="border", fill=1.0)
    with pytest.raises(InputError, match="coords_vox"):
        sample(volume, pos[:2])
    with pytest.raises(InputError, match="coords_vox"):
        sample(torch.zeros(2, 4, 4, 4), torch.zeros(2, 5), backend="channels_last")
    for interps, pads in BACKENDS.values():
        assert "linear" in interps and "border" in pads  # every backend does the common case


def test_gather_in_chunks_is_the_same(volume, monkeypatch):
    pos = _positions(n=3000, ties=True)
    whole = sample(volume, pos, interpolation="linear", padding="zeros")
    near = sample(volume, pos, interpolation="nearest", padding="border")
    monkeypatch.setattr(fields, "_CHUNK", 257)
    torch.testing.assert_close(sample(volume, pos, interpolation="linear", padding="zeros"), whole, atol=0, rtol=0)
    torch.testing.assert_close(sample(volume, pos, interpolation="nearest", padding="border"), near, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ channels_last
def test_channels_last_equals_grid_sample_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(7, 6, 5, 8, generator=gen, dtype=torch.float64)
    pts = torch.rand(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([8.0, 7.0, 10.0]) - 1.0  # some outside
    p1 = pts.clone().requires_grad_(True)
    p2 = pts.clone().requires_grad_(True)
    cl = feats.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # channels-last memory, read without a copy
    a = sample(cl, p1.t(), backend="channels_last").t()
    b = sample(feats, p2.t(), backend="grid_sample", align_corners=True).t()
    assert a.shape == (200, 7)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    w = torch.rand(200, 7, generator=gen, dtype=torch.float64)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, atol=1e-9, rtol=0)
    # at voxel centres the sampler returns the stored values exactly
    idx = torch.tensor([[0, 0, 0], [5, 4, 7], [2, 3, 1]])
    vals = sample(cl, idx.double().t(), backend="channels_last")
    torch.testing.assert_close(vals, feats[:, idx[:, 0], idx[:, 1], idx[:, 2]], atol=0, rtol=0)


def test_channels_last_gradient_is_analytic():
    feats = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    feats[0] = torch.arange(4, dtype=torch.float64)[:, None, None] * 3.0  # 3 x
    feats[1] = torch.arange(4, dtype=torch.float64)[None, None, :] * -2.0  # -2 z
    p = torch.tensor([[1.3, 2.2, 0.7]], dtype=torch.float64, requires_grad=True)
    out = sample(feats, p.t(), backend="channels_last").t()
    torch.testing.assert_close(out, torch.tensor([[3.9, -1.4]], dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(p.grad, torch.tensor([[3.0, 0.0, -2.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ sample_affine
def _affine_map():
    rot = np.array([[0.96, -0.2, 0.05], [0.21, 0.95, -0.1], [-0.03, 0.12, 1.02]])
    m = np.eye(4)
    m[:3, :3] = rot * 0.8131
    m[:3, 3] = [0.7123, -0.4311, 1.3377]  # no position exactly half-way between voxels
    return m


def test_sample_affine_backends_agree_and_equal_sample_at_mapped_points(volume, labels):
    m = _affine_map()
    out_shape = (6, 8, 7)
    coords = map_points(m, Grid(out_shape).coords(dtype=np.float64))
    ref = sample(volume, torch.from_numpy(coords), interpolation="linear", padding="border")
    for backend in ("scipy", "gather", "grid_sample"):
        out = sample_affine(volume, m, out_shape, interpolation="linear", padding="border", backend=backend)
        assert out.shape == (2, *out_shape)
        torch.testing.assert_close(out, ref, atol=1e-5 if backend == "gather" else 1e-10, rtol=0, msg=backend)
    # nearest, background outside: gather and scipy agree exactly (no ties for this map)
    a = sample_affine(labels.numpy(), m, out_shape, interpolation="nearest", padding="zeros", backend="scipy")
    b = sample_affine(labels.numpy(), m, out_shape, interpolation="nearest", padding="zeros", backend="gather")
    assert a.dtype == b.dtype == np.uint8 and (a == 0).sum() > 10
    np.testing.assert_array_equal(a, b)


def test_sample_affine_batched_grid_sample_is_one_map_per_item(volume):
    vols = torch.stack([volume, volume + 1.0]).float()
    maps = np.stack([np.eye(4), _affine_map()])
    out = sample_affine(vols, maps, SHAPE, backend="grid_sample", align_corners=False)
    torch.testing.assert_close(out[0], vols[0], atol=1e-5, rtol=0)  # identity (to float32 rounding)
    torch.testing.assert_close(out[1], sample_affine(vols[1], maps[1], SHAPE, backend="gather"), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="index_map"):
        sample_affine(vols, np.eye(3), SHAPE)


def test_separable_is_the_gather_for_axis_aligned_maps_and_passes_gradients_to_the_values(volume):
    """``backend="separable"`` (the align engine's parameter grid read on a sub-lattice in every iteration): the
    same values as the reference gather for scaled and shifted axis-aligned maps reaching outside the grid (border
    padding), and the gradient of the values that grid_sample's autograd gives; other maps are refused."""
    vals = volume.double()
    for scale, shift in (((0.25, 0.5, 1.0), (-0.375, 0.125, -1.5)), ((4.0, 2.0, 0.37), (1.0, -0.5, 2.25))):
        m = np.diag([*scale, 1.0])
        m[:3, 3] = shift
        out_shape = (5, 6, 9)
        ref = sample_affine(vals, m, out_shape, backend="gather")
        torch.testing.assert_close(sample_affine(vals, m, out_shape, backend="separable"), ref, atol=1e-10, rtol=0)
        a = vals.clone().requires_grad_(True)
        b = vals.clone().requires_grad_(True)
        w = torch.rand((vals.shape[0], *out_shape), generator=torch.Generator().manual_seed(1), dtype=vals.dtype)
        (sample_affine(a, m, out_shape, backend="separable") * w).sum().backward()
        coords = torch.from_numpy(map_points(m, Grid(out_shape).coords(dtype=np.float64)))
        (sample(b, coords, backend="grid_sample") * w).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)
    with pytest.raises(InputError, match="axis-aligned"):
        sample_affine(vals, _affine_map(), (4, 4, 4), backend="separable")
    with pytest.raises(InputError, match="use sample_affine"):
        sample(vals, torch.zeros(3, 4), backend="separable")


def test_learn2reg_label_warp_is_map_coordinates_exactly(labels):
    disp = np.zeros((3, *SHAPE))
    disp[0] = 0.5  # exact ties everywhere along axis 0
    disp[1] = np.random.default_rng(5).normal(0, 1.5, SHAPE)
    ref = ndi.map_coordinates(labels.numpy(), Grid(SHAPE).coords(dtype=np.float64) + disp, order=0,
                              mode="constant", cval=0)
    np.testing.assert_array_equal(warp_labels(labels.numpy(), disp, backend="scipy"), ref)
    np.testing.assert_array_equal(warp_labels(labels.numpy(), disp.astype(np.float32)), ref)  # gather, float32
