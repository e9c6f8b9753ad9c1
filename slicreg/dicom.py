"""DICOM input: one CT series in a folder -> a :class:`~slicreg.conventions.Volume` in the NIfTI/RAS convention.

:func:`slicreg.io.load_volume` (and so ``load_image`` / ``load_labels`` and every command that reads an image
through them) calls :func:`read_dicom_series` when it is given a folder. The files are read with pydicom (the
optional extra ``slicreg[dicom]``); the stacking and the geometry are done here:

- every DICOM Part-10 file under the folder (sub-folders included; other files are ignored) that holds an image
  is grouped by ``SeriesInstanceUID``; a folder with several series is refused, listing each with its UID,
  description, number and file count;
- the in-plane axes come from ``ImageOrientationPatient`` (row direction ``r``: increasing column index; column
  direction ``c``: increasing row index) and ``PixelSpacing`` (``[between rows, between columns]``);
- the slices are ordered by the projection of ``ImagePositionPatient`` onto the slice normal ``n = r x c``, and
  the slice spacing is the distance between those positions -- never ``SliceThickness``, never the file names or
  ``InstanceNumber``;
- stored values are mapped to Hounsfield units with ``RescaleSlope`` / ``RescaleIntercept`` of each slice;
- DICOM patient coordinates are LPS; the affine is returned in RAS by negating the first two world axes.

Array layout: ``array[i, j, k]`` is column ``i``, row ``j`` of the ``k``-th slice along ``+n``, so the voxel-to-
world matrix is ``diag(-1, -1, 1, 1) @ [[r * dcol, c * drow, n * dslice, IPP_0], [0, 0, 0, 1]]``, as dcm2niix and
nibabel write it.

Refused, each in one :class:`~slicreg.errors.InputError` naming the folder (or file) and what was expected: no
DICOM image in the folder; several series; images of different sizes, orientations or pixel spacings in one
series; two images at the same position; a stack that is not perpendicular to its slices (gantry tilt: slicreg
does not resample it); slices that are not equally spaced (a missing slice, named by its position); a multi-frame
file without per-frame geometry; colour images; compressed pixel data whose decoder is not installed.

Enhanced (multi-frame) CT files are read from their functional groups (``PlanePositionSequence``,
``PlaneOrientationSequence``, ``PixelMeasuresSequence``, ``PixelValueTransformationSequence``) and go through the
same stacking and checks as a series of single-frame files.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slicreg.conventions import Volume
from slicreg.errors import InputError

__all__ = ["LPS_TO_RAS", "is_dicom_file", "read_dicom_series"]

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) -> NIfTI world coordinates (RAS): the first two axes change sign."""

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the DICOMDIR index file: no image

ORIENTATION_TOL = 1e-3
"""Direction cosines of two images of one series may differ by this much (about 0.06 degrees)."""

SPACING_REL_TOL = 0.05
"""A gap between neighbouring slices may differ from the series' median gap by this fraction (rounding of stored
positions); a missing slice (100 %) or a change of reconstruction interval is far beyond it."""

TILT_TOL_PIXELS = 0.05
"""The largest sideways offset of a slice from the line through the first slice along its normal, as a fraction of
the smallest pixel spacing; beyond it the stack is tilted (gantry tilt) and refused."""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a DICOM Part-10 file (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pydicom(folder: Path) -> Any:
    try:
        import pydicom
    except ImportError:
        raise InputError(f"{folder}: is a folder, which slicreg reads as a DICOM series, but pydicom is not "
                         f"installed; install the DICOM extra (pip install 'slicreg[dicom]', or pip install "
                         f"pydicom), or pass a NIfTI file (.nii or .nii.gz)") from None
    return pydicom


@dataclass
class _Frame:
    """One 2-D image of a series: a single-frame file, or one frame of a multi-frame file."""

    file: Path
    frame: int | None  # index in a multi-frame file; None for a single-frame file
    position: np.ndarray  # ImagePositionPatient (LPS mm) of the first transmitted pixel
    orientation: np.ndarray  # ImageOrientationPatient (6 direction cosines)
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    size: tuple[int, int]  # Rows, Columns
    slope: float
    intercept: float

    def name(self, folder: Path) -> str:
        try:
            rel = str(self.file.relative_to(folder))
        except ValueError:
            rel = str(self.file)
        return rel if self.frame is None else f"{rel} frame {self.frame + 1}"


@dataclass
class _Series:
    uid: str
    description: str
    number: str
    modality: str
    files: list[tuple[Path, Any]]  # (file, header dataset without pixel data)


# --------------------------------------------------------------------------------------------- scanning
def _scan(folder: Path) -> tuple[dict[str, _Series], int, list[str]]:
    """Every DICOM image file under ``folder`` grouped by series; also the number of DICOM files without an image
    (DICOMDIR, reports, presentation states) and the names of a few non-DICOM files (for messages)."""
    pydicom = _pydicom(folder)
    from pydicom.errors import InvalidDicomError

    series: dict[str, _Series] = {}
    n_other_dicom = 0
    non_dicom: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            file = Path(root) / name
            if not is_dicom_file(file):
                non_dicom.append(str(file.relative_to(folder)))
                continue
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{file}: not a readable DICOM file ({type(exc).__name__}: {exc}); expected the "
                                 f"images of one DICOM series in {folder}") from None
            if str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY or "Rows" not in ds or "Columns" not in ds:
                n_other_dicom += 1
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
            if uid not in series:
                series[uid] = _Series(uid, str(ds.get("SeriesDescription", "") or ""),
                                      str(ds.get("SeriesNumber", "") or ""), str(ds.get("Modality", "") or ""), [])
            series[uid].files.append((file, ds))
    return series, n_other_dicom, non_dicom


def _one_series(folder: Path) -> tuple[_Series, int]:
    if not folder.exists():
        raise InputError(f"{folder}: folder not found")
    series, n_other, non_dicom = _scan(folder)
    if not series:
        found = f"{len(non_dicom)} other files" + (f", e.g. {', '.join(non_dicom[:3])}" if non_dicom else "")
        if n_other:
            found += f", and {n_other} DICOM files without an image (DICOMDIR, reports, ...)"
        raise InputError(f"{folder}: is a folder with no DICOM image files (found {found}); expected a NIfTI file "
                         f"(.nii or .nii.gz) or a folder holding the files of one DICOM series")
    if len(series) > 1:
        def number(s: _Series) -> tuple[int, str]:
            return (int(s.number), s.uid) if s.number.lstrip("-").isdigit() else (1 << 30, s.uid)

        listing = "; ".join(f"SeriesInstanceUID {s.uid} \"{s.description}\" (series number {s.number or '-'}, "
                            f"{s.modality or '?'}, {len(s.files)} files)"
                            for s in sorted(series.values(), key=number))
        raise InputError(f"{folder}: holds {len(series)} DICOM series, expected one: {listing}; give a folder that "
                         f"holds only the series to read (move each series into a folder of its own)")
    return next(iter(series.values())), n_other


# ------------------------------------------------------------------------------------------ per-image facts
def _spacing(item: Any, where: str) -> tuple[float, float]:
    spacing = _floats(item, "PixelSpacing", 2, where)
    if spacing.min() <= 0:
        raise InputError(f"{where}: PixelSpacing {spacing.tolist()}: expected two sizes > 0 mm")
    return float(spacing[0]), float(spacing[1])


def _floats(item: Any, keyword: str, count: int, where: str) -> np.ndarray:
    value = item.get(keyword) if item is not None else None
    if value is None or value == "":
        raise InputError(f"{where}: has no {keyword}; expected a CT image with its patient geometry "
                         f"(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)")
    try:
        values = np.array([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {keyword} is not numeric ({value!r})") from None
    if values.size != count or not np.all(np.isfinite(values)):
        raise InputError(f"{where}: {keyword} must hold {count} finite numbers, got {value!r}")
    return values


def _rescale(item: Any, where: str) -> tuple[float, float]:
    if item is None:
        return 1.0, 0.0
    slope = item.get("RescaleSlope")
    intercept = item.get("RescaleIntercept")
    if slope is None and intercept is None and "ModalityLUTSequence" in item:
        raise InputError(f"{where}: maps stored values through a Modality LUT table; slicreg reads only "
                         f"RescaleSlope / RescaleIntercept (convert the series to NIfTI with a full DICOM reader)")
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise InputError(f"{where}: RescaleSlope {slope} / RescaleIntercept {intercept}: expected finite values and "
                         f"a slope other than 0")
    return slope, intercept


def _group_item(ds: Any, frame: int, keyword: str) -> Any:
    """The item of functional-group sequence ``keyword`` for ``frame``: per-frame if given there, else shared."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in ((per[frame] if per is not None and frame < len(per) else None),
                  (shared[0] if shared is not None and len(shared) else None)):
        items = group.get(keyword) if group is not None else None
        if items:
            return items[0]
    return None


def _frames_of(file: Path, ds: Any, folder: Path) -> list[_Frame]:
    where = str(file)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputError(f"{where}: {samples} samples per pixel ({ds.get('PhotometricInterpretation', '?')}); "
                         f"expected a grey-scale CT image (1 sample per pixel)")
    size = (int(ds.Rows), int(ds.Columns))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        if n_frames > 1:
            raise InputError(f"{where}: a multi-frame file of {n_frames} frames without per-frame geometry "
                             f"(no functional groups); expected single-frame CT images or an enhanced CT file")
        slope, intercept = _rescale(ds, where)
        return [_Frame(file, None, _floats(ds, "ImagePositionPatient", 3, where),
                       _floats(ds, "ImageOrientationPatient", 6, where), _spacing(ds, where), size, slope, intercept)]
    frames = []
    for f in range(n_frames):
        at = f"{where} frame {f + 1}"
        position = _group_item(ds, f, "PlanePositionSequence")
        orientation = _group_item(ds, f, "PlaneOrientationSequence")
        measures = _group_item(ds, f, "PixelMeasuresSequence")
        transform = _group_item(ds, f, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, at)
        frames.append(_Frame(file, f, _floats(position, "ImagePositionPatient", 3, at),
                             _floats(orientation, "ImageOrientationPatient", 6, at), _spacing(measures, at), size,
                             slope, intercept))
    return frames


def _check_decoders(series: _Series, folder: Path) -> None:
    """Refuse compressed pixel data that this installation cannot decode, before reading any pixels."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    syntaxes = Counter(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "") for _, ds in series.files)
    for uid, count in syntaxes.items():
        if not uid:
            continue
        syntax = UID(uid)
        if not syntax.is_compressed:
            continue
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise InputError(f"{folder}: {count} files hold pixel data compressed as {syntax.name} ({uid}), which "
                             f"pydicom cannot decode; decompress the series first (e.g. gdcmconv --raw) or convert "
                             f"it to NIfTI") from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise InputError(f"{folder}: {count} files hold pixel data compressed as {syntax.name} ({uid}); "
                             f"pydicom needs a decoder for it ({needs}): install one of them, or decompress the "
                             f"series first (e.g. gdcmconv --raw)")


# ------------------------------------------------------------------------------------------------ geometry
def _describe_counts(counter: Counter, fmt: Any, examples: dict) -> str:
    return ", ".join(f"{fmt(key)} ({n} image{'s' if n != 1 else ''}, e.g. {examples[key]})"
                     for key, n in counter.most_common())


def _check_uniform(frames: list[_Frame], folder: Path) -> None:
    first = frames[0]
    sizes = Counter(f.size for f in frames)
    if len(sizes) > 1:
        examples = {}
        for f in frames:
            examples.setdefault(f.size, f.name(folder))
        raise InputError(f"{folder}: the series mixes image sizes (rows x columns): "
                         f"{_describe_counts(sizes, lambda s: f'{s[0]} x {s[1]}', examples)}; expected one size")
    odd = [f for f in frames if np.max(np.abs(f.orientation - first.orientation)) > ORIENTATION_TOL]
    if odd:
        def key(f: _Frame) -> tuple:
            return tuple(float(v) for v in np.round(f.orientation, 3))

        counts = Counter(key(f) for f in frames)
        examples = {}
        for f in frames:
            examples.setdefault(key(f), f.name(folder))
        raise InputError(f"{folder}: the series mixes image orientations (ImageOrientationPatient): "
                         f"{_describe_counts(counts, lambda o: list(o), examples)}; expected one orientation (a "
                         f"localizer in the same series?)")
    odd = [f for f in frames if not np.allclose(f.spacing, first.spacing, rtol=1e-4, atol=1e-4)]
    if odd:
        counts = Counter(tuple(round(v, 4) for v in f.spacing) for f in frames)
        examples = {}
        for f in frames:
            examples.setdefault(tuple(round(v, 4) for v in f.spacing), f.name(folder))
        raise InputError(f"{folder}: the series mixes pixel spacings (PixelSpacing): "
                         f"{_describe_counts(counts, lambda s: f'{s[0]:g} x {s[1]:g} mm', examples)}; expected one")


def _in_plane_axes(orientation: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = orientation[:3], orientation[3:]
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01:
        raise InputError(f"{where}: ImageOrientationPatient {orientation.tolist()} does not hold two direction "
                         f"cosine vectors of length 1 (lengths {nr:.4f}, {nc:.4f})")
    r, c = r / nr, c / nc
    if abs(float(r @ c)) > ORIENTATION_TOL:
        raise InputError(f"{where}: ImageOrientationPatient {orientation.tolist()}: the row and column directions "
                         f"are not perpendicular (cosine {float(r @ c):.4f}); expected orthogonal direction cosines")
    n = np.cross(r, c)
    return r, c, n / np.linalg.norm(n)


def _stack(frames: list[_Frame], folder: Path, single_slice_spacing: float | None, gantry_tilt: str = ""
           ) -> tuple[list[_Frame], np.ndarray]:
    """Order the frames along the slice normal, check the stack, and return them with the LPS affine."""
    first = frames[0]
    r, c, n = _in_plane_axes(first.orientation, first.name(folder))
    depth = np.array([float(n @ f.position) for f in frames])
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    depth = depth[order]
    positions = np.stack([f.position for f in frames])
    row_mm, col_mm = first.spacing
    if len(frames) == 1:
        if single_slice_spacing is None:
            raise InputError(f"{folder}: a single image without SpacingBetweenSlices or SliceThickness; expected a "
                             f"series of slices (their spacing comes from their positions)")
        step = float(single_slice_spacing)
        log.warning("%s: a single slice; its thickness %.4g mm is taken from the header", folder, step)
    else:
        gaps = np.diff(depth)
        same = np.flatnonzero(gaps < 1e-3)
        if same.size:
            k = int(same[0])
            raise InputError(f"{folder}: two images at the same position ({depth[k]:.3f} mm along the slice normal, "
                             f"ImagePositionPatient {np.round(positions[k], 3).tolist()}): {frames[k].name(folder)} "
                             f"and {frames[k + 1].name(folder)} ({same.size} such pairs; several acquisitions, phases "
                             f"or echoes in one series, or a copied file); expected one image per slice position")
        offsets = positions - positions[0]
        sideways = offsets - np.outer(offsets @ n, n)
        drift = np.linalg.norm(sideways, axis=1)
        if drift.max() > TILT_TOL_PIXELS * min(row_mm, col_mm):
            k = int(np.argmax(drift))
            angle = math.degrees(math.atan2(float(drift[-1]), float(offsets[-1] @ n)))
            raise InputError(f"{folder}: the slices are not stacked along their normal: slice {k + 1} of "
                             f"{len(frames)} lies {drift[k]:.2f} mm sideways of the first slice's normal (a stack "
                             f"tilted by {angle:.2f} degrees, as from a gantry tilt{gantry_tilt}); slicreg does not "
                             f"resample such series: convert it with a tool that corrects gantry tilt (resampling "
                             f"onto an orthogonal grid) and pass that NIfTI file")
        median = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - median) > SPACING_REL_TOL * median)
        if bad.size:
            k = int(bad[0])
            what = "a missing slice?" if gaps[k] > median else "an extra or misplaced slice?"
            raise InputError(f"{folder}: the slices are not equally spaced: {gaps[k]:.3f} mm between slice {k + 1} "
                             f"({frames[k].name(folder)}, {depth[k]:.3f} mm along the slice normal) and slice {k + 2} "
                             f"({frames[k + 1].name(folder)}, {depth[k + 1]:.3f} mm), where the series' slices are "
                             f"{median:.3f} mm apart ({what}; {bad.size} uneven gaps of {len(gaps)}); expected "
                             f"equally spaced slices (ImagePositionPatient)")
        step = float(depth[-1] - depth[0]) / (len(frames) - 1)
        residual = np.abs(depth - depth[0] - step * np.arange(len(frames)))
        if residual.max() > 0.2 * step:
            k = int(np.argmax(residual))
            raise InputError(f"{folder}: the slice positions drift from an even spacing of {step:.3f} mm by up to "
                             f"{residual[k]:.3f} mm (slice {k + 1}, {frames[k].name(folder)}); expected equally "
                             f"spaced slices")
    lps = np.eye(4)
    lps[:3, 0] = r * col_mm
    lps[:3, 1] = c * row_mm
    lps[:3, 2] = n * step
    lps[:3, 3] = positions[0]
    return frames, lps


# ------------------------------------------------------------------------------------------------- pixels
def _read_pixels(frames: list[_Frame], folder: Path, integral: bool) -> np.ndarray:
    pydicom = _pydicom(folder)
    from slicreg.io import _available_memory

    rows, cols = frames[0].size
    out_dtype = np.int32 if integral else np.float32
    nbytes = rows * cols * len(frames) * np.dtype(out_dtype).itemsize
    available = _available_memory()
    if available is not None and nbytes > available:
        raise InputError(f"{folder}: the series holds {len(frames)} images of {rows} x {cols} pixels "
                         f"({nbytes / 2**30:.2f} GiB), more than the {available / 2**30:.1f} GiB of memory available")
    out = np.empty((cols, rows, len(frames)), dtype=out_dtype)
    by_file: dict[Path, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        by_file.setdefault(f.file, []).append((k, f))
    for file, items in by_file.items():
        try:
            ds = pydicom.dcmread(file)
            pixels = np.asarray(ds.pixel_array)
        except Exception as exc:  # noqa: BLE001 -- pydicom raises many types for damaged or undecodable pixel data
            raise InputError(f"{file}: cannot read its pixel data ({type(exc).__name__}: {exc}); expected an "
                             f"uncompressed or decodable CT image") from None
        multi = items[0][1].frame is not None
        if multi and pixels.ndim == 2:
            pixels = pixels[None]
        want = (int(ds.get("NumberOfFrames", 1) or 1), rows, cols) if multi else (rows, cols)
        if pixels.shape != want:
            raise InputError(f"{file}: pixel data of shape {pixels.shape}, expected {want} (rows x columns as the "
                             f"header says)")
        for k, f in items:
            plane = pixels[f.frame] if multi else pixels
            if integral:
                values = plane.astype(np.int64) * int(f.slope) + int(f.intercept)
                if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
                    raise InputError(f"{f.name(folder)}: values {values.min()}..{values.max()} after the rescale lie "
                                     f"outside the int32 range; expected CT values (Hounsfield units)")
                out[:, :, k] = values.T
            else:
                out[:, :, k] = (plane.astype(np.float64) * f.slope + f.intercept).T
    if integral:
        lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
        info = np.iinfo(np.int16)
        if info.min <= lo and hi <= info.max:
            return out.astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------------- entry
def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the one DICOM series in ``folder`` as a :class:`Volume` (array ``(X, Y, Z)``, affine in RAS mm).

    Values are the stored pixels mapped by ``RescaleSlope`` / ``RescaleIntercept`` (Hounsfield units for CT):
    int16 when every slope and intercept is an integer and the values fit, else int32 or float32. ``meta`` names
    the folder, the series (UID, description, number, modality), the number of files and the slice spacing.

    Raises:
        InputError: no DICOM image, several series, an irregular series (see the module docstring), unreadable
            or undecodable files, pydicom missing; the message names the folder or file.
    """
    folder = Path(folder)
    series, n_other = _one_series(folder)
    _check_decoders(series, folder)
    frames: list[_Frame] = []
    for file, ds in series.files:
        frames.extend(_frames_of(file, ds, folder))
    _check_uniform(frames, folder)
    single = None
    if len(frames) == 1:
        file, ds = series.files[0]
        measures = _group_item(ds, 0, "PixelMeasuresSequence") if frames[0].frame is not None else ds
        for item in (measures, ds):
            for keyword in ("SpacingBetweenSlices", "SliceThickness"):
                value = item.get(keyword) if item is not None else None
                if single is None and value not in (None, "") and float(value) > 0:
                    single = float(value)
    tilt = series.files[0][1].get("GantryDetectorTilt")
    tilt = f"; GantryDetectorTilt {float(tilt):g}" if tilt not in (None, "") and float(tilt) != 0 else ""
    frames, lps = _stack(frames, folder, single, tilt)
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    array = _read_pixels(frames, folder, integral)
    affine = LPS_TO_RAS @ lps
    slopes = sorted({(f.slope, f.intercept) for f in frames})
    meta = {
        "source": str(folder),
        "dicom_series_uid": series.uid,
        "dicom_series_description": series.description,
        "dicom_series_number": series.number,
        "dicom_modality": series.modality,
        "dicom_files": len(series.files),
        "dicom_images": len(frames),
        "dicom_slice_spacing_mm": round(float(np.linalg.norm(lps[:3, 2])), 6),
        "dicom_rescale": ", ".join(f"slope {s:g} intercept {i:g}" for s, i in slopes[:3])
                         + (f" (+{len(slopes) - 3} more)" if len(slopes) > 3 else ""),
    }
    if n_other:
        meta["dicom_other_objects"] = n_other
    log.info("%s: DICOM series %s %r: %d images of %d x %d pixels (rows x columns), voxel spacing %s mm", folder,
             series.uid, series.description,
             len(frames), frames[0].size[0], frames[0].size[1],
             np.round(np.sqrt((lps[:3, :3] ** 2).sum(axis=0)), 4).tolist())
    return Volume(array, affine, meta)
