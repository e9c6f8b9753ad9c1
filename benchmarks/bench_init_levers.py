"""The supervoxel stage's "initialiser levers" (issue 18, item 2) on the cohort's TRAINING pairs, in one run.

Pairs are those of ``benchmarks/tune_flow.py`` (its pair selection, caches, true fields and scoring are reused):
each training subject (fixed) <- the template (moving), atlas mode as ``slicreg register`` registers -- the
fixed maps predicted by the bundle, the moving side the bundle's own template supervoxels -- plus ``--slabs``
40 mm slabs simulated from training subjects. Test subjects are refused (``tune_flow.select_subjects``).

Per pair the network runs here (one thread, bf16 as ``slicreg register``) on the fixed scan and on copies shifted
by one network output voxel (8 mm) along the diagonals, each shifted back (``SHIFTS``; the border the shift
leaves empty keeps the unshifted pass): per pass the argmax labels (bitwise those of
``slicreg.registration.network_labels``), the softmax probabilities compressed to the flow's 16 channels per
layer (the sum of the probabilities of the labels sharing a channel: ``slicreg.flow.label_channel_map``, seed 0),
and the mean over the layers of the largest probability. Cached in ``--lever-cache`` (``net_<sha>_<pair>.npz``).

Then every lever runs ``slicreg.registration.register_supervoxel_maps`` (the registration defaults,
``FLOW_DEFAULTS``, plus the lever's options) on the same pair; the baseline is the defaults on the unshifted
argmax maps. Levers (``--levers``, tokens joined by ``+`` combine):

1. keypoint rejection (``slicreg.flow.rejection``, options of ``supervoxel_flow``, off by default):
   ``spread=X`` (layers disagreeing on the displacement by more than X sv voxels, before the flow),
   ``residual=F`` (the fraction F of keypoints with the largest feature residual after the flow, before the
   spline), ``conf=X`` (mean largest softmax probability below X, before the flow), ``agree3=X`` / ``agree5=X``
   (agreement of the 3 / 5 test-time passes with their vote below X, before the flow);
2. soft correspondences: ``soft`` / ``soft-t2`` -- the fixed features from the softmax probabilities
   (temperature 1 / 2) instead of the argmax one-hot (``supervoxel_flow(fixed_features=...)``), computed with the
   label path's geometry (:func:`soft_features`: the nearest upsampling of the network grid and the same box
   poolings, so one-hot input gives the label features exactly). The moving side is the template's own (hard)
   supervoxels, keypoints and the centre initialisation come from the argmax maps;
   ``soft-centred``: the same with the network's own geometry (:func:`centred_features`: output voxel ``q`` at
   supervoxel-grid voxel ``2 q``, linear interpolation) instead of the label path's nearest upsampling, which
   puts it half a voxel (2 mm per axis) off -- in atlas mode the moving side (the template's own maps) does not
   share that offset, so it biases the field; ``centred``: the argmax one-hot with that geometry; ``shift=S``:
   the baseline field plus ``S`` fine voxels on every axis (``shift=-1`` undoes the offset after the fact).
   Since slicreg 0.5.0 the flow itself places the maps' content where the network read it
   (``slicreg.flow.content_offset``), so the baseline no longer has the offset and these levers (``*centred``,
   ``shift=-1``) now correct it twice: measured before 0.5.0 (results/init_levers_20261206.md), not to be read
   as gains on today's baseline;
3. test-time augmentation: ``tta3-vote`` / ``tta5-vote`` (per-voxel majority of the 3 / 5 passes' labels, ties
   to the unshifted pass) and ``tta3-soft`` / ``tta5-soft`` (voted labels, features from the averaged
   probabilities); ``tta5-soft-centred``: the latter with the centred geometry;
4. keypoints: ``n=N`` (random keypoints), ``k=K`` (kNN graph);
5. regularisation: ``alpha=A`` (kNN diffusion), ``lam=L`` (thin-plate spline).

Scores as ``bench_refine.py`` (``tune_flow.Tuner._score_fields(full=True)``): Dice over the 13 organs on every
voxel (in brackets inside the fixed scan's field of view), field error in mm against the cohort's true field
inside the body (every ``--eval-stride``-th voxel), % det J <= 0, SDlogJ. CPU seconds: the supervoxel field
(``register_supervoxel_maps`` plus, for soft features, their computation) and the network separately (the passes a
lever needs: 1, 3 or 5; the softmax and compression when it uses probabilities). A pair is better / worse when its
field error differs by more than 0.05 mm (Dice: 0.002). A lever "pays" when its mean field error over all pairs
drops by more than 0.1 mm without the full or the slab pairs' mean Dice dropping by more than 0.002. Per group
(network outputs / geometry, spread, residual, confidence, n, k, alpha, lam) the cheapest paying lever within
0.1 mm of the group's best joins the combination (``--combo`` overrides; ``--refine-extra`` adds levers). The
baseline and the combination are then refined (``refine_field(preset="refine")`` with the crop records' fields of
view, exactly as ``bench_refine.py``). Writes ``<out>.json`` and ``<out>.md``.

Cost (one thread, measured on 10 subjects + 4 slabs with 19 levers + baseline): per pair ~15 s of CPU for the 5
network passes with their softmax outputs (once; cached, ~0.26 GB a pair), ~3.5 s per lever (the field ~1.5-3 s,
its full-grid scores ~2 s), ~30 s for refining three levers and scoring them: ~85 s a pair for the sweep, 31 min of
CPU for the 14 pairs (38.5 min wall on the shared machine). The 25 default levers on 20 subjects + 4 slabs: ~50 min.
Finished pairs are kept in ``--partial``; a rerun with the same levers resumes from it.

Usage (the machine is shared: nice it, one thread)::

    nice -n 19 env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_init_levers.py \\
        --dataset runs/helper-refine/work/prep/current --weights weights/slicreg-cohort-v3 \\
        --cache runs/helper-refine/cache --lever-cache runs/helper-levers/cache --slabs 4 --threads 1 \\
        --out benchmarks/results/init_levers_20261206
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

#: Test-time shifts in network output voxels (8 mm; the input moves by twice that in 4 mm voxels).
SHIFTS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (1, 1, 1), (-1, -1, -1), (1, -1, 1), (-1, 1, -1))
DEFAULT_LEVERS = ("baseline", "centred", "shift=-1", "spread=2", "spread=3", "residual=0.1", "residual=0.25",
                  "conf=0.5", "conf=0.6", "agree3=0.9", "soft", "soft-t2", "soft-centred", "tta3-vote", "tta5-vote",
                  "tta5-soft", "tta5-soft-centred", "n=1024", "n=4096", "k=3", "k=8", "alpha=2e-6", "alpha=2e-5",
                  "lam=3", "lam=30")
NETWORK_TOKENS = {  # token -> (labels, features, passes); features: (compressed maps, geometry)
    "soft": ("p0", ("comp_p0", "nearest"), 1), "soft-t2": ("p0", ("comp_t2", "nearest"), 1),
    "tta3-vote": ("vote3", None, 3), "tta5-vote": ("vote5", None, 5),
    "tta3-soft": ("vote3", ("comp_tta3", "nearest"), 3), "tta5-soft": ("vote5", ("comp_tta5", "nearest"), 5),
    "centred": ("p0", ("onehot_p0", "centred"), 1), "soft-centred": ("p0", ("comp_p0", "centred"), 1),
    "tta5-soft-centred": ("vote5", ("comp_tta5", "centred"), 5),
}
VALUE_TOKENS = {  # token -> (group, flow option or confidence map, type)
    "spread": ("spread", "reject_spread", float), "residual": ("residual", "reject_residual", float),
    "conf": ("confidence", "maxprob", float), "agree3": ("confidence", "agree3", float),
    "agree5": ("confidence", "agree5", float),
    "n": ("n", "n_random", int), "k": ("k", "k", int), "alpha": ("alpha", "alpha", float), "lam": ("lam", "lam", float),
    "shift": ("network", "shift", float),  # a constant added to the field (fine voxels, every axis): geometry group
}
FE_MARGIN = 0.05  # mm: a pair is better or worse by more than this
PAY_MARGIN = 0.1  # mm: a lever pays when the mean field error over all pairs drops by more than this ...
DICE_MARGIN = 0.002  # ... and neither the full nor the slab pairs' mean Dice drops by more than this


# ------------------------------------------------------------------------------------------------ levers
def parse_lever(name: str) -> dict[str, Any]:
    """``tok+tok+...`` -> ``{"name", "labels", "features", "passes", "confidence", "flow", "groups"}``."""
    spec: dict[str, Any] = {"name": name, "labels": "p0", "features": None, "passes": 1, "confidence": None,
                            "flow": {}, "groups": {}, "shift": 0.0}
    if name == "baseline":
        return spec
    for tok in name.split("+"):
        tok = tok.strip()
        if tok in NETWORK_TOKENS:
            if "network" in spec["groups"]:
                raise SystemExit(f"lever {name!r}: two network-output levers ({spec['groups']['network']}, {tok})")
            spec["labels"], spec["features"], spec["passes"] = NETWORK_TOKENS[tok]
            spec["groups"]["network"] = tok
            continue
        key, sep, value = tok.partition("=")
        if not sep or key not in VALUE_TOKENS:
            raise SystemExit(f"lever {name!r}: unknown token {tok!r}; known: baseline, {', '.join(NETWORK_TOKENS)}, "
                             f"{', '.join(k + '=X' for k in VALUE_TOKENS)}")
        group, option, cast = VALUE_TOKENS[key]
        if group in spec["groups"]:
            raise SystemExit(f"lever {name!r}: two {group} levers")
        spec["groups"][group] = tok
        if group == "confidence":
            spec["confidence"] = option
            spec["flow"]["reject_confidence"] = cast(value)
        elif option == "shift":
            spec["shift"] = cast(value)
        else:
            spec["flow"][option] = cast(value)
    if spec["confidence"] in ("agree3", "agree5"):
        spec["passes"] = max(spec["passes"], int(spec["confidence"][-1]))
    return spec


# ------------------------------------------------------------------------------------------- network side
def channel_order(n_layers: int, seed: int = 0) -> tuple[Any, int]:
    """Per layer the 128 labels ordered by their flow channel (``label_channel_map`` with the background kept in
    its group, whose probability is zeroed first), and the labels per channel: ``(L, 128)`` int64 tensor, 8."""
    import torch

    from slicreg.flow import DEFAULTS, N_LABELS, label_channel_map

    lut = label_channel_map(n_layers, n_channels=DEFAULTS["n_channels"], seed=seed, include_background=True)
    order = np.argsort(lut, axis=1, kind="stable")
    return torch.from_numpy(order.astype(np.int64)), N_LABELS // DEFAULTS["n_channels"]


def compress(prob: Any, order: Any, per: int) -> Any:
    """``(n, L, 128)`` probabilities (background already zeroed) -> ``(n, L, 128 // per)`` channel sums."""
    n, n_layers, n_labels = prob.shape
    grouped = prob.gather(2, order[None].expand(n, n_layers, n_labels))
    return grouped.view(n, n_layers, n_labels // per, per).sum(-1)


def network_pass(model: Any, hu_4mm: np.ndarray, order: Any, per: int, *, temps: tuple[float, ...] = (1.0,),
                 slab: int = 2) -> dict[str, Any]:
    """One network pass (as ``slicreg.registration.network_labels``, slab-wise head) with soft outputs.

    Returns ``labels`` ``(16, x, y, z)`` uint8 (bitwise ``network_labels``), ``comp_T`` ``(16 * 16, x, y, z)``
    float32 compressed probabilities per temperature, ``maxprob`` ``(x, y, z)`` (mean over the layers of the
    largest probability, temperature 1), ``cpu_labels`` (the pass without the soft outputs) and ``cpu_soft_T``."""
    import torch
    import torch.nn.functional as F

    from slicreg.bundle import network_pass_input
    from slicreg.network import N_CLASSES, N_LAYERS
    from slicreg.registration import _argmax_rows

    c0 = time.process_time()
    net, x, dtype, _ = network_pass_input(getattr(model, "model", model), hu_4mm, device="cpu", dtype=None)
    soft_cpu = {t: 0.0 for t in temps}
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        skip, aspp_up = net.features(x)
        head = net.head
        xx = torch.cat([skip, aspp_up.to(skip.dtype)], 1).contiguous(memory_format=torch.channels_last_3d)
        h = F.relu_(head.bn1(head.conv1(xx)))
        del xx
        h = F.relu_(head.bn2(head.conv2(h)))
        size = tuple(h.shape[2:])
        labels = torch.empty(*size, N_LAYERS, dtype=torch.int64)
        n_ch = N_CLASSES // per
        comp = {t: torch.empty(*size, N_LAYERS, n_ch) for t in temps}
        maxprob = torch.empty(*size)
        for x0 in range(0, size[0], slab):
            logits = head.conv3(h[:, :, x0: x0 + slab])
            rows = logits[0].permute(1, 2, 3, 0).reshape(-1, N_CLASSES)
            labels[x0: x0 + slab] = _argmax_rows(rows).view(-1, size[1], size[2], N_LAYERS)
            for t in temps:
                c1 = time.process_time()
                lf = rows.float().view(-1, N_LAYERS, N_CLASSES)
                p = torch.softmax(lf / t if t != 1.0 else lf, dim=-1)
                if t == 1.0:
                    maxprob[x0: x0 + slab] = p.max(dim=-1).values.mean(dim=-1).view(-1, size[1], size[2])
                p[..., 0] = 0.0  # the background has no channel (include_background=False)
                comp[t][x0: x0 + slab] = compress(p, order, per).view(-1, size[1], size[2], N_LAYERS, n_ch)
                soft_cpu[t] += time.process_time() - c1
    total = time.process_time() - c0
    out = {"labels": labels.permute(3, 0, 1, 2).to(torch.uint8).contiguous().numpy(),
           "maxprob": maxprob.numpy(), "cpu_labels": total - sum(soft_cpu.values())}
    for t in temps:
        out[f"comp_{t:g}"] = comp[t].reshape(*size, -1).permute(3, 0, 1, 2).contiguous().numpy()
        out[f"cpu_soft_{t:g}"] = soft_cpu[t]
    return out


def shift_input(x: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """``x`` moved by ``shift`` voxels (content at p goes to p + shift), the border filled with edge values."""
    pad = max(abs(s) for s in shift)
    if pad == 0:
        return x
    xp = np.pad(x, pad, mode="edge")
    return np.ascontiguousarray(xp[tuple(slice(pad - s, pad - s + n) for s, n in zip(shift, x.shape))])


def shift_back(arr: np.ndarray, shift: tuple[int, int, int], fill: np.ndarray) -> np.ndarray:
    """Output of a pass on the input moved by ``shift`` output voxels, moved back: ``out[q] = arr[q + shift]``
    along the last three axes; where ``q + shift`` leaves the grid, ``fill`` (the unshifted pass)."""
    out = fill.copy()
    dst, src = [Ellipsis], [Ellipsis]
    for s, n in zip(shift, arr.shape[-3:]):
        dst.append(slice(max(0, -s), n - max(0, s)))
        src.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def vote(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel majority of ``(P, L, ...)`` labels (ties: the earliest pass, i.e. the unshifted one) and the
    agreement map ``(...)``: mean over the layers of the fraction of passes equal to the vote."""
    n = stack.shape[0]
    counts = np.stack([sum((stack[i] == stack[j]) for j in range(n)).astype(np.uint8) for i in range(n)])
    best = counts.argmax(axis=0)  # first maximum: the earliest pass
    voted = np.take_along_axis(stack, best[None], axis=0)[0]
    agree = np.take_along_axis(counts, best[None], axis=0)[0].astype(np.float32) / n
    return voted, agree.mean(axis=0)


def network_products(model: Any, hu_2mm: np.ndarray, cache: Path, name: str, sha: str) -> dict[str, Any]:
    """Labels, compressed probabilities, confidence and agreement maps of one fixed scan (cached)."""
    from tune_flow import _load_npz

    from slicreg.network import HU_SCALE, network_input

    path = cache / f"net_{sha[:16]}_{name}.npz"
    hit = _load_npz(path)
    if hit is None:
        order, per = channel_order(16)
        hu_4mm = network_input(hu_2mm, from_2mm=True) * np.float32(HU_SCALE)
        passes = []
        for i, s in enumerate(SHIFTS):
            temps = (1.0, 2.0) if i == 0 else (1.0,)
            res = network_pass(model, shift_input(hu_4mm, tuple(2 * v for v in s)), order, per, temps=temps)
            passes.append(res)
        base = passes[0]
        labels = np.stack([base["labels"]] + [shift_back(p["labels"], s, base["labels"])
                                              for p, s in zip(passes[1:], SHIFTS[1:])])
        comps = [base["comp_1"]] + [shift_back(p["comp_1"], s, base["comp_1"]) for p, s in zip(passes[1:], SHIFTS[1:])]
        hit = {"labels": labels, "comp_p0": base["comp_1"].astype(np.float16),
               "comp_t2": base["comp_2"].astype(np.float16),
               "comp_tta3": (sum(comps[:3]) / 3.0).astype(np.float16),
               "comp_tta5": (sum(comps[:5]) / 5.0).astype(np.float16),
               "maxprob": base["maxprob"].astype(np.float16),
               "cpu_labels": np.array([p["cpu_labels"] for p in passes]),
               "cpu_soft": np.array([p["cpu_soft_1"] for p in passes]), "cpu_soft_t2": np.float64(base["cpu_soft_2"])}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # uncompressed: ~0.3 GB a pair, read back fast
            np.savez(fh, **hit)
        hit = _load_npz(path) or hit
    out = dict(hit)
    c = time.process_time()
    out["vote3"], out["agree3"] = vote(out["labels"][:3])
    out["cpu_vote3"] = time.process_time() - c
    c = time.process_time()
    out["vote5"], out["agree5"] = vote(out["labels"][:5])
    out["cpu_vote5"] = time.process_time() - c
    return out


def soft_features(comp: Any, *, n_channels: int = 16) -> Any:
    """Flow features from compressed probabilities ``(L * n_channels, x, y, z)`` on the network's stride-2 grid,
    with the geometry of the label path (``supervoxel_features(labels, upsample=2)``): the nearest upsampling to
    the supervoxel grid, then the box poolings ((3, stride 2), (5, stride 1)). The first pooling of the nearest-
    upsampled maps is, per axis, ``(2 c[o] + c[o + 1]) / 3`` (``c[0] + c[1]`` at ``o = 0``, ``c[n]`` := ``c[n - 1]``)
    on the coarse grid, so nothing is upsampled. One-hot input gives the label features (tested)."""
    import torch

    def nearest(x: Any, axis: int) -> Any:
        n = x.shape[axis]
        nxt = torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], dim=axis)
        y = x.mul(2.0).add_(nxt)
        y.narrow(axis, 0, 1).sub_(x.narrow(axis, 0, 1))
        return y.div_(3.0)

    return _stride2_features(comp, n_channels, "soft_features", nearest)


def centred_features(comp: Any, *, n_channels: int = 16) -> Any:
    """Flow features from compressed maps ``(L * n_channels, x, y, z)`` on the network's stride-2 grid with the
    network's own geometry: output voxel ``q`` is centred on supervoxel-grid voxel ``2 q`` (``slicreg.network``), so
    supervoxel-grid voxel ``p`` takes the maps interpolated linearly at ``p / 2`` (clamped to the grid), then the
    box poolings. The first pooling of that upsampling is, per axis, ``(c[o - 1] / 2 + 2 c[o] + c[o + 1] / 2) / 3``
    on the coarse grid (``(1.5 c[0] + 0.5 c[1]) / 3`` and ``(0.5 c[n - 2] + 2.5 c[n - 1]) / 3`` at the ends; tested
    against the explicit upsampling). The label path (nearest upsampling, :func:`soft_features`) puts coarse voxel
    ``q`` on ``{2q - 1, 2q}`` instead -- half a supervoxel-grid voxel (2 mm) off along every axis."""
    import torch

    def linear(x: Any, axis: int) -> Any:
        n = x.shape[axis]
        prev = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), x.narrow(axis, 0, n - 1)], dim=axis)
        nxt = torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], dim=axis)
        y = x.mul(2.0).add_(prev, alpha=0.5).add_(nxt, alpha=0.5)
        y.narrow(axis, 0, 1).sub_(x.narrow(axis, 0, 1), alpha=0.5)  # sv voxel -1 is the pooling's zero padding
        return y.div_(3.0)

    return _stride2_features(comp, n_channels, "centred_features", linear)


def _stride2_features(comp: Any, n_channels: int, name: str, first_pool: Any) -> Any:
    """What :func:`soft_features` and :func:`centred_features` share: the checks (the flow's pools must be
    ((3, 2), (5, 1)); ``comp`` ``(L * n_channels, x, y, z)``), the first pooling done per axis on the coarse grid by
    ``first_pool(x, axis)``, then the remaining box poolings."""
    import torch

    from slicreg.flow import DEFAULTS
    from slicreg.flow.pooling import _box_pool

    pools = [tuple(int(v) for v in p) for p in DEFAULTS["pools"]]
    if pools[0] != (3, 2) or any(s != 1 for _, s in pools[1:]):
        raise SystemExit(f"{name}: written for the pools ((3, 2), (5, 1)), got {pools}")
    x = torch.as_tensor(comp, dtype=torch.float32)
    if x.ndim != 4 or x.shape[0] % n_channels:
        raise SystemExit(f"{name}: expected (L * {n_channels}, x, y, z), got {tuple(x.shape)}")
    for axis in (1, 2, 3):
        x = first_pool(x, axis)
    for k, s in pools[1:]:
        x = _box_pool(x, k, s, (1, 2, 3))
    return x.contiguous()


def onehot_compressed(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The flow's compressed one-hot of label maps ``(L, x, y, z)`` -> ``(L * 16, x, y, z)`` float32 (background:
    no channel), the input of :func:`soft_features` / :func:`centred_features` for hard labels."""
    from slicreg.flow import DEFAULTS, label_channel_map

    n_ch = DEFAULTS["n_channels"]
    lut = label_channel_map(labels.shape[0], n_channels=n_ch, seed=seed)
    out = np.zeros((labels.shape[0] * n_ch, *labels.shape[1:]), np.float32)
    for layer in range(labels.shape[0]):
        ch = lut[layer][labels[layer]]
        for c in range(n_ch):
            out[layer * n_ch + c] = ch == c
    return out


# ------------------------------------------------------------------------------------------- helpers
def cache_name(tuner: Any, pair: Any) -> str:
    return pair.subject if pair.pid == pair.subject else tuner.slab_name(pair.subject)


def network_cpu(spec: dict[str, Any], prod: dict[str, Any]) -> float:
    """CPU seconds of the network passes (and soft outputs, votes) a lever needs."""
    n = int(spec["passes"])
    cpu = float(np.sum(prod["cpu_labels"][:n]))
    comp = spec["features"][0] if spec["features"] else None
    if comp in ("comp_p0", "comp_tta3", "comp_tta5") or spec["confidence"] == "maxprob":
        cpu += float(np.sum(prod["cpu_soft"][:n if comp in ("comp_tta3", "comp_tta5") else 1]))
    if comp == "comp_t2":
        cpu += float(prod["cpu_soft_t2"])
    if spec["labels"] in ("vote3", "vote5") or spec["confidence"] in ("agree3", "agree5"):
        cpu += float(prod[f"cpu_vote{max(n, 3)}"])
    return cpu


def run_lever(spec: dict[str, Any], prod: dict[str, Any], template_sv: np.ndarray, feats: dict[str, Any],
              seed: int, device: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The supervoxel field of one lever: ``register_supervoxel_maps`` with its maps, features and options."""
    from slicreg.registration import register_supervoxel_maps

    labels = prod["labels"][0] if spec["labels"] == "p0" else prod[spec["labels"]]
    options = dict(spec["flow"])
    extra_cpu = 0.0
    if spec["features"] is not None:
        key, geometry = spec["features"]
        if (key, geometry) not in feats:
            c = time.process_time()
            comp = onehot_compressed(prod["labels"][0], seed) if key == "onehot_p0" else prod[key].astype(np.float32)
            make = soft_features if geometry == "nearest" else centred_features
            feats[(key, geometry)] = (make(comp), time.process_time() - c)
        options["fixed_features"], extra_cpu = feats[(key, geometry)]
    if spec["confidence"] is not None:
        options["fixed_confidence"] = np.asarray(prod[spec["confidence"]], dtype=np.float32)
    c = time.process_time()
    res = register_supervoxel_maps(np.ascontiguousarray(labels), template_sv, label_upsample=(2, 1), seed=seed,
                                   device=device, **options)
    disp = res.disp_vox if not spec["shift"] else res.disp_vox + np.float32(spec["shift"])
    cpu = time.process_time() - c + extra_cpu
    return disp, {"field_cpu_s": cpu, "n_keypoints": res.info["n_keypoints"],
                          "adam_iterations": res.info["adam_iterations_run"]}


def diagnostics(prod: dict[str, Any], template_sv: np.ndarray) -> dict[str, Any]:
    """Quantiles of the rejection scores at the baseline's keypoints (to read the thresholds against)."""
    import torch

    from slicreg.flow import (
        DEFAULTS,
        confidence_at,
        foreground_keypoints,
        layer_spread,
        supervoxel_centres,
        upsample_labels,
    )

    fix = torch.from_numpy(np.ascontiguousarray(prod["labels"][0]))
    pts = foreground_keypoints(upsample_labels(fix, 2), n=DEFAULTS["n_random"], seed=0)
    spread = layer_spread(fix, pts, supervoxel_centres(fix, upsample=2), supervoxel_centres(torch.from_numpy(
        template_sv)), upsample=2).numpy()
    qs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9]
    out = {"quantiles": qs, "spread": np.quantile(spread[np.isfinite(spread)], qs).tolist(),
           "spread_inf_fraction": float(np.mean(~np.isfinite(spread)))}
    for key in ("maxprob", "agree3", "agree5"):
        vals = confidence_at(torch.from_numpy(np.asarray(prod[key], dtype=np.float32)), pts, upsample=2).numpy()
        out[key] = np.quantile(vals, qs).tolist()
    lab = prod["labels"]
    out["label_change_shift_pct"] = [float(100.0 * np.mean(lab[i] != lab[0])) for i in range(1, lab.shape[0])]
    return out


# ------------------------------------------------------------------------------------------- summaries
def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return float(np.mean(vals)) if vals else None


def summarise(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of one lever on one kind of pair, and pairs better / worse than the baseline."""
    base = {r["pair"]: r for r in base_rows}
    fe_b = fe_w = d_b = d_w = 0
    for r in rows:
        b = base.get(r["pair"])
        if b is None:
            continue
        if r.get("field_error_mm") is not None and b.get("field_error_mm") is not None:
            diff = r["field_error_mm"] - b["field_error_mm"]
            fe_b += diff < -FE_MARGIN
            fe_w += diff > FE_MARGIN
        diff = r["dice"] - b["dice"]
        d_b += diff > DICE_MARGIN
        d_w += diff < -DICE_MARGIN
    out = {"n": len(rows), "fe_better": fe_b, "fe_worse": fe_w, "dice_better": d_b, "dice_worse": d_w}
    for key in ("dice", "dice_fov", "field_error_mm", "folding_percent", "sdlogj", "field_cpu_s", "network_cpu_s",
                "n_keypoints", "refine_cpu_s"):
        out[key] = _mean(rows, key)
    out["folding_max"] = max((r["folding_percent"] for r in rows if r.get("folding_percent") is not None),
                             default=None)
    return out


def pays(s: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> bool:
    """Mean field error over all pairs down by more than PAY_MARGIN, no kind's mean Dice down by more than
    DICE_MARGIN."""
    if any(s[k]["field_error_mm"] is None or b[k]["field_error_mm"] is None for k in b):
        return False
    return overall_fe(s) < overall_fe(b) - PAY_MARGIN and all(s[k]["dice"] >= b[k]["dice"] - DICE_MARGIN for k in b)


def total_cpu(s: dict[str, dict[str, Any]]) -> float:
    """Mean CPU seconds of the field and the network over all pairs."""
    n = sum(v["n"] for v in s.values())
    return sum(((v["field_cpu_s"] or 0.0) + (v["network_cpu_s"] or 0.0)) * v["n"] for v in s.values()) / max(n, 1)


def overall_fe(s: dict[str, dict[str, Any]]) -> float:
    n = sum(v["n"] for v in s.values())
    return sum(v["field_error_mm"] * v["n"] for v in s.values()) / max(n, 1)


def _f(v: Any, nd: int, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def table(summary: dict[str, dict[str, Any]], names: list[str], kind: str, base: str = "baseline",
          refine: bool = False) -> list[str]:
    b = summary[base][kind]
    head = ("| lever | Dice 13 (in FOV) | dDice | field error mm | d mm | pairs better / worse (field error; Dice) | "
            "det J <= 0 % mean / max | SDlogJ | keypoints | CPU s field | CPU s network |"
            + (" CPU s refine |" if refine else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        s = summary[name][kind]
        same = name == base
        counts = "-" if same else f"{s['fe_better']}/{s['fe_worse']}; {s['dice_better']}/{s['dice_worse']}"
        lines.append(
            f"| {name} | {_f(s['dice'], 4)} ({_f(s['dice_fov'], 4)}) | "
            f"{'-' if same else _f(s['dice'] - b['dice'], 4, True)} | "
            f"{_f(s['field_error_mm'], 2)} | "
            f"{'-' if same else _f(s['field_error_mm'] - b['field_error_mm'], 2, True)} | "
            f"{counts} of {s['n']} | "
            f"{_f(s['folding_percent'], 4)} / {_f(s['folding_max'], 4)} | {_f(s['sdlogj'], 4)} | "
            f"{_f(s['n_keypoints'], 0)} | {_f(s['field_cpu_s'], 2)} | {_f(s['network_cpu_s'], 2)} |"
            + (f" {_f(s['refine_cpu_s'], 2)} |" if refine else ""))
    return lines


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from tune_flow import add_pair_arguments, add_run_arguments, prepared_tuner, score_columns, write_outputs

    add_pair_arguments(ap, dataset=str(ROOT / "runs/helper-refine/work/prep/current"),
                       weights=str(ROOT / "weights/slicreg-cohort-v3"), cache=str(ROOT / "runs/helper-refine/cache"))
    ap.add_argument("--lever-cache", default=str(ROOT / "runs/helper-levers/cache"),
                    help="this benchmark's cache of network passes (probabilities, test-time passes)")
    ap.add_argument("--levers", nargs="*", default=list(DEFAULT_LEVERS),
                    help="levers to measure (tokens joined by '+'; 'baseline' is always added)")
    ap.add_argument("--combo", default=None,
                    help="the combination to refine (default: per group the cheapest paying lever; 'none': skip)")
    ap.add_argument("--refine-extra", nargs="*", default=[],
                    help="further levers to refine next to the baseline and the combination")
    ap.add_argument("--no-refine", action="store_true", help="skip the refinement of the baseline and combination")
    ap.add_argument("--partial", default=None,
                    help="rows of finished pairs, rewritten after each pair; a rerun with the same levers resumes "
                         "from it (default: runs/helper-levers/<out name>.partial.json)")
    add_run_arguments(ap, threads=1, out=str(ROOT / "runs/helper-levers/init_levers"))
    args = ap.parse_args(argv)

    import torch

    from slicreg.io import atomic_write_json, load_image
    from slicreg.registration import FLOW_DEFAULTS, refine_field

    names = list(dict.fromkeys(["baseline", *args.levers]))
    specs = {n: parse_lever(n) for n in names}
    tuner = prepared_tuner(args)
    ds = tuner.dataset
    lever_cache = Path(args.lever_cache)
    template_sv = tuner.template_sv
    w_start = time.perf_counter()

    rows: list[dict[str, Any]] = []
    diag: dict[str, Any] = {}
    net_time = {"wall_s": 0.0, "cpu_s": 0.0}
    partial = (Path(args.partial) if args.partial
               else ROOT / "runs/helper-levers" / f"{Path(args.out).name}.partial.json")
    key = {"levers": names, "eval_stride": args.eval_stride, "slab_mm": args.slab_mm, "slab_seed": args.slab_seed,
           "seed": args.seed, "bundle": tuner.bundle_sha}
    if partial.is_file():
        import json

        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            rows, diag = saved["rows"], saved["diag"]
            print(f"resuming from {partial}: {len({r['pair'] for r in rows})} pair(s) with rows", flush=True)

    def save_partial() -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(partial, {"key": key, "rows": rows, "diag": diag})

    def done(pid: str, stage: str, wanted: list[str]) -> bool:
        have = {r["lever"] for r in rows if r["pair"] == pid and r["stage"] == stage}
        return all(nm in have for nm in wanted)

    for n, pair in enumerate(tuner.pairs, 1):
        if done(pair.pid, "field", names) and pair.pid in diag:
            continue
        rows = [r for r in rows if not (r["pair"] == pair.pid and r["stage"] == "field")]
        tp = time.perf_counter()
        w, c = time.perf_counter(), time.process_time()
        prod = network_products(tuner.bundle, tuner.fixed_image(pair), lever_cache, cache_name(tuner, pair),
                                tuner.bundle_sha)
        net_time["wall_s"] += time.perf_counter() - w
        net_time["cpu_s"] += time.process_time() - c
        diag[pair.pid] = diagnostics(prod, template_sv)
        feats: dict[str, Any] = {}
        line = []
        for name in names:
            disp, info = run_lever(specs[name], prod, template_sv, feats, args.seed, args.device)
            sc = tuner._score_fields(pair, disp, full=True)
            rows.append({"pair": pair.pid, "kind": pair.kind, "lever": name, "stage": "field", **score_columns(sc),
                         **info, "network_cpu_s": network_cpu(specs[name], prod)})
            line.append((name, sc.get("field_error_mm"), sc["dice"]))
            del disp
        base_fe = line[0][1]
        best = min(line, key=lambda t: t[1] if t[1] is not None else np.inf)
        print(f"[{n}/{len(tuner.pairs)}] {pair.pid}: baseline Dice {line[0][2]:.3f}, {_f(base_fe, 2)} mm; best "
              f"{best[0]} {_f(best[1], 2)} mm  [{time.perf_counter() - tp:.0f} s; "
              f"{time.perf_counter() - w_start:.0f} s]",
              flush=True)
        del prod, feats
        save_partial()

    kinds = [k for k in ("full", "slab") if any(p.kind == k for p in tuner.pairs)]

    def summaries(stage: str, lever_names: list[str], base: str = "baseline") -> dict[str, dict[str, Any]]:
        sel = [r for r in rows if r["stage"] == stage]
        return {nm: {k: summarise([r for r in sel if r["lever"] == nm and r["kind"] == k],
                                  [r for r in sel if r["lever"] == base and r["kind"] == k]) for k in kinds}
                for nm in lever_names}

    summary = summaries("field", names)
    paying = [nm for nm in names if nm != "baseline" and pays(summary[nm], summary["baseline"])]
    winners: dict[str, str] = {}  # per group: the cheapest paying lever within PAY_MARGIN of the group's best
    singles = [nm for nm in paying if len(specs[nm]["groups"]) == 1]
    for group in {next(iter(specs[nm]["groups"])) for nm in singles}:
        cands = [nm for nm in singles if next(iter(specs[nm]["groups"])) == group]
        best_fe = min(overall_fe(summary[nm]) for nm in cands)
        near = [nm for nm in cands if overall_fe(summary[nm]) <= best_fe + PAY_MARGIN]
        winners[group] = min(near, key=lambda nm: (total_cpu(summary[nm]), overall_fe(summary[nm])))
    if args.combo and args.combo.lower() != "none":
        combo = args.combo
    elif args.combo is None and winners:
        combo = "+".join(winners[g] for g in ("network", "spread", "confidence", "residual", "n", "k", "alpha", "lam")
                         if g in winners)
    else:
        combo = None

    refined: list[str] = []
    if (combo is not None or args.refine_extra) and not args.no_refine:
        for nm in [combo, *args.refine_extra]:
            if nm is not None and nm not in specs:
                specs[nm] = parse_lever(nm)
        template_hu = np.asarray(load_image(ds.path(ds.subject(ds.template).image)).array, dtype=np.float32)
        template_fov = tuner.crop_fov(ds.template)
        small = np.random.default_rng(0).normal(0, 200, (32, 32, 32)).astype(np.float32)
        refine_field(small, small, np.zeros((3, 32, 32, 32), np.float32), seed=args.seed, device=args.device)
        refined = list(dict.fromkeys(nm for nm in ["baseline", combo, *args.refine_extra] if nm is not None))
        for n, pair in enumerate(tuner.pairs, 1):
            if done(pair.pid, "refined", refined) and done(pair.pid, "field", refined):
                continue
            rows = [r for r in rows if not (r["pair"] == pair.pid and (r["stage"] == "refined" or (
                r["stage"] == "field" and r["lever"] in refined and r["lever"] not in names)))]
            tp = time.perf_counter()
            prod = network_products(tuner.bundle, tuner.fixed_image(pair), lever_cache, cache_name(tuner, pair),
                                    tuner.bundle_sha)
            hu = tuner.fixed_image(pair)
            feats = {}
            line = []
            for name in refined:
                disp, info = run_lever(specs[name], prod, template_sv, feats, args.seed, args.device)
                if name not in names:  # not among the levers (a combination): its field scores too
                    sc = tuner._score_fields(pair, disp, full=True)
                    rows.append({"pair": pair.pid, "kind": pair.kind, "lever": name, "stage": "field",
                                 **score_columns(sc), **info, "network_cpu_s": network_cpu(specs[name], prod)})
                w, c = time.perf_counter(), time.process_time()
                out, _ = refine_field(hu, template_hu, disp, preset="refine", fixed_mask=pair.fov,
                                      moving_mask=template_fov, seed=args.seed, device=args.device)
                rcpu = time.process_time() - c
                sc = tuner._score_fields(pair, np.asarray(out, dtype=np.float32), full=True)
                rows.append({"pair": pair.pid, "kind": pair.kind, "lever": name, "stage": "refined",
                             **score_columns(sc), **info, "network_cpu_s": network_cpu(specs[name], prod),
                             "refine_cpu_s": rcpu})
                line.append(f"{name} {sc['dice']:.3f} / {_f(sc.get('field_error_mm'), 2)} mm")
            print(f"[refine {n}/{len(tuner.pairs)}] {pair.pid}: " + "; ".join(line)
                  + f"  [{time.perf_counter() - tp:.0f} s; {time.perf_counter() - w_start:.0f} s]", flush=True)
            del prod, feats
            save_partial()
        extra = [nm for nm in refined if nm not in names]
        if extra:
            names.extend(extra)
            summary = summaries("field", names)
    refined_summary = summaries("refined", refined) if refined else {}

    # ------------------------------------------------------------------------------------------- report
    wall_min = (time.perf_counter() - tuner.t0) / 60.0
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    n_full = sum(p.kind == "full" for p in tuner.pairs)
    n_slab = len(tuner.pairs) - n_full
    lines = [f"# Initialiser levers of the supervoxel stage on the training pairs ({stamp})", "",
             "Command: `" + " ".join(["python", "benchmarks/bench_init_levers.py", *argv]) + "`", "",
             f"Bundle {tuner.bundle.path} (model sha256 {tuner.bundle_sha[:16]}), dataset {ds.root}; {n_full} full "
             f"training pairs + {n_slab} simulated {args.slab_mm:g} mm slab(s) (subject <- template, atlas mode); "
             f"torch threads {torch.get_num_threads()}; wall time {wall_min:.1f} min (network passes "
             f"{net_time['wall_s'] / 60:.1f} min, incl. cache reads). Baseline = the registration defaults "
             f"(`FLOW_DEFAULTS` = {FLOW_DEFAULTS}) on the unshifted pass's argmax maps.", "",
             f"Scores on every voxel (`tune_flow.Tuner._score_fields(full=True)`); field error in mm against the "
             f"true field inside the body (every {args.eval_stride}nd voxel). Better / worse: field error by more "
             f"than {FE_MARGIN} mm; Dice by more than {DICE_MARGIN}. CPU s field = `register_supervoxel_maps` (+ the "
             f"soft features); CPU s network = the passes the lever needs (1, 3 or 5; + softmax / compression / "
             f"vote). A lever *pays* when its mean field error over all pairs drops by more than {PAY_MARGIN} mm "
             f"and neither the full nor the slab pairs' mean Dice drops by more than {DICE_MARGIN}.", ""]
    for kind in kinds:
        lines += [f"## Supervoxel field, {kind} pairs (n = {summary['baseline'][kind]['n']})", ""]
        lines += table(summary, names, kind)
        lines.append("")
    lines += ["## Which levers pay", "",
              ("Paying levers (best first by mean field error over all pairs): "
               + ", ".join(f"`{nm}` ({overall_fe(summary[nm]):.2f} mm vs {overall_fe(summary['baseline']):.2f})"
                           for nm in sorted(paying, key=lambda nm: overall_fe(summary[nm]))))
              if paying else "No lever pays by this rule.",
              "", f"Combination refined: `{combo}`" + (" (given with --combo)" if args.combo else
                                                       " (per group the cheapest paying lever within "
                                                       f"{PAY_MARGIN} mm of the group's best)")
              + (f"; also refined: {', '.join(args.refine_extra)}" if args.refine_extra else ""), ""]
    if refined_summary:
        for kind in kinds:
            lines += [f"## After the refinement (`refine_field(preset='refine')`, crop-record masks), {kind} pairs", ""]
            lines += table(refined_summary, refined, kind, refine=True)
            lines.append("")
    def per_pair(title: str, levers: list[str], stage: str) -> list[str]:
        out = [title, "", "| pair | kind | " + " | ".join(levers) + " |", "|---|---|" + "---|" * len(levers)]
        for pair in tuner.pairs:
            vals = {r["lever"]: r for r in rows if r["pair"] == pair.pid and r["stage"] == stage}
            out.append(f"| {pair.pid} | {pair.kind} | " + " | ".join(
                f"{_f(vals[nm].get('field_error_mm'), 2)} ({_f(vals[nm]['dice'], 3)})" if nm in vals else "-"
                for nm in levers) + " |")
        return out

    lines += per_pair("## Per pair: field error mm (Dice 13) of the supervoxel field", names, "field")
    if refined:
        lines += [""] + per_pair("## Per pair after the refinement: field error mm (Dice 13)", refined, "refined")
    qs = next(iter(diag.values()))["quantiles"] if diag else []
    lines += ["", "## Rejection scores at the baseline's keypoints (mean of the per-pair quantiles)", "",
              "| score | kind | " + " | ".join(f"q{q:g}" for q in qs) + " |", "|---|---|" + "---|" * len(qs)]
    for key in ("spread", "maxprob", "agree3", "agree5"):
        for kind in kinds:
            per = [diag[p.pid][key] for p in tuner.pairs if p.kind == kind]
            lines.append(f"| {key} | {kind} | " + " | ".join(f"{v:.3f}" for v in np.mean(per, axis=0)) + " |")
    changes = np.mean([diag[p.pid]["label_change_shift_pct"] for p in tuner.pairs], axis=0)
    lines += ["", "Labels changed by the test-time shifts (mean % of stride-2 voxels x layers, per shift "
              f"{', '.join(str(s) for s in SHIFTS[1:])}): " + ", ".join(f"{v:.1f}" for v in changes), ""]
    text = "\n".join(lines) + "\n"
    write_outputs(args.out, {
        "argv": argv, "flow_defaults": FLOW_DEFAULTS, "bundle_sha256": tuner.bundle_sha, "shifts": SHIFTS,
        "levers": {nm: {k: v for k, v in specs[nm].items() if k != "name"} for nm in specs},
        "summary": summary, "refined_summary": refined_summary, "paying": paying, "combo": combo,
        "diagnostics": diag, "rows": rows, "wall_min": wall_min, "network_time": net_time}, text, wall_min)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
