"""The learning-rate schedule of slicreg.train (cosine decay, linear warm-up) and its config checks."""

from __future__ import annotations

import math

import pytest

from slicreg.errors import ConfigError
from slicreg.train import TrainConfig, learning_rate


def test_constant_schedule_is_the_shipped_recipe():
    cfg = TrainConfig(iterations=10, lr=0.004)
    assert [learning_rate(cfg, i) for i in range(10)] == [0.004] * 10


def test_warmup_then_cosine_to_zero():
    cfg = TrainConfig(iterations=110, lr=0.01, lr_schedule="cosine", warmup=10)
    assert learning_rate(cfg, 0) == pytest.approx(0.001)
    assert learning_rate(cfg, 9) == pytest.approx(0.01)
    assert learning_rate(cfg, 10) == pytest.approx(0.01)  # the decay starts after the warm-up
    assert learning_rate(cfg, 60) == pytest.approx(0.005)  # half way: cos(pi / 2)
    assert learning_rate(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    lrs = [learning_rate(cfg, i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(cfg, 35) == pytest.approx(0.005 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
    ({"warmup": -1}, "warmup must be in"),
    ({"iterations": 5, "warmup": 5}, "warmup must be in"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
