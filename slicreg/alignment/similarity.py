"""Image similarity measures for registration, as differentiable torch losses (lower is better).

Every loss takes the fixed image (or its features) and the warped moving image (or its features), both
``(B, C, X, Y, Z)`` float tensors on the same grid, and returns a scalar tensor. At the optimum (identical
inputs) each loss reaches its minimum:

==============  =======================================================  ==================
name            definition                                               value at identity
==============  =======================================================  ==================
``mse``         mean squared difference                                  0
``ncc``         ``1 - NCC`` (global normalised cross-correlation)        0
``lncc``        ``1 - mean(local squared NCC)`` over a box window        ~0 (where texture)
``ngf``         ``mean(1 - <n_f, n_w>^2)``, normalised gradient fields   ~0 (where edges)
``mi``          ``-MI``, Parzen-window (Gaussian soft histogram) MI      ``-H(fixed)``
``mind``        SSD of MIND-SSC descriptors (Heinrich et al. 2013)       0
==============  =======================================================  ==================

**Weights (masks).** Every loss takes an optional keyword ``weight``: a non-negative ``(B, 1, X, Y, Z)`` tensor
on the fixed grid (one value per voxel, shared by all channels), e.g. a field-of-view mask as 0/1 or as a
fraction. It enters in one way for every measure: each voxel's contribution to the measure's averages is
multiplied by its weight and the averages are divided by the total weight, i.e. ``mean(x)`` becomes
``sum(w x) / sum(w)`` (:func:`weighted_mean`): the per-voxel loss maps of ``mse``, ``lncc``, ``ngf`` and
``mind`` are averaged that way, the global moments of ``ncc`` and the joint histogram of ``mi`` are weighted
moments and a weighted histogram. ``weight=None`` (the default) runs the unweighted code, and a weight of ones
gives the same value up to float rounding. Neighbourhood features (LNCC windows, NGF gradients, MIND patches)
are computed on the whole images; where a mask marks padding, fill that padding first (the engine replicates
the nearest field-of-view voxel), so that no artificial edge enters the features.

``mind`` works on descriptors: compute :func:`mind_ssc` once for the fixed and the moving image and warp
the moving descriptors (12 channels) inside the optimisation, which is how MIND is normally used. The
:data:`SIMILARITIES` table pairs each name with its feature extractor (identity for the intensity measures).

References: Heinrich et al., "MIND: Modality independent neighbourhood descriptor", MedIA 2012, and
"Towards realtime multimodal fusion for image-guided interventions using self-similarities" (MIND-SSC),
MICCAI 2013; Haber & Modersitzki, "Intensity gradient based registration and fusion of multi-modal images"
(NGF), 2006; Mattes et al., "PET-CT image registration in the chest using free-form deformations" (Parzen
MI), IEEE TMI 2003.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slicreg.errors import InputError

__all__ = [
    "mse_loss",
    "ncc_loss",
    "lncc_loss",
    "ngf_loss",
    "mi_loss",
    "mind_ssc",
    "mind_loss",
    "box_filter",
    "weighted_mean",
    "Similarity",
    "SIMILARITIES",
    "get_similarity",
]


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor, name: str) -> None:
    if fixed.ndim != 5 or warped.ndim != 5:
        raise InputError(f"{name}: expected (B, C, X, Y, Z) tensors, got {tuple(fixed.shape)} and "
                         f"{tuple(warped.shape)}")
    if fixed.shape != warped.shape:
        raise InputError(f"{name}: fixed and warped must have the same shape, got {tuple(fixed.shape)} and "
                         f"{tuple(warped.shape)}")


def _check_weight(weight: torch.Tensor | None, fixed: torch.Tensor, name: str) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or weight.ndim != 5 or weight.shape[1] != 1 \
            or weight.shape[0] != fixed.shape[0] or weight.shape[2:] != fixed.shape[2:]:
        raise InputError(f"{name}: weight must be a (B, 1, X, Y, Z) tensor matching the images "
                         f"{tuple(fixed.shape)}, got {tuple(getattr(weight, 'shape', ())) or type(weight).__name__}")


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None, *, eps: float = 1e-12) -> torch.Tensor:
    """``sum(w x) / sum(w)`` over every element of ``values`` ``(B, C, X, Y, Z)`` with the voxel weight ``w``
    ``(B, 1, X, Y, Z)`` shared by the channels; ``torch.mean(values)`` when ``weight`` is None.

    The one way a weight (mask) enters every measure of this module. The total weight is clamped at ``eps``
    (no overlap at all gives 0, not NaN)."""
    if weight is None:
        return torch.mean(values)
    w = weight.expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(eps)


def box_filter(x: torch.Tensor, radius: int | Sequence[int]) -> torch.Tensor:
    """Mean over a ``(2r+1)^3`` box around every voxel, edges replicated; ``(B, C, X, Y, Z)`` in and out.

    Separable (three 1-D passes of ``avg_pool3d``), so the cost does not grow with the cube of the radius."""
    rad = [int(radius)] * 3 if isinstance(radius, int) else [int(r) for r in radius]
    out = x
    for axis, r in enumerate(rad):
        if r <= 0:
            continue
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        kernel = [1, 1, 1]
        kernel[axis] = 2 * r + 1
        out = F.avg_pool3d(F.pad(out, pad, mode="replicate"), kernel_size=kernel, stride=1)
    return out


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference over all voxels and channels (units: intensity squared); ``weight``: see the
    module docstring."""
    _check_pair(fixed, warped, "mse_loss")
    _check_weight(weight, fixed, "mse_loss")
    return weighted_mean((fixed - warped) ** 2, weight)


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, *, weight: torch.Tensor | None = None,
             eps: float = 1e-8) -> torch.Tensor:
    """``1 - NCC`` with the global normalised cross-correlation per batch item and channel, averaged.

    Range [0, 2]; 0 for images that are equal up to a positive linear intensity map. With ``weight`` the
    means, covariance and variances are weighted moments (module docstring)."""
    _check_pair(fixed, warped, "ncc_loss")
    _check_weight(weight, fixed, "ncc_loss")
    f = fixed.flatten(2)
    w = warped.flatten(2)
    if weight is None:
        f = f - f.mean(dim=2, keepdim=True)
        w = w - w.mean(dim=2, keepdim=True)
        num = (f * w).sum(dim=2)
        den = torch.sqrt((f * f).sum(dim=2) * (w * w).sum(dim=2) + eps)
        return 1.0 - torch.mean(num / den)
    v = weight.flatten(2)
    total = v.sum(dim=2, keepdim=True).clamp_min(1e-12)
    f = f - (v * f).sum(dim=2, keepdim=True) / total
    w = w - (v * w).sum(dim=2, keepdim=True) / total
    # weighted sums over the voxel weights; the common factor 1 / sum(v) cancels in the ratio except for eps,
    # which is scaled so that a weight of ones reproduces the unweighted value
    scale = v.sum(dim=2).clamp_min(1e-12) / v.shape[2]
    num = (v * f * w).sum(dim=2) / scale
    den = torch.sqrt((v * f * f).sum(dim=2) / scale * (v * w * w).sum(dim=2) / scale + eps)
    return 1.0 - torch.mean(num / den)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, *, radius: int = 2, weight: torch.Tensor | None = None,
              eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean(lcc^2)``: local normalised cross-correlation over ``(2 radius + 1)^3`` boxes.

    ``lcc^2 = cov^2 / (var_f var_w + eps)`` in every window (box means via :func:`box_filter`). Flat
    windows (zero variance) score 0 whatever the alignment, so they neither help nor hinder.

    Args:
        radius: half-width of the window in voxels (default 2, i.e. 5x5x5).
        weight: voxel weights of the average of ``lcc^2`` (module docstring).
        eps: added to the variance product (intensity^4 units; small, so that faint soft-tissue texture of
            images normalised to [0, 1] still counts).
    """
    _check_pair(fixed, warped, "lncc_loss")
    _check_weight(weight, fixed, "lncc_loss")
    mf = box_filter(fixed, radius)
    mw = box_filter(warped, radius)
    cov = box_filter(fixed * warped, radius) - mf * mw
    vf = (box_filter(fixed * fixed, radius) - mf * mf).clamp_min(0)
    vw = (box_filter(warped * warped, radius) - mw * mw).clamp_min(0)
    return 1.0 - weighted_mean(cov * cov / (vf * vw + eps), weight)


def _central_gradient(x: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the borders) of ``(B, 1, X, Y, Z)`` -> ``(B, 3, X, Y, Z)``."""
    grads = []
    for axis in range(3):
        dim = 2 + axis
        n = x.shape[dim]
        if n < 2:
            grads.append(torch.zeros_like(x))
            continue
        fwd = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim=dim)
        bwd = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim=dim)
        grads.append(0.5 * (fwd - bwd))
    return torch.cat(grads, dim=1)


def ngf_loss(fixed: torch.Tensor, warped: torch.Tensor, *, eps: float = 1e-2,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised gradient fields: ``mean(1 - <n_f, n_w>^2)`` with ``n = grad / sqrt(|grad|^2 + eps^2)``.

    Only single-channel images. ``eps`` (intensity per voxel) suppresses noise-level gradients: choose it
    around the noise level of the normalised images (default 0.01). ``weight``: module docstring."""
    _check_pair(fixed, warped, "ngf_loss")
    _check_weight(weight, fixed, "ngf_loss")
    if fixed.shape[1] != 1:
        raise InputError(f"ngf_loss: expected single-channel images (B, 1, X, Y, Z), got {tuple(fixed.shape)}")
    gf = _central_gradient(fixed)
    gw = _central_gradient(warped)
    nf = gf / torch.sqrt((gf * gf).sum(dim=1, keepdim=True) + eps * eps)
    nw = gw / torch.sqrt((gw * gw).sum(dim=1, keepdim=True) + eps * eps)
    return weighted_mean(1.0 - ((nf * nw).sum(dim=1, keepdim=True)) ** 2, weight)


def mi_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    *,
    bins: int = 32,
    value_range: tuple[float, float] = (0.0, 1.0),
    sigma: float | None = None,
    n_samples: int | None = 50_000,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """``-MI`` (nats) from a differentiable joint histogram with Gaussian Parzen windows.

    Intensities are binned on ``bins`` centres spread over ``value_range`` (values outside are clamped to
    it); each voxel adds ``K(f - c_a) K(w - c_b)`` to bin ``(a, b)`` with a Gaussian kernel ``K`` of width
    ``sigma`` (default: half a bin width), normalised per voxel.

    Args:
        bins: histogram bins per image (default 32).
        value_range: intensity range covered by the bins (default (0, 1), the toolkit's normalised images).
        sigma: Parzen kernel width in intensity units (default ``0.5 * bin width``).
        n_samples: voxels drawn at random (with ``generator``) per call to keep the cost bounded; ``None``
            uses every voxel.
        generator: torch random generator for the voxel sample (determinism under a seed).
        weight: voxel weights of the joint histogram (module docstring); the sample is drawn uniformly and
            weighted afterwards.
    """
    _check_pair(fixed, warped, "mi_loss")
    _check_weight(weight, fixed, "mi_loss")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo or bins < 2:
        raise InputError(f"mi_loss: need value_range lo < hi and bins >= 2, got {value_range}, {bins}")
    f = fixed.reshape(-1)
    w = warped.reshape(-1)
    # one weight per value: the voxel weight repeated over the channels (channels lie outside the voxels)
    v = None if weight is None else weight.expand_as(fixed).reshape(-1)
    if n_samples is not None and f.numel() > n_samples:
        idx = torch.randint(0, f.numel(), (int(n_samples),), generator=generator, device="cpu").to(f.device)
        f, w = f[idx], w[idx]
        v = None if v is None else v[idx]
    centres = torch.linspace(lo, hi, bins, dtype=f.dtype, device=f.device)
    width = (hi - lo) / (bins - 1)
    s = 0.5 * width if sigma is None else float(sigma)

    def weights(v: torch.Tensor) -> torch.Tensor:
        v = v.clamp(lo, hi)
        k = torch.exp(-0.5 * ((v[:, None] - centres[None, :]) / s) ** 2)
        return k / (k.sum(dim=1, keepdim=True) + eps)

    wf, ww = weights(f), weights(w)
    if v is None:
        joint = wf.t() @ ww / f.numel()
    else:
        joint = (wf * v[:, None]).t() @ ww / v.sum().clamp_min(1e-12)
    pf = joint.sum(dim=1, keepdim=True)
    pw = joint.sum(dim=0, keepdim=True)
    mi = torch.sum(joint * (torch.log(joint + eps) - torch.log(pf * pw + eps)))
    return -mi


# The six neighbours of the 6-neighbourhood (unit offsets) and the 12 pairs of them that are sqrt(2) apart
_SIX = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_SSC_PAIRS = [(a, b) for a in range(6) for b in range(a + 1, 6)
              if sum((p - q) ** 2 for p, q in zip(_SIX[a], _SIX[b])) == 2]


def _canonical(v: tuple[int, ...]) -> bool:
    """True if the first non-zero component of ``v`` is positive (one of each pair ``v``, ``-v``)."""
    return next(c for c in v if c != 0) > 0


_MIND_SLAB_VALUES = 1 << 20  # values per slab of ``mind_ssc(channels_last=True)``: ~4 MB, cache-sized


def mind_ssc(image: torch.Tensor, *, radius: int = 1, dilation: int = 1, eps: float = 1e-6,
             channels_last: bool = False) -> torch.Tensor:
    """MIND-SSC self-similarity context descriptors.

    For the 12 pairs ``(p, q)`` of 6-neighbourhood offsets (scaled by ``dilation``) that lie ``sqrt(2)``
    apart, ``D_pq(x)`` is the mean over the ``(2 radius + 1)^3`` box around ``x`` of ``(I(z + p) - I(z + q))^2``
    (the image continued by edge replication); the descriptor is ``exp(-(D - min_pq D) / V)`` with ``V`` the
    mean of ``D - min D`` over the 12 channels, clamped to ``[0.001, 1000] * mean(V)`` so flat regions stay
    finite.

    Computed from the 6 distinct diagonal difference images ``(I(y + v) - I(y))^2`` (each pair is one of them,
    shifted), box-summed once each by shifted additions (``avg_pool3d`` with a 3 x 1 x 1 kernel is several times
    slower on a CPU); the minimum and mean over the 12 channels are accumulated over views of those 6 images and
    the descriptors written into one output tensor (no 12-channel temporaries): about 4 times faster than
    stacking and pooling, e.g. ~0.6 s instead of ~2.5 s for a 192 x 160 x 256 image on one CPU thread.

    Args:
        image: ``(B, 1, X, Y, Z)`` float tensor.
        radius: half-width of the patch box in voxels (default 1).
        dilation: neighbour distance in voxels (default 1).
        channels_last: return the descriptors in channels-last memory (``torch.channels_last_3d``: a voxel's 12
            values next to each other, as the align engine reads the moving image's), written slab by slab
            instead of converting the whole tensor afterwards (one pass over ~380 MB fewer at 2 mm); the same
            values.

    Returns:
        ``(B, 12, X, Y, Z)`` descriptors in (0, 1]. Not differentiable (features, computed once per image; in-place
        arithmetic): an image that requires a gradient while autograd is on is an :class:`InputError`.
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise InputError(f"mind_ssc: expected a (B, 1, X, Y, Z) image, got {tuple(image.shape)}")
    d, r = int(dilation), int(radius)
    if d < 1 or r < 0:
        raise InputError(f"mind_ssc: need dilation >= 1 and radius >= 0, got {dilation}, {radius}")
    if image.requires_grad and torch.is_grad_enabled():
        raise InputError("mind_ssc: computes features without gradients; call it under torch.no_grad() or on a "
                         "detached image")
    size = image.shape[2:]
    m = d + r
    # padded by m for the patches and by d more for the shift v of the difference images (|v_a| <= d)
    padded = F.pad(image, [m + d] * 6, mode="replicate")
    n = [s + 2 * m for s in size]  # E_v on image indices -m .. s + m - 1, i.e. padded indices d .. d + n - 1
    lo = padded[:, :, d: d + n[0], d: d + n[1], d: d + n[2]]
    summed: dict[tuple[int, ...], torch.Tensor] = {}
    channels = []
    for ia, ib in _SSC_PAIRS:
        a = tuple(d * c for c in _SIX[ia])
        b = tuple(d * c for c in _SIX[ib])
        v = tuple(x - y for x, y in zip(a, b))
        # D_ab(x) = box-mean of E_v(z + base), with E_v(y) = (I(y + v) - I(y))^2 and base = b (or a for -v)
        if not _canonical(v):
            v, base = tuple(-c for c in v), a
        else:
            base = b
        if v not in summed:
            diff = padded[:, :, d + v[0]: d + v[0] + n[0], d + v[1]: d + v[1] + n[1], d + v[2]: d + v[2] + n[2]] - lo
            summed[v] = _box_sum_valid(diff.mul_(diff), r)  # index i <-> image index i - d
        f = summed[v]
        channels.append(f[:, :, d + base[0]: d + base[0] + size[0], d + base[1]: d + base[1] + size[1],
                          d + base[2]: d + base[2] + size[2]])
    # box sums = (2r + 1)^3 box means; min and mean over the channels accumulated channel by channel
    k = float((2 * r + 1) ** 3)
    low = channels[0].clone()
    total = channels[0].clone()
    for c in channels[1:]:
        torch.minimum(low, c, out=low)
        total.add_(c)
    var = (total.div_(len(channels)) - low).div_(k)  # the mean of D - min D over the channels (box means)
    mean_var = var.mean()
    var = var.clamp_(mean_var * 0.001 + eps, mean_var * 1000 + eps)
    scale = var.mul_(-k).reciprocal_()  # exp(-(D - min D) / V) with D in box sums
    n_ch = len(channels)
    if not channels_last:
        out = torch.empty((image.shape[0], n_ch, *size), dtype=image.dtype, device=image.device)
        _mind_channels(channels, low, scale, out, slice(None))
        return out.exp_()
    out_cl = torch.empty((image.shape[0], *size, n_ch), dtype=image.dtype, device=image.device)
    rows = max(1, _MIND_SLAB_VALUES // max(1, n_ch * size[1] * size[2]))
    tmp = torch.empty((image.shape[0], n_ch, rows, *size[1:]), dtype=image.dtype, device=image.device)
    for x0 in range(0, size[0], rows):
        part = tmp[:, :, : min(rows, size[0] - x0)]
        _mind_channels(channels, low, scale, part, slice(x0, x0 + part.shape[2]))
        out_cl[:, x0: x0 + part.shape[2]] = part.exp_().permute(0, 2, 3, 4, 1)
    return out_cl.permute(0, 4, 1, 2, 3)


def _mind_channels(channels: list[torch.Tensor], low: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                   rows: slice) -> None:
    """``out[:, i] = (D_i - min D) * scale`` for the first-axis voxels ``rows`` (the exponent of MIND-SSC)."""
    for i, c in enumerate(channels):
        o = out[:, i: i + 1]
        torch.sub(c[:, :, rows], low[:, :, rows], out=o)
        o.mul_(scale[:, :, rows])


def _box_sum_valid(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Box sum without padding: output shrinks by ``2 radius`` per axis (separable: shifted additions per axis)."""
    out = x
    for axis in range(3):
        if radius <= 0:
            break
        dim = 2 + axis
        n = out.shape[dim] - 2 * radius
        acc = out.narrow(dim, 0, n).clone()
        for j in range(1, 2 * radius + 1):
            acc.add_(out.narrow(dim, j, n))
        out = acc
    return out


def mind_loss(fixed_mind: torch.Tensor, warped_mind: torch.Tensor, *,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """SSD of MIND descriptors: the mean over voxels of the channel-averaged squared difference; ``weight``:
    module docstring."""
    _check_pair(fixed_mind, warped_mind, "mind_loss")
    _check_weight(weight, fixed_mind, "mind_loss")
    return weighted_mean((fixed_mind - warped_mind) ** 2, weight)


@dataclass(frozen=True)
class Similarity:
    """A similarity measure as the engine uses it: features computed once per image and level, then a loss
    between the fixed features and the warped moving features.

    Attributes:
        name: key in :data:`SIMILARITIES`.
        features: ``(B, 1, X, Y, Z)`` image -> ``(B, C, X, Y, Z)`` features (keyword arguments from the config).
        loss: ``(fixed_features, warped_features, *, weight=None, **kwargs)`` -> scalar tensor, lower is better
            (``weight``: optional ``(B, 1, X, Y, Z)`` voxel weights, see the module docstring).
        feature_kwargs: names of config keys that go to ``features``; the others go to ``loss``.
        channels_last: ``features`` takes ``channels_last=True`` and then returns channels-last memory itself
            (cheaper than converting afterwards; the engine stores the moving features that way).
    """

    name: str
    features: Callable[..., torch.Tensor]
    loss: Callable[..., torch.Tensor]
    feature_kwargs: tuple[str, ...] = ()
    channels_last: bool = False

    def split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        feat = {k: v for k, v in kwargs.items() if k in self.feature_kwargs}
        loss = {k: v for k, v in kwargs.items() if k not in self.feature_kwargs}
        return feat, loss


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


SIMILARITIES: dict[str, Similarity] = {
    "mse": Similarity("mse", _identity, mse_loss),
    "ncc": Similarity("ncc", _identity, ncc_loss),
    "lncc": Similarity("lncc", _identity, lncc_loss),
    "ngf": Similarity("ngf", _identity, ngf_loss),
    "mi": Similarity("mi", _identity, mi_loss),
    "mind": Similarity("mind", mind_ssc, mind_loss, ("radius", "dilation"), channels_last=True),
}


def get_similarity(name: str) -> Similarity:
    """The :class:`Similarity` called ``name``; an unknown name raises :class:`InputError` listing the known."""
    if name not in SIMILARITIES:
        raise InputError(f"similarity: unknown measure {name!r}; known: {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]
