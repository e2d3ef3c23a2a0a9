"""The levers past the slides (experiment=best): each a config option on torch's or Lightning's own code."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cnnlab.data.batches import TensorBatches
from cnnlab.evaluate import evaluate, score
from cnnlab.module import LitClassifier
from cnnlab.train import build, train
from cnnlab.trained import Model
from cnnlab.training_form import contract_state
from tests.conftest import compose_config


def test_label_smoothing_is_the_training_loss_and_the_reported_losses_stay_plain(tiny_overrides, monkeypatch):
    cfg = compose_config("train", [*tiny_overrides, "loss.label_smoothing=0.3", "model.dropout=0",
                                   "trainer.log_every_n_steps=50"])  # fmt: skip
    datamodule, module, trainer = build(cfg)
    module.trainer = trainer
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.setdefault(name, value))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    with torch.no_grad():
        logits = module(images)
        loss = float(module.training_step((images, labels), 0))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels, label_smoothing=0.3)))
    assert loss != pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    with torch.no_grad():
        module.eval_step((images, labels), "val")
    assert logged["val/loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))


@pytest.mark.slow
def test_one_cycle_warms_up_then_decays_once_per_step(tiny_overrides, tmp_path):
    overrides = ["optimizer=sgd_onecycle", "optimizer.lr=0.05", "trainer.max_epochs=3",
                 "callbacks.lr_monitor.logging_interval=step"]  # fmt: skip
    metrics = train(compose_config("train", [*tiny_overrides, *overrides]))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    lrs = [event.value for event in events.Scalars("lr-SGD")]
    assert len(lrs) == metrics["global_step"]  # one value per optimizer step: 3 epochs × 3 batches of 16
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.05 / 25)  # OneCycleLR's start: max_lr / div_factor
    assert max(lrs) == pytest.approx(0.05, rel=0.1) and 0 < peak < len(lrs) // 2  # warm-up: 20 % of the steps
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] < 0.05 / 25


def test_ema_weights_are_validated_tested_and_saved(tiny_overrides, tmp_path):
    metrics = train(compose_config("train", [*tiny_overrides, "callbacks=ema", "callbacks.ema.decay=0.5"]))
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["net.conv1.weight"], current["net.conv1.weight"])
    # eval loads the checkpoint's state_dict: the run's test used the same (averaged) weights
    evaluated = evaluate(compose_config("eval", [*tiny_overrides, f"ckpt_path={metrics['best_checkpoint']}",
                                                 f"output_dir={tmp_path / 'eval'}"]))  # fmt: skip
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)


@pytest.mark.slow
def test_ema_of_a_batchnorm_run_folds_the_averaged_weights_and_statistics(tiny_overrides, tmp_path):
    # experiment=best's BatchNorms with callbacks=ema: what is tested and saved is the slides' network, its conv
    # weights the fold of the *averaged* conv and BatchNorm (weights and running statistics), not of the raw ones
    overrides = [*tiny_overrides, "model.batchnorm=true", "callbacks=ema", "callbacks.ema.decay=0.5"]
    metrics = train(compose_config("train", overrides))
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    saved, averaged, raw = checkpoint["state_dict"], checkpoint["training_form"], checkpoint["current_model_state"]
    assert not any("norm" in key for key in saved)  # the slides' layers only
    folded = contract_state({**saved, **averaged})[0]
    assert torch.allclose(folded["net.conv2.weight"], saved["net.conv2.weight"])
    assert not torch.allclose(contract_state(raw)[0]["net.conv2.weight"], saved["net.conv2.weight"])
    evaluated = evaluate(compose_config("eval", [*overrides, f"ckpt_path={metrics['best_checkpoint']}",
                                                 f"output_dir={tmp_path / 'eval'}"]))  # fmt: skip
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)  # the run's test scored them


@pytest.mark.slow
def test_flip_tta_is_reported_beside_the_single_view_accuracy(tiny_overrides, tmp_path):
    single = train(compose_config("train", tiny_overrides))
    assert "test/acc_tta" not in single
    metrics = train(compose_config("train", [*tiny_overrides, "data.tta=true", f"output_dir={tmp_path / 'tta'}"]))
    assert metrics["test/acc"] == pytest.approx(single["test/acc"])  # the same run; TTA only adds a number
    # by hand: the best checkpoint's logits, image and mirror image averaged
    datamodule, module, _ = build(compose_config("train", tiny_overrides))
    module.load_state_dict(torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"])
    datamodule.setup("test")
    images, labels = datamodule.splits["test"]
    module.eval()
    with torch.no_grad():
        x = datamodule.normalize(images)
        logits = (module(x) + module(x.flip(3))) / 2
    by_hand = float((logits.argmax(1) == labels).float().mean())
    assert metrics["test/acc_tta"] == pytest.approx(by_hand)
    evaluated = evaluate(compose_config("eval", [*tiny_overrides, "data.tta=true",
                                                 f"ckpt_path={metrics['best_checkpoint']}",
                                                 f"output_dir={tmp_path / 'eval'}"]))  # fmt: skip
    assert evaluated["test/acc_tta"] == pytest.approx(by_hand)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc_tta"] == evaluated["test/acc_tta"]


@pytest.mark.parametrize("experiment", ["best", "fast_cpu"])
def test_the_recipes_past_the_slides_keep_the_slides_network(experiment):
    from hydra.utils import instantiate

    slides, recipe = compose_config("train", []).model, compose_config("train", [f"experiment={experiment}"]).model
    net = instantiate(recipe)
    net.contract()  # a training-time form (best's BatchNorms) is folded away when training ends
    assert sum(p.numel() for p in net.parameters()) == 56_778
    assert not net.in_training_form
    # the memory layout (the same math), the dropout rate (issue 12), and the training-time BatchNorms (issue 21)
    tunable = {"channels_last", "dropout", "batchnorm"}
    assert {k: v for k, v in recipe.items() if k not in tunable} == {
        k: v for k, v in slides.items() if k not in tunable
    }


def mirror_sensitive_net() -> nn.Module:
    """Images of 1×1×2 pixels (left, right) → 2 logits: [left − right, 0.2 (left + right)]. An image bright on the
    left scores [1, 0.2] (class 0), its mirror image [−1, 0.2] (class 1), their mean [0, 0.2] (class 1)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    net[1].weight.data = torch.tensor([[1.0, -1.0], [0.2, 0.2]])
    net.input_shape = (1, 1, 2)
    return net


def test_tta_scores_the_mean_of_each_image_and_its_mirror_image_in_training_and_in_eval():
    images, labels = torch.tensor([[[[1.0, 0.0]]]] * 4), torch.ones(4, dtype=torch.int64)  # class 1, left bright
    module = LitClassifier(mirror_sensitive_net(), num_classes=2, tta=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    tested = trainer.test(module, dataloaders=TensorBatches(images, labels, batch_size=2, shuffle=False))[0]
    assert (tested["test/acc"], tested["test/acc_tta"]) == (0.0, 1.0)
    # eval's path: a uint8 batch through the same network, normalisation x / 255
    model = Model(
        Path("net"),
        {"classes": ["left", "right"]},
        lambda x: mirror_sensitive_net()(torch.from_numpy(x).float() / 255).detach().numpy(),
    )
    scores = score(model, (255 * images).to(torch.uint8).numpy(), labels.numpy(), batch_size=2, tta=True)
    assert (scores["test/acc"], scores["test/acc_tta"]) == (0.0, 1.0)
