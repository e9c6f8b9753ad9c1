"""``slicreg deeds-export``: a field file -> deeds' ``STEM_displacements.dat`` + ``STEM_matrix.txt``."""

from __future__ import annotations

import argparse

NAME = "deeds-export"
HELP = "write a field (voxels, fixed -> moving) as deeds' STEM_displacements.dat + STEM_matrix.txt (for applyBCV)"


INPUTS = ("field", "matrix")
OUTPUTS = ()


def derived_outputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The two deeds files written for the stem ``--out``."""
    stem = getattr(args, "out", None)
    if stem is None:
        return {}
    return {"--out": f"{stem}_displacements.dat", "--out (matrix)": f"{stem}_matrix.txt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--field", required=True, help="field (NIfTI (X, Y, Z, 3), voxels, fixed -> moving)")
    p.add_argument("--out", required=True, metavar="STEM",
                   help="output stem: writes STEM_displacements.dat and STEM_matrix.txt "
                        "(applyBCV -O STEM -A STEM_matrix.txt)")
    p.add_argument("--grid-spacing", type=int, default=4, help="control-grid spacing in voxels (default 4)")
    p.add_argument("--affine", choices=("identity", "fit"), default="identity",
                   help="identity matrix (default) or a least-squares affine in the matrix file with the remainder "
                        "in the displacements (more accurate near the border)")
    p.add_argument("--matrix", default=None,
                   help="put this deeds matrix (e.g. the linearBCV F_matrix.txt the field was imported with) in the "
                        "matrix file and only the remainder in the displacements (overrides --affine)")
    p.add_argument("--method", choices=("sample", "lstsq"), default="sample",
                   help="control values: the field sampled at the control nodes (default) or the least-squares fit "
                        "of deeds' upsampling to the whole field")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from slicreg.deeds import applybcv_grid_step, deeds_from_field, field_from_deeds, parse_matrix, write_deeds
    from slicreg.errors import InputError
    from slicreg.io import load_field

    if args.grid_spacing < 1:
        raise InputError(f"--grid-spacing: expected a positive integer, got {args.grid_spacing}")
    field = load_field(args.field)
    affine = args.affine
    if args.matrix is not None:
        path = Path(args.matrix)
        if not path.is_file():
            raise InputError(f"{path}: file not found (expected deeds' *_matrix.txt)")
        affine = parse_matrix(path.read_text(encoding="utf-8", errors="replace"), name=str(path))
    ctrl, matrix = deeds_from_field(field.array, grid_spacing=args.grid_spacing, affine=affine, method=args.method)
    dat, mat = write_deeds(args.out, ctrl, matrix)
    err = np.sqrt(((field_from_deeds(ctrl, field.shape, matrix=matrix) - field.array) ** 2).sum(axis=0))
    print(f"wrote {dat} (control grid {ctrl.shape[1:]}, grid spacing {args.grid_spacing}) and {mat}")
    print(f"deeds' reconstruction of the field: error mean {err.mean():.3f}, max {err.max():.3f} voxels")
    guess = applybcv_grid_step(field.shape, ctrl.shape[1:])
    if guess != args.grid_spacing:
        print(f"warning: deeds' applyBCV infers the grid step from the file size and will take {guess}, not "
              f"{args.grid_spacing}, for a {field.shape} image; it reads this file correctly only for image sides "
              f"that make the guess right (e.g. multiples of {args.grid_spacing})")
    return 0
