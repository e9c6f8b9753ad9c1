"""Metrics pinned against hand-computed answers and independent computations (tiny volumes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import correlate, map_coordinates
from scipy.spatial.distance import cdist

from slicreg import metrics as M
from slicreg.errors import InputError
from slicreg.fields import warp_labels
from slicreg.labels import LARGE_ORGANS


def box(shape, lo, hi, value=1, dtype=np.uint8, into=None):
    out = np.zeros(shape, dtype=dtype) if into is None else into
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return out


# ------------------------------------------------------------------------------------------------- Dice
def test_dice_two_cubes_known_overlap():
    # two 4x4x4 cubes overlapping in a 2x4x4 slab: |A| = |B| = 64, |A & B| = 32 -> Dice 0.5
    a = box((12, 10, 10), (2, 2, 2), (6, 6, 6))
    b = box((12, 10, 10), (4, 2, 2), (8, 6, 6))
    assert M.dice(a, b, labels=[1], absent="zero")[0] == pytest.approx(0.5)
    assert M.dice(a, b, labels=[1], absent="learn2reg", moving=b)[0] == pytest.approx(0.5)
    counts = M.overlap_counts(a, b, labels=[1])
    assert counts.tolist() == [[64, 64, 32]]
    # unequal sizes: A 64 voxels, B = 2x2x2 inside A -> 2*8 / 72
    c = box((12, 10, 10), (3, 3, 3), (5, 5, 5))
    assert M.dice(a, c, labels=[1], absent="zero")[0] == pytest.approx(16 / 72)


def test_dice_absent_labels_both_definitions():
    shape = (10, 10, 10)
    fixed = box(shape, (1, 1, 1), (4, 4, 4), 1)
    box(shape, (5, 5, 5), (8, 8, 8), 2, into=fixed)          # label 2 only in fixed
    moving = box(shape, (1, 1, 1), (4, 4, 4), 1)
    box(shape, (6, 1, 1), (9, 3, 3), 3, into=moving)          # label 3 only in moving
    box(shape, (1, 6, 6), (2, 7, 7), 5, into=moving)          # label 5 in moving, fixed has none
    warped = moving.copy()
    labels = [1, 2, 3, 4, 5]
    l2r = M.dice(fixed, warped, labels=labels, absent="learn2reg", moving=moving)
    ref = M.dice(fixed, warped, labels=labels, absent="zero")
    assert l2r[0] == 1.0 and ref[0] == 1.0
    assert np.isnan(l2r[1:]).all()                            # 2: not in moving, 3/5: not in fixed, 4: nowhere
    assert ref[1:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert M.mean_learn2reg(l2r) == 1.0                       # nan-mean over label 1 only
    assert M.mean_reference(ref) == pytest.approx(0.2)        # 1/5: absent labels still averaged
    # "nan": undefined only where absent from both maps compared (fixed and warped): 2, 3, 5 score 0, 4 is NaN
    nan_rule = M.dice(fixed, warped, labels=labels, absent="nan")
    assert nan_rule[[0, 1, 2, 4]].tolist() == [1.0, 0.0, 0.0, 0.0] and np.isnan(nan_rule[3])


def test_dice_mask_and_bad_rules():
    shape = (10, 10, 10)
    fixed = box(shape, (1, 1, 1), (5, 5, 5), 1)               # 4^3 = 64
    warped = box(shape, (3, 1, 1), (7, 5, 5), 1)              # overlap 2x4x4 = 32 -> 0.5
    assert M.dice(fixed, warped, labels=[1], absent="nan")[0] == pytest.approx(0.5)
    inside = np.zeros(shape, bool)
    inside[:5] = True                                         # keeps all of fixed, half of warped: 2*32 / 96
    assert M.dice(fixed, warped, labels=[1], absent="nan", mask=inside)[0] == pytest.approx(64 / 96)
    with pytest.raises(InputError, match="needs the unwarped moving"):
        M.dice(fixed, warped, labels=[1], absent="learn2reg")
    with pytest.raises(InputError, match="absent must be one of"):
        M.dice(fixed, warped, labels=[1], absent="skip")
    with pytest.raises(InputError, match="mask: shape"):
        M.dice(fixed, warped, labels=[1], absent="zero", mask=inside[:5])


def test_dice_label_lost_by_warp_is_zero_not_nan_in_learn2reg():
    shape = (8, 8, 8)
    fixed = box(shape, (2, 2, 2), (5, 5, 5), 4)
    moving = box(shape, (2, 2, 2), (5, 5, 5), 4)
    warped = np.zeros(shape, np.uint8)                        # the warp pushed label 4 out of the grid
    assert M.dice(fixed, warped, labels=[4], absent="learn2reg", moving=moving).tolist() == [0.0]
    assert M.hd95_learn2reg(fixed, moving, warped, labels=[4]).tolist() == [math.inf]


def test_dice_empty_and_single_voxel_labels():
    shape = (6, 7, 8)
    empty = np.zeros(shape, np.uint8)
    assert np.isnan(M.dice(empty, empty, labels=[1], absent="learn2reg", moving=empty)[0])
    assert M.dice(empty, empty, labels=[1], absent="zero")[0] == 0.0
    one = empty.copy()
    one[3, 3, 3] = 7
    other = empty.copy()
    other[3, 3, 4] = 7
    assert M.dice(one, one, labels=[7], absent="zero")[0] == 1.0
    assert M.dice(one, other, labels=[7], absent="zero")[0] == 0.0
    assert M.dice(one, other, labels=[7], absent="learn2reg", moving=other)[0] == 0.0


def test_dice_independent_cross_check_random_labels():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 5, size=(9, 10, 11)).astype(np.uint8)
    w = rng.integers(0, 5, size=(9, 10, 11)).astype(np.uint8)
    got = M.dice(f, w, labels=[1, 2, 3, 4], absent="zero")
    # independent: sets of flat indices
    for n, lab in enumerate([1, 2, 3, 4]):
        sa, sb = set(np.flatnonzero(f == lab)), set(np.flatnonzero(w == lab))
        assert got[n] == pytest.approx(2 * len(sa & sb) / (len(sa) + len(sb)))


def test_group_means_btcv_and_large_organs():
    per = {i: float(i) / 100 for i in range(1, 14)}
    per[5] = math.nan
    g = M.group_means(per, {**M.DEFAULT_GROUPS, "custom": [7, 8]}, nan_mean=True)
    assert g["large4"] == pytest.approx((1 + 2 + 3 + 6) / 400)
    assert g["all13"] == pytest.approx((sum(range(1, 14)) - 5) / 100 / 12)
    assert g["custom"] == pytest.approx(0.075)
    with pytest.raises(InputError, match="not scored"):
        M.group_means({1: 0.5}, {"large4": LARGE_ORGANS}, nan_mean=False)


def test_bad_label_input_is_an_input_error():
    with pytest.raises(InputError, match="integer label map"):
        M.dice(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), absent="zero")
    with pytest.raises(InputError, match="grids do not match"):
        M.dice(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), absent="zero")


# ------------------------------------------------------------------------------------------------- HD95
def test_hd95_shifted_cube_voxels_and_mm():
    # 6^3 cube shifted by 2 voxels along axis 0. Corner grid: A's surface = lattice points on the boundary of
    # [0, 6]^3 (7^3 - 5^3 = 218), B's of [2, 8] x [0, 6]^2. A->B: face x=0 (49) at 2, ring x=1 (24) at 1,
    # rings x=2..5 (96) at 0, face x=6: its ring (24) at 0, interior 5x5 at min(2, distance to a y/z face)
    # = 16 x 1 and 9 x 2. So 120 x 0, 40 x 1, 58 x 2; the 95 % point (index ceil(0.95 * 218) - 1 = 207) is 2.
    shape = (14, 10, 10)
    a = box(shape, (2, 2, 2), (8, 8, 8)).astype(bool)
    b = box(shape, (4, 2, 2), (10, 8, 8)).astype(bool)
    sd = M.surface_distances(a, b)
    assert sd.distances_ab.size == sd.distances_ba.size == 218
    assert np.bincount(sd.distances_ab.astype(int)).tolist() == [120, 40, 58]
    # surfel areas: 150 face points (1), 60 edge points (sqrt(2)/2), 8 vertices (sqrt(3)/8); the 58 points at
    # distance 2 carry 34 + 20 sqrt(2)/2 + 4 sqrt(3)/8 of 150 + 60 sqrt(2)/2 + sqrt(3): far above 5 %
    assert sd.areas_a.sum() == pytest.approx(150 + 60 * math.sqrt(0.5) + math.sqrt(3))
    assert M.hausdorff(a, b) == 2.0
    # spacing 2 mm along the shift, 1 mm otherwise: the shift is 4 mm and still the 95th percentile
    assert M.hausdorff(a, b, spacing=(2.0, 1.0, 1.0)) == 4.0
    # isotropic 1.5 mm: everything scales
    assert M.hausdorff(a, b, spacing=(1.5, 1.5, 1.5)) == 3.0


def test_hd95_is_robust_to_a_small_outlier_but_hd100_is_not():
    shape = (24, 10, 10)
    a = box(shape, (2, 2, 2), (8, 8, 8)).astype(bool)
    b = a.copy()
    b[20, 5, 5] = True  # 8 far corners of 226 surface points (3.5 %) -> HD95 ignores them
    assert M.hausdorff(a, b) == 0.0
    # nearest surface point of A to corner (20.5, 4.5, 4.5) is (7.5, 4.5, 4.5): 13 voxels
    assert M.hausdorff(a, b, percentile=100) == 13.0


def test_hd95_single_voxel_labels():
    # single voxels offset by (3, 4, 0): corner distances 2x sqrt13, 2x sqrt18, 2x sqrt20, 2x 5 -> HD95 = 5
    a = np.zeros((10, 10, 6), bool)
    b = np.zeros((10, 10, 6), bool)
    a[2, 2, 3] = True
    b[5, 6, 3] = True
    sd = M.surface_distances(a, b)
    np.testing.assert_allclose(sd.distances_ab, np.sqrt([13, 13, 18, 18, 20, 20, 25, 25]))
    np.testing.assert_allclose(sd.areas_a, math.sqrt(3) / 8)  # each corner cell cuts one corner triangle
    assert M.hausdorff(a, b) == pytest.approx(5.0)


def test_hd95_empty_masks():
    e = np.zeros((5, 5, 5), bool)
    a = e.copy()
    a[2, 2, 2] = True
    assert np.isnan(M.hausdorff(e, e))
    assert M.hausdorff(a, e) == math.inf
    assert M.hausdorff(e, a) == math.inf


def test_hd95_independent_brute_force_cross_check():
    rng = np.random.default_rng(3)
    a = np.zeros((12, 11, 10), bool)
    b = np.zeros_like(a)
    a[2:9, 3:8, 2:7] = True
    a[rng.random(a.shape) < 0.05] = True
    b[4:10, 2:9, 3:9] = True
    b[rng.random(a.shape) < 0.05] = True
    spacing = np.array([1.0, 2.0, 0.7])

    def corner_points(mask):
        # independent construction: a corner is on the surface if it is a corner of an inside voxel and of an
        # outside voxel (voxels outside the grid are outside); corners at integer offsets of -0.5
        pad = np.pad(mask, 1)
        inside, outside = set(), set()
        for idx in np.ndindex(pad.shape):
            corners = {(idx[0] + i, idx[1] + j, idx[2] + k) for i in (0, 1) for j in (0, 1) for k in (0, 1)}
            (inside if pad[idx] else outside).update(corners)
        return np.array(sorted(inside & outside), dtype=float) * spacing

    pa, pb = corner_points(a), corner_points(b)
    dist = cdist(pa, pb)
    d_ab, d_ba = np.sort(dist.min(axis=1)), np.sort(dist.min(axis=0))
    got = M.surface_distances(a, b, spacing=spacing)
    np.testing.assert_allclose(got.distances_ab, d_ab, atol=1e-9)
    np.testing.assert_allclose(got.distances_ba, d_ba, atol=1e-9)
    # HD100 needs no weights: the largest brute-force distance
    assert M.hausdorff(a, b, spacing=spacing, percentile=100) == pytest.approx(max(d_ab.max(), d_ba.max()))


def test_area_weighted_percentile_rule():
    # cumulative area fractions 0.5, 0.75, 0.95, 1.0: the 95 % point is distance 2 (3 with equal weights)
    d = np.array([0.0, 1.0, 2.0, 3.0])
    w = np.array([10.0, 5.0, 4.0, 1.0])
    assert M._directed_percentile(d, w, 95.0) == 2.0
    assert M._directed_percentile(d, np.ones(4), 95.0) == 3.0
    assert M._directed_percentile(d, w, 75.0) == 1.0
    assert M._directed_percentile(d, w, 100.0) == 3.0


def test_surfel_area_table_hand_values():
    unit = M._surfel_area_table((1.0, 1.0, 1.0))
    code = {off: 1 << n for n, off in enumerate(M._CELL_OFFSETS)}
    corner = code[(0, 0, 0)]
    edge = code[(0, 0, 0)] | code[(0, 0, 1)]
    face = code[(0, 0, 0)] | code[(0, 0, 1)] | code[(0, 1, 0)] | code[(0, 1, 1)]  # the half with i = 0
    assert unit[0] == unit[255] == 0.0
    assert unit[corner] == pytest.approx(math.sqrt(3) / 8)     # triangle through 3 edge midpoints
    assert unit[edge] == pytest.approx(math.sqrt(0.5))         # 1 x sqrt(0.5) strip
    assert unit[face] == pytest.approx(1.0)                    # the plane i = 0.5
    np.testing.assert_allclose(unit, unit[::-1])               # inside/outside swapped: same surface
    aniso = M._surfel_area_table((2.0, 3.0, 5.0))
    assert aniso[face] == pytest.approx(15.0)                  # plane normal to axis 0: 3 mm x 5 mm
    assert aniso[edge] == pytest.approx(5.0 * math.hypot(1.0, 1.5))  # strip along axis 2


def test_total_surfel_area_of_a_box_anisotropic():
    # marching-cubes surface of an a x b x c voxel box: flat faces, chamfered edges, corner triangles
    a, b, c = 4, 5, 6
    sx, sy, sz = 2.0, 1.0, 3.0
    mask = box((8, 9, 10), (1, 2, 2), (1 + a, 2 + b, 2 + c)).astype(bool)
    total = M.surface_distances(mask, mask, spacing=(sx, sy, sz)).areas_a.sum()
    faces = 2 * ((b - 1) * (c - 1) * sy * sz + (a - 1) * (c - 1) * sx * sz + (a - 1) * (b - 1) * sx * sy)
    edges = 4 * ((a - 1) * sx * math.hypot(sy, sz) + (b - 1) * sy * math.hypot(sx, sz)
                 + (c - 1) * sz * math.hypot(sx, sy)) / 2
    corners = 8 * 0.5 * math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 4
    assert total == pytest.approx(faces + edges + corners)


def test_hd95_learn2reg_nan_for_absent_and_mm_for_anisotropic():
    shape = (14, 10, 10)
    fixed = box(shape, (2, 2, 2), (8, 8, 8), 1)
    moving = box(shape, (4, 2, 2), (10, 8, 8), 1)
    got = M.hd95_learn2reg(fixed, moving, moving, labels=[1, 2])
    assert got[0] == 2.0 and np.isnan(got[1])
    scores = M.score_labels(fixed, moving, moving, labels=[1, 2], spacing_mm=(2.0, 1.0, 1.0))
    assert scores["hd95_vox"][0] == 2.0 and scores["hd95_mm"][0] == 4.0
    assert np.isnan(scores["hd95_mm"][1])
    assert scores["dice_learn2reg"][0] == pytest.approx(2 * 4 * 36 / (2 * 216))
    assert scores["volume_fixed_ml"][0] == pytest.approx(216 * 2 / 1000)
    iso = M.score_labels(fixed, moving, moving, labels=[1], spacing_mm=(1.5, 1.5, 1.5))
    assert iso["hd95_mm"][0] == 3.0


# ---------------------------------------------------------------------------------------------- warping
def test_warp_labels_agrees_with_learn2reg_map_coordinates_except_ties_and_edge_band():
    rng = np.random.default_rng(1)
    shape = (9, 10, 11)
    moving = rng.integers(0, 14, size=shape).astype(np.uint8)
    disp = rng.uniform(-3, 3, size=(3, *shape))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    pos = grid + disp
    # keep away from exact .5 ties, where float rounding decides
    frac = pos - np.floor(pos)
    assert np.abs(frac - 0.5).min() > 1e-6
    expected = map_coordinates(moving, pos, order=0)  # Learn2Reg's warp (mode="constant", cval=0)
    exact = M.warp_labels_learn2reg(moving, disp)
    np.testing.assert_array_equal(exact, expected)
    assert exact.dtype == np.uint8
    # rounding half up in Learn2Reg's warp: position 0.5 takes voxel 1, -0.5 .. 0 is outside
    line = np.arange(1, 6, dtype=np.uint8).reshape(5, 1, 1)
    d = np.zeros((3, 5, 1, 1))
    d[0, :, 0, 0] = [0.5, 0.5, -2.1, 0.4999, 0.6]  # positions 0.5, 1.5, -0.1, 3.4999, 4.6 on a 5-voxel line
    assert M.warp_labels_learn2reg(line, d).ravel().tolist() == [2, 3, 0, 4, 0]
    # plain warp_labels differs only where a position lies within half a voxel outside the grid
    plain = warp_labels(moving, disp)
    band = np.zeros(shape, bool)
    for a in range(3):
        band |= ((pos[a] < 0) & (pos[a] >= -0.5)) | ((pos[a] > shape[a] - 1) & (pos[a] < shape[a] - 0.5))
    assert band.any()
    np.testing.assert_array_equal(plain[~band], expected[~band])


# --------------------------------------------------------------------------------------------- Jacobian
def test_jacobian_linear_field_constant_determinant():
    # u(x) = M x with M upper triangular: J = I + M, det = (1 + 0.5)(1 - 0.2)(1 + 0.1) = 1.32
    shape = (8, 9, 10)
    mat = np.array([[0.5, 0.3, -0.2], [0.0, -0.2, 0.4], [0.0, 0.0, 0.1]])
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    disp = np.einsum("ab,b...->a...", mat, grid)
    det = M.jacobian_determinant(disp)
    np.testing.assert_allclose(det, 1.32, rtol=1e-12)
    stats = M.jacobian_stats(disp)
    assert stats["sdlogj_learn2reg"] == pytest.approx(0.0, abs=1e-12)
    assert stats["std_log_det"] == pytest.approx(0.0, abs=1e-12)
    assert stats["folding_percent"] == 0.0
    assert stats["n_voxels"] == 4 * 5 * 6
    assert stats["det_mean"] == pytest.approx(1.32)


def test_sdlogj_quadratic_field_hand_computed():
    # u_0 = a x0^2 / 2: central differences give exactly a x0, so det = 1 + a x0 on the cropped interior
    a = 0.1
    shape = (12, 6, 7)
    x0 = np.arange(shape[0], dtype=float)
    disp = np.zeros((3, *shape))
    disp[0] = (a * x0 ** 2 / 2)[:, None, None]
    kept = 1 + a * x0[2:-2]                                    # the crop keeps x0 = 2 .. 9
    want = np.std(np.log(kept + 3))
    stats = M.jacobian_stats(disp)
    assert stats["sdlogj_learn2reg"] == pytest.approx(want, rel=1e-12)
    assert stats["std_log_det"] == pytest.approx(np.std(np.log(kept)), rel=1e-12)
    assert stats["det_min"] == pytest.approx(1.2) and stats["det_max"] == pytest.approx(1.9)


def test_folding_field_detected():
    # u_0 = -1.5 min(x0, 5): slope -1.5 -> det -0.5 for x0 <= 4; at x0 = 5 the central difference is -0.75
    shape = (14, 6, 6)
    x0 = np.arange(shape[0], dtype=float)
    disp = np.zeros((3, *shape))
    disp[0] = (-1.5 * np.minimum(x0, 5))[:, None, None]
    det = M.jacobian_determinant(disp)
    assert det[3, 3, 3] == pytest.approx(-0.5) and det[5, 3, 3] == pytest.approx(0.25)
    stats = M.jacobian_stats(disp)
    # interior x0 = 2 .. 11 (10 planes); folded x0 = 2, 3, 4
    assert stats["folding_percent"] == pytest.approx(30.0)
    assert stats["det_min"] == pytest.approx(-0.5)
    # std of log det over det > 0 only: planes 5 (0.25) and 6..11 (1.0)
    assert stats["std_log_det"] == pytest.approx(np.std(np.log([0.25] + [1.0] * 6)))
    # Learn2Reg's clip keeps log(det + 3) finite for the folded voxels
    assert stats["sdlogj_learn2reg"] == pytest.approx(np.std(np.log([2.5] * 3 + [3.25] + [4.0] * 6)))


def test_jacobian_slabs_identical_to_whole_volume():
    rng = np.random.default_rng(4)
    disp = rng.normal(0, 0.5, size=(3, 17, 6, 7))
    whole = M.jacobian_determinant(disp, chunk=1000)
    for chunk in (1, 3, 16):
        np.testing.assert_array_equal(M.jacobian_determinant(disp, chunk=chunk), whole)
    # and the whole-volume value is numpy.gradient's, edges included
    g = [np.gradient(disp[c], axis=(0, 1, 2)) for c in range(3)]
    jac = np.stack([np.stack([g[c][d] + (c == d) for d in range(3)]) for c in range(3)])
    np.testing.assert_allclose(whole, np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))), rtol=1e-10, atol=1e-12)


def test_jacobian_cross_check_with_learn2reg_style_correlation():
    # independent computation: correlate with [-0.5, 0, 0.5] (zero padding), det of the stacked 3x3 matrices
    rng = np.random.default_rng(2)
    shape = (10, 11, 12)
    disp = rng.normal(0, 0.4, size=(3, *shape))
    grads = np.zeros((3, 3, *shape))
    for d in range(3):
        k = np.array([-0.5, 0.0, 0.5]).reshape([3 if i == d else 1 for i in range(3)])
        for c in range(3):
            grads[c, d] = correlate(disp[c], k, mode="constant", cval=0.0)
    jac = grads + np.eye(3).reshape(3, 3, 1, 1, 1)
    det_ref = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))[2:-2, 2:-2, 2:-2]
    det = M.crop_border(M.jacobian_determinant(disp))
    np.testing.assert_allclose(det, det_ref, rtol=1e-10, atol=1e-12)
    want = np.log(np.clip(det_ref + 3, 1e-9, 1e9)).std()
    assert M.jacobian_stats(disp)["sdlogj_learn2reg"] == pytest.approx(want, rel=1e-12)
    assert M.jacobian_stats(disp)["folding_percent"] == pytest.approx(100 * np.mean(det_ref <= 0))


def test_jacobian_stats_mask_and_empty_mask():
    shape = (8, 8, 8)
    disp = np.zeros((3, *shape))
    mask = np.zeros(shape, bool)
    assert M.jacobian_stats(disp, mask=mask)["n_voxels"] == 0
    assert np.isnan(M.jacobian_stats(disp, mask=mask)["sdlogj_learn2reg"])
    mask[3:5, 3:5, 3:5] = True
    assert M.jacobian_stats(disp, mask=mask)["n_voxels"] == 8
    with pytest.raises(InputError, match="displacement field"):
        M.jacobian_stats(np.zeros((2, 8, 8, 8)))


# ------------------------------------------------------------------------------------------ field error
def test_field_error_mm_constant_and_masked():
    shape = (6, 7, 8)
    true = np.zeros((3, *shape))
    true[0] = 1.0
    est = np.zeros((3, *shape))
    e = M.field_error_mm(est, true, spacing=(2.0, 1.0, 1.0))
    assert e["mean_mm"] == e["median_mm"] == e["p95_mm"] == e["max_mm"] == 2.0
    # an affine with a rotation: |A d| keeps the length for an orthonormal direction times spacing
    aff = np.eye(4)
    aff[:3, :3] = [[0, -2.0, 0], [2.0, 0, 0], [0, 0, 2.0]]
    assert M.field_error_mm(est, true, affine=aff)["mean_mm"] == pytest.approx(2.0)
    # error (0, 3, 4) voxels = 5 voxels = 10 mm at 2 mm in the first 2 planes, exact elsewhere
    est2 = true.copy()
    est2[1, :2] += 3
    est2[2, :2] += 4
    mask = np.zeros(shape, bool)
    mask[1:3] = True                                           # half in the wrong region, half right
    e2 = M.field_error_mm(est2, true, spacing=(2, 2, 2), mask=mask)
    assert e2["mean_mm"] == pytest.approx(5.0) and e2["max_mm"] == pytest.approx(10.0)
    assert e2["n_voxels"] == 2 * 7 * 8
    empty = M.field_error_mm(est2, true, mask=np.zeros(shape, bool))
    assert empty["n_voxels"] == 0 and np.isnan(empty["mean_mm"])
    with pytest.raises(InputError, match="does not match"):
        M.field_error_mm(est, np.zeros((3, 6, 7, 9)))


# ------------------------------------------------------------------------------------------ aggregation
def test_aggregate_mean_std_p30():
    agg = M.aggregate([1.0, 2.0, 3.0, 4.0, math.nan])
    assert agg["mean"] == 2.5
    assert agg["std"] == pytest.approx(math.sqrt(1.25))
    assert agg["p30"] == pytest.approx(1.9)                    # position 0.3 * 3 = 0.9 between 1 and 2
    assert agg["n"] == 4 and agg["n_nan"] == 1
    empty = M.aggregate([math.nan])
    assert empty["n"] == 0 and np.isnan(empty["mean"])
    assert M.aggregate([1.0, math.inf])["mean"] == math.inf


def test_torch_inputs_accepted():
    torch = pytest.importorskip("torch")
    a = torch.zeros(6, 6, 6, dtype=torch.uint8)
    a[1:4, 1:4, 1:4] = 1
    assert M.dice(a, a, labels=[1], absent="zero")[0] == 1.0
    assert M.jacobian_stats(torch.zeros(3, 6, 6, 6))["det_mean"] == 1.0
