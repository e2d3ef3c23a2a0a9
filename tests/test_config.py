from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from cnnlab.config import parse_overrides, quote_paths
from cnnlab.module import per_step
from cnnlab.rundir import run_name, unique_dir
from tests.conftest import CONF, compose_config

GROUP_OPTIONS = [
    f"{group.name}={option.stem}"
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name != "hydra"
    for option in sorted(group.glob("*.yaml"))
]


def test_every_group_has_options():
    groups = {option.split("=")[0] for option in GROUP_OPTIONS}
    assert groups >= {"data", "model", "optimizer", "trainer", "logger", "callbacks", "experiment"}


# The trackers' loggers import MLflow and W&B (seconds): the full tier builds them.
@pytest.mark.parametrize(
    "override", [pytest.param(o, marks=pytest.mark.slow) if o in ("logger=mlflow", "logger=wandb") else o
                 for o in GROUP_OPTIONS]
)  # fmt: skip
def test_every_config_option_composes_and_instantiates(override, tmp_path):
    # data=folder leaves the image size and classes to the tree it reads (tests/test_datasets.py): here, given
    known = ["data.image_size=32", "data.num_classes=10"] if override == "data=folder" else []
    cfg = compose_config("train", [override, f"output_dir={tmp_path}", *known])
    net = instantiate(cfg.model)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.scheduler:
        schedule = instantiate(cfg.scheduler)
        # a per-step schedule (OneCycleLR) gets the run's step count from LitClassifier.configure_optimizers
        schedule(optimizer=optimizer, **({"total_steps": 100} if per_step(schedule) else {}))
    instantiate(cfg.loss)
    for node in [*(cfg.logger or {}).values(), *(cfg.callbacks or {}).values()]:
        instantiate(node)
    instantiate(cfg.data, _convert_="all")


@pytest.mark.parametrize(
    ("precision", "on_cpu"),
    [("32-true", "32-true"), ("bf16-mixed", "bf16-mixed"), ("16-mixed", "bf16-mixed")],  # Lightning: no fp16 AMP on CPU
)
def test_precision_is_a_trainer_option(precision, on_cpu, tmp_path):
    cfg = compose_config("train", ["trainer=cpu", f"trainer.precision={precision}", f"output_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == on_cpu


def test_defaults_are_the_slides_option_1_and_option_2():
    adam = compose_config("train", [])
    assert adam.optimizer._target_ == "torch.optim.Adam" and adam.scheduler is None
    sgd = compose_config("train", ["optimizer=sgd_steplr"])
    assert sgd.optimizer._target_ == "torch.optim.SGD" and sgd.optimizer.momentum > 0
    assert sgd.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert adam.data.batch_size == sgd.data.batch_size and adam.data.augment is False
    assert adam.trainer.precision == "32-true"


def test_run_names_are_folder_safe():
    assert run_name("2026-01-01_10-00-00", "") == "2026-01-01_10-00-00"
    assert run_name("0", "optimizer=adam,seed=1") == "0_optimizer=adam,seed=1"
    name = run_name("t", "logger.tensorboard.save_dir=/a/b," + "x" * 200)
    assert "/" not in name and len(name) <= 2 + 80


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    path = str(tmp_path / "runs" / "2026-01-01_10-00-00_optimizer=adam")
    first, second = unique_dir(path), unique_dir(path)
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


def test_each_domain_is_read_from_the_comment_beside_its_default(tmp_path):
    from cnnlab.domains import declared

    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "a.yaml").write_text(
        "# @package _global_\noptimizer:\n  lr: 0.1  # ∈ number(0) · a note\n"
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.yaml").write_text(
        'pool: max  # ∈ one_of("max", "avg")\nblock:\n  depth: 2  # ∈ integer(1).means("a · b") · a note · more\n'
        "width: 3\n"
    )
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "h.yaml").write_text("job:\n  x: 1  # ∈ integer(5)\n")  # Hydra's own: not ours
    domains = declared.__wrapped__(tmp_path)
    assert set(domains) == {"optimizer.lr", "model.pool", "model.block.depth"}
    assert domains["optimizer.lr"].accepts(0.1) and not domains["optimizer.lr"].accepts(-1)
    assert domains["model.block.depth"].meaning == "a · b" and not domains["model.pool"].accepts("min")
    (tmp_path / "optimizer" / "b.yaml").write_text("# @package _global_\noptimizer:\n  lr: 0.2  # ∈ number(1)\n")
    with pytest.raises(ValueError, match=r"optimizer/b.yaml:3: optimizer.lr ∈ number\(1\), but ∈ number\(0\)"):
        declared.__wrapped__(tmp_path)


def test_an_existing_path_holding_hydras_syntax_is_quoted_and_nothing_else(tmp_path):
    run = tmp_path / "2026-12-04_21-45-41_experiment=fast_cpu,data.val_size=20"  # a run folder as cnnlab names it
    run.mkdir()
    odd = tmp_path / "it's [odd] (1)"
    odd.mkdir()
    argv = [f"ckpt_path={run}", f"data.root={odd}", "seed=0,1", f"inputs={tmp_path}/none=1", f"ckpt_path='{run}'",
            "-m", "optimizer=adam"]  # fmt: skip
    quoted = quote_paths(argv)
    assert quoted[0] == f"ckpt_path='{run}'" and quoted[2:] == argv[2:]  # no path, a quoted one, a flag: as given
    assert [override.value() for override in parse_overrides(quoted[:2])] == [str(run), str(odd)]
