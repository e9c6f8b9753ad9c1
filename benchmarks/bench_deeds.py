"""Runtime of deeds-import + warping (and export, transfer) at the cohort's grid, 192 x 160 x 256 at 2 mm.

Synthetic but realistic sizes: a deeds control grid (spacing 4 -> 48 x 40 x 64) with smooth displacements of a
few voxels and an affine matrix close to identity, a smooth HU-like image and a 14-label map. Prints wall times
(best of ``--repeat``) and the agreement between the deeds-native warps and the project path (imported field
+ slicreg.fields with border padding).

    .venv/bin/python benchmarks/bench_deeds.py [--repeat 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

from slicreg import deeds
from slicreg.fields import warp_image, warp_labels
from slicreg.transfer import check_transfer, reached_region, transfer_supervoxels

SHAPE = (192, 160, 256)


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    ctrl_shape = deeds.control_shape(SHAPE, 4)
    ctrl = np.stack([ndi.gaussian_filter(rng.normal(size=ctrl_shape), 2) for _ in range(3)])
    ctrl = (ctrl / np.abs(ctrl).max() * 5).astype(np.float32)
    a = np.eye(4)
    a[:3, :3] += rng.normal(scale=0.02, size=(3, 3))
    a[:3, 3] = [3.0, -2.0, 4.0]
    small = rng.normal(size=tuple(s // 4 for s in SHAPE))
    smooth = ndi.zoom(ndi.gaussian_filter(small, 1.5), 4, order=1)
    image = (smooth / smooth.std() * 250).astype(np.float32)
    labels = np.digitize(smooth, np.quantile(smooth, np.linspace(0.3, 0.97, 13))).astype(np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        dat, mat = deeds.write_deeds(Path(tmp) / "F", ctrl, a)
        t_read, transform = timed(lambda: deeds.read_deeds(dat, SHAPE, matrix_path=mat), args.repeat)
        t_field, field = timed(transform.to_field, args.repeat)
    print(f"grid {SHAPE}, control grid {ctrl_shape}, torch threads {torch.get_num_threads()}")
    print(f"deeds-import: read files {t_read * 1e3:.1f} ms, dense field (deeds upsampling + affine) {t_field:.2f} s")

    t_wi, w_img = timed(lambda: deeds.warp_image_deeds(image, transform.ctrl_vox, matrix=transform.matrix),
                        args.repeat)
    t_wl, w_lab = timed(lambda: deeds.warp_labels_deeds(labels, transform.ctrl_vox, matrix=transform.matrix),
                        args.repeat)
    print(f"deeds-native warp: image {t_wi:.2f} s, labels {t_wl:.2f} s")
    t_pi, p_img = timed(lambda: warp_image(image, field, padding="border"), args.repeat)
    t_pl, p_lab = timed(lambda: warp_labels(labels, field, padding="border"), args.repeat)
    print(f"project path (slicreg.fields, border padding): image {t_pi:.2f} s, labels {t_pl:.2f} s")
    diff = np.abs(p_img.astype(np.float64) - w_img)
    print(f"agreement: image max |diff| {diff.max():.4f} HU (mean {diff.mean():.2e}); labels differing in "
          f"{int((p_lab != w_lab).sum())} of {w_lab.size} voxels")
    print(f"total deeds-import + image warp + label warp (project path): {t_read + t_field + t_pi + t_pl:.2f} s")

    t_ex, (ctrl2, a2) = timed(lambda: deeds.deeds_from_field(field, affine=transform.matrix), args.repeat)
    t_ls, (ctrl3, _) = timed(lambda: deeds.deeds_from_field(field, affine=transform.matrix, method="lstsq"),
                             args.repeat)
    print(f"deeds-export: sample {t_ex:.2f} s (max |ctrl error| {np.abs(ctrl2 - ctrl).max():.2e}), "
          f"lstsq {t_ls:.2f} s (max |ctrl error| {np.abs(ctrl3 - ctrl).max():.2e})")

    sv = rng.integers(1, 128, size=(16, 96, 80, 128)).astype(np.uint8)
    t_tr, out = timed(lambda: transfer_supervoxels(sv, field), args.repeat)
    t_ck, checks = timed(lambda: check_transfer(sv, out, reached=reached_region(field, sv.shape[1:])), 1)
    print(f"transfer (16 layers to 96 x 80 x 128): {t_tr:.2f} s; label check with reached region {t_ck:.2f} s; "
          f"labels lost {sum(len(c.lost) for c in checks)} ({sum(len(c.lost_at_edge) for c in checks)} at the edge)")


if __name__ == "__main__":
    main()
