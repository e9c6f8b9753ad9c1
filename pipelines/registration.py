"""Shared edge code of the ``register`` command and stage: weights, preprocessing detection, one pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_BUNDLE = "slicreg-cohort-v1"


def default_weights() -> Path:
    """The shipped bundle: ``weights/slicreg-cohort-v1`` of the source tree."""
    return WEIGHTS_DIR / DEFAULT_BUNDLE


def load_weights(path: str | Path | None, *, device: str = "cpu") -> Any:
    """Load and verify a weights bundle (the shipped one when ``path`` is None)."""
    from slicreg.bundle import load_bundle
    from slicreg.errors import InputError

    folder = Path(path) if path else default_weights()
    if not folder.exists():
        hint = "" if path else " (no shipped weights in this checkout: train them with `python run_pipeline.py " \
                               "pipelines/demo-train.toml` or pass --weights)"
        raise InputError(f"{folder}: weights bundle not found{hint}")
    return load_bundle(folder, device=device)


@dataclass
class Prepared:
    """A scan ready for registration: the preprocessed image, its crop record and whether it was already so."""

    image: Any  # Volume on the preprocessed grid
    record: Any  # preprocessing.geometry.CropRecord
    identity: bool  # True: the input was already preprocessed (no resampling or crop was needed)


def preprocess_for_registration(volume: Any, *, name: str, force: bool = False) -> Prepared:
    """Preprocess a CT as the paper did, unless it already is (2 mm RAS, 192 x 160 x 256): then use it as is."""
    import nibabel as nib

    from preprocessing.geometry import CROP_SHAPE, CropRecord, check_ct_like, preprocess_volume

    already = (volume.shape == tuple(CROP_SHAPE) and np.allclose(volume.spacing_mm, 2.0, atol=1e-3)
               and "".join(nib.aff2axcodes(volume.affine)) == "RAS")
    if not already:
        prep = preprocess_volume(volume, force=force, name=name)
        return Prepared(prep.image, prep.record, False)
    check = check_ct_like(volume.array, name=name, force=force)
    none = ((0, 0), (0, 0), (0, 0))
    record = CropRecord(
        original_shape=volume.shape, original_affine=volume.affine, original_axcodes="RAS", spacing_mm=2.0,
        resampled_shape=volume.shape, resampled_affine=volume.affine, crop_start=(0, 0, 0), crop_shape=volume.shape,
        affine=volume.affine, centre_vox=None, padded_vox=none, dropped_vox=none, clipped_voxels=0, ct_check=check,
        source={"source": volume.meta.get("source")})
    return Prepared(volume, record, True)


def register_preprocessed(bundle: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *, device: str = "cpu",
                          seed: int = 0, moving_is_template: bool = False, **flow_options: Any) -> Any:
    """One registration with a loaded bundle (atlas mode uses the bundle's template supervoxels)."""
    from slicreg.register import register_preprocessed as register

    template = np.asarray(bundle.template_supervoxels.array) if moving_is_template else None
    return register(bundle.model, np.asarray(fixed_hu, dtype=np.float32), np.asarray(moving_hu, dtype=np.float32),
                    template_supervoxels=template, moving_is_template=moving_is_template, device=device, seed=seed,
                    **flow_options)
