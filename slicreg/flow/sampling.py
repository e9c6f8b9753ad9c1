"""The features' channels-last layout, and the Gram-matrix MSE of the Adam flow.

The features are read at points by the one sampler, :func:`slicreg.fields.sample` with
``backend="channels_last"`` (trilinear, border padding; positions in voxels of the feature grid, axis order X, Y,
Z), from the channels-last copy :func:`to_channels_last` makes once. :class:`_GramSampler` computes the same
samples' mean squared error against fixed targets, and its gradient, without re-reading the features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slicreg.errors import InputError
from slicreg.flow._common import _torch

if TYPE_CHECKING:
    import torch

__all__ = ["to_channels_last"]


def to_channels_last(feats: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> a contiguous ``(X, Y, Z, C)`` copy (none if the memory is channels-last already), whose
    ``permute(3, 0, 1, 2)`` view :func:`slicreg.fields.sample` reads with ``backend="channels_last"``."""
    if feats.ndim != 4:
        raise InputError(f"feats: expected (C, X, Y, Z), got {tuple(feats.shape)}")
    return feats.permute(1, 2, 3, 0).contiguous()


class _GramSampler:
    """The feature MSE at moving points and its gradient, from per-point 8 x 8 Gram matrices of the corners.

    For a point in the cell with corner features ``c_1..c_8`` (rows of ``C`` channels) and trilinear weights
    ``w`` (which sum to 1), the squared error against its target ``t`` is
    ``|sum_k w_k c_k - t|^2 = |sum_k w_k (c_k - t)|^2 = w^T E w`` with ``E = e e^T``, ``e_k = c_k - t``, and its
    gradient with respect to ``w`` is ``2 E w``. ``E`` depends only on the cell, so it is computed only for points
    that entered another cell since the previous call -- after the first Adam iterations a small share of them
    (docs/flow.md, "Speed") -- and
    every call costs a few 8 x 8 products per point instead of reading 8 x ``C`` features twice. Everything is
    float64 (from the float32 features): ``E`` is formed from the differences, so there is no cancellation; where
    the moving features equal the target the gradient is set to exactly zero, as the float32 autograd path
    computes it (Adam's steps ignore a gradient's scale, so rounding noise would otherwise move such points).
    The same function as :func:`slicreg.fields.sample` (``backend="channels_last"``) followed by the mean
    squared error (border clamping,
    gradient zero outside the grid); the targets are sampled in float64 by :meth:`sample`.
    """

    def __init__(self, feats_cl: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """``feats_cl (X, Y, Z, C)`` float32 features; ``target (N, C)`` (float64) for :meth:`__call__` (None for
        :meth:`sample` alone)."""
        torch = _torch()
        self.size = tuple(int(s) for s in feats_cl.shape[:3])
        self.n_ch = int(feats_cl.shape[3])
        self.rows = feats_cl.reshape(-1, self.n_ch)
        dev = feats_cl.device
        self.upper = torch.tensor([s - 1 for s in self.size], dtype=feats_cl.dtype, device=dev)
        self.strides = torch.tensor([self.size[1] * self.size[2], self.size[2], 1], dtype=torch.long, device=dev)
        bits = torch.tensor([[(c >> (2 - a)) & 1 for a in range(3)] for c in range(8)], dtype=torch.long, device=dev)
        self.offsets = (bits * self.strides).sum(dim=1)  # (8,) corner offsets, b0 slowest
        n = 0 if target is None else target.shape[0]
        self.target = None if target is None else target.double()
        self.gram = torch.zeros(n, 8, 8, dtype=torch.float64, device=dev)
        self.cell = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.denom = float(n * self.n_ch)
        self.updated = 0  # Gram matrices computed so far (diagnostics)

    def _locate(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (clamped to the grid) -> (cell index (N,), trilinear weights per axis (N, 3, 2) float64), as
        :func:`slicreg.fields.sample` (``backend="channels_last"``) computes them."""
        torch = _torch()
        pos = torch.clamp(points, min=torch.zeros_like(self.upper), max=self.upper)
        lo = torch.minimum(torch.floor(pos), self.upper - 1)
        frac = (pos - lo).double()  # (N, 3) in [0, 1]
        return (lo.long() * self.strides).sum(dim=1), torch.stack([1.0 - frac, frac], dim=2)

    def _corners(self, cell: torch.Tensor) -> torch.Tensor:
        """``(M,)`` cell indices -> ``(M, 8, C)`` float64 corner features."""
        idx = (cell[:, None] + self.offsets[None]).reshape(-1)
        return self.rows.index_select(0, idx).reshape(-1, 8, self.n_ch).double()

    @staticmethod
    def _weights(wa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w01 = wa[:, 0, :, None] * wa[:, 1, None, :]  # (N, 2, 2)
        return (w01[:, :, :, None] * wa[:, 2, None, None, :]).reshape(-1, 8), w01

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """Trilinear samples ``(N, C)`` float64 at ``points (N, 3)`` (feature voxels, border clamping)."""
        cell, wa = self._locate(points)
        w, _ = self._weights(wa)
        return (self._corners(cell) * w[:, :, None]).sum(dim=1)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``points (N, 3)`` float32 in feature voxels -> (mean squared error (float64 scalar), gradient
        ``(N, 3)`` float64 with respect to the points)."""
        torch = _torch()
        cell, wa = self._locate(points)
        moved = torch.nonzero(cell != self.cell).reshape(-1)
        if moved.numel():
            diff = self._corners(cell[moved]).sub_(self.target[moved, None, :])
            self.gram[moved] = torch.bmm(diff, diff.transpose(1, 2))
            self.cell[moved] = cell[moved]
            self.updated += int(moved.numel())
        w, w01 = self._weights(wa)
        ew = (self.gram * w[:, None, :]).sum(dim=2)  # (N, 8): E w = e (e^T w), e^T w = the residual
        mse = (ew * w).sum() / self.denom
        # a residual that is zero up to rounding (moving features equal to the target, e.g. an identical pair)
        # leaves ~1e-16 |e|^2 in E w; Adam would blow such noise up (its step ignores the gradient's scale), where
        # the float32 path computes an exact zero -- so it is set to zero (1e-11: far below float32 resolution)
        exact = ew.abs().amax(dim=1) <= 1e-11 * torch.diagonal(self.gram, dim1=1, dim2=2).amax(dim=1)
        ew.masked_fill_(exact[:, None], 0.0)
        g = ew.reshape(-1, 2, 2, 2) * (2.0 / self.denom)  # d mse / d w
        w02 = wa[:, 0, :, None] * wa[:, 2, None, :]
        w12 = wa[:, 1, :, None] * wa[:, 2, None, :]
        grad = torch.stack([((g[:, 1] - g[:, 0]) * w12).sum(dim=(1, 2)),
                            ((g[:, :, 1] - g[:, :, 0]) * w02).sum(dim=(1, 2)),
                            ((g[:, :, :, 1] - g[:, :, :, 0]) * w01).sum(dim=(1, 2))], dim=1)
        inside = (points >= 0) & (points <= self.upper)  # the clamp passes no gradient outside the grid
        return mse, grad * inside
