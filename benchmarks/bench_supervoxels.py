"""Benchmark (and compactness sweep) of the template supervoxels on a realistic 192 x 160 x 256 template.

The template is the real example CT of TotalSegmentator 2.18.0 (a non-contrast abdomen CT, 3 mm, Apache-2.0),
preprocessed as every scan is (``benchmarks/_common.py``: RAS, 2 mm, 192 x 160 x 256 around the soft-tissue
centre); its organ labels (TotalSegmentator ids mapped to the 13 BTCV organs) give the reference organ mask. The
example is fetched once into the slicreg cache (or ``--example-dir``) by ``preprocessing.example.fetch_example``
(docs/supervoxels.md, DATA.md).

    .venv/bin/python benchmarks/bench_supervoxels.py --jobs 2            # timing of all 16 layers
    .venv/bin/python benchmarks/bench_supervoxels.py --tune --layers 4   # compactness sweep (slow)

Prints the wall time of all layers (SLIC, mapping back, connectivity fix, merge) and per-layer statistics;
writes the supervoxels, their PNG and JSON into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import example_template


def boundary_recall(layers: np.ndarray, labels4: np.ndarray, tolerance: int = 1) -> float:
    """Fraction of organ-boundary voxels (4 mm) within ``tolerance`` voxels of a supervoxel boundary (mean)."""
    from scipy import ndimage

    def edges(a: np.ndarray) -> np.ndarray:
        e = np.zeros(a.shape, dtype=bool)
        for ax in range(3):
            d = np.diff(a, axis=ax) != 0
            sl_a = [slice(None)] * 3
            sl_b = [slice(None)] * 3
            sl_a[ax] = slice(1, None)
            sl_b[ax] = slice(None, -1)
            e[tuple(sl_a)] |= d
            e[tuple(sl_b)] |= d
        return e

    organ_edge = edges(labels4) & (labels4 > 0)
    recalls = []
    for layer in layers:
        sv_edge = ndimage.binary_dilation(edges(layer) & (layer > 0), iterations=tolerance)
        recalls.append(float((organ_edge & sv_edge).sum() / max(organ_edge.sum(), 1)))
    return float(np.mean(recalls))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask", choices=("organs", "body"), default="organs")
    parser.add_argument("--compactness", type=float, default=None, help="default: the module's DEFAULT_COMPACTNESS")
    parser.add_argument("--tune", action="store_true", help="sweep compactness values instead of timing")
    parser.add_argument("--values", default="0.025,0.05,0.1,0.2,0.375,0.75",
                        help="compactness values for --tune (comma separated)")
    parser.add_argument("--example-dir", default=None,
                        help="the example folder (default: the slicreg cache; fetched there first if needed)")
    parser.add_argument("--out-dir", default="/tmp/bench_supervoxels")
    args = parser.parse_args()

    from slicreg import supervoxels as sv

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image, labels, affine = example_template(args.example_dir)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = sv.organ_mask(labels, distance_vox=30) if args.mask == "organs" else sv.body_mask(image)
    t_mask = time.perf_counter() - t0
    labels4 = labels[::2, ::2, ::2]  # nearest-ish 4 mm organ labels for boundary recall only
    print(f"template {image.shape}, fetch + preprocess {t_prep:.1f} s; {args.mask} mask {int(mask.sum())} voxels "
          f"({t_mask:.1f} s); mask at 4 mm: {int(sv.downsample_mask(mask).sum())} voxels")

    if args.tune:
        rows = []
        for c in [float(v) for v in args.values.split(",")]:
            t0 = time.perf_counter()
            res = sv.build_supervoxel_layers(image, mask, n_layers=args.layers, compactness=c, seed=args.seed,
                                             jobs=args.jobs)
            wall = time.perf_counter() - t0
            stats = sv.supervoxel_statistics(res.layers, image_hu=res.image)
            row = {
                "compactness": c, "wall_s": round(wall, 1),
                "slic_segments_mean": float(np.mean([i["slic_segments"] for i in res.layer_info])),
                "fragment_voxels_mean": float(np.mean([i["fragment_voxels"] for i in res.layer_info])),
                "merges_mean": float(np.mean([i["merges"] for i in res.layer_info])),
                "compactness_score_median": float(np.median([s["compactness_score"]["median"] for s in stats])),
                "volume_cv_mean": float(np.mean([s["volume_cv"] for s in stats])),
                "hu_std_within_mean": float(np.mean([s["hu_std_within_mean"] for s in stats])),
                "organ_boundary_recall": boundary_recall(res.layers, labels4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out_dir / f"tune_c{c:g}.png").write_bytes(sv.overlay_png(image, res.layers))
        (out_dir / "tune.json").write_text(json.dumps(rows, indent=2))
        return 0

    import os
    import resource

    def cpu_s() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    kwargs = {} if args.compactness is None else {"compactness": args.compactness}
    load_before = os.getloadavg()[0]
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    res = sv.build_supervoxel_layers(image, mask, n_layers=args.layers, seed=args.seed, jobs=args.jobs, **kwargs)
    wall = time.perf_counter() - t0
    cpu = cpu_s() - cpu0
    counts = [int(np.unique(layer).size - 1) for layer in res.layers]
    stats = sv.supervoxel_statistics(res.layers, image_hu=res.image)
    print(f"{args.layers} layers, jobs={args.jobs}: {wall:.1f} s wall (SLIC + map back + fix + merge, incl. worker "
          f"start-up); CPU {cpu:.1f} s in all processes = {cpu / max(args.jobs, 1):.1f} s per core; load average "
          f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores; labels per layer "
          f"{sorted(set(counts))}")
    for i, (info, st) in enumerate(zip(res.layer_info, stats)):
        print(f"  layer {i:2d}: slic {info['slic_segments']:3d} -> fix {info['labels_after_fix']:3d} "
              f"(fragments {info['fragment_voxels']:4d} vox, grown {info['grown_voxels']:4d} vox) -> merges "
              f"{info['merges']:3d}, splits {info['splits']}; volume median {st['volume_ml']['median']:.1f} mL "
              f"(cv {st['volume_cv']:.2f}), compactness {st['compactness_score']['median']:.2f}, "
              f"HU std {st['hu_std_within_mean']:.0f}")
    print(f"organ boundary recall (1 voxel tolerance, 4 mm): {boundary_recall(res.layers, labels4):.3f}")
    import nibabel as nib

    from slicreg.conventions import downsample_affine

    nib.save(nib.Nifti1Image(np.moveaxis(res.layers, 0, -1), downsample_affine(affine, 2)),
             str(out_dir / "supervoxels.nii.gz"))
    nib.save(nib.Nifti1Image(image, affine), str(out_dir / "template.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(out_dir / "template_labels.nii.gz"))
    (out_dir / "supervoxels.png").write_bytes(sv.overlay_png(image, res.layers))
    print(f"wrote {out_dir}/supervoxels.nii.gz, supervoxels.png, template.nii.gz, template_labels.nii.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
