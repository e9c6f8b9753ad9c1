"""Conventions: the volume type and round trips between every field representation."""

import numpy as np
import pytest
import torch

from slicreg.conventions import (
    Volume,
    disp_mm_to_vox,
    disp_normalised_to_vox,
    disp_vox_to_mm,
    disp_vox_to_normalised,
    displaced_positions,
    downsample_affine,
    from_learn2reg_layout,
    identity_grid_vox,
    normalised_to_vox,
    to_learn2reg_layout,
    vox_to_normalised,
)
from slicreg.errors import InputError

SHAPE = (10, 12, 14)


def oblique_affine():
    a = np.eye(4)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    a[:3, :3] = rotation @ np.array([[0.0, -1.5, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def test_volume_spacing_from_affine_and_shape():
    v = Volume(np.zeros((2, *SHAPE), np.float32), oblique_affine())
    assert v.shape == SHAPE
    assert v.n_channels == 2
    np.testing.assert_allclose(v.spacing_mm, [2.0, 1.5, 3.0], atol=1e-12)


@pytest.mark.parametrize("array, affine", [
    (np.zeros((4, 5)), np.eye(4)),
    (np.zeros((1, 2, 3, 4, 5)), np.eye(4)),
    (np.zeros(SHAPE), np.eye(3)),
    (np.zeros(SHAPE), np.diag([1.0, 0.0, 1.0, 1.0])),
])
def test_volume_rejects_bad_shapes_and_affines(array, affine):
    with pytest.raises(InputError):
        Volume(array, affine)


def test_identity_grid_indexes_axes_in_order():
    g = identity_grid_vox(SHAPE)
    assert g.shape == (3, *SHAPE)
    assert g[0, 3, 4, 5] == 3 and g[1, 3, 4, 5] == 4 and g[2, 3, 4, 5] == 5


@pytest.mark.parametrize("kind", ["numpy32", "numpy64", "torch"])
def test_displaced_positions_are_identity_plus_field(kind):
    # the position each voxel points to, warped(p) = moving(p + u(p)): the same numbers as the identity grid plus u,
    # the input untouched, the type and dtype kept
    u = np.random.default_rng(3).normal(0, 4, size=(3, *SHAPE)).astype(np.float64 if kind == "numpy64" else np.float32)
    before = u.copy()
    given = torch.from_numpy(u) if kind == "torch" else u
    pos = displaced_positions(given)
    assert type(pos) is type(given) and pos.dtype == given.dtype
    pos = pos.numpy() if kind == "torch" else pos
    np.testing.assert_array_equal(pos, identity_grid_vox(SHAPE, dtype=u.dtype) + u)
    np.testing.assert_array_equal(u, before)
    assert pos[0, 3, 4, 5] == 3 + u[0, 3, 4, 5] and pos[2, 3, 4, 5] == 5 + u[2, 3, 4, 5]
    with pytest.raises(InputError, match="disp_vox"):
        displaced_positions(np.zeros((2, *SHAPE), np.float32))


def test_mm_round_trip_and_direction():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    aff = oblique_affine()
    mm = disp_vox_to_mm(u, aff)
    np.testing.assert_allclose(disp_mm_to_vox(mm, aff), u, atol=1e-5)
    # one voxel along axis 0 is the first affine column in world mm
    e0 = np.zeros((3, *SHAPE), np.float32)
    e0[0] = 1
    np.testing.assert_allclose(disp_vox_to_mm(e0, aff)[:, 0, 0, 0], aff[:3, 0], atol=1e-6)


def test_learn2reg_layout_round_trip():
    u = np.random.default_rng(1).normal(size=(3, *SHAPE)).astype(np.float32)
    l2r = to_learn2reg_layout(u)
    assert l2r.shape == (*SHAPE, 3)
    assert l2r[2, 3, 4, 1] == u[1, 2, 3, 4]
    np.testing.assert_array_equal(from_learn2reg_layout(l2r), u)
    with pytest.raises(InputError):
        from_learn2reg_layout(u)


@pytest.mark.parametrize("align_corners", [True, False])
def test_normalised_round_trips(align_corners):
    rng = np.random.default_rng(2)
    coords = rng.uniform(-2, 15, size=(3, *SHAPE))
    grid = vox_to_normalised(coords, SHAPE, align_corners=align_corners)
    assert grid.shape == (*SHAPE, 3)
    np.testing.assert_allclose(normalised_to_vox(grid, SHAPE, align_corners=align_corners), coords, atol=1e-10)
    u = rng.normal(size=(3, *SHAPE))
    un = disp_vox_to_normalised(u, align_corners=align_corners)
    np.testing.assert_allclose(disp_normalised_to_vox(un, align_corners=align_corners), u, atol=1e-10)
    # a displacement is the difference of two positions in either representation
    np.testing.assert_allclose(vox_to_normalised(coords + u, SHAPE, align_corners=align_corners) - grid, un,
                               atol=1e-10)


@pytest.mark.parametrize("align_corners", [True, False])
def test_normalised_coordinates_agree_with_grid_sample(align_corners):
    """A grid built from voxel coordinates makes grid_sample return exactly the voxels it names."""
    vol = torch.arange(np.prod(SHAPE), dtype=torch.float64).reshape(1, 1, *SHAPE)
    coords = torch.as_tensor(identity_grid_vox(SHAPE, dtype=np.float64))
    coords = torch.roll(coords, shifts=1, dims=1)  # sample voxel (i-1, j, k) -- a permutation, all inside
    grid = vox_to_normalised(coords, SHAPE, align_corners=align_corners)[None]
    out = torch.nn.functional.grid_sample(vol, grid, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(out[0, 0].numpy(), torch.roll(vol[0, 0], 1, 0).numpy(), atol=1e-9)
    # the last grid component indexes the first spatial axis
    assert grid[0, 0, 0, 0, 2] != grid[0, 1, 0, 0, 2]


def test_torch_tensors_pass_through():
    coords = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    out = vox_to_normalised(coords, (2, 2, 2), align_corners=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 2, 3)
    assert torch.all(out == -1)


def test_downsample_affine_puts_coarse_voxels_at_block_centres():
    fine = oblique_affine()
    coarse = downsample_affine(fine, 2)
    q = np.array([3, 4, 5, 1.0])
    np.testing.assert_allclose(coarse @ q, fine @ np.array([6.5, 8.5, 10.5, 1.0]))
