"""Tests of preprocessing.ct (differentiable Radon / FBP / acquisition) and preprocessing.acquisition.

Tiny phantoms (<= 64 px) so the file runs in seconds. Figures measured when the tests were written are quoted
next to each tolerance."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from scipy import ndimage

from preprocessing import ct
from preprocessing.acquisition import PRESETS, AcquisitionConfig, apply_to_subject, sample_acquisition, simulate_volume
from slicreg.conventions import Volume
from slicreg.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Modified Shepp-Logan ellipses (Toft): value, semi-axes a, b, centre x0, y0 (fractions of the half-size), angle.
_ELLIPSES = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0), (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0), (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0), (0.1, 0.046, 0.046, 0.0, 0.1, 0.0), (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0), (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
)


def phantom(n: int) -> np.ndarray:
    """A Shepp-Logan-like phantom (n, n), float64, inside the inscribed circle; x right, y up."""
    c = (n - 1) / 2
    r = np.arange(n)
    y = (c - r[:, None]) / (n / 2)
    x = (r[None, :] - c) / (n / 2)
    img = np.zeros((n, n))
    for value, a, b, x0, y0, phi in _ELLIPSES:
        p = math.radians(phi)
        xr = (x - x0) * math.cos(p) + (y - y0) * math.sin(p)
        yr = -(x - x0) * math.sin(p) + (y - y0) * math.cos(p)
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] += value
    return img


def centred(n: int, pixel_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) world coordinates (mm) of the pixel centres of an (n, n) grid, x right, y up."""
    c = (n - 1) / 2
    r = (np.arange(n) - c) * pixel_mm
    return -r[:, None] + 0 * r[None, :], r[None, :] + 0 * r[:, None]


def fan(n_angles: int = 120, n_detectors: int = 61, **kw: float) -> ct.FanBeam:
    args = {"detector_spacing_mm": 1.5, "source_distance_mm": 100.0, "detector_distance_mm": 50.0, **kw}
    return ct.FanBeam.uniform(n_angles, n_detectors, **args)


# --------------------------------------------------------------------------------------------- adjoint
@pytest.mark.parametrize("geometry, shape, pixel_mm", [
    (ct.ParallelBeam.uniform(37, 29, detector_spacing_mm=1.3), (24, 31), 1.0),
    (ct.ParallelBeam([0.1, 0.7, 2.0, 3.5], 41, 0.8), (20, 20), (1.2, 0.9)),
    (fan(23, 45), (24, 31), 1.0),
    (fan(17, 33, detector_spacing_mm=2.5), (18, 14), (1.5, 2.0)),
])
def test_backproject_is_the_exact_adjoint_of_project(geometry, shape, pixel_mm):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(3, geometry.n_angles, geometry.n_detectors, generator=g, dtype=torch.float64)
    for step in (0.5, 1.0):
        ax = ct.project(x, geometry, pixel_mm=pixel_mm, ray_step=step)
        aty = ct.backproject(y, geometry, image_shape=shape, pixel_mm=pixel_mm, ray_step=step)
        lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
        assert abs(lhs - rhs) <= 1e-12 * (float(ax.abs().sum() * y.abs().max())), (lhs, rhs)  # measured ~1e-16


def test_operators_are_batched_and_accept_single_slices():
    geometry = ct.ParallelBeam.uniform(12, 21)
    x = torch.rand(2, 16, 16, dtype=torch.float64)
    batch = ct.project(x, geometry)
    assert batch.shape == (2, 12, 21)
    torch.testing.assert_close(ct.project(x[1], geometry), batch[1])
    rec = ct.fbp(batch, geometry, image_shape=(16, 16))
    assert rec.shape == (2, 16, 16) and rec.dtype == torch.float64
    torch.testing.assert_close(ct.fbp(batch[0], geometry, image_shape=(16, 16)), rec[0])


# ------------------------------------------------------------------------------------------ scikit-image
def test_project_matches_skimage_radon():
    from skimage.transform import radon

    n = 63  # odd: scikit-image's centre n // 2 equals ours, (n - 1) / 2
    img = phantom(n)
    theta_deg = np.arange(180.0)
    ref = radon(img, theta=theta_deg, circle=True)  # (D, A), same angle convention, 1-pixel ray steps
    geometry = ct.ParallelBeam(np.deg2rad(theta_deg), n)
    mine = ct.project(torch.from_numpy(img), geometry, ray_step=1.0).numpy().T
    assert np.abs(mine - ref).max() <= 1e-9 * np.abs(ref).max()  # measured 1e-14 relative


@pytest.mark.parametrize("name, sk_name, tol", [
    ("ram-lak", "ramp", 1e-9),  # measured RMSE 1e-15
    ("shepp-logan", "shepp-logan", 1e-4),  # 1e-5
    ("cosine", "cosine", 2e-4),  # 2.4e-5
    ("hann", "hann", 2e-3),  # 3e-4 (scikit-image's Hann window uses np.hanning's (M - 1) normalisation)
])
def test_fbp_matches_skimage_iradon(name, sk_name, tol):
    from skimage.transform import iradon, radon

    n = 63
    img = phantom(n)
    theta_deg = np.arange(180.0)
    sino = radon(img, theta=theta_deg, circle=True)
    ref = iradon(sino, theta=theta_deg, filter_name=sk_name, circle=True)
    geometry = ct.ParallelBeam(np.deg2rad(theta_deg), n)
    rec = ct.fbp(torch.from_numpy(sino.T.copy()), geometry, image_shape=(n, n), filter=name).numpy()
    y, x = centred(n)
    inside = np.hypot(x, y) < n // 2 - 1  # iradon zeroes everything outside the circle
    rmse = float(np.sqrt(((rec - ref)[inside] ** 2).mean()))
    assert rmse <= tol, rmse


# -------------------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("geometry", [ct.ParallelBeam.uniform(180, 93), fan(360, 181, detector_spacing_mm=0.75)],
                         ids=["parallel", "fan"])
@pytest.mark.parametrize("name", ct.FILTERS)
def test_fbp_of_projected_phantom_reproduces_it(geometry, name):
    n = 64
    img = phantom(n)
    rec = ct.fbp(ct.project(torch.from_numpy(img), geometry), geometry, image_shape=(n, n), filter=name).numpy()
    # interior: pixels whose 5 x 5 neighbourhood is constant (edges are blurred by any finite sampling)
    flat = ndimage.maximum_filter(img, 5) == ndimage.minimum_filter(img, 5)
    y, x = centred(n)
    interior = flat & (np.hypot(x, y) < n / 2 - 3)
    rmse = float(np.sqrt(((rec - img)[interior] ** 2).mean()))
    assert rmse < 0.02, rmse  # phantom range 0..1; measured 0.015 (ram-lak) .. 0.002 (hann)
    # the sharp kernel keeps more detail than the soft one: the edge error grows from ram-lak to hann
    if name == "hann":
        sharp = ct.fbp(ct.project(torch.from_numpy(img), geometry), geometry, image_shape=(n, n)).numpy()
        inside = np.hypot(x, y) < n / 2 - 3
        assert np.abs(rec - img)[inside & ~flat].mean() > np.abs(sharp - img)[inside & ~flat].mean()


def test_fbp_with_anisotropic_pixels_and_full_turn():
    # a disc of radius 15 mm on a grid of 1.0 x 1.5 mm pixels; its reconstruction keeps the value 1
    h, w, pix = 40, 27, (1.0, 1.5)
    yy = ((h - 1) / 2 - np.arange(h))[:, None] * pix[0]
    xx = (np.arange(w) - (w - 1) / 2)[None, :] * pix[1]
    r = np.hypot(xx, yy)
    disc = np.clip(15.5 - r, 0, 1)
    geometry = ct.ParallelBeam.uniform(160, ct.default_n_detectors((h, w), pixel_mm=pix), full_turn=True)
    sino = ct.project(torch.from_numpy(disc), geometry, pixel_mm=pix)
    assert float(sino.max()) == pytest.approx(2 * 15.0, abs=0.6)  # chord through the centre, mm
    rec = ct.fbp(sino, geometry, image_shape=(h, w), pixel_mm=pix).numpy()
    assert np.abs(rec[r < 11] - 1).max() < 0.03  # measured 0.012


# -------------------------------------------------------------------------------------------- fan beam
def test_fan_beam_centred_disc_gives_flat_sinogram_and_analytic_chords():
    n, sigma = 48, 6.0
    y, x = centred(n)
    blob = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    geometry = fan(60, 61)
    sino = ct.project(torch.from_numpy(blob), geometry).numpy()
    assert sino.std(axis=0).max() < 1e-3 * sino.max()  # rotation invariant; measured 3e-4
    # a ray at fan angle gamma passes the centre at distance d = source_distance * sin(gamma)
    u = (np.arange(61) - 30) * 1.5
    d = 100.0 * np.sin(np.arctan(u / 150.0))
    analytic = math.sqrt(2 * math.pi) * sigma * np.exp(-d ** 2 / (2 * sigma ** 2))
    assert np.abs(sino - analytic).max() < 0.01 * analytic.max()  # measured 0.35 % (bilinear smoothing)
    disc = np.clip(20.5 - np.hypot(x, y), 0, 1)  # a soft-edged disc: flat within 1 %
    sino = ct.project(torch.from_numpy(disc), geometry).numpy()
    assert sino.std(axis=0).max() < 0.01 * sino.max()  # measured 0.6 %


def test_angle_and_rotation_conventions():
    # a blob right of the centre (x = +8) projects at u = +8 at angle 0 and u = 0 at pi/2; one above the centre
    # (y = +8, a smaller row index) at u = 0 and u = +8
    n = 41
    y, x = centred(n)
    geometry = ct.ParallelBeam([0.0, math.pi / 2], n)
    for (bx, by), expected in (((8, 0), (8, 0)), ((0, 8), (0, 8))):
        blob = np.exp(-((x - bx) ** 2 + (y - by) ** 2) / 8.0)
        sino = ct.project(torch.from_numpy(blob), geometry).numpy()
        peaks = tuple(int(np.argmax(row)) - (n - 1) // 2 for row in sino)
        assert peaks == expected


# -------------------------------------------------------------------------------------------- gradients
def test_gradcheck_project_backproject_fbp():
    shape = (5, 6)
    geometries = [ct.ParallelBeam.uniform(4, 9), fan(6, 9, detector_spacing_mm=1.2, source_distance_mm=20.0,
                                                       detector_distance_mm=10.0)]
    g = torch.Generator().manual_seed(3)
    for geometry in geometries:
        x = torch.rand(1, *shape, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.rand(1, geometry.n_angles, geometry.n_detectors, generator=g, dtype=torch.float64,
                       requires_grad=True)
        # partial binds this iteration's geometry (gradcheck calls at once either way)
        assert torch.autograd.gradcheck(partial(ct.project, geometry=geometry, pixel_mm=(1.0, 0.8)), (x,))
        assert torch.autograd.gradcheck(
            partial(ct.backproject, geometry=geometry, image_shape=shape, pixel_mm=(1.0, 0.8)), (y,))
        for name in ("ram-lak", "hann"):
            assert torch.autograd.gradcheck(partial(ct.fbp, geometry=geometry, image_shape=shape, filter=name), (y,))
    # second order: the gradient of the gradient exists (the backward pass is itself differentiable)
    geometry = geometries[0]
    x = torch.rand(1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ct.project(t, geometry), (x,))


def test_gradient_descent_through_projection_recovers_an_image():
    # least squares ||A x - p||^2 from zero: the loss falls by orders of magnitude (autograd through A and A^T)
    geometry = ct.ParallelBeam.uniform(30, 23)
    truth = torch.from_numpy(phantom(16))
    target = ct.project(truth, geometry)
    x = torch.zeros(16, 16, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = ((ct.project(x, geometry) - target) ** 2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 1e-2 * first


# ------------------------------------------------------------------------------------------ acquisition
def _abdomen(n: int = 48, pixel_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A water-like ellipse (40 HU, 160 x 110 mm semi-axes) in air; returns (hu, roi of its centre)."""
    y, x = centred(n, pixel_mm)
    hu = np.where((x / 80) ** 2 + (y / 55) ** 2 <= 1, 40.0, -1000.0)
    roi = (x / 40) ** 2 + (y / 25) ** 2 <= 1
    return hu, roi


def test_more_dose_less_noise():
    hu, roi = _abdomen()
    clean = ct.simulate_acquisition(hu, dose_photons=None, generator=None, pixel_mm=4.0)
    assert isinstance(clean, np.ndarray) and clean.shape == hu.shape
    # HU come back (the SD is the ringing of the 1000 HU pixelated edge, not noise)
    assert abs(float(clean[roi].mean()) - 40.0) < 3.0 and float(clean[roi].std()) < 8.0
    sds = []
    for dose in (1e4, 1e5, 1e6):
        out = ct.simulate_acquisition(hu, dose_photons=dose, generator=torch.Generator().manual_seed(0),
                                      pixel_mm=4.0)
        sds.append(float((out - clean)[roi].std()))
    assert sds[0] > sds[1] > sds[2]
    for a, b in zip(sds, sds[1:]):  # quantum noise: SD ~ 1 / sqrt(I0), ratio sqrt(10) = 3.2
        assert 2.5 < a / b < 4.0, sds


def test_sharp_kernel_has_more_high_frequency_noise_than_soft():
    hu, roi = _abdomen(64, 3.0)
    y, x = centred(64, 3.0)
    clean = {}
    hf_share, sd = {}, {}
    for kernel in ("ram-lak", "hann"):
        clean[kernel] = ct.simulate_acquisition(hu, dose_photons=None, kernel=kernel, generator=None, pixel_mm=3.0)
        noisy = ct.simulate_acquisition(hu, dose_photons=3e4, kernel=kernel, pixel_mm=3.0,
                                        generator=torch.Generator().manual_seed(5))
        noise = (noisy - clean[kernel])[16:48, 16:48]  # a central 32 x 32 block inside the body
        nps = np.abs(np.fft.fft2(noise - noise.mean())) ** 2  # noise power spectrum
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), indexing="ij"))
        hf_share[kernel] = nps[f > 0.25].sum() / nps.sum()
        sd[kernel] = noise.std()
    assert sd["ram-lak"] > 1.8 * sd["hann"]  # measured ~2.5
    assert hf_share["ram-lak"] > 2 * hf_share["hann"]  # power above 0.25 cycles/pixel
    assert abs(float(clean["hann"][y ** 2 + x ** 2 < 30 ** 2].mean()) - 40) < 3


def test_beam_hardening_gives_cupping():
    hu, roi = _abdomen()
    y, x = centred(48, 4.0)
    rim = ((x / 70) ** 2 + (y / 45) ** 2 <= 1) & ((x / 60) ** 2 + (y / 35) ** 2 > 1)
    flat = ct.simulate_acquisition(hu, dose_photons=None, generator=None, pixel_mm=4.0, kernel="hann")
    cupped = ct.simulate_acquisition(hu, dose_photons=None, generator=None, pixel_mm=4.0, kernel="hann",
                                     beam_hardening=0.05)
    assert abs(flat[roi].mean() - flat[rim].mean()) < 3  # measured 0.15 HU
    assert cupped[rim].mean() - cupped[roi].mean() > 12  # centre darker than the rim; measured 23 HU


def test_acquisition_is_deterministic_under_a_generator():
    hu = torch.from_numpy(_abdomen(32, 6.0)[0]).float()[None].repeat(2, 1, 1)
    kw = {"dose_photons": 2e4, "pixel_mm": 6.0, "kernel": "shepp-logan"}
    a = ct.simulate_acquisition(hu, generator=torch.Generator().manual_seed(7), **kw)
    b = ct.simulate_acquisition(hu, generator=torch.Generator().manual_seed(7), **kw)
    c = ct.simulate_acquisition(hu, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per slice: slice 1's noise depends on its own generator only
    d = ct.simulate_acquisition(hu, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
                                **kw)
    e = ct.simulate_acquisition(hu[1], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(d[1], e)
    f = ct.simulate_acquisition(hu, geometry="fan", generator=torch.Generator().manual_seed(7), **kw)
    assert f.shape == hu.shape and abs(float(f[0, 12:20, 12:20].mean()) - 40) < 15


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_input_error():
    geometry = ct.ParallelBeam.uniform(10, 15)
    x = torch.rand(1, 8, 8)
    cases = [
        lambda: ct.project(x.numpy(), geometry),  # not a tensor
        lambda: ct.project(torch.ones(1, 8, 8, dtype=torch.int32), geometry),
        lambda: ct.project(torch.rand(1, 1, 8, 8), geometry),
        lambda: ct.project(torch.full((8, 8), float("nan")), geometry),
        lambda: ct.project(x, "parallel"),
        lambda: ct.project(x, geometry, ray_step=0),
        lambda: ct.project(x, geometry, pixel_mm=(1.0, -1.0)),
        lambda: ct.project(x, fan(10, 15, source_distance_mm=5.0)),  # source inside the image
        lambda: ct.backproject(torch.rand(1, 10, 14), geometry, image_shape=(8, 8)),
        lambda: ct.backproject(torch.rand(1, 10, 15), geometry, image_shape=(8,)),
        lambda: ct.fbp(torch.rand(1, 10, 15), geometry, image_shape=(8, 8), filter="butterworth"),
        lambda: ct.fbp(torch.rand(1, 3, 15), ct.ParallelBeam([0.0, 0.1, 0.5], 15), image_shape=(8, 8)),
        lambda: ct.fbp(torch.rand(1, 10, 15), ct.FanBeam(np.linspace(0, np.pi, 10, endpoint=False), 15, 1.0, 50.0,
                                                         10.0), image_shape=(8, 8)),  # a fan needs a full turn
        lambda: ct.ParallelBeam([], 10),
        lambda: ct.ParallelBeam([0.0], 1),
        lambda: ct.ParallelBeam([0.0, float("inf")], 10),
        lambda: ct.FanBeam([0.0], 10, 1.0, -5.0, 1.0),
        lambda: ct.simulate_acquisition(x, dose_photons=-1.0, generator=torch.Generator()),
        lambda: ct.simulate_acquisition(x, dose_photons=1e4, generator=None),
        lambda: ct.simulate_acquisition(x, dose_photons=1e4, generator=[torch.Generator()] * 2),
        lambda: ct.simulate_acquisition(x, dose_photons=None, generator=None, beam_hardening=-0.1),
        lambda: ct.simulate_acquisition(x, dose_photons=None, generator=None, kernel="bone"),
        lambda: ct.simulate_acquisition(x, dose_photons=None, generator=None, geometry="cone"),
        lambda: ct.simulate_acquisition(np.array([["a"]]), dose_photons=None, generator=None),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(InputError):
            case()
            pytest.fail(f"case {i} did not raise")


# ----------------------------------------------------------------------------------- the cohort option
def _subject(dtype=np.int16) -> Volume:
    hu, _ = _abdomen(24, 8.0)
    arr = np.repeat(hu[:, :, None], 3, axis=2).astype(dtype)
    affine = np.diag([8.0, 8.0, 5.0, 1.0])
    affine[:3, 3] = (-90.0, -80.0, 10.0)
    return Volume(arr, affine)


def test_acquisition_option_is_off_by_default():
    image = _subject()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out, info = apply_to_subject(image, rng)
    assert out is image and info == {"enabled": False}
    assert rng.bit_generator.state == state  # the generator is untouched
    assert AcquisitionConfig.from_value(None) == AcquisitionConfig() == AcquisitionConfig.from_value(False)
    assert AcquisitionConfig.from_value(True).enabled
    cfg = AcquisitionConfig.from_value({"dose_photons": [1e4, 2e4], "kernels": ["hann"]})
    assert cfg.enabled and cfg.dose_photons == (1e4, 2e4) and cfg.kernels == ("hann",)
    assert AcquisitionConfig.from_value(cfg.to_dict()) == cfg
    for bad in ({"dose": 1}, {"kernels": ["bone"]}, {"dose_photons": [0, 1e4]}, {"beam_hardening": [0.1, 0.0]},
                {"n_angles": 1}, {"geometry": "cone"}, {"slices_per_batch": 0}, "yes"):
        with pytest.raises(InputError):
            AcquisitionConfig.from_value(bad)


def test_acquisition_presets():
    assert AcquisitionConfig.from_value("varied") == AcquisitionConfig(enabled=True)
    assert AcquisitionConfig.from_value("off") == AcquisitionConfig()
    low = AcquisitionConfig.from_value("low-dose-sharp")
    varied = AcquisitionConfig.from_value("varied")
    # the test-subject preset lies outside the training preset's dose and beam-hardening ranges, on another geometry
    assert low.enabled and low.kernels == ("ram-lak",) and low.geometry == "fan"
    assert low.dose_photons[1] <= varied.dose_photons[0] and low.beam_hardening[0] >= varied.beam_hardening[1]
    soft = AcquisitionConfig.from_value("standard-soft")
    assert soft.kernels == ("hann",) and soft.dose_photons[0] >= varied.dose_photons[0]
    # a table over a preset: its keys win; the resolved config round-trips through to_dict
    tuned = AcquisitionConfig.from_value({"preset": "low-dose-sharp", "n_angles": 90, "kernels": ["hann"]})
    assert tuned.n_angles == 90 and tuned.kernels == ("hann",) and tuned.geometry == "fan"
    assert AcquisitionConfig.from_value(tuned.to_dict()) == tuned
    assert set(PRESETS) == {"off", "varied", "low-dose-sharp", "standard-soft"}
    for bad in ("bogus", {"preset": "bogus"}, {"preset": 3}, {"preset": "varied", "dose": 1}):
        with pytest.raises(InputError, match="test_acquisition"):
            AcquisitionConfig.from_value(bad, name="test_acquisition")


def test_apply_to_subject_is_seeded_and_keeps_the_grid():
    image = _subject()
    cfg = AcquisitionConfig(enabled=True, dose_photons=(2e4, 4e4), beam_hardening=(0.0, 0.0))
    out, info = apply_to_subject(image, np.random.default_rng([0, 3, 1]), cfg)
    again, info2 = apply_to_subject(image, np.random.default_rng([0, 3, 1]), cfg)
    other, _ = apply_to_subject(image, np.random.default_rng([0, 4, 1]), cfg)
    assert out.array.dtype == np.int16 and out.shape == image.shape
    np.testing.assert_array_equal(out.affine, image.affine)
    np.testing.assert_array_equal(out.array, again.array)
    assert info == info2 and info["enabled"] and info["kernel"] in cfg.kernels
    assert 2e4 <= info["dose_photons"] <= 4e4
    assert not np.array_equal(out.array, other.array)
    body = ndimage.binary_erosion(image.array[:, :, 0] > -500, iterations=2)  # away from the 1000 HU edge
    assert abs(float(out.array[body].mean()) - 40) < 25  # HU preserved on average
    assert not np.array_equal(out.array[:, :, 0], out.array[:, :, 1])  # each slice has its own noise
    # the result does not depend on the batching of slices
    params = sample_acquisition(np.random.default_rng([0, 3, 1]), cfg)
    a = simulate_volume(image.array, params, pixel_mm=(8.0, 8.0), config=cfg)
    b = simulate_volume(image.array, params, pixel_mm=(8.0, 8.0),
                        config=AcquisitionConfig(enabled=True, dose_photons=(2e4, 4e4), slices_per_batch=1))
    np.testing.assert_array_equal(a, b)
    f, _ = apply_to_subject(_subject(np.float32), np.random.default_rng([0, 3, 1]), cfg)
    assert f.array.dtype == np.float32
    with pytest.raises(InputError):
        apply_to_subject(image.array, np.random.default_rng(0), cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    geometry = ct.ParallelBeam.uniform(20, 31)
    x = torch.rand(2, 20, 20, dtype=torch.float64)
    dev = torch.device("cuda")
    torch.testing.assert_close(ct.project(x.to(dev), geometry).cpu(), ct.project(x, geometry))
    sino = ct.project(x, geometry)
    torch.testing.assert_close(ct.fbp(sino.to(dev), geometry, image_shape=(20, 20)).cpu(),
                               ct.fbp(sino, geometry, image_shape=(20, 20)))
