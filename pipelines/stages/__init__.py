"""Stage definitions, one module per area. Each module registers its stage types with
:func:`pipelines.runner.stage` when imported; :func:`pipelines.runner.load_stage_types` imports them all.

A stage is a thin shell: it reads its input files, calls pure functions of :mod:`slicreg` /
:mod:`preprocessing`, and writes its outputs into ``ctx.out_dir``. Keep heavy imports inside the functions."""
