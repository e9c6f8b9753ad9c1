"""Model cards: the shipped ones verify, state intended use and limitations and name no machine's folders; new
cards are written that way too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from slicreg import __version__
from slicreg.bundle import (
    CARD_JSON,
    CARD_MD,
    COHORT_LIMITATION,
    DEFAULT_BUNDLE,
    default_bundle_path,
    portable_paths,
    verify_bundle,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "weights").iterdir() if (p / CARD_JSON).is_file())


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("bundle", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_cards_verify_and_name_no_machine_paths(bundle):
    card = verify_bundle(bundle)  # every sha256 (SHA256SUMS lists the cards themselves) still holds
    absolute = [s for s in _strings(card) if os.path.isabs(s)]
    assert absolute == [], f"absolute paths in {bundle.name}/{CARD_JSON}: {absolute[:3]}"
    text = (bundle / CARD_MD).read_text()
    assert str(REPO) not in text and "/work/" not in text and "/home/" not in text
    assert card["intended_use"] and "clinical" in card["intended_use"]
    assert COHORT_LIMITATION in card["limitations"]  # the shipped weights saw one patient only
    assert "## Intended use and limitations" in text and "ONE patient" in text


def test_the_default_bundle_is_the_clones_in_a_clone():
    assert DEFAULT_BUNDLE in [p.name for p in SHIPPED]
    assert default_bundle_path() == REPO / "weights" / DEFAULT_BUNDLE  # editable install: no copy in the package


def test_portable_paths_relative_to_the_base_or_a_name(tmp_path):
    doc = {"a": str(tmp_path / "runs" / "x" / "f.nii.gz"), "b": ["/elsewhere/data/AbdomenCTCT", "rel/path"],
           "c": {"d": 3, "e": "HU / 500"}}
    assert portable_paths(doc, [tmp_path]) == {"a": "runs/x/f.nii.gz", "b": ["AbdomenCTCT", "rel/path"],
                                               "c": {"d": 3, "e": "HU / 500"}}


def test_new_cards_carry_no_absolute_paths_and_the_version(tmp_path, monkeypatch):
    import torch

    from slicreg.bundle import save_bundle
    from slicreg.conventions import Volume
    from slicreg.io import save_volume
    from slicreg.network import build_model

    monkeypatch.chdir(tmp_path)  # the working folder, as a pipeline runs from the repository
    sv = np.random.default_rng(0).integers(0, 128, (16, 8, 8, 12)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "src" / "supervoxels.nii.gz")
    (tmp_path / "src" / "supervoxels.json").write_text(json.dumps(
        {"format": "slicreg-supervoxels/1", "template": {"path": str(tmp_path / "runs" / "prep" / "t.nii.gz"),
                                                        "sha256": "ab" * 32}}))
    model = build_model(seed=0, backward="eager").eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8, 12))
    training = {"iterations": 1, "dataset": str(tmp_path / "runs" / "prep" / "k"),
                "init_weights": {"bundle": "/somewhere/else/weights/slicreg-cohort-v2", "model_sha256": "00"}}
    provenance = {"name": "cohort", "preprocessing": {"source_dataset": str(tmp_path / "runs" / "cohort" / "k")},
                  "cohort": {"seed": 0}}
    out = save_bundle(tmp_path / "bundle", model, template_supervoxels=tmp_path / "src" / "supervoxels.nii.gz",
                      training=training, data_provenance=provenance)
    card = verify_bundle(out)
    assert [s for s in _strings(card) if os.path.isabs(s)] == []
    assert card["training"]["dataset"] == "runs/prep/k"
    assert card["training"]["init_weights"]["bundle"] == "slicreg-cohort-v2"  # outside: its name only
    assert card["training_data"]["preprocessing"]["source_dataset"] == "runs/cohort/k"
    assert card["template"]["supervoxels_json"]["template"]["path"] == "runs/prep/t.nii.gz"
    assert card["slicreg_version"] == __version__
    assert COHORT_LIMITATION in card["limitations"]  # a slicreg cohort: the one-patient note is added
    md = (out / CARD_MD).read_text()
    assert str(tmp_path) not in md and f"made by slicreg {__version__}" in md
