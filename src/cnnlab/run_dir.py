"""Run directory names for Hydra: `<date>_<time>_<overrides>`, readable and never shared by two runs.

Registered as OmegaConf resolvers on import (conf/hydra/default.yaml uses them), so the entry points import
this module before @hydra.main composes the config. It imports nothing heavy: `--help` stays quick.
"""

import re
from pathlib import Path

from omegaconf import OmegaConf

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
