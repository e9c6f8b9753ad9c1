"""The one sampler's hot paths against the implementations they replaced, in the same run.

The previous implementations are read from a git revision (default ``HEAD``: the code before the sampler was
folded into ``slicreg.fields``) into throw-away modules, so old and new run alternately on the same inputs and the
same machine state. Three paths, each timed ``--repeat`` times alternating old/new (best-of wall time -- the
machine is shared, and the best of several runs is the figure least disturbed by other jobs -- with the median
beside it, and the ratio of the best times new / old; < 1 = faster):

1. **flow**: one autograd Adam iteration's feature read of the keypoint flow -- 2048 points x 256 channels
   from 48 x 40 x 64 channels-last features, MSE, backward (old: ``flow.sample_channels_last``; new:
   ``fields.sample(..., backend="channels_last")``);
2. **warp**: warping a 192 x 160 x 256 CT-like volume by a smooth field, the fast path of
   ``slicreg register --out-warped`` (old: ``warp_image(fast=True)``; new: ``warp_image(backend="grid_sample")``),
   and the exact gather path (``warp_image`` / ``warp_labels`` defaults);
3. **augment**: the training augmentation of a batch of 4 (input 96 x 80 x 128, 16 target layers, uint8), with
   the 8192 candidate head voxels per scan the trainer uses and on the whole output grid (old and new
   ``train.augment_batch``).

Also printed: the largest difference between old and new outputs.

    .venv/bin/python benchmarks/bench_sampler.py [--repeat 5] [--threads 2] [--rev HEAD]
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def old_source(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def old_module(rev: str, path: str, name: str) -> types.ModuleType:
    """A whole module of revision ``rev`` as a throw-away module (its imports resolve against today's tree)."""
    mod = types.ModuleType(name)
    mod.__file__ = f"{rev}:{path}"
    sys.modules[name] = mod  # dataclasses and annotations look their module up
    exec(compile(old_source(rev, path), mod.__file__, "exec"), mod.__dict__)
    return mod


def old_function(rev: str, path: str, name: str, namespace: dict) -> object:
    """One top-level function of ``path`` at ``rev``, compiled alone in ``namespace``."""
    tree = ast.parse(old_source(rev, path))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), f"{rev}:{path}", "exec"), ns)
    return ns[name]


def alternate(old, new, repeat: int) -> tuple[list[float], list[float]]:
    """Wall times of ``repeat`` runs each of ``old()`` and ``new()``, run alternately after one warm-up each."""
    old(), new()
    t_old, t_new = [], []
    for _ in range(repeat):
        for fn, acc in ((old, t_old), (new, t_new)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return t_old, t_new


def row(name: str, t_old: list[float], t_new: list[float], diff: float) -> None:
    b_old, b_new = min(t_old), min(t_new)
    print(f"  {name:46s} old {b_old * 1e3:7.1f} ms (median {np.median(t_old) * 1e3:7.1f})   new {b_new * 1e3:7.1f} ms "
          f"(median {np.median(t_new) * 1e3:7.1f})   new/old {b_new / b_old:5.2f}   max |new - old| {diff:.2e}")


def bench_flow(rev: str, repeat: int) -> None:
    from slicreg.fields import sample

    old_flow = old_module(rev, "slicreg/flow.py", "_old_flow")
    gen = torch.Generator().manual_seed(0)
    size = (48, 40, 64)
    feats_cl = torch.rand(256, *size, generator=gen).permute(1, 2, 3, 0).contiguous()
    target = torch.rand(2048, 256, generator=gen)
    pts = torch.rand(2048, 3, generator=gen) * torch.tensor([s - 1.0 for s in size])

    def iteration(read):
        disp = torch.full_like(pts, 0.3, requires_grad=True)
        loss = F.mse_loss(read(pts + disp), target)
        loss.backward()
        return disp.grad

    def read_old(p):
        return old_flow.sample_channels_last(feats_cl, p)

    def read_new(p):  # as slicreg.flow.keypoint_flow reads its features
        return sample(feats_cl.permute(3, 0, 1, 2), p.t(), backend="channels_last").t()

    t_old, t_new = alternate(lambda: iteration(read_old), lambda: iteration(read_new), repeat * 20)
    diff = float((iteration(read_old) - iteration(read_new)).abs().max())
    print("[flow] keypoint feature read, 2048 points x 256 channels at 48x40x64, forward + backward")
    row("channels-last gather (autograd Adam step)", t_old, t_new, diff)


def bench_warp(rev: str, repeat: int) -> None:
    from scipy import ndimage

    from slicreg.fields import warp_image, warp_labels

    old_fields = old_module(rev, "slicreg/fields.py", "_old_fields")
    rng = np.random.default_rng(0)
    shape = (192, 160, 256)
    image = ndimage.gaussian_filter(rng.normal(0, 300, shape).astype(np.float32), 3) * 10
    labels = (np.abs(image) // 200).clip(0, 13).astype(np.uint8)
    disp = np.stack([ndimage.zoom(rng.normal(0, 3, (6, 5, 8)), [s / n for s, n in zip(shape, (6, 5, 8))], order=1)
                     for _ in range(3)]).astype(np.float32)
    print(f"[warp] {shape} float32 image / uint8 labels, smooth field (|u| up to {np.abs(disp).max():.1f} voxels)")
    a, b = old_fields.warp_image(image, disp, fast=True), warp_image(image, disp, backend="grid_sample")
    row("warp_image fast path (grid_sample)", *alternate(lambda: old_fields.warp_image(image, disp, fast=True),
                                                         lambda: warp_image(image, disp, backend="grid_sample"),
                                                         repeat), float(np.abs(a - b).max()))
    a, b = old_fields.warp_image(image, disp), warp_image(image, disp)
    row("warp_image exact (gather)", *alternate(lambda: old_fields.warp_image(image, disp),
                                                lambda: warp_image(image, disp), repeat), float(np.abs(a - b).max()))
    a, b = old_fields.warp_labels(labels, disp), warp_labels(labels, disp)
    row("warp_labels (gather, nearest, zeros)", *alternate(lambda: old_fields.warp_labels(labels, disp),
                                                           lambda: warp_labels(labels, disp), repeat),
        float(np.abs(a.astype(int) - b.astype(int)).max()))


def bench_augment(rev: str, repeat: int) -> None:
    from slicreg.network import N_LAYERS
    from slicreg.train import augment_batch, random_affines, random_voxels

    old_augment = old_function(rev, "slicreg/train.py", "augment_batch",
                               {"torch": torch, "F": F, "N_LAYERS": N_LAYERS})
    gen = torch.Generator().manual_seed(0)
    b, size = 4, (96, 80, 128)
    images = torch.randn(b, 1, *size, generator=gen)
    targets = torch.randint(0, 128, (b, 16, *size), generator=gen, dtype=torch.uint8)
    theta = random_affines(b, sigma=0.07, generator=gen)
    out_size = int(np.prod([s // 2 for s in size]))
    voxels = random_voxels(b, 4 * 2048, out_size, generator=gen)
    print(f"[augment] batch {b}, input {size}, 16 uint8 target layers, theta = I + 0.07 N(0, 1)")
    for name, kw in (("candidate voxels (8192 per scan)", {"voxels": voxels}), ("whole output grid", {})):
        xo, to = old_augment(images, targets, theta, **kw)
        xn, tn = augment_batch(images, targets, theta, **kw)
        t_old, t_new = alternate(lambda kw=kw: old_augment(images, targets, theta, **kw),
                                 lambda kw=kw: augment_batch(images, targets, theta, **kw), repeat)
        row(f"augment_batch, {name}", t_old, t_new, float((xo - xn).abs().max()))
        print(f"  {'':46s} targets: {float((to != tn).float().mean()) * 100:.4f} % of labels differ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rev", default="HEAD", help="git revision holding the previous implementations")
    ap.add_argument("--only", choices=["flow", "warp", "augment"], action="append")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); old = {args.rev}, new = the working tree")
    for name, fn in (("flow", bench_flow), ("warp", bench_warp), ("augment", bench_augment)):
        if args.only is None or name in args.only:
            fn(args.rev, args.repeat)


if __name__ == "__main__":
    main()
