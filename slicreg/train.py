"""Training of the SLIC-Reg network on transferred supervoxels (docs/method.md, section 6).

The pure part works on in-memory tensors:

- :func:`random_affines`, :func:`augment_batch` -- the on-the-fly affine augmentation ``theta = I + 0.07 N(0, 1)``
  (all 12 entries, acting on ``grid_sample``'s normalised coordinates as in the reference): the image is
  resampled trilinearly with border padding, the targets by nearest neighbour with zero padding at the network's
  output voxels (every second voxel, 48 x 40 x 64 for a 96 x 80 x 128 input);
- :func:`supervoxel_loss` -- the mean over the 16 layers of the cross-entropy, computed on a ``(B * 16, 128, S)``
  view of the logits (layout ``128 * layer + class``), so no per-layer copies are made;
- :class:`Trainer` -- model, Adam (lr 0.004), mixed precision (bf16 autocast on CPU; fp16 autocast with a
  GradScaler on CUDA), seedable generators, :meth:`Trainer.step`, :meth:`Trainer.validate`, and a state dict that
  resumes the run identically;
- :func:`train_loop` -- iterations with periodic validation and checkpoint callbacks and a tqdm bar.

``TrainConfig.target = "displacement"`` trains the paper's "Regression" baseline (:mod:`slicreg.regression`) the
same way: the same scans, the transfer stage's fields (the ones that carried the supervoxels) as targets, the same
augmentation (:func:`augment_displacement_batch`: the augmenting affine composed into the target field), the same
voxel subsets and budget; the loss is :func:`displacement_loss` (Charbonnier of the end-point error in 2 mm voxels,
over the voxels whose target is known) plus an optional :func:`smoothness_penalty`; validation reports the mean
end-point error in mm.

The edges (files) are :func:`load_training_data` (the contract layout of docs/CONTRACTS.md), checkpoints
(:func:`save_checkpoint`, :func:`load_checkpoint`, written atomically), logs and curves, and
:func:`run_training`, the one-call entry used by ``slicreg train`` and the ``train`` stage. It runs unchanged under
``torchrun`` on one node or several (DistributedDataParallel; gloo on CPU, nccl on CUDA): the configured batch is
split over the processes, and each process loads only its shard of the training scans (:func:`shard_ids`), so no
node needs every scan in memory (docs/scaling.md).

CPU cost (``benchmarks/bench_train_step.py``): the head and the loss are evaluated at ``head_voxels`` random output
voxels per scan (the backbone and the ASPP stay dense); the depthwise and dilated convolutions use the faster
backward of :mod:`slicreg.network`; bf16 autocast and channels-last 3-D memory format.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slicreg.errors import ConfigError, InputError
from slicreg.network import HU_SCALE, MODELS, N_CLASSES, N_LAYERS, TARGETS, SlicRegNet, build_model, network_input
from slicreg.regression import FIELD_SPACING_MM

__all__ = [
    "TrainConfig",
    "SupervoxelData",
    "random_affines",
    "augment_batch",
    "augment_displacement_batch",
    "DISPLACEMENT_CHANNELS",
    "supervoxel_loss",
    "displacement_loss",
    "smoothness_penalty",
    "supervoxel_accuracy",
    "Trainer",
    "train_loop",
    "load_training_data",
    "split_validation",
    "split_validation_ids",
    "shard_ids",
    "training_subject_ids",
    "save_checkpoint",
    "load_checkpoint",
    "write_logs",
    "plot_curves",
    "run_training",
    "TrainResult",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
MODEL_TARGETS = (("deeplab", "supervoxels"), ("unet", "supervoxels"), ("deeplab", "displacement"))
"""The (model, target) pairs :class:`TrainConfig` accepts."""
BACKWARDS = ("compiled", "eager", "native")


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (defaults = the shipped weights' settings).

    Attributes:
        iterations: optimisation steps.
        batch_size: scans per step (over all processes under torchrun; must divide by their number).
        lr: Adam learning rate (no schedule).
        seed: seeds the initialisation, batch choice, augmentation, voxel subsets and dropout.
        augment_sigma: standard deviation of the affine augmentation ``theta = I + sigma * N(0, 1)``.
        head_voxels: output voxels per scan at which head and loss are evaluated each step (random, uniform,
            without replacement); 0 = every voxel (the dense head, as the reference).
        foreground_fraction: with ``head_voxels``, the share of them drawn from foreground voxels (augmented
            target > 0; fewer when a scan has fewer among the candidates); 0 = uniform (the dense loss's
            unbiased estimate). Foreground is a minority of the output grid (docs/measurements.md), so uniform
            sampling spends most of the head on background, which the network learns early; a share of
            ~0.5 weights supervoxel (foreground) cross-entropy up ~3x against background, a class-balancing
            change of the objective made to learn in a CPU budget (docs/network.md).
        fov_crop_probability: share of the scans in a batch that are cut to a partial field of view before the
            affine augmentation (:func:`crop_field_of_view`): an axial slab ``fov_crop_mm`` thick through the
            organs is kept, the rest becomes air (image) and background (targets), and the slab is moved to the
            middle of the axial axis, as the preprocessing centres a thin scan. Teaches the network that
            partial scans (the cohort's 40 mm test slabs) show only part of the anatomy. 0 = off.
        fov_crop_mm: ``(min, max)`` slab thickness in mm, drawn uniformly.
        precision: ``"auto"`` (bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA), ``"bf16"``, ``"fp16"``
            or ``"fp32"``.
        channels_last: channels-last 3-D memory format for model and input.
        checkpointing: gradient checkpointing (less memory, more compute; same gradients).
        backward: ``"compiled"``, ``"eager"`` or ``"native"`` (see :class:`slicreg.network.SlicRegNet`).
        val_every: validate every this many steps (and after the last).
        val_subjects: held-out training subjects for validation (the last ones of the sorted training list) when
            ``val_ids`` is empty.
        val_ids: explicit validation subject ids (excluded from training).
        checkpoint_every: write the resumable checkpoint every this many steps (and after the last).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``); under torchrun on CUDA each process uses its local rank.
        init_weights: a weights bundle folder to start from instead of the seeded initialisation (fine-tuning,
            e.g. the shipped weights on your own cohort); the optimiser starts afresh. ``None``: from scratch.
        model: the network: ``"deeplab"`` (SLIC-Reg's, :class:`slicreg.network.SlicRegNet`) or ``"unet"`` (the
            U-Net baseline, :mod:`slicreg.unet`); built by :func:`slicreg.network.build_model`.
        target: what it learns: ``"supervoxels"`` (the transferred template supervoxels, SLIC-Reg) or
            ``"displacement"`` (the transfer fields themselves: the "Regression" baseline,
            :mod:`slicreg.regression`, on the DeepLab only). For ``"displacement"`` the other keys keep their
            meaning: ``head_voxels`` output voxels per scan carry head and loss (the same budget as the supervoxel
            head), ``foreground_fraction`` draws that share of them where the transferred supervoxels are
            foreground, and the field-of-view cut leaves the target unknown outside its slab (masked out of the
            loss, :func:`crop_field_of_view`).
        lr_schedule: ``"constant"`` (``lr`` throughout, the shipped weights' recipe) or ``"cosine"`` (``lr`` decayed
            to 0 over ``iterations`` by half a cosine: :func:`learning_rate`), after ``warmup``.
        warmup: steps of linear warm-up from ``lr / warmup`` to ``lr`` (0 = none).
        smoothness: weight of :func:`smoothness_penalty` (a diffusion penalty on the predicted field) added to
            the displacement loss; 0 (default) = none. Needs ``target = "displacement"`` and the dense head
            (``head_voxels = 0``), as the penalty needs every output voxel's neighbours.
    """

    iterations: int = 400
    batch_size: int = 4
    lr: float = 0.004
    seed: int = 0
    augment_sigma: float = 0.07
    head_voxels: int = 2048
    foreground_fraction: float = 0.0
    fov_crop_probability: float = 0.0
    fov_crop_mm: tuple[float, float] = (32.0, 120.0)
    precision: str = "auto"
    channels_last: bool = True
    checkpointing: bool = False
    backward: str = "compiled"
    val_every: int = 50
    val_subjects: int = 2
    val_ids: tuple[str, ...] = ()
    checkpoint_every: int = 10
    device: str = "cpu"
    init_weights: str | None = None
    model: str = "deeplab"
    target: str = "supervoxels"
    smoothness: float = 0.0
    lr_schedule: str = "constant"
    warmup: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.augment_sigma >= 0, "augment_sigma must be >= 0"),
            (self.head_voxels >= 0, "head_voxels must be >= 0 (0 = dense head)"),
            (0.0 <= self.foreground_fraction <= 1.0, "foreground_fraction must be in [0, 1]"),
            (self.foreground_fraction == 0.0 or self.head_voxels > 0,
             "foreground_fraction needs head_voxels > 0 (the dense head sees every voxel)"),
            (0.0 <= self.fov_crop_probability <= 1.0, "fov_crop_probability must be in [0, 1]"),
            (len(self.fov_crop_mm) == 2 and 0 < float(self.fov_crop_mm[0]) <= float(self.fov_crop_mm[1]),
             f"fov_crop_mm must be (min, max) with 0 < min <= max, got {self.fov_crop_mm!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.backward in BACKWARDS, f"backward must be one of {BACKWARDS}"),
            (self.val_every >= 1, "val_every must be >= 1"),
            (self.val_subjects >= 0, "val_subjects must be >= 0"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}"),
            (self.target in TARGETS, f"target must be one of {TARGETS}, got {self.target!r}"),
            ((self.model, self.target) in MODEL_TARGETS,
             f"model {self.model!r} with target {self.target!r} is not available; allowed (model, target): "
             + ", ".join(f"{m}/{t}" for m, t in MODEL_TARGETS)),
            (self.smoothness >= 0, "smoothness must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (0 <= self.warmup < self.iterations, "warmup must be in [0, iterations)"),
            (self.smoothness == 0 or self.target == "displacement",
             "smoothness applies to target 'displacement' only"),
            (self.smoothness == 0 or self.head_voxels == 0,
             "smoothness needs the dense head (head_voxels = 0): the penalty needs every output voxel's neighbours"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"training config: {message}")
        object.__setattr__(self, "val_ids", tuple(str(v) for v in self.val_ids))
        if self.init_weights is not None:
            object.__setattr__(self, "init_weights", str(self.init_weights))
        object.__setattr__(self, "fov_crop_mm", tuple(float(v) for v in self.fov_crop_mm))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "training config") -> TrainConfig:
        """Build from a mapping (e.g. a TOML table); unknown keys raise :class:`ConfigError` naming ``where``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        kwargs = dict(values)
        if "val_ids" in kwargs:
            kwargs["val_ids"] = tuple(kwargs["val_ids"] or ())
        if "fov_crop_mm" in kwargs:
            try:
                kwargs["fov_crop_mm"] = tuple(float(v) for v in kwargs["fov_crop_mm"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: fov_crop_mm must be two numbers (mm), got "
                                  f"{kwargs['fov_crop_mm']!r}") from None
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["val_ids"] = list(self.val_ids)
        d["fov_crop_mm"] = list(self.fov_crop_mm)
        return d


# Keys that may change when a run is resumed (they do not change what is learnt up to the current step).
RESUMABLE_CHANGES = ("iterations", "val_every", "checkpoint_every", "device")
# Augmentation keys that may be switched when a run is resumed: the steps from then on use the new value, and the
# change is recorded (``Trainer.config_changes``, the model card) with the step it took effect.
RESUMABLE_AUGMENTATION = ("fov_crop_probability", "fov_crop_mm")


# -------------------------------------------------------------------------------------------------- data


DISPLACEMENT_CHANNELS = ("foreground", "valid", "u0", "u1", "u2")
"""Channels of the displacement targets (``SupervoxelData.target == "displacement"``), float32 on the 4 mm grid:
0 = foreground (1 where layer 0 of the transferred supervoxels is > 0: the share :func:`choose_foreground_voxels` and
the field-of-view cut use, as for supervoxel targets), 1 = valid (1 where the target is known; the loss counts only
these voxels), 2-4 = the transfer field ``u`` along array axes 0, 1, 2 in voxels of the 2 mm grid (scan ->
template). One tensor, so batches, cuts and voxel choices handle both kinds of targets alike."""
_FIELD_PER_INPUT_VOXEL = 4.0 / FIELD_SPACING_MM  # 2 mm voxels (the field's unit) per 4 mm input voxel


@dataclass
class SupervoxelData:
    """Training or validation scans in memory.

    Attributes:
        ids: subject ids.
        images: ``(S, 1, X, Y, Z)`` float32 network input (4 mm, HU / 500).
        targets: ``(S, 16, X, Y, Z)`` uint8 supervoxel labels 0..127 on the same 4 mm grid (``target
            "supervoxels"``), or ``(S, 5, X, Y, Z)`` float32 displacement targets (:data:`DISPLACEMENT_CHANNELS`).
        affines: 4 mm voxel -> world affines (metadata only).
        target: ``"supervoxels"`` (default) or ``"displacement"``: which kind ``targets`` holds.
    """

    ids: list[str]
    images: torch.Tensor
    targets: torch.Tensor
    affines: list[np.ndarray] = field(default_factory=list)
    target: str = "supervoxels"

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.dim() != 5 or self.images.shape[:2] != (n, 1):
            raise InputError(f"SupervoxelData: images must be ({n}, 1, X, Y, Z), got {tuple(self.images.shape)}")
        if self.target == "displacement":
            want = (n, len(DISPLACEMENT_CHANNELS), *self.images.shape[2:])
            if tuple(self.targets.shape) != want or self.targets.dtype != torch.float32:
                raise InputError(f"SupervoxelData: displacement targets must be float32 {want} to match the images, "
                                 f"got {self.targets.dtype} {tuple(self.targets.shape)}")
            if n and not bool(torch.isfinite(self.targets).all()):
                raise InputError("SupervoxelData: displacement targets contain NaN or Inf values")
            return
        if self.target != "supervoxels":
            raise InputError(f"SupervoxelData: target must be one of {TARGETS}, got {self.target!r}")
        want = (n, N_LAYERS, *self.images.shape[2:])
        if tuple(self.targets.shape) != want:
            raise InputError(f"SupervoxelData: targets must be {want} to match the images, got "
                             f"{tuple(self.targets.shape)}")
        if self.targets.dtype != torch.uint8:
            raise InputError(f"SupervoxelData: targets must be uint8, got {self.targets.dtype}")
        if n and int(self.targets.max()) >= N_CLASSES:
            raise InputError(f"SupervoxelData: target labels must be < {N_CLASSES}, got {int(self.targets.max())}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: Sequence[str]) -> SupervoxelData:
        idx = [self.ids.index(i) for i in ids]
        return SupervoxelData(list(ids), self.images[idx], self.targets[idx],
                              [self.affines[i] for i in idx] if self.affines else [], target=self.target)


def split_validation_ids(ids: Sequence[str], config: TrainConfig) -> tuple[list[str], list[str]]:
    """``(training ids, validation ids)``: ``config.val_ids`` if given, else the last ``val_subjects`` ids in sorted
    order; the training ids are the rest, sorted."""
    ids = sorted(ids)
    if config.val_ids:
        missing = [v for v in config.val_ids if v not in ids]
        if missing:
            raise ConfigError(f"training config: val_ids {missing} are not among the loaded subjects {ids}")
        val = list(config.val_ids)
    else:
        val = ids[len(ids) - config.val_subjects:] if config.val_subjects else []
    train = [i for i in ids if i not in val]
    if not train:
        raise ConfigError(f"training config: no training subjects left after holding out {val} for validation "
                          f"({len(ids)} subjects loaded)")
    return train, val


def split_validation(data: SupervoxelData, config: TrainConfig) -> tuple[SupervoxelData, SupervoxelData | None]:
    """``(training, validation)`` data: see :func:`split_validation_ids`."""
    train, val = split_validation_ids(data.ids, config)
    return data.subset(train), (data.subset(val) if val else None)


def shard_ids(ids: Sequence[str], rank: int, world_size: int, *, seed: int) -> list[str]:
    """The training scans process ``rank`` of ``world_size`` holds (DistributedDataParallel over processes/nodes).

    One process (``world_size`` 1) holds ``ids`` unchanged. Otherwise the ids are put in a random order drawn from
    ``seed`` and dealt out in turn, so the shards are disjoint, cover every id, differ in size by at most one and
    depend only on ``(ids, world_size, seed)``; each shard keeps the order of ``ids``. Every process then draws its
    part of each batch from its own shard (uniformly, with replacement), so no process needs every scan in memory.

    Raises:
        ConfigError: fewer scans than processes (a process would have nothing to train on).
    """
    ids = list(ids)
    if world_size <= 1:
        return ids
    if len(ids) < world_size:
        raise ConfigError(f"training: {len(ids)} training scan(s) for {world_size} processes; each process needs at "
                          f"least one (use fewer processes or more scans)")
    order = np.random.default_rng([int(seed), 3]).permutation(len(ids))
    mine = sorted(int(i) for i in order[rank::world_size])
    return [ids[i] for i in mine]


# ---------------------------------------------------------------------------------------- augmentation


def random_affines(n: int, *, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random affine matrices ``theta = [I | 0] + sigma * N(0, 1)`` (all 12 entries), ``(n, 3, 4)`` float32.

    ``theta`` maps ``grid_sample``'s normalised output coordinates (x = last array axis first) to input ones, as
    ``F.affine_grid`` does (the reference's convention)."""
    eye = torch.eye(3, 4).expand(n, 3, 4)
    return eye + sigma * torch.randn(n, 3, 4, generator=generator)


def random_voxels(batch: int, n_voxels: int, grid_size: int, *, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """``(batch, n)`` distinct random flat voxel indices per sample (``n = min(n_voxels, grid_size)``), int64."""
    n = min(n_voxels, grid_size)
    return torch.stack([torch.randperm(grid_size, generator=generator)[:n] for _ in range(batch)])


def choose_foreground_voxels(candidates: torch.Tensor, labels: torch.Tensor, n: int, fraction: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n`` of the (randomly ordered) ``candidates``, ``round(fraction * n)`` of them foreground if there are.

    Args:
        candidates: ``(B, M)`` flat output-voxel indices in random order, ``M >= n``.
        labels: ``(B, 16, M)`` their targets; foreground = layer 0's label > 0 (all layers share one mask).
        n: voxels to keep per scan.
        fraction: wanted foreground share.

    Returns:
        ``(B, n)`` chosen indices and their ``(B, 16, n)`` labels: the first foreground candidates (up to the
        wanted number, fewer if the scan has fewer), then the first background ones to fill ``n``.
    """
    fg = labels[:, 0] > 0
    want = int(round(fraction * n))
    order = torch.arange(candidates.shape[1], device=candidates.device)
    picks = []
    for i in range(candidates.shape[0]):
        fg_idx = order[fg[i]][:want]
        rest = order[~torch.isin(order, fg_idx)][: n - len(fg_idx)]
        picks.append(torch.cat([fg_idx, rest]))
    pick = torch.stack(picks)
    return candidates.gather(1, pick), labels.gather(2, pick.unsqueeze(1).expand(-1, labels.shape[1], -1))


AIR_HU = -1000.0  # what the cohort (and a scanner) shows outside a partial field of view
INPUT_SPACING_MM = 4.0  # the network input's voxel size (2 mm preprocessed scans pooled 2x2x2)


def crop_field_of_view(images: torch.Tensor, targets: torch.Tensor, *, probability: float,
                       thickness_vox: tuple[float, float], generator: torch.Generator | None = None,
                       air: float = AIR_HU / HU_SCALE, displacement: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut some scans of a batch to a thin axial field of view, as a partial scan is seen after preprocessing.

    For each scan, with ``probability``: a thickness ``t`` is drawn uniformly from ``thickness_vox`` and a slab
    centre uniformly between the first and last axial plane (last array axis, superior-inferior in RAS) that hold
    foreground (layer 0's target > 0); planes outside ``[c - t/2, c + t/2)`` become ``air`` in the image and
    background (0) in the targets; then the scan is rolled along that axis so that the slab's centre is the
    middle plane (the preprocessing centres a scan on its own soft tissue). Scans not drawn, or without
    foreground, are returned unchanged. Nothing is drawn from ``generator`` when ``probability`` is 0.

    Displacement targets (``displacement=True``, :data:`DISPLACEMENT_CHANNELS`): what a scan cut this way
    corresponds to outside its slab is unknown (the slab is all the scanner saw), so there the target is marked
    *invalid* (foreground and valid channels 0; the loss ignores those voxels) rather than set to a displacement
    of 0, which would teach a wrong correspondence. The field itself is shifted with the scan, reading the
    original field beyond the slab (border-clamped at the grid's ends, not wrapped round) so that a trilinear
    read just inside the slab stays exact, and its component along the rolled axis changes by ``-2 * shift``
    (2 mm voxels): rolled voxel ``z`` shows original voxel ``z - shift``, whose template position is unchanged.

    Args:
        images: ``(B, 1, X, Y, Z)`` float network input (HU / HU_SCALE).
        targets: ``(B, 16, X, Y, Z)`` integer labels on the same grid, or ``(B, 5, X, Y, Z)`` displacement
            targets with ``displacement=True``.
        probability: per-scan probability of the cut, in [0, 1].
        thickness_vox: ``(min, max)`` slab thickness in voxels of this grid.
        generator: random source.
        air: image value outside the slab (default -1000 HU in network units).
        displacement: ``targets`` are displacement targets (see above).

    Returns:
        New ``(images, targets)`` tensors (the inputs are not modified).
    """
    if probability <= 0:
        return images, targets
    b, z = images.shape[0], images.shape[-1]
    draw = torch.rand(b, 3, generator=generator)  # (apply?, thickness, centre) per scan
    images, targets = images.clone(), targets.clone()
    lo, hi = float(thickness_vox[0]), float(thickness_vox[1])
    for i in range(b):
        if float(draw[i, 0]) >= probability:
            continue
        planes = torch.nonzero((targets[i, 0] > 0).flatten(0, 1).any(dim=0)).flatten()
        if planes.numel() == 0:
            continue
        t = max(1, int(round(lo + (hi - lo) * float(draw[i, 1]))))
        first, last = int(planes[0]), int(planes[-1])
        c = first + int(round((last - first) * float(draw[i, 2])))
        start, stop = max(0, c - t // 2), min(z, c - t // 2 + t)
        keep = torch.zeros(z, dtype=torch.bool, device=images.device)
        keep[start:stop] = True
        images[i][..., ~keep] = air
        shift = z // 2 - (start + stop) // 2
        images[i] = torch.roll(images[i], shift, dims=-1)
        if not displacement:
            targets[i][..., ~keep] = 0
            targets[i] = torch.roll(targets[i], shift, dims=-1)
            continue
        targets[i, :2][..., ~keep] = 0  # foreground and valid: the target is unknown outside the slab
        targets[i, :2] = torch.roll(targets[i, :2], shift, dims=-1)
        src = (torch.arange(z, device=targets.device) - shift).clamp(0, z - 1)  # rolled plane z <- plane z - shift
        targets[i, 2:] = targets[i, 2:, ..., src]
        targets[i, 4] -= _FIELD_PER_INPUT_VOXEL * shift
    return images, targets


def augment_batch(images: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, *,
                  voxels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply affine augmentations to images and targets.

    Args:
        images: ``(B, 1, X, Y, Z)`` float network input.
        targets: ``(B, 16, X, Y, Z)`` integer labels on the same grid.
        theta: ``(B, 3, 4)`` affines from :func:`random_affines` (normalised coordinates, ``align_corners=False``).
        voxels: optional ``(B, N)`` flat indices into the output grid ``(X/2, Y/2, Z/2)``; then the targets are
            sampled only there.

    Returns:
        ``images`` ``(B, 1, X, Y, Z)`` (trilinear, border padding) and the targets at the network's output voxels
        (nearest, zero padding): ``(B, 16, X/2, Y/2, Z/2)`` int64, or ``(B, 16, N)`` with ``voxels``. Output voxel
        ``q`` of the network is centred on input voxel ``2 q``, so the targets are read where the augmented input
        voxel ``2 q`` reads the image.

    Both go through the one sampler: ``theta`` becomes the voxel map ``inv(N) @ theta @ N`` of the input grid
    (``N`` = :meth:`slicreg.grid.Grid.normalised_matrix`, ``align_corners=False``); the images are resampled by
    :func:`slicreg.fields.sample_affine`'s ``"grid_sample"`` backend (``F.affine_grid`` + one fused
    ``grid_sample`` over the batch, the training hot path), the targets are read at the mapped voxels ``2 q``
    by the gather backend (nearest, the grid surrounded by background: ``"zero_voxels"``), straight from their
    integer dtype.
    """
    from slicreg.fields import sample

    out_images, centres, pos, out_shape = _augment_geometry(images, theta, voxels, targets.device)
    labels = sample(targets, pos, interpolation="nearest", padding="zero_voxels").to(torch.int64)
    labels = labels if voxels is not None else labels.view(images.shape[0], N_LAYERS, *out_shape)
    return out_images, labels


def _augment_geometry(images: torch.Tensor, theta: torch.Tensor, voxels: torch.Tensor | None, device: Any
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """The part :func:`augment_batch` and :func:`augment_displacement_batch` share: the voxel maps of ``theta``,
    the augmented images, and where the network's output voxels read the original grid.

    Returns:
        ``(out_images, centres, pos, out_shape)``: the augmented ``(B, 1, X, Y, Z)`` images; ``centres`` ``(B, 3,
        N)`` float64 = ``2 q``, the input voxels on which the output voxels ``q`` are centred (every output voxel,
        x-major, or those of ``voxels``); ``pos`` ``(B, 3, N)`` float64 = ``m(2 q)``, the original input voxels
        they show (``m(p) = M p + t``, augmented -> original input voxel); the output grid's shape.
    """
    from slicreg.fields import sample_affine
    from slicreg.grid import Grid

    b, _, *size = images.shape
    norm = Grid(tuple(size)).normalised_matrix(align_corners=False)
    t4 = np.zeros((b, 4, 4))
    t4[:, :3] = theta.detach().to(device="cpu", dtype=torch.float64).numpy()
    t4[:, 3, 3] = 1.0
    maps = np.linalg.inv(norm) @ t4 @ norm  # (B, 4, 4): output voxel -> input voxel
    out_images = sample_affine(images.float(), maps, size, interpolation="linear", padding="border",
                               backend="grid_sample", align_corners=False)
    out_shape = tuple((s + 1) // 2 for s in size)  # output voxel q = input voxel 2 q
    if voxels is None:
        q = torch.from_numpy(Grid(out_shape).coords(dtype=np.float64)).to(device).reshape(1, 3, -1).expand(b, -1, -1)
    else:
        v = voxels.to(device)
        q = torch.stack([v // (out_shape[1] * out_shape[2]), (v // out_shape[2]) % out_shape[1], v % out_shape[2]],
                        dim=1).double()  # (B, 3, N)
    m = torch.as_tensor(maps, dtype=torch.float64, device=device)
    centres = 2.0 * q
    pos = m[:, :3, :3] @ centres + m[:, :3, 3:]
    return out_images, centres, pos, out_shape


def augment_displacement_batch(images: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, *,
                               voxels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_batch` for displacement targets: the augmenting affine composed into the target field.

    The augmented scan's input voxel ``p`` shows the original input voxel ``m(p) = M p + t`` (the maps of
    :func:`augment_batch`); the template is not augmented. Input voxel ``m`` is the 2 mm position ``2 m + 0.5``,
    so augmented 2 mm position ``2 p + 0.5`` <-> original ``2 m(p) + 0.5`` <-> template ``2 m(p) + 0.5 +
    u(2 m(p) + 0.5)``, and the new target, in 2 mm voxels, is

        ``u'(p) = 2 (m(p) - p) + U(m(p))``

    with ``U`` the field stored on the 4 mm grid (channels 2-4 of :data:`DISPLACEMENT_CHANNELS`: ``U(m) =
    u(2 m + 0.5)``), read trilinearly with border padding (:func:`slicreg.fields.sample`) at ``m(2 q)`` for the
    output voxels ``q`` (centred on input voxel ``2 q``). Foreground and validity are read as labels are (nearest,
    the grid surrounded by zeros: :func:`augment_batch`), so an output voxel whose position falls outside the
    original scan is invalid -- its image is border padding and its target an extrapolation.

    Args:
        images: ``(B, 1, X, Y, Z)`` float network input.
        targets: ``(B, 5, X, Y, Z)`` float displacement targets (:data:`DISPLACEMENT_CHANNELS`).
        theta, voxels: as :func:`augment_batch`.

    Returns:
        ``images`` ``(B, 1, X, Y, Z)`` and the targets ``(B, 5, X/2, Y/2, Z/2)`` float32 (``(B, 5, N)`` with
        ``voxels``) at the network's output voxels, in the same channel layout.
    """
    from slicreg.fields import sample

    if targets.dim() != 5 or targets.shape[1] != len(DISPLACEMENT_CHANNELS) or not targets.dtype.is_floating_point:
        raise InputError(f"augment_displacement_batch: targets must be floating (B, {len(DISPLACEMENT_CHANNELS)}, X, "
                         f"Y, Z), got {targets.dtype} {tuple(targets.shape)}")
    out_images, centres, pos, out_shape = _augment_geometry(images, theta, voxels, targets.device)
    flags = sample(targets[:, :2], pos, interpolation="nearest", padding="zero_voxels")
    u = sample(targets[:, 2:].float(), pos, interpolation="linear", padding="border")
    u = u + (_FIELD_PER_INPUT_VOXEL * (pos - centres)).to(u.dtype)
    out = torch.cat([flags.to(u.dtype), u], dim=1)
    out = out if voxels is not None else out.view(images.shape[0], len(DISPLACEMENT_CHANNELS), *out_shape)
    return out_images, out


# ------------------------------------------------------------------------------------------------- loss


def _as_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views for the cross-entropy: ``(B * 16, 128, S)`` + ``(B * 16, S)`` or ``(R, 128)`` + ``(R,)`` rows."""
    b = logits.shape[0]
    if logits.shape[1] != N_LAYERS * N_CLASSES:
        raise InputError(f"supervoxel_loss: logits must have {N_LAYERS * N_CLASSES} channels, got {logits.shape[1]}")
    if targets.shape != (b, N_LAYERS, *logits.shape[2:]):
        raise InputError(f"supervoxel_loss: targets must be {(b, N_LAYERS, *logits.shape[2:])}, got "
                         f"{tuple(targets.shape)}")
    if logits.dim() == 5 and logits.is_contiguous(memory_format=torch.channels_last_3d) and not logits.is_contiguous():
        # (B, X, Y, Z, 2048) in memory: rows of 128 classes are contiguous
        rows = logits.permute(0, 2, 3, 4, 1).reshape(-1, N_CLASSES)
        t = targets.permute(0, 2, 3, 4, 1).reshape(-1)
        return rows, t
    if logits.dim() == 3:
        # the head at voxels, (B, 2048, N) with N small: one copy into rows of 128 classes (the fast softmax layout)
        rows = logits.unflatten(1, (N_LAYERS, N_CLASSES)).transpose(2, 3).reshape(-1, N_CLASSES)
        return rows, targets.reshape(-1)
    return logits.reshape(b * N_LAYERS, N_CLASSES, -1), targets.reshape(b * N_LAYERS, -1)


def supervoxel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the 16 layers (and the batch and voxels) of the cross-entropy; background is a class.

    Args:
        logits: ``(B, 2048, *S)`` in the layout ``128 * layer + class`` (dense ``S = (X', Y', Z')`` in either memory
            format, or ``S = (N,)`` from the head at voxels).
        targets: ``(B, 16, *S)`` int64 labels 0..127.

    Every layer has the same number of voxels, so the mean over all (layer, voxel) terms equals the mean over
    layers of the per-layer means. The cross-entropy runs on a view of the dense logits (for the head at voxels,
    on one small copy), never on per-layer slices.
    """
    rows, t = _as_rows(logits, targets)
    return F.cross_entropy(rows, t)


@torch.no_grad()
def supervoxel_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``accuracy`` (all voxels) and ``foreground_accuracy`` (target > 0): argmax == target, mean over layers."""
    rows, t = _as_rows(logits, targets)
    pred = rows.argmax(1)
    correct = pred == t
    fg = t > 0
    n_fg = int(fg.sum())
    return {"accuracy": float(correct.float().mean()),
            "foreground_accuracy": float((correct & fg).sum()) / n_fg if n_fg else float("nan")}


CHARBONNIER_EPS = 0.1
"""The Charbonnier loss's ``eps`` in 2 mm voxels: quadratic below about this end-point error, linear above."""


def displacement_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, *,
                      eps: float = CHARBONNIER_EPS) -> torch.Tensor:
    """Mean Charbonnier loss of the end-point error, ``sqrt(|pred - target|^2 + eps^2) - eps``, over valid voxels.

    Robust (its gradient is bounded, so the odd wrong transfer field does not dominate) and, above ``eps``, close
    to the end-point error itself: the value is about the mean end-point error in 2 mm voxels (half of it in mm).

    Args:
        pred, target: ``(B, 3, *S)`` displacements in 2 mm voxels (dense ``S = (X', Y', Z')`` or ``S = (N,)``).
        valid: optional ``(B, *S)``, nonzero where the target is known; the mean is over those voxels (0, with a
            gradient of 0, when there are none).
        eps: in 2 mm voxels.
    """
    if pred.shape != target.shape or pred.dim() < 3 or pred.shape[1] != 3:
        raise InputError(f"displacement_loss: pred and target must both be (B, 3, ...), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    err = torch.sqrt((pred.float() - target.float()).pow(2).sum(1) + eps * eps) - eps  # (B, *S)
    if valid is None:
        return err.mean()
    if valid.shape != err.shape:
        raise InputError(f"displacement_loss: valid must be {tuple(err.shape)}, got {tuple(valid.shape)}")
    w = (valid != 0).to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


def smoothness_penalty(pred: torch.Tensor) -> torch.Tensor:
    """Diffusion penalty of a dense field ``(B, 3, X, Y, Z)``: the sum over the 3 axes of the mean squared forward
    difference (mean over batch, components and voxel pairs), in (2 mm voxels per output voxel)^2; 0 for any
    translation."""
    if pred.dim() != 5 or pred.shape[1] != 3:
        raise InputError(f"smoothness_penalty: expected a dense field (B, 3, X, Y, Z), got {tuple(pred.shape)}")
    p = pred.float()
    return sum((torch.diff(p, dim=d).pow(2).mean() for d in (2, 3, 4) if p.shape[d] > 1), p.new_zeros(()))


# ----------------------------------------------------------------------------------------------- trainer


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """The learning rate of step ``iteration`` (0-based): ``config.lr``, times ``(iteration + 1) / warmup`` during
    the warm-up, times ``(1 + cos(pi * t)) / 2`` with ``t`` = the fraction of the steps after the warm-up done,
    for ``lr_schedule = "cosine"``. A function of the step alone, so a resumed run follows the same schedule."""
    import math

    lr = float(config.lr)
    if config.warmup and iteration < config.warmup:
        return lr * (iteration + 1) / config.warmup
    if config.lr_schedule == "cosine":
        t = (iteration - config.warmup) / max(1, config.iterations - config.warmup)
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return lr


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training config: precision 'fp16' (AMP with a grad scaler) needs a CUDA device; use "
                          "'bf16' on CPU")
    return precision


def _generator_seed(seed: int, *stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), *stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """Model, optimiser, precision and random state of a run; one :meth:`step` = one optimisation step.

    Args:
        config: the run's settings.
        rank, world_size: this process's place under torchrun (``world_size`` 1 otherwise); the model is wrapped
            in DistributedDataParallel when ``world_size > 1`` (the process group must be initialised).

    All randomness (initialisation, batch choice, augmentation, voxel subsets, dropout) comes from explicit
    generators seeded from ``config.seed`` (and the rank), saved in :meth:`state_dict`.
    """

    def __init__(self, config: TrainConfig, *, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        if config.batch_size % world_size:
            raise ConfigError(f"training config: batch_size {config.batch_size} is not divisible by the "
                              f"{world_size} processes")
        self.local_batch = config.batch_size // world_size
        device = torch.device(config.device)
        if device.type == "cuda" and world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        self.device = device
        self.precision = _resolve_precision(config.precision, device)
        self.model: SlicRegNet = build_model(seed=config.seed, backward=config.backward,
                                             checkpointing=config.checkpointing, device=device,
                                             channels_last=config.channels_last, model=config.model,
                                             target=config.target)
        if config.init_weights is not None:
            from slicreg.bundle import load_weights

            kind = {"model": config.model, "target": config.target}  # another kind: refused in one line
            self.model.load_state_dict(load_weights(config.init_weights, kind=kind))
        self.model.train()
        self.ddp: Any = None
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator().manual_seed(_generator_seed(config.seed, 1, rank))
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        # augmentation switched on resume: {"iteration", key: [old, new]}
        self.config_changes: list[dict[str, Any]] = []
        self.elapsed_s = 0.0

    # ---- one step
    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def sample_batch(self, data: SupervoxelData) -> tuple[torch.Tensor, torch.Tensor]:
        """``local_batch`` scans drawn uniformly with replacement: ``(images, targets)`` on the device."""
        self._check_data(data)
        idx = torch.randint(len(data), (self.local_batch,), generator=self.generator)
        return data.images[idx].to(self.device), data.targets[idx].to(self.device)

    def _check_data(self, data: SupervoxelData) -> None:
        if data.target != self.config.target:
            raise ConfigError(f"training config: target {self.config.target!r}, but the data hold {data.target!r} "
                              f"targets (load_training_data(..., target={self.config.target!r}))")

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimisation step on a batch ``(B, 1, X, Y, Z)`` + ``(B, 16, X, Y, Z)`` (target ``"supervoxels"``)
        or ``(B, 5, X, Y, Z)`` (``"displacement"``, :data:`DISPLACEMENT_CHANNELS`); returns the loss.

        Draws the augmentation, the voxel subset and the dropout mask from :attr:`generator` (the same draws for
        either target)."""
        cfg = self.config
        b = images.shape[0]
        displacement = cfg.target == "displacement"
        augment = augment_displacement_batch if displacement else augment_batch
        if cfg.fov_crop_probability > 0:
            images, targets = crop_field_of_view(images, targets, probability=cfg.fov_crop_probability,
                                                 thickness_vox=tuple(v / INPUT_SPACING_MM for v in cfg.fov_crop_mm),
                                                 generator=self.generator, displacement=displacement)
        theta = random_affines(b, sigma=cfg.augment_sigma, generator=self.generator)
        out_size = int(np.prod([s // 2 for s in images.shape[2:]]))
        if cfg.head_voxels and cfg.foreground_fraction > 0:
            candidates = random_voxels(b, 4 * cfg.head_voxels, out_size, generator=self.generator)
            x, t = augment(images, targets, theta, voxels=candidates)
            voxels, t = choose_foreground_voxels(candidates.to(t.device), t, min(cfg.head_voxels, out_size),
                                                 cfg.foreground_fraction)
        else:
            voxels = random_voxels(b, cfg.head_voxels, out_size, generator=self.generator) if cfg.head_voxels \
                else None
            x, t = augment(images, targets, theta, voxels=voxels)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        model = self.ddp if self.ddp is not None else self.model
        gen = self.generator if self.device.type == "cpu" else None
        with self._autocast():
            logits = model(x, voxels=None if voxels is None else voxels.to(self.device), generator=gen)
        if voxels is not None or displacement:
            logits = logits.float()  # (B, 2048, N) or a 3-channel field: small
        if displacement:  # channels: foreground, valid, u (DISPLACEMENT_CHANNELS)
            loss = displacement_loss(logits, t[:, 2:], t[:, 1])
            if cfg.smoothness > 0:
                loss = loss + cfg.smoothness * smoothness_penalty(logits)
        else:
            loss = supervoxel_loss(logits, t)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.iteration)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return float(loss.detach())

    # ---- validation
    @torch.no_grad()
    def validate(self, data: SupervoxelData) -> dict[str, float]:
        """Eval-mode loss and accuracies over ``data`` (dense head, no augmentation, one scan at a time).

        The loss is the mean over layers of the cross-entropy in float32; accuracies are the fraction of output
        voxels whose argmax equals the target (all voxels, and foreground voxels = target > 0), mean over layers.

        Target ``"displacement"``: :meth:`validate_displacement`."""
        self._check_data(data)
        if self.config.target == "displacement":
            return self.validate_displacement(data)
        model = self.model
        was_training = model.training
        model.eval()
        ce = correct = n_fg = correct_fg = 0.0
        n_total = 0
        try:
            for i in range(len(data)):
                x = data.images[i:i + 1].to(self.device)
                if self.config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                t = data.targets[i:i + 1, :, ::2, ::2, ::2].to(self.device, torch.int64).reshape(N_LAYERS, -1)
                with self._autocast():
                    logits = model(x)
                z = logits.reshape(N_LAYERS, N_CLASSES, -1)
                for layer in range(N_LAYERS):
                    zl = z[layer].float()
                    tl = t[layer]
                    ce += float(F.cross_entropy(zl[None], tl[None], reduction="sum"))
                    hit = zl.argmax(0) == tl
                    fg = tl > 0
                    correct += float(hit.sum())
                    correct_fg += float((hit & fg).sum())
                    n_fg += float(fg.sum())
                n_total += t.numel()
        finally:
            model.train(was_training)
        return {"val_loss": ce / n_total, "val_accuracy": correct / n_total,
                "val_foreground_accuracy": correct_fg / n_fg if n_fg else float("nan")}

    @torch.no_grad()
    def validate_displacement(self, data: SupervoxelData) -> dict[str, float]:
        """Eval-mode metrics of the displacement network over ``data`` (dense head, no augmentation, one scan at a
        time) at every output voxel ``q`` against the target at input voxel ``2 q``:

        - ``val_loss``: :func:`displacement_loss` (its data term, without the smoothness penalty), float32;
        - ``val_epe_mm``: mean end-point error ``|pred - target|`` in mm (2 mm voxels x :data:`FIELD_SPACING_MM`);
        - ``val_foreground_epe_mm``: the same where the transferred supervoxels are foreground.

        Means over the voxels with a valid target, pooled over the scans."""
        model = self.model
        was_training = model.training
        model.eval()
        loss_sum = epe_sum = epe_fg_sum = 0.0
        n_valid = n_fg = 0.0
        try:
            for i in range(len(data)):
                x = data.images[i:i + 1].to(self.device)
                if self.config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                t = data.targets[i:i + 1, :, ::2, ::2, ::2].to(self.device, torch.float32)
                with self._autocast():
                    pred = model(x)
                pred = pred.float()
                valid = t[:, 1] != 0
                fg = valid & (t[:, 0] != 0)
                n = float(valid.sum())
                loss_sum += float(displacement_loss(pred, t[:, 2:], valid)) * n
                epe = (pred - t[:, 2:]).norm(dim=1) * FIELD_SPACING_MM
                epe_sum += float(epe[valid].sum())
                epe_fg_sum += float(epe[fg].sum())
                n_valid += n
                n_fg += float(fg.sum())
        finally:
            model.train(was_training)
        nan = float("nan")
        return {"val_loss": loss_sum / n_valid if n_valid else nan, "val_epe_mm": epe_sum / n_valid if n_valid else nan,
                "val_foreground_epe_mm": epe_fg_sum / n_fg if n_fg else nan}

    # ---- state
    def state_dict(self, *, generator_states: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Everything needed to continue identically: model, optimiser, scaler, generators, iteration, history."""
        return {
            "format": "slicreg-train-checkpoint/1",
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generators": generator_states if generator_states is not None else [self.generator.get_state()],
            "torch_rng": torch.get_rng_state(),
            "world_size": self.world_size,
            "history": list(self.history),
            "config_changes": list(self.config_changes),
            "elapsed_s": self.elapsed_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the config must match up to :data:`RESUMABLE_CHANGES`)."""
        new = self.config.to_dict()
        defaults = TrainConfig().to_dict()  # checkpoints written before a key existed had its default
        old = {**defaults, **dict(state["config"])}
        diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        switched = {k: [old.get(k), new.get(k)] for k in diff if k in RESUMABLE_AUGMENTATION}
        diff = [k for k in diff if k not in RESUMABLE_AUGMENTATION]
        if diff:
            raise ConfigError("cannot resume: the checkpoint was trained with other settings for " + ", ".join(
                f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        gens = state["generators"]
        if len(gens) == self.world_size:
            self.generator.set_state(gens[self.rank])
        else:
            log.warning("checkpoint has %d generator states for %d processes: reseeding from (seed, iteration)",
                        len(gens), self.world_size)
            self.generator.manual_seed(_generator_seed(self.config.seed, 2, self.rank, int(state["iteration"])))
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.config_changes = list(state.get("config_changes", []))
        if switched:
            self.config_changes.append({"iteration": int(state["iteration"]), **switched})
            log.warning("resumed at step %d with changed augmentation: %s", int(state["iteration"]), switched)
        self.elapsed_s = float(state.get("elapsed_s", 0.0))


# ---------------------------------------------------------------------------------------------- the loop


def _distributed() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def train_loop(trainer: Trainer, data: SupervoxelData, *, validation: SupervoxelData | None = None,
               on_checkpoint: Callable[[Trainer], None] | None = None,
               on_validation: Callable[[Trainer], None] | None = None, progress: bool = True) -> Trainer:
    """Run ``trainer`` from its current iteration to ``config.iterations``.

    Every ``val_every`` steps and after the last, validation metrics are appended to ``trainer.history`` (rank 0)
    and ``on_validation`` is called; every ``checkpoint_every`` steps and after the last, ``on_checkpoint`` is
    called (on every rank: it may gather state). Losses are averaged over processes under torchrun. Under torchrun
    only rank 0 needs ``validation`` (the others may pass ``None``: they wait while rank 0 validates)."""
    from tqdm.auto import tqdm

    cfg = trainer.config
    dist = _distributed()
    validating = validation is not None
    if dist is not None:  # every rank must take part in the same barriers: validating if rank 0 validates
        flag = torch.tensor([int(validating)], dtype=torch.int64)
        dist.broadcast(flag, src=0)
        validating = bool(flag.item())
    bar = tqdm(total=cfg.iterations, initial=trainer.iteration, desc="train", disable=not progress or trainer.rank != 0,
               dynamic_ncols=True)
    last_val: float | None = None
    started = time.perf_counter() - trainer.elapsed_s
    try:
        while trainer.iteration < cfg.iterations:
            images, targets = trainer.sample_batch(data)
            loss = trainer.step(images, targets)
            if dist is not None:
                t = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(t)
                loss = float(t) / trainer.world_size
            trainer.elapsed_s = time.perf_counter() - started
            trainer.history.append({"iteration": trainer.iteration, "loss": loss,
                                    "elapsed_s": round(trainer.elapsed_s, 3)})
            last = trainer.iteration == cfg.iterations
            if validating and (trainer.iteration % cfg.val_every == 0 or last):
                if trainer.rank == 0 and validation is not None:
                    metrics = trainer.validate(validation)
                    trainer.history.append({"iteration": trainer.iteration, **metrics,
                                            "elapsed_s": round(time.perf_counter() - started, 3)})
                    last_val = metrics["val_loss"]
                    if on_validation is not None:
                        on_validation(trainer)
                if dist is not None:
                    dist.barrier()
            trainer.elapsed_s = time.perf_counter() - started
            if on_checkpoint is not None and (trainer.iteration % cfg.checkpoint_every == 0 or last):
                on_checkpoint(trainer)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{last_val:.3f}" if last_val is not None else "-")
    finally:
        bar.close()
    return trainer


# ------------------------------------------------------------------------------------------ files: data


def _resolve_transferred(folder: Path) -> Path:
    sub = folder / "transferred"
    return sub if sub.is_dir() else folder


def _dataset_images(dataset_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    from slicreg.io import read_json

    where = dataset_dir / "dataset.json"
    doc = read_json(where)
    subjects = doc.get("subjects")
    if not isinstance(subjects, dict):
        raise InputError(f"{where}: expected 'subjects' (id -> entry with 'image'), see docs/CONTRACTS.md")
    images = {}
    for sid, entry in subjects.items():
        if isinstance(entry, dict) and "image" in entry:
            p = Path(entry["image"])
            images[sid] = p if p.is_absolute() else dataset_dir / p
    return doc, images


def training_subject_ids(dataset_dir: str | os.PathLike, transferred_dir: str | os.PathLike) -> list[str]:
    """The subjects :func:`load_training_data` loads by default: the dataset's ``training`` list (subjects with role
    ``train`` if it has none) that have a transferred file, in the listed order. Reads no image."""
    dataset_dir, tdir = Path(dataset_dir), _resolve_transferred(Path(transferred_dir))
    doc, _ = _dataset_images(dataset_dir)
    if not tdir.is_dir():
        raise InputError(f"{transferred_dir}: not a folder (expected the transfer output with transferred/<id>.nii.gz)")
    listed = doc.get("training")
    if listed is None:
        listed = [s for s, e in doc["subjects"].items() if isinstance(e, dict) and e.get("role") == "train"]
    ids = [s for s in listed if (tdir / f"{s}.nii.gz").is_file()]
    if not ids:
        raise InputError(f"{tdir}: no transferred/<id>.nii.gz for any training subject of "
                         f"{dataset_dir / 'dataset.json'} ({len(listed)} listed)")
    return ids


def _transfer_fields(transferred_dir: Path, dataset_doc: dict[str, Any], fields_dir: str | os.PathLike | None
                     ) -> tuple[Path, str]:
    """Where the transfer fields are and the template id in their names (``fields/disp_<id>_<template>.nii.gz``).

    The folder: ``fields_dir`` if given, else ``fields/`` of the transfer output (``transferred_dir``, or its parent
    when ``transferred_dir`` is the ``transferred/`` folder itself). The template id: ``transfer.json``'s
    ``template`` (what the transfer stage wrote), else the dataset's ``template``."""
    from slicreg.io import read_json

    root = transferred_dir if (transferred_dir / "transferred").is_dir() else transferred_dir.parent
    folder = Path(fields_dir) if fields_dir is not None else root / "fields"
    template = None
    if (root / "transfer.json").is_file():
        template = read_json(root / "transfer.json").get("template")
    if not isinstance(template, str):
        template = dataset_doc.get("template")
    if not isinstance(template, str):
        raise InputError(f"{root}: no transfer.json naming the template, and the dataset names none: cannot find "
                         f"the transfer fields fields/disp_<id>_<template>.nii.gz")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (target 'displacement' trains on the transfer stage's fields, "
                         f"fields/disp_<id>_{template}.nii.gz)")
    return folder, template


def load_training_data(dataset_dir: str | os.PathLike, transferred_dir: str | os.PathLike, *,
                       ids: Sequence[str] | None = None, progress: bool = False, target: str = "supervoxels",
                       fields_dir: str | os.PathLike | None = None) -> SupervoxelData:
    """Load scans and their transferred supervoxels (docs/CONTRACTS.md layouts), or their transfer fields.

    Args:
        dataset_dir: a preprocessed dataset folder (``dataset.json``, ``imagesTr/<id>_0000.nii.gz`` at 2 mm,
            192 x 160 x 256 in the contract).
        transferred_dir: the transfer output: ``transferred/<id>.nii.gz`` (or that folder itself), uint8
            ``(16, X/2, Y/2, Z/2)`` on the subject's 4 mm grid.
        ids: subjects to load; default: the dataset's ``training`` list (subjects with role ``train``) that have a
            transferred file.
        target: ``"supervoxels"`` (default) or ``"displacement"``: targets :data:`DISPLACEMENT_CHANNELS` from the
            transfer stage's field ``fields/disp_<id>_<template>.nii.gz`` (``(X, Y, Z, 3)`` float32 on the
            subject's 2 mm grid, voxels, subject -> template; the template id from ``transfer.json``, else the
            dataset's), read trilinearly at the 4 mm voxel centres (2 mm position ``2 m + 0.5``, the mean of each
            2x2x2 block) with the values kept in 2 mm voxels; foreground = layer 0 of the transferred supervoxels
            > 0; valid = 1 everywhere.
        fields_dir: the fields' folder, if not ``fields/`` of the transfer output.

    Returns:
        :class:`SupervoxelData` with images = 2x2x2-average-pooled HU / 500 (:func:`slicreg.network.network_input`).

    Raises:
        InputError: missing files, shapes that do not pair up, labels outside 0..127, a field missing or not on the
            subject's 2 mm grid (naming the file).
    """
    from slicreg.conventions import downsample_affine
    from slicreg.io import load_image, load_volume

    if target not in TARGETS:
        raise InputError(f"load_training_data: target must be one of {TARGETS}, got {target!r}")
    dataset_dir, tdir = Path(dataset_dir), _resolve_transferred(Path(transferred_dir))
    doc, images = _dataset_images(dataset_dir)
    if not tdir.is_dir():
        raise InputError(f"{transferred_dir}: not a folder (expected the transfer output with transferred/<id>.nii.gz)")
    fields = _transfer_fields(Path(transferred_dir), doc, fields_dir) if target == "displacement" else None
    if ids is None:
        ids = training_subject_ids(dataset_dir, transferred_dir)
    imgs, tgts, affs = [], [], []
    iterator: Any = ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ids, desc="load", leave=False)
    for sid in iterator:
        if sid not in images:
            raise InputError(f"{dataset_dir / 'dataset.json'}: no image listed for subject {sid!r}")
        img = load_image(images[sid])
        tpath = tdir / f"{sid}.nii.gz"
        if not tpath.is_file():
            raise InputError(f"{tpath}: file not found (transferred supervoxels of {sid})")
        sv = load_volume(tpath, kind="labels", channels=True)
        want = (N_LAYERS, *(s // 2 for s in img.shape))
        if tuple(sv.array.shape) != want:
            raise InputError(f"{tpath}: expected supervoxels of shape {want} (16 layers on the 4 mm grid of "
                             f"{images[sid].name} {img.shape}), got {tuple(sv.array.shape)}")
        if sv.array.min() < 0 or sv.array.max() >= N_CLASSES:
            raise InputError(f"{tpath}: labels must be in 0..{N_CLASSES - 1}, got "
                             f"{int(sv.array.min())}..{int(sv.array.max())}")
        imgs.append(torch.from_numpy(network_input(img.array, from_2mm=True))[None])
        if fields is None:
            tgts.append(torch.from_numpy(sv.array.astype(np.uint8)))
        else:
            tgts.append(_displacement_targets(fields[0] / f"disp_{sid}_{fields[1]}.nii.gz", img, sv.array))
        affs.append(downsample_affine(img.affine, 2))
    return SupervoxelData(list(ids), torch.stack(imgs), torch.stack(tgts), affs, target=target)


def _displacement_targets(path: Path, image: Any, supervoxels: np.ndarray) -> torch.Tensor:
    """The :data:`DISPLACEMENT_CHANNELS` of one subject: ``(5, X/2, Y/2, Z/2)`` float32 (see
    :func:`load_training_data`)."""
    from slicreg.fields import sample_affine
    from slicreg.grid import downsample_index_map
    from slicreg.io import load_field

    if not path.is_file():
        raise InputError(f"{path}: file not found (the transfer field of this subject; target 'displacement' needs "
                         f"the transfer stage's fields/)")
    u = load_field(path, fixed=image).array  # (3, X, Y, Z); a field on another grid is refused naming the file
    coarse = tuple(int(s) for s in supervoxels.shape[1:])
    u4 = sample_affine(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)), downsample_index_map(2), coarse,
                       interpolation="linear", padding="border", backend="gather")  # 4 mm voxel m <- 2 mm 2m + 0.5
    fg = torch.from_numpy(supervoxels[0] > 0).to(torch.float32)
    return torch.cat([fg[None], torch.ones_like(fg)[None], u4.to(torch.float32)])


# ------------------------------------------------------------------------------------ files: checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a :meth:`Trainer.state_dict` atomically (temporary file + rename)."""
    from slicreg.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a damaged file raises :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != "slicreg-train-checkpoint/1":
        raise InputError(f"{path}: not a slicreg training checkpoint")
    return state


# ------------------------------------------------------------------------------------------- files: logs

LOG_COLUMNS = ("iteration", "loss", "val_loss", "val_accuracy", "val_foreground_accuracy", "val_epe_mm",
               "val_foreground_epe_mm", "elapsed_s")


def write_logs(out_dir: str | os.PathLike, history: list[dict[str, Any]], *, extra: dict[str, Any] | None = None
               ) -> None:
    """``log.csv`` (one row per step, validation rows merged in) and ``log.json`` (``extra`` + history)."""
    from slicreg.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    rows: dict[int, dict[str, Any]] = {}
    for h in history:
        rows.setdefault(int(h["iteration"]), {}).update(h)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for it in sorted(rows):
        writer.writerow({k: rows[it].get(k, "") for k in LOG_COLUMNS})
    atomic_write_text(out_dir / "log.csv", buf.getvalue())
    atomic_write_json(out_dir / "log.json", {**(extra or {}), "history": history})


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "training",
                target: str = "supervoxels") -> Path:
    """Training loss (per step and a running mean) and validation loss / accuracy (target ``"supervoxels"``) or
    end-point error (``"displacement"``) against the step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slicreg.io import atomic_path

    steps = [h for h in history if "loss" in h]
    vals = [h for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        it = np.array([h["iteration"] for h in steps])
        loss = np.array([h["loss"] for h in steps])
        ax.plot(it, loss, color="0.75", lw=0.8, label="training loss (per step)")
        k = max(1, min(25, len(loss) // 10))
        if len(loss) >= k:
            ax.plot(it[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", lw=1.5,
                    label=f"training loss (mean of {k})")
    if vals:
        ax.plot([h["iteration"] for h in vals], [h["val_loss"] for h in vals], "o-", color="C3", lw=1.5,
                label="validation loss")
        ax2 = ax.twinx()
        if target == "displacement":
            ax2.plot([h["iteration"] for h in vals], [h.get("val_epe_mm", np.nan) for h in vals], "s--", color="C2",
                     lw=1, label="validation end-point error")
            ax2.set_ylabel("mean end-point error (mm)")
            ax2.set_ylim(bottom=0)
        else:
            ax2.plot([h["iteration"] for h in vals], [h["val_accuracy"] for h in vals], "s--", color="C2", lw=1,
                     label="validation accuracy")
            ax2.set_ylabel("accuracy (mean over layers)")
            ax2.set_ylim(0, 1)
        ax2.legend(loc="center right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("Charbonnier end-point loss (2 mm voxels)" if target == "displacement"
                  else "cross-entropy (mean over 16 layers)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What :func:`run_training` did: the bundle (rank 0), final metrics, iterations and wall time."""

    bundle: Path | None
    iterations: int
    wall_s: float
    final_loss: float | None
    validation: dict[str, float] | None
    out_dir: Path


def _init_distributed(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def hardware_summary(device: torch.device, world_size: int) -> dict[str, Any]:
    """CPU model, cores, torch threads, device and process count (for the model card)."""
    import platform

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "processes": world_size, "torch": torch.__version__,
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_training(config: TrainConfig, *, dataset: str | os.PathLike, transferred: str | os.PathLike,
                 template_supervoxels: str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False,
                 bundle_dir: str | os.PathLike | None = None, provenance: dict[str, Any] | None = None,
                 quiet: bool = False, fields: str | os.PathLike | None = None) -> TrainResult:
    """Train from files and write a weights bundle: the one-call entry of ``slicreg train`` and the ``train`` stage.

    Writes into ``out_dir``: ``checkpoints/last.pt`` (resumable, every ``checkpoint_every`` steps), ``log.csv``,
    ``log.json``, ``curves.png``, ``config.json``; and the bundle (:mod:`slicreg.bundle`) into ``bundle_dir``
    (default ``out_dir/bundle``). Under torchrun only rank 0 writes; each process loads its shard of the training
    scans (:func:`shard_ids`) and rank 0 also the validation scans.

    Args:
        config: the settings.
        dataset: preprocessed dataset folder; transferred: transfer output; template_supervoxels: the template's
            ``supervoxels.nii.gz`` (copied into the bundle).
        resume: continue from ``out_dir/checkpoints/last.pt`` if it exists (else start afresh). Without
            ``resume`` an existing checkpoint is an error, so a finished or running run is never overwritten.
        provenance: extra facts for the model card (e.g. the cohort's seed and generator version).
        fields: target ``"displacement"``: the transfer fields' folder (default: ``fields/`` of ``transferred``,
            see :func:`load_training_data`).
    """
    from slicreg.bundle import MODEL_FILE, save_bundle
    from slicreg.io import atomic_write_json, sha256_file

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    rank, world = _init_distributed(config.device)
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another output folder")
    if not Path(template_supervoxels).is_file():
        raise InputError(f"{template_supervoxels}: template supervoxels file not found")
    trainer = Trainer(config, rank=rank, world_size=world)  # before the data: a bad init_weights bundle fails fast
    # each process loads only its shard of the training scans (all of them when alone), and rank 0 the validation
    train_ids, val_ids = split_validation_ids(training_subject_ids(dataset, transferred), config)
    shards = [shard_ids(train_ids, r, world, seed=config.seed) for r in range(world)]
    kind = {"target": config.target, "fields_dir": fields}
    train_data = load_training_data(dataset, transferred, ids=shards[rank], progress=not quiet and rank == 0, **kind)
    val_data = load_training_data(dataset, transferred, ids=val_ids, **kind) if val_ids and rank == 0 else None
    data_bytes = [int(train_data.images.nbytes + train_data.targets.nbytes)]
    dist = _distributed()
    if dist is not None:
        data_bytes = [0] * world
        dist.all_gather_object(data_bytes, int(train_data.images.nbytes + train_data.targets.nbytes))
    if resume and ckpt_path.exists():
        trainer.load_state_dict(load_checkpoint(ckpt_path))
        if rank == 0 and not quiet:
            print(f"resumed from {ckpt_path} at step {trainer.iteration}", flush=True)
    dataset_dir = Path(dataset)
    info = {
        "config": config.to_dict(),
        "train_ids": train_ids, "val_ids": val_ids,
        "dataset": str(dataset_dir.resolve()), "transferred": str(Path(transferred).resolve()),
        "dataset_json_sha256": sha256_file(dataset_dir / "dataset.json"),
        "world_size": world,
        "model": config.model, "target": config.target,
    }
    if config.target == "displacement":
        folder, template = _transfer_fields(Path(transferred), _dataset_images(dataset_dir)[0], fields)
        info["fields"] = {"folder": str(folder.resolve()), "files": f"disp_<id>_{template}.nii.gz",
                          "unit": "voxels of the subject's 2 mm grid, subject -> template"}
    if world > 1:  # which scans each process held, and their memory (images + targets)
        info.update(data_shards=shards, training_data_bytes_per_process=data_bytes)
    if config.init_weights is not None:
        info["init_weights"] = {"bundle": str(Path(config.init_weights).resolve()),
                                "model_sha256": sha256_file(Path(config.init_weights) / MODEL_FILE)}
    if rank == 0:
        atomic_write_json(out_dir / "config.json", info)

    title = (f"{'SLIC-Reg' if config.target == 'supervoxels' else 'Regression baseline'} training "
             f"({config.model}, {len(train_ids)} scans)")

    def checkpoint(tr: Trainer) -> None:
        dist = _distributed()
        states = [tr.generator.get_state()]
        if dist is not None:
            gathered: list[Any] = [None] * tr.world_size
            dist.all_gather_object(gathered, tr.generator.get_state())
            states = gathered
        if tr.rank == 0:
            save_checkpoint(ckpt_path, tr.state_dict(generator_states=states))
            write_logs(out_dir, tr.history, extra=info)

    def validated(tr: Trainer) -> None:
        write_logs(out_dir, tr.history, extra=info)
        plot_curves(tr.history, out_dir / "curves.png", title=title, target=config.target)

    train_loop(trainer, train_data, validation=val_data, on_checkpoint=checkpoint, on_validation=validated,
               progress=not quiet)
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    vals = [h for h in trainer.history if "val_loss" in h]
    final_val = {k: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else None
    bundle = None
    if rank == 0:
        write_logs(out_dir, trainer.history, extra=info)
        plot_curves(trainer.history, out_dir / "curves.png", title=title, target=config.target)
        tail = losses[-min(len(losses), 25):]
        training = {
            **info,
            "iterations": trainer.iteration,
            "wall_s": round(trainer.elapsed_s, 1),
            "final_train_loss_mean_last_25": float(np.mean(tail)) if tail else None,
            "validation": final_val,
            "validation_curve": [{k: h[k] for k in ("iteration", "val_loss", "val_accuracy", "val_epe_mm") if k in h}
                                 for h in vals],
            "config_changes": trainer.config_changes,
            "hardware": hardware_summary(trainer.device, world),
            "precision": trainer.precision,
        }
        bundle = save_bundle(
            Path(bundle_dir) if bundle_dir is not None else out_dir / "bundle", trainer.model,
            template_supervoxels=template_supervoxels, training=training,
            data_provenance=_data_provenance(dataset_dir, provenance, train_ids, val_ids),
            curves_png=out_dir / "curves.png", kind={"model": config.model, "target": config.target})
    dist = _distributed()
    if dist is not None:
        dist.barrier()
    return TrainResult(bundle, trainer.iteration, trainer.elapsed_s, losses[-1] if losses else None, final_val,
                       out_dir)


def _data_provenance(dataset_dir: Path, extra: dict[str, Any] | None, train_ids: list[str],
                     val_ids: list[str]) -> dict[str, Any]:
    from slicreg.io import read_json

    doc = read_json(dataset_dir / "dataset.json")
    skip = {"subjects", "registration_pairs", "training", "test", "labels"}
    facts = {k: v for k, v in doc.items() if k not in skip}
    template = doc.get("template")
    if isinstance(template, str):
        entry = doc.get("subjects", {}).get(template, {})
        if isinstance(entry, dict) and "image" in entry:
            from slicreg.io import sha256_file

            p = Path(entry["image"])
            p = p if p.is_absolute() else dataset_dir / p
            if p.is_file():
                facts["template_image_sha256"] = sha256_file(p)
    facts["n_training_scans"] = len(train_ids)
    facts["n_validation_scans"] = len(val_ids)
    if extra:
        facts.update(extra)
    return facts
