"""src/visualize.py's work: a checkpoint's first-layer filters and activation maps as PNG files beside it."""

from pathlib import Path

import numpy as np
import torch

from cnnlab import UserError, write_atomically
from cnnlab.checkpoints import load_checkpoint
from cnnlab.checks import check
from cnnlab.data.pixels import normalise
from cnnlab.evaluate import evaluation_set, trained_on
from cnnlab.images import read_images
from cnnlab.pictures import activations_figure, filters_figure
from cnnlab.trained import deployable_from_checkpoint, resolve_model_path


def visualize(cfg) -> list:
    """src/visualize.py: filters.png and activations.png beside the checkpoint; returns their paths."""
    check(cfg, builds=())
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=... is required: python src/visualize.py ckpt_path=<checkpoint> [image=<file>]")
    path = resolve_model_path(str(cfg.ckpt_path), cfg.outputs_root)
    if path.suffix.lower() != ".ckpt":
        raise UserError(f"ckpt_path={path}: visualize reads a Lightning checkpoint (.ckpt)")
    model, description = deployable_from_checkpoint(load_checkpoint(path), path)
    shape = tuple(description["input_shape"])
    if cfg.get("image"):
        kept, images, skipped = read_images([Path(cfg.image).expanduser()], shape)
        if not kept:
            raise UserError(f"image={cfg.image}: {skipped[0][1] if skipped else 'no such file'}")
        names = [Path(cfg.image).name]
    else:
        all_images, labels, classes = evaluation_set(cfg.data, description["classes"], shape, trained_on(description))
        first = [int(np.flatnonzero(labels == c)[0]) for c in sorted(set(labels.tolist()))]
        images, names = all_images[first], [classes[labels[i]] for i in first]
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    inputs = normalise(pixels, model.scale, model.shift)
    figures = {
        "filters.png": filters_figure(model.net),
        "activations.png": activations_figure(model.net, pixels, inputs, names, cfg.maps),
    }
    written = []
    for name, figure in figures.items():
        target = path.parent / name
        write_atomically(target, lambda file, figure=figure: figure.savefig(file, format="png", dpi=120))
        written.append(target)
    import matplotlib.pyplot as plt

    plt.close("all")
    return written
