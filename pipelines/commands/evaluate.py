"""``slicreg evaluate``: score one registration the Learn2Reg way (Dice, HD95, Jacobian, field error)."""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = ("score a registration: warp the moving labels with the field (nearest, as Learn2Reg), print Dice / HD95 "
        "per organ and Jacobian statistics; without --field score the unregistered pair")


def parse_labels(text: str) -> list[int]:
    """``"1..13"``, ``"1,2,3,6"`` or a mix such as ``"1..4,6"`` -> sorted unique label ids (> 0)."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if ".." in part:
                lo, hi = part.split("..", 1)
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected label ids like 1..13 or 1,2,3,6, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected label ids >= 1 (0 is background), got {text!r}")
    return sorted(out)


INPUTS = ("fixed_labels", "moving_labels", "field", "gt_field", "mask")
OUTPUTS = ("json", "csv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed-labels", required=True, metavar="F", help="fixed label map (NIfTI, integer ids)")
    p.add_argument("--moving-labels", required=True, metavar="M", help="moving label map (NIfTI, integer ids)")
    p.add_argument("--field", metavar="U", default=None,
                   help="displacement field (X, Y, Z, 3) in voxels, fixed -> moving, on the fixed grid; "
                        "omitted: score the unregistered pair (the 'initial' row)")
    p.add_argument("--labels", type=parse_labels, default=list(range(1, 14)), metavar="IDS",
                   help="label ids to score, e.g. 1..13 (default) or 1,2,3,6")
    p.add_argument("--gt-field", metavar="G", default=None,
                   help="ground-truth field (same layout as --field): report the field error in mm")
    p.add_argument("--mask", metavar="MASK", default=None,
                   help="mask on the fixed grid (NIfTI, non-zero = inside) for the field error (default: all voxels)")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (surface distances)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every score as JSON")
    p.add_argument("--csv", metavar="OUT", default=None, help="write the per-organ table as CSV")


def check_label_map(volume, path: str) -> None:
    """Reject label maps that cannot be organ labels (negative ids, or an image passed by mistake)."""
    import numpy as np

    from slicreg.errors import InputError

    arr = volume.array
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"{path}: label ids must be >= 0, got minimum {int(arr.min())} "
                         f"(is this an intensity image rather than a label map?)")
    n = int(np.unique(arr).size)
    if n > 1000:
        raise InputError(f"{path}: {n} distinct values, expected a label map with few ids "
                         f"(is this an intensity image rather than a label map?)")


def labels_in_world(moving, fixed, *, moving_name: str, fixed_name: str):
    """Moving labels resampled onto the fixed grid by world coordinates: the unregistered pair in world space.

    Args:
        moving, fixed: label :class:`~slicreg.conventions.Volume` objects (``(X', Y', Z')`` and ``(X, Y, Z)``, any
            orientations, spacings and origins).
        moving_name, fixed_name: their files, for messages.

    Returns:
        ``(warped, disp)``: ``warped`` ``(X, Y, Z)`` (moving dtype), the moving label at the nearest moving voxel
        of each fixed voxel's world position, background (0) outside the moving grid -- exactly
        ``scipy.ndimage.map_coordinates(..., order=0, mode="constant")`` at ``x + disp(x)``; ``disp``
        ``(3, X, Y, Z)`` float32, the world identity as a field (fixed voxel -> moving voxel).

    Raises:
        InputError: the two grids do not overlap in world space.
    """
    import numpy as np

    from slicreg.checks import grid_description
    from slicreg.conventions import identity_grid_vox
    from slicreg.errors import InputError
    from slicreg.metrics import warp_labels_learn2reg

    index_map = np.linalg.inv(moving.affine) @ fixed.affine  # fixed voxel -> moving voxel
    grid = identity_grid_vox(fixed.shape, dtype=np.float64)
    disp = np.einsum("ab,b...->a...", index_map[:3, :3], grid)
    disp += index_map[:3, 3, None, None, None]
    disp -= grid
    # snap displacements within 1e-6 voxels of an integer (a pure axis permutation / flip / whole-voxel shift) to
    # it, so that nearest-neighbour sampling is exact there and not at the mercy of rounding
    near = np.round(disp)
    np.copyto(disp, near, where=np.abs(disp - near) < 1e-6)
    del near
    inside = np.ones(fixed.shape, dtype=bool)
    for a in range(3):
        pos = grid[a] + disp[a]
        inside &= (pos >= 0) & (pos <= moving.shape[a] - 1)
    if not inside.any():
        raise InputError(f"grids do not overlap: no voxel of the fixed labels {fixed_name} "
                         f"({grid_description(fixed)}) lies inside the moving labels {moving_name} "
                         f"({grid_description(moving)}) in world space")
    warped = warp_labels_learn2reg(moving.array, disp)
    return warped.astype(moving.array.dtype, copy=False), disp.astype(np.float32)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from slicreg.checks import grid_description, match_grid, same_grid
    from slicreg.errors import InputError
    from slicreg.io import atomic_outputs, atomic_write_json, atomic_write_text, load_field, load_labels, load_volume
    from slicreg.labels import BTCV_LABELS
    from slicreg.metrics import evaluate_pair, warp_labels_learn2reg
    from slicreg.report import csv_text, fmt, json_ready, pair_csv_rows, pair_table

    fixed = load_labels(args.fixed_labels)
    check_label_map(fixed, args.fixed_labels)
    moving = load_labels(args.moving_labels)
    check_label_map(moving, args.moving_labels)
    notes: list[str] = []
    present = set(np.unique(fixed.array).tolist()) | set(np.unique(moving.array).tolist())
    if not present & set(args.labels):
        raise InputError(f"--labels: none of the ids {args.labels[:13]}{' ...' if len(args.labels) > 13 else ''} "
                         f"occurs in {args.fixed_labels} or {args.moving_labels} (they hold "
                         f"{sorted(present - {0})[:20]}); choose ids that are in the label maps")
    disp = None
    world_disp = None  # without --field, on differing grids: the world identity as a voxel field
    if args.field is not None:
        field = load_field(args.field, fixed=fixed)  # on the fixed grid (shape and affine), or refused
        disp = field.array.astype(np.float64)
        warped = warp_labels_learn2reg(moving.array, disp)
    elif same_grid(moving, fixed):
        warped = moving.array
    else:
        warped, world_disp = labels_in_world(moving, fixed, moving_name=args.moving_labels,
                                             fixed_name=args.fixed_labels)
        notes.append(f"note: the moving labels ({grid_description(moving)}) were resampled onto the fixed grid "
                     f"({grid_description(fixed)}) by world coordinates (nearest, background outside)")
    true_disp = None
    if args.gt_field is not None:
        true_disp = load_field(args.gt_field, fixed=fixed).array
        if world_disp is not None:
            # the unregistered pair's correspondence is the world identity, not the zero voxel field that
            # evaluate_pair assumes without a field: score it as the error of that field
            true_disp = true_disp - world_disp
    mask = None
    if args.mask is not None:
        if args.gt_field is None:
            raise InputError("--mask restricts the field error and needs --gt-field")
        mask_vol = match_grid(load_volume(args.mask), fixed, name=args.mask, reference_name=args.fixed_labels,
                              what="mask", reference_what="fixed labels")
        mask = mask_vol.array != 0

    result = evaluate_pair(fixed.array, moving.array, warped, disp_vox=disp, labels=args.labels,
                           affine=fixed.affine, true_disp_vox=true_disp, error_mask=mask, hd95=not args.no_hd95)
    names = dict(BTCV_LABELS)
    print(f"fixed   {args.fixed_labels}\nmoving  {args.moving_labels}\n"
          f"field   {args.field or 'none (initial: the unregistered pair)'}\n"
          f"grid    {fixed.shape}, spacing {', '.join(f'{s:.3g}' for s in fixed.spacing_mm)} mm\n")
    for note in notes:
        print(note)
    print(pair_table(result, names))
    jac = result["jacobian"]
    if jac is not None:
        print(f"Jacobian (interior, {jac['n_voxels']} voxels): SDlogJ (Learn2Reg) "
              f"{fmt(jac['sdlogj_learn2reg'], digits=4)} | std log det J (det > 0) "
              f"{fmt(jac['std_log_det'], digits=4)} | det J <= 0: {fmt(jac['folding_percent'], digits=4)} % | "
              f"det min {fmt(jac['det_min'], digits=3)}, max {fmt(jac['det_max'], digits=3)}")
    err = result["field_error"]
    if err is not None:
        print(f"Field error vs ground truth ({err['n_voxels']} voxels): mean {fmt(err['mean_mm'], digits=2)} mm, "
              f"median {fmt(err['median_mm'], digits=2)} mm, 95th percentile {fmt(err['p95_mm'], digits=2)} mm, "
              f"max {fmt(err['max_mm'], digits=2)} mm")
    print("Dice L2R: Learn2Reg (labels absent from fixed or moving skipped); Dice ref: absent = 0, still averaged")
    with atomic_outputs() as out:  # both files or neither
        if args.json:
            doc = {"format": "slicreg-evaluate/1", "fixed_labels": args.fixed_labels,
                   "moving_labels": args.moving_labels, "field": args.field, "gt_field": args.gt_field,
                   "mask": args.mask, "names": {str(k): v for k, v in names.items()}, **result}
            atomic_write_json(out.path(args.json), json_ready(doc))
        if args.csv:
            atomic_write_text(out.path(args.csv), csv_text(pair_csv_rows(result, names)))
    for written in (args.json, args.csv):
        if written:
            print(f"wrote {written}")
    return 0
