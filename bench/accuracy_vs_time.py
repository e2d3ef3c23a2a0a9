"""Test accuracy against training time: the slides' two options, experiment=fast_cpu and experiment=best.

    python bench/accuracy_vs_time.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--plot-only]

One fresh `python src/train.py` process per setting, one after the other, seed 0, with the callback of
bench/time_to_accuracy.py scoring the test set after every epoch (the averaged weights with an EMA; its own time
is left out). x: seconds from process start, start-up included. Writes outputs/accuracy_vs_time.json and
docs/accuracy-vs-time.png. About 20 minutes on 2 CPU cores. A benchmark, not a test.
"""

import argparse
import json
import tempfile
from pathlib import Path

from time_to_accuracy import ROOT, TARGET, measure  # beside this file

SETTINGS = {  # label: overrides
    "Option 1 (slides): Adam": [],
    "Option 2 (slides): SGD + StepLR": ["optimizer=sgd_steplr"],
    "experiment=fast_cpu": ["experiment=fast_cpu"],
    "experiment=best": ["experiment=best"],
}
RECORD = ROOT / "outputs" / "accuracy_vs_time.json"
PICTURE = ROOT / "docs" / "accuracy-vs-time.png"


def plot(curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for label, curve in curves.items():
        seconds, accuracy = zip(*curve, strict=True)
        axes.plot([s / 60 for s in seconds], [100 * a for a in accuracy], marker="o", markersize=3, label=label)
    axes.axhline(100 * TARGET, color="gray", linestyle="--", linewidth=1)
    right = max(seconds for curve in curves.values() for seconds, _ in curve) / 60
    axes.text(right, 100 * TARGET - 1.3, "slides: 70.51 %", color="gray", ha="right")
    axes.set_xlabel("minutes from process start (2 CPU cores)")
    axes.set_ylabel("test accuracy after each epoch, %")
    axes.set_ylim(50, 85)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("The slides' CNN on CIFAR-10: accuracy against time, seed 0")
    figure.tight_layout()
    figure.savefig(PICTURE, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--plot-only", action="store_true", help=f"plot {RECORD.name} again without training")
    parser.add_argument("--only-label", nargs="+", choices=list(SETTINGS), help="train only these settings")
    args = parser.parse_args()
    curves = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if not args.plot_only:
        for label, overrides in SETTINGS.items():
            if label in curves or (args.only_label and label not in args.only_label):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                result = measure(overrides, args.data, Path(tmp), target=1.01)  # never stops early
            curves[label] = result["curve"]
            print(f"{label}: {curves[label][-1][1]:.2%} after {curves[label][-1][0]:.0f} s", flush=True)
            RECORD.parent.mkdir(parents=True, exist_ok=True)
            RECORD.write_text(json.dumps(curves, indent=1))
    plot(curves)
    print(f"wrote {PICTURE}")


if __name__ == "__main__":
    main()
