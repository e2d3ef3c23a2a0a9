"""The relations between a config's keys (`RELATIONS`), each a function of the config that returns the one line
refusing it, or None: mean and std as long as the channels, the network's shapes fit its input, its weights and a
batch fit this machine's memory, the devices exist, the data and the teacher's checkpoints are there, … (cnnlab.checks
runs them after each value's own domain)."""

import os
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab import CHANNELS
from cnnlab.data.tta import tta_mode
from cnnlab.domains import _is_int


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


def the_network_follows_the_data(cfg) -> str | None:
    """The network's input is the data's: its channels and, where both are given, its image size."""
    data, model = cfg.get("data"), cfg.get("model")
    if data is None or model is None:
        return None
    channels = CHANNELS[data.channels]
    if model.in_channels != channels:
        return (f"model.in_channels={model.in_channels}, but data.channels={data.channels} gives {channels}-channel "
                f"images: set data.channels={'RGB' if model.in_channels == 3 else 'L'}, or leave model.in_channels to "
                f"follow the data")  # fmt: skip
    if None not in (data.image_size, model.image_size) and data.image_size != model.image_size:
        return (f"model.image_size={model.image_size}, but data.image_size={data.image_size}: the images are resized "
                f"to data.image_size; set that one (the network follows it)")  # fmt: skip
    return None


def mirrors_keep_the_class(cfg) -> str | None:
    data = cfg.get("data")
    if data is not None and tta_mode(data.get("tta")) in ("flip", "flip_translate") and not data.get("flip", True):
        return (f"data.tta={str(data.tta).lower()} scores each test image with its mirror image, but data.flip="
                f"false says a mirrored image is not of its class (data={data.name}): data.tta=translate, or "
                f"false")  # fmt: skip
    return None


def crops_fit_the_image(cfg) -> str | None:
    data, model = cfg.get("data"), cfg.get("model")
    if data is None or model is None or model.image_size is None:  # the image size: the data's, once it is read
        return None
    if data.get("crop_padding", 0) > model.image_size:
        return (f"data.crop_padding={data.crop_padding} is more than the image ({model.image_size} pixels): a crop "
                f"would hold only border; use at most model.image_size, e.g. data.crop_padding=4")  # fmt: skip
    return None


def refinement_follows_crops(cfg) -> str | None:
    """data.refine_epochs: the last epochs of a run whose other epochs crop."""
    data, trainer = cfg.get("data"), cfg.get("trainer")
    refine = (data or {}).get("refine_epochs") or 0
    if not refine or trainer is None:
        return None
    if not data.augment or not data.crop_padding:
        return (f"data.refine_epochs={refine} refines on uncropped images after crops, but the run does not crop "
                f"(data.augment={str(data.augment).lower()}, data.crop_padding={data.crop_padding}): set "
                f"data.augment=true and data.crop_padding ≥ 1, or data.refine_epochs=0")  # fmt: skip
    if trainer.max_epochs == -1 or refine >= trainer.max_epochs:
        return (f"data.refine_epochs={refine} must be fewer than trainer.max_epochs={trainer.max_epochs}: they are "
                f"the run's last epochs, after some with crops")  # fmt: skip
    return None


def the_network_fits(cfg) -> str | None:
    """Its shapes fit its input (the formula, layer by layer), and training it, with a batch, fits in memory."""
    from cnnlab.model import conv2_parameters, size_steps

    model = cfg.get("model")
    if model is None or model.image_size is None or model.num_classes is None:  # the data's: known once it is read
        return None
    kernels = (model.conv1_kernel, model.conv2_kernel)  # size_steps raises the formula's own error line:
    steps = size_steps(model.image_size, *kernels, model.stride, model.padding, model.pool_size)
    c1, c2, k1, k2 = model.conv1_channels, model.conv2_channels, model.conv1_kernel, model.conv2_kernel
    flat = c2 * steps[-1].size_out ** 2 + 1  # fc1's inputs, + its bias
    expand = model.get("expand") or 0  # conv2 trained as a (k−1)×(k−1) conv to `expand` channels, then a 2×2 one
    parameters = c1 * (model.in_channels * k1**2 + 1) + conv2_parameters(c1, c2, k2, expand) + flat * model.num_classes
    parameters += 2 * (c1 + c2) if model.get("batchnorm") else 0  # γ and β of each channel's BatchNorm
    memory = machine_memory()
    if 16 * parameters > memory:  # weights, gradients and two optimizer states, 4 bytes each
        keys = ("image_size", "in_channels", "conv1_channels", "conv2_channels", "num_classes", "padding", "expand")
        followed = {k for k in ("image_size", "num_classes") if OmegaConf.is_interpolation(model, k)}  # data.<key>
        sizes = ", ".join(f"{'data' if key in followed else 'model'}.{key}={model[key]}" for key in keys
                          if model.get(key) is not None)  # fmt: skip
        return (f"model: the network would have {parameters:,} parameters ({sizes}), {16 * parameters / 2**30:,.1f} "
                f"GiB to train, more than this machine's {memory / 2**30:,.1f} GiB: use fewer channels or a smaller "
                f"image")  # fmt: skip
    data = cfg.get("data")
    if data is None:
        return None
    per_image = 4 * (c1 * steps[0].size_out ** 2 + c2 * steps[2].size_out ** 2 + flat  # the largest maps; expanded:
                     + expand * (steps[2].size_in + 2 * model.padding - k2 + 2) ** 2)  # fmt: skip
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


def validation_off(cfg) -> str | None:
    """Why this run validates nothing (data.val_size=0: every training image trains; trainer.limit_val_batches=0),
    or None when it validates. Such a run keeps and tests its last epoch (cnnlab.train.build)."""
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    if data.get("val_size", 1) == 0:
        return "data.val_size=0 holds no training images out for validation"
    if trainer.get("limit_val_batches", None) == 0:
        return "trainer.limit_val_batches=0 runs no validation"
    return None


def what_watches_validation_has_it(cfg) -> str | None:
    """A callback that decides on a validation metric needs validations (the checkpoints keep the last epoch then)."""
    if (why := validation_off(cfg)) is None:
        return None
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and str(node.get("_target_", "")).endswith("EarlyStopping"):
            return (f"callbacks.{name} stops the run on {node.get('monitor')}, but {why}: hold some out (e.g. "
                    f"data.val_size=5000) or train without it (callbacks=default)")  # fmt: skip
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
    if data is None:
        return None
    if data.get("root") is None:
        where = ("a folder or .tar.gz/.zip holding train/<class>/<image> and test/<class>/<image>" if data.name ==
                 "folder" else "torchvision's files of it, an image tree, or a .tar.gz/.zip of one")  # fmt: skip
        return f"data.root=null: data={data.name} needs data.root=<where it lies>: {where}"
    if not data.get("download", True) and not Path(data.root).expanduser().exists():
        return f"data.root={data.root}: no such file or folder (and data.download=false): point it at the data"
    return None


def the_teacher_is_there(cfg) -> str | None:
    teacher = cfg.get("teacher")
    for path in (teacher.get("checkpoints") or []) if teacher is not None else []:
        if not Path(path).expanduser().exists():
            return (f"teacher.checkpoints: {path} is not there: give the teacher's .ckpt files or run folders (each "
                    f"run's best checkpoint)")  # fmt: skip
    return None


def the_output_dir_can_be_written(cfg) -> str | None:
    from cnnlab.rundir import writable_dir

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
                f"torchrun or SLURM (docs/scaling-out.md); this process was started alone")  # fmt: skip
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


RELATIONS = [mean_and_std_fit_the_channels, the_network_follows_the_data, mirrors_keep_the_class,
             crops_fit_the_image, refinement_follows_crops, the_network_fits, checkpoints_rank_by_a_metric,
             what_watches_validation_has_it, the_run_ends, nesterov_has_momentum, the_devices_exist,
             the_data_is_there, the_teacher_is_there, the_output_dir_can_be_written]  # fmt: skip
