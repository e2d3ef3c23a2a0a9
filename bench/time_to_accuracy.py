"""Time to the slides' accuracy: process start → first epoch whose test accuracy reaches 70.51 %.

    python bench/time_to_accuracy.py [--settings slides fast_cpu] [--data ../shared/data/cifar10-jpeg.tar.gz]
    python bench/time_to_accuracy.py --settings gpu_card fast_gpu      (on a CUDA machine: bench/gpu.sh)

Runs `python src/train.py` as a user does, in a fresh process per setting, with one extra callback that scores
the test set after every training epoch (its own scoring time is subtracted) and stops at the target. Also
reports start-up (process start → first training step), training images/s (the median epoch after the first,
validation left out) and seconds per epoch (validation included). A benchmark, not a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.7051  # the slides' Option 1
HAND_WRITTEN = "<!-- Written by hand from here on"  # bench/bench.py's mark in docs/benchmarks.md
SETTINGS = {  # the CPU settings run on the CPU (trainer=cpu) also on a machine with a GPU
    "slides": ["trainer=cpu"],
    "fast_cpu": ["experiment=fast_cpu", "trainer=cpu"],
    # The design card's command, with the data on the GPU (data.on_device, the default), batched augmentation
    # on the GPU and bf16 autocast.
    "gpu_card": [
        "optimizer=sgd_steplr",
        "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed",
        "data.augment=true",
    ],
    "fast_gpu": ["experiment=fast_gpu"],
}


class TestAccuracyEachEpoch(L.Callback):
    """In the training process: wall clock of the first step and of each epoch's test accuracy, into a JSON file."""

    def __init__(self, target: float, record: str):
        self.target, self.record = target, Path(record)
        self.data = {"first_step": None, "epochs": []}
        self.scoring_s = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.data["first_step"] is None:
            self.data["first_step"] = time.time()

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start, self.images = time.time(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.images += len(batch[1])
        if batch_idx == trainer.num_training_batches - 1:  # before validation
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self.train_s = time.time() - self.epoch_start

    def on_train_epoch_end(self, trainer, module):
        start = time.time()
        datamodule = trainer.datamodule
        images, labels = datamodule.splits["test"]
        correct = 0
        # With an EMA of the weights (callbacks=ema), the averaged weights: those that validation and the test use.
        averaged = [c._average_model.module for c in trainer.callbacks if getattr(c, "_average_model", None)]
        model = averaged[0] if averaged else module
        model.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for first in range(0, len(labels), 1000):
                x = datamodule.normalize(images[first : first + 1000].to(module.device))
                correct += (model(x).argmax(1) == labels[first : first + 1000].to(module.device)).sum().item()
        model.train()
        self.scoring_s += time.time() - start
        accuracy = correct / len(labels)
        epoch = {"epoch": trainer.current_epoch + 1, "test_acc": accuracy, "at": time.time()}
        self.data["epochs"].append({**epoch, "scoring_s": self.scoring_s, "images_per_s": self.images / self.train_s})
        self.record.write_text(json.dumps(self.data))
        if accuracy >= self.target:
            trainer.should_stop = True


def measure(settings: list[str], data: str, workdir: Path, target: float = TARGET, seed: int = 0) -> dict:
    record = workdir / "record.json"
    command = [
        sys.executable, str(ROOT / "src" / "train.py"), *settings, f"seed={seed}", f"data.root={data}",
        f"hydra.run.dir={workdir / 'run'}", "+callbacks.tta._target_=bench.time_to_accuracy.TestAccuracyEachEpoch",
        f"+callbacks.tta.target={target}", f"+callbacks.tta.record={record}",
    ]  # fmt: skip
    # The callback is bench.time_to_accuracy: the repo root goes first on the path, the rest is kept.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launched = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    data = json.loads(record.read_text())
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())  # the run's own record: it finished
    epochs = data["epochs"]
    reached = next((e for e in epochs if e["test_acc"] >= TARGET), None)
    last = epochs[-1]
    return {
        "startup_s": data["first_step"] - launched,
        "epochs": reached["epoch"] if reached else None,
        "seconds": reached["at"] - launched - reached["scoring_s"] if reached else None,
        "training_s": reached["at"] - data["first_step"] - reached["scoring_s"] if reached else None,
        "best": max(e["test_acc"] for e in epochs),
        "run_test_acc": metrics["test/acc"],
        "images_per_s": statistics.median(e["images_per_s"] for e in epochs[1:] or epochs),
        "epoch_s": (last["at"] - last["scoring_s"] - data["first_step"]) / len(epochs),
        # (seconds from process start, scoring left out; test accuracy) after each epoch
        "curve": [(e["at"] - launched - e["scoring_s"], e["test_acc"]) for e in epochs],
    }


def add_section(path: Path, section: str) -> None:
    """Append `section` to `path`, or insert it before the part written by hand where it has one."""
    text = path.read_text() if path.exists() else ""
    cut = text.find(HAND_WRITTEN) if HAND_WRITTEN in text else len(text)
    path.write_text(f"{text[:cut].rstrip()}\n\n{section}\n{text[cut:]}".lstrip())


def warm_cache(data: str) -> None:
    """Decode the data into the project's cache if that has not been done, and read the cache once: every
    measured run then starts from the same warm cache, the first one included."""
    from hydra import compose, initialize_config_dir

    import cnnlab.config  # noqa: F401  (the schemas the data config names)
    from cnnlab.data.sources import load_dataset

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cache_dir = compose(config_name="train").data.cache_dir
    arrays = load_dataset("cifar10", data, False, cache_dir, 32, "RGB")
    for array in arrays[:4]:  # memory-mapped: reading it brings the files into the page cache
        int(array.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["slides", "fast_cpu"], choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument(
        "--append", type=Path, help="add the table to this markdown file (before a part written by hand)"
    )
    parser.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every setting's, e.g. model.init=whitened"
    )
    args = parser.parse_args()
    warm_cache(args.data)
    lines = [
        "| settings | seed | start-up s | training images/s | s per epoch | epochs to 70.51 % | training s to 70.51 % "
        "| seconds from process start to 70.51 % | the run's test/acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.settings:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                result = measure([*SETTINGS[name], *args.extra], args.data, Path(tmp), seed=seed)
            reached = (
                f"{result['epochs']} | {result['training_s']:.1f} | **{result['seconds']:.1f}**"
                if result["epochs"]
                else f"not reached (best {result['best']:.2%}) | – | –"
            )
            speed = f"{result['images_per_s']:,.0f} | {result['epoch_s']:.2f}"
            setting = " ".join([name, *args.extra])
            lines.append(f"| {setting} | {seed} | {result['startup_s']:.1f} | {speed} | {reached} | "
                         f"{result['run_test_acc']:.2%} |")  # fmt: skip
            print(lines[-1], flush=True)
    table = "\n".join(lines).replace("%", " %").replace("  %", " %") + "\n"
    print(table, end="")
    if args.append:
        add_section(args.append, f"## Time to the slides' 70.51 %\n\n{APPENDIX}\n{table}")
        print(f"added to {args.append}")


APPENDIX = """`python bench/time_to_accuracy.py`: a fresh `python src/train.py` process per setting and seed, one
after the other, from a warm cache (decoded, and read once before the first run); the CPU settings on the CPU; the
test set is scored after every epoch (the scoring time is left out) and the run stops at the first epoch at or
above 70.51 %. **slides**: the defaults (Adam, fp32, batch 64); **fast_cpu**: `experiment=fast_cpu` (channels_last,
bf16, batch 128, one-cycle SGD to lr 0.04 over 3 epochs, BatchNorm while training, no dropout). Start-up: process
start to the first training step. Training s: first step to the epoch that reaches 70.51 %, validation included.
The run's test/acc: its own metrics.json (the checkpoint it tested). Training images/s: the median epoch after the
first, validation left out.
"""


if __name__ == "__main__":
    main()
