"""Per-case work on a Dask cluster (pipelines.executors): the same bytes as --jobs 1, a killed worker's item runs
again, a worker that keeps dying fails the stage unpublished, and bad scheduler values are clear errors."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_datasets import body  # the tiny CT of the dataset tests

from pipelines.executors import PROCESSES, make_executor, parse_scheduler
from pipelines.runner import MANIFEST, Runner, load_pipeline
from slicreg.errors import ConfigError
from slicreg.io import save_field, save_volume

PLUGIN = textwrap.dedent('''
    """Per-case stage types of the Dask tests (importable by the workers: the test puts this folder on sys.path,
    which the spawned worker processes inherit)."""
    import json
    import os
    import signal
    import time
    from pathlib import Path

    import numpy as np

    from pipelines.runner import stage
    from slicreg.io import atomic_path, atomic_write_bytes, atomic_write_json, load_image


    def _note(folder, name):
        """A side record outside the stage folder (which worker process ran what), never part of the outputs."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}-{os.getpid()}-{time.monotonic_ns()}").touch()


    def texture(item):
        """Seeded noise shaped by one preprocessed scan, written as .npy (depends on the item only)."""
        _note(item["notes"], f"texture-{item['id']}")
        image = load_image(item["image"]).array.astype(np.float64)
        rng = np.random.default_rng([item["seed"], item["index"]])
        out = np.round(image * rng.standard_normal(image.shape), 6).astype(np.float32)
        path = Path(item["out"])
        atomic_write_bytes(path, out.tobytes())
        time.sleep(0.2)  # long enough that both workers get items
        return {"id": item["id"], "sum": float(out.sum(dtype=np.float64))}


    @stage("dask-texture", version="1", params={}, inputs=["dataset"])
    def texture_stage(ctx):
        """Per-case outputs via ctx.map, and a summary in item order."""
        doc = json.loads((Path(ctx.inputs["dataset"]) / "dataset.json").read_text())
        items = [{"id": sid, "index": i, "seed": ctx.seed, "image": str(Path(ctx.inputs["dataset"]) / s["image"]),
                  "out": str(ctx.path(f"texture/{sid}.f32")), "notes": str(ctx.work_dir / "notes")}
                 for i, (sid, s) in enumerate(sorted(doc["subjects"].items()))]
        atomic_write_json(ctx.path("summary.json"), ctx.map(texture, items, "texture"))


    def fragile(item):
        """Kills its own worker process the first time (or every time) it runs for the chosen item."""
        _note(item["notes"], f"fragile-{item['index']}")
        marker = Path(item["marker"])
        if item["index"] == item["kill"] and (item["always"] or not marker.exists()):
            with atomic_path(Path(item["out"])) as tmp:  # killed half-way through writing its output
                tmp.write_bytes(b"half")
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.3)
        atomic_write_bytes(Path(item["out"]), str(item["index"] ** 2).encode())
        return item["index"] ** 2


    @stage("dask-fragile", version="1", params={"n": 6, "kill": 2, "always": False})
    def fragile_stage(ctx):
        """n per-case files; item ``kill`` kills its worker (once, or always)."""
        p = ctx.params
        items = [{"index": i, "kill": p["kill"], "always": p["always"], "out": str(ctx.path(f"case{i}.txt")),
                  "marker": str(ctx.work_dir / f"killed-{i}"), "notes": str(ctx.work_dir / "notes")}
                 for i in range(p["n"])]
        atomic_write_json(ctx.path("squares.json"), ctx.map(fragile, items, "fragile"))
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "dask_test_stages.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def make_dataset(root: Path, n: int = 6) -> Path:
    """``n`` tiny subjects on different grids (one LPS) and a true field for the pair s{n-1} <- s0."""
    subjects = {}
    for i in range(n):
        sid = f"s{i}"
        shape = (14 + i % 3, 12 + i % 2, 16 - i % 4)
        aff = np.diag([-1.8, -2.0, 2.5, 1.0]) if i == 1 else np.diag([2.0, 2.0, 2.0, 1.0])
        aff[:3, 3] = (i, -i, 2 * i)
        image, labels = body(shape, aff, i)
        save_volume(image, root / f"imagesTr/{sid}_0000.nii.gz")
        save_volume(labels, root / f"labelsTr/{sid}.nii.gz")
        subjects[sid] = {"image": f"imagesTr/{sid}_0000.nii.gz", "labels": f"labelsTr/{sid}.nii.gz",
                         "role": "template" if i == 0 else ("test" if i == n - 1 else "train")}
    fixed = f"s{n - 1}"
    shape = (14 + (n - 1) % 3, 12 + (n - 1) % 2, 16 - (n - 1) % 4)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (n - 1, -(n - 1), 2 * (n - 1))
    u = 0.5 * np.sin(np.indices(shape).astype(np.float32) / 3.0)
    save_field(u, aff, root / f"ground_truth_fields/disp_{fixed}_s0.nii.gz")
    doc = {"name": "dask-test", "format": "slicreg-dataset/1", "template": "s0", "subjects": subjects,
           "training": [f"s{i}" for i in range(1, n - 1)], "test": [fixed],
           "registration_pairs": [{"fixed": fixed, "moving": "s0",
                                   "ground_truth_field": f"ground_truth_fields/disp_{fixed}_s0.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def _pipeline(folder: Path, body: str, *, scheduler: str | None = None, name: str = "p.toml") -> Path:
    head = f'[pipeline]\nname = "t"\nwork_dir = "{folder / "work"}"\nseed = 7\nplugins = ["dask_test_stages"]\n'
    if scheduler is not None:
        head += f'scheduler = "{scheduler}"\n'
    path = folder / name
    path.write_text(head + "\n" + textwrap.dedent(body))
    return path


def _manifest(work: Path, stage_id: str) -> dict:
    return json.loads((work / stage_id / "current" / MANIFEST).read_text())


def _workers(notes: Path, prefix: str) -> set[int]:
    return {int(p.name.split("-")[-2]) for p in notes.glob(f"{prefix}-*")}


# ------------------------------------------------------------------------------------------- no cluster


def test_scheduler_values_are_checked_before_any_work(plugin, monkeypatch, capsys):
    assert parse_scheduler("local:3").workers == 3
    assert parse_scheduler("tcp://10.0.0.5:8786").kind == "address"
    assert parse_scheduler("node17:8786").kind == "address"
    assert parse_scheduler("/shared/scheduler.json").kind == "file"
    assert parse_scheduler(PROCESSES).kind == PROCESSES
    for bad, message in [("local:0", "at least 1 worker"), ("local:two", "local:N with a whole number"),
                         ("my cluster", "expected 'local:N'"), (4, "expected a string")]:
        with pytest.raises(ConfigError, match=f"--scheduler = .*{message}"):
            parse_scheduler(bad)
    # in a pipeline file: named as [pipeline] scheduler, before any stage runs
    path = _pipeline(plugin, '[stages.a]\ntype = "dask-fragile"\n', scheduler="the cluster")
    with pytest.raises(ConfigError, match=r"\[pipeline\] scheduler = 'the cluster': expected"):
        load_pipeline(path)
    # without dask installed: one clear error that says how to install it
    monkeypatch.setattr("pipelines.executors.dask_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs dask.distributed, which is not installed: pip install -e '\.\[dask"):
        make_executor(scheduler="local:2")
    assert make_executor(jobs=2).describe() == {"kind": PROCESSES, "jobs": 2}  # the process pool needs no dask
    # on the command line: exit status 2, one line; --jobs and --scheduler together are refused
    from pipelines.cli import main

    ok = _pipeline(plugin, '[stages.a]\ntype = "dask-fragile"\n', name="ok.toml")
    assert main(["run", str(ok), "--scheduler", "local:2", "--quiet"]) == 2
    assert "pip install" in capsys.readouterr().err
    assert main(["run", str(ok), "--jobs", "2", "--scheduler", "local:2", "--quiet"]) == 2
    assert "give one" in capsys.readouterr().err
    assert not (plugin / "work" / "a").exists()
    # --jobs on the command line wins over the file's scheduler (so no dask is needed here)
    filed = _pipeline(plugin, '[stages.a]\ntype = "dask-fragile"\nn = 2\nkill = -1\n', scheduler="local:2",
                      name="filed.toml")
    assert main(["run", str(filed), "--jobs", "1", "--quiet"]) == 0
    assert _manifest(plugin / "work", "a")["executor"] == {"kind": PROCESSES, "jobs": 1}


# ---------------------------------------------------------------------------------------------- cluster


def test_local_cluster_gives_the_bytes_of_jobs_1(plugin):
    """A real per-case stage (preprocess: subjects and a true field) and a plugin one, first with --jobs 1, then
    forced again on a 2-worker LocalCluster chosen by the pipeline file: same keys, same output hashes."""
    pytest.importorskip("distributed")
    data = make_dataset(plugin / "data")
    body = f"""
        [stages.data]
        type = "dataset"
        folder = "{data}"

        [stages.prep]
        type = "preprocess"
        inputs = {{ dataset = "data" }}
        shape = [16, 16, 16]

        [stages.texture]
        type = "dask-texture"
        inputs = {{ dataset = "prep" }}
        """
    work = plugin / "work"
    Runner(load_pipeline(_pipeline(plugin, body)), jobs=1, quiet=True).run()
    before = {s: _manifest(work, s) for s in ("prep", "texture")}
    assert len([k for k in before["prep"]["outputs"] if k.startswith("imagesTr/")]) == 6
    assert "ground_truth_fields/disp_s5_s0.nii.gz" in before["prep"]["outputs"]
    assert _workers(work / "notes", "texture") == {os.getpid()}

    runner = Runner(load_pipeline(_pipeline(plugin, body, scheduler="local:2", name="dask.toml")), quiet=True)
    runner.run(force=["prep", "texture"])
    for stage_id, old in before.items():
        new = _manifest(work, stage_id)
        assert new["key"] == old["key"], stage_id  # the same cache key
        assert new["outputs"] == old["outputs"], stage_id  # byte for byte
        assert new["executor"]["kind"] == "dask" and new["executor"]["workers"] == 2
        assert old["executor"] == {"kind": PROCESSES, "jobs": 1}
    summary = json.loads((work / "texture" / "current" / "summary.json").read_text())
    assert [r["id"] for r in summary] == [f"s{i}" for i in range(6)]  # results in item order
    ran_on = _workers(work / "notes", "texture") - {os.getpid()}
    assert len(ran_on) == 2  # both Dask workers ran items, none ran in this process after the first run
    assert not list((work / "prep").glob(".partial-*"))


def test_killed_worker_item_runs_again_and_the_stage_completes(plugin):
    """Item 2 SIGKILLs its worker process on its first run: the nanny restarts the worker, the scheduler runs the
    item again, the stage completes with every output correct (--scheduler on the command line)."""
    pytest.importorskip("distributed")
    from pipelines.cli import main

    path = _pipeline(plugin, '[stages.cases]\ntype = "dask-fragile"\nn = 6\nkill = 2\n')
    assert main(["run", str(path), "--scheduler", "local:2", "--quiet"]) == 0
    work = plugin / "work"
    out = work / "cases" / "current"
    assert (work / "killed-2").exists()  # the worker was killed mid-stage
    assert len(list((work / "notes").glob("fragile-2-*"))) == 2  # and its item ran a second time
    assert [(out / f"case{i}.txt").read_text() for i in range(6)] == [str(i * i) for i in range(6)]
    assert json.loads((out / "squares.json").read_text()) == [i * i for i in range(6)]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the killed writer's temporary was cleared
    assert len(_workers(work / "notes", "fragile")) >= 2


def test_item_that_keeps_killing_workers_fails_the_stage_unpublished(plugin):
    """Past the scheduler's allowed failures the stage fails with one clear error; nothing is published, the other
    items' outputs stay in the partial folder for the rerun."""
    pytest.importorskip("distributed")
    import dask

    from pipelines.executors import WorkerLost

    path = _pipeline(plugin, '[stages.cases]\ntype = "dask-fragile"\nn = 4\nkill = 1\nalways = true\n')
    # one task at a time on a worker (worker-saturation 1.0): a dying worker then takes no queued bystander item
    # with it, which Dask would count as a failure of that item too
    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}):
        runner = Runner(load_pipeline(path), scheduler="local:2", quiet=True)
        with pytest.raises(WorkerLost, match="item 2 of 4 was running on Dask workers that died"):
            runner.run()
    stage_dir = plugin / "work" / "cases"
    assert not (stage_dir / "current").exists()
    assert [p.name for p in stage_dir.iterdir() if not p.name.startswith(".partial-")] == []
    (partial,) = stage_dir.glob(".partial-*")
    assert sorted(p.name for p in partial.glob("case*.txt")) == ["case0.txt", "case2.txt", "case3.txt"]
    assert len(list(partial.glob(".case1.txt.*.tmp.txt"))) == 1  # the last killed writer's (the 2nd cleared the 1st's)
    assert len(list((plugin / "work" / "notes").glob("fragile-1-*"))) == 2  # tried on 2 workers, both killed
