"""The config around Hydra: run-dir resolvers, the typed schemas of our own groups, the checks of values.

The entry points (and the tests) import this module before composing; it registers everything on import and
imports nothing heavy, so `python src/train.py --help` stays quick.

- Resolvers `run_name`, `unique_dir` and `run_dir` (conf/hydra/default.yaml): run dirs
  `<date>_<time>_<overrides>`, readable and never shared by two runs; a resumed run continues in its own.
- Schemas for conf/data and conf/model: a value of the wrong type (`data.batch_size=many`) gets Hydra's own
  error naming the key, before anything runs. The defaults stay in the YAML files: a schema only types them.
- `OutputDirCheck`: a Hydra callback that refuses, in one line, a run or sweep dir that cannot be written
  (Hydra itself would stop with a traceback).
- `check(cfg)`: the values a type cannot rule out (a negative learning rate, an unknown Trainer option, a GPU
  asked for where there is none), refused right after composing, before any data is read or model built.
"""

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

MAX_SUMMARY = 80


def run_name(stamp: str, overrides: str = "") -> str:
    """`stamp` plus the override summary, made safe as one folder name (no `/`, at most 80 characters)."""
    summary = re.sub(r"[^\w.,=+-]+", "-", overrides)[:MAX_SUMMARY].strip("-")
    return f"{stamp}_{summary}" if summary else stamp


def unique_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, … : the first that did not exist, claimed by creating it (atomic), so two
    runs started in the same second with the same overrides get two folders."""
    candidate, n = Path(path), 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")


def run_dir(new_dir: str, ckpt_path: str | None, outputs_root: str) -> str:
    """A resumed run continues in the run dir that holds its checkpoint (<run dir>/checkpoints/*.ckpt): one log,
    one TensorBoard run, and its ModelCheckpoint keeps its record of the best checkpoint. Any other run, or a
    checkpoint kept outside a run dir, gets `new_dir` (claimed with unique_dir)."""
    if ckpt_path is not None:
        from cnnlab import UserError
        from cnnlab.resume import find_checkpoint, run_dir_of

        try:
            held_by = run_dir_of(find_checkpoint(str(ckpt_path), outputs_root))
        except UserError:
            held_by = None  # train() says what is wrong with ckpt_path, in the new run's log
        if held_by is not None:
            return str(held_by)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:  # torchrun: every rank composes
        return shared_run_dir(new_dir, outputs_root)
    return unique_dir(new_dir)


RENDEZVOUS_WAIT_S = 120


def shared_run_dir(new_dir: str, outputs_root: str) -> str:
    """Under torchrun every process composes the config and resolves its own run dir: rank 0 claims one and hands
    its path to the others through torchrun's own key-value store, the TCPStore that its agent serves at
    MASTER_ADDR:MASTER_PORT for this job alone (TORCHELASTIC_USE_AGENT_STORE, torchrun's default): no file of an
    earlier job on the same port is read and no clock is compared, on one node or several. Where the agent serves
    no store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), the path goes through <outputs_root>/.rendezvous/<rendezvous
    id>: then `torchrun --rdzv-id` must name the job (TORCHELASTIC_RUN_ID), and outputs_root be shared."""
    is_first = os.environ["RANK"] == "0"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts a failed job's processes
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=RENDEZVOUS_WAIT_S))  # fmt: skip
        key = f"cnnlab/run_dir/{attempt}"
        if is_first:
            claimed = unique_dir(new_dir)
            store.set(key, str(Path(claimed).resolve()))
            return claimed
        try:
            return store.get(key).decode()  # waits for the first process's set
        except RuntimeError as err:  # torch's DistStoreError: the first process never got there
            sys.stderr.write(f"warning: rank 0's run dir did not arrive ({err}): this rank writes into its own\n")
            return unique_dir(new_dir)
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job in ("", "none"):
        sys.stderr.write("warning: torchrun without its agent's store and without --rdzv-id: each process writes "
                         "into a run dir of its own\n")  # fmt: skip
        return unique_dir(new_dir)
    note = Path(outputs_root) / ".rendezvous" / re.sub(r"[^\w.-]+", "_", f"{job}-{attempt}")
    if is_first:
        claimed = unique_dir(new_dir)
        note.parent.mkdir(parents=True, exist_ok=True)
        temp = note.with_name(f".{note.name}.{os.getpid()}.tmp")
        temp.write_text(str(Path(claimed).resolve()))
        os.replace(temp, note)  # atomic: another rank reads the whole path or nothing
        return claimed
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    while not note.is_file():
        if time.monotonic() > deadline:
            sys.stderr.write(f"warning: rank 0's run dir did not appear in {note}: this rank writes into its own\n")
            return unique_dir(new_dir)
        time.sleep(0.1)
    return note.read_text()


# use_cache: Hydra resolves the run dir more than once (and copies the cache into each multirun job); each
# resolution must give the folder claimed the first time.
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True, replace=True)


@dataclass
class DataSchema:  # cnnlab.data.CIFAR10DataModule
    _target_: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    cache_dir: str = MISSING
    val_size: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    eval_batch_size: int = MISSING
    augment: bool = MISSING
    crop_padding: int = MISSING
    tta: bool = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    on_device: bool = MISSING


@dataclass
class ModelSchema:  # cnnlab.model.SlideCNN
    _target_: str = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    num_classes: int = MISSING
    conv1_channels: int = MISSING
    conv1_kernel: int = MISSING
    conv2_channels: int = MISSING
    conv2_kernel: int = MISSING
    stride: int = MISSING
    padding: int = MISSING
    pool: str = MISSING
    pool_size: int = MISSING
    dropout: float = MISSING
    channels_last: bool = MISSING


ConfigStore.instance().store(group="schema", name="data", node=DataSchema)
ConfigStore.instance().store(group="schema", name="model", node=ModelSchema)


# ------------------------------------------------------------------------------------------ checks

PRECISIONS = {"32": "32-true", "16": "16-mixed"}  # what people type → the trainer.precision it means


def refuse_numeric_precision(argv: list[str]) -> None:
    """`precision=32` is what people type, but Hydra reads 32 as a number and a group's option must be a name:
    it would stop with a traceback before any code of ours runs. One line instead (the entry points call this)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "precision" and value in PRECISIONS:
            sys.exit(f"error: precision={value}: the precision group's options are fp32, bf16, fp16 (Hydra reads "
                     f"{value} as a number, not an option's name); "
                     f"or give trainer.precision={PRECISIONS[value]}")  # fmt: skip


def writable_dir(path: str | Path) -> str | None:
    """None if `path` is (or can be made) a folder we can write files into, else why not."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return None
    except OSError as err:
        return err.strerror or str(err)


class OutputDirCheck(Callback):
    """Before Hydra creates the run dir (or the sweep dir): one line and exit 1 if it cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if launcher.startswith("hydra_plugins."):  # a launcher plugin of ours (conf/hydra/launcher): installed?
            import importlib.util

            plugin = ".".join(launcher.split(".")[:2])
            if importlib.util.find_spec(plugin) is None:
                sys.exit(f"error: the launcher {launcher.rsplit('.', 1)[-1]} is not installed ({plugin}): it comes "
                         f"with cnnlab's scale extra, pip install -e '.[scale]' (make install does it)")  # fmt: skip
        self.check(config, "hydra.sweep.dir")

    @staticmethod
    def check(config: DictConfig, key: str) -> None:
        try:
            folder = OmegaConf.select(config, key)
            problem = writable_dir(folder)
        except Exception as err:  # our resolvers create the folder while Hydra resolves the key
            folder, problem = None, str(err.__cause__ or err).splitlines()[0]
        if problem:
            where = f"{key}={folder}" if folder else key
            sys.exit(f"error: {where}: cannot write the run's outputs there ({problem}); "
                     f"choose another folder with {key}=... or outputs_root=...")  # fmt: skip


def check(cfg: DictConfig) -> None:
    """Refuse values that cannot work, naming the key, the value and the fix (a UserError, one line)."""
    from cnnlab import UserError

    def refuse(message: str):
        raise UserError(message)

    seed = cfg.get("seed")
    if "seed" in cfg and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        refuse(f"seed={seed!r} must be an integer from 0 to 2³² − 1 (numpy's range, which Lightning applies): "
               f"use e.g. seed=0")  # fmt: skip
    if not isinstance(cfg.get("keep_freed_memory", True), bool):
        refuse(f"keep_freed_memory={cfg.keep_freed_memory!r} is not true or false")
    if cfg.get("data") is not None:
        data = cfg.data
        for key in ("batch_size", "eval_batch_size"):
            if data[key] < 1:
                refuse(f"data.{key}={data[key]} must be ≥ 1")
        if data.val_size < 1:
            refuse(f"data.val_size={data.val_size} must be ≥ 1 (images held out of the training set for validation)")
        if not data.download and not Path(data.root).expanduser().exists():
            refuse(f"data.root={data.root}: no such file or folder (and data.download=false): point it at CIFAR-10")
    if cfg.get("model") is not None:
        if not 0 <= cfg.model.dropout < 1:
            refuse(f"model.dropout={cfg.model.dropout} must be in [0, 1): the probability of zeroing an activation")
        if cfg.model.num_classes < 1:
            refuse(f"model.num_classes={cfg.model.num_classes} must be ≥ 1")
    smoothing = (cfg.get("loss") or {}).get("label_smoothing", 0.0)
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 <= smoothing < 1:
        refuse(f"loss.label_smoothing={smoothing!r} must be in [0, 1): "
               f"the share of each target spread over all classes")  # fmt: skip
    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr < 0):
        refuse(f"optimizer.lr={lr!r} must be a number ≥ 0, e.g. optimizer.lr=0.001")
    matmul = cfg.get("float32_matmul_precision", "highest")
    if matmul not in ("highest", "high", "medium"):
        refuse(f"float32_matmul_precision={matmul!r} is not one of highest, high, medium "
               f"(torch.set_float32_matmul_precision)")  # fmt: skip
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer, refuse)
    if cfg.get("output_dir") is not None and (problem := writable_dir(cfg.output_dir)):
        refuse(f"output_dir={cfg.output_dir}: cannot write the run's outputs there ({problem})")


def check_trainer(trainer: DictConfig, refuse) -> None:
    import inspect
    import typing

    import torch
    from lightning import Trainer
    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry

    options = set(inspect.signature(Trainer).parameters)
    unknown = sorted(set(trainer) - options - {"_target_"})
    if unknown:
        refuse(f"trainer.{unknown[0]} is not an option of lightning.Trainer; its options: {', '.join(sorted(options))}")
    accelerator = trainer.get("accelerator", "auto")
    names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if isinstance(accelerator, str) and accelerator not in names:
        refuse(f"trainer.accelerator={accelerator} is not an accelerator: use one of {', '.join(names)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        refuse(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can use; "
               f"use trainer.accelerator=cpu (or auto)")  # fmt: skip
    if accelerator == "mps" and not torch.backends.mps.is_available():
        refuse("trainer.accelerator=mps: this machine has no Apple GPU that torch can use; use trainer.accelerator=cpu")
    precision = str(trainer.get("precision"))
    if precision.startswith("bf16") and accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch, which does not count emulation
            native = torch.cuda.is_bf16_supported()
        if not native:
            refuse(f"trainer.precision={precision}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16; "
                   f"use precision=fp16 (16-mixed, with a GradScaler) or precision=fp32")  # fmt: skip
    allowed = [value for part in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(part)]
    if trainer.get("precision") is not None and trainer.precision not in allowed:
        names = ", ".join(str(value) for value in allowed if isinstance(value, str) and "-" in value)
        refuse(f"trainer.precision={trainer.precision} is not a precision: use one of {names}")
