"""src/compare.py on a real (tiny) multirun: report.md, curves.png, and the clear errors."""

import json
import shutil

import pytest

from tests.conftest import BOTH_WAYS, Ran, run_in_process


def compare(*args: str, run_script=run_in_process) -> Ran:
    return run_script("compare.py", *map(str, args))


@pytest.fixture
def sweep(tiny_sweep, tmp_path):
    """A copy of the tiny sweep that a test may change."""
    return shutil.copytree(tiny_sweep, tmp_path / "sweep")


def table_rows(report: str) -> list[list[str]]:
    """The rows of the report's first table (the groups), without its header."""
    table = report.split("\n\n")[2]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return [[cell.strip() for cell in row] for row in rows]


def test_report_lists_every_finished_job(sweep):
    assert compare(sweep).returncode == 0
    report = (sweep / "report.md").read_text()
    for metrics_file in sweep.glob("*/metrics.json"):
        test_acc = 100 * json.loads(metrics_file.read_text())["test/acc"]
        assert f"| {metrics_file.parent.name} | {test_acc:.2f} |" in report


def test_report_groups_by_the_swept_optimizer(sweep):
    done = compare(sweep)
    assert done.returncode == 0, done.stderr
    report = (sweep / "report.md").read_text()
    assert report in done.stdout  # the table is printed too
    rows = {row[0]: row for row in table_rows(report)}
    assert set(rows) == {"optimizer=adam", "optimizer=sgd_steplr"}
    assert rows["optimizer=adam"][1] == "2" and rows["optimizer=adam"][-1] == "Option 1: 70.51"
    assert rows["optimizer=sgd_steplr"][-1] == "Option 2: 70.16"
    accs = [100 * json.loads(p.read_text())["test/acc"] for p in sweep.glob("*optimizer=adam*/metrics.json")]
    mean = sum(accs) / 2
    assert rows["optimizer=adam"][2].startswith(f"{mean:.2f} ± ")
    assert rows["optimizer=adam"][3] == f"{min(accs):.2f} – {max(accs):.2f}"
    assert rows["optimizer=adam"][5] == "2"  # epochs
    assert (sweep / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_by_another_key_and_say_when_replacing(sweep):
    assert compare(sweep).returncode == 0
    again = compare(sweep, "by=seed")
    assert again.returncode == 0
    assert f"note: replacing the existing {sweep / 'report.md'}" in again.stdout
    assert [row[0] for row in table_rows((sweep / "report.md").read_text())] == ["seed=0", "seed=1"]


def test_final_fits_without_validation_show_no_validation_accuracy(sweep):
    for metrics_file in sweep.glob("*/metrics.json"):  # as data.val_size=0 writes them: nothing validated
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "val/acc_best": None}))
    done = compare(sweep)
    assert done.returncode == 0, done.stderr
    report = (sweep / "report.md").read_text()
    assert [row[4] for row in table_rows(report)] == ["–", "–"]  # best val acc, per group
    for metrics_file in sweep.glob("*/metrics.json"):  # and per job
        test_acc = 100 * json.loads(metrics_file.read_text())["test/acc"]
        assert f"| {metrics_file.parent.name} | {test_acc:.2f} | – |" in report


def test_failed_jobs_are_listed_not_hidden(sweep):
    (failed,) = [p for p in sweep.iterdir() if p.name.startswith("3_")]
    (failed / "metrics.json").unlink()
    done = compare(sweep)
    assert done.returncode == 0, done.stderr
    report = (sweep / "report.md").read_text()
    assert "3 finished jobs, 1 did not finish" in report and f"- {failed.name}: unfinished" in report
    rows = {row[0]: row[1] for row in table_rows(report)}
    assert rows == {"optimizer=adam": "2", "optimizer=sgd_steplr": "1"}


@BOTH_WAYS  # as a process too: its one line is all its stderr holds
def test_not_a_multirun(tmp_path, run_script):
    done = compare(tmp_path, run_script=run_script)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: {tmp_path} is not a multirun dir: it has no multirun.yaml (made by `train.py -m`)"
    )
    assert not (tmp_path / "report.md").exists()


def test_no_finished_job(sweep):
    for metrics in sweep.glob("*/metrics.json"):
        metrics.unlink()
    done = compare(sweep)
    assert done.returncode == 1 and "none of its 4 jobs finished" in done.stderr
    assert not (sweep / "report.md").exists() and not (sweep / "curves.png").exists()


@BOTH_WAYS
def test_jobs_with_different_metrics(sweep, run_script):
    metrics_file = next(sweep.glob("0_*/metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    del metrics["val/acc_best"]
    metrics_file.write_text(json.dumps(metrics))
    done = compare(sweep, run_script=run_script)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "lack metrics" in done.stderr and "val/acc_best" in done.stderr
    assert not (sweep / "report.md").exists()


def test_bad_arguments(sweep):
    assert compare().returncode == 2
    assert compare(sweep, "group=seed").returncode == 2
    unknown = compare(sweep, "by=model.pool")
    assert unknown.returncode == 1 and "by=model.pool" in unknown.stderr and "'optimizer'" in unknown.stderr
