"""The per-pair job loop of the ``register`` and ``align-pairs`` stages, resumable (a floor below both stages)."""

from __future__ import annotations

from typing import Any


def run_pair_jobs(ctx: Any, pairs: list[tuple[str, str]], job: Any, worker: Any, *, desc: str) -> list[dict]:
    """Register every ``(fixed, moving)`` pair once, resuming an interrupted attempt: the per-pair loop of the
    ``register`` and ``align-pairs`` stages.

    A pair whose field ``fields/disp_<fixed>_<moving>.nii.gz`` and record ``runs/<fixed>_<moving>.json`` both
    exist (written atomically by an earlier attempt) is read back; the others become jobs
    ``{"fixed", "moving", "field", "field_path", "record_path", **job(fixed, moving)}`` run by ``worker`` on the
    stage's processes (``ctx.map``), each returning its record. Returns the records in the order of ``pairs``."""
    from slicreg.io import read_json

    jobs, records = [], {}
    for fixed, moving in pairs:
        field = f"fields/disp_{fixed}_{moving}.nii.gz"
        record = f"runs/{fixed}_{moving}.json"
        if ctx.done(field) and ctx.done(record):
            records[(fixed, moving)] = read_json(ctx.out_dir / record)
            continue
        jobs.append({"fixed": fixed, "moving": moving, "field": field, "field_path": str(ctx.path(field)),
                     "record_path": str(ctx.path(record)), **job(fixed, moving)})
    if records:
        ctx.log(f"{len(records)} of {len(pairs)} pairs already registered by an earlier attempt")
    for rec in ctx.map(worker, jobs, desc=desc):
        records[(rec["fixed"], rec["moving"])] = rec
    return [records[pair] for pair in pairs]
