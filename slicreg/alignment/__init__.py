"""The built-in registration toolkit (torch autograd; CPU or CUDA; no external binary).

- :mod:`slicreg.alignment.similarity` -- MSE, NCC, LNCC, NGF, mutual information, MIND-SSC (+ SSD);
- :mod:`slicreg.alignment.transforms` -- affine, dense displacement, cubic B-spline FFD, stationary velocity field
  (scaling and squaring), and :func:`~slicreg.alignment.transforms.grid_warp`, the toolkit's differentiable warp
  (the one sampler's ``"grid_sample"`` backend, :func:`slicreg.fields.sample`);
- :mod:`slicreg.alignment.regularisers` -- diffusion, bending energy, total variation;
- :mod:`slicreg.alignment.engine` -- presets, the multi-resolution optimiser loop and :func:`register_pair`.

Typical use::

    from slicreg.alignment import register_pair
    result = register_pair(fixed_hu, moving_hu, spacing_mm=(2, 2, 2), preset="abdomen-ct", seed=0)
    result.disp_vox    # (3, X, Y, Z) float32, voxels, fixed -> moving, affine part included
    result.affine_vox  # 4x4, fixed voxel -> moving voxel
    result.info        # timings, iterations, losses, folding fraction
"""

from slicreg.alignment.engine import PRESETS, AlignResult, Preset, StageConfig, register_pair, resolve_preset

__all__ = ["register_pair", "AlignResult", "PRESETS", "Preset", "StageConfig", "resolve_preset"]
