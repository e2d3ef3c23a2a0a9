"""What the InsideView callback (TensorBoard filters and activation maps) costs per epoch, against the epoch.

    python bench/inside_cost.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--epochs 3] [overrides ...]

Trains the real path for a few epochs with the callback on, timing the callback's work at each epoch's end
(its hook, wrapped here), reads each epoch's length from the run's TensorBoard events (the wall-clock gap
between two `val/acc` points), and prints the share. Benchmarks are not tests: nothing asserts a time.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.inside_view import InsideView
from cnnlab.train import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench import compose_config, cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    spent = []  # seconds, one an epoch
    hook = InsideView.on_validation_epoch_end

    def timed(self, trainer, pl_module):
        start = time.perf_counter()
        hook(self, trainer, pl_module)
        spent.append(time.perf_counter() - start)

    InsideView.on_validation_epoch_end = timed
    with tempfile.TemporaryDirectory() as out:
        train(compose_config([f"data.root={args.data}", f"trainer.max_epochs={args.epochs}", f"output_dir={out}",
                              "logger=tensorboard", *args.overrides]))  # fmt: skip
        events = EventAccumulator(str(Path(out) / "tensorboard"))
        events.Reload()
        ends = [event.wall_time for event in events.Scalars("val/acc")]
    epoch = statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))
    cost = statistics.median(spent)
    print(
        f"{cpu_name()}, {' '.join(args.overrides) or 'default settings'}: an epoch {epoch:.1f} s, the pictures "
        f"{1000 * cost:.0f} ms ({100 * cost / epoch:.2f} % of an epoch; medians of {args.epochs} epochs)"
    )


if __name__ == "__main__":
    main()
