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


INPUTS = ("dat", "matrix", "fixed")
OUTPUTS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dat", required=True, help="deeds' F_displacements.dat (raw float32 control-grid displacements)")
    p.add_argument("--matrix", default=None, help="deeds' F_matrix.txt (the affine from linearBCV; default identity)")
    p.add_argument("--fixed", required=True,
                   help="the fixed image deeds was run with (-F); gives the grid shape and the output affine")
    p.add_argument("--grid-spacing", type=_spacing, default=4, metavar="G|auto",
                   help="grid spacing of deeds' last level (-G, default 4); 'auto' infers it when the file size "
                        "allows exactly one spacing")
    p.add_argument("--out", required=True, help="output field (NIfTI (X, Y, Z, 3), voxels, fixed -> moving)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from slicreg.deeds import read_deeds
    from slicreg.io import load_volume, save_field

    fixed = load_volume(args.fixed)
    transform = read_deeds(args.dat, fixed.shape, matrix_path=args.matrix, grid_spacing=args.grid_spacing)
    field = transform.to_field()
    save_field(field, fixed.affine, args.out)
    how = "inferred from the file size" if transform.grid_spacing_inferred else "as given"
    mag = np.sqrt((field.astype(np.float64) ** 2).sum(axis=0))
    print(f"grid spacing {transform.grid_spacing} ({how}), control grid {transform.ctrl_vox.shape[1:]}, "
          f"fixed grid {fixed.shape}; matrix: {'from ' + args.matrix if args.matrix else 'identity'}")
    print(f"wrote {args.out}: |u| mean {mag.mean():.2f}, max {mag.max():.2f} voxels")
    return 0
