"""MLflow and W&B: a run's params, metrics and pictures read back with each tracker's own client or record format,
equal to metrics.json; a resumed run continues the same tracker run; a real `mlflow server` on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab.train import hyperparameters, train
from tests.conftest import compose_config, free_port

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def results_of(metrics: dict) -> dict:
    """The numbers of metrics.json that a tracker keeps as its run's final metrics."""
    return {key: value for key, value in metrics.items() if key.startswith(("test/", "val/")) and value is not None}


def resumed(overrides: list[str], metrics: dict) -> list[str]:
    return [*overrides, f"ckpt_path={Path(metrics['run_dir']) / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3"]


@pytest.mark.slow
def test_mlflow_run_reads_back_equal_to_metrics_json_and_resumes_the_same_run(tiny_overrides, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*tiny_overrides, "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={store}",
                 f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}"]  # fmt: skip
    cfg = compose_config("train", overrides)
    first = train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())

    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "cnnlab"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"  # the run dir's name
    assert {key: run.data.metrics[key] for key in results_of(written)} == pytest.approx(results_of(written))
    assert run.data.params == {key: str(value) for key, value in hyperparameters(cfg).items()}
    assert run.data.tags["run/torch"] == written["metadata"]["torch"]  # the run metadata, as tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [3, 7]  # each validation
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "test", "view"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test")} >= {"test/confusion_matrix.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "view")} >= {"view/conv1_filters.png"}
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "back")))
    assert "lr: 0.001" in config.read_text()  # the composed config

    again = train(compose_config("train", resumed(overrides, first)))  # one epoch more, from last.ckpt
    (run,) = client.search_runs([experiment.experiment_id])  # still one run: the same one, continued
    assert run.info.status == "FINISHED" and again["epochs"] == 3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [3, 7, 11]
    assert run.data.metrics["test/acc"] == pytest.approx(again["test/acc"])
    assert run.data.params["epochs"] == "2" and run.data.tags["resumed/epochs"] == "3"  # MLflow keeps a param's first


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, with its own store and artifacts, for the length of a test."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its workers: one group
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                import urllib.request

                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.25)
        yield url
    finally:  # the server and the job workers it starts (huey consumers), which outlive it otherwise
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_run_logs_to_a_real_mlflow_server(mlflow_server, tiny_overrides, tmp_path):
    metrics = train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1", "logger=mlflow",
                                             f"logger.mlflow.tracking_uri={mlflow_server}"]))  # fmt: skip
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert {key: run.data.metrics[key] for key in results_of(metrics)} == pytest.approx(results_of(metrics))
    assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the artifacts went to the server (its --artifacts-destination), not beside the client's run
    assert list((tmp_path / "server-artifacts").rglob("metrics.json"))


def wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb): a 7-byte header, then LevelDB-log chunks (32 KiB blocks, a
    7-byte header per chunk: crc, length, type full/first/middle/last), each record a protobuf of W&B's own."""
    from wandb.proto import wandb_internal_pb2

    data, position, parts = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail, too short for a chunk header: padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:  # zero padding to the block's end
            position += left - 7 - length
            continue
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(offline_dir: Path) -> dict:
    """A W&B offline run as its file holds it: id, config, history rows, and the summary's last values. W&B's
    service writes the file after the run's finish() returns: this waits for its last record (`exit`)."""
    run = {"config": {}, "history": [], "summary": {}}
    (file,) = offline_dir.glob("run-*.wandb")
    for _ in range(240):
        records = list(wandb_records(file))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.25)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
        items = {"config": "update", "history": "item", "summary": "update"}.get(kind)
        if items:
            entries = getattr(getattr(record, kind), items)
            values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in entries}
            if kind == "history":
                run["history"].append(values)
            else:
                run[kind].update(values)
    return run


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_its_id(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    overrides = [*tiny_overrides, "logger=wandb"]
    cfg = compose_config("train", overrides)
    first = train(cfg)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    run = wandb_run(offline)
    assert {key: run["summary"][key] for key in results_of(first)} == pytest.approx(results_of(first))
    validations = [row for row in run["history"] if "val/acc" in row]
    assert len(validations) == 2 and validations[-1]["val/acc_best"] == pytest.approx(first["val/acc_best"])
    assert (
        run["config"]["lr"] == hyperparameters(cfg)["lr"] and run["config"]["run/torch"] == first["metadata"]["torch"]
    )
    assert list((offline / "files" / "media" / "images" / "view").glob("conv1_filters_*.png"))  # the inside view
    assert json.loads((offline / "files" / "metrics.json").read_text())["test/acc"] == first["test/acc"]
    assert "lr: 0.001" in (offline / "files" / "run_config.yaml").read_text()  # the composed config

    train(compose_config("train", resumed(overrides, first)))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and wandb_run(runs[1])["id"] == run["id"]  # `wandb sync` puts both into the one run


@pytest.mark.slow
def test_a_run_that_fails_ends_its_tracker_runs(tiny_overrides, tmp_path, monkeypatch):
    """MLflow says FAILED and the W&B run is finished: neither stays open for the next run of the process."""
    import wandb

    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*tiny_overrides, "logger=[mlflow,wandb]", f"logger.mlflow.tracking_uri={store}",
                 "+callbacks.crash._target_=tests.callbacks.CrashAt", "+callbacks.crash.step=2"]  # fmt: skip
    with pytest.raises(RuntimeError, match="crash before step 2"):
        train(compose_config("train", overrides))
    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FAILED"
    assert wandb.run is None
