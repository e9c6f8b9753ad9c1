"""``slicreg align``: register a moving CT to a fixed CT with the built-in toolkit (no external binary)."""

from __future__ import annotations

import argparse

NAME = "align"
HELP = ("register a moving CT to a fixed CT (affine + deformable, built-in); writes the fixed -> moving field "
        "in voxels, optionally warped images/labels and deeds files")


INPUTS = ("fixed", "moving", "fixed_fov", "moving_fov", "init_field", "moving_labels")
OUTPUTS = ("out_field", "out_warped_labels", "out_warped", "out_json")


def derived_outputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The two deeds files written for the stem ``--deeds-out``."""
    stem = getattr(args, "deeds_out", None)
    found = {}
    if getattr(args, "field_format", None) == "deeds":  # then --out-field is a deeds stem
        from slicreg.io import field_output_files

        dat, mat = field_output_files(args.out_field, "deeds")
        found = {"--out-field": str(dat), "--out-field (deeds matrix)": str(mat)}
    if stem is None:
        return found
    return {**found, "--deeds-out": f"{stem}_displacements.dat", "--deeds-out (matrix)": f"{stem}_matrix.txt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed image (NIfTI, HU)")
    p.add_argument("--moving", required=True,
                   help="moving image (NIfTI, HU; same voxel size as fixed, any axis order: it is registered in the "
                        "fixed image's axis order and the field indexes its own voxels)")
    p.add_argument("--out-field", required=True,
                   help="output field (NIfTI (X, Y, Z, 3) float32, voxels, fixed -> moving, affine included)")
    p.add_argument("--field-format", choices=("voxels", "itk", "deeds"), default="voxels",
                   help="how --out-field is written (docs/formats.md): voxels (default) -- (X, Y, Z, 3) in voxels of "
                        "the moving scan (Learn2Reg layout); itk -- ITK displacement field in world millimetres "
                        "(LPS) for SimpleITK, ANTs and 3D Slicer; deeds -- --out-field is a stem for "
                        "STEM_displacements.dat + STEM_matrix.txt (as --deeds-out)")
    p.add_argument("--preset", default="abdomen-ct",
                   help="registration preset: abdomen-ct (default), abdomen-ct-svf (diffeomorphic), affine")
    p.add_argument("--fixed-fov", metavar="FOV",
                   help="field of view of the fixed image: its crop record (crops/<id>.json of a preprocessed dataset) "
                        "or a mask NIfTI on its grid (non-zero = inside); the similarity ignores the rest (padding)")
    p.add_argument("--moving-fov", metavar="FOV", help="field of view of the moving image (as --fixed-fov)")
    p.add_argument("--init-field", metavar="U0",
                   help="start the deformable stage from this field (NIfTI (X, Y, Z, 3), voxels, fixed -> moving, on "
                        "the fixed grid); the preset's affine stage is skipped")
    p.add_argument("--moving-labels", help="label map on the moving grid to warp onto the fixed grid (nearest; the "
                                           "same grid in another axis order is reoriented)")
    p.add_argument("--out-warped-labels", help="output for the warped --moving-labels")
    p.add_argument("--out-warped", help="output for the warped moving image (trilinear)")
    p.add_argument("--deeds-out", metavar="STEM",
                   help="also write STEM_displacements.dat and STEM_matrix.txt (deeds format)")
    p.add_argument("--deeds-grid-spacing", type=int, default=4, help="control-grid spacing of the deeds export (4)")
    p.add_argument("--out-json", help="write timings, losses and the resolved preset here (JSON)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="accept images that do not look like CT in HU (a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from slicreg.checks import axcodes, grid_description
    from slicreg.conventions import Volume
    from slicreg.errors import InputError
    from slicreg.io import atomic_outputs, atomic_write_json, save_volume

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together (give both or neither)")
    from slicreg.io import check_field_format, deeds_stem, save_field_as

    check_field_format(args.field_format, args.out_field)
    if args.deeds_out or args.field_format == "deeds":
        try:
            from slicreg import deeds
        except ImportError:
            raise InputError("--deeds-out: slicreg.deeds is not available in this installation") from None
    from slicreg.api import prepare_align, run_align

    # world-space handling (one axis order, voxel sizes, fields of view, labels, a starting field): in the core
    inputs = prepare_align(args.fixed, args.moving, fixed_fov=args.fixed_fov, moving_fov=args.moving_fov,
                           init_field=args.init_field, moving_labels=args.moving_labels, force=args.force,
                           names={"fixed_fov": "--fixed-fov", "moving_fov": "--moving-fov"})
    fixed, moving, moving_r, labels = inputs.fixed, inputs.moving, inputs.moving_r, inputs.moving_labels
    if (args.deeds_out or args.field_format == "deeds") and fixed.shape != moving.shape:  # deeds reads both arrays
        flag = "--deeds-out" if args.deeds_out else "--field-format deeds"
        raise InputError(f"{flag}: deeds needs fixed and moving images of the same grid size, got "
                         f"{fixed.shape} ({args.fixed}) and {moving.shape} ({args.moving})")
    _note_initial_placement(inputs)

    import torch

    from slicreg.fields import warp_image, warp_labels

    if args.threads:
        torch.set_num_threads(int(args.threads))
    result = run_align(inputs, preset=args.preset, device=args.device, seed=args.seed, progress=not args.quiet)
    disp, affine_vox = result.disp_vox, result.affine_vox  # into the voxels of the file given as --moving
    written = [args.out_field]
    with atomic_outputs() as out:  # all outputs or none: a kill never leaves a mixed set
        if args.field_format == "deeds":  # the registration's own affine part goes into the matrix
            written = [str(p) for p in _write_deeds(deeds, disp, affine_vox, deeds_stem(args.out_field),
                                                    args.deeds_grid_spacing, out)]
        else:
            save_field_as(disp, fixed.affine, moving.affine, args.out_field, args.field_format, outputs=out)
        if args.out_warped:
            save_volume(Volume(warp_image(moving.array, disp, device=args.device), fixed.affine),
                        out.path(args.out_warped))
            written.append(args.out_warped)
        if labels is not None:
            warped = warp_labels(labels.array, disp, device=args.device)
            save_volume(Volume(warped, fixed.affine), out.path(args.out_warped_labels))
            written.append(args.out_warped_labels)
        if args.deeds_out:
            written.extend(str(p) for p in _write_deeds(deeds, disp, affine_vox, args.deeds_out,
                                                        args.deeds_grid_spacing, out))
        if args.out_json:
            atomic_write_json(out.path(args.out_json), {
                "fixed": args.fixed, "moving": args.moving, "preset": args.preset, "seed": args.seed,
                "affine_vox": affine_vox,
                "orientation": {"fixed": axcodes(fixed.affine), "moving": axcodes(moving.affine),
                                "moving_grid": grid_description(moving), "registered_as": axcodes(moving_r.affine)},
                **result.info})
            written.append(args.out_json)
    info = result.info
    if moving_r is not moving:
        print(f"moving image {axcodes(moving.affine)} registered in the fixed image's axis order "
              f"{axcodes(fixed.affine)}; the field indexes the moving file's own voxels")
    print(f"registered in {info['seconds']:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in info['stages'].items())}); "
          f"{info['iterations']} iterations, final loss {info['final_loss']:.5f}, "
          f"det J <= 0 in {100 * info['folding_fraction']:.3f} % of voxels")
    if "fov" in info:
        fov = info["fov"]
        print(f"field of view: fixed {100 * fov['fixed_fraction']:.1f} %, moving {100 * fov['moving_fraction']:.1f} % "
              f"of their grids; {100 * fov['overlap']:.1f} % of the fixed one maps inside the moving one")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _note_initial_placement(inputs) -> None:
    """Print a note when the engine's start (grid centre onto grid centre) is not the world identity.

    :func:`slicreg.alignment.register_pair` starts its affine stage with the fixed grid's centre on the moving grid's
    centre (then searches translations); it takes no initial affine. For two grids of the same world box (e.g. one
    scan stored in two orientations) that is the world identity; otherwise the difference is reported here."""
    import numpy as np

    offset = inputs.start_offset_mm  # None when a starting field is given
    if offset is not None and offset > float(np.max(inputs.fixed.spacing_mm)):
        print(f"note: the grid centres are {offset:.1f} mm apart in world space; the registration starts from the "
              f"grid centres aligned (then searches translations), not from the world coordinates")


def _write_deeds(deeds, disp_vox, affine_vox, stem: str, grid_spacing: int, outputs) -> list:
    """Export as deeds files: the affine part ``affine_vox`` (fixed voxel -> moving voxel, 4x4) goes into the matrix,
    the rest of ``disp_vox`` (``x + u(x) - A x``, deeds' additive composition) onto deeds' control grid."""
    ctrl, matrix = deeds.deeds_from_field(disp_vox, grid_spacing=grid_spacing, affine=affine_vox)
    return list(deeds.write_deeds(stem, ctrl, matrix, outputs=outputs))
