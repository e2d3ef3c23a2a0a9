"""Run metadata: which code, command, versions and machine made a run, in metrics.json and in the loggers."""

import json
import os
import subprocess
from importlib import metadata

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cnnlab.provenance
from cnnlab.provenance import run_metadata
from cnnlab.train import train
from tests.conftest import ROOT, compose_config


def test_a_run_records_its_code_versions_and_machine(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_TEST_SECRET", "hunter2")  # the environment is never recorded
    metrics = train(compose_config("train", [*tiny_overrides, "trainer.max_epochs=1", "logger=[tensorboard,csv]"]))
    run = metrics["metadata"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert run["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert run["git_dirty"] in (True, False) if head.returncode == 0 else run["git_dirty"] is None
    assert run["torch"] == metadata.version("torch") and run["lightning"] == metadata.version("lightning")
    assert run["hydra-core"] == metadata.version("hydra-core") and run["cnnlab"] == metadata.version("cnnlab")
    assert run["cpu_cores"] == os.cpu_count() and run["cpu"] and run["python"].count(".") == 2
    assert run["gpu"] is None and run["cuda"] is None and run["gpus"] == 0  # a CPU run
    assert "hunter2" not in json.dumps(run)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metadata"] == run

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (card,) = events.Tensors("run/metadata/text_summary")  # TensorBoard's TEXT tab
    assert str(run["torch"]) in card.tensor_proto.string_val[0].decode()
    (hparams,) = (tmp_path / "run").glob("csv/**/hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["run"]["torch"] == run["torch"]


def test_no_git_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cnnlab.provenance, "CHECKOUT", tmp_path)  # code outside a git checkout
    assert run_metadata()["git_commit"] is None and run_metadata()["git_dirty"] is None
    monkeypatch.setattr(cnnlab.provenance, "CHECKOUT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without git at all
    run = run_metadata()
    assert run["git_commit"] is None and run["git_dirty"] is None and run["torch"] == metadata.version("torch")
