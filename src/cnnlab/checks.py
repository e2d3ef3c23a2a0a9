"""The declared domain of every value a user can set, and `check(cfg)`, which applies it right after composing.

conf/ holds every default; this file holds every domain, one line a key, in the order of the files in conf/.
`check(cfg)` runs before any data is read or model built, in train(), evaluate() and each tool, and refuses a
value in one line that names the key, the value and what it must be (a UserError). It checks, in turn:
- each value against its domain (`DOMAINS`: type, range, names; a key whose option is set to null is left out);
- each node with a `_target_`: that it imports and that every key is a parameter of what it builds
  (`+optimizer.foo=1` is refused here, not by a TypeError deep in a run);
- the relations between keys (`RELATIONS`: mean and std as long as the channels, the network's shapes fit its
  input, its weights and a batch fit this machine's memory, the devices exist, …);
- that the optimizer and its schedule accept their settings, by building them on one dummy weight (torch's
  own checks, for keys added with `+` as well).
tests/test_fuzz.py walks every key of every tool's config and holds this table to it: a key without a domain
fails that test.
"""

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import UserError


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


# ------------------------------------------------------------------------------------------ relations


def machine_memory() -> int:
    """Bytes of memory of this machine (its physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def mean_and_std_fit_the_channels(cfg) -> str | None:
    data, model = cfg.get("data"), cfg.get("model")
    if data is None or data.get("mean") is None or data.get("std") is None:
        return None
    mean, std = list(data.mean), list(data.std)
    if model is None:  # a tool without a network of its own: the two must agree with each other
        if len(mean) != len(std):
            return f"data.mean={mean} and data.std={std}: give as many of each, one per channel of the images"
        return None
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != model.in_channels:
            return (f"data.{key}={values} has {len(values)} values: give one per channel, {model.in_channels} "
                    f"(model.in_channels)")  # fmt: skip
    return None


def crops_fit_the_image(cfg) -> str | None:
    data, model = cfg.get("data"), cfg.get("model")
    if data is not None and model is not None and data.get("crop_padding", 0) > model.image_size:
        return (f"data.crop_padding={data.crop_padding} is more than the image ({model.image_size} pixels): a crop "
                f"would hold only border; use at most model.image_size, e.g. data.crop_padding=4")  # fmt: skip
    return None


def the_network_fits(cfg) -> str | None:
    """Its shapes fit its input (the formula, layer by layer), and training it, with a batch, fits in memory."""
    from cnnlab.model import size_steps

    model = cfg.get("model")
    if model is None:
        return None
    steps = size_steps(
        model.image_size, model.conv1_kernel, model.conv2_kernel, model.stride, model.padding, model.pool_size
    )  # fmt: skip  (raises the formula's own error line)
    c1, c2, k1, k2 = model.conv1_channels, model.conv2_channels, model.conv1_kernel, model.conv2_kernel
    flat = c2 * steps[-1].size_out ** 2
    parameters = c1 * (model.in_channels * k1 * k1 + 1) + c2 * (c1 * k2 * k2 + 1)
    parameters += (flat + 1) * model.num_classes
    memory = machine_memory()
    if 16 * parameters > memory:  # weights, gradients and two optimizer states, 4 bytes each
        keys = ("image_size", "in_channels", "conv1_channels", "conv2_channels", "num_classes", "padding")
        sizes = ", ".join(f"model.{key}={model[key]}" for key in keys)
        return (f"model: the network would have {parameters:,} parameters ({sizes}), {16 * parameters / 2**30:,.1f} "
                f"GiB to train, more than this machine's {memory / 2**30:,.1f} GiB: use fewer channels or a smaller "
                f"image")  # fmt: skip
    data = cfg.get("data")
    if data is None:
        return None
    per_image = 4 * (c1 * steps[0].size_out ** 2 + c2 * steps[2].size_out ** 2 + flat)  # the largest activations
    for key, factor in (("batch_size", 3), ("eval_batch_size", 1)):  # training keeps them for the backward pass
        if data.get(key) is None:
            continue
        need = factor * per_image * data[key]
        if need > memory / 2:
            return (f"data.{key}={data[key]}: a batch would take {need / 2**30:,.1f} GiB of activations, more than "
                    f"half of this machine's {memory / 2**30:,.1f} GiB: use a smaller data.{key}")  # fmt: skip
    return None


def checkpoints_rank_by_a_metric(cfg) -> str | None:
    """Lightning's ModelCheckpoint keeps more than one file only when it ranks them by a monitored metric."""
    for name, node in (cfg.get("callbacks") or {}).items():
        is_checkpoint = node is not None and str(node.get("_target_", "")).endswith("ModelCheckpoint")
        if is_checkpoint and node.get("monitor") is None and node.get("save_top_k", 1) not in (-1, 0, 1):
            return (f"callbacks.{name}.save_top_k={node.save_top_k}: without a monitored metric "
                    f"(callbacks.{name}.monitor=null) a checkpoint keeps -1 (all), 0 or 1 files")  # fmt: skip
    return None


def the_run_ends(cfg) -> str | None:
    trainer = cfg.get("trainer")
    if trainer is not None and cfg.get("optimizer") is not None and trainer.max_epochs == -1 == trainer.max_steps:
        return "trainer.max_epochs=-1 and trainer.max_steps=-1: the run would never end; set one of them"
    return None


def nesterov_has_momentum(cfg) -> str | None:
    optimizer = cfg.get("optimizer") or {}
    if optimizer.get("nesterov") and not optimizer.get("momentum"):
        return "optimizer.nesterov=true needs momentum: set optimizer.momentum > 0 (e.g. 0.9)"
    return None


def the_data_is_there(cfg) -> str | None:
    data = cfg.get("data")
    if data is not None and not data.get("download", True) and not Path(data.root).expanduser().exists():
        return f"data.root={data.root}: no such file or folder (and data.download=false): point it at CIFAR-10"
    return None


def the_output_dir_can_be_written(cfg) -> str | None:
    from cnnlab.config import writable_dir

    if cfg.get("output_dir") is not None and (problem := writable_dir(cfg.output_dir)):
        return f"output_dir={cfg.output_dir}: cannot write the run's outputs there ({problem})"
    return None


def the_devices_exist(cfg) -> str | None:
    """trainer.accelerator, trainer.devices and predict's device, against this machine."""
    import torch

    if cfg.get("device") == "cuda" and not torch.cuda.is_available():
        return "device=cuda: this machine has no CUDA GPU that torch can use; use device=cpu (or auto)"
    trainer = cfg.get("trainer")
    if trainer is None:
        return None
    accelerator = trainer.accelerator
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return (f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can use; "
                f"use trainer.accelerator=cpu (or auto)")  # fmt: skip
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return "trainer.accelerator=mps: this machine has no Apple GPU that torch can use; use trainer.accelerator=cpu"
    launched = any(key in os.environ for key in ("WORLD_SIZE", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if trainer.num_nodes > 1 and not launched:
        return (f"trainer.num_nodes={trainer.num_nodes}: a run on several machines is started on each of them, by "
                f"torchrun or SLURM (README: Scaling out); this process was started alone")  # fmt: skip
    devices = trainer.devices
    if _is_int(devices):
        if cuda and devices > torch.cuda.device_count():
            return (f"trainer.devices={devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                    f"use at most that many")  # fmt: skip
        cores = os.cpu_count() or 1
        if not cuda and accelerator != "mps" and devices > cores:
            return (f"trainer.devices={devices}: this machine has {cores} CPU cores, and each process of the run "
                    f"needs one; use trainer.devices={cores} or fewer")  # fmt: skip
    if str(trainer.precision).startswith("bf16") and cuda:
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch, which does not count emulation
            native = torch.cuda.is_bf16_supported()
        if not native:
            return (f"trainer.precision={trainer.precision}: this GPU ({torch.cuda.get_device_name()}) has no "
                    f"bfloat16; use precision=fp16 (16-mixed, with a GradScaler) or precision=fp32")  # fmt: skip
    return None


RELATIONS = [mean_and_std_fit_the_channels, crops_fit_the_image, the_network_fits, checkpoints_rank_by_a_metric,
             the_run_ends,
             nesterov_has_momentum, the_devices_exist, the_data_is_there, the_output_dir_can_be_written]  # fmt: skip


# ------------------------------------------------------------------------------------------ the check


def check(cfg: DictConfig) -> None:
    """Refuse, in one line, the first value that cannot work: its domain, its target, its relations, and whether
    the optimizer and its schedule take their settings."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot be resolved (${trainer.max_epoch}, say)
        raise UserError(f"the config does not resolve: {' '.join(str(err).split())}") from None
    # The keys a user sets before those that take their value from another (scheduler.T_max: ${trainer.max_epochs}),
    # so that a wrong value is refused under the key it was given to.
    given = dict(leaves(OmegaConf.to_container(cfg, resolve=False)))
    derived = {key for key, value in given.items() if isinstance(value, str) and "${" in value}
    for key, value in sorted(leaves(config), key=lambda leaf: leaf[0] in derived):
        domain = domain_of(key)
        if domain is not None and not domain.accepts(value):
            raise UserError(domain.refusal(key, value) + (f" (it is {given[key]})" if key in derived else ""))
    check_targets(config)
    for relation in RELATIONS:
        if problem := relation(cfg):
            raise UserError(problem)
    check_optimizer(cfg)


def check_targets(config: dict, prefix: str = "") -> None:
    """Every node with a `_target_` imports, and each of its keys is a parameter of what it builds."""
    for key, node in config.items():
        if not isinstance(node, dict):
            continue
        name = f"{prefix}{key}"
        if "_target_" in node:
            try:
                target = locate(str(node["_target_"]))
            except Exception as err:
                raise UserError(f"{name}._target_={node['_target_']}: cannot be imported ({_cause(err)})") from None
            if not callable(target):
                raise UserError(f"{name}._target_={node['_target_']} is not a class or function to build")
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):  # a builtin without a signature: nothing to check its keys against
                signature = None
            if signature and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                options = set(signature.parameters)
                unknown = sorted(k for k in node if not k.startswith("_") and k not in options)
                if unknown:
                    raise UserError(f"{name}.{unknown[0]} is not an option of {node['_target_']}; its options: "
                                    f"{', '.join(sorted(options - {'self', 'params', 'optimizer'}))}")  # fmt: skip
        check_targets(node, f"{name}.")


def locate(path: str):
    """The object a dotted path names (a `_target_`), imported as Hydra imports it: the longest importable module,
    then attributes (as hydra.utils.get_object does, which hydra-core 1.3.0 lacks)."""
    import importlib

    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            found = getattr(found, name)
        return found
    raise ImportError(f"No module named '{parts[0]}'")


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer and its schedule on one dummy weight: torch's own checks of their settings."""
    if cfg.get("optimizer") is None:
        return
    import torch
    from hydra.utils import instantiate

    from cnnlab.module import per_step

    weight = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = instantiate(cfg.optimizer)(params=[weight])
    except Exception as err:
        raise UserError(f"optimizer: {cfg.optimizer._target_} refuses its settings: {_cause(err)}") from None
    if cfg.get("scheduler") is None:
        return
    try:
        scheduler = instantiate(cfg.scheduler)
        scheduler(optimizer=optimizer, **({"total_steps": 1} if per_step(scheduler) else {}))
    except Exception as err:
        raise UserError(f"scheduler: {cfg.scheduler._target_} refuses its settings: {_cause(err)}") from None


def _cause(err: BaseException) -> str:
    return " ".join(str(err.__cause__ or err).split())
