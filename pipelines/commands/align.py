"""``slicreg align``: register a moving CT to a fixed CT with the built-in toolkit (no external binary)."""

from __future__ import annotations

import argparse

NAME = "align"
HELP = ("register a moving CT to a fixed CT (affine + deformable, built-in); writes the fixed -> moving field "
        "in voxels, optionally warped images/labels and deeds files")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed image (NIfTI, HU)")
    p.add_argument("--moving", required=True, help="moving image (NIfTI, HU; same voxel size as fixed)")
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
    p.add_argument("--moving-labels", help="label map on the moving grid to warp onto the fixed grid (nearest)")
    p.add_argument("--out-warped-labels", help="output for the warped --moving-labels")
    p.add_argument("--out-warped", help="output for the warped moving image (trilinear)")
    p.add_argument("--deeds-out", metavar="STEM",
                   help="also write STEM_displacements.dat and STEM_matrix.txt (deeds format)")
    p.add_argument("--deeds-grid-spacing", type=int, default=4, help="control-grid spacing of the deeds export (4)")
    p.add_argument("--out-json", help="write timings, losses and the resolved preset here (JSON)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from slicreg.conventions import Volume
    from slicreg.errors import InputError
    from slicreg.io import atomic_write_json, load_image, load_labels, save_field, save_volume

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together (give both or neither)")
    if args.deeds_out:
        try:
            from slicreg import deeds
        except ImportError:
            raise InputError("--deeds-out: slicreg.deeds is not available in this installation") from None
    fixed = load_image(args.fixed)
    moving = load_image(args.moving)
    sp_f, sp_m = fixed.spacing_mm, moving.spacing_mm
    if not np.allclose(sp_f, sp_m, rtol=1e-3, atol=1e-3):
        raise InputError(f"{args.moving}: voxel size {np.round(sp_m, 4).tolist()} mm differs from the fixed image's "
                         f"{np.round(sp_f, 4).tolist()} mm; resample both to one voxel size first")
    labels = load_labels(args.moving_labels) if args.moving_labels else None
    if labels is not None and labels.shape != moving.shape:
        raise InputError(f"{args.moving_labels}: grid {labels.shape} does not match the moving image {moving.shape}")
    from pipelines.stages.align_pairs import load_fov_mask

    fixed_mask = load_fov_mask(args.fixed_fov, fixed.shape, "--fixed-fov") if args.fixed_fov else None
    moving_mask = load_fov_mask(args.moving_fov, moving.shape, "--moving-fov") if args.moving_fov else None
    init = None
    if args.init_field:
        from slicreg.io import load_field

        init = load_field(args.init_field, fixed=fixed).array

    import torch

    from slicreg.align import register_pair
    from slicreg.fields import warp_image, warp_labels

    if args.threads:
        torch.set_num_threads(int(args.threads))
    result = register_pair(fixed.array, moving.array, fixed_mask=fixed_mask, moving_mask=moving_mask, init_disp=init,
                           spacing_mm=tuple(float(s) for s in sp_f), preset=args.preset, device=args.device,
                           seed=args.seed, progress=not args.quiet)
    save_field(result.disp_vox, fixed.affine, args.out_field)
    written = [args.out_field]
    if args.out_warped:
        save_volume(Volume(warp_image(moving.array, result.disp_vox, device=args.device), fixed.affine),
                    args.out_warped)
        written.append(args.out_warped)
    if labels is not None:
        warped = warp_labels(labels.array, result.disp_vox, device=args.device)
        save_volume(Volume(warped, fixed.affine), args.out_warped_labels)
        written.append(args.out_warped_labels)
    if args.deeds_out:
        if fixed.shape != moving.shape:
            raise InputError("--deeds-out: deeds needs fixed and moving images of the same grid size, got "
                             f"{fixed.shape} and {moving.shape}")
        written.extend(str(p) for p in _write_deeds(deeds, result, args.deeds_out, args.deeds_grid_spacing))
    if args.out_json:
        atomic_write_json(args.out_json, {"fixed": args.fixed, "moving": args.moving, "preset": args.preset,
                                          "seed": args.seed, "affine_vox": result.affine_vox, **result.info})
        written.append(args.out_json)
    info = result.info
    print(f"registered in {info['seconds']:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in info['stages'].items())}); "
          f"{info['iterations']} iterations, final loss {info['final_loss']:.5f}, "
          f"det J <= 0 in {100 * info['folding_fraction']:.3f} % of voxels")
    if "fov" in info:
        fov = info["fov"]
        print(f"field of view: fixed {100 * fov['fixed_fraction']:.1f} %, moving {100 * fov['moving_fraction']:.1f} % "
              f"of their grids; {100 * fov['overlap']:.1f} % of the fixed one maps inside the moving one")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _write_deeds(deeds, result, stem: str, grid_spacing: int) -> list:
    """Export as deeds files: the affine part goes into the matrix, the rest (``x + u(x) - A x``, deeds' additive
    composition) onto deeds' control grid."""
    ctrl, matrix = deeds.deeds_from_field(result.disp_vox, grid_spacing=grid_spacing, affine=result.affine_vox)
    return list(deeds.write_deeds(stem, ctrl, matrix))
