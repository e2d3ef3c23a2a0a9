"""Export a checkpoint's model as ONNX (torch's dynamo exporter) or .pt2 (torch.export), and check the file."""

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab import UserError
from cnnlab.checkpoints import load_checkpoint
from cnnlab.checks import check
from cnnlab.evaluate import evaluation_set, trained_on
from cnnlab.trained import DESCRIPTION, Model, deployable_from_checkpoint, import_extra, load_model, resolve_model_path

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


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


def export_checked(cfg) -> tuple[Path, Parity]:
    """src/export.py: export, load the file back, and compare it with the checkpoint on real test images."""
    check(cfg, builds=())  # the model comes from the checkpoint; data is read, not built
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=... is required: python src/export.py ckpt_path=<checkpoint> format=onnx|pt2")
    target = export(str(cfg.ckpt_path), cfg.format, cfg.get("output"), cfg.outputs_root)
    reference = load_model(str(cfg.ckpt_path), cfg.outputs_root, device="cpu")
    images, _, _ = evaluation_set(cfg.data, reference.classes, reference.input_shape, trained_on(reference.description))
    images = images[: cfg.parity_images]
    return target, parity(reference, load_model(str(target)), images, (1, min(64, len(images))))
