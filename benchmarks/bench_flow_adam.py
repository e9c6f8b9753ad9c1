"""Benchmark: the keypoint flow's own Adam (``slicreg.flow.Adam``) against ``torch.optim.Adam``, in one run.

Part 1 -- first use in a fresh process: each optimiser is created and stepped once on a ``(2048, 3)`` tensor
(the keypoint displacements) in its own child process, after ``import torch``; printed: seconds to the end of the
first step and of the second one (median over ``--repeats`` processes). ``torch.optim``'s first step imports
``torch._dynamo``, which is the cost ``slicreg.flow.Adam`` avoids.

Part 2 -- the same problem, the same iterations: ``slicreg.flow.adam_keypoint_flow`` on synthetic supervoxel
features (``--layers`` layers of 127 Voronoi cells on a ``--shape`` grid, the moving maps a smooth pull of the
fixed ones, as in ``bench_flow.py``) for ``--iterations`` Adam steps without early stop, once with each optimiser
(``torch.optim.Adam`` through a two-line adapter with the same ``step(grad)``), alternating, ``--repeats`` times.
Printed: median (and minimum) wall seconds of the whole flow and the median per iteration, and the largest
difference of the two results (sv voxels; 0 means bitwise equal).

    .venv/bin/python benchmarks/bench_flow_adam.py [--repeats 3] [--iterations 100] [--shape 48 40 64]
        [--layers 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FIRST_USE = {
    "slicreg.flow.Adam": """
import time, torch
p, g = torch.zeros(2048, 3), torch.randn(2048, 3, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
from slicreg.flow.optim import Adam
opt = Adam(p, lr=1.0)
opt.step(g)
t1 = time.perf_counter()
opt.step(g)
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
""",
    "torch.optim.Adam": """
import time, torch
p, g = torch.zeros(2048, 3), torch.randn(2048, 3, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
opt = torch.optim.Adam([p], lr=1.0)
p.grad = g
opt.step()
t1 = time.perf_counter()
opt.step()
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
""",
}


class TorchAdam:
    """``torch.optim.Adam`` with the interface of ``slicreg.flow.Adam`` (one tensor, ``step(grad)``)."""

    def __init__(self, param, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.param = param
        self.opt = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)

    def step(self, grad) -> None:
        self.param.grad = grad
        self.opt.step()


def first_use(repeats: int, threads: int) -> None:
    print(f"1. first use in a fresh process (after `import torch`), median of {repeats} processes")
    print(f"   {'optimiser':<20} {'1st step s':>10} {'2nd step s':>10}")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    import os

    env = {**os.environ, **env}
    rows = {}
    for _ in range(repeats):
        for name, code in FIRST_USE.items():  # alternating
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            rows.setdefault(name, []).append([float(v) for v in out.stdout.split()])
    for name, vals in rows.items():
        first = statistics.median(v[0] for v in vals)
        second = statistics.median(v[1] for v in vals)
        print(f"   {name:<20} {first:10.3f} {second:10.3f}")


def same_problem(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_flow import pull, smooth_map, voronoi_maps

    from slicreg import flow
    from slicreg.flow import keypoint_flow

    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    fixed = voronoi_maps(shape, args.layers, 127, seed=0)
    moving = pull(fixed, smooth_map(shape, 2.0, 3.0, seed=1))
    pts, _ = flow.supervoxel_centres(torch.from_numpy(fixed))
    ff = flow.supervoxel_features(torch.from_numpy(fixed))
    mf = flow.supervoxel_features(torch.from_numpy(moving))
    own = keypoint_flow.Adam
    results: dict[str, list] = {}
    times: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            for name, opt in (("slicreg.flow.Adam", own), ("torch.optim.Adam", TorchAdam)):  # alternating
                keypoint_flow.Adam = opt
                t0 = time.perf_counter()
                disp, info = flow.adam_keypoint_flow(ff, mf, pts, iterations=args.iterations, patience=0)
                times.setdefault(name, []).append(time.perf_counter() - t0)
                results[name] = [disp, info["iterations_run"]]
    finally:
        keypoint_flow.Adam = own
    print(f"\n2. the same problem: adam_keypoint_flow, {pts.shape[0]} keypoints, features {tuple(ff.shape)}, "
          f"{args.iterations} iterations, {args.threads} threads, median of {args.repeats} (alternating)")
    print(f"   {'optimiser':<20} {'flow s':>8} {'min s':>8} {'per iteration ms':>17} {'iterations':>10}")
    for name, vals in times.items():
        med = statistics.median(vals)
        print(f"   {name:<20} {med:8.3f} {min(vals):8.3f} {1000 * med / args.iterations:17.3f} {results[name][1]:10d}")
    a, b = (results[k][0] for k in ("slicreg.flow.Adam", "torch.optim.Adam"))
    diff = float((a - b).abs().max())
    print(f"   largest difference of the two displacements: {diff:.3g} sv voxels"
          f"{' (bitwise equal)' if diff == 0 else ''}; mean |displacement| {float(a.norm(dim=1).mean()):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 40, 64])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    np.random.seed(0)
    first_use(args.repeats, args.threads)
    same_problem(args)


if __name__ == "__main__":
    main()
