"""``slicreg warp``: apply a displacement field to an image or a label map."""

from __future__ import annotations

import argparse

NAME = "warp"
HELP = "warp a moving image (linear) or label map (--labels, nearest) with a field (voxels, fixed -> moving)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moving", required=True, help="moving image or label map (NIfTI)")
    p.add_argument("--field", required=True, help="displacement field (X, Y, Z, 3) in voxels, fixed -> moving")
    p.add_argument("--out", required=True, help="warped output (NIfTI, on the field's grid)")
    p.add_argument("--labels", action="store_true", help="the moving volume is a label map: nearest, integer out")
    p.add_argument("--padding", choices=["border", "zeros"], default=None,
                   help="outside the moving grid: border = continue the edge value (deeds' rule; default for "
                        "images), zeros = background (default for labels, as Learn2Reg)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    from slicreg.conventions import Volume
    from slicreg.fields import warp_image, warp_labels
    from slicreg.io import load_field, load_image, load_labels, save_volume

    moving = load_labels(args.moving) if args.labels else load_image(args.moving)
    field = load_field(args.field)
    padding = args.padding or ("zeros" if args.labels else "border")
    warp = warp_labels if args.labels else warp_image
    warped = warp(moving.array, field.array, padding=padding, device=args.device)
    save_volume(Volume(warped, field.affine), args.out)
    print(f"wrote {args.out} ({'labels, nearest' if args.labels else 'image, linear'}; grid {field.shape})")
    return 0
