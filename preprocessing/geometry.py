"""Re-export of :mod:`slicreg.geometry`, the method's inference geometry (it moved to the core, where
``slicreg register`` needs it). Import from :mod:`slicreg.geometry`."""

from __future__ import annotations

from slicreg.geometry import (
    AIR_HU,
    CROP_FORMAT,
    CROP_SHAPE,
    SPACING_MM,
    CropRecord,
    Preprocessed,
    check_ct_like,
    crop_or_pad,
    crop_start,
    field_to_original_grid,
    field_to_preprocessed_grid,
    hu_to_int16,
    preprocess_volume,
    reexpress_field,
    reorient_ras,
    resample_grid,
    resample_isotropic,
    soft_tissue_centre,
    soft_tissue_weight,
    to_original_grid,
)

__all__ = [
    "AIR_HU",
    "CROP_FORMAT",
    "CROP_SHAPE",
    "SPACING_MM",
    "CropRecord",
    "Preprocessed",
    "check_ct_like",
    "crop_or_pad",
    "crop_start",
    "field_to_original_grid",
    "field_to_preprocessed_grid",
    "hu_to_int16",
    "preprocess_volume",
    "reexpress_field",
    "reorient_ras",
    "resample_grid",
    "resample_isotropic",
    "soft_tissue_centre",
    "soft_tissue_weight",
    "to_original_grid",
]
