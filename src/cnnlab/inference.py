"""Use a trained model: rebuild it from a self-describing checkpoint, feed it image files, export it.

A checkpoint carries, as plain data, the model's config, its input shape, the normalisation and the class
names (LitClassifier.on_save_checkpoint, key "cnnlab"). From it `load_model` builds a `Deployable`: the network
in eval mode behind the slides' pre-processing, so that it takes what image files give, uint8 N×3×H×W, and
returns logits. The same `Deployable` is what `export` writes as ONNX (torch's dynamo exporter) or as a .pt2
(torch.export), with the description beside it, so `load_model` reads those files back with the same
interface. The slides end the network with softmax → class: `predict` does that step, top-k.
"""

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image, UnidentifiedImageError
from torch import nn

from cnnlab import UserError, write_atomically
from cnnlab.checks import check
from cnnlab.resume import find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)
EXTRA = "pip install -e '.[export]' (make install does it)"
FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
DESCRIPTION = "cnnlab.json"  # the description's name inside an exported file


class Deployable(nn.Module):
    """uint8 images N×3×H×W (as image files give them, after the slides' permute) → logits N×classes.

    The normalisation of training is folded in; the network is in eval mode (dropout off)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() / 255 - self.mean) / self.std)


@dataclass
class Model:
    """A model ready to predict, from a checkpoint or an exported file: `run` takes uint8 N×3×H×W numpy."""

    source: Path
    description: dict  # model, input_shape, mean, std, classes
    run: object  # numpy uint8 batch → numpy logits

    @property
    def classes(self) -> list[str]:
        return self.description["classes"]

    @property
    def image_size(self) -> tuple[int, int]:
        _, height, width = self.description["input_shape"]
        return height, width


# ------------------------------------------------------------------------------------------ loading


def resolve_model_path(ckpt_path: str, outputs_root: str) -> Path:
    """A checkpoint or exported file; a run dir → its best checkpoint; `last` → the newest run's best."""
    if ckpt_path == "last":
        return best_of_run(find_checkpoint("last", outputs_root).parent.parent)
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        return best_of_run(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file or run dir")
    return path


def best_of_run(run: Path) -> Path:
    metrics = run / "metrics.json"
    if metrics.is_file() and (best := json.loads(metrics.read_text()).get("best_checkpoint")) and Path(best).is_file():
        return Path(best)
    candidates = sorted((run / "checkpoints").glob("epoch_*.ckpt")) or sorted((run / "checkpoints").glob("last.ckpt"))
    if not candidates:
        raise UserError(f"ckpt_path={run}: a folder without checkpoints/*.ckpt: give a run dir or a checkpoint file")
    return candidates[-1]


def build_net(description: dict, source: Path) -> nn.Module:
    """The network a description names. Only cnnlab's own classes are built: a stored `_target_` is code named
    by a file, and a file from elsewhere must not choose what runs."""
    config = dict(description["model"])
    target = str(config.get("_target_", ""))
    if not target.startswith("cnnlab."):
        raise UserError(f"ckpt_path={source}: its model is {target or 'not named'}, not one of cnnlab's; refused")
    try:
        return instantiate(config)
    except Exception as err:
        raise UserError(f"ckpt_path={source}: cannot rebuild its model from {config} ({err})") from err


def description_of(checkpoint: dict, source: Path) -> dict:
    description = checkpoint.get("cnnlab")
    if not isinstance(description, dict) or not {"model", "input_shape", "mean", "std", "classes"} <= set(description):
        raise UserError(
            f"ckpt_path={source}: the checkpoint does not describe its model (made before cnnlab wrote "
            f"self-describing checkpoints?): evaluate it with src/eval.py and the model.* overrides it was trained with"
        )
    return description


def deployable_from_checkpoint(checkpoint: dict, path: Path) -> tuple[Deployable, dict]:
    """The Deployable a loaded checkpoint (from `path`) describes, with its weights."""
    description = description_of(checkpoint, path)
    net = build_net(description, path)
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"ckpt_path={path}: its weights do not fit its own model ({str(err).splitlines()[0]})") from err
    return Deployable(net, description["mean"], description["std"]).eval(), description


def load_model(ckpt_path: str, outputs_root: str = "outputs", device: str = "auto", fallback=None) -> Model:
    """A .ckpt (run in PyTorch, on the GPU when there is one), an .onnx (onnxruntime) or a .pt2 (torch.export).

    `fallback(checkpoint, path)`: builds (Deployable, description) for a checkpoint that does not describe its
    model (src/eval.py passes one that uses the model.* config)."""
    path = resolve_model_path(ckpt_path, outputs_root)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(path)
    if suffix == ".pt2":
        return load_pt2(path)
    checkpoint = load_checkpoint(path)
    if fallback is not None and "cnnlab" not in checkpoint:
        model, description = fallback(checkpoint, path)
    else:
        model, description = deployable_from_checkpoint(checkpoint, path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    model = model.to(target)

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images).to(target)).float().cpu().numpy()

    return Model(path, description, run)


def load_onnx(path: Path) -> Model:
    onnx, onnxruntime = import_extra("onnx"), import_extra("onnxruntime")
    try:
        properties = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise UserError(f"ckpt_path={path}: not an ONNX model onnxruntime can load ({err})") from err
    if DESCRIPTION not in properties:
        raise UserError(f"ckpt_path={path}: an ONNX model not exported by cnnlab (no {DESCRIPTION} in its metadata)")
    input_name = session.get_inputs()[0].name
    return Model(path, json.loads(properties[DESCRIPTION]), lambda images: session.run(None, {input_name: images})[0])


def load_pt2(path: Path) -> Model:
    extra = {DESCRIPTION: ""}
    torch_export_log = logging.getLogger("torch.export")
    level = torch_export_log.level
    torch_export_log.setLevel(logging.CRITICAL)  # it logs a traceback of its own before raising
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:
        raise UserError(f"ckpt_path={path}: not a torch.export program that loads ({err})") from err
    finally:
        torch_export_log.setLevel(level)
    if not extra[DESCRIPTION]:
        raise UserError(f"ckpt_path={path}: a .pt2 not exported by cnnlab (no {DESCRIPTION} inside)")
    module = program.module()

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images)).numpy()

    return Model(path, json.loads(extra[DESCRIPTION]), run)


def import_extra(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"{name} is not installed: it comes with cnnlab's export extra, {EXTRA}") from None


# ------------------------------------------------------------------------------------------ images


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def find_images(inputs: str) -> list[Path]:
    """An image file, a folder (every file under it) or a glob pattern, as sorted paths."""
    path = Path(inputs).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"inputs={inputs}: the folder is empty")
    else:
        import glob

        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(inputs), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"inputs={inputs}: no such file or folder, and no file matches it as a pattern")
    return files


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Any image PIL reads, any size and mode → RGB, resized to the model's input → uint8 C×H×W."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return pixels.transpose(2, 0, 1)  # H×W×C → C×H×W: the slides' permute, for one image


def read_images(files: list[Path], size: tuple[int, int]) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """The images that could be read, as one uint8 N×3×H×W array, and the files skipped with the reason."""
    kept, arrays, skipped = [], [], []
    for path in files:
        try:
            arrays.append(read_image(path, size))
            kept.append(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
            skipped.append((path, reason))
    images = np.stack(arrays) if arrays else np.zeros((0, 3, *size), dtype=np.uint8)
    return kept, images, skipped


def labelled_folder(root: Path, classes: list[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A folder of the user's own labelled images, <class>/<image>, any sizes: images and label indices."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise UserError(f"data.root={root}: folders {unknown} are not classes of the model ({', '.join(classes)})")
    images, labels = [], []
    for folder in folders:
        kept, pixels, skipped = read_images(sorted(p for p in folder.rglob("*") if p.is_file()), size)
        for path, reason in skipped:
            log.warning(f"skipped {path}: {reason}")
        images.append(pixels)
        labels += [classes.index(folder.name)] * len(kept)
    if not labels:
        raise UserError(f"data.root={root}: no images in <class>/ folders to evaluate on")
    return np.concatenate(images), np.array(labels, dtype=np.int64)


def trained_on(description: dict) -> dict | None:
    """The data.root a checkpoint's run was trained on, as recorded (None for an older checkpoint or an export)."""
    return ((description or {}).get("run") or {}).get("data_root")


def evaluation_set(
    data, classes: list[str] | None, size: tuple[int, int], trained_on: dict | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """The test split of a CIFAR-10 source (data.root as for training), or a labelled folder <class>/<image>:
    uint8 N×3×H×W images, labels numbered as the model's classes (None: as the data's), and those classes.

    `trained_on`: the data.root the model was trained on, as its checkpoint recorded it ({"given", "resolved"});
    used, and said in one line, when data.root is left at its default and that path is still there."""
    from omegaconf import OmegaConf

    from cnnlab.config import default_of
    from cnnlab.data import find_image_tree, load_cifar10

    untouched = str(data.root) == str(default_of("root", "data/cifar10"))
    if trained_on and untouched and Path(trained_on["resolved"]).exists():
        if Path(trained_on["resolved"]) != Path(str(data.root)).expanduser().resolve():
            log.info(f"data.root={trained_on['given']}: the data the model was trained on ({trained_on['resolved']}), "
                     f"as this command names none")  # fmt: skip
        data = OmegaConf.merge(data, {"root": trained_on["resolved"]})

    root = Path(data.root).expanduser()
    is_labelled_folder = (
        root.is_dir() and find_image_tree(root) is None and not (root / "cifar-10-batches-py").is_dir()
        and any(p.is_dir() for p in root.iterdir())
    )  # fmt: skip
    if is_labelled_folder:
        if classes is None:
            raise UserError(f"data.root={root}: a labelled folder needs a checkpoint that names its classes")
        return *labelled_folder(root, classes, size), classes
    arrays = load_cifar10(data.root, data.download, data.cache_dir)
    classes = classes or arrays.classes
    unknown = sorted(set(arrays.classes) - set(classes))
    if unknown:
        raise UserError(f"data.root={data.root}: classes {unknown} are not classes of the model ({', '.join(classes)})")
    relabel = np.array([classes.index(name) for name in arrays.classes])
    images = np.ascontiguousarray(arrays.test_images.transpose(0, 3, 1, 2))  # the slides' permute, N×H×W×C → N×C×H×W
    if images.shape[2:] != size:
        raise UserError(f"data.root={data.root}: its images are {images.shape[2:]}, the model takes {size}")
    return images, relabel[arrays.test_labels], classes


def score(model: Model, images: np.ndarray, labels: np.ndarray, batch_size: int, tta: bool = False) -> dict:
    """Accuracy, mean cross-entropy, per-class accuracy and the confusion matrix (rows: true, columns: predicted);
    with `tta`, also test/acc_tta: each image scored with its mirror image, the mean of the two views' logits."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    def logits_of(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate([model.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        )

    logits = logits_of(images)
    target = torch.from_numpy(labels)
    flipped = {}
    if tta:  # N×C×H×W: the last axis is the width
        tta_logits = (logits + logits_of(np.ascontiguousarray(images[..., ::-1]))) / 2
        flipped = {"test/acc_tta": float((tta_logits.argmax(1) == target).float().mean())}
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
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from torchmetrics.classification import MulticlassConfusionMatrix

    figure, _ = MulticlassConfusionMatrix(len(classes)).plot(torch.tensor(confusion), labels=classes)
    figure.set_size_inches(8, 8)
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(figure)


# ------------------------------------------------------------------------------------------ predict


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def predict(model: Model, images: np.ndarray, batch_size: int, top_k: int) -> list[list[tuple[str, float]]]:
    """For each image, the top-k classes with their softmax probabilities, most likely first."""
    if batch_size < 1 or top_k < 1:
        raise UserError(f"batch_size={batch_size} and top_k={top_k} must be ≥ 1")
    top_k = min(top_k, len(model.classes))
    results = []
    for start in range(0, len(images), batch_size):
        probabilities = softmax(model.run(np.ascontiguousarray(images[start : start + batch_size])))
        for row in probabilities:
            best = np.argsort(-row, kind="stable")[:top_k]
            results.append([(model.classes[i], float(row[i])) for i in best])
    return results


def write_predictions(path: Path, files: list[Path], predictions: list[list[tuple[str, float]]]) -> None:
    """preds.csv (file, class_1, probability_1, …) or preds.json (a list of {file, top: [{class, probability}]})."""
    if path.suffix.lower() == ".json":
        rows = [{"file": str(f), "top": [{"class": c, "probability": p} for c, p in top]}
                for f, top in zip(files, predictions, strict=True)]  # fmt: skip
        write_atomically(path, (json.dumps(rows, indent=2) + "\n").encode())
        return
    if path.suffix.lower() != ".csv":
        raise UserError(f"output={path}: use a .csv or a .json file")
    import csv
    import io

    k = len(predictions[0]) if predictions else 0
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "probability")]])
    for file, top in zip(files, predictions, strict=True):
        writer.writerow([str(file), *[value for c, p in top for value in (c, f"{p:.6f}")]])
    write_atomically(path, text.getvalue().encode())


def table(files: list[Path], predictions: list[list[tuple[str, float]]]) -> str:
    names = [str(f) for f in files]
    width = max(map(len, names + ["file"]))
    k = len(predictions[0]) if predictions else 0
    lines = [f"{'file':<{width}}  " + "  ".join(f"{'top ' + str(i):<16}" for i in range(1, k + 1))]
    for name, top in zip(names, predictions, strict=True):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c + ' ' + f'{p:.3f}':<16}" for c, p in top))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------ export


def export(ckpt_path: str, format: str, output: str | None, outputs_root: str = "outputs") -> Path:
    """Write the checkpoint's Deployable as ONNX or .pt2 (dynamic batch, description inside), atomically."""
    if format not in FORMATS:
        raise UserError(f"format={format}: use one of {', '.join(FORMATS)}")
    source = resolve_model_path(ckpt_path, outputs_root)
    if source.suffix.lower() != ".ckpt":
        raise UserError(f"ckpt_path={source}: export reads a Lightning checkpoint (.ckpt)")
    model, description = deployable_from_checkpoint(load_checkpoint(source), source)
    target = Path(output) if output else source.with_suffix(FORMATS[format])
    example = torch.zeros(2, *description["input_shape"], dtype=torch.uint8)
    batch = torch.export.Dim("batch")
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp{FORMATS[format]}")
    try:
        if format == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(temp), extra_files={DESCRIPTION: json.dumps(description)})
        else:
            onnx = import_extra("onnx")
            import_extra("onnxscript")  # torch's dynamo exporter needs it
            for name in ("onnxscript", "onnx_ir"):  # their optimizer passes log each step at INFO
                logging.getLogger(name).setLevel(logging.WARNING)
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(model, (example,), str(temp), dynamo=True, dynamic_shapes=({0: batch},),
                                  input_names=["images"], output_names=["logits"], external_data=False)  # fmt: skip
            exported = onnx.load(str(temp))
            onnx.helper.set_model_props(exported, {DESCRIPTION: json.dumps(description)})
            onnx.save(exported, str(temp))
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


@dataclass
class Parity:
    images: int
    batch_sizes: tuple[int, int]
    max_difference: float
    top1_agree: int

    @property
    def ok(self) -> bool:
        return self.top1_agree == self.images and self.max_difference <= 1e-3

    def __str__(self) -> str:
        return (f"parity on {self.images} images, batches of {self.batch_sizes[0]} and {self.batch_sizes[1]}: "
                f"largest logit difference {self.max_difference:.2e}, top-1 agrees on {self.top1_agree} of "
                f"{self.images}")  # fmt: skip


def parity(reference: Model, exported: Model, images: np.ndarray, batch_sizes=(1, 64)) -> Parity:
    """The exported file's logits against the checkpoint's, on the same images, in batches of two sizes."""
    expected = reference.run(images)
    worst, agree = 0.0, len(images)
    for batch_size in batch_sizes:
        got = np.concatenate([exported.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        worst = max(worst, float(np.abs(got - expected).max()))
        agree = min(agree, int((got.argmax(1) == expected.argmax(1)).sum()))
    return Parity(len(images), tuple(batch_sizes), worst, agree)


# ------------------------------------------------------------------------------------------ the two tools


@dataclass
class Predictions:
    model: Model
    files: list[Path]
    top: list[list[tuple[str, float]]]
    skipped: list[tuple[Path, str]]


def predict_files(cfg) -> Predictions:
    """src/predict.py: the model of cfg.ckpt_path on the images of cfg.inputs; cfg.output gets a copy."""
    check(cfg)
    for key in ("ckpt_path", "inputs"):
        if cfg.get(key) is None:
            raise UserError(f"{key}=... is required: python src/predict.py ckpt_path=<checkpoint> inputs=<images>")
    files = find_images(str(cfg.inputs))  # before loading the model: a wrong path fails at once
    model = load_model(str(cfg.ckpt_path), cfg.outputs_root, cfg.device)
    kept, images, skipped = read_images(files, model.image_size)
    top = predict(model, images, cfg.batch_size, cfg.top_k) if kept else []
    if kept and cfg.get("output"):
        write_predictions(Path(cfg.output), kept, top)
    return Predictions(model, kept, top, skipped)


def export_checked(cfg) -> tuple[Path, Parity]:
    """src/export.py: export, load the file back, and compare it with the checkpoint on real test images."""
    check(cfg)
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=... is required: python src/export.py ckpt_path=<checkpoint> format=onnx|pt2")
    target = export(str(cfg.ckpt_path), cfg.format, cfg.get("output"), cfg.outputs_root)
    reference = load_model(str(cfg.ckpt_path), cfg.outputs_root, device="cpu")
    images, _, _ = evaluation_set(cfg.data, reference.classes, reference.image_size, trained_on(reference.description))
    images = images[: cfg.parity_images]
    return target, parity(reference, load_model(str(target)), images, (1, min(64, len(images))))
