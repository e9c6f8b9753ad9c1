"""Field-of-view masks, voxel weights of the similarity measures and initial fields in slicreg.alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slicreg.alignment import register_pair
from slicreg.alignment.engine import fill_outside, mask_box, thin_axes, translation_search
from slicreg.alignment.similarity import (
    SIMILARITIES,
    lncc_loss,
    mi_loss,
    mind_loss,
    mind_ssc,
    mse_loss,
    ncc_loss,
    ngf_loss,
    weighted_mean,
)
from slicreg.errors import InputError
from slicreg.fields import warp_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def _body(shape=(24, 20, 48), seed=0, n_blobs=40, size=1.0) -> np.ndarray:
    """A CT-like phantom in HU: an elliptic soft-tissue cylinder (40 HU) along axis 2 in air (-1000 HU), a
    bright and a dark rod along it, and random bright and dark blobs (``size`` times 2 to 3.5 voxels) inside,
    so that every stretch along axis 2 looks different."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    c = (np.asarray(shape) - 1) / 2
    inside = ((g[0] - c[0]) / (0.42 * shape[0])) ** 2 + ((g[1] - c[1]) / (0.42 * shape[1])) ** 2 < 1
    img = np.where(inside, 40.0, -1000.0)
    # a bright rod off the axis (a spine) and a dark one (a bowel loop) break the symmetry at coarse levels
    img += 500.0 * (((g[0] - c[0]) ** 2 + (g[1] - 1.5 * c[1]) ** 2) < (0.12 * shape[0]) ** 2)
    img -= 100.0 * (((g[0] - 0.6 * c[0]) ** 2 + (g[1] - 0.8 * c[1]) ** 2) < (0.1 * shape[0]) ** 2)
    for _ in range(n_blobs):
        p = rng.uniform([0.3 * shape[0], 0.3 * shape[1], 0], [0.7 * shape[0], 0.7 * shape[1], shape[2]])
        s = size * rng.uniform(2.0, 3.5)
        img += rng.uniform(-300, 400) * np.exp(-((g - p[:, None, None, None]) ** 2).sum(0) / (2 * s * s)) * inside
    return img.astype(np.float32)


def _shift_field(shift, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(shift, np.float32)[:, None, None, None], (3, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------- weighted measures
def _pair(shape=(14, 12, 10), seed=0):
    rng = np.random.default_rng(seed)
    f = rng.random(shape).astype(np.float32)
    w = (0.7 * f + 0.3 * rng.random(shape)).astype(np.float32)
    return _t(f), _t(w)


def _measure(name, f, w, **kw):
    if name == "mind":
        return mind_loss(mind_ssc(f), mind_ssc(w), **kw)
    if name == "mi":
        return mi_loss(f, w, n_samples=None, **kw)
    return SIMILARITIES[name].loss(f, w, **kw)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_a_weight_of_ones_gives_the_unweighted_value_and_scale_does_not_matter(name):
    f, w = _pair()
    plain = _measure(name, f, w)
    ones = _measure(name, f, w, weight=torch.ones_like(f))
    assert torch.allclose(plain, ones, rtol=1e-5, atol=1e-6), (float(plain), float(ones))
    rng = np.random.default_rng(1)
    weight = _t(rng.random(f.shape[2:]))
    assert torch.allclose(_measure(name, f, w, weight=weight), _measure(name, f, w, weight=3.5 * weight),
                          rtol=1e-5, atol=1e-6)
    # a non-uniform weight changes the value (it is used)
    assert not torch.allclose(_measure(name, f, w, weight=weight), plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mse", "ncc", "mi"])
def test_a_box_weight_equals_the_measure_on_the_box(name):
    f, w = _pair()
    box = (slice(None), slice(None), slice(3, 11), slice(2, 9), slice(1, 8))
    weight = torch.zeros_like(f)
    weight[box] = 1.0
    inside = _measure(name, f[box].contiguous(), w[box].contiguous())
    assert torch.allclose(_measure(name, f, w, weight=weight), inside, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,reach", [("lncc", 2), ("ngf", 1), ("mind", 3), ("mse", 0)])
def test_voxels_far_outside_the_weight_do_not_count(name, reach):
    """Neighbourhood measures: changing the images more than their window's reach away from every weighted
    voxel leaves the value unchanged; changing them inside the weight does not."""
    f, w = _pair(shape=(20, 16, 14))
    weight = torch.zeros_like(f)
    weight[:, :, 2:8, 3:12, 4:10] = 1.0
    before = _measure(name, f, w, weight=weight)
    far_f, far_w = f.clone(), w.clone()
    far_f[:, :, 8 + reach + 1:] = 5.0
    far_w[:, :, 8 + reach + 1:] = -3.0
    assert torch.allclose(_measure(name, far_f, far_w, weight=weight), before, rtol=1e-6, atol=1e-7)
    near_w = w.clone()
    near_w[:, :, 4:6, 5:9, 5:8] += 0.5
    assert not torch.allclose(_measure(name, f, near_w, weight=weight), before, rtol=1e-4, atol=1e-6)


def test_weighted_mean_and_weight_checks():
    x = torch.arange(24, dtype=torch.float32).reshape(1, 2, 2, 3, 2)
    wt = torch.zeros(1, 1, 2, 3, 2)
    wt[0, 0, 1, 2, 1] = 2.0
    # channel values at that voxel: 11 and 23 -> mean 17
    assert float(weighted_mean(x, wt)) == pytest.approx(17.0)
    assert float(weighted_mean(x, None)) == pytest.approx(float(x.mean()))
    assert float(weighted_mean(x, torch.zeros_like(wt))) == 0.0  # no overlap: 0, not NaN
    f, w = _pair()
    with pytest.raises(InputError, match="weight"):
        mse_loss(f, w, weight=torch.ones(1, 2, *f.shape[2:]))
    with pytest.raises(InputError, match="weight"):
        ncc_loss(f, w, weight=torch.ones(1, 1, 3, 3, 3))
    for fn in (lncc_loss, ngf_loss, mi_loss):
        with pytest.raises(InputError, match="weight"):
            fn(f, w, weight=torch.ones(f.shape[2:]))


def test_weights_are_differentiable_through_the_images_only():
    f, w = _pair()
    w = w.clone().requires_grad_(True)
    weight = torch.zeros_like(f)
    weight[:, :, :5] = 1.0
    mse_loss(f, w, weight=weight).backward()
    assert torch.all(w.grad[:, :, 5:] == 0) and torch.any(w.grad[:, :, :5] != 0)


# ------------------------------------------------------------------------------------------ helpers
def test_fill_outside_replicates_a_box_and_takes_the_nearest_voxel_otherwise():
    rng = np.random.default_rng(0)
    img = rng.random((6, 5, 7)).astype(np.float32)
    box = np.zeros(img.shape, bool)
    box[1:4, :, 2:5] = True
    out = fill_outside(img, box)
    np.testing.assert_array_equal(out[box], img[box])
    np.testing.assert_array_equal(out[0], out[1])  # replicated from the first row inside
    np.testing.assert_array_equal(out[:, :, 6], img[1:4, :, 4][np.clip(np.arange(6) - 1, 0, 2)])
    # a non-box mask: every outside voxel takes the value of a nearest inside voxel
    blob = np.zeros(img.shape, bool)
    blob[2, 2, 3] = blob[4, 1, 1] = blob[0, 4, 6] = True
    filled = fill_outside(img, blob)
    pts = np.argwhere(blob)
    for p in np.ndindex(img.shape):
        d = ((pts - np.array(p)) ** 2).sum(1)
        assert filled[p] in img[tuple(pts[d == d.min()].T)]
    assert mask_box(box).tolist() == [[1, 0, 2], [3, 4, 4]]


def test_thin_axes_compares_the_shorter_field_of_view_with_the_longer():
    slab = np.array([[0, 0, 20], [23, 19, 27]], float)
    assert thin_axes(slab, None, (24, 20, 48), (24, 20, 48), 0.35) == (False, False, True)
    assert thin_axes(None, slab, (24, 20, 48), (24, 20, 48), 0.35) == (False, False, True)
    assert thin_axes(slab, slab, (24, 20, 48), (24, 20, 48), 0.35) == (False, False, False)
    assert thin_axes(slab, None, (24, 20, 48), (24, 20, 48), 0.0) == (False, False, False)
    assert thin_axes(None, None, (24, 20, 48), (24, 20, 12), 0.35) == (False, False, True)


def test_fft_translation_search_matches_a_direct_evaluation_and_slides_a_slab():
    from slicreg.alignment.engine import fov_translation_search

    shape = (24, 20, 48)
    moving = _body(shape)
    true = np.array([1.0, -1.0, -17.0])  # beyond +-25 % of the grid along axis 2
    fixed = np.full(shape, -1000.0, np.float32)
    fixed[:, :, 20:28] = warp_image(moving, _shift_field(true, shape))[:, :, 20:28]
    mask = np.zeros(shape, bool)
    mask[:, :, 20:28] = True
    norm = lambda a: _t(np.clip((a + 400) / 1000, 0, 1))  # noqa: E731
    f, m = mind_ssc(norm(fill_outside(fixed, mask))), mind_ssc(norm(moving))
    ranges = [(-3, 3), (-3, 3), (-24, 24)]
    shift, score = fov_translation_search(f, m, np.eye(4), ranges, fixed_weight=_t(mask))
    np.testing.assert_array_equal(shift, true)
    assert score < 0.005  # not 0: the slab's filled border slices differ from the scan's real neighbours
    # the score of a candidate is the masked MIND loss of that placement, evaluated directly (voxels that
    # leave the moving grid do not count)
    for cand in ([0, 0, 5], [2, -1, -9]):
        inside = np.ones(shape, bool)
        for a, c in enumerate(cand):
            idx = np.arange(shape[a]) + c
            sl = [None, None, None]
            sl[a] = slice(None)
            inside &= ((idx >= 0) & (idx < shape[a]))[tuple(sl)]
        direct = mind_loss(f, torch.roll(m, shifts=[-c for c in cand], dims=(2, 3, 4)), weight=_t(mask & inside))
        one, s1 = fov_translation_search(f, m, np.eye(4), [(c, c) for c in cand], fixed_weight=_t(mask))
        np.testing.assert_array_equal(one, cand)
        assert s1 == pytest.approx(float(direct), rel=1e-4) and s1 > 5 * score
    # placements that put less than the required share of the slab inside the moving grid are not considered
    none, inf = fov_translation_search(f, m, np.eye(4), [(0, 0), (0, 0), (30, 40)], fixed_weight=_t(mask))
    assert inf == float("inf")
    # the intensity NCC search of the whole grid (no masks) does not find it
    plain, _ = translation_search(norm(fixed), norm(moving), np.eye(4), fraction=0.25)
    assert abs(plain[2] - true[2]) > 4


# ------------------------------------------------------------------------------------------ register_pair
def _small_pair():
    shape = (24, 20, 22)
    fixed = _body(shape, seed=3, n_blobs=12)
    bump = np.zeros((3, *shape), np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    bump[0] = 1.5 * np.exp(-(((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0)) / 50)
    moving = warp_image(fixed, bump)
    return fixed, moving


def test_all_true_masks_reproduce_the_unmasked_result_exactly():
    fixed, moving = _small_pair()
    kw = dict(seed=1, affine={"levels": (2,), "iterations": 15},
              deformable={"levels": (2, 1), "iterations": (15, 15), "grid_spacing": 2, "subsample": (1, 2)})
    a = register_pair(fixed, moving, **kw)
    ones = np.ones(fixed.shape, bool)
    b = register_pair(fixed, moving, fixed_mask=ones, moving_mask=ones.astype(np.uint8), **kw)
    np.testing.assert_array_equal(a.disp_vox, b.disp_vox)
    np.testing.assert_array_equal(a.affine_vox, b.affine_vox)
    assert a.info["final_loss"] == b.info["final_loss"] and "fov" not in b.info


def test_feature_fov_computes_the_features_on_the_fields_of_view_only():
    """``feature_fov``: a deformable level's features cover the fields of view's boxes plus a margin, and read at
    level voxels and positions inside them they are the whole grid's (a textured box: no variance clamp)."""
    import dataclasses

    from slicreg.alignment.engine import FEATURE_MARGIN, PRESETS, _lattice, _Level, _normalise

    shape = (20, 18, 40)
    rng = np.random.default_rng(5)
    f_mask = np.zeros(shape, bool)
    f_mask[:, :, 10:26] = True
    m_mask = np.zeros(shape, bool)
    m_mask[2:, :, 6:30] = True
    images = []
    for mask in (f_mask, m_mask):
        hu = rng.normal(0, 300, shape).astype(np.float32)
        images.append(_normalise(fill_outside(hu, mask), (-400.0, 600.0), "cpu"))
    masks = [_t(m.astype(np.float32)) for m in (f_mask, m_mask)]
    cfg = PRESETS["refine"].stage("deformable")
    whole = _Level(*images, 1, cfg, np.full(3, 2.0), None, *masks)
    cut_cfg = dataclasses.replace(cfg, feature_fov=True)
    cut = _Level(*images, 1, cut_cfg, np.full(3, 2.0), None, *masks)
    assert cut.fixed_origin == (0, 0, 10 - FEATURE_MARGIN) and cut.moving_origin == (0, 0, 6 - FEATURE_MARGIN)
    assert cut.fixed_feat.shape[2:] == (20, 18, 16 + 2 * FEATURE_MARGIN)
    assert cut.moving_feat.shape[2:] == (20, 18, 24 + 2 * FEATURE_MARGIN)
    lattice, _ = _lattice(shape, 2, torch.Generator().manual_seed(0), "cpu", cut.box)
    torch.testing.assert_close(cut.fixed_at(lattice), whole.fixed_at(lattice), atol=1e-5, rtol=1e-5)
    pos = torch.from_numpy(rng.uniform([2, 0, 6], [19, 17, 29], (50, 3)).T.astype(np.float32))[None, :, :, None, None]
    torch.testing.assert_close(cut.moving_features_at(pos), whole.moving_features_at(pos), atol=1e-5, rtol=1e-5)
    # affine stages keep the whole grids (their searches read every voxel)
    affine = _Level(*images, 1, dataclasses.replace(cut_cfg, model="affine"), np.full(3, 2.0), None, *masks)
    assert affine.fixed_origin == affine.moving_origin == (0, 0, 0) and affine.fixed_feat.shape[2:] == shape
    with pytest.raises(InputError, match="without gradients"):
        mind_ssc(images[0].clone().requires_grad_(True))


SLAB_KW = dict(affine={"levels": (2, 1), "iterations": (40, 40)},
               deformable={"levels": (2, 1), "iterations": (20, 20), "grid_spacing": 2, "subsample": (1, 1)})


@pytest.mark.parametrize("tz", [14.0, -13.0])
def test_a_slab_registered_to_a_full_scan_recovers_a_known_translation_only_with_its_mask(tz):
    """Fixed: an 8-slice slab of the moving body, translated by t and padded with air (-1000 HU) to the full
    grid like the preprocessing does. Without the mask the padding counts as content and the map shrinks the
    scan along the slab axis; with it the slab lands where it came from."""
    shape = (24, 20, 48)
    moving = _body(shape)
    t = np.array([1.0, -1.0, tz], np.float32)
    full = warp_image(moving, _shift_field(t, shape))  # full(p) = moving(p + t)
    fixed = np.full(shape, -1000.0, np.float32)
    fixed[:, :, 20:28] = full[:, :, 20:28]
    mask = np.zeros(shape, bool)
    mask[:, :, 20:28] = True
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(20, 28))
    masked = register_pair(fixed, moving, fixed_mask=mask, **SLAB_KW)
    err = np.abs(masked.disp_vox[inner] - t[:, None, None, None]).reshape(3, -1).mean(1)
    assert np.all(err < 0.5), err
    # the thin axis keeps an identity linear part: a translation along it, no collapse
    np.testing.assert_allclose(masked.affine_vox[2, :3], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(masked.affine_vox[:3, 2], [0, 0, 1], atol=1e-6)
    assert masked.info["folding_fraction"] == 0.0
    assert masked.info["fov"]["overlap"] == pytest.approx(1.0)
    plain = register_pair(fixed, moving, **SLAB_KW)
    err_plain = np.abs(plain.disp_vox[inner] - t[:, None, None, None]).reshape(3, -1).mean(1)
    assert err_plain[2] > 2.0, err_plain


def test_a_full_scan_registered_to_a_slab_uses_the_moving_mask():
    shape = (24, 20, 48)
    fixed = _body(shape)
    t = np.array([1.0, -1.0, 14.0], np.float32)
    # moving slab: moving(q) = fixed(q + t) on slices 20..27, air elsewhere; so fixed p maps to p - t
    moved = warp_image(fixed, _shift_field(t, shape))
    moving = np.full(shape, -1000.0, np.float32)
    moving[:, :, 20:28] = moved[:, :, 20:28]
    mask = np.zeros(shape, bool)
    mask[:, :, 20:28] = True
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(34, 42))  # fixed voxels that land in the slab
    res = register_pair(fixed, moving, moving_mask=mask, affine=SLAB_KW["affine"], deformable=None)
    err = np.abs(res.disp_vox[inner] + t[:, None, None, None]).reshape(3, -1).mean(1)
    assert np.all(err < 0.5), err
    assert res.info["fov"]["overlap"] == pytest.approx(8 / 48, abs=0.01)
    plain = register_pair(fixed, moving, affine=SLAB_KW["affine"], deformable=None)
    assert np.abs(plain.disp_vox[inner] + t[:, None, None, None]).reshape(3, -1).mean(1)[2] > 1.0


def test_init_disp_starts_the_deformable_stage_and_skips_the_affine_one():
    shape = (28, 24, 26)
    fixed = _body(shape, seed=2, n_blobs=25)
    true = np.array([3.5, -4.0, 3.0], np.float32)
    moving = warp_image(fixed, -_shift_field(true, shape))  # moving(p + true) = fixed(p)
    kw = dict(deformable={"levels": (1,), "iterations": 25, "grid_spacing": 3, "subsample": 1, "lr": 0.3,
                          "weight": 0.05})
    inner = (slice(None), slice(7, -7), slice(7, -7), slice(7, -7))
    near = _shift_field(true + np.array([0.6, -0.6, 0.5], np.float32), shape)
    res = register_pair(fixed, moving, init_disp=near, **kw)
    assert res.info["skipped_stages"] == ["affine"] and "affine" not in res.info["stages"]
    np.testing.assert_array_equal(res.affine_vox, np.eye(4))
    err = np.abs(res.disp_vox[inner] - true[:, None, None, None]).reshape(3, -1).mean(1)
    assert np.all(err < 0.3), err
    # from zero, with the affine stage dropped too, the same short run does not get there
    cold = register_pair(fixed, moving, affine=None, **kw)
    assert np.abs(cold.disp_vox[inner] - true[:, None, None, None]).reshape(3, -1).mean(1).max() > 1.0
    # an affine-only preset returns the initial field unchanged
    same = register_pair(fixed, moving, init_disp=near, preset="affine")
    np.testing.assert_allclose(same.disp_vox, near, atol=1e-5)


def test_bad_masks_and_initial_fields_are_rejected():
    img = np.zeros((6, 6, 6), np.float32)
    with pytest.raises(InputError, match="fixed_mask.*shape"):
        register_pair(img, img, fixed_mask=np.ones((6, 6, 5), bool))
    with pytest.raises(InputError, match="moving_mask.*no True"):
        register_pair(img, img, moving_mask=np.zeros((6, 6, 6), bool))
    with pytest.raises(InputError, match="fixed_mask.*bool"):
        register_pair(img, img, fixed_mask=np.full((6, 6, 6), 0.5))
    with pytest.raises(InputError, match="init_disp.*shape"):
        register_pair(img, img, init_disp=np.zeros((6, 6, 6, 3), np.float32))
    with pytest.raises(InputError, match="init_disp.*NaN"):
        register_pair(img, img, init_disp=np.full((3, 6, 6, 6), np.nan, np.float32))


# ------------------------------------------------------------------------------------------ command and stage
def _crop_record(shape, z_lo, z_hi):
    from slicreg.geometry import CropRecord

    n = z_hi - z_lo
    return CropRecord(original_shape=(shape[0], shape[1], n), original_affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                      original_axcodes="RAS", spacing_mm=2.0, resampled_shape=(shape[0], shape[1], n),
                      resampled_affine=np.diag([2.0, 2.0, 2.0, 1.0]), crop_start=(0, 0, -z_lo),
                      crop_shape=tuple(shape), affine=np.diag([2.0, 2.0, 2.0, 1.0]) @ _translate((0, 0, -z_lo)),
                      centre_vox=None, padded_vox=((0, 0), (0, 0), (z_lo, shape[2] - z_hi)),
                      dropped_vox=((0, 0), (0, 0), (0, 0)))


def _translate(t):
    m = np.eye(4)
    m[:3, 3] = t
    return m


SLAB = (40, 56)  # the slab's slices in the stage and command tests (run the real preset's 16 and 8 mm levels)


def _write_slab_dataset(root, tz=28.0):
    from slicreg.conventions import Volume
    from slicreg.io import save_volume

    shape = (48, 40, 96)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving = _body(shape, n_blobs=60, size=2.0)
    t = np.array([2.0, -2.0, tz], np.float32)
    full = warp_image(moving, _shift_field(t, shape))
    fixed = np.full(shape, -1000.0, np.float32)
    fixed[:, :, SLAB[0]:SLAB[1]] = full[:, :, SLAB[0]:SLAB[1]]
    (root / "imagesTr").mkdir(parents=True)
    (root / "crops").mkdir()
    save_volume(Volume(fixed.astype(np.int16), affine), root / "imagesTr" / "a_0000.nii.gz")
    save_volume(Volume(moving.astype(np.int16), affine), root / "imagesTr" / "b_0000.nii.gz")
    (root / "crops" / "a.json").write_text(json.dumps(_crop_record(shape, *SLAB).to_json()))
    doc = {"name": "t", "format": "slicreg-dataset/1", "template": "b",
           "subjects": {"a": {"image": "imagesTr/a_0000.nii.gz", "role": "test", "crop": "crops/a.json"},
                        "b": {"image": "imagesTr/b_0000.nii.gz", "role": "template"}},
           "training": [], "test": ["a"], "registration_pairs": [{"fixed": "a", "moving": "b"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    return shape, t


def test_align_pairs_stage_passes_the_crop_records_as_masks(tmp_path):
    from pipelines.runner import StageContext
    from pipelines.stages.align_pairs import align_pairs_stage
    from slicreg.io import load_field, read_json

    data = tmp_path / "data"
    shape, t = _write_slab_dataset(data)
    inner = (slice(None), slice(8, -8), slice(8, -8), slice(*SLAB))
    errors = {}
    for use in (True, False):
        out = tmp_path / f"out_{use}"
        ctx = StageContext("align", {"preset": "affine", "device": "cpu", "pairs": "registration_pairs",
                                     "fov_mask": use}, {"dataset": data}, out, tmp_path, quiet=True)
        align_pairs_stage(ctx)
        record = read_json(out / "runs" / "a_b.json")
        field = load_field(out / "fields" / "disp_a_b.nii.gz").array
        errors[use] = np.abs(field[inner] - t[:, None, None, None]).reshape(3, -1).mean(1)
        if use:
            assert record["fov"]["fixed_box"] == [[0, 0, SLAB[0]], [47, 39, SLAB[1] - 1]]
            assert record["fov"]["moving_box"] is None
            assert any("no crop record for 1 subject(s) (b)" in n for n in ctx.notes)
        else:
            assert record["fov"] is None
        assert read_json(out / "registrations.json")["fov_mask"] is use
    assert np.all(errors[True] < 1.0), errors
    assert errors[False][2] > 4.0, errors


def test_align_command_reads_crop_records_mask_files_and_an_initial_field(tmp_path, capsys):
    from pipelines.cli import main
    from slicreg.conventions import Volume
    from slicreg.io import load_field, read_json, save_field, save_volume

    data = tmp_path / "data"
    shape, t = _write_slab_dataset(data)
    fixed, moving = data / "imagesTr" / "a_0000.nii.gz", data / "imagesTr" / "b_0000.nii.gz"
    common = ["--fixed", str(fixed), "--moving", str(moving), "--preset", "affine", "--quiet", "--threads", "1"]
    rc = main(["align", *common, "--fixed-fov", str(data / "crops" / "a.json"),
               "--out-field", str(tmp_path / "u.nii.gz"), "--out-json", str(tmp_path / "u.json")])
    assert rc == 0 and "field of view: fixed 16.7 %" in capsys.readouterr().out
    inner = (slice(None), slice(8, -8), slice(8, -8), slice(*SLAB))
    u = load_field(tmp_path / "u.nii.gz").array
    assert np.all(np.abs(u[inner] - t[:, None, None, None]).reshape(3, -1).mean(1) < 1.0)
    assert read_json(tmp_path / "u.json")["fov"]["fixed_fraction"] == pytest.approx(16 / 96, abs=1e-4)
    # the same field of view as a mask NIfTI gives the same field
    mask = np.zeros(shape, np.uint8)
    mask[:, :, SLAB[0]:SLAB[1]] = 1
    save_volume(Volume(mask, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "fov.nii.gz")
    assert main(["align", *common, "--fixed-fov", str(tmp_path / "fov.nii.gz"),
                 "--out-field", str(tmp_path / "v.nii.gz")]) == 0
    np.testing.assert_array_equal(load_field(tmp_path / "v.nii.gz").array, u)
    # an initial field with the affine preset comes back unchanged (the affine stage is skipped)
    save_field(u, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "init.nii.gz")
    assert main(["align", *common, "--init-field", str(tmp_path / "init.nii.gz"),
                 "--out-field", str(tmp_path / "w.nii.gz")]) == 0
    np.testing.assert_allclose(load_field(tmp_path / "w.nii.gz").array, u, atol=1e-4)
    # a field of view for another grid is refused before any work
    save_volume(Volume(mask[:, :, :80], np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "bad.nii.gz")
    capsys.readouterr()
    assert main(["align", *common, "--moving-fov", str(tmp_path / "bad.nii.gz"),
                 "--out-field", str(tmp_path / "x.nii.gz")]) == 2
    assert "--moving-fov" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()
