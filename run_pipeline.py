#!/usr/bin/env python3
"""Run a slicreg pipeline: ``python run_pipeline.py [PIPELINE.toml] [--work-dir DIR] [--only ...] [--list] ...``.

The same as ``slicreg run``; see ``python run_pipeline.py --help``."""

import sys

from pipelines.cli import ensure_fast_allocator, main

if __name__ == "__main__":
    ensure_fast_allocator()
    sys.exit(main(["run", *sys.argv[1:]]))
