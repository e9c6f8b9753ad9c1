"""The registration engine: presets, multi-resolution optimisation, and :func:`register_pair`.

A registration is a sequence of *stages* (:class:`StageConfig`), typically an affine stage and then a
deformable one, each run coarse to fine over a pyramid of downsampling factors. The state carried from stage
to stage and level to level is the map from fixed to moving full-resolution voxels

    ``phi(x) = A (x + d(x))``

with ``A`` a 4x4 voxel matrix (fixed voxel -> moving voxel) and ``d`` a displacement in *full-resolution
fixed voxels* kept on whatever grid the last level used. The deformation is applied before the affine map,
so ``det J_phi = det A * det(I + grad d)``: a diffeomorphic ``d`` (the ``svf`` model) can not fold.
The returned field is ``phi(x) - x`` on the full fixed grid (so it includes the affine part).

Pyramid levels relate to the full-resolution grid with ``align_corners=False`` semantics (see
:mod:`slicreg.alignment.transforms`): level voxel ``q`` of a grid ``n`` voxels long sits at full-resolution voxel
``(q + 0.5) * N / n - 0.5``. On a level the map becomes ``z = S_m^-1 A S_f (y + d(S_f y) / r_f)`` with ``S``
the level-to-full voxel maps of the fixed and moving grids and ``r_f`` the fixed grid's coarsening factors.
Positions stay in voxels until :func:`slicreg.alignment.transforms.grid_warp` (the one sampler's ``"grid_sample"``
backend, where they become normalised coordinates).

Determinism: everything is deterministic on CPU for a given thread count; the only randomness (voxel
sampling of the ``mi`` measure) comes from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.alignment.discrete import COUPLINGS, discrete_displacement
from slicreg.alignment.regularisers import get_regulariser
from slicreg.alignment.similarity import get_similarity
from slicreg.alignment.transforms import (
    AffineTransform,
    BSplineDisplacement,
    DenseDisplacement,
    StationaryVelocity,
    grid_warp,
    identity_grid,
    resize_field,
)
from slicreg.errors import InputError
from slicreg.fields import jacobian_determinant, sample, sample_affine
from slicreg.grid import fov_index_map

__all__ = [
    "StageConfig",
    "Preset",
    "PRESETS",
    "affine_from_field",
    "AlignResult",
    "register_pair",
    "resolve_preset",
    "gaussian_smooth",
    "downsample",
    "fill_outside",
    "mask_box",
    "thin_axes",
    "translation_search",
    "fov_translation_search",
]

MODELS = ("affine", "dense", "bspline", "svf")
THIN_OVERLAP = 0.8
"""Along a thin axis the translation search only considers placements that put at least this share of the
smaller field of view inside the larger one."""
THIN_MIN_VOXELS = 4
"""An affine stage with a thin axis skips its levels on which the thin field of view spans fewer level voxels
than this along that axis (their blocks would average the slab away); the finest level always runs."""
PER_LEVEL = ("iterations", "lr", "weight", "grid_spacing", "subsample", "field_sigma", "discrete")
FEATURE_MARGIN = 4
"""Level voxels kept around a field of view's bounding box when ``feature_fov`` crops the features: MIND-SSC's
patch reach (radius 1 + dilation 1) plus the trilinear read one voxel beyond the field of view, with room."""
OPTIMISERS = ("adam", "lbfgs")


@dataclass(frozen=True)
class StageConfig:
    """One stage of a registration. The defaults are the deformable stage of the ``abdomen-ct`` preset.

    Per-level knobs take one value for every level or a tuple with one value per level (coarse to fine).

    Attributes:
        model: ``"affine"``, ``"dense"``, ``"bspline"`` or ``"svf"``.
        similarity: a name of :data:`slicreg.alignment.similarity.SIMILARITIES` (``mse``, ``ncc``, ``lncc``,
            ``ngf``, ``mi``, ``mind``).
        similarity_kwargs: keyword arguments for the features / loss of that measure (e.g. ``radius``).
        levels: pyramid downsampling factors, coarse to fine (1 = full resolution).
        iterations: maximum optimiser iterations (per level).
        lr: step size (per level). Affine: change of the linear part per step (dimensionless; the
            translation is parameterised in units of the fixed grid's mean half-size, so it moves the same).
            Deformable: displacement change per step in voxels of the level.
        lr_final: Adam's step decays from ``lr`` to ``lr * lr_final`` over each level's iterations (cosine);
            1 = constant. A decaying step lets Adam settle instead of jittering by ``lr`` around the optimum.
        optimiser: ``"adam"`` or ``"lbfgs"`` (strong-Wolfe line search; ``lr`` is its initial step, 1 is
            usual).
        regulariser: ``"diffusion"``, ``"bending"``, ``"tv"`` or ``None`` (deformable stages; computed on the
            parameter grid's displacement in mm with that grid's spacing in mm).
        weight: regularisation weight (per level).
        grid_spacing: step of the deformable parameter grid in level voxels (per level): the node step of the
            ``dense`` and ``svf`` grids, the B-spline control spacing.
        svf_steps: scaling-and-squaring steps of the ``svf`` model.
        subsample: deformable stages: compare only every ``subsample``-th level voxel per axis in each iteration,
            from a fresh random offset each time (seeded); 1 = every voxel (per level). Makes fine levels
            affordable on a CPU (2: 1/8 of the voxels per iteration).
        field_sigma: deformable stages: Gaussian sigma (parameter-grid nodes) applied to the model's field in
            every iteration (per level; 0 = none): a smoother parameterisation.
        smooth_sigma: Gaussian sigma (in level voxels) applied to both level images before features; 0 = none.
        search: affine stages: before optimising, try every whole-voxel translation of the first level within
            ``search`` times the fixed grid's extent per axis (e.g. 0.25) and start from the best NCC over the
            fixed image's foreground (normalised intensity > 0.05); 0 = off. Gives a capture range far beyond a
            local optimiser's, e.g. for scans whose fields of view are centred differently. With a thin axis
            (``thin_fov``) see there.
        thin_fov: affine stages: an axis is thin when the shorter of the two fields of view along it (the
            bounding boxes of the masks given to :func:`register_pair`, else the grids) is less than
            ``thin_fov`` times the longer one (default 0.35; 0 = never): a slab of a scan on one side. Then
            the stage (1) keeps the linear part of the affine map along the thin axis as it is (identity: no
            scaling, shear or rotation involving that axis, which a slab can not determine; only the
            translation moves), (2) compares with ``thin_similarity`` instead of ``similarity``, (3) skips
            its levels on which the slab is thinner than :data:`THIN_MIN_VOXELS` level voxels, and (4) if
            ``search > 0``, starts from the best whole-voxel translation by an exhaustive FFT search
            (:func:`fov_translation_search`): ``+-search`` of the grid across the slab, and along the thin
            axis every placement of the shorter field of view along the longer one, end to end, that keeps
            :data:`THIN_OVERLAP` of the smaller field of view inside the larger one.
        thin_similarity: the measure of an affine stage with a thin axis (default ``"mind"``: on the cohort's
            slabs the intensity NCC of a 40 mm slab preferred wrong levels of the abdomen, MIND-SSC did not; see
            docs/align.md).
        patience, tol: early stop when the loss has not improved by more than ``tol`` (relative) for
            ``patience`` iterations; ``patience=0`` runs every iteration.
        penalise: deformable stages: what the regulariser acts on. ``"field"`` (default): the whole
            displacement, including the field the stage starts from (an earlier stage's or ``init_disp``).
            ``"increment"``: only the change this stage makes; the starting field is kept as it is, on its own
            grid (a full-resolution ``init_disp`` keeps its fine detail), and the stage's change is added to it
            (a refinement that should not smooth away the field it refines).
        eps: Adam's ``eps``. ``None`` (default): 1e-8 on the gradient of the loss as computed (a mean over the
            compared voxels). A number (deformable stages): ``eps`` for the similarity *summed* over the compared
            voxels (their weights included) with the displacement in level voxels, i.e. a damping that does not
            depend on how many voxels are compared: a voxel's gradient far below ``eps`` -- rounding noise where
            the field is already right or the image has no texture -- moves nothing (Adam's steps are otherwise
            blind to the gradient's scale and would move such a field by ~``lr`` per step).
        mask_norm: deformable stages with field-of-view masks: what the weighted similarity is divided by.
            ``"fov"`` (default): the total weight, i.e. the mean over the compared field of view
            (``sum(w x) / sum(w)``, :func:`slicreg.alignment.similarity.weighted_mean`). ``"grid"``: the number of
            voxels the level would compare without masks, i.e. the mean over the whole grid with zero outside
            the field of view: the similarity's pull per voxel inside the field of view then keeps the same
            balance against the regulariser (a mean over the whole parameter grid) whatever the field of
            view's size -- a thin slab is held by the regulariser as firmly as a full scan (docs/register.md
            compares the two on slabs). Meant for the voxel-wise measures (``mse``, ``mind``, ``lncc``,
            ``ngf``).
        feature_fov: deformable stages with field-of-view masks: compute each image's features only on the
            bounding box of its field of view on the level (plus :data:`FEATURE_MARGIN` level voxels), not on the
            whole grid -- the only voxels the masked similarity compares (fixed) or reads with a weight above
            zero (moving). With the preprocessing's box-shaped crops the features inside are those of the whole
            grid except for MIND's variance clamp, whose image-wide mean is then the mean over the box. The
            fields of view of the cohort's scans fill 40-60 % of the padded grid, so this about halves the
            features' cost, which dominates a 2 mm level (docs/register.md, "Refinement").
        discrete: deformable stages with the ``dense`` model: before a level's Adam steps, a discrete search of
            whole level-voxel displacements within ``+-discrete`` per axis on top of the current map, coupled to
            its own smoothing (:func:`slicreg.alignment.discrete.discrete_displacement`), whose result starts the
            level (per level; 0 = off). It captures errors of several voxels that gradient steps started next to
            them can not; on the fixed features' extent (the whole grid, or the field of view's box with
            ``feature_fov``), extended as a constant beyond it.
        discrete_pool: cells of ``discrete_pool`` level voxels per axis get one displacement each.
        discrete_coupling: factor on the coupling weights :data:`slicreg.alignment.discrete.COUPLINGS` (larger:
            smoother, fewer cells keep an optimum their neighbours disagree with).
    """

    model: str = "dense"
    similarity: str = "mind"
    similarity_kwargs: dict[str, Any] = field(default_factory=dict)
    levels: tuple[int, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] = (80, 60, 60)
    lr: float | tuple[float, ...] = 0.5
    optimiser: str = "adam"
    lr_final: float = 0.1
    regulariser: str | None = "diffusion"
    weight: float | tuple[float, ...] = (0.1, 0.1, 0.2)
    grid_spacing: int | tuple[int, ...] = (2, 2, 4)
    svf_steps: int = 6
    subsample: int | tuple[int, ...] = (2, 2, 4)
    field_sigma: float | tuple[float, ...] = 0.0
    smooth_sigma: float = 0.0
    patience: int = 0
    tol: float = 1e-4
    search: float = 0.0
    thin_fov: float = 0.35
    thin_similarity: str = "mind"
    penalise: str = "field"
    eps: float | None = None
    mask_norm: str = "fov"
    feature_fov: bool = False
    discrete: int | tuple[int, ...] = 0
    discrete_pool: int = 2
    discrete_coupling: float = 1.0

    def validate(self, name: str) -> None:
        where = f"preset stage {name!r}"
        if self.model not in MODELS:
            raise InputError(f"{where}: model must be one of {MODELS}, got {self.model!r}")
        if self.optimiser not in OPTIMISERS:
            raise InputError(f"{where}: optimiser must be one of {OPTIMISERS}, got {self.optimiser!r}")
        get_similarity(self.similarity)
        get_similarity(self.thin_similarity)
        if self.regulariser is not None:
            get_regulariser(self.regulariser)
        if not self.levels or any(int(f) < 1 for f in self.levels):
            raise InputError(f"{where}: levels must be downsampling factors >= 1, got {self.levels}")
        for key in (("iterations", "lr") if self.model == "affine" else PER_LEVEL):
            value = getattr(self, key)
            if isinstance(value, (tuple, list)) and len(value) != len(self.levels):
                raise InputError(f"{where}: {key} has {len(value)} entries for {len(self.levels)} levels")
        if not 0.0 <= float(self.thin_fov) <= 1.0:
            raise InputError(f"{where}: thin_fov must be a fraction in [0, 1], got {self.thin_fov}")
        spacings = self.grid_spacing if isinstance(self.grid_spacing, (tuple, list)) else (self.grid_spacing,)
        if any(int(g) < 1 for g in spacings):
            raise InputError(f"{where}: grid_spacing must be >= 1, got {self.grid_spacing}")
        if self.penalise not in ("field", "increment"):
            raise InputError(f"{where}: penalise must be 'field' or 'increment', got {self.penalise!r}")
        if self.mask_norm not in ("fov", "grid"):
            raise InputError(f"{where}: mask_norm must be 'fov' or 'grid', got {self.mask_norm!r}")
        radii = self.discrete if isinstance(self.discrete, (tuple, list)) else (self.discrete,)
        if any(int(r) < 0 for r in radii) or int(self.discrete_pool) < 1 or not float(self.discrete_coupling) >= 0:
            raise InputError(f"{where}: discrete must be >= 0, discrete_pool >= 1 and discrete_coupling >= 0; got "
                             f"{self.discrete}, {self.discrete_pool}, {self.discrete_coupling}")
        if any(int(r) > 0 for r in radii) and self.model != "dense":
            raise InputError(f"{where}: discrete search needs the 'dense' model, got {self.model!r}")
        if self.eps is not None and (self.model == "affine" or self.optimiser != "adam" or not float(self.eps) > 0):
            raise InputError(f"{where}: eps must be None, or a number > 0 for a deformable stage with Adam; got "
                             f"{self.eps!r} ({self.model}, {self.optimiser})")

    def per_level(self, key: str, level: int) -> Any:
        value = getattr(self, key)
        return value[level] if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class Preset:
    """A named registration recipe: intensity window and stages (run in order).

    Attributes:
        name: preset name.
        clip_hu: ``(lo, hi)``: intensities are clipped to this window and mapped to [0, 1] before anything.
        stages: ``(stage name, StageConfig)`` pairs.
    """

    name: str
    clip_hu: tuple[float, float]
    stages: tuple[tuple[str, StageConfig], ...]

    def stage(self, name: str) -> StageConfig:
        for n, cfg in self.stages:
            if n == name:
                return cfg
        raise KeyError(name)


_AFFINE_CT = StageConfig(
    model="affine", similarity="ncc", levels=(8, 4), iterations=(80, 60), lr=0.01, lr_final=1.0, optimiser="adam",
    regulariser=None, weight=0.0, grid_spacing=1, subsample=1, patience=15, tol=1e-5, search=0.25,
)

_REFINE = StageConfig(
    model="dense", similarity="mind", levels=(4, 2, 1), iterations=(30, 35, 40), lr=(0.5, 1.0, 1.0), lr_final=0.1,
    weight=0.07,
    grid_spacing=(2, 2, 4), subsample=(2, 4, 4), penalise="increment", eps=1e-2, mask_norm="grid", feature_fov=True,
    discrete=(0, 2, 0),
)

PRESETS: dict[str, Preset] = {
    # Inter-patient abdominal CT at 2 mm (tuned on a deformed real CT pair, benchmarks/bench_align.py):
    # intensities clipped to [-400, 600] HU (air and bone flat, so their noise carries no signal); affine by
    # a translation search and NCC on 16 and 8 mm; then MIND-SSC SSD with a dense displacement on nodes every
    # 16, 8 and 8 mm (levels 8, 4 and 2 mm), diffusion-regularised, Adam on a random 1/8 (1/64 at 2 mm) of the
    # voxels per iteration with a cosine-decaying step (the StageConfig defaults).
    "abdomen-ct": Preset(name="abdomen-ct", clip_hu=(-400.0, 600.0),
                         stages=(("affine", _AFFINE_CT), ("deformable", StageConfig()))),
    # The same with a diffeomorphic model (stationary velocity field, scaling and squaring): fold-free by
    # construction, about 1.7 times the time of the dense model.
    "abdomen-ct-svf": Preset(name="abdomen-ct-svf", clip_hu=(-400.0, 600.0),
                             stages=(("affine", _AFFINE_CT), ("deformable", StageConfig(model="svf")))),
    # Only the affine stage (initialisation, or pairs that differ by a global map).
    "affine": Preset(name="affine", clip_hu=(-400.0, 600.0), stages=(("affine", _AFFINE_CT),)),
    # The refinement of a given field (``init_disp``, e.g. slicreg's supervoxel flow; ``slicreg register --refine``): no
    # affine stage; MIND-SSC SSD on the 8, 4 and 2 mm levels (30, 35 and 40 Adam steps of 0.5, 1.0 and 1.0), a dense
    # displacement on nodes every 16 mm on the 8 mm level and every 8 mm on the others (a random 1/8, then 1/64 and 1/64
    # of the level voxels compared per iteration), the diffusion of the change only (the given field's own deformation
    # and fine detail are kept), Adam's eps on the summed similarity so that noise-level gradients do not move an
    # already aligned field, masked similarity normalised over the whole grid (a slab held by the regulariser as a full
    # scan is), MIND features only on the fields of view's boxes (``feature_fov``; with the faster mind_ssc this is what
    # makes the 2 mm level affordable).
    # Chosen on the cohort's training pairs (benchmarks/bench_refine.py, docs/register.md,
    # benchmarks/results/refine_levels_20261205.md): on the 20 training pairs 80.4 % Dice 13 and 4.99 mm field
    # error against 76.2 % and 5.93 mm for the previous 8 + 4 mm preset (30 + 15 steps), better on 20 of 20 pairs
    # and 4 of 4 simulated slabs (49.0 against 47.2 %), no folding, SDlogJ 0.045; ~2.4 s CPU on one thread, ~1.5x
    # the previous preset with the old mind_ssc (1.6 s), ~2x with today's (1.2 s). Command (one run):
    #   benchmarks/bench_refine.py --dataset runs/helper-refine/work/prep/current --weights
    #       weights/slicreg-cohort-v3 --cache runs/helper-refine/cache --slabs 4 --threads 1 --old none
    #       --variant new=refine --variant "2mm_30_25_10=refine:levels=(4,2,1);grid_spacing=(1,2,4);
    #       subsample=(2,4,4);feature_fov=True;iterations=(30,25,10)"  (with ``new`` the previous preset)
    # ``deformable={"levels": (4, 2), "iterations": (30, 15), "grid_spacing": (1, 2), "subsample": (2, 4),
    # "weight": 0.1}`` gives the previous preset. Diffusion weight 0.07 instead of 0.1 (the same run's settings
    # otherwise): 81.0 against 80.4 % Dice 13 and 4.89 against 4.99 mm on the 20 training pairs, slabs 49.7 against
    # 49.0 %, better on 24 of 24 pairs, det J <= 0 at most 0.0005 %, SDlogJ 0.047
    # (benchmarks/results/refine_weight_20261205.md: bench_refine.py ... --slabs 4 --threads 2 --old none
    # --variant new=refine --variant w07=refine:weight=0.07).
    # The discrete search on the 4 mm level (``discrete=(0, 2, 0)``: +-2 level voxels = +-8 mm on 8 mm cells,
    # coupled, before that level's Adam steps), chosen on the training pairs against the same preset without it
    # (benchmarks/results/refine_discrete_20261206.md; docs/register.md, "Refinement").
    # 0.6.0: 20 instead of 10 steps on the 2 mm level and 16 mm nodes on the 8 mm level (``iterations=(30, 25,
    # 20)``, ``grid_spacing=(2, 2, 4)``): on the 20 training pairs 82.5 against 82.0 % Dice 13 and 3.68 against
    # 3.89 mm field error (lower on 19 of 20 pairs), for ~11 % more CPU time; of a dozen variants (whole-field
    # diffusion, levels, steps, weights, smoothing the starting field) the best on both
    # (benchmarks/results/refine_steps_20261206.md). 0.7.0, with the cheaper iterations: 30 instead of 20 steps on
    # the 2 mm level and 35 instead of 25 on the 4 mm one (``iterations=(30, 35, 30)``): on the 20 training pairs
    # 82.7 against 82.5 % Dice 13 and 3.51 against 3.68 mm field error (lower on 20 of 20 pairs), ~9 % more CPU time
    # (benchmarks/results/refine_slab_steps_20261206.md, last part). 0.8.0: Adam's step 1.0 instead of 0.5 on the 4
    # and 2 mm levels and 40 steps on the 2 mm one (``lr=(0.5, 1.0, 1.0)``, ``iterations=(30, 35, 40)``): on the 20
    # training pairs 82.9 against 82.7 % Dice 13 and 3.19 against 3.51 mm field error (lower on 20 of 20 pairs), ~0.4 s
    # more CPU on one thread; the larger step alone 82.8 % / 3.28 mm at no cost, 50 steps 82.9 % / 3.11 mm for
    # another ~0.4 s, a step of 2.0 on the 2 mm level 82.6 % / 3.24 mm
    # (benchmarks/results/refine_lr_20261206.md).
    "refine": Preset(name="refine", clip_hu=(-400.0, 600.0), stages=(("deformable", _REFINE),)),
    # The refinement when a field of view is thin (a slab against a scan; slicreg.registration.refine_field picks
    # it): a slab's supervoxel field is right as a whole but wrong in its detail, so the deformable stage of
    # "abdomen-ct" (8, 4 and 2 mm levels, the whole displacement regularised) starts from the affine map
    # closest to that field over the slab (affine_from_field; ``init_affine``), with the features on the fields
    # of view's boxes. Chosen on simulated 40 mm slabs of training subjects against the "refine" preset and the
    # built-in align (docs/register.md, "Slabs"). 0.7.0: 100 instead of 60 Adam steps on the 2 mm level (a slab's
    # 2 mm level is small): on 8 simulated training slabs 89.5 (89.3 with 0.7.0's final code) against 89.0 % Dice 13
    # in the slab and 4.21 against 4.41 mm field error (lower on 8 of 8; align 86.7 % and 6.23 mm), ~0.8 s more on
    # one thread; 140 steps or more 4 mm steps no better (benchmarks/results/refine_slab_steps_20261206.md). 0.8.0:
    # Adam's step 1.0 instead of 0.5 on the 4 and 2 mm levels, decaying to 5 % instead of 10 % (``lr=(0.5, 1.0, 1.0)``,
    # ``lr_final=0.05``): on the 8 simulated training slabs 89.4 against 89.3 % Dice 13 in the slab and 3.96 against
    # 4.21 mm field error (lower on 7 of 8), the same time; the larger step without the longer decay 89.2 % / 3.94 mm,
    # on the 2 mm level only 89.2 % / 4.06 mm (benchmarks/results/refine_lr_20261206.md).
    "refine-slab": Preset(name="refine-slab", clip_hu=(-400.0, 600.0),
                          stages=(("deformable", StageConfig(feature_fov=True, iterations=(80, 60, 100),
                                                             lr=(0.5, 1.0, 1.0), lr_final=0.05)),)),
}


@dataclass
class AlignResult:
    """The result of :func:`register_pair`.

    Attributes:
        disp_vox: ``(3, X, Y, Z)`` float32 field on the fixed grid, voxels, fixed -> moving, including the
            affine part (``warped(p) = moving(p + disp_vox(p))``).
        affine_vox: ``(4, 4)`` float64, fixed voxel -> moving voxel (the affine part alone).
        info: per-stage and per-level timings (s), iterations and losses, the final loss, the total number of
            iterations, the fraction of voxels with ``det J <= 0``, the resolved preset.
    """

    disp_vox: np.ndarray
    affine_vox: np.ndarray
    info: dict[str, Any]


# ------------------------------------------------------------------------------------------------ helpers
def gaussian_smooth(image: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, X, Y, Z)`` with ``sigma`` voxels (per axis), edges replicated."""
    sig = [float(sigma)] * 3 if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    out = image
    for axis, s in enumerate(sig):
        if s <= 0:
            continue
        r = max(1, int(math.ceil(3 * s)))
        x = torch.arange(-r, r + 1, dtype=image.dtype, device=image.device)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape).repeat(c, 1, 1, 1, 1), groups=c)
    return out


def level_shape(shape: Sequence[int], factor: int) -> tuple[int, int, int]:
    """Grid shape of a pyramid level: ``max(1, round(n / factor))`` per axis."""
    return tuple(max(1, int(round(int(n) / factor))) for n in shape)  # type: ignore[return-value]


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A pyramid level: the mean over ``factor``-cubed blocks (``interpolate(mode="area")``, i.e. adaptive average
    pooling) onto :func:`level_shape`. Level voxel ``q`` sits at full-resolution voxel ``(q + 0.5) N / n - 0.5``
    (``align_corners=False`` semantics), exactly so when ``factor`` divides the shape."""
    if factor == 1:
        return image
    return F.interpolate(image, size=level_shape(image.shape[2:], factor), mode="area")


def _normalise(hu: np.ndarray, clip: tuple[float, float], device: str) -> torch.Tensor:
    lo, hi = float(clip[0]), float(clip[1])
    x = (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)[None, None]


class _EarlyStop:
    def __init__(self, patience: int, tol: float) -> None:
        self.patience, self.tol = int(patience), float(tol)
        self.best = math.inf
        self.since = 0

    def update(self, loss: float) -> bool:
        """Record a loss; True when the run should stop."""
        if loss < self.best - self.tol * max(abs(self.best), 1e-12) or not math.isfinite(self.best):
            self.best = loss
            self.since = 0
        else:
            self.since += 1
        return self.patience > 0 and self.since >= self.patience


def _optimise(params: list[dict[str, Any]], closure_loss, cfg: StageConfig, iterations: int, desc: str,
              progress: bool, *, eps: float = 1e-8) -> tuple[int, float]:
    """Minimise ``closure_loss()`` over ``params`` (torch param groups). Returns (iterations, final loss).

    The one optimiser loop of the toolkit (every stage, every level, the refinement of ``slicreg register``).
    Adam is :class:`slicreg.flow.Adam` per tensor -- the update of ``torch.optim.Adam``, number for number,
    without ``torch.optim``, whose first step in a process imports ``torch._dynamo`` (docs/measurements.md); its step
    follows a cosine from ``lr`` to ``lr * lr_final`` over ``iterations``; ``eps`` is Adam's."""
    from tqdm.auto import tqdm

    stopper = _EarlyStop(cfg.patience, cfg.tol)
    bar = tqdm(total=iterations, desc=desc, disable=not progress, leave=False)
    last = math.nan
    done = 0
    try:
        if cfg.optimiser == "adam":
            from slicreg.flow.optim import Adam

            tensors = [(p, float(group["lr"])) for group in params for p in group["params"]]
            opts = [Adam(p, lr=lr, eps=float(eps)) for p, lr in tensors]
            final = float(cfg.lr_final)
            # cosine decay of the step from lr to lr * lr_final over the level's iterations
            span = max(iterations, 1)
            for done in range(1, iterations + 1):
                factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(done - 1, span) / span))
                for (p, lr), opt in zip(tensors, opts):
                    p.grad = None
                    opt.lr = lr * factor
                loss = closure_loss()
                loss.backward()
                for (p, _), opt in zip(tensors, opts):
                    if p.grad is not None:
                        opt.step(p.grad)
                last = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{last:.5f}")
                if not math.isfinite(last):
                    raise InputError(f"{desc}: the loss became {last}; lower the learning rate")
                if stopper.update(last):
                    break
        else:
            flat = [p for group in params for p in group["params"]]
            opt = torch.optim.LBFGS(flat, lr=float(params[0]["lr"]), max_iter=1,
                                    history_size=10, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = closure_loss()
                loss.backward()
                return loss

            for done in range(1, iterations + 1):  # noqa: B007 (the count run is returned after the loop)
                last = float(opt.step(closure).detach())
                bar.update(1)
                bar.set_postfix(loss=f"{last:.5f}")
                if stopper.update(last):
                    break
    finally:
        bar.close()
    return done, last


# ------------------------------------------------------------------------------------------------- state
@dataclass
class _State:
    """The current map ``phi(x) = A (x + d(x))`` (see the module docstring)."""

    affine: np.ndarray  # 4x4 float64, full-resolution fixed voxel -> moving voxel
    disp: torch.Tensor | None = None  # (1, 3, *grid) in full-resolution fixed voxels, or None
    velocity: torch.Tensor | None = None  # the svf parameters that produced ``disp`` (for continuation)
    velocity_voxel_size: tuple[float, float, float] | None = None
    # field-of-view boxes (first and last voxel per axis, full resolution) of the fixed and moving images
    fov_fixed: np.ndarray | None = None  # (2, 3)
    fov_moving: np.ndarray | None = None  # (2, 3)
    # during a stage with ``penalise="increment"``: the field the stage started from, held fixed on its own grid
    # (full-resolution voxels); ``disp`` is then the stage's change on top of it, and d = base + disp
    base: torch.Tensor | None = None

    def disp_on(self, shape: Sequence[int], device: str) -> torch.Tensor | None:
        return None if self.disp is None else resize_field(self.disp.to(device), shape)

    def start_increment(self) -> None:
        """Begin a ``penalise="increment"`` stage: the current field becomes the fixed base, the change starts
        at zero."""
        self.base, self.disp, self.velocity = self.disp, None, None

    def end_increment(self) -> None:
        """End such a stage: ``disp = base + change``, on the finer of the two grids (the change resampled
        trilinearly, the base kept exactly when it is the finer)."""
        base, change = self.base, self.disp
        self.base = None
        if base is None or change is None:
            self.disp = change if base is None else base
            return
        self.velocity = None  # the sum is no longer the exponential of the stage's velocity
        if math.prod(change.shape[2:]) > math.prod(base.shape[2:]):
            self.disp = resize_field(base.to(change.device), change.shape[2:]) + change
        else:
            self.disp = base + resize_field(change.to(base.device), base.shape[2:])


def _positions(matrix_level: torch.Tensor, disp_level: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """Moving level-voxel positions ``M (y + d_level(y))`` of every fixed level voxel, ``(1, 3, *shape)``."""
    grid = identity_grid(shape, device=matrix_level.device, dtype=matrix_level.dtype)
    if disp_level is not None:
        grid = grid + disp_level
    return torch.einsum("ab,nb...->na...", matrix_level[:3, :3], grid) + matrix_level[:3, 3].reshape(1, 3, 1, 1, 1)


class _Level:
    """Everything about one pyramid level of a pair that does not change while optimising."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, factor: int, cfg: StageConfig,
                 spacing_mm: np.ndarray, cache: dict[Any, Any] | None = None,
                 fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> None:
        self.factor = factor
        self.full_fixed = tuple(fixed.shape[2:])
        self.full_moving = tuple(moving.shape[2:])
        if cache is not None and factor in cache:
            f, m = cache[factor]
        else:
            f, m = downsample(fixed, factor), downsample(moving, factor)
            if cache is not None:
                cache[factor] = (f, m)
        if cfg.smooth_sigma > 0:
            f, m = gaussian_smooth(f, cfg.smooth_sigma), gaussian_smooth(m, cfg.smooth_sigma)
        self.shape = tuple(f.shape[2:])
        # level voxel -> full-resolution voxel: x = r q + (r - 1) / 2 with r = N / n (slicreg.grid)
        self.s_fixed = fov_index_map(self.shape, self.full_fixed)
        self.s_moving = fov_index_map(tuple(m.shape[2:]), self.full_moving)
        self.r_fixed = np.diag(self.s_fixed)[:3].copy()
        self.spacing_mm = spacing_mm * self.r_fixed  # level voxel size in mm
        sim = get_similarity(cfg.similarity)
        self.similarity = sim.name
        feat_kw, self.loss_kw = sim.split_kwargs(dict(cfg.similarity_kwargs))
        self.loss_fn = sim.loss
        # field-of-view masks on this level: the fraction of each level voxel inside the field of view
        self.fixed_mask = self.moving_mask = None
        if fixed_mask is not None or moving_mask is not None:
            key = ("masks", factor)
            if cache is not None and key in cache:
                self.fixed_mask, self.moving_mask = cache[key]
            else:
                self.fixed_mask = None if fixed_mask is None else downsample(fixed_mask, factor)
                self.moving_mask = None if moving_mask is None else downsample(moving_mask, factor)
                if cache is not None:
                    cache[key] = (self.fixed_mask, self.moving_mask)
        # the bounding box of the fixed field of view on this level: voxels outside it have weight 0, so the
        # optimisation compares only the voxels inside (a slab: a few percent of the grid)
        self.box: tuple[slice, ...] | None = None
        if self.fixed_mask is not None:
            inside = (self.fixed_mask[0, 0] > 0).cpu().numpy()
            box = mask_box(inside).astype(int)
            self.box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in box.T)
        # the features: of the whole level grids, or (``feature_fov``, deformable stages) of the fields of view's
        # bounding boxes plus a margin; ``*_origin`` is the level voxel of a feature tensor's first voxel
        self.fixed_origin = self.moving_origin = (0, 0, 0)
        if cfg.feature_fov and cfg.model != "affine":
            if self.box is not None:
                self.fixed_origin, f = _crop_box(f, self.box)
            if self.moving_mask is not None:
                inside = (self.moving_mask[0, 0] > 0).cpu().numpy()
                self.moving_origin, m = _crop_box(
                    m, tuple(slice(int(lo), int(hi) + 1) for lo, hi in mask_box(inside).astype(int).T))
        with torch.no_grad():
            self.fixed_feat = sim.features(f, **feat_kw)
            self.moving_feat = sim.features(m, **feat_kw, **({"channels_last": True} if sim.channels_last else {}))
            if self.moving_feat.shape[1] > 1:
                # the moving features are read at scattered positions in every iteration: with the channels of a
                # voxel next to each other in memory, grid_sample's CPU kernel and its backward take ~40 % less
                # time for MIND's 12 channels (docs/register.md, "Refinement"); the values are the same
                self.moving_feat = self.moving_feat.contiguous(memory_format=torch.channels_last_3d)

    def fixed_at(self, cut: tuple[slice, ...] | None) -> torch.Tensor:
        """The fixed features at the level voxels ``cut`` (slices of the level grid; ``None``: all of it)."""
        if cut is None or not any(self.fixed_origin):
            return self.fixed_feat if cut is None else self.fixed_feat[(slice(None), slice(None), *cut)]
        shifted = (slice(c.start - o, None if c.stop is None else c.stop - o, c.step)
                   for c, o in zip(cut, self.fixed_origin))
        return self.fixed_feat[(slice(None), slice(None), *shifted)]

    def moving_features_at(self, moving_pos: torch.Tensor, *, scattered: bool = False) -> torch.Tensor:
        """The moving features at moving level positions ``(1, 3, ...)`` (trilinear, edges continued).

        ``scattered``: the positions are the optimiser's sub-lattice (a small share of the grid): read by the
        sampler's channels-last gather, which is faster than ``grid_sample`` and its backward there; the whole
        grid (the discrete search) stays with ``grid_sample``, faster for dense positions (docs/register.md, "The
        refinement made cheaper")."""
        if any(self.moving_origin):
            moving_pos = moving_pos - torch.as_tensor(self.moving_origin, dtype=moving_pos.dtype,
                                                      device=moving_pos.device).reshape(1, 3, 1, 1, 1)
        if scattered and self.moving_feat.shape[0] == 1 and self.moving_feat.shape[1] > 1:
            return sample(self.moving_feat[0], moving_pos[0], backend="channels_last")[None]
        return grid_warp(self.moving_feat, moving_pos, align_corners=True, padding_mode="border")

    def weight(self, cut: tuple[slice, ...] | None, moving_pos: torch.Tensor) -> torch.Tensor | None:
        """Voxel weights of the similarity: the fixed mask (on the compared voxels ``cut`` of the level grid, or
        all of them) times the moving mask sampled at the compared voxels' moving level positions (trilinear,
        edges continued like the moving image). ``None`` without masks. No gradient flows through the
        weights: they select voxels, they are not a term the optimiser can trade against the similarity."""
        if self.fixed_mask is None and self.moving_mask is None:
            return None
        with torch.no_grad():
            w = None
            if self.fixed_mask is not None:
                w = self.fixed_mask if cut is None else self.fixed_mask[(slice(None), slice(None), *cut)]
            if self.moving_mask is not None:
                wm = grid_warp(self.moving_mask, moving_pos.detach(), align_corners=True, padding_mode="border")
                w = wm if w is None else w * wm
        return w

    def level_matrix(self, affine_full: torch.Tensor) -> torch.Tensor:
        """``S_m^-1 A S_f`` as a float32 tensor (differentiable in ``affine_full``)."""
        sf = torch.as_tensor(self.s_fixed, dtype=affine_full.dtype, device=affine_full.device)
        sm_inv = torch.as_tensor(np.linalg.inv(self.s_moving), dtype=affine_full.dtype, device=affine_full.device)
        return sm_inv @ affine_full @ sf


def _crop_box(image: torch.Tensor, box: tuple[slice, ...]) -> tuple[tuple[int, int, int], torch.Tensor]:
    """``image`` ``(B, C, X, Y, Z)`` cut to ``box`` (slices of its grid) grown by :data:`FEATURE_MARGIN` voxels
    per side within the grid; returns (the first voxel of the cut, the cut)."""
    size = image.shape[2:]
    lo = [max(0, int(b.start) - FEATURE_MARGIN) for b in box]
    hi = [min(int(n), int(b.stop) + FEATURE_MARGIN) for b, n in zip(box, size)]
    return tuple(lo), image[(slice(None), slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]  # type: ignore[return-value]


def translation_search(fixed: torch.Tensor, moving: torch.Tensor, matrix: np.ndarray, *, fraction: float,
                       threshold: float = 0.05, min_overlap: float = 0.5,
                       fixed_mask: torch.Tensor | None = None,
                       moving_mask: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Exhaustive search of whole-voxel translations on one pyramid level.

    Args:
        fixed, moving: ``(1, 1, X, Y, Z)`` level images (normalised intensities).
        matrix: 4x4 current level map, fixed level voxel -> moving level voxel; candidates add a translation.
        fraction: search range per axis as a fraction of the fixed level grid's extent.
        threshold: fixed voxels above it (the body, for CT) are the ones compared.
        min_overlap: without masks, a candidate must keep at least this fraction of the compared voxels inside
            the moving grid; with masks, the compared voxels that land inside the moving field of view must
            number at least this fraction of the smaller of the two fields of view's body voxels (above
            ``threshold`` and inside the mask).
        fixed_mask, moving_mask: optional ``(1, 1, ...)`` field-of-view fractions of the level voxels (fixed and
            moving grids). With either, only fixed voxels inside the fixed field of view (fraction >= 0.5) are
            compared, and for each candidate only those landing inside the moving field of view (nearest
            moving voxel's fraction >= 0.5); the NCC is taken over that overlap.

    Returns:
        ``(shift, ncc)``: the best extra translation in level voxels (moving side) and its NCC.
    """
    shape = fixed.shape[2:]
    ranges = [range(-int(round(fraction * n)), int(round(fraction * n)) + 1) for n in shape]
    masked = fixed_mask is not None or moving_mask is not None
    grid = identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)
    sel = (fixed.reshape(-1) > threshold)
    if fixed_mask is not None:
        sel = sel & (fixed_mask.reshape(-1) >= 0.5)
    if int(sel.sum()) < 8:
        sel = torch.ones_like(sel) if fixed_mask is None else fixed_mask.reshape(-1) >= 0.5
    f = fixed.reshape(-1)[sel].double()
    if not masked:
        f = f - f.mean()
        f_norm = torch.sqrt((f * f).sum()) + 1e-12
    m = torch.as_tensor(matrix, dtype=torch.float64)
    base = (m[:3, :3] @ grid[:, sel] + m[:3, 3:4])  # moving positions of the compared voxels
    mov = moving[0, 0].double()
    msize = torch.tensor(mov.shape, dtype=torch.float64)[:, None]
    if masked:
        m_fov = torch.ones_like(mov, dtype=torch.bool) if moving_mask is None else moving_mask[0, 0] >= 0.5
        n_moving = int(((mov > threshold) & m_fov).sum())
        needed = min_overlap * max(1, min(int(sel.sum()), n_moving))
    best, best_shift = -math.inf, np.zeros(3)
    for dx in ranges[0]:
        for dy in ranges[1]:
            for dz in ranges[2]:
                pos = torch.round(base + torch.tensor([[dx], [dy], [dz]], dtype=torch.float64))
                inside = ((pos >= 0) & (pos <= msize - 1)).all(dim=0)
                if not masked:
                    if float(inside.double().mean()) < min_overlap:
                        continue
                    idx = pos.clamp(min=torch.zeros_like(msize), max=msize - 1).long()
                    vals = mov[idx[0], idx[1], idx[2]]
                    vals = vals - vals.mean()
                    ncc = float((f * vals).sum() / (f_norm * (torch.sqrt((vals * vals).sum()) + 1e-12)))
                else:
                    idx = pos.clamp(min=torch.zeros_like(msize), max=msize - 1).long()
                    inside = inside & m_fov[idx[0], idx[1], idx[2]]
                    if int(inside.sum()) < max(needed, 8):
                        continue
                    fi = f[inside] - f[inside].mean()
                    vals = mov[idx[0, inside], idx[1, inside], idx[2, inside]]
                    vals = vals - vals.mean()
                    ncc = float((fi * vals).sum() / ((torch.sqrt((fi * fi).sum()) + 1e-12)
                                                     * (torch.sqrt((vals * vals).sum()) + 1e-12)))
                if ncc > best:
                    best, best_shift = ncc, np.array([dx, dy, dz], dtype=np.float64)
    return best_shift, best


def thin_axes(fov_fixed: np.ndarray | None, fov_moving: np.ndarray | None, fixed_shape: Sequence[int],
              moving_shape: Sequence[int], fraction: float) -> tuple[bool, bool, bool]:
    """Per axis: is the shorter field of view less than ``fraction`` times the longer one?

    Args:
        fov_fixed, fov_moving: ``(2, 3)`` first and last voxel of each field of view per axis (``None``: the
            whole grid).
        fixed_shape, moving_shape: grid shapes (same voxel size).
        fraction: the ``thin_fov`` knob of :class:`StageConfig`.
    """
    ext_f = _extent(fov_fixed, fixed_shape)
    ext_m = _extent(fov_moving, moving_shape)
    return tuple(bool(min(a, b) < fraction * max(a, b)) for a, b in zip(ext_f, ext_m))  # type: ignore[return-value]


def _extent(box: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    if box is None:
        return np.asarray(shape, dtype=np.float64)
    return box[1] - box[0] + 1.0


def _box(box: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    if box is None:
        return np.stack([np.zeros(3), np.asarray(shape, dtype=np.float64) - 1])
    return np.asarray(box, dtype=np.float64)


def fov_translation_search(fixed_feat: torch.Tensor, moving_feat: torch.Tensor, matrix: np.ndarray,
                           ranges: Sequence[tuple[int, int]], *, fixed_weight: torch.Tensor | None = None,
                           moving_mask: torch.Tensor | None = None,
                           min_overlap: float = THIN_OVERLAP) -> tuple[np.ndarray, float]:
    """Exhaustive search of whole-voxel translations by masked feature SSD, every candidate at once by FFT.

    The candidate ``s`` maps fixed level voxel ``p`` to moving level position ``matrix @ (p + s)`` and scores
    ``sum_p w(p) |F(p) - M(matrix (p + s))|^2 / (C sum_p w(p))`` with ``w(p) = fixed_weight(p) v(p + s)``, ``v``
    the moving field of view (``moving_mask``, and zero outside the moving grid) and ``C`` channels: the
    masked ``mind``/``mse`` loss. The moving features and mask are resampled once (trilinear) onto the fixed
    level grid extended by the search range; the three sums of the expanded square and the overlap are
    cross-correlations, so all candidates cost a few FFTs of that grid.

    Args:
        fixed_feat: ``(1, C, X, Y, Z)`` fixed features of the level.
        moving_feat: ``(1, C, X', Y', Z')`` moving features of the level.
        matrix: 4x4 level map, fixed level voxel -> moving level voxel (any affine; the shift is applied
            before it, in fixed level voxels).
        ranges: per axis an inclusive ``(lo, hi)`` range of shifts in fixed level voxels.
        fixed_weight: ``(1, 1, X, Y, Z)`` weights of the fixed voxels (the fixed field of view); None = all 1.
        moving_mask: ``(1, 1, X', Y', Z')`` moving field of view fractions; None = the whole moving grid.
        min_overlap: candidates whose overlap ``sum w`` is below this fraction of the smaller of
            ``sum fixed_weight`` and the moving field of view's size (level voxels) are not considered.

    Returns:
        ``(shift, score)``: the best shift (fixed level voxels, float array of whole numbers) and its mean
        squared feature difference; ``(zeros, inf)`` if no candidate overlaps enough.
    """
    device = fixed_feat.device
    shape = tuple(int(n) for n in fixed_feat.shape[2:])
    lo = np.array([int(r[0]) for r in ranges])
    hi = np.array([int(r[1]) for r in ranges])
    if np.any(hi < lo):
        raise InputError(f"fov_translation_search: empty shift range {list(map(tuple, ranges))}")
    ext = tuple(int(n + h - low) for n, low, h in zip(shape, lo, hi))
    # moving features and field of view on the extended fixed grid: voxel e <-> fixed level voxel e + lo
    grid = identity_grid(ext, device=device, dtype=torch.float32) + torch.as_tensor(
        lo, dtype=torch.float32, device=device).reshape(1, 3, 1, 1, 1)
    pos = _points(torch.as_tensor(matrix, dtype=torch.float32, device=device), grid)
    with torch.no_grad():
        m = grid_warp(moving_feat, pos, align_corners=True, padding_mode="border").double()
        fov = torch.ones_like(moving_feat[:, :1]) if moving_mask is None else moving_mask.to(moving_feat.dtype)
        v = grid_warp(fov, pos, align_corners=True, padding_mode="zeros").double()
        wf = torch.ones_like(fixed_feat[:, :1]) if fixed_weight is None else fixed_weight.to(fixed_feat.dtype)
        wf = wf.double()
        f = fixed_feat.double()
        n_ch = f.shape[1]

        def spectrum(x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfftn(x, s=ext, dim=(2, 3, 4))

        def corr(a_spec: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            """``out[s] = sum_p a(p) b(p + s)`` for ``s`` in ``[0, ext - shape]`` (no wrap-around: ``b`` is as
            long as the extended grid and ``a`` is zero beyond ``shape``)."""
            full = torch.fft.irfftn(a_spec.conj() * spectrum(b), s=ext, dim=(2, 3, 4))
            return full[:, :, : ext[0] - shape[0] + 1, : ext[1] - shape[1] + 1, : ext[2] - shape[2] + 1]

        overlap = corr(spectrum(wf), v)[0, 0]
        term_ff = corr(spectrum(wf * (f * f).sum(dim=1, keepdim=True)), v)[0, 0]
        term_mm = corr(spectrum(wf), (m * m).sum(dim=1, keepdim=True) * v)[0, 0]
        term_fm = corr(spectrum(wf * f), m * v).sum(dim=1)[0]
        ssd = (term_ff - 2 * term_fm + term_mm) / (n_ch * overlap.clamp_min(1e-9))
    need = min_overlap * min(float(wf.sum()), _fov_size(moving_mask, moving_feat))
    ssd = torch.where(overlap >= need, ssd, torch.full_like(ssd, math.inf))
    best = int(torch.argmin(ssd))
    score = float(ssd.reshape(-1)[best])
    if not math.isfinite(score):
        return np.zeros(3), math.inf
    idx = np.unravel_index(best, tuple(ssd.shape))
    return np.asarray(idx, dtype=np.float64) + lo, score


def _fov_size(moving_mask: torch.Tensor | None, moving_feat: torch.Tensor) -> float:
    """The moving field of view's size in level voxels."""
    if moving_mask is None:
        return float(np.prod(moving_feat.shape[2:]))
    return float(moving_mask.double().sum())


def _thin_ranges(state: _State, lv: _Level, level_matrix: np.ndarray, thin: Sequence[bool],
                 fraction: float) -> list[tuple[int, int]]:
    """Shift ranges (fixed level voxels) of :func:`fov_translation_search`: ``+-fraction`` of the level grid per
    axis; along a thin axis also every shift from the placement that puts the fixed field of view's first
    voxel on the moving one's first voxel to the one that aligns the last voxels (for a fixed slab: the slab
    slid along the whole moving scan; for a moving slab: the reverse)."""
    to_level_f = np.linalg.inv(lv.s_fixed)
    to_level_m = np.linalg.inv(lv.s_moving)
    bf = to_level_f @ np.vstack([_box(state.fov_fixed, lv.full_fixed).T, np.ones((1, 2))])
    bm = _box(state.fov_moving, lv.full_moving)
    corners = np.array([[bm[i, 0], bm[j, 1], bm[k, 2], 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]).T
    m_on_f = np.linalg.inv(level_matrix) @ to_level_m @ corners  # the moving box on the fixed level grid
    out = []
    for a, n in enumerate(lv.shape):
        r = int(round(fraction * n))
        lo, hi = -r, r
        if thin[a]:
            first = m_on_f[a].min() - bf[a, 0]
            last = m_on_f[a].max() - bf[a, 1]
            lo = min(lo, int(math.floor(min(first, last))))
            hi = max(hi, int(math.ceil(max(first, last))))
        out.append((lo, hi))
    return out


def _run_affine(state: _State, lv: _Level, cfg: StageConfig, level: int, device: str, gen: torch.Generator,
                progress: bool, desc: str) -> tuple[int, float]:
    thin = thin_axes(state.fov_fixed, state.fov_moving, lv.full_fixed, lv.full_moving, float(cfg.thin_fov))
    if level == 0 and cfg.search > 0 and any(thin):
        level_matrix = np.linalg.inv(lv.s_moving) @ state.affine @ lv.s_fixed
        ranges = _thin_ranges(state, lv, level_matrix, thin, cfg.search)
        shift, _ = fov_translation_search(lv.fixed_feat, lv.moving_feat, level_matrix, ranges,
                                          fixed_weight=lv.fixed_mask, moving_mask=lv.moving_mask)
        move = np.eye(4)
        move[:3, 3] = lv.r_fixed * shift  # fixed level voxels -> fixed full-resolution voxels
        state.affine = state.affine @ move
    elif level == 0 and cfg.search > 0:
        level_matrix = np.linalg.inv(lv.s_moving) @ state.affine @ lv.s_fixed
        shift, _ = translation_search(lv.fixed_feat[:, :1].cpu(), lv.moving_feat[:, :1].cpu(), level_matrix,
                                      fraction=cfg.search,
                                      fixed_mask=None if lv.fixed_mask is None else lv.fixed_mask.cpu(),
                                      moving_mask=None if lv.moving_mask is None else lv.moving_mask.cpu())
        state.affine = state.affine.copy()
        state.affine[:3, 3] += lv.s_moving[:3, :3] @ shift  # level voxels -> full-resolution voxels
    half = float(np.mean(np.asarray(lv.full_fixed, dtype=np.float64) - 1) / 2)
    model = AffineTransform(lv.full_fixed, lv.full_moving, translation_scale=max(half, 1.0)).to(device)
    _set_affine(model, state.affine)
    if any(thin):
        # a thin field of view can not determine scaling, shear or rotation involving its short axis: keep the
        # rows and columns of the linear part for that axis as they are (only the translation moves there)
        keep = torch.ones(3, 3, dtype=model.linear.dtype, device=model.linear.device)
        for a in range(3):
            if thin[a]:
                keep[a, :] = 0.0
                keep[:, a] = 0.0
        model.linear.register_hook(lambda grad: grad * keep)
    # the nonlinear part (if an earlier stage made one) stays fixed while the affine part is refined
    d_full = state.disp_on(lv.shape, device)
    r_f = torch.as_tensor(lv.r_fixed, dtype=torch.float32, device=device).reshape(1, 3, 1, 1, 1)
    d_level = None if d_full is None else d_full / r_f
    params = [{"params": [model.linear, model.translation], "lr": float(cfg.per_level("lr", level))}]
    loss_kw = dict(lv.loss_kw)
    if lv.similarity == "mi":
        loss_kw["generator"] = gen

    if lv.box is not None:  # compare only the voxels of the fixed field of view's bounding box
        cut = (slice(None), slice(None), *lv.box)
        coords = identity_grid(lv.shape, device=device)[cut]
        if d_level is not None:
            coords = coords + d_level[cut]
        target = lv.fixed_feat[cut]

    def loss() -> torch.Tensor:
        if lv.box is not None:
            pos = _points(lv.level_matrix(model.matrix()), coords)
            warped = grid_warp(lv.moving_feat, pos, align_corners=True, padding_mode="border")
            return lv.loss_fn(target, warped, weight=lv.weight(lv.box, pos), **loss_kw)
        pos = _positions(lv.level_matrix(model.matrix()), d_level, lv.shape)
        warped = grid_warp(lv.moving_feat, pos, align_corners=True, padding_mode="border")
        weight = lv.weight(None, pos)
        if weight is None:
            return lv.loss_fn(lv.fixed_feat, warped, **loss_kw)
        return lv.loss_fn(lv.fixed_feat, warped, weight=weight, **loss_kw)

    its, last = _optimise(params, loss, cfg, int(cfg.per_level("iterations", level)), desc, progress)
    state.affine = model.matrix().detach().double().cpu().numpy()
    return its, last


def _thin_stage(stage: StageConfig, state: _State, fixed_shape: Sequence[int],
                moving_shape: Sequence[int]) -> tuple[StageConfig, dict[str, Any] | None]:
    """An affine stage adapted to a thin field of view (see ``thin_fov`` of :class:`StageConfig`): the thin
    similarity and only the levels on which the slab keeps :data:`THIN_MIN_VOXELS` voxels (at least the finest).
    Returns the stage unchanged and ``None`` when no axis is thin."""
    thin = thin_axes(state.fov_fixed, state.fov_moving, fixed_shape, moving_shape, float(stage.thin_fov))
    if not any(thin):
        return stage, None
    ext = np.minimum(_extent(state.fov_fixed, fixed_shape), _extent(state.fov_moving, moving_shape))
    slab = float(min(ext[a] for a in range(3) if thin[a]))
    keep = [i for i, f in enumerate(stage.levels) if slab / float(f) >= THIN_MIN_VOXELS] or [len(stage.levels) - 1]
    changes: dict[str, Any] = {"levels": tuple(stage.levels[i] for i in keep)}
    for key in ("iterations", "lr"):
        value = getattr(stage, key)
        if isinstance(value, (tuple, list)):
            changes[key] = tuple(value[i] for i in keep)
    if stage.thin_similarity != stage.similarity:
        changes["similarity"] = stage.thin_similarity
        changes["similarity_kwargs"] = {}
    return dataclasses.replace(stage, **changes), {
        "axes": [a for a in range(3) if thin[a]], "slab_vox": slab, "levels": list(changes["levels"]),
        "similarity": stage.thin_similarity}


def _set_affine(model: AffineTransform, matrix: np.ndarray) -> None:
    """Set ``model`` so that ``model.matrix() == matrix``."""
    lin = matrix[:3, :3]
    cf = model.centre_fixed.cpu().numpy()
    cm = model.centre_moving.cpu().numpy()
    t = matrix[:3, 3] + lin @ cf - cm
    with torch.no_grad():
        model.linear.copy_(torch.as_tensor(lin - np.eye(3), dtype=torch.float32))
        model.translation.copy_(torch.as_tensor(t / model.translation_scale, dtype=torch.float32))


def _lattice(shape: Sequence[int], stride: int, gen: torch.Generator, device: str,
             box: tuple[slice, ...] | None = None) -> tuple[tuple[slice, ...], torch.Tensor]:
    """A random sub-lattice of the level grid: every ``stride``-th voxel per axis from a random offset.

    Returns the slices that cut it out of a ``(B, C, X, Y, Z)`` tensor and its voxel coordinates
    ``(1, 3, x, y, z)`` (float32). A regular lattice keeps memory access local, unlike scattered points.
    ``box``: only the part of the grid inside these slices (step 1), e.g. the fixed field of view."""
    offsets = torch.randint(0, stride, (3,), generator=gen).tolist() if stride > 1 else [0, 0, 0]
    starts = [0, 0, 0] if box is None else [int(b.start) for b in box]
    stops = [int(n) for n in shape] if box is None else [int(b.stop) for b in box]
    firsts = [a + o for a, o in zip(starts, offsets)]
    slices = tuple(slice(f, None if box is None else e, stride) for f, e in zip(firsts, stops))
    axes = [torch.arange(f, e, stride, device=device, dtype=torch.float32) for f, e in zip(firsts, stops)]
    return slices, torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _run_deformable(state: _State, lv: _Level, cfg: StageConfig, level: int, device: str, gen: torch.Generator,
                    progress: bool, desc: str, *, plan: Any = None) -> tuple[int, float]:
    """One level of a deformable stage.

    The model's field lives on its own parameter grid (values in full-resolution voxels); every iteration it is
    sampled at the level voxels being compared: all of them, or (``subsample``) a random sub-lattice drawn
    from the seeded generator, which makes fine levels affordable on a CPU. The regulariser acts on the
    parameter grid's field in mm. During a ``penalise="increment"`` stage the model's field is the change and
    the stage's starting field (``state.base``, block-averaged onto the level) is added at the compared voxels.

    ``plan`` (a time budget, :class:`_Budget`): called with the wall seconds of one loss and gradient evaluation
    (a probe on a throwaway generator, so the seeded sequence is unchanged), returns the iterations to run."""
    shape = lv.shape
    gs = int(cfg.per_level("grid_spacing", level))
    grid_shape = tuple(max(2, int(math.ceil(n / gs))) for n in shape)
    offset = None
    if cfg.model == "svf":
        voxel_size = tuple(float(lv.r_fixed[a] * shape[a] / grid_shape[a]) for a in range(3))
        init = state.velocity.to(device) if state.velocity is not None else None
        if init is None and state.disp is not None:
            offset = state.disp_on(grid_shape, device)  # a non-svf field from before: keep it, add a velocity
        model: torch.nn.Module = StationaryVelocity(grid_shape, voxel_size=voxel_size, steps=cfg.svf_steps,
                                                    init=init).to(device)
    elif cfg.model == "bspline":
        grid_shape = tuple(shape)
        model = BSplineDisplacement(shape, spacing=gs).to(device)
        offset = state.disp_on(shape, device)
    elif cfg.model == "dense":
        model = DenseDisplacement(grid_shape, init=state.disp_on(grid_shape, device)).to(device)
    else:
        raise InputError(f"deformable stage: model {cfg.model!r} is not deformable")
    # the parameters hold full-resolution voxels: scale the step so that ``lr`` is in level voxels
    step = float(cfg.per_level("lr", level)) * float(np.mean(lv.r_fixed))
    params = [{"params": list(model.parameters()), "lr": step}]
    matrix = lv.level_matrix(torch.as_tensor(state.affine, dtype=torch.float32, device=device))
    reg = get_regulariser(cfg.regulariser) if cfg.regulariser else None
    weight = float(cfg.per_level("weight", level))
    # mm per full-resolution voxel, and the parameter grid's spacing in mm
    mm_per_vox = torch.as_tensor(lv.spacing_mm / lv.r_fixed, dtype=torch.float32, device=device).reshape(1, 3, 1, 1, 1)
    grid_mm = tuple(float(lv.spacing_mm[a] * shape[a] / grid_shape[a]) for a in range(3))
    r_f = torch.as_tensor(lv.r_fixed, dtype=torch.float32, device=device).reshape(1, 3, 1, 1, 1)
    to_grid_map = fov_index_map(shape, grid_shape)  # level voxel -> parameter-grid voxel (same field of view)
    stride = int(cfg.per_level("subsample", level))
    full_grid = identity_grid(shape, device=device)
    loss_kw = dict(lv.loss_kw)
    if lv.similarity == "mi":
        loss_kw["generator"] = gen

    sigma = float(cfg.per_level("field_sigma", level))
    n_grid = float(math.prod(len(range(0, n, stride)) for n in shape))  # voxels compared without masks
    base = None  # the fixed starting field of an increment stage on the level grid (block mean of a finer one)
    if state.base is not None:
        b = state.base.to(device)
        base = downsample(b, lv.factor) if tuple(b.shape[2:]) == lv.full_fixed else resize_field(b, shape)

    def on_lattice(g: torch.Tensor, starts: Sequence[int], step: int, lattice: tuple[int, ...],
                   to_grid_map: np.ndarray = to_grid_map) -> torch.Tensor:
        """``g`` (on the parameter grid, or with the identity map on the level grid) at the level voxels
        ``starts + step k``, k < ``lattice``: level voxel y -> parameter-grid voxel r y + (r - 1) / 2 with
        r = n_grid / n_level (``fov_index_map``), an axis-aligned map, so the sampling is separable (much cheaper
        than ``grid_sample`` and its backward in every iteration)."""
        lattice_map = np.eye(4)
        for a in range(3):
            lattice_map[a, a] = step * to_grid_map[a, a]
            lattice_map[a, 3] = starts[a] * to_grid_map[a, a] + to_grid_map[a, 3]
        return sample_affine(g, lattice_map, lattice, backend="separable")

    def grid_field() -> torch.Tensor:
        d = model()
        if sigma > 0:
            d = gaussian_smooth(d, sigma)
        return d if offset is None else d + offset

    def loss(generator: torch.Generator = gen) -> torch.Tensor:
        g = grid_field()
        if stride > 1 or lv.box is not None:
            # a sub-lattice, and with a fixed field of view only the voxels in its bounding box
            cut, y = _lattice(shape, stride, generator, device, lv.box)
            target = lv.fixed_at(cut)
        else:
            cut, y, target = None, full_grid, lv.fixed_feat
        if cut is None and tuple(grid_shape) == tuple(shape):
            d = g
        else:
            d = on_lattice(g, [0, 0, 0] if cut is None else [int(c.start) for c in cut],
                           1 if cut is None else int(cut[0].step or 1), tuple(y.shape[2:]))
        if base is not None:
            d = d + (base if cut is None else base[(slice(None), slice(None), *cut)])
        pos = _points(matrix, y + d / r_f)
        warped = lv.moving_features_at(pos, scattered=True)
        voxel_weight = lv.weight(cut, pos)
        if voxel_weight is None:
            value = lv.loss_fn(target, warped, **loss_kw)
        else:
            value = lv.loss_fn(target, warped, weight=voxel_weight, **loss_kw)
            if cfg.mask_norm == "grid":  # the mean over the whole grid's sub-lattice, zero outside the view
                value = value * (voxel_weight.sum() / n_grid)
        if reg is not None and weight > 0:
            value = value + weight * reg(g * mm_per_vox, spacing=grid_mm)
        return value

    eps = 1e-8
    if cfg.eps is not None:
        # eps for the similarity summed over the compared voxels, per level voxel of displacement: the loss is a
        # (weighted) mean over ~n_compared voxels and the parameters hold full-resolution voxels (r per level voxel)
        box = lv.box or tuple(slice(0, n) for n in shape)
        n_compared = math.prod(len(range(b.start, b.stop, stride)) for b in box)
        if lv.fixed_mask is not None:
            n_compared *= float(lv.fixed_mask[(slice(None), slice(None), *box)].mean())
        if cfg.mask_norm == "grid" and (lv.fixed_mask is not None or lv.moving_mask is not None):
            n_compared = n_grid  # the loss is divided by the whole grid's count
        eps = float(cfg.eps) / (max(n_compared, 1.0) * float(np.mean(lv.r_fixed)))
    iterations = int(cfg.per_level("iterations", level))
    if plan is not None:
        probe_gen = torch.Generator(device="cpu").manual_seed(0)
        if "generator" in loss_kw:
            loss_kw["generator"] = probe_gen
        t_probe = time.perf_counter()
        loss(probe_gen).backward()
        iterations = int(plan(time.perf_counter() - t_probe))
        for p in model.parameters():
            p.grad = None
        if "generator" in loss_kw:
            loss_kw["generator"] = gen
    radius = int(cfg.per_level("discrete", level))
    if radius > 0 and iterations > 0:  # the discrete search starts the level (``dense`` model: validated)
        def field_at(starts: Sequence[int], lattice: tuple[int, ...]) -> torch.Tensor:
            """The current d (full-resolution voxels) at the level voxels ``starts + k``, k < ``lattice``."""
            d = on_lattice(grid_field(), starts, 1, lattice)
            return d if base is None else d + on_lattice(base, starts, 1, lattice, np.eye(4))

        with torch.no_grad():
            delta = _discrete_start(lv, field_at, matrix, r_f, radius, cfg)
            model.disp += resize_field(delta * r_f, grid_shape)

    its, last = _optimise(params, loss, cfg, iterations, desc, progress, eps=eps)
    with torch.no_grad():
        state.disp = grid_field().detach()
    if cfg.model == "svf" and offset is None:
        state.velocity = model.velocity.detach()
    else:
        state.velocity = None
    return its, last


def _discrete_start(lv: _Level, field_at: Any, matrix: torch.Tensor, r_f: torch.Tensor, radius: int,
                    cfg: StageConfig) -> torch.Tensor:
    """The discrete search of a level (:attr:`StageConfig.discrete`): the displacement ``(1, 3, *lv.shape)`` in
    level voxels to add to the current map's, searched on the fixed features' extent (``lv.fixed_origin`` +
    their shape) and continued as a constant beyond it."""
    shape = tuple(lv.fixed_feat.shape[2:])
    device = lv.fixed_feat.device
    axes = [torch.arange(o - radius, o + n + radius, device=device, dtype=torch.float32)
            for o, n in zip(lv.fixed_origin, shape)]
    y = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]  # the extent + radius voxels per side
    pos = _points(matrix, y + field_at([o - radius for o in lv.fixed_origin], tuple(y.shape[2:])) / r_f)
    warped = lv.moving_features_at(pos)
    warped_weight = None if lv.moving_mask is None else \
        grid_warp(lv.moving_mask, pos, align_corners=True, padding_mode="border")
    region = tuple(slice(o, o + n) for o, n in zip(lv.fixed_origin, shape))
    fixed_weight = None if lv.fixed_mask is None else lv.fixed_mask[(slice(None), slice(None), *region)]
    delta = discrete_displacement(lv.fixed_feat, warped, radius=radius, pool=int(cfg.discrete_pool),
                                  fixed_weight=fixed_weight, warped_weight=warped_weight,
                                  couplings=tuple(float(cfg.discrete_coupling) * c for c in COUPLINGS))
    pad: list[int] = []
    for o, n, full in reversed(list(zip(lv.fixed_origin, shape, lv.shape))):
        pad += [int(o), int(full) - int(o) - int(n)]
    return F.pad(delta, pad, mode="replicate") if any(pad) else delta


def _points(matrix_level: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``M p`` for points ``(1, 3, *S)`` (voxels of the level's fixed grid -> moving level voxels)."""
    return torch.einsum("ab,nb...->na...", matrix_level[:3, :3], coords) + matrix_level[:3, 3].reshape(1, 3, 1, 1, 1)


# ------------------------------------------------------------------------------------------ presets API
def resolve_preset(preset: str | Preset, **overrides: Any) -> Preset:
    """The preset named ``preset`` (or a :class:`Preset` as is) with overrides applied.

    Overrides: ``clip_hu=(lo, hi)``; ``<stage name>={field: value, ...}`` to change fields of that stage's
    :class:`StageConfig` (changing ``similarity`` without ``similarity_kwargs`` clears the latter; changing
    ``levels`` cuts the preset's per-level tuples that are not given to their finest entries);
    ``<stage name>=None`` to drop the stage; ``<new name>=StageConfig(...)`` to append a stage.

    Raises:
        InputError: unknown preset, stage field or value.
    """
    if isinstance(preset, Preset):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise InputError(f"preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    clip = overrides.pop("clip_hu", base.clip_hu)
    if len(clip) != 2 or not float(clip[1]) > float(clip[0]):
        raise InputError(f"clip_hu: expected (lo, hi) with lo < hi, got {clip}")
    stages = [(n, cfg) for n, cfg in base.stages]
    names = [n for n, _ in stages]
    fields_ = {f.name for f in dataclasses.fields(StageConfig)}
    for key, value in overrides.items():
        if isinstance(value, StageConfig):
            if key in names:
                stages[names.index(key)] = (key, value)
            else:
                stages.append((key, value))
                names.append(key)
        elif value is None:
            if key not in names:
                raise InputError(f"override {key}=None: preset {base.name!r} has no stage {key!r} (stages: {names})")
            stages.pop(names.index(key))
            names.remove(key)
        elif isinstance(value, dict):
            if key not in names:
                raise InputError(f"override {key}=...: preset {base.name!r} has no stage {key!r} (stages: {names})")
            bad = set(value) - fields_
            if bad:
                raise InputError(f"override {key}: unknown field(s) {sorted(bad)}; StageConfig fields: "
                                 f"{sorted(fields_)}")
            clean = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            if "similarity" in clean and "similarity_kwargs" not in clean:
                clean["similarity_kwargs"] = {}  # the old measure's options do not apply to a new one
            if "levels" in clean:
                clean = _fit_per_level(stages[names.index(key)][1], clean)
            stages[names.index(key)] = (key, dataclasses.replace(stages[names.index(key)][1], **clean))
        else:
            raise InputError(f"override {key}: expected a dict of StageConfig fields, a StageConfig or None, got "
                             f"{type(value).__name__}")
    out = Preset(name=base.name, clip_hu=(float(clip[0]), float(clip[1])), stages=tuple(stages))
    for n, cfg in out.stages:
        cfg.validate(n)
    return out


def _fit_per_level(base: StageConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """When an override changes the number of levels, per-level tuples of the preset that it does not set are
    cut to their last (finest) entries; a tuple shorter than the new number of levels is an error."""
    n = len(changes["levels"])
    out = dict(changes)
    for key in (("iterations", "lr") if base.model == "affine" else PER_LEVEL):
        value = getattr(base, key)
        if key in changes or not isinstance(value, (tuple, list)) or len(value) == n:
            continue
        if len(value) < n:
            raise InputError(f"override levels={tuple(changes['levels'])}: the preset's {key}={tuple(value)} has fewer "
                             f"entries than levels; give {key} too")
        out[key] = tuple(value[-n:])
    return out


def _check_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise InputError(f"register_pair: {name} must be a 3-D array (X, Y, Z) in HU, got shape {arr.shape}")
    if min(arr.shape) < 2:
        raise InputError(f"register_pair: {name} needs at least 2 voxels per axis, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"register_pair: {name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"register_pair: {name} contains NaN or Inf values")
    return arr


def _check_mask(mask: Any, shape: Sequence[int], name: str) -> np.ndarray | None:
    """A field-of-view mask as bool, or ``None`` when it is absent or all True (the whole grid)."""
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise InputError(f"register_pair: {name} must be a bool array of the image's shape {tuple(shape)}, got "
                         f"shape {arr.shape}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "biuf" or not np.all(np.isin(arr, (0, 1))):
            raise InputError(f"register_pair: {name} must be bool (or 0/1), got dtype {arr.dtype} with other values")
        arr = arr.astype(bool)
    if not arr.any():
        raise InputError(f"register_pair: {name} has no True voxel (an empty field of view)")
    return None if arr.all() else arr


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``(2, 3)``: the first and last True voxel of a non-empty bool mask per axis (its bounding box)."""
    out = np.zeros((2, 3))
    for a in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))
        out[:, a] = hit[0], hit[-1]
    return out


def fill_outside(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with every voxel outside ``mask`` replaced by the value of the nearest voxel inside it.

    Padding (e.g. -1000 HU around a thin slab) would otherwise make an artificial edge at the border of the
    field of view that neighbourhood features (MIND patches, LNCC windows, gradients) and the pyramid's block
    averages would carry into the field of view. A box-shaped mask (the preprocessing's crop) is filled by
    edge replication; any other by the nearest voxel of a Euclidean distance transform.

    Args:
        image: ``(X, Y, Z)`` array.
        mask: ``(X, Y, Z)`` bool, True inside the field of view (at least one voxel).

    Returns:
        float32 ``(X, Y, Z)``.
    """
    img = np.asarray(image, dtype=np.float32)
    box = mask_box(mask).astype(int)
    inner = tuple(slice(lo, hi + 1) for lo, hi in box.T)
    if mask[inner].all() and int(mask.sum()) == mask[inner].size:
        pad = [(int(lo), int(n - 1 - hi)) for (lo, hi), n in zip(box.T, img.shape)]
        return np.pad(img[inner], pad, mode="edge")
    from scipy.ndimage import distance_transform_edt

    idx = distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return img[tuple(idx)]


def _level_cost(shape: Sequence[int], factor: int, cfg: StageConfig, level: int, box_fraction: float) -> dict:
    """What a deformable level costs, in the units of :class:`_Budget`: ``voxels`` of the level grid (the set-up:
    pyramid images and features of both images), ``work`` per iteration (compared voxels -- a sub-lattice of the
    fixed field of view's box, ``box_fraction`` of the grid -- plus parameter nodes, times ``1 + svf_steps`` for
    a velocity field) and the configured ``iterations``."""
    ls = level_shape(shape, factor)
    gs = int(cfg.per_level("grid_spacing", level))
    nodes = math.prod(ls) if cfg.model == "bspline" else math.prod(max(2, math.ceil(n / gs)) for n in ls)
    if cfg.model == "svf":
        nodes *= 1 + int(cfg.svf_steps)
    stride = int(cfg.per_level("subsample", level))
    compared = float(box_fraction) * math.prod(math.ceil(n / stride) for n in ls)
    return {"voxels": float(math.prod(ls)), "work": compared + nodes,
            "iterations": int(cfg.per_level("iterations", level))}


class _Budget:
    """A wall-clock budget for the deformable levels of :func:`register_pair` (``budget_s``).

    Cost model, calibrated while running: a level's set-up costs ``a`` seconds per level voxel and one of its
    iterations ``b`` seconds per unit of work (:func:`_level_cost`); ``a`` is re-measured on every level built,
    ``b`` by one probe evaluation of the loss and its gradient at the start of every level. With ``R`` seconds
    left, the configured iterations ``n_j`` of the current level ``k`` and the later levels up to ``m`` are
    scaled by one factor ``s = min(1, (R - set-ups of levels k+1..m) / sum_j n_j b W_j)``; ``m`` is the finest
    level for which ``s n_m >= 1`` (finer ones are dropped). A level is skipped before its set-up when that
    plan, made with the rates measured so far, leaves it no iteration; once one is skipped, so are the finer.
    What follows the last level -- the field on the full grid, its Jacobian and the fields-of-view overlap --
    is kept back as five times the set-up of the first level built (both are dominated by passes over the
    full-resolution tensors: that set-up block-averages the images, masks and starting field of the full grid;
    the factor is an estimate, docs/register.md compares budgets with the times they gave).
    """

    def __init__(self, seconds: float, t_start: float, levels: list[dict]) -> None:
        self.seconds, self.t_start, self.levels = float(seconds), float(t_start), levels
        self.a: float | None = None  # set-up seconds per level voxel
        self.b: float | None = None  # seconds per unit of iteration work
        self.reserve: float | None = None  # seconds kept for the work after the last level
        self.stopped = False

    def _remaining(self) -> float:
        return self.seconds - (self.reserve or 0.0) - (time.perf_counter() - self.t_start)

    def _fit(self, k: int, built: bool) -> float:
        """The common scale of the iterations of level ``k`` (set-up done when ``built``) and the kept later ones."""
        lv = self.levels
        remaining = self._remaining()
        for m in range(len(lv) - 1, k - 1, -1):
            setup = sum(self.a * lv[j]["voxels"] for j in range(k + 1 if built else k, m + 1))
            work = sum(lv[j]["iterations"] * self.b * lv[j]["work"] for j in range(k, m + 1))
            s = (remaining - setup) / work if work > 0 else 1.0
            if m == k or math.floor(s * lv[m]["iterations"]) >= 1:
                return min(1.0, s)
        return 0.0

    def skip(self, k: int) -> bool:
        """Before level ``k``'s set-up: True when it no longer fits (it and every finer level are dropped)."""
        if not self.stopped and self.a is not None and self.b is not None:
            self.stopped = math.floor(self._fit(k, built=False) * self.levels[k]["iterations"]) < 1
        return self.stopped

    def planner(self, k: int, setup_s: float, record: list) -> Any:
        """After level ``k``'s set-up (``setup_s`` seconds): the function that takes the probe's seconds and
        returns the iterations to run (appending the plan to ``record``)."""
        self.a = float(setup_s) / max(self.levels[k]["voxels"], 1.0)
        if self.reserve is None:
            self.reserve = 5.0 * float(setup_s)

        def plan(probe_s: float) -> int:
            self.b = float(probe_s) / max(self.levels[k]["work"], 1.0)
            scale = max(0.0, self._fit(k, built=True))
            n = math.floor(scale * self.levels[k]["iterations"])
            record.append({"level": k, "iterations": n, "of": self.levels[k]["iterations"],
                           "scale": round(scale, 4), "remaining_s": round(self._remaining(), 3),
                           "reserve_s": round(self.reserve or 0.0, 3)})
            return n

        return plan


def _check_init(init: Any, shape: Sequence[int]) -> np.ndarray | None:
    if init is None:
        return None
    arr = np.asarray(init)
    if arr.shape != (3, *tuple(shape)):
        raise InputError(f"register_pair: init_disp must be a (3, X, Y, Z) field on the fixed grid "
                         f"{(3, *tuple(shape))} (voxels, fixed -> moving), got shape {arr.shape}")
    if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
        raise InputError(f"register_pair: init_disp must hold finite floats, got dtype {arr.dtype}"
                         f"{'' if arr.dtype.kind != 'f' else ' with NaN or Inf values'}")
    return arr.astype(np.float32, copy=False)


def _check_affine(matrix: Any) -> np.ndarray | None:
    if matrix is None:
        return None
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)) or not np.allclose(arr[3], [0, 0, 0, 1]):
        what = f"shape {arr.shape}" if arr.shape != (4, 4) else \
            "NaN or Inf values" if not np.all(np.isfinite(arr)) else f"last row {arr[3].tolist()}"
        raise InputError(f"register_pair: init_affine must be a finite (4, 4) affine matrix (last row 0 0 0 1), "
                         f"got {what}")
    return arr.copy()


def affine_from_field(disp_vox: np.ndarray, mask: np.ndarray | None = None, *, moving_mask: np.ndarray | None = None,
                      thin: Sequence[bool] = (False, False, False), step: int = 2) -> np.ndarray:
    """The affine map (4x4, fixed voxel -> moving voxel) closest to ``x + disp_vox(x)`` in the least-squares
    sense over the fixed voxels in ``mask`` (default every voxel; every ``step``-th voxel per axis) that the field
    takes inside ``moving_mask`` (its nearest voxel; without ``moving_mask``, or when fewer than 16 voxels land
    inside it, all of them) -- where the field was measured rather than extrapolated.

    Along a ``thin`` axis (a slab, :func:`thin_axes`) the linear part's row and column stay those of the identity
    -- only the translation moves there -- as in the affine stages: a slab's field can not tell scaling, shear or
    rotation involving its short axis.
    """
    u = np.asarray(disp_vox, dtype=np.float64)
    sub = (slice(None, None, step),) * 3
    keep = np.ones(u.shape[1:], dtype=bool)[sub] if mask is None else np.asarray(mask, dtype=bool)[sub]
    if not keep.any():
        raise InputError("affine_from_field: the mask selects no voxel")
    pts = np.stack(np.nonzero(keep), axis=1).astype(np.float64) * step  # (N, 3) fixed voxels
    d = u[(slice(None), *sub)][:, keep].T  # (N, 3)
    if moving_mask is not None:
        mm = np.asarray(moving_mask, dtype=bool)
        idx = np.rint(pts + d).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(mm.shape)), axis=1)
        inside[inside] = mm[tuple(idx[inside].T)]
        if inside.sum() >= 16:  # else the field lands nowhere in the moving view: fit where it was given
            pts, d = pts[inside], d[inside]
    free = [a for a in range(3) if not thin[a]]
    out = np.eye(4)
    centre = pts.mean(0)
    for c in range(3):
        if thin[c] or not free:
            out[c, 3] = float(d[:, c].mean())
            continue
        design = np.c_[pts[:, free] - centre[free], np.ones(len(pts))]
        coef, *_ = np.linalg.lstsq(design, d[:, c], rcond=None)
        out[c, free] += coef[:-1]
        out[c, 3] = float(coef[-1] - coef[:-1] @ centre[free])
    return out


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    init_disp: np.ndarray | None = None,
    init_affine: np.ndarray | None = None,
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    preset: str | Preset = "abdomen-ct",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    budget_s: float | None = None,
    **overrides: Any,
) -> AlignResult:
    """Register ``moving`` to ``fixed`` (both CT in HU) and return the fixed -> moving voxel field.

    Args:
        fixed: ``(X, Y, Z)`` fixed image in HU (e.g. 192 x 160 x 256 at 2 mm).
        moving: ``(X', Y', Z')`` moving image in HU, same voxel spacing (its shape may differ; the initial map
            takes the fixed grid's centre to the moving grid's centre).
        fixed_mask, moving_mask: optional bool arrays of the images' shapes, True inside the field of view
            (where the scan has data; False in padding). The similarity then counts only fixed voxels inside
            the fixed mask whose warped position lands inside the moving mask (each pyramid level uses the
            fraction of a level voxel inside, the moving one sampled trilinearly with the warp, as weights);
            the regulariser acts everywhere, so the field outside is its smooth continuation. The images'
            voxels outside their masks are first replaced by the nearest voxel inside (:func:`fill_outside`),
            so the padding's edge does not enter the features. Affine stages search and constrain along thin
            fields of view (``search``, ``thin_fov`` of :class:`StageConfig`). A mask that is all True is the
            same as no mask (bit-identical results).
        init_disp: optional ``(3, X, Y, Z)`` float field on the fixed grid (voxels, fixed -> moving, e.g. from
            another registration): the deformable stages start from ``phi(x) = x + init_disp(x)`` and the
            preset's affine stages are skipped (the field is taken to hold the global alignment already;
            ``info["skipped_stages"]`` lists them). The deformable stages resample it onto their parameter
            grids (trilinear) and regularise the whole displacement, ``init_disp`` included. A preset without
            deformable stages returns ``init_disp`` (up to float rounding).
        init_affine: optional ``(4, 4)`` map fixed voxel -> moving voxel (e.g. :func:`affine_from_field` of
            another registration's field): the stages start from it instead of the grids' centres; the preset's
            affine stages are skipped as for ``init_disp`` and the deformable stages regularise only the
            displacement on top of it. Not together with ``init_disp``.
        spacing_mm: voxel size per axis in mm, used for the regulariser (default 2 mm isotropic).
        preset: a name of :data:`PRESETS` (default ``"abdomen-ct"``) or a :class:`Preset`.
        device: torch device (``"cpu"`` or ``"cuda"``...).
        seed: seed of the generator used by randomised measures (``mi``); results are reproducible.
        progress: show tqdm progress bars per level.
        budget_s: optional wall-clock budget in seconds for the whole call, honoured approximately
            (:class:`_Budget`): before each deformable level the engine measures what the levels so far cost
            (features per level voxel, one loss and gradient evaluation of the level) and scales the iterations
            of this and the remaining deformable levels by one common factor <= 1 so that they fit the time
            left; levels whose feature set-up alone would not fit are dropped, finest first
            (``info["budget"]``). The preset's iterations stay the upper limit. The final composition on the
            full grid gets a reserve estimated from the first level's set-up (:class:`_Budget`). A budgeted
            result depends on the machine's speed, so it is not reproducible bit for bit.
        **overrides: see :func:`resolve_preset` (e.g. ``deformable={"iterations": (50, 40)}``,
            ``deformable=None`` for affine only, ``clip_hu=(-200, 400)``).

    Returns:
        :class:`AlignResult` with ``disp_vox`` ``(3, X, Y, Z)`` float32 (voxels, fixed -> moving, the affine
        part included), ``affine_vox`` (4x4) and ``info``.

    Raises:
        InputError: wrong array shapes or values, unknown preset or override.
    """
    t_start = time.perf_counter()
    fixed_arr = _check_array(fixed, "fixed")
    moving_arr = _check_array(moving, "moving")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0) or not np.all(np.isfinite(spacing)):
        raise InputError(f"register_pair: spacing_mm must be three positive numbers, got {spacing_mm}")
    cfg = resolve_preset(preset, **overrides)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))

    f_mask = _check_mask(fixed_mask, fixed_arr.shape, "fixed_mask")
    m_mask = _check_mask(moving_mask, moving_arr.shape, "moving_mask")
    init = _check_init(init_disp, fixed_arr.shape)
    init_a = _check_affine(init_affine)
    if init is not None and init_a is not None:
        raise InputError("register_pair: give init_disp or init_affine, not both")

    f_img = _normalise(fixed_arr if f_mask is None else fill_outside(fixed_arr, f_mask), cfg.clip_hu, device)
    m_img = _normalise(moving_arr if m_mask is None else fill_outside(moving_arr, m_mask), cfg.clip_hu, device)
    f_mask_t = None if f_mask is None else torch.from_numpy(f_mask.astype(np.float32)).to(device)[None, None]
    m_mask_t = None if m_mask is None else torch.from_numpy(m_mask.astype(np.float32)).to(device)[None, None]
    shape = fixed_arr.shape
    state = _State(affine=np.eye(4))
    state.affine[:3, 3] = (np.asarray(moving_arr.shape) - 1) / 2 - (np.asarray(shape) - 1) / 2
    state.fov_fixed = None if f_mask is None else mask_box(f_mask)
    state.fov_moving = None if m_mask is None else mask_box(m_mask)
    stages = list(cfg.stages)
    skipped: list[str] = []
    if init is not None or init_a is not None:
        state.affine = np.eye(4) if init_a is None else init_a
        if init is not None:
            state.disp = torch.from_numpy(np.ascontiguousarray(init)).to(device)[None]
        skipped = [n for n, st in stages if st.model == "affine"]
        stages = [(n, st) for n, st in stages if st.model != "affine"]

    info: dict[str, Any] = {"preset": cfg.name, "stages": {}, "levels": [], "seed": int(seed), "device": str(device),
                            "threads": torch.get_num_threads()}
    if f_mask is not None or m_mask is not None:
        info["fov"] = {"fixed_box": None if f_mask is None else state.fov_fixed.astype(int).tolist(),
                       "moving_box": None if m_mask is None else state.fov_moving.astype(int).tolist(),
                       "fixed_fraction": 1.0 if f_mask is None else round(float(f_mask.mean()), 6),
                       "moving_fraction": 1.0 if m_mask is None else round(float(m_mask.mean()), 6)}
    if init is not None or init_a is not None:
        info["skipped_stages"] = skipped
    total_its = 0
    last = math.nan
    pyramid: dict[Any, Any] = {}
    budget = None
    if budget_s is not None:
        box = 1.0 if f_mask is None else float(np.prod(state.fov_fixed[1] - state.fov_fixed[0] + 1) / np.prod(shape))
        budget = _Budget(float(budget_s), t_start, [
            _level_cost(shape, int(factor), st, i, box) for _, st in stages if st.model != "affine"
            for i, factor in enumerate(st.levels)])
        info["budget"] = {"seconds": float(budget_s), "planned": [], "skipped_levels": []}
    k = 0  # index of the deformable level in the budget's plan
    for stage_name, stage in stages:
        t0 = time.perf_counter()
        if stage.model == "affine":
            stage, thin_info = _thin_stage(stage, state, fixed_arr.shape, moving_arr.shape)
            if thin_info:
                info.setdefault("thin", {})[stage_name] = thin_info
        elif stage.penalise == "increment":
            state.start_increment()
        for i, factor in enumerate(stage.levels):
            t1 = time.perf_counter()
            desc = f"{stage_name} 1/{factor}"
            plan = None
            if budget is not None and stage.model != "affine":
                k += 1
                if budget.skip(k - 1):  # its features alone would not fit: this and the finer levels are dropped
                    info["budget"]["skipped_levels"].append({"stage": stage_name, "factor": int(factor)})
                    continue
            lv = _Level(f_img, m_img, int(factor), stage, spacing, pyramid, f_mask_t, m_mask_t)
            if budget is not None and stage.model != "affine":
                plan = budget.planner(k - 1, time.perf_counter() - t1, info["budget"]["planned"])
            if stage.model == "affine":
                its, last = _run_affine(state, lv, stage, i, device, gen, progress, desc)
            else:
                its, last = _run_deformable(state, lv, stage, i, device, gen, progress, desc, plan=plan)
            total_its += its
            info["levels"].append({"stage": stage_name, "factor": int(factor), "shape": list(lv.shape),
                                   "iterations": its, "loss": last, "seconds": round(time.perf_counter() - t1, 3)})
        if stage.model != "affine" and stage.penalise == "increment":
            state.end_increment()
        info["stages"][stage_name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    with torch.no_grad():
        d_full = state.disp_on(shape, device)
        pos = None
        if d_full is not None and np.array_equal(state.affine, np.eye(4)):
            disp = d_full[0]  # no affine part (an initial field, a preset without affine stage): the field, exactly
        else:
            grid = identity_grid(shape, device=device)
            a = torch.as_tensor(state.affine, dtype=torch.float32, device=device)
            pos = _positions(a, d_full, shape)
            disp = (pos - grid)[0]
        det = jacobian_determinant(disp)
        folding = float((det <= 0).float().mean())
        disp_np = disp.cpu().numpy().astype(np.float32)
        if f_mask_t is not None or m_mask_t is not None:
            # the share of the fixed field of view that the final map puts inside the moving field of view, on
            # every 2nd voxel per axis (an eighth of the cost of the full grid's moving-mask samples)
            sub = (slice(None), slice(None), *(slice(0, None, 2),) * 3)
            w_f = torch.ones_like(disp[None, :1][sub]) if f_mask_t is None else f_mask_t[sub]
            if m_mask_t is not None:
                pos_sub = pos[sub] if pos is not None else \
                    2 * identity_grid([len(range(0, n, 2)) for n in shape], device=device) + disp[None][sub]
            w_m = torch.ones_like(w_f) if m_mask_t is None else \
                grid_warp(m_mask_t, pos_sub, align_corners=True, padding_mode="border")
            info["fov"]["overlap"] = round(float((w_f * w_m).sum() / w_f.sum().clamp_min(1e-12)), 6)
    info["stages"]["compose"] = round(time.perf_counter() - t0, 3)
    info.update({
        "final_loss": last, "iterations": total_its, "folding_fraction": folding,
        "seconds": round(time.perf_counter() - t_start, 3),
        "config": {"clip_hu": list(cfg.clip_hu),
                   "stages": {n: _jsonable(dataclasses.asdict(s)) for n, s in cfg.stages}},
    })
    return AlignResult(disp_vox=disp_np, affine_vox=state.affine.copy(), info=info)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return copy.copy(obj)
