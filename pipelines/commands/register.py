"""``slicreg register``: register two abdominal CTs by their predicted supervoxels.

Raw CTs (any orientation and spacing) are preprocessed the paper's way on the grid the weights expect (twice
the bundle's template supervoxel grid: 192 x 160 x 256 at 2 mm for the shipped weights); a scan already on that
grid is used as it is. The field is computed on the preprocessed fixed grid and mapped back to the original
fixed scan's grid (:func:`slicreg.geometry.field_to_original_grid`), in voxels of the original moving
scan, fixed -> moving, so ``slicreg warp`` / ``--out-warped`` apply it to the original moving files.

The command parses the arguments, calls :func:`slicreg.api.register`, writes its outputs and prints."""

from __future__ import annotations

import argparse

NAME = "register"
HELP = "register two CTs (raw or preprocessed) by predicted supervoxels; writes the field and warped outputs"

_STEPS = ("load weights", "load images", "preprocess", "network fixed", "network moving",
          "keypoints", "features", "adam", "dense field", "refine", "map to original grid", "warp", "save")


INPUTS = ("fixed", "moving", "weights", "moving_labels", "template_supervoxels")
# how slicreg.api.register names its arguments in messages here
_FLAGS = {"fixed": "--fixed", "moving": "--moving", "weights": "--weights", "atlas": "--atlas",
          "drop_atlas": "drop --atlas", "template_supervoxels": "--template-supervoxels",
          "refine_iterations": "--refine-iterations", "moving_labels": "--moving-labels"}
FIELD_UNITS = {"itk": "ITK displacement, world mm (LPS), fixed -> moving",
               "voxels": "voxels of the moving scan's grid, fixed -> moving",
               "deeds": "deeds control grid + matrix, voxels, fixed -> moving"}
OUTPUTS = ("out_field", "out_warped", "out_warped_labels", "out_info")


def derived_outputs(args: argparse.Namespace) -> dict[str, str | None]:
    """deeds' two files for ``--field-format deeds`` (then ``--out-field`` is their stem)."""
    if getattr(args, "field_format", None) != "deeds":
        return {}
    from slicreg.io import field_output_files

    dat, mat = field_output_files(args.out_field, "deeds")
    return {"--out-field": str(dat), "--out-field (deeds matrix)": str(mat)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed CT (NIfTI, HU); raw or preprocessed (2 mm, 192x160x256)")
    p.add_argument("--moving", required=True, help="moving CT (NIfTI, HU); with --atlas: the bundle's template")
    p.add_argument("--weights", default=None, help="weights bundle folder (default: the shipped weights "
                                                   "slicreg-cohort-v3, installed with slicreg)")
    p.add_argument("--field-format", choices=("itk", "voxels", "deeds"), default="itk",
                   help="how --out-field is written (docs/formats.md): itk (default) -- ITK displacement field in "
                        "world millimetres (LPS), for SimpleITK, ANTs (antsApplyTransforms) and 3D Slicer; voxels "
                        "-- (X, Y, Z, 3) in voxels of the moving scan (Learn2Reg layout, slicreg warp/evaluate); "
                        "deeds -- STEM_displacements.dat + STEM_matrix.txt (--out-field is the stem; fixed and "
                        "moving of one grid size)")
    p.add_argument("--out-field", required=True,
                   help="the field on the fixed scan's grid, fixed -> moving, as --field-format says (default: an "
                        "ITK displacement field in mm)")
    p.add_argument("--out-warped", default=None, help="warped moving image on the fixed grid (linear)")
    p.add_argument("--moving-labels", default=None, help="moving label map to warp (nearest)")
    p.add_argument("--out-warped-labels", default=None, help="where to write the warped moving labels")
    p.add_argument("--atlas", "--moving-is-template", dest="atlas", action="store_true",
                   help="the moving scan is the bundle's template: use its own supervoxels instead of a network "
                        "pass (atlas mode, as the paper). Only valid for the template the bundle was trained on: "
                        "--moving must be that (preprocessed) image, or the image --template-supervoxels were made "
                        "on; any other template is refused")
    p.add_argument("--template-supervoxels", default=None, metavar="SV",
                   help="with --atlas: the template supervoxels (supervoxels.nii.gz with its supervoxels.json, or "
                        "their folder) the bundle was trained on, made on --moving")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--refine", dest="refine", action="store_true", default=True,
                      help="the default: the supervoxel field refined by a short instance optimisation on MIND-SSC "
                           "features inside both fields of view (the align engine's preset 'refine', ~4 s more "
                           "on 2 cores; docs/register.md)")
    mode.add_argument("--fast", "--no-refine", dest="refine", action="store_false",
                      help="the supervoxel field alone (network passes + keypoint flow): faster, coarser")
    p.add_argument("--refine-iterations", type=int, default=None,
                   help="Adam steps of --refine on each of its levels (default 30 at 8 mm, 35 at 4 mm, 40 at 2 mm: "
                        "the align engine's preset 'refine', slicreg.alignment.PRESETS)")
    p.add_argument("--force", action="store_true", help="accept images that do not look like CT")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--fp32", action="store_true", help="network in full precision (default: bf16 on CPU, "
                                                       "fp16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the feature permutation (default 0)")
    p.add_argument("--out-info", default=None, help="JSON file with timings, parameters and diagnostics")
    p.add_argument("--verbose", action="store_true", help="print per-step timings (wall and CPU seconds)")


def _check_output(path: str | None, flag: str) -> None:
    from slicreg.errors import InputError

    if path is None:
        return
    # where it may be written (a folder, writable, not an input) is checked by pipelines.cli.check_paths
    if not str(path).endswith((".nii", ".nii.gz")):
        raise InputError(f"{flag} {path}: output name must end in .nii or .nii.gz")


def _check_input(path: str | None, flag: str) -> None:
    from pathlib import Path

    from slicreg.errors import InputError

    if path is not None and not Path(path).expanduser().exists():
        raise InputError(f"{flag} {path}: not found (expected a NIfTI file or a DICOM series folder)")


def run(args: argparse.Namespace) -> int:
    import time

    from slicreg.errors import InputError

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive number")
    for path, flag in ((args.fixed, "--fixed"), (args.moving, "--moving"), (args.moving_labels, "--moving-labels")):
        _check_input(path, flag)
    field_format = getattr(args, "field_format", "voxels")
    if field_format == "deeds":  # --out-field is the stem of deeds' two files
        from slicreg.io import check_field_format

        check_field_format(field_format, args.out_field)
    else:
        _check_output(args.out_field, "--out-field")
    for path, flag in ((args.out_warped, "--out-warped"), (args.out_warped_labels, "--out-warped-labels")):
        _check_output(path, flag)
    if args.out_info is not None and not str(args.out_info).endswith(".json"):
        raise InputError(f"--out-info {args.out_info}: expected a .json file name")

    import torch

    from slicreg.api import register
    from slicreg.io import atomic_outputs, atomic_write_json, save_volume

    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
    t_all = time.perf_counter(), time.process_time()
    res = register(args.fixed, args.moving, weights=args.weights, refine=args.refine,
                   refine_iterations=args.refine_iterations, atlas=args.atlas,
                   template_supervoxels=args.template_supervoxels, moving_labels=args.moving_labels,
                   device=args.device, seed=args.seed, force=args.force, fp32=args.fp32, names=_FLAGS)
    wall, cpu = res.info["timings_s"], res.info["cpu_s"]

    def stop(name: str, started: tuple[float, float]) -> None:
        wall[name] = wall.get(name, 0.0) + time.perf_counter() - started[0]
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - started[1]

    from concurrent.futures import ThreadPoolExecutor

    # the field, the warped files and the info: all or none. The field is converted and written in a thread while
    # the moving scan is warped (torch's kernels and the gzip threads run without the GIL): "save" is what is left
    # to write after the warp
    with atomic_outputs() as out, ThreadPoolExecutor(1) as pool:
        field_written = pool.submit(res.save, args.out_field, format=field_format, outputs=out)
        t = time.perf_counter(), time.process_time()
        warped = res.warp() if args.out_warped else None
        warped_labels = res.warp_labels() if args.moving_labels else None
        stop("warp", t)
        t = time.perf_counter(), time.process_time()
        if warped is not None:
            save_volume(warped, out.path(args.out_warped))
        if warped_labels is not None:
            save_volume(warped_labels, out.path(args.out_warped_labels))
        field_written.result()
        stop("save", t)
        total = time.perf_counter() - t_all[0]
        total_cpu = time.process_time() - t_all[1]
        if args.out_info:
            info = res.info
            atomic_write_json(out.path(args.out_info), {
                "fixed": args.fixed, "moving": args.moving, "weights": info["weights"], "atlas": info["atlas"],
                "refine": info["refine"], "device": args.device, "threads": torch.get_num_threads(),
                "network_precision": info["network_precision"], "preprocessed_inputs": info["preprocessed_inputs"],
                "field": {"path": args.out_field, "shape": list(res.shape), "format": field_format,
                          "units": FIELD_UNITS[field_format]},
                "timings_s": {k: round(v, 4) for k, v in wall.items()},
                "cpu_s": {k: round(v, 4) for k, v in cpu.items()},
                "total_s": round(total, 4), "total_cpu_s": round(total_cpu, 4),
                "flow": info["flow"],
            })
    units = "voxels, fixed -> moving" if field_format == "voxels" else FIELD_UNITS[field_format]
    print(f"wrote {args.out_field} (fixed grid {res.shape}, {units}) in {total:.1f} s")
    if args.verbose:
        print(f"  {'step':<22} {'wall s':>8} {'CPU s':>8}")
        for name in [*_STEPS, *[k for k in wall if k not in _STEPS]]:
            if name in wall:
                print(f"  {name:<22} {wall[name]:8.2f} {cpu[name]:8.2f}")
        core = sum(wall.get(k, 0.0) for k in ("network fixed", "network moving", "keypoints", "features", "adam",
                                              "dense field", "refine"))
        print(f"  {'registration':<22} {core:8.2f} {'':>8}   (network passes + flow + dense field"
              f"{' + refine' if args.refine else ''})")
        print(f"  {'total':<22} {total:8.2f} {total_cpu:8.2f}   ({torch.get_num_threads()} torch threads)")
    return 0
