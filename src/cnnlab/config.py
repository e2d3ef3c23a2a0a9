"""What Hydra needs before it composes conf/: run-dir resolvers and the typed schemas of our own groups.

The entry points (and the tests) import this module before composing; it registers everything on import and
imports nothing heavy, so `python src/train.py --help` stays quick.

- Resolvers `run_name` and `unique_dir` (conf/hydra/default.yaml): run dirs `<date>_<time>_<overrides>`,
  readable and never shared by two runs.
- Schemas for conf/data and conf/model: a value of the wrong type (`data.batch_size=many`) gets Hydra's own
  error naming the key, before anything runs. The defaults stay in the YAML files: a schema only types them.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

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


# use_cache: Hydra resolves the run dir more than once (and copies the cache into each multirun job); each
# resolution must give the folder claimed the first time.
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)


@dataclass
class DataSchema:  # cnnlab.data.CIFAR10DataModule
    _target_: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    cache_dir: str = MISSING
    val_size: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    augment: bool = MISSING
    crop_padding: int = MISSING
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
