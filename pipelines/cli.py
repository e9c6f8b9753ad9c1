"""The ``slicreg`` command: one subcommand per module of :mod:`pipelines.commands`.

Bad input ends in one line ``slicreg <command>: error: <what>`` and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

# glibc returns every freed block above its mmap threshold (dynamic, at most 32 MB) to the kernel, so each of
# torch's large temporaries is mapped and zero-filled anew, which made CPU network passes much slower (the figures:
# docs/measurements.md, "The allocator setting"; python benchmarks/bench_allocator.py). The environment variable
# sets the threshold at start-up; mallopt(M_MMAP_THRESHOLD) sets the same at run time (glibc 2.36 takes values up
# to 2 GiB - 1, its int argument), which spares the command a second interpreter start.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30)}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MALLOPT_THRESHOLD = 2**31 - 1


def set_mmap_threshold() -> bool:
    """``mallopt(M_MMAP_THRESHOLD, 2 GiB - 1)`` in this process through ctypes; False where that is not glibc's."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MALLOPT_THRESHOLD)))
    except (OSError, AttributeError):
        return False


def ensure_fast_allocator() -> None:
    """Raise glibc's mmap threshold for this command and the processes it starts (Linux; no-op when already set).

    This process: :func:`set_mmap_threshold` at run time; its child processes: :data:`ALLOCATOR_ENV` in the
    environment they inherit. Where mallopt cannot be called, the command re-executes itself once with the variable
    set (``SLICREG_ALLOCATOR=reexec`` forces that way, for comparison). ``SLICREG_ALLOCATOR=default`` keeps the C
    library's defaults."""
    mode = os.environ.get("SLICREG_ALLOCATOR")
    if (not sys.platform.startswith("linux") or mode == "default"
            or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())):
        return
    if mode != "reexec" and set_mmap_threshold():
        os.environ.update(ALLOCATOR_ENV)
        return
    if not getattr(sys, "orig_argv", None):
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``slicreg <command>: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:  # noqa: F821
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from slicreg import __version__

    parser = _Parser(
        prog="slicreg",
        description="Registration of abdominal CT by segmenting scans into template supervoxels (SLIC-Reg).",
    )
    parser.add_argument("--version", action="version", version=f"slicreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in _command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _name=name, _module=module)
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
    def fail(message: str) -> int:
        print(f"slicreg {args._name}: error: {message}", file=sys.stderr)
        return 2

    try:
        check_paths(args._module, args)
        check_counts(args)
        if getattr(args, "device", None) not in (None, "cpu"):  # "cpu" is always there: no torch import here
            from slicreg.device import resolve_device

            resolve_device(args.device)
        return int(args._run(args) or 0)
    except InputError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(f"slicreg {args._name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a folder that cannot be written, a full disk, ...: name the file, not a traceback
        if os.environ.get("SLICREG_DEBUG"):
            raise
        where = exc.filename or "file system"
        return fail(f"{where}: {exc.strerror or exc} (while writing or reading; check the path, its permissions "
                    f"and free space)")
    except MemoryError:
        if os.environ.get("SLICREG_DEBUG"):
            raise
        return fail("out of memory: the inputs are larger than this machine can hold (check their sizes)")
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("SLICREG_DEBUG"):
            raise
        print(f"slicreg {args._name}: internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with "
              f"SLICREG_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


COUNTS = {"threads": 1, "jobs": 1, "seed": 0}
"""Options every command treats alike, with their smallest allowed value (checked before any work)."""


def check_counts(args: argparse.Namespace) -> None:
    """``--threads`` and ``--jobs`` must be >= 1 and ``--seed`` >= 0 wherever a command has them."""
    from slicreg.errors import InputError

    for dest, low in COUNTS.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise InputError(f"{_flag(dest)}: expected an integer >= {low}, got {value}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_paths(module: ModuleType, args: argparse.Namespace) -> None:
    """Check a command's output paths before any work: writable, not a folder, never one of its inputs.

    A command module declares ``INPUTS`` (argument dests naming input files or folders), ``OUTPUTS`` (dests
    naming output files), ``OUTPUT_DIRS`` (dests naming output folders) and optionally ``derived_outputs(args)``
    (flag -> path: files written beside a named output, e.g. a sidecar or a deeds stem's two files)."""
    from slicreg.errors import InputError
    from slicreg.io import check_output_path, check_outputs_not_inputs

    def given(names: Sequence[str]) -> dict[str, str]:
        return {_flag(d): getattr(args, d) for d in names if getattr(args, d, None) is not None}

    inputs = given(getattr(module, "INPUTS", ()))
    outputs = given(getattr(module, "OUTPUTS", ()))
    derived = getattr(module, "derived_outputs", None)
    if derived is not None:
        outputs.update({k: v for k, v in derived(args).items() if v is not None})
    output_dirs = given(getattr(module, "OUTPUT_DIRS", ()))
    for flag, path in outputs.items():
        check_output_path(path, what=f"{flag} {path}")
    for flag, path in output_dirs.items():
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{flag} {path}: is an existing file, expected a folder to write into")
        check_output_path(os.path.join(path, "x"), what=f"{flag} {path}")
    check_outputs_not_inputs(inputs, outputs, output_dirs)
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{flag} {path}: the same file as {seen[key]}; give each output its own name")
        seen[key] = flag


if __name__ == "__main__":
    sys.exit(main())
