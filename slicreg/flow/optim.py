"""The optimiser of the keypoint flow: Adam for one tensor, without importing ``torch.optim``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slicreg.flow._common import _torch

if TYPE_CHECKING:
    import torch

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) for one tensor: the update of ``torch.optim.Adam`` (its single-tensor
    path, the CPU default; the same operations in the same order, so the same numbers), without
    ``torch.optim``, whose first use in a process imports ``torch._dynamo`` -- a cost paid by every ``slicreg
    register`` run (docs/measurements.md).

    Args:
        param: the tensor to optimise (updated in place).
        lr: step size; may be changed between steps (``adam.lr = ...``).
        betas: decay of the first and second moment averages.
        eps: added to the root of the second moment.
    """

    def __init__(self, param: torch.Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                 ) -> None:
        torch = _torch()
        self.param, self.lr, self.betas, self.eps = param, float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = 0

    def step(self, grad: torch.Tensor) -> None:
        """One update of ``param`` with the gradient ``grad`` (same shape)."""
        torch = _torch()
        beta1, beta2 = self.betas
        with torch.no_grad():
            self.steps += 1
            self.exp_avg.lerp_(grad, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = float(self.steps)
            step_size = self.lr / (1 - beta1 ** step)
            denom = (self.exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
            self.param.addcdiv_(self.exp_avg, denom, value=-step_size)
