"""Smoothness penalties for displacement fields (differentiable torch functions, zero for a constant field).

Every function takes a displacement ``(B, 3, X, Y, Z)`` and the grid spacing per array axis. Derivatives are
finite differences divided by the spacing, so with the displacement in mm and ``spacing`` in mm the first
derivatives are dimensionless and the penalty does not depend on the grid's resolution (the engine passes
fields in mm on every pyramid level for this reason).

========================  ====================================================  =========================
name                      definition (mean over the voxels where it is defined)  zero for
========================  ====================================================  =========================
``diffusion``             ``sum_ab (d u_a / d x_b)^2``                           translations
``bending``               ``sum_ab,c (d^2 u_a / d x_b d x_c)^2``                 affine maps
``tv``                    ``sum_a sqrt(sum_b (d u_a / d x_b)^2 + eps^2) - eps``  translations
========================  ====================================================  =========================

``diffusion`` and ``tv`` use forward differences; ``bending`` uses second central differences and forward
mixed differences (each mixed term counted twice, as in the continuous ``sum_bc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slicreg.errors import InputError

__all__ = ["diffusion", "bending_energy", "total_variation", "REGULARISERS", "get_regulariser"]


def _check(disp: torch.Tensor, spacing: Sequence[float], name: str) -> tuple[float, float, float]:
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise InputError(f"{name}: expected a displacement (B, 3, X, Y, Z), got {tuple(disp.shape)}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise InputError(f"{name}: spacing must be three positive numbers, got {spacing}")
    return sp  # type: ignore[return-value]


def _forward_diff(u: torch.Tensor, axis: int, step: float) -> torch.Tensor:
    dim = 2 + axis
    n = u.shape[dim]
    if n < 2:
        return u.new_zeros(0)
    return (u.narrow(dim, 1, n - 1) - u.narrow(dim, 0, n - 1)) / step


def diffusion(disp: torch.Tensor, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Diffusion (membrane) energy: mean squared first derivative, summed over the 3x3 Jacobian entries.

    Args:
        disp: ``(B, 3, X, Y, Z)`` displacement (any length unit, the same as ``spacing``).
        spacing: grid spacing per array axis (default 1).
    """
    sp = _check(disp, spacing, "diffusion")
    total = disp.new_zeros(())
    for axis in range(3):
        d = _forward_diff(disp, axis, sp[axis])
        if d.numel():
            total = total + torch.mean(d * d) * 3.0  # mean over the 3 components, summed over them
    return total


def bending_energy(disp: torch.Tensor, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Bending energy (thin-plate): mean squared second derivative, summed over components and axis pairs.

    Zero for every affine displacement. Args as :func:`diffusion`; units length^-1 squared times length^2."""
    sp = _check(disp, spacing, "bending_energy")
    total = disp.new_zeros(())
    for b in range(3):
        dim = 2 + b
        n = disp.shape[dim]
        if n >= 3:
            second = (disp.narrow(dim, 2, n - 2) - 2 * disp.narrow(dim, 1, n - 2) + disp.narrow(dim, 0, n - 2))
            second = second / (sp[b] * sp[b])
            total = total + torch.mean(second * second) * 3.0
        for c in range(b + 1, 3):
            first = _forward_diff(disp, b, sp[b])
            if not first.numel():
                continue
            mixed = _forward_diff(first, c, sp[c])
            if mixed.numel():
                total = total + 2.0 * torch.mean(mixed * mixed) * 3.0
    return total


def total_variation(
    disp: torch.Tensor, *, spacing: Sequence[float] = (1.0, 1.0, 1.0), eps: float = 1e-3
) -> torch.Tensor:
    """Isotropic total variation per component: ``sqrt(|grad u_a|^2 + eps^2) - eps`` summed over ``a``, mean
    over voxels (forward differences on the common ``(X-1, Y-1, Z-1)`` block). ``eps`` keeps it smooth at 0."""
    sp = _check(disp, spacing, "total_variation")
    X, Y, Z = disp.shape[2:]
    if min(X, Y, Z) < 2:
        raise InputError(f"total_variation: every spatial axis needs >= 2 voxels, got {(X, Y, Z)}")
    core = disp[:, :, : X - 1, : Y - 1, : Z - 1]
    gx = (disp[:, :, 1:, : Y - 1, : Z - 1] - core) / sp[0]
    gy = (disp[:, :, : X - 1, 1:, : Z - 1] - core) / sp[1]
    gz = (disp[:, :, : X - 1, : Y - 1, 1:] - core) / sp[2]
    mag = torch.sqrt(gx * gx + gy * gy + gz * gz + eps * eps) - eps
    return mag.sum(dim=1).mean()


REGULARISERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion": diffusion,
    "bending": bending_energy,
    "tv": total_variation,
}


def get_regulariser(name: str) -> Callable[..., torch.Tensor]:
    """The regulariser called ``name`` (``diffusion``, ``bending``, ``tv``); else :class:`InputError`."""
    if name not in REGULARISERS:
        raise InputError(f"regulariser: unknown name {name!r}; known: {', '.join(REGULARISERS)}")
    return REGULARISERS[name]
