"""Tune the supervoxel flow's knobs on the cohort's TRAINING pairs only (never on test pairs).

Pairs: each training subject (fixed) <- the template (moving), in atlas mode as the demo registers its test
pairs: the fixed side is the network's prediction (``slicreg.registration.predict_supervoxels``, bf16 on CPU,
nearest upsampling), the moving side the bundle's own template supervoxels. Every prediction is made once and
cached in ``--cache`` (keyed by the bundle's model sha256 and the subject), so reruns skip the network.

The cohort's slab subjects are all test subjects, so slabs are *simulated* from training subjects
(``--slabs N``): the subject's original cohort scan is cut to a ``--slab-mm`` (40 mm) cranio-caudal slab of
the upper abdomen -- centred between the kidneys/pancreas and the spleen/liver centroids, at a seeded position,
the cohort's own rule -- and preprocessed exactly as the ``preprocess`` stage does
(:func:`slicreg.geometry.preprocess_volume`). Slab pairs are reported separately.

Per pair the keypoints, the features and the centre-matching initialisation are computed once; then a
coordinate-wise sweep runs around the registration defaults (``slicreg.flow.DEFAULTS`` updated by
``slicreg.registration.FLOW_DEFAULTS``, i.e. what the ``register`` stage and ``slicreg register`` use):

1. ``adam``: one knob at a time (k, alpha, lr, iterations, patience, init, keypoints), dense field at its
   defaults; plus the plain ``slicreg.flow.DEFAULTS`` (zero init, no early stop) for reference;
2. ``joint``: the two knobs that gained most, jointly, over their two best values each;
3. ``dense``: on the keypoint displacements of the best Adam setting, the TPS kernel ``r`` (3-D) and the
   reference's ``r2logr``, several ``lam`` each;
4. ``final``: the registration defaults, the best setting and the best setting with the other kernel, scored
   on the full grid exactly as the ``evaluate`` stage scores a pair.

Scores (``slicreg.metrics``): Dice over the 13 organs, Learn2Reg definition (the template labels warped by
``map_coordinates(order=0)`` against the subject's labels; NaN-mean over organs), % of voxels with det J <= 0
(Learn2Reg's 2-voxel border crop), and the field error in mm against the cohort's true field inside the body
(``preprocessing.cohort.true_field`` from the subjects' ``transforms/<id>.npz``: exact, no file of test pairs is
read). During the sweep (phases 1-3) Dice and folding are computed on every ``--eval-stride``-th voxel per axis
(the same definitions at a subset of voxels: the determinant at a sampled voxel is the full grid's value there);
``final`` uses every voxel. The field error always uses the ``--eval-stride`` subgrid. Every pair also gets a
Dice inside the fixed scan's field of view (``dice_fov``; the preprocessing's padding, from the crop record, left
out): the evaluate-stage Dice also counts the template's organs warped into the padding beyond a short scan or a
slab, where the fixed scan has no labels, so even the true field scores well below 1 there.

The objective is the mean Dice over the full-FOV pairs (``--objective``), among settings whose mean folding is at
most ``--max-folding`` percent (0.1) and whose slab Dice inside the field of view is at most ``--slab-tolerance``
(0.01) below the baseline's: a setting that gains on full scans but loses the slabs is not a default. Outputs:
``<out>.json`` and ``<out>.md`` (machine, command, bundle sha, subjects, every setting's scores per pair; a pair
is "better" / "worse" than the baseline when its Dice differs by more than 0.002).

Cost (one thread): per setting and pair ~1 s of CPU in the sweep (Adam ~0.3 s, TPS ~0.4 s for kernel r and
~1.1-1.7 s for r2logr, scoring ~0.3 s) and ~1.6 s in the final comparison; per pair once ~3 s for the network
and ~2 s for the true field (both cached), and ~1-2 s for the features in each of phases 1 and 2. With the
default value lists (~19 Adam settings, 11 dense settings, 3 final) the 20 training subjects and 4 slabs take
~15 min of CPU (24 min wall on a lightly shared 2-core machine; ~10x longer when a training run holds the cores).

Usage (from the repository root; the machine is shared, so nice it)::

    nice -n 19 env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tune_flow.py \\
        --weights weights/slicreg-cohort-v1 --slabs 4 --slab-ids cohort_0001 cohort_0010 cohort_0019 \\
        cohort_0020 --threads 1

It refuses test subjects (``--ids`` naming one exits with an error) and the template.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Values tried per Adam knob in the coordinate sweep (the baseline's own value is always included).
#: Kept small on purpose (the machine is shared): extend with ``--values knob=v1,v2,...``.
KNOB_VALUES: dict[str, list[Any]] = {
    "k": [3, 5, 8, 10, 16],
    "alpha": [6.5e-6, 2e-5, 6.5e-5, 2e-4, 6.5e-4],
    "lr": [0.5, 1.0, 2.5],
    "iterations": [50, 100, 200],
    "patience": [0, 10],
    "init": ["zero", "centres"],
    "keypoints": ["centres", "random"],
}
#: TPS regularisation per kernel for the dense-field sweep (fine voxels for "r"; the kernel's units for "r2logr").
LAM_VALUES: dict[str, list[float]] = {"r": [0.0, 3.0, 10.0, 30.0, 100.0, 300.0],
                                      "r2logr": [100.0, 300.0, 1000.0, 3000.0, 10000.0]}
ADAM_KNOBS = ("keypoints", "init", "k", "alpha", "lr", "iterations", "patience", "tol")
DENSE_KNOBS = ("kernel", "lam")
KNOB_TYPES = {"k": int, "alpha": float, "lr": float, "iterations": int, "patience": int, "tol": float,
              "init": str, "keypoints": str, "lam": float, "kernel": str}
WIN_MARGIN = 0.002  # a pair counts as better / worse than the baseline when its Dice differs by more than this
CROP = 2  # Learn2Reg's border crop for the Jacobian statistics (slicreg.metrics.LEARN2REG_CROP)


# ----------------------------------------------------------------------------------------------- configs
def registration_defaults() -> dict[str, Any]:
    """The knobs the ``register`` stage uses: ``slicreg.flow.DEFAULTS`` + ``supervoxel_flow``'s keyword defaults,
    updated by ``slicreg.registration.FLOW_DEFAULTS``."""
    import inspect

    from slicreg.flow import DEFAULTS, supervoxel_flow
    from slicreg.registration import FLOW_DEFAULTS

    sig = {n: p.default for n, p in inspect.signature(supervoxel_flow).parameters.items()
           if p.default is not inspect.Parameter.empty}
    base = {knob: sig.get(knob, DEFAULTS.get(knob)) for knob in ADAM_KNOBS + DENSE_KNOBS}
    base.update({k: v for k, v in FLOW_DEFAULTS.items() if k in base})
    return normalise(base)


def flow_defaults() -> dict[str, Any]:
    """The plain ``slicreg.flow`` defaults (zero init, no early stop: the reference's procedure)."""
    import inspect

    from slicreg.flow import DEFAULTS, supervoxel_flow

    sig = {n: p.default for n, p in inspect.signature(supervoxel_flow).parameters.items()
           if p.default is not inspect.Parameter.empty}
    return normalise({knob: sig.get(knob, DEFAULTS.get(knob)) for knob in ADAM_KNOBS + DENSE_KNOBS})


def normalise(cfg: dict[str, Any]) -> dict[str, Any]:
    """Cast every knob to its type (so that 5 and 5.0 name the same setting)."""
    return {k: KNOB_TYPES[k](cfg[k]) for k in ADAM_KNOBS + DENSE_KNOBS}


def adam_key(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={cfg[k]!r}" for k in ADAM_KNOBS)


def config_key(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={cfg[k]!r}" for k in ADAM_KNOBS + DENSE_KNOBS)


def describe(cfg: dict[str, Any], base: dict[str, Any]) -> str:
    """The knobs where ``cfg`` differs from ``base`` (``"baseline"`` if none)."""
    diff = [f"{k}={fmt_value(cfg[k])}" for k in ADAM_KNOBS + DENSE_KNOBS if cfg[k] != base[k]]
    return ", ".join(diff) or "baseline"


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def parse_values(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--values knob=v1,v2`` -> ``{knob: [v1, v2]}`` (typed); ``lam_r`` / ``lam_r2logr`` set the lam lists."""
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--values {item!r}: expected knob=v1,v2,...")
        knob, vals = item.split("=", 1)
        knob = knob.strip()
        if knob in ("lam_r", "lam_r2logr"):
            cast: Any = float
        elif knob in KNOB_VALUES:
            cast = KNOB_TYPES[knob]
        else:
            raise SystemExit(f"--values {item!r}: unknown knob {knob!r}; known: {sorted(KNOB_VALUES)} + lam_r, "
                             f"lam_r2logr")
        out[knob] = [cast(v) for v in vals.split(",") if v.strip() != ""]
    return out


# ----------------------------------------------------------------------------------------- metric helpers
def identity_subgrid(shape: Sequence[int], stride: int) -> np.ndarray:
    """``(3, ceil(X/s), ceil(Y/s), ceil(Z/s))`` float64 fine-grid coordinates of every ``stride``-th voxel."""
    axes = [np.arange(0, int(n), int(stride), dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def warp_labels_subgrid(moving: np.ndarray, disp_vox: np.ndarray, stride: int,
                        identity: np.ndarray | None = None) -> np.ndarray:
    """Learn2Reg's label warp (``map_coordinates(order=0, mode="constant")``) at every ``stride``-th voxel.

    Equals ``slicreg.metrics.warp_labels_learn2reg(moving, disp_vox)[::s, ::s, ::s]`` at an eighth of the cost
    for ``s = 2``.

    Args:
        moving: ``(X', Y', Z')`` integer labels.
        disp_vox: ``(3, X, Y, Z)`` field in voxels, fixed -> moving.
        stride: sampling step per axis (1 = every voxel).
        identity: :func:`identity_subgrid` of the field's grid and ``stride`` (computed when None).
    """
    from scipy.ndimage import map_coordinates

    s = int(stride)
    ident = identity_subgrid(disp_vox.shape[1:], s) if identity is None else identity
    coords = ident + disp_vox[:, ::s, ::s, ::s]
    return map_coordinates(moving, coords, order=0, mode="constant", cval=0)


def folding_subgrid(disp_vox: np.ndarray, stride: int, *, crop: int = CROP) -> dict[str, float]:
    """% of voxels with ``det(I + grad u) <= 0`` and the smallest determinant, at every ``stride``-th voxel of
    the interior (``crop`` voxels removed at each border, as ``slicreg.metrics.jacobian_stats``).

    The derivatives are the central differences ``(u[i+1] - u[i-1]) / 2`` of the full grid at the sampled voxels,
    so each sampled determinant equals ``slicreg.metrics.jacobian_determinant`` there; ``stride=1`` gives exactly
    ``jacobian_stats(disp_vox)["folding_percent"]``.
    """
    s, c = int(stride), int(crop)
    shape = disp_vox.shape[1:]
    if min(shape) <= 2 * c + 1:
        raise ValueError(f"folding_subgrid: grid {shape} too small for a {c}-voxel crop")
    centre = [slice(c, n - c, s) for n in shape]

    def along(axis: int, offset: int) -> tuple[slice, ...]:
        idx = list(centre)
        n = shape[axis]
        idx[axis] = slice(c + offset, n - c + offset, s)
        return tuple(idx)

    jac = [[None] * 3 for _ in range(3)]
    for comp in range(3):
        u = disp_vox[comp]
        for axis in range(3):
            d = (u[along(axis, 1)].astype(np.float64) - u[along(axis, -1)]) / 2.0
            if comp == axis:
                d += 1.0
            jac[comp][axis] = d
    det = (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
           - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
           + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    return {"folding_percent": 100.0 * float(np.count_nonzero(det <= 0)) / det.size, "det_min": float(det.min())}


def true_field_subgrid(t_fixed: Any, fixed_affine: np.ndarray, fixed_shape: Sequence[int], t_moving: Any,
                       moving_affine: np.ndarray, stride: int) -> np.ndarray:
    """The true field (fine voxels, fixed -> moving) at every ``stride``-th voxel of the fixed grid.

    ``preprocessing.cohort.true_field`` on the subgrid (affine ``M_f diag(s)``) returns ``q - p_sub`` with ``q``
    the moving voxel of fixed voxel ``s p_sub``; the displacement there is ``q - s p_sub``."""
    from preprocessing.cohort import true_field

    s = int(stride)
    sub_affine = np.asarray(fixed_affine, dtype=np.float64) @ np.diag([s, s, s, 1.0])
    sub_shape = tuple(len(range(0, int(n), s)) for n in fixed_shape)
    out = true_field(t_fixed, sub_affine, sub_shape, t_moving, moving_affine, quantum=None)
    return (out - (s - 1) * identity_subgrid(sub_shape, 1)).astype(np.float32)


def mean_dice(per_label: np.ndarray) -> float:
    from slicreg.metrics import mean_learn2reg

    return mean_learn2reg(per_label)


# ------------------------------------------------------------------------------------------- the pairs
@dataclass
class PairData:
    """One training pair: subject (fixed) <- template (moving)."""

    pid: str  # subject id, "<id>-slab" for a simulated slab
    subject: str
    kind: str  # "full" or "slab"
    val: bool  # held out from the network's training (validation subject)
    fixed_sv: np.ndarray  # (16, 96, 80, 128) uint8, predicted
    labels: np.ndarray  # (192, 160, 256) uint8, fixed labels
    affine: np.ndarray
    fov: np.ndarray | None  # fixed field of view (slabs), full grid bool
    truth: np.ndarray | None  # true field at the eval subgrid (3, ...) fine voxels
    body: np.ndarray | None  # body mask at the eval subgrid
    network_s: float | None = None
    keypoints: dict[str, Any] = field(default_factory=dict)  # mode -> (points_sv torch, init torch)


def add_pair_arguments(ap: argparse.ArgumentParser, *, dataset: str, weights: str, cache: str) -> None:
    """The training-pair arguments of the benchmarks built on :class:`Tuner` (bench_refine.py,
    bench_init_levers.py): dataset, weights, cache, which training subjects, simulated slabs, evaluation stride."""
    ap.add_argument("--dataset", default=dataset, help="preprocessed cohort dataset")
    ap.add_argument("--weights", default=weights, help="weights bundle folder")
    ap.add_argument("--cache", default=cache, help="tune_flow's cache of predictions, simulated slabs and true fields")
    ap.add_argument("--subjects", type=int, default=None, help="first N training subjects (default: all)")
    ap.add_argument("--ids", nargs="*", default=None, help="explicit training subject ids (test ids are refused)")
    ap.add_argument("--slabs", type=int, default=0, help="slabs simulated from the first N subjects (default 0)")
    ap.add_argument("--slab-mm", type=float, default=40.0, help="cranio-caudal extent of a simulated slab (mm)")
    ap.add_argument("--slab-seed", type=int, default=0, help="seed of the slab positions")
    ap.add_argument("--eval-stride", type=int, default=2, help="field error on every s-th voxel")


def add_run_arguments(ap: argparse.ArgumentParser, *, threads: int, out: str) -> None:
    """The run arguments shared by the benchmarks built on :class:`Tuner`: seed, device, torch threads (0: torch's
    default) and the output stem."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=threads,
                    help=f"torch threads (0: torch's default; default {threads})")
    ap.add_argument("--out", default=out, help="output stem (.json, .md)")


def prepared_tuner(args: argparse.Namespace) -> Tuner:
    """A :class:`Tuner` for the arguments of :func:`add_pair_arguments` and :func:`add_run_arguments`, with the
    torch threads set and the chosen training subjects (and their simulated slabs) prepared."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tuner = Tuner(argparse.Namespace(dataset=args.dataset, weights=args.weights, device=args.device,
                                     cache=args.cache, eval_stride=args.eval_stride, seed=args.seed,
                                     slab_seed=args.slab_seed, slab_mm=args.slab_mm))
    subjects = select_subjects(tuner.dataset, args.ids, args.subjects)
    tuner.prepare(subjects, subjects[: max(args.slabs, 0)])
    return tuner


def score_columns(scores: dict[str, Any]) -> dict[str, Any]:
    """The columns of one field's :meth:`Tuner._score_fields` that the benchmarks' rows keep."""
    return {k: scores.get(k) for k in ("dice", "dice_fov", "field_error_mm", "folding_percent", "det_min", "sdlogj")}


def write_outputs(out: str | Path, doc: dict[str, Any], text: str, minutes: float) -> None:
    """A benchmark's ``<out>.json`` (``doc``) and ``<out>.md`` (``text``), written atomically, and the text
    printed."""
    from slicreg.io import atomic_write_json, atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), doc)
    atomic_write_text(out.with_suffix(".md"), text)
    print("\n" + text, flush=True)
    print(f"wrote {out.with_suffix('.md')} and .json ({minutes:.1f} min)", flush=True)


def select_subjects(dataset: Any, ids: Sequence[str] | None, n: int | None) -> list[str]:
    """The training subjects to tune on; exits on a test subject, the template or a non-training id."""
    test = set(dataset.test) | {sid for sid, sub in dataset.subjects.items() if sub.role == "test"}
    training = [sid for sid in sorted(dataset.training)
                if sid not in test and sid != dataset.template and dataset.subject(sid).role == "train"]
    if ids:
        bad = [sid for sid in ids if sid in test]
        if bad:
            raise SystemExit(f"refusing test subject(s) {bad}: the flow is tuned on training pairs only")
        other = [sid for sid in ids if sid not in training]
        if other:
            raise SystemExit(f"refusing {other}: not training subjects of {dataset.root} (the template and unused "
                             f"subjects are not tuning pairs); training: {', '.join(training)}")
        chosen = list(dict.fromkeys(ids))
    else:
        chosen = training
    if n is not None:
        chosen = chosen[: int(n)]
    if not chosen:
        raise SystemExit(f"no training subjects to tune on in {dataset.root}")
    return chosen


def slab_window(labels: np.ndarray, *, n_slices: int, position: float) -> int:
    """First slice (array axis 2) of a slab of ``n_slices`` slices of the upper abdomen (the cohort's rule):
    centred at ``lo + position (hi - lo)``, ``lo`` the lowest of the kidney / pancreas centroids, ``hi`` the
    highest of the spleen / liver centroids (slice index; RAS: larger = cranial)."""
    nz = labels.shape[2]
    z = np.arange(nz, dtype=np.float64)
    per_slice = {lab: np.count_nonzero(labels == lab, axis=(0, 1)) for lab in (1, 2, 3, 6, 11)}
    cent = {lab: float((c * z).sum() / c.sum()) for lab, c in per_slice.items() if c.sum() > 0}
    lower = [cent[o] for o in (2, 3, 11) if o in cent]
    upper = [cent[o] for o in (1, 6) if o in cent]
    lo = min(lower) if lower else 0.4 * nz
    hi = max(upper) if upper else 0.8 * nz
    lo, hi = min(lo, hi), max(lo, hi)
    centre = lo + float(position) * (hi - lo)
    start = int(math.floor(centre - (n_slices - 1) / 2.0 + 0.5))  # half up
    return int(min(max(start, 0), max(nz - n_slices, 0)))


def make_slab(subject: Any, *, slab_mm: float, position: float) -> dict[str, Any]:
    """A thin slab cut from a training subject's original cohort scan, preprocessed as the ``preprocess`` stage.

    Returns ``image`` (int16 HU), ``labels`` (uint8) on the 192 x 160 x 256 grid, ``affine``, ``padded_vox``,
    ``start``, ``n_slices``."""
    from slicreg.conventions import Volume
    from slicreg.geometry import preprocess_volume
    from slicreg.io import load_image, load_labels

    original = subject.extra.get("original") or {}
    if not original.get("image") or not original.get("labels"):
        raise SystemExit(f"{subject.id}: the dataset does not name its original cohort scan (subject key "
                         f"'original'); cannot simulate a slab")
    image, labels = load_image(original["image"]), load_labels(original["labels"])
    aff = np.asarray(image.affine, dtype=np.float64)
    if not (abs(aff[2, 2]) > 0 and np.allclose(aff[:2, 2], 0) and np.allclose(aff[2, :2], 0)):
        raise SystemExit(f"{original['image']}: expected an axis-aligned scan with array axis 2 head-feet")
    spacing = abs(aff[2, 2])
    n_slices = max(2, int(math.floor(float(slab_mm) / spacing + 1e-6)) + 1)
    lab = np.asarray(labels.array)
    start = slab_window(lab if aff[2, 2] > 0 else lab[:, :, ::-1], n_slices=n_slices, position=position)
    if aff[2, 2] < 0:
        start = lab.shape[2] - n_slices - start
    shift = np.eye(4)
    shift[2, 3] = start
    cut_aff = aff @ shift
    img_v = Volume(np.asarray(image.array)[:, :, start:start + n_slices], cut_aff)
    lab_v = Volume(lab[:, :, start:start + n_slices], cut_aff)
    res = preprocess_volume(img_v, lab_v, name=f"{subject.id} slab")
    return {"image": np.asarray(res.image.array, dtype=np.int16), "labels": np.asarray(res.labels.array, np.uint8),
            "affine": np.asarray(res.record.affine, dtype=np.float64),
            "padded_vox": np.asarray(res.record.padded_vox, dtype=np.int64), "start": start, "n_slices": n_slices}


def fov_from_padding(shape: Sequence[int], padded_vox: np.ndarray) -> np.ndarray:
    """Boolean field-of-view mask: False in the preprocessing's padding (``padded_vox`` = (before, after)/axis)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    sl = tuple(slice(int(b), int(n) - int(a)) for n, (b, a) in zip(shape, padded_vox))
    mask[sl] = True
    return mask


def _save_npz(path: Path, **arrays: Any) -> None:
    from slicreg.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ tuner
class Tuner:
    """Runs settings on the pairs and keeps every score (per setting, per pair)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from preprocessing.datasets import load_dataset
        from slicreg.api import load_weights
        from slicreg.io import load_image, load_labels, sha256_file

        self.args = args
        self.torch = torch
        self.t0 = time.perf_counter()
        self.dataset = load_dataset(Path(args.dataset))
        ds = self.dataset
        if not ds.template:
            raise SystemExit(f"{ds.root}: the dataset has no template")
        self.bundle = load_weights(Path(args.weights), device=args.device)
        card = getattr(self.bundle, "card", {}) or {}
        model_sha = (card.get("files", {}).get("model.pt", {}) or {}).get("sha256")
        self.bundle_sha = model_sha or sha256_file(Path(self.bundle.path) / "model.pt")
        self.val_ids = list(card.get("training", {}).get("val_ids", []) or [])
        self.train_ids = list(card.get("training", {}).get("train_ids", []) or [])
        self.template_sv = np.ascontiguousarray(np.asarray(self.bundle.template_supervoxels.array, dtype=np.uint8))
        tsub = ds.subject(ds.template)
        template_image = load_image(ds.path(tsub.image))
        self.template_affine = np.asarray(template_image.affine, dtype=np.float64)
        self.shape = tuple(int(s) for s in template_image.shape)
        if tsub.labels is None:
            raise SystemExit(f"{ds.root}: the template has no labels; Dice needs them")
        self.template_labels = np.asarray(load_labels(ds.path(tsub.labels)).array)
        self.notes: list[str] = []
        expected = card.get("template", {}).get("image_sha256")
        if expected and sha256_file(ds.path(tsub.image)) != expected:
            self.notes.append("warning: the dataset's template image is not the bundle's template (sha256 differs)")
            print(self.notes[-1], flush=True)
        want = tuple(s // 2 for s in self.shape)
        if tuple(self.template_sv.shape[1:]) != want:
            raise SystemExit(f"the bundle's template supervoxels are on {self.template_sv.shape[1:]}, the dataset's "
                             f"template needs {want}")
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.t_template = self._transform(ds.template)
        self.identity = identity_subgrid(self.shape, args.eval_stride)
        self.pairs: list[PairData] = []
        self.adam: dict[tuple[str, str], tuple[Any, int, float]] = {}  # (adam key, pid) -> (disp, iters, cpu s)
        self.scores: dict[str, dict[str, dict[str, Any]]] = {}  # config key -> pid -> scores
        self.configs: dict[str, dict[str, Any]] = {}
        self.labels_of: dict[str, list[str]] = {}  # config key -> names it was evaluated under
        self.phase_time: dict[str, dict[str, float]] = {}
        self.initial: dict[str, dict[str, Any]] = {}
        self.truth_scores: dict[str, dict[str, Any]] = {}
        self.moving_features = None
        self.base_key: str | None = None

    # ------------------------------------------------------------------------------------------- set-up
    def _transform(self, sid: str) -> Any:
        from pipelines.stages.cohort import load_transform

        path = self.dataset.subject(sid).files.get("transform")
        if path is None:
            return None
        try:
            return load_transform(self.dataset.path(path))[0]
        except Exception as exc:  # a missing transform only costs the field error
            print(f"note: no cohort transform for {sid} ({exc}); no field error", flush=True)
            return None

    def slab_name(self, sid: str) -> str:
        """The cache name of the slab simulated from subject ``sid`` (its ``.npz`` and its predictions)."""
        return f"{sid}-slab{fmt_value(float(self.args.slab_mm))}mm-seed{self.args.slab_seed}"

    def crop_fov(self, sid: str) -> np.ndarray | None:
        """The subject's field of view on the preprocessed grid from its crop record (``None`` without one), as
        the ``register`` stage reads it."""
        from slicreg.io import read_json

        crop = self.dataset.subject(sid).files.get("crop")
        if crop is None:
            return None
        return fov_from_padding(self.shape, np.asarray(read_json(self.dataset.path(crop))["padded_vox"]))

    def fixed_image(self, pair: PairData) -> np.ndarray:
        """The fixed scan of a pair in HU (a simulated slab: from the cache)."""
        from slicreg.io import load_image

        if pair.pid != pair.subject:
            return _load_npz(self.cache / f"{self.slab_name(pair.subject)}.npz")["image"].astype(np.float32)
        return np.asarray(load_image(self.dataset.path(self.dataset.subject(pair.subject).image)).array,
                          dtype=np.float32)

    def _predict(self, name: str, image_hu: np.ndarray) -> tuple[np.ndarray, float | None, bool]:
        """The predicted maps (cached), the network's wall seconds when made, and whether they came from the cache."""
        from slicreg.registration import predict_supervoxels

        path = self.cache / f"pred_{self.bundle_sha[:16]}_{name}.npz"
        hit = _load_npz(path)
        if hit is not None and "labels" in hit and hit["labels"].shape == self.template_sv.shape:
            return hit["labels"], float(hit["seconds"]) if "seconds" in hit else None, True
        t = time.perf_counter()
        labels = predict_supervoxels(self.bundle, np.asarray(image_hu, dtype=np.float32), device=self.args.device)
        sec = time.perf_counter() - t
        _save_npz(path, labels=np.asarray(labels, dtype=np.uint8), seconds=np.float64(sec))
        return np.asarray(labels, dtype=np.uint8), sec, False

    def _truth(self, name: str, sid: str, affine: np.ndarray) -> np.ndarray | None:
        t_fixed = self._transform(sid)
        if t_fixed is None or self.t_template is None:
            return None
        s = self.args.eval_stride
        path = self.cache / f"truth_{name}_s{s}_{_affine_tag(affine)}_{_affine_tag(self.template_affine)}.npz"
        hit = _load_npz(path)
        if hit is not None:
            return hit["disp"]
        disp = true_field_subgrid(t_fixed, affine, self.shape, self.t_template, self.template_affine, s)
        _save_npz(path, disp=disp)
        return disp

    def prepare(self, subjects: list[str], slab_subjects: list[str]) -> None:
        from slicreg.io import load_image, load_labels
        from slicreg.supervoxels import body_mask

        args, ds, s = self.args, self.dataset, self.args.eval_stride
        todo = [(sid, "full") for sid in subjects] + [(sid, "slab") for sid in slab_subjects]
        rng = np.random.default_rng(args.slab_seed)
        positions = {sid: float(rng.uniform(0.0, 1.0)) for sid in slab_subjects}
        t0, c0 = time.perf_counter(), time.process_time()
        for n, (sid, kind) in enumerate(todo, 1):
            sub = ds.subject(sid)
            real_slab = "slab" in sub.tags
            if kind == "full":
                image = load_image(ds.path(sub.image))
                if image.shape != self.shape:
                    raise SystemExit(f"{sid}: image grid {image.shape}, expected the preprocessed {self.shape}")
                labels = np.asarray(load_labels(ds.path(sub.labels)).array) if sub.labels else None
                if labels is None:
                    print(f"skip {sid}: no labels", flush=True)
                    continue
                affine = np.asarray(image.affine, dtype=np.float64)
                hu = np.asarray(image.array, dtype=np.float32)
                fov = self.crop_fov(sid)  # the scan's own field of view inside the preprocessed grid
                pid, name = sid, sid
                pkind = "slab" if real_slab else "full"
            else:
                name = self.slab_name(sid)
                path = self.cache / f"{name}.npz"
                slab = _load_npz(path)
                if slab is None:
                    made = make_slab(sub, slab_mm=args.slab_mm, position=positions[sid])
                    _save_npz(path, **{k: np.asarray(v) for k, v in made.items()})
                    slab = _load_npz(path)
                hu = slab["image"].astype(np.float32)
                labels = slab["labels"]
                affine = slab["affine"]
                fov = fov_from_padding(self.shape, slab["padded_vox"])
                pid, pkind = f"{sid}-slab", "slab"
            fixed_sv, sec, cached = self._predict(name, hu)
            truth = self._truth(name, sid, affine)
            body = body_mask(hu)[::s, ::s, ::s] if truth is not None else None
            del hu
            pair = PairData(pid=pid, subject=sid, kind=pkind, val=sid in self.val_ids, fixed_sv=fixed_sv,
                            labels=np.asarray(labels, dtype=np.uint8), affine=affine, fov=fov, truth=truth,
                            body=body, network_s=sec)
            self.pairs.append(pair)
            self.initial[pid] = self._score_fields(pair, None)
            if truth is not None:
                self.truth_scores[pid] = self._score_fields(pair, truth, subgrid_field=True)
            tr = self.truth_scores.get(pid, {}).get("dice")
            tr_fov = self.truth_scores.get(pid, {}).get("dice_fov")
            made = "?" if sec is None else f"{sec:.1f} s"
            print(f"[prepare] {n}/{len(todo)} {pid} ({pkind}{', val' if pair.val else ''}): network "
                  f"{f'cached (took {made})' if cached else made}; initial Dice {self.initial[pid]['dice']:.3f}"
                  f"{'' if tr is None else f', true field Dice {tr:.3f}'}"
                  f"{'' if tr_fov is None else f' ({tr_fov:.3f} in FOV)'}  [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
        self.phase_time["prepare"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    # ------------------------------------------------------------------------------------------- scoring
    def _score_fields(self, pair: PairData, disp: np.ndarray | None, *, subgrid_field: bool = False,
                      full: bool = False) -> dict[str, Any]:
        """Scores of one field (None: the unregistered pair; ``subgrid_field``: ``disp`` is already on the eval
        subgrid, i.e. the true field). ``full``: Dice and folding on every voxel."""
        from slicreg.metrics import dice, field_error_mm, jacobian_stats, warp_labels_learn2reg

        s = 1 if full else self.args.eval_stride
        mov = self.template_labels
        if disp is None:
            warped = mov[::s, ::s, ::s]
        elif subgrid_field:
            from scipy.ndimage import map_coordinates

            warped = map_coordinates(mov, self.identity + disp, order=0, mode="constant", cval=0)
        elif full:
            warped = warp_labels_learn2reg(mov, disp)
        else:
            warped = warp_labels_subgrid(mov, disp, s, self.identity)
        fixed = pair.labels[::s, ::s, ::s]
        per = dice(fixed, warped, absent="learn2reg", moving=mov)
        out: dict[str, Any] = {"dice": mean_dice(per), "per_label": [None if np.isnan(v) else float(v) for v in per]}
        if pair.fov is not None:
            inside = pair.fov[::s, ::s, ::s]
            per_fov = dice(fixed, warped, absent="learn2reg", moving=mov, mask=inside)
            out["dice_fov"] = mean_dice(per_fov)
        if disp is not None and not subgrid_field:
            if full:
                jac = jacobian_stats(disp)
                out["folding_percent"], out["det_min"] = jac["folding_percent"], jac["det_min"]
                out["sdlogj"] = jac["sdlogj_learn2reg"]
            else:
                out.update(folding_subgrid(disp, s))
        if pair.truth is not None:
            es = self.args.eval_stride
            est = np.zeros_like(pair.truth) if disp is None else (disp if subgrid_field else disp[:, ::es, ::es, ::es])
            out["field_error_mm"] = field_error_mm(est, pair.truth, affine=pair.affine, mask=pair.body)["mean_mm"]
        return out

    # ----------------------------------------------------------------------------------------- running
    def _points(self, pair: PairData, mode: str) -> tuple[Any, Any]:
        """Keypoints (sv voxels) and their centre-matching initialisation, once per pair and mode."""
        from slicreg.flow import DEFAULTS, centre_matching_init, foreground_keypoints, supervoxel_centres

        if mode not in pair.keypoints:
            torch = self.torch
            fix = torch.from_numpy(pair.fixed_sv)
            if mode == "centres":
                pts, _ = supervoxel_centres(fix, device=self.args.device)
            elif mode == "random":
                pts = foreground_keypoints(fix, n=DEFAULTS["n_random"], seed=self.args.seed,
                                           stride=DEFAULTS["random_stride"], device=self.args.device)
            else:
                raise SystemExit(f"unknown keypoints mode {mode!r}")
            init = centre_matching_init(fix, torch.from_numpy(self.template_sv), pts, device=self.args.device)
            pair.keypoints[mode] = (pts, init)
        return pair.keypoints[mode]

    def _features(self, sv: np.ndarray) -> Any:
        from slicreg.flow import supervoxel_features

        return supervoxel_features(self.torch.from_numpy(sv), seed=self.args.seed, device=self.args.device)

    def _run_adam(self, pair: PairData, cfg: dict[str, Any], f_feat: Any) -> tuple[Any, int, float]:
        from slicreg.flow import DEFAULTS, adam_keypoint_flow

        key = (adam_key(cfg), pair.pid)
        if key not in self.adam:
            pts, init = self._points(pair, cfg["keypoints"])
            stride = int(np.prod([st for _, st in DEFAULTS["pools"]]))
            c = time.process_time()
            disp, info = adam_keypoint_flow(f_feat, self.moving_features, pts, feature_stride=stride, k=cfg["k"],
                                            alpha=cfg["alpha"], lr=cfg["lr"], iterations=cfg["iterations"],
                                            init_disp=init if cfg["init"] == "centres" else None,
                                            patience=cfg["patience"], tol=cfg["tol"], device=self.args.device)
            self.adam[key] = (disp, int(info["iterations_run"]), time.process_time() - c)
        return self.adam[key]

    def _dense(self, pair: PairData, cfg: dict[str, Any]) -> tuple[np.ndarray, float]:
        from slicreg.flow import DEFAULTS, coarse_to_fine_vox, tps_dense_field

        disp_sv = self.adam[(adam_key(cfg), pair.pid)][0]
        pts = pair.keypoints[cfg["keypoints"]][0]
        c = time.process_time()
        fp, fd = coarse_to_fine_vox(pts, disp_sv, factor=DEFAULTS["factor"])
        field_ = tps_dense_field(fp, fd, self.shape, kernel=cfg["kernel"], lam=cfg["lam"], step=DEFAULTS["step"],
                                 device=self.args.device)
        return field_.detach().cpu().numpy(), time.process_time() - c

    def register(self, cfg: dict[str, Any], name: str) -> str:
        key = config_key(cfg)
        self.configs.setdefault(key, cfg)
        names = self.labels_of.setdefault(key, [])
        if name not in names:
            names.append(name)
        return key

    def run(self, phase: str, configs: list[tuple[str, dict[str, Any]]], *, full: bool = False) -> None:
        """Score ``configs`` (name, setting) on every pair, pair by pair (features once per pair)."""
        keys = [self.register(cfg, name) for name, cfg in configs]
        result_key = "final" if full else "sweep"
        todo = [(k, self.configs[k]) for k in dict.fromkeys(keys)
                if any(p.pid not in self.scores.get(k, {}).get(result_key, {}) for p in self.pairs)]
        if not todo:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        print(f"[{phase}] {len(todo)} setting(s) x {len(self.pairs)} pairs", flush=True)
        for n, pair in enumerate(self.pairs, 1):
            tp = time.perf_counter()
            need_adam = [cfg for _, cfg in todo if (adam_key(cfg), pair.pid) not in self.adam]
            f_feat = None
            if need_adam:
                if self.moving_features is None:
                    self.moving_features = self._features(self.template_sv)
                f_feat = self._features(pair.fixed_sv)
            line = []
            for key, cfg in todo:
                store = self.scores.setdefault(key, {}).setdefault(result_key, {})
                if pair.pid in store:
                    continue
                _, iters, adam_cpu = self._run_adam(pair, cfg, f_feat)
                field_, dense_cpu = self._dense(pair, cfg)
                sc = self._score_fields(pair, field_, full=full)
                sc.update({"adam_iterations": iters, "adam_cpu_s": round(adam_cpu, 3),
                           "dense_cpu_s": round(dense_cpu, 3)})
                store[pair.pid] = sc
                line.append(sc["dice"])
                del field_
            del f_feat
            print(f"[{phase}] pair {n}/{len(self.pairs)} {pair.pid}: {len(line)} setting(s), Dice "
                  f"{min(line):.3f}..{max(line):.3f} [{time.perf_counter() - tp:.0f} s; phase "
                  f"{time.perf_counter() - t0:.0f} s]", flush=True)
        pt = self.phase_time.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
        pt["wall_s"] += time.perf_counter() - t0
        pt["cpu_s"] += time.process_time() - c0

    # --------------------------------------------------------------------------------------- summaries
    def summary(self, key: str, result_key: str = "sweep") -> dict[str, Any]:
        per = self.scores.get(key, {}).get(result_key, {})
        groups = {
            "full": [p for p in self.pairs if p.kind == "full"],
            "slab": [p for p in self.pairs if p.kind == "slab"],
            "val": [p for p in self.pairs if p.val and p.kind == "full"],
        }
        out: dict[str, Any] = {"n_pairs": len(per)}

        def avg(pairs: list[PairData], metric: str) -> float | None:
            vals = [per[p.pid][metric] for p in pairs if p.pid in per and per[p.pid].get(metric) is not None
                    and not (isinstance(per[p.pid][metric], float) and math.isnan(per[p.pid][metric]))]
            return float(np.mean(vals)) if vals else None

        for g, pairs in groups.items():
            out[f"dice_{g}"] = avg(pairs, "dice")
        out["dice_fov_full"] = avg(groups["full"], "dice_fov")
        out["dice_fov_slab"] = avg(groups["slab"], "dice_fov")
        base = self.scores.get(self.base_key, {}).get(result_key, {}) if self.base_key else {}
        for g in ("full", "slab"):
            both = [p.pid for p in groups[g] if p.pid in per and p.pid in base]
            m = WIN_MARGIN
            out[f"wins_{g}"] = (sum(per[q]["dice"] > base[q]["dice"] + m for q in both),
                                sum(per[q]["dice"] < base[q]["dice"] - m for q in both), len(both)) if both else None
        every = self.pairs
        out["folding_mean"] = avg(every, "folding_percent")
        fold = [per[p.pid]["folding_percent"] for p in every if p.pid in per]
        out["folding_max"] = float(max(fold)) if fold else None
        out["folding_full"] = avg(groups["full"], "folding_percent")
        out["field_error_full_mm"] = avg(groups["full"], "field_error_mm")
        out["field_error_slab_mm"] = avg(groups["slab"], "field_error_mm")
        out["adam_iterations"] = avg(every, "adam_iterations")
        out["adam_cpu_s"] = avg(every, "adam_cpu_s")
        out["dense_cpu_s"] = avg(every, "dense_cpu_s")
        return out

    def objective(self, key: str) -> float:
        """Mean Dice over the objective pairs; -inf when the mean folding exceeds --max-folding."""
        s = self.summary(key)
        value = {"full": s["dice_full"], "slab": s["dice_fov_slab"] if s["dice_fov_slab"] is not None
                 else s["dice_slab"], "all": _mean_of(self, key)}[self.args.objective]
        if value is None:
            return -math.inf
        group_fold = s["folding_full"] if self.args.objective == "full" else s["folding_mean"]
        if group_fold is not None and group_fold > self.args.max_folding:
            return -math.inf
        tol = self.args.slab_tolerance
        if tol >= 0 and self.args.objective == "full" and s["dice_fov_slab"] is not None and self.base_key:
            base_slab = self.summary(self.base_key)["dice_fov_slab"]
            if base_slab is not None and s["dice_fov_slab"] < base_slab - tol:
                return -math.inf
        return float(value)

    def best(self, keys: Iterable[str]) -> str:
        keys = list(keys)
        return max(keys, key=lambda k: (self.objective(k), -keys.index(k)))


def _mean_of(tuner: Tuner, key: str) -> float | None:
    per = tuner.scores.get(key, {}).get("sweep", {})
    vals = [v["dice"] for v in per.values() if v.get("dice") is not None and not math.isnan(v["dice"])]
    return float(np.mean(vals)) if vals else None


def _affine_tag(affine: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.round(np.asarray(affine, dtype=np.float64), 4).tobytes()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------ phases
def sweep(tuner: Tuner, base: dict[str, Any], values: dict[str, list[Any]], lams: dict[str, list[float]],
          centre: dict[str, Any] | None = None) -> dict[str, Any]:
    """Phases 1-3. ``base``: the registration defaults (the reference of every comparison); ``centre``: the point
    the one-knob sweep and the joint refinement move around (default ``base``; e.g. an earlier run's best)."""
    centre = base if centre is None else centre
    base_key = tuner.register(base, "baseline (registration defaults)")
    tuner.base_key = base_key
    centre_key = tuner.register(centre, "centre of the sweep")
    flow_def = flow_defaults()
    # phase 1: one Adam knob at a time
    one: list[tuple[str, dict[str, Any]]] = [("baseline (registration defaults)", base)]
    if config_key(flow_def) != base_key:
        one.append(("slicreg.flow.DEFAULTS (zero init, no early stop)", flow_def))
    if centre_key != base_key:
        one.append(("centre of the sweep", centre))
    per_knob: dict[str, list[str]] = {}
    for knob in KNOB_VALUES:
        vals = list(dict.fromkeys([centre[knob]] + [KNOB_TYPES[knob](v) for v in values.get(knob, [])]))
        per_knob[knob] = []
        for v in vals:
            cfg = dict(centre, **{knob: v})
            per_knob[knob].append(config_key(cfg))
            one.append((f"{knob}={fmt_value(v)}", cfg))
    tuner.run("adam", one)
    print_table(tuner, base, "after the one-knob sweep", [k for k in dict.fromkeys(config_key(c) for _, c in one)])

    # phase 2: joint refinement of the two knobs that gained most (over the centre)
    base_score = tuner.objective(centre_key)
    gains = []
    for knob, keys in per_knob.items():
        best_k = tuner.best(keys)
        gains.append((tuner.objective(best_k) - base_score, knob))
    gains.sort(reverse=True)
    joint_knobs = [knob for gain, knob in gains if gain > 0][:2]
    joint: list[tuple[str, dict[str, Any]]] = []
    if len(joint_knobs) == 2:
        a, b = joint_knobs
        top = {}
        for knob in (a, b):
            ranked = sorted(per_knob[knob], key=lambda k: -tuner.objective(k))
            top[knob] = [tuner.configs[k][knob] for k in ranked[:2]]
        for va in top[a]:
            for vb in top[b]:
                cfg = dict(centre, **{a: va, b: vb})
                joint.append((f"{a}={fmt_value(va)}, {b}={fmt_value(vb)}", cfg))
        tuner.run("joint", joint)
    elif len(joint_knobs) == 1:
        print(f"[joint] only {joint_knobs[0]} improved on the baseline: no joint refinement", flush=True)
    else:
        print("[joint] no knob improved on the baseline: no joint refinement", flush=True)
    adam_keys = list(dict.fromkeys([config_key(c) for _, c in one] + [config_key(c) for _, c in joint]))
    best_adam = tuner.best(adam_keys)
    print(f"best Adam setting: {describe(tuner.configs[best_adam], base)} (Dice "
          f"{tuner.objective(best_adam):.4f} vs baseline {tuner.objective(base_key):.4f}, centre {base_score:.4f})",
          flush=True)

    # phase 3: dense field kernel and lam on the best Adam setting's keypoints
    dense: list[tuple[str, dict[str, Any]]] = []
    for kernel, lam_list in lams.items():
        for lam in lam_list:
            cfg = dict(tuner.configs[best_adam], kernel=kernel, lam=float(lam))
            dense.append((f"kernel={kernel}, lam={fmt_value(float(lam))}", cfg))
    tuner.run("dense", dense)
    dense_keys = list(dict.fromkeys([config_key(c) for _, c in dense] + [best_adam]))
    print_table(tuner, base, "dense field on the best Adam setting", dense_keys)
    best = tuner.best(adam_keys + dense_keys)
    best_cfg = tuner.configs[best]
    other_kernel = "r2logr" if best_cfg["kernel"] == "r" else "r"
    same_adam = [k for k in dense_keys if adam_key(tuner.configs[k]) == adam_key(best_cfg)]
    other = [k for k in same_adam if tuner.configs[k]["kernel"] == other_kernel]
    best_other = tuner.best(other) if other else None
    return {"baseline": base_key, "centre": centre_key, "flow_defaults": config_key(flow_def), "per_knob": per_knob,
            "gains": [{"knob": k, "gain": g} for g, k in gains], "joint_knobs": joint_knobs,
            "joint": [config_key(c) for _, c in joint], "best_adam": best_adam, "dense": dense_keys, "best": best,
            "best_other_kernel": best_other}


def print_table(tuner: Tuner, base: dict[str, Any], title: str, keys: list[str]) -> None:
    print(f"\n== {title} (sweep metrics: every {tuner.args.eval_stride}nd voxel) ==", flush=True)
    print(f"{'setting':44s} {'Dice full':>9s} {'in FOV':>7s} {'+/-/n':>7s} {'val':>6s} {'Dice slab':>9s} "
          f"{'in FOV':>7s} {'fold %':>7s} {'err mm':>7s} {'iters':>5s}", flush=True)
    for k in keys:
        s = tuner.summary(k)
        wins = "-" if not s["wins_full"] or k == tuner.base_key else "{}/{}/{}".format(*s["wins_full"])
        print(f"{describe(tuner.configs[k], base)[:44]:44s} {_f(s['dice_full'], 4):>9s} "
              f"{_f(s['dice_fov_full'], 4):>7s} {wins:>7s} {_f(s['dice_val'], 3):>6s} {_f(s['dice_slab'], 4):>9s} "
              f"{_f(s['dice_fov_slab'], 4):>7s} "
              f"{_f(s['folding_mean'], 3):>7s} {_f(s['field_error_full_mm'], 2):>7s} {_f(s['adam_iterations'], 0):>5s}",
              flush=True)
    print("", flush=True)


def _f(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------ report
def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "nice": os.nice(0) if hasattr(os, "nice") else None}
    try:
        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def build_report(tuner: Tuner, base: dict[str, Any], res: dict[str, Any], final_keys: dict[str, str],
                 argv: list[str]) -> dict[str, Any]:
    pairs = tuner.pairs
    configs_out = []
    for key, cfg in tuner.configs.items():
        entry = {"key": key, "names": tuner.labels_of.get(key, []), "config": cfg,
                 "differs_from_baseline": describe(cfg, base), "objective": _clean(tuner.objective(key)),
                 "summary": tuner.summary(key)}
        entry["per_pair"] = {pid: {m: v for m, v in sc.items() if m != "per_label"}
                             for pid, sc in tuner.scores.get(key, {}).get("sweep", {}).items()}
        if tuner.scores.get(key, {}).get("final"):
            entry["final_summary"] = tuner.summary(key, "final")
            entry["final_per_pair"] = tuner.scores[key]["final"]
        configs_out.append(entry)
    doc = {
        "benchmark": "flow tuning on the cohort's training pairs (subject <- template, atlas mode)",
        "command": " ".join(shlex.quote(a) for a in argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(tuner.args),
        "dataset": str(Path(tuner.args.dataset).resolve()),
        "bundle": {"path": str(Path(tuner.bundle.path).resolve()), "model_sha256": tuner.bundle_sha,
                   "train_ids": tuner.train_ids, "val_ids": tuner.val_ids},
        "pairs": [{"id": p.pid, "subject": p.subject, "kind": p.kind, "val": p.val, "network_s": p.network_s,
                   "fixed_fov_voxels": None if p.fov is None else int(p.fov.sum()),
                   "initial": _strip(tuner.initial.get(p.pid)), "true_field": _strip(tuner.truth_scores.get(p.pid))}
                  for p in pairs],
        "settings": {"eval_stride": tuner.args.eval_stride, "objective": tuner.args.objective,
                     "max_folding_percent": tuner.args.max_folding, "slab_tolerance": tuner.args.slab_tolerance,
                     "slab_mm": tuner.args.slab_mm,
                     "slab_seed": tuner.args.slab_seed, "seed": tuner.args.seed},
        "baseline": base,
        "sweep": {k: v for k, v in res.items()},
        "final": final_keys,
        "configs": configs_out,
        "phase_time_s": tuner.phase_time,
        "total_wall_s": time.perf_counter() - tuner.t0,
        "notes": tuner.notes,
    }
    return _clean(doc)


def _strip(sc: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if sc is None else {k: v for k, v in sc.items() if k != "per_label"}


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def render_markdown(doc: dict[str, Any], tuner: Tuner, base: dict[str, Any]) -> str:
    cfgs = {c["key"]: c for c in doc["configs"]}
    res = doc["sweep"]
    pairs = doc["pairs"]
    n_full = sum(p["kind"] == "full" for p in pairs)
    n_slab = sum(p["kind"] == "slab" for p in pairs)
    m = doc["machine"]
    lines = [
        "# Flow tuning on the cohort's training pairs",
        "",
        f"Generated by `benchmarks/tune_flow.py` on {doc['created']}.",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: {m.get('cpu_model', m.get('processor'))}, {m['cpu_count']} cores (shared), torch {m['torch']}, "
        f"{m['torch_threads']} threads, nice {m.get('nice')}",
        f"- bundle: `{doc['bundle']['path']}` (model sha256 `{doc['bundle']['model_sha256'][:16]}`)",
        f"- dataset: `{doc['dataset']}`",
        f"- pairs: {n_full} full-FOV training subjects <- template, {n_slab} slab(s) (simulated "
        f"{doc['settings']['slab_mm']:g} mm slabs of training subjects); network validation subjects (not trained on): "
        f"{', '.join(doc['bundle']['val_ids']) or 'none'}",
        f"- sweep metrics on every {doc['settings']['eval_stride']}nd voxel per axis; objective: mean Dice over "
        f"{doc['settings']['objective']} pairs with mean folding <= {doc['settings']['max_folding_percent']} % and "
        f"slab Dice (in FOV) at most {doc['settings']['slab_tolerance']} below the baseline's ('objective' column: "
        f"empty = not eligible)",
        f"- wall time {doc['total_wall_s'] / 60:.1f} min; phases: " + ", ".join(
            f"{k} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU" for k, v in doc["phase_time_s"].items()),
        "",
        "Baseline = the registration defaults (`slicreg.flow.DEFAULTS` + `slicreg.registration.FLOW_DEFAULTS`): " +
        ", ".join(f"{k}={fmt_value(v)}" for k, v in base.items()) + ".",
        "",
    ]
    final = doc.get("final") or {}
    if final:
        lines += ["## Final comparison (every voxel, as the evaluate stage)", "",
                  "| setting | Dice full-FOV (in FOV) | pairs better / worse / n | Dice val subjects | "
                  "Dice slab (in FOV) | folding % mean / max | SDlogJ | field error mm (full / slab) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, key in final.items():
            c = cfgs[key]
            s = c.get("final_summary") or {}
            sd = [v.get("sdlogj") for v in (c.get("final_per_pair") or {}).values() if v.get("sdlogj") is not None]
            w = s.get("wins_full")
            what = c["differs_from_baseline"]
            wins = "-" if not w or key == final.get("baseline") else "{}/{}/{}".format(*w)
            lines.append(f"| {label if what == 'baseline' else label + ': ' + what} | {_f(s.get('dice_full'), 4)} "
                         f"({_f(s.get('dice_fov_full'), 4)}) | {wins} | {_f(s.get('dice_val'), 4)} | "
                         f"{_f(s.get('dice_slab'), 4)} ({_f(s.get('dice_fov_slab'), 4)}) | "
                         f"{_f(s.get('folding_mean'), 4)} / {_f(s.get('folding_max'), 4)} | "
                         f"{_f(float(np.mean(sd)) if sd else None, 3)} | {_f(s.get('field_error_full_mm'), 2)} / "
                         f"{_f(s.get('field_error_slab_mm'), 2)} |")
        def ref_mean(which: str, kind: str, metric: str) -> float | None:
            vals = [p[which][metric] for p in pairs if p["kind"] == kind and p[which] and
                    p[which].get(metric) is not None]
            return float(np.mean(vals)) if vals else None

        lines += ["", "Reference points (sweep grid): unregistered Dice full-FOV "
                  f"{_f(ref_mean('initial', 'full', 'dice'), 4)} "
                  f"(in FOV {_f(ref_mean('initial', 'full', 'dice_fov'), 4)}), "
                  f"slab {_f(ref_mean('initial', 'slab', 'dice'), 4)} "
                  f"({_f(ref_mean('initial', 'slab', 'dice_fov'), 4)}); "
                  f"the cohort's true field full-FOV {_f(ref_mean('true_field', 'full', 'dice'), 4)} "
                  f"({_f(ref_mean('true_field', 'full', 'dice_fov'), 4)}), slab "
                  f"{_f(ref_mean('true_field', 'slab', 'dice'), 4)} "
                  f"({_f(ref_mean('true_field', 'slab', 'dice_fov'), 4)}). "
                  "The true field's Dice is the ceiling: the template's organs warped beyond the fixed scan's field "
                  "of view meet no fixed labels there.", ""]
        lines += ["### Per pair (final, every voxel)", "",
                  "Dice (in the fixed scan's FOV in brackets):", "",
                  "| pair | kind | initial | true field | " + " | ".join(final) + " | folding % " +
                  " / ".join(final) + " | Adam iterations |",
                  "|---|---|---|---|" + "---|" * len(final) + "---|---|"]
        for p in pairs:
            row = [p["id"] + (" (val)" if p["val"] else ""), p["kind"]]
            for ref in (p["initial"] or {}, p["true_field"] or {}):
                row.append(_f(ref.get("dice"), 3) + ("" if ref.get("dice_fov") is None else
                                                     f" ({_f(ref.get('dice_fov'), 3)})"))
            folds, iters = [], []
            for key in final.values():
                sc = (cfgs[key].get("final_per_pair") or {}).get(p["id"], {})
                d = sc.get("dice")
                if sc.get("dice_fov") is not None:
                    row.append(f"{_f(d, 3)} ({_f(sc.get('dice_fov'), 3)})")
                else:
                    row.append(_f(d, 3))
                folds.append(_f(sc.get("folding_percent"), 3))
                iters.append(str(sc.get("adam_iterations", "-")))
            lines.append("| " + " | ".join(row + [" / ".join(folds), " / ".join(iters)]) + " |")
        lines.append("")

    def table(title: str, keys: list[str]) -> None:
        nonlocal lines
        b = cfgs[res["baseline"]]["summary"]
        lines += [f"## {title}", "",
                  "| setting | objective | Dice full-FOV (delta) | in FOV | pairs better / worse / n | Dice val | "
                  "Dice slab (in FOV) | folding % mean / max | field error mm | Adam iters | "
                  "CPU s / pair (Adam + TPS) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            c = cfgs[k]
            s = c["summary"]
            delta = None if s["dice_full"] is None or b["dice_full"] is None else s["dice_full"] - b["dice_full"]
            cpu = None if s["adam_cpu_s"] is None else s["adam_cpu_s"] + (s["dense_cpu_s"] or 0)
            w = s.get("wins_full")
            wins = "-" if not w or k == res["baseline"] else "{}/{}/{}".format(*w)
            lines.append(f"| {c['differs_from_baseline']} | {_f(c['objective'], 4)} | {_f(s['dice_full'], 4)} "
                         f"({'' if delta is None else f'{delta:+.4f}'}) | {_f(s['dice_fov_full'], 4)} | "
                         f"{wins} | {_f(s['dice_val'], 4)} | "
                         f"{_f(s['dice_slab'], 4)} ({_f(s['dice_fov_slab'], 4)}) | {_f(s['folding_mean'], 3)} / "
                         f"{_f(s['folding_max'], 3)} | {_f(s['field_error_full_mm'], 2)} | "
                         f"{_f(s['adam_iterations'], 0)} | {_f(cpu, 2)} |")
        lines.append("")

    one = [res["baseline"]] + ([res["flow_defaults"]] if res["flow_defaults"] in cfgs else [])
    centre_key = res.get("centre", res["baseline"])
    one += [centre_key] if centre_key not in one else []
    for keys in res["per_knob"].values():
        one += [k for k in keys if k not in one]
    centred = "" if centre_key == res["baseline"] else \
        f" around the centre ({cfgs[centre_key]['differs_from_baseline']})"
    table(f"Phase 1: one Adam knob at a time{centred} (dense field as the centre's)", one)
    if res["joint"]:
        table(f"Phase 2: joint refinement of {' and '.join(res['joint_knobs'])}", res["joint"])
    table(f"Phase 3: dense field on the best Adam setting ({cfgs[res['best_adam']]['differs_from_baseline']})",
          res["dense"])
    lines += ["Gain of each knob's best value over the centre of the sweep (objective): " +
              ", ".join(f"{g['knob']} {_f(g['gain'], 4)}" for g in res["gains"]) + ".", ""]
    for note in doc["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT / "runs/demo/prep/current"), help="preprocessed cohort dataset")
    ap.add_argument("--weights", default=str(ROOT / "weights/slicreg-cohort-v1"), help="weights bundle folder")
    ap.add_argument("--cache", default=str(ROOT / "runs/flow_tuning_cache"),
                    help="cache of predictions, simulated slabs and true fields (reruns skip them)")
    ap.add_argument("--subjects", type=int, default=None, help="first N training subjects (default: all)")
    ap.add_argument("--ids", nargs="*", default=None, help="explicit training subject ids (test ids are refused)")
    ap.add_argument("--slabs", type=int, default=4,
                    help="simulated slabs from the first N selected subjects (default 4; 0 = none)")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--exclude-slabs", action="store_true", help="no slab pairs (same as --slabs 0)")
    grp.add_argument("--only-slabs", action="store_true", help="tune on slab pairs only (objective: Dice in FOV)")
    ap.add_argument("--slab-ids", nargs="*", default=None,
                    help="training subjects to cut slabs from (default: the first --slabs selected subjects)")
    ap.add_argument("--slab-mm", type=float, default=40.0, help="cranio-caudal extent of a simulated slab (mm)")
    ap.add_argument("--slab-seed", type=int, default=0, help="seed of the slab positions")
    ap.add_argument("--objective", choices=("full", "slab", "all"), default=None,
                    help="pairs whose mean Dice is maximised (default full; slab with --only-slabs)")
    ap.add_argument("--max-folding", type=float, default=0.1,
                    help="settings with a larger mean %% of det J <= 0 are not eligible (default 0.1)")
    ap.add_argument("--slab-tolerance", type=float, default=0.01,
                    help="with objective full: settings whose slab Dice (in FOV) is below the baseline's by more than "
                         "this are not eligible (the method must keep working on slabs; negative: off)")
    ap.add_argument("--eval-stride", type=int, default=2, help="sweep Dice/folding/field error on every s-th voxel")
    ap.add_argument("--values", nargs="*", default=[],
                    help="override the swept values, e.g. k=3,5,8 alpha=1e-5,6.5e-5 lam_r=30,100 lam_r2logr=1000")
    ap.add_argument("--centre", nargs="*", default=[],
                    help="move the sweep's centre away from the registration defaults, e.g. alpha=6.5e-6 "
                         "keypoints=random lam=10 (a second round around an earlier best); the defaults stay the "
                         "reference of every comparison")
    ap.add_argument("--no-final", action="store_true", help="skip the exact full-grid comparison")
    ap.add_argument("--seed", type=int, default=0, help="seed of the label permutations and random keypoints")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/flow_tuning"),
                    help="output stem: writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    if args.exclude_slabs:
        args.slabs = 0
    if args.objective is None:
        args.objective = "slab" if args.only_slabs else "full"
    if args.eval_stride < 1:
        raise SystemExit("--eval-stride must be >= 1")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    values = {k: list(v) for k, v in KNOB_VALUES.items()}
    lams = {k: list(v) for k, v in LAM_VALUES.items()}
    for knob, vals in parse_values(args.values).items():
        if knob.startswith("lam_"):
            lams[knob[4:]] = vals
        else:
            values[knob] = vals

    tuner = Tuner(args)
    subjects = select_subjects(tuner.dataset, args.ids, args.subjects)
    slab_subjects = [] if args.slabs <= 0 else subjects[: args.slabs]
    if args.slab_ids:
        slab_subjects = [] if args.slabs <= 0 else select_subjects(tuner.dataset, args.slab_ids, None)
    if args.only_slabs:
        if not slab_subjects:
            raise SystemExit("--only-slabs needs --slabs N > 0")
        subjects = []
    print(f"bundle {tuner.bundle.path} (model sha256 {tuner.bundle_sha[:16]}); {len(subjects)} full-FOV pair(s), "
          f"{len(slab_subjects)} simulated slab(s); cache {tuner.cache}", flush=True)
    tuner.prepare(subjects, slab_subjects)
    if not tuner.pairs:
        raise SystemExit("no pairs to tune on")
    if args.objective == "full" and not any(p.kind == "full" for p in tuner.pairs):
        args.objective = "all"

    base = registration_defaults()
    centre = dict(base)
    for item in args.centre:
        knob, _, value = item.partition("=")
        if knob not in KNOB_TYPES or not value:
            raise SystemExit(f"--centre {item!r}: expected knob=value with knob in {sorted(KNOB_TYPES)}")
        centre[knob] = KNOB_TYPES[knob](value)
    centre = normalise(centre)
    res = sweep(tuner, base, values, lams, centre)
    final_keys: dict[str, str] = {}
    if not args.no_final:
        final_keys["baseline"] = res["baseline"]
        if res["best"] != res["baseline"]:
            final_keys["best"] = res["best"]
        if res.get("best_other_kernel"):
            final_keys["best, other kernel"] = res["best_other_kernel"]
        tuner.run("final", [(f"final: {k}", tuner.configs[v]) for k, v in final_keys.items()], full=True)

    doc = build_report(tuner, base, res, final_keys, ["python", "benchmarks/tune_flow.py", *argv])
    from slicreg.io import atomic_write_json, atomic_write_text

    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), doc)
    atomic_write_text(out.with_suffix(".md"), render_markdown(doc, tuner, base))
    best = tuner.configs[res["best"]]
    print(f"\nbest setting: {describe(best, base)}; objective {tuner.objective(res['best']):.4f} vs baseline "
          f"{tuner.objective(res['baseline']):.4f}", flush=True)
    for label, key in final_keys.items():
        s = tuner.summary(key, "final")
        print(f"final {label:20s}: Dice full {_f(s['dice_full'], 4)}, slab {_f(s['dice_slab'], 4)} "
              f"(FOV {_f(s['dice_fov_slab'], 4)}), folding mean {_f(s['folding_mean'], 4)} % max "
              f"{_f(s['folding_max'], 4)} %, field error {_f(s['field_error_full_mm'], 2)} mm", flush=True)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({(time.perf_counter() - tuner.t0) / 60:.1f} "
          f"min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
