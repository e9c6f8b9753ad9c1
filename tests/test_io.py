"""NIfTI and field IO: affines kept, dtypes kept, every bad input is one clear error naming the file."""

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import (
    atomic_path,
    atomic_write_json,
    load_field,
    load_image,
    load_labels,
    load_volume,
    read_json,
    save_field,
    save_volume,
)

SHAPE = (10, 20, 30)


def affine_lps():
    a = np.diag([-1.5, -2.0, 2.5, 1.0])
    a[:3, 3] = [40.0, 50.0, -60.0]
    return a


def write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_image_round_trip_keeps_affine(tmp_path):
    data = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    vol = Volume(data, affine_lps())
    save_volume(vol, tmp_path / "img.nii.gz")
    back = load_image(tmp_path / "img.nii.gz")
    np.testing.assert_array_equal(back.array, data)
    np.testing.assert_allclose(back.affine, affine_lps())
    assert back.array.dtype == np.float32


def test_labels_stay_integer(tmp_path):
    lab = np.random.default_rng(1).integers(0, 14, size=SHAPE).astype(np.int32)
    write(tmp_path / "lab.nii.gz", lab)
    back = load_labels(tmp_path / "lab.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab)
    save_volume(back, tmp_path / "lab2.nii.gz")
    assert nib.load(str(tmp_path / "lab2.nii.gz")).get_data_dtype() == np.uint8


def test_labels_stored_as_integral_float_are_accepted(tmp_path):
    write(tmp_path / "lab.nii", np.full(SHAPE, 3.0, np.float32))
    assert load_labels(tmp_path / "lab.nii").array.dtype == np.uint8


def test_canonical_reorientation(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    write(tmp_path / "lps.nii.gz", data, affine_lps())
    vol = load_image(tmp_path / "lps.nii.gz", canonical=True)
    assert vol.meta["original_axcodes"] == "LPS"
    assert "".join(nib.aff2axcodes(vol.affine)) == "RAS"
    # the same voxel has the same world position before and after
    ijk = np.array([2, 3, 4, 1.0])
    world = affine_lps() @ ijk
    new_ijk = np.linalg.solve(vol.affine, world)
    np.testing.assert_allclose(new_ijk[:3], np.round(new_ijk[:3]), atol=1e-9)
    assert vol.array[tuple(np.round(new_ijk[:3]).astype(int))] == data[2, 3, 4]


def test_multichannel_round_trip(tmp_path):
    layers = np.random.default_rng(2).integers(0, 128, size=(4, *SHAPE)).astype(np.uint8)
    save_volume(Volume(layers, np.eye(4)), tmp_path / "sv.nii.gz")
    assert nib.load(str(tmp_path / "sv.nii.gz")).shape == (*SHAPE, 4)
    back = load_volume(tmp_path / "sv.nii.gz", kind="labels", channels=True)
    np.testing.assert_array_equal(back.array, layers)


def test_field_round_trip(tmp_path):
    u = np.random.default_rng(3).normal(size=(3, *SHAPE)).astype(np.float32)
    save_field(u, affine_lps(), tmp_path / "disp.nii.gz")
    assert nib.load(str(tmp_path / "disp.nii.gz")).shape == (*SHAPE, 3)
    back = load_field(tmp_path / "disp.nii.gz")
    np.testing.assert_array_equal(back.array, u)
    np.testing.assert_allclose(back.affine, affine_lps())
    with pytest.raises(InputError, match="does not match"):
        load_field(tmp_path / "disp.nii.gz", fixed=Volume(np.zeros((5, 5, 5)), np.eye(4)))


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        load_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)


def test_not_nifti(tmp_path):
    (tmp_path / "x.nii.gz").write_text("hello, I am not an image")
    with pytest.raises(InputError, match="x.nii.gz"):
        load_image(tmp_path / "x.nii.gz")


def test_truncated_file(tmp_path):
    write(tmp_path / "full.nii.gz", np.random.default_rng(4).normal(size=SHAPE).astype(np.float32))
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.nii.gz"):
        load_image(tmp_path / "cut.nii.gz")
    # an uncompressed file cut inside the data block
    write(tmp_path / "full.nii", np.zeros(SHAPE, np.float32))
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:1000])
    with pytest.raises(InputError, match="cut.nii"):
        load_image(tmp_path / "cut.nii")


def test_gzip_read_matches_nibabel_and_damage_is_one_error(tmp_path):
    """.nii.gz voxel data is decompressed by ISA-L (io._gzip_reread): the same values and header as nibabel's own
    reader for NIfTI-1 and NIfTI-2, scaled data included; a flipped byte inside the compressed data is an
    InputError naming the file, not a traceback or wrong values."""
    data = np.random.default_rng(5).integers(-1000, 1500, size=SHAPE).astype(np.int16)
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        img = klass(data, np.diag([1.5, 2.0, 2.5, 1.0]))
        img.header.set_slope_inter(0.5, -3.0)
        nib.save(img, tmp_path / "scaled.nii.gz")
        ref = nib.load(tmp_path / "scaled.nii.gz")
        vol = load_volume(tmp_path / "scaled.nii.gz")
        np.testing.assert_array_equal(vol.array, np.asanyarray(ref.dataobj))
        np.testing.assert_array_equal(vol.affine, ref.affine)
    raw = bytearray((tmp_path / "scaled.nii.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"flipped\.nii\.gz: .*(corrupt|not a readable)"):
        load_volume(tmp_path / "flipped.nii.gz")


def test_gzip_of_several_members_is_read_and_a_missing_member_is_truncation(tmp_path):
    """gzip's trailer holds the last member's size only: a .nii.gz of several members (bgzip, files joined by cat)
    is a whole file, read like any other; without its last member it is truncated, said in one error."""
    data = np.random.default_rng(6).integers(-1000, 1500, size=SHAPE).astype(np.int16)
    raw = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    third = len(raw) // 3
    members = [gzip.compress(raw[:third]), gzip.compress(raw[third:2 * third]), gzip.compress(raw[2 * third:])]
    (tmp_path / "members.nii.gz").write_bytes(b"".join(members))
    np.testing.assert_array_equal(load_volume(tmp_path / "members.nii.gz").array, data)
    (tmp_path / "short.nii.gz").write_bytes(b"".join(members[:2]))
    with pytest.raises(InputError, match=r"short\.nii\.gz: the header declares .* holds only"):
        load_volume(tmp_path / "short.nii.gz")


@pytest.mark.parametrize("shape", [(10, 20), (4, 5, 6, 2, 3)])
def test_wrong_dimensionality(tmp_path, shape):
    write(tmp_path / "bad.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match="3-D"):
        load_image(tmp_path / "bad.nii.gz")


def test_nan_voxels(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 3] = np.inf
    write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match="2 voxels are NaN or Inf"):
        load_image(tmp_path / "nan.nii.gz")


def test_non_integer_labels(tmp_path):
    write(tmp_path / "soft.nii.gz", np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(InputError, match="integer label map"):
        load_labels(tmp_path / "soft.nii.gz")


def test_field_of_wrong_shape(tmp_path):
    write(tmp_path / "f.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    with pytest.raises(InputError, match=r"\(X, Y, Z, 3\)"):
        load_field(tmp_path / "f.nii.gz")


def test_bad_output_name(tmp_path):
    with pytest.raises(InputError, match=".nii"):
        save_volume(Volume(np.zeros(SHAPE), np.eye(4)), tmp_path / "out.png")


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_json(target) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_temp_name_keeps_nifti_suffix(tmp_path):
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        with gzip.open(tmp, "wb") as fh:
            fh.write(b"")
    assert (tmp_path / "x.nii.gz").exists()


def test_read_json_errors(tmp_path):
    (tmp_path / "b.json").write_text("{oops")
    with pytest.raises(InputError, match="b.json"):
        read_json(tmp_path / "b.json")
    with pytest.raises(InputError, match="not found"):
        read_json(tmp_path / "c.json")


def _dead_pid() -> str:
    """``<host>-<pid>`` of a process of this host that has ended (as slicreg.io names temporaries)."""
    import subprocess
    import sys

    from slicreg.io import _owner

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{_owner().rpartition('-')[0]}-{proc.pid}"


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    from slicreg.io import save_volume

    target = tmp_path / "x.nii.gz"
    dead = tmp_path / f".x.nii.gz.{_dead_pid()}.abc123.tmp.nii.gz"
    from slicreg.io import _owner

    alive = tmp_path / f".x.nii.gz.{_owner()}.def456.tmp.nii.gz"
    remote = tmp_path / f".x.nii.gz.another_node-{_dead_pid().rpartition('-')[2]}.abc.tmp.nii.gz"
    other = tmp_path / ".y.nii.gz.1.zzz.tmp.nii.gz"  # another file's temporary: not ours to judge here
    for p in (dead, alive, remote, other):
        p.write_bytes(b"half")
    save_volume(Volume(np.zeros((2, 3, 4), np.float32), np.eye(4)), target)
    assert target.is_file()
    assert not dead.exists() and alive.exists() and remote.exists() and other.exists()


def test_atomic_outputs_all_or_nothing(tmp_path):
    from slicreg.io import atomic_outputs, atomic_write_text

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    atomic_write_text(a, "old a")
    atomic_write_text(b, "old b")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_outputs() as out:
            atomic_write_text(out.path(a), "new a")
            raise RuntimeError("boom")  # killed between the two writes
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    with atomic_outputs() as out:
        atomic_write_text(out.path(a), "new a")
        atomic_write_text(out.path(b), "new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_publication_interrupted_between_renames_is_finished_by_the_next_write(tmp_path):
    from slicreg.io import JOURNAL_PREFIX, atomic_write_text

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    pid = _dead_pid()
    ta, tb = tmp_path / f".a.txt.{pid}.q.tmp.txt", tmp_path / f".b.txt.{pid}.r.tmp.txt"
    a.write_text("new a")  # the first rename happened, then kill -9
    tb.write_text("new b")
    b.write_text("old b")
    (tmp_path / f"{JOURNAL_PREFIX}{pid}.x.json").write_text(
        json.dumps({"outputs": [[str(ta), str(a)], [str(tb), str(b)]]}))
    atomic_write_text(tmp_path / "c.txt", "unrelated write into the same folder")
    assert b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]


def test_check_output_path(tmp_path):
    from slicreg.io import check_output_path, check_outputs_not_inputs

    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="is an existing folder"):
        check_output_path(tmp_path / "folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "deeper" / "x.nii.gz")
    check_output_path(tmp_path / "new" / "deeper" / "x.nii.gz")
    os.link(tmp_path / "file", tmp_path / "hardlink")
    (tmp_path / "symlink").symlink_to(tmp_path / "file")
    for out in ("file", "hardlink", "symlink"):
        with pytest.raises(InputError, match="is the input --in"):
            check_outputs_not_inputs({"--in": tmp_path / "file"}, {"--out": tmp_path / out})
    check_outputs_not_inputs({"--in": tmp_path / "file"}, {"--out": tmp_path / "other"})


def test_kill_9_mid_write_leaves_no_half_file_and_the_next_write_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from slicreg.io import load_image, save_volume

    target = tmp_path / "big.nii.gz"
    code = ("import numpy as np; from slicreg.conventions import Volume; from slicreg.io import save_volume\n"
            f"v = Volume(np.random.default_rng(0).normal(size=(160, 160, 160)).astype(np.float32), np.eye(4))\n"
            "print('ready', flush=True)\n"
            f"while True: save_volume(v, {str(target)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not any(p.name.startswith(".big.nii.gz.") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)  # kill while a temporary is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if target.exists():  # an earlier complete write, never a half one
        assert load_image(target).shape == (160, 160, 160)
    assert any(p.name.startswith(".big.nii.gz.") for p in tmp_path.iterdir())
    save_volume(Volume(np.zeros((2, 2, 2), np.float32), np.eye(4)), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nii.gz"]


def test_gz_output_is_the_same_bytes_for_any_number_of_compression_threads(tmp_path, monkeypatch):
    import slicreg.io as sio

    data = np.random.default_rng(0).normal(0, 100, (40, 50, 60)).astype(np.float32)
    vol = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    files = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(sio, "_gzip_threads", lambda t=threads: t)
        files.append(save_volume(vol, tmp_path / f"t{threads}.nii.gz").read_bytes())
    assert files[0] == files[1] == files[2]
    assert gzip.decompress(files[0])[352:] == np.asfortranarray(data).tobytes(order="F")
    assert np.array_equal(load_image(tmp_path / "t2.nii.gz").array, data)
