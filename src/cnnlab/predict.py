"""Predictions for image files: the slides' last step, softmax → class, top-k; as a table, a .csv or a .json."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab import UserError, write_atomically
from cnnlab.checks import check
from cnnlab.images import find_images, read_images
from cnnlab.trained import Model, load_model


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


@dataclass
class Predictions:
    model: Model
    files: list[Path]
    top: list[list[tuple[str, float]]]
    skipped: list[tuple[Path, str]]


def predict_files(cfg) -> Predictions:
    """src/predict.py: the model of cfg.ckpt_path on the images of cfg.inputs; cfg.output gets a copy."""
    check(cfg, builds=())
    for key in ("ckpt_path", "inputs"):
        if cfg.get(key) is None:
            raise UserError(f"{key}=... is required: python src/predict.py ckpt_path=<checkpoint> inputs=<images>")
    files = find_images(str(cfg.inputs))  # before loading the model: a wrong path fails at once
    model = load_model(str(cfg.ckpt_path), cfg.outputs_root, cfg.device)
    kept, images, skipped = read_images(files, model.input_shape)
    top = predict(model, images, cfg.batch_size, cfg.top_k) if kept else []
    if kept and cfg.get("output"):
        write_predictions(Path(cfg.output), kept, top)
    return Predictions(model, kept, top, skipped)
