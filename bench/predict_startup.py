"""How long `src/predict.py` takes for a few images, as a whole process, and what it imports; two checkouts paired.

    python bench/predict_startup.py ckpt=<checkpoint> images=<folder> [--against <other checkout>] [--repeats 7]

Runs `python src/predict.py ckpt_path=<ckpt> inputs=<images>` of this checkout (and of `--against`, another
checkout of cnnlab, e.g. `git worktree add /tmp/before <commit>`), interleaved A B A B after one warm-up run of
each, and prints the median and the range of the wall-clock seconds, their ratio, and whether the process
imported Lightning (`python -X importtime`). On a few images the time is start-up: imports, the config, loading
the checkpoint. Benchmarks are not tests: nothing asserts a time.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench import cpu_name  # noqa: E402  (bench/bench.py: the CPU's name, with its AVX-512 BF16 flag)


def command(checkout: Path, ckpt: str, images: str, *flags: str) -> list[str]:
    return [sys.executable, *flags, str(checkout / "src" / "predict.py"), f"ckpt_path={ckpt}", f"inputs={images}"]


def seconds(checkout: Path, ckpt: str, images: str) -> float:
    start = time.perf_counter()
    subprocess.run(command(checkout, ckpt, images), check=True, capture_output=True, cwd=checkout)
    return time.perf_counter() - start


def imports_lightning(checkout: Path, ckpt: str, images: str) -> bool:
    done = subprocess.run(command(checkout, ckpt, images, "-X", "importtime"), check=True, capture_output=True,
                          text=True, cwd=checkout)  # fmt: skip
    return any(line.rsplit("|", 1)[-1].strip() == "lightning" for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("images")
    parser.add_argument("--against", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ckpt, images = args.ckpt.removeprefix("ckpt="), args.images.removeprefix("images=")
    checkouts = {"this checkout": ROOT, **({f"{args.against}": args.against} if args.against else {})}
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for checkout in checkouts.values():
        seconds(checkout, ckpt, images)  # warm-up: the file cache
    for _ in range(args.repeats):
        for name, checkout in checkouts.items():
            times[name].append(seconds(checkout, ckpt, images))
    print(f"{cpu_name()}, src/predict.py on {images}, {args.repeats} runs each, interleaved:")
    for name, checkout in checkouts.items():
        lightning = "imports Lightning" if imports_lightning(checkout, ckpt, images) else "no Lightning"
        print(f"  {name}: {statistics.median(times[name]):.2f} s median ({min(times[name]):.2f}–"
              f"{max(times[name]):.2f}), {lightning}")  # fmt: skip
    if args.against:
        ratios = [a / b for a, b in zip(*times.values(), strict=True)]
        print(f"  ratio this / {args.against}: {statistics.median(ratios):.2f} (pair by pair, median)")


if __name__ == "__main__":
    main()
