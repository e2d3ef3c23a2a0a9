"""Training throughput of the slide CNN three ways, on the same data, interleaved A B C A B C.

    python bench/bench.py [--quick] [--write docs/benchmarks.md] [--data ../shared/data/cifar10-jpeg.tar.gz]

- ours:  the real path, cnnlab.train.train(cfg): Trainer, DataModule, logging and checkpointing as a user runs it
- bare:  a plain PyTorch loop with the same math (model, batch size, optimizer) over tensors in memory
- usual: the tutorial recipe: a torchvision-style dataset with per-sample ToTensor + Normalize and a DataLoader

Each way trains `steps` batches; images/s is counted from the end of `warmup` batches to the end of the last,
so start-up, validation and test are left out. Benchmarks are not tests: nothing here asserts a time.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import cnnlab.config  # noqa: F401  (resolvers and schemas)
from cnnlab.data import load_cifar10
from cnnlab.train import make, train

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class StepTimer(L.Callback):
    """Wall time from the start of batch `warmup` to the end of the last training batch."""

    last: "StepTimer | None" = None

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0
        StepTimer.last = self

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.end = time.perf_counter()


def ours(args, tmp: Path) -> float:
    cfg = compose_config(
        [
            f"data.root={args.data}",
            "trainer=cpu",
            "trainer.max_epochs=1",
            f"+trainer.limit_train_batches={args.steps}",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            f"output_dir={tmp}",
            "+callbacks.bench_timer._target_=__main__.StepTimer",
            f"+callbacks.bench_timer.warmup={args.warmup}",
        ],
    )
    train(cfg)
    timer = StepTimer.last
    return timer.images / (timer.end - timer.start)


def bare(args, arrays) -> float:
    cfg = compose_config([])
    net = make(cfg.model)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr)
    images = torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(arrays.train_labels)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    order, batch_size = torch.randperm(len(labels)), cfg.data.batch_size
    net.train()
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        index = order[step * batch_size : (step + 1) * batch_size]
        x = (images[index].float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(net(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (args.steps - args.warmup) * batch_size / (time.perf_counter() - start)


class PerSampleCIFAR10(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an H×W×C uint8 array → PIL image → transform."""

    def __init__(self, data: np.ndarray, targets: np.ndarray, transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def usual(args, arrays) -> float:
    cfg = compose_config([])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg.data.mean, cfg.data.std)])
    loader = DataLoader(
        PerSampleCIFAR10(arrays.train_images, arrays.train_labels, transform),
        batch_size=cfg.data.batch_size,
        shuffle=True,
    )
    net = make(cfg.model)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr)
    net.train()
    images = 0
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            start = time.perf_counter()
        if step >= args.warmup:
            images += len(y)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == args.steps:
            break
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats: under 2 minutes")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--write", type=Path, help="write the table into this markdown file")
    args = parser.parse_args()
    args.steps, args.warmup, repeats = (250, 25, 2) if args.quick else (700, 50, 3)

    import tempfile

    arrays = load_cifar10(args.data, download=False, cache_dir=compose_config([]).data.cache_dir)
    ways = {
        "ours": lambda tmp: ours(args, tmp),
        "bare": lambda _: bare(args, arrays),
        "usual": lambda _: usual(args, arrays),
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for name, way in ways.items():  # interleaved, so drift in the machine hits every way alike
                torch.manual_seed(repeat)
                results[name].append(way(Path(tmp) / f"{name}{repeat}"))
                print(f"repeat {repeat + 1}/{repeats} {name}: {results[name][-1]:,.0f} images/s", flush=True)

    table = report(args, results)
    print(table)
    if args.write:
        args.write.write_text(table)
        print(f"wrote {args.write}")


def report(args, results: dict[str, list[float]]) -> str:
    median = {name: statistics.median(values) for name, values in results.items()}
    lines = [
        "| way | images/s median | min | max |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {median[name]:,.0f} | {min(values):,.0f} | {max(values):,.0f} |"
            for name, values in results.items()
        ),
        "",
        f"ours / bare = {median['ours'] / median['bare']:.2f}, ours / usual = {median['ours'] / median['usual']:.2f} "
        f"(medians; fp32, batch 64, Adam; {args.steps - args.warmup} timed steps after {args.warmup} warm-up, "
        f"{len(next(iter(results.values())))} repeats)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
