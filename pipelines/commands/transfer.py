"""``slicreg transfer``: carry template supervoxels onto a subject through a template-registration field."""

from __future__ import annotations

import argparse

NAME = "transfer"
HELP = "sample template supervoxels (4 mm) through a field (subject 2 mm grid, subject -> template) onto the subject"


INPUTS = ("supervoxels", "field", "fixed")
OUTPUTS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--supervoxels", required=True,
                   help="template supervoxels (NIfTI (X4, Y4, Z4, L) uint8 on the template's 4 mm grid)")
    p.add_argument("--field", required=True,
                   help="field on the subject's 2 mm grid (X, Y, Z, 3), voxels, fixed = subject, moving = template")
    p.add_argument("--fixed", required=True,
                   help="the subject's 2 mm image (only its grid is used, not its intensities: the field must lie on "
                        "it, same shape and affine; it gives the output's affine)")
    p.add_argument("--out", required=True, help="the subject's supervoxels (NIfTI, uint8, 4 mm grid)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    from slicreg.conventions import Volume, downsample_affine
    from slicreg.errors import InputError
    from slicreg.io import load_field, load_volume, save_volume
    from slicreg.transfer import check_transfer, reached_region, sample_layers, template_positions

    sv = load_volume(args.supervoxels, kind="labels", channels=True)
    if sv.n_channels is None:
        raise InputError(f"{args.supervoxels}: expected supervoxel layers (X, Y, Z, L), got a 3-D volume")
    fixed = load_volume(args.fixed)
    field = load_field(args.field, fixed=fixed)
    pos = template_positions(field.array, factor=2, device=args.device)
    out = sample_layers(sv.array, pos)
    save_volume(Volume(out, downsample_affine(fixed.affine, 2)), args.out)
    checks = check_transfer(sv.array, out, reached=reached_region(field.array, sv.shape))
    lost = sum(len(c.lost) for c in checks)
    edge = sum(len(c.lost_at_edge) for c in checks)
    print(f"wrote {args.out}: {out.shape[0]} layers {out.shape[1:]} {out.dtype}")
    print(f"labels kept per layer: {[c.n_kept for c in checks]} of {[c.n_template for c in checks]}; "
          f"lost {lost} ({edge} at the field of view's edge)")
    return 0
