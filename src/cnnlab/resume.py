"""What makes a run trustworthy: exact resume, signals, a non-finite loss, checkpoints that load safely.

Lightning restores weights, optimizer, scheduler and loop progress from a checkpoint, and the batch iterator's
position through its state_dict (cnnlab.data.TensorBatches). What it leaves to us (Lightning 2.6):
- the random number generators: `RngState` saves torch's (and CUDA's), numpy's and Python's in the checkpoint
  and puts them back when training starts, so a resumed run draws the same shuffles and dropout masks as one
  that was never stopped;
- signals: `RunGuard` turns Ctrl-C (SIGINT) and SIGTERM into a checkpoint at the end of the current step and an
  `Interrupted` exception, which the entry point turns into one line and exit status 128 + signal (130, 143);
- a NaN/inf loss: `RunGuard` stops before the optimizer step, with last.ckpt holding the last finite weights;
- SLURM's pre-emption and time limit: `RunGuard` also takes SIGUSR2 (submitit's), checkpoints, hands over to
  submitit's handler, which requeues the job; the job started again resumes from it (`requeued_checkpoint`);
- `ckpt_path=last`: `find_checkpoint` takes the newest last.ckpt under the outputs folder;
- a resumed run continues in the run dir that holds its checkpoint (`run_dir_of`, used by config.run_dir, Hydra's
  run-dir resolver), so its ModelCheckpoint keeps its record of the best checkpoint and TensorBoard shows one run.
- checkpoints written atomically: `AtomicCheckpointIO` writes beside the final name and renames (Lightning
  writes into the system's temp folder and moves the file, a copy when that is another file system).
"""

import logging
import math
import os
import random
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from cnnlab import UserError, write_atomically

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class Interrupted(BaseException):
    """A signal stopped the run. A BaseException, as KeyboardInterrupt is: no `except Exception` swallows it."""

    def __init__(self, signum: int, checkpoint: Path | None, where: str = ""):
        super().__init__(f"{signal.Signals(signum).name} {where}".strip())
        self.signum, self.checkpoint, self.where = signum, checkpoint, where

    @property
    def exit_status(self) -> int:  # the shell's convention for a process ended by a signal
        return 128 + self.signum

    def report(self) -> str:
        """One line: what stopped the run, and the command that resumes it."""
        stopped = f"stopped by {signal.Signals(self.signum).name} {self.where}".strip()
        if self.checkpoint is None:
            return f"{stopped}; no checkpoint yet, nothing to resume: run the same command again"
        return f"{stopped}; resume with: {resume_command(self.checkpoint)}"


# ------------------------------------------------------------------------------------------ checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint is written to a temp file beside its name, then renamed over it: a run killed while saving
    leaves the previous last.ckpt whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: torch.save(checkpoint, file))


def requeued_checkpoint(output_dir: str | Path) -> Path | None:
    """The job's own last.ckpt when submitit (hydra/launcher=slurm or submitit_local) starts a job again in the
    folder of one that was stopped, as it does after pre-emption or the time limit; None otherwise. Hydra gives
    every job of a sweep a folder of its own, so only a requeued job finds a last.ckpt in it."""
    path = Path(output_dir) / "checkpoints" / LAST
    return path if os.environ.get("SUBMITIT_EXECUTOR") and path.is_file() else None


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


def check_shapes(module: LightningModule, checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint of another network before Lightning loads it (and fails with a long traceback)."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
    differ = [
        f"{name} {saved[name]} vs {expected[name]} here"
        for name in expected
        if saved.get(name, expected[name]) != expected[name]
    ]
    missing = sorted(set(expected) - set(saved))
    if differ or missing:
        detail = "; ".join(differ[:3]) or f"missing {missing[:3]}"
        raise UserError(
            f"ckpt_path={path} was trained with another model ({detail}): pass the model.* overrides it was "
            f"trained with"
        )


def best_checkpoint(trainer: Trainer, resumed: dict | None) -> str:
    """The best checkpoint on the monitored metric, "" if none was saved.

    A run resumed in another folder (its checkpoint was kept outside a run dir) starts its ModelCheckpoint's
    ranking afresh: Lightning keeps the record only when the folder is the same. The best checkpoint that the
    resumed-from checkpoint names still counts then, if its file is there and its score is at least as good."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint):
        return ""
    best = callback.best_model_path
    earlier = (resumed or {}).get("callbacks", {}).get(callback.state_key, {})
    path, score = earlier.get("best_model_path"), earlier.get("best_model_score")
    if earlier.get("dirpath") == callback.dirpath or score is None or not path or not Path(path).is_file():
        return best
    current = callback.best_model_score
    improved = current is not None and bool(current > score if callback.mode == "max" else current < score)
    if not improved:
        log.info(f"the best checkpoint is still {path}, from before the resume ({callback.monitor}={float(score):.4f})")
    return best if improved else path


def resume_command(checkpoint: Path) -> str:
    """The command line that resumes this run: the same script and overrides, ckpt_path pointing at `checkpoint`."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    args = ["python", sys.argv[0], *kept, f"ckpt_path={checkpoint}"]
    return " ".join(shlex.quote(arg) for arg in args)


# ------------------------------------------------------------------------------------------ callbacks


class RngState(Callback):
    """Saves the random generators' states in each checkpoint and restores them when training starts.

    Restored at on_train_start, after everything Lightning does while setting up, right before the first batch
    draws its shuffle or dropout mask. Stored as tensors and plain numbers (numpy's array as a tensor), so the
    checkpoint still loads with torch.load(weights_only=True).
    """

    def __init__(self):
        self.to_restore: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.to_restore is None:
            return
        state, self.to_restore = self.to_restore, None
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunGuard(Callback):
    """Stops a run cleanly on a signal or a non-finite loss.

    Signals (by name, e.g. SIGINT, SIGTERM): while training, the first one asks to stop at the end of the current
    step; then last.ckpt is written (a mid-epoch checkpoint that resumes at the next batch) and `Interrupted` is
    raised. Before training starts, while testing, or on a second signal, `Interrupted` is raised at once.
    train() installs the handlers with `handling_signals()` for the whole run; Lightning installs its own SIGTERM
    handler when fit starts (it would stop only at the epoch's end, with exit status 0), so on_train_start puts
    ours back.

    A handler that was there before ours is chained, not replaced: it runs once the checkpoint is written. On
    SLURM that is submitit's (hydra/launcher=slurm): its SIGUSR2 comes before the time limit or on pre-emption,
    and its handler requeues the job; the requeued job resumes from this checkpoint (`requeued_checkpoint`).
    With several processes (DDP) the stop is agreed after every step, so that all of them write the one
    checkpoint together (a collective call) even when the signal reached only some of them.
    """

    def __init__(self, signals: list[str], stop_on_nonfinite_loss: bool):
        try:
            self.signals = [signal.Signals[name] for name in signals]
        except KeyError as err:
            raise UserError(f"callbacks.run_guard.signals: {err} is not a signal name (SIGINT, SIGTERM, ...)") from None
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.requested: int | None = None  # the signal that asked to stop
        self.training = False
        self.trainer: Trainer | None = None
        self.chained: dict[int, Callable] = {}  # signal → the Python handler installed before ours (submitit's)

    @contextmanager
    def handling_signals(self):
        previous = {signum: signal.signal(signum, self.handle) for signum in self.signals}
        # Python's own SIGINT handler (KeyboardInterrupt) is not chained: Ctrl-C is ours to report.
        self.chained = {
            signum: handler
            for signum, handler in previous.items()
            if callable(handler) and handler is not signal.default_int_handler
        }
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.training and self.requested is None:
            self.requested = signum
            log.warning(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (again: at once)")
            return
        if self.training:
            where = "at once (a second signal)"
        else:
            where = "before training started" if self.trainer is None else "while testing"
        checkpoint = last_checkpoint(self.trainer)
        self.hand_over(signum)
        raise Interrupted(signum, checkpoint, where)

    def hand_over(self, signum: int) -> None:
        """Run the handler that was there before ours, if any: submitit's requeues the job and exits (on the first
        process; on the others it returns)."""
        handler = self.chained.get(signum)
        if handler is not None:
            log.info(f"{signal.Signals(signum).name}: handing over to {getattr(handler, '__qualname__', handler)}")
            handler(signum, None)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainer, self.training = trainer, True
        for signum in self.signals:  # replaces Lightning's SIGTERM handler (see the class docstring)
            signal.signal(signum, self.handle)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.training = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # one all-reduce of one number per step: every process stops at the same step
            asked = torch.tensor(requested or 0, device=pl_module.device)
            requested = int(trainer.strategy.reduce(asked, reduce_op=torch.distributed.ReduceOp.MAX)) or None
        if requested is None:
            return
        path = checkpoint_file(trainer)
        trainer.save_checkpoint(path)  # collective: every process calls it, the first one writes
        try:
            self.hand_over(requested)  # on SLURM: the job is requeued, the first process exits here
        finally:
            trainer.strategy.barrier("RunGuard")  # the other processes wait for that before they exit
        raise Interrupted(requested, path, f"at epoch {trainer.current_epoch}, step {trainer.global_step}")

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self.stop_on_nonfinite_loss or math.isfinite(loss.item()):  # a scalar: .item() is the cheap check
            return
        path = checkpoint_file(trainer)
        trainer.save_checkpoint(path)  # the weights are still the last finite ones: no step was taken with them
        lrs = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
        raise UserError(
            f"the training loss is {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(learning rate {', '.join(f'{lr:g}' for lr in lrs)}): training diverged, most likely from too high a "
            f"learning rate; try a smaller optimizer.lr. {path} holds the weights before this step"
        )


def checkpoint_file(trainer: Trainer) -> Path:
    """Where a stop writes its checkpoint: the ModelCheckpoint's last.ckpt, which `ckpt_path=last` finds."""
    callback = trainer.checkpoint_callback
    folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
    return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / LAST


def last_checkpoint(trainer: Trainer | None) -> Path | None:
    if trainer is None:
        return None
    path = checkpoint_file(trainer)
    return path if path.is_file() else None
