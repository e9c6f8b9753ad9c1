"""Sampling and warping: identity is exact, known shifts are exact, grid_sample agrees."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from slicreg.conventions import identity_grid_vox
from slicreg.errors import InputError
from slicreg.fields import apply_affine_vox, compose, sample, warp_image, warp_labels

SHAPE = (10, 12, 14)


@pytest.fixture
def image():
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32) * 300


@pytest.fixture
def labels():
    return np.random.default_rng(1).integers(0, 14, size=SHAPE).astype(np.uint8)


def test_zero_field_reproduces_input_exactly(image, labels):
    zero = np.zeros((3, *SHAPE), np.float32)
    np.testing.assert_array_equal(warp_image(image, zero), image)
    out = warp_labels(labels, zero)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("shift", [(2, 0, 0), (0, -3, 0), (1, 2, -1)])
def test_integer_shift_is_exact(image, labels, shift):
    u = np.zeros((3, *SHAPE), np.float32)
    for a in range(3):
        u[a] = shift[a]
    warped = warp_labels(labels, u)
    # warped(p) = moving(p + s): compare inside the region where p + s stays on the grid
    sl_out = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, SHAPE))
    sl_in = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, SHAPE))
    np.testing.assert_array_equal(warped[sl_out], labels[sl_in])
    np.testing.assert_array_equal(warp_image(image, u)[sl_out], image[sl_in])
    # outside: labels become background, images continue the border value
    outside = np.ones(SHAPE, bool)
    outside[sl_out] = False
    assert not np.any(warped[outside])
    assert np.all(np.isfinite(warp_image(image, u)))


def test_half_voxel_shift_is_linear_interpolation():
    ramp = np.broadcast_to(np.arange(SHAPE[1], dtype=np.float32)[None, :, None], SHAPE).copy()
    u = np.zeros((3, *SHAPE), np.float32)
    u[1] = 0.5
    out = warp_image(ramp, u)
    np.testing.assert_allclose(out[:, :-1], ramp[:, :-1] + 0.5, atol=1e-6)
    np.testing.assert_allclose(out[:, -1], ramp[:, -1], atol=1e-6)  # border padding clamps


def test_sampler_matches_map_coordinates_and_grid_sample(image):
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 1, size=(3, 200)) * (np.array(SHAPE)[:, None] - 1)
    vol = torch.as_tensor(image, dtype=torch.float64)
    c = torch.as_tensor(coords)
    ours = sample(vol, c, interpolation="linear").numpy()
    np.testing.assert_allclose(ours, ndi.map_coordinates(image.astype(np.float64), coords, order=1), atol=1e-8)
    for align_corners in (True, False):
        gs = sample(vol, c, interpolation="linear", backend="grid_sample", align_corners=align_corners).numpy()
        np.testing.assert_allclose(ours, gs, atol=1e-8)


def test_nearest_matches_map_coordinates_order0(labels):
    rng = np.random.default_rng(4)
    coords = rng.uniform(-0.4, 1, size=(3, 500)) * (np.array(SHAPE)[:, None] - 1)
    coords = coords[:, np.all(np.abs(coords - np.round(coords)) < 0.49, axis=0)]  # avoid exact .5 ties
    ours = sample(torch.as_tensor(labels), torch.as_tensor(coords), interpolation="nearest", padding="zeros").numpy()
    ref = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    np.testing.assert_array_equal(ours, ref)


def test_zeros_padding_outside():
    vol = torch.ones(4, 4, 4)
    c = torch.tensor([[-2.0, 1.0, 5.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(sample(vol, c, interpolation="linear", padding="zeros").numpy(), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(sample(vol, c, interpolation="linear", padding="border").numpy(), [1.0, 1.0, 1.0])


def test_multichannel_and_torch_in_torch_out(image):
    vol = torch.as_tensor(np.stack([image, -image]))
    u = torch.zeros(3, *SHAPE)
    u[0] = 1.0
    out = warp_image(vol, u)
    assert isinstance(out, torch.Tensor) and out.shape == (2, *SHAPE)
    np.testing.assert_array_equal(out[1, :-1].numpy(), -image[1:])


def test_affine_field_and_composition():
    a = np.eye(4)
    a[:3, 3] = [1, 2, 0]
    u = apply_affine_vox(a, SHAPE)
    assert np.allclose(u[0], 1) and np.allclose(u[1], 2) and np.allclose(u[2], 0)
    rng = np.random.default_rng(5)
    ramp = rng.normal(size=SHAPE).astype(np.float32)
    v = np.zeros((3, *SHAPE), np.float32)
    v[2] = -1
    w = compose(u, v)
    np.testing.assert_allclose(w[:, 2:-3, 2:-3, 2:-3], (u + v)[:, 2:-3, 2:-3, 2:-3])
    # warping with the composition equals warping twice (inside, away from the border)
    twice = warp_image(warp_image(ramp, v), u)
    once = warp_image(ramp, w)
    np.testing.assert_allclose(once[:-2, :-3, 1:], twice[:-2, :-3, 1:], atol=1e-5)


def test_bad_field_shape_is_a_clear_error(image):
    with pytest.raises(InputError, match=r"\(3, X, Y, Z\)"):
        warp_image(image, np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(InputError):
        sample(torch.zeros(SHAPE), torch.zeros(3, 4), interpolation="cubic")


def test_identity_grid_plus_field_is_sampling_position():
    g = identity_grid_vox((3, 4, 5))
    assert g.dtype == np.float32 and g[:, 2, 3, 4].tolist() == [2, 3, 4]


def test_fast_warp_agrees_with_the_exact_one():
    rng = np.random.default_rng(4)
    moving = rng.normal(0.0, 300.0, (14, 12, 16)).astype(np.float32)
    u = (rng.normal(0.0, 1.5, (3, 14, 12, 16))).astype(np.float32)  # rough, and reaching past the borders
    exact = warp_image(moving, u)
    fast = warp_image(moving, u, backend="grid_sample")
    assert fast.dtype == exact.dtype and fast.shape == exact.shape
    np.testing.assert_allclose(fast, exact, atol=1e-2)
    assert np.abs(exact - moving).max() > 10  # the field moves things
    # grid_sample's zeros padding blends the border differently ("zero_voxels"): "zeros" is not offered there
    with pytest.raises(InputError, match="grid_sample"):
        warp_image(moving, u, padding="zeros", backend="grid_sample")


# ------------------------------------------------------------------------------ Jacobian and integration
def test_jacobian_numpy_and_torch_agree_and_a_thin_axis_has_no_derivative():
    from slicreg.fields import jacobian_determinant

    disp = np.random.default_rng(3).normal(0, 0.4, size=(3, 9, 8, 7))
    det = jacobian_determinant(disp)
    assert det.dtype == np.float64 and det.shape == (9, 8, 7)
    np.testing.assert_array_equal(jacobian_determinant(torch.from_numpy(disp)).numpy(), det)
    t = torch.from_numpy(disp.astype(np.float32)).requires_grad_(True)
    out = jacobian_determinant(t, chunk=2)  # slabs with halos, differentiable
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().numpy(), det, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    # u_0 = 0.5 x_0 on a one-voxel-thick grid: the thin axis contributes 0, det = 1.5 everywhere
    thin = np.zeros((3, 6, 5, 1))
    thin[0] = 0.5 * np.arange(6.0)[:, None, None]
    np.testing.assert_allclose(jacobian_determinant(thin), 1.5, rtol=1e-12)
    with pytest.raises(InputError, match="jacobian_determinant"):
        jacobian_determinant(np.zeros((2, 4, 4, 4)))


def test_scaling_and_squaring_of_a_rotation_generator():
    """v(x) = W (x - c) with W antisymmetric: exp(v) is the rotation expm(W) about c (all three components
    couple), checked away from the border where the sampler clamps."""
    from scipy.linalg import expm

    from slicreg.fields import scaling_and_squaring

    shape = (28, 28, 28)
    grid = identity_grid_vox(shape, dtype=np.float64)
    c = np.full((3, 1, 1, 1), 13.5)
    w = np.array([[0.0, -0.25, 0.1], [0.25, 0.0, -0.15], [-0.1, 0.15, 0.0]])
    v = np.einsum("ab,b...->a...", w, grid - c).astype(np.float32)
    u = scaling_and_squaring(v, steps=8)
    assert u.dtype == np.float32 and u.shape == v.shape
    exact = np.einsum("ab,b...->a...", expm(w) - np.eye(3), grid - c)
    inner = (slice(None), slice(10, 18), slice(10, 18), slice(10, 18))
    assert np.abs(u[inner] - exact[inner]).max() < 0.02
    assert np.abs(v[inner] - exact[inner]).max() > 0.1  # the plain velocity is not the answer


def test_scaling_and_squaring_is_the_square_of_the_half_flow():
    """exp(v) = exp(v/2) o exp(v/2): the last squaring is a composition (checked with the gather sampler's
    :func:`compose`), the batch form equals the single field, torch in -> torch out."""
    from slicreg.fields import scaling_and_squaring

    rng = np.random.default_rng(5)
    v = ndi.gaussian_filter(rng.normal(0, 20, size=(3, 14, 12, 16)), (0, 2, 2, 2)).astype(np.float32)
    full = scaling_and_squaring(v, steps=6)
    half = scaling_and_squaring(v / 2, steps=5)
    np.testing.assert_allclose(full, compose(half, half), atol=1e-4)
    assert np.abs(full - 2 * half).max() > 0.01  # the composition is not a plain sum here
    batch = scaling_and_squaring(torch.from_numpy(np.stack([v, -v])), steps=6)
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, *v.shape)
    np.testing.assert_array_equal(batch[0].numpy(), full)
    np.testing.assert_array_equal(batch[1].numpy(), scaling_and_squaring(-v, steps=6))
    for bad in (-1, 2.0, True):
        with pytest.raises(InputError, match="steps"):
            scaling_and_squaring(v, steps=bad)
    with pytest.raises(InputError, match="velocity field"):
        scaling_and_squaring(v[:2])
