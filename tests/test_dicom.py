"""DICOM series in (slicreg.dicom, and the folder hook of slicreg.io.load_volume).

Every series here is written by the test with pydicom from a known volume and a known RAS affine, and must read
back as the same voxels at the same world positions: affine within 1e-4 mm and identical values (after the axis
order that the reader chooses: slices ascending along the slice normal). Irregular series are refused with one
message naming the folder and what was wrong. A real CT file shipped inside pydicom's wheel is read too, and two
commands are run on a DICOM folder and on the NIfTI of the same volume, with identical results.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom  # in the test extra (setup.cfg), so that `make test` runs these; for users the extra [dicom]
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from slicreg.dicom import read_dicom_series
from slicreg.errors import InputError
from slicreg.io import load_field, load_image, load_labels, load_volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the test's own statement of DICOM's LPS, not the reader's
SHAPE = (6, 5, 4)  # columns (i), rows (j), slices (k): small, and every axis a different length


def _hu(shape=SHAPE, seed=0) -> np.ndarray:
    """A CT-like int16 volume in HU: air around a body of soft tissue with a few bright voxels."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[1:-1, 1:-1, :] = rng.integers(-100, 300, size=(shape[0] - 2, shape[1] - 2, shape[2]))
    hu[2, 2, :] = 1200
    return hu


def _affine(columns, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=np.float64).T  # the three given vectors are the columns (i, j, k)
    a[:3, 3] = origin
    return a


def _ds(v: float) -> str:
    return f"{v:.10g}"


def _header(uid_series: str, description: str, number: int, sop_class=CTImageStorage) -> tuple[FileMetaDataset, dict]:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    common = dict(SOPClassUID=sop_class, SOPInstanceUID=meta.MediaStorageSOPInstanceUID, Modality="CT",
                  PatientID="test", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1", SeriesInstanceUID=uid_series,
                  SeriesDescription=description, SeriesNumber=number, FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.2",
                  SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16,
                  HighBit=15, PixelRepresentation=1)
    return meta, common


def _save(path: Path, meta: FileMetaDataset, fields: dict) -> None:
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, hu: np.ndarray, affine: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0,
                 series_uid: str | None = None, description: str = "abdomen", number: int = 2,
                 names: str = "forward", skip: int | None = None, tilt_deg: float = 0.0,
                 size_of: dict | None = None) -> Path:
    """Write ``hu`` (array ``(i, j, k)``, RAS ``affine``) as a series of single-frame CT files, one per slice ``k``.

    Pixel ``(row j, column i)`` of slice ``k`` is ``hu[i, j, k]``; positions, orientation and spacing come from the
    affine (RAS -> LPS); stored value = (HU - intercept) / slope. ``names="reversed"`` names the files in the
    opposite order of ``k``; ``skip`` leaves slice ``skip`` out; ``tilt_deg`` shifts slice ``k`` sideways along
    the column direction by ``k * spacing * tan(tilt)`` (a gantry tilt); ``size_of`` maps a slice index to another
    (rows, columns) size (a foreign image in the series)."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine
    col_vec, row_vec, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_mm, row_mm = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    r, c = col_vec / col_mm, row_vec / row_mm
    series_uid = series_uid or generate_uid()
    n = hu.shape[2]
    for k in range(n):
        if k == skip:
            continue
        meta, fields = _header(series_uid, description, number)
        plane = hu[:, :, k].T  # (rows, columns)
        if size_of and k in size_of:
            plane = np.full(size_of[k], -1000, dtype=np.int16)
        stored = np.round((plane.astype(np.float64) - intercept) / slope).astype(np.int16)
        position = lps[:3, 3] + k * slice_vec
        if tilt_deg:
            position = position + c * k * np.linalg.norm(slice_vec) * math.tan(math.radians(tilt_deg))
            fields["GantryDetectorTilt"] = _ds(tilt_deg)
        fields.update(Rows=plane.shape[0], Columns=plane.shape[1], PixelSpacing=[_ds(row_mm), _ds(col_mm)],
                      ImageOrientationPatient=[_ds(v) for v in (*r, *c)],
                      ImagePositionPatient=[_ds(v) for v in position], SliceThickness=_ds(np.linalg.norm(slice_vec)),
                      RescaleSlope=_ds(slope), RescaleIntercept=_ds(intercept), InstanceNumber=k + 1,
                      PixelData=stored.astype("<i2").tobytes())
        name = k if names == "forward" else n - 1 - k
        _save(folder / f"IM{name:04d}.dcm", meta, fields)
    return folder


def write_enhanced(path: Path, hu: np.ndarray, affine: np.ndarray, *, slope=1.0, intercept=-1024.0) -> Path:
    """``hu`` as one enhanced (multi-frame) CT file: shared orientation, spacing and rescale, per-frame positions;
    the frames are written in descending slice order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    r, c = lps[:3, 0] / col_mm, lps[:3, 1] / row_mm
    meta, fields = _header(generate_uid(), "enhanced", 5, sop_class=EnhancedCTImageStorage)
    order = list(range(hu.shape[2]))[::-1]

    def item(**kw) -> Dataset:
        d = Dataset()
        for key, value in kw.items():
            setattr(d, key, value)
        return d

    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[_ds(v) for v in (*r, *c)])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[_ds(row_mm), _ds(col_mm)],
                                                       SliceThickness=_ds(np.linalg.norm(lps[:3, 2])))]),
                  PixelValueTransformationSequence=Sequence([item(RescaleSlope=_ds(slope),
                                                                  RescaleIntercept=_ds(intercept),
                                                                  RescaleType="HU")]))
    per = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[_ds(v) for v in
                                                                          lps[:3, 3] + k * lps[:3, 2]])]))
           for k in order]
    stored = np.stack([np.round((hu[:, :, k].T - intercept) / slope) for k in order]).astype("<i2")
    fields.update(Rows=hu.shape[1], Columns=hu.shape[0], NumberOfFrames=len(order),
                  SharedFunctionalGroupsSequence=Sequence([shared]), PerFrameFunctionalGroupsSequence=Sequence(per),
                  PixelData=stored.tobytes())
    _save(path, meta, fields)
    return path


def assert_same_in_world(volume, hu: np.ndarray, affine: np.ndarray) -> None:
    """``volume`` holds ``hu`` at the positions ``affine`` gives, in any axis order: compared after both are put in
    the closest canonical (RAS) order, affine within 1e-4 mm, values identical."""
    got = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume.array), volume.affine))
    want = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))


# LPS storage as scanners write axial CT: in RAS, i runs to the left, j to the back, k up
AXIAL = _affine([[-0.7, 0, 0], [0, -0.8, 0], [0, 0, 2.5]], [120.5, 98.25, -300.0])


def test_axial_series_reads_back_identical(tmp_path):
    hu = _hu()
    write_series(tmp_path / "ct", hu, AXIAL, slope=1.0, intercept=-1024.0)
    first = pydicom.dcmread(tmp_path / "ct" / "IM0000.dcm")  # DICOM's LPS: x and y of RAS negated
    assert [float(v) for v in first.ImagePositionPatient] == [-120.5, -98.25, -300.0]
    vol = load_volume(tmp_path / "ct")
    np.testing.assert_allclose(vol.affine, AXIAL, atol=1e-4)  # the same axis order: nothing to account for
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.array.dtype == np.int16  # integer slope and intercept, values fit: int16 as the HU are
    assert vol.meta["source"] == str(tmp_path / "ct") and vol.meta["original_axcodes"] == "LPS"
    assert vol.meta["dicom_series_description"] == "abdomen" and vol.meta["dicom_images"] == 4
    np.testing.assert_allclose(vol.spacing_mm, [0.7, 0.8, 2.5], atol=1e-6)
    image = load_image(tmp_path / "ct", canonical=True)  # the io hook's other options apply as for NIfTI
    assert image.array.dtype == np.float32 and image.meta["original_axcodes"] == "LPS"
    assert_same_in_world(image, hu, AXIAL)


def test_reversed_file_names_and_descending_positions(tmp_path):
    """Slices stored head to feet (the k axis points down) and named in the opposite order of their positions: the
    reader orders them by position along the slice normal, never by name or InstanceNumber."""
    hu = _hu(seed=1)
    down = _affine([[-0.7, 0, 0], [0, -0.8, 0], [0, 0, -2.5]], [120.5, 98.25, 40.0])
    write_series(tmp_path / "ct", hu, down, names="reversed")
    names = sorted(p.name for p in (tmp_path / "ct").iterdir())
    first = pydicom.dcmread(tmp_path / "ct" / names[0])
    assert float(first.ImagePositionPatient[2]) == pytest.approx(40.0 - 3 * 2.5)  # name order != slice order
    vol = load_volume(tmp_path / "ct")
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, hu.shape[2] - 1  # new k = 3 - old k
    np.testing.assert_allclose(vol.affine, down @ flip, atol=1e-4)
    np.testing.assert_array_equal(vol.array, hu[:, :, ::-1])
    assert_same_in_world(vol, hu, down)


def test_oblique_orientation(tmp_path):
    """A doubly oblique series (rotation with exactly representable cosines: 3-4-5 and 7-24-25 triangles)."""
    rz = np.array([[0.6, -0.8, 0], [0.8, 0.6, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, 0.28, -0.96], [0, 0.96, 0.28]])
    rot = rz @ rx
    spacing = [0.75, 0.5, 3.0]
    oblique = _affine([rot[:, a] * spacing[a] for a in range(3)], [-20.0, 35.5, 12.25])
    hu = _hu(seed=2)
    write_series(tmp_path / "ct", hu, oblique, intercept=-1000.0)
    vol = load_volume(tmp_path / "ct")
    np.testing.assert_allclose(vol.affine, oblique, atol=1e-4)
    np.testing.assert_array_equal(vol.array, hu)
    assert_same_in_world(vol, hu, oblique)


def test_rescale_slope_and_intercept(tmp_path):
    """Stored values (HU + 1024) * 2 with slope 0.5, intercept -1024: read back as the HU (float32, exact)."""
    hu = _hu(seed=3)
    write_series(tmp_path / "ct", hu, AXIAL, slope=0.5, intercept=-1024.0)
    raw = pydicom.dcmread(tmp_path / "ct" / "IM0000.dcm").pixel_array
    np.testing.assert_array_equal(raw, (hu[:, :, 0].T.astype(np.int32) + 1024) * 2)
    vol = load_volume(tmp_path / "ct")
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, hu.astype(np.float32))
    assert vol.meta["dicom_rescale"] == "slope 0.5 intercept -1024"


def test_gantry_tilt_is_refused(tmp_path):
    write_series(tmp_path / "ct", _hu(), AXIAL, tilt_deg=15.0)
    with pytest.raises(InputError, match=r"ct: the slices are not stacked along their normal.*tilted by 15\.00 "
                                         r"degrees, as from a gantry tilt; GantryDetectorTilt 15\)"):
        load_image(tmp_path / "ct")


def test_missing_slice_is_refused_naming_the_gap(tmp_path):
    hu = _hu(shape=(6, 5, 7))
    write_series(tmp_path / "ct", hu, AXIAL, skip=3)  # positions -300, -297.5, -295, [-292.5 missing], -290, ...
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "ct")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'ct'}: the slices are not equally spaced: 5.000 mm between slice 3 "
                          f"(IM0002.dcm, -295.000 mm along the slice normal) and slice 4 (IM0004.dcm, -290.000 mm), "
                          f"where the series' slices are 2.500 mm apart (a missing slice?"), msg


def test_two_series_in_one_folder_are_refused_listing_both(tmp_path):
    write_series(tmp_path / "ct", _hu(), AXIAL, series_uid="1.2.3.4", description="portal venous", number=3)
    hu2 = _hu(shape=(6, 5, 2))
    write_series(tmp_path / "other", hu2, AXIAL, series_uid="1.2.3.5", description="arterial", number=2)
    for p in (tmp_path / "other").iterdir():  # the second series' files beside the first's, under other names
        shutil.move(p, tmp_path / "ct" / f"B_{p.name}")
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "ct")
    msg = str(err.value)
    assert f"{tmp_path / 'ct'}: holds 2 DICOM series, expected one: " in msg
    assert 'SeriesInstanceUID 1.2.3.5 "arterial" (series number 2, CT, 2 files); ' \
           'SeriesInstanceUID 1.2.3.4 "portal venous" (series number 3, CT, 4 files)' in msg


def test_mixed_sizes_orientations_and_duplicates_are_refused(tmp_path):
    write_series(tmp_path / "sizes", _hu(), AXIAL, size_of={2: (8, 8)})
    with pytest.raises(InputError, match=r"sizes: the series mixes image sizes \(rows x columns\): 5 x 6 \(3 images, "
                                         r"e\.g\. IM0000\.dcm\), 8 x 8 \(1 image, e\.g\. IM0002\.dcm\)"):
        load_image(tmp_path / "sizes")
    uid = generate_uid()
    write_series(tmp_path / "orient", _hu(), AXIAL, series_uid=uid)
    sagittal = _affine([[0, -0.7, 0], [0, 0, -0.8], [2.5, 0, 0]], [0, 0, 0])
    write_series(tmp_path / "loc", _hu(shape=(6, 5, 1)), sagittal, series_uid=uid)
    shutil.move(tmp_path / "loc" / "IM0000.dcm", tmp_path / "orient" / "localizer.dcm")
    with pytest.raises(InputError, match=r"orient: the series mixes image orientations \(ImageOrientationPatient\)"
                                         r".*localizer\.dcm"):
        load_image(tmp_path / "orient")
    uid = generate_uid()
    write_series(tmp_path / "dup", _hu(), AXIAL, series_uid=uid)
    write_series(tmp_path / "dup2", _hu(), AXIAL, series_uid=uid)
    shutil.move(tmp_path / "dup2" / "IM0001.dcm", tmp_path / "dup" / "copy.dcm")
    with pytest.raises(InputError, match=r"dup: two images at the same position \(-297\.500 mm along the slice normal"
                                         r".*: IM0001\.dcm and copy\.dcm"):
        load_image(tmp_path / "dup")


def test_enhanced_multiframe_ct(tmp_path):
    """One enhanced CT file (per-frame positions, frames in descending order) reads as the single-frame series."""
    hu = _hu(seed=4)
    write_enhanced(tmp_path / "enh" / "volume.dcm", hu, AXIAL)
    vol = load_volume(tmp_path / "enh")
    np.testing.assert_allclose(vol.affine, AXIAL, atol=1e-4)
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.meta["dicom_files"] == 1 and vol.meta["dicom_images"] == 4


def test_real_ct_file_shipped_with_pydicom(tmp_path):
    """CT_small.dcm (in pydicom's wheel: no network): 128 x 128, 0.661468 mm pixels, one 5 mm axial slice, stored
    values + intercept -1024 = HU."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm", download=False)
    assert source is not None, "pydicom's wheel ships CT_small.dcm in pydicom/data/test_files"
    ds = pydicom.dcmread(source)
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "CT_small.dcm")
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM: ignored\n")
    vol = load_volume(tmp_path / "ct")
    assert vol.shape == (128, 128, 1) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[:, :, 0], ds.pixel_array.T.astype(np.int32) - 1024)
    s = 0.661468
    want = _affine([[-s, 0, 0], [0, -s, 0], [0, 0, 5.0]], [158.135803, 179.035797, -75.699997])
    np.testing.assert_allclose(vol.affine, want, atol=1e-4)
    assert vol.meta["dicom_modality"] == "CT"
    from slicreg.checks import check_ct_like

    assert check_ct_like(vol.array, name="CT_small") is None  # HU with air: the intercept was applied


def test_folders_that_are_not_one_series(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nifti").mkdir()
    nib.save(nib.Nifti1Image(_hu(), AXIAL), str(tmp_path / "nifti" / "ct.nii.gz"))
    with pytest.raises(InputError, match=r"nifti: is a folder with no DICOM image files \(found 1 other files, e\.g\. "
                                         r"ct\.nii\.gz\); expected a NIfTI file"):
        load_image(tmp_path / "nifti")
    with pytest.raises(InputError, match=r"empty: is a folder with no DICOM image files"):
        load_labels(tmp_path / "empty")
    write_series(tmp_path / "ct", _hu(), AXIAL)
    with pytest.raises(InputError, match=r"IM0000\.dcm: is a single DICOM file; expected a NIfTI file or the folder"):
        load_image(tmp_path / "ct" / "IM0000.dcm")
    with pytest.raises(InputError, match=r"ct: is a folder, expected a NIfTI file \(\.nii or \.nii\.gz\) here \(a "
                                         r"folder is read as a DICOM series only where an image or label map"):
        load_field(tmp_path / "ct")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # pydicom not installed
    with pytest.raises(InputError, match=r"ct: is a folder, which slicreg reads as a DICOM series, but pydicom is not "
                                         r"installed; install the DICOM extra \(pip install 'slicreg\[dicom\]'"):
        read_dicom_series(tmp_path / "ct")


def test_commands_accept_a_dicom_folder(tmp_path, capsys):
    """``slicreg warp`` and ``slicreg preprocess`` on a DICOM folder give what they give on the NIfTI of it."""
    from pipelines.cli import main
    from slicreg.conventions import identity_grid_vox

    shape = (24, 20, 10)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[3:21, 3:17, 1:9] = np.random.default_rng(5).integers(40, 160, size=(18, 14, 8))
    write_series(tmp_path / "dcm", hu, AXIAL, intercept=-1024.0)
    nib.save(nib.Nifti1Image(hu, AXIAL), str(tmp_path / "ct.nii.gz"))
    field = np.zeros((*shape, 3), dtype=np.float32)
    field[..., 0] = 0.5
    field[..., 2] = 0.25 * identity_grid_vox(shape)[0] / 11
    nib.save(nib.Nifti1Image(field, AXIAL), str(tmp_path / "field.nii.gz"))
    outs = {}
    for name, src in (("dcm", tmp_path / "dcm"), ("nii", tmp_path / "ct.nii.gz")):
        out = tmp_path / f"warped_{name}.nii.gz"
        assert main(["warp", "--moving", str(src), "--field", str(tmp_path / "field.nii.gz"), "--out", str(out)]) == 0
        outs[name] = nib.load(str(out))
        prep = tmp_path / f"prep_{name}"
        assert main(["preprocess", "--image", str(src), "--id", "s1", "--out", str(prep), "--shape", "10", "8", "12",
                     "--spacing-mm", "2.0"]) == 0
        outs[f"prep_{name}"] = nib.load(str(prep / "imagesTr" / "s1_0000.nii.gz"))
    np.testing.assert_array_equal(np.asarray(outs["dcm"].dataobj), np.asarray(outs["nii"].dataobj))
    np.testing.assert_allclose(outs["dcm"].affine, outs["nii"].affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(outs["prep_dcm"].dataobj), np.asarray(outs["prep_nii"].dataobj))
    np.testing.assert_allclose(outs["prep_dcm"].affine, outs["prep_nii"].affine, atol=1e-6)
    # a folder where a file is required is refused naming it, and the message mentions DICOM folders
    code = main(["warp", "--moving", str(tmp_path / "dcm"), "--field", str(tmp_path / "dcm"),
                 "--out", str(tmp_path / "w.nii.gz")])
    assert code == 2
    assert "dcm: is a folder, expected a NIfTI file (.nii or .nii.gz) here (a folder is read as a DICOM series" \
           in capsys.readouterr().err
