"""Tiny synthetic data sets laid out exactly like BTCV and Learn2Reg AbdomenCTCT, and a tiny weights bundle.

Every scan samples one analytic abdomen (:func:`phantom`, defined in world millimetres) on its own grid, so the
same subject can be stored at any spacing or orientation without interpolation between the copies: an LAS or LPS
copy is the RAS array flipped, with the affine that says so.

The tiny network works on a 16 x 16 x 24 preprocessed grid (2 mm; its template supervoxels 8 x 8 x 12 at 4 mm):
pipelines run with ``--set prep.shape=[16,16,24]`` and ``weights`` pointing at :func:`tiny_bundle`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slicreg.conventions import Volume
from slicreg.io import save_volume, sha256_file

PREP_SHAPE = (16, 16, 24)  # preprocessed grid of the tiny bundle (2 mm): 32 x 32 x 48 mm
SV_GRID = tuple(s // 2 for s in PREP_SHAPE)
ORGANS = {1: 50.0, 2: 150.0, 3: 150.0, 6: 60.0, 7: 10.0, 8: 200.0}  # BTCV id -> HU
"""Spleen, kidneys, liver, stomach, aorta."""
_CENTRES = {1: (9.0, 4.0, 6.0), 2: (-8.0, -4.0, -8.0), 3: (8.0, -4.0, -8.0), 6: (-8.0, 3.0, 8.0),
            7: (5.0, 6.0, 14.0), 8: (0.0, -7.0, 0.0)}
_RADII = {1: (4.0, 4.0, 5.0), 2: (3.0, 3.0, 5.0), 3: (3.0, 3.0, 5.0), 6: (6.0, 5.0, 8.0), 7: (3.5, 3.0, 4.0),
          8: (2.0, 2.0, 12.0)}


def subject_params(seed: int, *, translation_mm=(0.0, 0.0, 0.0), noise_seed: int | None = None) -> dict:
    """One subject's anatomy: organ shifts (mm), organ scales and the body's radii, seeded; the whole anatomy
    moved by ``translation_mm`` (the subject's value at ``x`` is the unmoved anatomy's at ``x - translation``)."""
    rng = np.random.default_rng(seed)
    return {"shift": {k: rng.uniform(-2.5, 2.5, 3) for k in ORGANS},
            "scale": {k: rng.uniform(0.85, 1.15) for k in ORGANS},
            "body": np.array([14.0, 12.0, 30.0]) * rng.uniform(0.93, 1.07, 3),
            "translation": np.asarray(translation_mm, dtype=np.float64),
            "noise_seed": seed if noise_seed is None else noise_seed}


def phantom(points_mm: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """HU and BTCV labels of a subject at world points ``(..., 3)`` (mm, RAS): air, an elliptic body of fat and
    muscle, six organs."""
    p = np.asarray(points_mm, dtype=np.float64) - params["translation"]
    body = (((p / params["body"]) ** 2).sum(-1)) <= 1.0
    hu = np.where(body, -80.0 + 120.0 * (np.abs(p[..., 0]) > 9.0), -1000.0)
    labels = np.zeros(p.shape[:-1], np.uint8)
    for k, value in ORGANS.items():
        centre = np.asarray(_CENTRES[k]) + params["shift"][k]
        radii = np.asarray(_RADII[k]) * params["scale"][k]
        inside = (((p - centre) / radii) ** 2).sum(-1) <= 1.0
        inside &= body
        hu = np.where(inside, value, hu)
        labels[inside] = k
    return hu, labels


def grid_points(shape, affine) -> np.ndarray:
    """World coordinates ``(X, Y, Z, 3)`` of every voxel of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def ras_grid(spacing_mm, fov_mm, centre_mm=(0.0, 0.0, 0.0)):
    """``(shape, affine)`` of a RAS grid of ``spacing_mm`` covering ``fov_mm`` around ``centre_mm``."""
    spacing = np.asarray(spacing_mm, dtype=np.float64) * np.ones(3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre_mm) - spacing * (np.asarray(shape) - 1) / 2
    return shape, affine


def flipped(array: np.ndarray, affine: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored with ``axes`` reversed (RAS -> LAS for ``(0,)``, -> LPS for ``(0, 1)``)."""
    out, aff = array, np.array(affine, dtype=np.float64)
    for a in axes:
        out = np.flip(out, axis=a)
        aff[:3, 3] = aff[:3, 3] + aff[:3, a] * (array.shape[a] - 1)
        aff[:3, a] = -aff[:3, a]
    return np.ascontiguousarray(out), aff


def scan(params: dict, shape, affine, axes=()) -> tuple[Volume, Volume]:
    """A subject sampled on a RAS grid, with a little seeded noise, stored with ``axes`` flipped."""
    hu, labels = phantom(grid_points(shape, affine), params)
    hu = hu + np.random.default_rng(params["noise_seed"]).normal(0.0, 8.0, hu.shape)
    hu = np.round(hu).astype(np.int16)
    h, aff = flipped(hu, affine, axes)
    lab, _ = flipped(labels, affine, axes)
    return Volume(h, aff), Volume(lab, aff)


# ---------------------------------------------------------------------------------------------- the bundle
def tiny_bundle(folder: Path, *, template: Path | None = None, seed: int = 3) -> Path:
    """A bundle with a random tiny network and random template supervoxels on the 8 x 8 x 12 grid.

    ``template``: the (preprocessed) image its supervoxels stand for; its sha256 goes into the model card, so
    atlas mode is valid for exactly that file."""
    import torch

    from slicreg.bundle import save_bundle
    from slicreg.network import build_model

    folder = Path(folder)
    model = build_model(seed=seed, backward="eager")
    model.train()
    with torch.random.fork_rng():  # the train-mode head samples voxels from the global generator
        torch.manual_seed(seed)
        model(torch.randn(2, 1, *SV_GRID, generator=torch.Generator().manual_seed(seed)))  # BatchNorm statistics
    sv = np.random.default_rng(seed).integers(0, 128, (16, *SV_GRID)).astype(np.uint8)
    save_volume(Volume(sv, np.diag([4.0, 4.0, 4.0, 1.0])), folder / "src" / "supervoxels.nii.gz")
    provenance = {"name": "tiny test bundle"}
    if template is not None:
        provenance["template_image_sha256"] = sha256_file(template)
    return save_bundle(folder / "bundle", model.eval(), template_supervoxels=folder / "src" / "supervoxels.nii.gz",
                       training={"iterations": 0}, data_provenance=provenance)


# ---------------------------------------------------------------------------------------------- Learn2Reg
L2R_FOV_MM = tuple(2.0 * s for s in PREP_SHAPE)  # the Learn2Reg release is already 2 mm at the preprocessed shape
L2R_LABELS = {"1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gallbladder", "5": "esophagus",
              "6": "liver", "7": "stomach", "8": "aorta", "9": "inferior vena cava",
              "10": "portal vein and splenic vein", "11": "pancreas", "12": "right adrenal gland",
              "13": "left adrenal gland"}


def l2r_translation_mm(case: int) -> np.ndarray:
    """Where the Learn2Reg test subject ``case`` lies: one anatomy, moved by whole 2 mm voxels per case."""
    return np.array([2.0 * (case % 3) - 2.0, 2.0 * ((case // 3) % 2), 4.0 * (case % 2) - 2.0])


def make_learn2reg(root: Path, *, n_train: int = 3, n_val: int = 3, spacing_mm: float = 2.0,
                   axes=(), old_label_names: bool = False, test_cases: tuple[int, ...] = ()) -> Path:
    """A folder laid out as the AbdomenCTCT release: ``imagesTr/AbdomenCTCT_NNNN_0000.nii.gz``, label maps
    ``labelsTr/AbdomenCTCT_NNNN_0000.nii.gz`` (``old_label_names``: ``labelsTr/AbdomenCTCT_NNNN.nii.gz``),
    ``AbdomenCTCT_dataset.json`` with ``training``, ``test``, ``registration_val`` (every pair a < b of the last
    ``n_val`` cases) and ``registration_test`` (pairs of ``test_cases``, in imagesTs/). ``spacing_mm`` and ``axes``
    store the same subjects on another grid. Every subject is one anatomy translated by
    :func:`l2r_translation_mm`, so the true correspondence of any pair is a known translation."""
    root = Path(root)
    shape, affine = ras_grid(spacing_mm, L2R_FOV_MM)
    training, test = [], []
    val = tuple(range(n_train + 1, n_train + n_val + 1))
    for case in range(1, n_train + n_val + 1):
        params = subject_params(100, translation_mm=l2r_translation_mm(case), noise_seed=case)
        image, labels = scan(params, shape, affine, axes)
        img = f"imagesTr/AbdomenCTCT_{case:04d}_0000.nii.gz"
        lab = f"labelsTr/AbdomenCTCT_{case:04d}.nii.gz" if old_label_names else img.replace("images", "labels")
        save_volume(image, root / img)
        save_volume(labels, root / lab)
        training.append({"image": f"./{img}", "label": f"./{lab}"})
    for case in test_cases:
        image, _ = scan(subject_params(100, translation_mm=l2r_translation_mm(case), noise_seed=case), shape, affine,
                        axes)
        save_volume(image, root / f"imagesTs/AbdomenCTCT_{case:04d}_0000.nii.gz")
        test.append({"image": f"./imagesTs/AbdomenCTCT_{case:04d}_0000.nii.gz"})
    val_cases = val

    def img(case: int, folder: str = "imagesTr") -> str:
        return f"./{folder}/AbdomenCTCT_{case:04d}_0000.nii.gz"

    doc = {
        "name": "AbdomenCTCT", "release": "test", "description": "tiny synthetic copy of the layout",
        "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": list(shape)}, "modality": {"0": "CT"},
        "labels": {"0": L2R_LABELS}, "numTraining": len(training), "training": training,
        "numTest": len(test), "test": test,
        "registration_val": [{"fixed": img(a), "moving": img(b)} for a in val_cases for b in val_cases if a < b],
        "registration_test": [{"fixed": img(a, "imagesTs"), "moving": img(b, "imagesTs")}
                              for a in test_cases for b in test_cases if a < b],
    }
    doc["numRegistration_val"] = len(doc["registration_val"])
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(doc, indent=1))
    return root


# ---------------------------------------------------------------------------------------------------- BTCV
BTCV_SPACING_MM = (0.9, 0.9, 3.0)  # BTCV: ~0.6-0.9 mm in-plane, 2.5-5 mm between slices
BTCV_FOV_MM = (44.0, 44.0, 60.0)


def make_btcv(root: Path, numbers, *, labels: bool = True) -> Path:
    """``RawData/Training/img/imgNNNN.nii.gz`` and ``label/labelNNNN.nii.gz`` as the BTCV release: anisotropic
    raw spacing, stored LPS (x and y reversed)."""
    base = Path(root) / "RawData" / "Training"
    shape, affine = ras_grid(BTCV_SPACING_MM, BTCV_FOV_MM, centre_mm=(1.0, -2.0, 3.0))
    for n in numbers:
        image, lab = scan(subject_params(n), shape, affine, axes=(0, 1))
        save_volume(image, base / "img" / f"img{n:04d}.nii.gz")
        if labels:
            save_volume(lab, base / "label" / f"label{n:04d}.nii.gz")
    return Path(root)
