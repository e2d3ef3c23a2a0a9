"""A real `tensorboard` process over a tiny finished sweep, read back through its HTTP API."""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port


@pytest.fixture
def tensorboard(tiny_sweep):
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(tiny_sweep), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers and has loaded all four runs
            try:
                if len(get(base, "/data/runs")) == 4:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not serve the sweep within 60 s"
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def get(base: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_scalars_and_hparams_over_http(tensorboard, tiny_sweep):
    tags = get(tensorboard, "/data/plugin/scalars/tags")
    run = next(name for name in tags if name.startswith("0_"))
    assert {"val/acc", "train/loss_epoch", "lr-Adam", "test/acc"} <= set(tags[run])
    assert "epoch" not in tags[run]  # Lightning's bookkeeping scalar would be TensorBoard's first chart
    # `make tensorboard`'s first look: its tag filter shows the learning rate, the training loss and val/acc.
    url = re.search(r"^FIRST_LOOK := (\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    (tag_filter,) = urllib.parse.parse_qs(urllib.parse.urlparse(url.replace("\\#", "#")).query)["tagFilter"]
    shown = {tag for tag in tags[run] if re.search(tag_filter, tag)}
    first_look = {"lr-Adam", "train/loss_epoch", "train/loss_step", "val/acc"}  # loss_step: every 50 steps
    assert shown == first_look & set(tags[run]) and {"lr-Adam", "train/loss_epoch", "val/acc"} <= shown

    query = urllib.parse.urlencode({"run": run, "tag": "val/acc"})
    values = [value for _, _, value in get(tensorboard, f"/data/plugin/scalars/scalars?{query}")]
    assert len(values) == 2  # one per epoch

    experiment = get(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {"test/acc", "val/acc_best"}
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"optimizer", "lr", "scheduler", "batch_size", "precision", "augment", "epochs", "seed"} <= names
    assert sorted(names)[:5] == ["augment", "batch_size", "epochs", "lr", "optimizer"]  # what TensorBoard shows first
    assert not [name for name in names if "_target_" in name or "root" in name or "dir" in name]  # no paths

    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"group": "", "tag": "test/acc"}}, {"hparam": "optimizer"}],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = get(tensorboard, "/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert len(groups) == 4
    for group in groups:  # the real final test accuracy of each job, not a placeholder
        job = tiny_sweep / group["name"].split("/")[0]
        expected = json.loads((job / "metrics.json").read_text())["test/acc"]
        (logged,) = [m["value"] for m in group["metricValues"] if m["name"]["tag"] == "test/acc"]
        assert logged == pytest.approx(expected)
        assert group["hparams"]["optimizer"] in {"Adam", "SGD"}
