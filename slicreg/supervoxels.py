"""Template supervoxels: 16 SLIC layers of exactly ``K`` (= 127) supervoxels + background each.

SLIC-Reg (Heinrich & Hansen, MIDL 2021) over-segments the template scan into supervoxels; a network learns to
predict them on any scan. Each *layer* is one over-segmentation; the 16 layers differ because SLIC is run on the
template seen through a different small random affine, which moves SLIC's seed layout (docs/method.md, section 3).

Per layer (all on the 4 mm grid, half the 2 mm template grid; 4 mm voxel ``q`` = 2 mm voxel ``2 q + 0.5``, see
:func:`slicreg.conventions.downsample_affine`):

1. ``theta = [I | 0] + affine_sigma * N(0, 1)`` (3 x 4, all 12 entries) from the layer's own generator
   (child ``l`` of ``numpy.random.SeedSequence(seed)``, so a layer does not depend on scheduling or ``jobs``).
   ``theta`` acts on *centred fractional coordinates* ``f = (2 q + 1) / S - 1`` (``-1`` and ``1`` at the outer
   faces of the grid, as torch's ``affine_grid``); :func:`theta_to_voxel_affine` turns it into a voxel affine
   once, and nothing else sees fractional coordinates.
2. The template image (2 x 2 x 2 block mean to 4 mm, i.e. anti-aliased) is resampled through ``theta``
   (trilinear), the mask likewise (linear, > 0: a margin of at most one voxel), edge values continuing outwards,
   onto the 4 mm grid in the layer's frame. That grid is cut to (or extended to) the box holding the whole
   transformed mask, so that mapping back reaches every mask voxel even where ``theta`` zooms in.
3. ``skimage.segmentation.slic`` with ``channel_axis=None``, ``mask``, ``spacing``, ``start_label=1``,
   ``enforce_connectivity=True`` on the bounding box of the resampled mask; 26-connected components are relabelled.
4. The labels are mapped back onto the template's 4 mm grid with the inverse affine (nearest) and restricted to
   the template mask. Per label only its largest 26-connected piece is kept; stray fragments and any uncovered
   mask voxels are grown from their labelled neighbours (each grown voxel takes a label present among its 26
   neighbours, so every label stays 26-connected); a mask component that no label reached becomes a new label.
5. Fewer than ``K`` labels: the largest is cut in two along its principal axis (each half split further into its
   connected pieces) until there are at least ``K``. More than ``K``: union-find merge over the 26-adjacency graph
   (background excluded) -- repeatedly the smallest supervoxel into its smallest neighbour, adjacency and sizes
   updated after every merge -- until exactly ``K`` remain; relabelled ``1..K`` in raster order of first voxel.

Every step is deterministic, so a layer succeeds on the first try; there are no retry loops. The only ways to fail
are inputs that make ``K`` connected supervoxels impossible (an empty mask, fewer than ``K`` mask voxels at 4 mm,
or more than ``K`` separate mask components), reported as :class:`~slicreg.errors.InputError` before any work.

Intensities: SLIC (scikit-image >= 0.19) rescales the masked image to ``[0, 1]`` with its own min and max, which
makes the meaning of ``compactness`` depend on the scan's extreme values. Here the image is clipped to
``intensity_window_hu`` and the compactness handed to SLIC is scaled by ``window width / (masked max - min)``, so
``compactness`` always means: colour distance in units of the window width (``(-1000, 1000)`` HU, i.e. 2000 HU)
against spatial distance in units of the seed spacing. ``spacing`` is passed to SLIC relative to the smallest
voxel size (``(1, 1, 1)`` for an isotropic grid), so the value does not depend on the resolution either. In these
units the reference setting (image HU / 500, compactness 1.5, no rescaling in old scikit-image) is
``1.5 * 500 / 2000 = 0.375``; the default :data:`DEFAULT_COMPACTNESS` was re-tuned (docs/supervoxels.md).
"""

from __future__ import annotations

import heapq
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slicreg.errors import InputError

__all__ = [
    "DEFAULT_COMPACTNESS",
    "BODY_THRESHOLD_HU",
    "SupervoxelLayers",
    "template_supervoxels",
    "build_supervoxel_layers",
    "organ_mask",
    "body_mask",
    "downsample_mask",
    "downsample_image",
    "theta_to_voxel_affine",
    "merge_to_count",
    "make_connected",
    "supervoxel_statistics",
    "overlay_png",
]

#: SLIC compactness re-tuned for scikit-image 0.26 in the units described in the module docstring.
DEFAULT_COMPACTNESS = 0.1

#: The one body threshold (HU) of the project (:func:`body_mask`): the value the cohort's subjects -- and so the
#: template the shipped weights were trained on -- were made with. The stage and command defaults
#: (``body_threshold_hu``) repeat it; a test keeps them equal.
BODY_THRESHOLD_HU = -400.0

_OFFSETS_13 = [
    (dx, dy, dz)
    for dx in (-1, 0, 1)
    for dy in (-1, 0, 1)
    for dz in (-1, 0, 1)
    if (dx, dy, dz) > (0, 0, 0)
]  # one of each pair of opposite 26-neighbour offsets


# ----------------------------------------------------------------------------------------------------- masks
def organ_mask(labels: np.ndarray, *, distance_vox: float = 30.0) -> np.ndarray:
    """The reference's mask: voxels closer than ``distance_vox`` to the union of the organ labels.

    Computed on the grid of ``labels`` (the 2 mm template grid, where 30 voxels = 60 mm, as in the reference,
    which took the Euclidean distance transform of the 2 mm label map); distances are Euclidean in voxels.

    Args:
        labels: ``(X, Y, Z)`` integer label map; every value > 0 is an organ.
        distance_vox: voxels with distance ``< distance_vox`` (organ voxels have distance 0) are in the mask.

    Returns:
        ``(X, Y, Z)`` bool.

    Raises:
        InputError: not 3-D, or no organ voxel at all.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"organ_mask: labels must be a 3-D label map (X, Y, Z), got shape {labels.shape}")
    organs = labels > 0
    if not organs.any():
        raise InputError("organ_mask: the label map has no organ voxel (all 0); use a body mask instead")
    if not distance_vox > 0:
        raise InputError(f"organ_mask: distance_vox must be > 0, got {distance_vox}")
    # voxels farther than distance_vox from the organs' bounding box cannot be in the mask: work inside it only
    box = _bbox(organs, margin=int(math.ceil(distance_vox)))
    out = np.zeros(labels.shape, dtype=bool)
    out[box] = ndimage.distance_transform_edt(~organs[box]) < distance_vox
    return out


def _largest_component(mask: np.ndarray, *, connectivity: int) -> np.ndarray:
    """The largest connected component of a non-empty boolean mask (``connectivity`` 6 or 26 in 3-D)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    lab, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def body_mask(image_hu: np.ndarray, *, threshold: float = BODY_THRESHOLD_HU, opening_vox: int = 3) -> np.ndarray:
    """The body of a CT scan, without labels: the largest component of ``image_hu > threshold``, holes filled.

    The project's one body mask (the label-free supervoxel mask, the evaluation's field-error region, the
    cohort maker's source body). Steps:

    1. threshold (default :data:`BODY_THRESHOLD_HU`, -400 HU: soft tissue, fat and bone in; air and lung out);
    2. the largest 26-connected component;
    3. holes filled slice by slice across axis 2, then 1, then 0 (so lungs and bowel gas that open through a
       side of the field of view in 3-D, but are enclosed within a slice, are filled too), then in 3-D: the
       result has no enclosed background;
    4. a binary opening by ``opening_vox`` voxels (6-connected erosions with the outside of the volume counted
       as body, so a body cut by the field of view is not eroded from the cut; the largest 6-connected
       component of the eroded mask; as many dilations, intersected with the filled mask), which detaches thin
       objects touching the body such as the patient table.

    Args:
        image_hu: ``(X, Y, Z)`` CT in Hounsfield units (any orientation: every axis is treated alike).
        threshold: HU threshold (keyword-only).
        opening_vox: opening radius in voxels (3 at 2 mm removes attached structures thinner than ~12 mm); 0
            switches it off (the cohort maker, whose subjects were made without it).

    Returns:
        ``(X, Y, Z)`` bool.

    Raises:
        InputError: not 3-D, or no voxel above the threshold.
    """
    from scipy import ndimage

    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3:
        raise InputError(f"body_mask: image must be 3-D (X, Y, Z), got shape {image_hu.shape}")
    fg = image_hu > threshold
    if not fg.any():
        raise InputError(f"body_mask: no voxel above {threshold:g} HU (is the image in Hounsfield units?)")
    body = _largest_component(fg, connectivity=26)
    for axis in (2, 1, 0):
        moved = np.moveaxis(body, axis, 0)  # a view: filling its slices fills ``body``
        for k in range(moved.shape[0]):
            if moved[k].any():
                moved[k] = ndimage.binary_fill_holes(moved[k])
    body = ndimage.binary_fill_holes(body)
    if opening_vox > 0:
        core = ndimage.binary_erosion(body, iterations=int(opening_vox), border_value=1)
        if core.any():
            kept = _largest_component(core, connectivity=6)
            body = ndimage.binary_dilation(kept, iterations=int(opening_vox)) & body
    return body


def _crop_even(a: np.ndarray) -> np.ndarray:
    return a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2]


def downsample_image(image: np.ndarray) -> np.ndarray:
    """2 x 2 x 2 block mean: ``(X, Y, Z)`` -> ``(X // 2, Y // 2, Z // 2)`` float32 (a last odd voxel is dropped).

    Coarse voxel ``q`` averages fine voxels ``2 q`` and ``2 q + 1`` per axis: centre ``2 q + 0.5``, as in
    :func:`slicreg.conventions.downsample_affine` with factor 2."""
    a = _crop_even(np.asarray(image, dtype=np.float32))
    x, y, z = (s // 2 for s in a.shape)
    return a.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5), dtype=np.float32)


def downsample_mask(mask: np.ndarray) -> np.ndarray:
    """2 x 2 x 2 majority: a 4 mm voxel is in the mask if at least 4 of its 8 fine voxels are."""
    m = _crop_even(np.asarray(mask, dtype=bool))
    x, y, z = (s // 2 for s in m.shape)
    return m.reshape(x, 2, y, 2, z, 2).sum(axis=(1, 3, 5), dtype=np.int8) >= 4


# -------------------------------------------------------------------------------------------- random affine
def theta_to_voxel_affine(theta: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Turn ``theta`` (3 x 4, acting on centred fractional coordinates) into a voxel affine of a grid.

    Fractional coordinate of voxel ``q`` on an axis of size ``S``: ``f = (2 q + 1) / S - 1`` (``align_corners=False``
    semantics, :func:`slicreg.grid.normalised_scale_offset`; unlike ``grid_sample``'s, the components stay in
    array axis order). Output voxel ``q`` of the resampled grid takes the value of the source at ``theta @ [f(q), 1]``,
    which in voxels is ``matrix @ q + offset``.

    Returns:
        ``(matrix (3, 3), offset (3,))`` in voxels, the form ``scipy.ndimage.affine_transform`` takes.
    """
    from slicreg.grid import normalised_scale_offset

    theta = np.asarray(theta, dtype=np.float64)
    scale, shift = normalised_scale_offset(shape, align_corners=False)  # f = scale * q + shift, array axis order
    lin, trans = theta[:, :3], theta[:, 3]
    matrix = lin * scale[None, :] / scale[:, None]
    offset = (lin @ shift + trans - shift) / scale
    return matrix, offset


def _invert(matrix: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv = np.linalg.inv(matrix)
    return inv, -inv @ offset


# ------------------------------------------------------------------------------------------- label helpers
def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel the positive values ``1..n`` in raster order of their first voxel (0 stays 0)."""
    values, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    nz = values > 0
    order = np.argsort(first[nz], kind="stable")
    lut = np.zeros(values.size, dtype=np.int32)
    idx_nz = np.flatnonzero(nz)
    lut[idx_nz[order]] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[inverse].reshape(labels.shape), int(order.size)


def _components_26(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions of equal positive value (26-connectivity); returns ``(ids, n)``, ids 1..n."""
    from skimage.measure import label

    ids, n = label(labels, background=0, connectivity=3, return_num=True)
    return ids.astype(np.int32, copy=False), int(n)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def make_connected(labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Make every label 26-connected and cover ``mask`` exactly.

    Outside ``mask`` everything becomes 0. Per label the largest 26-connected piece is kept (ties: the piece met
    first in raster order); the other pieces and unlabelled mask voxels are filled by growing the kept labels inside
    the mask, one 26-neighbourhood shell at a time (a voxel takes the largest label among its labelled neighbours,
    so it touches a voxel of its new label and connectivity holds). Mask regions no label can reach get new labels,
    one per 26-connected piece.

    Args:
        labels: ``(X, Y, Z)`` integer labels, 0 = none.
        mask: ``(X, Y, Z)`` bool.

    Returns:
        ``(labels (X, Y, Z) int32 with values 1..n on the mask, compact), info`` with the counts
        ``fragment_voxels`` (voxels of stray pieces), ``grown_voxels`` (voxels labelled by growing: the stray
        pieces and uncovered mask voxels) and ``new_labels``.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    lab = np.where(mask, labels, 0).astype(np.int32)
    ids, n = _components_26(lab)
    fragment_voxels = 0
    if n:
        sizes = np.bincount(ids.ravel(), minlength=n + 1)
        owner = np.zeros(n + 1, dtype=np.int64)
        owner[ids.ravel()] = lab.ravel()
        comp = np.arange(1, n + 1)
        order = np.lexsort((comp, -sizes[1:], owner[1:]))  # by owner, then larger first, then lower id
        sorted_owner = owner[1:][order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sorted_owner[1:] != sorted_owner[:-1]
        keep = np.zeros(n + 1, dtype=bool)
        keep[comp[order][first]] = True
        drop = ~keep[ids] & (lab > 0)
        fragment_voxels = int(drop.sum())
        lab[drop] = 0
    todo = mask & (lab == 0)
    grown = 0
    while True:
        box = _bbox(todo, margin=1)
        if box is None:
            break
        dil = ndimage.maximum_filter(lab[box], size=3, mode="constant", cval=0)
        take = todo[box] & (dil > 0)
        if not take.any():
            break
        sub = lab[box]
        sub[take] = dil[take]
        todo[box] &= ~take
        grown += int(take.sum())
    new_labels = 0
    if todo.any():
        extra, new_labels = ndimage.label(todo, structure=np.ones((3, 3, 3), dtype=bool))
        lab[todo] = extra[todo] + int(lab.max())
    out, _ = _compact(lab)
    return out, {"fragment_voxels": fragment_voxels, "grown_voxels": grown, "new_labels": int(new_labels)}


def _adjacency_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique pairs ``(a, b)``, ``0 < a < b``, of labels that touch (26-neighbourhood); shape ``(P, 2)``."""
    n = int(labels.max())
    codes = []
    sx, sy, sz = labels.shape
    for dx, dy, dz in _OFFSETS_13:
        a = labels[max(0, -dx): sx - max(0, dx), max(0, -dy): sy - max(0, dy), max(0, -dz): sz - max(0, dz)]
        b = labels[max(0, dx): sx - max(0, -dx), max(0, dy): sy - max(0, -dy), max(0, dz): sz - max(0, -dz)]
        hit = (a != b) & (a > 0) & (b > 0)
        va = a[hit].astype(np.int64)
        vb = b[hit].astype(np.int64)
        codes.append(np.unique(np.minimum(va, vb) * (n + 1) + np.maximum(va, vb)))
    allc = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return np.stack([allc // (n + 1), allc % (n + 1)], axis=1)


def _split_largest(labels: np.ndarray, n: int, spacing: np.ndarray) -> int:
    """Cut the largest label (ties: lowest id) at the median of its principal axis, in place; returns new count.

    Each half is further split into its 26-connected pieces, so every label stays connected; at least one new
    label is made whenever the largest label has two or more voxels."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    big = int(np.argmax(sizes))
    if sizes[big] < 2:
        return n
    box = _bbox(labels == big)
    sub = labels[box]
    inside = sub == big
    coords = np.stack(np.nonzero(inside), axis=1).astype(np.float64) * spacing
    centred = coords - coords.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    axis = vecs[:, -1]
    axis = axis * (1.0 if axis[np.argmax(np.abs(axis))] > 0 else -1.0)  # a sign fixed by the data alone
    order = np.argsort(centred @ axis, kind="stable")
    half = np.zeros(coords.shape[0], dtype=np.int32)
    half[order[coords.shape[0] // 2:]] = 1
    two = np.zeros(sub.shape, dtype=np.int32)
    two[inside] = half + 1
    pieces, n_pieces = _components_26(two)
    piece_of = pieces[inside]
    new_ids = np.empty(n_pieces + 1, dtype=np.int32)
    new_ids[1] = big
    new_ids[2:] = np.arange(n + 1, n + n_pieces, dtype=np.int32)
    sub[inside] = new_ids[piece_of]
    return n + n_pieces - 1


def merge_to_count(labels: np.ndarray, n_supervoxels: int, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, dict[str, int]]:
    """Bring connected labels to exactly ``n_supervoxels``: split the largest while too few, then merge.

    Merging is a union-find over the 26-adjacency graph of the labels (background excluded): the smallest
    supervoxel (ties: lowest id) is merged into its smallest neighbour (ties: lowest id); sizes and adjacency are
    updated after every merge, so later choices see the merged regions. A supervoxel without neighbours (a mask
    component of its own) is never merged. Two touching connected regions form a connected region, so
    connectivity is preserved.

    Args:
        labels: ``(X, Y, Z)`` int, values ``1..n`` each 26-connected, 0 = background.
        n_supervoxels: the count ``K`` wanted.
        spacing: voxel size per axis, for the principal axis of a split.

    Returns:
        ``(labels (X, Y, Z) int32 with values 1..K in raster order of first voxel, info)`` with ``splits`` and
        ``merges`` counts.

    Raises:
        InputError: fewer than ``K`` labelled voxels, or more than ``K`` separate (non-touching) regions.
    """
    lab, n = _compact(np.asarray(labels))
    n_vox = int(np.count_nonzero(lab))
    if n_vox < n_supervoxels:
        raise InputError(f"merge_to_count: only {n_vox} labelled voxels, cannot make {n_supervoxels} supervoxels")
    splits = 0
    spacing = np.asarray(spacing, dtype=np.float64)
    while n < n_supervoxels:
        n = _split_largest(lab, n, spacing)
        splits += 1
    merges = 0
    if n > n_supervoxels:
        size = np.bincount(lab.ravel(), minlength=n + 1).astype(np.int64)
        adj: list[set[int]] = [set() for _ in range(n + 1)]
        for a, b in _adjacency_pairs(lab).tolist():
            adj[a].add(b)
            adj[b].add(a)
        parent = np.arange(n + 1)
        heap = [(int(size[i]), i) for i in range(1, n + 1)]
        heapq.heapify(heap)
        alive = n
        while alive > n_supervoxels:
            if not heap:
                raise InputError(
                    f"merge_to_count: {alive} separate regions remain and none touches another; the mask has more "
                    f"than {n_supervoxels} components")
            s, a = heapq.heappop(heap)
            if parent[a] != a or size[a] != s or not adj[a]:
                continue  # stale entry, or an isolated region that can never merge
            b = min(adj[a], key=lambda j: (size[j], j))
            parent[a] = b
            size[b] += size[a]
            size[a] = 0
            for c in adj[a]:
                if c != b:
                    adj[c].discard(a)
                    adj[c].add(b)
                    adj[b].add(c)
            adj[b].discard(a)
            adj[a] = set()
            heapq.heappush(heap, (int(size[b]), b))
            alive -= 1
            merges += 1
        root = parent.copy()
        for i in range(n + 1):  # resolve chains a -> b -> c (path compression)
            r = i
            while root[r] != r:
                r = root[r]
            j = i
            while root[j] != r:
                root[j], j = r, root[j]
        lab = root[lab].astype(np.int32)
    out, count = _compact(lab)
    if count != n_supervoxels:  # unreachable given the checks above; a guard, not a retry
        raise RuntimeError(f"merge_to_count: internal error, got {count} labels instead of {n_supervoxels}")
    return out, {"splits": splits, "merges": merges}


# --------------------------------------------------------------------------------------------- one layer
@dataclass(frozen=True)
class _LayerParams:
    n_supervoxels: int
    n_segments: int
    compactness: float
    max_num_iter: int
    min_size_factor: float
    affine_sigma: float
    spacing: tuple[float, float, float]
    intensity_window_hu: tuple[float, float]


def _run_slic(image: np.ndarray, mask: np.ndarray, p: _LayerParams) -> np.ndarray:
    """SLIC on the bounding box of ``mask``; returns int32 labels on the full grid (0 outside the mask)."""
    from skimage.segmentation import slic

    out = np.zeros(mask.shape, dtype=np.int32)
    box = _bbox(mask, margin=1)
    if box is None:
        return out
    lo, hi = p.intensity_window_hu
    img = np.clip(image[box], lo, hi).astype(np.float64)
    m = mask[box]
    vals = img[m]
    span = float(vals.max() - vals.min())
    compactness = p.compactness * (hi - lo) / span if span > 0 else p.compactness
    rel_spacing = np.asarray(p.spacing, dtype=np.float64) / min(p.spacing)
    with warnings.catch_warnings():
        # scikit-image's seeding k-means (scipy kmeans2) may warn about an empty cluster; harmless here
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        seg = slic(img, n_segments=p.n_segments, compactness=compactness, max_num_iter=p.max_num_iter,
                   spacing=rel_spacing, enforce_connectivity=True, min_size_factor=p.min_size_factor,
                   start_label=1, mask=m, channel_axis=None)
    out[box] = np.where(m, seg, 0)
    return out


def _layer(image4: np.ndarray, mask4: np.ndarray, seed_seq: np.random.SeedSequence, p: _LayerParams
           ) -> tuple[np.ndarray, dict[str, Any]]:
    from scipy import ndimage

    rng = np.random.default_rng(seed_seq)
    theta = np.eye(3, 4) + p.affine_sigma * rng.standard_normal((3, 4))
    shape = mask4.shape
    matrix, offset = theta_to_voxel_affine(theta, shape)  # layer voxel -> template voxel
    inv_m, inv_o = _invert(matrix, offset)
    # The layer's grid: the 4 mm grid in the layer's frame, limited to (and extended to) the box that holds the
    # whole transformed mask, so that mapping back reaches every mask voxel even where theta shrinks the view.
    box = _bbox(mask4)
    lo_t = np.asarray([b.start for b in box], dtype=np.float64) - 1.0
    hi_t = np.asarray([b.stop - 1 for b in box], dtype=np.float64) + 1.0
    corners = np.stack(np.meshgrid(*zip(lo_t, hi_t), indexing="ij"), axis=-1).reshape(-1, 3)
    in_layer = corners @ inv_m.T + inv_o
    origin = np.floor(in_layer.min(axis=0)) - 1.0
    shape_l = tuple(int(v) for v in np.ceil(in_layer.max(axis=0)) + 2.0 - origin)
    offset_l = matrix @ origin + offset  # local layer voxel u -> template voxel matrix @ u + offset_l
    img_l = ndimage.affine_transform(image4, matrix, offset_l, output_shape=shape_l, order=1, mode="nearest")
    # every layer voxel whose trilinear footprint touches the mask (> 0, not >= 0.5), so that each template mask
    # voxel finds a labelled layer voxel when mapped back with nearest rounding
    mask_l = ndimage.affine_transform(mask4.astype(np.float32), matrix, offset_l, output_shape=shape_l, order=1,
                                      mode="nearest") > 0.0
    seg = _run_slic(img_l, mask_l, p)
    n_slic = int(seg.max())
    comps, n_comp = _components_26(seg)
    back = ndimage.affine_transform(comps, inv_m, inv_o - origin, output_shape=shape, order=0, mode="constant",
                                    cval=0)
    back[~mask4] = 0
    n_mapped = int(np.count_nonzero(np.bincount(back.ravel())[1:]))
    fixed, fix_info = make_connected(back, mask4)
    n_fixed = int(fixed.max())
    final, merge_info = merge_to_count(fixed, p.n_supervoxels, spacing=p.spacing)
    info = {
        "theta": theta.round(6).tolist(),
        "slic_segments": n_slic,
        "components_26": n_comp,
        "labels_after_mapping": n_mapped,
        "labels_after_fix": n_fixed,
        **fix_info,
        **merge_info,
    }
    return final.astype(np.uint8), info


# ------------------------------------------------------------------------------------------ all layers
@dataclass
class SupervoxelLayers:
    """Result of :func:`build_supervoxel_layers`.

    Attributes:
        layers: ``(L, X/2, Y/2, Z/2)`` uint8, values ``0..K`` (0 = background) on the 4 mm grid.
        mask: ``(X/2, Y/2, Z/2)`` bool, the 4 mm mask every layer covers exactly.
        image: ``(X/2, Y/2, Z/2)`` float32, the 4 mm template image (HU) SLIC saw before the random affines.
        layer_info: per layer, what happened (theta, SLIC segment count, fragments fixed, splits, merges).
        parameters: the resolved parameters.
    """

    layers: np.ndarray
    mask: np.ndarray
    image: np.ndarray
    layer_info: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


_WORKER: dict[str, Any] = {}


def _init_worker(image4: np.ndarray, mask4: np.ndarray, params: _LayerParams) -> None:
    _WORKER.update(image4=image4, mask4=mask4, params=params)


def _worker_layer(seed_seq: np.random.SeedSequence) -> tuple[np.ndarray, dict[str, Any]]:
    return _layer(_WORKER["image4"], _WORKER["mask4"], seed_seq, _WORKER["params"])


def build_supervoxel_layers(
    image_hu: np.ndarray,
    mask: np.ndarray,
    *,
    n_layers: int = 16,
    n_supervoxels: int = 127,
    n_segments: int = 208,
    compactness: float = DEFAULT_COMPACTNESS,
    max_num_iter: int = 5,
    min_size_factor: float = 0.85,
    affine_sigma: float = 0.05,
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    intensity_window_hu: tuple[float, float] = (-1000.0, 1000.0),
    seed: int = 0,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    done_layers: Mapping[int, tuple[np.ndarray, dict[str, Any]]] | None = None,
    on_layer: Callable[[int, np.ndarray, dict[str, Any]], None] | None = None,
) -> SupervoxelLayers:
    """Build the template supervoxel layers (see the module docstring for the steps) and report on them.

    Args:
        image_hu: ``(X, Y, Z)`` template CT in HU on its 2 mm grid (e.g. 192 x 160 x 256).
        mask: ``(X, Y, Z)`` bool on the same grid (:func:`organ_mask` or :func:`body_mask`).
        n_layers: number of layers ``L`` (16).
        n_supervoxels: supervoxels per layer ``K`` (127; at most 255 for uint8).
        n_segments: SLIC seeds per layer (208; more than ``K`` so the merge evens out sizes).
        compactness: SLIC compactness in this module's units (window-width colour units; see module docstring).
        max_num_iter: SLIC k-means iterations (5).
        min_size_factor: SLIC's minimum segment size as a fraction of the mean segment size (0.85).
        affine_sigma: standard deviation of the random affine entries (0.05).
        spacing_mm: voxel size of the input grid in mm (the 4 mm grid has twice that); passed to SLIC relative
            to its smallest entry.
        intensity_window_hu: HU window the image is clipped to before SLIC (defines the colour unit).
        seed: seed of the layers' random affines; layer ``l`` uses child ``l`` of ``SeedSequence(seed)``.
        jobs: worker processes (``spawn``); the output is bit-identical for any ``jobs``.
        progress: called with the number of finished layers after each layer.
        done_layers: layers finished by an earlier, interrupted call with the same inputs and parameters (layer
            index -> ``(labels (X // 2, Y // 2, Z // 2) uint8, info)``, as given to ``on_layer``); only the others
            are computed. Each layer depends only on its own seed, so the result is bit-identical.
        on_layer: called with ``(index, labels, info)`` as each layer finishes (e.g. to store it for a resume).

    Returns:
        :class:`SupervoxelLayers` with ``layers`` of shape ``(L, X // 2, Y // 2, Z // 2)`` uint8.

    Raises:
        InputError: shapes differ, non-finite image, bad parameters, empty mask, fewer than ``K`` mask voxels at
            4 mm, or more than ``K`` separate mask components (26-connectivity) at 4 mm.
    """
    from scipy import ndimage

    image_hu = np.asarray(image_hu)
    mask = np.asarray(mask)
    if image_hu.ndim != 3:
        raise InputError(f"template_supervoxels: image_hu must be 3-D (X, Y, Z), got shape {image_hu.shape}")
    if mask.shape != image_hu.shape:
        raise InputError(f"template_supervoxels: mask shape {mask.shape} differs from image shape {image_hu.shape}")
    if min(image_hu.shape) < 2:
        raise InputError(f"template_supervoxels: image_hu needs at least 2 voxels per axis, got {image_hu.shape}")
    if not np.all(np.isfinite(image_hu)):
        raise InputError("template_supervoxels: image_hu contains NaN or Inf values")
    if not 1 <= int(n_supervoxels) <= 255:
        raise InputError(f"template_supervoxels: n_supervoxels must be in 1..255 (uint8), got {n_supervoxels}")
    if int(n_layers) < 1 or int(n_segments) < 1 or int(max_num_iter) < 1 or int(jobs) < 1:
        raise InputError(
            f"template_supervoxels: n_layers, n_segments, max_num_iter and jobs must be >= 1, got {n_layers}, "
            f"{n_segments}, {max_num_iter}, {jobs}")
    if not compactness > 0 or not affine_sigma >= 0 or not min_size_factor >= 0:
        raise InputError(f"template_supervoxels: need compactness > 0, affine_sigma >= 0, min_size_factor >= 0; got "
                         f"{compactness}, {affine_sigma}, {min_size_factor}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"template_supervoxels: spacing_mm must be 3 positive numbers, got {spacing_mm}")
    lo, hi = (float(v) for v in intensity_window_hu)
    if not hi > lo:
        raise InputError(f"template_supervoxels: intensity_window_hu must be (low, high) with high > low, "
                         f"got {intensity_window_hu}")
    mask_bool = mask.astype(bool)
    if not mask_bool.any():
        raise InputError("template_supervoxels: the mask is empty (no voxel inside); nothing to segment")
    mask4 = downsample_mask(mask_bool)
    n_vox = int(mask4.sum())
    if n_vox < n_supervoxels:
        raise InputError(f"template_supervoxels: the mask has {n_vox} voxels at half resolution, fewer than "
                         f"n_supervoxels = {n_supervoxels}")
    _, n_parts = ndimage.label(mask4, structure=np.ones((3, 3, 3), dtype=bool))
    if n_parts > n_supervoxels:
        raise InputError(f"template_supervoxels: the mask has {n_parts} separate components at half resolution, "
                         f"more than n_supervoxels = {n_supervoxels}; clean the mask (e.g. keep large components)")
    image4 = downsample_image(image_hu)
    params = _LayerParams(int(n_supervoxels), int(n_segments), float(compactness), int(max_num_iter),
                          float(min_size_factor), float(affine_sigma), tuple(2.0 * s for s in spacing), (lo, hi))
    seeds = np.random.SeedSequence(int(seed)).spawn(int(n_layers))
    results: list[tuple[np.ndarray, dict[str, Any]] | None] = [None] * n_layers
    for i, result in (done_layers or {}).items():
        if 0 <= int(i) < n_layers and tuple(result[0].shape) == mask4.shape:
            results[int(i)] = (np.asarray(result[0], dtype=np.uint8), dict(result[1]))
    todo = [i for i in range(n_layers) if results[i] is None]
    done = n_layers - len(todo)
    if progress is not None and done:
        progress(done)

    def finished(i: int, result: tuple[np.ndarray, dict[str, Any]]) -> None:
        nonlocal done
        results[i] = result
        done += 1
        if on_layer is not None:
            on_layer(i, result[0], result[1])
        if progress is not None:
            progress(done)

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            finished(i, _layer(image4, mask4, seeds[i], params))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(int(jobs), len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(image4, mask4, params)) as pool:
            futures = {pool.submit(_worker_layer, seeds[i]): i for i in todo}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    layers = np.stack([r[0] for r in results])  # type: ignore[index]
    info = [r[1] for r in results]  # type: ignore[index]
    resolved = {
        "n_layers": int(n_layers), "n_supervoxels": int(n_supervoxels), "n_segments": int(n_segments),
        "compactness": float(compactness), "max_num_iter": int(max_num_iter),
        "min_size_factor": float(min_size_factor), "affine_sigma": float(affine_sigma),
        "spacing_mm": list(spacing), "slic_spacing_relative": list(np.asarray(params.spacing) / min(params.spacing)),
        "intensity_window_hu": [lo, hi], "seed": int(seed), "enforce_connectivity": True, "start_label": 1,
        "mask_voxels_half_resolution": n_vox, "mask_components": int(n_parts),
    }
    return SupervoxelLayers(layers, mask4, image4, info, resolved)


def template_supervoxels(image_hu: np.ndarray, mask: np.ndarray, **kwargs: Any) -> np.ndarray:
    """The template's supervoxel layers: ``(L, X // 2, Y // 2, Z // 2)`` uint8 in ``0..K`` at half resolution.

    Same arguments as :func:`build_supervoxel_layers` (all keyword-only), which also returns the 4 mm mask and
    image and per-layer reports. Default: 16 layers of 127 supervoxels + background, at 4 mm for a 2 mm template.
    """
    return build_supervoxel_layers(image_hu, mask, **kwargs).layers


# ------------------------------------------------------------------------------------------- statistics
_SPHERE_MOMENT = 3.0 / 5.0 * (3.0 / (4.0 * math.pi)) ** (2.0 / 3.0)


def supervoxel_statistics(layers: np.ndarray, *, spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
                          image_hu: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per layer: label count, supervoxel volumes (mL), a compactness score and (with an image) HU spread.

    Compactness score of a supervoxel: the second moment of a ball of the same volume divided by the supervoxel's
    own (``trace`` of the covariance of its voxel positions in mm, each voxel counted as a solid box): 1 for a ball,
    0.92 for a cube, lower for elongated or ragged shapes.

    Args:
        layers: ``(L, X, Y, Z)`` integer, 0 = background.
        spacing_mm: voxel size of that grid.
        image_hu: optional ``(X, Y, Z)`` image on the same grid: adds the mean within-supervoxel HU standard
            deviation (lower = supervoxels follow intensity boundaries better).

    Returns:
        One dict per layer.
    """
    layers = np.asarray(layers)
    if layers.ndim != 4:
        raise InputError(f"supervoxel_statistics: layers must be (L, X, Y, Z), got shape {layers.shape}")
    sp = np.asarray(spacing_mm, dtype=np.float64)
    voxel_ml = float(np.prod(sp)) / 1000.0
    nz = (layers > 0).any(axis=0)
    coords = [c.astype(np.float64) * sp[a] for a, c in enumerate(np.nonzero(nz))]
    out = []
    for layer in layers:
        flat = layer[nz].astype(np.int64)
        n = int(flat.max()) if flat.size else 0
        count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
        present = count > 0
        trace = np.zeros(n)
        for a in range(3):
            s1 = np.bincount(flat, weights=coords[a], minlength=n + 1)[1:]
            s2 = np.bincount(flat, weights=coords[a] ** 2, minlength=n + 1)[1:]
            with np.errstate(invalid="ignore", divide="ignore"):
                trace += s2 / count - (s1 / count) ** 2 + sp[a] ** 2 / 12.0
        vol_mm3 = count * float(np.prod(sp))
        score = _SPHERE_MOMENT * vol_mm3[present] ** (2.0 / 3.0) / trace[present]
        vols = count[present] * voxel_ml
        entry: dict[str, Any] = {
            "labels": int(present.sum()),
            "volume_ml": _summary(vols),
            "volume_cv": float(vols.std() / vols.mean()) if vols.size else 0.0,
            "compactness_score": _summary(score),
        }
        if image_hu is not None:
            img = np.asarray(image_hu, dtype=np.float64)[nz]
            m1 = np.bincount(flat, weights=img, minlength=n + 1)[1:][present] / count[present]
            m2 = np.bincount(flat, weights=img ** 2, minlength=n + 1)[1:][present] / count[present]
            entry["hu_std_within_mean"] = float(np.sqrt(np.maximum(m2 - m1 ** 2, 0.0)).mean())
        out.append(entry)
    return out


def _summary(v: np.ndarray) -> dict[str, float]:
    if v.size == 0:
        return {}
    q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100])
    return {"min": float(q[0]), "p5": float(q[1]), "p25": float(q[2]), "median": float(q[3]), "p75": float(q[4]),
            "p95": float(q[5]), "max": float(q[6]), "mean": float(v.mean())}


# ------------------------------------------------------------------------------------------------ figure
def overlay_png(image_hu: np.ndarray, layers: np.ndarray, *, layer_indices: Sequence[int] = (0, 1, 2),
                window_hu: tuple[float, float] = (-200.0, 300.0), dpi: int = 110) -> bytes:
    """A PNG (bytes) of a few layers' supervoxel boundaries over the template, axial and coronal.

    Args:
        image_hu: ``(X, Y, Z)`` template on the 2 mm grid (RAS voxel order assumed: axis 2 = head-feet).
        layers: ``(L, X // 2, Y // 2, Z // 2)`` supervoxels at half resolution; upsampled x 2 by repetition
            (4 mm voxel ``q`` covers 2 mm voxels ``2 q`` and ``2 q + 1``).
        layer_indices: layers to show, one row each.
        window_hu: display window.
        dpi: resolution of the figure.

    The slices go through the centroid of the first layer's foreground. Patient right is on the image's left
    (radiological convention); anterior and superior are up.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image_hu = np.asarray(image_hu, dtype=np.float32)
    layers = np.asarray(layers)
    if layers.ndim != 4:
        raise InputError(f"overlay_png: layers must be (L, X, Y, Z), got shape {layers.shape}")
    idx = [i for i in layer_indices if 0 <= i < layers.shape[0]] or [0]
    img = _crop_even(image_hu)
    fg = np.argwhere(layers[0] > 0)
    centre = (fg.mean(axis=0) if fg.size else np.asarray(layers.shape[1:]) / 2.0).astype(int)
    zc, yc = 2 * int(centre[2]), 2 * int(centre[1])
    colours = np.random.default_rng(12345).uniform(0.15, 1.0, size=(256, 3))
    colours[0] = 0.0
    lo, hi = window_hu
    fig = Figure(figsize=(8.0, 3.2 * len(idx)), dpi=dpi)
    FigureCanvasAgg(fig)  # render with Agg explicitly, whatever the global backend is
    for row, li in enumerate(idx):
        up = layers[li].repeat(2, 0).repeat(2, 1).repeat(2, 2)
        for col, (name, bg, lab, ylabel) in enumerate((
            (f"axial z={zc}", img[:, :, zc], up[:, :, zc], "anterior"),
            (f"coronal y={yc}", img[:, yc, :], up[:, yc, :], "superior"),
        )):
            ax = fig.add_subplot(len(idx), 2, 2 * row + col + 1)
            grey = np.clip((bg - lo) / (hi - lo), 0.0, 1.0)
            rgb = np.repeat(grey[..., None], 3, axis=2)
            edge = np.zeros(lab.shape, dtype=bool)
            edge[1:, :] |= lab[1:, :] != lab[:-1, :]
            edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            fill = lab > 0
            rgb[fill] = 0.8 * rgb[fill] + 0.2 * colours[lab[fill].astype(np.int64) % 256]
            rgb[edge] = (1.0, 0.85, 0.0)
            ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", interpolation="nearest")
            ax.invert_xaxis()
            ax.set_title(f"layer {li}: {name} ({int(np.unique(layers[li]).size - 1)} supervoxels)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(ylabel + " up", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
