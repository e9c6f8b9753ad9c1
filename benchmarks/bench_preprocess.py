"""Benchmark of the SLIC-Reg preprocessing (reorient, 2 mm, 192 x 160 x 256 crop) per subject.

Runs on the real example CT (TotalSegmentator 2.18.0 test scan, fetched into the cache on first use with
``slicreg fetch-example``'s code) and on two clinical-looking variants made from it, so that the figures cover
the inputs users bring:

- ``example``: the scan as shipped, 122 x 101 x 112 at 3 mm, RAS;
- ``thin-slice``: resampled to 0.7 x 0.7 x 5 mm and stored LPS (about 520 x 430 x 67 voxels, BTCV-like);
- ``fine``: 0.8 x 0.8 x 1.5 mm, LPS (about 460 x 380 x 224 voxels, a modern thin-slice scan).

For each: wall and CPU seconds of :func:`slicreg.geometry.preprocess_volume` (image + labels), of the
file-to-file step the ``preprocess`` stage runs per subject (reading, preprocessing, writing), and of
re-expressing a ground-truth field on the preprocessed grid. Best of ``--repeat`` runs (the machine is shared).

    .venv/bin/python benchmarks/bench_preprocess.py [--repeat 2] [--skip-fine]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np


def timed(fn, repeat: int):
    """(result, best wall s, CPU s of that run) over ``repeat`` calls."""
    best = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[1]:
            best = (out, wall, cpu)
    return best


def variant(image, labels, spacing, *, flip_lps: bool):
    """The example resampled to ``spacing`` (linear / nearest), optionally stored LPS."""
    from scipy import ndimage

    from slicreg.conventions import Volume
    from slicreg.geometry import resample_grid

    shape, m = resample_grid(image.shape, image.spacing_mm, spacing)
    img = ndimage.affine_transform(image.array.astype(np.float32), np.diag(m)[:3], offset=m[:3, 3],
                                   output_shape=shape, order=1, mode="nearest")
    lab = ndimage.affine_transform(labels.array, np.diag(m)[:3], offset=m[:3, 3], output_shape=shape, order=0,
                                   mode="nearest")
    affine = image.affine @ m
    if flip_lps:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = (shape[0] - 1, shape[1] - 1)
        img, lab, affine = img[::-1, ::-1].copy(), lab[::-1, ::-1].copy(), affine @ flip
    return Volume(np.rint(img).astype(np.int16), affine), Volume(lab, affine)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-fine", action="store_true", help="leave out the largest (0.8 x 0.8 x 1.5 mm) input")
    args = ap.parse_args()

    import torch

    from pipelines.stages.data import preprocess_subject_files
    from preprocessing.example import fetch_example
    from slicreg.geometry import field_to_preprocessed_grid, preprocess_volume
    from slicreg.io import load_image, load_labels, save_volume

    t0 = time.perf_counter()
    files = fetch_example()
    print(f"example: {files.folder} (ready in {time.perf_counter() - t0:.1f} s)")
    image, labels = load_image(files.image), load_labels(files.labels)
    cases = {"example": (image, labels)}
    cases["thin-slice"] = variant(image, labels, (0.7, 0.7, 5.0), flip_lps=True)
    if not args.skip_fine:
        cases["fine"] = variant(image, labels, (0.8, 0.8, 1.5), flip_lps=True)
    print(f"cpu cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, repeat {args.repeat} (best)")
    print("seconds as wall / CPU of this process (CPU < wall when the machine is shared)")
    print(f"{'input':<11} {'shape':<16} {'spacing mm':<14} {'preprocess':>12} {'files->files':>13} "
          f"{'field':>12}  crop start / padding")
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (img, lab) in cases.items():
            res, wall, cpu = timed(partial(preprocess_volume, img, lab), args.repeat)  # this iteration's volumes
            records[name] = res.record
            src_img, src_lab = Path(tmp) / f"{name}.nii.gz", Path(tmp) / f"{name}_lab.nii.gz"
            save_volume(img, src_img)
            save_volume(lab, src_lab)
            item = {"id": name, "image": str(src_img), "labels": str(src_lab),
                    "out_image": f"{tmp}/out/imagesTr/{name}_0000.nii.gz",
                    "out_labels": f"{tmp}/out/labelsTr/{name}.nii.gz", "out_crop": f"{tmp}/out/crops/{name}.json",
                    "spacing_mm": 2.0, "shape": [192, 160, 256], "force": False, "antialias": True}
            _, fwall, fcpu = timed(partial(preprocess_subject_files, item), args.repeat)
            # a field between this input and the example (world identity), re-expressed on the 2 mm grids
            disp = np.zeros((3, *img.shape), np.float32)
            _, gwall, gcpu = timed(partial(field_to_preprocessed_grid, disp, res.record, records["example"]),
                                   args.repeat)
            liver_in = (lab.array == 6).sum() * np.prod(img.spacing_mm) / 1000
            liver_out = (res.labels.array == 6).sum() * 8 / 1000
            sp = "x".join(f"{s:.2g}" for s in img.spacing_mm)
            print(f"{name:<11} {str(img.shape):<16} {sp:<14} {wall:>5.2f} / {cpu:<4.2f} {fwall:>6.2f} / {fcpu:<4.2f} "
                  f"{gwall:>5.2f} / {gcpu:<4.2f}  "
                  f"{list(res.record.crop_start)} / {[list(p) for p in res.record.padded_vox]}  "
                  f"(liver {liver_in:.0f} -> {liver_out:.0f} mL)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
