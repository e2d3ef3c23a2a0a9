"""An Optuna search's side of a run: the study's storage, the pruner, and a trial's validations reported to it.

The sweeper (src/hydra_plugins/cnnlab_optuna) asks the study for trials and launches each as a job with
`hydra.sweeper.trial=<its number>`. A job that is a trial of a search with a pruner reports each validation's value
of the searched metric to its trial through the study's storage (`ReportToTrial`, which cnnlab.train adds), and
stops early when the pruner says the trial falls behind the others at the same epoch: the trial is then PRUNED,
and metrics.json says `pruned_at_epoch`. Hydra itself has no channel from a job back to its sweeper; the study's
storage is one, and it works across processes and machines (SQLite, a journal file on a shared file system, a
database server).
"""

import os
from pathlib import Path

from lightning import Callback, LightningModule, Trainer


def storage_of(storage: str | None, sweep_dir: Path):
    """null: SQLite under the sweep dir; `journal`: Optuna's journal file under it (for a file system that several
    machines share); anything else: an Optuna storage URL (postgresql://…, sqlite:///…)."""
    import optuna

    if storage is None:
        return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str((sweep_dir / "optuna.journal").resolve())))
    return storage


def pruner_of(name: str, startup_trials: int, warmup_epochs: int):
    """median: stop a trial whose best value so far is worse than the median of the earlier trials' at the same
    epoch, once `startup_trials` have finished; hyperband: Optuna's successive halving in brackets. Neither decides
    before `warmup_epochs` validations."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    return optuna.pruners.NopPruner()


PRUNED_SEARCH = "CNNLAB_PRUNED_SEARCH_METRIC"  # set by a trial's first process for the others of a DDP run


def trial_report() -> "ReportToTrial | None":
    """The callback that reports this job's validations to its Optuna trial, when the job is a trial of a search
    that prunes (None otherwise). The other processes of a DDP trial get one too, without the trial: they follow
    the first process's decision (they are started with the run's own overrides, not the sweeper's, and find the
    metric in the environment the first one leaves them)."""
    from hydra.core.hydra_config import HydraConfig

    if other_process_of_a_run() and os.environ.get(PRUNED_SEARCH):
        return ReportToTrial(None, os.environ[PRUNED_SEARCH])
    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if sweeper.get("trial") is None or sweeper.get("pruner", "none") == "none":
        os.environ.pop(PRUNED_SEARCH, None)
        return None
    import optuna

    study = optuna.load_study(
        study_name=sweeper.study_name,
        storage=storage_of(sweeper.storage, Path(HydraConfig.get().sweep.dir)),
        pruner=pruner_of(sweeper.pruner, sweeper.startup_trials, sweeper.warmup_epochs),
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, sweeper.trial)
    os.environ[PRUNED_SEARCH] = sweeper.metric  # inherited by the processes Lightning starts for DDP
    return ReportToTrial(optuna.trial.Trial(study, trial_id), sweeper.metric)


def other_process_of_a_run() -> bool:
    """A process of a multi-process run other than the first (Lightning's LOCAL_RANK, torchrun's RANK)."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def searched_metric() -> str:
    """What this job returns to its sweeper: hydra.sweeper.metric of a search, else val/acc_best."""
    from hydra.core.hydra_config import HydraConfig

    metric = HydraConfig.get().sweeper.get("metric") if HydraConfig.initialized() else None
    return metric or "val/acc_best"


class ReportToTrial(Callback):
    """At each validation's end: the searched metric's value to the trial (step = the epoch); the run stops at the
    end of that epoch when the pruner says so. Decided by the first process, followed by all (DDP)."""

    def __init__(self, trial, metric: str):  # trial None: another process of a DDP run
        self.trial, self.metric = trial, metric
        self.pruned_at_epoch: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            self.trial.report(float(trainer.callback_metrics[self.metric]), step=trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned_at_epoch = trainer.current_epoch + 1
            trainer.should_stop = True
            if trainer.is_global_zero and self.trial is not None:
                self.trial.set_user_attr("pruned_at_epoch", self.pruned_at_epoch)  # the sweeper records it PRUNED
