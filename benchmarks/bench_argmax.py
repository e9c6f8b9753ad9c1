"""The per-layer argmax of the network's logits: ``slicreg.registration._argmax_rows`` (int16 bit patterns as integer
keys, a vectorised ``amax``) against ``torch.argmax`` and ``torch.max(...).indices``, on the same logits.

One network pass of a real preprocessed scan (the shipped weights, bf16 autocast, channels-last, as
``slicreg register`` runs it): the head's last convolution runs two x-planes at a time as in
``slicreg.registration._head_labels``, and each slab's logits -- ``(2 * Y' * Z' * 16, 128)`` bf16 rows, 128
contiguous classes -- are reduced by every method in turn (the order rotates from slab to slab, so that no
method always finds the logits hot in cache), ``--repeats`` times. Prints the seconds summed over the slabs
of one pass (wall and process CPU), and whether every method gives the same labels as ``torch.argmax``.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_argmax.py --weights weights/slicreg-cohort-v3 \\
        --image runs/demo/prep/current/imagesTr/cohort_0001_0000.nii.gz --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "weights/slicreg-cohort-v3"))
    ap.add_argument("--image", default=None,
                    help="a preprocessed 2 mm scan (default: the example CT preprocessed, benchmarks/_common.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5, help="reductions of each slab per method")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from slicreg.bundle import load_bundle, network_pass_input
    from slicreg.network import HU_SCALE, N_CLASSES, network_input
    from slicreg.registration import _argmax_rows

    if args.image:
        from slicreg.io import load_image

        image = np.asarray(load_image(args.image).array, dtype=np.float32)
    else:
        from _common import example_template

        image = example_template()[0]
    bundle = load_bundle(args.weights)
    hu_4mm = network_input(image, from_2mm=True) * np.float32(HU_SCALE)
    net, x, dtype, channels_last = network_pass_input(bundle.model, hu_4mm, device="cpu", dtype=None)
    if not channels_last:
        raise SystemExit("expected a channels-last bundle (slicreg.bundle.load_bundle's CPU default)")
    methods = {
        "_argmax_rows (bit patterns)": lambda rows: _argmax_rows(rows),
        "torch.argmax": lambda rows: torch.argmax(rows, dim=-1),
        "torch.max(...).indices": lambda rows: rows.max(dim=-1).indices,
    }
    names = list(methods)
    wall = {n: 0.0 for n in names}
    cpu = {n: 0.0 for n in names}
    same = {n: True for n in names}
    n_rows = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        skip, aspp_up = net.features(x)
        head = net.head
        h = torch.cat([skip, aspp_up.to(skip.dtype)], 1).contiguous(memory_format=torch.channels_last_3d)
        h = F.relu(head.bn1(head.conv1(h)))
        h = F.relu(head.bn2(head.conv2(h)))
        for i, x0 in enumerate(range(0, h.shape[2], 2)):
            logits = head.conv3(h[:, :, x0: x0 + 2])
            rows = logits[0].permute(1, 2, 3, 0).reshape(-1, N_CLASSES)
            assert rows.dtype == torch.bfloat16 and rows.stride(-1) == 1
            n_rows += rows.shape[0]
            ref = torch.argmax(rows, dim=-1)
            for r in range(args.repeats):
                k = (i + r) % len(names)
                for name in names[k:] + names[:k]:
                    w, c = time.perf_counter(), time.process_time()
                    out = methods[name](rows)
                    wall[name] += time.perf_counter() - w
                    cpu[name] += time.process_time() - c
                    same[name] = same[name] and bool(torch.equal(out, ref))
    reps = float(args.repeats)
    print(f"image {args.image or 'example CT (preprocessed)'}; bundle {args.weights}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {n_rows} rows x {N_CLASSES} bf16 classes per pass "
          f"({n_rows // 16} voxels x 16 layers), {args.repeats} repeats")
    print("| method | wall s per pass | CPU s per pass (all threads) | labels equal torch.argmax |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {wall[name] / reps:.3f} | {cpu[name] / reps:.3f} | {same[name]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
