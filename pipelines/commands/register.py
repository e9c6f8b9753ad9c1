"""``slicreg register``: register two abdominal CTs by their predicted supervoxels."""

from __future__ import annotations

import argparse

NAME = "register"
HELP = "register two CTs (raw or preprocessed) by predicted supervoxels; writes the field and warped outputs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed CT (NIfTI, HU); raw or preprocessed (2 mm, 192x160x256)")
    p.add_argument("--moving", required=True, help="moving CT (NIfTI, HU)")
    p.add_argument("--weights", default=None, help="weights bundle folder (default: the shipped bundle)")
    p.add_argument("--out-field", required=True, help="field (X, Y, Z, 3), voxels of the fixed image, fixed -> moving")
    p.add_argument("--out-warped", default=None, help="warped moving image on the fixed grid")
    p.add_argument("--moving-labels", default=None, help="moving label map to warp (nearest)")
    p.add_argument("--out-warped-labels", default=None, help="where to write the warped moving labels")
    p.add_argument("--moving-is-template", action="store_true",
                   help="the moving scan is the bundle's template: use its own supervoxels (atlas mode)")
    p.add_argument("--force", action="store_true", help="accept images that do not look like CT")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the feature permutation (default 0)")
    p.add_argument("--verbose", action="store_true", help="print per-step timings")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from pipelines.registration import load_weights, preprocess_for_registration, register_preprocessed
    from preprocessing.geometry import field_to_original_grid
    from slicreg.conventions import Volume
    from slicreg.errors import InputError
    from slicreg.fields import warp_image, warp_labels
    from slicreg.io import load_image, load_labels, save_field, save_volume

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together")
    t0 = time.perf_counter()
    bundle = load_weights(args.weights, device=args.device)
    fixed, moving = load_image(args.fixed), load_image(args.moving)
    moving_labels = load_labels(args.moving_labels) if args.moving_labels else None
    if moving_labels is not None and moving_labels.shape != moving.shape:
        raise InputError(f"{args.moving_labels}: label grid {moving_labels.shape} does not match the moving image "
                         f"{moving.shape}")
    t_load = time.perf_counter() - t0
    fixed_p = preprocess_for_registration(fixed, name=args.fixed, force=args.force)
    moving_p = preprocess_for_registration(moving, name=args.moving, force=args.force)
    result = register_preprocessed(bundle, fixed_p.image.array, moving_p.image.array, device=args.device,
                                   seed=args.seed, moving_is_template=args.moving_is_template)
    t1 = time.perf_counter()
    disp = field_to_original_grid(result.disp_vox, fixed_p.record, moving_p.record) \
        if not (fixed_p.identity and moving_p.identity) else result.disp_vox
    t_back = time.perf_counter() - t1
    save_field(disp, fixed.affine, args.out_field)
    t2 = time.perf_counter()
    if args.out_warped:
        save_volume(Volume(warp_image(moving.array, disp, device=args.device), fixed.affine), args.out_warped)
    if moving_labels is not None:
        warped = warp_labels(moving_labels.array, disp, device=args.device)
        save_volume(Volume(warped, fixed.affine), args.out_warped_labels)
    t_warp = time.perf_counter() - t2
    total = time.perf_counter() - t0
    print(f"wrote {args.out_field} (fixed grid {fixed.shape}, voxels, fixed -> moving) in {total:.1f} s")
    if args.verbose:
        steps = {"load": t_load, **result.info["timings_s"], "map back": t_back, "warp + write": t_warp}
        for name, seconds in steps.items():
            print(f"  {name:<22} {seconds:7.2f} s")
    return 0
