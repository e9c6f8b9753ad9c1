"""The `slicreg` command: instant help, the warp subcommand, one-line errors."""

import subprocess
import sys

import numpy as np

from pipelines.cli import main
from slicreg.conventions import Volume
from slicreg.io import load_image, load_labels, save_field, save_volume

SHAPE = (8, 9, 10)


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from pipelines.cli import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'scipy', 'skimage', 'nibabel', 'matplotlib') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the CLI pulled in {out}"


def test_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "warp" in out and "run" in out


def test_warp_image_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img = rng.normal(size=SHAPE).astype(np.float32)
    lab = rng.integers(0, 5, size=SHAPE).astype(np.uint8)
    save_volume(Volume(img, aff), tmp_path / "img.nii.gz")
    save_volume(Volume(lab, aff), tmp_path / "lab.nii.gz")
    u = np.zeros((3, *SHAPE), np.float32)
    u[2] = 1.0
    save_field(u, aff, tmp_path / "u.nii.gz")
    assert main(["warp", "--moving", str(tmp_path / "img.nii.gz"), "--field", str(tmp_path / "u.nii.gz"),
                 "--out", str(tmp_path / "w.nii.gz")]) == 0
    np.testing.assert_array_equal(load_image(tmp_path / "w.nii.gz").array[:, :, :-1], img[:, :, 1:])
    assert main(["warp", "--labels", "--moving", str(tmp_path / "lab.nii.gz"), "--field",
                 str(tmp_path / "u.nii.gz"), "--out", str(tmp_path / "wl.nii.gz")]) == 0
    wl = load_labels(tmp_path / "wl.nii.gz")
    assert wl.array.dtype == np.uint8
    np.testing.assert_array_equal(wl.array[:, :, :-1], lab[:, :, 1:])
    assert not wl.array[:, :, -1].any()


def test_bad_input_is_one_line(tmp_path, capsys):
    code = main(["warp", "--moving", str(tmp_path / "missing.nii.gz"), "--field", "x", "--out",
                 str(tmp_path / "o.nii.gz")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.nii.gz" in err and "not found" in err


def test_commands_re_execute_once_with_the_fast_allocator_setting():
    import os
    import subprocess
    import sys

    from pipelines.cli import ALLOCATOR_ENV

    code = ("import os; from pipelines.cli import ensure_fast_allocator; ensure_fast_allocator(); "
            "print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('SLICREG_RUNS', '0')); "
            "os.environ['SLICREG_RUNS'] = '1'")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and k != "SLICREG_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"], "0"]  # re-executed with it, ran once
    out = subprocess.run([sys.executable, "-c", code], env={**env, "SLICREG_ALLOCATOR": "default"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "0"]
