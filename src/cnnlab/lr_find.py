"""Lightning's learning-rate finder on a composed training config: the suggested rate and its plot; no config changes.

`find_lr(cfg)` builds the run as train() does (data, network, module, Trainer) and hands it to Lightning's
`Tuner.lr_find`: `lr_find.num_training` optimizer steps with the learning rate growing from `lr_find.min_lr` to
`lr_find.max_lr`, the loss recorded at each (the range test of Smith, 2017). It writes lr_find.png and
lr_find.json into its run dir and returns the suggestion: the rate where the loss fell fastest. Nothing is
trained for good and no config is changed: `optimizer.lr=<the suggestion>` is the user's to give.
"""

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from cnnlab import UserError, write_atomically
from cnnlab.checks import check
from cnnlab.quiet import quiet_libraries
from cnnlab.train import build

log = logging.getLogger(__name__)


BETA = 0.98  # Lightning's _LRCallback: the weight of the running mean of the loss


def unbiased(losses: list[float], beta: float = BETA) -> list[float]:
    """Lightning's finder keeps a running mean of the loss, m_n = β·m_(n−1) + (1 − β)·loss_n from m = 0, and
    divides it by 1 − β^(n+2) where 1 − β^(n+1) undoes the start from 0 (it counts the step already taken), so its
    curve starts at about half the loss and rises over the first ~100 steps (Lightning issue #14167), and its
    suggestion lands on that rise. The same means, divided as they should be: the first is the first loss."""
    return [loss * (1 - beta ** (n + 2)) / (1 - beta ** (n + 1)) for n, loss in enumerate(losses)]


def steepest_descent(lrs: list[float], losses: list[float], mode: str, skip_begin: int = 10,
                     skip_end: int = 1) -> int | None:  # fmt: skip
    """Where the loss falls fastest against the rate as the plot draws it (its logarithm in exponential mode), the
    first `skip_begin` and last `skip_end` steps left out, as Lightning's own suggestion does; Lightning takes the
    slope against the rate itself, so that on an exponential range the smallest rates' noise wins (2e-6 for Adam
    on CIFAR-10, where its curve falls fastest at 3e-3). None: too few finite steps."""
    kept = [i for i in range(skip_begin, len(losses) - skip_end) if np.isfinite(losses[i])]
    if len(kept) < 3:
        return None
    x = np.array([lrs[i] for i in kept])
    slope = np.gradient(np.array([losses[i] for i in kept]), np.log(x) if mode == "exponential" else x)
    return kept[int(np.argmin(slope))]


def find_lr(cfg: DictConfig) -> dict:
    """Run the range test; {"suggestion", "lr", "loss", "optimizer.lr", "plot"} (also in <run dir>/lr_find.json)."""
    check(cfg)
    quiet_libraries(cfg.verbose)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.fit_loop.max_epochs = -1  # the finder's steps (lr_find.num_training) decide, not the run's epochs
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=cfg.lr_find.min_lr,
        max_lr=cfg.lr_find.max_lr,
        num_training=cfg.lr_find.num_training,
        mode=cfg.lr_find.mode,
        early_stop_threshold=cfg.lr_find.early_stop_threshold,
        update_attr=False,  # the config stays as it is
    )
    if finder is None:  # debug=fdr: Lightning skips the tuner
        raise UserError("lr_find: nothing was run (trainer.fast_dev_run skips the learning-rate finder)")
    lrs, losses = finder.results["lr"], unbiased(finder.results["loss"])
    finder.results["loss"] = losses  # what its plot draws
    steps = len(lrs)
    best = steepest_descent(lrs, losses, cfg.lr_find.mode)
    if best is None:
        raise UserError(f"lr_find: the loss was recorded at {steps} step(s), too few to find where it falls fastest: "
                        f"give more lr_find.num_training (it is {cfg.lr_find.num_training}), or "
                        f"lr_find.early_stop_threshold=null so that a rising loss does not end it early")  # fmt: skip
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suggestion = lrs[best]
    figure = finder.plot()
    axes = figure.axes[0]
    axes.plot(suggestion, losses[best], marker="o", markersize=10, color="red")
    axes.set_title(f"lr_find: suggested lr {suggestion:.2e} (optimizer.lr={cfg.optimizer.lr:g} now)")
    finite = [loss for loss in losses if np.isfinite(loss)]
    axes.set_ylim(0.95 * min(finite), 1.25 * losses[0])  # the untrained network's loss and below: not the blow-up
    plot = run_dir / "lr_find.png"
    write_atomically(plot, lambda file: figure.savefig(file, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)
    result = {"suggestion": suggestion, "optimizer.lr": cfg.optimizer.lr, "steps": steps, "plot": str(plot),
              "lr": [float(x) for x in lrs], "loss": [float(x) for x in losses]}  # fmt: skip
    write_atomically(run_dir / "lr_find.json", (json.dumps(result, indent=2) + "\n").encode())
    return result
