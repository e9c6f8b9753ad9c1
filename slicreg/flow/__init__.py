"""Registration by supervoxels: keypoints, supervoxel features, the Adam kNN flow and the dense field.

SLIC-Reg (docs/method.md, section 7) turns two sets of 16 supervoxel maps -- the template's own, or maps
predicted by the network -- into a displacement field in four steps:

1. **keypoints** on the fixed side: the centres of its supervoxels (:func:`supervoxel_centres`, deterministic,
   16 layers x 127 supervoxels -> up to 2032 points) or seeded random foreground voxels
   (:func:`foreground_keypoints`);
2. **features** for both sides (:func:`supervoxel_features`): per layer a seeded permutation compresses the 128
   labels to 16 channels (8 labels share a channel), one-hot from label maps or summed probabilities, box
   pooling (3, stride 2) then (5, stride 1) -> 16 x 16 = 256 channels at half the supervoxel grid
   (96 x 80 x 128 -> 48 x 40 x 64);
3. **Adam kNN flow** (:func:`adam_keypoint_flow`): one displacement per keypoint, initialised at 0 (or, as an
   option, from corresponding supervoxel centres, :func:`centre_matching_init`), minimising the feature MSE
   between moving (at keypoint + displacement) and fixed (at keypoint) plus ``alpha`` times a kNN-graph
   diffusion penalty; the MSE and its gradient come from per-point 8 x 8 Gram matrices of the trilinear
   cell's corner features (:class:`_GramSampler`, recomputed only when a point changes cell), or with
   ``gradient="autograd"`` from a trilinear gather from the channels-last features
   (:func:`slicreg.fields.sample` with ``backend="channels_last"``, the same values and gradients as
   ``grid_sample``, several times faster on a CPU with 256 channels);
4. **dense field** (:func:`tps_dense_field`): a regularised thin-plate spline (3-D kernel ``r``, or the
   reference's ``r^2 log r``) with an affine part through the keypoint displacements, evaluated on a coarse
   grid (step 5; separable squared distances) and upsampled trilinearly to the full grid.

Label maps may be given on the network's stride-2 grid (``label_upsample=2``, :func:`upsample_labels`): steps 1
and 2 then run there, with bitwise the result for the upsampled 4 mm maps and ~8x less work. Such maps hold in
coarse voxel ``q`` what the network read at supervoxel voxel ``2 q``, while their nearest upsampling centres ``q``
on ``2 q - 1/2``: :func:`content_offset` gives each side's offset, and the flow places the fixed keypoints and
their displacements where the content sits before the spline (this matters when the two sides differ in kind --
a scan's predicted maps against the template's own maps -- where it removed a bias of one fine voxel per axis).

:func:`supervoxel_flow` chains the four. One idea a file:

- ``keypoints.py``: supervoxel centres, random foreground keypoints, the centre-matching start, nearest label
  upsampling and the supervoxel-grid -> fine-grid rule;
- ``features.py``: label compression and :func:`supervoxel_features`; ``pooling.py``: the fast exact box pooling
  of one-hot channels behind it (reference: ``avg_pool3d(one_hot(...))``, tested);
- ``sampling.py``: trilinear sampling of channels-last features and the Gram-matrix MSE sampler;
- ``optim.py``: :class:`Adam`; ``keypoint_flow.py``: the kNN graph, its penalty and :func:`adam_keypoint_flow`;
- ``tps.py``: the thin-plate spline and :func:`tps_dense_field`; ``chain.py``: :func:`supervoxel_flow`;
- ``rejection.py``: the optional keypoint rejection of :func:`supervoxel_flow` (layer spread, confidence, flow
  residual; off by default);
- ``_common.py``: :data:`DEFAULTS`, :data:`N_LABELS` and the input conversion and checks they all use.

Every public name is importable from ``slicreg.flow``.

Grids and units (all isotropic, so every penalty is isotropic):

- the **supervoxel grid**: the grid of the supervoxel maps, 96 x 80 x 128 at 4 mm for the standard
  preprocessed scan. Keypoints and keypoint displacements are in voxels of this grid ("sv voxels"), so with
  the standard data one unit is 4 mm. The Adam defaults below (``lr``, ``alpha``) are in these units.
- the **feature grid**: the output of the pooling, 48 x 40 x 64. Pooling with an odd kernel ``k``, padding
  ``k // 2`` and stride ``s`` centres output voxel ``o`` on input voxel ``s * o``, so feature voxel ``o`` sits
  at supervoxel-grid voxel ``2 * o`` (``feature_stride = 2``); the samplers get ``p / feature_stride``.
  The same pooling is applied to fixed and moving, so this choice does not bias the displacement.
- the **fine grid**: the grid of the output field, 192 x 160 x 256 at 2 mm, ``factor = 2`` times the
  supervoxel grid. Supervoxel-grid voxel ``q`` is fine voxel ``factor * q + (factor - 1) / 2`` (the contract's
  rule, :func:`slicreg.conventions.downsample_affine`), and a displacement scales by ``factor``
  (:func:`coarse_to_fine_vox`). The output field is ``(3, X, Y, Z)`` in fine voxels, fixed -> moving
  (``warped(p) = moving(p + u(p))``, see :mod:`slicreg.conventions`).

Parameters taken from the reference implementation and converted to sv voxels (the reference worked in ``grid_sample``'s
normalised units, in which one unit is ``S / 2`` voxels along an axis of ``S`` voxels, i.e. 48, 40 and 64 sv
voxels for 96 x 80 x 128 -- an anisotropic unit):

- Adam ``lr = 0.05`` normalised ~ 2.5 sv voxels (10 mm);
- ``alpha`` of a squared displacement difference scales by the mean of ``(2 / S_a)^2`` = 4.34e-4: the final
  reference code's ``k = 5, alpha = 0.15`` becomes ``alpha = 6.5e-5``; the README's ``k = 8, alpha = 0.015``
  becomes ``6.5e-6``.

The defaults (:data:`DEFAULTS`) were chosen on synthetic supervoxel maps (docs/flow.md). Registration uses
:data:`slicreg.registration.FLOW_DEFAULTS` on top of them, tuned on the cohort's training pairs only with the shipped
weights (``benchmarks/tune_flow.py``, docs/flow_tuning.md: random keypoints, ``alpha = 6.5e-6``, ``lam = 10``).
"""

from __future__ import annotations

from slicreg.flow._common import DEFAULTS, N_LABELS
from slicreg.flow.chain import supervoxel_flow
from slicreg.flow.features import label_channel_map, supervoxel_features
from slicreg.flow.keypoint_flow import adam_keypoint_flow, knn_graph, knn_penalty
from slicreg.flow.keypoints import (
    centre_matching_init,
    coarse_to_fine_vox,
    content_offset,
    foreground_keypoints,
    supervoxel_centres,
    upsample_labels,
)
from slicreg.flow.optim import Adam
from slicreg.flow.pooling import box_pool3d
from slicreg.flow.rejection import confidence_at, keep_mask, keypoint_residuals, layer_spread
from slicreg.flow.sampling import (
    _GramSampler as _GramSampler,  # private; tests/test_flow.py tests it from here
)
from slicreg.flow.sampling import (
    to_channels_last,
)
from slicreg.flow.tps import ThinPlateSpline, tps_dense_field, tps_evaluate, tps_fit

__all__ = [
    "DEFAULTS",
    "N_LABELS",
    "Adam",
    "ThinPlateSpline",
    "adam_keypoint_flow",
    "box_pool3d",
    "centre_matching_init",
    "confidence_at",
    "coarse_to_fine_vox",
    "content_offset",
    "foreground_keypoints",
    "keep_mask",
    "keypoint_residuals",
    "knn_graph",
    "knn_penalty",
    "label_channel_map",
    "layer_spread",
    "supervoxel_centres",
    "supervoxel_features",
    "supervoxel_flow",
    "to_channels_last",
    "tps_dense_field",
    "tps_evaluate",
    "tps_fit",
    "upsample_labels",
]
