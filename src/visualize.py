"""What a trained network learned, as pictures.  python src/visualize.py ckpt_path=<checkpoint> [image=<file>]

Writes filters.png (the first layer's filters) and activations.png (the maps after each conv block, for your
image or one test image per class) beside the checkpoint. The work is cnnlab.visualize.visualize(cfg).
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    from cnnlab import UserError
    from cnnlab.visualize import visualize

    try:
        for path in visualize(cfg):
            print(f"wrote {path}")
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
