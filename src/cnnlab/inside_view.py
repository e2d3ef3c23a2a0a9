"""The trackers' side of cnnlab.pictures: the first layer's filters and the activation maps, while training."""

import torch
from lightning import Callback, LightningModule, Trainer

from cnnlab.pictures import conv_blocks, filter_grid, map_grid, map_input_grid
from cnnlab.tracking import PICTURE_LOGGERS, log_picture


class InsideView(Callback):
    """Logs, every `every_n_epochs` at the end of validation: the first layer's filters as a colour grid, and
    for one fixed validation image per class the inputs and the maps after each conv block (a row per image),
    to TensorBoard's IMAGES tab (MLflow: artifacts, W&B: media). The images are the first of each class in the
    validation split, the same every epoch. The tags are `view/…`: TensorBoard sorts its groups by name, so the
    pictures come after the learning rate, `train/` and `val/`. Its cost: bench/inside_cost.py."""

    def __init__(self, every_n_epochs: int):
        self.every_n_epochs = every_n_epochs
        self.images: torch.Tensor | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, PICTURE_LOGGERS)]
        datamodule = trainer.datamodule
        if not loggers or not hasattr(datamodule, "splits") or "val" not in datamodule.splits:
            return
        if self.images is None:
            images, labels = datamodule.splits["val"]
            # one per class, in order; the first ten classes of a data set with more (CIFAR-100)
            first = [int((labels == c).nonzero()[0]) for c in labels.unique().tolist()[:10]]
            self.images = images[first]
        net = pl_module.net
        with torch.no_grad():
            inputs = datamodule.normalize(self.images.to(pl_module.device))
            blocks = conv_blocks(net, inputs.to(next(net.parameters()).dtype))
        step = trainer.global_step
        log_picture(loggers, "view/conv1_filters", filter_grid(net), step)
        log_picture(loggers, "view/inputs", map_input_grid(self.images), step)
        for name, maps in blocks:
            log_picture(loggers, f"view/maps_{name.removeprefix('after ')}", map_grid(maps), step)
