"""What stops a run cleanly: a signal, or a training loss that is not finite, decided by all processes together.

- signals: `RunGuard` turns Ctrl-C (SIGINT) and SIGTERM into a checkpoint at the end of the current step and an
  `Interrupted` exception, which the entry point turns into one line and exit status 128 + signal (130, 143);
- SLURM's pre-emption and time limit: `RunGuard` also takes SIGUSR2 (submitit's), checkpoints, hands over to
  submitit's handler, which requeues the job; the job started again resumes from it
  (cnnlab.checkpoints.requeued_checkpoint, only from a checkpoint that the same submitit job wrote);
- a NaN/inf loss: `RunGuard` stops before the optimizer step, with last.ckpt holding the last finite weights.
The two share one callback because they share one decision: under DDP, one all-reduce a step carries both.
"""

import logging
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from cnnlab import UserError
from cnnlab.checkpoints import JOB_KEY, submitit_job_id
from cnnlab.resume import checkpoint_file, last_checkpoint

log = logging.getLogger(__name__)


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


def resume_command(checkpoint: Path) -> str:
    """The command line that resumes this run: the same script and overrides, ckpt_path pointing at `checkpoint`."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.config import parse_overrides

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o.input_line for o in parse_overrides(overrides) if o.key_or_group != "ckpt_path"]
    args = ["python", sys.argv[0], *kept, f"ckpt_path={checkpoint}"]
    return " ".join(shlex.quote(arg) for arg in args)


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
