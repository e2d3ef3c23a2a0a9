"""Benchmarks are not tests, but the runs they compose must stay valid as conf/ changes (a `+key` that conf/
came to hold once stopped bench.py before it trained anything)."""

import argparse
import time

import lightning as L
import pytest

from bench import bench, time_to_accuracy  # bench/*.py; the repo root is on the path, as for `tests`
from cnnlab.train import train
from tests.conftest import compose_config


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [False, True])
def test_the_benchmarks_runs_compose_with_their_step_limit(tmp_path, gpu):
    args = argparse.Namespace(images=22_400, warmup_images=3_200, data=str(tmp_path), gpu=gpu, epochs=3)
    runs = bench.GPU_SETTINGS if gpu else {**bench.SETTINGS, **bench.LADDER}
    for overrides in runs.values():
        cfg = compose_config("train", bench.ours_overrides(args, overrides, tmp_path / "run"))
        assert cfg.trainer.max_epochs == 3
        assert cfg.trainer.limit_train_batches == 22_400 // cfg.data.batch_size
        assert cfg.callbacks.bench_timer.warmup == 3_200 // cfg.data.batch_size


SLEEP = 1.5  # each validation's: longer than the timed steps take on a slow machine (0.5 s on a 2-core AVX2 EPYC)


class SlowValidation(L.Callback):
    def on_validation_end(self, trainer, module):
        time.sleep(SLEEP)


@pytest.mark.slow
def test_the_step_timer_counts_the_training_batches_after_warm_up_and_leaves_epoch_boundaries_out(tiny_overrides):
    # 60 training images in batches of 16: 4 batches an epoch (16, 16, 16, 12); two epochs, the first batch warm-up.
    overrides = [
        *tiny_overrides,
        "+callbacks.bench_timer._target_=bench.bench.StepTimer",
        "+callbacks.bench_timer.warmup=1",
    ]
    overrides += ["+callbacks.slow._target_=tests.test_bench.SlowValidation", "callbacks.inside=null"]
    started = time.perf_counter()
    train(compose_config("train", overrides))
    timer = bench.StepTimer.last
    assert timer.images == 2 * 60 - 16
    assert 0 < timer.seconds < SLEEP < time.perf_counter() - started  # the validations' sleeps are not in it


def test_make_bench_rewrites_the_generated_part_of_the_page_and_keeps_the_part_written_by_hand(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# old tables\n\n## Time to 70.51 %\nold\n{bench.HAND_WRITTEN}\n\n## Notes\nby hand\n")
    bench.write_generated(page, "# Benchmarks\n\nnew tables\n")
    time_to_accuracy.add_section(page, "## Time to 70.51 %\n\nnew times\n")
    assert page.read_text() == (
        f"# Benchmarks\n\nnew tables\n\n## Time to 70.51 %\n\nnew times\n\n{bench.HAND_WRITTEN}\n\n## Notes\nby hand\n"
    )
    fresh = tmp_path / "fresh.md"  # no hand-written part yet: the mark goes at the end, for one to follow
    bench.write_generated(fresh, "tables\n")
    time_to_accuracy.add_section(fresh, "times\n")
    assert fresh.read_text() == f"tables\n\ntimes\n\n{bench.HAND_WRITTEN}\n"
