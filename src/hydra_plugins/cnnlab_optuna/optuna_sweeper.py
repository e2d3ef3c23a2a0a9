"""A Hydra sweeper that drives a current Optuna: python src/train.py -m hparams_search=optuna

hydra-optuna-sweeper 1.2, the newest on the registry, pins optuna < 3 (and its SQLite storage SQLAlchemy < 2);
this sweeper asks a current Optuna for trials and runs each as a job through Hydra's own launcher, so a trial is
an ordinary job folder (<number>_<overrides>), and the search space is written in Hydra's sweep grammar
(`choice(...)`, `interval(a, b)`, `tag(log, interval(a, b))`).
- It optimises `metric` (what the job returns: cnnlab.search.searched_metric) in `direction`.
- `n_jobs` trials are asked at once and launched as one batch: hydra/launcher=parallel runs them side by side.
- `pruner=median|hyperband`: each job reports its validations to its trial through the study's storage
  (cnnlab.search.ReportToTrial) and stops when it falls behind; the trial is recorded PRUNED.
- The study lives in SQLite under the sweep dir, in a journal file there (`storage=journal`: several sweepers
  on a shared file system) or in any Optuna storage URL. Sweepers sharing a study together run exactly n_trials
  trials. Run the same command with the same hydra.sweep.dir and the search continues where it stopped.
A trial whose job fails (a user error, a diverging loss) is recorded as failed and the search goes on. The best
trial's overrides are printed and written to <sweep dir>/best_overrides.yaml. Lives in hydra_plugins/ because
Hydra takes sweepers only from there.
"""

import logging
import math
import os
import socket
import sys
from collections import Counter
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, n_jobs: int, direction: str, metric: str, pruner: str, startup_trials: int,
                 warmup_epochs: int, storage: str | None, study_name: str, seed: int, params: dict,
                 trial: int | None = None):  # fmt: skip
        self.n_trials, self.n_jobs, self.direction, self.metric = n_trials, n_jobs, direction, metric
        self.pruner, self.startup_trials, self.warmup_epochs = pruner, startup_trials, warmup_epochs
        self.storage, self.study_name, self.seed, self.params = storage, study_name, seed, dict(params or {})

    def setup(self, *, hydra_context, task_function, config) -> None:
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            sys.exit("error: hparams_search=optuna needs optuna: it comes with cnnlab's scale extra, "
                     "pip install -e '.[scale]' (make install does it)")  # fmt: skip
        self.check(config)
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def check(self, config) -> None:
        """Each setting of the search: one line and exit 1 for a wrong one, before any trial runs."""
        from cnnlab.sweep import PER_VALIDATION, PRUNERS, SEARCH_METRICS

        whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
        problems = {
            "n_trials": None if whole(self.n_trials, 1) else "an integer ≥ 1",
            "n_jobs": None if whole(self.n_jobs, 1) else "an integer ≥ 1: the trials asked and launched at once",
            "direction": None if self.direction in ("maximize", "minimize") else "one of maximize, minimize",
            "metric": None if self.metric in SEARCH_METRICS else f"one of {', '.join(SEARCH_METRICS)} (a number of "
            "metrics.json)",
            "pruner": None if self.pruner in PRUNERS else f"one of {', '.join(PRUNERS)}",
            "startup_trials": None if whole(self.startup_trials, 0) else "an integer ≥ 0",
            "warmup_epochs": None if whole(self.warmup_epochs, 0) else "an integer ≥ 0",
            "storage": None if self.storage is None or (isinstance(self.storage, str) and (
                self.storage == "journal" or "://" in self.storage)) else
                "null (SQLite under the sweep dir), journal (a journal file under it) or a database URL",
        }  # fmt: skip
        for key, must in problems.items():
            if must:
                sys.exit(f"error: hydra.sweeper.{key}={getattr(self, key)!r} must be {must}")
        best = "minimize" if self.metric.endswith("loss") else "maximize"
        if self.direction != best:
            sys.exit(f"error: hydra.sweeper.direction={self.direction} for {self.metric}, which is better "
                     f"{'lower' if best == 'minimize' else 'higher'}: use hydra.sweeper.direction={best}")  # fmt: skip
        if self.metric == "test/acc_tta" and not OmegaConf.select(config, "data.tta", default=False):
            sys.exit("error: hydra.sweeper.metric=test/acc_tta needs data.tta=true (the trials would have no such "
                     "number)")  # fmt: skip
        if self.pruner != "none" and self.metric not in PER_VALIDATION:
            sys.exit(f"error: hydra.sweeper.pruner={self.pruner} follows the metric at each validation, and "
                     f"{self.metric} is known only at the end: use hydra.sweeper.metric=val/acc_best, or "
                     f"hydra.sweeper.pruner=none")  # fmt: skip
        from cnnlab.relations import validation_off

        if self.metric.startswith("val/") and (why := validation_off(config)):
            sys.exit(f"error: hydra.sweeper.metric={self.metric} is a validation's, but {why}: hold some out (e.g. "
                     f"data.val_size=5000)")  # fmt: skip
        every = OmegaConf.select(config, "trainer.check_val_every_n_epoch", default=1)
        if self.pruner != "none" and every not in (None, 1):
            log.warning(f"hydra.sweeper.pruner={self.pruner} compares trials at their validations, and this config "
                        f"validates every {every} epochs (trainer.check_val_every_n_epoch={every}): a trial can "
                        f"be pruned only then")  # fmt: skip

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from cnnlab.search import pruner_of, storage_of

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        space = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(
            [f"{key}={value}" for key, value in self.params.items()])}  # fmt: skip
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage_of(self.storage, sweep_dir),
            direction=self.direction,
            sampler=optuna.samplers.TPESampler(seed=self.sampler_seed(), constant_liar=self.n_jobs > 1 or self.shared),
            pruner=pruner_of(self.pruner, self.startup_trials, self.warmup_epochs),
            load_if_exists=True,
        )
        fail_abandoned(study, self.shared)
        done = len(counted(study, finished=True))
        if done:
            log.info(f"continuing the study {self.study_name}: {done} of {self.n_trials} trials done")
        while batch := self.ask(study):
            jobs = [[*arguments, f"hydra.sweeper.trial={trial.number}",
                     *(f"{key}={suggest(trial, key, o)}" for key, o in space.items())] for trial in batch]  # fmt: skip
            results = self.launcher.launch(jobs, initial_job_idx=batch[0].number)  # side by side with a parallel one
            for trial, result in zip(batch, results, strict=True):
                self.tell(study, trial, result)
        wait_for_the_others(study)
        self.report_best(study, space, sweep_dir)

    @property
    def shared(self) -> bool:
        """A study that other sweepers may share: a journal file or a database URL, not the sweep dir's own SQLite."""
        return self.storage is not None

    def sampler_seed(self) -> int:
        """The sampler's seed; sweepers sharing a study each draw their own values (the same seed would have them
        propose the same first trials)."""
        import zlib

        return self.seed + zlib.crc32(WORKER.encode()) % 2**16 if self.shared else self.seed

    def ask(self, study) -> list:
        """Up to n_jobs new trials, while the study (shared with other sweepers, perhaps) has fewer than n_trials.
        Trial numbers are given in order by the storage: a trial whose number comes after the first n_trials
        counted ones (another sweeper asked at the same moment) is surplus, ends at once and is not run."""
        batch = []
        while len(batch) < self.n_jobs and len(counted(study)) < self.n_trials:
            trial = study.ask()
            trial.set_user_attr("worker", WORKER)
            if len([t for t in counted(study) if t.number < trial.number]) >= self.n_trials:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=optuna_state("FAIL"))
                break
            batch.append(trial)
        return batch

    def tell(self, study, trial, result) -> None:
        """The job's value to the study; a job that failed (its error.txt says why) is a failed trial, one its
        pruner stopped (ReportToTrial) a pruned one."""
        trial.set_user_attr("run_dir", str(Path(result.hydra_cfg.hydra.runtime.output_dir)))
        value = result.return_value if result.status == JobStatus.COMPLETED else None
        if study._storage.get_trial(trial._trial_id).user_attrs.get("pruned_at_epoch"):
            study.tell(trial, state=optuna_state("PRUNED"))
        elif isinstance(value, int | float) and math.isfinite(value):
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna_state("FAIL"))

    def report_best(self, study, space: dict, sweep_dir: Path) -> None:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if not finished:
            log.warning("no trial finished: no best trial")
            return
        best = study.best_trial
        lines = [f"{key}={best.params[key]}" for key in space]
        (sweep_dir / "best_overrides.yaml").write_text(
            OmegaConf.to_yaml({"trial": best.number, "value": best.value, "overrides": lines})
        )
        states = Counter(t.state.name.lower() for t in counted(study))
        print(
            f"best trial {best.number} of {sum(states.values())} ({', '.join(f'{n} {s}' for s, n in states.items())})"
            f": {self.metric}={best.value:.4f} with {' '.join(lines)}  ({sweep_dir / 'best_overrides.yaml'})"
        )


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # this sweeper process, as its trials name it


def counted(study, finished: bool = False) -> list:
    """The study's trials that count towards n_trials: all but the surplus ones (and, with finished, those still
    running)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    return [t for t in trials if t.state.is_finished()] if finished else trials


def fail_abandoned(study, shared: bool) -> None:
    """Trials left running by a sweeper of this machine that no longer runs (an interrupted search): failed, so that
    the search goes on with new ones (they count towards n_trials). Trials of sweepers that still run, here or on
    other machines, are theirs; so is, in a shared study, a trial not yet marked with its sweeper."""
    for trial in study.get_trials(deepcopy=False):
        worker = trial.user_attrs.get("worker")
        if trial.state.name == "RUNNING" and (abandoned_by(worker) if worker else not shared):
            study.tell(trial.number, state=optuna_state("FAIL"), skip_if_finished=True)


def abandoned_by(worker: str) -> bool:
    """Whether the sweeper `worker` (host:pid) was of this machine and no longer runs."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and not alive(int(pid or 0))


def wait_for_the_others(study) -> None:
    """The search ends when its study does: trials that other sweepers still run (sharing the study) are waited for,
    so that each sweeper's summary covers every trial. A trial of a sweeper of this machine that died is not; one
    of another machine's sweeper that died would be waited for until Ctrl-C (the line says whose)."""
    import time

    said = False
    while True:
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        running = [t for t in running if not abandoned_by(t.user_attrs.get("worker", ":0"))]
        if not running:
            return
        if not said:
            workers = sorted({t.user_attrs.get("worker", "?") for t in running})
            log.info(f"waiting for {len(running)} trial(s) that other sweepers run ({', '.join(workers)})")
            said = True
        time.sleep(1)


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def optuna_state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


def suggest(trial, key: str, override):
    """One value for `key` from its sweep: choice(...) → categorical; interval(a, b) → float (log with tag log,
    int when both ends are integers)."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return trial.suggest_categorical(key, [str(v) if not isinstance(v, int | float) else v for v in value.list])
    if isinstance(value, IntervalSweep):
        log = "log" in (value.tags or set())
        if isinstance(value.start, int) and isinstance(value.end, int) and not log:
            return trial.suggest_int(key, value.start, value.end)
        return trial.suggest_float(key, float(value.start), float(value.end), log=log)
    raise ValueError(f"hydra.sweeper.params.{key}: use choice(...) or interval(a, b), not {override.input_line}")
