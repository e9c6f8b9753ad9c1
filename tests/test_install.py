"""slicreg installs with its weights: a wheel built from the repository registers two scans with the default weights,
run from outside the clone.

The wheel is built without network access (``pip wheel --no-deps --no-build-isolation``, the test venv's
setuptools) from a copy of the source (so no build/ or egg-info lands in the clone) and installed with
``--no-deps`` into a throw-away ``--target`` folder; the installed copy reuses the test venv's packages (torch,
numpy, ...) and comes first on ``PYTHONPATH``, ahead of the editable install of the clone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PREP_SHAPE = (192, 160, 256)  # the shipped weights' preprocessed grid (2 mm, RAS)


def _copy_source(dest: Path) -> Path:
    """The files a build reads: the top-level files, the three packages and the weights (working tree as it is)."""
    from slicreg.bundle import DEFAULT_BUNDLE

    dest.mkdir(parents=True)
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("slicreg", "pipelines", "preprocessing"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    shutil.copytree(REPO / "weights" / DEFAULT_BUNDLE, dest / "weights" / DEFAULT_BUNDLE)
    return dest


def _body_ct(seed: int) -> np.ndarray:
    """A CT-like scan on the preprocessed grid: air, an elliptic body of soft tissue with fat, a liver-like organ,
    a spine and noise (HU)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in PREP_SHAPE], indexing="ij",
                          sparse=True)
    shift = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    x, y = x - shift[0], y - shift[1]
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    img = np.full(PREP_SHAPE, -1000.0, np.float32)
    img[np.broadcast_to(body, PREP_SHAPE)] = -90.0  # fat
    inner = np.broadcast_to((x / 0.7) ** 2 + (y / 0.5) ** 2 < 1, PREP_SHAPE)
    img[inner] = 40.0
    liver = ((x + 0.3) / 0.35) ** 2 + ((y + 0.1) / 0.3) ** 2 + ((z - shift[2] - 0.2) / 0.4) ** 2 < 1
    img[liver] = 60.0
    spine = np.broadcast_to((x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1, PREP_SHAPE)
    img[spine] = 700.0
    img += rng.normal(0.0, 10.0, PREP_SHAPE).astype(np.float32)
    return img


@pytest.mark.slow
def test_wheel_installs_and_registers_with_the_default_weights_outside_the_clone(tmp_path):
    from slicreg.conventions import Volume
    from slicreg.io import save_volume

    src = _copy_source(tmp_path / "src")
    dist, target, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("slicreg-*.whl"))
    assert len(wheels) == 1
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                              str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    from slicreg.bundle import DEFAULT_BUNDLE

    shipped = target / "slicreg" / "weights" / DEFAULT_BUNDLE
    assert (shipped / "model.pt").is_file() and (shipped / "SHA256SUMS").is_file()

    work.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -(np.asarray(PREP_SHAPE) - 1)  # centred on the world origin
    save_volume(Volume(_body_ct(1), affine), work / "fixed.nii.gz")
    save_volume(Volume(_body_ct(2), affine), work / "moving.nii.gz")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    where = subprocess.run([sys.executable, "-c", "import slicreg, pipelines.cli; print(slicreg.__file__); "
                            "print(pipelines.cli.__file__)"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(target) for line in where.stdout.split()), where.stdout  # not the clone's

    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "register", "--fixed", "fixed.nii.gz", "--moving",
                          "moving.nii.gz", "--out-field", "u.nii.gz", "--out-info", "info.json"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    import nibabel as nib

    field = nib.load(str(work / "u.nii.gz"))
    assert field.shape == (*PREP_SHAPE, 1, 3)  # the default format: an ITK displacement field on the fixed grid
    np.testing.assert_allclose(field.affine, affine)
    info = json.loads((work / "info.json").read_text())
    assert Path(info["weights"]).resolve() == shipped.resolve()  # the default weights of the installed wheel

    # the same with the moving scan as a DICOM series (LPS, as scanners store it), read by the installed copy
    from test_dicom import write_series

    lps = affine.copy()
    lps[:2] *= -1  # the same world positions listed from the other side: i -> L, j -> P
    moving = _body_ct(2)[::-1, ::-1, :]
    write_series(work / "moving_dicom", np.round(moving).astype(np.int16), lps, intercept=-1024.0)
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "register", "--fixed", "fixed.nii.gz", "--moving",
                          "moving_dicom", "--out-field", "u_dicom.nii.gz", "--field-format", "voxels"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    u_dicom = nib.load(str(work / "u_dicom.nii.gz")).get_fdata()
    assert u_dicom.shape == (*PREP_SHAPE, 3)
    # x + u(x) indexes the DICOM series' own voxels (its i and j run the other way): the same correspondence
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "register", "--fixed", "fixed.nii.gz", "--moving",
                          "moving.nii.gz", "--out-field", "u_vox.nii.gz", "--field-format", "voxels"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    u_nifti = nib.load(str(work / "u_vox.nii.gz")).get_fdata()
    ident = np.indices(PREP_SHAPE, dtype=np.float64).transpose(1, 2, 3, 0)
    target_nifti = ident + u_nifti
    target_dicom = ident + u_dicom
    flipped = target_dicom.copy()
    flipped[..., 0] = PREP_SHAPE[0] - 1 - target_dicom[..., 0]
    flipped[..., 1] = PREP_SHAPE[1] - 1 - target_dicom[..., 1]
    assert np.median(np.abs(flipped - target_nifti)) < 0.5  # the same registration up to HU rounding

    script = target / "bin" / "slicreg"  # the console script the wheel declares
    version = subprocess.run([sys.executable, str(script), "--version"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=120)
    from slicreg import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"slicreg {__version__}", version.stderr
