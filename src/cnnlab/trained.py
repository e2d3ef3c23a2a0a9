"""A trained model, rebuilt from a self-describing checkpoint or read from an exported file, ready to score images.

A checkpoint carries, as plain data, the model's config, its input shape, the normalisation and the class
names (LitClassifier.on_save_checkpoint, key "cnnlab"). From it `load_model` builds a `Deployable`: the network
in eval mode behind the slides' pre-processing, so that it takes what image files give, uint8 N×C×H×W, and
returns logits. cnnlab.export writes the same `Deployable` as ONNX or .pt2 with the description inside, and
`load_model` reads those files back with the same interface. Nothing here imports Lightning.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from cnnlab import UserError
from cnnlab.checkpoints import find_checkpoint, load_checkpoint
from cnnlab.data.pixels import normalise, scale_and_shift

log = logging.getLogger(__name__)


EXTRA = "pip install -e '.[export]' (make install does it)"


DESCRIPTION = "cnnlab.json"  # the description's name inside an exported file


class Deployable(nn.Module):
    """uint8 images N×C×H×W (as image files give them, after the slides' permute) → logits N×classes.

    The normalisation of training is folded in (cnnlab.data.pixels); the network is in eval mode (dropout off)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net.eval()
        scale, shift = scale_and_shift(mean, std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalise(images, self.scale, self.shift))


@dataclass
class Model:
    """A model ready to predict, from a checkpoint or an exported file: `run` takes uint8 N×C×H×W numpy."""

    source: Path
    description: dict  # model, input_shape, mean, std, classes
    run: object  # numpy uint8 batch → numpy logits

    @property
    def classes(self) -> list[str]:
        return self.description["classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C×H×W: 3 channels for colour, 1 for grey."""
        return tuple(self.description["input_shape"])


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
        raise UserError(
            f"ckpt_path={run}: no checkpoints/epoch_*.ckpt or last.ckpt in this folder (not a training "
            "run's folder?): give a run's folder or a .ckpt file"
        )
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
