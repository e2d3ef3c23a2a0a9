"""What a training run prints: a header, the network's summary, a bar an epoch, and the result as a person reads it.

- `RunHeader`: two lines before the first step, from the run itself: its overrides (and its place in a sweep),
  the optimizer and schedule, epochs, steps and batch, precision, device and threads, the data and the run dir;
- `NetworkSummary`: Lightning's model summary of the network alone (the layers the lecture draws, with their
  input and output sizes, parameters and FLOPs), not the loss and the metric objects around it;
- `Progress`: one bar an epoch with the training loss and the validation accuracy; where the output is not a
  terminal (SLURM, a log file, CI) a line an epoch instead;
- `result_lines(metrics)`: test accuracy and loss in percent, TTA beside it, per-class accuracy worst first.
Full precision stays in metrics.json and TensorBoard. What is left out is cnnlab.quiet's.
"""

import logging
import sys
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from cnnlab.quiet import HEADER

log = logging.getLogger(__name__)


def sweep_job() -> str:
    """ "job 3 of 6" in a sweep (of N where the sweep's plan says), "" in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hydra = HydraConfig.get()
    try:
        from cnnlab.sweep import planned_jobs

        total = f" of {len(planned_jobs(Path(hydra.sweep.dir)))}"
    except Exception:  # a sweeper that plans as it goes (Optuna): the number alone
        total = ""
    return f"job {hydra.job.num + 1}{total}"


def overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(given) or "the defaults"


class RunHeader(Callback):
    """Two lines at the start of training, on the first process: what runs, on what, where it writes."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]  # a schedule's peak (OneCycleLR's max_lr), else its start
        lr = group.get("max_lr", group.get("initial_lr", group["lr"]))
        schedules = [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]
        data = trainer.datamodule
        batch = data.hparams.batch_size
        per_process = f" ({batch} × {trainer.world_size} processes)" if trainer.world_size > 1 else ""
        device = trainer.strategy.root_device
        splits = getattr(data, "splits", {})
        sizes = " · ".join(f"{len(splits[name][1]):,} {name}" for name in ("train", "val", "test") if name in splits)
        images = splits["train"][0] if "train" in splits else None
        shape = "" if images is None else f"{'×'.join(map(str, images.shape[1:]))} in {len(data.classes)} classes"
        # Batches an epoch from a loader of its own: Lightning's estimated_stepping_batches would set up the fit
        # loop's before a resumed run restores its place in the epoch.
        batches = len(data.train_dataloader())
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        at_most = f" (at most {trainer.max_steps:,} steps)" if trainer.max_steps > 0 else ""
        job = sweep_job()
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        logging.getLogger(HEADER).info(
            f"cnnlab · {overrides()}{' · ' + job if job else ''} · {type(optimizer).__name__} lr {lr:g}"
            f"{' + ' + ', '.join(schedules) if schedules else ''} · {trainer.max_epochs} epochs × {batches:,} "
            f"batches of {batch * trainer.world_size}{per_process}{at_most} · "
            f"{trainer.precision} on {device.type}{threads}"
            f"\ndata {data.hparams.name} {data.hparams.root}: {sizes} · {shape} · run dir {trainer.default_root_dir}"
        )  # fmt: skip


class NetworkSummary(ModelSummary):
    """Lightning's model summary, its rows cut to the network (`net` and its layers)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:  # fmt: skip
        names = dict(summary_data)["Name"]
        keep = [i for i, name in enumerate(names) if name == "net" or name.startswith("net.")]
        rows = [(column, [values[i] for i in keep]) for column, values in summary_data if column != "Mode"]
        rows[0] = (rows[0][0], [str(i) for i in range(len(keep))])  # renumbered
        modes = {"train": len(keep), "eval": 0}
        ModelSummary.summarize(rows, total_parameters, trainable_parameters, model_size, modes, total_flops,
                               **summarize_kwargs)  # fmt: skip


class Progress(TQDMProgressBar):
    """A bar an epoch ("job 2 of 6 · epoch 3/20"), showing the training loss and the validation accuracy; no bar
    for validation or the test. Where stdout is not a terminal, a line at each epoch's end instead (after its
    validation, when it has one)."""

    def __init__(self, refresh_rate: int):
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self.terminal = sys.stdout.isatty()
        self.validated_in: int | None = None  # the epoch of the last validation

    def init_train_tqdm(self):
        return super().init_train_tqdm() if self.terminal else Tqdm(disable=True)

    def init_validation_tqdm(self):
        return Tqdm(disable=True)

    def init_test_tqdm(self):
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer: Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        job = sweep_job()
        self.train_progress_bar.set_description(f"{job + ' · ' if job else ''}epoch {trainer.current_epoch + 1}"
                                                f"/{trainer.max_epochs}")  # fmt: skip

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        shown = {"train/loss_step": "loss", "val/acc": "val/acc"}
        metrics = super().get_metrics(trainer, pl_module)
        return {shown[key]: value for key, value in metrics.items() if key in shown}

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.validated_in = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.terminal or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics  # the epoch's last logged step; val/ if it validated this epoch
        parts = [f"loss {float(metrics['train/loss_step']):.4f}"] if "train/loss_step" in metrics else []
        if self.validated_in == trainer.current_epoch and "val/acc" in metrics:
            parts += [f"val/loss {float(metrics['val/loss']):.4f}", f"val/acc {100 * float(metrics['val/acc']):.2f} %"]
        log.info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {' · '.join(parts) or 'done'}")


SHOWN_CLASSES = 12  # on the console's per-class line; all of them are in metrics.json


def result_lines(metrics: dict) -> str:
    """The test's result in percent, two decimals, and the per-class accuracy worst first, on two lines."""
    tta = f" (TTA {100 * metrics['test/acc_tta']:.2f} %)" if "test/acc_tta" in metrics else ""
    best = metrics.get("val/acc_best")
    checkpoint = Path(metrics["best_checkpoint"]).name if metrics.get("best_checkpoint") else "the last weights"
    line = (f"test: {100 * metrics['test/acc']:.2f} % accuracy{tta}, loss {metrics['test/loss']:.4f}, "
            f"with {checkpoint}" + (f" (val/acc {100 * best:.2f} %)" if best is not None else ""))  # fmt: skip
    per_class = {key.removeprefix("test/acc_class/"): value for key, value in metrics.items()
                 if key.startswith("test/acc_class/")}  # fmt: skip
    if per_class:
        worst_first = sorted(per_class.items(), key=lambda item: item[1])
        shown = worst_first[:SHOWN_CLASSES]
        line += "\nper class, worst first: " + " · ".join(f"{name} {100 * value:.1f}" for name, value in shown)
        if len(worst_first) > len(shown):  # CIFAR-100: the rest in metrics.json, and the mistakes made most
            line += f" · … ({len(worst_first) - len(shown)} more in metrics.json)"
            line += "\nmost confused (true → predicted, images): " + " · ".join(
                f"{c['true']} → {c['predicted']} {c['images']}" for c in metrics.get("top_confusions", [])[:5]
            )
    return line
