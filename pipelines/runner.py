"""A small cached stage runner.

A *stage type* is a Python function registered with :func:`stage`: it declares its parameters (with
defaults), its named inputs (outputs of earlier stages, or file parameters) and writes its outputs into a
folder it is given. A *pipeline* is a TOML file listing stage instances in order::

    [pipeline]
    name = "demo"
    work_dir = "runs/demo"          # relative paths resolve against the current directory
    seed = 0                        # part of every stage's key; stages derive their own seeds from it
    plugins = ["my_stages"]         # optional: modules of your own that register more stage types

    [stages.example]                # stage id; `type` defaults to the id
    type = "fetch-example"

    [stages.cohort]
    inputs = { source = "example" } # input name -> "stage-id" or "stage-id/sub/path"
    n_train = 20                    # every other key is a parameter of the stage type

Caching: a stage's outputs live in ``WORK/<id>/<key>/`` where ``key`` hashes the stage type, its code
version, its resolved parameters and the *content* of its inputs. An unchanged stage is skipped; a changed
parameter or input gives a new key, so the stage re-runs, and when its output content changes every stage
downstream gets a new key too. A stage writes into ``WORK/<id>/.partial-<key>/``; only after it returned and
its manifest (``_stage.json``: parameters, input hashes, output hashes, package versions, wall time) was
written is that folder renamed to ``<key>`` -- one atomic rename. A stage killed mid-way leaves only a
``.partial`` folder, which is never taken as complete; a rerun continues in it (stages may skip per-case
files that are already there, see :meth:`StageContext.done`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicreg.errors import ConfigError
from slicreg.io import atomic_write_json, sha256_file

MANIFEST = "_stage.json"
KEEP_OLD_OUTPUTS = 2  # complete outputs kept per stage besides the current one (cheap switching back)

# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class StageType:
    """A registered stage type: what it needs, what it is called, and the function that does the work."""

    name: str
    run: Callable[[StageContext], None]
    version: str
    params: dict[str, Any]
    inputs: dict[str, bool]  # input name -> required
    path_params: tuple[str, ...]  # parameters naming files/folders whose content is hashed
    description: str
    param_types: dict[str, tuple[type, ...]] = field(default_factory=dict)  # allowed types beyond the default's

    @property
    def code_hash(self) -> str:
        try:
            source = inspect.getsource(self.run)
        except (OSError, TypeError):
            source = self.run.__qualname__
        return hashlib.sha256(source.encode()).hexdigest()[:12]


REGISTRY: dict[str, StageType] = {}


def stage(
    name: str,
    *,
    version: str,
    params: dict[str, Any] | None = None,
    inputs: dict[str, bool] | Sequence[str] = (),
    path_params: Sequence[str] = (),
    param_types: dict[str, tuple[type, ...]] | None = None,
) -> Callable[[Callable[[StageContext], None]], Callable[[StageContext], None]]:
    """Register a stage type.

    Args:
        name: the type name used in pipeline files (``type = "..."``).
        version: bump when the stage's behaviour changes in a way its source does not show (e.g. a library
            function it calls changed); the stage function's own source is hashed automatically.
        params: parameter names with defaults; a config key not listed here is an error. ``None`` as a default
            means "required" for path parameters and "not set" otherwise.
        inputs: input names; a dict maps each to whether it is required (a sequence means all required).
        path_params: parameters that name files or folders: checked for existence before anything runs and
            hashed by content into the cache key.
        param_types: parameter -> the types a value may have, where the default's type does not say it (e.g. an
            int default that also takes the string ``"auto"``); checked before any stage runs.
    """
    if not isinstance(inputs, dict):
        inputs = {n: True for n in inputs}

    def register(fn: Callable[[StageContext], None]) -> Callable[[StageContext], None]:
        if name in REGISTRY and REGISTRY[name].run.__qualname__ != fn.__qualname__:
            raise RuntimeError(f"stage type {name!r} registered twice")
        REGISTRY[name] = StageType(
            name=name, run=fn, version=version, params=dict(params or {}), inputs=dict(inputs),
            path_params=tuple(path_params), description=(inspect.getdoc(fn) or "").split("\n")[0],
            param_types=dict(param_types or {}),
        )
        return fn

    return register


def load_stage_types() -> dict[str, StageType]:
    """Import every module of :mod:`pipelines.stages` so that their stage types register themselves."""
    import importlib
    import pkgutil

    import pipelines.stages as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return REGISTRY


# -------------------------------------------------------------------------------------------- execution


@dataclass
class StageContext:
    """What a stage function gets: its parameters, its inputs and the folder to write into."""

    stage_id: str
    params: dict[str, Any]
    inputs: dict[str, Any]  # input name -> Path, a list of Paths (list inputs), or None (optional, not given)
    out_dir: Path
    work_dir: Path
    jobs: int = 1
    quiet: bool = False
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    executor: Any = None  # a pipelines.executors.Executor; None: the process pool of ``jobs``

    def path(self, relative: str | os.PathLike) -> Path:
        """``out_dir / relative`` with its parent folders created."""
        p = self.out_dir / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def done(self, relative: str | os.PathLike) -> bool:
        """True if a per-case output was already written (by an interrupted earlier attempt of this stage).

        Per-case files must have been written atomically (see :mod:`slicreg.io`) for this to be safe."""
        return (self.out_dir / relative).exists()

    def log(self, message: str) -> None:
        """Print a line (also when quiet: messages are results, progress bars are not) and keep it."""
        self.notes.append(message)
        print(f"[{self.stage_id}] {message}", flush=True)

    def progress(self, iterable: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        """A tqdm progress bar over ``iterable`` (silent with ``--quiet``)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=f"[{self.stage_id}] {desc}", total=total, disable=self.quiet, leave=False)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        """``[fn(x) for x in items]`` on the run's executor (in order, with progress).

        The executor is ``--jobs`` processes (started with ``spawn``, each with ``max(1, cores // jobs)`` torch
        threads) or, with ``--scheduler``, a Dask cluster (:mod:`pipelines.executors`). ``fn`` must be a
        module-level function of an importable module (it is pickled by reference), and its result must depend on
        the item only, never on where it ran. Per-case files go into :attr:`out_dir` (the workers write them
        there: on a cluster it must be on a shared file system)."""
        from pipelines.executors import ProcessExecutor

        executor = self.executor if self.executor is not None else ProcessExecutor(self.jobs)
        return executor.map(fn, list(items), desc=desc, progress=self.progress, shared_dir=self.out_dir)


@dataclass
class StageInstance:
    """One entry of a pipeline: a stage id, its type, its resolved parameters and input references."""

    stage_id: str
    type: StageType
    params: dict[str, Any]
    input_refs: dict[str, str | list[str]]  # input name -> "stage-id[/sub/path]" or a list of them


@dataclass
class Pipeline:
    name: str
    path: Path
    work_dir: Path
    seed: int
    stages: list[StageInstance]
    scheduler: str | None = None  # [pipeline] scheduler: where per-case work runs (pipelines.executors)


PIPELINE_KEYS = {"name", "work_dir", "seed", "description", "plugins", "scheduler"}


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str], path: Path) -> None:
    """Set stage parameters from ``STAGE.KEY=VALUE`` strings (``slicreg run --set``), in place.

    ``VALUE`` is read as a TOML value (``3``, ``true``, ``[16, 16, 24]``, ``"text"``); anything else is taken as a
    string (``data.folder=/data/btcv``). ``KEY`` may name a key inside a table parameter (``register.flow.iterations``)
    or an input (``register.inputs.bundle``). Unknown stages are a :class:`ConfigError`; unknown keys are reported by
    the validation that follows, like a typo in the file."""
    stages = doc.setdefault("stages", {})
    for item in overrides:
        target, sep, raw = str(item).partition("=")
        keys = target.strip().split(".")
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. data.folder=/data/btcv")
        if keys[0] not in stages or not isinstance(stages[keys[0]], dict):
            raise ConfigError(f"--set {item!r}: {path} has no stage {keys[0]!r}; stages: {', '.join(stages)}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        table = stages[keys[0]]
        for key in keys[1:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is not a table")
        table[keys[-1]] = value


def load_pipeline(path: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                  overrides: Sequence[str] = ()) -> Pipeline:
    """Read and validate a pipeline TOML file; every problem is a :class:`ConfigError` naming the key.

    ``overrides``: ``STAGE.KEY=VALUE`` strings applied before validation (:func:`apply_overrides`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a TOML file in UTF-8)") from None
    unknown = set(doc) - {"pipeline", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table(s) {sorted(unknown)}; expected [pipeline] and [stages.*]")
    apply_overrides(doc, overrides, path)
    head = doc.get("pipeline", {})
    bad = set(head) - PIPELINE_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [pipeline]; allowed: {sorted(PIPELINE_KEYS)}")
    registry = load_stage_types()
    for module in head.get("plugins", []):  # extra stage modules of the user's own, importable by name
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{path}: [pipeline] plugins: cannot import {module!r} ({exc})") from None
    stages: list[StageInstance] = []
    seen: set[str] = set()
    for stage_id, entry in doc.get("stages", {}).items():
        where = f"{path}: [stages.{stage_id}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        entry = dict(entry)
        type_name = entry.pop("type", stage_id)
        if type_name not in registry:
            raise ConfigError(f"{where}: unknown stage type {type_name!r}; known: {', '.join(sorted(registry))}")
        st = registry[type_name]
        refs = entry.pop("inputs", {})
        if not isinstance(refs, dict):
            raise ConfigError(f"{where}: 'inputs' must be a table like {{ name = \"stage-id\" }}")
        for name, ref in refs.items():
            if name not in st.inputs:
                raise ConfigError(f"{where}: unknown input {name!r} for stage type {type_name!r}; "
                                  f"it takes {sorted(st.inputs) or 'no inputs'}")
            for one in (ref if isinstance(ref, list) else [ref]):
                if not isinstance(one, str) or one.split("/")[0] not in seen:
                    raise ConfigError(f"{where}: input {name} = {one!r} must name an earlier stage "
                                      f"(one of {sorted(seen) or 'none'}), optionally with a sub-path")
        for name, required in st.inputs.items():
            if required and name not in refs:
                raise ConfigError(f"{where}: missing required input {name!r} (inputs = {{ {name} = \"stage-id\" }})")
        unknown = set(entry) - set(st.params)
        if unknown:
            raise ConfigError(f"{where}: unknown parameter(s) {sorted(unknown)} for stage type {type_name!r}; "
                              f"allowed: {sorted(st.params)}")
        for name, value in entry.items():
            problem = _type_problem(st, name, value)
            if problem:
                raise ConfigError(f"{where}: {name} = {value!r}: expected {problem}, got {type(value).__name__}")
        params = {**st.params, **entry}
        for p in st.path_params:
            if params.get(p) is not None and not Path(str(params[p])).expanduser().exists():
                raise ConfigError(f"{where}: {p} = {params[p]!r}: no such file or folder")
        stages.append(StageInstance(stage_id, st, params, dict(refs)))
        seen.add(stage_id)
    if not stages:
        raise ConfigError(f"{path}: no stages defined (add [stages.<id>] tables)")
    wd = Path(work_dir) if work_dir is not None else Path(head.get("work_dir", f"runs/{head.get('name', path.stem)}"))
    seed = head.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{path}: [pipeline] seed = {seed!r}: expected an integer, got {type(seed).__name__}")
    for key in ("name", "work_dir", "description"):
        if key in head and not isinstance(head[key], str):
            raise ConfigError(f"{path}: [pipeline] {key} = {head[key]!r}: expected a string, got "
                              f"{type(head[key]).__name__}")
    scheduler = head.get("scheduler")
    if scheduler is not None:
        from pipelines.executors import parse_scheduler

        parse_scheduler(scheduler, where=f"{path}: [pipeline] scheduler")
    return Pipeline(head.get("name", path.stem), path, wd.expanduser(), seed, stages, scheduler)


def _type_problem(st: StageType, name: str, value: Any) -> str | None:
    """What a parameter value should have been, from the type of its declared default (``None``: fine).

    A default of ``None`` (optional or path parameters) and path parameters accept anything TOML gives; an int
    default takes integers, a float default integers or floats, a bool default booleans, a string default
    strings, a list or table default the same. A stage declares other allowed types in ``param_types``."""
    allowed = st.param_types.get(name)
    if allowed is None:
        default = st.params.get(name)
        if default is None or name in st.path_params:
            return None
        if isinstance(default, bool):
            allowed = (bool,)
        elif isinstance(default, int):
            allowed = (int,)
        elif isinstance(default, float):
            allowed = (int, float)
        else:
            allowed = (type(default),)
    if isinstance(value, bool) and bool not in allowed:
        return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
    if isinstance(value, allowed):
        return None
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a table", type(None): "nothing"}


# ------------------------------------------------------------------------------------------------ hashing


class _HashCache:
    """sha256 of external files, remembered by (path, size, mtime) so big inputs are hashed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def file(self, p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.data:
            self.data[key] = sha256_file(p)
        return self.data[key]

    def tree(self, p: Path) -> str:
        if p.is_file():
            return self.file(p)
        entries = sorted(q for q in p.rglob("*") if q.is_file())
        return _digest({str(q.relative_to(p)): self.file(q) for q in entries})

    def save(self) -> None:
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self.data)


def _as_list(refs: str | list[str]) -> list[str]:
    return refs if isinstance(refs, list) else [refs]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _subtree_hash(manifest: dict[str, Any], sub: str) -> str:
    outputs = manifest["outputs"]
    if not sub:
        return _digest(outputs)
    if sub in outputs:
        return outputs[sub]["sha256"]
    picked = {k: v for k, v in outputs.items() if k.startswith(sub.rstrip("/") + "/")}
    if not picked:
        raise ConfigError(f"stage {manifest['stage']!r} has no output {sub!r}")
    return _digest(picked)


# ------------------------------------------------------------------------------------------------ runner


@dataclass
class Plan:
    """What the runner knows about a stage before running anything."""

    instance: StageInstance
    key: str | None  # None: an upstream stage is not complete yet, so the key cannot be known
    cached: bool
    selected: bool


class Runner:
    """Runs a :class:`Pipeline` with caching. See the module docstring for the rules."""

    def __init__(self, pipeline: Pipeline, *, jobs: int = 1, quiet: bool = False, scheduler: str | None = None
                 ) -> None:
        """``scheduler`` (see :func:`pipelines.executors.parse_scheduler`) overrides the pipeline file's
        ``[pipeline] scheduler``; neither given: per-case work runs on ``jobs`` local processes. The executor is
        chosen here (a bad value or a missing ``dask`` is a ConfigError before any work) and started lazily."""
        from pipelines.executors import make_executor

        self.pipeline = pipeline
        self.work_dir = pipeline.work_dir
        self.jobs = max(1, int(jobs))
        self.quiet = quiet
        self.hashes = _HashCache(self.work_dir / ".hash-cache.json")
        if scheduler is not None:
            self.executor = make_executor(jobs=self.jobs, scheduler=scheduler, where="--scheduler")
        else:
            self.executor = make_executor(jobs=self.jobs, scheduler=pipeline.scheduler,
                                          where=f"{pipeline.path}: [pipeline] scheduler")

    # ---- paths
    def stage_dir(self, stage_id: str) -> Path:
        return self.work_dir / stage_id

    def output_dir(self, stage_id: str, key: str) -> Path:
        return self.stage_dir(stage_id) / key

    def manifest(self, stage_id: str, key: str) -> dict[str, Any] | None:
        m = self.output_dir(stage_id, key) / MANIFEST
        if not m.is_file():
            return None
        try:
            return json.loads(m.read_text())
        except ValueError:
            return None

    # ---- keys
    def _input_hashes(self, inst: StageInstance, keys: dict[str, str | None]) -> dict[str, Any] | None:
        hashes: dict[str, Any] = {}
        for name, refs in sorted(inst.input_refs.items()):
            parts = []
            for ref in _as_list(refs):
                up, _, sub = ref.partition("/")
                key = keys.get(up)
                manifest = self.manifest(up, key) if key else None
                if manifest is None:
                    return None
                parts.append(_subtree_hash(manifest, sub))
            hashes[name] = parts if isinstance(refs, list) else parts[0]
        for p in inst.type.path_params:
            value = inst.params.get(p)
            if value is not None:
                hashes[f"param:{p}"] = self.hashes.tree(Path(str(value)).expanduser())
        return hashes

    def _key(self, inst: StageInstance, input_hashes: dict[str, Any]) -> str:
        from slicreg import __version__

        return _digest({
            "type": inst.type.name, "version": inst.type.version, "code": inst.type.code_hash,
            "slicreg": __version__, "params": inst.params, "seed": self.pipeline.seed, "inputs": input_hashes,
        })[:16]

    def plan(self, *, only: Sequence[str] = (), start: str | None = None, until: str | None = None,
             force: Sequence[str] = ()) -> list[Plan]:
        """Keys and cache state of every stage, and which are selected to run; validates the selection."""
        ids = [s.stage_id for s in self.pipeline.stages]
        for name, values in (("--only", only), ("--force", force), ("--from", [start] if start else []),
                             ("--until", [until] if until else [])):
            for v in values:
                if v not in ids:
                    raise ConfigError(f"{name}: unknown stage {v!r}; stages of this pipeline: {', '.join(ids)}")
        lo = ids.index(start) if start else 0
        hi = ids.index(until) if until else len(ids) - 1
        keys: dict[str, str | None] = {}
        plans = []
        for i, inst in enumerate(self.pipeline.stages):
            selected = lo <= i <= hi and (not only or inst.stage_id in only)
            hashes = self._input_hashes(inst, keys)
            key = self._key(inst, hashes) if hashes is not None else None
            cached = key is not None and self.manifest(inst.stage_id, key) is not None
            if inst.stage_id in force:
                cached = False
            keys[inst.stage_id] = key if cached else None
            plans.append(Plan(inst, key, cached, selected))
        return plans

    def run(self, *, only: Sequence[str] = (), start: str | None = None, until: str | None = None,
            force: Sequence[str] = (), dry_run: bool = False) -> list[Plan]:
        """Run the selected stages in order (skipping cached ones). Returns the final plan."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(), contextlib.closing(self.executor):
            plans = self.plan(only=only, start=start, until=until, force=force)
            self._check_selection(plans)
            if dry_run:
                return plans
            keys: dict[str, str] = {}
            forced = set(force)
            for plan in plans:
                inst = plan.instance
                hashes = self._input_hashes(inst, keys)
                if hashes is None:  # an input stage has no complete output
                    if not plan.selected:
                        continue
                    raise ConfigError(f"stage {inst.stage_id!r}: an input stage has no complete output")
                key = self._key(inst, hashes)
                done = self.manifest(inst.stage_id, key) is not None and inst.stage_id not in forced
                if done or not plan.selected:
                    if done:
                        keys[inst.stage_id] = key
                        self._point_current(inst.stage_id, key)
                        self._say(f"{inst.stage_id}: cached ({key})")
                    continue
                self._execute(inst, key, hashes, keys)
                keys[inst.stage_id] = key
                forced.discard(inst.stage_id)
            self.hashes.save()
            return self.plan()

    def _check_selection(self, plans: list[Plan]) -> None:
        will_exist = set()
        for plan in plans:
            inst = plan.instance
            if plan.selected or plan.cached:
                needed = [(name, r.split("/")[0]) for name, refs in inst.input_refs.items() for r in _as_list(refs)]
                for name, up in needed:
                    if plan.selected and up not in will_exist:
                        raise ConfigError(
                            f"stage {inst.stage_id!r} needs the output of {up!r} (input {name!r}), which is neither "
                            f"cached nor selected to run; include it (e.g. drop --only/--from) or run it first")
                will_exist.add(inst.stage_id)

    def _execute(self, inst: StageInstance, key: str, hashes: dict[str, Any], keys: dict[str, str]) -> None:
        final = self.output_dir(inst.stage_id, key)
        partial = self.stage_dir(inst.stage_id) / f".partial-{key}"
        if final.exists():  # forced re-run of a complete stage
            shutil.rmtree(final)
        partial.mkdir(parents=True, exist_ok=True)
        inputs: dict[str, Any] = {n: None for n in inst.type.inputs}
        for name, refs in inst.input_refs.items():
            paths = []
            for ref in _as_list(refs):
                up, _, sub = ref.partition("/")
                paths.append(self.output_dir(up, keys[up]) / sub if sub else self.output_dir(up, keys[up]))
            inputs[name] = paths if isinstance(refs, list) else paths[0]
        ctx = StageContext(inst.stage_id, dict(inst.params), inputs, partial, self.work_dir, self.executor.jobs,
                           self.quiet, self.pipeline.seed, executor=self.executor)
        self._say(f"{inst.stage_id}: running ({inst.type.name}) -> {final}")
        started = time.time()
        cpu0 = time.process_time()
        inst.type.run(ctx)
        wall = time.time() - started
        outputs = {
            str(p.relative_to(partial)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(partial.rglob("*")) if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name
        }
        atomic_write_json(partial / MANIFEST, {
            "stage": inst.stage_id, "type": inst.type.name, "version": inst.type.version,
            "code": inst.type.code_hash, "key": key, "params": inst.params, "seed": self.pipeline.seed,
            "inputs": {n: {"ref": inst.input_refs.get(n), "hash": h} for n, h in hashes.items()},
            "outputs": outputs, "notes": ctx.notes,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(wall, 3), "cpu_s_main_process": round(time.process_time() - cpu0, 3), "jobs": self.jobs,
            "executor": self.executor.describe(),
            "environment": environment(),
        })
        os.replace(partial, final)
        self._point_current(inst.stage_id, key)
        self._prune(inst.stage_id, key)
        self._say(f"{inst.stage_id}: done in {wall:.1f} s")

    def _point_current(self, stage_id: str, key: str) -> None:
        link = self.stage_dir(stage_id) / "current"
        tmp = self.stage_dir(stage_id) / f".current-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(key, tmp)
        os.replace(tmp, link)

    def _prune(self, stage_id: str, key: str) -> None:
        olds = [p for p in self.stage_dir(stage_id).iterdir()
                if p.is_dir() and not p.is_symlink() and p.name != key and not p.name.startswith(".")]
        olds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for p in olds[KEEP_OLD_OUTPUTS:]:
            shutil.rmtree(p, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self):
        with open(self.work_dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.work_dir}: another run is using this work directory") from None
            yield

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def environment() -> dict[str, Any]:
    """Package versions and machine facts recorded beside every output."""
    from importlib import metadata

    versions = {}
    for dist in ("slicreg", "numpy", "scipy", "scikit-image", "nibabel", "torch", "tqdm", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "packages": versions,
    }
