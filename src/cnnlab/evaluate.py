"""Evaluation: a trained model (checkpoint or exported file) scored on a test set, as src/eval.py reports it.

`evaluate(cfg)` rebuilds the model from its checkpoint (cnnlab.trained), takes the test split of data.root or a
labelled folder <class>/<image>, and writes metrics.json (accuracy, loss, per-class accuracy, the confusion
matrix) and confusion_matrix.png into the run dir. It runs the network in PyTorch, without Lightning.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from cnnlab import UserError, make, write_atomically, write_metrics
from cnnlab.checks import check
from cnnlab.data.tta import tta_logits, tta_mode
from cnnlab.images import labelled_folder
from cnnlab.pictures import confusion_figure, top_confusions
from cnnlab.trained import Deployable, Model, load_model

log = logging.getLogger(__name__)


def trained_on(description: dict) -> dict | None:
    """The data a checkpoint's run was trained on, as recorded: {"given", "resolved"} data.root, and "data" (its
    name, channels and image size) where the checkpoint is recent enough to say. None for an export."""
    run = (description or {}).get("run") or {}
    return {**run["data_root"], "data": run.get("data")} if run.get("data_root") else None


def evaluation_set(
    data, classes: list[str] | None, shape: tuple[int, int, int], trained_on: dict | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """The test split of a data set (data.root as for training), or a labelled folder <class>/<image>: uint8
    N×C×H×W images, labels numbered as the model's classes (None: as the data's), and those classes.

    `trained_on`: the data the model was trained on, as its checkpoint recorded it (cnnlab.evaluate.trained_on);
    used, and said in one line, when the command names no data (data.root left at CIFAR-10's default) and that
    path is still there."""
    from omegaconf import OmegaConf

    from cnnlab.config import default_of
    from cnnlab.data.sources import TORCHVISION, has_torchvision_files, load_dataset
    from cnnlab.data.trees import find_image_tree

    untouched = data.name == "cifar10" and str(data.root) == str(default_of("root", "data/cifar10"))
    if trained_on and untouched and Path(trained_on["resolved"]).exists():
        recorded = trained_on.get("data") or {}
        if Path(trained_on["resolved"]) != Path(str(data.root)).expanduser().resolve():
            log.info(f"data.root={trained_on['given']}: the data the model was trained on ({trained_on['resolved']}), "
                     f"as this command names none")  # fmt: skip
        data = OmegaConf.merge(data, recorded, {"root": trained_on["resolved"]})

    root = Path(data.root).expanduser()
    is_labelled_folder = (
        root.is_dir() and find_image_tree(root) is None
        and not (data.name in TORCHVISION and has_torchvision_files(data.name, root))
        and any(p.is_dir() for p in root.iterdir())
    )  # fmt: skip
    if is_labelled_folder:
        if classes is None:
            raise UserError(f"data.root={root}: a labelled folder needs a checkpoint that names its classes")
        return *labelled_folder(root, classes, shape), classes
    image_size = shape[1] if data.image_size is None else data.image_size  # a tree: at the model's size
    arrays = load_dataset(data.name, data.root, data.download, data.cache_dir, image_size, data.channels)
    classes = classes or arrays.classes
    unknown = sorted(set(arrays.classes) - set(classes))
    if unknown:
        raise UserError(f"data.root={data.root}: classes {unknown} are not classes of the model ({', '.join(classes)})")
    relabel = np.array([classes.index(name) for name in arrays.classes])
    images = np.ascontiguousarray(arrays.test_images.transpose(0, 3, 1, 2))  # the slides' permute, N×H×W×C → N×C×H×W
    if images.shape[1:] != tuple(shape):
        have, want = ("×".join(map(str, s)) for s in (images.shape[1:], shape))
        raise UserError(f"data.root={data.root}: its images are {have} (data={data.name}, data.channels="
                        f"{data.channels}), the model takes {want}: name the data it was trained on")  # fmt: skip
    return images, relabel[arrays.test_labels], classes


def score(model: Model, images: np.ndarray, labels: np.ndarray, batch_size: int, tta: bool | str = False) -> dict:
    """Accuracy, mean cross-entropy, per-class accuracy and the confusion matrix (rows: true, columns: predicted);
    with `tta` (data.tta), also test/acc_tta: the weighted mean of the logits of several views of each image."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    def logits_of(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate([model.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        )

    logits = logits_of(images)
    target = torch.from_numpy(labels)
    flipped = {}
    if tta_mode(tta):
        mean_logits = tta_logits(logits_of, images, tta_mode(tta), logits)
        flipped = {"test/acc_tta": float((mean_logits.argmax(1) == target).float().mean())}
    confusion = multiclass_confusion_matrix(logits.argmax(1), target, len(model.classes))
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    present = confusion.sum(1) > 0  # a labelled folder may hold only some of the classes
    return {
        "test/acc": float((logits.argmax(1) == target).float().mean()),
        "test/loss": float(nn.functional.cross_entropy(logits, target)),
        **flipped,
        **{
            f"test/acc_class/{name}": float(acc)
            for name, acc, has in zip(model.classes, per_class, present, strict=True)
            if has
        },
        "images": len(labels),
        "confusion_matrix": confusion.tolist(),
        "top_confusions": top_confusions(confusion.tolist(), model.classes),
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    figure = confusion_figure(torch.tensor(confusion), classes)
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(figure)


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint (or an exported .onnx/.pt2) on the test split of data.root, or on a labelled folder
    <class>/<image>: metrics.json (accuracy, loss, per-class accuracy, confusion matrix) and confusion_matrix.png.

    A self-describing checkpoint rebuilds its own model and normalisation; an older one uses model.* and the
    data's mean/std from the config."""
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=<file> is required: the checkpoint to evaluate")
    check(cfg, builds=("model",))  # for a checkpoint too old to describe its own model

    def from_config(checkpoint: dict, path: Path):  # an older checkpoint: the model as model.* configures it
        from cnnlab.module import LitClassifier
        from cnnlab.resume import check_shapes

        module = LitClassifier(make(cfg.model), num_classes=cfg.model.num_classes)
        check_shapes(module, checkpoint, path)
        module.load_state_dict(checkpoint["state_dict"])
        description = {"input_shape": list(module.net.input_shape), "classes": None}  # the data's, below
        return Deployable(module.net, list(cfg.data.mean), list(cfg.data.std)), description

    device = EVAL_DEVICES[cfg.trainer.accelerator]  # check() has refused any other, and a device this machine lacks
    model = load_model(str(cfg.ckpt_path), cfg.outputs_root, device=device, fallback=from_config)
    images, labels, model.description["classes"] = evaluation_set(
        cfg.data, model.classes, model.input_shape, trained_on(model.description)
    )
    scores = score(model, images, labels, cfg.data.eval_batch_size, tta=cfg.data.get("tta", False))
    metrics = {**scores, "ckpt_path": str(model.source), "run_dir": cfg.output_dir}
    plot_confusion(metrics["confusion_matrix"], model.classes, Path(cfg.output_dir) / "confusion_matrix.png")
    tta = f" test/acc_tta={metrics['test/acc_tta']:.4f} ({tta_mode(cfg.data.tta)})" if "test/acc_tta" in metrics else ""
    log.info(f"test/acc={metrics['test/acc']:.4f}{tta} test/loss={metrics['test/loss']:.4f} on {len(labels)} images")
    return write_metrics(metrics, cfg.output_dir)


# trainer.accelerator → the device src/eval.py runs the model on
EVAL_DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}
