"""Export a checkpoint as ONNX or .pt2 and check the file.  python src/export.py ckpt_path=<file> format=onnx|pt2

The exported model takes uint8 images N×C×H×W (any N) and returns logits; the normalisation is inside. The work
is cnnlab.export.export_checked(cfg); exit status 1 when the file's outputs do not match the checkpoint's.
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from cnnlab import UserError
    from cnnlab.export import export_checked

    try:
        path, parity = export_checked(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path}")
    print(parity)
    if not parity.ok:
        sys.exit(f"error: {path} does not match its checkpoint (tolerance 1e-3 on logits, every top-1 the same)")


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
