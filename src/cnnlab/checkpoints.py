"""Checkpoint files: finding one (`last`, a run's best, a requeued job's own) and loading it safely.

A checkpoint is loaded with torch.load(weights_only=True): plain containers and tensors, no code; it needs
neither Lightning nor the network's class to be read. Training, eval, predict, export and visualize all find
and load checkpoints through this room; only training imports Lightning.
"""

import logging
import os
from pathlib import Path

import torch

from cnnlab import UserError

log = logging.getLogger(__name__)


LAST = "last.ckpt"


JOB_KEY = "submitit_job_id"  # in a checkpoint: the submitit job that wrote it


def submitit_job_id() -> str | None:
    """The id of the submitit job this process runs in (SLURM's job id, an array's job_task; the local controller's
    process id with submitit_local), which stays the same when submitit requeues the job; None outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return str(submitit.JobEnvironment().job_id)


def requeued_checkpoint(output_dir: str | Path) -> tuple[Path, dict] | None:
    """The job's own last.ckpt, loaded, when submitit (hydra/launcher=slurm or submitit_local) has started this job
    again after pre-emption or the time limit: the checkpoint was written by this same submitit job (RunGuard
    records its id). None otherwise: a plain run, a first start, or a new sweep into the folder of a finished one."""
    job = submitit_job_id()
    path = Path(output_dir) / "checkpoints" / LAST
    if job is None or not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    return (path, checkpoint) if checkpoint.get(JOB_KEY) == job else None


def find_checkpoint(ckpt_path: str, outputs_root: str | Path) -> Path:
    """`ckpt_path` as a file: `last` is the newest last.ckpt of any run or multirun job under `outputs_root`."""
    if ckpt_path != "last":
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return path
    candidates = list(Path(outputs_root).glob(f"**/checkpoints/{LAST}"))
    if not candidates:
        raise UserError(
            f"ckpt_path=last: no {LAST} under {outputs_root}/ (runs and multiruns): no run to take it from. "
            f"Give a checkpoint file instead: ckpt_path=<run dir>/checkpoints/{LAST}"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime_ns)


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir that holds `checkpoint` (<run dir>/checkpoints/<file>, with Hydra's .hydra/ beside it)."""
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and (folder.parent / ".hydra").is_dir():
        return folder.parent
    return None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint we wrote, loaded safely (weights_only: plain containers and tensors, no code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a truncated zip, a foreign pickle, a text file each in its own way
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(
            f"ckpt_path={path}: not a checkpoint that loads safely (truncated, damaged or not made by cnnlab): {reason}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"ckpt_path={path}: not a Lightning checkpoint (it has no state_dict)")
    return checkpoint
