"""Fixtures made on the fly: tiny CIFAR-10-shaped data sets in every format the DataModule reads."""

import os
import pickle
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import cnnlab.config  # noqa: F401  (the resolvers, as the entry points register them)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The first test image (class 0, first file) gets one pure red pixel at row 2, column 5; the rest is noise
# with no pure red.
MARK_ROW, MARK_COL = 2, 5


def write_image_tree(folder: Path, per_class: dict[str, int], suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # Class-dependent brightness, so that a few epochs learn something.
                pixels = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8) + np.uint8(15 * label)
                if split == "test" and label == 0 and i == 0:
                    pixels[MARK_ROW, MARK_COL] = (255, 0, 0)
                Image.fromarray(pixels).save(folder / split / name / f"{i:04d}{suffix}")
    return folder


def pack(folder: Path, archive: Path) -> Path:
    """Pack `folder` as the CIFAR-10 image dumps are shipped: one top folder inside the archive."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(folder.rglob("*")):
                zf.write(path, f"{folder.name}/{path.relative_to(folder)}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
    return archive


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """A PNG image tree: 10 classes, 8 train and 2 test images each."""
    return write_image_tree(tmp_path_factory.mktemp("tree") / "cifar10-png", {"train": 8, "test": 2})


@pytest.fixture(scope="session")
def tree_archive(image_tree, tmp_path_factory) -> Path:
    return pack(image_tree, tmp_path_factory.mktemp("archive") / "cifar10-png.tar.gz")


@pytest.fixture
def torchvision_cifar(tmp_path, monkeypatch) -> Path:
    """torchvision's official CIFAR-10 layout (pickled batches) with 5+1 tiny batches of random images."""
    import torchvision.datasets.cifar

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)  # rows are C×H×W, flattened
        with open(batches / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 9]}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    # Our files cannot match torchvision's md5 sums of the real batches; everything else is torchvision's.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path


def with_root_on_path() -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH (a `src/train.py` started by a test imports
    tests.callbacks), and whatever was on it kept (bench/gpu.sh's installed wheels, make test-floors' versions)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on, for a server a test starts (TensorBoard, MLflow)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_run(tree_archive: Path, folder: Path) -> list[str]:
    """Overrides for a seconds-long CPU run on the tiny archive, writing into `folder`."""
    return [
        f"data.root={tree_archive}",
        f"data.cache_dir={folder / 'cache'}",
        "data.val_size=20",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        f"output_dir={folder / 'run'}",
    ]


@pytest.fixture
def tiny_overrides(tree_archive, tmp_path) -> list[str]:
    """Overrides for a seconds-long CPU run on the tiny archive, writing into tmp_path."""
    return tiny_run(tree_archive, tmp_path)


@pytest.fixture(scope="session")
def tiny_sweep_run(tree_archive, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished multirun, as `train.py -m` leaves it: 2 optimizers × 2 seeds, 2 epochs each; its folder and its
    finished process (what it printed). One process for every test that reads a sweep (a start-up costs seconds)."""
    root = tmp_path_factory.mktemp("sweep")
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "-m", "optimizer=adam,sgd_steplr", "seed=0,1",
         "trainer=cpu", "trainer.max_epochs=2", "data.val_size=20", "data.batch_size=16",
         f"data.root={tree_archive}", f"data.cache_dir={root / 'cache'}", f"hydra.sweep.dir={root / 'sweep'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep", done


@pytest.fixture(scope="session")
def tiny_sweep(tiny_sweep_run) -> Path:
    return tiny_sweep_run[0]
