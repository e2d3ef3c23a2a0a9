"""What produced a run, and the experiment trackers that keep it: TensorBoard, CSV, MLflow, W&B.

`run_metadata()`: the code (git commit, a dirty tree), the command line, the versions, the machine, as plain data
for metrics.json and the loggers (TensorBoard shows it as a text card, the CSV logger keeps it in its hparams.yaml,
MLflow as tags, W&B in its config): enough to tell, months later, which code on which machine made a number.
Nothing from the environment is recorded (it may hold secrets); a machine without git records the commit as null.

`MLflowLogger` and `WandbLogger` are Lightning's, with what a cnnlab run needs of them: one line when the package
or the server is missing, a resumed run continuing its tracker's run (the ids are in the checkpoints), and a
resumed run's changed settings kept (MLflow refuses to change a param). `log_picture` sends a figure or an image to
every logger that shows pictures; `publish_results` adds the final metrics and the run's files at the end.
"""

import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cnnlab import UserError

log = logging.getLogger(__name__)
CHECKOUT = Path(__file__).resolve().parents[2]  # src/cnnlab/tracking.py → the repository of this code
PACKAGES = ("cnnlab", "torch", "lightning", "hydra-core", "omegaconf", "torchvision", "torchmetrics")


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str:
    """The processor's name as the kernel gives it (/proc/cpuinfo), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_metadata() -> dict:
    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    cuda = torch.cuda.is_available()
    return {
        "git_commit": commit,
        "git_dirty": None if changes is None else bool(changes),  # tracked files changed since the commit
        "command": " ".join(["python", *sys.argv]),
        "python": platform.python_version(),
        **{package: version(package) for package in PACKAGES},
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
    }


def log_metadata(loggers: list, run: dict) -> None:
    """TensorBoard: a text card `run/metadata` (a table); CSV: `run` in its hparams.yaml; MLflow: tags `run/…` (they
    may change when the run is resumed, params may not); others (W&B): their config."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            table = "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in run.items())
            logger.experiment.add_text("run/metadata", table, 0)
        elif isinstance(logger, CSVLogger):
            logger.log_hyperparams({"run": run})
        elif isinstance(logger, MLFlowLogger):
            logger.set_tags({f"run/{key}": value for key, value in run.items()})
        else:
            logger.log_hyperparams({f"run/{key}": value for key, value in run.items()})


# ------------------------------------------------------------------------------------------ the trackers


def needs(package: str, logger: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"logger={logger} needs {package}: it comes with cnnlab's track extra, "
                        f"pip install -e '.[track]' (make install does it)")  # fmt: skip


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger for a cnnlab run. The store is named by a URL (conf/logger/mlflow.yaml); checkpoints
    stay in the run dir whatever the store (Lightning's open issue: with a SQLite URL its save_dir is None)."""

    def __init__(self, *, tracking_uri: str, run_id: str | None = None, **kwargs):
        needs("mlflow", "mlflow")
        scheme = tracking_uri.split(":", 1)[0]  # one of those its domain names (conf/logger/mlflow.yaml)
        if "@" in tracking_uri.split("://", 1)[-1].split("/", 1)[0]:  # user:password@host: into every saved config
            raise UserError("logger.mlflow.tracking_uri holds credentials (user:password@host): the config is saved "
                            "with the run and logged; give them as MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD in the environment instead")  # fmt: skip
        if scheme in ("http", "https"):
            answering(tracking_uri)
            kwargs["artifact_location"] = None  # the server's own: it stores what the runs send it
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        if run_id is not None:  # a resumed run: its MLflow run goes on, if this store has it
            from mlflow.exceptions import MlflowException

            try:
                self._mlflow_client.get_run(run_id)
                self._run_id = run_id
                if rank_zero_only.rank == 0:
                    self._mlflow_client.update_run(run_id, status="RUNNING")
            except MlflowException:
                log.warning(f"the resumed run's MLflow run {run_id} is not in {tracking_uri}: a new MLflow run")

    @property
    def experiment(self):
        """Lightning's, with a SQLite store opened under a lock: two jobs of a parallel sweep do not both create it."""
        if self._initialized or not self._tracking_uri.startswith("sqlite:///"):
            return MLFlowLogger.experiment.fget(self)
        with created_once(self._tracking_uri.removeprefix("sqlite:///")):
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
        if changed:
            self.set_tags(changed)

    @rank_zero_only
    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.experiment.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def answering(url: str) -> None:
    """One line, at once, where no server answers at an http(s) store (MLflow's client would retry for minutes), or
    where it asks who is calling and the environment does not say (MLflow's client would raise a traceback)."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:  # MLflow's client sends the same
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as err:  # a server answered
        if err.code in (401, 403):
            given = "were refused" if user and password else "are not in the environment"
            raise UserError(f"logger.mlflow.tracking_uri={url}: the server asks who is calling ({err.code}) and the "
                            f"credentials {given}: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                            f"(never in a config)") from None  # fmt: skip
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"logger.mlflow.tracking_uri={url}: no MLflow server answers there ({reason}); start one "
                        f"(mlflow server --host 127.0.0.1 --port 5000) or leave tracking_uri at its default, a "
                        f"SQLite store under outputs_root") from None  # fmt: skip


def created_once(database: str):
    """An exclusive lock beside a SQLite store while it is opened: the first job creates its tables alone."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def locked():
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    return locked()


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, offline unless told (conf/logger/wandb.yaml), quiet on the console; a resumed run
    continues its W&B run (`id`)."""

    def __init__(self, *, offline: bool, **kwargs):
        needs("wandb", "wandb")
        import wandb

        if not offline and not (os.environ.get("WANDB_API_KEY") or wandb_login_saved()):
            raise UserError("logger.wandb.offline=false needs a W&B login: run 'wandb login' once, or put "
                            "WANDB_API_KEY in the environment (never in a config); or keep the run offline and "
                            "'wandb sync' it later")  # fmt: skip
        kwargs.setdefault("settings", wandb.Settings(quiet=True, console="off"))  # the run's lines stay ours
        super().__init__(offline=offline, **kwargs)


def wandb_login_saved() -> bool:
    netrc = Path("~/.netrc").expanduser()
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


PICTURE_LOGGERS = (TensorBoardLogger, MLFlowLogger, LightningWandbLogger)  # those log_picture shows pictures in
RESUMED_BY = {MLflowLogger: "run_id", LightningWandbLogger: "id"}  # the argument that continues a tracker's run


def tracker_runs(loggers: list) -> dict:
    """The tracker runs of this run, for its checkpoints: {"MLflowLogger": run id, "WandbLogger": id}."""
    runs = {}
    for logger in loggers:
        for kind in RESUMED_BY:
            if isinstance(logger, kind) and logger.version is not None:
                runs[kind.__name__] = logger.version
    return runs


def resume_arguments(target: type, checkpoint: dict | None) -> dict:
    """What continues the tracker run a checkpoint names, for a logger of class `target`."""
    runs = (checkpoint or {}).get("trackers") or {}
    for kind, argument in RESUMED_BY.items():
        if issubclass(target, kind) and runs.get(kind.__name__):
            return {argument: runs[kind.__name__], **({"resume": "allow"} if argument == "id" else {})}
    return {}


# ------------------------------------------------------------------------------------------ pictures and results


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
