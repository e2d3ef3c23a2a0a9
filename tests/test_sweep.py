"""A sweep survives a failing job: the job leaves its error line, the others run, the sweep says so at the end
and exits non-zero, and compare lists the jobs that failed or never ran from the sweep's own record."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # real processes: the full tier


def test_a_failing_middle_job_does_not_stop_the_sweep(tree_archive, tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "-m", "model.conv2_kernel=3,20,4", "trainer=cpu",
         "trainer.max_epochs=1", "data.val_size=20", f"data.root={tree_archive}",
         f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    jobs = {p.name.split("_", 1)[0]: p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs) == ["0", "1", "2"]
    assert (jobs["0"] / "metrics.json").is_file() and (jobs["2"] / "metrics.json").is_file()
    error = (jobs["1"] / "error.txt").read_text().strip()
    assert error.startswith("error: model: conv2 (kernel 20") and not (jobs["1"] / "metrics.json").exists()
    assert done.stderr.strip().splitlines()[-1] == (
        f"sweep: 2 of 3 jobs finished, 1 did not ({jobs['1'].name}: {error}); {sweep}"
    )

    # The same sweep as if it had been stopped before its last job: compare lists both kinds.
    shutil.rmtree(jobs["2"])
    report = subprocess.run(
        [sys.executable, str(ROOT / "src" / "compare.py"), str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    text = (sweep / "report.md").read_text()
    assert "1 finished jobs, 2 did not finish" in text
    assert f"- {jobs['1'].name}: {error}" in text
    assert "- 2 (model.conv2_kernel=4 trainer=cpu trainer.max_epochs=1 " in text and ": never ran" in text
