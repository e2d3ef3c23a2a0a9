"""Callbacks that tests add to a real `src/train.py` process (`+callbacks.<name>._target_=tests.callbacks...`)."""

import time
from pathlib import Path

from lightning import Callback


class PauseAt(Callback):
    """Before training step `step`: create `marker`, then wait (up to a minute) until the test deletes it, so that
    the test can send a signal at a known point of the run."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + 60
        while self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class SignalAt(Callback):
    """Before training step `step` of a run that is not resuming, send `signal` to this process (only on process
    `rank` of a multi-process run, when given), as SLURM or a user would."""

    def __init__(self, step: int, signal: str, rank: int | None = None):
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step and trainer.ckpt_path is None and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.Signals[self.signal])


class CrashAt(Callback):
    """Raise before training step `step`, as a crash would stop the run there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash before step {self.step}")


class RecordShard(Callback):
    """Appends, per process and epoch, a fingerprint of every training image it is given, in order, one a line:
    <folder>/shard-<rank>-<epoch>.txt. A run stopped and resumed adds the rest of its epoch to the same file."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        images = batch[0].float().cpu().contiguous()
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"shard-{trainer.global_rank}-{trainer.current_epoch}.txt", "a") as file:
            file.writelines(hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16] + "\n" for image in images)


class MarkRunDir(Callback):
    """Writes process-<rank> into the run dir that this process resolved (trainer.default_root_dir)."""

    def on_train_start(self, trainer, pl_module) -> None:
        (Path(trainer.default_root_dir) / f"process-{trainer.global_rank}").touch()


class DrawOnFirstProcess(Callback):
    """Draws from torch's global generator before every training step, on the first process only, as a callback
    that samples something on rank 0 would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if trainer.global_rank == 0:
            torch.rand(7)


class NanLossAt(Callback):
    """Turns the images of `steps` training steps from step `step` on into `value` (nan, inf) on process `rank`: a
    non-finite loss there, and only there."""

    def __init__(self, step: int, rank: int = 0, value: str = "nan", steps: int = 1):
        self.step, self.rank, self.value, self.steps = step, rank, float(value), steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step <= trainer.global_step < self.step + self.steps and trainer.global_rank == self.rank:
            batch[0].fill_(self.value)


class RecordThreads(Callback):
    """Writes torch's thread count in the job's process to <folder>/threads-<job>.txt at the start of training."""

    def __init__(self, folder: str, job: int):
        self.file = Path(folder) / f"threads-{job}.txt"

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(str(torch.get_num_threads()))


class FailJob(Callback):
    """A user error at the start of training in sweep job `fail` (give `job=${hydra:job.num}`)."""

    def __init__(self, job: int, fail: int):
        self.job, self.fail = job, fail

    def on_train_start(self, trainer, pl_module) -> None:
        from cnnlab import UserError

        if self.job == self.fail:
            raise UserError(f"job {self.job} fails on purpose")
