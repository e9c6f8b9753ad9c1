"""Executors of per-case work: where the items of :meth:`pipelines.runner.StageContext.map` run.

- :class:`ProcessExecutor` (``--jobs N``): a pool of ``N`` local processes started with ``spawn``; one item or
  ``N = 1`` runs in the runner's own process.
- :class:`DaskExecutor` (``--scheduler ADDRESS`` or ``[pipeline] scheduler``): every item is a task of a
  ``dask.distributed`` cluster -- ``local:N`` starts a ``LocalCluster`` of ``N`` single-threaded worker processes
  on this machine; ``tcp://HOST:PORT`` (or ``HOST:PORT``) connects to a running scheduler; a path to a JSON
  scheduler file (``dask scheduler --scheduler-file F``, dask-jobqueue) connects to the scheduler it names.

Both keep the contract of ``ctx.map``: results in the order of the items, a progress bar fed by completed items,
the first failing item's exception raised (in item order) after every item has finished, and nothing about the
results depends on the executor (per-case functions derive their randomness from the item, never from the
worker). A worker that dies mid-item (killed, out of memory, its node lost) is replaced by Dask and its item runs
again elsewhere, up to the scheduler's ``distributed.scheduler.allowed-failures`` (Dask's default 3); beyond that
the stage fails unpublished and a rerun continues in its partial folder, as after any interruption.

Per-case outputs are written by the workers straight into the stage's partial folder, so with a remote cluster
the work directory must be on a file system every worker mounts at the same path (each item checks that before it
starts, and fails with one clear line if not). ``dask`` and ``distributed`` are the optional extra ``.[dask]``.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicreg.errors import ConfigError

PROCESSES = "processes"
"""The scheduler value meaning the local process pool of ``--jobs`` (the default)."""

INSTALL_HINT = ("pip install -e '.[dask]' in the slicreg checkout (or pip install dask==2026.8.0 "
                "distributed==2026.8.0)")

Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]
"""``progress(iterable, desc, total) -> iterable``: wraps an iterable in a progress bar (``StageContext``'s)."""

_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ucx|inproc|ws|wss)://\S+|[A-Za-z0-9_.\-]+:\d{1,5})$")
_LOCAL = re.compile(r"^local:(\d+)$")


# ------------------------------------------------------------------------------------------------ choice


@dataclass(frozen=True)
class SchedulerSpec:
    """A parsed scheduler value: ``kind`` is ``"processes"``, ``"local"`` (``workers`` processes), ``"address"``
    or ``"file"`` (a scheduler file); ``value`` is what was given."""

    kind: str
    value: str
    workers: int = 0


def parse_scheduler(value: Any, *, where: str = "--scheduler") -> SchedulerSpec:
    """Check a scheduler value (from the command line or a pipeline file) without contacting anything.

    Args:
        value: ``"processes"``, ``"local:N"`` (N >= 1), ``"tcp://HOST:PORT"`` / ``"HOST:PORT"`` (also ``tls://``,
            ``ucx://``), or the path of a scheduler file ending in ``.json``.
        where: how the value is named in error messages (``--scheduler`` or ``[pipeline] scheduler``).

    Raises:
        ConfigError: not a string, or none of the forms above; naming ``where``, what was expected and what came.
    """
    expected = ("'local:N' (N worker processes on this machine), a scheduler address such as tcp://HOST:8786, a "
                "scheduler file (*.json), or 'processes' (the --jobs pool)")
    if not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r}: expected a string, {expected}; got {type(value).__name__}")
    text = value.strip()
    if text == PROCESSES:
        return SchedulerSpec(PROCESSES, text)
    local = _LOCAL.match(text)
    if local:
        n = int(local.group(1))
        if n < 1:
            raise ConfigError(f"{where} = {value!r}: a local cluster needs at least 1 worker, got {n}")
        return SchedulerSpec("local", text, n)
    if text.startswith("local"):
        raise ConfigError(f"{where} = {value!r}: expected local:N with a whole number N >= 1 of worker processes")
    if text.endswith(".json"):
        return SchedulerSpec("file", text)
    if _ADDRESS.match(text):
        return SchedulerSpec("address", text)
    raise ConfigError(f"{where} = {value!r}: expected {expected}")


def dask_available() -> bool:
    """True if ``dask.distributed`` can be imported (the ``.[dask]`` extra is installed)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed"))


def make_executor(*, jobs: int = 1, scheduler: str | None = None, where: str = "--scheduler") -> Executor:
    """The executor for ``jobs`` processes or a scheduler value (see :func:`parse_scheduler`).

    Nothing is started here: a Dask cluster is started or connected to when the first item is mapped.

    Raises:
        ConfigError: a malformed scheduler value, or a Dask scheduler without dask installed (saying how to
            install it).
    """
    spec = parse_scheduler(scheduler, where=where) if scheduler is not None else SchedulerSpec(PROCESSES, PROCESSES)
    if spec.kind == PROCESSES:
        return ProcessExecutor(jobs)
    if not dask_available():
        raise ConfigError(f"{where} = {spec.value!r} needs dask.distributed, which is not installed: {INSTALL_HINT}")
    return DaskExecutor(spec, where=where)


# ----------------------------------------------------------------------------------------------- workers


def init_worker(threads: int) -> None:
    """Give a worker process ``threads`` torch threads (torch is optional for a worker)."""
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)


def _usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


THREADS_ENV = "SLICREG_TORCH_THREADS"
"""Set on the workers of a remote cluster: torch threads per item (e.g. the cores of a node / its worker processes)."""


def run_item(fn: Callable[[Any], Any], item: Any, threads: int | None, shared_dir: str | None) -> Any:
    """One item on a Dask worker: check the shared folder, set the torch threads, call ``fn(item)``.

    ``threads=None`` (a remote cluster): ``$SLICREG_TORCH_THREADS`` if the worker has it, else the worker process's
    usable cores divided by its task threads. Several worker processes on one node each see all of its cores, so
    give them ``SLICREG_TORCH_THREADS`` = cores / processes (docs/scaling.md)."""
    if shared_dir is not None and not os.path.isdir(shared_dir):
        import socket

        from slicreg.errors import InputError

        raise InputError(f"{shared_dir}: the stage's folder is not visible on the Dask worker on "
                         f"{socket.gethostname()} "
                         "(the work directory must be on a file system that every worker mounts at the same path)")
    if threads is None:
        given = os.environ.get(THREADS_ENV, "")
        if given:
            if not given.isdigit() or int(given) < 1:
                from slicreg.errors import InputError

                raise InputError(f"{THREADS_ENV}={given!r} on a Dask worker: expected a whole number >= 1")
            threads = int(given)
        else:
            threads = _usable_cores()
            with contextlib.suppress(ImportError, ValueError):
                from distributed import get_worker

                threads = max(1, threads // max(1, get_worker().state.nthreads))
    init_worker(threads)
    return fn(item)


# --------------------------------------------------------------------------------------------- executors


class Executor:
    """Runs ``fn`` over items for :meth:`StageContext.map`; see the module docstring for the contract."""

    #: the process count a stage may use for work of its own outside ``map`` (``StageContext.jobs``)
    jobs: int = 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, desc: str, progress: Progress,
            shared_dir: str | os.PathLike | None = None) -> list[Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ran the items, for the stage manifest."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (a local cluster); it can be used again afterwards."""


class ProcessExecutor(Executor):
    """``jobs`` local processes (``spawn``), each with ``max(1, cores // jobs)`` torch threads; ``jobs <= 1`` or a
    single item runs in the calling process."""

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = max(1, int(jobs))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, desc: str, progress: Progress,
            shared_dir: str | os.PathLike | None = None) -> list[Any]:
        items = list(items)
        if self.jobs <= 1 or len(items) <= 1:
            return [fn(x) for x in progress(items, desc, len(items))]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        with ProcessPoolExecutor(
            max_workers=min(self.jobs, len(items)), mp_context=mp.get_context("spawn"),
            initializer=init_worker, initargs=(threads,),
        ) as pool:
            futures = [pool.submit(fn, x) for x in items]
            for _ in progress(as_completed(futures), desc, len(futures)):
                pass
            return [f.result() for f in futures]

    def describe(self) -> dict[str, Any]:
        return {"kind": PROCESSES, "jobs": self.jobs}


class DaskExecutor(Executor):
    """Items as tasks of a ``dask.distributed`` cluster (see the module docstring).

    Args:
        spec: from :func:`parse_scheduler` (kind ``local``, ``address`` or ``file``).
        where: how the scheduler value is named in error messages.
    """

    def __init__(self, spec: SchedulerSpec, *, where: str = "--scheduler") -> None:
        if spec.kind not in ("local", "address", "file"):
            raise ConfigError(f"{where} = {spec.value!r}: not a Dask scheduler")
        self.spec = spec
        self.where = where
        self.jobs = spec.workers if spec.kind == "local" else 1
        self._cluster: Any = None
        self._client: Any = None

    # ---- connection
    @property
    def client(self) -> Any:
        """The ``distributed.Client``, started (``local:N``) or connected on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        from distributed import Client, LocalCluster

        spec = self.spec
        if spec.kind == "local":
            import dask

            # one task thread per worker process and the runner's environment unchanged, as the process pool's
            # workers have them: Dask's default pre-spawn environment would set OMP_NUM_THREADS=1 and
            # MALLOC_TRIM_THRESHOLD_=65536 beside the runner's allocator setting (pipelines/cli.py). No dashboard
            # (no port to clash).
            with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
                self._cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                             dashboard_address=None)
            return Client(self._cluster, set_as_default=False)
        try:
            if spec.kind == "file":
                if not Path(spec.value).expanduser().is_file():
                    raise ConfigError(f"{self.where} = {spec.value!r}: scheduler file not found (start the scheduler "
                                      "with --scheduler-file first, or give its address)")
                return Client(scheduler_file=str(Path(spec.value).expanduser()), set_as_default=False)
            return Client(spec.value, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"{self.where} = {spec.value!r}: cannot reach the Dask scheduler ({exc}); is it running "
                              "(dask scheduler, or a dask-jobqueue cluster), and is its address right?") from None

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()

    # ---- work
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, desc: str, progress: Progress,
            shared_dir: str | os.PathLike | None = None) -> list[Any]:
        items = list(items)
        if not items:
            return []
        from distributed import as_completed

        client = self.client
        threads = max(1, (os.cpu_count() or 1) // self.spec.workers) if self.spec.kind == "local" else None
        shared = str(shared_dir) if shared_dir is not None else None
        tag = f"{_key_safe(desc)}-{uuid.uuid4().hex[:8]}"
        # pure=False and unique keys: every call runs anew (no result reuse between stages or attempts)
        futures = [client.submit(run_item, fn, x, threads, shared, key=f"{tag}-{i}", pure=False)
                   for i, x in enumerate(items)]
        try:
            for _ in progress(as_completed(futures, loop=client.loop), desc, len(futures)):
                pass
            return [self._result(f, i, len(items), desc) for i, f in enumerate(futures)]
        finally:
            with contextlib.suppress(Exception):
                client.cancel(futures)

    def _result(self, future: Any, index: int, n: int, desc: str) -> Any:
        from distributed.scheduler import KilledWorker

        try:
            return future.result()
        except KilledWorker as exc:
            raise WorkerLost(
                f"{desc}: item {index + 1} of {n} was running on Dask workers that died each time it was tried "
                f"(the scheduler's allowed-failures was reached: {exc}); the item may exhaust a worker's memory "
                f"(give the workers more) or crash the interpreter. The stage was not published; a rerun "
                f"continues with the items already written") from None

    def describe(self) -> dict[str, Any]:
        from importlib import metadata

        info: dict[str, Any] = {"kind": "dask", "scheduler": self.spec.value}
        with contextlib.suppress(metadata.PackageNotFoundError):
            info["distributed"] = metadata.version("distributed")
        if self._client is not None:
            with contextlib.suppress(Exception):
                workers = self._client.scheduler_info(n_workers=-1)["workers"]
                info["workers"] = len(workers)
                info["threads"] = sum(w.get("nthreads", 0) for w in workers.values())
        return info


class WorkerLost(RuntimeError):
    """An item whose Dask workers kept dying (more often than the scheduler's allowed failures)."""


def _key_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "item"
