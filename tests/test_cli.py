"""The entry points as a user runs them: separate processes, Hydra's own command line; and a multirun (in this
process, where Hydra's basic launcher runs its jobs one after the other too: tests/conftest.py's tiny_sweep_run)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import BOTH_WAYS, ROOT


def run(script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_multirun_gives_each_job_its_folder_and_header_and_sums_up(tiny_sweep_run):
    sweep, done = tiny_sweep_run  # optimizer=adam,sgd_steplr seed=0,1: four jobs, in one process
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [job[:2] for job in jobs] == ["0_", "1_", "2_", "3_"]
    assert "optimizer=adam" in jobs[0] and "seed=0" in jobs[0] and "optimizer=sgd_steplr" in jobs[3]
    headers = [line for line in done.stdout.splitlines() if line.startswith("cnnlab · ")]  # each job says which it is
    assert [f" · job {n} of 4 · " in header for n, header in enumerate(headers, 1)] == [True] * 4
    assert "optimizer=sgd_steplr" in headers[3] and "StepLR" in headers[3]
    for job in jobs:
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
        assert "test/acc" in json.loads((sweep / job / "metrics.json").read_text())
    *_, job_line, summary = done.stdout.strip().splitlines()
    assert job_line.startswith("test/acc=") and job_line.endswith(jobs[3])
    assert summary == f"sweep: 4 of 4 jobs finished; {sweep}"


@pytest.mark.slow
def test_single_run_dir_and_summary_line(tree_archive, tmp_path):
    done = run(
        "train.py",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "optimizer=sgd_steplr",
        f"data.root={tree_archive}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_size=20",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.endswith("_data.val_size=20,optimizer=sgd_steplr,trainer.max_epochs=1,trainer=cpu")
    assert {"metrics.json", "train.log", ".hydra", "checkpoints", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    assert done.stdout.strip().splitlines()[-1] == (
        f"test/acc={json.loads((run_dir / 'metrics.json').read_text())['test/acc']:.4f} "
        f"val/acc_best={json.loads((run_dir / 'metrics.json').read_text())['val/acc_best']:.4f} run_dir={run_dir}"
    )


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_non_zero(tmp_path):
    missing = run(
        "train.py", f"data.root={tmp_path / 'nothing'}", "data.download=false", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: data.root={tmp_path / 'nothing'}: no such file")
    assert "Traceback" not in missing.stderr
    assert (tmp_path / "r" / "error.txt").read_text() == missing.stderr.strip().splitlines()[-1] + "\n"

    shapes = run("train.py", "model.conv2_kernel=20", f"hydra.run.dir={tmp_path / 's'}")
    assert shapes.returncode == 1 and "error: model: conv2 (kernel 20" in shapes.stderr
    assert "Traceback" not in shapes.stderr


@pytest.mark.slow
def test_wrong_overrides_get_hydra_errors_with_the_choices(tmp_path):
    unknown = run("train.py", "optimizer=adamw", f"hydra.run.dir={tmp_path}")
    assert unknown.returncode != 0 and "Available options" in unknown.stderr and "sgd_steplr" in unknown.stderr
    wrong_type = run("train.py", "data.batch_size=many", f"hydra.run.dir={tmp_path}")
    assert wrong_type.returncode != 0


@pytest.mark.slow
def test_eval_needs_a_checkpoint(tmp_path):
    done = run("eval.py", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "error: ckpt_path=<file> is required: the checkpoint to evaluate"
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a CUDA GPU gets")
def test_gpu_benchmark_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    report = tmp_path / "gpu-bench.md"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "unused-data", str(report)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
    assert not report.exists()


@BOTH_WAYS
def test_a_run_folder_pasted_as_printed_is_read_whatever_its_name_holds(tiny_trained, tmp_path, run_script):
    metrics, run, overrides = tiny_trained
    pasted = shutil.copytree(run, tmp_path / "2026-12-06_04-50-00_data.val_size=20,optimizer=adam")
    data = [arg for arg in overrides if arg.startswith(("data.root=", "data.cache_dir="))]
    done = run_script("eval.py", f"ckpt_path={pasted}", *data, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]


@BOTH_WAYS
def test_a_value_holding_hydras_syntax_that_names_no_path_gets_how_to_quote_it(tmp_path, run_script):
    done = run_script("eval.py", f"ckpt_path={tmp_path}/gone_optimizer=adam", cwd=tmp_path)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 1 and line.startswith("error: ") and "give it as \"key='value'\"" in line
