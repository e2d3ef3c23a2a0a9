"""Where a training step's time goes, ours (train(cfg)) against the bare loop of bench/bench.py, phase by phase.

    python bench/step_breakdown.py [--settings experiment=fast_cpu] [--steps 150] [--repeats 4]

Timed hooks, not a profiler (cProfile's per-call cost would swamp calls of a few microseconds): in ours a callback
takes the clock at Lightning's hooks (on_train_batch_start, on_before_backward, on_after_backward,
on_before_optimizer_step, on_train_batch_end), around training_step and after the optimizer's update (a torch
step post-hook); the bare loop takes it between its statements. Phases, in the order of a step:

- between steps: ours: the previous step's remaining batch-end hooks, the scheduler, Lightning's loop, the fetch
  and the transfer hooks with normalisation; bare: gather and normalise
- before forward (ours only): on_train_batch_start hooks, Lightning's optimizer_step, torch's optimizer.step
  wrappers (in bare those are in "update"), the closure
- forward: the network and the loss (ours: training_step, with the epoch's running loss and accuracy sums)
- zero_grad: (ours: the closure's hooks, the finite-loss check)
- backward
- before update (ours only): the on_before_optimizer_step hooks
- update: the optimizer's arithmetic (bare: with torch's optimizer.step wrappers)
- after update: bare: the per-step scheduler; ours: the batch-end hooks of the callbacks before ours

Means over `--repeats` × (`--steps` − warm-up) steps, ours and bare interleaved in one process; and the minor page
faults per step (fresh memory the allocator asked the kernel for). A benchmark, not a test.
"""

import argparse
import resource
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import lightning as L
import torch
from hydra.errors import HydraException

from bench import bare, compose_config, machine_name, ours_overrides  # bench/bench.py, beside this file
from cnnlab.data.sources import load_dataset
from cnnlab.train import train

ROOT = Path(__file__).resolve().parents[1]
PHASES = [
    "between steps", "before forward", "forward", "zero_grad", "backward", "before update", "update", "after update",
]  # fmt: skip


class Phases:
    """Marks taken within each step → {phase: seconds} per step; a phase is named by the mark that ends it."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.perf_counter()))

    def end_step(self) -> None:
        self.steps.append({name: now - before for (_, before), (name, now) in pairwise(self.marks)})
        self.marks = self.marks[-1:]  # the end of this step starts the next one's first phase


class PhaseTimer(L.Callback):
    """Ours: the clock at Lightning's hooks of each training step (after `warmup` steps)."""

    last: "PhaseTimer | None" = None

    def __init__(self, warmup: int):
        self.warmup, self.phases, self.faults = warmup, Phases(), 0
        PhaseTimer.last = self

    def on_train_start(self, trainer, module):
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda *_: self.phases.mark("update"))
        training_step = module.training_step

        def timed_training_step(*args, **kwargs):
            self.phases.mark("before forward")
            output = training_step(*args, **kwargs)
            self.phases.mark("forward")
            return output

        module.training_step = timed_training_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.phases.marks, self.faults = [("start", time.perf_counter())], minor_faults()
        self.phases.mark("between steps")

    def on_before_backward(self, trainer, module, loss):
        self.phases.mark("zero_grad")

    def on_after_backward(self, trainer, module):
        self.phases.mark("backward")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.phases.mark("before update")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.phases.mark("after update")
        if batch_idx > self.warmup:  # the first timed step starts at a batch start: no "between steps" of its own
            self.phases.end_step()
        else:
            self.phases.marks = self.phases.marks[-1:]
        if batch_idx == trainer.num_training_batches - 1:
            self.faults = minor_faults() - self.faults


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_ours(args, tmp: Path) -> tuple[list[dict], float]:
    overrides = ours_overrides(args, args.settings, tmp)
    timer = [f"+callbacks.phases._target_={__name__}.PhaseTimer", f"+callbacks.phases.warmup={args.warmup}"]
    train(compose_config([*overrides, *timer]))
    timer = PhaseTimer.last
    return timer.phases.steps, timer.faults / len(timer.phases.steps)


def run_bare(args, arrays) -> tuple[list[dict], float]:
    phases, done, faults = Phases(), 0, 0  # done: steps finished so far

    def mark(phase: str) -> None:
        nonlocal done, faults
        if done < args.warmup:
            done += phase == "after update"
        elif phase == "start":  # only the first timed step's: later ones start where the last one ended
            if done == args.warmup:
                phases.marks, faults = [("start", time.perf_counter())], minor_faults()
        else:
            phases.mark("between steps" if phase == "data" else phase)  # the loop, gather and normalise
            if phase == "after update":
                phases.end_step()
                done += 1

    bare(args, args.settings, arrays, mark)
    return phases.steps, (minor_faults() - faults) / len(phases.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=["experiment=fast_cpu"], help="overrides, as for train.py")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--steps {args.steps} must be at least --warmup {args.warmup} + 2 (a timed step after warm-up)")
    try:
        batch_size = compose_config(args.settings).data.batch_size
    except HydraException as err:
        parser.error(f"--settings {' '.join(args.settings)}: {str(err).splitlines()[0]}")
    args.images, args.warmup_images = args.steps * batch_size, args.warmup * batch_size
    args.epochs, args.gpu, args.device = 1, False, torch.device("cpu")
    arrays = load_dataset("cifar10", args.data, False, compose_config([]).data.cache_dir, 32, "RGB")
    steps, faults = {"ours": [], "bare": []}, {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            for way, (way_steps, way_faults) in (
                ("ours", run_ours(args, Path(tmp) / str(repeat))),
                ("bare", run_bare(args, arrays)),
            ):
                steps[way] += way_steps
                faults[way].append(way_faults)

    def mean_ms(way: str, phase: str) -> float:
        return 1e3 * statistics.mean(step.get(phase, 0.0) for step in steps[way])

    lines = ["| phase of a step | ours, ms | bare, ms | ours − bare |", "| --- | --- | --- | --- |"]
    for phase in PHASES:
        o, b = mean_ms("ours", phase), mean_ms("bare", phase)
        lines.append(f"| {phase} | {o:.3f} | {b:.3f} | {o - b:+.3f} |")
    total = {way: sum(mean_ms(way, phase) for phase in PHASES) for way in steps}
    ours, bare_ = total["ours"], total["bare"]
    lines.append(f"| **step** | **{ours:.2f}** | **{bare_:.2f}** | {ours - bare_:+.2f} |")
    ours, bare_ = statistics.mean(faults["ours"]), statistics.mean(faults["bare"])
    lines.append(f"| minor page faults per step | {ours:,.0f} | {bare_:,.0f} | |")
    print("\n".join(lines))
    print(
        f"\nbare / ours: {total['bare'] / total['ours']:.3f}. `python bench/step_breakdown.py --settings "
        f"{' '.join(args.settings)}`: {args.repeats} × {args.steps - args.warmup - 1} steps each way after "
        f"{args.warmup} warm-up steps; {machine_name(args.device)}."
    )


if __name__ == "__main__":
    main()
