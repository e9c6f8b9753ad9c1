"""Tests of the public API (slicreg.api, docs/api.md): the documented example runs as written, repeated calls reuse
the loaded network, save("voxels") writes exactly slicreg.io.save_field's file, align and evaluate wrap the
commands' work."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_register import PREP, ct_like
from test_register import bundle_dir as registration_bundle  # the tiny bundle (with its template) of those tests

import slicreg
from slicreg import api
from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import load_field, load_labels, save_field, save_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
bundle_dir = registration_bundle  # a module-scoped pytest fixture, shared


@pytest.fixture
def default_is_tiny(bundle_dir, monkeypatch):
    """The tiny bundle stands for the shipped weights (weights=None); a fresh cache; load_bundle calls counted."""
    import slicreg.bundle

    calls = []
    real = slicreg.bundle.load_bundle

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "default_weights", lambda: Path(bundle_dir))
    monkeypatch.setattr(slicreg.bundle, "load_bundle", counting)
    api.clear_weights_cache()
    yield calls
    api.clear_weights_cache()


def _example() -> str:
    """The first python block of docs/api.md (the three-line example)."""
    return re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)


def test_the_documented_example_runs_and_a_second_call_reuses_the_network(default_is_tiny, tmp_path, monkeypatch):
    raw_aff = np.array([[-2.5, 0, 0, 20.0], [0, -2.5, 0, 30.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])  # raw, LPS
    save_volume(Volume(ct_like((12, 14, 18), seed=1), raw_aff), tmp_path / "fixed.nii.gz")
    save_volume(Volume(ct_like((12, 14, 18), seed=1), raw_aff), tmp_path / "moving.nii.gz")
    monkeypatch.chdir(tmp_path)
    code = _example()
    assert code.count("\n") == 3 and "slicreg.register(" in code
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 - the documented example, as written
    res, warped = scope["res"], scope["warped"]
    field = load_field(tmp_path / "field.nii.gz")
    assert field.array.shape == (3, 12, 14, 18) and np.allclose(field.affine, raw_aff)
    assert np.abs(field.array).max() < 0.05  # the same scan twice: the identity, on the scans' own grid
    assert warped.shape == (12, 14, 18) and np.allclose(warped.affine, raw_aff)
    assert res.info["preprocessed_inputs"] == {"fixed": False, "moving": False}
    assert len(default_is_tiny) == 1
    # a second call in the same process: the network is not loaded again
    again = slicreg.register(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", seed=1)
    assert len(default_is_tiny) == 1
    assert again.disp_vox.shape == res.disp_vox.shape
    assert again.info["timings_s"]["load weights"] < res.info["timings_s"]["load weights"]
    # another device or folder is another entry
    api.clear_weights_cache()
    slicreg.register(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz")
    assert len(default_is_tiny) == 2


def test_register_takes_volumes_and_nibabel_images_and_warps_labels(default_is_tiny, tmp_path):
    import nibabel as nib

    fixed = Volume(ct_like(PREP, seed=2), AFF)
    moving = nib.Nifti1Image(ct_like(PREP, seed=2), AFF)
    labels = (fixed.array > 100).astype(np.uint8)
    res = slicreg.register(fixed, moving, moving_labels=Volume(labels, AFF), refine=False)
    assert res.info["preprocessed_inputs"] == {"fixed": True, "moving": True} and res.info["refine"] is False
    assert np.abs(res.disp_vox).max() < 1e-3  # same scan: same predicted maps, identity
    np.testing.assert_array_equal(res.warp_labels().array, labels)
    np.testing.assert_array_equal(res.warp_labels(Volume(labels, AFF)).array, labels)
    np.testing.assert_allclose(res.warp().array, fixed.array, atol=0.1)
    # save("voxels") is exactly slicreg.io.save_field's file
    res.save(tmp_path / "api.nii.gz")
    save_field(res.disp_vox, res.affine, tmp_path / "io.nii.gz")
    a, b = (nib.load(tmp_path / n) for n in ("api.nii.gz", "io.nii.gz"))
    assert a.header == b.header
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    with pytest.raises(InputError, match="format"):
        res.save(tmp_path / "x.nii.gz", format="nonsense")
    with pytest.raises(InputError, match="moving_labels"):
        slicreg.register(fixed, moving, moving_labels=Volume(labels[:-1], AFF))
    with pytest.raises(InputError, match="labels"):
        res.warp_labels(labels[:-1])
    with pytest.raises(InputError, match="affine"):
        slicreg.register(fixed.array, moving)
    with pytest.raises(InputError, match="atlas"):
        slicreg.register(fixed, fixed, atlas=True)  # the template is recognised by its file


def test_align_and_evaluate_wrap_the_commands_work(tmp_path):
    img = ct_like(PREP, seed=4)
    fixed = Volume(img, AFF)
    flipped = Volume(img[::-1].copy(), AFF @ np.array([[-1, 0, 0, PREP[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                                       [0, 0, 0, 1.0]]))  # the same scan stored along -x
    labels = (img > 100).astype(np.uint8) + (img > 250)
    save_volume(Volume(labels, AFF), tmp_path / "lab.nii.gz")
    res = slicreg.align(fixed, flipped, preset="affine", moving_labels=Volume(labels[::-1].copy(), flipped.affine))
    assert res.disp_vox.shape == (3, *PREP) and res.affine_vox.shape == (4, 4)
    # the field indexes the flipped file's own voxels: x -> (X - 1 - x, y, z) up to the registration's error
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in PREP], indexing="ij"))
    target = grid[0] + res.disp_vox[0]
    assert np.median(np.abs(target - (PREP[0] - 1 - grid[0]))) < 0.5
    ev = slicreg.evaluate(tmp_path / "lab.nii.gz", Volume(labels, AFF), res.field.array * 0, labels=[1, 2])
    assert ev.scores["per_label"]["1"]["dice_learn2reg"] == pytest.approx(1.0)
    ev = slicreg.evaluate(tmp_path / "lab.nii.gz", res.warp_labels(), labels=[1, 2], hd95=False)
    assert ev.scores["summary"]["dice_learn2reg"]["selected"] > 0.8
    with pytest.raises(InputError, match="mask restricts"):
        slicreg.evaluate(tmp_path / "lab.nii.gz", tmp_path / "lab.nii.gz", mask=tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="none of the ids"):
        slicreg.evaluate(tmp_path / "lab.nii.gz", tmp_path / "lab.nii.gz", labels=[7])
    assert load_labels(tmp_path / "lab.nii.gz").shape == PREP
