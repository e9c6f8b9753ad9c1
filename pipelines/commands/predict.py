"""``slicreg predict``: predict the 16 supervoxel layers of a preprocessed CT with a weights bundle."""

from __future__ import annotations

import argparse

NAME = "predict"
HELP = "predict the 16 supervoxel layers of a preprocessed CT (2 mm or 4 mm) with a weights bundle"


INPUTS = ("weights", "image")
OUTPUTS = ("out",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="weights bundle folder")
    p.add_argument("--image", required=True,
                   help="preprocessed CT in HU (2 mm, e.g. 192 x 160 x 256, or its 4 mm average-pooled version)")
    p.add_argument("--out", required=True, help="supervoxels (NIfTI (X, Y, Z, 16) uint8)")
    p.add_argument("--grid", choices=("input", "output"), default="input",
                   help="input: the 4 mm grid (logits upsampled x2, then argmax; default); output: the network's "
                        "stride-2 grid")
    p.add_argument("--fp32", action="store_true", help="full precision instead of bf16 (CPU) / fp16 (CUDA)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="accept an image that does not look like CT in HU (a warning)")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch

    from slicreg.bundle import load_bundle, predict, require_target
    from slicreg.checks import axcodes, check_ct_like
    from slicreg.conventions import Volume, downsample_affine, spacing_from_affine
    from slicreg.errors import InputError
    from slicreg.io import load_image, save_volume
    from slicreg.network import HU_SCALE, network_input
    from slicreg.registration import network_labels

    t0 = time.perf_counter()
    img = load_image(args.image)
    check_ct_like(img.array, name=args.image, force=args.force)
    if axcodes(img.affine) != "RAS":
        # the network learned the anatomy in the preprocessed (RAS) axis order; another order is another picture
        raise InputError(f"{args.image}: expected a preprocessed image in RAS axis order (as `slicreg preprocess` "
                         f"writes it), got {axcodes(img.affine)}; run `slicreg preprocess` first")
    bundle = load_bundle(args.weights, device=args.device)
    require_target(bundle, what="`slicreg predict`")
    spacing = spacing_from_affine(img.affine)
    if np.allclose(spacing, 2.0, atol=0.05):
        hu = network_input(img.array, from_2mm=True) * np.float32(HU_SCALE)
        affine_4mm = downsample_affine(img.affine, 2)
    elif np.allclose(spacing, 4.0, atol=0.1):
        hu = img.array
        affine_4mm = img.affine
    else:
        raise InputError(f"{args.image}: expected a preprocessed image with 2 mm (or 4 mm) isotropic voxels, got "
                         f"{np.round(spacing, 3).tolist()} mm; run `slicreg preprocess` first")
    if any(s % 4 for s in hu.shape):
        raise InputError(f"{args.image}: the 4 mm grid {hu.shape} must have sizes divisible by 4 (the preprocessed "
                         f"192 x 160 x 256 gives 96 x 80 x 128)")
    t1 = time.perf_counter()
    dtype = torch.float32 if args.fp32 else None
    if args.grid == "output":  # the same labels, with the cheaper argmax of slicreg.registration.network_labels
        labels = network_labels(bundle, hu, device=args.device, dtype=dtype)
    else:
        labels = predict(bundle, hu, output="labels", grid=args.grid, device=args.device, dtype=dtype)
    t2 = time.perf_counter()
    if args.grid == "input":
        affine = affine_4mm
    else:  # output voxel q is centred on 4 mm voxel 2q
        affine = affine_4mm @ np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(labels, affine), args.out, dtype=np.uint8)
    print(f"wrote {args.out}: {labels.shape[0]} layers {labels.shape[1:]} uint8 "
          f"(network {t2 - t1:.1f} s, total {time.perf_counter() - t0:.1f} s)")
    return 0
