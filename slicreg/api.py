"""The public API: register, align and evaluate a user's scans in a few lines (docs/api.md).

::

    import slicreg
    res = slicreg.register("fixed.nii.gz", "moving.nii.gz")    # SLIC-Reg with the shipped weights
    res.save("field.nii.gz"); warped = res.warp("moving.nii.gz")

- :func:`register` -- SLIC-Reg: raw scans -> the method's inference geometry (:mod:`slicreg.geometry`) -> network
  passes -> keypoint flow -> thin-plate spline (-> MIND-SSC refinement) -> the field mapped back to the fixed
  scan's own grid. Loaded weights bundles are cached per folder and device, so repeated calls in one process
  reuse the network.
- :func:`align` -- the built-in conventional registration (:func:`slicreg.alignment.register_pair`) on two scans in
  world coordinates (any axis order; the field indexes the moving scan's own voxels).
- :func:`evaluate` -- Learn2Reg-exact per-organ scores (Dice, HD95, Jacobian, field error) of a field.

Inputs are file paths (NIfTI, or a DICOM series folder), nibabel images or :class:`slicreg.conventions.Volume`
objects, in HU for images. Results (:class:`Registration`) hold the field ``(3, X, Y, Z)`` float32 on the fixed
scan's original grid, in voxels of the moving scan's original grid, fixed -> moving (the project's convention,
:mod:`slicreg.conventions`), with both grids' affines; ``warp`` / ``warp_labels`` / ``save`` use them.

``slicreg.register`` / ``slicreg.align`` / ``slicreg.evaluate`` are these functions; the method on preprocessed
scans lives in :mod:`slicreg.registration`, the built-in toolkit in :mod:`slicreg.alignment`.

Bad input raises :class:`slicreg.errors.InputError` naming the argument (a command passes its flag names as
``names``). Heavy modules (torch, nibabel, scipy) are imported inside the functions, so importing this module is
cheap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slicreg.conventions import Volume
from slicreg.errors import InputError

__all__ = [
    "AlignInputs",
    "Evaluation",
    "Prepared",
    "Registration",
    "align",
    "atlas_advice",
    "atlas_template",
    "bundle_crop_shape",
    "cached_weights",
    "check_label_map",
    "clear_weights_cache",
    "default_weights",
    "evaluate",
    "labels_in_world",
    "load_weights",
    "prepare_align",
    "prepared_to_original_grid",
    "preprocess_for_registration",
    "read_template_supervoxels",
    "register",
    "register_preprocessed",
    "run_align",
]


ImageLike = Any
"""A path (``str`` / ``os.PathLike``: NIfTI file or DICOM series folder), a nibabel image or a
:class:`~slicreg.conventions.Volume`."""


# ------------------------------------------------------------------------------------------------ inputs
def _name(x: ImageLike, default: str) -> str:
    """How to call an input in messages: its path as given, or the volume's source file, or ``default``."""
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, Volume) and x.meta.get("source"):
        return str(x.meta["source"])
    return default


def _source_path(x: ImageLike) -> Path | None:
    """The file an input was read from, if known."""
    if isinstance(x, (str, os.PathLike)):
        return Path(x)
    if isinstance(x, Volume) and x.meta.get("source"):
        return Path(str(x.meta["source"]))
    name = getattr(x, "get_filename", lambda: None)()
    return Path(name) if name else None


def as_volume(x: ImageLike, *, kind: str = "image", name: str = "image") -> Volume:
    """An input as a validated :class:`~slicreg.conventions.Volume` (``kind``: ``"image"`` float32 or
    ``"labels"`` integer), read like :func:`slicreg.io.load_volume` reads files.

    Raises:
        InputError: not a path, nibabel image or Volume; not 3-D; NaN/Inf; (labels) non-integer values.
    """
    from slicreg import io

    if isinstance(x, (str, os.PathLike)):
        return io.load_volume(x, kind=kind)  # type: ignore[arg-type]
    if isinstance(x, Volume):
        arr = np.asarray(x.array)
        where = _name(x, name)
    elif hasattr(x, "affine") and hasattr(x, "dataobj"):  # a nibabel spatial image
        arr = np.asanyarray(x.dataobj)
        while arr.ndim > 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        where = _name(x, name)
        x = Volume(arr, np.asarray(x.affine, dtype=np.float64), {"source": _source_path(x) and str(_source_path(x))})
    else:
        raise InputError(f"{name}: expected a file path, a nibabel image or a slicreg Volume, got "
                         f"{type(x).__name__} (a bare array has no affine)")
    if arr.ndim != 3:
        raise InputError(f"{where}: expected a 3-D (X, Y, Z) volume, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: unsupported voxel type {arr.dtype} (expected integer or float)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"{where}: {int(arr.size - np.count_nonzero(np.isfinite(arr)))} voxels are NaN or Inf "
                         f"(expected finite values)")
    if kind == "image":
        arr = arr.astype(np.float32, copy=False)
    elif kind == "labels":
        arr = io._as_integer_labels(arr, where)  # type: ignore[arg-type]
    return Volume(np.ascontiguousarray(arr), x.affine, dict(x.meta))


# ------------------------------------------------------------------------------------------------ result
@dataclass
class Registration:
    """A registration of a moving scan to a fixed scan, on the fixed scan's original grid.

    Attributes:
        disp_vox: ``(3, X, Y, Z)`` float32 on the fixed grid; ``x + disp_vox[:, x]`` is a voxel of the moving
            scan's grid (fixed -> moving, :mod:`slicreg.conventions`).
        fixed: the fixed scan (its grid: ``fixed.shape``, ``fixed.affine``).
        moving: the moving scan as registered (original grid).
        info: timings (``timings_s`` wall, ``cpu_s`` process CPU, per step), parameters and diagnostics
            (JSON-ready).
        affine_vox: ``(4, 4)`` fixed voxel -> moving voxel affine part (:func:`align` only, else None).
        moving_labels: labels given with the moving scan (on its grid), warped by :meth:`warp_labels`.
        device: where warps run.
        warp_backend: the sampler backend of :meth:`warp` (:func:`slicreg.fields.warp_image`): ``"grid_sample"``
            for :func:`register` (as ``slicreg register --out-warped``), ``"gather"`` (exact) for :func:`align`.
    """

    disp_vox: np.ndarray
    fixed: Volume
    moving: Volume
    info: dict[str, Any] = field(default_factory=dict)
    affine_vox: np.ndarray | None = None
    moving_labels: Volume | None = None
    device: str = "cpu"
    warp_backend: str = "gather"

    @property
    def shape(self) -> tuple[int, int, int]:
        """The fixed grid ``(X, Y, Z)``."""
        return self.fixed.shape

    @property
    def affine(self) -> np.ndarray:
        """The fixed grid's voxel -> world (mm) affine (4 x 4), the field's grid."""
        return self.fixed.affine

    @property
    def field(self) -> Volume:
        """The field as a :class:`Volume` ``(3, X, Y, Z)`` on the fixed grid."""
        return Volume(self.disp_vox, self.fixed.affine, {"units": "voxels of the moving grid, fixed -> moving"})

    def _on_moving_grid(self, x: ImageLike | np.ndarray, kind: str, what: str) -> Volume:
        from slicreg.checks import match_grid

        if isinstance(x, np.ndarray):
            if tuple(x.shape) != tuple(self.moving.shape):
                raise InputError(f"{what}: array of shape {x.shape}, expected the moving grid {self.moving.shape}")
            return as_volume(Volume(x, self.moving.affine), kind=kind, name=what)
        vol = as_volume(x, kind=kind, name=what)
        return match_grid(vol, self.moving, name=_name(x, what), reference_name=_name(self.moving, "moving"),
                          what=what, reference_what="moving image", tol_mm=1e-2)

    def warp(self, image: ImageLike | np.ndarray | None = None) -> Volume:
        """Warp an image on the moving grid (default: the registered moving scan) onto the fixed grid, trilinear.

        Returns a float32 :class:`Volume` ``(X, Y, Z)`` with the fixed affine (border padding)."""
        from slicreg.fields import warp_image

        vol = self.moving if image is None else self._on_moving_grid(image, "image", "image")
        out = warp_image(vol.array, self.disp_vox, device=self.device, backend=self.warp_backend)
        return Volume(np.asarray(out), self.fixed.affine)

    def warp_labels(self, labels: ImageLike | np.ndarray | None = None) -> Volume:
        """Warp a label map on the moving grid (default: the ``moving_labels`` given) onto the fixed grid, nearest.

        Returns a :class:`Volume` ``(X, Y, Z)`` of the labels' dtype, background (0) outside the moving grid."""
        from slicreg.fields import warp_labels

        if labels is None:
            if self.moving_labels is None:
                raise InputError("labels: none given, and none were given with the moving scan")
            vol = self.moving_labels
        else:
            vol = self._on_moving_grid(labels, "labels", "labels")
        return Volume(np.asarray(warp_labels(vol.array, self.disp_vox, device=self.device)), self.fixed.affine)

    def save(self, path: str | os.PathLike, *, format: str = "voxels", outputs: Any = None) -> list[Path]:
        """Write the field; returns the file(s) written.

        Args:
            path: the output file (``.nii`` / ``.nii.gz``; for ``"deeds"`` the stem).
            format: ``"voxels"`` (default: NIfTI ``(X, Y, Z, 3)`` float32, voxels, fixed -> moving, the fixed affine
                -- the Learn2Reg layout, exactly :func:`slicreg.io.save_field`) or another of
                :data:`slicreg.io.FIELD_FORMATS` (``"itk"``: millimetres in LPS+; ``"deeds"``).
            outputs: an :class:`slicreg.io.OutputSet` to publish the file(s) with other outputs (all or none).
        """
        from slicreg import io

        if format == "voxels":
            target = outputs.path(path) if outputs is not None else path
            io.save_field(self.disp_vox, self.fixed.affine, target)
            return [Path(path)]
        formats = getattr(io, "FIELD_FORMATS", ("voxels",))
        if format not in formats or not hasattr(io, "save_field_as"):
            raise InputError(f"format: expected one of {', '.join(formats)}, got {format!r}")
        return io.save_field_as(self.disp_vox, self.fixed.affine, self.moving.affine, path, format, outputs=outputs,
                                moving_shape=self.moving.shape)


# ------------------------------------------------------------------------------------------------ weights
def default_weights() -> Path:
    """The shipped bundle (:func:`slicreg.bundle.default_bundle_path`): installed with the package (a wheel carries
    it), or ``weights/slicreg-cohort-v3`` of the clone."""
    from slicreg.bundle import default_bundle_path

    return default_bundle_path()


def load_weights(path: str | Path | None, *, device: str = "cpu") -> Any:
    """Load and verify a weights bundle (the shipped one when ``path`` is None) for inference: its BatchNorm
    layers folded into the convolutions (:func:`slicreg.network.fold_batchnorm`); no cache.

    Raises:
        InputError: no such folder (with a hint when the shipped weights are missing), or any problem
            :func:`slicreg.bundle.load_bundle` finds (format, architecture, hashes, weights)."""
    from slicreg.bundle import load_bundle
    from slicreg.network import fold_batchnorm

    folder = Path(path).expanduser() if path else default_weights()
    if not folder.exists():
        hint = "" if path else " (the shipped weights are missing from this installation: reinstall slicreg, " \
                               "whose wheel carries them, or pass --weights with a bundle folder)"
        raise InputError(f"{folder}: weights bundle not found{hint}")
    bundle = load_bundle(folder, device=device)
    bundle_crop_shape(bundle)  # a bundle whose template grid cannot be a network input is unusable
    fold_batchnorm(bundle.model)  # inference only: one pass fewer over every activation
    return bundle


_BUNDLES: dict[tuple, Any] = {}
_BUNDLES_LOCK = threading.Lock()


def _bundle_key(folder: Path, device: str) -> tuple:
    """Folder, device and the model file's size and modification time (a rewritten bundle is loaded anew)."""
    try:
        st = (folder / "model.pt").stat()
        stamp: tuple = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = ()
    return str(folder.resolve()), str(device), stamp


def cached_weights(path: str | Path | None, *, device: str = "cpu") -> Any:
    """:func:`load_weights`, once per (folder, device) in a process: later calls return the same loaded bundle
    (its network stays in memory until :func:`clear_weights_cache`)."""
    folder = Path(path).expanduser() if path else default_weights()
    key = _bundle_key(folder, device)
    with _BUNDLES_LOCK:
        if key not in _BUNDLES:
            _BUNDLES[key] = load_weights(path, device=device)
        return _BUNDLES[key]


def clear_weights_cache() -> None:
    """Forget the bundles :func:`cached_weights` holds."""
    with _BUNDLES_LOCK:
        _BUNDLES.clear()


def bundle_crop_shape(bundle: Any) -> tuple[int, int, int]:
    """The preprocessed 2 mm grid of a bundle: twice its template supervoxel grid (192 x 160 x 256 normally)."""
    sv_shape = tuple(bundle.template_shape)
    shape = tuple(2 * s for s in sv_shape)
    if len(shape) != 3 or any(s % 8 for s in shape):
        raise InputError(f"{bundle.path}: template supervoxels on a {sv_shape} grid; the network needs a "
                         f"preprocessed grid (twice that) with sizes divisible by 8")
    return shape  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ geometry
@dataclass
class Prepared:
    """A scan ready for registration: the preprocessed image, its crop record and whether it was already so."""

    image: Volume  # on the preprocessed grid
    record: Any  # slicreg.geometry.CropRecord
    identity: bool  # True: the input was already preprocessed (no resampling or crop was needed)


def is_preprocessed(volume: Volume, crop_shape: tuple[int, int, int]) -> bool:
    """True for a 2 mm isotropic RAS volume of shape ``crop_shape`` (the output of ``slicreg preprocess``)."""
    import nibabel as nib

    return (tuple(volume.shape) == tuple(crop_shape) and np.allclose(volume.spacing_mm, 2.0, atol=1e-3)
            and "".join(nib.aff2axcodes(volume.affine)) == "RAS")


def preprocess_for_registration(volume: Volume, *, name: str, force: bool = False,
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
    from slicreg.geometry import (
        CROP_SHAPE,
        CropRecord,
        check_ct_like,
        preprocess_volume,
    )

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


def prepared_to_original_grid(disp_vox: np.ndarray, fixed: Prepared, moving: Prepared) -> np.ndarray:
    """A field between two prepared scans as the correspondence of the scans as given: ``(3, *fixed original
    shape)``, original fixed voxel -> original moving voxel (:func:`slicreg.geometry.field_to_original_grid`;
    unchanged when neither scan needed preprocessing)."""
    from slicreg.geometry import field_to_original_grid

    if fixed.identity and moving.identity:
        return disp_vox
    return field_to_original_grid(disp_vox, fixed.record, moving.record)


# ------------------------------------------------------------------------------------------------ atlas mode
def atlas_advice(pairwise: str) -> str:
    """What to do instead of atlas mode with a foreign template; ``pairwise`` says how to switch it off."""
    return (f"register pairwise instead ({pairwise}: the template then gets its own network pass), or train a "
            f"bundle on this template (pipelines/btcv.toml) and use atlas mode with that bundle")


def read_template_supervoxels(path: str | Path) -> tuple[np.ndarray, str | None, Path]:
    """Template supervoxels given explicitly: a ``supervoxels.nii.gz`` or a folder holding one (a ``supervoxels``
    stage's output). Returns ``(maps (16, X, Y, Z) uint8, sha256 of the image they were made on or None, file)``;
    the image's sha256 comes from the sidecar ``supervoxels.json`` beside the file."""
    from slicreg.bundle import _check_supervoxels
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


# ------------------------------------------------------------------------------------------------ register
def register_preprocessed(bundle: Any, fixed_hu: np.ndarray, moving_hu: np.ndarray, *, device: str = "cpu",
                          seed: int = 0, moving_is_template: bool = False, refine: bool = False,
                          refine_options: dict[str, Any] | None = None, network_dtype: Any = None,
                          template_supervoxels: np.ndarray | None = None, **flow_options: Any) -> Any:
    """One registration of two preprocessed scans ``(X, Y, Z)`` HU with a loaded bundle (atlas mode:
    ``template_supervoxels``, default the bundle's own; check with :func:`atlas_template` that the moving scan is
    that template).

    See :func:`slicreg.registration.register_preprocessed`; returns its
    :class:`~slicreg.registration.RegistrationResult` (field ``(3, X, Y, Z)`` on the preprocessed fixed grid)."""
    from slicreg.registration import register_preprocessed as register_maps

    template = None
    if moving_is_template:
        template = np.asarray(bundle.template_supervoxels.array if template_supervoxels is None
                              else template_supervoxels)
    return register_maps(bundle, np.asarray(fixed_hu, dtype=np.float32), np.asarray(moving_hu, dtype=np.float32),
                         template_supervoxels=template, moving_is_template=moving_is_template, device=device,
                         seed=seed, refine=refine, refine_options=refine_options, network_dtype=network_dtype,
                         **flow_options)


_REGISTER_NAMES = {"fixed": "fixed", "moving": "moving", "weights": "weights", "atlas": "atlas=True",
                   "drop_atlas": "atlas=False", "template_supervoxels": "template_supervoxels",
                   "refine_iterations": "refine_iterations", "moving_labels": "moving_labels"}


def _clocks() -> tuple[dict[str, float], dict[str, float], Any, Any]:
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(name: str, started: tuple[float, float]) -> None:
        wall[name] = wall.get(name, 0.0) + time.perf_counter() - started[0]
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - started[1]

    return wall, cpu, clock, stop


def register(fixed: ImageLike, moving: ImageLike, *, weights: str | Path | None = None, refine: bool = True,
             refine_iterations: int | None = None, atlas: bool = False,
             template_supervoxels: str | Path | None = None, moving_labels: ImageLike | None = None,
             device: str = "cpu", seed: int = 0, force: bool = False, fp32: bool = False,
             names: Mapping[str, str] | None = None) -> Registration:
    """Register two abdominal CTs by their predicted supervoxels (SLIC-Reg), from raw scans to a field on the
    fixed scan's own grid.

    Each scan is brought onto the network's grid (RAS, 2 mm, twice the bundle's template supervoxel grid:
    192 x 160 x 256 for the shipped weights; :func:`preprocess_for_registration`) unless it already is; the
    network predicts both scans' supervoxels, the keypoint flow and the thin-plate spline give the field on the
    preprocessed fixed grid (:func:`slicreg.registration.register_preprocessed`), optionally refined on MIND-SSC
    features inside both fields of view, and the field is mapped back to the scans as given
    (:func:`slicreg.geometry.field_to_original_grid`).

    Args:
        fixed, moving: the scans (paths, nibabel images or Volumes; HU, any orientation and spacing).
        weights: a weights bundle folder (default None: the shipped ``weights/slicreg-cohort-v3``). Loaded once
            per folder and device in a process (:func:`cached_weights`). A supervoxel bundle of either kind
            (DeepLab or U-Net) registers any pair; a displacement-regression bundle (the paper's Regression
            baseline, kind ``deeplab/displacement``) registers a scan to its template only (``atlas``): its network
            regresses the field, no supervoxels or flow (:func:`slicreg.registration.register_preprocessed`).
        refine: polish the supervoxel field by a short MIND-SSC instance optimisation (default; ~4 s on 2
            cores); ``False``: the supervoxel field alone (``slicreg register --fast``).
        refine_iterations: Adam steps per level of the refinement (default: the align engine's preset
            :data:`slicreg.registration.REFINE_PRESET` in :data:`slicreg.alignment.PRESETS`).
        atlas: the moving scan is the bundle's template (atlas mode: its own supervoxels, no network pass); refused
            for any other image (the moving scan must then be given as a file).
        template_supervoxels: with ``atlas``: template supervoxels made on ``moving`` (proves it is the template).
        moving_labels: a label map on the moving grid, checked before any work and warped by
            :meth:`Registration.warp_labels` (no argument).
        device: ``"cpu"`` or ``"cuda"``.
        seed: seed of the feature permutations (and random keypoints).
        force: accept images that do not look like CT.
        fp32: network passes in full precision (default: bf16 on CPU, fp16 on CUDA).
        names: how to name the arguments in error messages (a command passes its flags).

    Returns:
        :class:`Registration` with ``disp_vox (3, X, Y, Z)`` on the fixed grid, voxels of the moving grid, fixed ->
        moving; ``info``: ``timings_s`` / ``cpu_s`` per step (``load weights``, ``load images``, ``preprocess``,
        ``network fixed``, ``network moving``, ``keypoints``, ``features``, ``adam``, ``dense field``, ``refine``,
        ``map to original grid``), ``weights``, ``network_precision``, ``preprocessed_inputs``, ``flow`` (the
        flow's diagnostics and parameters).

    Raises:
        InputError: unreadable or non-CT inputs, a missing or corrupt bundle, atlas mode with a foreign template,
            labels on another grid.
    """
    n = {**_REGISTER_NAMES, **(names or {})}
    if refine_iterations is not None and int(refine_iterations) < 0:
        raise InputError(f"{n['refine_iterations']} {refine_iterations}: expected >= 0")
    if template_supervoxels is not None and not atlas:
        raise InputError(f"{n['template_supervoxels']} {template_supervoxels}: used only with {n['atlas']}")
    fixed_name, moving_name = _name(fixed, n["fixed"]), _name(moving, n["moving"])
    wall, cpu, clock, stop = _clocks()

    t = clock()
    bundle = cached_weights(weights, device=device)
    crop_shape = bundle_crop_shape(bundle)
    if bundle.kind.target == "displacement" and not atlas:  # the Regression baseline: scan -> its template only
        from slicreg.bundle import displacement_atlas_problem

        raise InputError(f"{n['weights']} {displacement_atlas_problem(bundle)}; use {n['atlas']} with that template "
                         f"as {n['moving']}")
    template_sv = None
    if atlas:  # before any work: atlas mode with a template the bundle was not trained on gives a wrong field
        source = _source_path(moving)
        if source is None:
            raise InputError(f"{n['atlas']}: the moving scan must be given as its file (the template is recognised "
                             f"by the file's sha256)")
        template_sv, problem = atlas_template(bundle, source, template_supervoxels)
        if problem is not None:
            raise InputError(f"{n['atlas']} refused for {n['moving']} {moving_name}: {problem}; "
                             f"{atlas_advice(n['drop_atlas'])}")
    stop("load weights", t)

    t = clock()
    fixed_v = as_volume(fixed, kind="image", name=n["fixed"])
    moving_v = as_volume(moving, kind="image", name=n["moving"])
    labels_v = None
    if moving_labels is not None:
        labels_v = as_volume(moving_labels, kind="labels", name=n["moving_labels"])
        if not moving_v.same_grid(labels_v, atol_mm=1e-2):
            raise InputError(f"{n['moving_labels']} {_name(moving_labels, 'labels')}: label grid {labels_v.shape} "
                             f"(affine {np.round(labels_v.affine, 3).tolist()}) does not match the moving image's "
                             f"{moving_v.shape} (affine {np.round(moving_v.affine, 3).tolist()})")
    stop("load images", t)

    t = clock()
    fixed_p = preprocess_for_registration(fixed_v, name=fixed_name, force=force, crop_shape=crop_shape)
    moving_p = preprocess_for_registration(moving_v, name=moving_name, force=force, crop_shape=crop_shape)
    stop("preprocess", t)

    import torch

    refine_options = {} if refine_iterations is None else {"iterations": int(refine_iterations)}
    # the refinement compares only inside each scan's field of view (not in the preprocessing's padding)
    masks = {f"{side}_mask": None if prep.identity else prep.record.fov_mask()
             for side, prep in (("fixed", fixed_p), ("moving", moving_p))}
    result = register_preprocessed(bundle, fixed_p.image.array, moving_p.image.array, device=device, seed=seed,
                                   moving_is_template=atlas, refine=refine, refine_options=refine_options,
                                   network_dtype=torch.float32 if fp32 else None, template_supervoxels=template_sv,
                                   **masks)
    wall.update(result.info["timings_s"])
    cpu.update(result.info["cpu_s"])

    t = clock()
    disp = prepared_to_original_grid(result.disp_vox, fixed_p, moving_p)
    stop("map to original grid", t)
    info = {
        "fixed": fixed_name, "moving": moving_name, "weights": str(bundle.path), "kind": str(bundle.kind),
        "atlas": bool(atlas),
        "refine": bool(refine), "device": device,
        "network_precision": "fp32" if fp32 else ("bf16" if device == "cpu" else "fp16"),
        "preprocessed_inputs": {"fixed": fixed_p.identity, "moving": moving_p.identity},
        "timings_s": wall, "cpu_s": cpu,
        "flow": {k: v for k, v in result.info.items() if k not in ("timings_s", "cpu_s")},
    }
    return Registration(disp_vox=np.asarray(disp, dtype=np.float32), fixed=fixed_v, moving=moving_v, info=info,
                        moving_labels=labels_v, device=device, warp_backend="grid_sample")


# ------------------------------------------------------------------------------------------------ align
_ALIGN_NAMES = {"fixed_fov": "fixed_fov", "moving_fov": "moving_fov"}


@dataclass
class AlignInputs:
    """Two scans checked and put into one axis order for :func:`run_align` (made by :func:`prepare_align`).

    Attributes:
        fixed, moving: the scans as given; ``moving_r``: the moving scan permuted / flipped (lossless) to the fixed
            scan's axis order, the array the engine registers.
        to_moving: ``(4, 4)`` reoriented moving voxel -> original moving voxel.
        fixed_mask, moving_mask: fields of view ``(X, Y, Z)`` bool (``moving_mask`` on ``moving_r``) or None.
        init_disp: starting field ``(3, X, Y, Z)`` into ``moving_r``'s voxels, or None.
        moving_labels: labels on the moving grid (reoriented to it if needed), or None.
    """

    fixed: Volume
    moving: Volume
    moving_r: Volume
    to_moving: np.ndarray
    fixed_mask: np.ndarray | None = None
    moving_mask: np.ndarray | None = None
    init_disp: np.ndarray | None = None
    moving_labels: Volume | None = None

    @property
    def reoriented(self) -> bool:
        """True when the moving scan is registered in another axis order than it is stored in."""
        return self.moving_r is not self.moving

    @property
    def start_offset_mm(self) -> float | None:
        """World distance (mm) of the two grid centres, which the engine's affine stage starts on top of each
        other (it takes no initial affine); None when a starting field is given."""
        if self.init_disp is not None:
            return None
        c_f = self.fixed.affine @ np.append((np.asarray(self.fixed.shape) - 1) / 2.0, 1.0)
        c_m = self.moving_r.affine @ np.append((np.asarray(self.moving_r.shape) - 1) / 2.0, 1.0)
        return float(np.linalg.norm((c_f - c_m)[:3]))


def prepare_align(fixed: ImageLike, moving: ImageLike, *, fixed_fov: str | Path | None = None,
                  moving_fov: str | Path | None = None, init_field: ImageLike | None = None,
                  moving_labels: ImageLike | None = None, force: bool = False,
                  names: Mapping[str, str] | None = None) -> AlignInputs:
    """Read and check the inputs of :func:`run_align` (the world-space handling of ``slicreg align``).

    Both scans must look like CT (unless ``force``) and have the same voxel size once the moving scan is permuted /
    flipped to the fixed scan's axis order (lossless, :func:`slicreg.checks.reorient_like`).

    Args:
        fixed, moving: the scans (paths, nibabel images or Volumes, HU).
        fixed_fov, moving_fov: fields of view: a crop record ``*.json`` or a mask file on that scan's grid
            (:func:`slicreg.geometry.load_fov_mask`).
        init_field: a starting field on the fixed grid (voxels of the moving scan as stored, fixed -> moving).
        moving_labels: a label map on the moving grid (the same grid in another axis order is reoriented).
        force: accept images that do not look like CT.
        names: how to name the arguments in error messages.

    Raises:
        InputError: unreadable or non-CT scans, different voxel sizes, masks or fields on other grids.
    """
    from slicreg.checks import (
        apply_index_map_to_field,
        axcodes,
        check_ct_like,
        match_grid,
        orientation_index_map,
        reorient_like,
    )
    from slicreg.geometry import load_fov_mask

    n = {**_ALIGN_NAMES, **(names or {})}
    fixed_name, moving_name = _name(fixed, "fixed"), _name(moving, "moving")
    fixed_v = as_volume(fixed, kind="image", name="fixed")
    check_ct_like(fixed_v.array, name=fixed_name, force=force)
    moving_v = as_volume(moving, kind="image", name="moving")
    check_ct_like(moving_v.array, name=moving_name, force=force)
    # the registration runs on the moving image permuted / flipped to the fixed image's axis order (lossless), so
    # that both arrays run along the same world axes; the field is mapped back to the original moving array
    to_moving = orientation_index_map(moving_v, fixed_v.affine)  # reoriented moving voxel -> original moving voxel
    moving_r = reorient_like(moving_v, fixed_v.affine)
    sp_f, sp_m = fixed_v.spacing_mm, moving_r.spacing_mm
    if not np.allclose(sp_f, sp_m, rtol=1e-3, atol=1e-3):
        raise InputError(f"{moving_name}: voxel size {np.round(sp_m, 4).tolist()} mm (in the fixed image's axis "
                         f"order {axcodes(fixed_v.affine)}; the file is {axcodes(moving_v.affine)}) differs from the "
                         f"fixed image {fixed_name}'s {np.round(sp_f, 4).tolist()} mm; resample both to one voxel "
                         f"size first")
    labels = None
    if moving_labels is not None:
        labels = match_grid(as_volume(moving_labels, kind="labels", name="moving_labels"), moving_v,
                            name=_name(moving_labels, "moving_labels"), reference_name=moving_name, what="labels",
                            reference_what="moving image", tol_mm=1e-2)
    fixed_mask = load_fov_mask(fixed_fov, fixed_v.shape, n["fixed_fov"]) if fixed_fov else None
    moving_mask = None
    if moving_fov:
        mask = load_fov_mask(moving_fov, moving_v.shape, n["moving_fov"])
        moving_mask = reorient_like(Volume(mask, moving_v.affine), fixed_v.affine).array
    init = None
    if init_field is not None:
        from slicreg.io import load_field

        if isinstance(init_field, (str, os.PathLike)):
            disp0 = load_field(init_field, fixed=fixed_v).array
        else:
            disp0 = _field_on_grid(init_field, fixed_v, "init_field")
        # the field's targets are original moving voxels; the engine works with the reoriented moving array
        init = apply_index_map_to_field(disp0, np.linalg.inv(to_moving))
    return AlignInputs(fixed=fixed_v, moving=moving_v, moving_r=moving_r, to_moving=to_moving,
                       fixed_mask=fixed_mask, moving_mask=moving_mask, init_disp=init, moving_labels=labels)


def run_align(inputs: AlignInputs, *, preset: str = "abdomen-ct", device: str = "cpu", seed: int = 0,
              progress: bool = False) -> Registration:
    """Register prepared scans with the built-in toolkit (:func:`slicreg.alignment.register_pair`) and map the field
    back to the moving scan as stored.

    Returns:
        :class:`Registration`: ``disp_vox (3, X, Y, Z)`` on the fixed grid into the moving file's own voxels,
        ``affine_vox`` (fixed voxel -> moving file voxel), ``info`` the engine's (``seconds``, ``stages``,
        ``iterations``, ``final_loss``, ``folding_fraction``, ``fov``, the resolved preset, ...).
    """
    from slicreg.alignment import register_pair
    from slicreg.checks import apply_index_map_to_field

    result = register_pair(inputs.fixed.array, inputs.moving_r.array, fixed_mask=inputs.fixed_mask,
                           moving_mask=inputs.moving_mask, init_disp=inputs.init_disp,
                           spacing_mm=tuple(float(s) for s in inputs.fixed.spacing_mm), preset=preset, device=device,
                           seed=seed, progress=progress)
    # back to the original moving array: x + u(x) is a voxel of the moving scan as stored
    disp = apply_index_map_to_field(result.disp_vox, inputs.to_moving)
    return Registration(disp_vox=disp, fixed=inputs.fixed, moving=inputs.moving, info=result.info,
                        affine_vox=inputs.to_moving @ result.affine_vox, moving_labels=inputs.moving_labels,
                        device=device, warp_backend="gather")


def align(fixed: ImageLike, moving: ImageLike, *, preset: str = "abdomen-ct", fixed_fov: str | Path | None = None,
          moving_fov: str | Path | None = None, init_field: ImageLike | None = None,
          moving_labels: ImageLike | None = None, device: str = "cpu", seed: int = 0, force: bool = False,
          progress: bool = False) -> Registration:
    """Register two CTs with the built-in toolkit (affine + deformable; :data:`slicreg.alignment.PRESETS`) in world
    coordinates: :func:`prepare_align` then :func:`run_align` (see both for the arguments and the result)."""
    inputs = prepare_align(fixed, moving, fixed_fov=fixed_fov, moving_fov=moving_fov, init_field=init_field,
                           moving_labels=moving_labels, force=force)
    return run_align(inputs, preset=preset, device=device, seed=seed, progress=progress)


# ------------------------------------------------------------------------------------------------ evaluate
def check_label_map(volume: Volume, path: str) -> None:
    """Reject label maps that cannot be organ labels (negative ids, or an image passed by mistake)."""
    arr = volume.array
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"{path}: label ids must be >= 0, got minimum {int(arr.min())} "
                         f"(is this an intensity image rather than a label map?)")
    n = int(np.unique(arr).size)
    if n > 1000:
        raise InputError(f"{path}: {n} distinct values, expected a label map with few ids "
                         f"(is this an intensity image rather than a label map?)")


def labels_in_world(moving: Volume, fixed: Volume, *, moving_name: str, fixed_name: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Moving labels resampled onto the fixed grid by world coordinates: the unregistered pair in world space.

    Args:
        moving, fixed: label :class:`~slicreg.conventions.Volume` objects (``(X', Y', Z')`` and ``(X, Y, Z)``, any
            orientations, spacings and origins).
        moving_name, fixed_name: their files, for messages.

    Returns:
        ``(warped, disp)``: ``warped`` ``(X, Y, Z)`` (moving dtype), the moving label at the nearest moving voxel
        of each fixed voxel's world position, background (0) outside the moving grid -- exactly
        ``scipy.ndimage.map_coordinates(..., order=0, mode="constant")`` at ``x + disp(x)``; ``disp``
        ``(3, X, Y, Z)`` float32, the world identity as a field (fixed voxel -> moving voxel).

    Raises:
        InputError: the two grids do not overlap in world space.
    """
    from slicreg.checks import grid_description
    from slicreg.conventions import identity_grid_vox
    from slicreg.metrics import warp_labels_learn2reg

    index_map = np.linalg.inv(moving.affine) @ fixed.affine  # fixed voxel -> moving voxel
    grid = identity_grid_vox(fixed.shape, dtype=np.float64)
    disp = np.einsum("ab,b...->a...", index_map[:3, :3], grid)
    disp += index_map[:3, 3, None, None, None]
    disp -= grid
    # snap displacements within 1e-6 voxels of an integer (a pure axis permutation / flip / whole-voxel shift) to
    # it, so that nearest-neighbour sampling is exact there and not at the mercy of rounding
    near = np.round(disp)
    np.copyto(disp, near, where=np.abs(disp - near) < 1e-6)
    del near
    inside = np.ones(fixed.shape, dtype=bool)
    for a in range(3):
        pos = grid[a] + disp[a]
        inside &= (pos >= 0) & (pos <= moving.shape[a] - 1)
    if not inside.any():
        raise InputError(f"grids do not overlap: no voxel of the fixed labels {fixed_name} "
                         f"({grid_description(fixed)}) lies inside the moving labels {moving_name} "
                         f"({grid_description(moving)}) in world space")
    warped = warp_labels_learn2reg(moving.array, disp)
    return warped.astype(moving.array.dtype, copy=False), disp.astype(np.float32)


def _field_on_grid(x: Any, fixed: Volume, what: str) -> np.ndarray:
    """A field given as a :class:`Registration`, a Volume ``(3, X, Y, Z)`` or an array, checked against
    ``fixed``'s grid -> ``(3, X, Y, Z)``."""
    from slicreg.checks import same_grid

    if isinstance(x, Registration):
        x = x.field
    if isinstance(x, Volume):
        if not same_grid(Volume(np.zeros(x.shape, np.uint8), x.affine), fixed):
            raise InputError(f"{what}: the field's grid ({x.shape}) is not the fixed grid ({fixed.shape})")
        arr = np.asarray(x.array)
    else:
        arr = np.asarray(x)
    if arr.shape != (3, *fixed.shape):
        raise InputError(f"{what}: expected a field of shape {(3, *fixed.shape)}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what}: the field has NaN or Inf values")
    return arr


_EVALUATE_NAMES = {"labels": "labels", "mask": "mask", "gt_field": "gt_field"}


@dataclass
class Evaluation:
    """Scores of one registration (:func:`evaluate`).

    Attributes:
        scores: :func:`slicreg.metrics.evaluate_pair`'s result: per-label Dice (Learn2Reg and reference), HD95,
            ``jacobian`` statistics (or None), ``field_error`` in mm (or None), means.
        notes: what was done beyond the plain scoring (e.g. the unregistered pair resampled in world space).
        fixed: the fixed labels (their grid is the scores' grid).
    """

    scores: dict[str, Any]
    notes: list[str]
    fixed: Volume


def evaluate(fixed_labels: ImageLike, moving_labels: ImageLike, field: Any = None, *,
             labels: Iterable[int] = range(1, 14), gt_field: Any = None, mask: ImageLike | None = None,
             hd95: bool = True, names: Mapping[str, str] | None = None) -> Evaluation:
    """Score a registration the Learn2Reg way: warp the moving labels with the field (nearest, as Learn2Reg),
    Dice / HD95 per organ, Jacobian statistics and, with ``gt_field``, the field error in mm.

    Args:
        fixed_labels, moving_labels: label maps (paths, nibabel images or Volumes; integer ids >= 0).
        field: ``(3, X, Y, Z)`` voxels, fixed -> moving, on the fixed grid: a file, a Volume, an array or a
            :class:`Registration`. None: score the unregistered pair (labels on different grids are resampled
            onto the fixed grid by world coordinates, :func:`labels_in_world`).
        labels: ids to score (default 1..13, the BTCV organs).
        gt_field: the true field (same layout), for the field error.
        mask: a mask on the fixed grid (non-zero = inside) restricting the field error; needs ``gt_field``.
        hd95: compute HD95 (surface distances).
        names: how to name the arguments in error messages.

    Raises:
        InputError: not label maps, none of ``labels`` present, a field or mask on another grid, ``mask``
            without ``gt_field``.
    """
    from slicreg.checks import grid_description, match_grid, same_grid
    from slicreg.io import load_field, load_volume
    from slicreg.metrics import evaluate_pair, warp_labels_learn2reg

    n = {**_EVALUATE_NAMES, **(names or {})}
    labels = sorted(int(v) for v in labels)
    fixed_name, moving_name = _name(fixed_labels, "fixed_labels"), _name(moving_labels, "moving_labels")
    fixed = as_volume(fixed_labels, kind="labels", name="fixed_labels")
    check_label_map(fixed, fixed_name)
    moving = as_volume(moving_labels, kind="labels", name="moving_labels")
    check_label_map(moving, moving_name)
    notes: list[str] = []
    present = set(np.unique(fixed.array).tolist()) | set(np.unique(moving.array).tolist())
    if not present & set(labels):
        raise InputError(f"{n['labels']}: none of the ids {labels[:13]}{' ...' if len(labels) > 13 else ''} "
                         f"occurs in {fixed_name} or {moving_name} (they hold "
                         f"{sorted(present - {0})[:20]}); choose ids that are in the label maps")

    def as_field(x: Any, what: str) -> np.ndarray:
        if isinstance(x, (str, os.PathLike)):
            # on the fixed grid (shape and affine), or refused; an ITK field (mm) is converted on the moving grid
            return load_field(x, fixed=fixed, moving=moving).array
        return _field_on_grid(x, fixed, what)

    disp = None
    world_disp = None  # without a field, on differing grids: the world identity as a voxel field
    if field is not None:
        disp = as_field(field, "field").astype(np.float64)
        warped = warp_labels_learn2reg(moving.array, disp)
    elif same_grid(moving, fixed):
        warped = moving.array
    else:
        warped, world_disp = labels_in_world(moving, fixed, moving_name=moving_name, fixed_name=fixed_name)
        notes.append(f"note: the moving labels ({grid_description(moving)}) were resampled onto the fixed grid "
                     f"({grid_description(fixed)}) by world coordinates (nearest, background outside)")
    true_disp = None
    if gt_field is not None:
        true_disp = as_field(gt_field, "gt_field")
        if world_disp is not None:
            # the unregistered pair's correspondence is the world identity, not the zero voxel field that
            # evaluate_pair assumes without a field: score it as the error of that field
            true_disp = true_disp - world_disp
    error_mask = None
    if mask is not None:
        if gt_field is None:
            raise InputError(f"{n['mask']} restricts the field error and needs {n['gt_field']}")
        mask_vol = as_volume(mask, kind="any", name="mask") if not isinstance(mask, (str, os.PathLike)) \
            else load_volume(mask)
        mask_vol = match_grid(mask_vol, fixed, name=_name(mask, "mask"), reference_name=fixed_name, what="mask",
                              reference_what="fixed labels")
        error_mask = mask_vol.array != 0
    scores = evaluate_pair(fixed.array, moving.array, warped, disp_vox=disp, labels=labels, affine=fixed.affine,
                           true_disp_vox=true_disp, error_mask=error_mask, hd95=hd95)
    return Evaluation(scores=scores, notes=notes, fixed=fixed)
