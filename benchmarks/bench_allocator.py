"""Network pass with glibc's default allocator vs the ``slicreg`` command's setting, side by side in one run.

glibc hands every freed block above its mmap threshold (dynamic, at most 32 MB) back to the kernel, so torch's
large temporaries are mapped and zero-filled anew on every call; ``slicreg`` re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` raised (pipelines/cli.py ``ALLOCATOR_ENV``). Each setting runs in its own process
(the variable is read at start-up): one warm-up and ``--repeat`` timed bf16 predictions of a random 96 x 80 x 128
input with the given bundle (or random weights), then user and system CPU time of the process.

    python benchmarks/bench_allocator.py [--weights weights/slicreg-cohort-v3] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import numpy as np
from slicreg.bundle import load_bundle, predict
weights, repeat = sys.argv[1], int(sys.argv[2])
if weights:
    model = load_bundle(weights)
else:
    from slicreg.network import build_model
    model = build_model(seed=0).eval()
x = np.random.default_rng(0).normal(0, 300, (96, 80, 128)).astype(np.float32)
predict(model, x)
walls = []
for _ in range(repeat):
    t0 = time.perf_counter(); predict(model, x); walls.append(time.perf_counter() - t0)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"walls": walls, "user_s": r.ru_utime, "sys_s": r.ru_stime, "peak_rss_gb": r.ru_maxrss / 1e6}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="", help="a weights bundle (default: random weights)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from pipelines.cli import ALLOCATOR_ENV

    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    rows = {}
    for name, env in (("glibc default", base), ("slicreg setting", {**base, **ALLOCATOR_ENV})):
        out = subprocess.run([sys.executable, "-c", WORKER, args.weights, str(args.repeat)], env=env,
                             capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    print(f"bf16 network pass, 96 x 80 x 128, load average {os.getloadavg()[0]:.1f}")
    for name, r in rows.items():
        print(f"  {name:<16} {min(r['walls']):6.2f} s per pass (best of {len(r['walls'])}); process user "
              f"{r['user_s']:.1f} s, system {r['sys_s']:.1f} s; peak RSS {r['peak_rss_gb']:.2f} GB")
    a, b = (min(r["walls"]) for r in rows.values())
    print(f"  ratio {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
