"""Benchmark of the built-in registration (``slicreg.alignment.register_pair``): runtime, Dice, field error, folding.

Pairs come from one of two sources:

- ``--dataset DIR``: a dataset folder (docs/CONTRACTS.md) whose ``registration_pairs`` list
  ``ground_truth_field`` entries (the cohort); every listed pair with labels is registered.
- otherwise a pair made here from the real example CT of TotalSegmentator 2.18.0 (Apache-2.0), preprocessed as
  every scan is (``benchmarks/_common.py``: RAS, 2 mm, 192 x 160 x 256 around the soft-tissue centre) (fixed);
  the moving image is the fixed image pulled through a known smooth map (a random affine: rotation up to 6
  degrees, scaling up to 6 %, translation up to 6 voxels; plus a smooth random displacement of about 4 voxels
  RMS and up to ~12 voxels) with Gaussian noise (20 HU). The true fixed -> moving field is the numerical inverse
  of that map. The example is fetched once into the slicreg cache (or ``--example-dir``) by
  ``preprocessing.example.fetch_example``.

Printed per pair: seconds (and per stage) and CPU seconds, mean Dice over the BTCV labels present in both
images (before and after), field error in mm (mean and 95th percentile over the fixed body where the true
correspondence lies inside the moving image; mean over the organs), percentage of voxels with det J <= 0
and std(log det J) (2-voxel border cropped). Run::

    .venv/bin/python benchmarks/bench_align.py --cache /tmp/align_pair.npz --threads 1
    .venv/bin/python benchmarks/bench_align.py --cache /tmp/align_pair.npz --threads 2   # the same pair again
    .venv/bin/python benchmarks/bench_align.py --dataset runs/demo/preprocess/current --max-pairs 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import SHAPE, example_template


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest")
    return field / (field.std() + 1e-12)


def invert_field(disp: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Inverse of a pull field by fixed-point iteration ``v(x) = -u(x + v(x))`` (voxels, same grid)."""
    import torch

    from slicreg.conventions import identity_grid_vox
    from slicreg.fields import sample

    u = torch.from_numpy(disp.astype(np.float32))
    grid = torch.from_numpy(identity_grid_vox(disp.shape[1:]))
    v = -u.clone()
    for _ in range(iterations):
        v = -sample(u, grid + v, interpolation="linear", padding="border")
    return v.numpy()


def make_example_pair(example_dir: Path | None = None, seed: int = 0) -> dict:
    """The fixed/moving pair described in the module docstring (arrays on the 2 mm 192 x 160 x 256 grid)."""
    import torch

    from slicreg.fields import warp_image, warp_labels

    fixed, labels, _ = example_template(example_dir)
    rng = np.random.default_rng(seed)
    # pull map used to create the moving image: moving(y) = fixed(psi(y)), psi(y) = y + w(y)
    angle = np.deg2rad(rng.uniform(-6, 6, 3))
    cx, cy, cz = np.cos(angle)
    sx, sy, sz = np.sin(angle)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    lin = rot @ np.diag(1 + rng.uniform(-0.06, 0.06, 3))
    centre = (np.asarray(SHAPE) - 1) / 2
    trans = rng.uniform(-6, 6, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))
    moved = np.einsum("ab,b...->a...", lin, grid - centre[:, None, None, None]) + (centre + trans)[:, None, None, None]
    coarse = (24, 20, 32)
    smooth = np.stack([_smooth_noise(rng, coarse, 3.0) for _ in range(3)]) * 2.3
    smooth_full = torch.nn.functional.interpolate(torch.from_numpy(smooth[None]).float(), size=SHAPE,
                                                  mode="trilinear", align_corners=False)[0].numpy()
    pull = (moved - grid).astype(np.float32) + smooth_full
    moving = warp_image(fixed, pull, padding="border")
    moving = moving + rng.normal(0, 20, SHAPE).astype(np.float32)
    moving_labels = warp_labels(labels, pull)
    true = invert_field(pull)
    return {"name": f"example-deformed-seed{seed}", "fixed": fixed, "moving": moving.astype(np.float32),
            "fixed_labels": labels, "moving_labels": moving_labels, "true_field": true,
            "spacing": (2.0, 2.0, 2.0), "pull_rms": float(np.sqrt((smooth_full ** 2).sum(0).mean())),
            "pull_max": float(np.sqrt((smooth_full ** 2).sum(0)).max())}


def dataset_pairs(folder: Path):
    """Pairs of a dataset folder (docs/CONTRACTS.md) that have labels on both sides (ground truth optional)."""
    from slicreg.io import load_field, load_image, load_labels, read_json

    doc = read_json(folder / "dataset.json")
    subjects = doc["subjects"]
    for pair in doc.get("registration_pairs", []):
        f, m = subjects[pair["fixed"]], subjects[pair["moving"]]
        if not f.get("labels") or not m.get("labels"):
            continue
        fixed = load_image(folder / f["image"])
        gt = pair.get("ground_truth_field")
        yield {"name": f"{pair['fixed']}<-{pair['moving']}", "fixed": fixed.array,
               "moving": load_image(folder / m["image"]).array,
               "fixed_labels": load_labels(folder / f["labels"]).array,
               "moving_labels": load_labels(folder / m["labels"]).array,
               "true_field": load_field(folder / gt).array if gt else None,
               "spacing": tuple(float(s) for s in fixed.spacing_mm)}


def dice(fixed: np.ndarray, warped: np.ndarray, moving: np.ndarray) -> dict[int, float]:
    """Dice per BTCV label, Learn2Reg rule (labels absent from the fixed or the unwarped moving map skipped)."""
    from slicreg.labels import BTCV_IDS
    from slicreg.metrics import dice as dice_per_label

    scores = dice_per_label(fixed, warped, BTCV_IDS, absent="learn2reg", moving=moving)
    return {lab: float(v) for lab, v in zip(BTCV_IDS, scores) if not np.isnan(v)}


def evaluate(pair: dict, disp: np.ndarray) -> dict:
    from slicreg.fields import jacobian_determinant, warp_labels

    warped = warp_labels(pair["moving_labels"], disp)
    d_after = dice(pair["fixed_labels"], warped, pair["moving_labels"])
    d_before = dice(pair["fixed_labels"], pair["moving_labels"], pair["moving_labels"])
    det = jacobian_determinant(disp)[2:-2, 2:-2, 2:-2]
    out = {"dice_before": float(np.mean(list(d_before.values()))), "dice": float(np.mean(list(d_after.values()))),
           "dice_per_label": {k: round(v, 4) for k, v in d_after.items()},
           "folding_percent": float(100 * (det <= 0).mean()),
           "std_log_jac": float(np.std(np.log(np.clip(det, 1e-9, None))))}
    if pair.get("true_field") is not None:
        from slicreg.conventions import identity_grid_vox
        from slicreg.supervoxels import body_mask

        true = pair["true_field"]
        sp = np.asarray(pair["spacing"])[:, None, None, None]
        target = identity_grid_vox(true.shape[1:]) + true
        inside = np.all((target >= 0) & (target <= np.asarray(pair["moving"].shape)[:, None, None, None] - 1), axis=0)
        # compared where the fixed image shows the body and the true correspondence exists in the moving image
        body = body_mask(pair["fixed"]) & inside
        organs = (pair["fixed_labels"] > 0) & inside
        err = np.sqrt((((disp - true) * sp) ** 2).sum(0))
        err0 = np.sqrt(((true * sp) ** 2).sum(0))
        out.update({"field_error_mm_mean": float(err[body].mean()),
                    "field_error_mm_p95": float(np.percentile(err[body], 95)),
                    "field_error_mm_organs": float(err[organs].mean()),
                    "field_error_mm_before": float(err0[body].mean())})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, help="dataset folder with registration_pairs (the cohort)")
    ap.add_argument("--example-dir", "--fetch", dest="example_dir", type=Path,
                    help="the example folder (default: the slicreg cache; fetched there first if needed)")
    ap.add_argument("--preset", default="abdomen-ct")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--max-pairs", type=int, default=3)
    ap.add_argument("--only", help="register only the dataset pairs whose name (fixed<-moving) contains this")
    ap.add_argument("--pair-seed", type=int, default=0, help="seed of the synthetic deformation (example pair)")
    ap.add_argument("--cache", type=Path, help="keep the made example pair in this .npz (made once, then reused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overrides", default="{}", help='JSON dict of register_pair overrides, e.g. '
                    '\'{"deformable": {"iterations": [50, 40]}}\'')
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from slicreg.alignment import register_pair

    torch.set_num_threads(args.threads)
    if args.dataset:
        pairs = [p for p in dataset_pairs(args.dataset) if not args.only or args.only in p["name"]][: args.max_pairs]
    else:
        t0 = time.perf_counter()
        if args.cache and args.cache.exists():
            with np.load(args.cache) as z:
                pair = {k: z[k] for k in z.files}
            pair.update(name=str(pair["name"]), spacing=tuple(pair["spacing"]), pull_rms=float(pair["pull_rms"]),
                        pull_max=float(pair["pull_max"]))
        else:
            pair = make_example_pair(args.example_dir, seed=args.pair_seed)
            if args.cache:
                np.savez(args.cache, **pair)
        pairs = [pair]
        print(f"{pair['name']} ready in {time.perf_counter() - t0:.1f} s "
              f"(nonlinear pull RMS {pair['pull_rms']:.2f} vox, max {pair['pull_max']:.2f} vox)")
    overrides = json.loads(args.overrides)
    results = []
    for pair in pairs:
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = register_pair(pair["fixed"], pair["moving"], spacing_mm=pair["spacing"], preset=args.preset,
                            seed=args.seed, **overrides)
        seconds = time.perf_counter() - t0
        row = {"pair": pair["name"], "shape": list(pair["fixed"].shape), "seconds": round(seconds, 2),
               "cpu_seconds": round(time.process_time() - c0, 2),
               "stages": res.info["stages"], "iterations": res.info["iterations"], "threads": args.threads,
               **evaluate(pair, res.disp_vox)}
        results.append(row)
        print(json.dumps(row))
    if len(results) > 1:
        print(json.dumps({"mean_seconds": float(np.mean([r["seconds"] for r in results])),
                          "mean_cpu_seconds": float(np.mean([r["cpu_seconds"] for r in results])),
                          "mean_dice": float(np.mean([r["dice"] for r in results])),
                          "mean_dice_before": float(np.mean([r["dice_before"] for r in results]))}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
