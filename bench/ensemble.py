"""Test accuracy of trained checkpoints, each alone and as an ensemble (the mean of their logits): a teacher's.

    python bench/ensemble.py CKPT_OR_RUN_DIR ... [--data ../shared/data/cifar10-jpeg.tar.gz]

The ensemble is what `teacher=checkpoints` distils from (cnnlab/distill.py: the mean logits of its members, each
in its own normalisation). Members of one data set, scored on the test split of --data (CIFAR-10's, read as
conf/data/cifar10.yaml reads it). A benchmark, not a test.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from cnnlab import UserError
from cnnlab.evaluate import evaluation_set
from cnnlab.trained import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="+", help="checkpoints or run folders (a folder: its best checkpoint)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        data = compose("train", [f"data.root={args.data}"]).data
    try:  # a path that is not a cnnlab checkpoint or run folder, members of other data sets: one line
        models = [load_model(member, device="cpu") for member in args.members]
        if len({(tuple(model.classes), tuple(model.input_shape)) for model in models}) > 1:
            raise UserError("the members were trained on different classes or image shapes: members of one data set")
        images, labels, _ = evaluation_set(data, models[0].classes, models[0].input_shape)
    except UserError as err:
        sys.exit(f"error: {str(err).removeprefix('ckpt_path=')}")
    logits = []
    for member, model in zip(args.members, models, strict=True):
        batches = range(0, len(images), args.batch_size)
        logits.append(np.concatenate([model.run(images[i : i + args.batch_size]) for i in batches]))
        print(f"{member}: test/acc {np.mean(logits[-1].argmax(1) == labels):.2%}")
    print(f"ensemble of {len(models)}: test/acc {np.mean(np.mean(logits, 0).argmax(1) == labels):.2%}")


if __name__ == "__main__":
    main()
