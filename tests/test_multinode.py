"""Training on several nodes: torchrun's multi-node form (two "nodes" on this machine, one CPU process each, gloo,
c10d rendezvous), each process holding only its shard of the training scans (slicreg.train.shard_ids)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ddp_config, make_dataset  # the tiny contract-layout dataset of the training tests

from slicreg.errors import ConfigError
from slicreg.io import read_json
from slicreg.train import load_checkpoint, shard_ids

ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_disjoint_cover_every_scan_and_depend_on_the_seed_only():
    ids = [f"s{i:02d}" for i in range(11)]
    assert shard_ids(ids, 0, 1, seed=3) == ids  # one process: everything, in order (single-process runs unchanged)
    shards = [shard_ids(ids, r, 3, seed=3) for r in range(3)]
    assert sorted(sum(shards, [])) == ids and sorted(len(s) for s in shards) == [3, 4, 4]
    assert all(s == sorted(s) for s in shards)  # each keeps the given order
    assert shards == [shard_ids(ids, r, 3, seed=3) for r in range(3)]  # deterministic
    assert shards != [shard_ids(ids, r, 3, seed=4) for r in range(3)]  # and drawn from the seed
    with pytest.raises(ConfigError, match="2 training scan.*for 3 processes"):
        shard_ids(ids[:2], 0, 3, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_command_on_two_nodes_with_sharded_data(tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d ...` started twice (one per "node"): 2 steps on
    gloo; every process loaded only its half of the training scans."""
    paths = make_dataset(tmp_path, n=5)  # 5 scans: 1 held out for validation, 4 trained on, 2 per process
    config = ddp_config(tmp_path, paths)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"slicreg-test-{os.getpid()}",
         "-m", "pipelines.cli", "train", "--config", str(config), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-4000:]
    run = tmp_path / "run"
    info = read_json(run / "config.json")
    assert info["world_size"] == 2 and info["val_ids"] == ["sub4"]
    shards = info["data_shards"]
    assert sorted(shards[0] + shards[1]) == info["train_ids"] == ["sub0", "sub1", "sub2", "sub3"]
    assert len(shards[0]) == len(shards[1]) == 2
    per_scan = (1 * 8 * 8 * 12) * 4 + (16 * 8 * 8 * 12) * 1  # float32 image + uint8 targets on the 4 mm grid
    assert info["training_data_bytes_per_process"] == [2 * per_scan, 2 * per_scan]  # half of the 4 scans each
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and state["world_size"] == 2 and len(state["generators"]) == 2
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows) and rows[1]["val_loss"]
    card = read_json(run / "bundle" / "model_card.json")
    assert card["training"]["hardware"]["processes"] == 2 and card["training"]["train_ids"] == info["train_ids"]
    assert torch.isfinite(next(iter(state["model"].values())).float()).all()
