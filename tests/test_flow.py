"""The supervoxel flow: keypoints, features, the Adam flow and the TPS dense field.

Synthetic supervoxel maps are Voronoi cells inside an ellipsoid (a stand-in for SLIC layers); the moving maps
are the fixed maps pulled through a known smooth field, so the true fixed -> moving displacement is known.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slicreg import flow
from slicreg.conventions import downsample_affine
from slicreg.errors import InputError
from slicreg.fields import sample

SV_SHAPE = (28, 24, 32)  # supervoxel grid (stands for 96 x 80 x 128 at 4 mm)


def voronoi_maps(shape, n_layers, n_sv, seed):
    """(L, X, Y, Z) uint8: Voronoi cells of n_sv random seeds per layer inside an ellipsoid, 0 outside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    centre, radius = (np.array(shape) - 1) / 2, np.array(shape) * 0.45
    mask = (((grid - centre) / radius) ** 2).sum(1) <= 1
    fg = grid[mask]
    out = np.zeros((n_layers, grid.shape[0]), np.uint8)
    for layer in range(n_layers):
        seeds = fg[rng.choice(len(fg), n_sv, replace=False)] + rng.uniform(-0.3, 0.3, (n_sv, 3))
        d2 = ((fg[:, None, :] - seeds[None]) ** 2).sum(-1)
        out[layer, mask] = d2.argmin(1) + 1
    return out.reshape(n_layers, *shape)


def smooth_field(shape, amp, shift, seed=1):
    """v(x): (N, 3) -> (N, 3), voxels: a translation plus two sine modes per component."""
    rng = np.random.default_rng(seed)
    size = np.array(shape, float)
    modes = [(a, rng.normal(size=3) * 2 * np.pi / size, rng.uniform(0, 2 * np.pi)) for a in range(3) for _ in range(2)]

    def v(x):
        out = np.zeros_like(x) + np.asarray(shift, float)
        for a, kvec, phase in modes:
            out[:, a] += amp * np.sin(x @ kvec + phase)
        return out

    return v


def pull_maps(fixed, v):
    """moving(q) = fixed(q + v(q)) (nearest, 0 outside)."""
    shape = fixed.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    coords = torch.from_numpy((grid + v(grid)).T.reshape(3, *shape).astype(np.float32))
    return sample(torch.from_numpy(fixed), coords, interpolation="nearest", padding="zeros").numpy()


def true_disp(points, v, iters=60):
    """Fixed -> moving displacement u with moving(p + u) = fixed(p): solve u = -v(p + u)."""
    u = np.zeros_like(points, dtype=float)
    for _ in range(iters):
        u = -v(points + u)
    return u


@pytest.fixture(scope="module")
def pair():
    fixed = voronoi_maps(SV_SHAPE, 6, 40, seed=0)
    v = smooth_field(SV_SHAPE, amp=1.0, shift=(1.5, -1.0, 2.0))
    return fixed, pull_maps(fixed, v), v


# ---------------------------------------------------------------------------------------------- keypoints
def test_centres_of_boxes_are_exact():
    lab = np.zeros((2, 10, 12, 14), np.uint8)
    lab[0, 1:4, 2:6, 3:4] = 5  # centre (2, 3.5, 3)
    lab[0, 6:10, 0:1, 10:14] = 2  # centre (7.5, 0, 11.5)
    lab[1, 0:10, 0:12, 0:14] = 127  # whole grid
    lab[1, 0, 0, 0] = 3  # a one-voxel supervoxel
    pts, ids = flow.supervoxel_centres(lab)
    np.testing.assert_array_equal(ids, [[0, 2], [0, 5], [1, 3], [1, 127]])
    expected_full = (np.arange(10).sum() * 12 * 14 - 0) / (10 * 12 * 14 - 1)  # axis-0 mean without voxel 0
    np.testing.assert_allclose(pts[:3], [[7.5, 0, 11.5], [2, 3.5, 3], [0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(pts[3, 0], expected_full, rtol=1e-6)
    assert pts.dtype == np.float32
    _, ids2 = flow.supervoxel_centres(lab, min_voxels=2)
    np.testing.assert_array_equal(ids2, [[0, 2], [0, 5], [1, 127]])
    # torch in -> torch out
    t_pts, _ = flow.supervoxel_centres(torch.from_numpy(lab))
    assert isinstance(t_pts, torch.Tensor)
    np.testing.assert_array_equal(t_pts.numpy(), pts)


def test_foreground_keypoints_are_seeded_foreground_points():
    lab = voronoi_maps((12, 10, 14), 2, 8, seed=3)
    a = flow.foreground_keypoints(lab, n=50, seed=0)
    b = flow.foreground_keypoints(lab, n=50, seed=0)
    c = flow.foreground_keypoints(lab, n=50, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (50, 3) and np.all(a % 2 == 0)
    idx = a.astype(int)
    assert np.all(lab[0, idx[:, 0], idx[:, 1], idx[:, 2]] > 0)
    assert len(np.unique(a, axis=0)) == 50
    every = flow.foreground_keypoints(lab, n=10**6, seed=0, stride=1)
    assert len(every) == int((lab[0] > 0).sum())


# ---------------------------------------------------------------------------------------------- features
def test_label_channel_map_is_a_seeded_grouping():
    lut = flow.label_channel_map(3, seed=7, include_background=True)
    assert lut.shape == (3, 128)
    for layer in lut:
        np.testing.assert_array_equal(np.bincount(layer), [8] * 16)
    assert not np.array_equal(lut[0], lut[1])
    np.testing.assert_array_equal(lut, flow.label_channel_map(3, seed=7, include_background=True))
    assert not np.array_equal(lut, flow.label_channel_map(3, seed=8, include_background=True))
    nobg = flow.label_channel_map(3, seed=7)
    assert np.all(nobg[:, 0] == -1)
    np.testing.assert_array_equal(nobg[:, 1:], lut[:, 1:])


def _reference_features(lab, seed, include_background=False):
    lut = torch.from_numpy(flow.label_channel_map(lab.shape[0], seed=seed, include_background=include_background))
    out = []
    for layer in range(lab.shape[0]):
        chan = lut[layer][torch.from_numpy(lab[layer]).long()]
        onehot = torch.stack([(chan == c).float() for c in range(16)])[None]
        pooled = F.avg_pool3d(onehot, 3, stride=2, padding=1, count_include_pad=True)
        out.append(F.avg_pool3d(pooled, 5, stride=1, padding=2, count_include_pad=True)[0])
    return torch.cat(out).numpy()


@pytest.mark.parametrize("include_background", [False, True])
def test_features_equal_onehot_then_avg_pool(include_background):
    lab = np.random.default_rng(0).integers(0, 128, (3, 11, 12, 9)).astype(np.uint8)
    feats = flow.supervoxel_features(lab, seed=3, include_background=include_background)
    assert feats.shape == (48, 6, 6, 5) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, _reference_features(lab, 3, include_background), atol=1e-6)
    # probabilities that are one-hot give the same features; a batch gives the stack
    prob = F.one_hot(torch.from_numpy(lab).long(), 128).permute(0, 4, 1, 2, 3).float()
    np.testing.assert_allclose(flow.supervoxel_features(prob, seed=3, include_background=include_background).numpy(),
                               feats, atol=1e-6)
    batch = flow.supervoxel_features(np.stack([lab, lab[::-1]]), seed=3, include_background=include_background)
    assert batch.shape == (2, 48, 6, 6, 5)
    np.testing.assert_allclose(batch[0], feats, atol=1e-6)


@pytest.mark.parametrize("pools,banded", [(((3, 2), (5, 1)), True), (((3, 1), (3, 2)), False), (((5, 3),), True)])
def test_pooling_module_equals_avg_pool3d_of_one_hot(pools, banded):
    """slicreg.flow.pooling's reference: avg_pool3d(one_hot(lut[labels])), pool after pool, zero padding counted;
    both the banded integer path and the general packed path."""
    from slicreg.flow import pooling

    lab = torch.from_numpy(np.random.default_rng(4).integers(0, 128, (2, 11, 12, 10)).astype(np.uint8))
    lut = torch.from_numpy(flow.label_channel_map(2, seed=1))  # label 0 -> -1: no channel
    assert (pooling._pooled_onehot_coarse(lab, lut, 16, pools, 1) is not None) == banded
    got = pooling._pooled_onehot(lab, lut, 16, pools)  # channels-last (X', Y', Z', L * 16)
    ref = []
    for layer in range(2):
        onehot = F.one_hot(lut[layer][lab[layer].long()] + 1, 17)[..., 1:]  # (X, Y, Z, 16); -1 -> all zero
        x = onehot.permute(3, 0, 1, 2)[None].double()
        for k, s in pools:
            x = F.avg_pool3d(x, k, s, padding=k // 2, count_include_pad=True)
        ref.append(x[0])
    ref = torch.cat(ref).permute(1, 2, 3, 0)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-7)


def test_probability_upsampling_commutes_with_the_compression():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, 128, 5, 6, 4)).astype(np.float32))
    prob = torch.softmax(logits, dim=1)
    coarse = flow.supervoxel_features(prob, seed=2, upsample=2)
    fine = F.interpolate(prob, scale_factor=2, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(coarse.numpy(), flow.supervoxel_features(fine, seed=2).numpy(), atol=1e-6)
    assert coarse.shape == (32, 5, 6, 4)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 1), (3, 1), (1, 2), (5, 3)])
def test_box_pool3d_equals_avg_pool3d(kernel, stride):
    x = torch.rand(2, 3, 9, 10, 7, generator=torch.Generator().manual_seed(0))
    ref = F.avg_pool3d(x, kernel, stride, kernel // 2, count_include_pad=True)
    torch.testing.assert_close(flow.box_pool3d(x, kernel, stride), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- sampler
# the channels-last point sampler is a backend of slicreg.fields.sample: tests/test_sampler.py
def _read_cl(feats_cl, pts):
    """``(X, Y, Z, C)`` features at ``(N, 3)`` points -> ``(N, C)``, as the Adam flow reads them."""
    return sample(feats_cl.permute(3, 0, 1, 2), pts.t(), backend="channels_last").t()


# ---------------------------------------------------------------------------------------------- Adam flow
def test_knn_graph_excludes_self_and_orders_by_distance():
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [7, 0, 0]])
    np.testing.assert_array_equal(flow.knn_graph(pts, 2).numpy(), [[1, 2], [0, 2], [1, 0], [2, 1]])


def test_knn_penalty_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(30, 3, generator=gen)
    d = torch.randn(30, 3, generator=gen, dtype=torch.float32, requires_grad=True)
    knn = flow.knn_graph(pts, 4)
    direct = ((d[knn] - d[:, None, :]) ** 2).sum()
    direct.backward()
    value, grad = flow.knn_penalty(knn, 30)(d.detach())
    torch.testing.assert_close(value, direct.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, d.grad, rtol=1e-5, atol=1e-5)


def test_adam_flow_recovers_a_known_smooth_displacement(pair):
    fixed, moving, v = pair
    pts, _ = flow.supervoxel_centres(fixed)
    disp, info = flow.adam_keypoint_flow(flow.supervoxel_features(fixed), flow.supervoxel_features(moving), pts)
    truth = true_disp(pts.astype(float), v)
    err = np.linalg.norm(disp - truth, axis=1)
    assert np.linalg.norm(truth, axis=1).mean() > 2.0  # the problem is not trivial
    # interior keypoints (ellipsoid radius < 0.7; the outer ones see the mask border and the grid edge)
    inner = np.linalg.norm((pts - (np.array(SV_SHAPE) - 1) / 2) / (np.array(SV_SHAPE) * 0.45), axis=1) < 0.7
    assert inner.sum() > 40
    assert err.mean() < 1.0, err.mean()
    assert err[inner].mean() < 0.5 and np.percentile(err[inner], 90) < 1.0, (err[inner].mean(),
                                                                           np.percentile(err[inner], 90))
    assert info["loss"][-1] < 0.25 * info["loss"][0]
    assert len(info["loss"]) == 100


def test_adam_early_stop_ends_sooner_with_the_same_result(pair):
    fixed, moving, v = pair
    pts, _ = flow.supervoxel_centres(fixed)
    ff, mf = flow.supervoxel_features(fixed), flow.supervoxel_features(moving)
    full, info_full = flow.adam_keypoint_flow(ff, mf, pts)
    early, info = flow.adam_keypoint_flow(ff, mf, pts, patience=10, tol=3e-3)
    assert info_full["iterations_run"] == 100 and len(info_full["loss"]) == 100
    assert 20 <= info["iterations_run"] < 100 and len(info["loss"]) == info["iterations_run"]
    np.testing.assert_array_equal(info["loss"], info_full["loss"][: info["iterations_run"]])  # same path until then
    truth = true_disp(pts.astype(float), v)
    err_full = np.linalg.norm(full - truth, axis=1).mean()
    err_early = np.linalg.norm(early - truth, axis=1).mean()
    assert err_early < err_full + 0.05, (err_early, err_full)
    with pytest.raises(InputError):
        flow.adam_keypoint_flow(ff, mf, pts, patience=-1)


def test_supervoxel_flow_dense_field_matches_truth_in_the_interior(pair):
    fixed, moving, v = pair
    # lam is in fine voxels (kernel r scales with distance): this grid is ~3.5x smaller than 192 x 160 x 256
    disp, info = flow.supervoxel_flow(fixed, moving, lam=5.0)
    fine_shape = tuple(2 * s for s in SV_SHAPE)
    assert disp.shape == (3, *fine_shape) and disp.dtype == np.float32
    # truth on the fine grid: fine voxel f = 2 q + 0.5, displacement x 2
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in fine_shape], indexing="ij"), -1).reshape(-1, 3)
    q = (grid - 0.5) / 2
    centre, radius = (np.array(SV_SHAPE) - 1) / 2, np.array(SV_SHAPE) * 0.45
    interior = (((q - centre) / (0.7 * radius)) ** 2).sum(1) <= 1
    truth = 2 * true_disp(q[interior], v)
    est = disp.reshape(3, -1).T[interior]
    err = np.linalg.norm(est - truth, axis=1) / 2  # in sv voxels (the maps' resolution; 1 sv voxel = 2 fine)
    assert np.linalg.norm(truth, axis=1).mean() / 2 > 2.0
    assert err.mean() < 0.6 and np.percentile(err, 90) < 1.0, (err.mean(), np.percentile(err, 90))
    # the keypoints reported on the fine grid follow the contract's rule
    np.testing.assert_allclose(info["keypoints_vox"], 2 * info["keypoints_sv_vox"] + 0.5)
    np.testing.assert_allclose(info["disp_keypoints_vox"], 2 * info["disp_sv_vox"])
    assert info["params"]["n_keypoints"] == len(info["keypoints_vox"]) <= 6 * 40


def test_centre_matching_init_recovers_a_large_shift():
    fixed = voronoi_maps(SV_SHAPE, 4, 40, seed=5)
    shift = np.array([6.0, -4.0, 8.0])
    moving = pull_maps(fixed, smooth_field(SV_SHAPE, amp=0.0, shift=-shift))  # moving(q) = fixed(q - shift)
    pts, _ = flow.supervoxel_centres(fixed)
    init = flow.centre_matching_init(fixed, moving, pts)
    inner = np.linalg.norm((pts - (np.array(SV_SHAPE) - 1) / 2) / (np.array(SV_SHAPE) * 0.3), axis=1) <= 1
    assert np.median(np.linalg.norm(init - shift, axis=1)[inner]) < 0.5
    _, info = flow.supervoxel_flow(fixed, moving, init="centres", iterations=30)
    np.testing.assert_allclose(info["init_disp_sv_vox"], init)
    assert np.median(np.linalg.norm(info["disp_sv_vox"] - shift, axis=1)[inner]) < 0.5


def test_identity_pair_gives_a_zero_field(pair):
    fixed, _, _ = pair
    for kwargs in ({}, {"init": "centres"}, {"keypoints": "random", "n_random": 100}):
        disp, info = flow.supervoxel_flow(fixed, fixed, iterations=10, **kwargs)
        assert np.abs(disp).max() < 1e-5, kwargs
        assert info["mse"] == 0.0


def test_flow_is_deterministic_under_a_seed(pair):
    fixed, moving, _ = pair
    a, ia = flow.supervoxel_flow(fixed, moving, keypoints="random", n_random=150, seed=4, iterations=20)
    b, ib = flow.supervoxel_flow(fixed, moving, keypoints="random", n_random=150, seed=4, iterations=20)
    c, ic = flow.supervoxel_flow(fixed, moving, keypoints="random", n_random=150, seed=5, iterations=20)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ia["disp_sv_vox"], ib["disp_sv_vox"])
    assert not np.array_equal(ia["keypoints_sv_vox"], ic["keypoints_sv_vox"])


def test_probabilities_give_the_same_flow_as_labels(pair):
    fixed, moving, _ = pair
    prob = F.one_hot(torch.from_numpy(moving).long(), 128).permute(0, 4, 1, 2, 3).float().numpy()
    a, _ = flow.supervoxel_flow(fixed, moving, iterations=10)
    b, _ = flow.supervoxel_flow(fixed, prob, iterations=10)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_probabilities_on_the_network_grid_are_upsampled():
    coarse = voronoi_maps((10, 8, 12), 3, 12, seed=2)
    prob = F.one_hot(torch.from_numpy(coarse).long(), 128).permute(0, 4, 1, 2, 3).float()
    disp, info = flow.supervoxel_flow(prob, prob, prob_upsample=2, iterations=5)
    assert disp.shape == (3, 40, 32, 48) and isinstance(disp, torch.Tensor)
    assert float(disp.abs().max()) < 1e-5
    # keypoints from the coarse argmax, at the supervoxel-grid voxel the network read them at (coarse q -> 2 q:
    # the linear rule's 2 q + 0.5 plus content_offset -0.5)
    centres, _ = flow.supervoxel_centres(coarse)
    np.testing.assert_allclose(info["keypoints_sv_vox"].numpy(), 2 * centres, atol=1e-5)
    assert info["params"]["content_offset_sv"] == [-0.5, -0.5]


# ---------------------------------------------------------------------------------------------- TPS
@pytest.mark.parametrize("kernel", ["r", "r2logr"])
@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_tps_reproduces_an_affine_field_exactly(kernel, lam):
    rng = np.random.default_rng(0)
    shape = (14, 11, 17)
    pts = rng.uniform(0, np.array(shape) - 1, (60, 3))
    a = np.eye(3) * 0.05 + rng.normal(scale=0.05, size=(3, 3))
    t = np.array([1.5, -2.0, 0.5])
    field = flow.tps_dense_field(pts, pts @ a.T + t, shape, kernel=kernel, lam=lam, step=4)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    expected = np.einsum("ab,b...->a...", a, grid) + t[:, None, None, None]
    np.testing.assert_allclose(field, expected, atol=1e-4)


@pytest.mark.parametrize("kernel", ["r", "r2logr"])
def test_tps_interpolates_the_keypoints_with_lam_zero(kernel):
    rng = np.random.default_rng(1)
    pts = torch.from_numpy(rng.uniform(0, 20, (40, 3)))
    vals = torch.from_numpy(rng.normal(size=(40, 3)))
    tps = flow.tps_fit(pts, vals, kernel=kernel, lam=0.0)
    torch.testing.assert_close(flow.tps_evaluate(tps, pts), vals, atol=1e-6, rtol=0)
    smooth = flow.tps_fit(pts, vals, kernel=kernel, lam=50.0)
    resid = (flow.tps_evaluate(smooth, pts) - vals).norm(dim=1).mean()
    assert 0.05 < float(resid) < float(vals.norm(dim=1).mean())
    # on the dense grid (step 1), voxel keypoints keep their values
    ipts = torch.from_numpy(rng.permutation(np.stack(np.meshgrid(*[np.arange(0, 12, 3)] * 3, indexing="ij"),
                                                     -1).reshape(-1, 3))[:30].astype(np.float64))
    ivals = torch.from_numpy(rng.normal(size=(30, 3)))
    dense = flow.tps_dense_field(ipts, ivals, (12, 12, 12), kernel=kernel, lam=0.0, step=1)
    idx = ipts.long()
    torch.testing.assert_close(dense[:, idx[:, 0], idx[:, 1], idx[:, 2]].t().double(), ivals, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["r", "r2logr"])
def test_tps_fast_evaluation_matches_float64(kernel):
    rng = np.random.default_rng(3)
    pts = torch.from_numpy(rng.uniform(0, 150, (500, 3)))
    tps = flow.tps_fit(pts, torch.from_numpy(rng.normal(scale=3.0, size=(500, 3))), kernel=kernel, lam=100.0)
    grid = torch.from_numpy(rng.uniform(-10, 160, (3000, 3)))
    exact, fast = flow.tps_evaluate(tps, grid), flow.tps_evaluate(tps, grid, fast=True)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=0)
    if kernel == "r":
        assert not torch.equal(fast, exact)  # the float32 path was taken


def test_coarse_to_fine_follows_downsample_affine():
    fine_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine_affine[:3, 3] = [-190.0, -150.0, -250.0]
    coarse_affine = downsample_affine(fine_affine, 2)
    q = np.array([[0.0, 0.0, 0.0], [3.5, 1.0, 95.25]])
    world = (coarse_affine @ np.c_[q, np.ones(2)].T)[:3].T
    fine = (np.linalg.inv(fine_affine) @ np.c_[world, np.ones(2)].T)[:3].T
    np.testing.assert_allclose(flow.coarse_to_fine_vox(q, factor=2), fine)
    _, d = flow.coarse_to_fine_vox(q, np.ones((2, 3)), factor=2)
    np.testing.assert_allclose(d, 2.0)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_input_error(pair):
    fixed, moving, _ = pair
    with pytest.raises(InputError, match="fixed_sv.*integer|fixed_sv.*probabilities"):
        flow.supervoxel_flow(fixed.astype(np.float32), moving)  # float maps without the 128 axis
    with pytest.raises(InputError, match=r"fixed_sv.*\(L, X, Y, Z\)"):
        flow.supervoxel_flow(fixed[0], moving)
    with pytest.raises(InputError, match="moving_sv.*0..127"):
        flow.supervoxel_flow(fixed, np.full_like(moving, 200))
    with pytest.raises(InputError, match="same layers and supervoxel grid"):
        flow.supervoxel_flow(fixed, moving[:, :-2])
    with pytest.raises(InputError, match="same layers"):
        flow.supervoxel_flow(fixed, moving[:3])
    with pytest.raises(InputError, match="fixed_sv: expected integer"):
        flow.supervoxel_flow(fixed.astype(bool), moving)
    bad_prob = np.zeros((2, 127, 4, 4, 4), np.float32)
    with pytest.raises(InputError, match=r"moving_sv.*\(L, 128, X, Y, Z\)"):
        flow.supervoxel_flow(fixed, bad_prob)
    nan_prob = np.full((6, 128, *SV_SHAPE), np.nan, np.float32)
    with pytest.raises(InputError, match="moving_sv.*finite"):
        flow.supervoxel_flow(fixed, nan_prob)
    with pytest.raises(InputError, match="fixed_sv: only .* keypoints .* k = 10000"):
        flow.supervoxel_flow(fixed, moving, k=10**4)
    with pytest.raises(InputError, match="k: expected"):
        flow.knn_graph(torch.zeros(5, 3), 5)
    with pytest.raises(InputError, match="kernel"):
        flow.supervoxel_flow(fixed, moving, kernel="gauss", iterations=1)
    with pytest.raises(InputError, match="init"):
        flow.supervoxel_flow(fixed, moving, init="affine")
    with pytest.raises(InputError, match="keypoints"):
        flow.supervoxel_flow(fixed, moving, keypoints="grid")
    with pytest.raises(InputError, match="points: a 3-D spline"):
        flow.tps_fit(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(InputError, match="singular"):
        flow.tps_fit(np.array([[0.0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]), np.ones((5, 3)), lam=0.0)
    with pytest.raises(InputError, match="shape"):
        flow.tps_dense_field(np.zeros((5, 3)), np.zeros((5, 3)), (4, 4))
    with pytest.raises(InputError, match="n_channels"):
        flow.label_channel_map(2, n_channels=10)
    with pytest.raises(InputError, match="fixed_feats, moving_feats"):
        flow.adam_keypoint_flow(np.zeros((4, 5, 5, 5), np.float32), np.zeros((4, 5, 5, 6), np.float32),
                                np.zeros((10, 3), np.float32))


def test_adam_equals_torch_optim_adam():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, 3, generator=gen)
    target = torch.randn(50, 3, generator=gen)
    ours, ref = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    adam = flow.Adam(ours, lr=0.3, eps=1e-3)
    opt = torch.optim.Adam([ref], lr=0.3, eps=1e-3)
    for it in range(25):
        for p in (ours, ref):
            p.grad = None
            ((p - target) ** 4).sum().backward()
        adam.lr = 0.3 / (1 + it)  # a changing step, as the refinement's schedule
        for group in opt.param_groups:
            group["lr"] = 0.3 / (1 + it)
        adam.step(ours.grad)
        opt.step()
        assert torch.equal(ours, ref), it


# ---------------------------------------------------------------------------------------------- speed paths
def coarse_maps(shape, n_layers, seed):
    """Random label maps with background, a few absent labels and an empty layer (edge cases for the counts)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 20, (n_layers, *shape)).astype(np.uint8)
    lab[lab > 15] = 0  # background in ~25 % of the voxels
    lab[:, :1] = 0  # an empty slab: the bounding box does not start at 0
    lab[-1] = 0  # an empty layer
    return lab


def test_upsample_labels_takes_the_nearest_coarse_voxel():
    from slicreg.registration import upsample_labels_stride2

    lab = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(np.uint8)
    for f in (1, 2, 3):
        up = flow.upsample_labels(lab, f)
        assert up.shape == (2, 3 * f, 4 * f, 5 * f)
        for p in range(3 * f):  # fine voxel p takes coarse voxel floor(p / f + 1/2), clamped
            q = min(int(np.floor(p / f + 0.5)), 2)
            np.testing.assert_array_equal(up[:, p, :: f, :: f], lab[:, q])
    np.testing.assert_array_equal(flow.upsample_labels(lab, 2), upsample_labels_stride2(torch.from_numpy(lab)))


@pytest.mark.parametrize("factor", [2, 3])
def test_centres_from_coarse_labels_equal_those_of_the_upsampled_maps(factor):
    lab = coarse_maps((7, 6, 9), 3, seed=factor)
    up = flow.upsample_labels(lab, factor)
    for min_voxels in (1, 20):
        ref = flow.supervoxel_centres(up, min_voxels=min_voxels)
        got = flow.supervoxel_centres(lab, min_voxels=min_voxels, upsample=factor)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)  # exact sums: bitwise equal


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("pools", [((3, 2), (5, 1)), ((3, 3), (3, 1)), ((5, 2),), ((3, 1), (3, 2)), ((1, 1),),
                                   ((5, 4), (3, 1))])
@pytest.mark.parametrize("include_background", [False, True])
def test_features_from_coarse_labels_equal_onehot_avg_pool_of_the_upsampled_maps(factor, pools,
                                                                                 include_background):
    lab = coarse_maps((11, 12, 10) if factor == 1 else (5, 7, 6), 3, seed=factor + 10)
    up = flow.upsample_labels(lab, factor)
    got = flow.supervoxel_features(lab, pools=pools, upsample=factor, include_background=include_background)
    # reference: one-hot of the channel map on the upsampled grid, then avg_pool3d (zero padding counted)
    lut = flow.label_channel_map(3, include_background=include_background)
    onehot = np.zeros((3, 16, *up.shape[1:]), np.float64)
    for layer in range(3):
        ch = lut[layer][up[layer]]
        for c in range(16):
            onehot[layer, c] = ch == c
    x = torch.from_numpy(onehot.reshape(1, 48, *up.shape[1:]))
    for k, s in pools:
        x = F.avg_pool3d(x, k, s, padding=k // 2, count_include_pad=True)
    assert got.shape == tuple(x.shape[1:])
    np.testing.assert_allclose(got, x[0].numpy(), rtol=0, atol=2e-7)
    # and bitwise the same as the features of the upsampled maps
    np.testing.assert_array_equal(got, flow.supervoxel_features(up, pools=pools,
                                                                include_background=include_background))


def test_supervoxel_flow_on_coarse_maps_equals_the_flow_on_upsampled_maps():
    coarse_f = voronoi_maps((12, 10, 14), 4, 20, seed=5)
    coarse_m = np.roll(coarse_f, 1, axis=1)
    up_f, up_m = flow.upsample_labels(coarse_f, 2), flow.upsample_labels(coarse_m, 2)
    opts = dict(init="centres", iterations=15, lam=5.0)
    ref, ref_info = flow.supervoxel_flow(up_f, up_m, **opts)
    assert ref_info["params"]["content_offset_sv"] == [0.0, 0.0]
    for fixed, moving, factors in ((coarse_f, coarse_m, 2), (coarse_f, up_m, (2, 1)), (up_f, coarse_m, (1, 2))):
        got, info = flow.supervoxel_flow(fixed, moving, label_upsample=factors, **opts)
        # the same keypoints and flow as on the upsampled maps (the centre start bitwise), then placed where the
        # coarse maps' content sits: the fixed keypoints by the fixed side's content offset, their displacements
        # by the difference of the two sides' (content_offset: +1/2 sv voxel for coarse labels)
        off_f, off_m = (flow.content_offset(True, f) for f in np.broadcast_to(factors, 2))
        assert info["params"]["content_offset_sv"] == [off_f, off_m]
        np.testing.assert_array_equal(info["init_disp_sv_vox"], ref_info["init_disp_sv_vox"])
        np.testing.assert_allclose(info["keypoints_sv_vox"], ref_info["keypoints_sv_vox"] + off_f, atol=1e-6)
        np.testing.assert_allclose(info["disp_sv_vox"], ref_info["disp_sv_vox"] - (off_f - off_m), atol=1e-6)
        if off_f == 0.0 and off_m == 0.0:
            np.testing.assert_array_equal(got, ref)
    assert flow.content_offset(True, 1) == 0.0 and flow.content_offset(True, 3) == 0.0
    assert flow.content_offset(False, 2) == -0.5 and flow.content_offset(False, 1) == 0.0
    with pytest.raises(InputError, match="label_upsample"):
        flow.supervoxel_flow(coarse_f, up_m, label_upsample=(2, 1, 1))
    with pytest.raises(InputError, match="same layers and supervoxel grid"):
        flow.supervoxel_flow(coarse_f, up_m, label_upsample=2)


def test_gram_sampler_equals_the_gather_sampler_and_autograd():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(5, 6, 7, 32, generator=g)  # channels-last (X, Y, Z, C)
    target = torch.rand(40, 32, generator=g, dtype=torch.float64)
    pts = torch.rand(40, 3, generator=g) * torch.tensor([6.0, 7.0, 8.0]) - 0.5  # a few outside the grid
    pts[0] = torch.tensor([4.0, 5.0, 6.0])  # the last voxel
    sampler = flow._GramSampler(feats, target)
    np.testing.assert_allclose(sampler.sample(pts), _read_cl(feats, pts).double(), atol=1e-6)
    mse, grad = sampler(pts)
    p = pts.clone().requires_grad_(True)
    ref = ((_read_cl(feats, p).double() - target) ** 2).mean()
    ref.backward()
    assert abs(float(mse) - float(ref.detach())) < 1e-6 * float(ref.detach())
    torch.testing.assert_close(grad, p.grad.double(), rtol=1e-4, atol=1e-7)
    assert sampler.updated == 40
    sampler(pts + 1e-3)  # no point changes cell ...
    assert sampler.updated == 40 + int((torch.floor(pts.clamp(0) + 1e-3) != torch.floor(pts.clamp(0))).any(1).sum())
    # ... and where the moving features equal the target, the gradient is exactly zero (as the float32 path's)
    same = flow._GramSampler(feats, sampler.sample(pts))
    assert float(same(pts)[1].abs().max()) == 0.0


def test_adam_gram_and_autograd_gradients_give_the_same_flow(pair):
    fixed, moving, _ = pair
    pts, _ = flow.supervoxel_centres(fixed)
    ff, mf = flow.supervoxel_features(fixed), flow.supervoxel_features(moving)
    for kwargs in ({}, {"patience": 10, "tol": 3e-3}):
        a, ia = flow.adam_keypoint_flow(ff, mf, pts, gradient="autograd", **kwargs)
        b, ib = flow.adam_keypoint_flow(ff, mf, pts, **kwargs)
        assert ia["iterations_run"] == ib["iterations_run"] and ib["gram_updates"] > 0
        assert np.abs(a - b).max() < 1e-3, np.abs(a - b).max()  # measured: 1.3e-5
        np.testing.assert_allclose(ib["loss"], ia["loss"], rtol=1e-5)
    with pytest.raises(InputError, match="gradient"):
        flow.adam_keypoint_flow(ff, mf, pts, gradient="numeric")


def test_knn_graph_equals_the_full_distance_matrix():
    rng = np.random.default_rng(4)
    for pts in (torch.from_numpy(rng.uniform(0, 50, (600, 3))).float(),
                torch.from_numpy(rng.integers(0, 4, (300, 3)) * 0.37).float()):  # many ties
        p = pts.double()
        d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        d2.fill_diagonal_(float("inf"))
        ref = torch.topk(d2, 5, dim=1, largest=False, sorted=True).indices
        assert torch.equal(flow.knn_graph(pts, 5), ref)


@pytest.mark.parametrize("step", [1, 3, 5])
def test_tps_grid_evaluation_matches_evaluation_at_points(step):
    rng = np.random.default_rng(step)
    shape = (23, 17, 30)
    pts = torch.from_numpy(rng.uniform(-2, 28, (150, 3)))
    disp = torch.from_numpy(rng.normal(scale=3.0, size=(150, 3)))
    ref = flow.tps_dense_field(pts, disp, shape, lam=5.0, step=step, evaluation="points")
    got = flow.tps_dense_field(pts, disp, shape, lam=5.0, step=step)
    assert got.shape == (3, *shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)  # measured ~1e-5
    assert float((got - ref).abs().max()) > 0 or step == 1  # (the grid path was taken)
    r2 = flow.tps_dense_field(pts, disp, shape, kernel="r2logr", lam=50.0, step=step)  # always at points
    torch.testing.assert_close(r2, flow.tps_dense_field(pts, disp, shape, kernel="r2logr", lam=50.0, step=step,
                                                        evaluation="points"), atol=0, rtol=0)
    with pytest.raises(InputError, match="evaluation"):
        flow.tps_dense_field(pts, disp, shape, evaluation="fft")


def test_predicted_maps_against_the_templates_own_maps_of_the_same_anatomy_give_no_shift(monkeypatch):
    """Atlas mode: a scan's maps on the network's stride-2 grid hold, in coarse voxel q, what the network read at
    supervoxel voxel 2 q. Against the template's own maps of the same anatomy the field must be zero; without the
    content offset (nearest upsampling centres q on 2 q - 1/2) it is biased by half an sv voxel, one fine voxel,
    along every axis."""
    template = voronoi_maps((36, 32, 40), 4, 24, seed=7)
    predicted = template[:, ::2, ::2, ::2]  # what an exact network would output
    opts = dict(init="centres", iterations=40, lam=5.0)
    disp, info = flow.supervoxel_flow(predicted, template, label_upsample=(2, 1), **opts)
    assert info["params"]["content_offset_sv"] == [0.5, 0.0]
    inner = (slice(None), *(slice(12, -12),) * 3)
    bias = np.asarray(disp)[inner].reshape(3, -1).mean(1)
    # ~0.35 fine voxels remain here (with the coarse maps as the 4 mm maps, nearest-upsampled, the flow's mean
    # displacement is 0.65-0.69 sv voxels rather than the geometric 0.5; not explained yet)
    assert np.all(np.abs(bias) < 0.45), bias
    import slicreg.flow.chain as chain

    monkeypatch.setattr(chain, "content_offset", lambda is_labels, factor: 0.0)
    old, _ = flow.supervoxel_flow(predicted, template, label_upsample=(2, 1), **opts)
    old_bias = np.asarray(old)[inner].reshape(3, -1).mean(1)
    assert np.all(old_bias > 1.1), old_bias
