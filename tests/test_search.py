"""Optuna searches that prune, run trials side by side, and share one study between sweeper processes, through
real `src/train.py -m hparams_search=optuna` processes on the tiny data."""

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_in_process, with_root_on_path

optuna = pytest.importorskip("optuna")


def search_command(tree_archive, tmp_path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), "-m", "hparams_search=optuna", "trainer=cpu",
            "data.val_size=20", "data.batch_size=16", f"data.root={tree_archive}",
            f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'search'}", *extra]  # fmt: skip


def log_span(job: Path) -> tuple[datetime, datetime]:
    """The first and last time stamps of a job's log (Hydra's file format: [YYYY-MM-DD HH:MM:SS,mmm]...)."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", (job / "train.log").read_text(), re.M)
    return datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%S,%f"), datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f")


def test_a_search_records_each_trial_with_the_value_its_job_wrote(tree_archive, tmp_path):
    """The sweeper's own path in this process: two trials of one epoch, one after the other."""
    done = run_in_process("train.py", *search_command(tree_archive, tmp_path, "hydra.sweeper.n_trials=2",
                                                      "trainer.max_epochs=1")[2:], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "search"
    study = optuna.load_study(study_name="cnnlab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        (folder,) = sweep.glob(f"{trial.number}_*")
        assert trial.value == json.loads((folder / "metrics.json").read_text())["val/acc_best"]


@pytest.mark.slow
def test_a_pruned_search_runs_two_trials_at_once_records_a_failing_one_and_continues(tree_archive, tmp_path):
    import yaml

    def search(trials: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            search_command(tree_archive, tmp_path, f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.n_jobs=2",
                           "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.sweeper.pruner=median",
                           "hydra.sweeper.startup_trials=1", "hydra.sweeper.warmup_epochs=0", "trainer.max_epochs=2",
                           "+callbacks.fail._target_=tests.callbacks.FailJob", "+callbacks.fail.job=${hydra:job.num}",
                           "+callbacks.fail.fail=1"),
            cwd=tmp_path, capture_output=True, text=True, timeout=400, env=with_root_on_path(),
        )  # fmt: skip

    first = search(trials=4)  # trial 1 fails on purpose
    assert first.returncode == 1, first.stderr[-3000:]  # a job did not finish: the sweep says so
    sweep = tmp_path / "search"
    assert "error: job 1 fails on purpose" in (next(sweep.glob("1_*")) / "error.txt").read_text()
    again = search(trials=5)  # the same command and sweep dir: one more trial
    assert "4 of 5 trials done" in again.stdout + again.stderr
    study = optuna.load_study(study_name="cnnlab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    states = [trial.state.name for trial in study.trials]
    assert len(states) == 5 and states[1] == "FAIL" and "PRUNED" in states and "COMPLETE" in states, states
    for trial in study.trials:
        (folder,) = sweep.glob(f"{trial.number}_*")  # each trial's folder carries its number
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        assert f"model.dropout={trial.params['model.dropout']}" in overrides  # the values its job ran with
        assert trial.user_attrs["run_dir"] == str(folder)
        if trial.state.name == "FAIL":
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        if trial.state.name == "PRUNED":  # its folder says so, and it stopped at that epoch
            assert metrics["pruned_at_epoch"] == trial.user_attrs["pruned_at_epoch"] == metrics["epochs"]
        else:
            assert "pruned_at_epoch" not in metrics and metrics["epochs"] == 2
            assert trial.value == pytest.approx(metrics["val/acc_best"])  # val/acc_best, not test/acc
    best = yaml.safe_load((sweep / "best_overrides.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert f"best trial {best['trial']} of 5 (" in again.stdout
    first_job, second_job = (log_span(next(sweep.glob(f"{n}_*"))) for n in (2, 3))  # a batch of two: side by side
    assert first_job[0] < second_job[1] and second_job[0] < first_job[1], (first_job, second_job)
    report = subprocess.run([sys.executable, str(ROOT / "src" / "compare.py"), str(sweep)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "pruner stopped early" in (sweep / "report.md").read_text()
    assert re.search(r"pruned at epoch \d", (sweep / "report.md").read_text())


@pytest.mark.slow
def test_two_sweepers_sharing_a_journal_study_run_exactly_n_trials(tree_archive, tmp_path):
    command = search_command(tree_archive, tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.storage=journal",
                             "trainer.max_epochs=1")  # fmt: skip
    sweepers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=with_root_on_path()) for _ in range(2)]  # fmt: skip
    outputs = [sweeper.communicate(timeout=400) for sweeper in sweepers]
    assert [sweeper.returncode for sweeper in sweepers] == [0, 0], [err[-2000:] for _, err in outputs]
    sweep = tmp_path / "search"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep / "optuna.journal")))
    trials = optuna.load_study(study_name="cnnlab", storage=storage).trials
    counted = [trial for trial in trials if not trial.user_attrs.get("surplus")]
    assert sorted(trial.number for trial in counted) == [0, 1, 2]  # the first three; any later one is surplus
    assert [trial.state.name for trial in counted] == ["COMPLETE"] * 3  # none lost
    ran = sorted(int(folder.name.split("_", 1)[0]) for folder in sweep.iterdir() if folder.is_dir())
    assert ran == sorted(trial.number for trial in counted)  # each ran once, surplus ones never
    assert all((next(sweep.glob(f"{n}_*")) / "metrics.json").is_file() for n in ran)


def test_the_other_processes_of_a_ddp_trial_follow_the_first(monkeypatch):
    """Started by Lightning with the run's own overrides (not the sweeper's), they find the searched metric in the
    environment the first process leaves them, and take part in its decision (a collective call on every process)."""
    from cnnlab.search import PRUNED_SEARCH, ReportToTrial, trial_report

    monkeypatch.setenv(PRUNED_SEARCH, "val/acc_best")
    monkeypatch.setenv("LOCAL_RANK", "1")
    report = trial_report()
    assert isinstance(report, ReportToTrial) and report.trial is None and report.metric == "val/acc_best"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert trial_report() is None  # a first process outside a search
