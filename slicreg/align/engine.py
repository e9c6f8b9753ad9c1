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
:mod:`slicreg.align.transforms`): level voxel ``q`` of a grid ``n`` voxels long sits at full-resolution voxel
``(q + 0.5) * N / n - 0.5``. On a level the map becomes ``z = S_m^-1 A S_f (y + d(S_f y) / r_f)`` with ``S``
the level-to-full voxel maps of the fixed and moving grids and ``r_f`` the fixed grid's coarsening factors.
Positions stay in voxels until :func:`slicreg.align.transforms.grid_warp`, the only caller of ``grid_sample``.

Determinism: everything is deterministic on CPU for a given thread count; the only randomness (voxel
sampling of the ``mi`` measure) comes from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.align.regularisers import get_regulariser
from slicreg.align.similarity import get_similarity
from slicreg.align.transforms import (
    AffineTransform,
    BSplineDisplacement,
    DenseDisplacement,
    StationaryVelocity,
    grid_warp,
    identity_grid,
    jacobian_determinant,
    resize_field,
)
from slicreg.errors import InputError

__all__ = [
    "StageConfig",
    "Preset",
    "PRESETS",
    "AlignResult",
    "register_pair",
    "resolve_preset",
    "gaussian_smooth",
    "downsample",
]

MODELS = ("affine", "dense", "bspline", "svf")
PER_LEVEL = ("iterations", "lr", "weight", "grid_spacing", "subsample", "field_sigma")
OPTIMISERS = ("adam", "lbfgs")


@dataclass(frozen=True)
class StageConfig:
    """One stage of a registration. The defaults are the deformable stage of the ``abdomen-ct`` preset.

    Per-level knobs take one value for every level or a tuple with one value per level (coarse to fine).

    Attributes:
        model: ``"affine"``, ``"dense"``, ``"bspline"`` or ``"svf"``.
        similarity: a name of :data:`slicreg.align.similarity.SIMILARITIES` (``mse``, ``ncc``, ``lncc``,
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
            local optimiser's, e.g. for scans whose fields of view are centred differently.
        patience, tol: early stop when the loss has not improved by more than ``tol`` (relative) for
            ``patience`` iterations; ``patience=0`` runs every iteration.
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

    def validate(self, name: str) -> None:
        where = f"preset stage {name!r}"
        if self.model not in MODELS:
            raise InputError(f"{where}: model must be one of {MODELS}, got {self.model!r}")
        if self.optimiser not in OPTIMISERS:
            raise InputError(f"{where}: optimiser must be one of {OPTIMISERS}, got {self.optimiser!r}")
        get_similarity(self.similarity)
        if self.regulariser is not None:
            get_regulariser(self.regulariser)
        if not self.levels or any(int(f) < 1 for f in self.levels):
            raise InputError(f"{where}: levels must be downsampling factors >= 1, got {self.levels}")
        for key in (("iterations", "lr") if self.model == "affine" else PER_LEVEL):
            value = getattr(self, key)
            if isinstance(value, (tuple, list)) and len(value) != len(self.levels):
                raise InputError(f"{where}: {key} has {len(value)} entries for {len(self.levels)} levels")
        spacings = self.grid_spacing if isinstance(self.grid_spacing, (tuple, list)) else (self.grid_spacing,)
        if any(int(g) < 1 for g in spacings):
            raise InputError(f"{where}: grid_spacing must be >= 1, got {self.grid_spacing}")

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


def _level_to_full(full: Sequence[int], level: Sequence[int]) -> np.ndarray:
    """4x4 map from level voxels to full-resolution voxels: ``x = r q + (r - 1) / 2`` with ``r = N / n``."""
    r = np.asarray(full, dtype=np.float64) / np.asarray(level, dtype=np.float64)
    m = np.diag([*r, 1.0])
    m[:3, 3] = (r - 1) / 2
    return m


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
              progress: bool) -> tuple[int, float]:
    """Minimise ``closure_loss()`` over ``params`` (torch param groups). Returns (iterations, final loss)."""
    from tqdm.auto import tqdm

    stopper = _EarlyStop(cfg.patience, cfg.tol)
    bar = tqdm(total=iterations, desc=desc, disable=not progress, leave=False)
    last = math.nan
    done = 0
    try:
        if cfg.optimiser == "adam":
            opt = torch.optim.Adam(params)
            final = float(cfg.lr_final)
            # cosine decay of the step from lr to lr * lr_final over the level's iterations
            span = max(iterations, 1)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(i, span) / span)))
            for done in range(1, iterations + 1):
                opt.zero_grad(set_to_none=True)
                loss = closure_loss()
                loss.backward()
                opt.step()
                sched.step()
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

            for done in range(1, iterations + 1):
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

    def disp_on(self, shape: Sequence[int], device: str) -> torch.Tensor | None:
        return None if self.disp is None else resize_field(self.disp.to(device), shape)


def _positions(matrix_level: torch.Tensor, disp_level: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """Moving level-voxel positions ``M (y + d_level(y))`` of every fixed level voxel, ``(1, 3, *shape)``."""
    grid = identity_grid(shape, device=matrix_level.device, dtype=matrix_level.dtype)
    if disp_level is not None:
        grid = grid + disp_level
    return torch.einsum("ab,nb...->na...", matrix_level[:3, :3], grid) + matrix_level[:3, 3].reshape(1, 3, 1, 1, 1)


class _Level:
    """Everything about one pyramid level of a pair that does not change while optimising."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, factor: int, cfg: StageConfig,
                 spacing_mm: np.ndarray, cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
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
        self.s_fixed = _level_to_full(self.full_fixed, self.shape)
        self.s_moving = _level_to_full(self.full_moving, tuple(m.shape[2:]))
        self.r_fixed = np.diag(self.s_fixed)[:3].copy()
        self.spacing_mm = spacing_mm * self.r_fixed  # level voxel size in mm
        sim = get_similarity(cfg.similarity)
        self.similarity = sim.name
        feat_kw, self.loss_kw = sim.split_kwargs(dict(cfg.similarity_kwargs))
        with torch.no_grad():
            self.fixed_feat = sim.features(f, **feat_kw)
            self.moving_feat = sim.features(m, **feat_kw)
        self.loss_fn = sim.loss

    def level_matrix(self, affine_full: torch.Tensor) -> torch.Tensor:
        """``S_m^-1 A S_f`` as a float32 tensor (differentiable in ``affine_full``)."""
        sf = torch.as_tensor(self.s_fixed, dtype=affine_full.dtype, device=affine_full.device)
        sm_inv = torch.as_tensor(np.linalg.inv(self.s_moving), dtype=affine_full.dtype, device=affine_full.device)
        return sm_inv @ affine_full @ sf


def translation_search(fixed: torch.Tensor, moving: torch.Tensor, matrix: np.ndarray, *, fraction: float,
                       threshold: float = 0.05, min_overlap: float = 0.5) -> tuple[np.ndarray, float]:
    """Exhaustive search of whole-voxel translations on one pyramid level.

    Args:
        fixed, moving: ``(1, 1, X, Y, Z)`` level images (normalised intensities).
        matrix: 4x4 current level map, fixed level voxel -> moving level voxel; candidates add a translation.
        fraction: search range per axis as a fraction of the fixed level grid's extent.
        threshold: fixed voxels above it (the body, for CT) are the ones compared.
        min_overlap: a candidate must keep at least this fraction of those voxels inside the moving grid.

    Returns:
        ``(shift, ncc)``: the best extra translation in level voxels (moving side) and its NCC.
    """
    shape = fixed.shape[2:]
    ranges = [int(round(fraction * n)) for n in shape]
    grid = identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)
    sel = (fixed.reshape(-1) > threshold)
    if int(sel.sum()) < 8:
        sel = torch.ones_like(sel)
    f = fixed.reshape(-1)[sel].double()
    f = f - f.mean()
    f_norm = torch.sqrt((f * f).sum()) + 1e-12
    m = torch.as_tensor(matrix, dtype=torch.float64)
    base = (m[:3, :3] @ grid[:, sel] + m[:3, 3:4])  # moving positions of the compared voxels
    mov = moving[0, 0].double()
    msize = torch.tensor(mov.shape, dtype=torch.float64)[:, None]
    best, best_shift = -math.inf, np.zeros(3)
    for dx in range(-ranges[0], ranges[0] + 1):
        for dy in range(-ranges[1], ranges[1] + 1):
            for dz in range(-ranges[2], ranges[2] + 1):
                pos = torch.round(base + torch.tensor([[dx], [dy], [dz]], dtype=torch.float64))
                inside = ((pos >= 0) & (pos <= msize - 1)).all(dim=0)
                if float(inside.double().mean()) < min_overlap:
                    continue
                idx = pos.clamp(min=torch.zeros_like(msize), max=msize - 1).long()
                vals = mov[idx[0], idx[1], idx[2]]
                vals = vals - vals.mean()
                ncc = float((f * vals).sum() / (f_norm * (torch.sqrt((vals * vals).sum()) + 1e-12)))
                if ncc > best:
                    best, best_shift = ncc, np.array([dx, dy, dz], dtype=np.float64)
    return best_shift, best


def _run_affine(state: _State, lv: _Level, cfg: StageConfig, level: int, device: str, gen: torch.Generator,
                progress: bool, desc: str) -> tuple[int, float]:
    if level == 0 and cfg.search > 0:
        level_matrix = np.linalg.inv(lv.s_moving) @ state.affine @ lv.s_fixed
        shift, _ = translation_search(lv.fixed_feat[:, :1].cpu(), lv.moving_feat[:, :1].cpu(), level_matrix,
                                      fraction=cfg.search)
        state.affine = state.affine.copy()
        state.affine[:3, 3] += lv.s_moving[:3, :3] @ shift  # level voxels -> full-resolution voxels
    half = float(np.mean(np.asarray(lv.full_fixed, dtype=np.float64) - 1) / 2)
    model = AffineTransform(lv.full_fixed, lv.full_moving, translation_scale=max(half, 1.0)).to(device)
    _set_affine(model, state.affine)
    # the nonlinear part (if an earlier stage made one) stays fixed while the affine part is refined
    d_full = state.disp_on(lv.shape, device)
    r_f = torch.as_tensor(lv.r_fixed, dtype=torch.float32, device=device).reshape(1, 3, 1, 1, 1)
    d_level = None if d_full is None else d_full / r_f
    params = [{"params": [model.linear, model.translation], "lr": float(cfg.per_level("lr", level))}]
    loss_kw = dict(lv.loss_kw)
    if lv.similarity == "mi":
        loss_kw["generator"] = gen

    def loss() -> torch.Tensor:
        pos = _positions(lv.level_matrix(model.matrix()), d_level, lv.shape)
        warped = grid_warp(lv.moving_feat, pos, align_corners=True, padding_mode="border")
        return lv.loss_fn(lv.fixed_feat, warped, **loss_kw)

    its, last = _optimise(params, loss, cfg, int(cfg.per_level("iterations", level)), desc, progress)
    state.affine = model.matrix().detach().double().cpu().numpy()
    return its, last


def _set_affine(model: AffineTransform, matrix: np.ndarray) -> None:
    """Set ``model`` so that ``model.matrix() == matrix``."""
    lin = matrix[:3, :3]
    cf = model.centre_fixed.cpu().numpy()
    cm = model.centre_moving.cpu().numpy()
    t = matrix[:3, 3] + lin @ cf - cm
    with torch.no_grad():
        model.linear.copy_(torch.as_tensor(lin - np.eye(3), dtype=torch.float32))
        model.translation.copy_(torch.as_tensor(t / model.translation_scale, dtype=torch.float32))


def _lattice(shape: Sequence[int], stride: int, gen: torch.Generator,
             device: str) -> tuple[tuple[slice, ...], torch.Tensor]:
    """A random sub-lattice of the level grid: every ``stride``-th voxel per axis from a random offset.

    Returns the slices that cut it out of a ``(B, C, X, Y, Z)`` tensor and its voxel coordinates
    ``(1, 3, x, y, z)`` (float32). A regular lattice keeps memory access local, unlike scattered points."""
    offsets = torch.randint(0, stride, (3,), generator=gen).tolist() if stride > 1 else [0, 0, 0]
    slices = tuple(slice(o, None, stride) for o in offsets)
    axes = [torch.arange(o, int(n), stride, device=device, dtype=torch.float32) for o, n in zip(offsets, shape)]
    return slices, torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _run_deformable(state: _State, lv: _Level, cfg: StageConfig, level: int, device: str, gen: torch.Generator,
                    progress: bool, desc: str) -> tuple[int, float]:
    """One level of a deformable stage.

    The model's field lives on its own parameter grid (values in full-resolution voxels); every iteration it is
    sampled at the level voxels being compared: all of them, or (``subsample``) a random sub-lattice drawn
    from the seeded generator, which makes fine levels affordable on a CPU. The regulariser acts on the
    parameter grid's field in mm."""
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
    to_grid = torch.as_tensor([grid_shape[a] / shape[a] for a in range(3)], dtype=torch.float32,
                              device=device).reshape(1, 3, 1, 1, 1)
    stride = int(cfg.per_level("subsample", level))
    full_grid = identity_grid(shape, device=device)
    loss_kw = dict(lv.loss_kw)
    if lv.similarity == "mi":
        loss_kw["generator"] = gen

    sigma = float(cfg.per_level("field_sigma", level))

    def grid_field() -> torch.Tensor:
        d = model()
        if sigma > 0:
            d = gaussian_smooth(d, sigma)
        return d if offset is None else d + offset

    def loss() -> torch.Tensor:
        g = grid_field()
        if stride > 1:
            cut, y = _lattice(shape, stride, gen, device)
            target = lv.fixed_feat[(slice(None), slice(None), *cut)]
        else:
            y, target = full_grid, lv.fixed_feat
        # level voxel y -> parameter-grid voxel (y + 0.5) * n_grid / n_level - 0.5 (align_corners=False grids)
        d = g if stride == 1 and tuple(grid_shape) == tuple(shape) else grid_warp(g, (y + 0.5) * to_grid - 0.5)
        pos = _points(matrix, y + d / r_f)
        warped = grid_warp(lv.moving_feat, pos, align_corners=True, padding_mode="border")
        value = lv.loss_fn(target, warped, **loss_kw)
        if reg is not None and weight > 0:
            value = value + weight * reg(g * mm_per_vox, spacing=grid_mm)
        return value

    its, last = _optimise(params, loss, cfg, int(cfg.per_level("iterations", level)), desc, progress)
    with torch.no_grad():
        state.disp = grid_field().detach()
    if cfg.model == "svf" and offset is None:
        state.velocity = model.velocity.detach()
    else:
        state.velocity = None
    return its, last


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


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    preset: str | Preset = "abdomen-ct",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    **overrides: Any,
) -> AlignResult:
    """Register ``moving`` to ``fixed`` (both CT in HU) and return the fixed -> moving voxel field.

    Args:
        fixed: ``(X, Y, Z)`` fixed image in HU (e.g. 192 x 160 x 256 at 2 mm).
        moving: ``(X', Y', Z')`` moving image in HU, same voxel spacing (its shape may differ; the initial map
            takes the fixed grid's centre to the moving grid's centre).
        spacing_mm: voxel size per axis in mm, used for the regulariser (default 2 mm isotropic).
        preset: a name of :data:`PRESETS` (default ``"abdomen-ct"``) or a :class:`Preset`.
        device: torch device (``"cpu"`` or ``"cuda"``...).
        seed: seed of the generator used by randomised measures (``mi``); results are reproducible.
        progress: show tqdm progress bars per level.
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

    f_img = _normalise(fixed_arr, cfg.clip_hu, device)
    m_img = _normalise(moving_arr, cfg.clip_hu, device)
    shape = fixed_arr.shape
    state = _State(affine=np.eye(4))
    state.affine[:3, 3] = (np.asarray(moving_arr.shape) - 1) / 2 - (np.asarray(shape) - 1) / 2

    info: dict[str, Any] = {"preset": cfg.name, "stages": {}, "levels": [], "seed": int(seed), "device": str(device),
                            "threads": torch.get_num_threads()}
    total_its = 0
    last = math.nan
    pyramid: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for stage_name, stage in cfg.stages:
        t0 = time.perf_counter()
        for i, factor in enumerate(stage.levels):
            t1 = time.perf_counter()
            lv = _Level(f_img, m_img, int(factor), stage, spacing, pyramid)
            desc = f"{stage_name} 1/{factor}"
            run = _run_affine if stage.model == "affine" else _run_deformable
            its, last = run(state, lv, stage, i, device, gen, progress, desc)
            total_its += its
            info["levels"].append({"stage": stage_name, "factor": int(factor), "shape": list(lv.shape),
                                   "iterations": its, "loss": last, "seconds": round(time.perf_counter() - t1, 3)})
        info["stages"][stage_name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    with torch.no_grad():
        grid = identity_grid(shape, device=device)
        d_full = state.disp_on(shape, device)
        a = torch.as_tensor(state.affine, dtype=torch.float32, device=device)
        pos = _positions(a, d_full, shape)
        disp = (pos - grid)[0]
        det = jacobian_determinant(disp)
        folding = float((det <= 0).float().mean())
        disp_np = disp.cpu().numpy().astype(np.float32)
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
