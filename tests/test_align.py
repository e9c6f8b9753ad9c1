"""Tests of the registration toolkit (slicreg.alignment) on tiny synthetic volumes with analytic answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slicreg.alignment import PRESETS, register_pair, resolve_preset
from slicreg.alignment.engine import downsample, gaussian_smooth
from slicreg.alignment.regularisers import bending_energy, diffusion, total_variation
from slicreg.alignment.similarity import (
    box_filter,
    lncc_loss,
    mi_loss,
    mind_loss,
    mind_ssc,
    mse_loss,
    ncc_loss,
    ngf_loss,
)
from slicreg.alignment.transforms import (
    AffineTransform,
    BSplineDisplacement,
    StationaryVelocity,
    affine_displacement,
    bspline_control_shape,
    bspline_evaluate,
    grid_warp,
    identity_grid,
)
from slicreg.errors import InputError
from slicreg.fields import jacobian_determinant, scaling_and_squaring, warp_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _phantom(shape=(24, 22, 20), centre=None, seed=0) -> np.ndarray:
    """A smooth blob phantom (two Gaussian blobs + a gradient) with texture everywhere."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    c = np.asarray(shape, dtype=np.float64) / 2 if centre is None else np.asarray(centre, dtype=np.float64)
    img = np.exp(-(((grid - c[:, None, None, None]) ** 2).sum(0)) / (2 * 4.0 ** 2))
    c2 = c + np.array([5.0, -4.0, 3.0])
    img += 0.6 * np.exp(-(((grid - c2[:, None, None, None]) ** 2).sum(0)) / (2 * 2.5 ** 2))
    img += 0.02 * rng.standard_normal(shape)
    return img.astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def _shifted(img: np.ndarray, shift: float, axis: int) -> np.ndarray:
    disp = np.zeros((3, *img.shape), np.float32)
    disp[axis] = shift
    return warp_image(img, disp)


# ------------------------------------------------------------------------------------------- similarity
LOSSES = {
    "mse": mse_loss,
    "ncc": ncc_loss,
    "lncc": lncc_loss,
    "ngf": lambda f, w: ngf_loss(f, w, eps=1e-3),
    "mi": lambda f, w: mi_loss(f, w, value_range=(-0.1, 1.7), n_samples=None),
    "mind": lambda f, w: mind_loss(mind_ssc(f), mind_ssc(w)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_similarity_identity_is_the_optimum_along_a_shift(name):
    """For every measure the loss over a 1-D family of shifts of the image is smallest at shift 0."""
    img = _phantom()
    fixed = _t(img)
    shifts = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    values = {s: float(LOSSES[name](fixed, _t(_shifted(img, s, axis=1)))) for s in shifts}
    assert min(values, key=values.get) == 0.0, values
    # and strictly worse further away
    assert values[2.0] > values[0.5] > values[0.0] and values[-2.0] > values[-0.5] > values[0.0]


def test_similarity_analytic_values():
    img = _phantom()
    f = _t(img)
    assert float(mse_loss(f, f)) == 0.0
    assert float(mse_loss(f, f + 0.5)) == pytest.approx(0.25, rel=1e-6)
    # NCC is invariant to positive linear intensity maps and -1 for a negated image
    assert float(ncc_loss(f, 3 * f + 2)) == pytest.approx(0.0, abs=1e-5)
    assert float(ncc_loss(f, -f)) == pytest.approx(2.0, abs=1e-5)
    assert float(lncc_loss(f, 2 * f - 1)) < 0.02
    assert float(mind_loss(mind_ssc(f), mind_ssc(f))) == 0.0
    # MI of an image with itself is its entropy (-loss), and higher than with an independent image
    noise = _t(np.random.default_rng(1).uniform(0, 1, img.shape))
    assert float(mi_loss(f, f, n_samples=None)) < float(mi_loss(f, noise, n_samples=None)) - 0.5


def test_mi_matches_a_hard_histogram_for_narrow_kernels():
    """With a tiny Parzen width the soft histogram is the hard one: MI of two binary images is known."""
    rng = np.random.default_rng(0)
    a = (rng.uniform(size=(10, 12, 14)) > 0.5).astype(np.float32)
    # b equals a: MI = H(a) = ln 2 for a balanced binary image (up to the sample's imbalance)
    p = a.mean()
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    value = -float(mi_loss(_t(a), _t(a), bins=2, sigma=0.05, n_samples=None))
    assert value == pytest.approx(h, abs=1e-4)


def test_box_filter_is_a_box_mean():
    x = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    out = box_filter(x, 1)
    assert float(out[0, 0, 2, 3, 3]) == pytest.approx(float(x[0, 0, 1:4, 2:5, 2:5].mean()), rel=1e-6)
    # a linear ramp is preserved in the interior
    assert torch.allclose(out[0, 0, 1:-1, 1:-1, 1:-1], x[0, 0, 1:-1, 1:-1, 1:-1], atol=1e-4)


def test_mind_matches_the_definition_at_interior_voxels():
    """Direct evaluation of the MIND-SSC formula (12 pair distances, box mean, min/mean normalisation)."""
    img = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 1, 12, 13, 14)).astype(np.float64))
    r, d = 1, 2
    desc = mind_ssc(img, radius=r, dilation=d)
    six = [np.array(o) * d for o in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]]
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6) if ((six[a] - six[b]) ** 2).sum() == 2 * d * d]
    assert len(pairs) == 12
    vol = img[0, 0].numpy()
    # a voxel whose whole neighbourhood is inside the image, so no edge replication is involved
    x = np.array([5, 6, 6])
    dist = []
    for a, b in pairs:
        vals = [(vol[tuple(x + z + six[a])] - vol[tuple(x + z + six[b])]) ** 2
                for z in np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij")).reshape(3, -1).T]
        dist.append(np.mean(vals))
    dist = np.array(dist) - np.min(dist)
    # the variance clamp uses the image-wide mean of V; check the formula up to that (unclamped here)
    expected = np.exp(-dist / dist.mean())
    np.testing.assert_allclose(desc[0, :, 5, 6, 6].numpy(), expected, rtol=1e-6)


def test_mind_descriptor_properties():
    img = _t(_phantom())
    d = mind_ssc(img)
    assert d.shape == (1, 12, *img.shape[2:])
    assert float(d.min()) > 0 and float(d.max()) <= 1.0 + 1e-6
    # invariant to intensity scaling and offset (self-similarity normalised by local variance)
    assert torch.allclose(mind_ssc(5 * img + 3), d, atol=1e-4)


def test_mind_in_channels_last_memory_is_the_same_descriptor(monkeypatch):
    """``channels_last=True`` writes slab by slab (here 5 first-axis voxels per slab: several slabs and a partial
    last one): the same values, in channels-last memory."""
    import slicreg.alignment.similarity as sim

    img = _t(_phantom())
    d = mind_ssc(img)
    assert img.shape[2] % 5 != 0
    monkeypatch.setattr(sim, "_MIND_SLAB_VALUES", 5 * 12 * img.shape[3] * img.shape[4])
    cl = mind_ssc(img, channels_last=True)
    assert cl.shape == d.shape and cl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(cl, d, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- regularisers
def test_regularisers_analytic_values():
    shape = (8, 9, 10)
    grid = identity_grid(shape, dtype=torch.float64)
    const = torch.ones(1, 3, *shape, dtype=torch.float64) * 2.5
    for fn in (diffusion, bending_energy, total_variation):
        assert float(fn(const)) == pytest.approx(0.0, abs=1e-9)
    # u = 0.1 * x along every component: each component has gradient (0.1, 0, 0)
    lin = (0.1 * grid[:, 0:1]).repeat(1, 3, 1, 1, 1)
    assert float(diffusion(lin)) == pytest.approx(3 * 0.01, rel=1e-9)
    assert float(bending_energy(lin)) == pytest.approx(0.0, abs=1e-12)
    assert float(total_variation(lin, eps=1e-9)) == pytest.approx(3 * 0.1, rel=1e-6)
    # spacing: the same field on a grid twice as coarse has half the gradient
    assert float(diffusion(lin, spacing=(2.0, 2.0, 2.0))) == pytest.approx(3 * 0.0025, rel=1e-9)
    # u_0 = 0.05 x^2: second derivative 0.1 -> bending = 0.01 (one component, one axis pair)
    quad = torch.zeros(1, 3, *shape, dtype=torch.float64)
    quad[:, 0] = 0.05 * grid[0, 0] ** 2
    assert float(bending_energy(quad)) == pytest.approx(0.01, rel=1e-9)
    # u_0 = 0.1 x y: mixed derivative 0.1, counted for (x, y) and (y, x)
    mixed = torch.zeros(1, 3, *shape, dtype=torch.float64)
    mixed[:, 0] = 0.1 * grid[0, 0] * grid[0, 1]
    assert float(bending_energy(mixed)) == pytest.approx(2 * 0.01, rel=1e-9)


def test_regularisers_are_minimal_at_zero_and_differentiable():
    u = torch.randn(1, 3, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    for fn in (diffusion, bending_energy, total_variation):
        assert torch.autograd.gradcheck(fn, (u,), eps=1e-6, atol=1e-5)
        assert float(fn(u).detach()) > float(fn(torch.zeros_like(u))) == 0.0


# ------------------------------------------------------------------------------------------- transforms
def test_grid_warp_matches_the_voxel_sampler_for_both_align_corners():
    img = _phantom((9, 10, 11))
    rng = np.random.default_rng(2)
    disp = rng.uniform(-2, 2, (3, 9, 10, 11)).astype(np.float32)
    ref = warp_image(img, disp)
    coords = identity_grid((9, 10, 11)) + torch.from_numpy(disp)[None]
    for ac in (True, False):
        out = grid_warp(_t(img), coords, align_corners=ac)[0, 0].numpy()
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bspline_of_a_constant_control_grid_is_constant():
    shape, spacing = (11, 9, 13), (3, 4, 2)
    ctrl = torch.full((1, 3, *bspline_control_shape(shape, spacing)), 1.75, dtype=torch.float64)
    out = bspline_evaluate(ctrl, shape, spacing)
    assert out.shape == (1, 3, *shape)
    assert torch.allclose(out, torch.full_like(out, 1.75), atol=1e-12)
    model = BSplineDisplacement(shape, spacing=spacing)
    assert float(model().detach().abs().max()) == 0.0  # starts at the identity
    with torch.no_grad():
        model.control.fill_(-0.5)
    assert torch.allclose(model(), torch.full((1, 3, *shape), -0.5), atol=1e-6)
    assert model((5, 4, 6)).shape == (1, 3, 5, 4, 6)


def test_bspline_node_values_and_linear_reproduction():
    """A single control node at q gives beta3(0) = 2/3 per axis at its voxel (q - 1) * s; a linear control grid
    reproduces the same linear function (cubic B-splines reproduce polynomials up to degree 1)."""
    shape, s = (12, 12, 12), 3
    cs = bspline_control_shape(shape, s)
    ctrl = torch.zeros(1, 1, *cs, dtype=torch.float64)
    ctrl[0, 0, 2, 2, 2] = 1.0
    out = bspline_evaluate(ctrl, shape, s)
    assert float(out[0, 0, s, s, s]) == pytest.approx((2 / 3) ** 3, rel=1e-12)
    assert float(out[0, 0, s + 1, s, s]) == pytest.approx((31 / 54) * (2 / 3) ** 2, rel=1e-12)  # beta3(1/3) = 31/54
    q = torch.arange(cs[0], dtype=torch.float64)
    lin = ((q - 1) * s)[:, None, None].expand(cs).clone()[None, None]
    dense = bspline_evaluate(lin, shape, s)
    expected = torch.arange(shape[0], dtype=torch.float64)[:, None, None].expand(shape)
    assert torch.allclose(dense[0, 0], expected, atol=1e-10)


def test_affine_transform_matrix_and_displacement():
    model = AffineTransform((10, 10, 10), (14, 10, 8))
    m = model.matrix().detach().numpy()
    # identity linear part, centre to centre
    np.testing.assert_allclose(m[:3, :3], np.eye(3), atol=0)
    np.testing.assert_allclose(m[:3, 3], [2.0, 0.0, -1.0], atol=1e-6)
    disp = affine_displacement(model.matrix().detach(), (10, 10, 10))
    np.testing.assert_allclose(disp[0, :, 3, 4, 5].numpy(), [2.0, 0.0, -1.0], atol=1e-6)


def test_svf_is_diffeomorphic_on_a_large_smooth_deformation():
    """A smooth velocity whose plain displacement would fold (|grad v| up to ~2) integrates to a map without
    any det J <= 0, and exp(v) of a constant velocity is that translation."""
    shape = (32, 32, 32)
    grid = identity_grid(shape, dtype=torch.float32)[0]
    x = grid / 31 * 2 * np.pi
    v = torch.stack([10 * torch.sin(x[1]) * torch.cos(x[2]), 10 * torch.sin(x[2]) * torch.cos(x[0]),
                     10 * torch.sin(x[0]) * torch.cos(x[1])])[None]
    assert float((jacobian_determinant(v[0]) <= 0).float().mean()) > 0.3  # the plain displacement folds a lot
    u = scaling_and_squaring(v, steps=7)
    assert float(u.abs().max()) > 8  # a large deformation
    det = jacobian_determinant(u[0])
    assert float(det.min()) > 0, float(det.min())
    const = torch.ones(1, 3, 8, 8, 8) * torch.tensor([1.5, -0.5, 2.0]).reshape(1, 3, 1, 1, 1)
    assert torch.allclose(scaling_and_squaring(const), const, atol=1e-5)
    # the model wrapper with a coarser velocity grid still folds nowhere
    model = StationaryVelocity((16, 16, 16), voxel_size=(2.0, 2.0, 2.0), steps=8)
    with torch.no_grad():
        model.velocity.copy_(torch.nn.functional.interpolate(v, size=(16, 16, 16), mode="trilinear",
                                                             align_corners=False))
    assert float(jacobian_determinant(model(shape)[0].detach()).min()) > 0


def test_scaling_and_squaring_voxel_size_units():
    """Values in full-resolution voxels on a grid twice as coarse: a constant velocity is still that translation,
    and a linear velocity v(x) = 0.1 x_0 along axis 0 integrates to exp(0.1) x_0 - x_0 in the interior."""
    const = torch.ones(1, 3, 6, 6, 6) * 3.0
    assert torch.allclose(scaling_and_squaring(const, voxel_size=(2.0, 2.0, 2.0)), const, atol=1e-5)


    for vs in (1.0, 2.0):
        n = 40
        x0 = identity_grid((n, 4, 4))[:, :1] * vs  # coordinate in full-resolution voxels
        v = torch.cat([0.1 * (x0 - x0.mean()), torch.zeros(1, 2, n, 4, 4)], dim=1)
        u = scaling_and_squaring(v, steps=8, voxel_size=(vs, vs, vs))
        expected = (np.exp(0.1) - 1) * (x0 - x0.mean())
        inner = slice(12, n - 12)  # away from the border, where clamping stops the flow
        assert torch.allclose(u[:, :1, inner], expected[:, :, inner], atol=0.02 * vs)


def test_jacobian_determinant_of_an_affine_field():
    a = np.array([[1.1, 0.1, 0.0, 1.0], [0.0, 0.9, 0.2, -2.0], [0.05, 0.0, 1.2, 0.5], [0, 0, 0, 1]])
    disp = affine_displacement(torch.as_tensor(a, dtype=torch.float64), (6, 7, 8))[0].numpy()
    det = jacobian_determinant(disp)
    np.testing.assert_allclose(det, np.linalg.det(a[:3, :3]), rtol=1e-10)


# ------------------------------------------------------------------------------------------- pyramid
def test_gaussian_smooth_and_downsample():
    x = torch.ones(1, 1, 8, 9, 10) * 3.0
    assert torch.allclose(gaussian_smooth(x, 1.5), x, atol=1e-6)
    ramp = identity_grid((16, 12, 20))[:, :1]
    low = downsample(ramp, 2)
    assert low.shape == (1, 1, 8, 6, 10)
    # level voxel q sits at full voxel 2 q + 0.5 (align_corners=False semantics), away from the clamped edge
    assert torch.allclose(low[0, 0, 2:6, :, :], (2 * torch.arange(2, 6, dtype=torch.float32) + 0.5)[:, None, None]
                          .expand(4, 6, 10), atol=1e-4)


# ------------------------------------------------------------------------------------------- engine
def _hu(img: np.ndarray) -> np.ndarray:
    return (img * 1000.0).astype(np.float32)


@pytest.mark.parametrize("model", ["svf", "bspline", "dense"])
def test_known_shift_is_recovered_within_half_a_voxel(model):
    shape = (28, 24, 26)
    fixed = _phantom(shape)
    true_shift = np.array([1.6, -2.3, 1.2])
    disp_true = np.broadcast_to(true_shift[:, None, None, None], (3, *shape)).astype(np.float32)
    # moving(p + shift) = fixed(p): build moving by pulling fixed with -shift
    moving = warp_image(fixed, -disp_true)
    res = register_pair(
        _hu(fixed), _hu(moving), spacing_mm=(2.0, 2.0, 2.0), clip_hu=(0.0, 1000.0), affine=None,
        deformable={"model": model, "similarity": "mse", "levels": (2, 1), "iterations": (60, 60), "lr": 0.3,
                    "weight": 0.05, "grid_spacing": 3, "patience": 0},
    )
    inner = res.disp_vox[:, 6:-6, 6:-6, 6:-6].reshape(3, -1).mean(axis=1)
    assert np.all(np.abs(inner - true_shift) < 0.5), inner


def test_affine_stage_recovers_a_shift_and_the_result_is_deterministic():
    shape = (28, 24, 26)
    fixed = _phantom(shape)
    true_shift = np.array([2.4, -1.7, 1.1], np.float32)
    moving = warp_image(fixed, -np.broadcast_to(true_shift[:, None, None, None], (3, *shape)).astype(np.float32))
    kw = dict(spacing_mm=(2.0, 2.0, 2.0), clip_hu=(0.0, 1000.0), preset="affine",
              affine={"levels": (2, 1), "iterations": (60, 60), "similarity": "ncc", "lr": 0.01, "patience": 0})
    a = register_pair(_hu(fixed), _hu(moving), seed=3, **kw)
    np.testing.assert_allclose(a.affine_vox[:3, 3], true_shift, atol=0.5)
    np.testing.assert_allclose(a.affine_vox[:3, :3], np.eye(3), atol=0.03)
    b = register_pair(_hu(fixed), _hu(moving), seed=3, **kw)
    np.testing.assert_array_equal(a.disp_vox, b.disp_vox)
    assert a.info["iterations"] == 120 and set(a.info["stages"]) >= {"affine"}


def test_lbfgs_recovers_a_shift_and_early_stopping_ends_a_converged_level():
    shape = (28, 24, 26)
    fixed = _phantom(shape)
    true_shift = np.array([2.4, -1.7, 1.1], np.float32)
    moving = warp_image(fixed, -np.broadcast_to(true_shift[:, None, None, None], (3, *shape)).astype(np.float32))
    res = register_pair(_hu(fixed), _hu(moving), clip_hu=(0.0, 1000.0), preset="affine",
                        affine={"levels": (2, 1), "iterations": (20, 20), "optimiser": "lbfgs", "lr": 1.0,
                                "search": 0.0, "patience": 5, "tol": 1e-6})
    np.testing.assert_allclose(res.disp_vox[:, 14, 12, 13], true_shift, atol=0.5)
    assert res.info["iterations"] < 40  # the full-resolution level stopped early once converged
    same = register_pair(_hu(fixed), _hu(fixed), clip_hu=(0.0, 1000.0), preset="affine",
                         affine={"levels": (1,), "iterations": 50, "patience": 4, "tol": 1e-3, "search": 0.0})
    assert same.info["iterations"] < 50


def test_register_pair_default_preset_on_a_small_pair_is_deterministic_and_fold_free():
    shape = (24, 20, 22)
    fixed = _phantom(shape)
    rng = np.random.default_rng(5)
    bump = np.zeros((3, *shape), np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    bump[0] = 1.5 * np.exp(-(((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0)) / 50)
    moving = warp_image(fixed, bump) + 0.01 * rng.standard_normal(shape).astype(np.float32)
    kw = dict(clip_hu=(0.0, 1000.0), seed=1, affine={"levels": (2,), "iterations": 20},
              deformable={"levels": (2, 1), "iterations": (30, 30), "grid_spacing": 2, "subsample": (1, 2)})
    a = register_pair(_hu(fixed), _hu(moving), **kw)
    b = register_pair(_hu(fixed), _hu(moving), **kw)
    assert a.disp_vox.shape == (3, *shape) and a.disp_vox.dtype == np.float32
    np.testing.assert_array_equal(a.disp_vox, b.disp_vox)
    assert a.info["folding_fraction"] == 0.0
    assert a.info["final_loss"] == b.info["final_loss"]
    # the registered image is closer to the fixed one than the moving image was
    err_before = np.abs(moving - fixed).mean()
    err_after = np.abs(warp_image(moving, a.disp_vox) - fixed).mean()
    assert err_after < err_before


def test_mi_measure_is_deterministic_under_a_seed_and_changes_with_it():
    shape = (20, 18, 16)
    fixed = _phantom(shape)
    moving = warp_image(fixed, np.full((3, *shape), 0.7, np.float32))
    kw = dict(clip_hu=(0.0, 1000.0), preset="affine",
              affine={"levels": (1,), "iterations": 10, "similarity": "mi",
                      "similarity_kwargs": {"n_samples": 500}})
    a = register_pair(_hu(fixed), _hu(moving), seed=7, **kw)
    b = register_pair(_hu(fixed), _hu(moving), seed=7, **kw)
    c = register_pair(_hu(fixed), _hu(moving), seed=8, **kw)
    np.testing.assert_array_equal(a.disp_vox, b.disp_vox)
    assert not np.array_equal(a.disp_vox, c.disp_vox)


def test_translation_search_finds_a_large_whole_voxel_shift():
    from slicreg.alignment.engine import translation_search

    fixed = _phantom((24, 22, 26), centre=(12, 11, 13))
    moving = _phantom((24, 22, 26), centre=(12 + 5, 11 - 4, 13 + 6))  # the same blobs, moved by (5, -4, 6)
    shift, ncc = translation_search(_t(fixed), _t(moving), np.eye(4), fraction=0.3, threshold=0.1)
    np.testing.assert_array_equal(shift, [5, -4, 6])
    assert ncc > 0.9
    # and the affine stage starts from it: without the search a local optimiser does not get there
    kw = dict(clip_hu=(0.0, 1000.0), preset="affine")
    res = register_pair(_hu(fixed), _hu(moving), affine={"levels": (1,), "iterations": 30, "search": 0.3}, **kw)
    np.testing.assert_allclose(res.disp_vox[:, 12, 11, 13], [5, -4, 6], atol=0.5)
    near = register_pair(_hu(fixed), _hu(moving), affine={"levels": (1,), "iterations": 30, "search": 0.0}, **kw)
    assert np.abs(near.disp_vox[:, 12, 11, 13] - [5, -4, 6]).max() > 1.0


def test_different_shapes_start_centre_to_centre():
    fixed = _phantom((20, 20, 20))
    moving = _phantom((26, 20, 18), centre=(13, 10, 9))
    res = register_pair(_hu(fixed), _hu(moving), clip_hu=(0.0, 1000.0), preset="affine",
                        affine={"levels": (1,), "iterations": 30, "similarity": "ncc"})
    # fixed centre 10 -> moving centre 13 (axis 0) and 9 (axis 2), within half a voxel
    np.testing.assert_allclose(res.affine_vox[:3, 3] + res.affine_vox[:3, :3] @ np.full(3, 10.0) - 10.0,
                               [3.0, 0.0, -1.0], atol=0.5)


def test_presets_and_overrides_are_validated():
    assert "abdomen-ct" in PRESETS
    p = resolve_preset("abdomen-ct", deformable={"iterations": [5, 6, 7]}, clip_hu=(-200, 300))
    assert p.stage("deformable").iterations == (5, 6, 7) and p.clip_hu == (-200.0, 300.0)
    # fewer levels: per-level tuples not given are cut to the finest levels
    q = resolve_preset("abdomen-ct", deformable={"levels": (2, 1)}).stage("deformable")
    base = PRESETS["abdomen-ct"].stage("deformable")
    assert q.weight == tuple(base.weight[-2:]) and q.grid_spacing == tuple(base.grid_spacing[-2:])
    assert [n for n, _ in resolve_preset("abdomen-ct", deformable=None).stages] == ["affine"]
    with pytest.raises(InputError, match="unknown preset"):
        resolve_preset("brain-mri")
    with pytest.raises(InputError, match="unknown field"):
        resolve_preset("abdomen-ct", deformable={"iteration": 3})
    with pytest.raises(InputError, match="model"):
        resolve_preset("abdomen-ct", deformable={"model": "thin-plate"})
    with pytest.raises(InputError, match="levels"):
        resolve_preset("abdomen-ct", deformable={"iterations": (1, 2)})
    with pytest.raises(InputError, match="fewer entries"):
        resolve_preset("abdomen-ct", deformable={"levels": (8, 4, 2, 1)})
    with pytest.raises(InputError, match="3-D"):
        register_pair(np.zeros((4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="NaN"):
        register_pair(np.full((4, 4, 4), np.nan), np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="penalise"):
        resolve_preset("refine", deformable={"penalise": "change"})
    with pytest.raises(InputError, match="eps"):
        resolve_preset("abdomen-ct", affine={"eps": 1e-2})  # the summed-loss eps is for deformable stages


def test_increment_stage_keeps_the_starting_field_and_regularises_only_its_change():
    """``penalise="increment"`` (the ``refine`` presets) keeps the starting field exactly, on its own grid, and
    regularises only the stage's change; ``"field"`` resamples it onto the parameter grid and regularises all of
    it."""
    img = _phantom()
    rough = np.random.default_rng(0).normal(0, 0.3, (3, *img.shape)).astype(np.float32)

    def roughness(d):
        return float(np.abs(np.diff(d, axis=1)).mean())

    kw = dict(levels=(2,), iterations=0)
    inc = register_pair(img, img, init_disp=rough, preset="refine", deformable=kw)
    np.testing.assert_allclose(inc.disp_vox, rough, atol=1e-5)
    whole = register_pair(img, img, init_disp=rough, preset="refine", deformable={**kw, "penalise": "field"})
    assert roughness(whole.disp_vox) < 0.5 * roughness(rough)  # averaged onto the 2x coarser grid
    # on the full-resolution grid, with a strong regulariser: the change stays ~0, the whole field is smoothed
    kw = dict(levels=(1,), iterations=30, weight=10.0, subsample=1, grid_spacing=1)
    inc = register_pair(img, img, init_disp=rough, preset="refine", deformable=kw)
    whole = register_pair(img, img, init_disp=rough, preset="refine", deformable={**kw, "penalise": "field"})
    assert np.abs(inc.disp_vox - rough).mean() < 0.05  # (0.016; the rough start itself: 0.24)
    assert roughness(whole.disp_vox) < 0.5 * roughness(rough), (roughness(whole.disp_vox), roughness(rough))


# ------------------------------------------------------------------------------------------- command and stage
def _write_pair(tmp_path, shape=(20, 18, 16)):
    from slicreg.conventions import Volume
    from slicreg.io import save_volume

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = _hu(_phantom(shape))
    shift = np.broadcast_to(np.array([1.0, -1.5, 0.5], np.float32)[:, None, None, None], (3, *shape))
    moving = warp_image(fixed, -shift)
    labels = (_phantom(shape) > 0.5).astype(np.uint8)
    save_volume(Volume(fixed, affine), tmp_path / "f.nii.gz")
    save_volume(Volume(moving, affine), tmp_path / "m.nii.gz")
    save_volume(Volume(labels, affine), tmp_path / "ml.nii.gz")
    return shape, affine


def test_align_command_writes_field_warped_outputs_and_deeds_files(tmp_path):
    pytest.importorskip("slicreg.deeds")
    from pipelines.cli import main
    from slicreg.deeds import read_deeds
    from slicreg.io import load_field, load_labels, read_json

    shape, affine = _write_pair(tmp_path)
    rc = main(["align", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
               "--out-field", str(tmp_path / "u.nii.gz"), "--preset", "affine", "--moving-labels",
               str(tmp_path / "ml.nii.gz"), "--out-warped-labels", str(tmp_path / "wl.nii.gz"),
               "--out-warped", str(tmp_path / "w.nii.gz"), "--deeds-out", str(tmp_path / "F1"),
               "--out-json", str(tmp_path / "info.json"), "--quiet", "--threads", "1", "--force"])
    assert rc == 0
    field = load_field(tmp_path / "u.nii.gz")
    assert field.shape == shape and np.allclose(field.affine, affine)
    warped = load_labels(tmp_path / "wl.nii.gz")
    assert warped.array.dtype == np.uint8 and set(np.unique(warped.array)) <= {0, 1}
    info = read_json(tmp_path / "info.json")
    assert info["preset"] == "affine" and np.asarray(info["affine_vox"]).shape == (4, 4)
    # the deeds export reads back to the same field (the affine part exactly, the rest on the control grid)
    back = read_deeds(tmp_path / "F1_displacements.dat", shape, matrix_path=tmp_path / "F1_matrix.txt").to_field()
    np.testing.assert_allclose(back, field.array, atol=1e-3)


def test_align_command_rejects_half_a_label_pair(tmp_path, capsys):
    from pipelines.cli import main

    _write_pair(tmp_path)
    rc = main(["align", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
               "--out-field", str(tmp_path / "u.nii.gz"), "--moving-labels", str(tmp_path / "ml.nii.gz")])
    assert rc == 2 and "--out-warped-labels" in capsys.readouterr().err
    assert not (tmp_path / "u.nii.gz").exists()


def test_align_pairs_stage_registers_listed_pairs_and_resumes(tmp_path):
    import json

    from pipelines.runner import StageContext
    from pipelines.stages.align_pairs import align_pairs_stage
    from slicreg.io import load_field, read_json

    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    _write_pair(tmp_path)
    (tmp_path / "f.nii.gz").rename(data / "imagesTr" / "a_0000.nii.gz")
    (tmp_path / "m.nii.gz").rename(data / "imagesTr" / "b_0000.nii.gz")
    doc = {"name": "t", "format": "slicreg-dataset/1", "template": "b",
           "subjects": {"a": {"image": "imagesTr/a_0000.nii.gz", "role": "train"},
                        "b": {"image": "imagesTr/b_0000.nii.gz", "role": "template"}},
           "training": ["a"], "test": [], "registration_pairs": [{"fixed": "a", "moving": "b"}]}
    (data / "dataset.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    ctx = StageContext("align", {"preset": "affine", "device": "cpu", "pairs": "registration_pairs", "fov_mask": True},
                       {"dataset": data}, out, tmp_path, quiet=True)
    align_pairs_stage(ctx)
    reg = read_json(out / "registrations.json")
    assert reg["method"] == "slicreg-align/affine"
    assert [(p["fixed"], p["moving"], p["field"]) for p in reg["pairs"]] == [("a", "b", "fields/disp_a_b.nii.gz")]
    assert reg["pairs"][0]["runtime_s"] > 0
    field = load_field(out / "fields" / "disp_a_b.nii.gz")
    # moving(p + shift) = fixed(p) with shift (1, -1.5, 0.5): the field recovers it in the middle
    np.testing.assert_allclose(field.array[:, 8:12, 7:11, 6:10].reshape(3, -1).mean(1), [1.0, -1.5, 0.5], atol=0.5)
    # a second attempt in the same folder reuses the per-pair files instead of registering again
    stamp = (out / "fields" / "disp_a_b.nii.gz").stat().st_mtime_ns
    again = StageContext("align", dict(ctx.params, pairs="template"), {"dataset": data}, out, tmp_path, quiet=True)
    align_pairs_stage(again)
    assert (out / "fields" / "disp_a_b.nii.gz").stat().st_mtime_ns == stamp
    assert any("1 of 1 pairs already registered" in n for n in again.notes)
