"""Shared edge code of the ``register`` command and stage: weights, preprocessing detection, one pair.

The preprocessed grid a bundle works on is twice its template supervoxel grid (the template was preprocessed
to 192 x 160 x 256 at 2 mm and its supervoxels live on the 96 x 80 x 128 grid at 4 mm), so
:func:`bundle_crop_shape` derives it from the bundle; a scan already on such a grid (2 mm, RAS, that shape) is
used as it is, any other is preprocessed the paper's way (:func:`preprocessing.geometry.preprocess_volume`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_BUNDLE = "slicreg-cohort-v3"


def default_weights() -> Path:
    """The shipped bundle: ``weights/slicreg-cohort-v3`` of the source tree."""
    return WEIGHTS_DIR / DEFAULT_BUNDLE


def load_weights(path: str | Path | None, *, device: str = "cpu") -> Any:
    """Load and verify a weights bundle (the shipped one when ``path`` is None).

    Raises:
        InputError: no such folder (with a hint when the shipped weights are missing), or any problem
            :func:`slicreg.bundle.load_bundle` finds (format, architecture, hashes, weights)."""
    from slicreg.bundle import load_bundle
    from slicreg.errors import InputError

    folder = Path(path).expanduser() if path else default_weights()
    if not folder.exists():
        hint = "" if path else " (no shipped weights in this checkout: train them with `python run_pipeline.py " \
                               "pipelines/demo-train.toml` or pass --weights)"
        raise InputError(f"{folder}: weights bundle not found{hint}")
    bundle = load_bundle(folder, device=device)
    bundle_crop_shape(bundle)  # a bundle whose template grid cannot be a network input is unusable
    return bundle


def bundle_crop_shape(bundle: Any) -> tuple[int, int, int]:
    """The preprocessed 2 mm grid of a bundle: twice its template supervoxel grid (192 x 160 x 256 normally)."""
    from slicreg.errors import InputError

    sv_shape = tuple(int(s) for s in np.shape(bundle.template_supervoxels.array)[1:])
    shape = tuple(2 * s for s in sv_shape)
    if len(shape) != 3 or any(s % 8 for s in shape):
        raise InputError(f"{bundle.path}: template supervoxels on a {sv_shape} grid; the network needs a "
                         f"preprocessed grid (twice that) with sizes divisible by 8")
    return shape  # type: ignore[return-value]


@dataclass
class Prepared:
    """A scan ready for registration: the preprocessed image, its crop record and whether it was already so."""

    image: Any  # Volume on the preprocessed grid
    record: Any  # preprocessing.geometry.CropRecord
    identity: bool  # True: the input was already preprocessed (no resampling or crop was needed)


def is_preprocessed(volume: Any, crop_shape: tuple[int, int, int]) -> bool:
    """True for a 2 mm isotropic RAS volume of shape ``crop_shape`` (the output of ``slicreg preprocess``)."""
    import nibabel as nib

    return (tuple(volume.shape) == tuple(crop_shape) and np.allclose(volume.spacing_mm, 2.0, atol=1e-3)
            and "".join(nib.aff2axcodes(volume.affine)) == "RAS")


def preprocess_for_registration(volume: Any, *, name: str, force: bool = False,
                                crop_shape: tuple[int, int, int] | None = None, keep_preprocessed: bool = True
                                ) -> Prepared:
    """Preprocess a CT as the paper did, unless it already is (2 mm RAS, ``crop_shape``): then use it as is.

    Args:
        volume: the scan (:class:`slicreg.conventions.Volume`, HU).
        name: how to call it in messages (its file name).
        force: accept an image that does not look like CT.
        crop_shape: the preprocessed grid (default 192 x 160 x 256; use :func:`bundle_crop_shape`).
        keep_preprocessed: use a scan already on such a grid as it is (False: preprocess every scan, as the
            ``preprocess`` stage does, so that one scan stored in any orientation gives the same grid).

    Raises:
        InputError: not CT-like (without force), no soft tissue to centre on, not 3-D.
    """
    from preprocessing.geometry import CROP_SHAPE, CropRecord, check_ct_like, preprocess_volume

    crop_shape = tuple(crop_shape or CROP_SHAPE)  # type: ignore[assignment]
    if not keep_preprocessed or not is_preprocessed(volume, crop_shape):
        prep = preprocess_volume(volume, force=force, name=name, crop_shape=crop_shape)
        return Prepared(prep.image, prep.record, False)
    check = check_ct_like(volume.array, name=name, force=force)
    none = ((0, 0), (0, 0), (0, 0))
    record = CropRecord(
        original_shape=volume.shape, original_affine=volume.affine, original_axcodes="RAS", spacing_mm=2.0,
        resampled_shape=volume.shape, resampled_affine=volume.affine, crop_start=(0, 0, 0), crop_shape=volume.shape,
        affine=volume.affine, centre_vox=None, padded_vox=none, dropped_vox=none, clipped_voxels=0, ct_check=check,
        source={"source": volume.meta.get("source")})
    return Prepared(volume, record, True)


def to_original_grid(disp_vox: np.ndarray, fixed: Prepared, moving: Prepared) -> np.ndarray:
    """A field between two prepared scans as the correspondence of the scans as given: ``(3, *fixed original
    shape)``, original fixed voxel -> original moving voxel (:func:`preprocessing.geometry.field_to_original_grid`;
    unchanged when neither scan needed preprocessing)."""
    from preprocessing.geometry import field_to_original_grid

    if fixed.identity and moving.identity:
        return disp_vox
    return field_to_original_grid(disp_vox, fixed.record, moving.record)


def atlas_advice(pairwise: str) -> str:
    """What to do instead of atlas mode with a foreign template; ``pairwise`` says how to switch it off."""
    return (f"register pairwise instead ({pairwise}: the template then gets its own network pass), or train a "
            f"bundle on this template (pipelines/btcv.toml) and use atlas mode with that bundle")


def read_template_supervoxels(path: str | Path) -> tuple[np.ndarray, str | None, Path]:
    """Template supervoxels given explicitly: a ``supervoxels.nii.gz`` or a folder holding one (a ``supervoxels``
    stage's output). Returns ``(maps (16, X, Y, Z) uint8, sha256 of the image they were made on or None, file)``;
    the image's sha256 comes from the sidecar ``supervoxels.json`` beside the file."""
    from slicreg.bundle import _check_supervoxels
    from slicreg.errors import InputError
    from slicreg.io import load_volume, read_json

    path = Path(path).expanduser()
    file = path / "supervoxels.nii.gz" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: template supervoxels not found (expected supervoxels.nii.gz, the output of "
                         f"`slicreg supervoxels` or of a supervoxels stage)")
    maps = load_volume(file, kind="labels", channels=True).array
    _check_supervoxels(maps, file)
    sidecar = file.with_name("supervoxels.json")
    sha = None
    if sidecar.is_file():
        meta = read_json(sidecar)
        template = meta.get("template") if isinstance(meta, dict) else None
        sha = template.get("sha256") if isinstance(template, dict) else None
    return np.asarray(maps, dtype=np.uint8), sha if isinstance(sha, str) else None, file


def atlas_template(bundle: Any, template_image: str | Path, supervoxels: str | Path | None = None
                   ) -> tuple[np.ndarray | None, str | None]:
    """The template supervoxels atlas mode uses for ``template_image`` -- always the bundle's own (the labels its
    network predicts) -- or why atlas mode would be wrong there.

    ``supervoxels`` (optional) are template supervoxels given explicitly: they can prove that ``template_image``
    is the bundle's template (rule 2 of :func:`slicreg.bundle.atlas_template_problem`). Returns ``(maps, None)``
    or ``(None, reason)``."""
    from slicreg.bundle import atlas_template_problem
    from slicreg.io import sha256_file

    given = given_sha = None
    if supervoxels is not None:
        given, given_sha, _ = read_template_supervoxels(supervoxels)
    problem = atlas_template_problem(bundle, template_sha256=sha256_file(template_image), supervoxels=given,
                                     supervoxels_template_sha256=given_sha)
    if problem is not None:
        return None, problem
    return np.asarray(bundle.template_supervoxels.array), None


def register_preprocessed(bundle: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *, device: str = "cpu",
                          seed: int = 0, moving_is_template: bool = False, refine: bool = False,
                          refine_options: dict[str, Any] | None = None, network_dtype: Any = None,
                          template_supervoxels: np.ndarray | None = None, **flow_options: Any) -> Any:
    """One registration with a loaded bundle (atlas mode: ``template_supervoxels``, default the bundle's own; the
    caller checks with :func:`atlas_template` that the moving scan is that template).

    See :func:`slicreg.register.register_preprocessed`; returns its :class:`~slicreg.register.RegistrationResult`."""
    from slicreg.register import register_preprocessed as register

    template = None
    if moving_is_template:
        template = np.asarray(bundle.template_supervoxels.array if template_supervoxels is None
                              else template_supervoxels)
    return register(bundle, np.asarray(fixed_hu, dtype=np.float32), np.asarray(moving_hu, dtype=np.float32),
                    template_supervoxels=template, moving_is_template=moving_is_template, device=device, seed=seed,
                    refine=refine, refine_options=refine_options, network_dtype=network_dtype, **flow_options)


def run_pair_jobs(ctx: Any, pairs: list[tuple[str, str]], job: Any, worker: Any, *, desc: str) -> list[dict]:
    """Register every ``(fixed, moving)`` pair once, resuming an interrupted attempt: the per-pair loop of the
    ``register`` and ``align-pairs`` stages.

    A pair whose field ``fields/disp_<fixed>_<moving>.nii.gz`` and record ``runs/<fixed>_<moving>.json`` both
    exist (written atomically by an earlier attempt) is read back; the others become jobs
    ``{"fixed", "moving", "field", "field_path", "record_path", **job(fixed, moving)}`` run by ``worker`` on the
    stage's processes (``ctx.map``), each returning its record. Returns the records in the order of ``pairs``."""
    from slicreg.io import read_json

    jobs, records = [], {}
    for fixed, moving in pairs:
        field = f"fields/disp_{fixed}_{moving}.nii.gz"
        record = f"runs/{fixed}_{moving}.json"
        if ctx.done(field) and ctx.done(record):
            records[(fixed, moving)] = read_json(ctx.out_dir / record)
            continue
        jobs.append({"fixed": fixed, "moving": moving, "field": field, "field_path": str(ctx.path(field)),
                     "record_path": str(ctx.path(record)), **job(fixed, moving)})
    if records:
        ctx.log(f"{len(records)} of {len(pairs)} pairs already registered by an earlier attempt")
    for rec in ctx.map(worker, jobs, desc=desc):
        records[(rec["fixed"], rec["moving"])] = rec
    return [records[pair] for pair in pairs]
