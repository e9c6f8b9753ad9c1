"""The cached stage runner: skip when cached, re-run on change, downstream invalidation, kill -9 recovery."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.runner import MANIFEST, Runner, load_pipeline
from slicreg.errors import ConfigError

PLUGIN = textwrap.dedent('''
    """Stage types used by the runner tests."""
    import json
    import os
    import time
    from pathlib import Path

    from pipelines.runner import stage
    from slicreg.io import atomic_write_text


    def _count(ctx, name):
        counter = ctx.work_dir / f"count-{name}.txt"
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))


    @stage("t-source", version="1", params={"value": 1, "unused": 0})
    def source(ctx):
        """Writes its value."""
        _count(ctx, ctx.stage_id)
        atomic_write_text(ctx.path("value.txt"), str(ctx.params["value"]))


    @stage("t-double", version="1", params={}, inputs=["src"])
    def double(ctx):
        """Doubles the value of its input."""
        _count(ctx, ctx.stage_id)
        v = int((ctx.inputs["src"] / "value.txt").read_text())
        atomic_write_text(ctx.path("value.txt"), str(2 * v))


    @stage("t-file", version="1", params={"path": None}, path_params=["path"])
    def read_file(ctx):
        """Copies an external file."""
        _count(ctx, ctx.stage_id)
        atomic_write_text(ctx.path("copy.txt"), Path(ctx.params["path"]).read_text())


    def square(x):
        return x * x


    @stage("t-cases", version="1", params={"n": 4, "sleep": 0.0}, inputs={"src": False})
    def cases(ctx):
        """Per-case outputs; sleeps after each so a test can kill it mid-way."""
        _count(ctx, ctx.stage_id)
        done_before = []
        for i in range(ctx.params["n"]):
            rel = f"case{i}.txt"
            if ctx.done(rel):
                done_before.append(i)
                continue
            atomic_write_text(ctx.path(rel), str(i))
            time.sleep(ctx.params["sleep"])
        atomic_write_text(ctx.path("resumed.json"), json.dumps(done_before))
        atomic_write_text(ctx.path("squares.json"), json.dumps(ctx.map(square, list(range(5)), "squares")))
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "runner_test_stages.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_pipeline(folder: Path, body: str, name="p.toml") -> Path:
    head = f'[pipeline]\nname = "t"\nwork_dir = "{folder / "work"}"\nplugins = ["runner_test_stages"]\n\n'
    path = folder / name
    path.write_text(head + textwrap.dedent(body))
    return path


def count(folder: Path, stage_id: str) -> int:
    f = folder / "work" / f"count-{stage_id}.txt"
    return int(f.read_text()) if f.exists() else 0


def value(folder: Path, stage_id: str) -> str:
    return (folder / "work" / stage_id / "current" / "value.txt").read_text()


CHAIN = """
[stages.a]
type = "t-source"
value = {value}
unused = {unused}

[stages.b]
type = "t-double"
inputs = {{ src = "a" }}
"""


def run(path, **kw):
    return Runner(load_pipeline(path), quiet=True).run(**kw)


def test_skip_when_cached_and_rerun_on_change(plugin):
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    run(p)
    assert (count(plugin, "a"), count(plugin, "b")) == (1, 1)
    assert value(plugin, "b") == "6"
    plans = run(p)
    assert all(pl.cached for pl in plans)
    assert (count(plugin, "a"), count(plugin, "b")) == (1, 1)

    # a changed parameter re-runs the stage and, since its output changed, everything downstream
    p = write_pipeline(plugin, CHAIN.format(value=5, unused=0))
    run(p)
    assert (count(plugin, "a"), count(plugin, "b")) == (2, 2)
    assert value(plugin, "b") == "10"

    # a parameter that does not change the output re-runs the stage only
    p = write_pipeline(plugin, CHAIN.format(value=5, unused=1))
    run(p)
    assert (count(plugin, "a"), count(plugin, "b")) == (3, 2)

    # switching back finds the earlier outputs still cached
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    run(p)
    assert (count(plugin, "a"), count(plugin, "b")) == (3, 2)
    assert value(plugin, "b") == "6"


def test_manifest_records_params_versions_and_time(plugin):
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    run(p)
    m = json.loads((plugin / "work" / "b" / "current" / MANIFEST).read_text())
    assert m["params"] == {}
    assert m["inputs"]["src"]["ref"] == "a"
    assert "value.txt" in m["outputs"] and len(m["outputs"]["value.txt"]["sha256"]) == 64
    assert "numpy" in m["environment"]["packages"] and m["wall_s"] >= 0


def test_force_only_from_until(plugin):
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    run(p, only=["a"])
    assert (count(plugin, "a"), count(plugin, "b")) == (1, 0)
    run(p, force=["a"])
    # forced a re-ran with identical output, so b (never run) runs once and is not invalidated again
    assert (count(plugin, "a"), count(plugin, "b")) == (2, 1)
    run(p, start="b", force=["b"])
    assert (count(plugin, "a"), count(plugin, "b")) == (2, 2)
    run(p, until="a", force=["a"])
    assert (count(plugin, "a"), count(plugin, "b")) == (3, 2)


def test_selection_that_lacks_an_input_is_refused_before_work(plugin):
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    with pytest.raises(ConfigError, match="neither cached nor selected"):
        run(p, only=["b"])
    assert count(plugin, "b") == 0


def test_external_file_content_is_part_of_the_key(plugin):
    ext = plugin / "ext.txt"
    ext.write_text("one")
    p = write_pipeline(plugin, f'[stages.f]\ntype = "t-file"\npath = "{ext}"\n')
    run(p)
    run(p)
    assert count(plugin, "f") == 1
    time.sleep(0.01)
    ext.write_text("two")
    run(p)
    assert count(plugin, "f") == 2
    assert (plugin / "work" / "f" / "current" / "copy.txt").read_text() == "two"


@pytest.mark.parametrize("body, message", [
    ('[stages.a]\ntype = "t-source"\nvalu = 3\n', r"unknown parameter\(s\) \['valu'\]"),
    ('[stages.a]\ntype = "no-such-type"\n', "unknown stage type 'no-such-type'"),
    ('[stages.b]\ntype = "t-double"\n', "missing required input 'src'"),
    ('[stages.b]\ntype = "t-double"\ninputs = { src = "zzz" }\n', "must name an earlier stage"),
    ('[stages.b]\ntype = "t-double"\ninputs = { source = "a" }\n', "unknown input 'source'"),
    ('[stages.f]\ntype = "t-file"\npath = "/no/such/file.txt"\n', "no such file"),
    ('[stagez.a]\n', "unknown top-level"),
    ('[stages.a]\ntype = "t-source"\nvalue = [\n', "not valid TOML"),
    ('[stages.a]\ntype = "t-source"\nvalue = "three"\n', r"value = 'three': expected an integer, got str"),
    ('[stages.a]\ntype = "t-source"\nvalue = true\n', r"value = True: expected an integer, got bool"),
])
def test_config_errors(plugin, body, message):
    p = write_pipeline(plugin, body)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(p)


def test_unknown_pipeline_key(plugin):
    p = plugin / "x.toml"
    p.write_text('[pipeline]\nnmae = "x"\n[stages.environment]\n')
    with pytest.raises(ConfigError, match="nmae"):
        load_pipeline(p)


def test_parallel_map_over_jobs(plugin):
    p = write_pipeline(plugin, '[stages.c]\ntype = "t-cases"\nn = 2\n')
    Runner(load_pipeline(p), jobs=2, quiet=True).run()
    assert json.loads((plugin / "work" / "c" / "current" / "squares.json").read_text()) == [0, 1, 4, 9, 16]


def test_killed_stage_leaves_no_complete_entry_and_resumes(plugin):
    p = write_pipeline(plugin, '[stages.c]\ntype = "t-cases"\nn = 6\nsleep = 0.4\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(Path.cwd())])}
    cmd = [sys.executable, "run_pipeline.py", str(p), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    stage_dir = plugin / "work" / "c"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until two cases are written, then kill -9
        partial = list(stage_dir.glob(".partial-*/case1.txt")) if stage_dir.exists() else []
        if partial:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage_dir / "current").exists()
    complete = [d for d in stage_dir.iterdir() if not d.name.startswith(".")]
    assert complete == []
    runner = Runner(load_pipeline(p), quiet=True)
    assert not runner.plan()[0].cached
    runner.run()
    out = stage_dir / "current"
    assert (out / MANIFEST).exists()
    resumed = json.loads((out / "resumed.json").read_text())
    assert 0 in resumed and 1 in resumed and len(resumed) < 6
    assert sorted(x.name for x in out.glob("case*.txt")) == [f"case{i}.txt" for i in range(6)]


def test_cli_list_and_dry_run(plugin, capsys):
    from pipelines.cli import main

    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0))
    assert main(["run", str(p), "--list"]) == 0
    out = capsys.readouterr().out
    assert "a" in out and "to run" in out
    assert main(["run", str(p), "--quiet"]) == 0
    assert main(["run", str(p), "--dry-run"]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["run", str(p), "--only", "zzz"]) == 2
    assert "unknown stage 'zzz'" in capsys.readouterr().err


def test_until_leaves_later_stages_alone(plugin):
    p = write_pipeline(plugin, CHAIN.format(value=3, unused=0)
                       + '\n[stages.c]\ntype = "t-double"\ninputs = { src = "b" }\n')
    plans = run(p, until="a")
    assert (count(plugin, "a"), count(plugin, "b"), count(plugin, "c")) == (1, 0, 0)
    assert [pl.cached for pl in plans] == [True, False, False]


def test_pipeline_seed_of_wrong_type_is_refused(plugin):
    p = plugin / "seed.toml"
    p.write_text(f'[pipeline]\nseed = "x"\nwork_dir = "{plugin / "work"}"\nplugins = ["runner_test_stages"]\n'
                 '[stages.a]\ntype = "t-source"\n')
    with pytest.raises(ConfigError, match=r"seed = 'x': expected an integer"):
        load_pipeline(p)
