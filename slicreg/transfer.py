"""Carrying the template's supervoxels onto a training scan through a template-registration field.

SLIC-Reg (Heinrich & Hansen, MIDL 2021; docs/method.md, section 4) registers every training scan S (fixed)
to the template T (moving) and samples T's 16 supervoxel layers at ``A x + d(x)`` for every voxel ``x`` of S,
nearest neighbour, at the 4 mm training resolution.

Grids (see :func:`slicreg.grid.downsample_index_map`): the supervoxels live on the template's 4 mm grid,
whose voxel ``q`` is the template's 2 mm voxel ``2q + 0.5``; the field ``u`` lives on the subject's 2 mm grid
(voxels, fixed = subject -> moving = template's 2 mm grid). For every voxel ``q`` of the subject's 4 mm grid:

1. its 2 mm position is ``x = 2q + 0.5``;
2. the field there, ``u(x)``, is interpolated trilinearly (border padding; ``x`` is always inside the grid);
3. the template's 2 mm position is ``p = x + u(x)`` and its 4 mm index ``(p - 0.5) / 2``;
4. the template layers are sampled there by nearest neighbour (voxel ``floor(p4 + 0.5)``), 0 (background) where
   that voxel is not on the template grid.

With ``factor`` f in place of 2 the same holds with ``f q + (f - 1) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slicreg.errors import InputError

__all__ = [
    "template_positions", "sample_layers", "transfer_supervoxels", "reached_region", "LayerCheck", "check_transfer",
]


def _torch():
    import torch

    return torch


def _coarse_shape(fine_shape: Sequence[int], factor: int) -> tuple[int, int, int]:
    return tuple(int(s) // factor for s in fine_shape)  # type: ignore[return-value]


def template_positions(disp_vox: Any, *, factor: int = 2, out_shape: Sequence[int] | None = None,
                       device: Any = "cpu") -> Any:
    """Template coarse-grid index of every voxel of the subject's coarse grid (steps 1-3 of the module doc).

    Args:
        disp_vox: ``(3, X, Y, Z)`` field on the subject's fine (2 mm) grid, voxels, subject -> template fine grid;
            numpy array or torch tensor.
        factor: fine voxels per coarse voxel along each axis (2: 2 mm -> 4 mm).
        out_shape: the subject's coarse grid shape; default ``floor(X / factor)`` etc. (192x160x256 -> 96x80x128).
        device: where to compute for numpy input (torch input stays on its device).

    Returns:
        ``(3, *out_shape)`` float32 positions in template coarse voxels (same type as ``disp_vox``).
    """
    from slicreg.fields import sample
    from slicreg.grid import downsample_index_map

    torch = _torch()
    is_numpy = not isinstance(disp_vox, torch.Tensor)
    u = torch.from_numpy(np.ascontiguousarray(disp_vox)).to(device) if is_numpy else disp_vox
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"disp_vox: expected a field (3, X, Y, Z) in voxels, got {tuple(u.shape)}")
    if int(factor) != factor or factor < 1:
        raise InputError(f"factor: expected a positive integer, got {factor!r}")
    u = u.float()
    out_shape = _coarse_shape(u.shape[1:], factor) if out_shape is None else tuple(int(s) for s in out_shape)
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise InputError(f"out_shape: expected three positive integers, got {out_shape}")
    to_fine = downsample_index_map(int(factor))  # coarse voxel q -> fine voxel f q + (f - 1) / 2
    scale, offset = float(to_fine[0, 0]), float(to_fine[0, 3])
    axes = [torch.arange(s, dtype=torch.float32, device=u.device) * scale + offset for s in out_shape]
    fine = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    moved = fine + sample(u, fine, interpolation="linear", padding="border")
    pos = (moved - offset) / scale  # fine (template) voxel -> template coarse voxel: the inverse map
    return pos.cpu().numpy() if is_numpy else pos


def sample_layers(layers: Any, positions: Any) -> Any:
    """Nearest-neighbour sampling of label layers (step 4 of the module doc).

    The nearest voxel of position ``p`` is ``floor(p + 0.5)``; where it is off the grid the result is 0
    (background), so a position up to half a voxel beyond the outermost voxel centre still takes that voxel:
    the one sampler's ``interpolation="nearest", padding="zero_voxels"`` on float64 positions.

    Args:
        layers: ``(L, X', Y', Z')`` or ``(X', Y', Z')`` integer labels (numpy or torch), dtype kept.
        positions: ``(3, X, Y, Z)`` positions in voxels of ``layers``' grid (numpy input layers are moved to the
            device of tensor positions).

    Returns:
        ``(L, X, Y, Z)`` (or ``(X, Y, Z)``) with the dtype of ``layers``.
    """
    from slicreg.fields import sample

    torch = _torch()
    is_numpy = not isinstance(layers, torch.Tensor)
    pos = torch.from_numpy(np.ascontiguousarray(positions)) if not isinstance(positions, torch.Tensor) else positions
    lab = torch.from_numpy(np.ascontiguousarray(layers)).to(pos.device) if is_numpy else layers
    if lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise InputError(f"layers: expected integer labels, got dtype {lab.dtype}")
    if pos.ndim != 4 or pos.shape[0] != 3:
        raise InputError(f"positions: expected (3, X, Y, Z) voxel positions, got {tuple(pos.shape)}")
    out = sample(lab, pos.to(lab.device).double(), interpolation="nearest", padding="zero_voxels")
    return out.cpu().numpy() if is_numpy else out


def transfer_supervoxels(template_layers: Any, disp_vox: Any, *, factor: int = 2,
                         out_shape: Sequence[int] | None = None, device: Any = "cpu") -> Any:
    """Template supervoxels -> the subject's supervoxels (SLIC-Reg's transfer step).

    Args:
        template_layers: ``(L, Xt, Yt, Zt)`` integer supervoxel layers on the template's coarse (4 mm) grid, e.g.
            uint8 ``(16, 96, 80, 128)`` with 0 = background and 1..127.
        disp_vox: ``(3, X, Y, Z)`` field on the subject's fine (2 mm) grid, voxels, fixed = subject ->
            moving = template (its fine grid, of which ``template_layers``' grid is the ``factor`` downsampling).
        factor: fine voxels per coarse voxel (default 2).
        out_shape: the subject's coarse grid shape (default ``floor((X, Y, Z) / factor)``).
        device: where to compute for numpy input.

    Returns:
        ``(L, *out_shape)`` supervoxels of the subject, dtype of ``template_layers`` (numpy in -> numpy out).
    """
    if np.ndim(template_layers) != 4:
        raise InputError(f"template_layers: expected (L, X, Y, Z) supervoxel layers, got shape "
                         f"{tuple(np.shape(template_layers))}")
    pos = template_positions(disp_vox, factor=factor, out_shape=out_shape, device=device)
    return sample_layers(template_layers, pos)


@dataclass
class LayerCheck:
    """Which template labels a transferred layer kept.

    Attributes:
        layer: layer index.
        n_template: number of non-zero labels in the template layer (127 for a complete layer).
        n_kept: number of those present in the transferred layer.
        lost_at_edge: lost labels that lie (partly) where the subject's field of view does not reach.
        lost_inside: lost labels inside the reached region (squeezed out between samples by compression).
        voxels: voxels per label 1..max in the transferred layer (index 0 = background).
    """

    layer: int
    n_template: int
    n_kept: int
    lost_at_edge: list[int] = field(default_factory=list)
    lost_inside: list[int] = field(default_factory=list)
    voxels: list[int] = field(default_factory=list)

    @property
    def lost(self) -> list[int]:
        return sorted(self.lost_at_edge + self.lost_inside)

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_template": self.n_template, "n_kept": self.n_kept, "lost": self.lost,
                "lost_at_edge": self.lost_at_edge, "lost_inside": self.lost_inside, "voxels": self.voxels}


def reached_region(disp_vox: Any, template_shape: Sequence[int], *, factor: int = 2, close: int = 2) -> np.ndarray:
    """Template coarse voxels inside the region the subject's field of view maps to.

    Every *fine* voxel ``x`` of the subject is mapped to ``x + u(x)`` and its nearest template coarse voxel is
    marked (fine voxels sample the coarse grid twice per axis, so moderate compression leaves no gaps); remaining
    gaps are closed (``close`` dilations then erosions, as if the grid continued without hits) and holes filled.

    Args:
        disp_vox: ``(3, X, Y, Z)`` field on the subject's fine grid (voxels, subject -> template fine grid).
        template_shape: the template's coarse grid ``(Xt, Yt, Zt)``.
        factor: fine voxels per coarse voxel (default 2).
        close: closing iterations (default 2).

    Returns:
        ``template_shape`` boolean mask.
    """
    import scipy.ndimage as ndi

    from slicreg.grid import downsample_index_map

    u = np.asarray(disp_vox.detach().cpu() if hasattr(disp_vox, "detach") else disp_vox, dtype=np.float32)
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"disp_vox: expected a field (3, X, Y, Z) in voxels, got {u.shape}")
    shape = tuple(int(s) for s in template_shape)
    to_fine = downsample_index_map(int(factor))  # template coarse voxel q = fine voxel f q + (f - 1) / 2
    scale, offset = float(to_fine[0, 0]), float(to_fine[0, 3])
    hit = np.zeros(shape, dtype=bool)
    inside = np.ones(u.shape[1:], dtype=bool)
    idx = []
    for ax in range(3):
        grid = np.arange(u.shape[ax + 1], dtype=np.float32).reshape([-1 if d == ax else 1 for d in range(3)])
        i = np.floor((grid + u[ax] - offset) / scale + 0.5).astype(np.int64)
        inside &= (i >= 0) & (i < shape[ax])
        idx.append(i)
    hit[tuple(i[inside] for i in idx)] = True
    if close > 0:  # closing on a padded copy, so that the array border neither erodes nor fills anything
        pad = close + 1
        closed = ndi.binary_closing(np.pad(hit, pad), structure=ndi.generate_binary_structure(3, 1),
                                    iterations=close)
        hit |= closed[pad:-pad, pad:-pad, pad:-pad]
    return ndi.binary_fill_holes(hit)


def check_transfer(template_layers: np.ndarray, transferred: np.ndarray, *,
                   reached: np.ndarray | None = None) -> list[LayerCheck]:
    """Report per layer which template labels survived the transfer.

    Args:
        template_layers: ``(L, Xt, Yt, Zt)`` integer template supervoxels.
        transferred: ``(L, X, Y, Z)`` the subject's supervoxels (output of :func:`transfer_supervoxels`).
        reached: optional template-grid mask of the region the subject reaches (:func:`reached_region`); with it
            a lost label is classified as lost at the field of view's edge (some of its template voxels lie
            outside that region) or lost inside (squeezed out between samples); without it every lost label
            counts as inside.

    Returns:
        One :class:`LayerCheck` per layer.
    """
    tmpl = np.asarray(template_layers)
    out = np.asarray(transferred)
    if tmpl.ndim != 4 or out.ndim != 4 or tmpl.shape[0] != out.shape[0]:
        raise InputError(f"check_transfer: expected (L, ...) template and transferred layers with the same L, got "
                         f"{tmpl.shape} and {out.shape}")
    if reached is not None and np.shape(reached) != tmpl.shape[1:]:
        raise InputError(f"check_transfer: reached mask {np.shape(reached)} does not match the template grid "
                         f"{tmpl.shape[1:]}")
    checks = []
    for layer in range(tmpl.shape[0]):
        t_labels = np.unique(tmpl[layer])
        t_labels = t_labels[t_labels != 0]
        counts = np.bincount(out[layer].ravel().astype(np.int64), minlength=int(t_labels.max(initial=0)) + 1)
        kept = t_labels[counts[t_labels] > 0]
        lost = np.setdiff1d(t_labels, kept)
        edge: list[int] = []
        if reached is not None and lost.size:
            outside_labels = set(np.unique(tmpl[layer][~reached]).tolist())
            edge = [int(v) for v in lost if int(v) in outside_labels]
        inside = [int(v) for v in lost if int(v) not in edge]
        checks.append(LayerCheck(layer, int(t_labels.size), int(kept.size), edge, inside,
                                 [int(c) for c in counts]))
    return checks
