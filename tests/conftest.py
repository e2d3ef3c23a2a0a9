"""Fixtures made on the fly: tiny CIFAR-10-shaped data sets in every format the DataModule reads."""

import contextlib
import io
import logging
import os
import pickle
import runpy
import socket
import subprocess
import sys
import tarfile
import traceback
import zipfile
from dataclasses import dataclass
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


# Whether this session runs a whole tier (no file, -k or other selection than the tier's marker): only then can
# tests/test_tiers.py say which modules of src/ the tier executes.
WHOLE_TIER = pytest.StashKey[bool]()
TIER_CHECK = "test_tiers.py::test_the_fast_tier_executes_every_module_under_src"


def pytest_collection_modifyitems(config, items):
    """The tier check runs last, when every other test has run; and it learns whether the whole tier runs."""
    options = config.option
    config.stash[WHOLE_TIER] = (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not options.keyword
        and not options.deselect
        and not options.ignore
        and not options.ignore_glob
        and not getattr(options, "stepwise", False)
        and not getattr(options, "lf", False)  # --last-failed (the cache plugin may be off)
        and options.markexpr in ("", "not slow")
    )
    items.sort(key=lambda item: item.nodeid.endswith(TIER_CHECK))  # stable: the others keep their order


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
def tiny_trained(tree_archive, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """One run of the tiny defaults (Adam, 2 epochs), trained once for every test that only reads what it left: its
    metrics, its run folder and its overrides."""
    from cnnlab.train import train

    folder = tmp_path_factory.mktemp("tiny-trained")
    overrides = tiny_run(tree_archive, folder)
    return train(compose_config("train", overrides)), folder / "run", overrides


@pytest.fixture(scope="session")
def tiny_sweep_run(tree_archive, tmp_path_factory) -> tuple[Path, "Ran"]:
    """A finished multirun, as `train.py -m` leaves it: 2 optimizers × 2 seeds, 2 epochs each; its folder and what
    the command printed. Run once for every test that reads a sweep, in this process (Hydra's basic launcher runs
    a sweep's jobs one after the other in its own process too)."""
    root = tmp_path_factory.mktemp("sweep")
    done = run_in_process(
        "train.py", "-m", "optimizer=adam,sgd_steplr", "seed=0,1", "trainer=cpu", "trainer.max_epochs=2",
        "data.val_size=20", "data.batch_size=16", f"data.root={tree_archive}", f"data.cache_dir={root / 'cache'}",
        f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep", done


@pytest.fixture(scope="session")
def tiny_sweep(tiny_sweep_run) -> Path:
    return tiny_sweep_run[0]


SCRIPTS_RUN: set[str] = set()  # the src/*.py that run_in_process ran in this session (tests/test_tiers.py)


@dataclass
class Ran:
    """What a command left: its exit status and what it printed (a CompletedProcess's three fields)."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(script: str, *args: str, cwd: Path | None = None) -> Ran:
    """`python src/<script> args` run in this process, as `python` runs it: `__main__`, its argv, its exit status
    (`sys.exit("error: …")` prints the text and is 1; an exception prints its traceback and is 1), what it printed
    through sys.stdout and sys.stderr. Seconds cheaper than a new process (the imports are done). What only a
    process shows is left to the tests that start one (@BOTH_WAYS, or marked slow): signals, several processes, the
    real command line's first imports, and warnings and libraries' own lines on stderr (pytest records warnings
    here). Whatever a run sets for the process is put back: the working folder, the environment, every logger's
    handlers, level and propagation, the console filter's setting, Hydra's global state."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.quiet import ConsoleNoise

    path = str(ROOT / "src" / script)
    SCRIPTS_RUN.add(path)
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]  # fmt: skip
    saved_loggers = [(log, log.handlers[:], log.level, log.propagate, log.disabled) for log in loggers]
    saved_raise, saved_quiet = logging.raiseExceptions, ConsoleNoise.quiet
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [path, *args]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(path, run_name="__main__")
                status = 0
            except SystemExit as exit:
                if exit.code is None or isinstance(exit.code, int):
                    status = (exit.code or 0) % 256  # as the shell sees it
                else:  # Python prints any other exit value and exits 1
                    print(exit.code, file=sys.stderr)
                    status = 1
            except Exception:  # Python prints the traceback and exits 1
                traceback.print_exc()
                status = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for logger, handlers, level, propagate, disabled in saved_loggers:
            for handler in set(logger.handlers) - set(handlers):
                handler.close()
            logger.handlers[:], logger.level, logger.propagate, logger.disabled = handlers, level, propagate, disabled
        logging.raiseExceptions, ConsoleNoise.quiet = saved_raise, saved_quiet
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return Ran(status, stdout.getvalue(), stderr.getvalue())


def run_as_process(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python src/<script> args` as a user runs it: a process of its own, the checkout first on its PYTHONPATH."""
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=with_root_on_path())  # fmt: skip


# A command's test run both ways: in this process (the fast tier) and as a process of its own (the full tier), the
# same assertions on what it printed and wrote. The test takes `run_script` and calls it as run_in_process.
BOTH_WAYS = pytest.mark.parametrize(
    "run_script", [run_in_process, pytest.param(run_as_process, marks=pytest.mark.slow)], ids=["in", "process"]
)
