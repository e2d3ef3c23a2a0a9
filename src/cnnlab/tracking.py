"""The experiment trackers a run logs to besides TensorBoard and CSV: MLflow and W&B, and what every logger gets.

`MLflowRunLogger` and `WandbRunLogger` are Lightning's MLFlowLogger and WandbLogger with what a cnnlab run needs of
them: one line when the package, the server or the credentials are missing; a resumed run continuing its tracker
run (the ids are in the checkpoints: `tracker_runs`, `resume_arguments`); a resumed run's changed settings kept
(MLflow refuses to change a param); a run that fails or is stopped ended as such (`end_tracker_runs`).
`log_picture` sends a figure or an image to every logger that shows pictures; `publish_results` adds the final
metrics and the run's files at the end.
"""

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cnnlab import UserError

log = logging.getLogger(__name__)


def needs(package: str, logger: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"logger={logger} needs {package}: it comes with cnnlab's track extra, "
                        f"pip install -e '.[track]' (make install does it)")  # fmt: skip


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger for a cnnlab run. The store is named by a URL (conf/logger/mlflow.yaml); checkpoints
    stay in the run dir whatever the store (Lightning's open issue: with a SQLite URL its save_dir is None)."""

    def __init__(self, *, tracking_uri: str, run_id: str | None = None, **kwargs):
        needs("mlflow", "mlflow")
        scheme = tracking_uri.split(":", 1)[0]  # one of those its domain names (conf/logger/mlflow.yaml)
        host = tracking_uri.split("://", 1)[-1].split("/", 1)[0]
        if ":" in host.rpartition("@")[0]:  # user:password@host would go into every saved config
            raise UserError("logger.mlflow.tracking_uri holds credentials (user:password@host): the config is saved "
                            "with the run and logged; give them as MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD in the environment instead")  # fmt: skip
        if scheme in ("http", "https"):
            check_mlflow_server(tracking_uri)
            kwargs["artifact_location"] = None  # the server's own: it stores what the runs send it
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        if run_id is not None:  # a resumed run: its MLflow run goes on, if this store has it, not deleted
            from mlflow.exceptions import MlflowException

            try:
                active = self._mlflow_client.get_run(run_id).info.lifecycle_stage == "active"
            except MlflowException:
                active = False
            if not active:
                log.warning(f"the resumed run's MLflow run {run_id} is not in {tracking_uri}: a new MLflow run")
            else:
                self._run_id = run_id
                if rank_zero_only.rank == 0:
                    self._mlflow_client.update_run(run_id, status="RUNNING")

    @property
    def experiment(self):
        """Lightning's, with a SQLite store opened under a lock (two jobs of a parallel sweep do not both create
        it), and an experiment that another job created at the same moment taken as it is."""
        from mlflow.exceptions import MlflowException

        lock = sqlite_creation_lock(self._tracking_uri) if not self._initialized else None
        with lock or contextlib.nullcontext():
            try:
                return MLFlowLogger.experiment.fget(self)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self._experiment_id = self._mlflow_client.get_experiment_by_name(self._experiment_name).experiment_id
                return MLFlowLogger.experiment.fget(self)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """Params as Lightning logs them; a resumed run's changed ones (a longer trainer.max_epochs) as tags
        `resumed/<name>`, since MLflow keeps a param's first value."""
        logged = self.experiment.get_run(self.run_id).data.params
        given = {key: str(value)[:250] for key, value in params.items()}  # Lightning's cut
        new = {key: value for key, value in given.items() if key not in logged}
        if new:
            super().log_hyperparams(new)
        changed = {f"resumed/{key}": value for key, value in given.items() if key in logged and logged[key] != value}
        mlflow_tags(self, changed)


def mlflow_tags(logger: MLFlowLogger, tags: dict) -> None:
    """Tags of the logger's MLflow run: they may change later (a resumed run's), params may not."""
    from mlflow.entities import RunTag

    if tags and rank_zero_only.rank == 0:
        logger.experiment.log_batch(logger.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def check_mlflow_server(url: str) -> None:
    """One line, at once, where no server answers at an http(s) store (MLflow's client would retry for minutes), or
    where it asks who is calling and the environment does not say (MLflow's client would raise a traceback). The
    request carries what MLflow's client would send: MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN,
    and MLFLOW_TRACKING_INSECURE_TLS."""
    import base64
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context() if insecure else None)
    except urllib.error.HTTPError as err:  # a server answered
        if err.code in (401, 403):
            given = "were refused" if (user and password) or token else "are not in the environment"
            raise UserError(f"logger.mlflow.tracking_uri={url}: the server asks who is calling ({err.code}) and the "
                            f"credentials {given}: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                            f"(never in a config)") from None  # fmt: skip
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"logger.mlflow.tracking_uri={url}: no MLflow server answers there ({reason}); start one "
                        f"(mlflow server --host 127.0.0.1 --port 5000) or leave tracking_uri at its default, a "
                        f"SQLite store under outputs_root") from None  # fmt: skip


@contextlib.contextmanager
def sqlite_creation_lock(tracking_uri: str):
    """For a SQLite store: an exclusive lock beside its file while it is opened, so that the first of several jobs
    creates its tables alone. Other stores: no lock (their server or database serialises)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class WandbRunLogger(LightningWandbLogger):
    """Lightning's WandbLogger, offline unless told (conf/logger/wandb.yaml), quiet on the console, a W&B run of its
    own (Lightning's would join a run left open in the process); a resumed run continues its W&B run (`id`)."""

    def __init__(self, *, offline: bool, **kwargs):
        needs("wandb", "wandb")
        import wandb

        if not offline and not (os.environ.get("WANDB_API_KEY") or wandb_login_saved()):
            raise UserError("logger.wandb.offline=false needs a W&B login: run 'wandb login' once, or put "
                            "WANDB_API_KEY in the environment (never in a config); or keep the run offline and "
                            "'wandb sync' it later")  # fmt: skip
        kwargs.setdefault("settings", wandb.Settings(quiet=True, console="off"))  # the run's lines stay ours
        super().__init__(offline=offline, **kwargs)

    @property
    def experiment(self):
        import wandb

        if self._experiment is None and wandb.run is not None and rank_zero_only.rank == 0:
            wandb.run.finish()  # another run's, left open (a run before this one in the process failed)
        return LightningWandbLogger.experiment.fget(self)


def wandb_login_saved() -> bool:
    """`wandb login` writes the key into the netrc file, under the W&B server's host."""
    from urllib.parse import urlparse

    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    return netrc.is_file() and host in netrc.read_text(errors="replace")


PICTURE_LOGGERS = (TensorBoardLogger, MLFlowLogger, LightningWandbLogger)  # those log_picture shows pictures in
RESUMED_BY = {MLFlowLogger: "run_id", LightningWandbLogger: "id"}  # the argument that continues a tracker's run


def tracker_runs(loggers: list) -> dict:
    """The tracker runs of this run, for its checkpoints: {"MLFlowLogger": run id, "WandbLogger": id}."""
    runs = {}
    for logger in loggers:
        for kind in RESUMED_BY:
            if isinstance(logger, kind) and logger.version is not None:
                runs[kind.__name__] = logger.version
    return runs


def resume_arguments(target: type, checkpoint: dict | None) -> dict:
    """What continues the tracker run a checkpoint names, for a logger of class `target` (nothing for a checkpoint
    without one)."""
    runs = (checkpoint or {}).get("trackers") or {}
    for kind, argument in RESUMED_BY.items():
        if issubclass(target, kind) and runs.get(kind.__name__):
            return {argument: runs[kind.__name__], **({"resume": "allow"} if argument == "id" else {})}
    return {}


def end_tracker_runs(loggers: list, status: str) -> None:
    """A run that failed or was stopped (status FAILED or KILLED): its MLflow run says so and its W&B run ends, so
    that neither stays open (the next run in the process, a resume, starts cleanly). Nothing for a tracker run that
    was never started."""
    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if isinstance(logger, MLFlowLogger) and logger._initialized:
            logger.experiment.set_terminated(logger.run_id, status)
        elif isinstance(logger, LightningWandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=1)


def log_picture(loggers: list, tag: str, picture, step: int) -> None:
    """A matplotlib figure, or a C×H×W image with values 0–1, to each logger that shows pictures: TensorBoard's
    IMAGES, MLflow's artifacts (<tag>.png, the newest kept), W&B's media."""
    import numpy as np

    figure = not isinstance(picture, torch.Tensor)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            add = logger.experiment.add_figure if figure else logger.experiment.add_image
            add(tag, picture, step, **({"close": False} if figure else {}))
        elif isinstance(logger, MLFlowLogger | LightningWandbLogger):
            image = picture if figure else (picture.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
            if isinstance(logger, MLFlowLogger):
                if figure:
                    logger.experiment.log_figure(logger.run_id, picture, f"{tag}.png")
                else:
                    logger.experiment.log_image(logger.run_id, np.ascontiguousarray(image), artifact_file=f"{tag}.png")
            else:
                logger.log_image(key=tag, images=[image], step=step)
    if figure:
        import matplotlib.pyplot as plt

        plt.close(picture)


def publish_results(loggers: list, metrics: dict, run_dir: Path, config: str) -> None:
    """At the run's end, for MLflow and W&B: every number of metrics.json as a metric (its curves already are),
    and as files the composed config (`config`, YAML), metrics.json and the profiler's report; then each tracker
    run ends."""
    results = {key: value for key, value in metrics.items()
               if key.startswith(("test/", "val/")) and isinstance(value, int | float)}  # fmt: skip
    files = [path for path in [run_dir / "metrics.json", *sorted(run_dir.glob("*profile*.txt"))] if path.is_file()]
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.log_metrics(results, step=metrics["global_step"])
            logger.experiment.log_text(logger.run_id, config, "config.yaml")
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path))
            logger.experiment.set_terminated(logger.run_id, "FINISHED")
        elif isinstance(logger, LightningWandbLogger):
            logger.experiment.summary.update(results)
            files_dir = Path(logger.experiment.dir)  # what the run sends: its config.yaml is W&B's own
            (files_dir / "run_config.yaml").write_text(config)
            for path in files:
                shutil.copyfile(path, files_dir / path.name)
            logger.experiment.finish()  # the next run of this process (a notebook's) gets a run of its own
