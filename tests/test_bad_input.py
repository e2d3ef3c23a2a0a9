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
from tests.conftest import ROOT, compose_config, tiny_run

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


def png_cut_after_its_header() -> bytes:
    """A PNG whose header (and so its size) reads, and whose pixels end early: it fails when decoded and resized."""
    import io

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    return png.getvalue()[:60]


def trained_checkpoint(tiny_overrides, tmp_path) -> Path:
    return Path(train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1"]))["best_checkpoint"])


def without_package(monkeypatch, name: str) -> None:
    """As on a machine where `name` is not installed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *a: None if module == name else find_spec(module, *a)
    )


def server_asking_who_calls() -> str:
    """A local HTTP server that answers every request 401, as MLflow's basic-auth app does without credentials."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


def offline(monkeypatch):
    import torchvision.datasets.cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)


# input (as the table's first column) → the overrides that make it; the line it gets is the table's
IN_PROCESS = {
    "`data.root` does not exist (with `data.download=false`)": lambda t: [
        f"data.root={t.tmp_path / 'nothing'}",
        "data.download=false",
    ],
    "`data.root` is an empty folder (with `data.download=false`)": lambda t: [
        f"data.root={(t.tmp_path / 'empty').mkdir() or t.tmp_path / 'empty'}",
        "data.download=false",
    ],
    "`data.root` has no CIFAR-10 and cannot be downloaded (offline)": lambda t: (
        offline(t.monkeypatch) or [f"data.root={t.tmp_path / 'new'}", "data.download=true"]
    ),
    "`data.root` is a file that is not an archive": lambda t: [
        f"data.root={write(t.tmp_path / 'notes.txt', b'hello')}"
    ],
    "`data.root` is a truncated archive": lambda t: [
        f"data.root={write(t.tmp_path / 'cut.tar.gz', t.tree_archive.read_bytes()[:20000])}"
    ],
    "`data.root` is a corrupt archive": lambda t: [
        f"data.root={write(t.tmp_path / 'noise.tar.gz', bytes(range(256)) * 64)}"
    ],
    "an image that cannot be decoded": lambda t: tree_with(
        t.image_tree, t.tmp_path, lambda tree: write(tree / "train/cat/0003.png", b"not a png")
    ),
    "an image that cannot be resized (its pixels cut off after the header)": lambda t: tree_with(
        t.image_tree, t.tmp_path, lambda tree: write(tree / "train/dog/0001.png", png_cut_after_its_header())
    ),
    "an image tree with one class": lambda t: tree_with(
        t.image_tree, t.tmp_path, lambda tree: [shutil.rmtree(p) for p in (tree / "train").iterdir() if p.name != "cat"]
    ),
    "an empty class folder": lambda t: tree_with(t.image_tree, t.tmp_path, lambda tree: (tree / "train/zebra").mkdir()),
    "`data=folder` without `data.root`": lambda t: ["data=folder", "data.root=null"],
    "`data.channels` that `model.in_channels` contradicts (`data.channels=L model.in_channels=3`)": lambda t: [
        "data.channels=L",
        "model.in_channels=3",
    ],
    "`model.image_size` that `data.image_size` contradicts (`model.image_size=28`)": lambda t: ["model.image_size=28"],
    "`data.num_classes` that the data contradicts (`data.num_classes=7`)": lambda t: ["data.num_classes=7"],
    "mirrored test images for digits (`data=mnist data.tta=true`)": lambda t: ["data=mnist", "data.tta=true"],
    "a teacher without its checkpoints (`teacher=checkpoints`)": lambda t: ["teacher=checkpoints"],
    "a teacher's checkpoint that is not there": lambda t: ["teacher=checkpoints", "teacher.checkpoints=[nowhere.ckpt]"],
    "a teacher's checkpoint that is not a checkpoint": lambda t: [
        "teacher=checkpoints",
        f"teacher.checkpoints=[{write(t.tmp_path / 'notes.ckpt', b'hello')}]",
    ],
    "a teacher's run folder without checkpoints": lambda t: [
        "teacher=checkpoints",
        f"teacher.checkpoints=[{(t.tmp_path / 'empty').mkdir() or t.tmp_path / 'empty'}]",
    ],
    "an expanded conv2 of kernel 1 (`model.expand=64 model.conv2_kernel=1`)": lambda t: [
        "model.expand=64",
        "model.conv2_kernel=1",
    ],
    "images too small for the slides' layers (`data=mnist data.image_size=8`)": lambda t: [
        "data=mnist",
        "data.image_size=8",
    ],
    "a class in `test/` that `train/` does not have": lambda t: tree_with(
        t.image_tree,
        t.tmp_path,
        lambda tree: write(tree / "test/zebra/0.png", (tree / "test/cat/0000.png").read_bytes()),
    ),
    "more classes in the data than `model.num_classes`": lambda t: ["model.num_classes=5"],
    "`optimizer.lr` < 0": lambda t: ["optimizer.lr=-0.1"],
    "`data.batch_size` < 1": lambda t: ["data.batch_size=0"],
    "`data.val_size` < 0": lambda t: ["data.val_size=-1"],
    "early stopping without validation (`callbacks=early_stopping data.val_size=0`)": lambda t: [
        "callbacks=early_stopping",
        "data.val_size=0",
    ],
    "`data.val_size` ≥ the training images": lambda t: ["data.val_size=80"],
    "`model.dropout` outside [0, 1)": lambda t: ["model.dropout=1.0"],
    "`loss.label_smoothing` outside [0, 1)": lambda t: ["loss.label_smoothing=1.0"],
    "shapes that do not fit (`model.conv2_kernel=20`)": lambda t: ["model.conv2_kernel=20"],
    "an unknown `trainer.precision`": lambda t: ["trainer.precision=fp8"],
    "an unknown `trainer.accelerator`": lambda t: ["trainer.accelerator=tpu9"],
    "an unknown key added under `trainer` (`+trainer.foo=1`)": lambda t: ["+trainer.foo=1"],
    "`seed` that is not an integer": lambda t: ["seed=abc"],
    "`seed` outside 0 … 2³² − 1": lambda t: ["seed=-1"],
    "`float32_matmul_precision` not one of highest, high, medium": lambda t: ["float32_matmul_precision=low"],
    "`callbacks.run_guard.every_n_steps` (or `scaler_patience`) < 1": lambda t: ["callbacks.run_guard.every_n_steps=0"],
    "`keep_freed_memory` that is not a boolean": lambda t: ["keep_freed_memory=maybe"],
    "`ckpt_path` that does not exist": lambda t: [f"ckpt_path={t.tmp_path / 'nope.ckpt'}"],
    "`ckpt_path` that is not a checkpoint": lambda t: [f"ckpt_path={write(t.tmp_path / 'notes.ckpt', b'hello')}"],
    "`ckpt_path` that is truncated": lambda t: [
        f"ckpt_path={write(t.tmp_path / 'cut.ckpt', t.checkpoint().read_bytes()[:50000])}"
    ],
    "`ckpt_path` of a model with other shapes": lambda t: [f"ckpt_path={t.checkpoint()}", "model.conv1_channels=16"],
    "`ckpt_path` of a run on another number of processes": lambda t: [f"ckpt_path={t.checkpoint_of_processes(2)}"],
    "`ckpt_path=last` with no run to resume": lambda t: ["ckpt_path=last", f"outputs_root={t.tmp_path / 'no-runs'}"],
    "an output folder that cannot be written": lambda t: [f"output_dir={write(t.tmp_path / 'a-file', b'') / 'run'}"],
    "a learning rate that makes the loss diverge": lambda t: ["optimizer=sgd_steplr", "optimizer.lr=1e12"],
    "an MLflow store that is not a URL (`logger=mlflow logger.mlflow.tracking_uri=mlruns`)": lambda t: [
        "logger=mlflow",
        "logger.mlflow.tracking_uri=mlruns",
    ],
    "an MLflow server that does not answer (`logger=mlflow logger.mlflow.tracking_uri=http://127.0.0.1:9`)": lambda t: [
        "logger=mlflow",
        "logger.mlflow.tracking_uri=http://127.0.0.1:9",
    ],
    "`logger=mlflow` without the track extra": lambda t: without_package(t.monkeypatch, "mlflow") or ["logger=mlflow"],
    "an MLflow server that asks for credentials the environment does not give": lambda t: (
        t.monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        or ["logger=mlflow", f"logger.mlflow.tracking_uri={server_asking_who_calls()}"]
    ),
    "credentials in the MLflow store's URL (`logger.mlflow.tracking_uri=http://me:secret@host:5000`)": lambda t: [
        "logger=mlflow",
        "logger.mlflow.tracking_uri=http://me:secret@host:5000",
    ],
    "W&B online without a login (`logger=wandb logger.wandb.offline=false`)": lambda t: (
        t.monkeypatch.delenv("WANDB_API_KEY", raising=False)
        or t.monkeypatch.setenv("HOME", str(t.tmp_path))
        or ["logger=wandb", "logger.wandb.offline=false"]
    ),
    "a one-cycle schedule over too few steps (`optimizer=sgd_onecycle trainer.max_steps=5`)": lambda t: [
        "optimizer=sgd_onecycle",
        "trainer.max_steps=5",
    ],
}
IN_PROCESS.update(
    {
        "an integer key below its range (`model.stride=0`)": lambda t: ["model.stride=0"],
        "a value of the wrong type (`data.batch_size=many`)": lambda t: ["data.batch_size=many"],
        "a list as long as the channels, shorter (`data.mean=[0.5,0.5]`)": lambda t: ["data.mean=[0.5,0.5]"],
        "`optimizer.momentum` outside [0, 1) (Option 2)": lambda t: ["optimizer=sgd_steplr", "optimizer.momentum=-1"],
        "`scheduler.step_size=0` (Option 2)": lambda t: ["optimizer=sgd_steplr", "scheduler.step_size=0"],
        "`trainer.max_epochs` below 1 (`trainer.max_epochs=-5`)": lambda t: ["trainer.max_epochs=-5"],
        "a run that would never end (`trainer.max_epochs=-1`)": lambda t: ["trainer.max_epochs=-1"],
        "`data.refine_epochs` in a run without crops (`data.refine_epochs=2`)": lambda t: ["data.refine_epochs=2"],
        "`data.refine_epochs` not fewer than the run's epochs": lambda t: [
            "data.augment=true",
            "trainer.max_epochs=3",
            "data.refine_epochs=3",
        ],
        "a key made wrong by the key it follows (`optimizer=sgd_cosine trainer.max_epochs=-1`)": lambda t: [
            "optimizer=sgd_cosine",
            "trainer.max_epochs=-1",
            "trainer.max_steps=10",
        ],
        "an unknown key added under `optimizer` (`+optimizer.foo=1`)": lambda t: ["+optimizer.foo=1"],
        "a setting torch's optimizer refuses (`+optimizer.betas=[0.9,1.5]`)": lambda t: ["+optimizer.betas=[0.9,1.5]"],
        "a `_target_` that cannot be imported": lambda t: ["loss._target_=torch.nn.NoSuchLoss"],
        "a network too large for this machine's memory": lambda t: ["model.conv1_channels=100000000"],
        "a batch too large for this machine's memory": lambda t: ["data.batch_size=100000000"],
        "more processes than this machine has cores (`trainer=ddp trainer.devices=1000`)": lambda t: [
            "trainer=ddp",
            "trainer.devices=1000",
        ],
        "`trainer.num_nodes` > 1 without torchrun or SLURM": lambda t: ["trainer.num_nodes=2"],
        "a resume with another optimizer than the checkpoint's": lambda t: [
            f"ckpt_path={t.checkpoint()}",
            "optimizer=sgd_steplr",
        ],
    }
)
if not torch.cuda.is_available():
    IN_PROCESS["`trainer.accelerator=gpu` on a machine without a GPU"] = lambda t: ["trainer.accelerator=gpu"]
if not torch.backends.mps.is_available():
    IN_PROCESS["`trainer.accelerator=mps` on a machine without an Apple GPU"] = lambda t: ["trainer.accelerator=mps"]

# Rows that Hydra answers before our code runs, or that only a command line can make: their arguments.
COMMAND_LINE = {
    "an unknown key under `trainer` (`trainer.foo=1`)": ["trainer.foo=1"],
    "an unknown key at the top level (`epochs=3`)": ["epochs=3"],
    "an unknown option of a group (`optimizer=adamw`)": ["optimizer=adamw"],
    "a data set cnnlab does not know (`data=imagenet`)": ["data=imagenet"],
    "a number as the precision group's option (`precision=32`)": ["precision=32"],
    "a sweep's launcher plugin that is not installed (the scale extra)": [
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher._target_=hydra_plugins.not_installed.Launcher",
        "seed=1,2",
    ],
    "a run folder that cannot be written (`hydra.run.dir=...`)": ["hydra.run.dir={tmp}/a-file/run"],
    "a search's pruner cnnlab does not have (`hydra.sweeper.pruner=fast`)": [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.pruner=fast",
    ],
    "a search that would maximise a loss (`hydra.sweeper.metric=test/loss`)": [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.metric=test/loss",
    ],
    "a pruned search of a metric known only at the end (`hydra.sweeper.metric=test/acc`)": [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.pruner=median",
        "hydra.sweeper.metric=test/acc",
    ],
    "a search of a validation metric without validation (`hparams_search=optuna data.val_size=0`)": [
        "-m",
        "hparams_search=optuna",
        "data.val_size=0",
    ],
}


TRAINED: dict[str, Path] = {}  # the checkpoint the rows share


class Case:
    def __init__(self, tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides, tmp_path_factory):
        self.tmp_path, self.monkeypatch, self.tmp_path_factory = tmp_path, monkeypatch, tmp_path_factory
        self.tree_archive, self.image_tree, self.tiny_overrides = tree_archive, image_tree, tiny_overrides

    def checkpoint(self) -> Path:
        """A trained run's best checkpoint, trained once for all the rows that need one (they only read it)."""
        if "checkpoint" not in TRAINED:
            folder = self.tmp_path_factory.mktemp("trained")
            run = [*tiny_run(self.tree_archive, folder), f"output_dir={folder / 'trained'}"]
            TRAINED["checkpoint"] = trained_checkpoint(run, folder)
        return TRAINED["checkpoint"]

    def checkpoint_of_processes(self, processes: int) -> Path:
        """A checkpoint as a run of `processes` processes writes it (its batches' state says how many)."""
        checkpoint = torch.load(self.checkpoint(), weights_only=True)
        (batches,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        batches["world_size"] = processes
        torch.save(checkpoint, self.tmp_path / "two-processes.ckpt")
        return self.tmp_path / "two-processes.ckpt"


def table_rows() -> dict[str, str]:
    """docs/bad-input.md: input (the first column) → the line it gets (the backticked `error: …` of the second)."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| input", "| ---")):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        message = next((span for span in re.findall(r"`([^`]*)`", cells[1]) if span.startswith("error: ")), None)
        assert message, f"the row {cells[0]!r} gives no `error: …` line"
        rows[cells[0]] = message
    return rows


def as_pattern(message: str) -> str:
    """A table's message as a regular expression: `<…>` (a path, a value) and `…` (the rest) stand for any text."""
    parts = re.split(r"(<[^<>]*>|…)", message)
    return "".join(".*" if part == "…" or (part.startswith("<") and part.endswith(">")) else re.escape(part)
                   for part in parts)  # fmt: skip


ELSEWHERE = {  # rows tested by another test, against the same line of the table
    "`trainer.accelerator=gpu` on a machine without a GPU": "here, where the machine has none",
    "`trainer.accelerator=mps` on a machine without an Apple GPU": "here, where the machine has none",
    "a disk that fills up while a checkpoint is written": "tests/test_resume.py (a small file system it mounts)",
    "a resume that leaves out the training-time form its run trained in (`model.batchnorm=false`)": "test_levers.py",
    "`src/predict.py device=cuda` on a machine without a GPU": "test_predict_device_cuda_without_a_gpu, below",
}


def test_every_row_of_the_table_has_a_test():
    assert sorted(table_rows()) == sorted(set(IN_PROCESS) | set(COMMAND_LINE) | set(ELSEWHERE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_predict_device_cuda_without_a_gpu():
    from cnnlab.checks import check

    with pytest.raises(UserError) as error:
        check(compose_config("predict", ["device=cuda"]))
    row = "`src/predict.py device=cuda` on a machine without a GPU"
    assert re.fullmatch(as_pattern(table_rows()[row]), f"error: {error.value}")


@pytest.mark.parametrize("row", list(IN_PROCESS))
def test_bad_input_gets_the_tables_line(
    row, tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides, tmp_path_factory
):
    case = Case(tmp_path, monkeypatch, tree_archive, image_tree, tiny_overrides, tmp_path_factory)
    overrides = [*tiny_overrides, *IN_PROCESS[row](case)]  # later overrides win
    with pytest.raises(UserError) as error:
        train(compose_config("train", overrides))
    line = f"error: {error.value}"
    assert re.fullmatch(as_pattern(table_rows()[row]), line), f"the table says {table_rows()[row]!r}, not {line!r}"
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("row", list(COMMAND_LINE))
def test_bad_command_line_gets_the_tables_line(row, tmp_path):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in COMMAND_LINE[row]]
    (tmp_path / "a-file").write_text("")
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]  # one line, no traceback
    assert re.fullmatch(as_pattern(table_rows()[row]), lines[0]), f"{table_rows()[row]!r} vs {lines[0]!r}"
    assert not list(tmp_path.glob("outputs/runs/*/metrics.json"))
