"""Simulated CT acquisition for the cohort maker (an option, off by default).

A network trained on a cohort made from one scan learns that scan's noise texture, reconstruction kernel and
dose. This option passes every subject, axial slice by axial slice, through a simulated scan
(:func:`preprocessing.ct.simulate_acquisition`): HU -> attenuation -> parallel-beam (or fan-beam) projection ->
beam-hardening-like nonlinearity -> Poisson noise at a photon count -> filtered back-projection with a kernel ->
HU. Per subject it draws, from the subject's ``numpy.random.Generator``:

- the dose ``I0`` (photons per detector element and view), log-uniform in :attr:`AcquisitionConfig.dose_photons`;
- the kernel, uniformly among :attr:`AcquisitionConfig.kernels` (ram-lak sharp ... hann soft);
- the beam-hardening coefficient, uniform in :attr:`AcquisitionConfig.beam_hardening`;
- a 63-bit seed for the noise; slice ``k`` draws its noise from a ``torch.Generator`` seeded with
  ``(seed, k)``, so the result depends on the seed alone (not on ``slices_per_batch`` or the thread count).

Its benefit on registration has been measured (two fine-tuning arms, ``pipelines/acquisition-benefit.toml``): it
is small and within the spread over scans, so the option stays off by default; the figures and the design are
in docs/ct.md ("Benefit").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from preprocessing.cohort import HU_MAX, HU_MIN
from slicreg.conventions import Volume, spacing_from_affine
from slicreg.errors import InputError

__all__ = ["PRESETS", "AcquisitionConfig", "AcquisitionParams", "sample_acquisition", "simulate_volume",
           "apply_to_subject"]

PRESETS: dict[str, dict[str, Any]] = {
    "off": {"enabled": False},
    # the defaults: every subject its own dose (5e4..1e6 photons), kernel (any of the four) and beam hardening
    "varied": {},
    # a low-dose scan with a sharp kernel from a fan-beam scanner: below the dose range of "varied", with more beam
    # hardening and another geometry -- meant for the TEST subjects, an acquisition the training never saw
    "low-dose-sharp": {"dose_photons": (2e4, 5e4), "kernels": ("ram-lak",), "beam_hardening": (0.01, 0.015),
                       "geometry": "fan"},
    # a standard-dose scan with a soft kernel (the quiet end of "varied")
    "standard-soft": {"dose_photons": (3e5, 1e6), "kernels": ("hann",), "beam_hardening": (0.0, 0.005)},
}
"""Named acquisitions (:meth:`AcquisitionConfig.from_value` takes the names): field values over the defaults."""

def _range(value: Any, name: str, *, positive: bool = False) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"AcquisitionConfig.{name}: expected two numbers [low, high], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo or (positive and lo <= 0):
        bound = "0 < low" if positive else "0 <= low"
        raise InputError(f"AcquisitionConfig.{name}: expected {bound} <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class AcquisitionConfig:
    """Knobs of the simulated acquisition (all have defaults; the option is off unless ``enabled``).

    Args:
        enabled: apply the simulation. Default False.
        dose_photons: range of ``I0`` (photons per detector element and view), drawn log-uniformly. Default
            (5e4, 1e6): at 2 mm pixels this gives a noise SD of about 10-50 HU (ram-lak) or 5-20 HU (hann) in a
            water-like abdomen of 320 x 220 mm (measured, docs/ct.md).
        kernels: FBP filters to choose from, uniformly (names of :data:`preprocessing.ct.FILTERS`). Default all four.
        beam_hardening: range of the coefficient ``b`` of ``p -> log(1 + b p) / b``, drawn uniformly. Default
            (0, 0.01): up to about 30 HU of cupping in the abdomen.
        n_angles: views per half turn (parallel) or full turn (fan); ``None`` = the sampling rule
            ``ceil(pi/2 x detector elements)`` (:func:`preprocessing.ct.default_n_angles`). Default None.
        geometry: ``"parallel"`` or ``"fan"`` (flat detector, 595 / 490 mm). Default ``"parallel"``.
        mu_water_per_mm: attenuation of water (1/mm). Default 0.019.
        slices_per_batch: axial slices reconstructed together (memory vs speed; the result does not depend
            on it). Default 32.
    """

    enabled: bool = False
    dose_photons: tuple[float, float] = (5e4, 1e6)
    kernels: tuple[str, ...] = ("ram-lak", "shepp-logan", "cosine", "hann")
    beam_hardening: tuple[float, float] = (0.0, 0.01)
    n_angles: int | None = None
    geometry: str = "parallel"
    mu_water_per_mm: float = 0.019
    slices_per_batch: int = 32

    def __post_init__(self) -> None:
        from preprocessing.ct import FILTERS

        if not isinstance(self.enabled, bool):
            raise InputError(f"AcquisitionConfig.enabled: expected true or false, got {self.enabled!r}")
        object.__setattr__(self, "dose_photons", _range(self.dose_photons, "dose_photons", positive=True))
        object.__setattr__(self, "beam_hardening", _range(self.beam_hardening, "beam_hardening"))
        kernels = (self.kernels,) if isinstance(self.kernels, str) else self.kernels
        try:
            kernels = tuple(str(k) for k in kernels)
        except TypeError:
            kernels = ()
        if not kernels or any(k not in FILTERS for k in kernels):
            raise InputError(f"AcquisitionConfig.kernels: expected a non-empty list of {', '.join(FILTERS)}, got "
                             f"{self.kernels!r}")
        object.__setattr__(self, "kernels", kernels)
        if self.n_angles is not None and (isinstance(self.n_angles, bool) or not isinstance(self.n_angles, int)
                                          or self.n_angles < 2):
            raise InputError(f"AcquisitionConfig.n_angles: expected an integer >= 2 or null, got {self.n_angles!r}")
        if self.geometry not in ("parallel", "fan"):
            raise InputError(f"AcquisitionConfig.geometry: expected 'parallel' or 'fan', got {self.geometry!r}")
        mu = self.mu_water_per_mm
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
            raise InputError(f"AcquisitionConfig.mu_water_per_mm: expected a positive number, got {mu!r}")
        spb = self.slices_per_batch
        if isinstance(spb, bool) or not isinstance(spb, int) or spb < 1:
            raise InputError(f"AcquisitionConfig.slices_per_batch: expected an integer >= 1, got {spb!r}")

    @classmethod
    def from_value(cls, value: Any, *, name: str = "acquisition") -> AcquisitionConfig:
        """From a stage parameter or a command-line value.

        Args:
            value: ``None`` or ``False`` = off; ``True`` = on with the defaults; a name of :data:`PRESETS`
                (``"off"``, ``"varied"``, ``"low-dose-sharp"``, ``"standard-soft"``); a mapping = these fields
                (``enabled`` defaults to True in a mapping), optionally over a preset named by its key
                ``"preset"``. An unknown name or key raises :class:`InputError`.
            name: what to call the value in error messages (keyword-only). Default ``"acquisition"``.
        """
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(enabled=True)
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, Mapping):
            raise InputError(f"{name}: expected null, true, false, a preset name ({', '.join(PRESETS)}) or a table "
                             f"of AcquisitionConfig fields, got {value!r}")
        values = dict(value)
        preset = values.pop("preset", None)
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise InputError(f"{name}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
            values = {"enabled": True, **PRESETS[preset], **values}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{name}: unknown AcquisitionConfig parameter(s) {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        values.setdefault("enabled", True)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class AcquisitionParams:
    """What was drawn for one subject (recorded in its summary)."""

    dose_photons: float
    kernel: str
    beam_hardening: float
    noise_seed: int

    def to_json(self) -> dict[str, Any]:
        return {"dose_photons": round(self.dose_photons, 1), "kernel": self.kernel,
                "beam_hardening": round(self.beam_hardening, 6), "noise_seed": self.noise_seed}


def sample_acquisition(rng: np.random.Generator, config: AcquisitionConfig) -> AcquisitionParams:
    """Draw one subject's dose, kernel, beam hardening and noise seed from ``rng`` (4 draws, in this order)."""
    if not isinstance(rng, np.random.Generator):
        raise InputError(f"sample_acquisition: rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    lo, hi = config.dose_photons
    dose = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    kernel = config.kernels[int(rng.integers(len(config.kernels)))]
    bh = float(rng.uniform(*config.beam_hardening))
    seed = int(rng.integers(0, 2 ** 63 - 1))
    return AcquisitionParams(dose, kernel, bh, seed)


def simulate_volume(image_hu: np.ndarray, params: AcquisitionParams, *, pixel_mm: tuple[float, float],
                    config: AcquisitionConfig | None = None, device: Any = "cpu") -> np.ndarray:
    """Simulate the acquisition of every slice ``image_hu[:, :, k]`` (axial for the cohort's RAS grids).

    Slice ``k``'s noise comes from a ``torch.Generator`` seeded with ``(params.noise_seed, k)``.

    Args:
        image_hu: ``(X, Y, Z)`` HU, any numeric dtype.
        params: from :func:`sample_acquisition`.
        pixel_mm: in-plane spacing ``(x_mm, y_mm)`` of the first two axes (keyword-only).
        config: the knobs (``n_angles``, ``geometry``, ``mu_water_per_mm``, ``slices_per_batch``); default
            :class:`AcquisitionConfig` ().
        device: torch device of the computation. Default ``"cpu"``.

    Returns:
        ``(X, Y, Z)`` float32 HU (not rounded or clipped).
    """
    import torch

    from preprocessing.ct import simulate_acquisition

    config = config or AcquisitionConfig()
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3 or min(image_hu.shape) < 1 or not np.issubdtype(image_hu.dtype, np.number):
        raise InputError(f"simulate_volume: image_hu: expected a numeric (X, Y, Z) array, got shape "
                         f"{image_hu.shape}, dtype {image_hu.dtype}")
    device = torch.device(device)
    slices = np.moveaxis(image_hu, 2, 0)  # (Z, X, Y): rows = X, columns = Y
    out = np.empty(slices.shape, dtype=np.float32)
    for z0 in range(0, slices.shape[0], config.slices_per_batch):
        z1 = min(slices.shape[0], z0 + config.slices_per_batch)
        batch = torch.from_numpy(np.ascontiguousarray(slices[z0:z1], dtype=np.float32)).to(device)
        gens = []
        for k in range(z0, z1):
            state = np.random.SeedSequence([params.noise_seed, k]).generate_state(2, dtype=np.uint32)
            gens.append(torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1))
        rec = simulate_acquisition(batch, dose_photons=params.dose_photons, kernel=params.kernel,
                                   n_angles=config.n_angles, beam_hardening=params.beam_hardening, generator=gens,
                                   pixel_mm=pixel_mm, mu_water_per_mm=config.mu_water_per_mm,
                                   geometry=config.geometry)
        out[z0:z1] = rec.cpu().numpy()
    return np.moveaxis(out, 0, 2)


def apply_to_subject(image: Volume, rng: np.random.Generator,
                     config: AcquisitionConfig | None = None) -> tuple[Volume, dict[str, Any]]:
    """The cohort's hook: pass one subject's image through a simulated acquisition drawn from ``rng``.

    Args:
        image: the subject's image (``(X, Y, Z)`` HU, slices along the third axis, any numeric dtype).
        rng: the generator of this subject's acquisition (4 draws, :func:`sample_acquisition`). Pass one of its
            own, e.g. ``numpy.random.default_rng([seed, index, 1])``, so that switching the option on does not
            change the rest of the subject.
        config: the knobs; default :class:`AcquisitionConfig` () -- which is *off*: then the image is returned
            unchanged and ``rng`` is not used.

    Returns:
        ``(volume, info)``: the new image on the same grid (int16 inputs stay int16, rounded and clipped to
        -1024..3071 HU; float inputs give float32) and ``info`` = ``{"enabled": ...}`` plus the drawn
        parameters.
    """
    config = config or AcquisitionConfig()
    if not isinstance(image, Volume):
        raise InputError(f"apply_to_subject: image: expected a slicreg.conventions.Volume, got "
                         f"{type(image).__name__}")
    if not config.enabled:
        return image, {"enabled": False}
    if image.array.ndim != 3:
        raise InputError(f"apply_to_subject: image: expected a single-channel (X, Y, Z) volume, got shape "
                         f"{image.array.shape}")
    params = sample_acquisition(rng, config)
    spacing = spacing_from_affine(image.affine)
    hu = simulate_volume(image.array, params, pixel_mm=(float(spacing[0]), float(spacing[1])), config=config)
    if np.issubdtype(image.array.dtype, np.integer):
        arr = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(image.array.dtype)
    else:
        arr = hu.astype(np.float32)
    info = {"enabled": True, **params.to_json()}
    return Volume(arr, image.affine, dict(image.meta)), info
