"""The network's shape table, without training.  python src/shapes.py [data=<name>] [model.* overrides]

Per layer: input and output shape, the output-size formula with its numbers, parameters, multiply-adds per
image. `python src/shapes.py size=7 kernel=3 stride=2` answers one question of the lecture's quiz instead.
The work is cnnlab.shapes.
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="shapes")
def main(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    from cnnlab import UserError
    from cnnlab.checks import check
    from cnnlab.shapes import configured_network, format_table, quiz, shape_table

    try:
        if cfg.size is not None or cfg.kernel is not None:
            check(cfg, builds=())
            if cfg.size is None or cfg.kernel is None:
                raise UserError("size=<in> kernel=<k> [stride=1] [padding=0]: give both size and kernel")
            print(quiz(cfg.size, cfg.kernel, cfg.stride, cfg.padding))
            return
        print(format_table(shape_table(configured_network(cfg))))  # checked, sized for its data
    except UserError as err:
        sys.exit(f"error: {err}")
    except InstantiationException as err:  # Hydra wraps what the model raises: a shape that does not fit
        if not isinstance(err.__cause__, UserError):
            raise
        sys.exit(f"error: {err.__cause__}")


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
