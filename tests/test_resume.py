"""Trust a run: a run stopped by a signal, or killed, resumes to the same result as one never stopped.

The runs that are stopped are real `src/train.py` processes; tests.callbacks.PauseAt holds one at a known
training step until the signal is sent. The tiny data has 60 training images in batches of 16: 4 steps an epoch.
"""

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab import UserError
from cnnlab.config import fastest_cpu_precision
from cnnlab.resume import AtomicCheckpointIO
from cnnlab.train import train
from tests.conftest import ROOT, compose_config, tiny_run, with_root_on_path

STEPS_PER_EPOCH = 4
# SGD + StepLR (the scheduler's position matters), 3 epochs, deterministic algorithms.
SETTINGS = ["optimizer=sgd_steplr", "scheduler.step_size=1", "trainer.max_epochs=3", "trainer.deterministic=true"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def results(metrics: dict) -> dict:
    """metrics.json without what names the run, times it or says what made it (its command line)."""
    naming = ("best_checkpoint", "resumed_from", "wall_s", "run_dir", "metadata")
    return {k: v for k, v in metrics.items() if k not in naming}


@pytest.fixture(scope="module")
def reference(tree_archive, tmp_path_factory) -> tuple[dict, Path]:
    """The same run, never stopped: trained once for the tests of this file, which only read it."""
    folder = tmp_path_factory.mktemp("reference")
    run = folder / "reference"
    return train(compose_config("train", [*tiny_run(tree_archive, folder), *SETTINGS, f"output_dir={run}"])), run


def start_paused(tiny_overrides: list[str], run: Path, step: int, extra=()) -> tuple[subprocess.Popen, Path]:
    """A train.py process held before training step `step` (marker file present while it waits)."""
    marker = run.parent / f"paused-{run.name}"
    overrides = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    args = [*overrides, *SETTINGS, *extra, f"hydra.run.dir={run}",
            "+callbacks.pause._target_=tests.callbacks.PauseAt", f"+callbacks.pause.step={step}",
            f"+callbacks.pause.marker={marker}"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=with_root_on_path(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.05)
    return process, marker


def stop(process: subprocess.Popen, marker: Path, signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    time.sleep(0.2)
    marker.unlink(missing_ok=True)  # let the paused step run
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def run_command(line: str) -> subprocess.CompletedProcess:
    """Run a printed `python src/train.py ...` command line, as a user would paste it."""
    args = shlex.split(line)
    assert args[0] == "python"
    env = with_root_on_path()  # the stopped run used tests.callbacks.PauseAt
    return subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_killed_during_epoch_2_resumes_to_bit_identical_weights_and_metrics(tiny_overrides, tmp_path, reference):
    ref_metrics, ref_run = reference
    run = tmp_path / "outputs" / "killed"
    process, marker = start_paused(tiny_overrides, run, step=STEPS_PER_EPOCH + 2)  # in the second epoch
    process.kill()  # SIGKILL: nothing runs after it; last.ckpt is the one of the first epoch's end
    process.communicate(timeout=60)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS_PER_EPOCH

    done = subprocess.run(  # the run's own overrides come first, its pause among them: removed here
        [sys.executable, str(ROOT / "src" / "train.py"), "ckpt_path=last", f"outputs_root={tmp_path / 'outputs'}",
         *[o for o in tiny_overrides if not o.startswith("output_dir=")], *SETTINGS, "~callbacks.pause"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"run_dir={run}")  # continued in the killed run's dir
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert results(resumed) == results(ref_metrics)  # test/acc, test/loss, val/acc_best, epochs, global_step
    assert all(torch.equal(weights(run)[k], w) for k, w in weights(ref_run).items())
    # Training went on from the checkpoint: one validation point per epoch, at the same steps as the reference.
    assert scalars(run, "val/acc") == scalars(ref_run, "val/acc")
    assert [step for step, _ in scalars(run, "val/acc")] == [3, 7, 11]
    # The best checkpoint is still the best (a resume that forgot it would take its first epoch as the best).
    assert Path(resumed["best_checkpoint"]).parent == run / "checkpoints"
    assert Path(resumed["best_checkpoint"]).name == Path(ref_metrics["best_checkpoint"]).name


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_at_the_next_batch(tiny_overrides, tmp_path, reference):
    ref_metrics, ref_run = reference
    run = tmp_path / "terminated"
    process, marker = start_paused(tiny_overrides, run, step=STEPS_PER_EPOCH + 1)  # the 2nd batch of epoch 2
    status, stderr = stop(process, marker, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"stopped by SIGTERM at epoch 1, step {STEPS_PER_EPOCH + 2}; resume with: python ")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH + 2  # the step it was in finished, then it stopped
    (batches,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the iterator's place
    assert (batches["epoch"], batches["served"], batches["images"]) == (1, 2, 60)  # the order is (seed, epoch)'s

    resumed = run_command(line.split("resume with: ", 1)[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert results(metrics) == results(ref_metrics)
    assert all(torch.equal(weights(run)[k], w) for k, w in weights(ref_run).items())
    assert scalars(run, "val/acc") == scalars(ref_run, "val/acc")
    # The epoch that was cut in two still logs its loss over all of its images.
    assert scalars(run, "train/loss_epoch") == scalars(ref_run, "train/loss_epoch")


@pytest.mark.slow
def test_an_ema_run_stopped_mid_epoch_resumes_to_bit_identical_weights(tiny_overrides, tmp_path):
    """The average of the weights takes in the step the run stopped at before the checkpoint is written."""
    ema = ["callbacks=ema", "callbacks.ema.decay=0.5"]  # a short memory: a missed update shows in every weight
    reference = tmp_path / "reference"
    expected = train(compose_config("train", [*tiny_overrides, *SETTINGS, *ema, f"output_dir={reference}"]))
    run = tmp_path / "terminated"
    process, marker = start_paused(tiny_overrides, run, step=STEPS_PER_EPOCH + 1, extra=ema)
    status, stderr = stop(process, marker, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    resumed = run_command(stderr.strip().splitlines()[-1].split("resume with: ", 1)[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(json.loads((run / "metrics.json").read_text())) == results(expected)
    ours, theirs = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run, reference))
    for key in ("state_dict", "current_model_state"):  # the averaged weights, and the raw ones training goes on with
        assert all(torch.equal(ours[key][name], value) for name, value in theirs[key].items()), key


@pytest.mark.slow
def test_a_final_fit_without_validation_killed_in_epoch_2_resumes_to_bit_identical_weights(tiny_overrides, tmp_path):
    """data.val_size=0: no validation's end to checkpoint at; last.ckpt of each epoch's end is what a kill leaves."""
    every_image = ["data.val_size=0"]  # 80 training images: 5 steps an epoch
    reference = tmp_path / "reference"
    expected = train(compose_config("train", [*tiny_overrides, *SETTINGS, *every_image, f"output_dir={reference}"]))
    run = tmp_path / "outputs" / "killed"
    process, marker = start_paused(tiny_overrides, run, step=5 + 2, extra=every_image)  # in the second epoch
    process.kill()
    process.communicate(timeout=60)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "ckpt_path=last", f"outputs_root={tmp_path / 'outputs'}",
         *[o for o in tiny_overrides if not o.startswith("output_dir=")], *SETTINGS, *every_image, "~callbacks.pause"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert results(resumed) == results(expected) and resumed["val/acc_best"] is None
    assert Path(resumed["best_checkpoint"]) == run / "checkpoints" / "epoch_002.ckpt"  # the last of 3 epochs
    assert all(torch.equal(weights(run)[k], w) for k, w in weights(reference).items())


@pytest.mark.slow
def test_a_run_resumed_from_an_earlier_checkpoint_shows_each_epoch_once(tiny_overrides, tmp_path, reference):
    """TensorBoard hides what the first start logged from the resumed step on (purge_step), so the run's curves,
    and compare's, which reads the run's whole events folder, show each epoch once."""
    from cnnlab.compare import read_curves

    _, ref_run = reference
    run = tmp_path / "run"
    overrides = [*tiny_overrides, *SETTINGS, "callbacks.model_checkpoint.save_top_k=-1", f"output_dir={run}"]
    train(compose_config("train", overrides))
    train(compose_config("train", [*overrides, f"ckpt_path={run / 'checkpoints' / 'epoch_000.ckpt'}"]))
    assert scalars(run, "val/acc") == scalars(ref_run, "val/acc")  # steps 3, 7, 11: once each
    assert read_curves(run)["val/acc"] == [value for _, value in scalars(ref_run, "val/acc")]


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(tiny_overrides, tmp_path):
    run = tmp_path / "interrupted"
    process, marker = start_paused(tiny_overrides, run, step=1)
    status, stderr = stop(process, marker, signal.SIGINT)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGINT at epoch 0, step 2; resume with: python ")
    assert line.endswith(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert scalars(run, "train/loss_step")  # the loggers were flushed before the exit
    assert not (run / "metrics.json").exists()


def test_a_diverging_learning_rate_stops_before_the_step_with_the_last_finite_weights(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"the training loss is (nan|inf) at epoch \d+, step \d+ .*optimizer.lr") as err:
        train(compose_config("train", [*tiny_overrides, "optimizer=sgd_steplr", "optimizer.lr=1e12"]))
    step = int(str(err.value).split("step ")[1].split(" ")[0])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step
    assert all(torch.isfinite(w).all() for name, w in checkpoint["state_dict"].items() if name.startswith("net."))
    assert not (run / "metrics.json").exists()


def fit_in_16_mixed(folder: Path, nonfinite_steps: int):
    """A few steps of a tiny network in 16-mixed with a GradScaler (on a CPU Lightning would switch the precision
    flag to bf16: the plugin is given as a GPU run has it), its inputs infinite from step 2 for `nonfinite_steps`."""
    from functools import partial

    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch import nn

    from cnnlab.data.batches import TensorBatches
    from cnnlab.module import LitClassifier
    from cnnlab.stops import RunGuard
    from tests.callbacks import NanLossAt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    net.input_shape = (3, 2, 2)
    module = LitClassifier(net, optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=3)
    guard = RunGuard(signals=[], stop_on_nonfinite_loss=True, every_n_steps=1, scaler_patience=5)
    trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu")], max_epochs=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                        callbacks=[NanLossAt(step=2, value="inf", steps=nonfinite_steps), guard])  # fmt: skip
    batches = TensorBatches(torch.randn(32, 3, 2, 2), torch.randint(0, 3, (32,)), batch_size=8, shuffle=True)
    trainer.fit(module, train_dataloaders=batches)
    return trainer, module


def test_under_16_mixed_an_overflow_the_scaler_skips_goes_on_and_a_lasting_one_stops(tmp_path):
    """16-mixed has a GradScaler, which skips a step whose gradients are not finite and lowers its scale: one such
    step does not end the run; `scaler_patience` (5) in a row do, with the last finite weights kept."""
    trainer, module = fit_in_16_mixed(tmp_path / "once", nonfinite_steps=1)
    assert trainer.current_epoch == 3 and trainer.precision_plugin.scaler.get_scale() < 2**16  # one step skipped
    assert all(torch.isfinite(w).all() for w in module.parameters())
    with pytest.raises(UserError, match=r"the training loss is (nan|inf) at epoch 1, step 6, non-finite 5 checks "
                                        r"in a row \(the GradScaler skipped those steps\)") as err:  # fmt: skip
        fit_in_16_mixed(tmp_path / "lasting", nonfinite_steps=10)
    last = tmp_path / "lasting" / "checkpoints" / "last.ckpt"
    assert f"{last} holds the weights before this step" in str(err.value)
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for name, w in weights.items() if name.startswith("net."))


def test_ckpt_path_last_without_any_run_is_a_clear_error(tiny_overrides, tmp_path):
    cfg = compose_config("train", [*tiny_overrides, "ckpt_path=last", f"outputs_root={tmp_path / 'empty'}"])
    with pytest.raises(UserError, match="ckpt_path=last: no last.ckpt under .*empty/"):
        train(cfg)


def test_same_seed_twice_gives_the_same_metrics_and_weights(tiny_overrides, tmp_path, reference):
    ref_metrics, ref_run = reference
    again = train(compose_config("train", [*tiny_overrides, *SETTINGS, f"output_dir={tmp_path / 'again'}"]))
    assert results(again) == results(ref_metrics)
    assert all(torch.equal(weights(tmp_path / "again")[k], w) for k, w in weights(ref_run).items())


def test_every_checkpoint_loads_with_weights_only(reference):
    _, run = reference
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        torch.load(path, weights_only=True)


def test_a_checkpoint_save_that_dies_half_way_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def dies_half_way(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left


@pytest.mark.slow
def test_an_epoch_ended_early_by_limit_train_batches_resumes_with_a_new_permutation(tiny_overrides, tmp_path):
    # 3 of the 4 batches an epoch: the checkpoint at the epoch's end has served 3 batches of its permutation,
    # and the next epoch must still draw a new one, as the run never stopped does.
    settings = [*SETTINGS, "trainer.limit_train_batches=3"]
    train(compose_config("train", [*tiny_overrides, *settings, f"output_dir={tmp_path / 'reference'}"]))
    run = tmp_path / "stopped"
    train(compose_config("train", [*tiny_overrides, *settings, "trainer.max_epochs=1", f"output_dir={run}"]))
    last = run / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*tiny_overrides, *settings, f"output_dir={run}", f"ckpt_path={last}"]))
    assert all(torch.equal(weights(run)[k], w) for k, w in weights(tmp_path / "reference").items())


@pytest.mark.slow
def test_a_checkpoint_every_n_train_steps_resumes_mid_epoch(tiny_overrides, tmp_path, reference):
    _, ref_run = reference
    run = tmp_path / "crashed"
    every_6 = ["callbacks.last_checkpoint.every_n_train_steps=6"]  # mid-epoch 2 (4 steps an epoch)
    crash = ["+callbacks.crash._target_=tests.callbacks.CrashAt", "+callbacks.crash.step=7"]
    with pytest.raises(RuntimeError, match="crash before step 7"):
        train(compose_config("train", [*tiny_overrides, *SETTINGS, *every_6, *crash, f"output_dir={run}"]))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    train(compose_config("train", [*tiny_overrides, *SETTINGS, *every_6, f"output_dir={run}", f"ckpt_path={last}"]))
    assert all(torch.equal(weights(run)[k], w) for k, w in weights(ref_run).items())


def test_only_a_job_that_submitit_requeued_resumes_from_its_own_checkpoint(tmp_path, monkeypatch):
    from cnnlab.checkpoints import JOB_KEY, requeued_checkpoint

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # submitit_local's job environment, job id 1234
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1234")
    assert requeued_checkpoint(tmp_path) is None  # a submitit job's first start: no checkpoint yet
    torch.save({"state_dict": {}, "global_step": 6, JOB_KEY: "1234"}, last)
    path, checkpoint = requeued_checkpoint(tmp_path)  # started again by submitit: the same job
    assert path == last and checkpoint["global_step"] == 6
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "5678")  # a new sweep into the folder of a finished one
    assert requeued_checkpoint(tmp_path) is None
    torch.save({"state_dict": {}}, last)  # written outside submitit
    assert requeued_checkpoint(tmp_path) is None
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    torch.save({"state_dict": {}, JOB_KEY: "5678"}, last)
    assert requeued_checkpoint(tmp_path) is None  # a plain run never picks up a checkpoint by itself


@pytest.mark.slow
def test_ckpt_path_last_after_a_fast_cpu_run_resumes_with_that_runs_config(tiny_overrides, tmp_path):
    """The README's `python src/train.py ckpt_path=last`, after a run of experiment=fast_cpu (SGD, a one-cycle
    schedule, bf16) stopped mid-run: it takes that run's own overrides, not the defaults (Adam), and finishes."""
    outputs = tmp_path / "outputs"
    data = [o for o in tiny_overrides if o.startswith(("data.root", "data.cache_dir"))]
    first = [sys.executable, str(ROOT / "src" / "train.py"), "experiment=fast_cpu", *data, "data.val_size=20",
             "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=2", f"outputs_root={outputs}",
             f"hydra.run.dir={outputs / 'runs' / 'fast'}", "+callbacks.stop._target_=tests.callbacks.SignalAt",
             "+callbacks.stop.step=5", "+callbacks.stop.signal=SIGTERM"]  # fmt: skip
    stopped = subprocess.run(first, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=with_root_on_path())
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = outputs / "runs" / "fast" / "checkpoints" / "last.ckpt"
    shutil.copy(last, tmp_path / "stopped.ckpt")
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "ckpt_path=last", f"outputs_root={outputs}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=with_root_on_path(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last} with its run's own overrides: experiment=fast_cpu " in resumed.stderr
    metrics = json.loads((outputs / "runs" / "fast" / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["global_step"], metrics["resumed_from"]) == (2, 8, str(last))
    used = yaml.safe_load((outputs / "runs" / "fast" / ".hydra" / "config.yaml").read_text())
    assert (used["optimizer"]["_target_"], used["trainer"]["precision"]) == (
        "torch.optim.SGD",
        "${fastest_cpu_precision:}",
    )
    # bf16 where this CPU has it natively, else fp32
    assert f"{fastest_cpu_precision()} on cpu" in resumed.stdout + resumed.stderr

    # An override that contradicts the checkpoint: one line naming the keys, before Lightning loads anything.
    adam = [
        *tiny_overrides,
        "optimizer=adam",
        f"ckpt_path={tmp_path / 'stopped.ckpt'}",
        "data.batch_size=16",
        "model.batchnorm=true",
    ]  # as fast_cpu trains it (a different model.batchnorm has its own line)
    with pytest.raises(UserError, match=r"was trained with optimizer=torch.optim.SGD, scheduler=torch.optim.lr_sch"
                                        r"eduler.OneCycleLR; this command asks for optimizer=torch.optim.Adam, "
                                        r"scheduler=None: a resume goes on with its run's own optimizer and "
                                        r"scheduler"):  # fmt: skip
        train(compose_config("train", adam))


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_last_complete_checkpoint(tiny_overrides, tmp_path):
    """The run dir on a file system of 1.2 MB (a tmpfs the test mounts in a mount namespace of its own): the first
    checkpoint fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    overrides = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    command = [sys.executable, str(ROOT / "src" / "train.py"), *overrides, "trainer.max_epochs=3",
               "callbacks.inside=null", f"hydra.run.dir={disk / 'run'}"]  # fmt: skip
    script = f"mount -t tmpfs -o size=1200k tmpfs {disk} || exit 99; exec {shlex.join(command)}"
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=with_root_on_path())  # fmt: skip
    if done.returncode == 99 or "unshare: " in done.stderr:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()[:200]}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"cannot write {disk}/run/checkpoints/" in errors[0]
    from tests.test_bad_input import as_pattern, table_rows

    assert re.fullmatch(as_pattern(table_rows()["a disk that fills up while a checkpoint is written"]), errors[0])
