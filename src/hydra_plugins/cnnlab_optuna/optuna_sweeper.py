"""A Hydra sweeper that drives a current Optuna: python src/train.py -m hparams_search=optuna

hydra-optuna-sweeper 1.2, the newest on the registry, pins optuna < 3 (and its SQLite storage SQLAlchemy < 2);
this sweeper asks a current Optuna for each trial's values and runs the trial as a job through Hydra's own
launcher, so a trial is an ordinary job folder, and the search space is written in Hydra's sweep grammar
(`choice(...)`, `interval(a, b)`, `tag(log, interval(a, b))`). The study lives in SQLite under the sweep dir
(or any Optuna storage URL, for searches on many machines): run the same command with the same
hydra.sweep.dir and the search continues where it stopped. A trial whose job fails (a user error, a diverging
loss) is recorded as failed and the search goes on. The best trial's overrides are printed and written to
<sweep dir>/best_overrides.yaml. Lives in hydra_plugins/ because Hydra takes sweepers only from there.
"""

import logging
import math
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, direction: str, metric: str, storage: str | None, study_name: str, seed: int,
                 params: dict):  # fmt: skip
        self.n_trials, self.direction, self.metric, self.storage = n_trials, direction, metric, storage
        self.study_name, self.seed, self.params = study_name, seed, dict(params or {})

    def setup(self, *, hydra_context, task_function, config) -> None:
        import importlib.util
        import sys

        if importlib.util.find_spec("optuna") is None:
            sys.exit("error: hparams_search=optuna needs optuna: it comes with cnnlab's scale extra, "
                     "pip install -e '.[scale]' (make install does it)")  # fmt: skip
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        space = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(
            [f"{key}={value}" for key, value in self.params.items()])}  # fmt: skip
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=self.seed)
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction, sampler=sampler, load_if_exists=True
        )
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # an interrupted search
            study.tell(stale.number, state=TrialState.FAIL)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)))
        if done:
            log.info(f"continuing the study in {storage}: {done} of {self.n_trials} trials done")
        for _ in range(done, self.n_trials):
            trial = study.ask()
            overrides = [*arguments, *(f"{key}={suggest(trial, key, o)}" for key, o in space.items())]
            (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            value = result.return_value if result.status == JobStatus.COMPLETED else None
            if isinstance(value, int | float) and math.isfinite(value):
                study.tell(trial, value)
            else:
                study.tell(trial, state=TrialState.FAIL)  # the job's error.txt says why
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not finished:
            log.warning("no trial finished: no best trial")
            return
        best = study.best_trial
        lines = [f"{key}={best.params[key]}" for key in space]
        (sweep_dir / "best_overrides.yaml").write_text(
            OmegaConf.to_yaml({"trial": best.number, "value": best.value, "overrides": lines})
        )
        print(f"best trial {best.number}: {self.metric}={best.value:.4f} with "
              f"{' '.join(lines)}  ({sweep_dir / 'best_overrides.yaml'})")  # fmt: skip


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
