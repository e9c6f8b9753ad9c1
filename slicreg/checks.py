"""Checks of inputs shared by the commands: does an image look like CT, and do two volumes share a grid.

Every check raises one :class:`~slicreg.errors.InputError` naming the file(s), what was expected and what came.

- :func:`check_ct_like` -- a CT in Hounsfield units has air (about -1000 HU) around the body; a constant image,
  an 8-bit picture or a normalised (0..1) image does not. Commands that assume CT call it on every image they
  read and accept a suspicious one only with ``--force`` (then the reason is returned and logged).
- :func:`grid_description`, :func:`grid_distance_mm` -- how to name a grid in a message (axis codes such as
  ``RAS`` or ``LPS``, shape, spacing, origin) and how far apart two grids are in world space (mm).
- :func:`reorient_like` -- the lossless axis permutation and flip that gives a volume the axis orientation of
  another (nibabel's orientation tools; voxel values are kept exactly, every voxel keeps its world position);
  :func:`orientation_index_map` is the same map as a 4x4 matrix of voxel indices.
- :func:`match_grid` -- a volume on a reference grid: as it is when the grids are the same, reoriented when it is
  the same world grid stored in another axis order, refused otherwise.
"""

from __future__ import annotations

import logging

import numpy as np

from slicreg.conventions import Volume
from slicreg.errors import InputError

__all__ = [
    "GRID_TOL_MM",
    "check_ct_like",
    "axcodes",
    "grid_description",
    "grid_distance_mm",
    "same_grid",
    "orientation_index_map",
    "reorient_like",
    "apply_index_map_to_field",
    "match_grid",
]

log = logging.getLogger(__name__)

GRID_TOL_MM = 1e-3
"""Two grids are the same when their shapes are equal and their corner voxels are this close in world space (mm)."""


# ------------------------------------------------------------------------------------------------ CT check
def check_ct_like(hu: np.ndarray, *, name: str = "image", force: bool = False) -> str | None:
    """Reject an array that does not look like CT in Hounsfield units.

    Two signs of a non-CT input: every value in 0..255 (an 8-bit picture, or a normalised image), and no value
    below -500 HU (every CT of the body has air around it; a scan stored without its rescale intercept, i.e.
    shifted by +1024, has none). A constant image is rejected as well.

    Args:
        hu: intensities, any shape.
        name: what to call the input in the message (e.g. its file name).
        force: accept the input anyway; the reason it looked wrong is returned (and logged) instead of raised.

    Returns:
        ``None`` if the input looks like CT; with ``force=True`` and a suspicious input, the reason (a string).

    Raises:
        InputError: the input does not look like CT and ``force`` is False.
    """
    hu = np.asarray(hu)
    if hu.size == 0:
        raise InputError(f"{name}: empty image")
    lo, hi = float(np.min(hu)), float(np.max(hu))
    reason = None
    if lo == hi:
        reason = f"all voxels have the same value ({lo:g})"
    elif lo >= 0 and hi <= 255:
        reason = (f"all intensities lie in 0..255 (min {lo:g}, max {hi:g}): this looks like an 8-bit or "
                  f"normalised image, not CT in Hounsfield units")
    elif lo >= -500:
        reason = (f"no voxel is below -500 HU (min {lo:g}, max {hi:g}): a body CT in Hounsfield units has air "
                  f"(about -1000 HU) around the body; the image may be stored without its rescale intercept "
                  f"(shifted by +1024) or not be a CT")
    if reason is None:
        return None
    if force:
        log.warning("%s: %s; continuing because force=True (--force)", name, reason)
        return reason
    raise InputError(f"{name}: expected a CT image in Hounsfield units; {reason}. "
                     f"Convert it to HU, or pass --force (force=True in Python) to use it anyway")


# ------------------------------------------------------------------------------------------------- grids
def axcodes(affine: np.ndarray) -> str:
    """The axis codes of a voxel -> world affine, e.g. ``"RAS"`` or ``"LPS"`` (the closest world axis per array
    axis, the direction in which the index grows)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def grid_description(volume: Volume) -> str:
    """``"LPS (24, 20, 16), spacing 2 x 2 x 2 mm, origin (-10, 20, 5) mm"``: a grid as a message names it."""
    spacing = " x ".join(f"{s:.4g}" for s in volume.spacing_mm)
    origin = ", ".join(f"{v:.4g}" for v in volume.affine[:3, 3])
    return f"{axcodes(volume.affine)} {volume.shape}, spacing {spacing} mm, origin ({origin}) mm"


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """``(4, 8)`` homogeneous voxel coordinates of the 8 corner voxels of a grid."""
    hi = np.asarray(shape, dtype=np.float64) - 1
    return np.array([[hi[0] * i, hi[1] * j, hi[2] * k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]).T


def grid_distance_mm(a: Volume, b: Volume) -> float:
    """Largest world distance (mm) between corresponding corner voxels of two grids of the same shape.

    Both affines are affine maps, so this is the largest distance over every voxel of the grid. ``inf`` when the
    shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    c = _corners(a.shape)
    return float(np.sqrt((((a.affine @ c) - (b.affine @ c))[:3] ** 2).sum(axis=0)).max())


def same_grid(a: Volume, b: Volume, *, tol_mm: float = GRID_TOL_MM) -> bool:
    """Same shape, and every voxel at the same world position to ``tol_mm``."""
    return grid_distance_mm(a, b) <= tol_mm


def orientation_index_map(volume: Volume, target_affine: np.ndarray) -> np.ndarray:
    """The axis permutation / flip that gives ``volume`` the axis orientation of ``target_affine``, as a 4x4 map.

    Returns:
        ``T`` (4x4 float64, entries 0, +1, -1 and integer offsets): voxel ``q`` of the reoriented grid is voxel
        ``T @ q`` of ``volume``'s grid, and the reoriented affine is ``volume.affine @ T``. The identity when the
        orientations agree. Orientation is that of the closest world axes (nibabel's ``io_orientation``), so an
        oblique grid keeps its small rotation.
    """
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(volume.affine),
                                   nio.io_orientation(np.asarray(target_affine, dtype=np.float64)))
    return nio.inv_ornt_aff(transform, volume.shape)


def reorient_like(volume: Volume, target_affine: np.ndarray) -> Volume:
    """``volume`` with its array axes permuted and flipped to the axis orientation of ``target_affine``.

    Lossless: no resampling, voxel values and dtype kept, every voxel keeps its world position (the affine is
    updated). ``(C, X, Y, Z)`` arrays are reoriented per channel. Returns ``volume`` itself when nothing changes.
    """
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(volume.affine),
                                   nio.io_orientation(np.asarray(target_affine, dtype=np.float64)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    array = np.asarray(volume.array)
    if array.ndim == 3:
        out = nio.apply_orientation(array, transform)
    else:
        out = np.stack([nio.apply_orientation(channel, transform) for channel in array])
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.shape)
    return Volume(np.ascontiguousarray(out), affine,
                  {**volume.meta, "reoriented_from": axcodes(volume.affine)})


def apply_index_map_to_field(disp_vox: np.ndarray, index_map: np.ndarray) -> np.ndarray:
    """Re-express a field's target positions in another voxel grid of the moving volume: ``T (x + u(x)) - x``.

    Args:
        disp_vox: ``(3, X, Y, Z)`` float, voxels, fixed -> moving (moving voxels of one grid).
        index_map: 4x4 ``T``: moving voxel ``y`` of that grid is voxel ``T @ y`` of the other grid.

    Returns:
        ``(3, X, Y, Z)`` float32 on the same fixed grid, in voxels of the other moving grid (the input itself,
        unchanged, when ``T`` is the identity).
    """
    t = np.asarray(index_map, dtype=np.float64)
    if np.array_equal(t, np.eye(4)):
        return disp_vox
    from slicreg.conventions import identity_grid_vox

    disp = np.asarray(disp_vox, dtype=np.float32)
    grid = identity_grid_vox(disp.shape[1:], dtype=np.float32)
    pos = grid + disp
    lin = t[:3, :3].astype(np.float32)
    out = np.einsum("ab,b...->a...", lin, pos)
    out += t[:3, 3].astype(np.float32)[:, None, None, None]
    out -= grid
    return out.astype(np.float32, copy=False)


def match_grid(volume: Volume, reference: Volume, *, name: str, reference_name: str,
               what: str = "volume", reference_what: str = "reference", tol_mm: float = GRID_TOL_MM) -> Volume:
    """``volume`` on the grid of ``reference``: as it is, reoriented (lossless), or refused.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` that must lie on ``reference``'s grid (e.g. a label map for an
            image).
        reference: the grid to match.
        name, reference_name: the files, for messages.
        what, reference_what: what they are (e.g. ``"labels"``, ``"image"``), for messages.
        tol_mm: largest world distance of corresponding voxels (mm).

    Returns:
        ``volume`` itself when the grids are the same; when ``volume`` is the same world grid stored in another
        axis order (e.g. LPS labels for an RAS image), ``volume`` reoriented to ``reference``'s axis order
        (``meta["reoriented_from"]`` holds its axis codes).

    Raises:
        InputError: the grids differ in world space (shape, spacing, origin or direction), naming both files and
            their orientations.
    """
    if same_grid(volume, reference, tol_mm=tol_mm):
        return volume
    moved = reorient_like(volume, reference.affine)
    if moved is not volume and same_grid(moved, reference, tol_mm=tol_mm):
        log.info("%s: %s stored as %s; reoriented to the %s's %s (axis permutation / flip, no resampling)",
                 name, what, axcodes(volume.affine), reference_what, axcodes(reference.affine))
        return moved
    raise InputError(f"{name}: the {what}'s grid is {grid_description(volume)}, the {reference_what} "
                     f"{reference_name} is {grid_description(reference)}; expected the {what} on the "
                     f"{reference_what}'s grid (the same voxels in world space, within {tol_mm:g} mm)")
