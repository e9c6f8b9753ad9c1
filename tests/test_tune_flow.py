"""Tests of the reusable pieces of benchmarks/tune_flow.py (tiny synthetic volumes)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import tune_flow
from slicreg.metrics import jacobian_determinant, jacobian_stats, warp_labels_learn2reg


def _smooth_field(shape, amplitude, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros((3, *shape))
    for c in range(3):
        for _ in range(3):
            f = rng.uniform(0.1, 0.5, size=3)
            ph = rng.uniform(0, 2 * np.pi, size=3)
            out[c] += amplitude * np.sin(sum(f[a] * grids[a] + ph[a] for a in range(3)))
    return out.astype(np.float32)


@pytest.mark.parametrize("amplitude", [0.3, 3.0])
def test_folding_subgrid_matches_metrics(amplitude):
    u = _smooth_field((13, 16, 15), amplitude)
    full = tune_flow.folding_subgrid(u, 1)
    ref = jacobian_stats(u)
    assert full["folding_percent"] == pytest.approx(ref["folding_percent"], abs=1e-12)
    assert full["det_min"] == pytest.approx(ref["det_min"], rel=1e-12, abs=1e-12)
    if amplitude > 1:
        assert ref["folding_percent"] > 0  # the case exercises folding
    det = jacobian_determinant(u)[2:-2, 2:-2, 2:-2][::2, ::2, ::2]
    sub = tune_flow.folding_subgrid(u, 2)
    assert sub["folding_percent"] == pytest.approx(100.0 * np.count_nonzero(det <= 0) / det.size, abs=1e-12)
    assert sub["det_min"] == pytest.approx(float(det.min()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_warp_labels_subgrid_matches_learn2reg(stride):
    rng = np.random.default_rng(1)
    moving = rng.integers(0, 5, size=(12, 14, 10)).astype(np.uint8)
    u = _smooth_field((11, 13, 12), 2.0, seed=2)
    full = warp_labels_learn2reg(moving, u)
    sub = tune_flow.warp_labels_subgrid(moving, u, stride)
    np.testing.assert_array_equal(sub, full[::stride, ::stride, ::stride])


def test_true_field_subgrid_matches_full_grid():
    from preprocessing.cohort import SubjectTransform, true_field

    zeros = np.zeros((3, 4, 4, 4), dtype=np.float32)
    grid = np.diag([30.0, 30.0, 30.0, 1.0])
    fixed_t = SubjectTransform(np.eye(4), grid, zeros, zeros)
    prewarp = np.diag([1.1, 0.9, 1.05, 1.0])
    prewarp[:3, 3] = [4.0, -2.0, 6.0]
    moving_t = SubjectTransform(prewarp, grid, zeros, zeros)
    f_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    f_aff[:3, 3] = [-10.0, 5.0, 3.0]
    m_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (9, 8, 10)
    full = true_field(fixed_t, f_aff, shape, moving_t, m_aff, quantum=None)
    sub = tune_flow.true_field_subgrid(fixed_t, f_aff, shape, moving_t, m_aff, 2)
    np.testing.assert_allclose(sub, full[:, ::2, ::2, ::2], atol=1e-4)
    # analytic: fixed voxel p -> world x = F p -> moving world A^-1 x -> moving voxel
    p = np.array([4.0, 2.0, 6.0])
    x = f_aff[:3, :3] @ p + f_aff[:3, 3]
    y = np.linalg.solve(prewarp[:3, :3], x - prewarp[:3, 3])
    q = np.linalg.solve(m_aff[:3, :3], y - m_aff[:3, 3])
    np.testing.assert_allclose(sub[:, 2, 1, 3], q - p, atol=1e-4)


def _fake_dataset():
    roles = {"t0": "template", "a": "train", "b": "train", "c": "test", "d": "unused"}
    subjects = {k: SimpleNamespace(id=k, role=r, tags=()) for k, r in roles.items()}
    return SimpleNamespace(root="fake", template="t0", training=["b", "a"], test=["c"], subjects=subjects,
                           subject=lambda sid: subjects[sid])


def test_select_subjects_refuses_test_and_non_training():
    ds = _fake_dataset()
    assert tune_flow.select_subjects(ds, None, None) == ["a", "b"]
    assert tune_flow.select_subjects(ds, None, 1) == ["a"]
    assert tune_flow.select_subjects(ds, ["b"], None) == ["b"]
    with pytest.raises(SystemExit, match="refusing test"):
        tune_flow.select_subjects(ds, ["a", "c"], None)
    for bad in ("t0", "d", "zz"):
        with pytest.raises(SystemExit, match="refusing"):
            tune_flow.select_subjects(ds, [bad], None)


def test_slab_window_and_fov():
    labels = np.zeros((4, 4, 60), dtype=np.uint8)
    labels[:, :, 10:14] = 2  # kidney centroid z = 11.5
    labels[:, :, 40:44] = 6  # liver centroid z = 41.5
    assert tune_flow.slab_window(labels, n_slices=11, position=0.0) == 7  # centre 11.5 -> start 6.5 -> 7 (half up)
    assert tune_flow.slab_window(labels, n_slices=11, position=1.0) == 37
    assert tune_flow.slab_window(labels, n_slices=11, position=0.5) == 22  # centre 26.5
    assert tune_flow.slab_window(labels, n_slices=59, position=1.0) == 1  # clamped into the scan
    fov = tune_flow.fov_from_padding((5, 6, 7), np.array([[1, 0], [0, 2], [3, 3]]))
    assert fov.sum() == 4 * 4 * 1 and fov[1:, :4, 3:4].all()
