"""Prediction throughput of one trained model three ways: the checkpoint in PyTorch, its ONNX file in onnxruntime,
its .pt2 (torch.export) in PyTorch; on the CIFAR-10 test images, interleaved A B C A B C.

    python bench/predict.py ckpt=<checkpoint> [--data ../shared/data/cifar10-jpeg.tar.gz] [--batch 256] [--repeats 5]
        [--write docs/benchmarks.md]

Each way runs cnnlab.trained's `Model.run` (what src/predict.py calls) over the 10,000 uint8 test images in
batches, after one warm-up pass; images/s from the median and the best of the repeats. Decoding the files is
left out (it is the same for all three): this measures the model. Exports are written beside the checkpoint if
missing. Benchmarks are not tests: nothing asserts a time.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.sources import load_dataset
from cnnlab.export import FORMATS, export
from cnnlab.trained import Model, load_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench import cpu_name  # noqa: E402  (bench/bench.py: the CPU's name, with its AVX-512 BF16 flag)

MARKER = "## Prediction throughput"


def throughput(model: Model, images: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        model.run(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a .ckpt (or a run dir) of the slide CNN")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--cache", default="~/.cache/cnnlab")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", help="replace this section of a markdown file with the results")
    args = parser.parse_args()

    checkpoint = resolve_model_path(args.ckpt, "outputs")
    files = {}
    for format in FORMATS:
        path = checkpoint.with_suffix(FORMATS[format])
        files[format] = path if path.is_file() else export(str(checkpoint), format, None)
    models = {
        "checkpoint, PyTorch": load_model(str(checkpoint), device="cpu"),
        "ONNX, onnxruntime": load_model(str(files["onnx"])),
        ".pt2, torch.export": load_model(str(files["pt2"])),
    }
    arrays = load_dataset("cifar10", args.data, False, args.cache, 32, "RGB")
    images = np.ascontiguousarray(arrays.test_images.transpose(0, 3, 1, 2))
    for model in models.values():
        throughput(model, images[:2048], args.batch)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(throughput(model, images, args.batch))

    base = statistics.median(rates["checkpoint, PyTorch"])
    lines = [
        MARKER,
        "",
        f"`python bench/predict.py <checkpoint> --batch {args.batch}`: {len(images):,} CIFAR-10 test images (uint8, "
        f"decoded) through each model in batches of {args.batch}, {args.repeats} interleaved repeats after a warm-up; "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, Python {platform.python_version()}.",
        "",
        "| model | images/s (median) | best | vs checkpoint |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:,.0f} | {max(values):,.0f} | {median / base:.2f}× |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:  # this section replaced (up to the next "## "), or added at the end
        path = Path(args.write)
        before, found, after = path.read_text().partition(MARKER)
        following = after.split("\n## ", 1)[1] if found and "\n## " in after else None
        text = before.rstrip("\n") + "\n\n" + report + (f"\n## {following}" if following else "")
        path.write_text(text)


if __name__ == "__main__":
    main()
