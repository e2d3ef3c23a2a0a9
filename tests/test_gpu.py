"""On a CUDA GPU: the design card's command, fast_gpu, both mixed precisions, determinism, export parity against a
CUDA reference and, with two GPUs, a DDP stop and resume. Marked `gpu` and skipped where torch sees no GPU:
`pytest -m gpu` runs them alone (bench/gpu.sh does, before its benchmarks). Each run is a real `src/train.py`
process on the tiny fixture, a few seconds of training."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, with_root_on_path
from tests.test_scale import assert_disjoint_and_complete, read_shards

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ENV = with_root_on_path()


def train_py(tree_archive, tmp_path, *args: str, run: str = "run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "trainer.max_epochs=1", "data.val_size=20",
         "data.batch_size=16", f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}",
         f"hydra.run.dir={tmp_path / run}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip


def metrics_of(tmp_path, run: str = "run") -> dict:
    return json.loads((tmp_path / run / "metrics.json").read_text())


@pytest.mark.parametrize(
    "args",
    [["optimizer=sgd_steplr", "trainer.accelerator=gpu"],  # the design card's command
     ["experiment=fast_gpu", "trainer.max_epochs=1"],
     ["trainer.accelerator=gpu", "trainer.precision=16-mixed"]],
    ids=["design-card", "fast_gpu", "16-mixed"],
)  # fmt: skip
def test_a_gpu_run_finishes(args, tree_archive, tmp_path):
    done = train_py(tree_archive, tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics_of(tmp_path)["epochs"] == 1 and "Traceback" not in done.stderr


def test_bf16_runs_where_the_gpu_has_it_and_names_fp16_where_it_does_not(tree_archive, tmp_path):
    done = train_py(tree_archive, tmp_path, "trainer.accelerator=gpu", "precision=bf16")
    if torch.cuda.is_bf16_supported():
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode == 1 and "use precision=fp16" in done.stderr.strip().splitlines()[-1]


def test_the_same_seed_twice_gives_the_same_metrics_on_the_gpu(tree_archive, tmp_path):
    settings = ["trainer.accelerator=gpu", "trainer.deterministic=true", "trainer.max_epochs=2", "data.augment=true"]
    for run in ("first", "second"):
        done = train_py(tree_archive, tmp_path, *settings, run=run)
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = metrics_of(tmp_path, "first"), metrics_of(tmp_path, "second")
    for key in ("test/acc", "test/loss", "val/acc_best", "global_step", "confusion_matrix"):
        assert first[key] == second[key], key


def test_export_matches_the_checkpoint_run_on_the_gpu(tree_archive, tmp_path):
    from cnnlab.export import export
    from cnnlab.export import parity as parity_of
    from cnnlab.trained import load_model

    done = train_py(tree_archive, tmp_path, "trainer.accelerator=gpu")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = metrics_of(tmp_path)["best_checkpoint"]
    cuda = load_model(checkpoint, device="cuda")
    images = np.random.default_rng(0).integers(0, 256, (64, *cuda.description["input_shape"]), dtype=np.uint8)
    for fmt in ("pt2", "onnx"):
        exported = load_model(str(export(checkpoint, fmt, str(tmp_path / f"model.{fmt}"))))
        parity = parity_of(cuda, exported, images, (1, 64))
        assert parity.ok, str(parity)  # the CPU file against the CUDA reference: same top-1, logits within 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ddp_on_two_gpus_stopped_and_resumed_keeps_its_shards(tree_archive, tmp_path):
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=gpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "data.batch_size=8",
        "+callbacks.draw._target_=tests.callbacks.DrawOnFirstProcess",
        "+callbacks.record._target_=tests.callbacks.RecordShard",
        f"+callbacks.record.folder={tmp_path / 'shards'}",
    ]
    stop = ["+callbacks.stop._target_=tests.callbacks.SignalAt", "+callbacks.stop.step=2",
            "+callbacks.stop.signal=SIGTERM", "+callbacks.stop.rank=1"]  # fmt: skip
    stopped = train_py(tree_archive, tmp_path, *ddp, *stop)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train_py(tree_archive, tmp_path, *ddp, *stop, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (metrics_of(tmp_path)["epochs"], metrics_of(tmp_path)["global_step"]) == (2, 8)
    assert_disjoint_and_complete(read_shards(tmp_path / "shards"), epochs=2)


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_on_this_one(tree_archive, tmp_path):
    """An earlier checkpoint format kept the random state of every GPU of the machine (8 here); restoring all of
    them on a machine with fewer failed with 'invalid device ordinal'. Each process now restores its own."""
    done = train_py(tree_archive, tmp_path, "trainer.accelerator=gpu")
    assert done.returncode == 0, done.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    (state,) = checkpoint["callbacks"]["RngState"]["processes"]
    checkpoint["callbacks"]["RngState"] = {**state, "cuda": [state["cuda"]] * 8}  # the older, one-process format
    torch.save(checkpoint, tmp_path / "eight-gpus.ckpt")
    resumed = train_py(tree_archive, tmp_path, "trainer.accelerator=gpu", "trainer.max_epochs=2",
                       f"ckpt_path={tmp_path / 'eight-gpus.ckpt'}", run="resumed")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics_of(tmp_path, "resumed")["epochs"] == 2
