"""Train the slides' CNN on CIFAR-10.  python src/train.py [optimizer=sgd_steplr] [key=value ...]

The config is conf/train.yaml and its groups; the work is cnnlab.train.train(cfg).
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cnnlab import UserError
    from cnnlab.checks import check
    from cnnlab.sweep import job_failed

    try:
        check(cfg, builds=())  # every value, before Lightning is imported: a wrong one is its line, at once
    except UserError as err:
        return job_failed(f"error: {err}", cfg.output_dir)
    from cnnlab.stops import Diverged, Interrupted
    from cnnlab.train import first_process, train  # imported here so that --help does not wait for torch

    try:
        metrics = train(cfg)
    except UserError as err:
        if isinstance(err, Diverged) and not first_process():  # decided by all processes: the first one says it
            sys.exit(1)
        return job_failed(f"error: {err}", cfg.output_dir)  # exits 1, or lets a sweep go on to its next job
    except Interrupted as stop:  # Ctrl-C, SIGTERM: the checkpoint is written, say how to resume
        if first_process():  # every process stops at the same step: one line for all of them
            print(stop.report(), file=sys.stderr)
        sys.exit(stop.exit_status)
    if metrics is None:  # another process of a multi-process run: the first one reports
        return None
    best = "none" if metrics["val/acc_best"] is None else f"{metrics['val/acc_best']:.4f}"
    print(f"test/acc={metrics['test/acc']:.4f} val/acc_best={best} run_dir={cfg.output_dir}")
    from cnnlab.search import searched_metric

    return metrics.get(searched_metric())  # what a sweeper optimises: hydra.sweeper.metric, else val/acc_best


if __name__ == "__main__":
    cnnlab.config.run_entry(main, resume=True)
