"""Tests of the scoring pieces of benchmarks/acquisition_benefit.py (the simulated-acquisition experiment)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import acquisition_benefit


def test_label_accuracy_counts_all_and_foreground_voxels_per_layer():
    true = np.zeros((2, 2, 2, 2), np.uint8)
    true[0, 0] = 5                      # layer 0: 4 foreground voxels of 8
    true[1] = 7                         # layer 1: all foreground
    pred = true.copy()
    pred[0, 0, 0, 0] = 0                # one foreground voxel wrong in layer 0
    pred[1, 1] = 3                      # 4 of 8 wrong in layer 1
    r = acquisition_benefit.label_accuracy(pred, true)
    assert r["accuracy"] == pytest.approx((7 / 8 + 4 / 8) / 2)
    assert r["foreground"] == pytest.approx((3 / 4 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="shape"):
        acquisition_benefit.label_accuracy(pred[:1], true)


def test_registration_dice_reads_the_13_organ_mean_per_method(tmp_path):
    metrics = {"methods": ["initial", "slicreg (arm on)", "missing"],
               "aggregates": {
                   "initial": {"n_pairs": 3, "summary": {"dice_learn2reg": {"all13": {"mean": 0.1, "std": 0.02}}}},
                   "slicreg (arm on)": {"n_pairs": 3,
                                        "summary": {"dice_learn2reg": {"all13": {"mean": 0.5, "std": 0.1}}}}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    dice = acquisition_benefit.registration_dice(path)
    assert dice == {"initial": {"mean": 0.1, "std": 0.02, "pairs": 3},
                    "slicreg (arm on)": {"mean": 0.5, "std": 0.1, "pairs": 3}}


def test_paired_difference_counts_and_spread():
    q = acquisition_benefit.paired({"a": 0.5, "b": 0.4, "c": 0.3, "d": float("nan")},
                                   {"a": 0.6, "b": 0.3, "c": 0.5, "d": 0.9, "e": 1.0})
    assert q["n"] == 3 and q["higher"] == 2 and q["lower"] == 1
    assert q["mean"] == pytest.approx((0.1 - 0.1 + 0.2) / 3)
    assert q["sd"] == pytest.approx(np.std([0.1, -0.1, 0.2], ddof=1))
    assert acquisition_benefit.paired({}, {"a": 1.0})["n"] == 0
