"""Speed kernels of the network's training: custom backward passes of its 3-D convolutions (CPU).

None changes the function computed; each is opt-in through the ``backend`` / ``backward`` argument
(``"native"`` = torch's own backward) and tested against autograd (tests/test_network.py).

- :class:`DepthwiseConv3d` / :func:`depthwise_conv3d`: 3x3x3 depthwise convolution (padding 1) whose input
  gradient is a depthwise convolution with the flipped kernel (forward speed) and whose weight gradient, 27
  per-channel reductions, is one fused kernel (``torch.compile``, :func:`depthwise_weight_grad` unfused) -- on CPU,
  torch's own backward of 3x3x3 depthwise convolutions is several times slower than its forward.
- :class:`DilatedConv3d`: ``nn.Conv3d`` (3x3x3, padding = dilation) whose weight gradient is 27 GEMMs over the
  voxels each tap actually sees (:func:`dilated_conv3d_weight_grad`), skipping the padding that dominates at
  large dilations.

Tensors are ``(B, C, X, Y, Z)``; weights ``(C, 1, 3, 3, 3)`` (depthwise) or ``(O, C, 3, 3, 3)``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slicreg.errors import InputError

__all__ = [
    "DEPTHWISE_BACKENDS",
    "DepthwiseConv3d",
    "DilatedConv3d",
    "depthwise_conv3d",
    "depthwise_weight_grad",
    "dilated_conv3d_weight_grad",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- depthwise convolution


def _pad_slices(size_out: int, k: int, stride: int) -> slice:
    return slice(k, k + stride * (size_out - 1) + 1, stride)


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, *, stride: int = 1) -> torch.Tensor:
    """Weight gradient of a 3x3x3 depthwise convolution (padding 1), accumulated in float32 (double stays double).

    ``grad_w[c, 0, i, j, k] = sum over b, p of grad_out[b, c, p] * x_padded[b, c, stride * p + (i, j, k)]``.

    Args:
        x: the convolution input ``(B, C, X, Y, Z)`` (any memory format, any float dtype).
        grad_out: the gradient of its output ``(B, C, X', Y', Z')``.
        stride: the convolution stride (1 or 2).

    Returns:
        ``(C, 1, 3, 3, 3)``, float32 (float64 for float64 inputs).

    This eager form makes 27 passes over the data; :func:`depthwise_conv3d` runs the same expression through
    ``torch.compile``, which fuses the 27 reductions into one pass.
    """
    return _weight_grad_cl(x.permute(0, 2, 3, 4, 1), grad_out.permute(0, 2, 3, 4, 1), stride).t().reshape(
        x.shape[1], 1, 3, 3, 3)


def _weight_grad_cl(x_cl: torch.Tensor, g_cl: torch.Tensor, stride: int) -> torch.Tensor:
    """``(27, C)`` weight gradient from channels-last views ``(B, X, Y, Z, C)``; the kernel ``torch.compile`` fuses."""
    acc = torch.float64 if x_cl.dtype == torch.float64 else torch.float32
    xp = F.pad(x_cl, (0, 0, 1, 1, 1, 1, 1, 1))
    xo, yo, zo = g_cl.shape[1:4]
    g = g_cl.to(acc)
    out = []
    for i in range(3):
        for j in range(3):
            for k in range(3):
                xs = xp[:, _pad_slices(xo, i, stride), _pad_slices(yo, j, stride), _pad_slices(zo, k, stride)]
                out.append((g * xs.to(acc)).sum((0, 1, 2, 3)))
    return torch.stack(out, 0)


class _CompiledWeightGrad:
    """``torch.compile`` of :func:`_weight_grad_cl`, one static-shape kernel per (shape, dtype, stride).

    If compilation is impossible (no C++ compiler, an unsupported platform) the first failure is logged and
    torch's own convolution backward is used from then on."""

    def __init__(self) -> None:
        self._fn: Any = None
        self.failed: str | None = None
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, g: torch.Tensor, stride: int) -> torch.Tensor | None:
        if self.failed is not None:
            return None
        try:
            with self._lock:
                if self._fn is None:
                    self._fn = torch.compile(_weight_grad_cl, dynamic=False, fullgraph=True)
            with _dynamo_recompile_limit(64):
                return self._fn(x, g, stride)
        except Exception as exc:  # compilation problems surface as many exception types
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("depthwise weight-gradient kernel could not be compiled (%s); using torch's own backward",
                        self.failed.splitlines()[0][:300])
            return None


@contextlib.contextmanager
def _dynamo_recompile_limit(n: int) -> Iterator[None]:
    """Allow up to ``n`` static kernels (one per layer shape) for the compiled kernel, only while it is called."""
    try:
        import torch._dynamo.config as dynamo_config

        names = [a for a in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, a)]
    except Exception:  # pragma: no cover - very old or stripped torch
        names = []
    if not names:
        yield
        return
    with dynamo_config.patch(**{names[0]: max(n, getattr(dynamo_config, names[0]))}):
        yield


_COMPILED_WEIGHT_GRAD = _CompiledWeightGrad()
DEPTHWISE_BACKENDS = ("compiled", "eager", "native")


def _native_weight_grad(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    c = x.shape[1]
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, [stride] * 3, [1] * 3, [1] * 3, False, [0] * 3, c, [False, True, False])[1]


def _depthwise_input_grad(g: torch.Tensor, weight: torch.Tensor, stride: int, input_shape: Sequence[int],
                          channels_last: bool) -> torch.Tensor:
    """Input gradient of a depthwise conv: zero-insert ``g`` (stride 2), correlate with the flipped kernel."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    c = weight.shape[0]
    if stride == 1:
        up = g
    else:
        up = torch.empty(tuple(input_shape), dtype=g.dtype, device=g.device, memory_format=fmt).zero_()
        xo, yo, zo = g.shape[2:]
        up[:, :, 0:stride * xo:stride, 0:stride * yo:stride, 0:stride * zo:stride] = g
    return F.conv3d(up.contiguous(memory_format=fmt), weight.flip(2, 3, 4), padding=1, groups=c)


class _DepthwiseConv3dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int, dtype: torch.dtype,
                backend: str) -> torch.Tensor:
        channels_last = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and \
            not x.is_contiguous()
        xc = x.to(dtype)
        wc = weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.stride, ctx.backend, ctx.channels_last = stride, backend, channels_last
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return F.conv3d(xc, wc, stride=stride, padding=1, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        fmt = torch.channels_last_3d if ctx.channels_last else torch.contiguous_format
        g = g.to(x.dtype).contiguous(memory_format=fmt)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _depthwise_input_grad(g, w, ctx.stride, x.shape, ctx.channels_last).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gw = None
            if ctx.backend == "compiled":
                gw = _COMPILED_WEIGHT_GRAD(x.permute(0, 2, 3, 4, 1), g.permute(0, 2, 3, 4, 1), ctx.stride)
                if gw is not None:
                    gw = gw.t().reshape(w.shape)
            elif ctx.backend == "eager":
                gw = depthwise_weight_grad(x, g, stride=ctx.stride)
            if gw is None:
                gw = _native_weight_grad(x, g, w, ctx.stride)
            grad_w = gw.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, backend: str = "compiled"
                     ) -> torch.Tensor:
    """3x3x3 depthwise convolution with padding 1 and a fast backward.

    Args:
        x: ``(B, C, X, Y, Z)``; channels-last 3-D memory format recommended on CPU.
        weight: ``(C, 1, 3, 3, 3)``.
        stride: 1 or 2.
        backend: how the weight gradient is computed: ``"compiled"`` (one fused kernel via ``torch.compile``,
            falling back to ``"native"`` if it cannot be compiled), ``"eager"`` (the same formula unfused; for
            tests and float64), ``"native"`` (torch's own convolution backward, for the whole backward).

    Returns:
        ``(B, C, X', Y', Z')`` with ``X' = floor((X - 1) / stride) + 1``.

    Under autocast the convolution runs in the autocast dtype (as ``F.conv3d`` would); gradients are returned in
    the dtypes of ``x`` and ``weight``. Without gradients, or with ``backend="native"``, or on a device other than
    the CPU, this is exactly ``F.conv3d(x, weight, stride=stride, padding=1, groups=C)``.
    """
    if backend not in DEPTHWISE_BACKENDS:
        raise InputError(f"depthwise_conv3d: backend must be one of {DEPTHWISE_BACKENDS}, got {backend!r}")
    c = x.shape[1]
    if weight.shape != (c, 1, 3, 3, 3):
        raise InputError(f"depthwise_conv3d: weight must be ({c}, 1, 3, 3, 3) for {c} channels, "
                         f"got {tuple(weight.shape)}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if backend == "native" or not needs_grad or x.device.type != "cpu":
        return F.conv3d(x, weight, stride=stride, padding=1, groups=c)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return _DepthwiseConv3dFn.apply(x, weight, stride, dtype, backend)


class DepthwiseConv3d(nn.Module):
    """3x3x3 depthwise convolution, padding 1, no bias, with the fast backward of :func:`depthwise_conv3d`.

    Its state_dict (``weight`` of shape ``(C, 1, 3, 3, 3)``) is that of ``nn.Conv3d(C, C, 3, stride, 1,
    groups=C, bias=False)``."""

    def __init__(self, channels: int, *, stride: int = 1, backend: str = "compiled") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise InputError(f"DepthwiseConv3d: stride must be 1 or 2, got {stride}")
        self.channels, self.stride, self.backend = channels, stride, backend
        self.weight = nn.Parameter(torch.empty(channels, 1, 3, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv3d(x, self.weight, stride=self.stride, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, backend={self.backend!r}"


def dilated_conv3d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, *, dilation: int) -> torch.Tensor:
    """Weight gradient of a dense 3x3x3 convolution (stride 1, padding = dilation = ``dilation``) as 27 GEMMs.

    For kernel offset ``k`` (displacement ``d = (k - 1) * dilation``) only the output voxels whose input voxel
    ``p + d`` lies inside the volume contribute: ``grad_w[:, :, k] = grad_out[box]^T @ x[box + d]`` with the
    channels as matrix columns. With large dilations most of each box is empty padding, which this skips.

    Args:
        x: ``(B, C, X, Y, Z)``, any memory format (channels-last avoids copies of the transposition).
        grad_out: ``(B, O, X, Y, Z)``.
        dilation: the dilation (= padding) of the convolution.

    Returns:
        ``(O, C, 3, 3, 3)`` in float32 (float64 for float64 input); each GEMM runs in the input dtype.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.permute(0, 2, 3, 4, 1)
    gc = grad_out.permute(0, 2, 3, 4, 1)
    size = x.shape[2:]
    o, c = grad_out.shape[1], x.shape[1]
    out = torch.zeros(o, c, 27, dtype=acc, device=x.device)
    for k, (i, j, m) in enumerate((i, j, m) for i in range(3) for j in range(3) for m in range(3)):
        d = ((i - 1) * dilation, (j - 1) * dilation, (m - 1) * dilation)
        lo = [max(0, -dd) for dd in d]
        hi = [min(s, s - dd) for s, dd in zip(size, d)]
        if any(h <= l_ for h, l_ in zip(hi, lo)):
            continue  # this tap only ever sees padding
        gb = gc[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(-1, o)
        xb = xc[:, lo[0] + d[0]:hi[0] + d[0], lo[1] + d[1]:hi[1] + d[1], lo[2] + d[2]:hi[2] + d[2]].reshape(-1, c)
        out[:, :, k] = torch.mm(gb.t(), xb).to(acc)
    return out.view(o, c, 3, 3, 3)


class _DilatedConv3dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, dilation: int, dtype: torch.dtype) -> torch.Tensor:
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.dilation, ctx.x_dtype, ctx.w_dtype = dilation, x.dtype, weight.dtype
        return F.conv3d(xc, wc, padding=dilation, dilation=dilation)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        r = ctx.dilation
        fmt = torch.channels_last_3d if (x.is_contiguous(memory_format=torch.channels_last_3d)
                                         and not x.is_contiguous()) else torch.contiguous_format
        g = g.to(x.dtype).contiguous(memory_format=fmt)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                g, x, w, None, [1] * 3, [r] * 3, [r] * 3, False, [0] * 3, 1, [True, False, False])[0].to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = dilated_conv3d_weight_grad(x, g, dilation=r).to(ctx.w_dtype)
        return grad_x, grad_w, None, None


class DilatedConv3d(nn.Conv3d):
    """``nn.Conv3d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False)`` with a GEMM weight gradient.

    The forward and the state_dict are those of ``nn.Conv3d``; on CPU in training the weight gradient is
    :func:`dilated_conv3d_weight_grad` (torch's own is several times slower for 3-D dilated convolutions).
    ``backend="native"`` uses torch's backward."""

    def __init__(self, c_in: int, c_out: int, *, dilation: int, backend: str = "compiled") -> None:
        super().__init__(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.backend == "native" or not needs_grad or x.device.type != "cpu":
            return super().forward(x)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            return _DilatedConv3dFn.apply(x, self.weight, self.dilation[0], dtype)
