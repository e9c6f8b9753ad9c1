"""The ``slicreg`` command: one subcommand per module of :mod:`pipelines.commands`.

Bad input ends in one line ``slicreg <command>: error: <what>`` and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from types import ModuleType
from typing import Sequence


# glibc returns every freed block above its mmap threshold (dynamic, at most 32 MB) to the kernel, so each of
# torch's large temporaries is mapped and zero-filled anew: measured here, half of a CPU forward pass was kernel
# time and a network pass took 8.7 s instead of 3.6 s (python benchmarks/bench_allocator.py). The threshold
# can only be raised above 32 MB from the environment at start-up, hence one re-execution of the command.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30)}


def ensure_fast_allocator() -> None:
    """Re-execute this command once with :data:`ALLOCATOR_ENV` set (Linux/glibc; no-op when already set).

    ``SLICREG_ALLOCATOR=default`` keeps the C library's defaults (then nothing is re-executed)."""
    if (not sys.platform.startswith("linux") or os.environ.get("SLICREG_ALLOCATOR") == "default"
            or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())
            or not getattr(sys, "orig_argv", None)):
        return
    os.environ.update(ALLOCATOR_ENV)
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # cannot re-execute (unusual interpreter set-up): run on with the defaults
        return


def _command_modules() -> dict[str, ModuleType]:
    import pipelines.commands as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            found[module.NAME] = module
    order = {name: i for i, name in enumerate(pkg.ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def build_parser() -> argparse.ArgumentParser:
    from slicreg import __version__

    parser = argparse.ArgumentParser(
        prog="slicreg",
        description="Registration of abdominal CT by segmenting scans into template supervoxels (SLIC-Reg).",
    )
    parser.add_argument("--version", action="version", version=f"slicreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slicreg`` console script (``argv=None``: the process's own arguments)."""
    if argv is None:
        ensure_fast_allocator()
    from slicreg.errors import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"slicreg {args._name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slicreg {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
