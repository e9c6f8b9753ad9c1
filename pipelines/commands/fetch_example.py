"""``slicreg fetch-example``: fetch the real example CT with its organ labels into the data cache."""

from __future__ import annotations

import argparse

NAME = "fetch-example"
HELP = ("fetch the real example CT (TotalSegmentator 2.18.0 sdist via pip, sha256-checked, Apache-2.0) and map its "
        "labels to the 13 BTCV organs")


INPUTS = ("sdist",)
OUTPUTS = ()
OUTPUT_DIRS = ("dest",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", default=None, metavar="DIR",
                   help="example folder (default: $SLICREG_DATA/example, else ~/.cache/slicreg/example)")
    p.add_argument("--sdist", default=None, metavar="FILE",
                   help="use this local copy of totalsegmentator-2.18.0.tar.gz instead of downloading it")
    p.add_argument("--no-download", action="store_true", help="never call pip; fail with instructions instead")


def run(args: argparse.Namespace) -> int:
    from preprocessing.example import cached_example, default_example_dir, fetch_example
    from slicreg.io import read_json

    dest = args.dest or default_example_dir()
    was_cached = args.sdist is None and cached_example(dest) is not None
    files = fetch_example(dest, sdist=args.sdist, download=not args.no_download)
    prov = read_json(files.provenance)
    present = prov["labels"]["btcv_present"]
    print(f"{'cached' if was_cached else 'extracted'}: {files.folder}")
    for path in files.all():
        print(f"  {path.name}")
    print(f"CT {prov['image']['shape']} voxels of {prov['image']['spacing_mm']} mm ({prov['image']['axcodes']}), "
          f"HU {prov['image']['hu_min']}..{prov['image']['hu_max']}")
    print(f"BTCV organs present: {', '.join(v['name'] for v in present.values())} ({len(present)} of 13)")
    print("labels: TotalSegmentator model output (silver standard); licence: Apache-2.0 (LICENSE)")
    return 0
