"""What made a run: the code (git commit, a dirty tree), the command line, the versions, the machine.

`run_metadata()` is plain data for metrics.json and the loggers (TensorBoard shows it as a text card, the CSV
logger keeps it in its hparams.yaml, MLflow as tags, W&B in its config): enough to tell, months later, which code
on which machine made a number. No environment variable is recorded (they may hold secrets); a machine without
git, or code outside a git checkout, records the commit as null.
"""

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

from cnnlab.tracking import mlflow_tags

CHECKOUT = Path(__file__).resolve().parents[2]  # src/cnnlab/provenance.py → the repository of this code
PACKAGES = ("cnnlab", "torch", "lightning", "hydra-core", "omegaconf", "torchvision", "torchmetrics")


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str:
    """The processor's name as the kernel gives it (/proc/cpuinfo), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_metadata() -> dict:
    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    cuda = torch.cuda.is_available()
    return {
        "git_commit": commit,
        "git_dirty": None if changes is None else bool(changes),  # tracked files changed since the commit
        "command": " ".join(["python", *sys.argv]),
        "python": platform.python_version(),
        **{package: version(package) for package in PACKAGES},
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
    }


def log_metadata(loggers: list, run: dict) -> None:
    """TensorBoard: a text card `run/metadata` (a table); CSV: `run` in its hparams.yaml; MLflow: tags `run/…` (they
    may change when the run is resumed, params may not); others (W&B): their config."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            table = "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in run.items())
            logger.experiment.add_text("run/metadata", table, 0)
        elif isinstance(logger, CSVLogger):
            logger.log_hyperparams({"run": run})
        elif isinstance(logger, MLFlowLogger):
            mlflow_tags(logger, {f"run/{key}": value for key, value in run.items()})
        else:
            logger.log_hyperparams({f"run/{key}": value for key, value in run.items()})
