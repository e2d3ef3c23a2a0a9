"""The ablation of docs/results.md: from the slides' Option 2 to experiment=best, one lever at a time.

    python bench/ablation.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--only 05-epochs40 ...] [--table]

Each step is one `python src/train.py` run (seed 0) into outputs/ablation/<step>/, one after the other; a step
whose metrics.json is there already is not run again. Every step lists all of its overrides, so each line of the
table is a command anyone can re-run. `--table` prints the table from the metrics.json files found.
Takes about an hour on 2 CPU cores. While the file outputs/ablation/PAUSE exists, the next step waits (to run
something else on the machine between steps without sharing the cores). A benchmark, not a test.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "ablation"

SPEED = ["model.channels_last=true", "trainer.precision=bf16-mixed"]  # fast_cpu's speed settings: the same math
AUGMENT = ["data.augment=true", "data.tta=true"]  # data.tta: test/acc_tta reported beside test/acc
LONG = ["trainer.max_epochs=40"]
ONECYCLE = ["optimizer=sgd_onecycle", "optimizer.nesterov=false", "optimizer.weight_decay=0"]
CHOSEN = "CHOSEN_AUGMENT"  # replaced by the crop padding of step 05 or 06, whichever has the better val/acc_best

# (step, what it adds, all of its overrides); each step keeps the one before it unless it says otherwise.
STEPS = [
    ("00-option2", "the slides' Option 2: SGD + StepLR, fp32, batch 64, 20 epochs", ["optimizer=sgd_steplr"]),
    ("01-bf16", "bf16 autocast + channels_last (speed only)", ["optimizer=sgd_steplr", *SPEED]),
    ("02-flip", "random horizontal flip", ["optimizer=sgd_steplr", *SPEED, *AUGMENT, "data.crop_padding=0"]),
    ("03-crop2", "random crop, 2-pixel padding, + flip",
     ["optimizer=sgd_steplr", *SPEED, *AUGMENT, "data.crop_padding=2"]),
    ("04-crop4", "random crop, 4-pixel padding, + flip",
     ["optimizer=sgd_steplr", *SPEED, *AUGMENT, "data.crop_padding=4"]),
    ("05-epochs40", "40 epochs (StepLR's step at 20), flip only",
     ["optimizer=sgd_steplr", *SPEED, *AUGMENT, "data.crop_padding=0", *LONG, "scheduler.step_size=20"]),
    ("06-crop2-40", "40 epochs, random crop (2-pixel padding) + flip",
     ["optimizer=sgd_steplr", *SPEED, *AUGMENT, "data.crop_padding=2", *LONG, "scheduler.step_size=20"]),
    # From here on: the better of 05 and 06 on validation (CHOSEN_AUGMENT).
    ("07-onecycle", "one-cycle schedule: warm-up (20 %) to lr 0.02, linear decay",
     [*ONECYCLE, *SPEED, *AUGMENT, CHOSEN, *LONG]),
    ("08-smoothing", "label smoothing 0.1", [*ONECYCLE, *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1"]),
    ("09-decay", "weight decay 5e-4",
     [*ONECYCLE, *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1", "optimizer.weight_decay=0.0005"]),
    ("10-nesterov", "Nesterov momentum",
     ["optimizer=sgd_onecycle", *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1"]),
    ("11-ema", "EMA of the weights (decay 0.999)",
     ["optimizer=sgd_onecycle", *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1", "callbacks=ema"]),
    ("12-dropout", "dropout 0.5 → 0.25",
     ["optimizer=sgd_onecycle", *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1", "callbacks=ema",
      "model.dropout=0.25"]),
    ("13-batch128", "batch 128, lr 0.04",
     ["optimizer=sgd_onecycle", *SPEED, *AUGMENT, CHOSEN, *LONG, "loss.label_smoothing=0.1", "callbacks=ema",
      "model.dropout=0.25", "data.batch_size=128", "optimizer.lr=0.04"]),
]  # fmt: skip


def chosen_augment() -> str:
    """Flip only, or random crop + flip, for the 40-epoch steps: whichever validated better at 40 epochs."""
    val = {
        step: json.loads((OUT / step / "metrics.json").read_text())["val/acc_best"]
        for step in ("05-epochs40", "06-crop2-40")
    }
    return "data.crop_padding=0" if val["05-epochs40"] >= val["06-crop2-40"] else "data.crop_padding=2"


def run(step: str, overrides: list[str], data: str) -> None:
    folder = OUT / step
    if (folder / "metrics.json").exists():
        return
    while (OUT / "PAUSE").exists():
        time.sleep(5)
    overrides = [chosen_augment() if o == CHOSEN else o for o in overrides]
    command = [sys.executable, str(ROOT / "src/train.py"), *overrides, f"data.root={data}", "seed=0",
               "callbacks.inside=null", f"hydra.run.dir={folder}"]  # fmt: skip
    print(f"{step}: {' '.join(command[1:])}", flush=True)
    with open(OUT / f"{step}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    if done.returncode != 0:
        print(f"{step}: failed (exit {done.returncode}), see {OUT / f'{step}.log'}", flush=True)


def table() -> str:
    lines = [
        "| step | adds | best val acc | test acc | test acc, flip TTA | epochs | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for step, adds, _ in STEPS:
        path = OUT / step / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        tta = f"{m['test/acc_tta']:.2%}" if "test/acc_tta" in m else "–"
        lines.append(f"| {step} | {adds} | {m['val/acc_best']:.2%} | {m['test/acc']:.2%} | {tta} | {m['epochs']} | "
                     f"{m['wall_s']:.0f} |")  # fmt: skip
    return "\n".join(lines).replace("%", " %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--table", action="store_true", help="only print the table of the steps already run")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for step, _, overrides in STEPS:
            if args.only is None or step in args.only:
                run(step, overrides, args.data)
    print(table())
    print("\ncommands: python src/train.py <overrides> seed=0 callbacks.inside=null data.root=...")
    for step, _, overrides in STEPS:
        print(f"  {step}: {' '.join(overrides)}")
    print(f"  ({CHOSEN}: {chosen_augment() if (OUT / '06-crop2-40' / 'metrics.json').exists() else 'not chosen yet'})")


if __name__ == "__main__":
    main()
