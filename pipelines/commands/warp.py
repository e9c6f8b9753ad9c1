"""``slicreg warp``: apply a displacement field to an image or a label map."""

from __future__ import annotations

import argparse

NAME = "warp"
HELP = "warp a moving image (linear) or label map (--labels, nearest) with a field (voxels, fixed -> moving)"


INPUTS = ("moving", "field")
OUTPUTS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moving", required=True, help="moving image or label map (NIfTI)")
    p.add_argument("--field", required=True, help="displacement field (X, Y, Z, 3) in voxels, fixed -> moving")
    p.add_argument("--out", required=True, help="warped output (NIfTI, on the field's grid)")
    p.add_argument("--labels", action="store_true", help="the moving volume is a label map: nearest, integer out")
    p.add_argument("--padding", choices=["border", "zeros"], default=None,
                   help="outside the moving grid: border = continue the edge value (deeds' rule; default for "
                        "images), zeros = background (default for labels, as Learn2Reg)")
    p.add_argument("--deeds-rules", action="store_true",
                   help="sample exactly as deeds does, to reproduce its _deformed(_seg).nii.gz from an imported "
                        "field: images trilinear, labels rounded to the nearest voxel (halves away from zero), "
                        "coordinates clamped to the grid (the edge label continues outside; implies --padding "
                        "border); runs on the CPU with numpy")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    from slicreg.conventions import Volume
    from slicreg.errors import InputError
    from slicreg.io import load_field, load_image, load_labels, save_volume

    if args.deeds_rules and args.padding == "zeros":
        raise InputError("--padding zeros contradicts --deeds-rules: deeds clamps coordinates to the grid "
                         "(border); drop one of the two")
    moving = load_labels(args.moving) if args.labels else load_image(args.moving)
    field = load_field(args.field, moving=moving)  # a voxel field, or an ITK field (mm) converted on this grid
    if args.deeds_rules:
        from slicreg.deeds import warp_image_field_deeds, warp_labels_field_deeds

        warp_deeds = warp_labels_field_deeds if args.labels else warp_image_field_deeds
        warped = warp_deeds(moving.array, field.array)
        rule = "deeds' rules: " + ("labels, rounded, clamped" if args.labels else "image, linear, clamped")
    else:
        from slicreg.fields import warp_image, warp_labels

        padding = args.padding or ("zeros" if args.labels else "border")
        warp = warp_labels if args.labels else warp_image
        warped = warp(moving.array, field.array, padding=padding, device=args.device)
        rule = f"{'labels, nearest' if args.labels else 'image, linear'}, padding {padding}"
    save_volume(Volume(warped, field.affine), args.out)
    print(f"wrote {args.out} ({rule}; grid {field.shape})")
    return 0
