"""The levers past experiment=best (issue 21): test-time views, the whitened first layer, the training-time forms
(the expanded conv2, BatchNorm folded after training)."""

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cnnlab import UserError
from cnnlab.data.batches import TensorBatches
from cnnlab.data.tta import shifted, tta_logits
from cnnlab.distill import distillation_loss
from cnnlab.evaluate import evaluate
from cnnlab.model import SlideCNN, whiten_
from cnnlab.module import INITIALISATION_IMAGES, LitClassifier
from cnnlab.relations import mirrors_keep_the_class
from cnnlab.resume import check_shapes
from cnnlab.train import build, train
from cnnlab.trained import deployable_from_checkpoint, resolve_model_path
from cnnlab.training_form import contract_state, training_state
from tests.conftest import compose_config, tiny_run
from tests.test_bad_input import as_pattern, table_rows


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    net.input_shape = (3, 8, 8)
    return net


def airbench_tta(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """airbench's infer_mirror_translate, written with torch's own reflect padding."""

    def mirror(views):
        return (net(views) + net(views.flip(3))) / 2

    padded = F.pad(images, (1,) * 4, mode="reflect")
    size = images.shape[-1]
    return 0.5 * mirror(images) + 0.25 * (mirror(padded[..., :size, :size]) + mirror(padded[..., 2:, 2:]))


def test_a_one_pixel_shift_reflects_at_the_border_as_a_reflect_padded_crop_does():
    row = torch.arange(6.0).view(1, 1, 1, 6)
    padded = F.pad(row, (1, 1, 0, 0), mode="reflect")[0, 0, 0]
    assert shifted(6, 1) == padded[:6].long().tolist() == [1, 0, 1, 2, 3, 4]
    assert shifted(6, -1) == padded[2:].long().tolist() == [1, 2, 3, 4, 5, 4]


@torch.no_grad()
def test_flip_translate_is_airbench_weighting_of_six_views_on_tensors_and_on_arrays():
    net, images = small_net(), torch.randn(7, 3, 8, 8)
    expected = airbench_tta(net, images)
    assert torch.allclose(tta_logits(net, images, "flip_translate"), expected, atol=1e-6)
    as_arrays = tta_logits(lambda a: net(torch.from_numpy(np.ascontiguousarray(a))), images.numpy(), "flip_translate")
    assert torch.allclose(as_arrays, expected, atol=1e-6)  # eval.py's path: numpy batches
    flip = tta_logits(net, images, "flip", logits=net(images))
    assert torch.allclose(flip, (net(images) + net(images.flip(3))) / 2, atol=1e-6)


@torch.no_grad()
def test_translate_shifts_without_mirroring_for_images_whose_mirror_is_another_class():
    net, images = small_net(), torch.randn(5, 3, 8, 8)
    padded = F.pad(images, (1,) * 4, mode="reflect")
    expected = 0.5 * net(images) + 0.25 * (net(padded[..., :8, :8]) + net(padded[..., 2:, 2:]))
    assert torch.allclose(tta_logits(net, images, "translate"), expected, atol=1e-6)
    digits = compose_config("train", ["data=mnist", "data.tta=translate"])
    assert mirrors_keep_the_class(digits) is None  # data.flip=false: shifts are fine, mirror images are not
    assert "data.tta=translate, or false" in mirrors_keep_the_class(
        compose_config("train", ["data=mnist", "data.tta=flip"])
    )


def test_the_runs_test_scores_the_flip_translate_views(tmp_path):
    net, images = small_net(), torch.randn(12, 3, 8, 8)
    with torch.no_grad():
        expected, plain = airbench_tta(net, images).argmax(1), net(images).argmax(1)
    labels = expected.clone()
    labels[plain == expected] = (expected[plain == expected] + 1) % 5  # where the views decide, TTA is right
    module = LitClassifier(net, num_classes=5, tta="flip_translate")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    tested = trainer.test(module, dataloaders=TensorBatches(images, labels, batch_size=4, shuffle=False))[0]
    agree = float((expected == labels).float().mean())
    assert tested["test/acc_tta"] == pytest.approx(agree) and agree > 0
    assert tested["test/acc"] == pytest.approx(float((plain == labels).float().mean()))


@torch.no_grad()
def test_whitened_filters_decorrelate_the_patches_with_unit_variance_in_sign_pairs():
    torch.manual_seed(0)
    smooth = F.avg_pool2d(F.pad(torch.randn(300, 3, 10, 10), (1,) * 4, mode="reflect"), 3, 1)  # correlated pixels
    images = 3 * smooth + 0.5
    conv = nn.Conv2d(3, 32, 3)
    whiten_(conv, images)
    assert torch.equal(conv.weight[0::2], -conv.weight[1::2]) and not conv.bias.any()
    outputs = F.conv2d(images, conv.weight[0::2]).permute(0, 2, 3, 1).reshape(-1, 16)
    moment = outputs.T @ outputs / len(outputs)  # the second moment of the 16 directions' outputs
    assert torch.allclose(moment, torch.eye(16), atol=2e-3)
    directions = F.normalize(conv.weight[0::2].flatten(1), dim=1).view(16, 3, 3, 3)
    strength = (F.conv2d(images, directions) ** 2).mean((0, 2, 3))  # the patches' variance along each direction
    assert torch.equal(strength, strength.sort(descending=True).values)  # the strongest directions first


@pytest.mark.slow
def test_a_run_whitens_conv1_from_its_training_split_and_a_frozen_conv1_keeps_it(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "model.init=whitened", "model.conv1_frozen=true", "seed=3"]
    metrics = train(compose_config("train", overrides))
    trained = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    datamodule, _, _ = build(compose_config("train", overrides))
    datamodule.setup("fit")
    images = datamodule.splits["train"][0]
    sample = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))[:INITIALISATION_IMAGES]
    by_hand = nn.Conv2d(3, 32, 3)
    whiten_(by_hand, datamodule.normalize(images[sample]))
    assert torch.allclose(trained["net.conv1.weight"], by_hand.weight, atol=1e-6)  # frozen: as initialised
    assert trained["net.conv1.bias"].abs().sum() > 0  # its biases trained from 0
    datamodule, module, trainer = build(compose_config("train", [*tiny_overrides, "seed=3"]))  # model.init=default
    datamodule.setup("fit")
    trainer.datamodule, module.trainer = datamodule, trainer  # as fit() sets them
    built = module.net.conv1.weight.clone()
    module.setup("fit")
    kept = module.net.conv1.weight
    assert torch.equal(kept, built)  # PyTorch's own initialisation, left as it was
    assert not torch.allclose(kept, by_hand.weight, atol=1e-3)


FORMS = {"expand": {"expand": 128}, "batchnorm": {"batchnorm": True}, "both": {"expand": 128, "batchnorm": True}}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(("stride", "padding", "channels_last"), [(1, 0, False), (1, 1, True), (2, 1, False)])
@torch.no_grad()
def test_a_training_time_form_contracts_into_the_slides_network_with_the_same_outputs(
    form, stride, padding, channels_last
):
    torch.manual_seed(0)
    settings = (3, 32, 10, 32, 3, 64, 4, stride, padding, "max", 2, 0.0, channels_last)
    net = SlideCNN(*settings, **FORMS[form]).double()
    plain = sum(p.numel() for p in SlideCNN(*settings).parameters())
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # as if trained: stats, γ and β
        norm.running_mean.normal_(), norm.running_var.uniform_(0.2, 3.0), norm.weight.normal_(), norm.bias.normal_()
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    net.eval()  # a BatchNorm folds as it computes in eval mode: with the mean and variance it tracked
    before = net(images)
    assert sum(p.numel() for p in net.parameters()) > plain
    net.contract()
    assert [type(layer) for layer in net] == [type(layer) for layer in SlideCNN(*settings)]
    assert net.conv2.weight.shape == (64, 32, 4, 4)
    assert sum(p.numel() for p in net.parameters()) == plain  # 56,778 for the slides' settings
    assert torch.allclose(net(images), before, atol=1e-12, rtol=0)  # float64: exact but for rounding
    assert net.conv2.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("kept", ["expand", "batchnorm"])
def test_a_resume_that_drops_one_of_two_training_time_forms_is_refused(kept, tmp_path):
    settings = (3, 32, 10, 32, 3, 64, 4, 1, 0, "max", 2, 0.5, False)
    state, replaced = contract_state(LitClassifier(SlideCNN(*settings, **FORMS["both"])).state_dict())
    checkpoint = {"state_dict": state, "training_form": replaced}
    check_shapes(LitClassifier(SlideCNN(*settings, **FORMS["both"])), checkpoint, tmp_path / "last.ckpt")  # goes on
    with pytest.raises(UserError) as error:
        check_shapes(LitClassifier(SlideCNN(*settings, **FORMS[kept])), checkpoint, tmp_path / "last.ckpt")
    dropped = "model.batchnorm=true" if kept == "expand" else "model.expand=128"
    assert f"was trained with {dropped}, which a resume goes on with: leave out" in str(error.value)


@pytest.mark.parametrize(("form", "off"), [pytest.param("model.expand=8", "model.expand=null", marks=pytest.mark.slow),
                                           ("model.batchnorm=true", "model.batchnorm=false")])  # fmt: skip
def test_a_run_in_a_training_time_form_saves_tests_and_resumes_the_slides_network(form, off, tiny_overrides, tmp_path):
    settings = [*tiny_overrides, form, "optimizer=sgd_steplr", "trainer.max_epochs=2", "trainer.deterministic=true",
                "model.dropout=0"]  # fmt: skip
    metrics = train(compose_config("train", [*settings, f"output_dir={tmp_path / 'whole'}"]))
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    state = checkpoint["state_dict"]
    assert state["net.conv2.weight"].shape == (64, 32, 4, 4) and not any(".first." in key for key in state)
    assert sum(v.numel() for k, v in state.items() if k.startswith("net.")) == 56_778  # no BatchNorm's either
    # the saved weights compute what the training-time form computed
    datamodule, module, _ = build(compose_config("train", settings))
    module.load_state_dict(training_state(state, checkpoint["training_form"]))
    datamodule.setup("test")
    images = datamodule.normalize(datamodule.splits["test"][0])
    module.eval()
    with torch.no_grad():
        trained_logits = module(images)
        module.net.contract()
        assert torch.allclose(module(images), trained_logits, atol=1e-5)
    evaluated = evaluate(compose_config("eval", [f"ckpt_path={metrics['best_checkpoint']}", *tiny_overrides[:2],
                                                 f"output_dir={tmp_path / 'eval'}"]))  # fmt: skip
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)  # the run tested the contracted net
    # stopped after epoch 1 and resumed: the same weights as the run never stopped
    stopped = tmp_path / "stopped"
    train(compose_config("train", [*settings, "trainer.max_epochs=1", f"output_dir={stopped}"]))
    train(
        compose_config("train", [*settings, f"output_dir={stopped}", f"ckpt_path={stopped / 'checkpoints/last.ckpt'}"])
    )
    with pytest.raises(UserError) as error:  # a resume goes on in the form it trained in
        train(compose_config("train", [*settings, off, f"output_dir={stopped}",
                                       f"ckpt_path={stopped / 'checkpoints/last.ckpt'}"]))  # fmt: skip
    assert f"was trained with {form}, which a resume goes on with: leave out {off}" in str(error.value)
    if form == "model.batchnorm=true":  # docs/bad-input.md's line
        row = "a resume that leaves out the training-time form its run trained in (`model.batchnorm=false`)"
        assert re.fullmatch(as_pattern(table_rows()[row]), f"error: {error.value}")
    resumed = torch.load(stopped / "checkpoints/last.ckpt", weights_only=True)
    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    assert resumed["training_form"].keys() == whole["training_form"].keys()
    for key, value in whole["training_form"].items():
        assert torch.equal(resumed["training_form"][key], value), key
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in whole["state_dict"].items())


def test_the_distillation_loss_is_hintons():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    hard = F.cross_entropy(student, labels)
    t, w = 3.0, 0.7
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    assert torch.allclose(distillation_loss(student, teacher, hard, t, w), (1 - w) * hard + w * t * t * kl)
    assert torch.allclose(distillation_loss(student, student, hard, t, 1.0), torch.tensor(0.0), atol=1e-6)
    assert torch.equal(distillation_loss(student, teacher, hard, t, 0.0), hard)


@pytest.fixture(scope="module")
def teacher_checkpoint(tree_archive, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("teacher")
    return train(compose_config("train", tiny_run(tree_archive, folder)))["best_checkpoint"]


@pytest.mark.slow
def test_a_run_with_a_teacher_trains_on_the_distillation_loss_of_the_same_pixels(
    tiny_overrides, teacher_checkpoint, tmp_path
):
    # the student normalises otherwise than the teacher did: the teacher must still see the same pixels
    normalisation = [*tiny_overrides, "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    run_folder = Path(teacher_checkpoint).parent.parent  # a run folder: its best checkpoint, this very file
    assert resolve_model_path(str(run_folder), "outputs") == Path(teacher_checkpoint)
    teacher = ["teacher=checkpoints", f"teacher.checkpoints=[{teacher_checkpoint},{run_folder}]",
               "teacher.temperature=2", "teacher.weight=0.6"]  # fmt: skip
    settings = [*normalisation, *teacher]
    datamodule, module, trainer = build(compose_config("train", settings))
    datamodule.setup("fit")
    trainer.datamodule = datamodule  # as fit() sets it
    module.trainer = trainer
    module.log = lambda *args, **kwargs: None  # no loop to log into outside a fit
    module.setup("fit")
    images, labels = datamodule.splits["train"][0][:16], datamodule.splits["train"][1][:16]
    x = datamodule.normalize(images)
    member, _ = deployable_from_checkpoint(torch.load(teacher_checkpoint, weights_only=True), teacher_checkpoint)
    with torch.no_grad():
        assert torch.allclose(module.teachers[0](x), member(images), atol=1e-5)  # an ensemble of one net, twice
        module.eval()  # no dropout: the same student logits twice
        expected = distillation_loss(module(x), member(images), F.cross_entropy(module(x), labels), 2.0, 0.6)
        assert torch.allclose(module.training_step((x, labels), 0), expected, atol=1e-6)
    # a whole run: the teacher loads when the fit starts, and the same seed trains to other weights than without it
    runs = {"plain": normalisation, "taught": settings}  # the same normalisation, with a teacher or without
    plain, taught = (train(compose_config("train", [*runs[name], "trainer.max_epochs=1",
                                                    f"output_dir={tmp_path / name}"])) for name in runs)  # fmt: skip
    weights = [torch.load(m["best_checkpoint"], weights_only=True)["state_dict"] for m in (plain, taught)]
    assert not torch.equal(weights[0]["net.fc1.weight"], weights[1]["net.fc1.weight"])
    assert not any(key.startswith("teacher") for key in weights[1])  # the teacher is not saved with the student


@pytest.mark.parametrize("form", ["model.expand=64", "model.batchnorm=true"])
def test_the_shape_table_of_a_training_time_form_is_the_slides_network(form):
    from cnnlab.api import shape_table

    plain, trained = shape_table([]), shape_table([form])
    assert trained == plain and sum(row["parameters"] for row in trained) == 56_778
