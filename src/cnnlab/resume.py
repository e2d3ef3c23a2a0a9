"""What makes a run trustworthy: exact resume, signals, a non-finite loss, checkpoints that load safely.

Lightning restores weights, optimizer, scheduler and loop progress from a checkpoint, and the batch iterator's
position through its state_dict (cnnlab.data.TensorBatches). What it leaves to us (Lightning 2.6):
- the random number generators: `RngState` saves every process's (torch's, its CUDA device's, numpy's,
  Python's) in the checkpoint and gives each process its own back when training starts, so a resumed run draws
  the same dropout masks and augmentations as one that was never stopped (the epochs' orders need no state:
  they follow from (seed, epoch));
- signals: `RunGuard` turns Ctrl-C (SIGINT) and SIGTERM into a checkpoint at the end of the current step and an
  `Interrupted` exception, which the entry point turns into one line and exit status 128 + signal (130, 143);
- a NaN/inf loss: `RunGuard` stops before the optimizer step, with last.ckpt holding the last finite weights;
  under DDP both decisions are taken by all processes together (one all-reduce a step);
- SLURM's pre-emption and time limit: `RunGuard` also takes SIGUSR2 (submitit's), checkpoints, hands over to
  submitit's handler, which requeues the job; the job started again resumes from it (`requeued_checkpoint`, only
  from a checkpoint that the same submitit job wrote);
- a checkpoint of another network or of another number of processes is refused in one line (`check_shapes`,
  `check_processes`);
- `ckpt_path=last`: `find_checkpoint` takes the newest last.ckpt under the outputs folder;
- a resumed run continues in the run dir that holds its checkpoint (`run_dir_of`, used by config.run_dir, Hydra's
  run-dir resolver), so its ModelCheckpoint keeps its record of the best checkpoint and TensorBoard shows one run.
- checkpoints written atomically: `AtomicCheckpointIO` writes beside the final name and renames (Lightning
  writes into the system's temp folder and moves the file, a copy when that is another file system).
"""

import logging
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
from cnnlab.module import per_step

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
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda file: torch.save(checkpoint, file))
        except (OSError, UserError) as err:  # a full disk, a quota: say which checkpoint is still whole
            complete = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
            kept = f"the last complete checkpoint is {complete[-1]}" if complete else "no checkpoint was written yet"
            raise UserError(f"{err}; {kept}") from err


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


JOB_KEY = "submitit_job_id"  # in a checkpoint: the submitit job that wrote it


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


def check_processes(trainer: Trainer, checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint of a run on another number of processes: Lightning counts an epoch's steps per process,
    so the epoch it stopped in (even at its end: last.ckpt is written at validation's end, inside the epoch) cannot
    be continued on another number."""
    loaders = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or [{}]
    saved, here = loaders[0].get("world_size", 1), trainer.num_devices * trainer.num_nodes
    if saved != here:
        raise UserError(
            f"ckpt_path={path} was written by a run of {saved} process(es), this one has {here} (trainer.devices × "
            f"trainer.num_nodes): resume it with the same number; Lightning counts an epoch's steps per process, "
            f"so the epoch it stopped in cannot go on with another number"
        )


def check_same_training(module: LightningModule, checkpoint: dict, path: Path) -> None:
    """Refuse an override that contradicts the checkpoint before Lightning loads its states into the wrong objects
    (another optimizer: torch's KeyError 'step'; a per-step schedule laid out over another number of steps)."""
    recorded = (checkpoint.get("cnnlab") or {}).get("run")
    run = module.hparams.get("run")
    if not recorded or not run:
        return
    differ = [key for key in ("optimizer", "scheduler") if recorded.get(key) != run.get(key)]
    if module.scheduler is not None and per_step(module.scheduler):
        differ += [f"trainer.{key}" for key in ("max_epochs", "max_steps") if recorded.get(key) != run.get(key)]
    if differ:
        was = ", ".join(f"{key}={recorded.get(key.removeprefix('trainer.'))}" for key in differ)
        now = ", ".join(f"{key}={run.get(key.removeprefix('trainer.'))}" for key in differ)
        raise UserError(
            f"ckpt_path={path} was trained with {was}; this command asks for {now}: a resume goes on with its run's "
            f"own {' and '.join(differ)}, so leave out the overrides that change them (a per-step schedule cannot "
            f"be stretched over another run length)"
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
    """Saves every process's random generators in each checkpoint and gives each process its own back when
    training starts.

    The generators draw the dropout masks and the augmentations, which differ between processes as soon as one
    process draws a number the others do not (a callback on the first process only, say). A checkpoint is written
    by all processes together: each hands its states (torch's, its CUDA device's, numpy's, Python's) to the first,
    which saves them all; on resume process r restores state r (train() refuses a checkpoint of another number of
    processes: `check_processes`).

    Restored at on_train_start, after everything Lightning does while setting up, right before the first batch
    draws. Stored as tensors and plain numbers (numpy's array as a tensor), so the checkpoint still loads with
    torch.load(weights_only=True).
    """

    def __init__(self):
        self.to_restore: dict | None = None
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        own = self.own_state()
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return {"processes": [own]}
        processes = [None] * trainer.world_size  # a collective call: every process is saving this checkpoint
        torch.distributed.all_gather_object(processes, own)
        return {"processes": processes}

    def own_state(self) -> dict:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        }  # fmt: skip
        device = self.cuda_device()
        if device is not None:  # this process's own GPU only: a resume on a machine with fewer GPUs still works
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def cuda_device(self) -> torch.device | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module.device if module is not None and module.device.type == "cuda" else None

    def load_state_dict(self, state_dict: dict) -> None:
        self.to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.to_restore is None:
            return
        saved, self.to_restore = self.to_restore, None
        processes = saved.get("processes", [saved])  # an earlier checkpoint holds one process's state
        state = processes[trainer.global_rank % len(processes)]
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        if "cuda" in state and pl_module.device.type == "cuda":
            cuda = state["cuda"]  # older checkpoints: a list, one state per GPU of the machine
            if isinstance(cuda, list):
                cuda = cuda[pl_module.device.index] if pl_module.device.index < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, pl_module.device)


class Diverged(UserError):
    """The training loss is not finite. Decided by all processes together, so the first one reports it alone."""


NONFINITE = {1: "nan", 2: "inf", 3: "-inf"}  # the codes the processes vote with (0: finite)


def nonfinite_code(losses: torch.Tensor) -> torch.Tensor:
    """The worst of `losses` as a code of NONFINITE, computed where the losses are (no host sync on a GPU)."""
    return (torch.isnan(losses) * 1 + torch.isposinf(losses) * 2 + torch.isneginf(losses) * 3).max()


class RunGuard(Callback):
    """Stops a run cleanly on a signal or a non-finite loss, on every process at the same step.

    Signals (by name, e.g. SIGINT, SIGTERM): while training, the first one asks to stop at the end of the current
    step; then last.ckpt is written (a mid-epoch checkpoint that resumes at the next batch) and `Interrupted` is
    raised. Before training starts, while testing, or on a second signal, `Interrupted` is raised at once.
    train() installs the handlers with `handling_signals()` for the whole run; Lightning installs its own SIGTERM
    handler when fit starts (it would stop only at the epoch's end, with exit status 0), so on_train_start puts
    ours back. A handler that was there before ours is chained, not replaced: it runs once the checkpoint is
    written. On SLURM that is submitit's (hydra/launcher=slurm): its SIGUSR2 comes before the time limit or on
    pre-emption, and its handler requeues the job; the requeued job resumes from this checkpoint
    (`requeued_checkpoint`).

    A non-finite loss (`stop_on_nonfinite_loss`) stops the run before the optimizer step, with last.ckpt holding
    the weights of the step before. Under 16-mixed the GradScaler skips a step whose gradients overflow and lowers
    its scale: a non-finite loss stops the run only when `scaler_patience` losses in a row are.

    Both decisions are taken together every `every_n_steps` steps: with several processes (DDP) in one all-reduce
    of a small vector (the signal asked for, each process's loss verdict), sent before the backward pass and
    counted before the optimizer step (it travels while the backward pass computes), so that all of them stop at
    the same step and write the one checkpoint together (a collective call), even when the signal or the bad
    loss reached only one of them; on one process by reading the loss before the backward pass. With
    `every_n_steps` > 1 a GPU reads the losses once per N steps (no host sync in between), a stop comes up to N
    steps later, and a diverged run keeps its last checkpoint rather than the weights of the step before.

    RunGuard stops the run after every other callback has seen the step (train() puts it last, before Lightning's
    ModelCheckpoints): an EMA of the weights, say, has taken the step in before the checkpoint is written.
    """

    def __init__(self, signals: list[str], stop_on_nonfinite_loss: bool, every_n_steps: int, scaler_patience: int):
        for key, value in (("every_n_steps", every_n_steps), ("scaler_patience", scaler_patience)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"callbacks.run_guard.{key}={value!r} must be an integer ≥ 1")
        try:
            self.signals = [signal.Signals[name] for name in signals]
        except KeyError as err:
            raise UserError(f"callbacks.run_guard.signals: {err} is not a signal name (SIGINT, SIGTERM, ...)") from None
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.every_n_steps, self.scaler_patience = every_n_steps, scaler_patience
        self.requested: int | None = None  # the signal that asked to stop, in this process
        self.agreed: int | None = None  # the signal that all processes agreed to stop for
        self.losses: list[torch.Tensor] = []  # the training losses since the last decision
        self.votes: tuple | None = None  # an all-reduce on its way: (its tensor, its work handle)
        self.batches = 0
        self.nonfinite_in_a_row = 0  # decisions in a row that found a non-finite loss (16-mixed: skipped steps)
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

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        job = submitit_job_id()
        if job is not None:  # a requeued job resumes only from its own checkpoint (requeued_checkpoint)
            checkpoint[JOB_KEY] = job

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.stop_on_nonfinite_loss:
            self.losses.append(loss.detach())
        elif trainer.world_size == 1:
            return  # nothing to decide together: a signal is taken at the step's end
        self.batches += 1
        if self.batches % self.every_n_steps:
            return
        losses, self.losses = self.losses, []
        if trainer.world_size == 1:
            self.decide(trainer, [int(nonfinite_code(torch.stack(losses).float()))] if losses else [0])  # one host read
            return
        self.count_votes(trainer)  # one still out (accumulated gradients: several backward passes a step)
        # One all-reduce: [signal asked for, process 0's loss verdict, process 1's, …], the maximum of each. Sent
        # now and counted before the optimizer step, so that it travels while the backward pass computes.
        votes = torch.zeros(1 + trainer.world_size, device=pl_module.device)
        votes[0] = self.requested or 0
        if losses:
            votes[1 + trainer.global_rank] = nonfinite_code(torch.stack(losses).float())
        work = torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self.votes = (votes, work)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self.count_votes(trainer)

    def count_votes(self, trainer: Trainer) -> None:
        if self.votes is None:
            return
        (votes, work), self.votes = self.votes, None
        work.wait()
        signum, *verdicts = (int(v) for v in votes.tolist())
        self.agreed = self.agreed or signum or None
        self.decide(trainer, verdicts)

    def decide(self, trainer: Trainer, verdicts: list[int]) -> None:
        """Stop on a non-finite loss (`verdicts`: one code of NONFINITE a process), before the optimizer step."""
        world_size = trainer.world_size
        bad = {rank: NONFINITE[v] for rank, v in enumerate(verdicts) if v}
        if not bad:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and self.nonfinite_in_a_row < self.scaler_patience:
            log.warning(f"the training loss is {describe(bad, world_size)} at step {trainer.global_step}: the "
                        f"GradScaler skips this step and lowers its scale ({self.nonfinite_in_a_row} of "
                        f"callbacks.run_guard.scaler_patience={self.scaler_patience} in a row)")  # fmt: skip
            return
        self.diverged(trainer, bad)

    def diverged(self, trainer: Trainer, bad: dict[int, str]) -> None:
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        if self.every_n_steps == 1:
            path = checkpoint_file(trainer)
            trainer.save_checkpoint(path)  # collective; the weights are still those before this step
            kept = f"{path} holds the weights before this step"
        else:
            path = last_checkpoint(trainer)
            kept = f"the last checkpoint is {path}" if path else "no checkpoint was written yet"
            kept += f" (the loss is checked every {self.every_n_steps} steps)"
        if self.nonfinite_in_a_row > 1:
            where += f", non-finite {self.nonfinite_in_a_row} checks in a row (the GradScaler skipped those steps)"
        lrs = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
        raise Diverged(
            f"the training loss is {describe(bad, trainer.world_size)} {where} (learning rate "
            f"{', '.join(f'{lr:g}' for lr in lrs)}): training diverged, most likely from too high a learning rate; "
            f"try a smaller optimizer.lr. {kept}"
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        # Several processes stop on the signal they agreed on; one alone needs no agreement.
        self.count_votes(trainer)  # counted before the optimizer step already, unless this step took none
        signum = self.agreed if trainer.world_size > 1 else self.requested
        if signum is None:
            return
        self.agreed = None
        path = checkpoint_file(trainer)
        trainer.save_checkpoint(path)  # collective: every process calls it, the first one writes
        try:
            self.hand_over(signum)  # on SLURM: the job is requeued, the first process exits here
        finally:
            trainer.strategy.barrier("RunGuard")  # the other processes wait for that before they exit
        raise Interrupted(signum, path, f"at epoch {trainer.current_epoch}, step {trainer.global_step}")


def describe(bad: dict[int, str], world_size: int) -> str:
    """nan, or with several processes: nan on process 1 (of 2)."""
    if world_size == 1:
        return next(iter(bad.values()))
    return ", ".join(f"{value} on process {rank}" for rank, value in bad.items()) + f" (of {world_size})"


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
