"""What the refinement's discrete search costs: the preset ``refine`` with and without ``discrete``, alternately.

One pair of a preprocessed cohort (default: a training subject <- the template), the crop records as masks, a zero
starting field (the cost does not depend on the field), ``--repeat`` alternations. Prints wall and CPU seconds and
the seconds of each level (``info["levels"]``). Usage::

    python benchmarks/bench_discrete_cost.py --threads 1
    python benchmarks/bench_discrete_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(ROOT / "runs/helper-refine/work/prep/current"))
    ap.add_argument("--fixed", default="cohort_0002", help="fixed subject (a training subject)")
    ap.add_argument("--moving", default="cohort_0000", help="moving subject (the template)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from slicreg.geometry import load_fov_mask
    from slicreg.io import load_image
    from slicreg.registration import refine_field

    torch.set_num_threads(args.threads)
    ds = Path(args.dataset)
    images = [load_image(ds / "imagesTr" / f"{s}_0000.nii.gz").array.astype(np.float32)
              for s in (args.fixed, args.moving)]
    masks = [load_fov_mask(ds / "crops" / f"{s}.json", im.shape, f"crop record of {s}")
             for s, im in zip((args.fixed, args.moving), images)]
    zero = np.zeros((3, *images[0].shape), np.float32)
    variants = [("without", {"deformable": {"discrete": 0}}), ("with", {})]
    print(f"{args.fixed} <- {args.moving}, torch threads {torch.get_num_threads()}")
    for _ in range(args.repeat):
        for name, kw in variants:
            t, c = time.perf_counter(), time.process_time()
            _, info = refine_field(images[0], images[1], zero, fixed_mask=masks[0], moving_mask=masks[1], **kw)
            print(f"{name:8s} wall {time.perf_counter() - t:.2f} s, CPU {time.process_time() - c:.2f} s, levels "
                  + " / ".join(f"{lv['seconds']:.2f}" for lv in info["levels"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
