"""Reading and writing deeds' transforms (``*_displacements.dat``, ``*_matrix.txt``), faithful to deeds.

deeds (Heinrich et al., "MRF-based deformable registration and ventilation estimation of lung CT", IEEE TMI
2013; the ``deedsBCV`` / ``linearBCV`` / ``applyBCV`` tools) writes a transform as two files. Both are read and
written here bit-faithfully; the facts below were verified by running deeds (docs/deeds.md; docs/method.md, section 2).

``*_displacements.dat``
    Raw little-endian float32, no header, ``3 * m1 * n1 * o1`` values with ``m1 = floor(m / g)`` (likewise
    ``n1``, ``o1``), ``(m, n, o)`` the fixed image's array shape and ``g`` the grid spacing of deeds' last level
    (default 4). Three blocks ``[u | v | w]``: **u = displacement along array axis 1, v = along axis 0,
    w = along axis 2**; inside a block axis 0 runs fastest (Fortran order, index ``i + j*m1 + k*m1*n1``).
    Voxel units of the full-resolution grid, fixed -> moving.

``*_matrix.txt``
    Four lines of four numbers ``F`` in the row-vector convention ``[y, 1] = [x, 1] F``: the usual
    column-vector matrix is ``A = F.T`` and the translation sits in the *last row* of the file. Axis order
    (0, 1, 2), no swap. Voxel units, fixed voxel -> moving voxel. ``linearBCV`` writes each line as four numbers
    in C++ stream notation (6 significant digits, e.g. ``1.00037`` or ``-7.53e-07``) separated by two spaces, and
    fits all 16 numbers by least squares, so the last column is only approximately ``0 0 0 1``; deeds' warping
    never reads it (only the first 12 numbers of ``A``), and neither does :func:`parse_matrix`.

How deeds turns them into a dense map (its upsampling rule)
    Full-resolution voxel ``i`` samples the control grid at ``i / (m / m1)`` (computed in float32), trilinear
    with indices clamped to the grid, so control node ``q`` sits at voxel ``q * m / m1`` -- *not* at a cell
    centre. The moving position of fixed voxel ``x`` is ``A x + d(x)`` (additive: ``d`` is not passed through
    ``A``), evaluated in float32. Images are then sampled trilinearly and label maps by rounding to the nearest
    voxel (C ``round``: halves away from zero), both with coordinates clamped to the grid
    (:func:`sample_image_deeds`, :func:`sample_labels_deeds`; Learn2Reg's label rule differs: background outside).

In memory a control grid is ``ctrl_vox`` of shape ``(3, m1, n1, o1)`` float32 in the project's component order
(``ctrl_vox[a]`` = displacement along array axis ``a``); the dense field follows :mod:`slicreg.conventions`
(``(3, X, Y, Z)`` voxels, fixed -> moving). The pure functions here take bytes, text and arrays; the two file
helpers at the end (:func:`read_deeds`, :func:`write_deeds`) are the only ones that touch paths.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slicreg.errors import InputError
from slicreg.fields import sample

__all__ = [
    "DEFAULT_GRID_SPACING",
    "DeedsTransform",
    "control_shape",
    "matching_grid_spacings",
    "resolve_grid_spacing",
    "applybcv_grid_step",
    "control_node_positions",
    "decode_displacements",
    "encode_displacements",
    "parse_matrix",
    "format_matrix",
    "upsample_control",
    "deeds_positions",
    "field_from_deeds",
    "fit_affine_vox",
    "deeds_from_field",
    "sample_image_deeds",
    "sample_labels_deeds",
    "warp_image_deeds",
    "warp_labels_deeds",
    "warp_image_field_deeds",
    "warp_labels_field_deeds",
    "read_deeds",
    "write_deeds",
]

DEFAULT_GRID_SPACING = 4  # deedsBCV's default last level (-G 8x7x6x5x4)
_MATRIX_TOL = 1e-4  # tolerance for the last row (0, 0, 0, 1) of the project's own column-vector matrices
_MATRIX_NOTE_TOL = 1e-3  # a file's (ignored) last column further than this from (0, 0, 0, 1) is worth a note

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ grid geometry
def _shape3(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected three positive integers (X, Y, Z), got {shape!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise InputError(f"{name}: expected three positive integers (X, Y, Z), got {tuple(shape)}")
    return out  # type: ignore[return-value]


def control_shape(shape: Sequence[int], grid_spacing: int) -> tuple[int, int, int]:
    """deeds' control-grid shape ``(floor(m/g), floor(n/g), floor(o/g))`` for an image of shape ``(m, n, o)``.

    Raises:
        InputError: a non-positive spacing, or a spacing larger than an image side (an empty grid).
    """
    shape = _shape3(shape)
    g = int(grid_spacing)
    if g != grid_spacing or g < 1:
        raise InputError(f"grid_spacing: expected a positive integer, got {grid_spacing!r}")
    out = tuple(s // g for s in shape)
    if min(out) < 1:
        raise InputError(f"grid_spacing {g} is larger than the image side {min(shape)} (image shape {shape})")
    return out  # type: ignore[return-value]


def matching_grid_spacings(n_values: int, shape: Sequence[int]) -> list[int]:
    """Every grid spacing ``g`` for which ``3 * m1 * n1 * o1 == n_values`` (``m1 = floor(m/g)`` ...)."""
    shape = _shape3(shape)
    return [g for g in range(1, min(shape) + 1) if 3 * int(np.prod([s // g for s in shape])) == n_values]


def resolve_grid_spacing(n_values: int, shape: Sequence[int], grid_spacing: int | str = DEFAULT_GRID_SPACING,
                         *, name: str = "displacements") -> tuple[int, bool]:
    """The grid spacing a ``.dat`` file of ``n_values`` floats has for a fixed image of ``shape``.

    Args:
        n_values: number of float32 values in the file.
        shape: the fixed image's array shape ``(m, n, o)``.
        grid_spacing: an integer (checked against the size) or ``"auto"``: inferred, but only when exactly one
            spacing fits the size.
        name: the file or argument named in error messages.

    Returns:
        ``(g, inferred)``.

    Raises:
        InputError: the size fits no spacing, does not fit the given one, or (auto) fits several.
    """
    shape = _shape3(shape)
    fits = matching_grid_spacings(n_values, shape)
    n_ctrl = n_values // 3 if n_values % 3 == 0 else None
    what = f"{n_values} float32 values" + (f" = 3 x {n_ctrl}" if n_ctrl else " (not a multiple of 3)")
    if isinstance(grid_spacing, str):
        if grid_spacing != "auto":
            raise InputError(f"grid_spacing: expected a positive integer or 'auto', got {grid_spacing!r}")
        if len(fits) == 1:
            return fits[0], True
        if not fits:
            raise InputError(f"{name}: {what} fits no grid spacing for a fixed image of shape {shape} "
                             "(is it the transform of another image?)")
        raise InputError(f"{name}: {what} fits several grid spacings {fits} for a fixed image of shape {shape}; "
                         "pass the spacing of deeds' last level explicitly")
    expected = control_shape(shape, grid_spacing)
    if int(grid_spacing) not in fits:
        hint = (f"; the size fits grid spacing {' or '.join(map(str, fits))} instead -- pass that spacing "
                "(deeds' last -G level) or 'auto'") if fits else \
            "; it fits no grid spacing for this image (is it the transform of another image?)"
        raise InputError(f"{name}: expected 3 x {expected[0]} x {expected[1]} x {expected[2]} = "
                         f"{3 * int(np.prod(expected))} float32 values (grid spacing {grid_spacing}, fixed image "
                         f"{shape}), got {what}{hint}")
    return int(grid_spacing), False


def applybcv_grid_step(shape: Sequence[int], ctrl_shape: Sequence[int]) -> int:
    """The grid step deeds' ``applyBCV`` infers from a ``.dat`` file: ``round(cbrt(voxels / control nodes))``.

    ``applyBCV`` has no grid-spacing option; for image sides that are not multiples of the spacing this guess can
    differ from the spacing the file was written with, and ``applyBCV`` then misreads the file."""
    shape, ctrl_shape = _shape3(shape), _shape3(ctrl_shape, "ctrl_shape")
    ratio = np.float32(np.prod(shape)) / np.float32(np.prod(ctrl_shape))
    return int(np.round(float(np.power(ratio, np.float32(0.3333333)))))


def _axis_positions(size: int, size_ctrl: int) -> np.ndarray:
    """deeds' control-grid coordinate of every full-resolution index: ``i / (size / size_ctrl)`` in float32."""
    scale = np.float32(size) / np.float32(size_ctrl)
    return np.arange(size, dtype=np.float32) / scale


def control_node_positions(shape: Sequence[int], ctrl_shape: Sequence[int]) -> list[np.ndarray]:
    """Voxel position of every control node along each axis: node ``q`` sits at ``q * m / m1`` (float64).

    Returns a list of three 1-D arrays (axis 0, 1, 2); integer positions (``4q``) when ``m`` is a multiple of
    the grid spacing, fractional otherwise."""
    shape, ctrl_shape = _shape3(shape), _shape3(ctrl_shape, "ctrl_shape")
    return [np.arange(c, dtype=np.float64) * s / c for s, c in zip(shape, ctrl_shape)]


# --------------------------------------------------------------------------------------- file contents
def decode_displacements(data: bytes | np.ndarray, shape: Sequence[int], *,
                         grid_spacing: int | str = DEFAULT_GRID_SPACING,
                         name: str = "displacements") -> tuple[np.ndarray, int, bool]:
    """Decode the content of a ``*_displacements.dat`` file into a control grid in the project's axis order.

    Args:
        data: the raw bytes (little-endian float32) or the float values already read.
        shape: the fixed image's array shape ``(m, n, o)``.
        grid_spacing: deeds' last-level grid spacing (default 4) or ``"auto"`` (see :func:`resolve_grid_spacing`).
        name: the file named in error messages.

    Returns:
        ``(ctrl_vox, g, inferred)``: ``ctrl_vox`` of shape ``(3, m1, n1, o1)`` float32 with ``ctrl_vox[a]`` the
        displacement along array axis ``a`` in full-resolution voxels, the grid spacing and whether it was
        inferred.

    Raises:
        InputError: a byte count that is not whole float32 values, a size that does not fit the grid, NaN/Inf.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) % 4:
            raise InputError(f"{name}: {len(raw)} bytes is not a whole number of float32 values")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        values = np.asarray(data).reshape(-1)
        if values.dtype.kind != "f":
            raise InputError(f"{name}: expected float32 values, got dtype {values.dtype}")
    g, inferred = resolve_grid_spacing(values.size, shape, grid_spacing, name=name)
    m1, n1, o1 = control_shape(shape, g)
    if not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.isfinite(values))
        raise InputError(f"{name}: {bad.size} of {values.size} values are NaN or Inf (first at float index "
                         f"{int(bad[0])}); expected finite displacements")
    blocks = values.astype(np.float32).reshape(3, o1, n1, m1).transpose(0, 3, 2, 1)  # Fortran order per block
    ctrl = np.ascontiguousarray(blocks[[1, 0, 2]])  # blocks are (axis 1, axis 0, axis 2)
    return ctrl, g, inferred


def _check_ctrl(ctrl_vox: Any, name: str = "ctrl_vox") -> np.ndarray:
    ctrl = np.asarray(ctrl_vox)
    if ctrl.ndim != 4 or ctrl.shape[0] != 3 or min(ctrl.shape[1:]) < 1:
        raise InputError(f"{name}: expected a control grid of shape (3, m1, n1, o1), got {ctrl.shape}")
    if ctrl.dtype.kind not in "fiu":
        raise InputError(f"{name}: expected numbers, got dtype {ctrl.dtype}")
    if not np.all(np.isfinite(ctrl)):
        raise InputError(f"{name}: control grid contains NaN or Inf")
    return ctrl


def encode_displacements(ctrl_vox: np.ndarray) -> bytes:
    """Inverse of :func:`decode_displacements`: ``(3, m1, n1, o1)`` (project order) -> ``.dat`` bytes."""
    ctrl = _check_ctrl(ctrl_vox).astype(np.float32)
    blocks = ctrl[[1, 0, 2]]
    return np.ascontiguousarray(blocks.transpose(0, 3, 2, 1)).astype("<f4").tobytes()


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_matrix(text: str, *, name: str = "matrix") -> np.ndarray:
    """Parse a deeds ``*_matrix.txt`` (row-vector convention) into the column-vector matrix ``A = F.T``.

    The file's last column (``A``'s last row) is ignored, as deeds ignores it: ``linearBCV`` fits all 16 numbers
    by least squares, so it is only approximately ``0 0 0 1`` (e.g. ``-7.5e-07 -2.5e-06 -1.3e-06 1.00037``), and
    deeds' warping reads only the first 12 numbers of ``A``. When it is more than 1e-3 from ``0 0 0 1`` a note is
    logged (``logging`` at WARNING level): such a file is not linearBCV output, and may be a column-vector matrix
    that needs transposing.

    Args:
        text: the file content: four lines of four numbers (blank lines are ignored).
        name: the file named in error messages and notes.

    Returns:
        ``(4, 4)`` float64 ``A`` with ``moving = A @ [i, j, k, 1]`` in voxels (fixed -> moving); the translation is
        ``A[:3, 3]`` (the file's last row); ``A[3]`` is always ``0 0 0 1``.

    Raises:
        InputError: not exactly 4 x 4 numbers, a token that is not a number, NaN or Inf (in any of the 16
            numbers), or a singular linear part.
    """
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    counts = [len(ln) for ln in lines]
    if len(lines) != 4 or counts != [4, 4, 4, 4]:
        raise InputError(f"{name}: expected 4 lines of 4 numbers (deeds' affine matrix), got {len(lines)} non-empty "
                         f"line(s) with {counts} values")
    bad = [tok for ln in lines for tok in ln
           if not _NUMBER.match(tok) and tok.lower().lstrip("+-") not in ("nan", "inf", "infinity")]
    if bad:
        raise InputError(f"{name}: expected numbers, got {bad[0]!r}")
    f = np.array([[float(tok) for tok in ln] for ln in lines], dtype=np.float64)
    if not np.all(np.isfinite(f)):
        raise InputError(f"{name}: expected finite numbers, the matrix contains NaN or Inf")
    last = f[:, 3]
    off = float(np.abs(last - (0.0, 0.0, 0.0, 1.0)).max())
    if off > _MATRIX_NOTE_TOL:
        log.warning("%s: note: the last column is %s, %.3g away from 0 0 0 1; deeds never reads it, so it is ignored "
                    "here too (linearBCV's least-squares fit leaves it within about 1e-3). If the file holds a "
                    "column-vector matrix (translation in the last column), transpose it first: as read, the "
                    "translation is %s voxels",
                    name, " ".join(f"{v:g}" for v in last), off, " ".join(f"{v:g}" for v in f[3, :3]))
    a = f.T.copy()
    a[3] = (0.0, 0.0, 0.0, 1.0)
    if abs(np.linalg.det(a[:3, :3])) < 1e-6:
        raise InputError(f"{name}: the linear part of the matrix is singular (det {np.linalg.det(a[:3, :3]):.3g})")
    return a


def format_matrix(matrix: np.ndarray) -> str:
    """Inverse of :func:`parse_matrix`: a column-vector ``(4, 4)`` matrix -> deeds' file text (``F = A.T``).

    Values are written with 9 significant digits, which round-trip float32 exactly (deeds reads ``%f``)."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"matrix: expected a finite 4x4 matrix, got shape {a.shape}")
    if not np.allclose(a[3], [0, 0, 0, 1], atol=_MATRIX_TOL):
        raise InputError(f"matrix: expected an affine matrix with last row 0 0 0 1, got {a[3].tolist()}")
    return "".join("  ".join(f"{float(np.float32(v)):.9g}" for v in row) + "\n" for row in a.T)


# ---------------------------------------------------------------------------------- deeds' dense map
def _axis_weights(size: int, size_ctrl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every full-resolution index along one axis: clamped lower/upper control indices and the weight of the
    upper one (float64 from deeds' float32 fraction)."""
    pos = _axis_positions(size, size_ctrl)
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float64)
    lo = lo.astype(np.int64)
    return np.clip(lo, 0, size_ctrl - 1), np.clip(lo + 1, 0, size_ctrl - 1), frac


def _interp_axis(arr: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, frac: np.ndarray) -> np.ndarray:
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = frac.reshape(shape)
    return np.take(arr, lo, axis=axis) * (1.0 - w) + np.take(arr, hi, axis=axis) * w


def upsample_control(ctrl_vox: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """deeds' upsampling of a control grid to the full-resolution grid.

    Full-resolution voxel ``i`` samples the control grid at ``i / (m / m1)`` (float32), trilinear with indices
    clamped to the control grid; weights and sums in float64, the result rounded to float32 as deeds stores it.
    Trilinear interpolation on a tensor grid is separable, so it is done one axis at a time.

    Args:
        ctrl_vox: ``(3, m1, n1, o1)`` control displacements in full-resolution voxels (any ``(C, ...)`` works).
        shape: the full-resolution shape ``(m, n, o)``; each side must be at least the control side.

    Returns:
        ``(3, m, n, o)`` float32: the displacement ``d(x)`` (without the affine part).
    """
    ctrl = np.asarray(ctrl_vox)
    if ctrl.ndim != 4:
        raise InputError(f"ctrl_vox: expected (C, m1, n1, o1), got shape {ctrl.shape}")
    shape = _shape3(shape)
    if any(s < c for s, c in zip(shape, ctrl.shape[1:])):
        raise InputError(f"upsample_control: image shape {shape} is smaller than the control grid {ctrl.shape[1:]}")
    weights = [_axis_weights(s, c) for s, c in zip(shape, ctrl.shape[1:])]
    out = np.empty((ctrl.shape[0], *shape), dtype=np.float32)
    for c in range(ctrl.shape[0]):
        comp = ctrl[c].astype(np.float64)
        for axis in (2, 1, 0):  # smallest intermediate arrays first
            comp = _interp_axis(comp, axis, *weights[axis])
        out[c] = comp
    return out


def _check_matrix(matrix: Any) -> np.ndarray:
    if matrix is None:
        return np.eye(4)
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"matrix: expected a finite 4x4 column-vector matrix, got shape {a.shape}")
    return a


def deeds_positions(ctrl_vox: np.ndarray, shape: Sequence[int], *, matrix: np.ndarray | None = None) -> np.ndarray:
    """The moving-grid position of every fixed voxel, computed as deeds does: ``A x + d(x)`` in float32.

    Args:
        ctrl_vox: ``(3, m1, n1, o1)`` control displacements (project axis order, voxels).
        shape: the fixed image's shape ``(m, n, o)``.
        matrix: ``(4, 4)`` column-vector matrix ``A`` (see :func:`parse_matrix`); ``None`` = identity.

    Returns:
        ``(3, m, n, o)`` float32 positions in voxels (fixed -> moving).
    """
    ctrl = _check_ctrl(ctrl_vox)
    shape = _shape3(shape)
    a = _check_matrix(matrix).astype(np.float32)  # deeds keeps the matrix in float
    disp = upsample_control(ctrl, shape)
    i, j, k = (np.arange(s, dtype=np.float32).reshape([-1 if d == ax else 1 for d in range(3)])
               for ax, s in enumerate(shape))
    for ax in range(3):  # same operation order as deeds: i*a0 + j*a1 + k*a2 + t + d, all float32
        disp[ax] += ((i * a[ax, 0] + j * a[ax, 1]) + k * a[ax, 2]) + a[ax, 3]
    return disp


def field_from_deeds(ctrl_vox: np.ndarray, shape: Sequence[int], *, matrix: np.ndarray | None = None) -> np.ndarray:
    """A deeds transform as a project field ``u`` (``(3, m, n, o)`` float32, voxels, fixed -> moving).

    ``u(x) = A x + d(x) - x`` with deeds' upsampling (:func:`deeds_positions`); warping with it through
    :mod:`slicreg.fields` with border padding reproduces deeds' outputs (images to float precision; labels
    identical except, in rare cases, a position within float rounding of a half-voxel tie)."""
    pos = deeds_positions(ctrl_vox, shape, matrix=matrix)
    for ax, s in enumerate(_shape3(shape)):
        pos[ax] -= np.arange(s, dtype=np.float32).reshape([-1 if d == ax else 1 for d in range(3)])
    return pos


def fit_affine_vox(disp_vox: np.ndarray, *, stride: int = 2) -> np.ndarray:
    """Least-squares affine part of a field: the ``(4, 4)`` matrix ``A`` minimising ``sum |A x - (x + u(x))|^2``.

    Args:
        disp_vox: ``(3, X, Y, Z)`` field in voxels.
        stride: use every ``stride``-th voxel along each axis (the fit is smooth; default 2).
    """
    u = np.asarray(disp_vox)
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"disp_vox: expected (3, X, Y, Z), got {u.shape}")
    sub = u[:, ::stride, ::stride, ::stride].astype(np.float64)
    axes = [np.arange(0, s, stride, dtype=np.float64) for s in u.shape[1:]]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    target = grid + sub.reshape(3, -1)
    centre = grid.mean(axis=1, keepdims=True)  # centred coordinates keep the normal equations well conditioned
    design = np.concatenate([grid - centre, np.ones((1, grid.shape[1]))]).T
    coef, *_ = np.linalg.lstsq(design, target.T, rcond=None)  # (4, 3)
    lin = coef[:3].T
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = coef[3] - lin @ centre[:, 0]
    return a


def _axis_matrix(size: int, size_ctrl: int) -> np.ndarray:
    """deeds' upsampling along one axis as a dense ``(size, size_ctrl)`` matrix."""
    lo, hi, frac = _axis_weights(size, size_ctrl)
    mat = np.zeros((size, size_ctrl))
    rows = np.arange(size)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def deeds_from_field(
    disp_vox: np.ndarray,
    *,
    grid_spacing: int = DEFAULT_GRID_SPACING,
    affine: Literal["identity", "fit"] | np.ndarray = "identity",
    method: Literal["sample", "lstsq"] = "sample",
) -> tuple[np.ndarray, np.ndarray]:
    """Express a project field as a deeds transform (control grid + matrix), e.g. for deeds' ``applyBCV``.

    Args:
        disp_vox: ``(3, m, n, o)`` field (voxels, fixed -> moving).
        grid_spacing: deeds' control spacing ``g``; the control grid is ``floor(shape / g)``.
        affine: ``"identity"`` (default: everything goes into the displacements), ``"fit"`` (a least-squares affine
            goes into the matrix and only the remainder into the displacements; better near the border, where
            deeds holds the displacement constant beyond the last control node), or a ``(4, 4)`` matrix.
        method: how control values are chosen for the remainder ``d(x) = x + u(x) - A x``:
            ``"sample"`` (default) evaluates ``d`` (trilinear) at the control nodes ``q * m / m1``, so reading
            the files back reproduces ``d`` there; ``"lstsq"`` takes the control values whose deeds upsampling is
            closest to ``d`` in the least-squares sense over all voxels (separable pseudo-inverse), which also
            round-trips a deeds field losslessly when ``m`` is not a multiple of ``g``.

    Returns:
        ``(ctrl_vox, matrix)``: ``(3, m1, n1, o1)`` float32 and ``(4, 4)`` float64 (column-vector convention).
    """
    u = np.asarray(disp_vox)
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"disp_vox: expected a field (3, X, Y, Z), got {u.shape}")
    if not np.all(np.isfinite(u)):
        raise InputError("disp_vox: the field contains NaN or Inf")
    if method not in ("sample", "lstsq"):
        raise InputError(f"method: expected 'sample' or 'lstsq', got {method!r}")
    shape = _shape3(u.shape[1:])
    ctrl_shape = control_shape(shape, grid_spacing)
    if isinstance(affine, str):
        if affine not in ("identity", "fit"):
            raise InputError(f"affine: expected 'identity', 'fit' or a 4x4 matrix, got {affine!r}")
        a = np.eye(4) if affine == "identity" else fit_affine_vox(u)
    else:
        a = _check_matrix(affine)
        if not np.allclose(a[3], [0, 0, 0, 1], atol=_MATRIX_TOL):
            raise InputError(f"affine: expected last row 0 0 0 1, got {a[3].tolist()}")
    a32 = a.astype(np.float32).astype(np.float64)  # what deeds will use after reading the file
    ctrl = np.empty((3, *ctrl_shape), dtype=np.float32)
    if method == "sample":
        nodes = control_node_positions(shape, ctrl_shape)
        weights = []
        for pos, s in zip(nodes, shape):
            lo = np.clip(np.floor(pos).astype(np.int64), 0, s - 1)
            weights.append((lo, np.minimum(lo + 1, s - 1), pos - lo))
    else:
        pinvs = [np.linalg.pinv(_axis_matrix(s, c)) for s, c in zip(shape, ctrl_shape)]
    lin = [np.arange(s, dtype=np.float64).reshape([-1 if d == i else 1 for d in range(3)])
           for i, s in enumerate(shape)]
    for ax in range(3):
        affine_part = lin[0] * a32[ax, 0] + lin[1] * a32[ax, 1] + lin[2] * a32[ax, 2] + a32[ax, 3]
        resid = lin[ax] + u[ax].astype(np.float64) - affine_part
        if method == "sample":
            for axis in range(3):
                resid = _interp_axis(resid, axis, *weights[axis])
        else:
            for axis in range(3):
                resid = np.moveaxis(np.tensordot(pinvs[axis], resid, axes=([1], [axis])), 0, axis)
        ctrl[ax] = resid
    return ctrl, a


# ------------------------------------------------------------------------------------------------ warping
def _check_positions(moving: Any, pos_vox: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    moving = np.asarray(moving)
    if moving.ndim != 3:
        raise InputError(f"moving: expected a 3-D {what}, got shape {moving.shape}")
    pos = np.asarray(pos_vox)
    if pos.ndim != 4 or pos.shape[0] != 3 or pos.dtype.kind != "f":
        raise InputError(f"pos_vox: expected floating voxel positions of shape (3, X, Y, Z), got {pos.shape} "
                         f"{pos.dtype}")
    return moving, pos


def sample_labels_deeds(moving: np.ndarray, pos_vox: np.ndarray) -> np.ndarray:
    """deeds' label sampling: the voxel nearest to each position by C ``round`` (halves away from zero), with the
    rounded index clamped to the grid (a position outside takes the edge label, never background); the one
    sampler's ``interpolation="round", padding="clamp"`` (:func:`slicreg.fields.sample`).

    Args:
        moving: ``(X', Y', Z')`` label map (any dtype, kept).
        pos_vox: ``(3, X, Y, Z)`` positions in voxels of ``moving`` (float32 as deeds computes them, or float64).

    Returns:
        ``(X, Y, Z)`` label map, dtype of ``moving``.
    """
    moving, pos = _check_positions(moving, pos_vox, "label map")
    return sample(moving, pos, interpolation="round", padding="clamp")


def sample_image_deeds(moving: np.ndarray, pos_vox: np.ndarray) -> np.ndarray:
    """deeds' image sampling: trilinear, each of the 8 neighbour indices clamped to the grid (the edge value
    continues outside), fractions in the positions' precision and weights and sums in float64 as in deeds; the
    one sampler's ``interpolation="linear", padding="clamp"`` on float64 values (:func:`slicreg.fields.sample`).

    Args:
        moving: ``(X', Y', Z')`` image (HU or any unit).
        pos_vox: ``(3, X, Y, Z)`` positions in voxels of ``moving``.

    Returns:
        ``(X, Y, Z)`` float32.
    """
    moving, pos = _check_positions(moving, pos_vox, "image")
    out = sample(moving.astype(np.float64, copy=False), pos, interpolation="linear", padding="clamp")
    return out.astype(np.float32)


def warp_labels_deeds(moving: np.ndarray, ctrl_vox: np.ndarray, *, matrix: np.ndarray | None = None,
                      shape: Sequence[int] | None = None) -> np.ndarray:
    """Warp a label map as deeds does (``_deformed_seg.nii.gz``, ``applyBCV``): nearest by C rounding, clamped.

    Args:
        moving: ``(X', Y', Z')`` integer label map (deeds requires the fixed shape; any shape works here).
        ctrl_vox: ``(3, m1, n1, o1)`` control displacements; ``matrix``: ``A`` or ``None``.
        shape: the fixed grid ``(m, n, o)``; default: the moving shape (deeds' case).

    Returns:
        ``(m, n, o)`` label map, dtype of ``moving``.
    """
    moving = np.asarray(moving)
    if moving.ndim != 3:
        raise InputError(f"moving: expected a 3-D label map, got shape {moving.shape}")
    pos = deeds_positions(ctrl_vox, shape if shape is not None else moving.shape, matrix=matrix)
    return sample_labels_deeds(moving, pos)


def warp_image_deeds(moving: np.ndarray, ctrl_vox: np.ndarray, *, matrix: np.ndarray | None = None,
                     shape: Sequence[int] | None = None) -> np.ndarray:
    """Warp an image as deeds does (``_deformed.nii.gz``): trilinear with indices clamped to the grid.

    Same arguments as :func:`warp_labels_deeds`; returns float32 ``(m, n, o)``. Weights and sums in float64
    as in deeds, so values agree with deeds' output to float32 precision."""
    moving = np.asarray(moving)
    if moving.ndim != 3:
        raise InputError(f"moving: expected a 3-D image, got shape {moving.shape}")
    pos = deeds_positions(ctrl_vox, shape if shape is not None else moving.shape, matrix=matrix)
    return sample_image_deeds(moving, pos)


def _field_positions(disp_vox: Any) -> np.ndarray:
    """``x + u(x)`` in float32 (deeds computes positions in float32) for a project field ``(3, X, Y, Z)``."""
    u = np.asarray(disp_vox)
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"disp_vox: expected a field (3, X, Y, Z), got {u.shape}")
    if u.dtype.kind != "f":
        raise InputError(f"disp_vox: expected floating displacements, got dtype {u.dtype}")
    if not np.all(np.isfinite(u)):
        raise InputError("disp_vox: the field contains NaN or Inf")
    pos = u.astype(np.float32)  # a copy
    for ax, s in enumerate(u.shape[1:]):
        pos[ax] += np.arange(s, dtype=np.float32).reshape([-1 if d == ax else 1 for d in range(3)])
    return pos


def warp_labels_field_deeds(moving: np.ndarray, disp_vox: np.ndarray) -> np.ndarray:
    """Warp a label map with a project field by deeds' rule (:func:`sample_labels_deeds`: C rounding, clamped).

    Args:
        moving: ``(X', Y', Z')`` label map.
        disp_vox: ``(3, X, Y, Z)`` field in voxels, fixed -> moving (e.g. from :func:`field_from_deeds`).

    Returns:
        ``(X, Y, Z)`` label map, dtype of ``moving``. Outside the moving grid the edge label continues, where
        :func:`slicreg.fields.warp_labels` (default) and Learn2Reg give background.
    """
    return sample_labels_deeds(moving, _field_positions(disp_vox))


def warp_image_field_deeds(moving: np.ndarray, disp_vox: np.ndarray) -> np.ndarray:
    """Warp an image with a project field by deeds' rule (:func:`sample_image_deeds`: trilinear, clamped).

    Args:
        moving: ``(X', Y', Z')`` image.
        disp_vox: ``(3, X, Y, Z)`` field in voxels, fixed -> moving.

    Returns:
        ``(X, Y, Z)`` float32.
    """
    return sample_image_deeds(moving, _field_positions(disp_vox))


# -------------------------------------------------------------------------------------------- file edge
@dataclass(frozen=True)
class DeedsTransform:
    """A deeds transform for a fixed grid, as read from its files.

    Attributes:
        ctrl_vox: ``(3, m1, n1, o1)`` float32 control displacements (project axis order, full-resolution voxels).
        matrix: ``(4, 4)`` column-vector matrix ``A`` (identity when no matrix file was given).
        shape: the fixed grid ``(m, n, o)``.
        grid_spacing: deeds' last-level grid spacing used to read the file.
        grid_spacing_inferred: True if the spacing was inferred from the file size (``"auto"``).
        sources: the files read.
    """

    ctrl_vox: np.ndarray
    matrix: np.ndarray
    shape: tuple[int, int, int]
    grid_spacing: int
    grid_spacing_inferred: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    def to_field(self) -> np.ndarray:
        """The dense project field ``(3, m, n, o)`` float32 (see :func:`field_from_deeds`)."""
        return field_from_deeds(self.ctrl_vox, self.shape, matrix=self.matrix)


def read_deeds(dat_path: str | os.PathLike, shape: Sequence[int], *, matrix_path: str | os.PathLike | None = None,
               grid_spacing: int | str = DEFAULT_GRID_SPACING) -> DeedsTransform:
    """Read ``*_displacements.dat`` (and optionally ``*_matrix.txt``) for a fixed image of ``shape``.

    Raises:
        InputError: a missing file, a size that does not fit the grid, NaN entries, a malformed matrix.
    """
    dat_path = Path(dat_path)
    if not dat_path.is_file():
        raise InputError(f"{dat_path}: file not found (expected deeds' *_displacements.dat)")
    ctrl, g, inferred = decode_displacements(dat_path.read_bytes(), shape, grid_spacing=grid_spacing,
                                             name=str(dat_path))
    sources = {"displacements": str(dat_path)}
    matrix = np.eye(4)
    if matrix_path is not None:
        matrix_path = Path(matrix_path)
        if not matrix_path.is_file():
            raise InputError(f"{matrix_path}: file not found (expected deeds' *_matrix.txt)")
        try:
            text = matrix_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{matrix_path}: not a text file (expected 4 lines of 4 numbers)") from None
        matrix = parse_matrix(text, name=str(matrix_path))
        sources["matrix"] = str(matrix_path)
    return DeedsTransform(ctrl, matrix, _shape3(shape), g, inferred, sources)


def write_deeds(stem: str | os.PathLike, ctrl_vox: np.ndarray, matrix: np.ndarray | None = None, *,
                outputs: Any = None) -> tuple[Path, Path]:
    """Write ``{stem}_displacements.dat`` and ``{stem}_matrix.txt`` (identity matrix if ``None``), both or neither.

    ``outputs``: an :class:`slicreg.io.OutputSet` of a larger set of outputs that is published together (e.g. a
    command's field, warped images and these two files); by default the pair is published on its own.
    Returns the two paths."""
    from slicreg.io import atomic_outputs, atomic_write_bytes, atomic_write_text

    stem = str(stem)
    dat = Path(f"{stem}_displacements.dat")
    mat = Path(f"{stem}_matrix.txt")
    data = encode_displacements(ctrl_vox)
    text = format_matrix(np.eye(4) if matrix is None else matrix)
    if outputs is None:
        with atomic_outputs() as pair:
            atomic_write_bytes(pair.path(dat), data)
            atomic_write_text(pair.path(mat), text)
    else:
        atomic_write_bytes(outputs.path(dat), data)
        atomic_write_text(outputs.path(mat), text)
    return dat, mat
