"""The supervoxel stage's initialiser levers (issue 18, item 2): the optional keypoint rejection of
``slicreg.flow.supervoxel_flow`` (off by default), its ``fixed_features`` hook, and the pieces of
benchmarks/bench_init_levers.py that build soft features and test-time augmented maps (tiny synthetic maps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_flow import voronoi_maps  # tests/ is on the path, as for helpers_own_data

from benchmarks import bench_init_levers as bench
from slicreg import flow
from slicreg.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (24, 20, 28)
SHIFT = (2.0, -1.0, 1.0)  # the moving maps are the fixed maps translated by this (sv voxels)




def translated(maps, shift):
    """moving(q) = fixed(q - shift): the fixed -> moving displacement is +shift everywhere (integer shift)."""
    out = np.zeros_like(maps)
    src = tuple(slice(max(0, -int(s)), n - max(0, int(s))) for s, n in zip(shift, maps.shape[1:]))
    dst = tuple(slice(max(0, int(s)), n - max(0, -int(s))) for s, n in zip(shift, maps.shape[1:]))
    out[(slice(None), *dst)] = maps[(slice(None), *src)]
    return out


@pytest.fixture(scope="module")
def pair():
    fixed = voronoi_maps(SHAPE, 8, 30, seed=0)
    return fixed, translated(fixed, SHIFT)


OPTS = dict(keypoints="random", init="centres", iterations=20, lam=10.0, alpha=6.5e-6, n_random=400)


def test_options_off_and_fixed_features_of_the_labels_change_nothing(pair):
    fixed, moving = pair
    ref, ref_info = flow.supervoxel_flow(fixed, moving, **OPTS)
    got, info = flow.supervoxel_flow(fixed, moving, fixed_features=flow.supervoxel_features(fixed), **OPTS)
    np.testing.assert_array_equal(got, ref)
    assert info["rejected"] == {} and ref_info["rejected"] == {}
    with pytest.raises(InputError, match="fixed_features"):
        flow.supervoxel_flow(fixed, moving, fixed_features=np.zeros((3, 4, 5, 6), np.float32), **OPTS)
    with pytest.raises(InputError, match="reject_residual"):
        flow.supervoxel_flow(fixed, moving, reject_residual=1.5, **OPTS)
    with pytest.raises(InputError, match="fixed_confidence"):
        flow.supervoxel_flow(fixed, moving, reject_confidence=0.5, **OPTS)


def test_layer_spread_is_small_for_a_translation_and_large_where_layers_disagree(pair):
    fixed, moving = pair
    # in a box of the moving maps every layer is moved by its own extra offset: the layers then disagree on the
    # displacement of the supervoxels there, and agree (SHIFT) elsewhere
    bad = moving.copy()
    rng = np.random.default_rng(1)
    box = (slice(6, 18), slice(5, 15), slice(7, 21))
    for layer in range(fixed.shape[0]):
        extra = rng.integers(-4, 5, 3)
        bad[layer][box] = translated(fixed[layer: layer + 1], np.add(SHIFT, extra))[0][box]
    pts = torch.from_numpy(flow.foreground_keypoints(fixed, n=400, seed=0))
    cf = flow.supervoxel_centres(torch.from_numpy(fixed))
    spread = flow.layer_spread(torch.from_numpy(fixed), pts, cf, flow.supervoxel_centres(torch.from_numpy(bad)))
    clean = flow.layer_spread(torch.from_numpy(fixed), pts, cf, flow.supervoxel_centres(torch.from_numpy(moving)))
    spread, clean = spread.numpy(), clean.numpy()
    inside = np.ones(len(pts), bool)
    for a, sl in enumerate(box):
        inside &= ((pts[:, a] >= sl.start + 2) & (pts[:, a] < sl.stop - 2)).numpy()
    assert inside.sum() > 10
    assert np.median(clean) < 1.0  # a translation: every layer agrees, up to supervoxels cut at the border
    assert np.median(spread[inside]) > 2.0 * np.median(clean[inside])
    # as a flow option: the keypoints inside the box are rejected far more often
    thr = float(np.quantile(spread, 0.7))
    _, info = flow.supervoxel_flow(fixed, bad, reject_spread=thr, min_keypoints=8, **OPTS)
    kept = {tuple(p) for p in info["keypoints_sv_vox"].tolist()}
    assert info["rejected"]["spread"] == len(pts) - len(kept) == int((spread > thr).sum())
    dropped = np.array([tuple(p) not in kept for p in pts.tolist()])
    assert dropped[inside].mean() > 2.0 * dropped[~inside].mean()


def test_confidence_rejection_keeps_the_confident_keypoints(pair):
    fixed, moving = pair
    conf = np.ones(SHAPE, np.float32)
    conf[: SHAPE[0] // 2] = 0.2  # unsure in the lower half along x
    _, info = flow.supervoxel_flow(fixed, moving, reject_confidence=0.5, fixed_confidence=conf, min_keypoints=8,
                                   **OPTS)
    kept = info["keypoints_sv_vox"]
    assert kept[:, 0].min() >= SHAPE[0] // 2
    pts = flow.foreground_keypoints(fixed, n=400, seed=0)
    assert info["rejected"]["confidence"] == int((pts[:, 0] < SHAPE[0] // 2).sum())
    # probabilities carry their own confidence (mean over the layers of the largest probability)
    probs = np.zeros((fixed.shape[0], flow.N_LABELS, *SHAPE), np.float32)
    np.put_along_axis(probs, fixed[:, None].astype(np.int64), 1.0, axis=1)
    probs[:, :, : SHAPE[0] // 2] = probs[:, :, : SHAPE[0] // 2] * 0.4 + 0.6 / flow.N_LABELS
    _, pinfo = flow.supervoxel_flow(probs, moving, reject_confidence=0.5, min_keypoints=8, **OPTS)
    assert pinfo["rejected"]["confidence"] == info["rejected"]["confidence"]


def test_residual_rejection_drops_the_worst_fraction_before_the_spline(pair):
    fixed, moving = pair
    ref, ref_info = flow.supervoxel_flow(fixed, moving, **OPTS)
    got, info = flow.supervoxel_flow(fixed, moving, reject_residual=0.25, **OPTS)
    n = len(ref_info["keypoints_sv_vox"])
    assert info["rejected"]["residual"] == int(0.25 * n) and len(info["keypoints_sv_vox"]) == n - int(0.25 * n)
    assert info["loss"] == ref_info["loss"]  # the flow itself is unchanged: only the spline sees fewer points
    assert not np.array_equal(got, ref)
    # the kept keypoints are those with the smallest residual
    feats_f, feats_m = flow.supervoxel_features(fixed), flow.supervoxel_features(moving)
    res = flow.keypoint_residuals(torch.from_numpy(feats_f), torch.from_numpy(feats_m),
                                  torch.from_numpy(ref_info["keypoints_sv_vox"]),
                                  torch.from_numpy(ref_info["disp_sv_vox"]), feature_stride=2).numpy()
    kept = {tuple(p) for p in info["keypoints_sv_vox"].tolist()}
    keep = np.array([tuple(p) in kept for p in ref_info["keypoints_sv_vox"].tolist()])
    assert res[keep].max() <= res[~keep].min()


def test_keep_mask_never_keeps_fewer_than_the_minimum():
    scores = torch.tensor([0.1, 5.0, 0.3, float("nan"), 9.0])
    assert flow.keep_mask(scores, 1.0, keep_above=False, min_keep=1).tolist() == [True, False, True, False, False]
    assert flow.keep_mask(scores, 0.0, keep_above=False, min_keep=3).tolist() == [True, True, True, False, False]
    assert flow.keep_mask(scores, 8.0, keep_above=True, min_keep=2).tolist() == [False, True, False, False, True]


# ------------------------------------------------------------------------------------ benchmark pieces
def test_soft_features_of_a_one_hot_equal_the_label_features():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 128, (2, 7, 6, 9)).astype(np.uint8)
    lab[lab > 100] = 0
    order, per = bench.channel_order(2)
    onehot = torch.zeros(lab.size // 2, 2, 128)
    flat = torch.from_numpy(lab.reshape(2, -1).T.astype(np.int64))
    onehot.scatter_(2, flat[..., None], 1.0)
    onehot[..., 0] = 0.0  # the background has no channel
    comp = bench.compress(onehot, order, per)  # (voxels, layers, 16)
    comp = comp.permute(1, 2, 0).reshape(2 * 16, *lab.shape[1:])
    got = bench.soft_features(comp).numpy()
    ref = flow.supervoxel_features(lab, upsample=2)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_onehot_compressed_gives_the_label_features_and_centred_features_upsample_linearly():
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 128, (2, 6, 7, 5)).astype(np.uint8)
    lab[lab > 90] = 0
    comp = bench.onehot_compressed(lab)
    np.testing.assert_allclose(bench.soft_features(comp).numpy(), flow.supervoxel_features(lab, upsample=2),
                               rtol=0, atol=1e-6)
    # centred: sv voxel p takes the coarse maps interpolated linearly at p / 2 (clamped), then the poolings
    x = torch.from_numpy(rng.random((32, 6, 7, 5)).astype(np.float32))
    fine = x
    for axis in (1, 2, 3):
        n = fine.shape[axis]
        pos = np.minimum(np.arange(2 * n) / 2.0, n - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        w = torch.from_numpy((pos - lo).astype(np.float32))
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        fine = (fine.index_select(axis, torch.from_numpy(lo)) * (1 - w.view(shape))
                + fine.index_select(axis, torch.from_numpy(hi)) * w.view(shape))
    ref = flow.box_pool3d(flow.box_pool3d(fine[None], 3, 2), 5, 1)[0]
    np.testing.assert_allclose(bench.centred_features(x).numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_shift_back_undoes_an_integer_shift_and_vote_prefers_the_first_pass():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 9, (2, 6, 5, 7)).astype(np.uint8)
    for s in ((1, 1, 1), (-1, 1, -1)):
        moved = np.stack([bench.shift_input(layer, s) for layer in x])
        back = bench.shift_back(moved, s, np.full_like(x, 255))
        inner = (Ellipsis, *(slice(max(0, -v), n - max(0, v)) for v, n in zip(s, x.shape[1:])))
        np.testing.assert_array_equal(back[inner], x[inner])
        assert (back == 255).sum() == back.size - back[inner].size
    a, b, c = (np.full((1, 2, 2, 2), v, np.uint8) for v in (1, 2, 3))
    voted, agree = bench.vote(np.stack([a, b, c]))
    assert (voted == 1).all() and np.allclose(agree, 1 / 3)
    voted, agree = bench.vote(np.stack([a, b, b]))
    assert (voted == 2).all() and np.allclose(agree, 2 / 3)


def test_lever_names_parse_and_conflicts_are_refused():
    spec = bench.parse_lever("tta3-soft+spread=2+lam=30")
    assert spec["labels"] == "vote3" and spec["features"] == ("comp_tta3", "nearest") and spec["passes"] == 3
    assert spec["flow"] == {"reject_spread": 2.0, "lam": 30.0}
    assert bench.parse_lever("agree5=0.8")["passes"] == 5
    assert bench.parse_lever("shift=-1")["shift"] == -1.0
    with pytest.raises(SystemExit):
        bench.parse_lever("soft+tta3-vote")
    with pytest.raises(SystemExit):
        bench.parse_lever("centred+shift=-1")
    with pytest.raises(SystemExit):
        bench.parse_lever("bogus=1")
