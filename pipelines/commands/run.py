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
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="processes for per-case work (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def run(args: argparse.Namespace) -> int:
    from pipelines import DEFAULT_PIPELINE
    from pipelines.runner import Runner, load_pipeline
    from slicreg.errors import InputError

    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    pipeline = load_pipeline(args.pipeline or DEFAULT_PIPELINE, work_dir=args.work_dir)
    runner = Runner(pipeline, jobs=args.jobs, quiet=args.quiet)
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
