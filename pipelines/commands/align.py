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
    if stem is None:
        return {}
    return {"--deeds-out": f"{stem}_displacements.dat", "--deeds-out (matrix)": f"{stem}_matrix.txt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed image (NIfTI, HU)")
    p.add_argument("--moving", required=True,
                   help="moving image (NIfTI, HU; same voxel size as fixed, any axis order: it is registered in the "
                        "fixed image's axis order and the field indexes its own voxels)")
    p.add_argument("--out-field", required=True,
                   help="output field (NIfTI (X, Y, Z, 3) float32, voxels, fixed -> moving, affine included)")
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
    import numpy as np

    from slicreg.checks import (apply_index_map_to_field, axcodes, check_ct_like, grid_description, match_grid,
                                orientation_index_map, reorient_like)
    from slicreg.conventions import Volume
    from slicreg.errors import InputError
    from slicreg.io import atomic_outputs, atomic_write_json, load_image, load_labels, save_field, save_volume

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together (give both or neither)")
    if args.deeds_out:
        try:
            from slicreg import deeds
        except ImportError:
            raise InputError("--deeds-out: slicreg.deeds is not available in this installation") from None
    fixed = load_image(args.fixed)
    check_ct_like(fixed.array, name=args.fixed, force=args.force)
    moving = load_image(args.moving)
    check_ct_like(moving.array, name=args.moving, force=args.force)
    # The registration runs on the moving image permuted / flipped to the fixed image's axis order (lossless), so
    # that both arrays run along the same world axes; the field is mapped back to the original moving array below.
    to_moving = orientation_index_map(moving, fixed.affine)  # reoriented moving voxel -> original moving voxel
    moving_r = reorient_like(moving, fixed.affine)
    sp_f, sp_m = fixed.spacing_mm, moving_r.spacing_mm
    if not np.allclose(sp_f, sp_m, rtol=1e-3, atol=1e-3):
        raise InputError(f"{args.moving}: voxel size {np.round(sp_m, 4).tolist()} mm (in the fixed image's axis "
                         f"order {axcodes(fixed.affine)}; the file is {axcodes(moving.affine)}) differs from the "
                         f"fixed image {args.fixed}'s {np.round(sp_f, 4).tolist()} mm; resample both to one voxel "
                         f"size first")
    if args.deeds_out and fixed.shape != moving.shape:  # deeds reads both files' arrays as they are stored
        raise InputError(f"--deeds-out: deeds needs fixed and moving images of the same grid size, got "
                         f"{fixed.shape} ({args.fixed}) and {moving.shape} ({args.moving})")
    labels = None
    if args.moving_labels:
        labels = match_grid(load_labels(args.moving_labels), moving, name=args.moving_labels,
                            reference_name=args.moving, what="labels", reference_what="moving image", tol_mm=1e-2)
    from pipelines.stages.align_pairs import load_fov_mask

    fixed_mask = load_fov_mask(args.fixed_fov, fixed.shape, "--fixed-fov") if args.fixed_fov else None
    moving_mask = None
    if args.moving_fov:
        mask = load_fov_mask(args.moving_fov, moving.shape, "--moving-fov")
        moving_mask = reorient_like(Volume(mask, moving.affine), fixed.affine).array
    init = None
    if args.init_field:
        from slicreg.io import load_field

        # the file's targets are original moving voxels; the engine works with the reoriented moving array
        init = apply_index_map_to_field(load_field(args.init_field, fixed=fixed).array, np.linalg.inv(to_moving))
    _note_initial_placement(fixed, moving_r, started=init is not None)

    import torch

    from slicreg.align import register_pair
    from slicreg.fields import warp_image, warp_labels

    if args.threads:
        torch.set_num_threads(int(args.threads))
    result = register_pair(fixed.array, moving_r.array, fixed_mask=fixed_mask, moving_mask=moving_mask,
                           init_disp=init, spacing_mm=tuple(float(s) for s in sp_f), preset=args.preset,
                           device=args.device, seed=args.seed, progress=not args.quiet)
    # back to the original moving array: x + u(x) is a voxel of the file given as --moving
    disp = apply_index_map_to_field(result.disp_vox, to_moving)
    affine_vox = to_moving @ result.affine_vox
    written = [args.out_field]
    with atomic_outputs() as out:  # all outputs or none: a kill never leaves a mixed set
        save_field(disp, fixed.affine, out.path(args.out_field))
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


def _note_initial_placement(fixed, moving_r, *, started: bool) -> None:
    """Print a note when the engine's start (grid centre onto grid centre) is not the world identity.

    :func:`slicreg.align.register_pair` starts its affine stage with the fixed grid's centre on the moving grid's
    centre (then searches translations); it takes no initial affine. For two grids of the same world box (e.g. one
    scan stored in two orientations) that is the world identity; otherwise the difference is reported here."""
    import numpy as np

    if started:
        return
    c_f = fixed.affine @ np.append((np.asarray(fixed.shape) - 1) / 2.0, 1.0)
    c_m = moving_r.affine @ np.append((np.asarray(moving_r.shape) - 1) / 2.0, 1.0)
    offset = float(np.linalg.norm((c_f - c_m)[:3]))
    if offset > float(np.max(fixed.spacing_mm)):
        print(f"note: the grid centres are {offset:.1f} mm apart in world space; the registration starts from the "
              f"grid centres aligned (then searches translations), not from the world coordinates")


def _write_deeds(deeds, disp_vox, affine_vox, stem: str, grid_spacing: int, outputs) -> list:
    """Export as deeds files: the affine part ``affine_vox`` (fixed voxel -> moving voxel, 4x4) goes into the matrix,
    the rest of ``disp_vox`` (``x + u(x) - A x``, deeds' additive composition) onto deeds' control grid."""
    ctrl, matrix = deeds.deeds_from_field(disp_vox, grid_spacing=grid_spacing, affine=affine_vox)
    return list(deeds.write_deeds(stem, ctrl, matrix, outputs=outputs))
