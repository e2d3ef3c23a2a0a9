"""cnnlab from Python (a notebook, a script): compose a config with the command line's overrides, then train,
evaluate, predict or draw the shape table; each returns plain data and writes what the command line writes.

    from cnnlab.api import compose, train
    metrics = train(compose(["optimizer=sgd_steplr", "trainer.max_epochs=2"]))   # = python src/train.py ...

conf/ stays the one source of defaults (Hydra's compose API reads it). Importing this module imports neither
torch nor Lightning; each function imports what it needs. Everything works again in the same process (a cell
run twice): each `compose` starts Hydra afresh and each run gets its own run dir.
"""

import copy
import logging
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str] = (), config: str = "train"):
    """conf/<config>.yaml with `overrides` (as on the command line), its run dir claimed as the command line claims
    it (outputs/runs/<time>_<overrides> for train): the DictConfig a @hydra.main entry would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    import cnnlab.config  # noqa: F401  (the resolvers)

    GlobalHydra.instance().clear()  # a notebook composes again
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name=config):
        cfg = hydra_compose(config_name=config, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).resolve())
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} and the run's overrides, as in a run
    task = copy.deepcopy(cfg)  # the task's config, as Hydra's run_job hands it over: without its hydra node
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _as_the_command_line_leaves_it(cfg) -> Path:
    """The run dir's .hydra/ (config, hydra, overrides) and its log file, as Hydra's own run makes them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import _save_config, configure_log

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    _save_config(cfg, "config.yaml", run_dir / ".hydra")
    _save_config(hydra.overrides.task, "overrides.yaml", run_dir / ".hydra")
    configure_log(hydra.job_logging, hydra.verbose)  # the console and <run dir>/<config>.log
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        # Lightning, imported before logging was set up (a notebook's earlier cell), printed on a handler of its
        # own; as it does when logging is set up first, its records now go to the run's handlers (and its log).
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return run_dir


def train(cfg) -> dict:
    """cnnlab.train.train on a composed config: fit, test, metrics.json; returns the metrics."""
    from cnnlab.train import train as train_run

    _as_the_command_line_leaves_it(cfg)
    return train_run(cfg)


def evaluate(cfg) -> dict:
    """cnnlab.evaluate.evaluate on compose([...], config="eval"): the test metrics of a checkpoint."""
    from cnnlab.evaluate import evaluate as evaluate_run

    _as_the_command_line_leaves_it(cfg)
    return evaluate_run(cfg)


def predict(ckpt_path: str, inputs: str, top_k: int = 3) -> list[dict]:
    """The model of `ckpt_path` (a checkpoint, run dir, `last`, .onnx or .pt2) on image files: for each file, its
    top-k classes with their probabilities, most likely first."""
    from cnnlab.predict import predict_files

    overrides = [f"ckpt_path={quoted(ckpt_path)}", f"inputs={quoted(inputs)}", f"top_k={top_k}"]
    found = predict_files(compose(overrides, "predict"))
    return [{"file": str(file), "top": [{"class": name, "probability": p} for name, p in top]}
            for file, top in zip(found.files, found.top, strict=True)]  # fmt: skip


def quoted(value) -> str:
    """A path as one value of an override: quoted, as a run dir's name holds `=` and `,` (…_optimizer=adam,seed=1)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def shape_table(overrides: list[str] = ()) -> list[dict]:
    """The lecture's shape table of the configured network (data=mnist, model.* overrides): a dict a layer."""
    from dataclasses import asdict

    from cnnlab.shapes import configured_network
    from cnnlab.shapes import shape_table as rows_of

    return [asdict(row) for row in rows_of(configured_network(compose(list(overrides), "shapes")))]
