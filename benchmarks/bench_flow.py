"""Benchmark of the supervoxel flow (slicreg.flow): sampler cost per Adam iteration, and the whole flow.

Part 1 -- one Adam iteration (sampling 2048 points x 256 channels from a 48 x 40 x 64 feature volume, MSE,
backward) with the one sampler's ``"channels_last"`` backend (``slicreg.fields.sample``) and with its
``"grid_sample"`` backend, in the same run, median over ``--iters`` iterations, and the ratio.

Part 2 -- the whole ``supervoxel_flow`` at full size on synthetic supervoxel maps: 16 layers of 127 Voronoi
cells inside an ellipsoid on the 96 x 80 x 128 grid (a stand-in for SLIC layers at 4 mm); the moving maps are
the fixed maps pulled through a known smooth map (a translation plus sine modes, ``--amp``/``--shift`` in sv
voxels) by nearest neighbour. Printed: time per step (keypoints, features, Adam, dense TPS field on
192 x 160 x 256), keypoint error against the true displacement (sv voxels = 4 mm), dense-field error in the
interior (fine voxels = 2 mm), peak RSS. ``--compare KERNEL:LAM ...`` adds dense fields from the same keypoint
displacements with other TPS kernels / regularisations, also from keypoint displacements with added noise
(``--noise`` fine voxels, Gaussian, plus 5 % outliers of 8x that), which stands in for predicted supervoxels.
``--previous`` also runs the flow with its previous algorithms (autograd Adam, TPS evaluated point by point and
``interpolate``), alternating with the current ones, and prints both and their difference.

    .venv/bin/python benchmarks/bench_flow.py [--threads 2] [--iters 20] [--init zero|centres]
        [--patience 10 --tol 3e-3] [--previous]
        [--compare r:0 r:30 r:100 r2logr:1000 r2logr:10000] [--noise 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from slicreg import flow
from slicreg.fields import sample

SV_SHAPE = (96, 80, 128)


def voronoi_maps(shape, n_layers, n_sv, seed):
    """(L, X, Y, Z) uint8: Voronoi cells of ``n_sv`` random seeds per layer inside an ellipsoid, 0 outside."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    centre, radius = (np.array(shape) - 1) / 2, np.array(shape) * 0.42
    mask = (((grid - centre) / radius) ** 2).sum(1) <= 1
    fg = grid[mask]
    out = np.zeros((n_layers, grid.shape[0]), np.uint8)
    for layer in range(n_layers):
        seeds = fg[rng.choice(len(fg), n_sv, replace=False)] + rng.uniform(-0.5, 0.5, (n_sv, 3))
        out[layer, mask] = cKDTree(seeds).query(fg)[1] + 1
    return out.reshape(n_layers, *shape)


def smooth_map(shape, amp, shift, seed):
    """v(x): (N, 3) -> (N, 3) in voxels: a translation plus two sine modes per component."""
    rng = np.random.default_rng(seed)
    size = np.array(shape, float)
    modes = [(a, rng.normal(size=3) * 2 * np.pi / size, rng.uniform(0, 2 * np.pi)) for a in range(3) for _ in range(2)]

    def v(x):
        out = np.zeros_like(x) + np.asarray(shift, float)
        for a, kvec, phase in modes:
            out[:, a] += amp * np.sin(x @ kvec + phase)
        return out

    return v


def pull(fixed, v):
    shape = fixed.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    coords = torch.from_numpy((grid + v(grid)).T.reshape(3, *shape).astype(np.float32))
    return sample(torch.from_numpy(fixed), coords, interpolation="nearest", padding="zeros").numpy()


def true_disp(points, v, iters=60):
    """u with moving(p + u) = fixed(p) when moving(q) = fixed(q + v(q)): fixed point of u = -v(p + u)."""
    u = np.zeros_like(points, dtype=float)
    for _ in range(iters):
        u = -v(points + u)
    return u


def bench_sampler(iters: int, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    size = (48, 40, 64)
    feats = torch.rand(256, *size, generator=gen).to(device)
    target = torch.rand(2048, 256, generator=gen).to(device)
    pts = (torch.rand(2048, 3, generator=gen) * torch.tensor([s - 1.0 for s in size])).to(device)
    t = time.perf_counter()
    feats_cl = flow.to_channels_last(feats)
    copy_s = time.perf_counter() - t

    def one(sampler, src):
        disp = torch.full_like(pts, 0.3, requires_grad=True)
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(sampler(src, pts + disp), target)
        loss.backward()
        return time.perf_counter() - t0

    def channels_last(src, p):  # (X, Y, Z, C) at (N, 3) -> (N, C), as the Adam flow reads its features
        return sample(src.permute(3, 0, 1, 2), p.t(), backend="channels_last").t()

    def grid_sample(src, p):  # (C, X, Y, Z) at (N, 3) -> (N, C)
        return sample(src, p.t(), backend="grid_sample", align_corners=True).t()

    rows = {}
    for name, sampler, src in [("gather (channels-last)", channels_last, feats_cl),
                               ("grid_sample", grid_sample, feats)]:
        one(sampler, src)  # warm-up
        rows[name] = float(np.median([one(sampler, src) for _ in range(iters)]))
    a = channels_last(feats_cl, pts)
    b = grid_sample(feats, pts)
    print(f"[sampler] 2048 points x 256 channels at 48x40x64, forward+backward, median of {iters}:")
    for name, sec in rows.items():
        print(f"  {name:24s} {sec * 1e3:8.1f} ms/iteration")
    print(f"  ratio grid_sample / gather: {rows['grid_sample'] / rows['gather (channels-last)']:.1f}x; "
          f"channels-last copy {copy_s * 1e3:.1f} ms (once); max |difference| {float((a - b).abs().max()):.2e}")


def bench_flow(args) -> None:
    t = time.perf_counter()
    fixed = voronoi_maps(SV_SHAPE, 16, 127, seed=args.seed)
    v = smooth_map(SV_SHAPE, args.amp, args.shift, seed=args.seed + 1)
    moving = pull(fixed, v)
    print(f"[flow] synthetic maps 16 x {SV_SHAPE} made in {time.perf_counter() - t:.1f} s; "
          f"map: sine amplitude {args.amp} + shift {tuple(args.shift)} sv voxels")
    fixed_t, moving_t = torch.from_numpy(fixed), torch.from_numpy(moving)
    variants = {"current": {}}
    if args.previous:  # the previous algorithms, alternately in the same process
        variants["previous"] = {"gradient": "autograd", "evaluation": "points"}
    results = {}
    for _rep in range(2 if args.previous else 1):
        for name, opts in variants.items():
            results[name] = flow.supervoxel_flow(fixed_t, moving_t, init=args.init, patience=args.patience,
                                                 tol=args.tol, device=args.device, **opts)
    for name, (_disp, inf) in results.items():
        for key, what in [("timings_s", "wall"), ("cpu_s", "CPU (all threads)")]:
            tim = inf[key]
            print(f"  {name:8s} {what:17s}: keypoints {tim['keypoints']:.2f} s, features (both) "
                  f"{tim['features']:.2f} s, Adam ({inf['iterations_run']} it, {inf['params']['n_keypoints']} points) "
                  f"{tim['adam']:.2f} s, dense TPS {tim['dense']:.2f} s -> total {tim['total']:.2f} s")
    disp, info = results["current"]
    if args.previous:
        d_prev, i_prev = results["previous"]
        print(f"  current vs previous: keypoint displacements max |difference| "
              f"{float((info['disp_sv_vox'] - i_prev['disp_sv_vox']).abs().max()):.2e} sv voxels, dense field "
              f"{float((disp - d_prev).abs().max()):.2e} fine voxels")
    pts = info["keypoints_sv_vox"].numpy().astype(float)
    truth = true_disp(pts, v)
    err = np.linalg.norm(info["disp_sv_vox"].numpy() - truth, axis=1)
    print(f"  true |u| at keypoints: mean {np.linalg.norm(truth, axis=1).mean():.2f} sv voxels; error mean "
          f"{err.mean():.3f}, median {np.median(err):.3f}, 90th pct {np.percentile(err, 90):.3f} sv voxels (4 mm)")

    # dense error on a subsample of interior fine voxels
    rng = np.random.default_rng(0)
    fine_shape = tuple(2 * s for s in SV_SHAPE)
    cand = rng.integers(0, fine_shape, (200000, 3))
    q = (cand - 0.5) / 2
    centre, radius = (np.array(SV_SHAPE) - 1) / 2, np.array(SV_SHAPE) * 0.42
    inner = (((q - centre) / (0.8 * radius)) ** 2).sum(1) <= 1
    cand, q = cand[inner], q[inner]
    truth_fine = 2 * true_disp(q, v)

    def dense_err(field):
        est = field[:, cand[:, 0], cand[:, 1], cand[:, 2]].T
        e = np.linalg.norm(est - truth_fine, axis=1)
        return e.mean(), np.percentile(e, 95)

    e_mean, e_95 = dense_err(disp.numpy())
    print(f"  dense field (kernel {info['params']['kernel']}, lam {info['params']['lam']}): interior error mean "
          f"{e_mean:.3f}, 95th pct {e_95:.3f} fine voxels (2 mm)")
    kp, dk = info["keypoints_vox"], info["disp_keypoints_vox"]
    rng = np.random.default_rng(1)
    noisy = dk + torch.from_numpy(rng.normal(scale=args.noise, size=tuple(dk.shape))).float()
    outlier = torch.from_numpy(rng.random(dk.shape[0]) < 0.05)
    noisy[outlier] += torch.from_numpy(rng.normal(scale=8 * args.noise, size=(int(outlier.sum()), 3))).float()
    for item in args.compare:
        kernel, lam = item.split(":")
        for name, values in [("adam", dk), (f"noisy {args.noise:g}", noisy)]:
            t = time.perf_counter()
            field = flow.tps_dense_field(kp, values, fine_shape, kernel=kernel, lam=float(lam), device=args.device)
            sec = time.perf_counter() - t
            e_mean, e_95 = dense_err(field.numpy())
            print(f"  kernel {kernel:6s} lam {float(lam):7g} ({name:9s} keypoints): {sec:5.2f} s, interior error "
                  f"mean {e_mean:.3f}, 95th pct {e_95:.3f} fine voxels")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=20, help="iterations timed per sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", type=float, default=2.0, help="sine amplitude of the synthetic map (sv voxels)")
    parser.add_argument("--shift", type=float, nargs=3, default=(4.0, -3.0, 5.0), help="translation (sv voxels)")
    parser.add_argument("--init", default="zero", choices=["zero", "centres"])
    parser.add_argument("--patience", type=int, default=0, help="Adam early stop patience (0 = off, the default)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Adam early stop relative tolerance")
    parser.add_argument("--compare", nargs="*", default=[], metavar="KERNEL:LAM",
                        help="also dense fields with these TPS settings, e.g. r:30 r2logr:3000")
    parser.add_argument("--noise", type=float, default=2.0, help="keypoint noise for --compare (fine voxels)")
    parser.add_argument("--previous", action="store_true",
                        help="also run the flow's previous algorithms (gradient='autograd', evaluation='points') "
                             "in the same process (twice each, alternating; the second run is printed)")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--skip-flow", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not args.skip_sampler:
        bench_sampler(args.iters, args.device)
    if not args.skip_flow:
        bench_flow(args)


if __name__ == "__main__":
    main()
