"""The ``slicreg`` command: one subcommand per module of :mod:`pipelines.commands`.

Bad input ends in one line ``slicreg <command>: error: <what>`` and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType
from typing import Sequence


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
    """Entry point of the ``slicreg`` console script."""
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
