"""src/lr_find.py: Lightning's learning-rate finder on the training config, its suggestion, its plot, no changes."""

import json
import math

import pytest

from cnnlab import UserError
from cnnlab.lr_find import find_lr, steepest_descent
from tests.conftest import BOTH_WAYS, compose_config


@pytest.mark.slow
def test_the_finder_suggests_a_rate_and_writes_its_plot(tiny_overrides, tmp_path):
    cfg = compose_config("lr_find", [*tiny_overrides, "lr_find.num_training=30", "lr_find.early_stop_threshold=null"])
    found = find_lr(cfg)
    lrs = found["lr"]
    assert found["steps"] == len(lrs) == len(found["loss"]) == 30  # 4 batches an epoch: the finder ran past 2 epochs
    assert lrs == sorted(lrs) and lrs[0] >= cfg.lr_find.min_lr and lrs[-1] <= cfg.lr_find.max_lr  # a growing rate
    assert lrs[0] < found["suggestion"] < lrs[-1]
    assert abs(found["loss"][0] - math.log(10)) < 0.2  # the untrained network's loss, ln 10, where Lightning had 1.2
    run = tmp_path / "run"
    assert json.loads((run / "lr_find.json").read_text())["suggestion"] == found["suggestion"]
    assert (run / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert cfg.optimizer.lr == 0.001 and found["optimizer.lr"] == 0.001  # the config is left as it was
    assert not list(run.glob("**/*.ckpt")) and not list(
        run.glob(".lr_find_*")
    )  # nothing trained for good, no leftovers


def test_too_few_steps_for_a_suggestion_is_one_line(tiny_overrides):
    with pytest.raises(UserError, match=r"lr_find: the loss was recorded at 5 step\(s\), too few .*num_training"):
        find_lr(compose_config("lr_find", [*tiny_overrides, "lr_find.num_training=5"]))


@BOTH_WAYS
def test_the_command_prints_the_suggestion(tree_archive, tmp_path, run_script):
    done = run_script("lr_find.py", f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}",
                      "data.val_size=20", "data.batch_size=16", "trainer=cpu", "lr_find.num_training=20",
                      f"outputs_root={tmp_path / 'outputs'}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("suggested learning rate: ")]
    assert "optimizer.lr=0.001 now" in line and "lr_find.png" in line
    (plot,) = (tmp_path / "outputs" / "lr_find").glob("*/lr_find.png")


def test_the_suggestion_is_the_steepest_fall_on_the_plots_log_scale():
    """Flat with noise at the smallest rates, falling from 1e-4 to 1e-2, rising after: the suggestion is in the
    fall. Against the rate itself (Lightning's slope), the noise between rates 1e-6 apart would win."""
    import numpy as np

    lrs = np.logspace(-6, 0, 120)
    noise = np.random.default_rng(0).normal(0, 2e-3, len(lrs))
    losses = 2.3 + noise - 0.2 * np.clip(np.log10(lrs / 1e-4), 0, 2) + 3 * (lrs > 0.05)
    best = steepest_descent(lrs.tolist(), losses.tolist(), "exponential")
    assert 1e-4 <= lrs[best] <= 1e-2
    assert lrs[int(np.argmin(np.gradient(losses[10:-1], lrs[10:-1]))) + 10] < 1e-5  # what the rate's own slope picks
