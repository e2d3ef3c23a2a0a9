"""Test a saved checkpoint on the CIFAR-10 test set.  python src/eval.py ckpt_path=<file> [key=value ...]

Pass the same model.* overrides as for training. The work is cnnlab.evaluate.evaluate(cfg).
"""

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from cnnlab import UserError
    from cnnlab.evaluate import evaluate
    from cnnlab.sweep import job_failed

    try:
        metrics = evaluate(cfg)
    except UserError as err:
        return job_failed(f"error: {err}", cfg.output_dir)
    print(f"test/acc={metrics['test/acc']:.4f} ckpt_path={metrics['ckpt_path']} run_dir={cfg.output_dir}")


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
