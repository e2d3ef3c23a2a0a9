"""Predict the classes of your own images.  python src/predict.py ckpt_path=<checkpoint> inputs=<images> [top_k=3]

Images of any size and mode are converted to RGB and resized to the model's input; the model is a checkpoint, a
run dir, `last`, or a file written by src/export.py. The work is cnnlab.predict.predict_files(cfg).
"""

import sys

import hydra
from omegaconf import DictConfig

import cnnlab.config  # noqa: F401  (registers the run-dir resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from cnnlab import UserError
    from cnnlab.predict import predict_files, table

    try:
        result = predict_files(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not result.files:
        sys.exit(f"error: inputs={cfg.inputs}: none of its {len(result.skipped)} files is an image that could be read")
    print(table(result.files, result.top))
    written = f", written to {cfg.output}" if cfg.output else ""
    print(f"{len(result.files)} images, model {result.model.source}{written}", file=sys.stderr)


if __name__ == "__main__":
    cnnlab.config.run_entry(main)
