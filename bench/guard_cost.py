"""What the run guard's agreement costs under DDP: one all-reduce of a small vector before each step's backward pass.

    python bench/guard_cost.py [--steps 300] [--repeats 3] [--data ../shared/data/cifar10-jpeg.tar.gz]

Runs `src/train.py trainer=ddp trainer.devices=2 experiment=fast_cpu` on the CPU (gloo, one thread a process),
`--steps` training steps, with the processes agreeing every step (`callbacks.run_guard.every_n_steps=1`, the
default) and every 50 steps, in turn, `--repeats` times each; a callback times the steps after the first 20 on the
first process. Prints the median milliseconds a step of each and their ratio. A benchmark, not a test.
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

ROOT = Path(__file__).resolve().parents[1]
CADENCES = (1, 50)


class StepTimer(L.Callback):
    """On the first process: milliseconds per training step after the first `skip`, into <file> (JSON)."""

    def __init__(self, file: str, skip: int = 20):
        self.file, self.skip, self.starts = Path(file), skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.skip:
            self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and len(self.starts) > 1:
            gaps = [1000 * (b - a) for a, b in zip(self.starts, self.starts[1:], strict=False)]
            self.file.write_text(json.dumps(statistics.median(gaps)))


def step_ms(every: int, steps: int, data: str, folder: Path) -> float:
    out = folder / f"every-{every}.json"
    command = [sys.executable, str(ROOT / "src" / "train.py"), "trainer=ddp", "trainer.devices=2",
               "trainer.accelerator=cpu", "experiment=fast_cpu", f"trainer.max_steps={steps}", "callbacks.inside=null",
               f"callbacks.run_guard.every_n_steps={every}", f"data.root={data}", f"hydra.run.dir={folder / 'run'}",
               "+callbacks.timer._target_=guard_cost.StepTimer", f"+callbacks.timer.file={out}"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    if done.returncode != 0:
        sys.exit(f"error: the run with every_n_steps={every} failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    args = parser.parse_args()
    if args.steps < 40 or args.repeats < 1:
        parser.error("--steps must be at least 40 (the first 20 are not timed) and --repeats at least 1")
    times: dict[int, list[float]] = {every: [] for every in CADENCES}
    for _ in range(args.repeats):
        for every in CADENCES:  # in turn, so that a drift in the machine's speed touches both
            with tempfile.TemporaryDirectory() as tmp:
                times[every].append(step_ms(every, args.steps, args.data, Path(tmp)))
    print("| agreement | ms a step (median of repeats) | repeats |\n| --- | --- | --- |")
    for every, values in times.items():
        print(f"| every {every} step(s) | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    ratio = statistics.median(times[1]) / statistics.median(times[CADENCES[-1]])
    print(f"every step / every {CADENCES[-1]}: {ratio:.3f}")


if __name__ == "__main__":
    main()
