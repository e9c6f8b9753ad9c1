"""The example-CT fetcher: extraction, label mapping and hash logic on a tiny fake sdist (no download here)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import preprocessing.example as ex
from slicreg.errors import InputError
from slicreg.io import load_labels, load_volume
from slicreg.labels import BTCV_LABELS, LARGE_ORGANS, TOTALSEG_TO_BTCV, label_names_json, relabel

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
AFFINE[:3, 3] = (-50.0, 10.0, 90.0)


def nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE) -> bytes:
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    return gzip.compress(img.to_bytes())


def fake_volumes(shape=(10, 12, 14)):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1200, 1500, size=shape).astype(np.int32)
    seg = np.zeros(shape, np.uint8)
    # every TotalSegmentator class of the BTCV table, plus classes that must become background
    for i, ts_id in enumerate(list(TOTALSEG_TO_BTCV) + [25, 90, 117]):
        seg.flat[i * 7:(i * 7) + 5] = ts_id
    return ct, seg


def make_sdist(path: Path, *, ct=None, seg=None, top="totalsegmentator-2.18.0", drop=()) -> str:
    """A small .tar.gz laid out like the real sdist; returns its sha256."""
    c, s = fake_volumes()
    ct = c if ct is None else ct
    seg = s if seg is None else seg
    members = {
        f"{top}/tests/reference_files/example_ct.nii.gz": nifti_bytes(ct),
        f"{top}/tests/reference_files/example_seg_fast_force_split.nii.gz": nifti_bytes(seg),
        f"{top}/LICENSE": b"Apache License\nVersion 2.0, January 2004\n",
        f"{top}/tests/reference_files/other.nii.gz": b"not extracted",
        f"{top}/setup.py": b"print('never run')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if any(name.endswith(d) for d in drop):
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_pip(target_dir):  # replaces the pip call where none may happen
    raise AssertionError("pip must not be called")


# ------------------------------------------------------------------------------------------------ labels
def test_label_tables_are_consistent():
    assert list(BTCV_LABELS) == list(range(1, 14))
    assert sorted(TOTALSEG_TO_BTCV.values()) == list(range(1, 14))  # a bijection onto the 13 organs
    assert set(LARGE_ORGANS) == {1, 2, 3, 6}
    assert BTCV_LABELS[6] == "liver" and TOTALSEG_TO_BTCV[5] == 6 and TOTALSEG_TO_BTCV[52] == 8
    names = label_names_json()
    assert names["0"] == "background" and names["13"] == "left adrenal gland" and len(names) == 14


def test_relabel_maps_ids_and_rejects_bad_input():
    labels = np.array([[0, 1, 5, 52], [64, 15, 99, 7]], dtype=np.int16)
    out = relabel(labels, TOTALSEG_TO_BTCV)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 6, 8], [10, 5, 0, 11]]
    with pytest.raises(InputError, match="integer"):
        relabel(labels.astype(np.float32), TOTALSEG_TO_BTCV)
    with pytest.raises(InputError, match=">= 0"):
        relabel(np.array([-1, 2]), TOTALSEG_TO_BTCV)
    with pytest.raises(InputError, match="fit"):
        relabel(labels, {1: 300})


# ------------------------------------------------------------------------------------------------ extraction
def test_extract_writes_mapped_files_and_provenance(tmp_path):
    sdist = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    digest = make_sdist(sdist)
    files = ex.extract_example(sdist, tmp_path / "out", sha256=digest)
    ct, seg = fake_volumes()
    image = load_volume(files.image)
    assert image.array.dtype == np.int16 and np.array_equal(image.array, ct)
    assert np.allclose(image.affine, AFFINE)
    btcv = load_volume(files.labels)
    assert btcv.array.dtype == np.uint8
    expected = np.zeros_like(seg)
    for ts_id, b_id in TOTALSEG_TO_BTCV.items():
        expected[seg == ts_id] = b_id
    assert np.array_equal(btcv.array, expected)
    assert set(np.unique(btcv.array)) == set(range(14))
    total = load_labels(files.labels_totalseg)
    assert np.array_equal(total.array, seg)
    assert files.licence.read_text().startswith("Apache License")
    prov = json.loads(files.provenance.read_text())
    assert prov["format"] == ex.FORMAT and prov["source"]["sha256"] == digest
    assert "silver" in prov["labels"]["kind"]
    assert "Apache-2.0" in prov["licence"]
    assert prov["labels"]["btcv_present"]["6"]["name"] == "liver"
    assert prov["labels"]["btcv_present"]["6"]["volume_ml"] == pytest.approx(5 * 27 / 1000, abs=0.006)
    assert prov["labels"]["btcv_present"]["6"]["voxels"] == 5
    assert prov["labels"]["btcv_absent"] == []
    assert {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")} == set(ex.OUTPUT_NAMES)
    assert ex.cached_example(tmp_path / "out", sha256=digest) == files


def test_hash_mismatch_says_what_to_do(tmp_path):
    sdist = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    make_sdist(sdist)
    with pytest.raises(InputError) as err:
        ex.extract_example(sdist, tmp_path / "out")  # the pinned hash: a fake archive does not match it
    msg = str(err.value)
    assert "sha256" in msg and ex.SDIST_SHA256 in msg and "place the correct file at" in msg
    assert str(tmp_path / "out" / ex.SDIST_FILENAME) in msg
    assert not (tmp_path / "out" / ex.IMAGE_NAME).exists()


def test_archive_without_the_example_or_with_other_grids(tmp_path):
    bad = tmp_path / "a.tar.gz"
    digest = make_sdist(bad, drop=("example_ct.nii.gz",))
    with pytest.raises(InputError, match="example_ct.nii.gz not found"):
        ex.extract_example(bad, tmp_path / "out", sha256=digest)
    ct, seg = fake_volumes()
    other = tmp_path / "b.tar.gz"
    digest = make_sdist(other, seg=seg[:, :, :-1])
    with pytest.raises(InputError, match="grid"):
        ex.extract_example(other, tmp_path / "out2", sha256=digest)
    frac = tmp_path / "c.tar.gz"
    digest = make_sdist(frac, ct=ct.astype(np.float32) + 0.5)
    with pytest.raises(InputError, match="integer HU"):
        ex.extract_example(frac, tmp_path / "out3", sha256=digest)


# ----------------------------------------------------------------------------------------- fetch and cache
def test_fetch_uses_pip_once_then_the_cache(tmp_path, monkeypatch):
    source = tmp_path / "upstream.tar.gz"
    digest = make_sdist(source)
    calls = []

    def fake_pip(target_dir):
        import shutil
        import subprocess

        calls.append(target_dir)
        shutil.copyfile(source, Path(target_dir) / ex.SDIST_FILENAME)
        return subprocess.CompletedProcess(["pip"], 0, "Saved", "")

    monkeypatch.setattr(ex, "_pip_download", fake_pip)
    dest = tmp_path / "cache" / "example"
    files = ex.fetch_example(dest, sha256=digest)
    assert len(calls) == 1 and files.image.is_file()
    assert (dest / ex.SDIST_FILENAME).is_file()  # kept for rebuilding without network
    monkeypatch.setattr(ex, "_pip_download", no_pip)
    before = files.image.stat().st_mtime_ns
    assert ex.fetch_example(dest, sha256=digest) == files  # cache hit: no pip, nothing rewritten
    assert files.image.stat().st_mtime_ns == before
    # a damaged output is noticed and rebuilt from the kept sdist, still without pip
    files.labels.write_bytes(b"broken")
    assert ex.cached_example(dest, sha256=digest) is None
    ex.fetch_example(dest, sha256=digest)
    assert load_labels(files.labels).array.max() == 13


def test_offline_gives_one_clear_instruction(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(ex, "_pip_download", lambda d: subprocess.CompletedProcess(
        ["pip"], 1, "", "ERROR: Could not find a version that satisfies the requirement totalsegmentator==2.18.0"))
    dest = tmp_path / "example"
    with pytest.raises(InputError) as err:
        ex.fetch_example(dest)
    msg = str(err.value)
    assert "could not download" in msg and "Could not find a version" in msg
    assert f"to {dest / ex.SDIST_FILENAME} and rerun" in msg and ex.SDIST_SHA256 in msg
    assert not list(dest.glob("*.tar.gz"))
    monkeypatch.setattr(ex, "_pip_download", no_pip)
    with pytest.raises(InputError, match="downloading is off"):
        ex.fetch_example(dest, download=False)


def test_a_local_sdist_is_used_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_pip_download", no_pip)
    local = tmp_path / "somewhere.tar.gz"
    digest = make_sdist(local)
    files = ex.fetch_example(tmp_path / "ex", sdist=local, sha256=digest)
    assert files.image.is_file() and (tmp_path / "ex" / ex.SDIST_FILENAME).read_bytes() == local.read_bytes()


def test_cache_root_follows_slicreg_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICREG_DATA", str(tmp_path / "data"))
    assert ex.default_example_dir() == tmp_path / "data" / "example"
    monkeypatch.delenv("SLICREG_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ex.default_data_root() == tmp_path / "xdg" / "slicreg"


def test_command_without_network_exits_2_with_instructions(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.setattr(ex, "_pip_download", no_pip)
    assert main(["fetch-example", "--dest", str(tmp_path / "ex"), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "fetch-example: error" in err and "pip download" in err and ex.SDIST_FILENAME in err


# ------------------------------------------------------------------------------------------- the real scan
def test_real_example_when_cached():
    files = ex.cached_example()
    if files is None:
        pytest.skip(f"the real example CT is not cached under {ex.default_example_dir()}; run "
                    f"`slicreg fetch-example` once to enable this test")
    image = load_volume(files.image)
    labels = load_labels(files.labels)
    assert image.shape == (122, 101, 112) and np.allclose(image.spacing_mm, 3.0)
    assert image.array.dtype == np.int16 and image.array.min() < -1000 and image.array.max() > 1000
    present = set(np.unique(labels.array)) - {0}
    assert present == set(range(1, 14)) - {5}  # 12 of 13 organs; no esophagus in this scan
    liver_ml = (labels.array == 6).sum() * 27 / 1000
    assert 800 < liver_ml < 2500
    # the organs sit where anatomy puts them: liver on the patient's right, spleen on the left (RAS+: +x = right)
    liver_x = np.argwhere(labels.array == 6)[:, 0].mean()
    spleen_x = np.argwhere(labels.array == 1)[:, 0].mean()
    assert liver_x > spleen_x
