"""``slicreg run``: run a pipeline (the same as ``python run_pipeline.py``)."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "run a pipeline of cached stages (default: the demo pipeline)"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", nargs="?", default=None, help="pipeline TOML file (default: pipelines/demo.toml)")
    p.add_argument("--work-dir", default=None, help="where stage outputs are kept (default: from the pipeline file)")
    p.add_argument("--only", type=_csv, default=[], metavar="STAGE,...", help="run only these stages")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE", help="start at this stage")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    p.add_argument("--force", type=_csv, default=[], metavar="STAGE,...", help="re-run these stages even if cached")
    p.add_argument("--list", action="store_true", help="list the stages and whether each is cached, then exit")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="processes for per-case work (default 1)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run per-case work on a Dask cluster instead: local:N (N worker processes here), "
                        "tcp://HOST:PORT, or a scheduler file (*.json); overrides [pipeline] scheduler; needs the "
                        "extra .[dask] (docs/scaling.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="set a stage parameter (a TOML value, else a string), e.g. --set data.folder=/data/btcv; "
                        "repeatable")


def run(args: argparse.Namespace) -> int:
    from pipelines import DEFAULT_PIPELINE
    from pipelines.runner import Runner, load_pipeline
    from slicreg.errors import InputError

    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs is not None and args.scheduler is not None:
        raise InputError(f"--jobs {args.jobs} and --scheduler {args.scheduler}: give one (--jobs: local processes; "
                         "--scheduler: a Dask cluster, local:N for N local workers)")
    pipeline = load_pipeline(args.pipeline or DEFAULT_PIPELINE, work_dir=args.work_dir, overrides=args.overrides)
    scheduler = args.scheduler
    if args.jobs is not None and pipeline.scheduler is not None:  # the command line wins over the file
        from pipelines.executors import PROCESSES

        scheduler = PROCESSES
        if not args.quiet:
            print(f"--jobs {args.jobs}: per-case work on local processes, not on the pipeline's scheduler "
                  f"{pipeline.scheduler!r}")
    runner = Runner(pipeline, jobs=args.jobs or 1, quiet=args.quiet, scheduler=scheduler)
    if args.list or args.dry_run:
        plans = runner.plan(only=args.only, start=args.start, until=args.until, force=args.force)
        print(f"pipeline {pipeline.name} ({pipeline.path}), work dir {pipeline.work_dir}")
        for plan in plans:
            state = "cached" if plan.cached else ("to run" if plan.key else "to run (after its inputs)")
            if args.dry_run and not plan.selected:
                state = "cached, not selected" if plan.cached else "not selected"
            print(f"  {plan.instance.stage_id:<16} {plan.instance.type.name:<16} {state}")
        if args.dry_run:
            runner.run(only=args.only, start=args.start, until=args.until, force=args.force, dry_run=True)
        return 0
    runner.run(only=args.only, start=args.start, until=args.until, force=args.force)
    print(f"outputs: {pipeline.work_dir.resolve()}")
    for inst in pipeline.stages:  # stages that write a report keep it at <stage>/current/report/index.md
        report = pipeline.work_dir / inst.stage_id / "current" / "report" / "index.md"
        if report.exists():
            print(f"report: {report.resolve()}")
    return 0
