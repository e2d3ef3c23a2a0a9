"""Resuming a run from its checkpoint: what is refused before Lightning loads it, atomic writes, the best
checkpoint across a resume.

Lightning restores weights, optimizer, scheduler and loop progress, and the batch iterator's position through its
state_dict (cnnlab.data.batches.TensorBatches). What it leaves to us (Lightning 2.6), in the rooms beside this one:
the random generators (cnnlab.rng), signals and a non-finite loss (cnnlab.stops), finding and loading the file
(cnnlab.checkpoints). Here:
- a checkpoint of another network, of another number of processes, or of another optimizer or per-step schedule
  is refused in one line (`check_shapes`, `check_processes`, `check_same_training`);
- checkpoints are written atomically: `AtomicCheckpointIO` writes beside the final name and renames (Lightning
  writes into the system's temp folder and moves the file, a copy when that is another file system);
- a resumed run continues in the run dir that holds its checkpoint (cnnlab.rundir.run_dir), so its
  ModelCheckpoint keeps its record of the best checkpoint (`best_checkpoint`) and TensorBoard shows one run.
"""

import logging
from pathlib import Path

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from cnnlab import UserError, write_atomically
from cnnlab.checkpoints import LAST
from cnnlab.module import per_step
from cnnlab.training_form import form_overrides, saved_training_form, training_state

log = logging.getLogger(__name__)


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


def check_shapes(module: LightningModule, checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint of another network before Lightning loads it (and fails with a long traceback)."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    state = checkpoint["state_dict"]
    replaced = saved_training_form(checkpoint)  # model.expand, model.batchnorm: kept beside the contracted form
    own = form_overrides(module.state_dict()).values()  # the forms this command trains in
    dropped = {form: off for form, off in form_overrides(replaced).items() if off not in own}
    if dropped:  # its optimizer's state is the training-time form's: it goes on only in that form
        raise UserError(f"ckpt_path={path} was trained with {' '.join(dropped)}, which a resume goes on with: "
                        f"leave out {' '.join(dropped.values())}")  # fmt: skip
    state = training_state(state, replaced)
    saved = {name: tuple(t.shape) for name, t in state.items()}
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
