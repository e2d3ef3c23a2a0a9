"""A sweep that survives a failing job, and the record of what each of its jobs did.

A job whose run ends in a user error writes the error line into `<job dir>/error.txt` (`job_failed`) and returns,
so Hydra goes on to the next job; at the end `SweepSummary` (a Hydra callback, conf/hydra/default.yaml) prints
one line, and the sweep exits 1 if any job failed. `jobs(sweep dir)` lists every job the sweep was to run, from
the sweep's own record (multirun.yaml, expanded by Hydra's own parser), as finished, pruned (a search's trial
stopped early), failed, unfinished or never run: compare.py reports from it.

Imports nothing heavy: Hydra loads the callback at every start.
"""

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnlab import write_atomically

ERROR_FILE = "error.txt"
# An Optuna search's settings (src/hydra_plugins/cnnlab_optuna checks them; cnnlab.search runs a trial's side)
SEARCH_METRICS = ("val/acc_best", "test/acc", "test/loss", "test/acc_tta")  # numbers of metrics.json to optimise
PER_VALIDATION = ("val/acc_best",)  # those also logged at each validation: a pruner can follow them
PRUNERS = ("none", "median", "hyperband")


def job_failed(message: str, output_dir: str | Path) -> None:
    """A user error ends this run: one line on stderr and in <run dir>/error.txt. A single run exits 1 here; in a
    sweep the job returns, and the sweep goes on with its next job."""
    print(message, file=sys.stderr)
    with contextlib.suppress(Exception):  # the error may be that nothing can be written there (a full disk)
        write_atomically(Path(output_dir) / ERROR_FILE, f"{message}\n".encode())
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        sys.exit(1)


@dataclass
class Job:
    number: int
    overrides: list[str]
    folder: Path | None  # None: the job never started
    state: str  # finished | pruned | failed | unfinished | never ran
    error: str = ""


def jobs(sweep: Path) -> list[Job]:
    """Every job of a multirun, in order: the ones its record lists (a grid sweep), and any other job folder."""
    folders = {}
    for folder in sweep.iterdir():
        number = folder.name.split("_", 1)[0]
        if folder.is_dir() and number.isdigit() and (folder / ".hydra").is_dir():
            folders[int(number)] = folder
    planned = planned_jobs(sweep)
    found = []
    for number in sorted(set(range(len(planned))) | set(folders)):
        folder = folders.get(number)
        overrides = planned[number] if number < len(planned) else read_overrides(folder)
        found.append(job_state(number, overrides, folder))
    return found


def planned_jobs(sweep: Path) -> list[list[str]]:
    """The overrides of each job the sweep was to run, as Hydra's basic sweeper expands them ([] for others)."""
    record = sweep / "multirun.yaml"
    if not record.is_file():
        return []
    hydra = OmegaConf.load(record).hydra
    if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []  # e.g. Optuna: which jobs it would have run is not written down
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from cnnlab.config import parse_overrides

    raw = OmegaConf.to_container(hydra, resolve=False)  # overrides may hold ${...} for the job to resolve
    params = [f"{key}={value}" for key, value in (raw["sweeper"].get("params") or {}).items()]
    parsed = parse_overrides([*params, *raw["overrides"]["task"]])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def read_overrides(folder: Path) -> list[str]:
    return OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "overrides.yaml"), resolve=False)


def job_state(number: int, overrides: list[str], folder: Path | None) -> Job:
    if folder is None:
        return Job(number, overrides, None, "never ran")
    if (folder / "metrics.json").is_file():
        pruned = json.loads((folder / "metrics.json").read_text()).get("pruned_at_epoch")
        if pruned:  # a search's trial its pruner stopped
            return Job(number, overrides, folder, "pruned", f"pruned at epoch {pruned}")
        return Job(number, overrides, folder, "finished")
    if (folder / ERROR_FILE).is_file():
        return Job(number, overrides, folder, "failed", (folder / ERROR_FILE).read_text().strip())
    return Job(number, overrides, folder, "unfinished")  # killed, or stopped by a programming error


class SweepSummary(Callback):
    """At the end of a multirun: one line on how its jobs ended; exit status 1 if any of them did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        all_jobs = jobs(sweep)
        bad = [job for job in all_jobs if job.state not in ("finished", "pruned")]
        finished = len(all_jobs) - len(bad)
        pruned = sum(job.state == "pruned" for job in all_jobs)
        if not bad:
            print(f"sweep: {len(all_jobs)} of {len(all_jobs)} jobs finished{f' ({pruned} pruned)' if pruned else ''}; "
                  f"{sweep}")  # fmt: skip
            return
        details = "; ".join(f"{job.folder.name if job.folder else job.number}: {job.error or job.state}" for job in bad)
        print(f"sweep: {finished} of {len(all_jobs)} jobs finished, {len(bad)} did not ({details}); {sweep}",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
