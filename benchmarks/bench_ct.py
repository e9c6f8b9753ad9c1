"""Benchmark of preprocessing.ct against scikit-image, and the cost of the cohort's acquisition option.

Usage (from the repository root)::

    nice -n 19 .venv/bin/python benchmarks/bench_ct.py [--size 256] [--angles 180 360] [--subject 192 160 256]
                                                      [--parts 1 2 3] [--threads N]

Prints, one run each (machines are noisy; compare the ratios, taken back to back in one process):

1. parallel-beam projection of a size x size phantom: ``skimage.transform.radon`` vs :func:`preprocessing.ct.project`
   (same sampling, ``ray_step=1``), with their agreement; then FBP: ``iradon`` (ramp) vs :func:`preprocessing.ct.fbp`;
   the ratio skimage time / slicreg time (> 1 = slicreg faster);
2. the noise SD (HU) of :func:`preprocessing.ct.simulate_acquisition` in a water-like 320 x 220 mm abdomen at 2 mm
   pixels, per dose and kernel (the calibration behind ``AcquisitionConfig.dose_photons``);
3. the time of :func:`preprocessing.acquisition.apply_to_subject` on a synthetic 192 x 160 x 256 subject at 2 mm
   (the cohort's grid), i.e. the cost of the option per subject.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _phantom(n: int):
    import numpy as np

    ellipses = ((1.0, 0.69, 0.92, 0.0, 0.0, 0.0), (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
                (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0), (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
                (0.1, 0.21, 0.25, 0.0, 0.35, 0.0), (0.1, 0.046, 0.046, 0.0, 0.1, 0.0))
    c = (n - 1) / 2
    r = np.arange(n)
    y, x = (c - r[:, None]) / (n / 2), (r[None, :] - c) / (n / 2)
    img = np.zeros((n, n))
    for v, a, b, x0, y0, phi in ellipses:
        p = math.radians(phi)
        xr = (x - x0) * math.cos(p) + (y - y0) * math.sin(p)
        yr = -(x - x0) * math.sin(p) + (y - y0) * math.cos(p)
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] += v
    return img


def _abdomen_hu(shape, pixel_mm: float):
    """A water-like ellipse (40 HU) with fat rim, a spine and two kidneys-like blobs, in air; (H, W)."""
    import numpy as np

    h, w = shape
    y = ((h - 1) / 2 - np.arange(h))[:, None] * pixel_mm
    x = (np.arange(w) - (w - 1) / 2)[None, :] * pixel_mm
    hu = np.full(shape, -1000.0)
    hu[(x / 160) ** 2 + (y / 110) ** 2 <= 1] = -100.0
    hu[(x / 150) ** 2 + (y / 100) ** 2 <= 1] = 40.0
    hu[(x / 18) ** 2 + ((y + 70) / 18) ** 2 <= 1] = 700.0
    for sx in (-60, 60):
        hu[((x - sx) / 25) ** 2 + ((y + 40) / 35) ** 2 <= 1] = 30.0
    return hu, (x / 60) ** 2 + (y / 30) ** 2 <= 1


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_skimage(size: int, angle_counts: list[int]) -> None:
    import numpy as np
    import torch
    from skimage.transform import iradon, radon

    from preprocessing import ct

    n = size + 1 if size % 2 == 0 else size  # odd: scikit-image's centre n // 2 equals ours
    img = _phantom(n)
    x = torch.from_numpy(img).float()
    print(f"\n1. scikit-image vs preprocessing.ct, {n} x {n} phantom, float32 for slicreg, float64 for scikit-image")
    print(f"{'angles':>6} | {'radon s':>8} {'project s':>9} {'ratio':>6} {'max rel diff':>12} | "
          f"{'iradon s':>8} {'fbp s':>7} {'ratio':>6} {'RMSE':>8}")
    for n_angles in angle_counts:
        theta = np.arange(n_angles) * 180.0 / n_angles
        geometry = ct.ParallelBeam(np.deg2rad(theta), n)
        # partial binds this iteration's values (the timed call runs at once either way)
        ref, t_sk = _timed(partial(radon, img, theta=theta, circle=True))
        mine, t_me = _timed(partial(ct.project, x, geometry, ray_step=1.0))
        diff = float(np.abs(mine.numpy().T - ref).max() / np.abs(ref).max())
        rec_ref, t_isk = _timed(partial(iradon, ref, theta=theta, filter_name="ramp", circle=True))
        sino = torch.from_numpy(ref.T.copy()).float()
        rec, t_fbp = _timed(partial(ct.fbp, sino, geometry, image_shape=(n, n)))
        c = (n - 1) / 2
        yy, xx = np.mgrid[:n, :n]
        inside = np.hypot(yy - c, xx - c) < n // 2 - 1
        rmse = float(np.sqrt(((rec.numpy() - rec_ref)[inside] ** 2).mean()))
        print(f"{n_angles:>6} | {t_sk:8.2f} {t_me:9.2f} {t_sk / t_me:6.2f} {diff:12.1e} | "
              f"{t_isk:8.2f} {t_fbp:7.2f} {t_isk / t_fbp:6.2f} {rmse:8.1e}")
    # batched: 16 slices in one call (the cohort's use) vs 16 scikit-image calls (extrapolated from one)
    n_angles = angle_counts[0]
    theta = np.arange(n_angles) * 180.0 / n_angles
    geometry = ct.ParallelBeam(np.deg2rad(theta), n)
    batch = x[None].repeat(16, 1, 1)
    _, t_sk = _timed(lambda: radon(img, theta=theta, circle=True))
    sinos, t_me = _timed(lambda: ct.project(batch, geometry, ray_step=1.0))
    _, t_fbp = _timed(lambda: ct.fbp(sinos, geometry, image_shape=(n, n)))
    print(f"batch of 16 slices, {n_angles} angles: project {t_me:.2f} s ({t_me / 16:.3f} s/slice, ratio "
          f"{t_sk * 16 / t_me:.2f} vs radon), fbp {t_fbp:.2f} s ({t_fbp / 16:.3f} s/slice)")


def bench_noise() -> None:
    import torch

    from preprocessing import ct

    hu, roi = _abdomen_hu((160, 192), 2.0)
    print("\n2. noise SD (HU) in a water-like abdomen, 160 x 192 at 2 mm, parallel beam, default views")
    kernels = ct.FILTERS
    clean = {k: ct.simulate_acquisition(hu, dose_photons=None, kernel=k, generator=None, pixel_mm=2.0)
             for k in kernels}
    print(f"{'I0':>9} | " + " ".join(f"{k:>11}" for k in kernels))
    for dose in (1e4, 5e4, 1e5, 3e5, 1e6):
        sds = []
        for k in kernels:
            noisy = ct.simulate_acquisition(hu, dose_photons=dose, kernel=k, pixel_mm=2.0,
                                            generator=torch.Generator().manual_seed(0))
            sds.append(float((noisy - clean[k])[roi].std()))
        print(f"{dose:9.0e} | " + " ".join(f"{s:11.1f}" for s in sds))
    for b in (0.005, 0.01, 0.02):
        cup = ct.simulate_acquisition(hu, dose_photons=None, kernel="hann", generator=None, pixel_mm=2.0,
                                      beam_hardening=b)
        print(f"beam_hardening {b}: mean HU in the central ROI {float(cup[roi].mean()):.1f} "
              f"(without: {float(clean['hann'][roi].mean()):.1f})")


def bench_subject(shape: tuple[int, int, int]) -> None:
    import numpy as np

    from preprocessing import ct
    from preprocessing.acquisition import AcquisitionConfig, apply_to_subject
    from slicreg.conventions import Volume

    hu2d, _ = _abdomen_hu(shape[:2], 2.0)
    image = Volume(np.repeat(np.rint(hu2d)[:, :, None], shape[2], axis=2).astype(np.int16),
                   np.diag([2.0, 2.0, 2.0, 1.0]))
    cfg = AcquisitionConfig(enabled=True)
    n_det = ct.default_n_detectors(shape[:2], pixel_mm=2.0)
    print(f"\n3. the cohort option on a {shape[0]} x {shape[1]} x {shape[2]} subject at 2 mm "
          f"({n_det} detector elements, {ct.default_n_angles(n_det)} views, batches of {cfg.slices_per_batch})")
    cpu0 = time.process_time()
    (out, info), t = _timed(lambda: apply_to_subject(image, np.random.default_rng([0, 1, 1]), cfg))
    cpu = time.process_time() - cpu0
    print(f"apply_to_subject: {t:.1f} s wall, {cpu:.1f} CPU-s per subject ({t / shape[2] * 1000:.0f} ms wall per "
          f"slice); drawn: {info}")
    # the lever: fewer views (cost is linear in the views); timed on one batch and scaled to the subject
    few = AcquisitionConfig(enabled=True, n_angles=180)
    part = Volume(image.array[:, :, :few.slices_per_batch], image.affine)
    cpu0 = time.process_time()
    _, t = _timed(lambda: apply_to_subject(part, np.random.default_rng([0, 1, 1]), few))
    scale = shape[2] / part.shape[2]
    print(f"with n_angles=180: {t * scale:.1f} s wall, {(time.process_time() - cpu0) * scale:.1f} CPU-s per "
          f"subject (from {part.shape[2]} slices)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="phantom size for the scikit-image comparison")
    ap.add_argument("--angles", type=int, nargs="+", default=[180, 360], help="angle counts (over 180 degrees)")
    ap.add_argument("--subject", type=int, nargs=3, default=[192, 160, 256], metavar=("X", "Y", "Z"),
                    help="subject shape for the cost of the option")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="which parts to run (default all; part 3 is the slow one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if 1 in args.parts:
        bench_skimage(args.size, args.angles)
    if 2 in args.parts:
        bench_noise()
    if 3 in args.parts:
        bench_subject(tuple(args.subject))
    print(f"\nload average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
