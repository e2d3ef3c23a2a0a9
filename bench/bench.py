"""Training throughput of the slide CNN three ways, on the same data, interleaved A B C A B C.

    python bench/bench.py [--quick] [--gpu] [--write docs/benchmarks.md] [--data ../shared/data/cifar10-jpeg.tar.gz]

- ours:  the real path, cnnlab.train.train(cfg): Trainer, DataModule, logging and checkpointing as a user runs it
- bare:  a plain PyTorch loop with the same math (model, layout, precision, batch size, optimizer) over tensors in
         memory
- usual: the tutorial recipe: a torchvision-style dataset with per-sample ToTensor + Normalize and a DataLoader,
         with 0 worker processes and with workers (2 on a CPU; on a GPU machine up to 8, with pinned memory);
         the ratios take the faster of the two

Each way trains `steps` batches per epoch; images/s is counted from the end of `warmup` batches to the end of the
last, so start-up, validation and test are left out. With --gpu all three train on the CUDA GPU (the usual recipe
still prepares its samples on the CPU, as its tutorials do), and ours and bare train `--epochs` epochs (8), so
that each repeat times more than a second; epoch boundaries (ours validates one batch and writes checkpoints
there) are left out of ours' time. Benchmarks are not tests: nothing asserts a time.
"""

import argparse
import os
import platform
import statistics
import tempfile
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
from cnnlab import make
from cnnlab.data.pixels import scale_and_shift
from cnnlab.data.sources import load_dataset
from cnnlab.module import per_step
from cnnlab.process import keep_freed_memory
from cnnlab.train import train

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read means the work is done (nothing to do on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Training time from the start of batch `warmup` of the first epoch to the end of the last batch of the last
    epoch, the time between epochs (validation, checkpoints) left out."""

    last: "StepTimer | None" = None

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds, self.images = warmup, None, 0.0, 0
        StepTimer.last = self

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == (self.warmup if trainer.current_epoch == 0 else 0):
            synchronize(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is None:
            return
        self.images += len(batch[1])
        if batch_idx == trainer.num_training_batches - 1:
            synchronize(module.device)
            self.seconds += time.perf_counter() - self.start
            self.start = None


def steps(args, batch_size: int) -> tuple[int, int]:
    """The same number of images for every way and batch size, within one epoch: (steps, warm-up steps)."""
    return args.images // batch_size, args.warmup_images // batch_size


def ours(args, settings: list[str], tmp: Path) -> float:
    train(compose_config(ours_overrides(args, settings, tmp)))
    timer = StepTimer.last
    return timer.images / timer.seconds


def ours_overrides(args, settings: list[str], tmp: Path) -> list[str]:
    """The settings, plus epochs cut to the timed steps and the timer (tests/test_bench.py composes them)."""
    total, warmup = steps(args, compose_config(settings).data.batch_size)
    return [
        *settings,
        f"data.root={args.data}",
        "trainer=gpu" if args.gpu else "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        f"++trainer.limit_train_batches={total}",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
        f"output_dir={tmp}",
        f"+callbacks.bench_timer._target_={__name__}.StepTimer",
        f"+callbacks.bench_timer.warmup={warmup}",
    ]


def bare(args, settings: list[str], arrays, mark=lambda phase: None) -> float:
    """The same math as `ours` with the same settings (layout, precision, batch size), as a plain loop.
    `mark(phase)` is called as each phase of a step ends (bench/step_breakdown.py times them)."""
    cfg, device = compose_config(settings), args.device
    net = make(cfg.model).to(device)  # converts itself and its input to channels_last when the settings say so
    optimizer = make(cfg.optimizer)(params=net.parameters())  # the settings' optimizer, as train(cfg) makes it
    criterion = make(cfg.loss)  # and loss (label smoothing in fast_cpu)
    images = torch.from_numpy(arrays.train_images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(arrays.train_labels).to(device)
    scale, shift = scale_and_shift(cfg.data.mean, cfg.data.std, device)  # as the DataModule normalises
    order, batch_size = torch.randperm(len(labels), device=device), cfg.data.batch_size
    total, warmup = steps(args, batch_size)
    # A per-step schedule (fast_cpu's OneCycleLR) is stepped after every batch, as Lightning does; an epoch's
    # schedule is stepped at the epoch's end (as the StepLR of the slides, and fast_gpu's cosine).
    schedule = make(cfg.scheduler) if cfg.get("scheduler") else None
    if schedule and per_step(schedule):
        batch_scheduler, epoch_scheduler = schedule(optimizer=optimizer, total_steps=total * args.epochs), None
    else:
        batch_scheduler, epoch_scheduler = None, schedule(optimizer=optimizer) if schedule else None
    bf16 = cfg.trainer.precision == "bf16-mixed"
    net.train()
    timed_images = 0
    for epoch in range(args.epochs):
        for step in range(total):
            if epoch == 0 and step == warmup:
                synchronize(device)
                start = time.perf_counter()
            mark("start")
            index = order[step * batch_size : (step + 1) * batch_size]
            timed_images += len(index) if epoch > 0 or step >= warmup else 0
            x = images.index_select(0, index).to(torch.float32).mul_(scale).add_(shift)
            y = labels.index_select(0, index)
            mark("data")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(net(x), y)
            mark("forward")
            optimizer.zero_grad(set_to_none=True)
            mark("zero_grad")
            loss.backward()
            mark("backward")
            optimizer.step()
            mark("update")
            if batch_scheduler is not None:
                batch_scheduler.step()
            mark("after update")
        if epoch_scheduler is not None:
            epoch_scheduler.step()
        order = torch.randperm(len(labels), device=device)
    synchronize(device)
    return timed_images / (time.perf_counter() - start)


class PerSampleCIFAR10(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an H×W×C uint8 array → PIL image → transform."""

    def __init__(self, data: np.ndarray, targets: np.ndarray, transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def usual(args, arrays, workers: int) -> float:
    """One epoch's `steps` at most (over a second on a GPU too: the per-sample work is on the CPU)."""
    cfg = compose_config([])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg.data.mean, cfg.data.std)])
    loader = DataLoader(
        PerSampleCIFAR10(arrays.train_images, arrays.train_labels, transform),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=args.gpu,  # what the tutorials add for a GPU: page-locked batches, copied asynchronously
    )
    device = args.device
    net = make(cfg.model).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr)
    net.train()
    images, (total, warmup) = 0, steps(args, cfg.data.batch_size)
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        if step >= warmup:
            images += len(y)
        x, y = x.to(device, non_blocking=args.gpu), y.to(device, non_blocking=args.gpu)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == total:
            break
    synchronize(device)
    return images / (time.perf_counter() - start)


SETTINGS = {  # name: overrides. "slides" is the reproduction default: fp32, batch 64.
    "slides": [],
    "fast_cpu": ["experiment=fast_cpu"],
}
GPU_SETTINGS = {  # "slides" on a GPU is the design card's command: the defaults with trainer.accelerator=gpu
    "slides": [],
    "fast_gpu": ["experiment=fast_gpu"],
}
LADDER = {  # what each fast setting adds, measured on the real path (full CPU run only)
    "+ channels_last": ["model.channels_last=true"],
    "+ channels_last + bf16": ["model.channels_last=true", "trainer.precision=bf16-mixed"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats: under 2 minutes")
    parser.add_argument("--gpu", action="store_true", help="train on the CUDA GPU (fast_gpu in place of fast_cpu)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--write", type=Path, help="write the results into this markdown file")
    parser.add_argument("--append", type=Path, help="append the tables to this markdown file")
    parser.add_argument("--epochs", type=int, help="epochs of ours and bare per repeat (default: 1 on a CPU, 8 --gpu)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.exit(2, "error: --gpu needs a CUDA GPU, and torch sees none\n")
    args.device = torch.device("cuda" if args.gpu else "cpu")
    # Images per way, epoch and repeat: at most one epoch of the 45,000 training images, whatever the batch size.
    # Interference from other work on the machine only ever slows a run, so repeats are many and short; on a GPU
    # an epoch takes a fraction of a second, so a repeat is several.
    if args.gpu:
        args.images, args.warmup_images, repeats = 44_800, 12_800, 3 if args.quick else 5
        args.epochs, workers = args.epochs or 8, min(8, os.cpu_count() or 1)
    else:
        args.images, args.warmup_images, repeats = (12_800, 1_280, 2) if args.quick else (22_400, 3_200, 5)
        args.epochs, workers = args.epochs or 1, 2
    settings_by_name = GPU_SETTINGS if args.gpu else SETTINGS

    keep_freed_memory()  # what train(cfg) does for its process (conf: keep_freed_memory), here for all three ways
    arrays = load_dataset("cifar10", args.data, False, compose_config([]).data.cache_dir, 32, "RGB")
    runs = {}  # (way, settings) → a function of the temp dir
    for name, settings in settings_by_name.items():
        runs[("ours", name)] = lambda tmp, settings=settings: ours(args, settings, tmp)
        runs[("bare", name)] = lambda tmp, settings=settings: bare(args, settings, arrays)
    for count in (0, workers):
        runs[(f"usual, {count} workers", "slides")] = lambda tmp, count=count: usual(args, arrays, count)
    if not args.quick and not args.gpu:
        for name, settings in LADDER.items():
            runs[("ours", name)] = lambda tmp, settings=settings: ours(args, settings, tmp)

    results: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for key, run in runs.items():  # interleaved, so drift in the machine hits every way alike
                torch.manual_seed(repeat)
                results[key].append(run(Path(tmp) / f"{'-'.join(key)}-{repeat}"))
                print(f"repeat {repeat + 1}/{repeats} {key[0]} {key[1]}: {results[key][-1]:,.0f} images/s", flush=True)

    text = report(args, results, repeats, list(settings_by_name))
    print(text)
    if args.write:
        write_generated(args.write, HEADER + text)
        print(f"wrote {args.write}")
    if args.append:
        with open(args.append, "a") as file:
            file.write(text)
        print(f"appended to {args.append}")


HAND_WRITTEN = "<!-- Written by hand from here on: make bench rewrites what is above, and keeps this. -->"
HEADER = """# Benchmarks

Training throughput of the slide CNN on CIFAR-10 (the JPEG copy, through the project's decoded cache), three
ways on the same data, interleaved A B C A B C so that drift in the machine hits all alike:

- **ours**: the real path, `train(cfg)`: Trainer, DataModule, logging, checkpointing as a user runs it;
- **bare**: a plain PyTorch loop with the same math (model, layout, precision, batch size, optimizer) over
  the same in-memory tensors;
- **usual**: the tutorial recipe: per-sample `ToTensor` + `Normalize` on PIL images feeding a `DataLoader`
  (fp32, batch 64, Adam), with no worker processes and with 2; the ratios take the faster of the two.

Images/s counts training batches only, from the end of the warm-up batches to the end of the last one:
start-up, validation and test are left out. Settings: **slides** is the reproduction default (fp32, batch 64,
NCHW, Adam); **fast_cpu** is `experiment=fast_cpu` (channels_last, bf16 autocast, batch 128, SGD). Other work
on a shared machine only ever slows a run down, so besides the ratio of the medians the ratio of the best
repeats is given: the one least disturbed.

Made by `make bench` (`python bench/bench.py --write docs/benchmarks.md`, then
`python bench/time_to_accuracy.py --append docs/benchmarks.md`); `make bench-quick` prints the same table
from fewer steps in about a minute. What the fast settings do to accuracy: docs/results.md.

"""


def write_generated(path: Path, text: str) -> None:
    """`text` in place of the part of `path` above its HAND_WRITTEN line, which stays with all that follows it."""
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else HAND_WRITTEN + "\n"
    path.write_text(f"{text}\n{kept}")


def report(args, results: dict[tuple[str, str], list[float]], repeats: int, names: list[str]) -> str:
    median = {key: statistics.median(values) for key, values in results.items()}
    best = {key: max(values) for key, values in results.items()}

    def ratios(label: str, a: tuple[str, str], b: tuple[str, str]) -> str:
        return f"| {label} | {median[a] / median[b]:.2f} | {best[a] / best[b]:.2f} |"

    # The usual recipe as a user would run it: with or without DataLoader workers, whichever is faster here.
    usual = max((key for key in results if key[0].startswith("usual")), key=median.get)
    fast = names[-1]  # fast_cpu or fast_gpu; names[0] is the slides' settings

    lines = [
        "| way | settings | images/s median | min | max |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {way} | {settings} | {median[(way, settings)]:,.0f} | {min(values):,.0f} | {max(values):,.0f} |"
            for (way, settings), values in results.items()
        ),
        "",
        "| ratio | of medians | of best repeats |",
        "| --- | --- | --- |",
        *(ratios(f"ours / bare, {name}", ("ours", name), ("bare", name)) for name in names),
        ratios(f"**ours {fast} / usual** ({usual[0]})", ("ours", fast), usual),
        ratios(f"… of which the data path: ours {names[0]} / usual", ("ours", names[0]), usual),
        ratios(f"… and the settings: ours {fast} / ours {names[0]}", ("ours", fast), ("ours", names[0])),
        "",
        f"Timed images per repeat: {args.epochs * args.images - args.warmup_images:,} for ours and bare ({args.epochs} "
        f"× {args.images:,}, less {args.warmup_images:,} of warm-up), {args.images - args.warmup_images:,} for the "
        f"usual recipe; {repeats} repeats. Machine: {machine_name(args.device)}; "
        f"torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}.",
    ]
    return "\n".join(lines) + "\n"


def machine_name(device: torch.device) -> str:
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name(device)} with {cpu}" if device.type == "cuda" else cpu


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    flags = cpuinfo.read_text().split()
    return f"{names[0] if names else platform.machine()}{' (AVX-512 BF16)' if 'avx512_bf16' in flags else ''}"


if __name__ == "__main__":
    main()
