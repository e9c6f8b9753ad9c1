"""The one sampler, and warping and composing displacement fields with it (voxels, fixed -> moving; see
:mod:`slicreg.conventions`).

:func:`sample` reads values at positions given in voxels of their grid, with an explicit interpolation rule, an
explicit padding rule and a backend; :func:`sample_affine` does the same for positions that are an affine map
of another grid's voxels (resampling a volume onto another grid). Everything in the project that samples a
volume calls one of the two: warping images and label maps, composing and integrating fields, the align
engine's differentiable warps (:func:`slicreg.alignment.transforms.grid_warp`), the keypoint flow's feature reads,
the transfer of supervoxels, deeds' and Learn2Reg's label rules, the inference geometry's resampling, the
cohort maker's big volumes and the training augmentation.

Interpolation (``interpolation``):

- ``"linear"``: trilinear;
- ``"nearest"``: the nearest voxel, halves rounded up (``floor(p + 0.5)``, as ``scipy.ndimage``);
- ``"round"``: the nearest voxel by C's ``round`` (halves away from zero), as deeds.

Padding (``padding``), i.e. what a position outside the grid reads:

- ``"border"``: positions are clamped to ``[0, S - 1]``: the edge value continues outwards (intensities, fields);
- ``"zeros"``: ``fill`` (default 0) at every position outside ``[0, S - 1]`` on any axis -- exactly
  ``scipy.ndimage.map_coordinates(..., mode="constant", cval=fill)``, which Learn2Reg's evaluation uses for
  label maps with ``order=0``;
- ``"zero_voxels"``: the grid is surrounded by voxels of value 0 that take part in the interpolation: a trilinear
  sample fades to 0 within one voxel outside, a nearest sample reads the edge voxel up to half a voxel outside
  -- torch's ``grid_sample(..., padding_mode="zeros")``;
- ``"clamp"``: deeds' rule: each of the 8 neighbour indices (trilinear), or the rounded index (nearest), is
  clamped to the grid. The same values as ``"border"`` up to float rounding outside the grid; it exists so that
  deeds' outputs are reproduced bit for bit.

Backends (``backend``); each implements the rules listed for it exactly (another combination is an
:class:`~slicreg.errors.InputError`), and tests/test_sampler.py compares them with each other:

- ``"gather"`` (default; linear, nearest, round x border, zeros, zero_voxels, clamp): the reference. Reads the
  neighbours by index, so an integer position returns the stored value bit for bit -- a zero field reproduces
  the input exactly and an integer shift is an exact shift; weights and sums in the values' floating dtype
  (float32 for integer values), so float64 values give deeds' float64 arithmetic. Any device; torch or numpy.
- ``"grid_sample"`` (linear, nearest x border, zero_voxels): torch's fused ``grid_sample`` kernel, for speed
  (several times cheaper than the gather on a CPU for a whole volume: docs/register.md, "What each step
  costs"; ``benchmarks/bench_sampler.py``) and for autograd through the
  *positions* (the align engine); batched. Voxel positions become normalised coordinates here and nowhere else
  (:func:`slicreg.grid.vox_to_normalised`, ``align_corners`` passed explicitly; the conversion accounts for it,
  so both settings give the same values up to float rounding). Not exact at integer positions (the normalised
  coordinates round); ``"nearest"`` rounds exact halves to even, as torch does.
- ``"scipy"`` (linear, nearest x border, zeros): ``scipy.ndimage.map_coordinates`` (``affine_transform`` in
  :func:`sample_affine`, without a coordinate array); numpy, float64 arithmetic: exactly Learn2Reg's label warp.
- ``"channels_last"`` (linear x border): many channels at scattered points, e.g. the keypoint flow's 256
  features at 2048 keypoints in every Adam iteration, the align engine's 12 MIND-SSC channels at its sub-lattice.
  Each point reads its 8 neighbours' ``C`` contiguous values from channels-last memory (the two along the last
  axis as one row of ``2 C``) and one batched 1 x 8 product combines them: several times faster than
  ``grid_sample`` on a CPU with many channels (``benchmarks/bench_flow.py``), with the same values and gradients;
  the gradient flows to the positions only (the values are data).
- ``"separable"`` (:func:`sample_affine` only; linear x border): an axis-aligned map (diagonal linear part) as three
  matrix products with per-axis interpolation weights; differentiable in the values (the align engine's parameter
  grid read at its sub-lattice in every iteration, the thin-plate spline's coarse grid upsampled).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from slicreg.errors import InputError
from slicreg.grid import Grid, displaced_positions, identity_grid_vox, map_points, vox_to_normalised

__all__ = ["sample", "sample_affine", "BACKENDS", "warp_image", "warp_labels", "compose", "apply_affine_vox",
           "jacobian_determinant", "scaling_and_squaring"]

Interpolation = Literal["linear", "nearest", "round"]
Padding = Literal["border", "zeros", "zero_voxels", "clamp"]
Backend = Literal["gather", "grid_sample", "scipy", "channels_last", "separable"]

_INTERPOLATIONS = ("linear", "nearest", "round")
_PADDINGS = ("border", "zeros", "zero_voxels", "clamp")

#: The rules each backend implements exactly: ``backend -> (interpolations, paddings)``.
BACKENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gather": (_INTERPOLATIONS, _PADDINGS),
    "grid_sample": (("linear", "nearest"), ("border", "zero_voxels")),
    "scipy": (("linear", "nearest"), ("border", "zeros")),
    "channels_last": (("linear",), ("border",)),
    "separable": (("linear",), ("border",)),
}

_CHUNK = 1 << 23  # positions per gather pass (a 192 x 160 x 256 volume is one): bounds the temporaries


def _torch():
    import torch

    return torch


def _to_tensor(x: Any, device: Any, dtype: Any = None) -> Any:
    torch = _torch()
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)


def _check_rules(interpolation: str, padding: str, backend: str, fill: float) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if interpolation not in _INTERPOLATIONS:
        raise InputError(f"interpolation: expected one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")
    if padding not in _PADDINGS:
        raise InputError(f"padding: expected one of {', '.join(_PADDINGS)}, got {padding!r}")
    interps, pads = BACKENDS[backend]
    if interpolation not in interps or padding not in pads:
        raise InputError(f"backend {backend!r}: implements interpolation {', '.join(interps)} with padding "
                         f"{', '.join(pads)}; got interpolation={interpolation!r}, padding={padding!r}")
    if fill != 0 and padding != "zeros":
        raise InputError(f"fill: only padding='zeros' takes a fill value, got fill={fill!r} with padding={padding!r}")


def sample(values: Any, coords_vox: Any, *, interpolation: Interpolation = "linear", padding: Padding = "border",
           backend: Backend = "gather", fill: float = 0.0, align_corners: bool = True) -> Any:
    """Sample a volume at positions in voxels of its grid (see the module docstring for the rules).

    Args:
        values: ``(X, Y, Z)``, ``(C, X, Y, Z)`` or, batched, ``(B, C, X, Y, Z)``; torch tensor or numpy array.
            ``backend="channels_last"`` reads ``(C, X, Y, Z)`` whose memory is channels-last (a permuted view of a
            contiguous ``(X, Y, Z, C)``) without a copy; other memory is copied on every call.
        coords_vox: ``(3, *S)`` positions in voxels along array axes 0, 1, 2 (any ``S``, e.g. ``(X', Y', Z')`` or
            ``(N,)``); ``(B, 3, *S)`` for batched values.
        interpolation: ``"linear"``, ``"nearest"`` or ``"round"`` (keyword-only, as all below).
        padding: ``"border"``, ``"zeros"``, ``"zero_voxels"`` or ``"clamp"``.
        backend: ``"gather"`` (default), ``"grid_sample"``, ``"scipy"`` or ``"channels_last"``.
        fill: the value outside the grid with ``padding="zeros"`` (default 0).
        align_corners: passed to ``grid_sample`` (backend ``"grid_sample"`` only; the result does not depend on
            it beyond float rounding). Default True: voxel centres are ``grid_sample``'s grid nodes.

    Returns:
        ``(*S)``, ``(C, *S)`` or ``(B, C, *S)`` on the device of ``values``; numpy in -> numpy out. Nearest keeps the
        dtype of ``values`` (``channels_last``: always floating); trilinear is floating (the values' floating
        dtype, float32 for integer values).
    """
    torch = _torch()
    _check_rules(interpolation, padding, backend, fill)
    numpy_in = not isinstance(values, torch.Tensor)
    ndim = np.ndim(values)
    if ndim not in (3, 4, 5):
        raise InputError(f"sample: values must be (X, Y, Z), (C, X, Y, Z) or (B, C, X, Y, Z), got shape "
                         f"{tuple(np.shape(values))}")
    batched = ndim == 5
    cshape = tuple(np.shape(coords_vox))
    if len(cshape) < (2 if batched else 1) or cshape[1 if batched else 0] != 3 or (
            batched and cshape[0] != np.shape(values)[0]):
        want = "(B, 3, ...) with the batch size of values" if batched else "(3, ...)"
        raise InputError(f"sample: coords_vox must be {want}, got {cshape} for values {tuple(np.shape(values))}")
    if backend == "separable":
        raise InputError("sample: backend 'separable' resamples onto a grid by an axis-aligned map; use sample_affine")
    if backend == "scipy":
        return _sample_scipy(values, coords_vox, interpolation, padding, fill, numpy_in)
    vals = values if not numpy_in else torch.from_numpy(np.ascontiguousarray(values))
    coords = _to_tensor(coords_vox, vals.device)
    if backend == "grid_sample":
        vol = vals[None, None] if ndim == 3 else (vals[None] if ndim == 4 else vals)
        out = _sample_grid_sample(vol, coords if batched else coords[None], interpolation, padding, align_corners)
        out = out[0, 0] if ndim == 3 else (out[0] if ndim == 4 else out)
    else:
        def one(v: Any, c: Any) -> Any:  # (C, X, Y, Z) at (3, *S) -> (C, *S)
            if backend == "channels_last":
                return _sample_channels_last(v, c)
            return _sample_gather(v, c, interpolation, padding, fill)

        if batched:
            out = torch.stack([one(v, c) for v, c in zip(vals, coords)])
        else:  # no batch axes added and removed: the flow's autograd loop calls this every iteration
            out = one(vals if ndim == 4 else vals[None], coords)
            out = out[0] if ndim == 3 else out
    return out.cpu().numpy() if numpy_in else out


# ------------------------------------------------------------------------------------------------ gather
def _round_half_away(p: Any) -> Any:
    """C's ``round``: the nearest integer, halves away from zero (exact, in the dtype of ``p``)."""
    torch = _torch()
    t = torch.trunc(p)
    return t + torch.sign(p) * ((p - t).abs() >= 0.5).to(p.dtype)


def _sample_gather(vol: Any, coords: Any, interpolation: str, padding: str, fill: float) -> Any:
    """``vol (C, X, Y, Z)`` at ``coords (3, *S)`` -> ``(C, *S)`` by reading the neighbours by index."""
    torch = _torch()
    n_ch, size = vol.shape[0], tuple(int(s) for s in vol.shape[1:])
    out_shape = coords.shape[1:]
    pos = coords.reshape(3, -1)
    flat = vol.reshape(n_ch, -1)
    nearest = interpolation != "linear"
    work = vol.dtype if (nearest or vol.dtype.is_floating_point) else torch.float32
    if not nearest:
        flat = flat.to(work)

    # trilinear weights come from positions in the less precise of their dtype and the working dtype: float32
    # positions of float64 values give deeds' arithmetic (fractions in float32, weights and sums in float64)
    pos_dtype = pos.dtype if pos.dtype.is_floating_point and pos.dtype.itemsize < work.itemsize else work

    def part(p: Any) -> Any:
        valid = _inside(p, size) if padding == "zeros" else None  # on the positions as given
        if nearest:
            return _gather_nearest(flat, p, size, interpolation, padding, fill, valid)
        return _gather_linear(flat, p.to(pos_dtype), size, padding, fill, valid)

    n = pos.shape[1]
    if n <= _CHUNK:
        return part(pos).reshape(n_ch, *out_shape)
    out = torch.empty(n_ch, n, dtype=flat.dtype, device=flat.device)
    for start in range(0, n, _CHUNK):
        out[:, start:start + _CHUNK] = part(pos[:, start:start + _CHUNK])
    return out.reshape(n_ch, *out_shape)


def _strides(size: Sequence[int]) -> tuple[int, int, int]:
    return (size[1] * size[2], size[2], 1)


def _inside(pos: Any, size: Sequence[int]) -> Any:
    """Positions within ``[0, S - 1]`` on every axis."""
    torch = _torch()
    inside = torch.ones(pos.shape[1], dtype=torch.bool, device=pos.device)
    for a in range(3):
        inside &= (pos[a] >= 0) & (pos[a] <= size[a] - 1)
    return inside


def _gather_nearest(flat: Any, pos: Any, size: Sequence[int], interpolation: str, padding: str, fill: float,
                    valid: Any) -> Any:
    """The nearest (``"nearest"``: ``floor(p + 0.5)``; ``"round"``: C's round) voxel of ``pos (3, P)``."""
    torch = _torch()
    strides = _strides(size)
    if padding in ("border", "zeros"):
        # clamping never changes a sample that counts: inside positions are unchanged, outside ones are replaced
        pos = torch.stack([pos[a].clamp(0, size[a] - 1) for a in range(3)])
    idx = torch.floor(pos + 0.5) if interpolation == "nearest" else _round_half_away(pos)
    if padding == "zero_voxels":
        valid = torch.ones(pos.shape[1], dtype=torch.bool, device=pos.device)
        for a in range(3):
            valid &= (idx[a] >= 0) & (idx[a] <= size[a] - 1)
    if padding in ("clamp", "zero_voxels"):  # rounded from unclamped positions: clamp the index
        idx = torch.stack([idx[a].clamp(0, size[a] - 1) for a in range(3)])
    idx = idx.to(torch.int64)
    out = flat[:, idx[0] * strides[0] + idx[1] * strides[1] + idx[2]]
    if valid is not None:
        out = torch.where(valid, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))
    return out


def _gather_linear(flat: Any, pos: Any, size: Sequence[int], padding: str, fill: float, valid: Any) -> Any:
    """Trilinear interpolation of ``flat (C, N_voxels)`` (floating, the working dtype) at ``pos (3, P)``;
    ``valid`` (``"zeros"``): the positions inside the grid, the others take ``fill``."""
    torch = _torch()
    strides = _strides(size)
    base = torch.zeros(pos.shape[1], dtype=torch.int64, device=pos.device)  # flat index of the lower corner
    offsets, weights = [], []  # per axis: flat offsets of the (lower, upper) neighbour, and their weights
    if padding in ("border", "zeros"):
        for a in range(3):
            # lower corner clamped to [0, S - 2] so the upper corner is always on the grid; at the last voxel
            # this gives frac = 1, all weight on the upper corner. Weights of 0 and 1 are exact, so integer
            # positions return the stored values bit for bit.
            p = pos[a].clamp(0, size[a] - 1)
            lo = torch.floor(p).clamp(0, max(size[a] - 2, 0))
            frac = (p - lo).to(flat.dtype)
            base += lo.to(torch.int64) * strides[a]
            offsets.append((0, strides[a] if size[a] > 1 else 0))
            weights.append((1 - frac, frac))
    else:  # "clamp" (deeds) or "zero_voxels" (grid_sample's zeros): neighbours of the unclamped position
        for a in range(3):
            lo = torch.floor(pos[a])
            frac = (pos[a] - lo).to(flat.dtype)
            i0 = lo.to(torch.int64)
            i1 = i0 + 1
            w0, w1 = 1 - frac, frac
            if padding == "zero_voxels":
                w0 = w0 * ((i0 >= 0) & (i0 <= size[a] - 1)).to(w0.dtype)
                w1 = w1 * ((i1 >= 0) & (i1 <= size[a] - 1)).to(w1.dtype)
            i0, i1 = i0.clamp(0, size[a] - 1), i1.clamp(0, size[a] - 1)
            base += i0 * strides[a]
            offsets.append((0, (i1 - i0) * strides[a]))
            weights.append((w0, w1))
    out = torch.zeros(flat.shape[0], pos.shape[1], dtype=flat.dtype, device=flat.device)
    # corners in the order (b0, b1, b2), b0 slowest; weight ((w0 * w1) * w2) as deeds computes it
    for b0 in (0, 1):
        for b1 in (0, 1):
            w01 = weights[0][b0] * weights[1][b1]
            off01 = offsets[0][b0] + offsets[1][b1]
            for b2 in (0, 1):
                out += flat[:, base + (off01 + offsets[2][b2])] * (w01 * weights[2][b2])
    if valid is not None:
        out = torch.where(valid, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))
    return out


# ------------------------------------------------------------------------------------------- grid_sample
def _sample_grid_sample(vol: Any, coords: Any, interpolation: str, padding: str, align_corners: bool) -> Any:
    """``vol (B, C, X, Y, Z)`` at ``coords (B, 3, *S)`` through ``torch.nn.functional.grid_sample``."""
    torch = _torch()
    vol_f = vol if vol.dtype.is_floating_point else vol.float()
    spatial = tuple(coords.shape[2:])
    size = tuple(vol.shape[2:])
    # voxel -> normalised in the dtype of the positions, then the values' dtype (grid_sample needs one dtype)
    grids = [vox_to_normalised(c, size, align_corners=align_corners) for c in coords]
    grid = (grids[0][None] if len(grids) == 1 else torch.stack(grids)).to(vol_f.dtype)
    if len(spatial) != 3:
        grid = grid.reshape(grid.shape[0], 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(vol_f, grid, mode="bilinear" if interpolation == "linear" else "nearest",
                                          padding_mode="border" if padding == "border" else "zeros",
                                          align_corners=bool(align_corners))
    out = out.reshape(*out.shape[:2], *spatial)
    return out.to(vol.dtype) if interpolation != "linear" and not vol.dtype.is_floating_point else out


# ----------------------------------------------------------------------------------------- channels_last
_TRILINEAR_FN = None


def _trilinear_rows():
    """The autograd function of the channels-last read (built on first use: torch is imported lazily here).

    ``forward(corners (N, 8, C), frac (N, 3)) -> (N, C)``: the trilinear combination of each point's 8 corner rows
    (corner ``(b0, b1, b2)`` at ``4 b0 + 2 b1 + b2``) with the weights of its fractions. ``backward`` gives the
    gradient of the fractions only, from the corner rows directly (the differences of neighbouring corners times the
    other two axes' weights): the values are data, not parameters. This replaces autograd's graph of the weight
    products (~2x the forward's cost in broadcasts and reductions)."""
    global _TRILINEAR_FN
    if _TRILINEAR_FN is None:
        torch = _torch()

        def axis_weights(frac: Any) -> Any:  # (3, 2, N): (1 - f, f) per axis, points last (the faster layout)
            f = frac.t()
            return torch.stack([1.0 - f, f], dim=1)

        class TrilinearRows(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, corners: Any, frac: Any) -> Any:
                w = axis_weights(frac)
                weights = (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]).reshape(8, -1)
                ctx.save_for_backward(corners, frac)
                return torch.bmm(corners.transpose(1, 2), weights.t()[:, :, None])[:, :, 0]

            @staticmethod
            def backward(ctx: Any, grad_out: Any) -> Any:
                corners, frac = ctx.saved_tensors
                # dL/dw for each corner, then dw/df: along axis a the weight is (1 - f_a) or f_a, so dL/df_a is the
                # difference of the upper and lower corners' dL/dw times the other two axes' weights
                g = torch.bmm(corners, grad_out[:, :, None])[:, :, 0].t().reshape(2, 2, 2, -1)
                w = axis_weights(frac)
                gx = ((g[1] - g[0]) * (w[1][:, None] * w[2][None, :])).sum((0, 1))
                gy = ((g[:, 1] - g[:, 0]) * (w[0][:, None] * w[2][None, :])).sum((0, 1))
                gz = ((g[:, :, 1] - g[:, :, 0]) * (w[0][:, None] * w[1][None, :])).sum((0, 1))
                return None, torch.stack([gx, gy, gz], dim=1)

        _TRILINEAR_FN = TrilinearRows
    return _TRILINEAR_FN


def _sample_channels_last(vol: Any, coords: Any) -> Any:
    """``vol (C, X, Y, Z)`` (channels-last memory) at ``coords (3, *S)`` -> ``(C, *S)``, trilinear, border.

    Positions are clamped (border padding), so this is ``grid_sample(..., mode="bilinear",
    padding_mode="border", align_corners=True)``; autograd flows through the positions only (the values are
    read as data: a gradient for them is never computed)."""
    torch = _torch()
    if not vol.dtype.is_floating_point or min(vol.shape[1:]) < 2:
        raise InputError(f"sample: backend 'channels_last' needs floating values with every spatial size >= 2, "
                         f"got {tuple(vol.shape)} {vol.dtype}")
    feats_cl = vol.detach().permute(1, 2, 3, 0)
    if not feats_cl.is_contiguous():
        feats_cl = feats_cl.contiguous()
    out_shape = coords.shape[1:]
    points = coords.reshape(3, -1).t()  # (N, 3)
    size = feats_cl.shape[:3]
    n_ch = feats_cl.shape[3]
    dev = points.device
    upper = torch.tensor([s - 1 for s in size], dtype=feats_cl.dtype, device=dev)
    pos = torch.clamp(points.to(feats_cl.dtype), min=torch.zeros_like(upper), max=upper)  # border
    lo = torch.minimum(torch.floor(pos.detach()), upper - 1)  # lo + 1 stays on the grid
    frac = pos - lo  # in [0, 1]; differentiable in pos
    strides = torch.tensor([size[1] * size[2], size[2], 1], dtype=torch.long, device=dev)
    # corners (b0, b1, b2), b0 slowest: the two corners along the last axis are neighbouring rows of C values in
    # channels-last memory, so each (b0, b1) reads one row of 2 C values (4 reads per point instead of 8); lo + 1
    # stays on the grid, so a row never runs past the end
    bits = torch.tensor([[(c >> 1) & 1, c & 1] for c in range(4)], dtype=torch.long, device=dev)
    idx = (lo.long() * strides).sum(dim=1, keepdim=True) + (bits * strides[:2]).sum(dim=1)[None]  # (N, 4)
    flat = feats_cl.reshape(-1, n_ch)
    pairs = flat.as_strided((flat.shape[0] - 1, 2 * n_ch), (n_ch, 1))  # row i: voxels i and i + 1
    corners = pairs.index_select(0, idx.reshape(-1)).reshape(-1, 8, n_ch)  # (N, 8, C)
    out = _trilinear_rows().apply(corners, frac)  # (N, C)
    return out.t() if len(out_shape) == 1 else out.t().reshape(n_ch, *out_shape)


# ------------------------------------------------------------------------------------------------- scipy
_SCIPY_MODE = {"border": "nearest", "zeros": "constant"}


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _sample_scipy(values: Any, coords_vox: Any, interpolation: str, padding: str, fill: float,
                  numpy_in: bool) -> Any:
    """``scipy.ndimage.map_coordinates`` per channel (and batch element); float64 arithmetic."""
    from scipy import ndimage

    vals = _numpy(values)
    coords = _numpy(coords_vox)
    order = 1 if interpolation == "linear" else 0
    out_dtype = vals.dtype if order == 0 else (np.float64 if vals.dtype == np.float64 else np.float32)

    def one(vol: np.ndarray, pts: np.ndarray) -> np.ndarray:  # (C, X, Y, Z) at (3, *S)
        return np.stack([ndimage.map_coordinates(vol[c], pts, order=order, mode=_SCIPY_MODE[padding], cval=fill,
                                                 prefilter=False, output=out_dtype) for c in range(vol.shape[0])])

    if vals.ndim == 5:
        out = np.stack([one(vals[b], coords[b]) for b in range(vals.shape[0])])
    else:
        out = one(vals if vals.ndim == 4 else vals[None], coords)
        out = out if vals.ndim == 4 else out[0]
    if numpy_in:
        return out
    return _torch().from_numpy(out).to(values.device)


# ------------------------------------------------------------------------------------------ affine maps
def sample_affine(values: Any, index_map: Any, out_shape: Sequence[int], *, interpolation: Interpolation = "linear",
                  padding: Padding = "border", backend: Backend = "scipy", fill: float = 0.0,
                  align_corners: bool = False) -> Any:
    """Resample ``values`` onto another grid: ``out[x] = values(index_map @ x)`` for every voxel ``x`` of a grid
    of ``out_shape`` (the rules of :func:`sample`).

    ``index_map`` is the 4x4 voxel map from the output grid to the grid of ``values``, e.g.
    ``Grid(out_shape, out_affine).vox_map(Grid.of(volume))``.

    Args:
        values: ``(X, Y, Z)``, ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``; numpy array or torch tensor.
        index_map: ``(4, 4)``, or ``(B, 4, 4)`` (one map per batch element), output voxel -> input voxel.
        out_shape: ``(X', Y', Z')``.
        interpolation, padding, fill: as :func:`sample`.
        backend: how (keyword-only):

            - ``"scipy"`` (default): ``scipy.ndimage.affine_transform`` per channel, no coordinate array (a
              diagonal linear part takes scipy's faster zoom-and-shift path); numpy, float64 arithmetic;
            - ``"grid_sample"``: ``F.affine_grid`` with the map in normalised coordinates
              (``Grid.normalised_matrix``) and one fused ``grid_sample`` over the whole batch: the training
              augmentation's path (one pass per batch, no voxel coordinates materialised);
            - ``"gather"``: positions computed in float64 slabs of about a million voxels along the last axis,
              rounded to float32 (float64 for float64 values), then :func:`sample` (exact at integer positions,
              bounded memory for big volumes).
        align_corners: ``grid_sample``'s setting (``"grid_sample"`` only; default False, as ``F.affine_grid``
            in the reference's augmentation). The result does not depend on it beyond float rounding.

    Returns:
        ``(X', Y', Z')``, ``(C, X', Y', Z')`` or ``(B, C, X', Y', Z')`` (dtypes as :func:`sample`; ``"scipy"``
        trilinear gives float32 unless the values are float64); numpy in -> numpy out.
    """
    torch = _torch()
    _check_rules(interpolation, padding, backend, fill)
    if backend == "channels_last":
        raise InputError("sample_affine: backend 'channels_last' samples scattered points; use sample")
    out_shape = Grid(out_shape).shape
    ndim = np.ndim(values)
    if ndim not in (3, 4, 5):
        raise InputError(f"sample_affine: values must be (X, Y, Z), (C, X, Y, Z) or (B, C, X, Y, Z), got shape "
                         f"{tuple(np.shape(values))}")
    maps = _numpy(index_map).astype(np.float64)
    batch = np.shape(values)[0] if ndim == 5 else 1
    if maps.shape == (4, 4):
        maps = np.broadcast_to(maps, (batch, 4, 4))
    if maps.shape != (batch, 4, 4) or not np.all(np.isfinite(maps)):
        raise InputError(f"index_map: expected a finite (4, 4) matrix (or (B, 4, 4) for batched values), got "
                         f"{tuple(np.shape(index_map))}")
    numpy_in = not isinstance(values, torch.Tensor)
    if backend in ("separable", "grid_sample"):  # torch, the whole batch at once
        vals = values if not numpy_in else torch.from_numpy(np.ascontiguousarray(values))
        vol = vals[None, None] if ndim == 3 else (vals[None] if ndim == 4 else vals)
        out = _affine_separable(vol, maps, out_shape) if backend == "separable" else \
            _affine_grid_sample(vol, maps, out_shape, interpolation, padding, align_corners)
        out = out[0, 0] if ndim == 3 else (out[0] if ndim == 4 else out)
        return out.cpu().numpy() if numpy_in else out
    lead = np.shape(values)[:-3]
    vol = values if ndim == 5 else (values[None, None] if ndim == 3 else values[None])
    outs = [_affine_one(vol[b], maps[b], out_shape, interpolation, padding, backend, fill) for b in range(batch)]
    if numpy_in:
        return np.stack(outs).reshape(*lead, *out_shape)
    return torch.stack(outs).reshape(*lead, *out_shape)


def _affine_one(vol: Any, matrix: np.ndarray, out_shape: tuple[int, int, int], interpolation: str, padding: str,
                backend: str, fill: float) -> Any:
    """One ``(C, X, Y, Z)`` volume resampled by one 4x4 map (backends ``"scipy"`` and ``"gather"``)."""
    torch = _torch()
    if backend == "scipy":
        from scipy import ndimage

        vals = _numpy(vol)
        order = 1 if interpolation == "linear" else 0
        out_dtype = vals.dtype if order == 0 else (np.float64 if vals.dtype == np.float64 else np.float32)
        linear = matrix[:3, :3]
        lin = np.diag(linear) if np.allclose(linear, np.diag(np.diag(linear))) else linear
        out = np.stack([ndimage.affine_transform(vals[c], lin, offset=matrix[:3, 3], output_shape=out_shape,
                                                 order=order, mode=_SCIPY_MODE[padding], cval=fill,
                                                 prefilter=False, output=out_dtype) for c in range(vals.shape[0])])
        return out if not isinstance(vol, torch.Tensor) else torch.from_numpy(out).to(vol.device)
    vals = vol if isinstance(vol, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(vol))
    pos_dtype = torch.float64 if vals.dtype == torch.float64 else torch.float32
    out = torch.empty(vals.shape[0], *out_shape, dtype=vals.dtype if interpolation != "linear" else
                      (vals.dtype if vals.dtype.is_floating_point else torch.float32), device=vals.device)
    step = max(1, _CHUNK // max(1, out_shape[0] * out_shape[1]))
    ramps = [torch.arange(s, dtype=torch.float64, device=vals.device) for s in out_shape[:2]]
    for z0 in range(0, out_shape[2], step):
        z1 = min(out_shape[2], z0 + step)
        i, j, k = torch.meshgrid(*ramps, torch.arange(z0, z1, dtype=torch.float64, device=vals.device),
                                 indexing="ij")
        pos = map_points(matrix, torch.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)])).to(pos_dtype)
        part = _sample_gather(vals, pos, interpolation, padding, fill)
        out[:, :, :, z0:z1] = part.reshape(vals.shape[0], out_shape[0], out_shape[1], z1 - z0)
    return out if isinstance(vol, torch.Tensor) else out.numpy()


def _linear_weights(positions: np.ndarray, size: int) -> np.ndarray:
    """``(len(positions), size)`` one-dimensional linear interpolation weights at ``positions`` (voxels of a grid of
    ``size``), border padding: positions clamped to ``[0, size - 1]``, each row ``1 - f`` and ``f`` on its two
    neighbours (weights 0 and 1 exact, so integer positions read the stored values)."""
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0, size - 1)
    rows = np.arange(len(pos))
    mat = np.zeros((len(pos), int(size)), np.float64)
    if size == 1:
        mat[:, 0] = 1.0
        return mat
    lo = np.minimum(np.floor(pos).astype(np.int64), size - 2)
    frac = pos - lo
    mat[rows, lo] = 1.0 - frac
    mat[rows, lo + 1] += frac
    return mat


def _affine_separable(vol: Any, maps: np.ndarray, out_shape: tuple[int, int, int]) -> Any:
    """``vol (B, C, X, Y, Z)`` resampled by axis-aligned maps ``(B, 4, 4)`` (one for all items): trilinear as three
    matrix products with the per-axis interpolation weights (:func:`_linear_weights`), the last axis first; border
    padding. Differentiable in the values. The align engine reads its parameter grid at a sub-lattice of the level
    voxels this way in every iteration (several times cheaper than ``grid_sample`` and its backward there), and the
    thin-plate spline's coarse grid is upsampled this way (:func:`slicreg.flow.tps.tps_dense_field`)."""
    torch = _torch()
    if not np.allclose(maps, maps[0]) or not np.allclose(maps[0, :3, :3], np.diag(np.diag(maps[0, :3, :3]))):
        raise InputError("sample_affine: backend 'separable' needs one axis-aligned map (a diagonal linear part) "
                         "for the whole batch")
    vals = vol if vol.dtype.is_floating_point else vol.float()
    b, c, *size = vals.shape
    wx, wy, wz = (torch.as_tensor(_linear_weights(np.arange(n) * maps[0, a, a] + maps[0, a, 3], size[a]),
                                  dtype=vals.dtype, device=vals.device) for a, n in enumerate(out_shape))
    t = vals @ wz.t()  # (B, C, X, Y, Z')
    t = wy @ t  # (B, C, X, Y', Z')
    out = wx @ t.reshape(b, c, size[0], -1)  # (B, C, X', Y' Z')
    return out.reshape(b, c, *out_shape)


def _affine_grid_sample(vol: Any, maps: np.ndarray, out_shape: tuple[int, int, int], interpolation: str,
                        padding: str, align_corners: bool) -> Any:
    """``vol (B, C, X, Y, Z)`` resampled by ``maps (B, 4, 4)`` with ``F.affine_grid`` + ``grid_sample``."""
    torch = _torch()
    vol_f = vol if vol.dtype.is_floating_point else vol.float()
    n_in = Grid(tuple(vol.shape[2:])).normalised_matrix(align_corners=align_corners)
    n_out = Grid(out_shape).normalised_matrix(align_corners=align_corners)
    theta = n_in @ maps @ np.linalg.inv(n_out)  # output normalised -> input normalised
    theta_t = torch.as_tensor(theta[:, :3, :], dtype=vol_f.dtype, device=vol.device)
    grid = torch.nn.functional.affine_grid(theta_t, [vol.shape[0], 1, *out_shape], align_corners=bool(align_corners))
    out = torch.nn.functional.grid_sample(vol_f, grid, mode="bilinear" if interpolation == "linear" else "nearest",
                                          padding_mode="border" if padding == "border" else "zeros",
                                          align_corners=bool(align_corners))
    return out.to(vol.dtype) if interpolation != "linear" and not vol.dtype.is_floating_point else out


# ------------------------------------------------------------------------------------------------ warping
def _check_pair(moving_shape: tuple, disp: Any, name: str) -> None:
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(f"{name}: expected a displacement field (3, X, Y, Z) in voxels, got {tuple(disp.shape)}")
    if len(moving_shape) not in (3, 4):
        raise InputError(f"{name}: moving must be (X, Y, Z) or (C, X, Y, Z), got {tuple(moving_shape)}")


def _warp(moving: Any, disp_vox: Any, *, interpolation: Interpolation, padding: Padding, device: Any,
          backend: Backend) -> Any:
    torch = _torch()
    if backend == "scipy":  # float64 positions, as scipy (and Learn2Reg, on get_fdata() arrays) computes them
        disp = np.asarray(_numpy(disp_vox), dtype=np.float64)
        _check_pair(tuple(np.shape(moving)), disp, "warp")
        out = sample(_numpy(moving), displaced_positions(disp), interpolation=interpolation, padding=padding,
                     backend="scipy")
        return out if not isinstance(moving, torch.Tensor) else torch.from_numpy(out).to(moving.device)
    is_numpy = not isinstance(moving, torch.Tensor)
    mov = _to_tensor(moving, device)
    disp = _to_tensor(disp_vox, device)
    _check_pair(tuple(mov.shape), disp, "warp")
    if not disp.dtype.is_floating_point:
        disp = disp.float()
    values = mov.to(disp.dtype) if backend == "grid_sample" and mov.dtype.is_floating_point else mov
    out = sample(values, displaced_positions(disp), interpolation=interpolation, padding=padding, backend=backend,
                 align_corners=True)
    if interpolation == "linear" and mov.dtype.is_floating_point:
        out = out.to(mov.dtype)
    return out.cpu().numpy() if is_numpy else out


def warp_image(moving: Any, disp_vox: Any, *, padding: Padding = "border", device: Any = "cpu",
               backend: Backend = "gather") -> Any:
    """Warp an intensity volume: ``warped(p) = moving(p + u(p))``, trilinear (:func:`sample`).

    Args:
        moving: ``(X', Y', Z')`` or ``(C, X', Y', Z')`` numpy array or torch tensor (any grid size).
        disp_vox: ``(3, X, Y, Z)`` displacement on the fixed grid, voxels of the moving grid's index space
            (for fixed and moving on the same grid, the usual case, simply voxels).
        padding: ``"border"`` (default) or another rule of :func:`sample` that ``backend`` implements.
        device: where to compute (``"cpu"`` or ``"cuda"``); numpy in -> numpy out.
        backend: ``"gather"`` (default: exact for a zero or integer field), or ``"grid_sample"`` (the fast path
            of ``slicreg register --out-warped``: the same values to float rounding, cheaper on a CPU (both
            measured in docs/register.md, "What each step costs"; ``benchmarks/bench_sampler.py``), but not exact
            for a zero or integer field, as the normalised coordinates round), or
            ``"scipy"`` (float64 positions).

    Returns:
        The warped volume on the fixed grid ``(X, Y, Z)`` (or ``(C, X, Y, Z)``), floating point.
    """
    return _warp(moving, disp_vox, interpolation="linear", padding=padding, device=device, backend=backend)


def warp_labels(moving: Any, disp_vox: Any, *, padding: Padding = "zeros", device: Any = "cpu",
                backend: Backend = "gather") -> Any:
    """Warp a label map by nearest neighbour (dtype kept); by default outside the moving grid is background (0).

    ``backend="scipy"`` computes the positions ``identity + disp`` in float64 and samples with
    ``scipy.ndimage.map_coordinates(order=0, mode="constant")``: exactly Learn2Reg's label warp
    (:func:`slicreg.metrics.warp_labels_learn2reg`). The default gather gives the same labels except where a
    position lies within float32 rounding of a half-voxel boundary."""
    return _warp(moving, disp_vox, interpolation="nearest", padding=padding, device=device, backend=backend)


def compose(first: Any, second: Any) -> Any:
    """Composition of two pull fields on the same grid: ``w(p) = first(p) + second(p + first(p))``.

    Warping with ``w`` equals warping with ``second`` and then warping that result with ``first``; with
    ``first`` = fixed -> intermediate and ``second`` = intermediate -> moving, ``w`` is fixed -> moving.
    ``second`` is read trilinearly with border padding (:func:`sample`)."""
    torch = _torch()
    is_numpy = not isinstance(first, torch.Tensor)
    u = _to_tensor(first, "cpu" if is_numpy else first.device)
    v = _to_tensor(second, u.device, u.dtype)
    _check_pair(tuple(v.shape[1:]), u, "compose")
    if u.shape != v.shape:
        raise InputError(f"compose: fields must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    out = u + sample(v, displaced_positions(u), interpolation="linear", padding="border")
    return out.numpy() if is_numpy else out


def apply_affine_vox(matrix: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """The displacement field ``(3, X, Y, Z)`` float32 of a voxel-space affine map ``p -> A p`` (4x4, fixed ->
    moving), i.e. :func:`slicreg.grid.map_points` of the identity grid minus the grid."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"apply_affine_vox: expected a 4x4 matrix, got {matrix.shape}")
    grid = identity_grid_vox(shape, dtype=np.float64)
    return (map_points(matrix, grid) - grid).astype(np.float32)


# ------------------------------------------------------------------------------ Jacobian and integration
def jacobian_determinant(disp_vox: Any, *, chunk: int = 16) -> Any:
    """``det(I + grad u)`` per voxel of a displacement field; the one Jacobian of the project.

    Scheme: central differences ``(u[i+1] - u[i-1]) / 2`` with unit voxel steps, one-sided ``u[1] - u[0]`` at
    the outermost voxels (exactly :func:`numpy.gradient` / :func:`torch.gradient`); an axis of size 1 has no
    variation and contributes a zero derivative. Central differences are second-order accurate and centred on
    the voxel itself (a forward difference would describe the point half a voxel away), and they are what
    Learn2Reg's evaluation uses (a ``[-0.5, 0, 0.5]`` correlation): inside the 2-voxel border that Learn2Reg
    crops, the values are theirs (:func:`slicreg.metrics.jacobian_stats`). The determinant of a voxel-unit
    field on its own grid equals the physical one (the spacing cancels), so no spacing is needed.

    Computed in slabs of ``chunk`` planes along axis 0 with a one-plane halo, so the result is identical to
    the whole-volume computation while the temporaries stay small.

    Args:
        disp_vox: field ``(3, X, Y, Z)`` in voxels (fixed -> moving), numpy array or torch tensor.
        chunk: planes per slab (a memory/speed knob only; keyword-only).

    Returns:
        ``(X, Y, Z)``: 1 = volume kept, < 1 shrinking, > 1 growing, <= 0 folding. numpy in -> float64 numpy
        out; torch in -> torch out (same dtype and device, differentiable).
    """
    torch = _torch()
    is_numpy = not isinstance(disp_vox, torch.Tensor)
    u = torch.from_numpy(np.asarray(disp_vox, dtype=np.float64)) if is_numpy else disp_vox
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"jacobian_determinant: expected a field (3, X, Y, Z), got shape {tuple(u.shape)}")
    n = int(u.shape[1])
    step = max(1, int(chunk))
    slabs = []
    for x0 in range(0, n, step):
        x1 = min(n, x0 + step)
        lo, hi = max(0, x0 - 1), min(n, x1 + 1)
        part = u[:, lo:hi]
        # j[c][d] = delta_cd + d u_c / d x_d on the slab; the halo planes make the slab's planes central
        j = [[(torch.gradient(part[c], dim=d)[0] if part.shape[1 + d] > 1 else torch.zeros_like(part[c]))
              + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)]
        det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
               - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
               + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
        slabs.append(det[x0 - lo:x1 - lo])
    out = torch.cat(slabs) if len(slabs) > 1 else slabs[0]
    return out.numpy() if is_numpy else out


def scaling_and_squaring(velocity: Any, *, steps: int = 7, voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
                         align_corners: bool = True) -> Any:
    """Exponential of a stationary velocity field, ``u = exp(v) - id``, by scaling and squaring.

    ``u_0 = v / 2**steps``, then ``steps`` times ``u <- u + u o (id + u)`` (the map composed with itself;
    trilinear through :func:`sample`'s ``"grid_sample"`` backend, border values continued outwards). For a smooth
    ``v`` whose scaled step is small (``|grad u_0| < 1``) the result is a diffeomorphism (Arsigny et al., MICCAI 2006;
    Ashburner, NeuroImage 2007). The one integrator of the project: the registration toolkit's
    :class:`slicreg.alignment.transforms.StationaryVelocity` and the cohort maker's deformations use it.

    Args:
        velocity: ``(3, X, Y, Z)`` or ``(B, 3, X, Y, Z)``, numpy array or torch tensor (differentiable);
            values in some length unit (voxels of this grid, or full-resolution voxels on a coarser grid).
        steps: number of squarings (keyword-only; default 7, i.e. the velocity is divided by 128).
        voxel_size: the size of one voxel of ``velocity``'s grid in the unit of its values, per axis (default 1:
            values in voxels of this grid; the align engine keeps coarse-level fields in full-resolution voxels
            and passes the coarsening factor).
        align_corners: passed on to ``grid_sample`` (the result is the same either way; see :func:`sample`).

    Returns:
        The displacement, same shape and unit as ``velocity``: ``exp(v)(p) = p + u(p)`` at the grid nodes.
        numpy in -> numpy out (float32 unless the input is float64); torch in -> torch out.
    """
    torch = _torch()
    is_numpy = not isinstance(velocity, torch.Tensor)
    if is_numpy:
        arr = np.asarray(velocity)
        v = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32))
    else:
        v = velocity
    if v.ndim not in (4, 5) or v.shape[-4] != 3:
        raise InputError(f"scaling_and_squaring: expected a velocity field (3, X, Y, Z) or (B, 3, X, Y, Z), got "
                         f"shape {tuple(v.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InputError(f"scaling_and_squaring: steps must be an integer >= 0, got {steps!r}")
    batched = v.ndim == 5
    v = v if batched else v[None]
    scale = torch.tensor([1.0 / float(s) for s in voxel_size], dtype=v.dtype, device=v.device).reshape(3, 1, 1, 1)
    grid = torch.as_tensor(identity_grid_vox(v.shape[2:], dtype=np.float32), dtype=v.dtype, device=v.device)
    disp = v / (2.0 ** int(steps))
    for _ in range(int(steps)):
        disp = torch.stack([d + sample(d, grid + d * scale, interpolation="linear", padding="border",
                                       backend="grid_sample", align_corners=align_corners) for d in disp])
    out = disp if batched else disp[0]
    return out.numpy() if is_numpy else out
