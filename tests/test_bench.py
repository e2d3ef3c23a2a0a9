"""Benchmarks are not tests, but the runs they compose must stay valid as conf/ changes (a `+key` that conf/
came to hold once stopped bench.py before it trained anything)."""

import argparse

import pytest

from bench import bench  # bench/bench.py; the repo root is on the path, as for `tests`
from tests.conftest import compose_config


@pytest.mark.parametrize("gpu", [False, True])
def test_the_benchmarks_runs_compose_with_their_step_limit(tmp_path, gpu):
    args = argparse.Namespace(images=22_400, warmup_images=3_200, data=str(tmp_path), gpu=gpu)
    runs = bench.GPU_SETTINGS if gpu else {**bench.SETTINGS, **bench.LADDER}
    for overrides in runs.values():
        cfg = compose_config("train", bench.ours_overrides(args, overrides, tmp_path / "run"))
        assert cfg.trainer.max_epochs == 1
        assert cfg.trainer.limit_train_batches == 22_400 // cfg.data.batch_size
        assert cfg.callbacks.bench_timer.warmup == 3_200 // cfg.data.batch_size
