"""train(cfg) and evaluate(cfg): the whole path of a run, from a composed Hydra config to metrics.json."""

import ctypes
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cnnlab import UserError, inference, resume, scale, write_atomically
from cnnlab.checks import check
from cnnlab.config import overridden
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


def build(cfg: DictConfig, resuming: dict | None = None) -> tuple[L.LightningDataModule, LitClassifier, L.Trainer]:
    """Data · model · module · Trainer, each from its config group."""
    datamodule = make(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    net = make(cfg.model)
    module = LitClassifier(
        net,
        optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,  # eval.yaml has none
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=cfg.model.num_classes,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        criterion=make(cfg.loss) if cfg.get("loss") else None,
        tta=cfg.data.get("tta", False),
        run=run_record(cfg),
    )
    # A callback or logger set to null (callbacks.inside=null) is left out.
    loggers = [make_logger(c, resuming) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [make(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # The run guard stops a run after every other callback has taken the step in (an EMA of the weights, say);
    # Lightning then puts its ModelCheckpoints after it.
    callbacks.sort(key=lambda callback: isinstance(callback, resume.RunGuard))
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[resume.AtomicCheckpointIO()]
    )
    for logger in loggers:
        logger.log_hyperparams(hyperparameters(cfg))  # hparams.yaml beside the events
    return datamodule, module, trainer


def run_record(cfg: DictConfig) -> dict:
    """What a checkpoint keeps of the run that wrote it, as plain data: its command-line overrides (a resume starts
    from them: cnnlab.config.with_the_runs_own_overrides), the data it was trained on (eval, export and visualize
    use it when they are given none), and what a resume must not change (cnnlab.resume.check_same_training)."""
    from hydra.core.hydra_config import HydraConfig

    scheduler = cfg.get("scheduler")
    return {
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "data_root": {"given": str(cfg.data.root), "resolved": str(Path(cfg.data.root).expanduser().resolve())},
        "optimizer": cfg.optimizer._target_ if cfg.get("optimizer") else None,
        "scheduler": scheduler._target_ if scheduler else None,
        "max_epochs": cfg.trainer.max_epochs,
        "max_steps": cfg.trainer.max_steps,
    }


def make_logger(node: DictConfig, resuming: dict | None):
    if resuming is not None and node._target_.endswith("TensorBoardLogger"):
        # TensorBoard hides what an earlier start logged from this step on: one curve, no step shown twice.
        return make(node, purge_step=resuming["global_step"])
    return make(node)


def hyperparameters(cfg: DictConfig) -> dict:
    """What tells runs apart, for TensorBoard's HPARAMS tab, under short names: no `_target_`s and no paths (the
    whole config stays in the run's .hydra/config.yaml). TensorBoard sorts the names and shows the first five
    at first: augment, batch_size, epochs, lr, optimizer; then model.* (the network's settings given on the
    command line, as a sweep does), optimizer.* and scheduler.* settings, precision, scheduler, seed, and the
    levers of experiment=best: smoothing (loss.label_smoothing), weight_ema (its decay)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    optimizer, scheduler = config.get("optimizer") or {}, config.get("scheduler") or {}
    data, trainer, model = config.get("data") or {}, config.get("trainer") or {}, config.get("model") or {}
    params = {
        "optimizer": optimizer.get("_target_", "none").rsplit(".", 1)[-1],
        "lr": optimizer.get("lr"),
        **{f"optimizer.{key}": value for key, value in optimizer.items() if key not in ("_target_", "_partial_", "lr")},
        "scheduler": scheduler.get("_target_", "none").rsplit(".", 1)[-1],
        **{f"scheduler.{key}": value for key, value in scheduler.items() if not key.startswith("_")},
        "batch_size": data.get("batch_size"),
        "precision": trainer.get("precision"),
        "augment": data.get("augment"),
        "smoothing": (config.get("loss") or {}).get("label_smoothing"),  # names that sort after the first five
        "weight_ema": ((config.get("callbacks") or {}).get("ema") or {}).get("decay"),  # None: no EMA
        "epochs": trainer.get("max_epochs"),
        "seed": config.get("seed"),
        **{f"model.{key}": model[key] for key in overridden("model") if key in model},
    }
    return {key: value if isinstance(value, int | float | str | bool) else str(value) for key, value in params.items()}


def keep_freed_memory(keep: bool = True) -> None:
    """Let this process keep the memory it frees, for the next step to reuse (glibc's malloc; elsewhere nothing).

    A CPU training step allocates its activations and gradients, tens of MB, and frees them at its end. glibc
    gives freed blocks that large back to the kernel (mmap threshold, heap trimming), so the next step faults
    the same memory in again page by page: 3,476 and 8,395 page faults a fast_cpu step in two runs of
    `bench/step_breakdown.py --settings experiment=fast_cpu keep_freed_memory=false`. With glibc's largest mmap
    threshold (32 MiB) and no trimming, the freed memory is reused: 14 faults a step. The process keeps its
    largest heap."""
    if not keep or not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's (musl's does nothing)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
        mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def train(cfg: DictConfig) -> dict | None:
    """Fit, test the best checkpoint, write metrics.json into the run dir and return the metrics (None on the
    other processes of a multi-process run: the first one writes for all).

    With `ckpt_path`, training resumes exactly where that checkpoint left it (cnnlab/resume.py)."""
    start = time.perf_counter()
    check(cfg)
    resume_from, checkpoint = None, None
    if cfg.get("ckpt_path") is not None:
        resume_from = resume.find_checkpoint(str(cfg.ckpt_path), cfg.outputs_root)
        checkpoint = resume.load_checkpoint(resume_from)
    else:  # a SLURM job requeued after pre-emption goes on from where it stopped
        resume_from, checkpoint = resume.requeued_checkpoint(cfg.output_dir) or (None, None)
    if resume_from is not None:
        log.info(f"resuming from {resume_from} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}) "
                 f"in {cfg.output_dir}")  # fmt: skip
    L.seed_everything(cfg.seed, workers=True)  # an integer seed is applied, 0 included
    keep_freed_memory(cfg.get("keep_freed_memory", True))
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
    scale.share_the_machine(cfg)  # a job among others running at once on GPUs: a GPU of its own
    datamodule, module, trainer = build(cfg, resuming=checkpoint)
    if checkpoint is not None:
        resume.check_shapes(module, checkpoint, resume_from)
        resume.check_processes(trainer, checkpoint, resume_from)
        resume.check_same_training(module, checkpoint, resume_from)
    guard = next((c for c in trainer.callbacks if isinstance(c, resume.RunGuard)), None)
    with guard.handling_signals() if guard else nullcontext(), scale.process_group_ended_after():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        best = resume.best_checkpoint(trainer, checkpoint)
        if not best:
            log.warning("no best checkpoint was saved (fast_dev_run?): testing the weights as they are")
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=True, weights_only=True)
    metrics = {
        "test/acc": tested[0]["test/acc"],
        "test/loss": tested[0]["test/loss"],
        **{key: tested[0][key] for key in ("test/acc_tta",) if key in tested[0]},  # data.tta=true
        "val/acc_best": best_val_acc(module),
        "confusion_matrix": module.test_confusion_counts,  # rows: true class, columns: predicted; every test image once
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "seed": cfg.seed,
        "best_checkpoint": best or None,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_s": round(time.perf_counter() - start, 1),
        "run_dir": cfg.output_dir,
    }
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: this run's config beside its real results
            results = {key: metrics[key] for key in ("test/acc", "val/acc_best") if metrics[key] is not None}
            logger.log_hyperparams(hyperparameters(cfg), metrics=results)
    return write_metrics(metrics, cfg.output_dir)


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint (or an exported .onnx/.pt2) on the test split of data.root, or on a labelled folder
    <class>/<image>: metrics.json (accuracy, loss, per-class accuracy, confusion matrix) and confusion_matrix.png.

    A self-describing checkpoint rebuilds its own model and normalisation; an older one uses model.* and the
    data's mean/std from the config."""
    if cfg.get("ckpt_path") is None:
        raise UserError("ckpt_path=<file> is required: the checkpoint to evaluate")
    check(cfg)

    def from_config(checkpoint: dict, path: Path):
        module = LitClassifier(make(cfg.model), num_classes=cfg.model.num_classes)
        resume.check_shapes(module, checkpoint, path)
        module.load_state_dict(checkpoint["state_dict"])
        description = {"input_shape": list(module.net.input_shape), "classes": None}  # the data's, below
        return inference.Deployable(module.net, list(cfg.data.mean), list(cfg.data.std)), description

    device = EVAL_DEVICES[cfg.trainer.accelerator]  # check() has refused any other, and a device this machine lacks
    model = inference.load_model(str(cfg.ckpt_path), cfg.outputs_root, device=device, fallback=from_config)
    images, labels, model.description["classes"] = inference.evaluation_set(
        cfg.data, model.classes, model.image_size, inference.trained_on(model.description)
    )
    scores = inference.score(model, images, labels, cfg.data.eval_batch_size, tta=cfg.data.get("tta", False))
    metrics = {**scores, "ckpt_path": str(model.source), "run_dir": cfg.output_dir}
    inference.plot_confusion(metrics["confusion_matrix"], model.classes, Path(cfg.output_dir) / "confusion_matrix.png")
    log.info(f"test/acc={metrics['test/acc']:.4f} test/loss={metrics['test/loss']:.4f} on {len(labels)} images")
    return write_metrics(metrics, cfg.output_dir)


# trainer.accelerator → the device src/eval.py runs the model on
EVAL_DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}


def best_val_acc(module: LitClassifier) -> float | None:
    value = float(module.val_acc_best.compute())
    return value if value > float("-inf") else None  # -inf: no validation epoch ran


def write_metrics(metrics: dict, output_dir: str) -> dict:
    """metrics.json, written to a temp file and renamed: a reader never sees half of it."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def first_process() -> bool:
    """Whether this is the first process of the run (global rank 0), which reports for all of them."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
