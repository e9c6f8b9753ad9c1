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


# ----------------------------------------------------------------------------- one CT check for every command
import pytest  # noqa: E402  (this section's decorators)

CT_SHAPE = (16, 16, 24)  # 2 mm; the tiny bundle's preprocessed grid (template supervoxels 8 x 8 x 12 at 4 mm)
CT_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _ct_like(seed=0):
    """A tiny CT in HU: air around an ellipsoidal body (40 HU) with a few denser blobs and noise."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in CT_SHAPE], indexing="ij"))
    centre, radius = (np.array(CT_SHAPE) - 1) / 2, np.array(CT_SHAPE) * 0.4
    body = (((g - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
    img = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, CT_SHAPE)
    for _ in range(4):
        c = centre + rng.uniform(-0.5, 0.5, 3) * radius
        img += 300 * body * np.exp(-(((g - c[:, None, None, None]) / 3.0) ** 2).sum(0))
    return img.astype(np.float32)


def _non_ct(kind):
    """``constant``: one value everywhere; ``unit``: an MRI-like image with structure, intensities in 0..1."""
    if kind == "constant":
        return np.full(CT_SHAPE, 40.0, np.float32)
    return np.clip((_ct_like(seed=3) + 1000.0) / 1400.0, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from slicreg.bundle import save_bundle
    from slicreg.network import build_model

    tmp = tmp_path_factory.mktemp("bundle")
    model = build_model(seed=3, backward="eager")
    sv = np.random.default_rng(0).integers(0, 128, (16, 8, 8, 12)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), tmp / "src" / "supervoxels.nii.gz")
    return save_bundle(tmp / "bundle", model.eval(), template_supervoxels=tmp / "src" / "supervoxels.nii.gz",
                       training={"iterations": 1}, data_provenance={"name": "test"})


def _ct_argv(command, bad, ct, out, bundle):
    """The command line of ``command`` with the suspicious image ``bad`` (and a CT ``ct`` where two are needed)."""
    return {
        "align --moving": ["align", "--fixed", ct, "--moving", bad, "--out-field", out / "u.nii.gz",
                           "--preset", "affine", "--quiet", "--threads", "1"],
        "align --fixed": ["align", "--fixed", bad, "--moving", ct, "--out-field", out / "u.nii.gz",
                          "--preset", "affine", "--quiet", "--threads", "1"],
        "predict": ["predict", "--weights", bundle, "--image", bad, "--out", out / "sv.nii.gz"],
        "supervoxels --body-mask": ["supervoxels", "--image", bad, "--body-mask", "--out", out / "sv.nii.gz",
                                    "--layers", "1", "--supervoxels", "9", "--segments", "14", "--quiet"],
        "supervoxels --labels": ["supervoxels", "--image", bad, "--labels", out.parent / "labels.nii.gz",
                                 "--out", out / "sv.nii.gz", "--layers", "1", "--supervoxels", "9", "--segments",
                                 "14", "--distance-vox", "4", "--quiet"],
        "preprocess": ["preprocess", "--image", bad, "--out", out / "prep", "--shape", "8", "8", "8"],
        "register": ["register", "--fixed", bad, "--moving", ct, "--weights", bundle, "--out-field",
                     out / "u.nii.gz"],
    }[command]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind", ["constant", "unit"])
@pytest.mark.parametrize("command", ["align --moving", "align --fixed", "predict", "supervoxels --body-mask",
                                     "supervoxels --labels", "preprocess", "register"])
def test_commands_that_assume_ct_refuse_other_images_unless_forced(command, kind, tmp_path, tiny_bundle, capsys):
    bad = tmp_path / f"{kind}.nii.gz"
    ct = tmp_path / "ct.nii.gz"
    save_volume(Volume(_non_ct(kind), CT_AFFINE), bad)
    save_volume(Volume(_ct_like(), CT_AFFINE), ct)
    labels = np.zeros(CT_SHAPE, np.uint8)
    labels[5:10, 5:10, 8:16] = 1
    save_volume(Volume(labels, CT_AFFINE), tmp_path / "labels.nii.gz")
    argv = [str(a) for a in _ct_argv(command, bad, ct, tmp_path / "refused", tiny_bundle)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{kind}.nii.gz" in err and "Hounsfield" in err and "--force" in err
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    argv = [str(a) for a in _ct_argv(command, bad, ct, tmp_path / "forced", tiny_bundle)]
    assert main([*argv, "--force"]) == 0
    assert any((tmp_path / "forced").iterdir())


def test_predict_refuses_an_image_not_in_the_preprocessed_axis_order(tmp_path, tiny_bundle, capsys):
    flipped = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS: the network would see the anatomy mirrored
    save_volume(Volume(_ct_like()[::-1, ::-1].copy(), flipped), tmp_path / "lps.nii.gz")
    assert main(["predict", "--weights", str(tiny_bundle), "--image", str(tmp_path / "lps.nii.gz"), "--out",
                 str(tmp_path / "sv.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lps.nii.gz" in err and "RAS" in err and "LPS" in err
    assert not (tmp_path / "sv.nii.gz").exists()
