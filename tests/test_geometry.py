"""Preprocessing geometry: reorientation, resampling, centre-of-mass crop and the maps back (tiny volumes)."""

from __future__ import annotations

import numpy as np
import pytest

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.fields import warp_labels
from slicreg.geometry import (
    AIR_HU,
    CropRecord,
    check_ct_like,
    crop_or_pad,
    crop_start,
    field_to_original_grid,
    field_to_preprocessed_grid,
    preprocess_volume,
    reexpress_field,
    reorient_ras,
    resample_grid,
    resample_isotropic,
    soft_tissue_centre,
    soft_tissue_weight,
    to_original_grid,
)


def world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates (3, X, Y, Z) of every voxel of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.einsum("ab,b...->a...", affine[:3, :3], idx) + affine[:3, 3].reshape(3, 1, 1, 1)


def lps_affine(spacing, origin=(40.0, 30.0, -20.0)) -> np.ndarray:
    """Axis 0 -> left (x decreasing), axis 1 -> posterior, axis 2 -> superior: an LPS-stored scan."""
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def permuted_affine(spacing, origin=(-30.0, 25.0, 10.0)) -> np.ndarray:
    """Axis 0 -> superior, axis 1 -> right, axis 2 -> posterior (a permuted, flipped orientation, 'SRP')."""
    a = np.zeros((4, 4))
    a[2, 0] = spacing[0]
    a[0, 1] = spacing[1]
    a[1, 2] = -spacing[2]
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


def body_phantom(affine, shape, *, centre_mm=(0.0, 0.0, 0.0), radii_mm=(30.0, 22.0, 40.0)):
    """Soft-tissue ellipsoid (40 HU) in air, and a label map with two organs inside it."""
    w = world(affine, shape)
    c = np.asarray(centre_mm).reshape(3, 1, 1, 1)
    r = np.asarray(radii_mm).reshape(3, 1, 1, 1)
    inside = (((w - c) / r) ** 2).sum(0) <= 1
    hu = np.where(inside, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[inside & (w[0] > c[0, 0, 0, 0] + 5)] = 6  # "liver": the right half
    labels[(((w - c - np.array([-12.0, 0, 10]).reshape(3, 1, 1, 1)) / 8.0) ** 2).sum(0) <= 1] = 1
    return hu, labels


def label_centroid_mm(labels: np.ndarray, affine: np.ndarray, k: int) -> np.ndarray:
    idx = np.argwhere(labels == k).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


# ------------------------------------------------------------------------------------------ reorientation
@pytest.mark.parametrize("make_affine", [lps_affine, permuted_affine])
def test_reorient_keeps_every_voxel_at_its_world_position(make_affine):
    rng = np.random.default_rng(0)
    affine = make_affine((1.5, 2.0, 3.0))
    shape = (6, 7, 8)
    vol = Volume(rng.normal(size=shape).astype(np.float32), affine)
    ras = reorient_ras(vol)
    import nibabel as nib

    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
    assert ras.meta["original_axcodes"] == "".join(nib.aff2axcodes(affine))
    assert np.all(np.diag(ras.affine)[:3] > 0)
    # every original voxel is found at the same world point in the reoriented volume
    w = world(affine, shape).reshape(3, -1)
    idx = np.linalg.inv(ras.affine) @ np.vstack([w, np.ones(w.shape[1])])
    idx = np.rint(idx[:3]).astype(int)
    assert np.array_equal(ras.array[idx[0], idx[1], idx[2]], vol.array.reshape(-1))


def test_reorient_multichannel():
    vol = Volume(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5), lps_affine((1, 1, 1)))
    ras = reorient_ras(vol)
    assert ras.array.shape == (2, 3, 4, 5)
    assert np.array_equal(ras.array[1], np.flip(vol.array[1], axis=(0, 1)))


# ---------------------------------------------------------------------------------------------- resampling
def test_resample_grid_keeps_the_field_of_view():
    shape, index_map = resample_grid((10, 10, 4), (0.7, 0.7, 5.0), (2.0, 2.0, 2.0))
    assert shape == (4, 4, 10)  # round(7 / 2), round(20 / 2)
    # first and last voxel faces: old grid spans [-0.5, n - 0.5], new grid [-0.5, m - 0.5]
    lo = index_map[:3, :3] @ np.full(3, -0.5) + index_map[:3, 3]
    hi = index_map[:3, :3] @ (np.asarray(shape) - 0.5) + index_map[:3, 3]
    mid_old = (np.array([10, 10, 4]) - 1) / 2
    assert np.allclose((lo + hi) / 2, mid_old)  # same centre
    assert np.allclose(hi - lo, np.asarray(shape) * 2.0 / np.array([0.7, 0.7, 5.0]))


@pytest.mark.parametrize("antialias", [False, True])
def test_resample_anisotropic_linear_image_is_exact_inside(antialias):
    # an image that is a linear function of world position is reproduced exactly by trilinear interpolation
    # (and by Gaussian smoothing) away from the borders: this checks the new affine, not only the values
    affine = lps_affine((0.7, 0.7, 5.0))
    shape = (40, 36, 8)
    w = world(affine, shape)
    f = lambda x: 2.0 * x[0] - 1.5 * x[1] + 0.8 * x[2]  # noqa: E731
    vol = Volume(f(w).astype(np.float32), affine)
    out = resample_isotropic(reorient_ras(vol), spacing_mm=2.0, antialias=antialias)
    assert np.allclose(out.spacing_mm, 2.0)
    expected = f(world(out.affine, out.shape))
    inner = (slice(3, -3), slice(3, -3), slice(2, -2))
    assert np.allclose(out.array[inner], expected[inner], atol=1e-3)


def test_resample_labels_nearest_keeps_ids_and_volume():
    affine = np.diag([0.8, 0.8, 4.0, 1.0])
    labels = np.zeros((50, 50, 10), np.uint8)
    labels[10:40, 5:25, 2:8] = 3
    labels[12:20, 30:45, 4:6] = 11
    out = resample_isotropic(Volume(labels, affine), spacing_mm=2.0, labels=True)
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, 3, 11}
    vol_in = (labels == 3).sum() * 0.8 * 0.8 * 4.0
    vol_out = (out.array == 3).sum() * 8.0
    assert abs(vol_out - vol_in) / vol_in < 0.15
    assert np.allclose(label_centroid_mm(out.array, out.affine, 3), label_centroid_mm(labels, affine, 3), atol=1.0)


def test_resample_rejects_float_labels():
    with pytest.raises(InputError, match="integers"):
        resample_isotropic(Volume(np.zeros((4, 4, 4), np.float32), np.diag([1, 1, 3, 1.0])), labels=True)


# ------------------------------------------------------------------------------------------ centre and crop
def test_soft_tissue_weight_values():
    w = soft_tissue_weight(np.array([-1000.0, 0.0, 125.0, 250.0, 1000.0]))
    assert w[0] < 1e-6 and w[-1] < 1e-6
    assert np.isclose(w[2], 1 / (1 + np.exp(-10)))
    assert np.isclose(w[1], 0.5) and np.isclose(w[3], 0.5)


def test_soft_tissue_centre_of_a_block_and_erosion():
    hu = np.full((20, 20, 20), -1000.0, np.float32)
    hu[4:10, 6:14, 8:18] = 100.0
    assert np.allclose(soft_tissue_centre(hu), [6.5, 9.5, 12.5])
    # a one-voxel rim of soft tissue far away is removed by the 3x3x3 erosion
    hu[19, :, :] = 100.0
    assert np.allclose(soft_tissue_centre(hu, erode=True), [6.5, 9.5, 12.5], atol=1e-3)
    assert not np.allclose(soft_tissue_centre(hu, erode=False), [6.5, 9.5, 12.5], atol=0.5)
    assert soft_tissue_centre(np.full((5, 5, 5), -1000.0)) is None


def test_crop_start_centres_and_keeps_short_axes_whole():
    # long axis: centred on the point (window middle start + (S - 1) / 2 at the nearest voxel)
    assert crop_start((100, 100, 100), (49.8, 30.2, 80.0), (20, 20, 20)) == (40, 21, 71)  # ties round up
    assert crop_start((100, 100, 100), (50.0, 50.0, 50.0), (21, 21, 21)) == (40, 40, 40)
    # a short axis (10 <= 20) is kept whole even when the centre sits at its edge
    start = crop_start((10, 100, 100), (9.0, 50.0, 50.0), (20, 20, 20))
    assert -10 <= start[0] <= 0


def test_crop_or_pad_values_and_affine():
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out = crop_or_pad(Volume(arr, affine), (-2, 1, 3), (8, 3, 5), fill=-1000)
    assert out.array.shape == (8, 3, 5)
    assert np.array_equal(out.array[2:6, :, 0:3], arr[:, 1:4, 3:6])
    assert np.all(out.array[:2] == -1000) and np.all(out.array[6:] == -1000) and np.all(out.array[:, :, 3:] == -1000)
    # voxel p of the crop is voxel p + start of the input, at the same world position
    assert np.allclose(out.affine @ [0, 0, 0, 1], affine @ [-2, 1, 3, 1])


# ----------------------------------------------------------------------------------- whole preprocessing
SMALL = (24, 20, 28)  # a small crop at 4 mm keeps the tests fast; the defaults are 192x160x256 at 2 mm


@pytest.mark.parametrize("make_affine,spacing", [(lps_affine, (1.4, 1.4, 5.0)), (permuted_affine, (3.0, 1.2, 2.0))])
def test_preprocess_world_points_map_back(make_affine, spacing):
    shape = (64, 60, 24) if make_affine is lps_affine else (40, 70, 50)
    affine = make_affine(spacing)
    hu, labels = body_phantom(affine, shape, centre_mm=tuple(affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3]))
    out = preprocess_volume(Volume(hu, affine), Volume(labels, affine), spacing_mm=4.0, crop_shape=SMALL)
    rec = out.record
    assert out.image.shape == SMALL and out.image.array.dtype == np.int16
    assert np.allclose(out.image.spacing_mm, 4.0)
    import nibabel as nib

    assert "".join(nib.aff2axcodes(out.image.affine)) == "RAS"
    # bookkeeping: the preprocessed affine is the original affine composed with the index map
    assert np.allclose(rec.original_affine @ rec.prep_to_original_vox(), rec.affine)
    assert np.allclose(rec.affine, out.image.affine) and np.allclose(out.labels.affine, rec.affine)
    # organs stay at the same world position (to a fraction of a voxel)
    for k in (1, 6):
        assert np.allclose(label_centroid_mm(out.labels.array, rec.affine, k),
                           label_centroid_mm(labels, affine, k), atol=1.5)
    # the crop is centred on the soft tissue: the body centre is near the middle of the crop
    body_mm = label_centroid_mm((hu > 0).astype(np.uint8), affine, 1)
    mid = rec.affine @ np.append((np.array(SMALL) - 1) / 2, 1)
    assert np.all(np.abs(mid[:3] - body_mm) <= 4.0)
    # mapping back to the original grid reproduces the labels
    back = to_original_grid(out.labels, rec, labels=True)
    assert back.shape == shape and np.allclose(back.affine, affine)
    for k, least in ((6, 0.85), (1, 0.6)):  # organ 1 is a sphere of radius 8 mm: 4 mm voxels blur it
        a, b = labels == k, back.array == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > least


def test_preprocess_linear_image_through_the_whole_chain():
    # a ramp of world position survives reorientation, resampling and cropping at the right place
    affine = permuted_affine((2.5, 1.5, 2.0))
    shape = (30, 40, 36)
    w = world(affine, shape)
    f = lambda x: 15.0 * x[0] - 10.0 * x[1] + 5.0 * x[2]  # noqa: E731  (HU from about -650 to 1300)
    out = preprocess_volume(Volume(f(w).astype(np.float32), affine), spacing_mm=3.0, crop_shape=(20, 20, 20))
    rec = out.record
    expected = f(world(rec.affine, (20, 20, 20)))
    inside = np.ones((20, 20, 20), bool)
    for a, (before, after) in enumerate(rec.padded_vox):
        sl = [slice(None)] * 3
        sl[a] = slice(0, before + 2)
        inside[tuple(sl)] = False
        sl[a] = slice(20 - after - 2, 20)
        inside[tuple(sl)] = False
    assert inside.sum() > 500
    assert np.allclose(out.image.array[inside], expected[inside], atol=0.51)


def test_thin_slab_is_kept_whole_and_padded_with_air():
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    shape = (60, 50, 4)  # a 20 mm slab, much thinner than the crop
    hu, labels = body_phantom(affine, shape, centre_mm=(30.0, 25.0, 8.0), radii_mm=(25.0, 20.0, 60.0))
    out = preprocess_volume(Volume(hu, affine), Volume(labels, affine), spacing_mm=4.0, crop_shape=SMALL)
    rec = out.record
    assert rec.dropped_vox == ((0, 0), (0, 0), (0, 0))
    assert rec.resampled_shape[2] == 5 and sum(rec.padded_vox[2]) == SMALL[2] - 5
    z_lo = rec.padded_vox[2][0]
    assert np.all(out.image.array[:, :, :z_lo] == AIR_HU) and np.all(out.labels.array[:, :, :z_lo] == 0)
    fov = rec.fov_mask()
    assert fov.sum() == np.prod([s - a - b for s, (a, b) in zip(SMALL, rec.padded_vox)])
    assert fov.sum() == 5 * np.prod([min(n, s) for n, s in zip(rec.resampled_shape[:2], SMALL[:2])])
    assert np.all(out.image.array[~fov] == AIR_HU) and np.all(out.labels.array[~fov] == 0)
    assert z_lo > 0 and fov[:, :, z_lo].any() and not fov[:, :, z_lo - 1].any()
    assert (out.labels.array == 6).sum() * 64 == pytest.approx((labels == 6).sum() * 5.0, rel=0.15)


def test_large_field_of_view_records_what_is_cut():
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    shape = (40, 30, 30)
    hu, _ = body_phantom(affine, shape, centre_mm=(60.0, 60.0, 60.0), radii_mm=(50.0, 40.0, 40.0))
    rec = preprocess_volume(Volume(hu, affine), crop_shape=(20, 20, 20), spacing_mm=4.0).record
    assert sum(rec.dropped_vox[0]) == 20 and sum(rec.dropped_vox[1]) == 10
    assert all(a + b == 0 for a, b in rec.padded_vox[:2])


def test_record_json_roundtrip_and_bad_record():
    affine = lps_affine((2.0, 2.0, 3.0))
    hu, labels = body_phantom(affine, (30, 30, 20), centre_mm=(10.0, 0.0, 10.0))
    rec = preprocess_volume(Volume(hu, affine), spacing_mm=4.0, crop_shape=SMALL).record
    again = CropRecord.from_json(rec.to_json())
    assert again.to_json() == rec.to_json()
    assert np.array_equal(again.affine, rec.affine) and again.crop_start == rec.crop_start
    assert np.allclose(again.centre_mm, rec.centre_mm)
    bad = rec.to_json()
    bad["affine"] = [[1, 0], [0, 1]]
    with pytest.raises(InputError, match="affine"):
        CropRecord.from_json(bad)
    with pytest.raises(InputError, match="format"):
        CropRecord.from_json({"format": "other"})


# ------------------------------------------------------------------------------------------------ bad input
def test_rejects_non_ct_input_unless_forced():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, size=(10, 12, 14)).astype(np.float32)
    with pytest.raises(InputError, match="0..255"):
        preprocess_volume(Volume(photo, affine), crop_shape=(8, 8, 8))
    shifted = rng.integers(0, 1500, size=(10, 12, 14)).astype(np.float32)  # CT stored with +1024, no intercept
    with pytest.raises(InputError, match="-500"):
        check_ct_like(shifted, name="scan.nii.gz")
    with pytest.raises(InputError, match="same value"):
        check_ct_like(np.zeros((3, 3, 3)))
    assert "0..255" in check_ct_like(photo, force=True)
    out = preprocess_volume(Volume(photo, affine), crop_shape=(8, 8, 8), force=True)
    assert out.record.ct_check is not None and out.image.shape == (8, 8, 8)


def test_rejects_labels_on_another_grid_and_no_soft_tissue():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    hu, labels = body_phantom(affine, (20, 20, 20), centre_mm=(20.0, 20.0, 20.0), radii_mm=(12.0, 12.0, 12.0))
    with pytest.raises(InputError, match="grid"):
        preprocess_volume(Volume(hu, affine), Volume(labels[:, :, :19], affine[:]), crop_shape=(8, 8, 8))
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(InputError, match="grid"):
        preprocess_volume(Volume(hu, affine), Volume(labels, shifted), crop_shape=(8, 8, 8))
    bone = np.where(hu > 0, 1200.0, -1000.0).astype(np.float32)
    with pytest.raises(InputError, match="soft tissue"):
        preprocess_volume(Volume(bone, affine), crop_shape=(8, 8, 8))


def test_int16_overflow_is_counted_not_silent():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    hu, _ = body_phantom(affine, (20, 20, 20), centre_mm=(20.0, 20.0, 20.0), radii_mm=(12.0, 12.0, 12.0))
    hu[10, 10, 10] = 40000.0
    rec = preprocess_volume(Volume(hu, affine), spacing_mm=2.0, crop_shape=(20, 20, 20)).record
    assert rec.clipped_voxels >= 1


# ---------------------------------------------------------------------------------------- fields between grids
def smooth_field(shape, rng, amplitude):
    from scipy import ndimage

    u = rng.normal(size=(3, *shape))
    u = np.stack([ndimage.gaussian_filter(c, 2.0) for c in u])
    return (amplitude * u / np.abs(u).max()).astype(np.float32)


def blocks(shape, rng):
    labels = np.zeros(shape, np.uint8)
    for k in range(1, 6):
        lo = [rng.integers(1, s - 8) for s in shape]
        size = [rng.integers(4, 8) for _ in shape]
        labels[tuple(slice(a, a + b) for a, b in zip(lo, size))] = k
    return labels


def test_reexpressed_field_commutes_with_preprocessing_exactly():
    """Warping preprocessed moving labels with u' == preprocessing the labels warped with u (2 mm inputs, so the
    preprocessing is only reorientation + crop and the identity holds voxel for voxel)."""
    rng = np.random.default_rng(3)
    f_shape, m_shape = (22, 18, 20), (20, 24, 18)
    f_aff = lps_affine((2.0, 2.0, 2.0), origin=(20.0, 18.0, -10.0))
    m_aff = permuted_affine((2.0, 2.0, 2.0), origin=(-14.0, 20.0, -12.0))
    f_hu, _ = body_phantom(f_aff, f_shape, centre_mm=(0.0, 0.0, 8.0), radii_mm=(16.0, 14.0, 15.0))
    m_hu, _ = body_phantom(m_aff, m_shape, centre_mm=(2.0, 0.0, 6.0), radii_mm=(16.0, 14.0, 15.0))
    m_lab = blocks(m_shape, rng)
    # a field on the fixed grid: the world identity (as moving voxels) plus a smooth deformation
    f_world = np.einsum("ab,b...->a...", f_aff[:3, :3], np.indices(f_shape).astype(np.float64)) + \
        f_aff[:3, 3].reshape(3, 1, 1, 1)
    m_inv = np.linalg.inv(m_aff)
    q_m = np.einsum("ab,b...->a...", m_inv[:3, :3], f_world) + m_inv[:3, 3].reshape(3, 1, 1, 1)
    u = (q_m - np.indices(f_shape) + smooth_field(f_shape, rng, 2.3)).astype(np.float32)
    warped = warp_labels(m_lab, u)  # moving labels on the fixed original grid

    crop = (16, 14, 12)  # smaller than the fixed grid along axis 0 and 1, larger along 2 (cut and padding)
    fixed = preprocess_volume(Volume(f_hu, f_aff), Volume(warped, f_aff), spacing_mm=2.0, crop_shape=crop)
    moving = preprocess_volume(Volume(m_hu, m_aff), Volume(m_lab, m_aff), spacing_mm=2.0, crop_shape=crop)
    u_prep = field_to_preprocessed_grid(u, fixed.record, moving.record)
    assert u_prep.shape == (3, *crop)
    ours = warp_labels(moving.labels.array, u_prep)
    # compare where the preprocessed fixed grid lies inside the original fixed grid (elsewhere u is extrapolated)
    valid = crop_or_pad(reorient_ras(Volume(np.ones(f_shape, np.uint8), f_aff)), fixed.record.crop_start, crop,
                        fill=0).array.astype(bool)
    # ... and where the moving position is inside the preprocessed moving window (warping reads zeros beyond it)
    target = u_prep + np.indices(crop)
    valid &= np.all((target >= 0) & (target <= np.array(crop).reshape(3, 1, 1, 1) - 1), axis=0)
    assert valid.sum() > 0.5 * valid.size and (fixed.labels.array[valid] > 0).sum() > 50
    assert np.array_equal(ours[valid], fixed.labels.array[valid])
    # and back: preprocessed field -> original field reproduces u inside the crop window
    u_back = field_to_original_grid(u_prep, fixed.record, moving.record)
    inside = to_original_grid(valid.astype(np.uint8), fixed.record, labels=True).array.astype(bool)
    assert inside.sum() > 100
    assert np.allclose(u_back[:, inside], u[:, inside], atol=1e-3)


def test_reexpressed_field_with_resampling_keeps_organs_overlapping():
    """Anisotropic originals (resampling with nearest labels): the identity holds up to interpolation."""
    rng = np.random.default_rng(4)
    f_shape, m_shape = (30, 28, 16), (26, 30, 14)
    f_aff = lps_affine((1.3, 1.3, 2.5), origin=(20.0, 18.0, -16.0))
    m_aff = np.diag([1.4, 1.2, 3.0, 1.0])
    m_aff[:3, 3] = (-18.0, -16.0, -17.0)
    f_hu, _ = body_phantom(f_aff, f_shape, centre_mm=(0.0, 0.0, 0.0), radii_mm=(16.0, 14.0, 40.0))
    m_hu, _ = body_phantom(m_aff, m_shape, centre_mm=(0.0, 0.0, 0.0), radii_mm=(16.0, 14.0, 40.0))
    m_lab = np.zeros(m_shape, np.uint8)
    m_lab[3:13, 5:22, 2:12] = 1
    m_lab[14:24, 8:26, 3:11] = 2
    f_world = np.einsum("ab,b...->a...", f_aff[:3, :3], np.indices(f_shape).astype(np.float64)) + \
        f_aff[:3, 3].reshape(3, 1, 1, 1)
    m_inv = np.linalg.inv(m_aff)
    q_m = np.einsum("ab,b...->a...", m_inv[:3, :3], f_world) + m_inv[:3, 3].reshape(3, 1, 1, 1)
    u = (q_m - np.indices(f_shape) + smooth_field(f_shape, rng, 1.5)).astype(np.float32)
    warped = warp_labels(m_lab, u)
    crop = (20, 18, 22)
    fixed = preprocess_volume(Volume(f_hu, f_aff), Volume(warped, f_aff), spacing_mm=2.0, crop_shape=crop)
    moving = preprocess_volume(Volume(m_hu, m_aff), Volume(m_lab, m_aff), spacing_mm=2.0, crop_shape=crop)
    ours = warp_labels(moving.labels.array, field_to_preprocessed_grid(u, fixed.record, moving.record))
    for k in (1, 2):
        a, b = ours == k, fixed.labels.array == k
        assert a.sum() > 20 and 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85


def test_reexpress_field_identity_between_same_grids():
    rng = np.random.default_rng(5)
    aff = lps_affine((2.0, 2.0, 2.0))
    u = smooth_field((8, 9, 10), rng, 1.0)
    same = reexpress_field(u, fixed_affine=aff, moving_affine=aff, new_fixed_affine=aff, new_fixed_shape=(8, 9, 10),
                           new_moving_affine=aff)
    assert np.allclose(same, u, atol=1e-5)
    hu, _ = body_phantom(aff, (8, 9, 10), centre_mm=tuple(aff[:3, :3] @ [4, 4, 5] + aff[:3, 3]), radii_mm=(6, 6, 6))
    rec = preprocess_volume(Volume(hu, aff), crop_shape=(8, 8, 8)).record
    with pytest.raises(InputError, match="original grid"):
        field_to_preprocessed_grid(u[:, :4], rec, rec)
    with pytest.raises(InputError, match="preprocessed"):
        field_to_original_grid(u, rec, rec)
