"""slicreg beside the registration tools its users know: the same pairs, inputs, metrics and threads.

Every method registers the same test -> template pairs of a preprocessed dataset folder (docs/CONTRACTS.md;
fixed = test subject, moving = the template, both 2 mm, 192 x 160 x 256) and returns a field in the project's
convention ``(3, X, Y, Z)``, voxels of the fixed grid, fixed -> moving (``warped(p) = moving(p + u(p))``). Every
field is then scored here by :mod:`slicreg.metrics` exactly as the ``evaluate`` stage scores it: Dice
(Learn2Reg definition) over the 13 BTCV organs and the 4 large organs, HD95 (mm), SDlogJ, % folding
(det J <= 0) and the error against the cohort's ground-truth field (mm, inside the fixed scan's body).

Methods (``--peers``, default all):

============== ===================== =========================================================================
name           from                  settings (``PEERS``)
============== ===================== =========================================================================
ants           antspyx (PyPI)        ``ants.registration(type_of_transform="SyN")``: centre-of-mass start,
                                     affine + SyN, package defaults (Mattes MI, SyN iterations 40x20x0), on
                                     HU + 1024 clipped at 0 (with air at -1000 HU the intensity centre of mass
                                     is meaningless and SyN started from it failed on a cohort pair)
convexadam     convexadam (PyPI)     ``convex_adam_pt`` package defaults: MIND-SSC (r 1, d 2), grid 6,
                                     search +-4, inverse-consistent, 80 Adam iterations, lambda 1.25, fp32
greedy         picsl-greedy (PyPI)   12-dof affine (NMI, image centres, 100x50x10) then deformable
                                     (NCC 2x2x2, 100x50x10, ``-s 2.0vox 0.5vox``)
elastix        itk-elastix (PyPI)    elastix default ``affine`` + ``bspline`` parameter maps (Mattes MI,
                                     4 resolutions, 256 iterations each, final B-spline grid 10 mm)
deeds          binaries (not on a    ``linearBCV`` then ``deedsBCV`` with defaults, read back with
               registry)             :func:`slicreg.deeds.read_deeds`
slicreg-align  this repository       :func:`slicreg.alignment.register_pair`, preset ``abdomen-ct``
slicreg        this repository       :func:`slicreg.registration.register_preprocessed` with a trained weights
                                     bundle (``--slicreg-bundle``); atlas mode when the moving scan is the
                                     template (the bundle's template supervoxels stand for it)
============== ===================== =========================================================================

How a method is run: each (method, pair) is one child process ``python benchmarks/peers.py --run-peer ...``
(this file is also the runner; it needs only numpy, nibabel and the tool), started with 2 threads everywhere
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``,
``torch.set_num_threads``, greedy ``-threads``; elastix gets no ``number_of_threads`` argument, which segfaults
with 2, only the environment variable). A Python peer runs in the project's venv if it is importable there,
otherwise in the peers venv (``--peers-python``, default ``$SLICREG_PEERS_PYTHON`` or ``../peers-venv`` next
to the repository; see benchmarks/README.md for how it is made: antspyx needs numpy < 2.4 and scipy < 1.16, and
no peer may pull another torch into the project's venv). The reported wall time per pair is that of the child:
interpreter start, imports, reading the preprocessed NIfTI files, the registration, converting and writing the
field; the CPU time and the peak RSS are the child's own (``os.wait4``); ``registration_s`` is the tool call
alone, as the child measured it.

Inputs the tools see: the preprocessed arrays. The ITK-based tools (ANTs, greedy, elastix) get float32 copies
of both images with the *fixed* image's header, so every method starts from the same voxel-to-voxel
correspondence as slicreg (the preprocessed grids are each centred on their own body) and their own initialisers
(centre of mass, image centres) work from there; ConvexAdam takes the arrays; deeds reads the preprocessed files
as they are (it ignores headers anyway). Conversions to the project convention: ITK tools return physical
displacements ``d`` (LPS, mm) at the fixed voxel centres, so ``u = L^-1 diag(-1, -1, 1) d`` with ``L`` the
linear part of the shared voxel -> RAS affine; ConvexAdam returns ``(X, Y, Z, 3)`` voxel displacements, fixed ->
moving, which is the convention already; deeds' files go through :mod:`slicreg.deeds`.

Every conversion is checked before it is trusted (on by default; ``--no-check`` reuses the last verdicts):
each available method registers a small synthetic pair (48 x 42 x 54, anisotropic voxels 1.5 x 2 x 2.5 mm, the
first axis stored flipped) whose moving image is the fixed one moved by a known shift of (3, -2, 4) voxels plus
smooth sine modes of 1.5-2 voxels (|u| about 5.3 voxels); the returned field must match the true one within 1
voxel on average over the body, which a wrong sign, axis order, unit or composition order cannot. On every pair,
the ITK tools' fields are also checked against the tool's own warped image (``tool_agreement``: the moving image
warped with the converted field minus the image the tool resampled itself; interpolation-level differences
only). A method that fails is still run but flagged.

Outputs (``--out``, default benchmarks/results/peers/): ``peers.json`` (machine, date, settings, every pair's
scores and costs, the conversion checks, the methods that could not run and why), ``peers.md`` (the table),
``peers.png`` (accuracy against time); in ``--fields-dir`` (default ``$TMPDIR/slicreg-peers-fields``, outside the
repository: ~25 MB per field) ``<dataset key>/<method>/`` with the fields, per-pair records and logs and a
``registrations.json`` that the ``evaluate`` stage reads. A (method, pair) whose field and records exist, made by
the same tool version, settings, threads and seed, is not run again unless ``--force``.

    nice -n 19 .venv/bin/python benchmarks/peers.py --dataset /tmp/demo1/prep/current --pairs 3
    .venv/bin/python benchmarks/peers.py --list            # which methods can run here, and where
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import repo_relative

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "peers"
DEFAULT_PEERS_VENV = REPO.parent / "peers-venv"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
CHECK_SHIFT_VOX = (3.0, -2.0, 4.0)
CHECK_SHAPE = (48, 42, 54)
CHECK_AFFINE = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, 2.0, 0.0, -30.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])
CHECK_TOLERANCE_VOX = 1.0

PEERS: dict[str, dict[str, str]] = {
    "ants": {"label": "ANTs SyN", "kind": "python", "module": "ants", "dist": "antspyx",
             "settings": "antspyx registration(type_of_transform='SyN'): centre-of-mass start, affine + SyN, "
                         "package defaults (Mattes MI, SyN iterations 40x20x0); intensities HU + 1024 clipped at 0 "
                         "(air = 0) so that the centre of mass is the body's"},
    "convexadam": {"label": "ConvexAdam", "kind": "python", "module": "convexAdam", "dist": "convexadam",
                   "settings": "convex_adam_pt package defaults: MIND-SSC r1 d2, grid 6, search +-4, inverse "
                               "consistent, 80 Adam iterations at grid 2, lambda 1.25, fp32"},
    "greedy": {"label": "greedy", "kind": "python", "module": "picsl_greedy", "dist": "picsl-greedy",
               "settings": "affine 12 dof (NMI, image centres, 100x50x10) + deformable (NCC 2x2x2, 100x50x10, "
                           "-s 2.0vox 0.5vox)"},
    "elastix": {"label": "elastix", "kind": "python", "module": "itk", "dist": "itk-elastix",
                "settings": "default 'affine' + 'bspline' parameter maps (Mattes MI, 4 resolutions, 256 "
                            "iterations, final grid 10 mm)"},
    "deeds": {"label": "deeds", "kind": "binary", "module": "", "dist": "",
              "settings": "linearBCV + deedsBCV, defaults (-G 8x7x6x5x4, -a 1.6); grid spacing 4 when read back"},
    "slicreg-align": {"label": "slicreg align", "kind": "slicreg", "module": "slicreg.alignment", "dist": "slicreg",
                      "settings": "slicreg.alignment.register_pair, preset abdomen-ct (built-in, no network), the crop "
                                  "records' fields of view as masks"},
    "slicreg": {"label": "slicreg", "kind": "slicreg", "module": "slicreg.registration", "dist": "slicreg",
                "settings": "slicreg.registration.register_preprocessed, trained bundle, atlas mode (template's own "
                            "supervoxels), flow defaults"},
    "slicreg-refine": {"label": "slicreg (default: + refine)", "kind": "slicreg", "module": "slicreg.registration",
                       "dist": "slicreg",
                       "settings": "as slicreg, then slicreg.registration.refine_field (the align engine's preset "
                                   "'refine') with the crop records' fields of view as masks: `slicreg register`'s "
                                   "default (`--fast` is the row 'slicreg')"},
}
DEEDS_BINARIES = ("linearBCV", "deedsBCV")


# ============================================================================================ runner side
# Everything in this section runs in the child process, possibly in the peers venv: numpy, nibabel and the
# tool only (slicreg is imported only by the slicreg and deeds runners, which run in the project's venv).

def _save_field_xyz3(disp_vox: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``(3, X, Y, Z)`` voxels as NIfTI ``(X, Y, Z, 3)`` float32 with ``affine``, atomically."""
    import nibabel as nib

    data = np.ascontiguousarray(np.moveaxis(np.asarray(disp_vox, dtype=np.float32), 0, -1))
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_intent("vector", (), "disp_vox_f2m")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _load_pair_arrays(fixed_path: Path, moving_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import nibabel as nib

    f = nib.load(str(fixed_path))
    m = nib.load(str(moving_path))
    return (np.asarray(f.dataobj, dtype=np.float32), np.asarray(m.dataobj, dtype=np.float32),
            np.asarray(f.affine, dtype=np.float64))


def _shared_header_files(fixed: np.ndarray, moving: np.ndarray, affine: np.ndarray, work: Path
                         ) -> tuple[Path, Path]:
    """float32 NIfTI copies of both images, both with the fixed image's affine (see the module docstring)."""
    import nibabel as nib

    paths = []
    for name, arr in (("fixed", fixed), ("moving", moving)):
        img = nib.Nifti1Image(np.ascontiguousarray(arr, dtype=np.float32), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        path = work / f"{name}.nii.gz"
        nib.save(img, str(path))
        paths.append(path)
    return paths[0], paths[1]


def lps_displacement_to_vox(disp_lps_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ITK physical displacements at the fixed voxel centres -> project field (moving shares the fixed header).

    Args:
        disp_lps_mm: ``(X, Y, Z, 3)``: ``moving_point_lps = fixed_point_lps + d`` in mm (ITK's LPS frame).
        affine: the shared ``(4, 4)`` voxel -> RAS matrix of both images.

    Returns:
        ``(3, X, Y, Z)`` float32, voxels, fixed -> moving: ``u = L^-1 diag(-1, -1, 1) d``.
    """
    d = np.asarray(disp_lps_mm, dtype=np.float64)
    if d.ndim != 4 or d.shape[-1] != 3:
        raise ValueError(f"expected a displacement field (X, Y, Z, 3), got {d.shape}")
    lin_inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3]) @ np.diag([-1.0, -1.0, 1.0])
    return np.einsum("ab,xyzb->axyz", lin_inv, d).astype(np.float32)


def _vector_image_xyz3(data: np.ndarray) -> np.ndarray:
    """NIfTI vector images are stored (X, Y, Z, 1, 3) by ITK; return (X, Y, Z, 3)."""
    data = np.asarray(data)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"expected a 3-D vector image, got shape {data.shape}")
    return data


def agreement_with_tool(fixed: np.ndarray, moving: np.ndarray, disp_vox: np.ndarray, tool_warped: np.ndarray, *,
                        body_above: float) -> dict[str, float]:
    """Does the converted field reproduce the tool's own warped image? (a check of the conversion on every pair)

    The moving image is warped with ``disp_vox`` (trilinear, ``scipy.ndimage.map_coordinates``) and compared with
    the image the tool resampled itself, over the fixed body (``fixed > body_above``) where the field points
    inside the moving grid. A wrong sign, axis order, unit or composition order gives differences of the order
    of the image contrast (hundreds of HU); a right conversion leaves only interpolation differences.

    Returns:
        ``mad_vs_tool`` (mean absolute difference), ``p99_vs_tool``, and ``mad_tool_vs_fixed`` (the tool's own
        residual, for scale), all in the images' intensity units; ``n_voxels``.
    """
    from scipy.ndimage import map_coordinates

    coords = np.indices(fixed.shape, dtype=np.float32) + disp_vox
    ours = map_coordinates(moving, coords, order=1, mode="nearest")
    inside = np.all([(c >= 0) & (c <= n - 1) for c, n in zip(coords, moving.shape)], axis=0)
    mask = inside & (fixed > body_above)
    diff = np.abs(ours - tool_warped)[mask]
    if diff.size == 0:
        return {"mad_vs_tool": float("nan"), "p99_vs_tool": float("nan"), "mad_tool_vs_fixed": float("nan"),
                "n_voxels": 0}
    return {"mad_vs_tool": float(diff.mean()), "p99_vs_tool": float(np.percentile(diff, 99)),
            "mad_tool_vs_fixed": float(np.abs(tool_warped - fixed)[mask].mean()), "n_voxels": int(mask.sum())}


def run_ants(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """ANTs SyN via antspyx; returns ``(disp_vox, fixed_affine, info)``."""
    import ants

    fixed, moving, affine = _load_pair_arrays(fixed_path, moving_path)
    # air = 0: the default initialisation aligns the intensity centres of mass, which with HU (air = -1000,
    # negative weights) lands anywhere; the shift changes neither Mattes MI nor CC
    fixed, moving = (np.maximum(a + np.float32(1024.0), 0.0) for a in (fixed, moving))
    f_file, m_file = _shared_header_files(fixed, moving, affine, work)
    f_img, m_img = ants.image_read(str(f_file)), ants.image_read(str(m_file))
    kwargs: dict[str, Any] = {"type_of_transform": "SyN", "random_seed": seed, "outprefix": str(work / "ants_")}
    if quick:
        kwargs.update(reg_iterations=(20, 10, 0), aff_iterations=(100, 50, 0, 0))
    t0 = time.perf_counter()
    reg = ants.registration(f_img, m_img, **kwargs)
    composed = ants.apply_transforms(fixed=f_img, moving=m_img, transformlist=reg["fwdtransforms"],
                                     compose=str(work / "ants_composed_"))
    seconds = time.perf_counter() - t0
    disp = lps_displacement_to_vox(_vector_image_xyz3(ants.image_read(str(composed)).numpy()), affine)
    t1 = time.perf_counter()
    check = agreement_with_tool(fixed, moving, disp, reg["warpedmovout"].numpy(), body_above=1024.0 - 500.0)
    return disp, affine, {"registration_s": seconds, "transforms": [Path(t).name for t in reg["fwdtransforms"]],
                          "tool_agreement": check, "check_s": time.perf_counter() - t1}


def run_greedy(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """greedy via picsl-greedy (affine, deformable, composed into one warp)."""
    import io

    import nibabel as nib
    from picsl_greedy import Greedy3D

    fixed, moving, affine = _load_pair_arrays(fixed_path, moving_path)
    f_file, m_file = _shared_header_files(fixed, moving, affine, work)
    aff, warp, comp = work / "greedy_affine.mat", work / "greedy_warp.nii.gz", work / "greedy_composed.nii.gz"
    iters = "20x10" if quick else "100x50x10"
    log = io.StringIO()
    g = Greedy3D()
    t0 = time.perf_counter()
    g.execute(f"-d 3 -threads {threads} -a -dof 12 -ia-image-centers -i {f_file} {m_file} -o {aff} "
              f"-n {iters} -m NMI", out=log, err=log)
    g.execute(f"-d 3 -threads {threads} -it {aff} -i {f_file} {m_file} -o {warp} -n {iters} -m NCC 2x2x2 "
              f"-s 2.0vox 0.5vox", out=log, err=log)
    g.execute(f"-d 3 -threads {threads} -rf {f_file} -rc {comp} -r {warp} {aff}", out=log, err=log)
    seconds = time.perf_counter() - t0
    disp = lps_displacement_to_vox(_vector_image_xyz3(np.asarray(nib.load(str(comp)).dataobj)), affine)
    t1 = time.perf_counter()
    resliced = work / "greedy_resliced.nii.gz"
    g.execute(f"-d 3 -threads {threads} -rf {f_file} -rm {m_file} {resliced} -r {warp} {aff}", out=log, err=log)
    check = agreement_with_tool(fixed, moving, disp, np.asarray(nib.load(str(resliced)).dataobj, np.float32),
                                body_above=-500.0)
    return disp, affine, {"registration_s": seconds, "log_tail": log.getvalue()[-2000:], "tool_agreement": check,
                          "check_s": time.perf_counter() - t1}


def run_elastix(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """elastix via itk-elastix: default affine + bspline maps; transformix gives the deformation field.

    Threads come from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (set by the parent); passing
    ``number_of_threads=2`` to the registration method segfaults with itk-elastix 0.25."""
    import itk

    fixed, moving, affine = _load_pair_arrays(fixed_path, moving_path)
    f_file, m_file = _shared_header_files(fixed, moving, affine, work)
    f_img, m_img = itk.imread(str(f_file), itk.F), itk.imread(str(m_file), itk.F)
    params = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        pmap = params.GetDefaultParameterMap(name)
        if quick:
            pmap["MaximumNumberOfIterations"] = ["64"]
        # the result image (used only by the agreement check) resampled linearly like the check's own warp
        pmap["ResampleInterpolator"] = ["FinalLinearInterpolator"]
        params.AddParameterMap(pmap)
    t0 = time.perf_counter()
    result, result_params = itk.elastix_registration_method(f_img, m_img, parameter_object=params,
                                                            log_to_console=False)
    field = itk.transformix_deformation_field(m_img, result_params)
    seconds = time.perf_counter() - t0
    arr = np.transpose(itk.array_from_image(field), (2, 1, 0, 3))  # itk arrays are (Z, Y, X, 3)
    disp = lps_displacement_to_vox(arr, affine)
    t1 = time.perf_counter()
    check = agreement_with_tool(fixed, moving, disp, np.transpose(itk.array_from_image(result), (2, 1, 0)),
                                body_above=-500.0)
    return disp, affine, {"registration_s": seconds, "tool_agreement": check, "check_s": time.perf_counter() - t1}


def run_convexadam(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """ConvexAdam (MIND-SSC) on the arrays; its (X, Y, Z, 3) output is voxels, fixed -> moving already."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # the runner is its own process: seeding it touches nothing else
    fixed, moving, affine = _load_pair_arrays(fixed_path, moving_path)
    t0 = time.perf_counter()
    disp = convex_adam_pt(img_fixed=fixed, img_moving=moving, selected_niter=20 if quick else 80,
                          dtype=torch.float32, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    return np.moveaxis(np.asarray(disp, dtype=np.float32), -1, 0), affine, {"registration_s": seconds}


def run_deeds(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool,
              deeds_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """linearBCV + deedsBCV on the files as they are; read back with slicreg.deeds (project venv)."""
    from slicreg.deeds import read_deeds

    fixed, moving, affine = _load_pair_arrays(fixed_path, moving_path)
    if fixed.shape != moving.shape:
        raise ValueError(f"deeds needs images of one shape, got {fixed.shape} and {moving.shape}")
    linear, deformable = (find_deeds_binary(b, deeds_dir) for b in DEEDS_BINARIES)
    if linear is None or deformable is None:
        raise FileNotFoundError(f"deeds binaries {DEEDS_BINARIES} not found")
    # deeds skips exactly 352 header bytes: give it plain NIfTI-1 files without extensions
    f_file, m_file = _shared_header_files(fixed, moving, affine, work)
    stem = work / "deeds"
    t0 = time.perf_counter()
    for cmd in ([linear, "-F", str(f_file), "-M", str(m_file), "-O", str(stem)],
                [deformable, "-F", str(f_file), "-M", str(m_file), "-A", f"{stem}_matrix.txt", "-O", str(stem)]):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    transform = read_deeds(f"{stem}_displacements.dat", fixed.shape, matrix_path=f"{stem}_matrix.txt",
                           grid_spacing=4)
    return transform.to_field(), affine, {"registration_s": seconds}


def crop_masks(fixed_path: Path, moving_path: Path, fixed_shape: tuple[int, ...], moving_shape: tuple[int, ...]
               ) -> dict[str, np.ndarray]:
    """The scans' fields of view from the dataset's crop records (``crops/<subject>.json`` beside ``imagesTr``,
    as the ``register`` and ``align`` stages and ``slicreg register`` on raw scans use them), as
    ``{"fixed_mask": ..., "moving_mask": ...}``; a scan without a record gets none."""
    from slicreg.geometry import load_fov_mask

    out: dict[str, np.ndarray] = {}
    for key, path, shape in (("fixed_mask", fixed_path, fixed_shape), ("moving_mask", moving_path, moving_shape)):
        sid = Path(path).name.split(".")[0].rsplit("_", 1)[0]  # <subject>_0000.nii.gz
        record = Path(path).parent.parent / "crops" / f"{sid}.json"
        if record.is_file():
            out[key] = load_fov_mask(record, tuple(shape), f"crop record of {sid}")
    return out


def run_slicreg_align(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The built-in toolkit (:func:`slicreg.alignment.register_pair`, preset abdomen-ct), with the crop records'
    fields of view as masks (:func:`crop_masks`) as the ``align`` stage uses them."""
    import torch

    from slicreg.alignment import register_pair
    from slicreg.io import load_image

    torch.set_num_threads(threads)
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    t0 = time.perf_counter()
    masks = crop_masks(fixed_path, moving_path, fixed.shape, moving.shape)
    res = register_pair(fixed.array, moving.array, spacing_mm=tuple(float(s) for s in fixed.spacing_mm),
                        preset="abdomen-ct", seed=seed, **masks)
    seconds = time.perf_counter() - t0
    return np.asarray(res.disp_vox, dtype=np.float32), fixed.affine, {
        "registration_s": seconds, "stages_s": res.info.get("stages"), "iterations": res.info.get("iterations")}


def run_slicreg(fixed_path: Path, moving_path: Path, work: Path, *, threads: int, seed: int, quick: bool,
                bundle: str | None = None, atlas: bool = False, refine: bool = False
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """slicreg itself: the network predicts the supervoxels, the supervoxel flow gives the field.

    ``atlas``: the moving scan is the bundle's template, whose own supervoxels (stored in the bundle) stand for
    the moving side, as the paper registers scans to its template; otherwise both sides are predicted.
    ``refine``: then the instance refinement (``slicreg register``'s default), with the crop records' fields of
    view (:func:`crop_masks`) as the ``register`` stage passes them. The bundle is loaded inside the timed part (a
    user's run pays for it too)."""
    import torch

    from slicreg.bundle import load_bundle
    from slicreg.io import load_image
    from slicreg.registration import register_preprocessed

    if not bundle:
        raise ValueError("slicreg needs --slicreg-bundle (a trained weights bundle)")
    torch.set_num_threads(threads)
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    t0 = time.perf_counter()
    b = load_bundle(bundle)
    kwargs: dict[str, Any] = {}
    if atlas:
        kwargs = {"template_supervoxels": b.template_supervoxels.array, "moving_is_template": True}
    masks = crop_masks(fixed_path, moving_path, fixed.shape, moving.shape)
    res = register_preprocessed(b.model, fixed.array, moving.array, seed=seed, refine=refine, **masks, **kwargs)
    seconds = time.perf_counter() - t0
    return np.asarray(res.disp_vox, dtype=np.float32), fixed.affine, {
        "registration_s": seconds, "atlas": atlas, "refine": refine, "timings_s": res.info.get("timings_s")}


RUNNERS = {"ants": run_ants, "greedy": run_greedy, "elastix": run_elastix, "convexadam": run_convexadam,
           "deeds": run_deeds, "slicreg-align": run_slicreg_align, "slicreg": run_slicreg,
           "slicreg-refine": functools.partial(run_slicreg, refine=True)}


def find_deeds_binary(name: str, folder: str | None) -> str | None:
    """Path of a deeds binary in ``folder`` (if given) or on PATH, else None."""
    if folder:
        cand = Path(folder) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


def _git_commit() -> str:
    """The repository's HEAD commit (``"unknown"`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _tool_version(peer: str) -> str:
    from importlib import metadata

    dist = PEERS[peer]["dist"]
    if not dist:
        return "binary"
    if dist == "slicreg":  # this repository: its own version, not an editable install's possibly stale metadata
        import slicreg

        return slicreg.__version__
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def runner_main(args: argparse.Namespace) -> int:
    """The child: register one pair with one method, write the field and a record."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.run_peer == "deeds":
        extra["deeds_dir"] = args.deeds_dir
    if args.run_peer in ("slicreg", "slicreg-refine"):
        extra.update(bundle=args.slicreg_bundle, atlas=args.atlas)
    disp, affine, info = RUNNERS[args.run_peer](Path(args.fixed), Path(args.moving), work, threads=args.threads,
                                                seed=args.seed, quick=args.quick, **extra)
    if not np.all(np.isfinite(disp)):
        raise ValueError(f"{args.run_peer}: the field has non-finite values")
    _save_field_xyz3(disp, affine, Path(args.field))
    record = {"peer": args.run_peer, "version": _tool_version(args.run_peer), "python": sys.executable,
              "threads": args.threads, "seed": args.seed, "quick": bool(args.quick),
              "child_wall_s": time.perf_counter() - t0, **info}
    tmp = Path(args.info).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, args.info)
    return 0


# ============================================================================================ parent side
def thread_env(threads: int, seed: int) -> dict[str, str]:
    """The environment every child gets: ``threads`` threads for every library, fixed hash and ANTs seeds."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env["ANTS_RANDOM_SEED"] = str(seed)
    env["PYTHONHASHSEED"] = "0"
    return env


def _probe(python: str, peer: str) -> tuple[bool, str]:
    """Can ``python`` import the peer's module? Returns (ok, version or the reason)."""
    spec = PEERS[peer]
    code = (f"import importlib, importlib.metadata as m; mod = importlib.import_module({spec['module']!r}); "
            + ("assert hasattr(mod, 'elastix_registration_method'); " if peer == "elastix" else "")
            + f"print(m.version({spec['dist']!r}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                             env=thread_env(1, 0))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{python}: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, last
    return True, out.stdout.strip()


def locate_peers(names: list[str], *, peers_python: str, deeds_dir: str | None, slicreg_bundle: str | None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Where each method can run: ``({name: {"python", "version", "where"}}, {name: why not})``."""
    available: dict[str, dict[str, Any]] = {}
    missing: dict[str, str] = {}
    for name in names:
        kind = PEERS[name]["kind"]
        if kind == "python":
            ok, what = _probe(sys.executable, name)
            if ok:
                available[name] = {"python": sys.executable, "version": what, "where": "project venv"}
                continue
            if Path(peers_python).exists():
                ok2, what2 = _probe(peers_python, name)
                if ok2:
                    available[name] = {"python": peers_python, "version": what2, "where": "peers venv"}
                    continue
                missing[name] = (f"{PEERS[name]['dist']} not importable in the project venv ({what}) nor in "
                                 f"{peers_python} ({what2}); pip install {PEERS[name]['dist']} into the peers venv")
            else:
                missing[name] = (f"{PEERS[name]['dist']} not importable in the project venv ({what}) and no peers "
                                 f"venv at {peers_python}")
        elif kind == "binary":
            found = {b: find_deeds_binary(b, deeds_dir) for b in DEEDS_BINARIES}
            if all(found.values()):
                available[name] = {"python": sys.executable, "version": "binary", "where": found[DEEDS_BINARIES[1]]}
            else:
                missing[name] = (f"{', '.join(b for b, p in found.items() if not p)} not found on PATH"
                                 + (f" nor in {deeds_dir}" if deeds_dir else " (give --deeds-dir)")
                                 + "; deeds is not on a package registry: build it from its source")
        else:  # slicreg
            ok, what = _probe(sys.executable, name) if name == "slicreg-align" else (True, "")
            if name in ("slicreg", "slicreg-refine"):
                import importlib.util

                have = [m for m in ("slicreg.registration", "slicreg.bundle") if importlib.util.find_spec(m) is None]
                if have:
                    ok, what = False, f"{', '.join(have)} not in this checkout yet"
                elif not slicreg_bundle:
                    ok, what = False, "no trained weights bundle given (--slicreg-bundle)"
                else:
                    ok, what = True, _tool_version(name)
            if ok:
                available[name] = {"python": sys.executable, "version": _tool_version(name), "where": "project venv"}
            else:
                missing[name] = what
    return available, missing


def run_child(python: str, peer: str, fixed: Path, moving: Path, field: Path, info: Path, *, threads: int,
              seed: int, quick: bool, deeds_dir: str | None, slicreg_bundle: str | None, atlas: bool,
              log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run one (method, pair) child; returns wall / CPU seconds, peak RSS and status."""
    fixed, moving, field, info = (Path(p).resolve() for p in (fixed, moving, field, info))
    work = field.parent / f".work-{peer}-{field.name.split('.')[0]}"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--run-peer", peer, "--fixed", str(fixed), "--moving",
           str(moving), "--field", str(field), "--info", str(info), "--threads", str(threads), "--seed", str(seed),
           "--work", str(work)]
    if quick:
        cmd.append("--quick")
    if deeds_dir:
        cmd += ["--deeds-dir", deeds_dir]
    if slicreg_bundle:
        cmd += ["--slicreg-bundle", slicreg_bundle]
    if atlas:
        cmd.append("--atlas")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        # cwd = the scratch folder: transformix writes deformationField.nii into the working directory
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads, seed), cwd=work)
        deadline = t0 + timeout_s
        status = None
        while status is None:
            try:
                pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): do not leave the child running
                proc.kill()
                os.wait4(proc.pid, 0)
                raise
            if pid:
                status = os.waitstatus_to_exitcode(st)
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, st, usage = os.wait4(proc.pid, 0)
                status = "timeout"
                break
            time.sleep(0.2)
        proc.returncode = status if isinstance(status, int) else -9
        wall = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {"status": status, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0}


# ------------------------------------------------------------------------------------ conversion check
def make_check_pair(folder: Path, *, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The check pair of the module docstring: (fixed path, moving path, body mask, true field ``(3, X, Y, Z)``).

    ``moving(q) = fixed(q + w(q))`` with ``w`` = -(3, -2, 4) voxels plus smooth sine modes of 1.5-2 voxels; the
    true field (fixed -> moving) is the inverse map ``u(p) = -w(p + u(p))``, solved by fixed-point iteration."""
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = CHECK_SHAPE
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2
    radius = np.asarray(shape) * 0.36
    body = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    texture /= texture.std()
    img = np.where(body, 40.0 + 120.0 * texture, -1000.0)
    for _ in range(6):  # a few bright, asymmetric blobs (bone / contrast-like)
        c = centre + rng.uniform(-0.6, 0.6, 3) * radius
        r = rng.uniform(2.5, 5.0)
        blob = ((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r
        img = np.where(blob & body, 400.0, img)
    fixed = img.astype(np.float32)
    n0, n1, n2 = shape
    pull = np.stack([2.0 * np.sin(2 * np.pi * grid[2] / n2), 1.5 * np.cos(2 * np.pi * grid[0] / n0),
                     2.0 * np.sin(2 * np.pi * grid[1] / n1)]) - np.asarray(CHECK_SHIFT_VOX)[:, None, None, None]
    moving = ndimage.map_coordinates(fixed, grid + pull, order=1, mode="constant", cval=-1000.0)
    truth = -pull
    for _ in range(40):
        truth = -np.stack([ndimage.map_coordinates(pull[a], grid + truth, order=1, mode="nearest") for a in range(3)])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in (("fixed", fixed), ("moving", moving)):
        nii = nib.Nifti1Image(np.rint(arr).astype(np.int16), CHECK_AFFINE)
        nii.set_qform(CHECK_AFFINE, code=1)
        nii.set_sform(CHECK_AFFINE, code=1)
        path = folder / f"check_{name}.nii.gz"
        nib.save(nii, str(path))
        paths.append(path)
    inner = ndimage.binary_erosion(body, iterations=6)
    return paths[0], paths[1], inner, truth.astype(np.float32)


def conversion_check(name: str, where: dict[str, Any], folder: Path, *, threads: int, seed: int,
                     deeds_dir: str | None, timeout_s: float) -> dict[str, Any]:
    """Register the check pair with ``name`` (quick settings) and compare the field with the true one."""
    import nibabel as nib

    fixed, moving, inner, truth = make_check_pair(folder / "inputs", seed=seed)
    field = folder / name / "field.nii.gz"
    info = folder / name / "record.json"
    cost = run_child(where["python"], name, fixed, moving, field, info, threads=threads, seed=seed, quick=True,
                     deeds_dir=deeds_dir, slicreg_bundle=None, atlas=False,
                     log_path=folder / f"{name}.log", timeout_s=timeout_s)
    out: dict[str, Any] = {"wall_s": round(cost["wall_s"], 1), "tolerance_vox": CHECK_TOLERANCE_VOX}
    if cost["status"] != 0 or not field.is_file():
        out.update(ok=False, error=f"exit status {cost['status']}; see {folder / f'{name}.log'}")
        return out
    disp = np.moveaxis(np.asarray(nib.load(str(field)).dataobj, dtype=np.float64), -1, 0)
    err = np.sqrt(((disp - truth) ** 2).sum(0))[inner]
    out.update(true_mean_vox=round(float(np.sqrt((truth ** 2).sum(0))[inner].mean()), 3),
               mean_error_vox=round(float(err.mean()), 3), median_error_vox=round(float(np.median(err)), 3),
               ok=bool(err.mean() <= CHECK_TOLERANCE_VOX))
    record = json.loads(info.read_text()) if info.is_file() else {}
    if record.get("tool_agreement"):
        out["tool_agreement"] = record["tool_agreement"]
    return out


# ----------------------------------------------------------------------------------------- evaluation
def select_pairs(dataset_dir: Path, n: int) -> tuple[Any, list[Any]]:
    """The dataset and its first ``n`` test -> template pairs (moving = template), else any listed pairs."""
    from preprocessing.datasets import load_dataset
    from slicreg.errors import InputError

    ds = load_dataset(dataset_dir)
    pairs = [p for p in ds.pairs if ds.template and p.moving == ds.template]
    if not pairs:
        pairs = list(ds.pairs)
    pairs = [p for p in pairs if ds.subject(p.fixed).labels and ds.subject(p.moving).labels]
    if not pairs:
        raise InputError(f"{dataset_dir}: no registration_pairs with labels on both sides")
    return ds, pairs[:n]


def score(ds: Any, pair: Any, field_path: Path | None) -> dict[str, Any]:
    """slicreg.metrics scores of one field (None = the unregistered pair): the evaluate stage's own scoring
    (:func:`pipelines.stages.evaluate.score_pair_files`: Dice and HD95 inside the fixed field of view, the field
    error inside the fixed body), without its cache."""
    from pipelines.stages.evaluate import score_pair_files
    from slicreg.labels import BTCV_IDS
    from slicreg.supervoxels import BODY_THRESHOLD_HU

    fs, ms = ds.subject(pair.fixed), ds.subject(pair.moving)
    crop, truth = fs.files.get("crop"), pair.ground_truth_field
    res = score_pair_files({
        "method": None, "fixed": pair.fixed, "moving": pair.moving, "runtime_s": None, "cache": None,
        "fixed_labels": str(ds.path(fs.labels)), "moving_labels": str(ds.path(ms.labels)),
        "field": None if field_path is None else str(field_path),
        "gt_field": None if truth is None else str(ds.path(truth)), "fixed_image": str(ds.path(fs.image)),
        "fixed_crop": None if crop is None else str(ds.path(crop)), "labels": list(BTCV_IDS), "hd95": True,
        "body_threshold_hu": BODY_THRESHOLD_HU})
    s = res["summary"]
    row = {"dice13": s["dice_learn2reg"]["all13"], "dice4": s["dice_learn2reg"]["large4"],
           "dice13_reference": s["dice_reference"]["all13"], "hd95_mm": s["hd95_mm"]["all13"],
           "per_label_dice": {k: v["dice_learn2reg"] for k, v in res["per_label"].items()}}
    if res["jacobian"] is not None:
        row.update(sdlogj=res["jacobian"]["sdlogj_learn2reg"], std_log_det=res["jacobian"]["std_log_det"],
                   folding_percent=res["jacobian"]["folding_percent"])
    if res["field_error"] is not None:
        row.update(field_error_mm=res["field_error"]["mean_mm"], field_error_p95_mm=res["field_error"]["p95_mm"])
    return row


SUMMARY_KEYS = ("dice13", "dice4", "hd95_mm", "sdlogj", "std_log_det", "folding_percent", "field_error_mm",
                "field_error_p95_mm", "wall_s", "registration_s", "cpu_s", "peak_rss_mb")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key: :func:`slicreg.metrics.aggregate` over the pairs (mean, std, 30th percentile; NaN left out and
    counted; ``inf`` -- e.g. HD95 of an organ the warp lost -- kept, as Learn2Reg does)."""
    from slicreg.metrics import aggregate

    out: dict[str, Any] = {"n_pairs": len(rows)}
    for key in SUMMARY_KEYS:
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        if vals:
            out[key] = aggregate(vals)
    return out


# ------------------------------------------------------------------------------------------- reporting
def _strict_json(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON), numpy scalars -> Python numbers, paths -> strings."""
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        if np.isnan(obj):
            return None
        return float(obj) if np.isfinite(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(summary: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1, std: bool = True) -> str:
    """``mean ± std`` of a summary entry (also after a JSON round trip, where NaN became None)."""
    entry = summary.get(key) or {}
    if entry.get("mean") is None or (not isinstance(entry["mean"], str) and np.isnan(entry["mean"])):
        return "-"
    if isinstance(entry["mean"], str) or not np.isfinite(entry["mean"]):
        return "inf"
    m, s = entry["mean"] * scale, (entry.get("std") or 0.0) * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if std and summary["n_pairs"] > 1 else f"{m:.{digits}f}"


def method_table(doc: dict[str, Any]) -> list[str]:
    """The summary table of a peers.json document: one Markdown row per method (mean ± std over the pairs)."""
    lines = ["| method | version | Dice 13 | Dice 4 | HD95 mm | SDlogJ | % det J <= 0 | field error mm | "
             "wall s / pair | reg s | CPU s | peak RSS GB | conversion checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in doc["methods"].values():
        s = res["summary"]
        check = res.get("check")
        chk = "-" if check is None else {True: "ok", False: "FAILED", None: "-"}[check.get("ok")]
        if check and "mean_error_vox" in check:
            chk += f" ({check['mean_error_vox']:.2f} vox)"
        agree = [r["tool_agreement"]["mad_vs_tool"] for r in res["pairs"] if r.get("tool_agreement")]
        if agree:
            chk += f"; vs own warp {max(agree):.2g} HU"
        rss = "-" if "peak_rss_mb" not in s else f"{s['peak_rss_mb']['mean'] / 1024:.1f}"
        lines.append(
            f"| {res['label']} | {res.get('version', '')} | {_fmt(s, 'dice13', 100)} | {_fmt(s, 'dice4', 100)} | "
            f"{_fmt(s, 'hd95_mm')} | {_fmt(s, 'sdlogj', digits=3, std=False)} | "
            f"{_fmt(s, 'folding_percent', digits=3, std=False)} | {_fmt(s, 'field_error_mm', digits=2)} | "
            f"{_fmt(s, 'wall_s', digits=0)} | {_fmt(s, 'registration_s', digits=0, std=False)} | "
            f"{_fmt(s, 'cpu_s', digits=0, std=False)} | {rss} | {chk} |")
    return lines


def markdown_table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# slicreg beside its peers ({doc['date']})", "",
             f"{doc['dataset_name']}: {len(doc['pairs'])} test -> template pairs "
             f"({', '.join(f'{p[0]} <- {p[1]}' for p in doc['pairs'])}), preprocessed 2 mm, "
             f"{' x '.join(str(s) for s in doc['shape'])}. Machine: {m['cpu_model']}, {m['cpus_usable']} cores "
             f"usable, {doc['threads']} threads per method, load average {m['loadavg_start'][0]:.1f} at the "
             f"start (the machine was shared, so times are upper bounds). Mean ± std over pairs; Dice in % "
             f"(Learn2Reg definition), HD95 over the 13 organs in mm, field error = mean |u - u_true| in mm "
             f"inside the body; wall = the method's own process per pair, including interpreter start, imports "
             f"and file IO; reg = the registration call alone. Every method starts from the same "
             f"voxel-to-voxel correspondence (the ITK tools get both images with the fixed image's header); the "
             f"'initial' row shows how far apart the pairs start. Conversion checks: mean error on a synthetic "
             f"pair with a known deformation (must be < {CHECK_TOLERANCE_VOX:g} voxel) and, for the ITK tools "
             f"when recorded, the largest difference between the tool's own warped image and the moving image "
             f"warped with the converted field.", "", *method_table(doc)]
    names = [n for n, r in doc["methods"].items() if r.get("pairs")]
    if names:
        lines += ["", "Per pair: Dice 13 organs % / field error mm / wall s", "",
                  "| pair | " + " | ".join(doc["methods"][n]["label"] for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for fixed, moving in doc["pairs"]:
            cells = []
            for n in names:
                row = next((r for r in doc["methods"][n]["pairs"] if r["fixed"] == fixed and r["moving"] == moving),
                           None)
                if row is None:
                    cells.append("failed")
                    continue
                d, e, w = row.get("dice13"), row.get("field_error_mm"), row.get("wall_s")
                cells.append(" / ".join("-" if v is None or not np.isfinite(v) else f"{v * k:.{g}f}"
                                        for v, k, g in ((d, 100, 1), (e, 1, 1), (w, 1, 0))))
            lines.append(f"| {fixed} <- {moving} | " + " | ".join(cells) + " |")
    if doc["unavailable"]:
        lines += ["", "Not run here:", ""]
        lines += [f"- **{PEERS[n]['label']}**: {why}" for n, why in doc["unavailable"].items()]
    failed = {n: r for n, r in doc["methods"].items() if r.get("failures")}
    if failed:
        lines += ["", "Failures:", ""]
        for r in failed.values():
            lines += [f"- **{r['label']}**: {f}" for f in r["failures"]]
    lines += ["", "Settings:", ""]
    lines += [f"- **{r['label']}**: {r['settings']}" for r in doc["methods"].values()]
    return "\n".join(lines) + "\n"


def accuracy_time_png(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    initial = doc["methods"].get("initial", {}).get("summary", {})
    for ax, key, scale in ((axes[0], "dice13", 100.0), (axes[1], "field_error_mm", 1.0)):
        if (initial.get(key) or {}).get("mean") is not None:
            ax.axhline(initial[key]["mean"] * scale, color="grey", ls="--", lw=1, label="initial (no registration)")
            ax.legend(fontsize=7, loc="lower right")
    for name, res in doc["methods"].items():
        s = res["summary"]
        if "wall_s" not in s:
            continue
        x = s["wall_s"]["mean"]
        for ax, key, scale in ((axes[0], "dice13", 100.0), (axes[1], "field_error_mm", 1.0)):
            entry = s.get(key) or {}
            if not isinstance(entry.get("mean"), (int, float)) or not np.isfinite(entry["mean"]):
                continue
            y, e = entry["mean"] * scale, (entry.get("std") or 0.0) * scale
            marker = "o" if name == "initial" else ("*" if name.startswith("slicreg") else "s")
            ax.errorbar([x], [y], yerr=[e], fmt=marker, ms=9 if marker == "*" else 6, capsize=3)
            ax.annotate(res["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes[0].set_ylabel("Dice, 13 organs (%, Learn2Reg)")
    axes[1].set_ylabel("field error (mm, mean inside the body)")
    times = [r["summary"]["wall_s"]["mean"] for r in doc["methods"].values() if "wall_s" in r["summary"]]
    for ax in axes:
        if times and max(times) > 5 * min(times):  # log only where the times span a wide range
            ax.set_xscale("log")
        ax.set_xlabel("wall time per pair (s, 2 threads, incl. IO)")
        ax.grid(True, which="both", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"{len(doc['pairs'])} test -> template pairs; {m['cpu_model']}, {doc['threads']} threads; "
                 f"{doc['date']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, help="preprocessed dataset folder (dataset.json with registration_pairs)")
    ap.add_argument("--pairs", type=int, default=3, help="number of test -> template pairs (default 3)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated methods (default: all of {list(PEERS)})")
    ap.add_argument("--peers-python", default=os.environ.get("SLICREG_PEERS_PYTHON",
                                                             str(DEFAULT_PEERS_VENV / "bin" / "python")),
                    help="python of the separate peers venv (default $SLICREG_PEERS_PYTHON or ../peers-venv)")
    ap.add_argument("--deeds-dir", help="folder holding linearBCV and deedsBCV (default: PATH)")
    ap.add_argument("--slicreg-bundle", help="trained weights bundle for the 'slicreg' method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, pair) before it is killed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="tables, JSON and plot (default "
                    "benchmarks/results/peers)")
    ap.add_argument("--fields-dir", type=Path, default=Path(tempfile.gettempdir()) / "slicreg-peers-fields",
                    help="where the fields, records and logs go (large; default outside the repository: "
                         "$TMPDIR/slicreg-peers-fields)")
    ap.add_argument("--no-check", action="store_true", help="skip the known-shift conversion check")
    ap.add_argument("--check-only", action="store_true", help="only run the conversion checks")
    ap.add_argument("--force", action="store_true", help="re-run (method, pair) results already in --out")
    ap.add_argument("--list", action="store_true", help="print which methods can run here and exit")
    ap.add_argument("--report-only", action="store_true", help="rewrite peers.md and peers.png from peers.json")
    # the child ("runner") side
    ap.add_argument("--run-peer", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--fixed", help=argparse.SUPPRESS)
    ap.add_argument("--moving", help=argparse.SUPPRESS)
    ap.add_argument("--field", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--atlas", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_peer:
        return runner_main(args)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_child's clean-up runs

    for attr in ("deeds_dir", "slicreg_bundle"):
        if getattr(args, attr):
            setattr(args, attr, str(Path(getattr(args, attr)).resolve()))
    if args.report_only:
        doc = json.loads((args.out / "peers.json").read_text())
        (args.out / "peers.md").write_text(markdown_table(doc))
        accuracy_time_png(doc, args.out / "peers.png")
        print((args.out / "peers.md").read_text())
        return 0
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {list(PEERS)}")
    sys.path.insert(0, str(REPO))
    from run_all import machine_info

    available, missing = locate_peers(names, peers_python=args.peers_python, deeds_dir=args.deeds_dir,
                                      slicreg_bundle=args.slicreg_bundle)
    for n, where in available.items():
        print(f"{n:14s} {where['version']:12s} {where['where']}  ({where['python']})")
    for n, why in missing.items():
        print(f"{n:14s} NOT RUN: {why}")
    if args.list:
        return 0
    if args.dataset is None and not args.check_only:
        ap.error("--dataset is required (or --check-only / --list)")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(threads=args.threads)
    checks: dict[str, Any] = {}
    if args.no_check and (out / "conversion_checks.json").is_file():  # keep the last checks' verdicts
        earlier = json.loads((out / "conversion_checks.json").read_text())
        checks = {n: {**c, "from": earlier.get("date", "an earlier run")} for n, c in earlier["checks"].items()
                  if n in available}
    if not args.no_check:
        with tempfile.TemporaryDirectory(prefix="peers_check_") as tmp:
            for n, where in available.items():
                if n in ("slicreg", "slicreg-refine"):
                    checks[n] = {"ok": None, "note": "not checked here: needs a network trained on this anatomy"}
                    continue
                checks[n] = conversion_check(n, where, Path(tmp), threads=args.threads, seed=args.seed,
                                             deeds_dir=args.deeds_dir, timeout_s=args.timeout)
                print(f"check {n:14s} {json.dumps(checks[n])}", flush=True)
                if not checks[n].get("ok") and "error" in checks[n]:
                    log = Path(tmp) / f"{n}.log"
                    if log.is_file():
                        print(log.read_text()[-3000:])
        (out / "conversion_checks.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "checks": checks},
            indent=1))
    if args.check_only:
        return 0 if all(c.get("ok") is not False for c in checks.values()) else 1

    ds, pairs = select_pairs(args.dataset, args.pairs)
    import hashlib

    import nibabel as nib

    # results of one dataset version live together (a rerun of the preprocessing gets a new folder)
    dataset_key = hashlib.sha1(str(Path(args.dataset).resolve()).encode()).hexdigest()[:10]

    shape = list(nib.load(str(ds.path(ds.subject(pairs[0].fixed).image))).shape)
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "threads": args.threads,
        "seed": args.seed, "dataset": repo_relative(args.dataset) or Path(args.dataset).resolve().name,
        "dataset_name": ds.name, "shape": shape,
        "pairs": [[p.fixed, p.moving] for p in pairs], "unavailable": missing, "methods": {}}
    results: dict[str, Any] = {"initial": {"label": "initial (no registration)", "version": "", "settings":
                                           "identity field", "pairs": [], "check": None}}
    for p in pairs:
        results["initial"]["pairs"].append({"fixed": p.fixed, "moving": p.moving, **score(ds, p, None)})
    for n, where in available.items():
        res = {"label": PEERS[n]["label"], "version": where["version"], "where": where["where"],
               "settings": PEERS[n]["settings"], "pairs": [], "check": checks.get(n), "failures": []}
        folder = args.fields_dir / dataset_key / n
        folder.mkdir(parents=True, exist_ok=True)
        stamp = {"version": where["version"], "settings": PEERS[n]["settings"], "threads": args.threads,
                 "seed": args.seed}
        if PEERS[n]["kind"] == "slicreg":  # this repository changes under one version number
            stamp["commit"] = _git_commit()
            if n != "slicreg-align":
                sums = Path(args.slicreg_bundle) / "SHA256SUMS"
                stamp["bundle"] = hashlib.sha256(sums.read_bytes()).hexdigest() if sums.is_file() else \
                    str(Path(args.slicreg_bundle).resolve())
        for p in pairs:
            field = folder / f"disp_{p.fixed}_{p.moving}.nii.gz"
            record = folder / f"run_{p.fixed}_{p.moving}.json"
            cost_file = folder / f"cost_{p.fixed}_{p.moving}.json"
            done = field.is_file() and record.is_file() and cost_file.is_file()
            if done and json.loads(cost_file.read_text()).get("stamp") != stamp:
                done = False  # another version, settings, thread count or seed: run again
            if args.force or not done:
                for f in (field, record, cost_file):
                    f.unlink(missing_ok=True)
                print(f"{n}: {p.fixed} <- {p.moving} ...", flush=True)
                cost = run_child(where["python"], n, ds.path(ds.subject(p.fixed).image),
                                 ds.path(ds.subject(p.moving).image), field, record, threads=args.threads,
                                 seed=args.seed, quick=False, deeds_dir=args.deeds_dir,
                                 slicreg_bundle=args.slicreg_bundle, atlas=p.moving == ds.template,
                                 log_path=folder / f"log_{p.fixed}_{p.moving}.txt", timeout_s=args.timeout)
                if cost["status"] != 0 or not field.is_file():
                    res["failures"].append(f"{p.fixed} <- {p.moving}: exit status {cost['status']} after "
                                           f"{cost['wall_s']:.0f} s (log: {folder / f'log_{p.fixed}_{p.moving}.txt'})")
                    print(f"  FAILED: {res['failures'][-1]}", flush=True)
                    continue
                cost_file.write_text(json.dumps({**cost, "stamp": stamp}))
            cost = json.loads(cost_file.read_text())
            rec = json.loads(record.read_text())
            # the conversion self-check (agreement with the tool's own warped image) is not the method's cost
            row = {"fixed": p.fixed, "moving": p.moving, "wall_s": cost["wall_s"] - float(rec.get("check_s", 0.0)),
                   "cpu_s": cost["cpu_s"], "peak_rss_mb": cost["peak_rss_mb"],
                   "registration_s": rec.get("registration_s"), "tool_agreement": rec.get("tool_agreement"),
                   "field": Path(field).name, **score(ds, p, field)}
            res["pairs"].append(row)
            print(f"  {n}: {p.fixed} <- {p.moving}: Dice13 {100 * row['dice13']:.1f} %, field error "
                  f"{row.get('field_error_mm', float('nan')):.2f} mm, wall {row['wall_s']:.0f} s, "
                  f"CPU {row['cpu_s']:.0f} s, {row['peak_rss_mb'] / 1024:.2f} GB", flush=True)
        (folder / "registrations.json").write_text(json.dumps({
            "method": n, "pairs": [{"fixed": r["fixed"], "moving": r["moving"], "field": Path(r["field"]).name,
                                    "runtime_s": round(r["wall_s"], 2)} for r in res["pairs"]]}, indent=1))
        results[n] = res
    for res in results.values():
        res["summary"] = summarise(res["pairs"])
    doc["methods"] = results
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    (out / "peers.json").write_text(json.dumps(_strict_json(doc), indent=1))
    (out / "peers.md").write_text(markdown_table(doc))
    accuracy_time_png(doc, out / "peers.png")
    print((out / "peers.md").read_text())
    print(f"wrote {out / 'peers.json'}, {out / 'peers.md'}, {out / 'peers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
