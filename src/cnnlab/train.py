"""train(cfg): the whole path of a training run, from a composed Hydra config to metrics.json."""

import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cnnlab import checkpoints, make, resume, scale, write_metrics
from cnnlab.checks import check
from cnnlab.config import overridden
from cnnlab.console import result_lines
from cnnlab.data.sources import follow_the_data
from cnnlab.distill import teacher_member
from cnnlab.module import LitClassifier
from cnnlab.pictures import top_confusions
from cnnlab.process import emulated_bf16, keep_freed_memory, share_the_machine
from cnnlab.provenance import log_metadata, run_metadata
from cnnlab.quiet import quiet_libraries
from cnnlab.relations import validation_off
from cnnlab.search import ReportToTrial, trial_report
from cnnlab.stops import Interrupted, RunGuard
from cnnlab.tracking import end_tracker_runs, publish_results, resume_arguments

log = logging.getLogger(__name__)
if logging.getLogger().handlers:
    # Hydra's logging already prints to the console and to <run dir>/train.log; `import lightning` adds a
    # console handler of its own, which would print every Lightning message twice.
    logging.getLogger("lightning").handlers.clear()


def build(cfg: DictConfig, resuming: dict | None = None) -> tuple[L.LightningDataModule, LitClassifier, L.Trainer]:
    """Data · model · module · Trainer, each from its config group."""
    arrays = follow_the_data(cfg)  # model.image_size, num_classes: an image tree's, when the config leaves them to it
    if arrays is not None:
        check(cfg)  # the network's shapes, now that they are known
    datamodule = make(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    datamodule.prepared = arrays  # read once
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
        teacher=OmegaConf.to_container(cfg.teacher, resolve=True) if cfg.get("teacher") else None,
    )
    # A callback or logger set to null (callbacks.inside=null) is left out.
    loggers = [make_logger(c, resuming) for c in (cfg.get("logger") or {}).values() if c is not None]
    validates = validation_off(cfg) is None
    callbacks = [make(c if validates else last_epoch_kept(c)) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None]  # fmt: skip
    verbose = cfg.get("verbose", True)  # a config that trains nothing (eval.yaml) has no console to quiet
    if not verbose:  # the header, errors and the closing line: no summary, no progress bar
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary | ProgressBar)]
    # The run guard stops a run after every other callback has taken the step in (an EMA of the weights, say);
    # Lightning then puts its ModelCheckpoints after it.
    callbacks.sort(key=lambda callback: isinstance(callback, RunGuard))
    report = trial_report()  # a trial of a search that prunes: each validation to its trial
    if report is not None:
        callbacks.append(report)
    trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[resume.AtomicCheckpointIO()],
        **({} if verbose else {"enable_progress_bar": False, "enable_model_summary": False}),
        **({} if validates else {"limit_val_batches": 0}),  # data.val_size=0: Lightning skips validation
    )
    for logger in loggers:
        logger.log_hyperparams(hyperparameters(cfg))  # hparams.yaml beside the events
    return datamodule, module, trainer


def last_epoch_kept(node: DictConfig) -> DictConfig:
    """A checkpoint of a run that validates nothing ranks nothing: it keeps the last epoch's, written at the end of
    each training epoch (there is no validation's end to write it at), and the test scores that one."""
    if not str(node.get("_target_", "")).endswith("ModelCheckpoint"):
        return node
    return OmegaConf.merge(node, {"monitor": None, "save_on_train_epoch_end": True})


def run_record(cfg: DictConfig) -> dict:
    """What a checkpoint keeps of the run that wrote it, as plain data: its command-line overrides (a resume starts
    from them: cnnlab.config.with_the_runs_own_overrides), the data it was trained on (eval, export and visualize
    use it when they are given none), and what a resume must not change (cnnlab.resume.check_same_training)."""
    from hydra.core.hydra_config import HydraConfig

    scheduler = cfg.get("scheduler")
    return {
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "data_root": {"given": str(cfg.data.root), "resolved": str(Path(cfg.data.root).expanduser().resolve())},
        "data": {key: cfg.data[key] for key in ("name", "channels", "image_size")},  # which data set, read how
        "optimizer": cfg.optimizer._target_ if cfg.get("optimizer") else None,
        "scheduler": scheduler._target_ if scheduler else None,
        "max_epochs": cfg.trainer.max_epochs,
        "max_steps": cfg.trainer.max_steps,
    }


def make_logger(node: DictConfig, resuming: dict | None):
    if resuming is not None and node._target_.endswith("TensorBoardLogger"):
        # TensorBoard hides what an earlier start logged from this step on: one curve, no step shown twice.
        return make(node, purge_step=resuming["global_step"])
    from hydra.utils import get_class

    return make(node, **resume_arguments(get_class(node._target_), resuming))  # MLflow, W&B: the same tracker run


def hyperparameters(cfg: DictConfig) -> dict:
    """What tells runs apart, for TensorBoard's HPARAMS tab, under short names: no `_target_`s and no paths (the
    whole config stays in the run's .hydra/config.yaml). TensorBoard sorts the names and shows the first five
    at first: augment, batch_size, epochs, lr, optimizer; then model.* (the network's settings given on the
    command line, as a sweep does), optimizer.* and scheduler.* settings, precision, scheduler, seed, and the
    levers of experiment=best: smoothing (loss.label_smoothing), weight_ema (its decay), trained_on (the data
    set) and val_size (the images held out; 0: none)."""
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
        "trained_on": data.get("name"),  # the data set (data=…)
        "val_size": data.get("val_size"),  # 0: a final fit on every training image, nothing validated
        "seed": config.get("seed"),
        **{f"model.{key}": model[key] for key in overridden("model") if key in model},
    }
    return {key: value if isinstance(value, int | float | str | bool) else str(value) for key, value in params.items()}


def train(cfg: DictConfig) -> dict | None:
    """Fit, test the best checkpoint, write metrics.json into the run dir and return the metrics (None on the
    other processes of a multi-process run: the first one writes for all).

    With `ckpt_path`, training resumes exactly where that checkpoint left it (cnnlab/resume.py, rng.py, stops.py)."""
    start = time.perf_counter()
    check(cfg)
    quiet_libraries(cfg.verbose)
    if (slow := emulated_bf16(cfg)) and first_process():
        log.warning(slow)
    for path in (cfg.get("teacher") or {}).get("checkpoints") or []:  # a file that is no teacher: before the run starts
        teacher_member(path)
    resume_from, checkpoint = None, None
    if cfg.get("ckpt_path") is not None:
        resume_from = checkpoints.find_checkpoint(str(cfg.ckpt_path), cfg.outputs_root)
        checkpoint = checkpoints.load_checkpoint(resume_from)
    else:  # a SLURM job requeued after pre-emption goes on from where it stopped
        resume_from, checkpoint = checkpoints.requeued_checkpoint(cfg.output_dir) or (None, None)
    if resume_from is not None:
        log.info(f"resuming from {resume_from} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}) "
                 f"in {cfg.output_dir}")  # fmt: skip
    L.seed_everything(cfg.seed, workers=True)  # an integer seed is applied, 0 included
    keep_freed_memory(cfg.keep_freed_memory)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    share_the_machine(cfg)  # a job among others running at once on GPUs: a GPU of its own
    datamodule, module, trainer = build(cfg, resuming=checkpoint)
    guard = next((c for c in trainer.callbacks if isinstance(c, RunGuard)), None)
    with tracker_runs_ended_on_failure(trainer.loggers):
        run = run_metadata()  # the code, the command, the versions, the machine
        log_metadata(trainer.loggers, run)
        if checkpoint is not None:
            resume.check_shapes(module, checkpoint, resume_from)
            resume.check_processes(trainer, checkpoint, resume_from)
            resume.check_same_training(module, checkpoint, resume_from)
        with guard.handling_signals() if guard else nullcontext(), scale.process_group_ended_after():
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            best = resume.best_checkpoint(trainer, checkpoint)
            if not best:
                log.warning("no best checkpoint was saved (fast_dev_run?): testing the weights as they are")
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                                  weights_only=True)  # fmt: skip
    metrics = {
        "test/acc": tested[0]["test/acc"],
        "test/loss": tested[0]["test/loss"],
        **{key: tested[0][key] for key in ("test/acc_tta",) if key in tested[0]},  # data.tta=true
        "val/acc_best": best_val_acc(module),
        **{f"test/acc_class/{name}": value for name, value in module.test_per_class.items()},
        "confusion_matrix": module.test_confusion_counts,  # rows: true class, columns: predicted; every test image once
        "top_confusions": top_confusions(module.test_confusion_counts, list(module.test_per_class)),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "seed": cfg.seed,
        "best_checkpoint": best or None,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_s": round(time.perf_counter() - start, 1),
        **pruned(trainer),  # a search's trial stopped early by its pruner: pruned_at_epoch
        "run_dir": cfg.output_dir,
        "metadata": run,
    }
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: this run's config beside its real results
            results = {key: metrics[key] for key in ("test/acc", "val/acc_best") if metrics[key] is not None}
            logger.log_hyperparams(hyperparameters(cfg), metrics=results)
    log.info(result_lines(metrics))
    write_metrics(metrics, cfg.output_dir)
    publish_results(trainer.loggers, metrics, Path(cfg.output_dir), OmegaConf.to_yaml(cfg))  # MLflow, W&B: + files
    return metrics


@contextmanager
def tracker_runs_ended_on_failure(loggers: list):
    """An MLflow or W&B run of a run that fails or is stopped ends as FAILED or KILLED, not left open."""
    try:
        yield
    except BaseException as err:
        end_tracker_runs(loggers, "KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
        raise


def pruned(trainer: L.Trainer) -> dict:
    report = next((c for c in trainer.callbacks if isinstance(c, ReportToTrial)), None)
    return {"pruned_at_epoch": report.pruned_at_epoch} if report and report.pruned_at_epoch else {}


def best_val_acc(module: LitClassifier) -> float | None:
    if not module.val_acc_best.update_called:  # no validation epoch ran (data.val_size=0, fast_dev_run)
        return None
    value = float(module.val_acc_best.compute())
    return value if value > float("-inf") else None


def first_process() -> bool:
    """Whether this is the first process of the run (global rank 0), which reports for all of them."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
