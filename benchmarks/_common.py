"""Set-up shared by the benchmark scripts: the real example CT, as slicreg's own preprocessing gives it.

The example is the abdominal CT of TotalSegmentator 2.18.0 (Apache-2.0) with its organ labels mapped to the 13
BTCV ids, fetched once into the slicreg cache by :func:`preprocessing.example.fetch_example` (pip download of
the pinned sdist, checked by sha256; ``slicreg fetch-example`` does the same). The template every benchmark
uses is that scan after :func:`slicreg.geometry.preprocess_volume`: RAS, 2 mm, 192 x 160 x 256 around the
soft-tissue centre of mass -- exactly what the ``preprocess`` stage makes of a scan.

The scripts are run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they
``import _common``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (192, 160, 256)
"""The template grid (voxels, 2 mm)."""

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | os.PathLike) -> str | None:
    """``path`` relative to the repository (forward slashes) when it lies inside it, else ``None``: how results and
    the README name files, without this machine's paths."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return None


def example_volumes(example_dir: str | os.PathLike | None = None) -> tuple[Any, Any, Any]:
    """The example CT, its BTCV labels and its TotalSegmentator labels (``None`` if absent) as
    :class:`slicreg.conventions.Volume`, on the scan's own grid.

    Args:
        example_dir: the example folder; default the slicreg cache (``preprocessing.example.default_example_dir``).
            Fetched there first if it is not complete.
    """
    from preprocessing.example import fetch_example
    from slicreg.io import load_image, load_labels

    files = fetch_example(example_dir)
    tissue = load_labels(files.labels_totalseg) if files.labels_totalseg.is_file() else None
    return load_image(files.image), load_labels(files.labels), tissue


def example_template(example_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The example CT preprocessed to the template grid.

    Args:
        example_dir: as in :func:`example_volumes`.

    Returns:
        ``(image, labels, affine)``: ``(192, 160, 256)`` float32 HU (air -1000 outside the scan), ``(192, 160,
        256)`` uint8 BTCV ids, ``(4, 4)`` float64 voxel -> world (mm, RAS).
    """
    from slicreg.geometry import preprocess_volume

    image, labels, _ = example_volumes(example_dir)
    res = preprocess_volume(image, labels, crop_shape=SHAPE, name="example CT")
    return (res.image.array.astype(np.float32), res.labels.array.astype(np.uint8),
            np.asarray(res.record.affine, dtype=np.float64))

