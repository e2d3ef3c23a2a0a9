"""Lightning's learning-rate finder on the training config.  python src/lr_find.py [train.py's overrides]

Prints the suggested learning rate and writes the loss-against-rate plot (lr_find.png) and lr_find.json into
its run dir; it trains nothing for good and changes no config. The work is cnnlab.lr_find.find_lr(cfg).
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="lr_find")
def main(cfg: DictConfig) -> None:
    from cnnlab import UserError
    from cnnlab.checks import check

    try:
        check(cfg, builds=())  # every value, before Lightning is imported
        from cnnlab.lr_find import find_lr

        found = find_lr(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(f"suggested learning rate: {found['suggestion']:.3g} (optimizer.lr={found['optimizer.lr']:g} now; "
          f"python src/train.py optimizer.lr={found['suggestion']:.3g} …) · plot: {found['plot']}")  # fmt: skip


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
