"""train(cfg) and evaluate(cfg): the whole path of a run, from a composed Hydra config to metrics.json."""

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cnnlab import UserError
from cnnlab.module import LitClassifier

log = logging.getLogger(__name__)
if logging.getLogger().handlers:
    # Hydra's logging already prints to the console and to <run dir>/train.log; `import lightning` adds a
    # console handler of its own, which would print every Lightning message twice.
    logging.getLogger("lightning").handlers.clear()


def make(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with our UserError let through as it is (Hydra wraps what a target raises)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, LitClassifier, L.Trainer]:
    """Data · model · module · Trainer, each from its config group."""
    datamodule = make(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    net = make(cfg.model)
    module = LitClassifier(
        net,
        optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,  # eval.yaml has none
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=cfg.model.num_classes,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(hyperparameters(cfg))  # hparams.yaml beside the events
    return datamodule, module, trainer


def hyperparameters(cfg: DictConfig) -> dict:
    """What a run is, for TensorBoard's HPARAMS tab: the experiment's groups, not its logging and callbacks."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {
        key: resolved[key] for key in ("seed", "data", "model", "optimizer", "scheduler", "trainer") if key in resolved
    }


def checkpoint_path(path: str | None) -> str | None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"ckpt_path={path}: no such checkpoint file")
    return path


def train(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, write metrics.json into the run dir and return the metrics."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)  # an integer seed is applied, 0 included
    resume_from = checkpoint_path(cfg.get("ckpt_path"))
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no best checkpoint was saved (fast_dev_run?): testing the weights as they are")
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=True)[0]
    metrics = {
        "test/acc": tested["test/acc"],
        "test/loss": tested["test/loss"],
        "val/acc_best": best_val_acc(module),
        "epochs": trainer.current_epoch,
        "seed": cfg.seed,
        "best_checkpoint": best or None,
        "wall_s": round(time.perf_counter() - start, 1),
        "run_dir": cfg.output_dir,
    }
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: this run's config beside its real results
            results = {key: metrics[key] for key in ("test/acc", "val/acc_best") if metrics[key] is not None}
            logger.log_hyperparams(hyperparameters(cfg), metrics=results)
    return write_metrics(metrics, cfg.output_dir)


def evaluate(cfg: DictConfig) -> dict:
    """Test a saved checkpoint (cfg.ckpt_path) on the test set and write metrics.json."""
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=<file> is required: the checkpoint to evaluate")
    path = checkpoint_path(cfg.ckpt_path)
    datamodule, module, trainer = build(cfg)
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(
            f"ckpt_path={path} was trained with another model: pass the same model.* overrides as for training "
            f"({str(err).splitlines()[0]})"
        ) from err
    tested = trainer.test(module, datamodule=datamodule, verbose=True)[0]
    metrics = {
        "test/acc": tested["test/acc"],
        "test/loss": tested["test/loss"],
        "ckpt_path": path,
        "run_dir": cfg.output_dir,
    }
    return write_metrics(metrics, cfg.output_dir)


def best_val_acc(module: LitClassifier) -> float | None:
    value = float(module.val_acc_best.compute())
    return value if value > float("-inf") else None  # -inf: no validation epoch ran


def write_metrics(metrics: dict, output_dir: str) -> dict:
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
