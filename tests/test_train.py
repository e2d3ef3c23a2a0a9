import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab import UserError
from cnnlab.evaluate import evaluate
from cnnlab.train import hyperparameters, train
from tests.conftest import CLASSES, compose_config


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize(("optimizer", "lr_tag"), [("adam", "lr-Adam"), ("sgd_steplr", "lr-SGD")])
def test_train_fits_tests_and_writes_the_run(tiny_overrides, tmp_path, optimizer, lr_tag):
    metrics = train(compose_config("train", [*tiny_overrides, f"optimizer={optimizer}"]))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved) >= {"test/acc", "test/loss", "val/acc_best", "epochs", "seed", "wall_s"}
    assert saved["epochs"] == 2 and saved["seed"] == 0
    assert 0 <= saved["test/acc"] <= 1 and 0 <= saved["val/acc_best"] <= 1
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(saved["best_checkpoint"]).is_file()
    tags = set(events(run).Tags()["scalars"])
    assert {"train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", lr_tag} <= tags


def test_test_end_logs_per_class_accuracy_and_the_confusion_matrix(tiny_trained):
    metrics, run, _ = tiny_trained
    logged = events(run)
    per_class = {key.removeprefix("test/acc_class/"): value for key, value in metrics.items()
                 if key.startswith("test/acc_class/")}  # fmt: skip
    assert sorted(per_class) == sorted(CLASSES)
    # The tiny test set has 2 images per class, so overall accuracy is the mean of the per-class ones.
    assert sum(per_class.values()) / len(per_class) == pytest.approx(metrics["test/acc"])
    for tag in ("test/confusion_matrix", "test/acc_per_class"):  # TensorBoard: two cards, not a scalar a class
        (image,) = logged.Images(tag)
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100
    assert not [tag for tag in logged.Tags()["scalars"] if tag.startswith("test/acc_class/")]


@pytest.mark.slow
def test_step_lr_lowers_the_learning_rate(tiny_overrides, tmp_path):
    overrides = ["optimizer=sgd_steplr", "scheduler.step_size=1", "scheduler.gamma=0.5", "trainer.max_epochs=3"]
    train(compose_config("train", [*tiny_overrides, *overrides]))
    lrs = [event.value for event in events(tmp_path / "run").Scalars("lr-SGD")]
    assert lrs == pytest.approx([0.01, 0.005, 0.0025])


@pytest.mark.slow
def test_cosine_schedule_spans_the_runs_epochs(tiny_overrides, tmp_path):
    train(compose_config("train", [*tiny_overrides, "optimizer=sgd_cosine", "trainer.max_epochs=4"]))
    lrs = [event.value for event in events(tmp_path / "run").Scalars("lr-SGD")]
    assert lrs == pytest.approx([0.02 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)])


@pytest.mark.slow
def test_seed_zero_is_applied(tiny_overrides, tmp_path):
    first = train(compose_config("train", [*tiny_overrides, "seed=0"]))
    second = train(compose_config("train", [*tiny_overrides, "seed=0", f"output_dir={tmp_path / 'again'}"]))
    assert first["test/loss"] == second["test/loss"]
    third = train(compose_config("train", [*tiny_overrides, "seed=1", f"output_dir={tmp_path / 'other'}"]))
    assert third["test/loss"] != first["test/loss"]


def test_evaluate_a_saved_checkpoint_and_resume_from_it(tiny_trained, tmp_path):
    trained, run, tiny_overrides = tiny_trained
    best = trained["best_checkpoint"]
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}  # the run read here is the session's

    evaluated = evaluate(
        compose_config("eval", [*tiny_overrides, f"ckpt_path={best}", f"output_dir={tmp_path / 'ev'}"])
    )
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ckpt_path"] == best

    # A checkpoint kept outside a run dir: the resumed run writes into a new folder, and links back to it.
    last = str(run / "checkpoints" / "last.ckpt")
    resumed = train(
        compose_config(
            "train", [*tiny_overrides, f"ckpt_path={last}", "trainer.max_epochs=3", f"output_dir={tmp_path / 'r'}"]
        )
    )
    assert resumed["epochs"] == 3 and resumed["resumed_from"] == last
    # Training went on from epoch 2: the new folder has the one validation point of its one new epoch.
    assert [event.step for event in events(tmp_path / "r").Scalars("val/acc")] == [11]
    assert resumed["val/acc_best"] >= trained["val/acc_best"]  # the best so far survives the resume
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before  # evaluated and resumed elsewhere


@pytest.mark.slow
def test_a_run_resumed_in_another_folder_still_tests_an_earlier_better_checkpoint(tiny_overrides, tmp_path):
    trained = train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1"]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("ModelCheckpoint{'monitor': 'val/acc'")]
    checkpoint["callbacks"][key]["best_model_score"] = torch.tensor(1.0)  # no later epoch can beat it
    torch.save(checkpoint, tmp_path / "kept-elsewhere.ckpt")

    overrides = [
        f"ckpt_path={tmp_path / 'kept-elsewhere.ckpt'}",
        "trainer.max_epochs=2",
        f"output_dir={tmp_path / 'r'}",
    ]
    resumed = train(compose_config("train", [*tiny_overrides, *overrides]))
    assert (tmp_path / "r" / "checkpoints" / "epoch_001.ckpt").is_file()  # the new folder's own best
    assert resumed["best_checkpoint"] == trained["best_checkpoint"]  # but the earlier one is better: tested


@pytest.mark.parametrize(
    ("no_validation", "training_images"),
    [("data.val_size=0", 80), pytest.param("trainer.limit_val_batches=0", 60, marks=pytest.mark.slow)],
)
def test_a_run_without_validation_keeps_and_tests_its_last_epoch(
    tiny_overrides, tmp_path, no_validation, training_images
):
    # data.val_size=0: every training image of the tiny set (80) trains; with 20 held out and not validated, 60.
    # Nothing ranks the epochs, so the checkpoint kept and tested is the last epoch's, written at its end.
    cfg = compose_config("train", [*tiny_overrides, no_validation, "trainer.max_epochs=2"])
    metrics = train(cfg)
    assert metrics["val/acc_best"] is None
    assert hyperparameters(cfg)["val_size"] == (0 if no_validation == "data.val_size=0" else 20)  # HPARAMS tells
    assert metrics["global_step"] == 2 * math.ceil(training_images / 16)  # 2 epochs of batches of 16
    folder = tmp_path / "run" / "checkpoints"
    assert metrics["best_checkpoint"] == str(folder / "epoch_001.ckpt")
    assert sorted(path.name for path in folder.glob("*.ckpt")) == ["epoch_001.ckpt", "last.ckpt"]
    assert torch.load(folder / "epoch_001.ckpt", weights_only=True)["epoch"] == 1
    evaluated = evaluate(compose_config("eval", [*tiny_overrides, f"ckpt_path={metrics['best_checkpoint']}",
                                                 f"output_dir={tmp_path / 'eval'}"]))  # fmt: skip
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)  # the test scored that epoch


@pytest.mark.slow
def test_evaluate_needs_no_model_flags_for_a_self_describing_checkpoint(tiny_overrides, tmp_path):
    trained = train(compose_config("train", [*tiny_overrides, "model.conv1_channels=16", "model.pool=avg"]))
    ev = [*tiny_overrides, f"ckpt_path={trained['best_checkpoint']}", f"output_dir={tmp_path / 'ev'}"]
    assert evaluate(compose_config("eval", ev))["test/acc"] == pytest.approx(trained["test/acc"])

    # A checkpoint that does not describe its model (older cnnlab) takes the model.* flags it was trained with.
    old = torch.load(trained["best_checkpoint"], weights_only=True)
    del old["cnnlab"]
    torch.save(old, tmp_path / "old.ckpt")
    ev = [*tiny_overrides, f"ckpt_path={tmp_path / 'old.ckpt'}", f"output_dir={tmp_path / 'ev2'}"]
    with pytest.raises(UserError, match="trained with another model"):
        evaluate(compose_config("eval", ev))
    same = evaluate(compose_config("eval", [*ev, "model.conv1_channels=16", "model.pool=avg"]))
    assert same["test/acc"] == pytest.approx(trained["test/acc"])


@pytest.mark.slow
def test_training_epoch_logs_the_mean_loss_and_accuracy_over_its_images(tiny_overrides, tmp_path):
    # lr 0 and no dropout: the network of every step is the initial one, so the epoch's training loss and
    # accuracy can be computed again from the best checkpoint, over the same 60 images (batches 16+16+16+12).
    overrides = ["optimizer.lr=0", "model.dropout=0", "trainer.max_epochs=1", "seed=2"]
    cfg = compose_config("train", [*tiny_overrides, *overrides])
    metrics = train(cfg)
    logged = events(tmp_path / "run")
    loss, accuracy = (logged.Scalars(tag)[-1].value for tag in ("train/loss_epoch", "train/acc"))

    datamodule, net = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model)
    state = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    net.load_state_dict({key.removeprefix("net."): value for key, value in state.items() if key.startswith("net.")})
    datamodule.setup("fit")
    images, labels = datamodule.splits["train"]
    with torch.no_grad():
        logits = net(datamodule.normalize(images))
    assert len(labels) == 60
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert 0 < accuracy < 1  # seed 2: an initial network that gets some right, so a wrong count would show


KEEP_FREED_MEMORY = """
import ctypes, resource, sys, torch
from cnnlab.process import keep_freed_memory
def page_faults_of_freeing_64_mb():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        blocks = [torch.ones(2 * 2**20) for _ in range(8)]  # 8 × 8 MB, freed together, as a step frees its own
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc = ctypes.CDLL(None)
libc.mallopt(-3, 128 * 1024), libc.mallopt(-1, 128 * 1024)  # glibc's static thresholds: freed blocks go back
print(page_faults_of_freeing_64_mb())
keep_freed_memory(sys.argv[1] == "true")
page_faults_of_freeing_64_mb()  # the heap grows once
print(page_faults_of_freeing_64_mb())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory_lets_the_next_step_reuse_what_one_step_freed(keep):
    done = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY, str(keep).lower()], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert before > 10_000  # 5 × 64 MB faulted in again: 4 KiB pages
    assert (after < before / 100) if keep else (after > before / 2)


@pytest.mark.slow
def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line_and_trains(tiny_overrides, monkeypatch, caplog):
    import cnnlab.process

    bf16 = compose_config("train", [*tiny_overrides, "precision=bf16", "trainer.max_epochs=1"])
    monkeypatch.setattr(cnnlab.process, "native_bf16", lambda: True)
    assert cnnlab.process.emulated_bf16(bf16) is None  # native: nothing to say
    monkeypatch.setattr(cnnlab.process, "native_bf16", lambda: False)
    assert cnnlab.process.emulated_bf16(compose_config("train", [*tiny_overrides, "precision=fp32"])) is None
    with caplog.at_level("WARNING", logger="cnnlab.train"):
        metrics = train(bf16)
    warned = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert metrics["test/acc"] >= 0 and len(warned) == 1  # the run goes on, with one line
    assert warned[0].startswith("warning: trainer.precision=bf16-mixed on a CPU without") and "\n" not in warned[0]
    assert warned[0].endswith("add precision=fp32 (the same accuracy)")


@pytest.mark.parametrize(("native", "expected"), [(False, "32-true"), (True, "bf16-mixed")])
def test_the_cpu_recipes_take_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    import cnnlab.process

    monkeypatch.setattr(cnnlab.process, "native_bf16", lambda: native)
    for experiment in ("fast_cpu", "best"):
        assert compose_config("train", [f"experiment={experiment}"]).trainer.precision == expected
    asked = compose_config("train", ["experiment=fast_cpu", "precision=bf16"])  # a precision asked for wins
    assert asked.trainer.precision == "bf16-mixed"
