"""``slicreg deeds-import``: a deeds transform (``*_displacements.dat`` [+ ``*_matrix.txt``]) -> a field file."""

from __future__ import annotations

import argparse

NAME = "deeds-import"
HELP = "convert deeds' *_displacements.dat (+ *_matrix.txt) into a field (voxels, fixed -> moving)"


def _spacing(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        g = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if g < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return g


INPUTS = ("dat", "matrix", "fixed", "moving")
OUTPUTS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dat", required=True, help="deeds' F_displacements.dat (raw float32 control-grid displacements)")
    p.add_argument("--matrix", default=None, help="deeds' F_matrix.txt (the affine from linearBCV; default identity)")
    p.add_argument("--fixed", required=True,
                   help="the fixed image deeds was run with (-F); gives the grid shape and the output affine")
    p.add_argument("--grid-spacing", type=_spacing, default=4, metavar="G|auto",
                   help="grid spacing of deeds' last level (-G, default 4); 'auto' infers it when the file size "
                        "allows exactly one spacing")
    p.add_argument("--out", required=True, help="output field (NIfTI; fixed -> moving; see --field-format)")
    p.add_argument("--field-format", choices=("voxels", "itk"), default="voxels",
                   help="voxels (default) -- (X, Y, Z, 3) in voxels, the Learn2Reg layout; itk -- ITK displacement "
                        "field in world millimetres (LPS) for SimpleITK, ANTs and 3D Slicer (needs --moving)")
    p.add_argument("--moving", default=None,
                   help="the moving image deeds was run with (-M): where its voxels lie in the world, for "
                        "--field-format itk")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from slicreg.deeds import read_deeds
    from slicreg.errors import InputError
    from slicreg.io import check_field_format, load_volume, save_field_as

    check_field_format(args.field_format, args.out)
    if args.field_format == "itk" and args.moving is None:
        raise InputError("--field-format itk: needs --moving (the moving image deeds was run with), whose grid turns "
                         "deeds' voxel displacements into world millimetres")
    fixed = load_volume(args.fixed)
    moving = load_volume(args.moving) if args.moving else None
    if moving is not None and moving.shape != fixed.shape:
        raise InputError(f"--moving {args.moving}: grid {moving.shape} differs from --fixed {args.fixed}'s "
                         f"{fixed.shape}; deeds registers images of one grid size")
    transform = read_deeds(args.dat, fixed.shape, matrix_path=args.matrix, grid_spacing=args.grid_spacing)
    field = transform.to_field()
    save_field_as(field, fixed.affine, None if moving is None else moving.affine, args.out, args.field_format)
    how = "inferred from the file size" if transform.grid_spacing_inferred else "as given"
    mag = np.sqrt((field.astype(np.float64) ** 2).sum(axis=0))
    print(f"grid spacing {transform.grid_spacing} ({how}), control grid {transform.ctrl_vox.shape[1:]}, "
          f"fixed grid {fixed.shape}; matrix: {'from ' + args.matrix if args.matrix else 'identity'}")
    print(f"wrote {args.out}: |u| mean {mag.mean():.2f}, max {mag.max():.2f} voxels")
    return 0
