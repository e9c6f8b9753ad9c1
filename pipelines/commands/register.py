"""``slicreg register``: register two abdominal CTs by their predicted supervoxels.

Raw CTs (any orientation and spacing) are preprocessed the paper's way on the grid the weights expect (twice
the bundle's template supervoxel grid: 192 x 160 x 256 at 2 mm for the shipped weights); a scan already on that
grid is used as it is. The field is computed on the preprocessed fixed grid and mapped back to the original
fixed scan's grid (:func:`preprocessing.geometry.field_to_original_grid`), in voxels of the original moving
scan, fixed -> moving, so ``slicreg warp`` / ``--out-warped`` apply it to the original moving files."""

from __future__ import annotations

import argparse

NAME = "register"
HELP = "register two CTs (raw or preprocessed) by predicted supervoxels; writes the field and warped outputs"

_STEPS = ("load weights", "load images", "preprocess", "network fixed", "network moving", "keypoints", "features",
          "adam", "dense field", "refine", "map to original grid", "warp", "save")


INPUTS = ("fixed", "moving", "weights", "moving_labels", "template_supervoxels")
OUTPUTS = ("out_field", "out_warped", "out_warped_labels", "out_info")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="fixed CT (NIfTI, HU); raw or preprocessed (2 mm, 192x160x256)")
    p.add_argument("--moving", required=True, help="moving CT (NIfTI, HU); with --atlas: the bundle's template")
    p.add_argument("--weights", default=None, help="weights bundle folder (default: the shipped weights/"
                                                   "slicreg-cohort-v3)")
    p.add_argument("--out-field", required=True,
                   help="field (X, Y, Z, 3) on the fixed scan's grid, voxels of the moving scan, fixed -> moving")
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
    p.add_argument("--refine", action="store_true",
                   help="polish the field by a short instance optimisation on MIND-SSC features (a few seconds)")
    p.add_argument("--refine-iterations", type=int, default=None,
                   help="Adam steps of --refine (default 80, slicreg.register.REFINE_DEFAULTS)")
    p.add_argument("--force", action="store_true", help="accept images that do not look like CT")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--fp32", action="store_true", help="network in full precision (default: bf16 on CPU, "
                                                       "fp16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the feature permutation (default 0)")
    p.add_argument("--out-info", default=None, help="JSON file with timings, parameters and diagnostics")
    p.add_argument("--verbose", action="store_true", help="print per-step timings (wall and CPU seconds)")


def _check_output(path: str | None, flag: str) -> None:
    from pathlib import Path

    from slicreg.errors import InputError

    if path is None:
        return
    if not str(path).endswith((".nii", ".nii.gz")):
        raise InputError(f"{flag} {path}: output name must end in .nii or .nii.gz")
    parent = Path(path).expanduser().resolve().parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is not a folder")


def _check_input(path: str | None, flag: str) -> None:
    from pathlib import Path

    from slicreg.errors import InputError

    if path is not None and not Path(path).expanduser().is_file():
        raise InputError(f"{flag} {path}: file not found")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from slicreg.errors import InputError

    if bool(args.moving_labels) != bool(args.out_warped_labels):
        raise InputError("--moving-labels and --out-warped-labels go together")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive number")
    if args.refine_iterations is not None and args.refine_iterations < 0:
        raise InputError(f"--refine-iterations {args.refine_iterations}: expected >= 0")
    if args.template_supervoxels is not None and not args.atlas:
        raise InputError(f"--template-supervoxels {args.template_supervoxels}: used only with --atlas")
    for path, flag in ((args.fixed, "--fixed"), (args.moving, "--moving"), (args.moving_labels, "--moving-labels")):
        _check_input(path, flag)
    for path, flag in ((args.out_field, "--out-field"), (args.out_warped, "--out-warped"),
                       (args.out_warped_labels, "--out-warped-labels")):
        _check_output(path, flag)
    if args.out_info is not None and not str(args.out_info).endswith(".json"):
        raise InputError(f"--out-info {args.out_info}: expected a .json file name")

    import torch

    from pipelines.registration import atlas_advice, atlas_template, bundle_crop_shape, load_weights, \
        preprocess_for_registration, register_preprocessed, to_original_grid
    from slicreg.conventions import Volume
    from slicreg.fields import warp_image, warp_labels
    from slicreg.io import atomic_outputs, atomic_write_json, load_image, load_labels, save_field, save_volume

    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(name: str, started: tuple[float, float]) -> None:
        wall[name] = wall.get(name, 0.0) + time.perf_counter() - started[0]
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - started[1]

    t_all = clock()
    t = clock()
    bundle = load_weights(args.weights, device=args.device)
    crop_shape = bundle_crop_shape(bundle)
    template_sv = None
    if args.atlas:  # before any work: atlas mode with a template the bundle was not trained on gives a wrong field
        template_sv, problem = atlas_template(bundle, args.moving, args.template_supervoxels)
        if problem is not None:
            raise InputError(f"--atlas refused for --moving {args.moving}: {problem}; {atlas_advice('drop --atlas')}")
    stop("load weights", t)

    t = clock()
    fixed, moving = load_image(args.fixed), load_image(args.moving)
    moving_labels = load_labels(args.moving_labels) if args.moving_labels else None
    if moving_labels is not None and not moving.same_grid(moving_labels, atol_mm=1e-2):
        raise InputError(f"--moving-labels {args.moving_labels}: label grid {moving_labels.shape} (affine "
                         f"{np.round(moving_labels.affine, 3).tolist()}) does not match the moving image's "
                         f"{moving.shape} (affine {np.round(moving.affine, 3).tolist()})")
    stop("load images", t)

    t = clock()
    fixed_p = preprocess_for_registration(fixed, name=args.fixed, force=args.force, crop_shape=crop_shape)
    moving_p = preprocess_for_registration(moving, name=args.moving, force=args.force, crop_shape=crop_shape)
    stop("preprocess", t)

    refine_options = {} if args.refine_iterations is None else {"iterations": int(args.refine_iterations)}
    dtype = torch.float32 if args.fp32 else None
    # the refinement compares only inside each scan's field of view (not in the preprocessing's padding)
    masks = {f"{side}_mask": None if prep.identity else prep.record.fov_mask()
             for side, prep in (("fixed", fixed_p), ("moving", moving_p))}
    result = register_preprocessed(bundle, fixed_p.image.array, moving_p.image.array, device=args.device,
                                   seed=args.seed, moving_is_template=args.atlas, refine=args.refine,
                                   refine_options=refine_options, network_dtype=dtype,
                                   template_supervoxels=template_sv, **masks)
    wall.update(result.info["timings_s"])
    cpu.update(result.info["cpu_s"])

    t = clock()
    disp = to_original_grid(result.disp_vox, fixed_p, moving_p)
    stop("map to original grid", t)

    warped = warped_labels = None
    t = clock()
    if args.out_warped:
        warped = warp_image(moving.array, disp, device=args.device, fast=True)
    if moving_labels is not None:
        warped_labels = warp_labels(moving_labels.array, disp, device=args.device)
    stop("warp", t)

    t = clock()
    with atomic_outputs() as out:  # the field, the warped files and the info: all or none
        save_field(disp, fixed.affine, out.path(args.out_field))
        if warped is not None:
            save_volume(Volume(warped, fixed.affine), out.path(args.out_warped))
        if warped_labels is not None:
            save_volume(Volume(warped_labels, fixed.affine), out.path(args.out_warped_labels))
        stop("save", t)
        total = time.perf_counter() - t_all[0]
        total_cpu = time.process_time() - t_all[1]
        if args.out_info:
            atomic_write_json(out.path(args.out_info), {
                "fixed": args.fixed, "moving": args.moving, "weights": str(bundle.path), "atlas": bool(args.atlas),
                "refine": bool(args.refine), "device": args.device, "threads": torch.get_num_threads(),
                "network_precision": "fp32" if args.fp32 else ("bf16" if args.device == "cpu" else "fp16"),
                "preprocessed_inputs": {"fixed": fixed_p.identity, "moving": moving_p.identity},
                "field": {"path": args.out_field, "shape": list(disp.shape[1:]),
                          "units": "voxels of the moving scan's grid, fixed -> moving"},
                "timings_s": {k: round(v, 4) for k, v in wall.items()},
                "cpu_s": {k: round(v, 4) for k, v in cpu.items()},
                "total_s": round(total, 4), "total_cpu_s": round(total_cpu, 4),
                "flow": {k: v for k, v in result.info.items() if k not in ("timings_s", "cpu_s")},
            })
    print(f"wrote {args.out_field} (fixed grid {fixed.shape}, voxels, fixed -> moving) in {total:.1f} s")
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
