"""Organ label ids and names, stated once.

slicreg evaluates with the 13 abdominal organs of BTCV ("Beyond the Cranial Vault", the data of the SLIC-Reg
paper and of Learn2Reg AbdomenCTCT). Label maps on disk hold these ids (uint8, 0 = background).

The embedded example scan is labelled by TotalSegmentator (its "total" task, class ids 1..117);
:data:`TOTALSEG_TO_BTCV` maps the classes that correspond to BTCV organs. The table follows the class list of
TotalSegmentator 2.x (see ``DATA.md``); esophagus (TotalSegmentator 15) is part of the map although the
example scan does not contain it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from slicreg.errors import InputError

__all__ = [
    "BACKGROUND",
    "BTCV_LABELS",
    "BTCV_IDS",
    "LARGE_ORGANS",
    "TOTALSEG_TO_BTCV",
    "TOTALSEG_NAMES",
    "label_names_json",
    "relabel",
]

BACKGROUND = 0
"""The background id of every label map."""

BTCV_LABELS: dict[int, str] = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
"""BTCV organ id -> name (background 0 excluded)."""

BTCV_IDS: tuple[int, ...] = tuple(BTCV_LABELS)
"""The 13 organ ids 1..13."""

LARGE_ORGANS: tuple[int, ...] = (1, 2, 3, 6)
"""Spleen, right kidney, left kidney, liver: the "avg 4" of the SLIC-Reg paper's Table 1."""

TOTALSEG_TO_BTCV: dict[int, int] = {
    1: 1,  # spleen
    2: 2,  # kidney_right
    3: 3,  # kidney_left
    4: 4,  # gallbladder
    15: 5,  # esophagus
    5: 6,  # liver
    6: 7,  # stomach
    52: 8,  # aorta
    63: 9,  # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein
    7: 11,  # pancreas
    8: 12,  # adrenal_gland_right
    9: 13,  # adrenal_gland_left
}
"""TotalSegmentator "total" class id -> BTCV id; every other class becomes background."""

TOTALSEG_NAMES: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    15: "esophagus",
    52: "aorta",
    63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
}
"""Names of the TotalSegmentator classes in :data:`TOTALSEG_TO_BTCV` (the other classes keep their ids only)."""


def label_names_json(labels: Mapping[int, str] | None = None) -> dict[str, str]:
    """The ``"labels"`` entry of a dataset.json: ``{"0": "background", "1": "spleen", ...}`` (string keys)."""
    labels = BTCV_LABELS if labels is None else labels
    return {"0": "background", **{str(int(k)): str(v) for k, v in sorted(labels.items()) if int(k) != 0}}


def relabel(labels: np.ndarray, table: Mapping[int, int], *, default: int = BACKGROUND,
            dtype: type = np.uint8) -> np.ndarray:
    """Map label ids through ``table``; ids not in the table become ``default``.

    Args:
        labels: integer array of any shape (e.g. ``(X, Y, Z)``), values >= 0.
        table: old id -> new id.
        default: the id of everything not listed (keyword-only; default background 0).
        dtype: output dtype (default uint8); every new id must fit it.

    Returns:
        Array of ``labels.shape`` and ``dtype``.

    Raises:
        InputError: non-integer or negative labels, or new ids that do not fit ``dtype``.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise InputError(f"relabel: labels must be an integer array, got dtype {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise InputError(f"relabel: labels must be >= 0, got minimum {int(labels.min())}")
    info = np.iinfo(dtype)
    new_ids = [int(v) for v in table.values()] + [int(default)]
    if min(new_ids) < info.min or max(new_ids) > info.max:
        raise InputError(f"relabel: new ids {min(new_ids)}..{max(new_ids)} do not fit {np.dtype(dtype).name}")
    top = max([int(labels.max()) if labels.size else 0] + [int(k) for k in table])
    lut = np.full(top + 1, default, dtype=dtype)
    for old, new in table.items():
        if int(old) < 0:
            raise InputError(f"relabel: table keys must be >= 0, got {old}")
        lut[int(old)] = new
    return lut[labels]
