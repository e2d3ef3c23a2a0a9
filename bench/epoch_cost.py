"""What an epoch's end costs besides training: validation, the checkpoint writes, the inside view, logging.

    python bench/epoch_cost.py [--settings experiment=fast_gpu] [--data ../shared/data/cifar10-jpeg.tar.gz]

Runs the real path, train(cfg), on the CPU with the given settings, a few short epochs (the training batches
cut to --batches), at three cadences: the default (validation with the inside view, then two checkpoint
writes, after every epoch), the same without the inside view, and validation only after the last epoch
(`trainer.check_val_every_n_epoch=${trainer.max_epochs}`, as fast_cpu and fast_gpu do). It times each gap
between one epoch's last training batch and the next epoch's first, and within it the validation loop
(`on_validation_start` to `on_validation_end`: the inside view is in it, the checkpoint writes come after).
On a GPU an epoch of fast_gpu trains in a fraction of a second: a gap that costs as much is worth removing.
A benchmark, not a test.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import HydraException

from bench import compose_config, machine_name  # bench/bench.py, beside this file
from cnnlab.train import train

ROOT = Path(__file__).resolve().parents[1]
CADENCES = {
    "after every epoch (the default)": ["trainer.check_val_every_n_epoch=1"],
    "after every epoch, no inside view": ["trainer.check_val_every_n_epoch=1", "callbacks.inside=null"],
    "after the last epoch only": ["trainer.check_val_every_n_epoch=${trainer.max_epochs}"],
}


class GapTimer(L.Callback):
    """Each gap between two training epochs, and the validation loop's share of it."""

    last: "GapTimer | None" = None

    def __init__(self):
        self.epoch_end, self.gaps, self.validations, self.validation_start = None, [], [], None
        GapTimer.last = self

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            self.epoch_end, self.validation = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, module):
        self.validation_start = time.perf_counter()

    def on_validation_end(self, trainer, module):  # called before the checkpoint callbacks' own on_validation_end
        self.validation = time.perf_counter() - self.validation_start

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and self.epoch_end is not None:
            self.gaps.append(time.perf_counter() - self.epoch_end)
            self.validations.append(self.validation)


def measure(settings: list[str], cadence: list[str], args, tmp: Path) -> tuple[float, float]:
    """Mean seconds per gap between epochs, and of it the validation loop's (over all gaps, validated or not)."""
    overrides = [
        *settings, *cadence, "trainer=cpu", f"data.root={args.data}", f"trainer.max_epochs={args.epochs}",
        f"++trainer.limit_train_batches={args.batches}", f"output_dir={tmp}",
        f"+callbacks.gap_timer._target_={__name__}.GapTimer",
    ]  # fmt: skip
    train(compose_config(overrides))
    timer = GapTimer.last
    return statistics.mean(timer.gaps), statistics.mean(timer.validations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=["experiment=fast_gpu"], help="overrides, as for train.py")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batches", type=int, default=5, help="training batches per epoch")
    args = parser.parse_args()
    if args.epochs < 2 or args.batches < 1:
        parser.error("--epochs must be ≥ 2 (a gap is between two epochs) and --batches ≥ 1")
    try:
        compose_config(args.settings)
    except HydraException as err:
        parser.error(f"--settings {' '.join(args.settings)}: {str(err).splitlines()[0]}")
    lines = [
        "| validation | s per gap between epochs (mean) | of which the validation loop | the rest: checkpoint "
        "writes, logging, hooks |",
        "| --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, cadence) in enumerate(CADENCES.items()):
            gap, validation = measure(args.settings, cadence, args, Path(tmp) / str(index))
            lines.append(f"| {name} | {gap:.3f} | {validation:.3f} | {gap - validation:.3f} |")
    print("\n".join(lines))
    print(
        f"\n`python bench/epoch_cost.py --settings {' '.join(args.settings)}`: {args.epochs} epochs of "
        f"{args.batches} training batches, {args.epochs - 1} gaps per cadence; {machine_name(torch.device('cpu'))}."
    )


if __name__ == "__main__":
    main()
