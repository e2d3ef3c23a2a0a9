"""The debug= presets (Lightning's own flags) and callbacks=early_stopping, each run for real on the tiny data."""

import json

import pytest
import torch

from cnnlab.train import train
from tests.conftest import compose_config


def run(tiny_overrides, *overrides: str) -> dict:
    return train(compose_config("train", [*tiny_overrides, *overrides]))


def test_debug_fdr_runs_one_batch_of_each_loop(tiny_overrides, tmp_path):
    metrics = run(tiny_overrides, "debug=fdr")
    assert metrics["global_step"] == 1 and metrics["best_checkpoint"] is None  # fast_dev_run saves nothing


def test_debug_limit_runs_the_whole_path_on_a_few_batches(tiny_overrides, tmp_path):
    metrics = run(tiny_overrides, "debug=limit", "trainer.limit_train_batches=3")  # of the 4 batches there are
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * 3
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_debug_overfit_trains_on_the_same_batches_every_epoch(tiny_overrides, tmp_path):
    shards = tmp_path / "shards"
    run(tiny_overrides, "debug=overfit", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1",
        "+callbacks.shards._target_=tests.callbacks.RecordShard", f"+callbacks.shards.folder={shards}")  # fmt: skip
    epochs = [(shards / f"shard-0-{epoch}.txt").read_text().splitlines() for epoch in range(3)]
    assert len(epochs[0]) == 2 * 16  # overfit_batches=2, batches of 16
    assert epochs[0] == epochs[1] == epochs[2]  # not shuffled: the same images, in the same order


@pytest.mark.slow
def test_the_training_order_is_shuffled_without_overfit(tiny_overrides, tmp_path):  # what the test above relies on
    shards = tmp_path / "shards"
    run(tiny_overrides, "+callbacks.shards._target_=tests.callbacks.RecordShard", f"+callbacks.shards.folder={shards}")
    assert (shards / "shard-0-0.txt").read_text() != (shards / "shard-0-1.txt").read_text()


@pytest.mark.slow
def test_debug_profiler_writes_its_report_in_the_run_dir(tiny_overrides, tmp_path):
    run(tiny_overrides, "debug=profiler")
    report = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "run_training_batch" in report or "training_step" in report


@pytest.mark.slow
def test_debug_anomaly_turns_on_torchs_anomaly_detection(tiny_overrides, tmp_path, monkeypatch):
    seen = []
    original = torch.autograd.set_detect_anomaly.__init__

    def recording(self, mode, check_nan=True):
        seen.append(mode)
        original(self, mode, check_nan)

    monkeypatch.setattr(torch.autograd.set_detect_anomaly, "__init__", recording)
    run(tiny_overrides, "debug=anomaly", "trainer.max_epochs=1")
    assert True in seen


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_keeps_its_count_in_the_checkpoint(tiny_overrides, tmp_path):
    # min_delta=1: no epoch can improve val/acc by 1, so after the first validation the patience of 1 runs out
    metrics = run(tiny_overrides, "callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                  "callbacks.early_stopping.min_delta=1.0", "trainer.max_epochs=6")  # fmt: skip
    assert metrics["epochs"] == 2  # stopped after its second epoch, not at the sixth
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epochs"] == 2
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("EarlyStopping")]
    assert state["wait_count"] == 1 and state["stopped_epoch"] == 1  # what a resumed run goes on counting from
