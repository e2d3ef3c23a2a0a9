"""Beyond one process: DDP on CPU (gloo), each process on its own shard, one run dir; device and precision
groups. Multi-process runs are real `src/train.py` processes (Lightning re-executes the script per rank)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab import UserError
from cnnlab.evaluate import evaluate
from cnnlab.train import train
from tests.conftest import ROOT, compose_config, with_root_on_path


@pytest.mark.parametrize(
    ("overrides", "precision"),
    [(["precision=bf16"], "bf16-mixed"), (["trainer=ddp", "precision=fp16"], "16-mixed"),
     (["experiment=fast_cpu", "precision=fp32"], "32-true"), (["experiment=fast_cpu", "precision=bf16"], "bf16-mixed"),
     (["precision=bf16", "trainer.precision=32-true"], "32-true")],
)  # fmt: skip
def test_precision_is_a_group_that_wins_over_an_experiment(overrides, precision):
    assert compose_config("train", overrides).trainer.precision == precision


def test_fast_gpu_autotunes_cudnn_and_allows_tf32_matmuls_which_train_applies(tiny_overrides, monkeypatch):
    cfg = compose_config("train", ["experiment=fast_gpu"])
    assert (cfg.trainer.benchmark, cfg.float32_matmul_precision) == (True, "high")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: applied.append(value))
    applied = []
    train(compose_config("train", [*tiny_overrides, "float32_matmul_precision=medium", "trainer.max_steps=1"]))
    assert applied == ["medium"]


# Deterministic, and the first process alone draws extra random numbers every step (as a callback sampling on rank
# 0 would): the run a stopped and resumed one must end exactly like.
DETERMINISTIC = ["trainer.max_epochs=2", "trainer.deterministic=true", "optimizer=sgd_steplr", "model.dropout=0.5",
                 "+callbacks.draw._target_=tests.callbacks.DrawOnFirstProcess",
                 "+callbacks.record._target_=tests.callbacks.RecordShard"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tree_archive, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of 2 epochs on two CPU processes, each recording the training images it is given (<folder>/shards):
    the folder it ran in and the finished process. Shared by the tests below (each DDP start-up costs seconds)."""
    folder = tmp_path_factory.mktemp("ddp")
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *tiny(tree_archive, folder), "trainer.devices=2",
         *DETERMINISTIC, f"+callbacks.record.folder={folder / 'shards'}"],
        cwd=folder, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_shards_the_data_and_leaves_one_run_dir(ddp_run, tree_archive, tmp_path):
    folder, done = ddp_run
    (run,) = (folder / "outputs" / "runs").iterdir()  # one run dir for both processes
    assert done.stdout.strip().splitlines()[-1].endswith(f"run_dir={run}")  # one summary line, from rank 0
    assert len([line for line in done.stdout.splitlines() if line.startswith("test/acc=")]) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * 4  # 30 images a process, batches of 8
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.ckpt", Path(metrics["best_checkpoint"]).name}
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".log") == ["train.log", "train_process_1.log"]

    seen = read_shards(folder / "shards")
    assert_disjoint_and_complete(seen, epochs=2)
    assert seen[(0, 0)] != seen[(0, 1)]  # a new order each epoch

    # Validation and test are sharded too, and their metrics are still those of the whole split: 20 test images,
    # each counted once (not once per process), and the test accuracy that one process finds for the same weights.
    confusion = metrics["confusion_matrix"]
    assert sum(map(sum, confusion)) == 20
    one_process = [f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}", "trainer=cpu",
                   f"output_dir={tmp_path / 'eval'}"]  # fmt: skip
    evaluated = evaluate(compose_config("eval", [*one_process, f"ckpt_path='{metrics['best_checkpoint']}'"]))
    assert evaluated["confusion_matrix"] == confusion
    assert metrics["test/acc"] == pytest.approx(evaluated["test/acc"])
    assert metrics["test/loss"] == pytest.approx(evaluated["test/loss"], rel=1e-5)


def read_shards(folder: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, epoch) → the fingerprints of the training images that process was given that epoch, in order."""
    return {tuple(int(n) for n in path.stem.split("-")[1:]): path.read_text().split() for path in folder.iterdir()}


def assert_disjoint_and_complete(seen: dict, epochs: int, images: int = 60) -> None:
    for epoch in range(epochs):
        first, second = seen[(0, epoch)], seen[(1, epoch)]
        assert len(first) == len(second) == images // 2  # equal shards, each image once within a shard
        assert len(set(first)) == len(first) and not set(first) & set(second)  # disjoint
        assert len(set(first) | set(second)) == images  # together, every image once


def torchrun(*args: str, tmp_path, port: int, nnodes: int = 1, node_rank: int = 0, nproc: int = 2):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
         f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
         str(ROOT / "src" / "train.py"), *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=with_root_on_path(),
    )  # fmt: skip


def tiny(tree_archive, tmp_path) -> list[str]:
    return ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.val_size=20",
            "data.batch_size=8", f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_torchrun_jobs_back_to_back_on_one_port_each_leave_one_run_dir(tree_archive, tmp_path):
    """Every process composes its config under torchrun; the first one's run dir reaches the others through
    torchrun's own store, so the second job on the same port never takes the first job's folder."""
    port, runs = free_port(), tmp_path / "outputs" / "runs"
    for job in (1, 2):
        process = torchrun(
            *tiny(tree_archive, tmp_path),
            "trainer.devices=2",
            f"seed={job}",
            "+callbacks.mark._target_=tests.callbacks.MarkRunDir",
            tmp_path=tmp_path,
            port=port,
        )
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert len([line for line in stdout.splitlines() if line.startswith("test/acc=")]) == 1
        assert len(list(runs.iterdir())) == job  # one run dir for both processes of each job
    for run in runs.iterdir():
        assert json.loads((run / "metrics.json").read_text())["global_step"] == 4  # 30 images a rank, batches of 8
        assert (run / "process-0").is_file() and (run / "process-1").is_file()


@pytest.mark.slow
def test_torchrun_on_two_nodes_of_this_machine_leaves_one_run_dir(tree_archive, tmp_path):
    port, args = free_port(), [*tiny(tree_archive, tmp_path), "trainer.devices=1", "trainer.num_nodes=2"]
    nodes = [torchrun(*args, tmp_path=tmp_path, port=port, nnodes=2, node_rank=rank, nproc=1) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4


@pytest.mark.slow
def test_a_ddp_final_fit_without_validation_trains_every_image_and_tests_its_last_epoch(tree_archive, tmp_path):
    """data.val_size=0 on two processes: each trains its half of all 80 images; rank 0 keeps each epoch's end."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *tiny(tree_archive, tmp_path), "trainer.devices=2",
         "trainer.max_epochs=2", "data.val_size=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 10 and metrics["val/acc_best"] is None  # 40 images a rank, batches of 8
    assert Path(metrics["best_checkpoint"]).name == "epoch_001.ckpt"
    assert sorted(path.name for path in (run / "checkpoints").glob("*.ckpt")) == ["epoch_001.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_ddp_inside_a_sweep_gives_exactly_the_sweeps_jobs(tree_archive, tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "-m", *tiny(tree_archive, tmp_path), "trainer.devices=2",
         "optimizer=adam,sgd_steplr", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0].startswith("0_") and jobs[1].startswith("1_")
    for job in jobs:
        assert json.loads((sweep / job / "metrics.json").read_text())["global_step"] == 4  # sharded: 30 a process
        assert (sweep / job / "train_process_1.log").is_file()  # its second process ran this job, in its folder
    assert not (tmp_path / "outputs").exists()  # no extra process started a sweep or a run of its own
    assert done.stdout.strip().splitlines()[-1] == f"sweep: 2 of 2 jobs finished; {sweep}"


@pytest.mark.slow
def test_a_joblib_sweep_runs_two_jobs_at_once_each_on_its_share_of_the_cores(tree_archive, tmp_path):
    sweep, threads = tmp_path / "sweep", tmp_path / "threads"
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
         "trainer=cpu", "trainer.max_epochs=1", "data.val_size=20", f"data.root={tree_archive}",
         f"data.cache_dir={tmp_path / 'cache'}", "optimizer=adam,sgd_steplr", f"hydra.sweep.dir={sweep}",
         "+callbacks.threads._target_=tests.callbacks.RecordThreads", f"+callbacks.threads.folder={threads}",
         "+callbacks.threads.job=${hydra:job.num}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sweep: 2 of 2 jobs finished; {sweep}" in done.stdout.splitlines()  # the workers' lines may come later
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((job / "metrics.json").is_file() for job in jobs)
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert [(threads / f"threads-{n}.txt").read_text() for n in (0, 1)] == [share, share]


def test_the_slurm_preset_asks_for_one_task_per_ddp_process(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import CONF

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for it: a cluster's login node
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    submitted = {}

    def capture(executor, function, *arguments):  # instead of calling sbatch
        submitted["executor"] = executor
        raise StopIteration

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                 "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 "hydra.job.name=train"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)  # Hydra's submitit SlurmLauncher, as the sweep makes it
    launcher.config = cfg
    with pytest.raises(StopIteration):
        launcher.launch([["seed=0"]], initial_job_idx=0)
    script = submitted["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit x", "id")
    lines = set(script.splitlines())
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=60",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=16GB", "#SBATCH --signal=USR2@120"):  # fmt: skip
        assert line in lines, script
    assert f"{tmp_path / 'sweep'}/.submitit/" in script


def test_lightning_sees_a_slurm_job_of_2_nodes_by_4_tasks(monkeypatch):
    from lightning import Trainer
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    # The Trainer sets this process-wide rank to the faked task's (5): put it back afterwards, or the tests that
    # follow would log nothing (loggers write on rank 0 only).
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)

    for key, value in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NAME": "train",
                       "SLURM_JOB_ID": "123", "SLURM_NODELIST": "node[1-2]", "SLURM_PROCID": "5",
                       "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)  # as srun sets them for the 6th task, on the second node
    cfg = compose_config(
        "train", ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "trainer.accelerator=cpu"]
    )
    trainer = Trainer(**{k: cfg.trainer[k] for k in ("accelerator", "devices", "num_nodes")}, strategy="ddp",
                      logger=False)  # fmt: skip
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)


@pytest.mark.slow
def test_a_sweep_through_submitit_local_run_twice_into_one_folder_trains_twice(tree_archive, tmp_path):
    sweep = tmp_path / "sweep"
    for _ in range(2):  # the second time, the jobs find the first time's last.ckpt: not theirs, not resumed
        done = subprocess.run(
            [sys.executable, str(ROOT / "src" / "train.py"), "-m", "hydra/launcher=submitit_local", "trainer=cpu",
             "trainer.max_epochs=1", "data.val_size=20", f"data.root={tree_archive}",
             f"data.cache_dir={tmp_path / 'cache'}", "optimizer=adam,sgd_steplr", f"hydra.sweep.dir={sweep}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert [p.name[:2] for p in jobs] == ["0_", "1_"]
        for job in jobs:
            metrics = json.loads((job / "metrics.json").read_text())
            assert (metrics["resumed_from"], metrics["epochs"], metrics["global_step"]) == (None, 1, 1)
        assert f"sweep: 2 of 2 jobs finished; {sweep}" in done.stdout.splitlines()


@pytest.mark.slow
def test_a_preempted_submitit_job_checkpoints_is_requeued_and_resumes(tree_archive, tmp_path):
    """submitit's SIGUSR2 (SLURM: before the time limit, or on pre-emption) mid-epoch: RunGuard writes last.ckpt at
    the step's end and hands over to submitit's handler, which requeues the job (submitit_local: the controller
    starts it again); the job started again finds its own last.ckpt and finishes from there."""
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "-m", "hydra/launcher=submitit_local", "trainer=cpu",
         "trainer.max_epochs=2", "data.val_size=20", "data.batch_size=16", f"data.root={tree_archive}",
         f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
         "+callbacks.preempt._target_=tests.callbacks.SignalAt", "+callbacks.preempt.step=5",
         "+callbacks.preempt.signal=SIGUSR2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = sweep.glob("0_*")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(job / "checkpoints" / "last.ckpt")
    assert (metrics["epochs"], metrics["global_step"]) == (2, 8)  # 60 training images in batches of 16: 4 steps
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs
    log = (job / "train.log").read_text()
    assert "SIGUSR2: stopping after this step with a checkpoint" in log
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'} (epoch 1, step 6)" in log
    assert f"sweep: 1 of 1 jobs finished; {sweep}" in done.stdout.splitlines()


@pytest.mark.slow
def test_ddp_stopped_on_one_process_resumes_to_the_unstopped_runs_metrics_with_disjoint_shards(
    ddp_run, tree_archive, tmp_path
):
    """Two processes; the first one alone draws extra random numbers every step (a callback of its own), the
    second alone gets SIGTERM. Both stop at the same step with one checkpoint; resumed, the run ends with the
    metrics and weights of a run never stopped (ddp_run), and every epoch's shards stay disjoint and complete."""
    env = with_root_on_path()

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "src" / "train.py"), *tiny(tree_archive, tmp_path), "trainer.devices=2",
             *DETERMINISTIC, "hydra.run.dir=run", f"+callbacks.record.folder={tmp_path / 'run-shards'}", *extra],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip

    reference_folder, _ = ddp_run
    (reference,) = (reference_folder / "outputs" / "runs").iterdir()
    signal_rank_1 = ["+callbacks.stop._target_=tests.callbacks.SignalAt", "+callbacks.stop.step=2",
                     "+callbacks.stop.signal=SIGTERM", "+callbacks.stop.rank=1"]  # fmt: skip
    stopped = run(*signal_rank_1)
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert stopped.stderr.count("stopped by SIGTERM at epoch 0, step 3; resume with:") == 1  # one line for both
    checkpoint = torch_load(last)
    assert checkpoint["global_step"] == 3
    assert len(checkpoint["callbacks"]["RngState"]["processes"]) == 2  # each process's own random state
    shutil.copy(last, tmp_path / "mid-epoch.ckpt")
    resumed = run(*signal_rank_1, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "val/acc_best", "epochs", "global_step", "confusion_matrix"):
        assert metrics[key] == expected[key], key
    weights = torch_load(last)["state_dict"]
    expected_weights = torch_load(reference / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(weights[name], value) for name, value in expected_weights.items())
    shards = read_shards(tmp_path / "run-shards")  # the stopped run's part of epoch 0, then the resumed run's rest
    assert_disjoint_and_complete(shards, epochs=2)
    assert shards == read_shards(reference_folder / "shards")

    # On another number of processes: one line saying why not (Lightning counts an epoch's steps per process).
    one_process = [f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=20",
                   "data.batch_size=8", "trainer=cpu", f"output_dir={tmp_path / 'one'}"]  # fmt: skip
    for checkpoint in (tmp_path / "mid-epoch.ckpt", last):  # taken mid-epoch, and at the end of the last epoch
        with pytest.raises(UserError, match=r"was written by a run of 2 process\(es\), this one has 1 \(trainer"):
            train(compose_config("train", [*one_process, "trainer.max_epochs=3", f"ckpt_path={checkpoint}"]))


@pytest.mark.slow
def test_a_nan_loss_on_one_ddp_process_stops_both_with_one_error_line(tree_archive, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "train.py"),
            *tiny(tree_archive, tmp_path),
            "trainer.devices=2",
            "hydra.run.dir=run",
            "+callbacks.nan._target_=tests.callbacks.NanLossAt",
            "+callbacks.nan.step=2",
            "+callbacks.nan.rank=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=with_root_on_path(),
    )  # fmt: skip  (a hang would end in the timeout: the other process waiting in DDP's gradient all-reduce)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: the training loss is nan on process 1 (of 2) at epoch 0, step 2 ")
    checkpoint = torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # written by both, before the step
    assert checkpoint["global_step"] == 2
    assert all(value.isfinite().all() for name, value in checkpoint["state_dict"].items() if name.startswith("net."))


def torch_load(path: Path) -> dict:
    return torch.load(path, weights_only=True)
