"""What the flow's modules share: the label count, the default knobs, input conversion and checks.

Inputs may be numpy arrays or torch tensors; every public function converts them with :func:`_as_tensor` and
returns the type it was given (:func:`_out`). The checks raise :class:`slicreg.errors.InputError` naming the
argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from slicreg.errors import InputError

if TYPE_CHECKING:
    import torch

    Array = torch.Tensor | np.ndarray
    """A tensor or an array: the public functions return the type they are given (numpy in -> numpy out)."""
    Device = str | torch.device

__all__ = ["DEFAULTS", "N_LABELS"]


N_LABELS = 128
"""Labels per supervoxel layer: background 0 plus supervoxels 1..127."""


Kernel = Literal["r", "r2logr"]


#: Default knobs of the method, in one place (units: sv voxels for lr; fine voxels for lam and step).
DEFAULTS: dict[str, Any] = {
    "n_channels": 16,  # channels per layer after compressing 128 labels (8 labels per channel)
    "pools": ((3, 2), (5, 1)),  # (kernel, stride) of the box poolings, in order
    "include_background": False,  # label 0 contributes no channel (the outside of the grid is background too)
    "k": 5,  # neighbours in the kNN graph (final reference code: 5; README: 8)
    "alpha": 6.5e-5,  # penalty weight in sv voxels (= reference 0.15 in normalised units)
    "lr": 1.0,  # Adam step in sv voxels (reference 0.05 normalised ~ 2.5 sv voxels)
    "iterations": 100,
    "patience": 0,  # early stop: end when the loss has not improved by tol (relative) for this many iterations; 0 = off
    "tol": 1e-3,
    "kernel": "r",  # 3-D biharmonic TPS kernel; "r2logr" is the reference's 2-D kernel
    "lam": 100.0,  # TPS regularisation for kernel "r" (fine voxels; 0 = exact interpolation)
    "step": 5,  # TPS evaluation grid step in fine voxels
    "factor": 2,  # fine grid / supervoxel grid (2 mm / 4 mm)
    "n_random": 2048,  # random foreground keypoints (keypoints="random")
    "random_stride": 2,  # candidate voxels for random keypoints: every 2nd voxel of the supervoxel grid
}


def _torch():
    import torch

    return torch


def _is_tensor(x: object) -> bool:
    return hasattr(x, "detach") and hasattr(x, "device")


def _as_tensor(x: Array, name: str, device: Device) -> torch.Tensor:
    torch = _torch()
    if _is_tensor(x):
        return x.to(device)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(st < 0 for st in arr.strides) or not arr.flags.aligned or not arr.flags.writeable:
        arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr).to(device)


def _out(x: torch.Tensor, numpy_out: bool) -> Array:
    return x.detach().cpu().numpy() if numpy_out else x


def _check_labels(labels: torch.Tensor, name: str) -> None:
    """Labels: integer (L, X, Y, Z) with values in 0..127 and every spatial size >= 2."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == _torch().bool:
        raise InputError(f"{name}: expected integer supervoxel labels (uint8), got dtype {labels.dtype}")
    if labels.ndim != 4:
        raise InputError(f"{name}: expected supervoxel labels of shape (L, X, Y, Z), got {tuple(labels.shape)}")
    if min(labels.shape[1:]) < 2 or labels.shape[0] < 1:
        raise InputError(f"{name}: expected at least one layer and >= 2 voxels per axis, got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= N_LABELS):
        raise InputError(
            f"{name}: supervoxel labels must lie in 0..{N_LABELS - 1}, got {int(labels.min())}..{int(labels.max())}"
        )


def _check_probabilities(prob: torch.Tensor, name: str) -> None:
    """Probabilities: floating (L, 128, X, Y, Z), finite, non-negative."""
    if not prob.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating probabilities, got dtype {prob.dtype}")
    if prob.ndim != 5 or prob.shape[1] != N_LABELS:
        raise InputError(
            f"{name}: expected probabilities of shape (L, {N_LABELS}, X, Y, Z), got {tuple(prob.shape)}"
        )
    if min(prob.shape[2:]) < 2 or prob.shape[0] < 1:
        raise InputError(f"{name}: expected at least one layer and >= 2 voxels per axis, got {tuple(prob.shape)}")
    for layer in prob:  # one layer at a time: the checks' temporaries stay small
        if not bool(_torch().isfinite(layer).all()) or bool((layer < 0).any()):
            raise InputError(f"{name}: probabilities must be finite and non-negative")


def _check_points(points: torch.Tensor, name: str) -> None:
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 1:
        raise InputError(f"{name}: expected points of shape (N, 3) with N >= 1, got {tuple(points.shape)}")
    if not points.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating point coordinates, got dtype {points.dtype}")
    if not bool(_torch().isfinite(points).all()):
        raise InputError(f"{name}: coordinates must be finite")


def _check_shape3(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected three positive integers, got {shape!r}") from exc
    if len(out) != 3 or min(out) < 2:
        raise InputError(f"{name}: expected three integers >= 2, got {shape!r}")
    return out  # type: ignore[return-value]
