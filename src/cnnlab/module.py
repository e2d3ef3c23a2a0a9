"""The LightningModule: a classifier around any network, with its loss, metrics, logging and optimizer."""

import inspect
from collections.abc import Callable

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cnnlab import UserError
from cnnlab.data.tta import tta_logits, tta_mode
from cnnlab.distill import distillation_loss, load_teacher
from cnnlab.pictures import confusion_figure
from cnnlab.tracking import PICTURE_LOGGERS, log_picture, tracker_runs
from cnnlab.training_form import contract_state, saved_training_form, training_state

INITIALISATION_IMAGES = 5000  # airbench's sample for its whitened first layer


def per_step(scheduler: Callable) -> bool:
    """A scheduler partial that takes `total_steps` (OneCycleLR) is a schedule over the run's optimizer steps,
    stepped after each batch; the others are stepped once an epoch."""
    return "total_steps" in inspect.signature(scheduler.func).parameters


class LitClassifier(LightningModule):
    """Cross-entropy on logits, accuracy from torchmetrics (validation, test), metrics logged as `stage/metric`.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`): the optimizer still needs the
    parameters, the scheduler the optimizer. So any torch.optim optimizer or scheduler is one YAML file.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,  # None: for testing only
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_classes: int = 10,
        model_config: dict | None = None,  # the config that built `net` (plain data), kept in checkpoints
        criterion: nn.Module | None = None,  # the training loss; None: nn.CrossEntropyLoss()
        tta: bool | str = False,  # the test also scores views of each image (cnnlab.data.tta): test/acc_tta
        run: dict | None = None,  # what checkpoints keep of the run (cnnlab.train.run_record), plain data
        teacher: dict | None = None,  # conf/teacher: checkpoints, temperature, weight (cnnlab.distill)
    ):
        super().__init__()
        # Checkpoints keep num_classes and the model's config as plain data (no pickled classes); the network
        # is rebuilt from that config (cnnlab.trained), the optimizer from the run's.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "criterion"], logger=False)
        self.net = net
        self.teachers: list = []  # the teacher, loaded when the fit starts; in a list: not trained, not saved
        self.optimizer, self.scheduler = optimizer, scheduler
        # Training minimises `criterion` (e.g. CrossEntropyLoss(label_smoothing=0.1)); val/loss and test/loss are
        # the plain cross-entropy whatever it is, so runs with different losses compare.
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.accuracy = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test", "test_tta")}
        )
        # The training epoch's loss and accuracy as running sums (loss × images, correct predictions) on the
        # model's device, and a count of images: one small in-place add per step, where torchmetrics' updates and
        # a per-step self.log cost far more (bench/step_breakdown.py times each phase of a step).
        self.train_sums = torch.zeros(2)  # float32, not a buffer: bf16-true would round the sums
        self.train_images = 0
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion_counts: list[list[int]] | None = None
        self.test_per_class: dict[str, float] = {}
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run keeps its best
        # Lets Lightning's model summary show each layer's input and output sizes at start-up.
        self.example_input_array = torch.zeros(1, *getattr(net, "input_shape", (3, 32, 32)))

    def setup(self, stage: str) -> None:
        classes = getattr(self.trainer.datamodule, "classes", None) or []
        if len(classes) > self.hparams.num_classes:
            raise UserError(
                f"the data has {len(classes)} classes, model.num_classes={self.hparams.num_classes}: "
                f"set model.num_classes={len(classes)}"
            )
        splits = getattr(self.trainer.datamodule, "splits", None)
        if stage == "fit" and self.hparams.teacher and not self.teachers:
            # the teacher before any callback's on_fit_start (the learning-rate finder trains there)
            datamodule = self.trainer.datamodule
            if datamodule is None:
                raise UserError("teacher: distillation needs the run's data module (its normalisation and classes)")
            teacher = self.hparams.teacher
            self.teachers = [load_teacher(teacher["checkpoints"], datamodule.mean, datamodule.std, datamodule.classes,
                                          self.net.input_shape).to(self.trainer.strategy.root_device)]  # fmt: skip
        if stage == "fit" and splits and hasattr(self.net, "initialise"):
            # Initialisations computed from the data (model.init=whitened), from a sample of the training split drawn
            # with the run's seed: the same on every process. A resumed run's weights then come from its checkpoint.
            datamodule, images = self.trainer.datamodule, splits["train"][0]
            generator = torch.Generator().manual_seed(datamodule.hparams.seed)
            sample = torch.randperm(len(images), generator=generator)[:INITIALISATION_IMAGES].to(images.device)
            self.net.initialise(datamodule.normalize(images[sample]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        if self.teachers:  # distillation: the teacher's outputs for this very (augmented) batch
            teacher = self.hparams.teacher
            loss = distillation_loss(logits, self.teachers[0](images), loss, teacher["temperature"], teacher["weight"])
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
            self.train_sums += torch.stack((loss * len(labels), correct.to(loss.dtype)))
        self.train_images += len(labels)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps the loggers write
            self.log("train/loss_step", loss.detach(), prog_bar=True)
        return loss

    def eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        self.accuracy[stage].update(logits, labels)
        loss = nn.functional.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/acc", self.accuracy[stage], prog_bar=stage == "val")
        return logits

    def validation_step(self, batch, batch_idx):
        self.eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        logits = self.eval_step(batch, "test")  # test/acc stays single-view, comparable with every other run
        self.test_confusion.update(logits, batch[1])
        if mode := tta_mode(self.hparams.tta):  # test-time augmentation: the weighted mean of several views' logits
            self.accuracy["test_tta"].update(tta_logits(self, batch[0], mode, logits), batch[1])
            self.log("test/acc_tta", self.accuracy["test_tta"])

    def on_test_epoch_end(self) -> None:
        """Per-class test accuracy (for metrics.json) and, in TensorBoard, as one bar chart beside the confusion
        matrix: two cards, where a scalar a class would put ten single points above `train/` and `val/`."""
        confusion = self.test_confusion.compute()  # rows: true class, columns: predicted class; summed over processes
        self.test_confusion_counts = confusion.tolist()  # for metrics.json
        per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
        names = getattr(self.trainer.datamodule, "classes", None) or []
        if len(names) != len(per_class):  # a data set with fewer classes than the model's outputs
            names = [str(i) for i in range(len(per_class))]
        self.test_per_class = {name: float(accuracy) for name, accuracy in zip(names, per_class, strict=True)}
        if any(isinstance(logger, PICTURE_LOGGERS) for logger in self.loggers):
            step = self.global_step
            log_picture(self.loggers, "test/confusion_matrix", confusion_figure(confusion.cpu(), names), step)
            log_picture(self.loggers, "test/acc_per_class", per_class_chart(self.test_per_class), step)
        self.test_confusion.reset()

    def on_train_epoch_start(self) -> None:
        # Zero at a fresh epoch (reset when the last one ended); a run resumed mid-epoch goes on from its checkpoint's.
        self.train_sums = self.train_sums.to(self.device)

    def on_train_epoch_end(self) -> None:
        if self.train_images > 0:
            sums = torch.cat((self.train_sums, self.train_sums.new_tensor([self.train_images])))
            loss_sum, correct, images = self.trainer.strategy.reduce(sums, reduce_op="sum")  # summed over processes
            self.log("train/loss_epoch", loss_sum / images, sync_dist=True)  # already summed: the same everywhere
            self.log("train/acc", correct / images, sync_dist=True)
        self.train_sums, self.train_images = torch.zeros(2, device=self.device), 0

    def on_fit_end(self) -> None:
        # model.expand, model.batchnorm: the training-time form is contracted into the slides' network, so that the
        # test (and all that loads the checkpoints: eval, predict, export) sees that network
        if hasattr(self.net, "contract"):
            self.net.contract()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint holds the slides' network: a training-time form contracted (cnnlab.training_form), the
        # entries it replaced kept beside the weights for a resumed run, which trains on with them (on_load_checkpoint)
        checkpoint["state_dict"], replaced = contract_state(checkpoint["state_dict"])
        if replaced:
            checkpoint["training_form"] = replaced
        checkpoint["train_sums"] = {"sums": self.train_sums.cpu(), "images": self.train_images}
        checkpoint["trackers"] = tracker_runs(self.loggers)  # a resumed run continues its MLflow / W&B run
        datamodule = self.trainer.datamodule
        if self.hparams.model_config is not None and datamodule is not None:
            # What it takes to rebuild the network and feed it, as plain data: eval, predict and export need no
            # other flags (cnnlab.trained.load_model).
            checkpoint["cnnlab"] = {
                "model": contracted_config(self.hparams.model_config),
                "input_shape": list(self.net.input_shape),
                "mean": list(datamodule.mean),  # the normalisation's, computed from the data where not configured
                "std": list(datamodule.std),
                "classes": list(datamodule.classes),
                "run": self.hparams.run,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self.net, "in_training_form", False):  # still training in it: a resumed run
            checkpoint["state_dict"] = training_state(checkpoint["state_dict"], saved_training_form(checkpoint))
        if "train_sums" in checkpoint:
            self.train_sums, self.train_images = checkpoint["train_sums"]["sums"], checkpoint["train_sums"]["images"]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the check before training is not an epoch
            return
        self.val_acc_best(self.accuracy["val"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer(params=self.parameters())
        if self.scheduler is None:
            return optimizer
        if per_step(self.scheduler):
            # A schedule over the run's optimizer steps (OneCycleLR: warm-up, then decay), stepped after each batch;
            # Lightning counts the steps (epochs × batches per epoch, per process).
            steps = self.trainer.estimated_stepping_batches
            try:
                scheduler = self.scheduler(optimizer=optimizer, total_steps=steps)
            except (ZeroDivisionError, ValueError) as err:  # OneCycleLR's phases need a few steps each
                name = getattr(getattr(self.scheduler, "func", None), "__name__", None) or "the schedule"
                raise UserError(f"scheduler: {name} cannot be laid out over this run's {steps} optimizer step(s) "
                                f"({err or type(err).__name__}): give more trainer.max_steps or trainer.max_epochs, "
                                f"or an optimizer option with a per-epoch schedule") from None  # fmt: skip
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer=optimizer)}  # stepped each epoch


def contracted_config(model_config: dict) -> dict:
    """The config of the network a checkpoint holds: a training-time form (model.expand, model.batchnorm) is saved
    contracted."""
    forms = {key: value for key, value in (("expand", None), ("batchnorm", False)) if model_config.get(key)}
    return {**model_config, **forms}


def per_class_chart(accuracy: dict[str, float]):
    """A bar a class: its test accuracy in %; for more than 20 classes, the 20 worst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(accuracy) > 20:  # CIFAR-100: the 20 worst classes, worst on top (all of them are in metrics.json)
        accuracy = dict(sorted(accuracy.items(), key=lambda item: item[1])[:20])
    figure, axes = plt.subplots(figsize=(6, 0.35 * len(accuracy) + 1))
    names = list(accuracy)[::-1]  # the first class on top
    axes.barh(names, [100 * accuracy[name] for name in names], color="#4c72b0")
    axes.set_xlim(0, 100)
    axes.set_xlabel("test accuracy (%)")
    figure.tight_layout()
    return figure
