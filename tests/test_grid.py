"""slicreg.grid: the Grid type and the voxel maps between grids -- round trips, the 2q + 0.5 downsampling rule,
agreement with nibabel's affines, and normalised coordinates against torch's grid_sample."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine, rescale_affine, voxel_sizes
from nibabel.orientations import aff2axcodes

from slicreg.conventions import Volume, downsample_affine
from slicreg.errors import InputError
from slicreg.grid import (
    Grid,
    downsample_index_map,
    fov_index_map,
    map_points,
    map_vectors,
    normalised_to_vox,
    spacing_index_map,
    vox_to_normalised,
)


def _oblique_affine():
    """LPS-ish, anisotropic, slightly oblique voxel -> world matrix."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[-c, -s, 0.0], [s, -c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    a[:3, 3] = [120.0, 95.0, -300.0]
    return a


GRID = Grid((10, 12, 8), _oblique_affine())


def test_spacing_direction_and_axcodes_agree_with_nibabel():
    np.testing.assert_allclose(GRID.spacing_mm, voxel_sizes(GRID.affine), rtol=1e-12)
    assert GRID.axcodes == "".join(aff2axcodes(GRID.affine)) == "LPS"
    np.testing.assert_allclose(np.linalg.norm(GRID.direction, axis=0), 1.0, rtol=1e-12)
    img = nib.Nifti1Image(np.zeros((10, 12, 8, 3), np.float32), GRID.affine)
    assert Grid.of(img) == GRID and Grid.of(Volume(np.zeros((2, 10, 12, 8)), GRID.affine)) == GRID
    assert Volume(np.zeros((10, 12, 8)), GRID.affine).grid == GRID


def test_world_round_trip_and_apply_affine():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-2, 12, (3, 5, 4))
    world = GRID.vox_to_world(pts)
    np.testing.assert_allclose(world.reshape(3, -1).T, apply_affine(GRID.affine, pts.reshape(3, -1).T), atol=1e-12)
    np.testing.assert_allclose(GRID.world_to_vox(world), pts, atol=1e-10)
    t = GRID.vox_to_world(torch.from_numpy(pts))  # torch in -> torch out, same values
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), world, atol=1e-10)


def test_downsampling_rule_is_2q_plus_half():
    """The README's rule: the network's 4 mm voxel q is the 2 mm voxel 2 q + 0.5 (block centres)."""
    g2 = Grid((192, 160, 256), np.diag([2.0, 2.0, 2.0, 1.0]))
    g4 = g2.downsample(2)
    assert g4.shape == (96, 80, 128)
    np.testing.assert_allclose(g4.spacing_mm, 4.0)
    q = np.array([[0.0, 5.0, 95.0], [0.0, 7.0, 79.0], [0.0, 3.0, 127.0]])
    np.testing.assert_allclose(map_points(g4.vox_map(g2), q), 2 * q + 0.5, atol=1e-12)
    np.testing.assert_array_equal(g4.affine, downsample_affine(g2.affine, 2))
    np.testing.assert_array_equal(downsample_index_map(3)[:3, 3], [1.0, 1.0, 1.0])  # f q + (f - 1) / 2
    # the block's mean position: average pooling of the fine voxel coordinates gives the coarse ones
    fine = torch.from_numpy(Grid((6, 4, 8)).coords(dtype=np.float64))[None]
    pooled = F.avg_pool3d(fine, 2)[0].numpy()
    coarse = map_points(downsample_index_map(2), Grid((3, 2, 4)).coords(dtype=np.float64))
    np.testing.assert_allclose(pooled, coarse, atol=1e-12)
    # nibabel's slicer keeps voxel 2q (no block centring): ours is that shifted by half a fine voxel, a quarter
    # of a coarse one
    img = nib.Nifti1Image(np.zeros(GRID.shape, np.float32), GRID.affine)
    shift = np.eye(4)
    shift[:3, 3] = 0.25
    np.testing.assert_allclose(GRID.downsample(2).affine, img.slicer[::2, ::2, ::2].affine @ shift, atol=1e-12)
    # odd sizes: floor, blocks from voxel 0
    assert GRID.downsample(3).shape == (3, 4, 2)
    with pytest.raises(InputError, match="factor"):
        GRID.downsample(0)
    with pytest.raises(InputError, match="factor"):
        GRID.downsample(9)


def test_resize_and_spacing_keep_the_field_of_view():
    small = GRID.resize((5, 4, 3))
    for g in (small, GRID.with_spacing(2.0), GRID.with_spacing((1.1, 0.7, 3.3))):
        # the outer faces of the first and last voxel stay where they were (same field of view)
        for a in range(3):
            lo = np.zeros((3, 1))
            lo[a] = -0.5
            hi = np.zeros((3, 1))
            hi[a] = g.shape[a] - 0.5
            old_lo = map_points(g.vox_map(GRID), lo)[a, 0]
            old_hi = map_points(g.vox_map(GRID), hi)[a, 0]
            n_old = GRID.shape[a]
            centre = (old_lo + old_hi) / 2
            np.testing.assert_allclose(centre, (n_old - 1) / 2, atol=1e-9)  # centred on the same midpoint
        np.testing.assert_allclose(g.direction, GRID.direction, atol=1e-12)
    np.testing.assert_allclose(small.spacing_mm, GRID.spacing_mm * np.array([2.0, 3.0, 8 / 3]), rtol=1e-12)
    # resize and with_spacing agree where the shapes divide; fov_index_map is downsampling then
    np.testing.assert_allclose(GRID.resize((5, 6, 4)).affine, GRID.downsample(2).affine, atol=1e-12)
    np.testing.assert_allclose(fov_index_map((5, 6, 4), (10, 12, 8)), downsample_index_map(2), atol=1e-15)
    np.testing.assert_allclose(GRID.with_spacing(GRID.spacing_mm * 2).affine, GRID.downsample(2).affine, atol=1e-12)
    # nibabel's rescale_affine keeps the centre voxel (n - 1) // 2 in place: the same where n and m are odd
    odd = Grid((9, 13, 5), GRID.affine)
    g = odd.with_spacing(2.4)
    assert all(n % 2 == 1 for n in g.shape)
    np.testing.assert_allclose(g.affine, rescale_affine(odd.affine, odd.shape, (2.4, 2.4, 2.4), g.shape), atol=1e-9)
    shape, m = spacing_index_map((10, 12, 8), (1.0, 1.0, 1.0), (3.0, 3.0, 3.0))
    assert shape == (3, 4, 3)
    np.testing.assert_allclose(np.diag(m)[:3], 3.0)
    with pytest.raises(InputError, match="spacing_mm"):
        GRID.with_spacing(-1.0)


def test_crop_and_pad_keep_world_positions():
    crop = GRID.crop((2, -3, 1), (4, 20, 5))
    assert crop.shape == (4, 20, 5)
    p = np.array([[0.0], [0.0], [0.0]])
    np.testing.assert_allclose(map_points(crop.vox_map(GRID), p)[:, 0], [2, -3, 1], atol=1e-12)
    img = nib.Nifti1Image(np.zeros(GRID.shape, np.float32), GRID.affine)
    np.testing.assert_allclose(GRID.crop((2, 3, 1), (4, 5, 5)).affine, img.slicer[2:6, 3:8, 1:6].affine, atol=1e-12)
    with pytest.raises(InputError, match="start"):
        GRID.crop((0.5, 0, 0), (2, 2, 2))


def test_vox_map_round_trip_and_vectors():
    other = Grid((7, 9, 11), np.diag([1.5, -1.2, 2.0, 1.0]) + np.array([[0, 0, 0, 30.0], [0, 0, 0, 80.0],
                                                                            [0, 0, 0, -310.0], [0, 0, 0, 0]]))
    m = GRID.vox_map(other)
    np.testing.assert_allclose(m @ other.vox_map(GRID), np.eye(4), atol=1e-12)
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 8, (3, 6))
    np.testing.assert_allclose(map_points(m, p), other.world_to_vox(GRID.vox_to_world(p)), atol=1e-10)
    # a displacement moves without the translation: (p + d) maps to (m p) + m_lin d
    d = rng.normal(size=(3, 6))
    np.testing.assert_allclose(map_points(m, p + d) - map_points(m, p), map_vectors(m, d), atol=1e-10)
    np.testing.assert_allclose(map_vectors(m, torch.from_numpy(d)).numpy(), map_vectors(m, d), atol=1e-12)


def test_grid_checks_its_input():
    with pytest.raises(InputError, match="Grid.shape"):
        Grid((4, 4))
    with pytest.raises(InputError, match="Grid.affine"):
        Grid((4, 4, 4), np.zeros((4, 4)))
    assert Grid((4, 4, 4)) == Grid((4, 4, 4), np.eye(4)) and hash(Grid((4, 4, 4))) == hash(Grid((4, 4, 4)))
    assert Grid((4, 4, 4)).same_as(Grid((4, 4, 4), np.eye(4) + 1e-6))


# ------------------------------------------------------------------------------------ normalised coordinates
@pytest.mark.parametrize("align_corners", [True, False])
def test_normalised_coordinates_address_the_voxel_in_grid_sample(align_corners):
    """A tiny volume whose value is its flat index: grid_sample at the normalised coordinates of voxel
    positions reads exactly those voxels, with either align_corners."""
    shape = (3, 4, 5)
    g = Grid(shape)
    vol = torch.arange(np.prod(shape), dtype=torch.float64).reshape(1, 1, *shape)
    coords = torch.from_numpy(g.coords(dtype=np.float64))
    grid = g.to_normalised(coords, align_corners=align_corners)[None]
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    torch.testing.assert_close(out, vol, atol=1e-12, rtol=0)
    # a half-voxel position interpolates its two neighbours
    half = torch.tensor([[1.5], [2.0], [3.0]], dtype=torch.float64)
    val = F.grid_sample(vol, g.to_normalised(half, align_corners=align_corners).reshape(1, 1, 1, 1, 3),
                        mode="bilinear", align_corners=align_corners)
    assert abs(float(val) - float(vol[0, 0, 1, 2, 3] + vol[0, 0, 2, 2, 3]) / 2) < 1e-12
    # round trip, and the 4x4 form
    back = g.from_normalised(grid[0], align_corners=align_corners)
    torch.testing.assert_close(back, coords, atol=1e-12, rtol=0)
    n = g.normalised_matrix(align_corners=align_corners)
    np.testing.assert_allclose(map_points(n, coords.numpy()), np.moveaxis(grid[0].numpy(), -1, 0), atol=1e-12)


def test_normalised_matrix_turns_affine_grid_theta_into_a_voxel_map():
    """theta of F.affine_grid (normalised output -> normalised input) and the voxel map
    inv(N_in) @ theta @ N_out describe the same resampling."""
    shape_in, shape_out = (6, 5, 7), (4, 6, 5)
    theta = torch.tensor([[[0.9, 0.1, 0.0, 0.05], [-0.1, 1.1, 0.05, -0.1], [0.02, 0.0, 0.95, 0.1]]],
                         dtype=torch.float64)
    for ac in (True, False):
        grid = F.affine_grid(theta, [1, 1, *shape_out], align_corners=ac)[0]  # (X', Y', Z', 3) normalised
        t4 = np.vstack([theta[0].numpy(), [0, 0, 0, 1]])
        m = np.linalg.inv(Grid(shape_in).normalised_matrix(align_corners=ac)) @ t4 @ Grid(shape_out).normalised_matrix(
            align_corners=ac)
        vox = map_points(m, Grid(shape_out).coords(dtype=np.float64))
        np.testing.assert_allclose(normalised_to_vox(grid.numpy(), shape_in, align_corners=ac), vox, atol=1e-12)
        np.testing.assert_allclose(vox_to_normalised(vox, shape_in, align_corners=ac), grid.numpy(), atol=1e-12)
