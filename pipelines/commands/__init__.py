"""Subcommands of the ``slicreg`` command, one module per area.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules import only the standard library at the top, so ``slicreg --help`` stays instant;
the work happens in ``run``. A new module here is picked up automatically; the order of ``ORDER`` decides
where a command is listed."""

ORDER = [
    "run", "fetch-example", "cohort", "preprocess", "supervoxels", "deeds-import", "deeds-export", "align",
    "transfer", "train", "predict", "register", "warp", "evaluate", "learn2reg",
]
