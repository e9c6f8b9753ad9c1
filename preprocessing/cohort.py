"""The cohort maker: a labelled synthetic cohort made from one real CT, with known correspondences.

Each subject ``s`` is the source scan seen through a random, anatomically plausible map
``T_s``: subject world (mm) -> source world (mm). Its image at world position ``x`` is the source at ``T_s(x)``:

    ``I_s(x) = contrast(source)(T_s(x))`` followed by blur, a global HU offset and CT-like noise,
    ``L_s(x) = labels(T_s(x))`` (organ ids, BTCV numbering).

``T_s = phi_s o A_s`` where

- ``A_s`` (:attr:`SubjectTransform.prewarp`) is a global affine: the subject's body is the source body scaled
  anisotropically along the patient axes (+-``max_scale``), rotated (up to ``max_rotation_deg`` about the R-L,
  A-P and S-I axes) about the body centre and translated (+-``max_translation_mm``);
- ``phi_s = exp(v_s)`` is a diffeomorphism of source world space, the flow of a *stationary velocity field*
  ``v_s`` integrated by scaling and squaring (:func:`slicreg.fields.scaling_and_squaring`). ``v_s`` is the sum of a
  smooth random field (Gaussian-filtered noise, largest length inside the body ``deform_mm`` x U(0.5, 1)) and organ
  motions: size changes ``-ln(k) (y - c)`` (``k`` in 1 +- ``organ_scale`` for liver, spleen and stomach, ``c`` the
  organ's centroid) and shifts ``-t`` (kidneys, spleen, stomach), each weighted by a smooth organ weight that is 1 on
  the organ and as far around it as its boundary moves, and averaged where weights of neighbouring organs overlap.
  Where an organ's weight is 1 the flow is exactly the scaling ``y -> c + (y - c) / k``, so the subject's organ is
  ``k`` times larger. The sum is tapered to zero at the border of the grid holding ``v``
  (:attr:`SubjectTransform.grid_affine`: the source's field of view plus 60 mm, ``velocity_spacing_mm`` nodes).
  ``phi_s^-1`` is ``exp(-v_s)`` refined to the exact inverse of the (trilinearly interpolated) ``phi_s``: by
  fixed-point steps at the grid nodes, and again at every point where it is used
  (:meth:`SubjectTransform.from_source`); ``|phi(phi^-1(y)) - y|`` is measured per subject and recorded in its
  info (docs/cohort.md, "Checks").

The true correspondence between two subjects follows: fixed voxel ``p`` of subject ``f`` corresponds to the
moving voxel ``M_m^-1 T_m^-1 T_f M_f p`` of subject ``m`` (``M`` = the grids' voxel -> world affines), which
:func:`true_field` returns as a displacement field in the project's convention (voxels of the fixed grid,
fixed -> moving), so that ``warp_labels(moving_labels, u)`` reproduces the fixed labels.

Intensity: a contrast phase (native / arterial / portal-venous) adds enhancement to vessels, kidneys, liver,
spleen, pancreas and adrenals in source space (smoothed label masks, only where the tissue is soft-tissue
like); then trilinear resampling to the subject grid, a Gaussian blur, a global HU offset and spatially
correlated Gaussian noise; images are rounded to int16 HU. Labels are resampled by a trilinear vote (the
label with the largest summed trilinear weight among the 8 neighbours; equals nearest neighbour at the
source voxels, smoother than it in between).

Field of view: each subject's grid is a 2 mm RAS grid (``spacing_mm``) with a square in-plane extent around
its deformed body and a random cranio-caudal extent. The source scan ends inside the body cranially and
caudally; where those planes land in a subject (tilted and bent by ``T_s``) the subject's grid is cut so that
no slice shows a half-missing body. Outside the source's field of view images are air (-1000 HU) and labels
background. Some test subjects are thin slabs (``slab_mm``, default 40 mm) of the upper abdomen.

Everything is a pure function of arrays (numpy in, numpy out; torch inside for sampling) and of a
``numpy.random.Generator``; the files are written by the ``cohort`` stage / ``slicreg cohort``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.fields import sample, sample_affine, scaling_and_squaring
from slicreg.grid import Grid
from slicreg.grid import map_points as _affine_points  # this module's map_points maps subject worlds
from slicreg.labels import BTCV_IDS

__all__ = [
    "PHASES",
    "ENHANCEMENT_HU",
    "SCALED_ORGANS",
    "SHIFTED_ORGANS",
    "TRANSFORM_FORMAT",
    "CohortConfig",
    "SourceScan",
    "SubjectParams",
    "SubjectTransform",
    "Subject",
    "prepare_source",
    "sample_subject_params",
    "prewarp_affine",
    "build_velocity",
    "invert_displacement",
    "make_subject",
    "true_field",
    "map_points",
    "resample_labels_world",
    "initial_dice",
    "soft_tissue_centre_mm",
    "registration_pairs",
    "subject_ids",
]

AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071  # the usual CT range stored in int16 files

PHASES: tuple[str, ...] = ("native", "arterial", "portal-venous")
"""Contrast phases, in the order of :attr:`CohortConfig.phase_probabilities`."""

# Enhancement groups: BTCV ids and (optional) TotalSegmentator "total" ids whose voxels enhance together.
ENHANCEMENT_GROUPS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "arteries": ((8,), (65, 66)),  # aorta; iliac arteries
    "veins": ((9,), (67, 68)),  # inferior vena cava; iliac veins
    "portal": ((10,), ()),  # portal and splenic vein
    "kidneys": ((2, 3), ()),
    "liver": ((6,), ()),
    "spleen": ((1,), ()),
    "pancreas": ((11,), ()),
    "adrenals": ((12, 13), ()),
}

ENHANCEMENT_HU: dict[str, dict[str, float]] = {
    "native": {g: 0.0 for g in ENHANCEMENT_GROUPS},
    "arterial": {"arteries": 250.0, "veins": 30.0, "portal": 90.0, "kidneys": 140.0, "liver": 20.0,
                 "spleen": 90.0, "pancreas": 70.0, "adrenals": 40.0},
    "portal-venous": {"arteries": 140.0, "veins": 120.0, "portal": 160.0, "kidneys": 150.0, "liver": 60.0,
                      "spleen": 100.0, "pancreas": 60.0, "adrenals": 40.0},
}
"""Typical added attenuation (HU) per phase and group, before a per-subject factor (typical values of
contrast-enhanced abdominal CT: arterial ~35 s, portal-venous ~70 s after injection)."""

SCALED_ORGANS: tuple[int, ...] = (1, 6, 7)
"""BTCV ids that change size per subject: spleen, liver, stomach."""
SHIFTED_ORGANS: tuple[int, ...] = (1, 2, 3, 7)
"""BTCV ids shifted per subject: spleen, kidneys, stomach."""

TRANSFORM_FORMAT = "slicreg-cohort-transform/1"
"""The ``format`` entry of a ``transforms/<id>.npz`` file (see :meth:`SubjectTransform.to_npz_dict`)."""

_PAD_MM = 60.0  # the velocity grid extends this far beyond the source's field of view
_ORGAN_SMOOTH_MM = 15.0  # smoothing of the organ weights of the size changes and shifts
_NOISE_GRAIN_VOX = 0.6  # correlation of the CT noise (Gaussian sigma, voxels of the subject grid)
_CUT_MARGIN_MM = 2.0  # distance kept from the source's cranio-caudal end planes
_CHUNK = 1 << 20  # points per chunk when mapping grids

DISP_QUANTUM_MM = 1.0 / 128
"""The deformation's displacements are rounded to this (mm) before use, so that transform files compress."""
FIELD_QUANTUM_VOX = 1.0 / 64
"""Ground-truth fields are rounded to this (voxels; 0.03 mm at 2 mm) by :func:`true_field` (halves the files)."""


def _quantise(values: np.ndarray, quantum: float) -> np.ndarray:
    return (np.round(np.asarray(values, dtype=np.float64) / quantum) * quantum).astype(np.float32)


# ------------------------------------------------------------------------------------------------ config
def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"CohortConfig.{name}: expected two numbers [low, high], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise InputError(f"CohortConfig.{name}: expected 0 <= low <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class CohortConfig:
    """The realism knobs of the cohort maker (all keyword arguments, defaults = the embedded cohort).

    Attributes:
        spacing_mm: voxel size of the subjects' grids (isotropic, mm). Default 2.
        max_rotation_deg: largest rotation about the R-L, A-P and S-I axes (degrees), each drawn uniformly in
            +-value. Default (4, 4, 10): patients lie on a flat table, so tilts out of the axial plane are
            small; larger tilts would also turn the source's cut end planes into oblique cuts that remove
            much of the upper abdomen from every subject.
        max_scale: anisotropic scale per patient axis, drawn in 1 +- value. Default 0.10.
        max_translation_mm: translation per axis, drawn in +-value (mm). Default 20.
        deform_mm: largest displacement of the smooth random part of the deformation (mm); each subject
            draws U(0.5, 1) x this. Default 18.
        deform_smoothness_mm: Gaussian sigma (mm) of the random velocity field. Default 40.
        organ_scale: liver, spleen and stomach change their linear size by a factor in 1 +- value. Default 0.15.
        organ_shift_mm: kidneys, spleen and stomach move by up to this much per axis (mm). Default 8.
        velocity_spacing_mm: node spacing of the velocity grid (mm). Default 6.
        squaring_steps: scaling-and-squaring steps (the velocity is divided by 2**steps). Default 7.
        phase_probabilities: probabilities of the phases ``native``, ``arterial``, ``portal-venous``.
            Default (0.3, 0.2, 0.5).
        enhancement_jitter: the phase's enhancement is multiplied by U(1 - j, 1 + j) per subject and by
            U(0.85, 1.15) per group. Default 0.3.
        hu_offset: global HU offset drawn in +-value. Default 20.
        noise_hu: range of the standard deviation of the added noise (HU). Default (6, 20).
        blur_mm: range of the Gaussian blur sigma (mm). Default (0, 1.2).
        fov_min_fraction: cranio-caudal extent of a train/test subject as a fraction of what the source
            offers, drawn in [value, 1]; the template keeps everything. Default 0.7.
        fov_top_share: at most this share of the removed length is taken from the cranial end (the source
            already ends in the liver dome). Default 0.3.
        slab_fraction: share of the test subjects that are thin slabs (tag ``"slab"``). Default 0.2.
        slab_mm: cranio-caudal extent of a slab (mm). Default 40.
        margin_mm: range of the air margin around the body in the axial plane (mm). Default (5, 30).
    """

    spacing_mm: float = 2.0
    max_rotation_deg: tuple[float, float, float] = (4.0, 4.0, 10.0)
    max_scale: float = 0.10
    max_translation_mm: float = 20.0
    deform_mm: float = 18.0
    deform_smoothness_mm: float = 40.0
    organ_scale: float = 0.15
    organ_shift_mm: float = 8.0
    velocity_spacing_mm: float = 6.0
    squaring_steps: int = 7
    phase_probabilities: tuple[float, float, float] = (0.3, 0.2, 0.5)
    enhancement_jitter: float = 0.3
    hu_offset: float = 20.0
    noise_hu: tuple[float, float] = (6.0, 20.0)
    blur_mm: tuple[float, float] = (0.0, 1.2)
    fov_min_fraction: float = 0.7
    fov_top_share: float = 0.3
    slab_fraction: float = 0.2
    slab_mm: float = 40.0
    margin_mm: tuple[float, float] = (5.0, 30.0)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"CohortConfig.{name}: expected a positive number, got {v!r}")

        def non_negative(name: str, upper: float | None = None) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
                bound = f" and <= {upper}" if upper is not None else ""
                raise InputError(f"CohortConfig.{name}: expected a number >= 0{bound}, got {v!r}")

        for name in ("spacing_mm", "deform_smoothness_mm", "velocity_spacing_mm", "slab_mm"):
            positive(name)
        for name in ("max_translation_mm", "deform_mm", "organ_shift_mm", "hu_offset"):
            non_negative(name)
        for name in ("max_scale", "organ_scale", "enhancement_jitter"):
            non_negative(name, 0.5)
        for name in ("fov_top_share", "slab_fraction"):
            non_negative(name, 1.0)
        if not isinstance(self.fov_min_fraction, (int, float)) or not 0.1 <= self.fov_min_fraction <= 1.0:
            raise InputError(f"CohortConfig.fov_min_fraction: expected a number in [0.1, 1], got "
                             f"{self.fov_min_fraction!r}")
        if not isinstance(self.squaring_steps, int) or not 0 <= self.squaring_steps <= 16:
            raise InputError(f"CohortConfig.squaring_steps: expected an integer 0..16, got {self.squaring_steps!r}")
        try:
            rot = tuple(float(v) for v in self.max_rotation_deg)
        except (TypeError, ValueError):
            rot = ()
        if len(rot) != 3 or not all(math.isfinite(v) and 0 <= v <= 45 for v in rot):
            raise InputError(f"CohortConfig.max_rotation_deg: expected three angles in 0..45 degrees, got "
                             f"{self.max_rotation_deg!r}")
        object.__setattr__(self, "max_rotation_deg", rot)
        try:
            probs = tuple(float(v) for v in self.phase_probabilities)
        except (TypeError, ValueError):
            probs = ()
        if len(probs) != len(PHASES) or any(not math.isfinite(p) or p < 0 for p in probs) or sum(probs) <= 0:
            raise InputError(f"CohortConfig.phase_probabilities: expected {len(PHASES)} non-negative weights for "
                             f"{', '.join(PHASES)} (not all 0), got {self.phase_probabilities!r}")
        object.__setattr__(self, "phase_probabilities", probs)
        for name in ("noise_hu", "blur_mm", "margin_mm"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CohortConfig:
        """Build from a mapping (e.g. stage parameters); an unknown key raises :class:`InputError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"CohortConfig: unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------- torch helpers
def _torch():
    import torch

    return torch


def _sample_labels_vote(labels: Any, coords_vox: Any) -> Any:
    """Labels at voxel positions by a trilinear vote: among the 8 neighbours, the label with the largest sum of
    trilinear weights (outside the grid counts as background 0). Equals the stored label at voxel centres.

    Args:
        labels: torch tensor ``(X, Y, Z)``, integer.
        coords_vox: ``(3, N)`` float positions in voxels.

    Returns:
        ``(N,)`` tensor of ``labels.dtype``.
    """
    torch = _torch()
    size = labels.shape
    strides = (size[1] * size[2], size[2], 1)
    lo_f = torch.floor(coords_vox)
    frac = coords_vox - lo_f
    lo = lo_f.to(torch.int64)
    flat = labels.reshape(-1)
    n = coords_vox.shape[1]
    corner_labels = torch.empty((8, n), dtype=labels.dtype)
    weights = torch.empty((8, n), dtype=coords_vox.dtype)
    for corner in range(8):
        bits = [(corner >> (2 - a)) & 1 for a in range(3)]
        weight = torch.ones(n, dtype=coords_vox.dtype)
        lin = torch.zeros(n, dtype=torch.int64)
        valid = torch.ones(n, dtype=torch.bool)
        for a in range(3):
            i = lo[a] + bits[a]
            weight = weight * (frac[a] if bits[a] else 1 - frac[a])
            valid &= (i >= 0) & (i < size[a])
            lin += i.clamp(0, size[a] - 1) * strides[a]
        corner_labels[corner] = torch.where(valid, flat[lin], torch.zeros((), dtype=labels.dtype))
        weights[corner] = weight
    out = corner_labels[0].clone()
    mixed = (corner_labels != corner_labels[:1]).any(dim=0)
    if bool(mixed.any()):
        lab = corner_labels[:, mixed]
        wts = weights[:, mixed]
        score = ((lab[:, None, :] == lab[None, :, :]).to(wts.dtype) * wts[None, :, :]).sum(dim=1)
        winner = score.argmax(dim=0)
        out[mixed] = lab.gather(0, winner[None])[0]
    return out


def _grid_points(shape: Sequence[int], z0: int, z1: int) -> Any:
    """Voxel positions ``(3, N)`` (float64) of the slices ``z0 <= k < z1`` of a grid, in C order."""
    torch = _torch()
    i, j, k = torch.meshgrid(torch.arange(shape[0], dtype=torch.float64), torch.arange(shape[1], dtype=torch.float64),
                             torch.arange(z0, z1, dtype=torch.float64), indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)])


def _z_chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    per_slice = max(1, int(shape[0]) * int(shape[1]))
    step = max(1, _CHUNK // per_slice)
    return [(z, min(int(shape[2]), z + step)) for z in range(0, int(shape[2]), step)]


# ---------------------------------------------------------------------------------------------- transforms
def invert_displacement(disp_vox: np.ndarray, *, initial: np.ndarray | None = None, iterations: int = 4) -> np.ndarray:
    """The inverse of ``p -> p + d(p)`` on the same grid, by the fixed-point iteration ``e <- -d(id + e)``.

    Converges where the map is a contraction-perturbed identity (``|grad d| < 1``), which holds for the smooth
    deformations made here; start from ``exp(-v)`` (``initial``) so that a few iterations suffice.

    Args:
        disp_vox: ``(3, X, Y, Z)`` forward displacement in voxels.
        initial: starting guess ``(3, X, Y, Z)`` (default ``-disp_vox``).
        iterations: fixed-point steps (keyword-only; default 4).

    Returns:
        ``(3, X, Y, Z)`` float32 ``e`` with ``p + e(p) + d(p + e(p)) ~ p``.
    """
    torch = _torch()
    from slicreg.conventions import identity_grid_vox

    d = torch.from_numpy(np.ascontiguousarray(disp_vox, dtype=np.float32))
    if d.ndim != 4 or d.shape[0] != 3:
        raise InputError(f"invert_displacement: expected (3, X, Y, Z), got {tuple(d.shape)}")
    e = -d.clone() if initial is None else torch.from_numpy(np.ascontiguousarray(initial, dtype=np.float32))
    grid = torch.from_numpy(identity_grid_vox(d.shape[1:], dtype=np.float32))
    for _ in range(int(iterations)):
        e = -sample(d, grid + e, interpolation="linear", padding="border", backend="grid_sample", align_corners=True)
    return e.numpy().astype(np.float32, copy=False)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (degrees) about the x (R-L), y (A-P) and z (S-I) world axes."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class SubjectTransform:
    """The map ``T_s``: subject world (mm) -> source world (mm), ``T_s = phi o A`` (see the module docstring).

    Attributes:
        prewarp: ``(4, 4)`` the affine ``A``: subject world mm -> source world mm (before the deformation).
        grid_affine: ``(4, 4)`` voxel -> source world mm of the grid holding the deformation.
        disp_mm: ``(3, X, Y, Z)`` float32, ``phi(y) = y + disp_mm(y)`` (world mm vectors; trilinear between
            nodes, the border value beyond the grid, which is ~0 because the velocity is tapered there).
        inv_disp_mm: ``(3, X, Y, Z)`` float32, ``phi^-1(y) = y + inv_disp_mm(y)``.
        velocity_mm: ``(3, X, Y, Z)`` float32, the stationary velocity field (mm) ``phi = exp(v)``, kept for
            provenance (``disp_mm`` and ``inv_disp_mm`` are what the maps use).
    """

    prewarp: np.ndarray
    grid_affine: np.ndarray
    disp_mm: np.ndarray
    inv_disp_mm: np.ndarray
    velocity_mm: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("prewarp", "grid_affine"):
            m = np.asarray(getattr(self, name), dtype=np.float64)
            if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
                raise InputError(f"SubjectTransform.{name}: expected an invertible finite 4x4 matrix, got shape "
                                 f"{m.shape}")
            object.__setattr__(self, name, m)
        for name in ("disp_mm", "inv_disp_mm"):
            d = np.asarray(getattr(self, name), dtype=np.float32)
            if d.ndim != 4 or d.shape[0] != 3:
                raise InputError(f"SubjectTransform.{name}: expected (3, X, Y, Z), got shape {d.shape}")
            object.__setattr__(self, name, d)
        if self.disp_mm.shape != self.inv_disp_mm.shape:
            raise InputError(f"SubjectTransform: disp_mm {self.disp_mm.shape} and inv_disp_mm "
                             f"{self.inv_disp_mm.shape} must have the same shape")

    def _disp_at(self, disp: np.ndarray, points: Any) -> Any:
        torch = _torch()
        vox = _affine_points(np.linalg.inv(self.grid_affine), points)
        table = self._tensor(disp)
        # displacements are small (tens of mm) against float32's precision; positions stay float64
        return sample(table.to(torch.float32), vox.to(torch.float32), interpolation="linear", padding="border",
                      backend="grid_sample", align_corners=True).to(points.dtype)

    def _tensor(self, disp: np.ndarray) -> Any:
        cache = self.__dict__.setdefault("_tensors", {})
        key = id(disp)
        if key not in cache:
            cache[key] = _torch().from_numpy(disp)
        return cache[key]

    def to_source(self, points_mm: Any) -> Any:
        """``T_s(x) = phi(A x)`` for subject world points ``(3, N)`` (mm; numpy or torch, same type out)."""
        torch = _torch()
        is_numpy = not isinstance(points_mm, torch.Tensor)
        p = torch.as_tensor(np.asarray(points_mm, dtype=np.float64)) if is_numpy else points_mm.to(torch.float64)
        y = _affine_points(self.prewarp, p)
        y = y + self._disp_at(self.disp_mm, y)
        return y.numpy() if is_numpy else y

    def from_source(self, points_mm: Any, *, tol_mm: float = 1e-3, max_iter: int = 50) -> Any:
        """``T_s^-1(y) = A^-1(phi^-1(y))`` for source world points ``(3, N)`` (mm; numpy or torch).

        ``phi^-1`` starts from ``inv_disp_mm`` (exact at its grid nodes only) and is refined at the points
        themselves by the fixed-point steps ``z <- y - disp(z)``, continued for each point until it moves less
        than ``tol_mm`` (at most ``max_iter`` steps), so that ``phi(phi^-1(y)) = y`` between the nodes too: the
        true fields invert exactly the map that made the images (``max_iter=0``: node interpolation only, about
        0.5 mm off at worst)."""
        torch = _torch()
        is_numpy = not isinstance(points_mm, torch.Tensor)
        y = torch.as_tensor(np.asarray(points_mm, dtype=np.float64)) if is_numpy else points_mm.to(torch.float64)
        z = y + self._disp_at(self.inv_disp_mm, y)
        active = torch.arange(y.shape[1])
        for _ in range(int(max_iter)):
            if active.numel() == 0:
                break
            new = y[:, active] - self._disp_at(self.disp_mm, z[:, active])
            moved = (new - z[:, active]).norm(dim=0)
            z[:, active] = new
            active = active[moved > tol_mm]
        x = _affine_points(np.linalg.inv(self.prewarp), z)
        return x.numpy() if is_numpy else x

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """Arrays for ``numpy.savez_compressed`` (``transforms/<id>.npz``); read back with :meth:`from_npz_dict`."""
        out = {
            "format": np.array(TRANSFORM_FORMAT),
            "prewarp": self.prewarp,
            "grid_affine": self.grid_affine,
            "disp_mm": self.disp_mm,
            "inv_disp_mm": self.inv_disp_mm,
        }
        if self.velocity_mm is not None:
            out["velocity_mm"] = np.asarray(self.velocity_mm, dtype=np.float32)
        return out

    @classmethod
    def from_npz_dict(cls, data: Mapping[str, Any], *, name: str = "transform") -> SubjectTransform:
        """Inverse of :meth:`to_npz_dict`; ``name`` (e.g. the file) appears in error messages."""
        fmt = str(np.asarray(data["format"])) if "format" in data else None
        if fmt != TRANSFORM_FORMAT:
            raise InputError(f"{name}: expected a cohort transform (format {TRANSFORM_FORMAT!r}), got format {fmt!r}")
        missing = [k for k in ("prewarp", "grid_affine", "disp_mm", "inv_disp_mm") if k not in data]
        if missing:
            raise InputError(f"{name}: cohort transform lacks {missing}")
        velocity = np.asarray(data["velocity_mm"]) if "velocity_mm" in data else None
        return cls(np.asarray(data["prewarp"]), np.asarray(data["grid_affine"]), np.asarray(data["disp_mm"]),
                   np.asarray(data["inv_disp_mm"]), velocity)


def map_points(points_mm: np.ndarray, source_of: SubjectTransform, target_of: SubjectTransform) -> np.ndarray:
    """Points of one subject's world ``(3, N)`` mm -> the corresponding points of another subject's world:
    ``T_target^-1(T_source(x))``."""
    return target_of.from_source(source_of.to_source(points_mm))


# ------------------------------------------------------------------------------------------------- source
@dataclass
class SourceScan:
    """The real scan prepared once for the whole cohort (see :func:`prepare_source`).

    Attributes:
        image_hu: ``(X, Y, Z)`` float32 HU, air (-1000) outside the body (the table and other objects removed).
        labels: ``(X, Y, Z)`` uint8 BTCV ids.
        affine: ``(4, 4)`` voxel -> world mm of the source grid.
        body: ``(X, Y, Z)`` bool body mask.
        enhancement: group name -> ``(X, Y, Z)`` float32 weight (0..1) where that group's contrast is added.
        centroids_mm: BTCV id -> ``(3,)`` world centroid of every organ present.
        body_centre_mm: ``(3,)`` centroid of the body mask.
        boundary_mm: ``(3, N)`` float64 world points on the body surface (for the subjects' bounding boxes).
        cut_low_mm, cut_high_mm: ``(3, N)`` body points on the caudal / cranial end planes of the scan (where
            the body continues beyond the field of view); may be empty.
        vgrid_affine, vgrid_shape: the grid of the velocity fields (source world, ``velocity_spacing_mm``).
        taper: ``vgrid_shape`` float32 window (1 on the source's field of view, 0 at the grid border).
        body_weight: ``vgrid_shape`` float32 body mask sampled on the velocity grid.
        organ_weight: BTCV id -> ``vgrid_shape`` float32 smooth organ weight (1 inside) for size changes/shifts.
    """

    image_hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    body: np.ndarray
    enhancement: dict[str, np.ndarray]
    centroids_mm: dict[int, np.ndarray]
    body_centre_mm: np.ndarray
    boundary_mm: np.ndarray
    cut_low_mm: np.ndarray
    cut_high_mm: np.ndarray
    vgrid_affine: np.ndarray
    vgrid_shape: tuple[int, int, int]
    taper: np.ndarray
    body_weight: np.ndarray
    organ_weight: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image_hu.shape)  # type: ignore[return-value]


def _voxels_to_world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Voxel indices ``(N, 3)`` (e.g. of ``np.argwhere``) -> world ``(3, N)`` float64."""
    return _affine_points(affine, np.asarray(idx, dtype=np.float64).T)


def _soft_gate(hu: np.ndarray) -> np.ndarray:
    """1 for soft-tissue attenuation (-50..250 HU), ramps to 0 at -150 and 350 HU (fat, air, bone, calcium)."""
    hu = np.asarray(hu, dtype=np.float32)
    return (np.clip((hu + 150.0) / 100.0, 0, 1) * np.clip((350.0 - hu) / 100.0, 0, 1)).astype(np.float32)


def _velocity_grid(affine: np.ndarray, shape: Sequence[int], spacing: float) -> tuple[np.ndarray, tuple, np.ndarray]:
    """An axis-aligned grid (world mm) covering the source's field of view plus ``_PAD_MM``, and the taper."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = _voxels_to_world(affine, corners)
    src_lo, src_hi = world.min(axis=1), world.max(axis=1)
    lo = src_lo - _PAD_MM
    n = np.ceil((src_hi + _PAD_MM - lo) / spacing).astype(int) + 1
    g_aff = np.diag([spacing, spacing, spacing, 1.0])
    g_aff[:3, 3] = lo
    ramp = _PAD_MM - 2 * spacing
    window = np.ones(tuple(n), dtype=np.float32)
    for a in range(3):
        pos = lo[a] + spacing * np.arange(n[a])
        dist = np.maximum(0.0, np.maximum(src_lo[a] - pos, pos - src_hi[a]))
        w = np.where(dist < ramp, 0.5 * (1 + np.cos(np.pi * np.minimum(dist, ramp) / ramp)), 0.0)
        shape_a = [1, 1, 1]
        shape_a[a] = -1
        window = window * w.reshape(shape_a).astype(np.float32)
    return g_aff, tuple(int(v) for v in n), window


def _sample_on_grid(values: np.ndarray, values_affine: np.ndarray, grid_affine: np.ndarray,
                    grid_shape: Sequence[int], *, padding: str) -> np.ndarray:
    """Trilinear sample of ``values`` (on the grid of ``values_affine``) at every node of another grid, through the
    one sampler's ``"grid_sample"`` backend (``padding`` ``"border"`` or ``"zero_voxels"``); float32."""
    torch = _torch()
    grid = Grid(grid_shape, grid_affine)
    nodes = torch.from_numpy(grid.coords(dtype=np.float64).reshape(3, -1))
    vox = _affine_points(grid.vox_map(Grid(np.shape(values), values_affine)), nodes).to(torch.float32)
    out = sample(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), vox, interpolation="linear",
                 padding=padding, backend="grid_sample", align_corners=True)  # type: ignore[arg-type]
    return out.reshape(tuple(grid_shape)).numpy()


def prepare_source(image: Volume, labels: Volume, tissue: Volume | None = None, *,
                   config: CohortConfig | None = None, name: str = "source") -> SourceScan:
    """Check the source scan and precompute everything that all subjects share.

    Args:
        image: the real CT in HU ``(X, Y, Z)`` (any orientation; the world frame is its affine's).
        labels: BTCV organ ids 0..13 on the same grid.
        tissue: optional TotalSegmentator "total" label map on the same grid; adds the iliac arteries and veins
            to the contrast enhancement.
        config: the knobs (keyword-only; default :class:`CohortConfig` ()).
        name: what to call the source in messages.

    Returns:
        A :class:`SourceScan`.

    Raises:
        InputError: not CT-like, grids differ, labels outside 0..13, no labelled organ.
    """
    from scipy import ndimage

    from slicreg.geometry import check_ct_like
    from slicreg.supervoxels import body_mask

    config = config or CohortConfig()
    for vol, what in ((image, "image"), (labels, "labels"), (tissue, "tissue")):
        if vol is not None and vol.n_channels is not None:
            raise InputError(f"{name} {what}: expected a 3-D volume (X, Y, Z), got shape {np.shape(vol.array)}")
    hu = np.asarray(image.array, dtype=np.float32)
    check_ct_like(hu, name=f"{name} image")
    for vol, what in ((labels, "labels"), (tissue, "tissue")):
        if vol is None:
            continue
        arr = np.asarray(vol.array)
        if arr.dtype.kind not in "iub":
            raise InputError(f"{name} {what}: expected an integer label map, got dtype {arr.dtype}")
        if not image.same_grid(vol, atol_mm=1e-2):
            raise InputError(f"{name} {what}: grid (shape {vol.shape}) differs from the image grid (shape "
                             f"{image.shape}) or the affines differ by more than 0.01 mm")
    lab = np.asarray(labels.array)
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) > max(BTCV_IDS)):
        raise InputError(f"{name} labels: expected BTCV ids 0..{max(BTCV_IDS)}, got values {int(lab.min())}.."
                         f"{int(lab.max())} (TotalSegmentator ids must be mapped first, e.g. with "
                         f"slicreg.labels.TOTALSEG_TO_BTCV; slicreg fetch-example writes example_labels_btcv.nii.gz)")
    lab = lab.astype(np.uint8)
    present = [int(v) for v in np.unique(lab) if v != 0]
    if not present:
        raise InputError(f"{name} labels: no organ labelled (all voxels are 0)")
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    # the body: outside it the scan becomes air and the labels background (no table, no noise in the air);
    # its centre, surface and extent anchor the deformations. Without the opening: the subjects (and the template
    # the shipped weights were trained on) were made so.
    body = body_mask(hu, opening_vox=0)
    hu = np.where(body, hu, np.float32(AIR_HU)).astype(np.float32)
    lab = np.where(body, lab, 0).astype(np.uint8)

    gate = _soft_gate(hu)
    tis = None if tissue is None else np.asarray(tissue.array)
    enhancement = {}
    for group, (btcv_ids, ts_ids) in ENHANCEMENT_GROUPS.items():
        mask = np.isin(lab, btcv_ids)
        if tis is not None and ts_ids:
            mask |= np.isin(tis, ts_ids) & body
        if mask.any():
            smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma=0.8 * 3.0 / spacing, mode="nearest")
            enhancement[group] = (smooth * gate).astype(np.float32)

    centroids = {}
    for organ in present:
        centroids[organ] = _voxels_to_world(affine, np.argwhere(lab == organ)).mean(axis=1)
    body_idx = np.argwhere(body)
    body_centre = _voxels_to_world(affine, body_idx).mean(axis=1)
    surface = body & ~ndimage.binary_erosion(body)
    boundary = _voxels_to_world(affine, np.argwhere(surface))

    # cranio-caudal end planes: the array axis best aligned with world S; its two end slices
    cc_axis = int(np.argmax(np.abs(affine[2, :3]) / spacing))
    ends = []
    for k in (0, body.shape[cc_axis] - 1):
        sl = [slice(None)] * 3
        sl[cc_axis] = k
        idx = np.argwhere(body[tuple(sl)])
        full = np.insert(idx, cc_axis, k, axis=1) if idx.size else np.zeros((0, 3))
        ends.append(_voxels_to_world(affine, full))
    if affine[2, cc_axis] < 0:
        ends.reverse()

    g_aff, g_shape, taper = _velocity_grid(affine, body.shape, float(config.velocity_spacing_mm))
    body_w = _sample_on_grid(body.astype(np.float32), affine, g_aff, g_shape, padding="zero_voxels")
    sigma = _ORGAN_SMOOTH_MM / float(config.velocity_spacing_mm)
    organ_w = {}
    for organ in sorted(set(SCALED_ORGANS) | set(SHIFTED_ORGANS)):
        if organ not in centroids:
            continue
        # the weight is 1 as far outside the organ as its boundary can move (growth by organ_scale of its radius,
        # plus the shift), so that growing and moving are as drawn; "border": an organ cut by the scan's end
        # plane continues beyond it (until the taper)
        inside = lab == organ
        radius = float(np.percentile(np.sqrt(((_voxels_to_world(affine, np.argwhere(inside))
                                                 - centroids[organ][:, None]) ** 2).sum(axis=0)), 99))
        reach = (config.organ_scale * radius if organ in SCALED_ORGANS else 0.0) + \
            (config.organ_shift_mm if organ in SHIFTED_ORGANS else 0.0) + 2.0
        near = ndimage.distance_transform_edt(~inside, sampling=spacing) <= reach
        coarse = _sample_on_grid(near.astype(np.float32), affine, g_aff, g_shape, padding="border")
        smooth = ndimage.gaussian_filter(coarse, sigma=sigma, mode="nearest")
        organ_w[organ] = np.clip(2.0 * smooth, 0.0, 1.0).astype(np.float32)

    return SourceScan(
        image_hu=hu, labels=lab, affine=affine, body=body, enhancement=enhancement, centroids_mm=centroids,
        body_centre_mm=body_centre, boundary_mm=boundary, cut_low_mm=ends[0], cut_high_mm=ends[1],
        vgrid_affine=g_aff, vgrid_shape=g_shape, taper=taper, body_weight=body_w, organ_weight=organ_w,
    )


# ------------------------------------------------------------------------------------------------ subjects
@dataclass(frozen=True)
class SubjectParams:
    """Everything random about one subject except the noise fields (drawn by :func:`sample_subject_params`).

    Angles in degrees about the world R-L, A-P, S-I axes; scales per patient axis; lengths in mm."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    deform_amplitude_mm: float
    organ_scale: dict[int, float]
    organ_shift_mm: dict[int, tuple[float, float, float]]
    phase: str
    enhancement_factor: dict[str, float]
    hu_offset: float
    noise_sd_hu: float
    blur_sigma_mm: float
    fov_fraction: float
    fov_top_share: float
    slab: bool
    slab_position: float
    margin_mm: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (organ ids as strings)."""
        out = asdict(self)
        out["organ_scale"] = {str(k): v for k, v in self.organ_scale.items()}
        out["organ_shift_mm"] = {str(k): list(v) for k, v in self.organ_shift_mm.items()}
        return out


def sample_subject_params(rng: np.random.Generator, *, config: CohortConfig | None = None,
                          full_fov: bool = False, slab: bool = False) -> SubjectParams:
    """Draw one subject's parameters (always the same number of draws, so later draws do not shift).

    Args:
        rng: the subject's generator, e.g. ``numpy.random.default_rng([seed, index])``.
        config: the knobs (default :class:`CohortConfig` ()).
        full_fov: keep the whole cranio-caudal extent the source offers (the template).
        slab: make a thin slab of the upper abdomen (``config.slab_mm``).
    """
    config = config or CohortConfig()

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    rot = tuple(u(-m, m) for m in config.max_rotation_deg)
    scale = tuple(u(1 - config.max_scale, 1 + config.max_scale) for _ in range(3))
    trans = tuple(u(-config.max_translation_mm, config.max_translation_mm) for _ in range(3))
    amp = u(0.5, 1.0) * config.deform_mm
    organ_scale = {o: u(1 - config.organ_scale, 1 + config.organ_scale) for o in SCALED_ORGANS}
    organ_shift = {o: tuple(u(-config.organ_shift_mm, config.organ_shift_mm) for _ in range(3))
                   for o in SHIFTED_ORGANS}
    probs = np.asarray(config.phase_probabilities, dtype=np.float64)
    phase = PHASES[int(rng.choice(len(PHASES), p=probs / probs.sum()))]
    base = u(1 - config.enhancement_jitter, 1 + config.enhancement_jitter)
    factors = {g: base * u(0.85, 1.15) for g in ENHANCEMENT_GROUPS}
    hu_offset = u(-config.hu_offset, config.hu_offset)
    noise = u(*config.noise_hu)
    blur = u(*config.blur_mm)
    fov_fraction = u(config.fov_min_fraction, 1.0)
    top_share = u(0.0, config.fov_top_share)
    slab_position = u(0.0, 1.0)
    margin = u(*config.margin_mm)
    return SubjectParams(
        rotation_deg=rot, scale=scale, translation_mm=trans, deform_amplitude_mm=amp,  # type: ignore[arg-type]
        organ_scale=organ_scale, organ_shift_mm=organ_shift, phase=phase, enhancement_factor=factors,
        hu_offset=hu_offset, noise_sd_hu=noise, blur_sigma_mm=blur,
        fov_fraction=1.0 if full_fov else fov_fraction, fov_top_share=0.0 if full_fov else top_share,
        slab=bool(slab and not full_fov), slab_position=slab_position, margin_mm=margin,
    )


def prewarp_affine(params: SubjectParams, centre_mm: Sequence[float]) -> np.ndarray:
    """The affine ``A`` (subject world -> source world, 4x4) of :class:`SubjectParams`.

    The subject's body is ``F(source body)`` with ``F(y) = c + t + R diag(s) (y - c)`` (``c`` = ``centre_mm``);
    ``A = F^-1``."""
    c = np.asarray(centre_mm, dtype=np.float64)
    fwd = np.eye(4)
    fwd[:3, :3] = _rotation(params.rotation_deg) @ np.diag(params.scale)
    fwd[:3, 3] = c + np.asarray(params.translation_mm) - fwd[:3, :3] @ c
    return np.linalg.inv(fwd)


def build_velocity(source: SourceScan, params: SubjectParams, rng: np.random.Generator, *,
                   config: CohortConfig | None = None) -> np.ndarray:
    """The subject's stationary velocity field on the source's velocity grid, in mm: ``(3, X, Y, Z)`` float32.

    Random part: white noise (from ``rng``) filtered with a Gaussian of ``deform_smoothness_mm`` and scaled so
    that its largest length inside the body is ``params.deform_amplitude_mm``. Organ parts: for an organ with
    size factor ``k``, ``-ln(k) (y - c) w(y)``; for a shift ``t``, ``-t w(y)`` (``w`` = the organ's smooth
    weight; pulling with ``phi = exp(v)`` makes the subject's organ ``k`` times larger / moved by ``t``). The sum
    is multiplied by the taper window, so that ``v = 0`` at the grid border.
    """
    from scipy import ndimage

    config = config or CohortConfig()
    shape = source.vgrid_shape
    h = float(config.velocity_spacing_mm)
    noise = rng.standard_normal((3, *shape), dtype=np.float32)
    sigma = float(config.deform_smoothness_mm) / h
    rand = np.stack([ndimage.gaussian_filter(noise[a], sigma=sigma, mode="reflect") for a in range(3)])
    inside = source.body_weight > 0.5
    length = np.sqrt((rand ** 2).sum(axis=0))
    peak = float(length[inside].max()) if inside.any() else float(length.max())
    v = rand * np.float32(params.deform_amplitude_mm / max(peak, 1e-12))

    from slicreg.conventions import identity_grid_vox

    nodes = identity_grid_vox(shape, dtype=np.float32)
    world = np.einsum("ab,b...->a...", source.vgrid_affine[:3, :3].astype(np.float32), nodes)
    world += source.vgrid_affine[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    # organ motions: size change -ln(k) (y - c) and shift -t, blended by the organ weights; where weights overlap
    # (neighbouring organs) the motions are averaged rather than added
    motion = np.zeros_like(v)
    total = np.zeros(shape, dtype=np.float32)
    for organ, w in source.organ_weight.items():
        g = np.zeros_like(v)
        if organ in params.organ_scale:
            c = source.centroids_mm[organ].astype(np.float32).reshape(3, 1, 1, 1)
            g += np.float32(-math.log(params.organ_scale[organ])) * (world - c)
        if organ in params.organ_shift_mm:
            g -= np.asarray(params.organ_shift_mm[organ], dtype=np.float32).reshape(3, 1, 1, 1)
        motion += g * w[None]
        total += w
    v += motion / np.maximum(total, 1.0)[None]
    return (v * source.taper[None]).astype(np.float32)


@dataclass
class Subject:
    """One generated subject.

    Attributes:
        image: int16 HU on the subject's grid (affine = voxel -> subject world mm).
        labels: uint8 BTCV ids on the same grid.
        transform: the subject's :class:`SubjectTransform` (subject world -> source world).
        params: the drawn :class:`SubjectParams`.
        info: measured facts: grid, field of view, organ volumes (mL), inverse consistency of the deformation
            (mm), smallest Jacobian determinant of the deformation, soft-tissue centre (world mm).
    """

    image: Volume
    labels: Volume
    transform: SubjectTransform
    params: SubjectParams
    info: dict[str, Any]


def _subject_grid(source: SourceScan, transform: SubjectTransform, params: SubjectParams,
                  config: CohortConfig) -> tuple[np.ndarray, tuple[int, int, int], dict[str, Any]]:
    """The subject's 2 mm RAS grid: square axial extent around the body, cranio-caudal extent per the FOV draw."""
    h = float(config.spacing_mm)
    boundary = transform.from_source(source.boundary_mm)
    z_all = boundary[2]
    z_lo, z_hi = float(z_all.min()), float(z_all.max())
    # the source's end planes (body continues beyond them): keep the subject's slices off them
    if source.cut_low_mm.shape[1]:
        z_lo = max(z_lo, float(transform.from_source(source.cut_low_mm)[2].max()) + _CUT_MARGIN_MM)
    if source.cut_high_mm.shape[1]:
        z_hi = min(z_hi, float(transform.from_source(source.cut_high_mm)[2].min()) - _CUT_MARGIN_MM)
    if z_hi - z_lo < 4 * h:
        raise InputError(f"source: after the subject's transform only {z_hi - z_lo:.0f} mm of the body remain "
                         f"between the scan's cranial and caudal end planes; expected an abdominal CT that is long "
                         f"compared with the drawn rotation and deformation (or smaller max_rotation_deg/deform_mm)")
    avail = z_hi - z_lo
    if params.slab:
        length = min(float(config.slab_mm), avail)
        anchors = {o: float(transform.from_source(source.centroids_mm[o][:, None])[2, 0])
                   for o in (1, 2, 3, 6, 11) if o in source.centroids_mm}
        lower = [anchors[o] for o in (2, 3, 11) if o in anchors]
        upper = [anchors[o] for o in (1, 6) if o in anchors]
        lo_c = min(lower) if lower else z_lo + 0.4 * avail
        hi_c = max(upper) if upper else z_lo + 0.8 * avail
        if hi_c < lo_c:
            lo_c, hi_c = hi_c, lo_c
        centre = lo_c + params.slab_position * (hi_c - lo_c)
        centre = min(max(centre, z_lo + length / 2), z_hi - length / 2)
        z0, z1 = centre - length / 2, centre + length / 2
    else:
        length = params.fov_fraction * avail
        removed = avail - length
        top = params.fov_top_share * removed
        z0, z1 = z_lo + removed - top, z_hi - top
    sel = (z_all >= z0 - 10.0) & (z_all <= z1 + 10.0)
    pts = boundary[:2, sel] if sel.any() else boundary[:2]
    lo_xy, hi_xy = pts.min(axis=1), pts.max(axis=1)
    side = float((hi_xy - lo_xy).max()) + 2 * params.margin_mm
    centre_xy = (lo_xy + hi_xy) / 2
    n_xy = int(math.ceil(side / h)) + 1
    n_z = max(2, int(math.floor((z1 - z0) / h + 1e-6)) + 1)  # floor: the grid stays inside [z0, z1]
    origin = np.array([centre_xy[0] - (n_xy - 1) * h / 2, centre_xy[1] - (n_xy - 1) * h / 2, z0])
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = origin
    info = {"fov_cc_mm": round((n_z - 1) * h, 1), "available_cc_mm": round(avail, 1),
            "fov_axial_mm": round((n_xy - 1) * h, 1)}
    return affine, (n_xy, n_xy, n_z), info


def _deformation_checks(source: SourceScan, transform: SubjectTransform) -> dict[str, float]:
    """Inverse consistency ``|T(T^-1(y)) - y|`` (mm) at body points of the source (every third voxel per axis),
    and the smallest Jacobian determinants of ``phi`` and ``phi^-1`` on their grid."""
    from slicreg.metrics import jacobian_determinant

    idx = np.argwhere(source.body[::3, ::3, ::3]) * 3
    pts = _voxels_to_world(source.affine, idx)
    err = np.sqrt(((transform.to_source(transform.from_source(pts)) - pts) ** 2).sum(axis=0))
    h = float(transform.grid_affine[0, 0])
    return {
        "inverse_error_mean_mm": float(err.mean()) if err.size else 0.0,
        "inverse_error_max_mm": float(err.max()) if err.size else 0.0,
        "min_jacobian_det": float(jacobian_determinant(transform.disp_mm / h).min()),
        "min_jacobian_det_inverse": float(jacobian_determinant(transform.inv_disp_mm / h).min()),
    }


def _source_voxel_coords(transform: SubjectTransform, affine: np.ndarray, shape: Sequence[int],
                         source_affine: np.ndarray) -> Any:
    """Source voxel positions ``(3, X, Y, Z)`` (float32 tensor) of every voxel of a subject grid: ``T_s``
    evaluated exactly at every voxel (a shortcut through a coarser grid deviated by up to 0.7 mm)."""
    torch = _torch()
    shape = tuple(int(v) for v in shape)
    src_inv = np.linalg.inv(np.asarray(source_affine, dtype=np.float64))
    q = torch.empty((3, *shape), dtype=torch.float32)
    for z0, z1 in _z_chunks(shape):
        world = _affine_points(np.asarray(affine, dtype=np.float64), _grid_points(shape, z0, z1))
        block = _affine_points(src_inv, transform.to_source(world))
        q[:, :, :, z0:z1] = block.to(torch.float32).reshape(3, shape[0], shape[1], z1 - z0)
    return q


def _labels_at(labels: np.ndarray, coords_vox: Any) -> Any:
    """Trilinear-vote labels (:func:`_sample_labels_vote`) at ``(3, *S)`` positions; only points within one voxel
    of the labels' bounding box are computed (all others are background)."""
    torch = _torch()
    out_shape = tuple(coords_vox.shape[1:])
    nz = np.argwhere(labels)
    out = torch.zeros(int(np.prod(out_shape)), dtype=torch.uint8)
    if nz.size == 0:
        return out.reshape(out_shape)
    lo, hi = nz.min(axis=0) - 1, nz.max(axis=0) + 1
    pts = coords_vox.reshape(3, -1)
    near = torch.ones(pts.shape[1], dtype=torch.bool)
    for a in range(3):
        near &= (pts[a] > float(lo[a])) & (pts[a] < float(hi[a]))
    idx = torch.nonzero(near).reshape(-1)
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))
    for start in range(0, idx.numel(), _CHUNK):
        sel = idx[start:start + _CHUNK]
        out[sel] = _sample_labels_vote(lab, pts[:, sel])
    return out.reshape(out_shape)


def soft_tissue_centre_mm(image: Volume) -> np.ndarray | None:
    """World position (mm) of SLIC-Reg's soft-tissue centre of mass of an image in HU (the point the paper's
    preprocessing crops around; :func:`slicreg.geometry.soft_tissue_centre`), or ``None``."""
    from slicreg.geometry import soft_tissue_centre

    c = soft_tissue_centre(np.asarray(image.array, dtype=np.float32))
    if c is None:
        return None
    return image.affine[:3, :3] @ c + image.affine[:3, 3]


def make_subject(source: SourceScan, params: SubjectParams, *, rng: np.random.Generator,
                 config: CohortConfig | None = None) -> Subject:
    """Generate one subject (image, labels, transform) from the prepared source.

    Args:
        source: from :func:`prepare_source` (with the same ``config``).
        params: from :func:`sample_subject_params`.
        rng: the generator for the velocity noise and the image noise (keyword-only); pass the one that drew
            ``params`` to make a subject a function of ``(seed, index)`` alone.
        config: the knobs (keyword-only; default :class:`CohortConfig` ()).

    Returns:
        A :class:`Subject`.
    """
    torch = _torch()
    from scipy import ndimage

    config = config or CohortConfig()
    if tuple(source.vgrid_shape) != tuple(source.taper.shape):
        raise InputError("make_subject: the source was prepared inconsistently (velocity grid vs taper)")
    if abs(float(source.vgrid_affine[0, 0]) - float(config.velocity_spacing_mm)) > 1e-6:
        raise InputError(f"make_subject: the source was prepared with velocity_spacing_mm "
                         f"{source.vgrid_affine[0, 0]:g}, the config says {config.velocity_spacing_mm:g}; "
                         f"prepare the source with the same config")
    h_v = float(config.velocity_spacing_mm)
    velocity = build_velocity(source, params, rng, config=config)
    d_vox = scaling_and_squaring(velocity / h_v, steps=config.squaring_steps)
    e0 = scaling_and_squaring(-velocity / h_v, steps=config.squaring_steps)
    e_vox = invert_displacement(d_vox, initial=e0, iterations=8)
    # rounded to 1/128 mm (files compress better); the rounded maps are the ones used from here on
    d_mm = _quantise(d_vox * np.float32(h_v), DISP_QUANTUM_MM)
    e_mm = _quantise(e_vox * np.float32(h_v), DISP_QUANTUM_MM)
    transform = SubjectTransform(prewarp_affine(params, source.body_centre_mm), source.vgrid_affine, d_mm, e_mm,
                                 _quantise(velocity, DISP_QUANTUM_MM))
    checks = _deformation_checks(source, transform)

    affine, shape, fov_info = _subject_grid(source, transform, params, config)

    # contrast in source space, then resample (offset by +1000 so that "zeros" padding means air)
    enhanced = source.image_hu - np.float32(AIR_HU)
    for group, weight in source.enhancement.items():
        add = ENHANCEMENT_HU[params.phase][group] * params.enhancement_factor[group]
        if add:
            enhanced = enhanced + np.float32(add) * weight
    src_img = torch.from_numpy(np.ascontiguousarray(enhanced, dtype=np.float32))
    coords = _source_voxel_coords(transform, affine, shape, source.affine)
    image = sample(src_img, coords.to(torch.float32), interpolation="linear", padding="zero_voxels",
                   backend="grid_sample", align_corners=True).numpy()
    labels = _labels_at(source.labels, coords).numpy()
    del coords
    image += np.float32(AIR_HU)

    h = float(config.spacing_mm)
    if params.blur_sigma_mm > 0:
        image = ndimage.gaussian_filter(image, sigma=params.blur_sigma_mm / h, mode="nearest")
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=_NOISE_GRAIN_VOX, mode="wrap")
    noise *= np.float32(params.noise_sd_hu / max(float(noise.std()), 1e-6))
    image += noise + np.float32(params.hu_offset)
    image_i16 = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)

    img_vol = Volume(image_i16, affine)
    lab_vol = Volume(labels, affine)
    voxel_ml = h ** 3 / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(BTCV_IDS) + 1)
    centre = soft_tissue_centre_mm(img_vol)
    info = {
        "shape": list(shape), "spacing_mm": h, **fov_info, "phase": params.phase,
        "organ_volume_ml": {str(o): round(float(counts[o]) * voxel_ml, 2) for o in BTCV_IDS if counts[o]},
        "soft_tissue_centre_mm": None if centre is None else [round(float(c), 3) for c in centre],
        **{k: round(v, 5) for k, v in checks.items()},
    }
    return Subject(img_vol, lab_vol, transform, params, info)


# ------------------------------------------------------------------------------------------- ground truth
def true_field(fixed_transform: SubjectTransform, fixed_affine: np.ndarray, fixed_shape: Sequence[int],
               moving_transform: SubjectTransform, moving_affine: np.ndarray, *,
               quantum: float | None = FIELD_QUANTUM_VOX) -> np.ndarray:
    """The true displacement field of the pair (fixed ``f``, moving ``m``) in the project's convention.

    ``u(p) = M_m^-1 T_m^-1 T_f M_f p - p``: voxels of the fixed grid, fixed -> moving, so that
    ``warp_labels(moving_labels, u)`` reproduces the fixed labels (up to the labels' resampling).

    Args:
        fixed_transform, moving_transform: the subjects' :class:`SubjectTransform`.
        fixed_affine: ``(4, 4)`` voxel -> world of the fixed grid; ``fixed_shape`` its ``(X, Y, Z)``.
        moving_affine: ``(4, 4)`` voxel -> world of the moving grid.
        quantum: round the result to multiples of this (voxels; keyword-only; default 1/64, i.e. 0.03 mm at
            2 mm, which halves the size of compressed files; ``None`` keeps float32 as computed).

    Works on any grids in the subjects' world frames, e.g. the preprocessed 192 x 160 x 256 grids: pass their
    affines and shape.

    Returns:
        ``(3, X, Y, Z)`` float32 in voxels (of the moving grid's index space, as :func:`slicreg.fields.warp_image`
        expects).
    """
    torch = _torch()
    shape = tuple(int(s) for s in fixed_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"true_field: fixed_shape must be three positive sizes, got {fixed_shape!r}")
    m_inv = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64))
    out = np.empty((3, *shape), dtype=np.float32)
    for z0, z1 in _z_chunks(shape):
        p = _grid_points(shape, z0, z1)
        world = _affine_points(np.asarray(fixed_affine, dtype=np.float64), p)
        q = _affine_points(m_inv, moving_transform.from_source(fixed_transform.to_source(world)))
        out[:, :, :, z0:z1] = (q - p).to(torch.float32).reshape(3, shape[0], shape[1], z1 - z0).numpy()
    return out if quantum is None else _quantise(out, quantum)


def resample_labels_world(moving: Volume, fixed_affine: np.ndarray, fixed_shape: Sequence[int], *,
                          shift_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Moving labels on the fixed grid by world position (nearest, background outside):
    fixed voxel ``p`` takes the moving label at world ``M_f p + shift_mm``. ``(X, Y, Z)`` of the moving dtype."""
    shape = tuple(int(s) for s in fixed_shape)
    mat = np.linalg.inv(moving.affine) @ _translation(shift_mm) @ np.asarray(fixed_affine, dtype=np.float64)
    # positions in float64 slabs, rounded to float32, nearest with background outside (the gather backend)
    return sample_affine(np.ascontiguousarray(moving.array), mat, shape, interpolation="nearest", padding="zeros",
                         backend="gather")


def _translation(shift_mm: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(shift_mm, dtype=np.float64)
    return t


def initial_dice(fixed: Volume, moving: Volume, *, fixed_centre_mm: Sequence[float] | None = None,
                 moving_centre_mm: Sequence[float] | None = None,
                 labels: Iterable[int] = BTCV_IDS) -> dict[int, float]:
    """Dice per organ before registration: moving labels taken at the same world position, or -- when both
    centres are given -- after moving the moving scan so that the centres coincide (what the paper's
    preprocessing does by cropping both scans around their soft-tissue centres).

    Labels absent from either map are NaN (Learn2Reg's rule, :func:`slicreg.metrics.dice` with
    ``absent="learn2reg"``)."""
    from slicreg.metrics import dice

    shift = np.zeros(3)
    if fixed_centre_mm is not None and moving_centre_mm is not None:
        shift = np.asarray(moving_centre_mm, dtype=np.float64) - np.asarray(fixed_centre_mm, dtype=np.float64)
    warped = resample_labels_world(moving, fixed.affine, fixed.shape, shift_mm=shift)
    labs = [int(v) for v in labels]
    scores = dice(np.asarray(fixed.array), warped, labs, absent="learn2reg", moving=np.asarray(moving.array))
    return {lab: float(v) for lab, v in zip(labs, scores)}


# -------------------------------------------------------------------------------------------- the cohort plan
def subject_ids(n_train: int, n_test: int, *, prefix: str = "cohort") -> dict[str, list[str]]:
    """Ids of the template, training and test subjects: ``cohort_0000`` (template), then training, then test."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name}: expected an integer >= 0, got {value!r}")
    if n_test < 1:
        raise InputError(f"n_test: expected at least 1 test subject (registration pairs need one), got {n_test}")
    ids = [f"{prefix}_{i:04d}" for i in range(1 + n_train + n_test)]
    return {"template": ids[:1], "training": ids[1:1 + n_train], "test": ids[1 + n_train:]}


def registration_pairs(template: str, test: Sequence[str]) -> list[dict[str, str]]:
    """Every test subject -> the template (fixed = test, moving = template), then every unordered pair of test
    subjects (fixed = the earlier id, moving = the later one, as Learn2Reg's 45 AbdomenCTCT pairs)."""
    pairs = [{"fixed": t, "moving": template} for t in test]
    pairs += [{"fixed": a, "moving": b} for i, a in enumerate(test) for b in test[i + 1:]]
    return pairs
