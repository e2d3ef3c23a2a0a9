"""The declared domain of every value a user can set: its type, range or names, one line a key.

conf/ holds every default; `DOMAINS` holds every domain, in the order of the files in conf/. cnnlab.checks applies
them right after composing; tests/test_fuzz.py walks every key of every tool's config and holds this table to it:
a key without a domain fails that test.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True)
class Domain:
    """What a value must be: `what` completes "… must be", `accepts` decides, `meaning` says what the value is."""

    what: str
    accepts: Callable[[Any], bool]
    meaning: str = ""

    def __or__(self, other: "Domain") -> "Domain":
        return Domain(f"{self.what}, or {other.what}", lambda v: self.accepts(v) or other.accepts(v))

    def means(self, meaning: str) -> "Domain":
        return Domain(self.what, self.accepts, meaning)

    def refusal(self, key: str, value) -> str:
        return f"{key}={value!r} must be {self.what}" + (f": {self.meaning}" if self.meaning else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(low, high, above, below) -> str:
    parts = [f"≥ {low}" if low is not None else "", f"> {above}" if above is not None else "",
             f"≤ {high}" if high is not None else "", f"< {below}" if below is not None else ""]  # fmt: skip
    return " and ".join(part for part in parts if part)


def _within(value, low, high, above, below) -> bool:
    return ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above) and (below is None or value < below))  # fmt: skip


def integer(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(f"an integer {bounds}".strip(), lambda v: _is_int(v) and _within(v, low, high, above, below))


def number(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(f"a number {bounds}".strip(), lambda v: _is_number(v) and _within(v, low, high, above, below))


def boolean() -> Domain:
    return Domain("true or false", lambda v: isinstance(v, bool))


def one_of(*choices) -> Domain:
    names = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return Domain(f"one of {names}" if len(choices) > 1 else names,
                  lambda v: any(type(v) is type(c) and v == c for c in choices))  # fmt: skip


def text() -> Domain:
    """A name or a path. Hydra reads outputs_root=7 as a number: a name made of digits is quoted, outputs_root='7'."""
    return Domain(
        "a non-empty text (a number as a name: quoted, key='7')", lambda v: isinstance(v, str) and v.strip() != ""
    )


def null() -> Domain:
    return Domain("null", lambda v: v is None)


def numbers(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(
        f"a list of numbers {bounds}".strip(),
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(x) and _within(x, low, high, above, below)
                                                             for x in v),
    )  # fmt: skip


def signal_names() -> Domain:
    import signal

    names = {s.name for s in signal.Signals}
    return Domain("a list of signal names (SIGINT, SIGTERM, …)", lambda v: isinstance(v, list) and set(v) <= names)


TARGET = text()  # a class or function to build (Hydra's _target_): that it imports is checked with its keys


METRICS = ("val/acc", "val/loss", "val/acc_best", "train/loss_epoch", "train/acc")  # what a checkpoint may watch


CHECKPOINT = {  # Lightning's ModelCheckpoint, as conf/callbacks/default.yaml sets it up twice
    "_target_": TARGET, "dirpath": text(), "filename": text(), "monitor": null() | one_of(*METRICS),
    "mode": one_of("min", "max"), "save_top_k": integer(-1), "save_last": boolean() | null(),
    "save_on_train_epoch_end": boolean() | null(), "auto_insert_metric_name": boolean(),
    "enable_version_counter": boolean(), "every_n_train_steps": null() | integer(1),
}  # fmt: skip


DOMAINS: dict[str, Domain] = {
    # conf/train.yaml and the tools' own files (eval, predict, export, shapes, visualize)
    "seed": integer(0, 2**32 - 1).means("numpy's range, which Lightning applies; e.g. seed=0"),
    "keep_freed_memory": boolean(),
    "float32_matmul_precision": one_of("highest", "high", "medium"),
    "ckpt_path": null() | text(),
    "outputs_root": text(),
    "output_dir": text(),
    "loss._target_": TARGET,
    "loss.label_smoothing": number(0, below=1).means("the share of each target spread over all classes"),
    "inputs": null() | text(),
    "top_k": integer(1),
    "batch_size": integer(1),
    "output": null() | text(),
    "device": one_of("auto", "cpu", "cuda"),
    "format": one_of("onnx", "pt2"),
    "parity_images": integer(1),
    "size": null() | integer(1),
    "kernel": null() | integer(1),
    "stride": integer(1),
    "padding": integer(0),
    "image": null() | text(),
    "maps": integer(1),
    # conf/data
    "data._target_": TARGET,
    "data.root": text(),
    "data.download": boolean(),
    "data.cache_dir": text(),
    "data.val_size": integer(1).means(
        "images held out of the training set for validation"
    ),  # < the training set: setup
    "data.batch_size": integer(1),
    "data.seed": integer(0, 2**32 - 1),
    "data.eval_batch_size": integer(1),
    "data.on_device": boolean(),
    "data.augment": boolean(),
    "data.crop_padding": integer(0),  # and ≤ model.image_size: RELATIONS
    "data.tta": boolean(),
    "data.mean": numbers(0, 1),  # as many as model.in_channels: RELATIONS
    "data.std": numbers(above=0, high=1),
    # conf/model
    "model._target_": TARGET,
    "model.in_channels": integer(1),
    "model.image_size": integer(1),
    "model.num_classes": integer(2),
    "model.conv1_channels": integer(1),
    "model.conv1_kernel": integer(1),
    "model.conv2_channels": integer(1),
    "model.conv2_kernel": integer(1),
    "model.stride": integer(1),
    "model.padding": integer(0),
    "model.pool": one_of("max", "avg"),
    "model.pool_size": integer(1),
    "model.dropout": number(0, below=1).means("the probability of zeroing an activation"),
    "model.channels_last": boolean(),
    # conf/optimizer: the optimizer, and the schedule that comes with it
    "optimizer._target_": TARGET,
    "optimizer._partial_": one_of(True),  # the parameters are given when the module builds it
    "optimizer.lr": number(0).means("the learning rate, e.g. optimizer.lr=0.001"),
    "optimizer.momentum": number(0, below=1).means("the share of the last step kept in the next, e.g. 0.9"),
    "optimizer.nesterov": boolean(),
    "optimizer.weight_decay": number(0, below=1),
    "scheduler": null(),  # the node itself, where an optimizer option has no schedule
    "scheduler._target_": TARGET,
    "scheduler._partial_": one_of(True),
    "scheduler.step_size": integer(1),
    "scheduler.gamma": number(above=0, high=1).means("the factor the learning rate is multiplied by, e.g. 0.1"),
    "scheduler.T_max": integer(1),
    "scheduler.max_lr": number(above=0),
    "scheduler.pct_start": number(above=0, below=1),
    "scheduler.anneal_strategy": one_of("cos", "linear"),
    "scheduler.cycle_momentum": boolean(),
    # conf/trainer: lightning.Trainer's options
    "trainer._target_": TARGET,
    "trainer.default_root_dir": text(),
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps"),
    "trainer.devices": integer(1)
    | one_of("auto")
    | Domain(
        "a list of device numbers",
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v),
    ),
    "trainer.num_nodes": integer(1),
    "trainer.strategy": one_of("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"),
    "trainer.strategy._target_": TARGET,
    "trainer.precision": one_of("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"),
    "trainer.max_epochs": (integer(1) | one_of(-1)).means("-1 means no limit, and trainer.max_steps ends the run"),
    "trainer.max_steps": (integer(1) | one_of(-1)).means("-1 means no limit, and trainer.max_epochs ends the run"),
    "trainer.log_every_n_steps": integer(1),
    "trainer.deterministic": boolean() | one_of("warn"),
    "trainer.benchmark": null() | boolean(),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.fast_dev_run": boolean() | integer(1),
    "trainer.limit_train_batches": number(above=0, high=1.0) | integer(1),  # a fraction, or a count
    "trainer.limit_val_batches": number(0, 1.0) | integer(0),
    "trainer.limit_test_batches": number(above=0, high=1.0) | integer(1),
    "trainer.val_check_interval": null() | number(above=0, high=1.0) | integer(1),
    "trainer.check_val_every_n_epoch": null() | integer(1),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.gradient_clip_val": (null() | number(0)).means("the largest gradient norm; null or 0: no clipping"),
    # conf/logger
    "logger.*._target_": TARGET,
    "logger.*.save_dir": text(),
    "logger.*.name": text(),
    "logger.*.version": text() | integer(0) | one_of(""),
    "logger.tensorboard.default_hp_metric": boolean(),
    # conf/callbacks
    "callbacks.*._target_": TARGET,
    **{f"callbacks.model_checkpoint.{key}": domain for key, domain in CHECKPOINT.items()},
    **{f"callbacks.last_checkpoint.{key}": domain for key, domain in CHECKPOINT.items()},
    "callbacks.lr_monitor.logging_interval": null() | one_of("step", "epoch"),
    "callbacks.model_summary.max_depth": integer(-1),
    "callbacks.progress_bar.refresh_rate": integer(0),
    "callbacks.run_guard.signals": signal_names(),
    "callbacks.run_guard.stop_on_nonfinite_loss": boolean(),
    "callbacks.run_guard.every_n_steps": integer(1),
    "callbacks.run_guard.scaler_patience": integer(1),
    "callbacks.inside.every_n_epochs": integer(1),
    "callbacks.ema.decay": number(above=0, below=1).means(
        "each step: average ← decay · average + (1 − decay) · weights"
    ),
}


def domain_of(key: str) -> Domain | None:
    """The declared domain of a dotted key (a `*` in the table stands for one name), None if there is none."""
    if key in DOMAINS:
        return DOMAINS[key]
    return next((domain for pattern, domain in DOMAINS.items() if "*" in pattern and fnmatchcase(key, pattern)), None)


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value in a plain config; a node set to null, or empty, is a value."""
    if not isinstance(node, dict) or not node:
        return [(prefix, node)] if prefix else []
    return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}" if not prefix
                                                                       else f"{prefix}.{key}")]  # fmt: skip
