"""Differentiable 2-D CT operators in torch: Radon projection, its exact adjoint, filtered back-projection, and a
simulation of a CT acquisition (dose, reconstruction kernel, beam hardening).

The idea follows TorchRadon (Ronchetti 2020, arXiv:2009.14788): batched CT operators written for a tensor
library, so that they run on CPU and CUDA and autograd flows through them. The algorithms are the textbook ones
(Kak & Slaney, *Principles of Computerized Tomographic Imaging*, 1988/2001, chapter 3).

Geometry (stated once; every function here follows it)
    A slice is a tensor ``(B, H, W)`` (or ``(H, W)``) indexed ``[row, col]``; pixels are ``pixel_mm`` wide
    (a number, or ``(row_mm, col_mm)``). The world frame of a slice has its origin at the centre of the pixel
    grid, ``(row, col) = ((H - 1) / 2, (W - 1) / 2)``, ``x`` along increasing columns and ``y`` along
    *decreasing* rows (``y`` points "up" on screen); units are mm::

        x = (col - (W - 1) / 2) * col_mm,    y = ((H - 1) / 2 - row) * row_mm

    An angle ``theta`` (radians) defines the detector axis ``e_s = (cos theta, sin theta)`` and the ray
    direction ``e_t = (sin theta, -cos theta)``. Detector element ``k`` of ``D`` sits at
    ``u_k = (k - (D - 1) / 2) * detector_spacing_mm``.

    - Parallel beam (:class:`ParallelBeam`): the ray of element ``k`` is the line ``{u_k e_s + t e_t}``, so the
      sinogram is ``p(theta, u) = integral f(u e_s + t e_t) dt``, ``u = x cos theta + y sin theta``.
      This is scikit-image's ``radon`` convention (angles there in degrees; scikit-image puts the centre at
      ``N // 2``, which equals ``(N - 1) / 2`` for odd ``N``; its output is ``(D, n_angles)``, ours
      ``(B, n_angles, D)``).
    - Fan beam with a flat detector (:class:`FanBeam`): the source sits at ``-source_distance_mm * e_t``, the
      detector line at ``+detector_distance_mm * e_t`` (distances from the rotation centre), parallel to
      ``e_s``; the ray of element ``k`` goes from the source to the point ``detector_distance_mm e_t + u_k e_s``.

Operators
    - :func:`project` ``A``: ray-driven line integrals. Each ray is sampled every ``ray_step`` pixels (along its
      length) with bilinear interpolation (zero outside the image) and the samples are summed times the step
      in mm: the result is a path integral in mm x image units (with attenuation in 1/mm it is dimensionless).
    - :func:`backproject` ``A^T``: the exact adjoint of :func:`project` (same bilinear weights, scattered), so
      ``<A x, y> = <x, A^T y>`` to rounding. Use it for gradients and iterative reconstruction.
    - :func:`fbp`: filtered back-projection, the analytic inverse: ramp filter (the band-limited ramp of Kak &
      Slaney built in the spatial domain, applied by FFT on a zero-padded detector axis so the convolution does
      not wrap) times a window (:data:`FILTERS`), then a *pixel-driven* back-projection (each pixel reads the
      filtered projection at its detector position, linear interpolation), with the fan-beam weights for a
      flat detector. It is a different linear map from ``A^T`` (the pixel-driven back-projector is the standard
      choice for FBP because it does not blur); it is differentiable as well (its own exact adjoint is used for
      the gradient).

    All three are batched over ``B`` (the geometry is shared) and differentiable with respect to the image or
    sinogram (not with respect to the geometry). Inputs must be floating point; outputs have the input's dtype
    and device. Work is done in chunks of at most 16 angles (and about 2**23 samples), and rays are sampled only
    where they can touch the image, so memory stays bounded.

Implementation
    Both samplers are ``grid_sample`` (bilinear, zero padding, ``align_corners=False``): along rays for
    :func:`project`, along the detector (a height-1 "image" per angle) for :func:`fbp_backproject`. Each adjoint is
    the input-gradient kernel of ``grid_sample`` (``aten.grid_sampler_2d_backward``) with the same grid, i.e.
    the same weights scattered, which makes the pairs exact adjoints. An autograd ``Function`` maps each
    operator's backward pass to its adjoint and back, so nothing but the geometry is kept for the backward pass
    and higher-order gradients work.

Acquisition
    :func:`simulate_acquisition`: HU -> linear attenuation -> projection -> optional beam-hardening-like
    nonlinearity -> Poisson transmission noise at a photon count -> FBP with a chosen kernel -> HU, in the
    geometry of :func:`acquisition_geometry`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.errors import InputError

__all__ = [
    "FILTERS",
    "MU_WATER_PER_MM",
    "ParallelBeam",
    "FanBeam",
    "project",
    "backproject",
    "filter_sinogram",
    "fbp",
    "fbp_backproject",
    "hu_to_mu",
    "mu_to_hu",
    "default_n_detectors",
    "default_n_angles",
    "acquisition_geometry",
    "simulate_acquisition",
]

FILTERS: tuple[str, ...] = ("ram-lak", "shepp-logan", "cosine", "hann")
"""FBP filters (reconstruction kernels), sharpest first. All are the ramp ``|f|`` times a window of the
frequency ``f`` in cycles per detector element (``0 <= f <= 1/2``): ram-lak ``1``; shepp-logan
``sin(pi f) / (pi f)``; cosine ``cos(pi f)``; hann ``(1 + cos(2 pi f)) / 2``. ``"ramp"`` is accepted as a
synonym of ``"ram-lak"`` (scikit-image's name)."""

MU_WATER_PER_MM = 0.019
"""Linear attenuation coefficient of water at about 70 keV (1/mm)."""

_CHUNK_SAMPLES = 1 << 23  # samples (x batch) per chunk of angles
_CHUNK_ANGLES = 16  # at most this many angles per chunk (small chunks let the ray windows fit tightly)
_ALIASES = {"ramp": "ram-lak", "ramlak": "ram-lak", "ram_lak": "ram-lak", "shepp_logan": "shepp-logan",
            "hanning": "hann"}


# --------------------------------------------------------------------------------------------------- geometry
def _angles_tuple(angles: Any, owner: str) -> tuple[float, ...]:
    if isinstance(angles, torch.Tensor):
        angles = angles.detach().cpu().numpy()
    try:
        arr = np.asarray(angles, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{owner}.angles: expected a sequence of angles in radians, got {angles!r}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise InputError(f"{owner}.angles: expected a non-empty sequence of finite angles (radians), got "
                         f"{arr.size} values")
    return tuple(float(a) for a in arr)


def _positive(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{name}: expected a positive finite number, got {value!r}")
    return v


def _count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ParallelBeam:
    """Parallel-beam geometry (see the module docstring for the frame).

    Args:
        angles: projection angles in radians (any order; for :func:`fbp` uniformly spaced over a half or a
            full turn).
        n_detectors: detector elements ``D`` (>= 2).
        detector_spacing_mm: element pitch in mm. Default 1.0 (= one pixel of a 1 mm grid).
    """

    angles: tuple[float, ...]
    n_detectors: int
    detector_spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", _angles_tuple(self.angles, "ParallelBeam"))
        object.__setattr__(self, "n_detectors", _count(self.n_detectors, "ParallelBeam.n_detectors", 2))
        object.__setattr__(self, "detector_spacing_mm",
                           _positive(self.detector_spacing_mm, "ParallelBeam.detector_spacing_mm"))

    @classmethod
    def uniform(cls, n_angles: int, n_detectors: int, *, detector_spacing_mm: float = 1.0,
                full_turn: bool = False) -> ParallelBeam:
        """``n_angles`` angles ``k * pi / n_angles`` (or ``k * 2 pi / n_angles`` with ``full_turn``)."""
        n = _count(n_angles, "ParallelBeam.uniform: n_angles")
        span = 2 * math.pi if full_turn else math.pi
        return cls(tuple(k * span / n for k in range(n)), n_detectors, detector_spacing_mm)

    @property
    def n_angles(self) -> int:
        return len(self.angles)


@dataclass(frozen=True)
class FanBeam:
    """Fan-beam geometry with a flat, equispaced detector (see the module docstring for the frame).

    Args:
        angles: source angles in radians; for :func:`fbp` uniformly spaced over a full turn.
        n_detectors: detector elements ``D`` (>= 2).
        detector_spacing_mm: element pitch on the detector in mm.
        source_distance_mm: source to rotation centre (mm); must exceed the image's half-diagonal.
        detector_distance_mm: rotation centre to detector (mm), >= 0.
    """

    angles: tuple[float, ...]
    n_detectors: int
    detector_spacing_mm: float
    source_distance_mm: float
    detector_distance_mm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", _angles_tuple(self.angles, "FanBeam"))
        object.__setattr__(self, "n_detectors", _count(self.n_detectors, "FanBeam.n_detectors", 2))
        object.__setattr__(self, "detector_spacing_mm",
                           _positive(self.detector_spacing_mm, "FanBeam.detector_spacing_mm"))
        object.__setattr__(self, "source_distance_mm",
                           _positive(self.source_distance_mm, "FanBeam.source_distance_mm"))
        d = self.detector_distance_mm
        if isinstance(d, bool) or not isinstance(d, (int, float, np.floating)) or not math.isfinite(d) or d < 0:
            raise InputError(f"FanBeam.detector_distance_mm: expected a finite number >= 0, got {d!r}")
        object.__setattr__(self, "detector_distance_mm", float(d))

    @classmethod
    def uniform(cls, n_angles: int, n_detectors: int, *, detector_spacing_mm: float, source_distance_mm: float,
                detector_distance_mm: float) -> FanBeam:
        """``n_angles`` source angles ``k * 2 pi / n_angles`` (a full turn)."""
        n = _count(n_angles, "FanBeam.uniform: n_angles")
        return cls(tuple(k * 2 * math.pi / n for k in range(n)), n_detectors, detector_spacing_mm,
                   source_distance_mm, detector_distance_mm)

    @property
    def n_angles(self) -> int:
        return len(self.angles)

    @property
    def magnification(self) -> float:
        """(source-to-detector) / (source-to-centre): detector mm per mm at the rotation centre."""
        return (self.source_distance_mm + self.detector_distance_mm) / self.source_distance_mm


Geometry = ParallelBeam | FanBeam


def _check_geometry(geometry: Any, fn: str) -> None:
    if not isinstance(geometry, (ParallelBeam, FanBeam)):
        raise InputError(f"{fn}: geometry: expected a ParallelBeam or FanBeam, got {type(geometry).__name__}")


def _pixel_pair(pixel_mm: Any, fn: str) -> tuple[float, float]:
    if isinstance(pixel_mm, (tuple, list, np.ndarray)):
        vals = list(np.asarray(pixel_mm, dtype=object).reshape(-1))
        if len(vals) != 2:
            raise InputError(f"{fn}: pixel_mm: expected a number or (row_mm, col_mm), got {pixel_mm!r}")
        return _positive(vals[0], f"{fn}: pixel_mm[0]"), _positive(vals[1], f"{fn}: pixel_mm[1]")
    v = _positive(pixel_mm, f"{fn}: pixel_mm")
    return v, v


def _half_diagonal_mm(shape: Sequence[int], pix: tuple[float, float]) -> float:
    """Radius (mm) of the circle around the centre that holds every pixel's bilinear support."""
    return 0.5 * math.hypot((shape[0] + 1) * pix[0], (shape[1] + 1) * pix[1])


def default_n_detectors(image_shape: Sequence[int], *, pixel_mm: Any = 1.0, detector_spacing_mm: float | None = None,
                        geometry: str = "parallel", source_distance_mm: float | None = None,
                        detector_distance_mm: float = 0.0) -> int:
    """Detector elements that see the whole image (odd, so that the centre ray hits the rotation centre).

    Args:
        image_shape: ``(H, W)``.
        pixel_mm: pixel size (number or ``(row_mm, col_mm)``).
        detector_spacing_mm: element pitch; default the smaller pixel size (times the magnification for a
            fan beam, so that one element covers one pixel at the centre).
        geometry: ``"parallel"`` or ``"fan"``; a fan needs ``source_distance_mm``.
    """
    pix = _pixel_pair(pixel_mm, "default_n_detectors")
    radius = _half_diagonal_mm(image_shape, pix)
    if geometry == "parallel":
        du = detector_spacing_mm or min(pix)
        half = radius / du
    elif geometry == "fan":
        dso = _positive(source_distance_mm, "default_n_detectors: source_distance_mm")
        if dso <= radius:
            raise InputError(f"default_n_detectors: source_distance_mm {dso:g} must exceed the image's "
                             f"half-diagonal {radius:.1f} mm")
        mag = (dso + detector_distance_mm) / dso
        du = detector_spacing_mm or min(pix) * mag
        half = radius * (dso + detector_distance_mm) / math.sqrt(dso ** 2 - radius ** 2) / du
    else:
        raise InputError(f"default_n_detectors: geometry: expected 'parallel' or 'fan', got {geometry!r}")
    return 2 * int(math.ceil(half)) + 1


def default_n_angles(n_detectors: int, *, full_turn: bool = False) -> int:
    """The usual angular sampling rule: ``ceil(pi / 2 * D)`` views per half turn (twice that for a full turn)."""
    n = int(math.ceil(math.pi / 2 * _count(n_detectors, "default_n_angles: n_detectors")))
    return 2 * n if full_turn else n


# ---------------------------------------------------------------------------------- grid-sample machinery
def _sample(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _sample_adjoint(grad: torch.Tensor, in_shape: Sequence[int], grid: torch.Tensor) -> torch.Tensor:
    """The exact adjoint of :func:`_sample` with respect to ``values`` (bilinear weights scattered)."""
    placeholder = grad.new_empty(tuple(in_shape))
    out, _ = torch.ops.aten.grid_sampler_2d_backward(grad, placeholder, grid, 0, 0, False, [True, False])
    return out


def _angle_chunks(n_angles: int, per_angle: int) -> Iterator[tuple[int, int]]:
    step = max(1, min(_CHUNK_ANGLES, _CHUNK_SAMPLES // max(1, per_angle)))
    for a0 in range(0, n_angles, step):
        yield a0, min(n_angles, a0 + step)


def _check_source_outside(geometry: Geometry, shape: Sequence[int], pix: tuple[float, float]) -> float:
    """The image's half-diagonal (mm); raises if a fan beam's source lies within it."""
    radius = _half_diagonal_mm(shape, pix)
    if isinstance(geometry, FanBeam) and geometry.source_distance_mm <= radius:
        raise InputError(f"FanBeam.source_distance_mm: {geometry.source_distance_mm:g} mm puts the source inside "
                         f"the image (half-diagonal {radius:.1f} mm); expected a larger distance")
    return radius


class _RayOperator:
    """Ray-driven projector ``(B, H, W) -> (B, A, D)``: bilinear samples along each ray, summed times the step."""

    def __init__(self, geometry: Geometry, image_shape: Sequence[int], pix: tuple[float, float], ray_step: float):
        self.geometry, self.shape, self.pix = geometry, tuple(int(s) for s in image_shape), pix
        self.step_mm = ray_step * min(pix)
        radius = _check_source_outside(geometry, self.shape, pix)
        self.half = int(math.ceil(radius / self.step_mm))
        self.n_samples = 2 * self.half + 1

    def _window(self, a0: int, a1: int) -> tuple[int, int, int, int]:
        """Detector elements ``[k0, k1)`` and ray samples ``[m0, m1)`` that can touch the image for the angles
        ``[a0, a1)``: every other sample lies outside the bilinear support of the image and contributes exactly 0,
        so skipping it changes nothing but the time."""
        g, (h, w) = self.geometry, self.shape
        theta = np.asarray(g.angles[a0:a1], dtype=np.float64)[:, None]
        cx = np.array([-1.0, 1.0, -1.0, 1.0])[None] * (w + 1) / 2 * self.pix[1]  # corners of the support (mm)
        cy = np.array([-1.0, -1.0, 1.0, 1.0])[None] * (h + 1) / 2 * self.pix[0]
        c, s = np.cos(theta), np.sin(theta)
        along_s, along_t = cx * c + cy * s, cx * s - cy * c
        if isinstance(g, ParallelBeam):
            u, t_lo, t_hi = along_s, along_t.min(), along_t.max()
        else:
            dso = g.source_distance_mm
            u = dso * along_s / (dso + along_t) * g.magnification
            sx, sy = -dso * s[:, 0], dso * c[:, 0]  # source positions
            gap = np.hypot(np.maximum(np.abs(sx) - cx.max(), 0), np.maximum(np.abs(sy) - cy.max(), 0))
            far = np.sqrt((cx - sx[:, None]) ** 2 + (cy - sy[:, None]) ** 2).max()
            t_lo, t_hi = gap.min() - dso, far - dso  # distances from the source, relative to dso
        centre = (g.n_detectors - 1) / 2
        k0 = max(0, int(math.floor(u.min() / g.detector_spacing_mm + centre)))
        k1 = min(g.n_detectors, int(math.ceil(u.max() / g.detector_spacing_mm + centre)) + 1)
        m0 = max(0, int(math.floor(t_lo / self.step_mm)) + self.half)
        m1 = min(self.n_samples, int(math.ceil(t_hi / self.step_mm)) + self.half + 1)
        return k0, max(k0, k1), m0, max(m0, m1)

    def _grid(self, a0: int, a1: int, window: tuple[int, int, int, int], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        g, (h, w) = self.geometry, self.shape
        k0, k1, m0, m1 = window
        # per ray (angle, element): the first sample and the step, in mm (float64, small arrays) ...
        theta = torch.tensor(g.angles[a0:a1], device=device, dtype=torch.float64)[:, None]
        u = (torch.arange(k0, k1, device=device, dtype=torch.float64) - (g.n_detectors - 1) / 2)[None, :]
        u = u * g.detector_spacing_mm
        c, s = torch.cos(theta), torch.sin(theta)
        t0 = (m0 - self.half) * self.step_mm
        if isinstance(g, ParallelBeam):
            step_s, step_t = torch.zeros_like(u), torch.ones_like(u)  # direction in the (e_s, e_t) frame
            start_s, start_t = u, torch.full_like(u, t0)
        else:
            dso, dsd = g.source_distance_mm, g.source_distance_mm + g.detector_distance_mm
            norm = torch.sqrt(dsd ** 2 + u ** 2)
            step_s, step_t = u / norm, dsd / norm
            start_s, start_t = (dso + t0) * step_s, -dso + (dso + t0) * step_t  # the source is at -dso e_t
        step_s, step_t = step_s * self.step_mm, step_t * self.step_mm
        # ... as grid_sample coordinates. With align_corners=False the normalised coordinate of pixel p is
        # (2 p + 1) / size - 1; with p = (size - 1) / 2 + x / pixel_mm this is x / (size * pixel_mm / 2): the
        # position relative to the half-extent of the image, linear (no offset), so steps map like positions.
        def normalised(along_s: torch.Tensor, along_t: torch.Tensor) -> torch.Tensor:
            x, y = along_s * c + along_t * s, along_s * s - along_t * c
            return torch.stack((x * (2 / (w * self.pix[1])), y * (-2 / (h * self.pix[0]))), dim=-1)

        start = normalised(start_s, start_t).to(dtype)  # (Ac, Dc, 2)
        step = normalised(step_s, step_t).to(dtype)
        m = torch.arange(m1 - m0, device=device, dtype=dtype)[None, None, :, None]
        grid = torch.addcmul(start[:, :, None, :], m, step[:, :, None, :])  # (Ac, Dc, Tc, 2), one pass
        return grid.reshape(1, (a1 - a0) * (k1 - k0), m1 - m0, 2)

    def _chunks(self, batch: int) -> Iterator[tuple[int, int, tuple[int, int, int, int]]]:
        g = self.geometry
        for a0, a1 in _angle_chunks(g.n_angles, batch * g.n_detectors * self.n_samples):
            window = self._window(a0, a1)
            if window[1] > window[0] and window[3] > window[2]:
                yield a0, a1, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = x.new_zeros((b, self.geometry.n_angles, self.geometry.n_detectors))
        for a0, a1, (k0, k1, m0, m1) in self._chunks(b):
            grid = self._grid(a0, a1, (k0, k1, m0, m1), x.device, x.dtype)
            vals = _sample(x[None], grid)  # (1, B, Ac * Dc, Tc)
            out[:, a0:a1, k0:k1] = vals.sum(-1).reshape(b, a1 - a0, k1 - k0) * self.step_mm
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        b = y.shape[0]
        out = y.new_zeros((b, *self.shape))
        for a0, a1, (k0, k1, m0, m1) in self._chunks(b):
            grid = self._grid(a0, a1, (k0, k1, m0, m1), y.device, y.dtype)
            rays = (a1 - a0) * (k1 - k0)
            grad = (y[:, a0:a1, k0:k1] * self.step_mm).reshape(1, b, rays, 1).expand(1, b, rays, m1 - m0)
            out += _sample_adjoint(grad, (1, b, *self.shape), grid)[0]
        return out


class _PixelBackprojector:
    """Pixel-driven weighted back-projection ``(B, A, D) -> (B, H, W)`` (linear interpolation on the detector),
    times ``pi / A``: the back-projection step of FBP."""

    def __init__(self, geometry: Geometry, image_shape: Sequence[int], pix: tuple[float, float]):
        self.geometry, self.shape, self.pix = geometry, tuple(int(s) for s in image_shape), pix
        _check_source_outside(geometry, self.shape, pix)
        self.scale = math.pi / geometry.n_angles

    def _grid(self, a0: int, a1: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        g, (h, w) = self.geometry, self.shape
        theta = torch.tensor(g.angles[a0:a1], device=device, dtype=torch.float64)[:, None, None]
        c, s = torch.cos(theta).to(dtype), torch.sin(theta).to(dtype)
        y = (((h - 1) / 2 - torch.arange(h, device=device, dtype=dtype)) * self.pix[0])[None, :, None]
        x = ((torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2) * self.pix[1])[None, None, :]
        # detector position u (mm) -> grid x = u / (D * du / 2) (align_corners=False, centred detector; see
        # _RayOperator._grid); the grid's y is 0: the input has height 1
        grid = torch.zeros((a1 - a0, h, w, 2), device=device, dtype=dtype)
        if isinstance(g, ParallelBeam):
            scale = 2.0 / (g.detector_spacing_mm * g.n_detectors)
            grid[..., 0] = torch.addcmul(y * (s * scale), x, c * scale)  # u = x cos + y sin
            return grid, None
        dso = g.source_distance_mm
        dist = torch.addcmul(dso - y * c, x, s)  # distance from the source along the central ray
        along_s = torch.addcmul(y * s, x, c)
        du = g.detector_spacing_mm / g.magnification  # pitch of the virtual detector through the centre
        grid[..., 0] = (along_s / dist) * (2 * dso / (du * g.n_detectors))  # u = dso along_s / dist
        weight = (dso / dist) ** 2 * self.scale
        return grid, weight[:, None]  # (Ac, 1, H, W)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b = q.shape[0]
        g = self.geometry
        out = q.new_zeros((b, *self.shape))
        for a0, a1 in _angle_chunks(g.n_angles, b * self.shape[0] * self.shape[1]):
            grid, weight = self._grid(a0, a1, q.device, q.dtype)
            vals = _sample(q[:, a0:a1].transpose(0, 1)[:, :, None, :], grid)  # (Ac, B, H, W)
            out += (vals * weight).sum(0) if weight is not None else vals.sum(0) * self.scale
        return out

    def adjoint(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        g = self.geometry
        out = x.new_empty((b, g.n_angles, g.n_detectors))
        for a0, a1 in _angle_chunks(g.n_angles, b * self.shape[0] * self.shape[1]):
            grid, weight = self._grid(a0, a1, x.device, x.dtype)
            if weight is None:
                grad = (x * self.scale)[None].expand(a1 - a0, b, *self.shape)
            else:
                grad = x[None] * weight
            vals = _sample_adjoint(grad, (a1 - a0, b, 1, g.n_detectors), grid)  # (Ac, B, 1, D)
            out[:, a0:a1] = vals[:, :, 0].transpose(0, 1)
        return out


class _Linear(torch.autograd.Function):
    """Applies a linear operator (or its adjoint); the gradient is the other one, so autograd is exact and
    nothing but the operator is kept for the backward pass."""

    @staticmethod
    def forward(ctx: Any, inp: torch.Tensor, op: Any, transpose: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.transpose = op, transpose
        return op.adjoint(inp) if transpose else op.forward(inp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:  # type: ignore[override]
        return _Linear.apply(grad.contiguous(), ctx.op, not ctx.transpose), None, None


# ------------------------------------------------------------------------------------------ input checks
def _as_batch(t: Any, name: str, fn: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{fn}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim not in (2, 3):
        raise InputError(f"{fn}: {name}: expected shape (B, ...) with 3 axes or a single 2-D array, got "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(f"{fn}: {name}: expected a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise InputError(f"{fn}: {name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise InputError(f"{fn}: {name}: contains NaN or Inf")
    return (t[None], True) if t.ndim == 2 else (t, False)


def _ray_step(value: Any, fn: str) -> float:
    v = _positive(value, f"{fn}: ray_step")
    if v > 2:
        raise InputError(f"{fn}: ray_step: expected a step in pixels in (0, 2], got {value!r}")
    return v


def _image_shape(value: Any, fn: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
        ok = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise InputError(f"{fn}: image_shape: expected two positive integers (H, W), got {value!r}")
    return h, w


def _check_sinogram(sino: torch.Tensor, geometry: Geometry, fn: str) -> None:
    if tuple(sino.shape[1:]) != (geometry.n_angles, geometry.n_detectors):
        raise InputError(f"{fn}: sinogram: expected shape (B, {geometry.n_angles}, {geometry.n_detectors}) "
                         f"(n_angles, n_detectors of the geometry), got {tuple(sino.shape)}")


# ------------------------------------------------------------------------------------------- projection
def project(image: torch.Tensor, geometry: Geometry, *, pixel_mm: Any = 1.0, ray_step: float = 0.5) -> torch.Tensor:
    """Forward projection (Radon transform) ``A``: line integrals through a batch of slices.

    Args:
        image: ``(B, H, W)`` or ``(H, W)``, floating point, any device; values per mm give a dimensionless
            sinogram (attenuation), other values give value x mm.
        geometry: :class:`ParallelBeam` or :class:`FanBeam`.
        pixel_mm: pixel size in mm, a number or ``(row_mm, col_mm)`` (keyword-only). Default 1.0.
        ray_step: sample spacing along a ray in pixels (of the smaller pixel size), in (0, 2]. Default 0.5;
            1.0 reproduces scikit-image's ``radon`` sampling.

    Returns:
        ``(B, n_angles, n_detectors)`` (or ``(n_angles, n_detectors)`` for a 2-D input): line integrals in mm x
        image units, same dtype and device as ``image``. Differentiable with respect to ``image``; the gradient
        is :func:`backproject`.

    Raises:
        InputError: a non-tensor, wrong shape, integer dtype, NaN/Inf, or an invalid geometry.
    """
    fn = "project"
    x, squeeze = _as_batch(image, "image", fn)
    _check_geometry(geometry, fn)
    op = _RayOperator(geometry, x.shape[1:], _pixel_pair(pixel_mm, fn), _ray_step(ray_step, fn))
    out = _Linear.apply(x.contiguous(), op, False)
    return out[0] if squeeze else out


def backproject(sinogram: torch.Tensor, geometry: Geometry, *, image_shape: Sequence[int], pixel_mm: Any = 1.0,
                ray_step: float = 0.5) -> torch.Tensor:
    """Back-projection ``A^T``: the exact adjoint of :func:`project` with the same geometry and knobs.

    ``sum(project(x) * y) == sum(x * backproject(y))`` up to floating-point rounding, for any ``x`` and ``y``.
    This is not a reconstruction (use :func:`fbp`); it is the operator for gradients and iterative methods.

    Args:
        sinogram: ``(B, n_angles, n_detectors)`` or ``(n_angles, n_detectors)``, floating point.
        geometry: the geometry of the projection.
        image_shape: ``(H, W)`` of the image (keyword-only).
        pixel_mm: pixel size in mm, a number or ``(row_mm, col_mm)``. Default 1.0.
        ray_step: as in :func:`project`. Default 0.5.

    Returns:
        ``(B, H, W)`` (or ``(H, W)``), same dtype and device. Differentiable; the gradient is :func:`project`.
    """
    fn = "backproject"
    y, squeeze = _as_batch(sinogram, "sinogram", fn)
    _check_geometry(geometry, fn)
    _check_sinogram(y, geometry, fn)
    op = _RayOperator(geometry, _image_shape(image_shape, fn), _pixel_pair(pixel_mm, fn), _ray_step(ray_step, fn))
    out = _Linear.apply(y.contiguous(), op, True)
    return out[0] if squeeze else out


# ------------------------------------------------------------------------------------------------- FBP
def _filter_name(name: Any, fn: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower()) if isinstance(name, str) else None
    if key not in FILTERS:
        raise InputError(f"{fn}: filter: expected one of {', '.join(FILTERS)}, got {name!r}")
    return key


def _frequency_response(n_pad: int, filter_name: str, spacing_mm: float, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Real frequency response (``n_pad // 2 + 1`` rfft bins) of the windowed band-limited ramp: multiplying an
    rfft by it gives the discrete convolution ``spacing * sum_k h(n - k) p(k)`` with ``h`` in 1 / mm**2."""
    n = torch.arange(n_pad, dtype=torch.float64)
    n = torch.where(n > n_pad // 2, n - n_pad, n)  # circular lag
    h = torch.zeros(n_pad, dtype=torch.float64)
    h[0] = 0.25
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * n[odd]) ** 2  # Kak & Slaney (3.61), in units of 1 / spacing**2
    response = torch.fft.rfft(h).real  # h is even, so the response is real; ~ |f| with the right DC value
    f = torch.fft.rfftfreq(n_pad, dtype=torch.float64)  # cycles per element, 0 .. 1/2
    if filter_name == "shepp-logan":
        response = response * torch.sinc(f)
    elif filter_name == "cosine":
        response = response * torch.cos(math.pi * f)
    elif filter_name == "hann":
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * f))
    return (response / spacing_mm).to(device=device, dtype=dtype)


def filter_sinogram(sinogram: torch.Tensor, *, detector_spacing_mm: float, filter: str = "ram-lak") -> torch.Tensor:
    """Ramp-filter every projection along the detector axis (the filtering step of FBP).

    The band-limited ramp of Kak & Slaney (spatial kernel ``h(0) = 1 / (4 d^2)``, ``h(n) = -1 / (pi n d)^2`` for
    odd ``n``, 0 for even ``n``; ``d`` = detector spacing) is multiplied by the window of ``filter`` in the
    frequency domain and applied by FFT on the detector axis zero-padded to a power of two >= ``2 D`` (at least
    64), so the convolution is linear, not circular.

    Args:
        sinogram: ``(B, A, D)`` or ``(A, D)``, floating point.
        detector_spacing_mm: element pitch (mm) of the detector the projections are sampled on (keyword-only).
        filter: one of :data:`FILTERS`. Default ``"ram-lak"``.

    Returns:
        The filtered sinogram, same shape, dtype and device, in (sinogram units) / mm. Differentiable.
    """
    fn = "filter_sinogram"
    y, squeeze = _as_batch(sinogram, "sinogram", fn)
    name = _filter_name(filter, fn)
    du = _positive(detector_spacing_mm, f"{fn}: detector_spacing_mm")
    d = y.shape[-1]
    n_pad = max(64, 1 << int(math.ceil(math.log2(2 * d))))
    response = _frequency_response(n_pad, name, du, y.device, y.dtype)
    spec = torch.fft.rfft(y, n=n_pad, dim=-1) * response
    out = torch.fft.irfft(spec, n=n_pad, dim=-1)[..., :d]
    return out[0] if squeeze else out


def _check_fbp_angles(geometry: Geometry, fn: str) -> None:
    angles = np.sort(np.asarray(geometry.angles, dtype=np.float64))
    n = angles.size
    spans = (2 * math.pi,) if isinstance(geometry, FanBeam) else (math.pi, 2 * math.pi)
    if n >= 2:
        steps = np.diff(angles)
        ok = np.allclose(steps, steps.mean(), rtol=0, atol=1e-6) and \
            any(abs(steps.mean() * n - s) < 1e-5 * s for s in spans)
    else:
        ok = False
    if not ok:
        turn = "a full turn" if isinstance(geometry, FanBeam) else "a half or a full turn"
        raise InputError(f"{fn}: geometry.angles: FBP needs angles uniformly spaced over {turn} (e.g. "
                         f"{type(geometry).__name__}.uniform); got {n} angles")


def fbp_backproject(sinogram: torch.Tensor, geometry: Geometry, *, image_shape: Sequence[int],
                    pixel_mm: Any = 1.0) -> torch.Tensor:
    """The back-projection step of FBP: pixel-driven, linear interpolation on the detector, times ``pi / A``.

    For a fan beam, each pixel reads the projection at its position on the virtual detector through the rotation
    centre and is weighted by ``(source_distance / L)^2`` (``L`` = the pixel's distance from the source along
    the central ray); Kak & Slaney section 3.4.2. Not the adjoint of :func:`project` (see :func:`backproject`).

    Args:
        sinogram: filtered projections ``(B, A, D)`` or ``(A, D)``.
        geometry: the geometry of the projections.
        image_shape: ``(H, W)`` of the output (keyword-only).
        pixel_mm: pixel size in mm, a number or ``(row_mm, col_mm)``. Default 1.0.

    Returns:
        ``(B, H, W)`` (or ``(H, W)``), same dtype and device. Differentiable (the gradient is this operator's
        exact adjoint).
    """
    fn = "fbp_backproject"
    q, squeeze = _as_batch(sinogram, "sinogram", fn)
    _check_geometry(geometry, fn)
    _check_sinogram(q, geometry, fn)
    op = _PixelBackprojector(geometry, _image_shape(image_shape, fn), _pixel_pair(pixel_mm, fn))
    out = _Linear.apply(q.contiguous(), op, False)
    return out[0] if squeeze else out


def fbp(sinogram: torch.Tensor, geometry: Geometry, *, image_shape: Sequence[int], pixel_mm: Any = 1.0,
        filter: str = "ram-lak") -> torch.Tensor:
    """Filtered back-projection: reconstruct slices from their (parallel or flat-detector fan) sinograms.

    Parallel beam: :func:`filter_sinogram` then :func:`fbp_backproject`. Fan beam (full turn): each projection is
    rescaled to the virtual detector through the rotation centre (pitch ``detector_spacing / magnification``),
    weighted by ``source_distance / sqrt(source_distance^2 + u^2)``, filtered, and back-projected with the
    distance weights (Kak & Slaney 3.4.2). The angles must be uniformly spaced over a half or full turn
    (parallel) or a full turn (fan).

    Args:
        sinogram: ``(B, n_angles, n_detectors)`` or ``(n_angles, n_detectors)``: line integrals (as
            :func:`project` makes them, in mm x image units).
        geometry: :class:`ParallelBeam` or :class:`FanBeam`.
        image_shape: ``(H, W)`` of the reconstruction (keyword-only); the grid is centred on the rotation
            centre, as in :func:`project`.
        pixel_mm: pixel size in mm, a number or ``(row_mm, col_mm)``. Default 1.0.
        filter: reconstruction kernel, one of :data:`FILTERS` (sharp ``"ram-lak"`` ... soft ``"hann"``).
            Default ``"ram-lak"``.

    Returns:
        ``(B, H, W)`` (or ``(H, W)``): the image in the units of ``project``'s input, same dtype and device.
        Differentiable with respect to the sinogram.

    Raises:
        InputError: bad tensor, sinogram shape not matching the geometry, angles not uniform over the needed
            turn, unknown filter.
    """
    fn = "fbp"
    q, squeeze = _as_batch(sinogram, "sinogram", fn)
    _check_geometry(geometry, fn)
    _check_sinogram(q, geometry, fn)
    _check_fbp_angles(geometry, fn)
    shape = _image_shape(image_shape, fn)
    pix = _pixel_pair(pixel_mm, fn)
    if isinstance(geometry, FanBeam):
        du = geometry.detector_spacing_mm / geometry.magnification
        k = torch.arange(geometry.n_detectors, device=q.device, dtype=torch.float64)
        u = (k - (geometry.n_detectors - 1) / 2) * du
        dso = geometry.source_distance_mm
        q = q * (dso / torch.sqrt(dso ** 2 + u ** 2)).to(q.dtype)
    else:
        du = geometry.detector_spacing_mm
    filtered = filter_sinogram(q, detector_spacing_mm=du, filter=filter)
    op = _PixelBackprojector(geometry, shape, pix)
    out = _Linear.apply(filtered.contiguous(), op, False)
    return out[0] if squeeze else out


# ------------------------------------------------------------------------------------------ acquisition
def hu_to_mu(hu: torch.Tensor, *, mu_water_per_mm: float = MU_WATER_PER_MM) -> torch.Tensor:
    """Hounsfield units -> linear attenuation (1/mm): ``mu_water * (1 + HU / 1000)``, clipped at 0."""
    return torch.clamp(mu_water_per_mm * (1 + hu / 1000.0), min=0.0)


def mu_to_hu(mu: torch.Tensor, *, mu_water_per_mm: float = MU_WATER_PER_MM) -> torch.Tensor:
    """Linear attenuation (1/mm) -> Hounsfield units: ``1000 * (mu / mu_water - 1)`` (no clipping)."""
    return 1000.0 * (mu / mu_water_per_mm - 1.0)


def acquisition_geometry(image_shape: Sequence[int], *, pixel_mm: Any = 1.0, n_angles: int | None = None,
                         geometry: str = "parallel", source_distance_mm: float = 595.0,
                         detector_distance_mm: float = 490.0) -> Geometry:
    """The scanner geometry :func:`simulate_acquisition` uses for slices of ``image_shape``.

    Parallel beam: ``n_angles`` views over a half turn, :func:`default_n_detectors` elements of the (smaller)
    pixel size. Fan beam: a flat detector at ``source_distance_mm`` / ``detector_distance_mm`` (defaults 595 /
    490 mm, a typical clinical scanner), ``n_angles`` views over a full turn, elements that cover one pixel at
    the rotation centre. ``n_angles=None``: :func:`default_n_angles`.
    """
    fn = "acquisition_geometry"
    shape = _image_shape(image_shape, fn)
    pix = _pixel_pair(pixel_mm, fn)
    if n_angles is not None:
        n_angles = _count(n_angles, f"{fn}: n_angles", 2)
    if geometry == "parallel":
        n_det = default_n_detectors(shape, pixel_mm=pix)
        return ParallelBeam.uniform(n_angles or default_n_angles(n_det), n_det, detector_spacing_mm=min(pix))
    if geometry == "fan":
        dso = _positive(source_distance_mm, f"{fn}: source_distance_mm")
        ddet = float(detector_distance_mm)
        n_det = default_n_detectors(shape, pixel_mm=pix, geometry="fan", source_distance_mm=dso,
                                    detector_distance_mm=ddet)
        return FanBeam.uniform(n_angles or default_n_angles(n_det, full_turn=True), n_det,
                               detector_spacing_mm=min(pix) * (dso + ddet) / dso, source_distance_mm=dso,
                               detector_distance_mm=ddet)
    raise InputError(f"{fn}: geometry: expected 'parallel' or 'fan', got {geometry!r}")


def simulate_acquisition(hu_slices: Any, *, dose_photons: float | None, kernel: str = "ram-lak",
                         n_angles: int | None = None, beam_hardening: float = 0.0,
                         generator: torch.Generator | Sequence[torch.Generator] | None, pixel_mm: Any = 1.0,
                         mu_water_per_mm: float = MU_WATER_PER_MM, geometry: str = "parallel",
                         source_distance_mm: float = 595.0, detector_distance_mm: float = 490.0,
                         ray_step: float = 1.0) -> Any:
    """Pass slices through a simulated CT scan: their noise, streaks and sharpness become those of the scan.

    Steps: HU -> attenuation ``mu = mu_water (1 + HU/1000)`` (clipped at 0) -> line integrals ``p``
    (:func:`project`, path lengths in mm, so ``p`` is dimensionless) -> optional beam hardening
    ``p <- log(1 + b p) / b`` (a polychromatic beam attenuates long paths less than the monochromatic model says;
    left uncorrected it gives cupping and dark streaks between dense objects) -> transmission
    ``I = Poisson(I0 exp(-p))`` and ``p = -log(max(I, 1) / I0)`` (photon starvation clips at one photon) ->
    :func:`fbp` with ``kernel`` -> HU, on the input grid (geometry: :func:`acquisition_geometry`). Noise scales
    like ``1 / sqrt(I0)``; sharper kernels give finer and stronger noise.

    Args:
        hu_slices: ``(B, H, W)`` or ``(H, W)`` HU, a floating-point torch tensor or a numpy array (the result has
            the same type; numpy inputs are computed in float32 on the CPU).
        dose_photons: ``I0``, incident photons per detector element and view (keyword-only); ``None`` = no
            noise (then only the kernel, the sampling and the beam hardening act). Typical 1e4 .. 1e6.
        kernel: the FBP filter, one of :data:`FILTERS`. Default ``"ram-lak"``.
        n_angles: views; default :func:`default_n_angles` of the detector.
        beam_hardening: ``b >= 0`` of the nonlinearity (0 = off). Default 0; 0.01 gives about 30 HU of cupping
            in a 320 x 220 mm water-like abdomen.
        generator: the noise's ``torch.Generator`` (on the slices' device), or a sequence of ``B`` of them, one
            per slice (then slice ``i``'s noise depends on ``generator[i]`` alone) (keyword-only, required unless
            ``dose_photons`` is None).
        pixel_mm: in-plane pixel size in mm, number or ``(row_mm, col_mm)``. Default 1.0.
        mu_water_per_mm: attenuation of water (1/mm). Default :data:`MU_WATER_PER_MM` (0.019, about 70 keV).
        geometry: ``"parallel"`` (half turn) or ``"fan"`` (flat detector, full turn). Default ``"parallel"``.
        source_distance_mm: fan beam only: source to rotation centre. Default 595.
        detector_distance_mm: fan beam only: rotation centre to detector. Default 490.
        ray_step: sample spacing along rays in pixels. Default 1.0.

    Returns:
        HU slices of the input's shape and type (float; not rounded or clipped).

    Raises:
        InputError: bad slices, non-positive dose, unknown kernel or geometry, negative beam hardening, missing
            or mismatched generators.
    """
    fn = "simulate_acquisition"
    is_numpy = isinstance(hu_slices, np.ndarray)
    if is_numpy:
        if not np.issubdtype(hu_slices.dtype, np.number):
            raise InputError(f"{fn}: hu_slices: expected a numeric array, got {hu_slices.dtype}")
        hu = torch.from_numpy(np.ascontiguousarray(hu_slices, dtype=np.float32))
    else:
        hu = hu_slices
    hu, squeeze = _as_batch(hu, "hu_slices", fn)
    kernel = _filter_name(kernel, fn)
    gens: list[torch.Generator] = []
    if dose_photons is not None:
        dose = _positive(dose_photons, f"{fn}: dose_photons")
        gens = [generator] if isinstance(generator, torch.Generator) else \
            list(generator) if isinstance(generator, (list, tuple)) else []
        if not gens or not all(isinstance(g, torch.Generator) for g in gens):
            raise InputError(f"{fn}: generator: expected a torch.Generator or a list of them (the noise must be "
                             f"reproducible), got {type(generator).__name__}")
        if len(gens) > 1 or isinstance(generator, (list, tuple)):
            if len(gens) != hu.shape[0]:
                raise InputError(f"{fn}: generator: expected one generator per slice ({hu.shape[0]}), got "
                                 f"{len(gens)}")
        if any(g.device.type != hu.device.type for g in gens):
            raise InputError(f"{fn}: generator: on {gens[0].device}, the slices are on {hu.device}")
    if isinstance(beam_hardening, bool) or not isinstance(beam_hardening, (int, float)) or \
            not math.isfinite(beam_hardening) or beam_hardening < 0:
        raise InputError(f"{fn}: beam_hardening: expected a finite number >= 0, got {beam_hardening!r}")
    mu_w = _positive(mu_water_per_mm, f"{fn}: mu_water_per_mm")
    pix = _pixel_pair(pixel_mm, fn)
    shape = tuple(hu.shape[1:])
    geom = acquisition_geometry(shape, pixel_mm=pix, n_angles=n_angles, geometry=geometry,
                                source_distance_mm=source_distance_mm, detector_distance_mm=detector_distance_mm)

    with torch.no_grad():
        p = project(hu_to_mu(hu, mu_water_per_mm=mu_w), geom, pixel_mm=pix, ray_step=ray_step)
        if beam_hardening > 0:
            p = torch.log1p(beam_hardening * p) / beam_hardening
        if dose_photons is not None:
            expected = dose * torch.exp(-p)
            if len(gens) == 1 and isinstance(generator, torch.Generator):
                counts = torch.poisson(expected, generator=gens[0])
            else:
                counts = torch.stack([torch.poisson(expected[i], generator=g) for i, g in enumerate(gens)])
            p = -torch.log(torch.clamp(counts, min=1.0) / dose)
        rec = fbp(p, geom, image_shape=shape, pixel_mm=pix, filter=kernel)
        out = mu_to_hu(rec, mu_water_per_mm=mu_w)
    out = out[0] if squeeze else out
    return out.numpy() if is_numpy else out
