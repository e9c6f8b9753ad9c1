"""``slicreg supervoxels``: the template's 16 SLIC supervoxel layers (127 + background each, 4 mm).

Writes ``SV.nii.gz`` (uint8, stored ``(X/2, Y/2, Z/2, L)``, affine ``downsample_affine(template_affine, 2)``), a
sidecar ``SV.json`` (template sha256, mask, parameters, library versions, statistics per layer) and ``SV.png``
(a few layers' boundaries over the template, axial and coronal) beside it. :func:`write_supervoxels` is shared
with the ``supervoxels`` pipeline stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "supervoxels"
HELP = "build the template's SLIC supervoxel layers (16 x 127 + background, 4 mm) from a preprocessed template"


INPUTS = ("image", "labels")
OUTPUTS = ("out",)


def derived_outputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The sidecars written beside ``--out`` (``SV.json``, ``SV.png``)."""
    if getattr(args, "out", None) is None:
        return {}
    _, sidecar, figure = output_paths(args.out)
    return {"--out (sidecar)": str(sidecar), "--out (figure)": str(figure)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="preprocessed template CT (HU, 2 mm, e.g. 192 x 160 x 256)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="template organ labels (same grid): mask = distance to organs < "
                                         "--distance-vox voxels (the reference's mask)")
    source.add_argument("--body-mask", action="store_true",
                        help="no labels: mask = body (HU > -400, largest component, holes filled)")
    p.add_argument("--out", required=True, help="output supervoxels (.nii.gz); .json and .png are written beside it")
    p.add_argument("--layers", type=int, default=16, help="number of layers (default 16)")
    p.add_argument("--supervoxels", type=int, default=127, help="supervoxels per layer, excluding background "
                                                                "(default 127)")
    p.add_argument("--segments", type=int, default=208, help="SLIC seeds per layer before merging (default 208)")
    p.add_argument("--compactness", type=float, default=None,
                   help="SLIC compactness in units of a 2000 HU window (default: "
                        "slicreg.supervoxels.DEFAULT_COMPACTNESS)")
    p.add_argument("--distance-vox", type=float, default=30.0, help="organ-mask distance in template voxels (30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layers' random affines (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1; result identical for any N)")
    p.add_argument("--force", action="store_true", help="accept an image that does not look like CT in HU (a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``SV.nii.gz`` -> (``SV.nii.gz``, ``SV.json``, ``SV.png``)."""
    from slicreg.errors import InputError

    out = Path(out)
    name = out.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return out, out.with_name(stem + ".json"), out.with_name(stem + ".png")
    raise InputError(f"--out {out}: expected a NIfTI name ending in .nii.gz or .nii")


def write_supervoxels(
    image_path: Path,
    labels_path: Path | None,
    out: Path,
    *,
    mask_kind: str,
    distance_vox: float = 30.0,
    body_threshold_hu: float = -400.0,
    options: dict[str, Any] | None = None,
    jobs: int = 1,
    progress: Any = None,
    log: Any = print,
    force: bool = False,
) -> dict[str, Any]:
    """Read the template (and labels), build the layers, write NIfTI + JSON + PNG atomically; returns the sidecar.

    Args:
        image_path: template image (3-D NIfTI, HU).
        labels_path: template organ labels on the same grid (required for ``mask_kind="organs"``); the same world
            grid stored in another axis order is reoriented to the image's, any other grid is refused.
        out: output ``.nii.gz``; ``.json`` and ``.png`` go beside it.
        mask_kind: ``"organs"`` (distance to the organ union < ``distance_vox`` voxels of the template grid) or
            ``"body"`` (HU > ``body_threshold_hu``, largest component, holes filled).
        options: keyword arguments for :func:`slicreg.supervoxels.build_supervoxel_layers` (n_layers, seed, ...).
        jobs: worker processes.
        progress: a callable ``(n_done)`` or ``None``.
        log: where one-line messages go.
        force: accept an image that does not look like CT in HU (:func:`slicreg.checks.check_ct_like`); the
            reason is then logged and kept in the sidecar (``ct_check``).
    """
    import time

    import numpy as np

    from pipelines.runner import environment
    from slicreg import supervoxels as sv
    from slicreg.checks import check_ct_like, match_grid
    from slicreg.conventions import Volume, downsample_affine, spacing_from_affine
    from slicreg.errors import InputError
    from slicreg.io import (
        atomic_outputs,
        atomic_write_bytes,
        atomic_write_json,
        load_image,
        load_labels,
        save_volume,
        sha256_file,
    )

    nii_path, json_path, png_path = output_paths(out)
    image = load_image(image_path)
    ct_check = check_ct_like(image.array, name=str(image_path), force=force)
    spacing = spacing_from_affine(image.affine)
    mask_info: dict[str, Any] = {"kind": mask_kind}
    started = time.perf_counter()
    if mask_kind == "organs":
        if labels_path is None:
            raise InputError("supervoxels: mask 'organs' needs the template's organ labels; give them or use the "
                             "body mask")
        labels = match_grid(load_labels(labels_path), image, name=str(labels_path), reference_name=str(image_path),
                            what="labels", reference_what="template image", tol_mm=1e-2)
        try:
            mask = sv.organ_mask(labels.array, distance_vox=distance_vox)
        except InputError as exc:
            raise InputError(f"{labels_path}: {exc}") from None
        mask_info.update(labels=str(labels_path), labels_sha256=sha256_file(labels_path),
                         distance_vox=float(distance_vox),
                         distance_mm=float(distance_vox * spacing.mean()),
                         organ_ids=[int(v) for v in np.unique(labels.array) if v > 0])
    elif mask_kind == "body":
        try:
            mask = sv.body_mask(image.array, threshold=body_threshold_hu)
        except InputError as exc:
            raise InputError(f"{image_path}: {exc}") from None
        mask_info.update(threshold_hu=float(body_threshold_hu))
    else:
        raise InputError(f"supervoxels: mask must be 'organs' or 'body', got {mask_kind!r}")
    mask_info["voxels"] = int(mask.sum())
    try:
        result = sv.build_supervoxel_layers(image.array, mask, spacing_mm=tuple(spacing), jobs=jobs,
                                            progress=progress, **(options or {}))
    except InputError as exc:
        raise InputError(f"{image_path}: {exc}") from None
    build_s = time.perf_counter() - started
    affine4 = downsample_affine(image.affine, 2)
    stats = sv.supervoxel_statistics(result.layers, spacing_mm=tuple(2.0 * spacing), image_hu=result.image)
    png = sv.overlay_png(image.array, result.layers, layer_indices=(0, 1, 2))
    env = environment()
    sidecar = {
        "format": "slicreg-supervoxels/1",
        "file": nii_path.name,
        "layout": "stored (X, Y, Z, L) uint8 = in memory (L, X, Y, Z); 0 = background, 1..K supervoxels",
        "shape_in_memory": list(result.layers.shape),
        "affine": affine4.tolist(),
        "grid": "4 mm voxel q = template voxel 2q + 0.5 (downsample_affine(template_affine, 2))",
        "template": {"path": str(image_path), "sha256": sha256_file(image_path), "shape": list(image.shape),
                     "spacing_mm": spacing.tolist()},
        "mask": mask_info,
        "ct_check": ct_check,
        "parameters": result.parameters,
        "library_versions": {"python": env["python"], **env["packages"]},
        "build_seconds": round(build_s, 2),
        "jobs": int(jobs),
        "statistics": {
            "summary": {
                "labels_per_layer": sorted({s["labels"] for s in stats}),
                "volume_ml_median": float(np.median([s["volume_ml"]["median"] for s in stats])),
                "volume_cv_mean": float(np.mean([s["volume_cv"] for s in stats])),
                "compactness_score_median": float(np.median([s["compactness_score"]["median"] for s in stats])),
                "hu_std_within_mean": float(np.mean([s["hu_std_within_mean"] for s in stats])),
            },
            "layers": stats,
        },
        "process": result.layer_info,
        "figure": png_path.name,
    }
    with atomic_outputs() as out:  # the layers, their sidecar and the figure: all three or none
        save_volume(Volume(result.layers, affine4), out.path(nii_path), dtype=np.uint8)
        atomic_write_bytes(out.path(png_path), png)
        atomic_write_json(out.path(json_path), sidecar)
    summary = sidecar["statistics"]["summary"]
    log(f"{result.layers.shape[0]} layers x {summary['labels_per_layer']} supervoxels in {build_s:.1f} s; median "
        f"volume {summary['volume_ml_median']:.1f} mL, compactness {summary['compactness_score_median']:.2f}; "
        f"wrote {nii_path}, {json_path.name}, {png_path.name}")
    return sidecar


def run(args: argparse.Namespace) -> int:
    from slicreg.supervoxels import DEFAULT_COMPACTNESS

    options = {
        "n_layers": args.layers, "n_supervoxels": args.supervoxels, "n_segments": args.segments,
        "compactness": DEFAULT_COMPACTNESS if args.compactness is None else args.compactness, "seed": args.seed,
    }
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.layers, desc="supervoxel layers", leave=False)

    def progress(done: int) -> None:
        if bar is not None:
            bar.n = done
            bar.refresh()

    try:
        write_supervoxels(Path(args.image), Path(args.labels) if args.labels else None, Path(args.out),
                          mask_kind="body" if args.body_mask else "organs", distance_vox=args.distance_vox,
                          options=options, jobs=args.jobs, progress=progress, force=args.force)
    finally:
        if bar is not None:
            bar.close()
    return 0
