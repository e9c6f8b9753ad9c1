"""Learn2Reg submissions: which fields a Learn2Reg task expects, under which names, for which files.

Learn2Reg's evaluation (MDL-UzL/L2R ``evaluation/evaluation.py``, with the configuration its
``create_evaluation_config.py`` makes from the task's ``*_dataset.json``) reads, for each pair of a list
(``registration_val`` or ``registration_test``):

- the field ``disp_{FFFF}_{fmod}_{MMMM}_{mmod}.nii.gz`` of the submission folder (fixed case and modality, moving
  case and modality, e.g. ``disp_0001_0000_0002_0000.nii.gz``; the short ``disp_FFFF_MMMM.nii.gz`` is accepted only
  for paired tasks whose fixed modality is ``0000`` and moving ``0001``): shape = the fixed image's shape + ``(3,)``,
  voxels of the *moving* image, fixed -> moving, on the fixed image's own voxel grid (its array as stored, whatever
  the orientation or spacing in its header);
- the label maps found by replacing ``images`` with ``labels`` in each image path
  (``labelsTr/AbdomenCTCT_0001_0000.nii.gz``; older releases name them ``labelsTr/AbdomenCTCT_0001.nii.gz``,
  :func:`preprocessing.datasets.learn2reg_label_candidates` tries both);
- and warps the moving labels with ``map_coordinates(moving, identity + disp, order=0)``
  (:func:`slicreg.metrics.warp_labels_learn2reg`), Dice per label with absent labels skipped
  (:func:`slicreg.metrics.dice` with ``absent="learn2reg"``).

This module names the files and lists the pairs (no arrays); writing and scoring live in
:mod:`pipelines.learn2reg` (files) and :mod:`slicreg.metrics` (numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing.datasets import LEARN2REG_SETS, Dataset, learn2reg_label_candidates
from slicreg.errors import InputError

__all__ = ["FIELD_DTYPE", "SubmissionPair", "displacement_filename", "parse_displacement_filename",
           "submission_pairs", "learn2reg_labels", "original_image", "original_labels"]

FIELD_DTYPE = "float32"
"""dtype of the submitted fields (Learn2Reg reads them with ``get_fdata()``, i.e. as float64; float32 loses nothing
a registration resolves and halves the upload)."""

_NAME_RE = re.compile(r"^disp_(\d{4})_(\d{4})_(\d{4})_(\d{4})\.nii\.gz$")


def displacement_filename(fixed_case: str, fixed_modality: str, moving_case: str, moving_modality: str) -> str:
    """``disp_{FFFF}_{fmod}_{MMMM}_{mmod}.nii.gz``, the name Learn2Reg's current evaluation looks for.

    Raises:
        InputError: a case or modality that is not 4 digits."""
    for what, value in (("fixed case", fixed_case), ("fixed modality", fixed_modality),
                        ("moving case", moving_case), ("moving modality", moving_modality)):
        if not re.fullmatch(r"\d{4}", str(value)):
            raise InputError(f"displacement_filename: {what} must be 4 digits (e.g. '0001'), got {value!r}")
    return f"disp_{fixed_case}_{fixed_modality}_{moving_case}_{moving_modality}.nii.gz"


def parse_displacement_filename(name: str) -> tuple[str, str, str, str] | None:
    """``disp_0001_0000_0002_0000.nii.gz`` -> ``("0001", "0000", "0002", "0000")``; ``None`` for other names."""
    m = _NAME_RE.match(name)
    return (m.group(1), m.group(2), m.group(3), m.group(4)) if m else None


@dataclass(frozen=True)
class SubmissionPair:
    """One pair of a Learn2Reg list and the file its field goes to.

    Attributes:
        fixed, moving: subject ids.
        set_name: ``"registration_val"`` or ``"registration_test"``.
        file: the field's file name in the submission folder (:func:`displacement_filename`).
        fixed_image, moving_image: the images as the task ships them (the field's grid is the fixed one's).
        fixed_labels, moving_labels: their label maps by Learn2Reg's rule, or ``None`` (not shipped, e.g. test).
    """

    fixed: str
    moving: str
    set_name: str
    file: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path | None
    moving_labels: Path | None


def original_image(dataset: Dataset, subject_id: str) -> Path:
    """The image a subject was made from: ``extra["original"]["image"]`` of a preprocessed dataset, else its
    image."""
    s = dataset.subject(subject_id)
    original = s.extra.get("original")
    if isinstance(original, dict) and isinstance(original.get("image"), str):
        return Path(original["image"])
    return dataset.path(s.image)


def original_labels(dataset: Dataset, subject_id: str) -> Path | None:
    """The label map on the grid of :func:`original_image`: ``extra["original"]["labels"]`` of a preprocessed
    dataset, else the subject's labels (``None`` without)."""
    s = dataset.subject(subject_id)
    original = s.extra.get("original")
    if isinstance(original, dict) and isinstance(original.get("image"), str):
        return Path(original["labels"]) if isinstance(original.get("labels"), str) else None
    return dataset.path(s.labels) if s.labels is not None else None


def learn2reg_labels(image: Path, fallback: Path | None = None) -> Path | None:
    """The label map Learn2Reg's evaluation reads for ``image`` (the first existing of
    :func:`~preprocessing.datasets.learn2reg_label_candidates`), else ``fallback`` when it exists, else ``None``."""
    for candidate in learn2reg_label_candidates(image):
        if candidate.is_file():
            return candidate
    return fallback if fallback is not None and Path(fallback).is_file() else None


def _names(dataset: Dataset, subject_id: str) -> tuple[str, str]:
    info: Any = dataset.subject(subject_id).extra.get("learn2reg")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("case", "modality")):
        raise InputError(f"dataset {dataset.root}: subject {subject_id!r} has no Learn2Reg case number (its image "
                         f"name is not <task>_NNNN_MMMM.nii.gz, or the dataset was not read from a Learn2Reg "
                         f"folder); a submission needs a Learn2Reg dataset (layout learn2reg)")
    return info["case"], info["modality"]


def submission_pairs(dataset: Dataset, set_name: str = "registration_val") -> list[SubmissionPair]:
    """The pairs of one Learn2Reg list with their field file names and original files.

    Args:
        dataset: a Learn2Reg dataset (:func:`preprocessing.datasets.load_dataset`, layout ``learn2reg``) or one
            derived from it (the ``dataset`` or ``preprocess`` stage's output keeps each subject's case number,
            modality and original image).
        set_name: ``"registration_val"`` or ``"registration_test"``.

    Raises:
        InputError: an unknown list, a list without pairs, subjects without Learn2Reg names, two pairs that would
            write one file.
    """
    if set_name not in LEARN2REG_SETS:
        raise InputError(f"set: expected one of {', '.join(LEARN2REG_SETS)}, got {set_name!r}")
    chosen = [p for p in dataset.pairs if p.extra.get("learn2reg") == set_name]
    if not chosen:
        present = sorted({str(p.extra.get("learn2reg")) for p in dataset.pairs if p.extra.get("learn2reg")})
        raise InputError(f"dataset {dataset.root}: no {set_name} pairs (lists with pairs: "
                         f"{', '.join(present) or 'none'}); registration_test pairs need the test images on disk")
    out: list[SubmissionPair] = []
    seen: dict[str, str] = {}
    for p in chosen:
        name = displacement_filename(*_names(dataset, p.fixed), *_names(dataset, p.moving))
        if name in seen:
            raise InputError(f"dataset {dataset.root}: pairs {seen[name]} and {p.fixed} <- {p.moving} would both "
                             f"write {name}")
        seen[name] = f"{p.fixed} <- {p.moving}"
        images = [original_image(dataset, sid) for sid in (p.fixed, p.moving)]
        labels = [learn2reg_labels(img, original_labels(dataset, sid)) for img, sid in zip(images, (p.fixed, p.moving))]
        out.append(SubmissionPair(p.fixed, p.moving, set_name, name, images[0], images[1], labels[0], labels[1]))
    return out
