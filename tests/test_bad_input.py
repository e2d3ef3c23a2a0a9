"""Every row of docs/bad-input.md: the input, the one line it gets, and that nothing was half-written.

Rows whose mistake is caught inside train(cfg) are run in-process (a UserError, which the entry point prints as
`error: ...` with exit status 1: tests/test_cli.py); rows that only the command line can make are run as a user
would, in a `src/train.py` process.
"""

import re
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnlab import UserError
from cnnlab.train import train
from tests.conftest import ROOT, compose_config

TABLE = ROOT / "docs" / "bad-input.md"


def tree_with(image_tree: Path, tmp_path: Path, change) -> list[str]:
    """A copy of the tiny image tree with one change, as data.root."""
    tree = shutil.copytree(image_tree, tmp_path / "tree")
    change(tree)
    return [f"data.root={tree}"]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def trained_checkpoint(tiny_overrides, tmp_path) -> Path:
    return Path(train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1"]))["best_checkpoint"])


def offline(monkeypatch):
    import torchvision.datasets.cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)


# input (as the table's first column) → (make the overrides, the message it gets, as a regular expression)
IN_PROCESS = {
    "`data.root` does not exist (with `data.download=false`)": (
        lambda t: [f"data.root={t.tmp_path / 'nothing'}", "data.download=false"],
        r"data.root=.*nothing: no such file or folder \(and data.download=false\)",
    ),
    "`data.root` is an empty folder (with `data.download=false`)": (
        lambda t: [f"data.root={(t.tmp_path / 'empty').mkdir() or t.tmp_path / 'empty'}", "data.download=false"],
        r"data.root=.*empty: no CIFAR-10 found",
    ),
    "`data.root` has no CIFAR-10 and cannot be downloaded (offline)": (
        lambda t: offline(t.monkeypatch) or [f"data.root={t.tmp_path / 'new'}", "data.download=true"],
        r"data.root=.*new: could not download torchvision's CIFAR-10 \(.*no network",
    ),
    "`data.root` is a file that is not an archive": (
        lambda t: [f"data.root={write(t.tmp_path / 'notes.txt', b'hello')}"],
        r"data.root=.*notes.txt is a file but not an archive",
    ),
    "`data.root` is a truncated archive": (
        lambda t: [f"data.root={write(t.tmp_path / 'cut.tar.gz', t.tree_archive.read_bytes()[:20000])}"],
        r"data.root=.*cut.tar.gz: cannot read it, truncated or damaged\?",
    ),
    "`data.root` is a corrupt archive": (
        lambda t: [f"data.root={write(t.tmp_path / 'noise.tar.gz', bytes(range(256)) * 64)}"],
        r"data.root=.*noise.tar.gz: cannot read it, truncated or damaged\?",
    ),
    "an image that cannot be decoded": (
        lambda t: tree_with(t.image_tree, t.tmp_path, lambda tree: write(tree / "train/cat/0003.png", b"not a png")),
        r"cannot decode image train/cat/0003.png: not an image PIL can identify",
    ),
    "an image of another size": (
        lambda t: tree_with(
            t.image_tree, t.tmp_path, lambda tree: Image.new("RGB", (16, 16)).save(tree / "train/dog/0001.png")
        ),
        r"image train/dog/0001.png is \(16, 16, 3\), the first one is \(32, 32, 3\)",
    ),
    "a class in `test/` that `train/` does not have": (
        lambda t: tree_with(
            t.image_tree,
            t.tmp_path,
            lambda tree: write(tree / "test/zebra/0.png", (tree / "test/cat/0000.png").read_bytes()),
        ),
        r"test classes \['zebra'\] have no train images",
    ),
    "more classes in the data than `model.num_classes`": (
        lambda t: ["model.num_classes=5"],
        r"the data has 10 classes, model.num_classes=5: set model.num_classes=10",
    ),
    "`optimizer.lr` < 0": (lambda t: ["optimizer.lr=-0.1"], r"optimizer.lr=-0.1 must be a number ≥ 0"),
    "`data.batch_size` < 1": (lambda t: ["data.batch_size=0"], r"data.batch_size=0 must be ≥ 1"),
    "`data.val_size` < 1": (lambda t: ["data.val_size=0"], r"data.val_size=0 must be ≥ 1"),
    "`data.val_size` ≥ the training images": (
        lambda t: ["data.val_size=80"],
        r"data.val_size=80 must be between 1 and 79",
    ),
    "`model.dropout` outside [0, 1)": (lambda t: ["model.dropout=1.0"], r"model.dropout=1.0 must be in \[0, 1\)"),
    "`loss.label_smoothing` outside [0, 1)": (
        lambda t: ["loss.label_smoothing=1.0"],
        r"loss.label_smoothing=1.0 must be in \[0, 1\)",
    ),
    "shapes that do not fit (`model.conv2_kernel=20`)": (
        lambda t: ["model.conv2_kernel=20"],
        r"model: conv2 \(kernel 20, stride 1, padding 0\) does not fit its 15×15 input",
    ),
    "an unknown `trainer.precision`": (
        lambda t: ["trainer.precision=fp8"],
        r"trainer.precision=fp8 is not a precision: use one of .*bf16-mixed",
    ),
    "an unknown `trainer.accelerator`": (
        lambda t: ["trainer.accelerator=tpu9"],
        r"trainer.accelerator=tpu9 is not an accelerator: use one of auto, cpu, cuda, gpu",
    ),
    "an unknown key added under `trainer` (`+trainer.foo=1`)": (
        lambda t: ["+trainer.foo=1"],
        r"trainer.foo is not an option of lightning.Trainer; its options: .*max_epochs",
    ),
    "`seed` that is not an integer": (lambda t: ["seed=abc"], r"seed='abc' must be an integer from 0 to 2³² − 1"),
    "`seed` outside 0 … 2³² − 1": (lambda t: ["seed=-1"], r"seed=-1 must be an integer from 0 to 2³² − 1"),
    "`float32_matmul_precision` not one of highest, high, medium": (
        lambda t: ["float32_matmul_precision=low"],
        r"float32_matmul_precision='low' is not one of highest, high, medium",
    ),
    "`callbacks.run_guard.every_n_steps` (or `scaler_patience`) < 1": (
        lambda t: ["callbacks.run_guard.every_n_steps=0"],
        r"callbacks.run_guard.every_n_steps=0 must be an integer ≥ 1",
    ),
    "`keep_freed_memory` that is not a boolean": (
        lambda t: ["keep_freed_memory=maybe"],
        r"keep_freed_memory='maybe' is not true or false",
    ),
    "`ckpt_path` that does not exist": (
        lambda t: [f"ckpt_path={t.tmp_path / 'nope.ckpt'}"],
        r"ckpt_path=.*nope.ckpt: no such checkpoint file",
    ),
    "`ckpt_path` that is not a checkpoint": (
        lambda t: [f"ckpt_path={write(t.tmp_path / 'notes.ckpt', b'hello')}"],
        r"ckpt_path=.*notes.ckpt: not a checkpoint that loads safely \(truncated, damaged or not made by cnnlab\)",
    ),
    "`ckpt_path` that is truncated": (
        lambda t: [f"ckpt_path={write(t.tmp_path / 'cut.ckpt', t.checkpoint().read_bytes()[:50000])}"],
        r"ckpt_path=.*cut.ckpt: not a checkpoint that loads safely",
    ),
    "`ckpt_path` of a model with other shapes": (
        lambda t: [f"ckpt_path={t.checkpoint()}", "model.conv1_channels=16"],
        r"ckpt_path=.*epoch_000.ckpt was trained with another model \(net.conv1.weight \(32, 3, 3, 3\) vs "
        r"\(16, 3, 3, 3\) here.*pass the model.\* overrides",
    ),
    "`ckpt_path` of a run on another number of processes": (
        lambda t: [f"ckpt_path={t.checkpoint_of_processes(2)}"],
        r"ckpt_path=.*two-processes.ckpt was written by a run of 2 process\(es\), this one has 1 \(trainer.devices "
        r"× trainer.num_nodes\): resume it with the same number",
    ),
    "`ckpt_path=last` with no run to resume": (
        lambda t: ["ckpt_path=last", f"outputs_root={t.tmp_path / 'no-runs'}"],
        r"ckpt_path=last: no last.ckpt under .*no-runs/",
    ),
    "an output folder that cannot be written": (
        lambda t: [f"output_dir={write(t.tmp_path / 'a-file', b'') / 'run'}"],
        r"output_dir=.*a-file/run: cannot write the run's outputs there \(Not a directory\)",
    ),
    "a learning rate that makes the loss diverge": (
        lambda t: ["optimizer=sgd_steplr", "optimizer.lr=1e12"],
        r"the training loss is nan at epoch 0, step \d+ \(learning rate 1e\+12\): training diverged.*optimizer.lr",
    ),
}
if not torch.cuda.is_available():
    IN_PROCESS["`trainer.accelerator=gpu` on a machine without a GPU"] = (
        lambda t: ["trainer.accelerator=gpu"],
        r"trainer.accelerator=gpu: this machine has no CUDA GPU that torch can use; use trainer.accelerator=cpu",
    )
if not torch.backends.mps.is_available():
    IN_PROCESS["`trainer.accelerator=mps` on a machine without an Apple GPU"] = (
        lambda t: ["trainer.accelerator=mps"],
        r"trainer.accelerator=mps: this machine has no Apple GPU that torch can use; use trainer.accelerator=cpu",
    )

# Rows that Hydra answers before our code runs, or that only a command line can make: (arguments, message).
COMMAND_LINE = {
    "an unknown key under `trainer` (`trainer.foo=1`)": (
        ["trainer.foo=1"],
        r"Could not override 'trainer.foo'.\nTo append to your config use \+trainer.foo=1\nKey 'foo' is not in struct",
    ),
    "a value of the wrong type (`data.batch_size=many`)": (
        ["data.batch_size=many"],
        r"Value 'many' of type 'str' could not be converted to Integer\n    full_key: data.batch_size",
    ),
    "an unknown option of a group (`optimizer=adamw`)": (
        ["optimizer=adamw"],
        r"Could not find 'optimizer/adamw'\n\nAvailable options in 'optimizer':"
        r"\n\tadam\n\tsgd_cosine\n\tsgd_onecycle\n\tsgd_steplr",
    ),
    "a number as the precision group's option (`precision=32`)": (
        ["precision=32"],
        r"error: precision=32: the precision group's options are fp32, bf16, fp16 \(Hydra reads 32 as a number",
    ),
    "a sweep's launcher plugin that is not installed (the scale extra)": (
        ["-m", "hydra/launcher=parallel", "hydra.launcher._target_=hydra_plugins.not_installed.Launcher", "seed=1,2"],
        r"error: the launcher Launcher is not installed \(hydra_plugins.not_installed\): it comes with cnnlab's "
        r"scale extra, pip install -e '.\[scale\]'",
    ),
    "a run folder that cannot be written (`hydra.run.dir=...`)": (
        ["hydra.run.dir={tmp}/a-file/run"],
        r"error: hydra.run.dir=.*a-file/run: cannot write the run's outputs there \(Not a directory\)",
    ),
}


class Case:
    def __init__(self, tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.tree_archive, self.image_tree, self.tiny_overrides = tree_archive, image_tree, tiny_overrides

    def checkpoint(self) -> Path:
        return trained_checkpoint([*self.tiny_overrides, f"output_dir={self.tmp_path / 'trained'}"], self.tmp_path)

    def checkpoint_of_processes(self, processes: int) -> Path:
        """A checkpoint as a run of `processes` processes writes it (its batches' state says how many)."""
        checkpoint = torch.load(self.checkpoint(), weights_only=True)
        (batches,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        batches["world_size"] = processes
        torch.save(checkpoint, self.tmp_path / "two-processes.ckpt")
        return self.tmp_path / "two-processes.ckpt"


def documented_inputs() -> list[str]:
    rows = [line.split("|")[1].strip() for line in TABLE.read_text().splitlines() if line.startswith("| ")]
    return [row for row in rows if row not in ("input", "---")]


def test_every_row_of_the_table_has_a_test():
    tested = set(IN_PROCESS) | set(COMMAND_LINE)
    tested |= {
        "`trainer.accelerator=gpu` on a machine without a GPU",
        "`trainer.accelerator=mps` on a machine without an Apple GPU",
    }
    assert sorted(documented_inputs()) == sorted(tested)


@pytest.mark.parametrize("row", list(IN_PROCESS))
def test_bad_input_gets_one_clear_error(row, tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides):
    make_overrides, message = IN_PROCESS[row]
    case = Case(tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides)
    overrides = [*tiny_overrides, *make_overrides(case)]  # later overrides win
    with pytest.raises(UserError, match=message) as error:
        train(compose_config("train", overrides))
    assert "\n" not in str(error.value)  # one line
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("row", list(COMMAND_LINE))
def test_bad_command_line_gets_one_clear_error(row, tmp_path):
    args, message = COMMAND_LINE[row]
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    (tmp_path / "a-file").write_text("")
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert re.search(message, done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("outputs/runs/*/metrics.json"))
