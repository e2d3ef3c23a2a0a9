"""A run's console, read as a user reads it: a header, the network, the result in percent, and no library noise."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # real processes: the full tier

NOISE = ["Tip", "was configured so 100%", "Skipping setting a default", "TPU available", "GPU available",
         "LeafSpec", "is not supported by the model summary", "Seed set to", "Loading `train_dataloader`"]  # fmt: skip
NOT_THE_NETWORK = ["accuracy", "val_acc_best", "test_confusion", "criterion", "CrossEntropyLoss", "MaxMetric"]


def train_py(*overrides: str, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_console_says_what_matters(tiny_overrides, tmp_path):
    # bf16 and a one-cycle schedule: the settings that brought Lightning's bf16 summary warning and torch's LeafSpec
    done = train_py(*tiny_overrides, "trainer.precision=bf16-mixed", "optimizer=sgd_onecycle", cwd=tmp_path)
    console = done.stdout + done.stderr
    assert not [noise for noise in NOISE if noise in console], console
    assert not re.search(r"cnnlab/\S+\.py:\d+: \w*Warning", console), "a warning raised by cnnlab's own code"
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cnnlab · "))
    assert "SGD lr 0.02 + OneCycleLR" in lines[header] and "bf16-mixed on cpu" in lines[header]
    assert (
        lines[header + 1].endswith(f"run dir {tmp_path / 'run'}") and "60 train · 20 val · 20 test" in lines[header + 1]
    )
    summary = [line for line in lines if re.match(r"^\d+ \| ", line)]
    assert [line.split("|")[1].strip() for line in summary][:2] == ["net", "net.conv1"] and len(summary) == 10
    assert not [row for row in summary for name in NOT_THE_NETWORK if name in row]
    epochs = [line for line in lines if line.startswith("epoch ")]  # not a terminal: a line an epoch
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"] and "val/acc " in epochs[1]
    result = next(line for line in lines if line.startswith("test: "))
    assert re.fullmatch(r"test: \d+\.\d\d % accuracy, loss \d+\.\d{4}, with epoch_\d{3}\.ckpt \(val/acc \d+\.\d\d %\)",
                        result)  # fmt: skip
    assert re.match(r"per class, worst first: \w+ \d+\.\d · ", lines[lines.index(result) + 1])
    assert lines[-1].startswith("test/acc=") and lines[-1].endswith(f"run_dir={tmp_path / 'run'}")
    assert "0.6097000241279602" not in console and not re.search(r"\d\.\d{12,}", console)  # no 18-digit floats
    (log,) = [path.read_text() for path in tmp_path.glob("outputs/runs/*/train.log")]
    assert "Seed set to 0" in log and "cnnlab · " in log  # the log file keeps every record


def test_verbose_false_prints_the_header_and_the_closing_line(tiny_overrides, tmp_path):
    done = train_py(*tiny_overrides, "verbose=false", cwd=tmp_path)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) <= 5, lines
    assert lines[0].startswith("cnnlab · ") and lines[-1].startswith("test/acc=")
