"""Every key of every tool's config, tried with wrong values: each gets one clear line, or is valid and builds.

For each leaf of the composed configs (train; its variants with every optimizer option, both callback sets and
every logger, DDP, each for the keys it adds or changes; eval, predict, export, shapes, visualize), six values: a
wrong type, zero, a negative, an absurdly large number, an empty text and a one-element list. Each case ends one
of three ways, and the test says which:
- the typed config refuses it as Hydra does while composing (its message, one line by cnnlab.config.one_line,
  names the key); to keep the test quick each config is composed once and each value set into a copy of it;
- cnnlab.checks.check refuses it with one line that names the key (a declared domain or a relation);
- it is valid: then the run's pieces are built from it (data module, network, module, loggers, callbacks, Trainer,
  optimizer and schedule), as train() builds them before reading data, and nothing raises.
A key of conf/ without a declared domain fails the test. docs/bad-input.md gives the counts, which are checked.
"""

import copy
import functools
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cnnlab import UserError
from cnnlab.checks import check
from cnnlab.config import one_line, parse_overrides
from cnnlab.domains import domain_of, leaves
from tests.conftest import CONF, ROOT

VALUES = ["abc", "0", "-1", "1000000000000", "''", "[0.5]"]  # wrong type, zero, negative, huge, empty, a short list
CONFIGS = {  # a name → (config, overrides): every option of the groups whose keys differ
    "train": ("train", []),
    "train optimizer=sgd_steplr": ("train", ["optimizer=sgd_steplr"]),
    "train optimizer=sgd_cosine": ("train", ["optimizer=sgd_cosine"]),
    "train optimizer=sgd_onecycle": ("train", ["optimizer=sgd_onecycle"]),
    "train callbacks=ema logger=[tensorboard,csv]": ("train", ["callbacks=ema", "logger=[tensorboard,csv]"]),
    "train trainer=ddp": ("train", ["trainer=ddp"]),
    "train logger=[mlflow,wandb]": ("train", ["logger=[mlflow,wandb]"]),
    "train teacher=checkpoints": ("train", ["teacher=checkpoints"]),
    "lr_find": ("lr_find", []),  # train's config and the finder's keys
    "eval": ("eval", []),
    "predict": ("predict", []),
    "export": ("export", []),
    "shapes": ("shapes", []),
    "visualize": ("visualize", []),
}
SKIPPED_PREFIXES = ("hydra",)  # Hydra's own settings
TABLE = ROOT / "docs" / "bad-input.md"


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def base_overrides(name: str, tree_archive: Path, tmp_path: Path) -> list[str]:
    config = CONFIGS[name][0]
    overrides = []
    if config in ("train", "lr_find", "eval", "export", "visualize"):
        overrides += [f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}"]
    if config in ("train", "lr_find", "eval"):
        overrides += [f"output_dir={tmp_path / 'run'}"]
    if "teacher=" in name:  # a file where the teacher's checkpoint would be: it is loaded only when a fit starts
        (tmp_path / "teacher.ckpt").touch()
        overrides += [f"teacher.checkpoints=[{tmp_path / 'teacher.ckpt'}]"]
    return overrides


@functools.cache
def defaults_of(name: str) -> dict:
    """Each key of the composed config → its default, as written (interpolations unresolved)."""
    config, overrides = CONFIGS[name]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name=config, overrides=overrides), resolve=False)
    return {key: value for key, value in leaves(cfg) if not key.startswith(SKIPPED_PREFIXES)}


def keys_of(name: str) -> list[str]:
    return list(defaults_of(name))


def tried_in(name: str) -> list[str]:
    """The keys tried in a config: all of them, except that a variant of train (another optimizer, DDP, …) tries
    only the keys it adds or whose default it changes; the others were tried in train itself, alike."""
    if CONFIGS[name][0] not in ("train", "lr_find") or name == "train":
        return keys_of(name)
    base = defaults_of("train")
    return [key for key, value in defaults_of(name).items() if key not in base or base[key] != value]


def cases() -> list[tuple[str, str, str]]:
    return [(name, key, value) for name in CONFIGS for key in tried_in(name) for value in VALUES]


ALL_CASES = cases()  # composed before any test holds Hydra's global state


def builds(cfg) -> None:
    """What train() builds before it reads any data (the tools: their network, where they have one)."""
    from hydra.utils import instantiate

    from cnnlab.train import build

    if cfg.get("trainer") is not None:
        build(cfg)
    elif cfg.get("model") is not None:
        instantiate(cfg.model)


def test_every_key_of_every_config_has_a_declared_domain():
    missing = sorted({key for name in CONFIGS for key in keys_of(name) if domain_of(key) is None})
    assert not missing, f"keys without a domain (a `# ∈` beside the default in conf/): {missing}"


@functools.cache
def composed(name: str, tree_archive: Path, tmp_path: Path):
    """The config before any case's override: composed once by Hydra (every case then copies it)."""
    config, overrides = CONFIGS[name]
    return compose(config_name=config, overrides=[*overrides, *base_overrides(name, tree_archive, tmp_path)])


def with_override(name: str, key: str, value: str, tree_archive: Path, tmp_path: Path):
    """The config as Hydra composes it with `key=value` last on the command line: Hydra's parse of the value, set
    into a copy of the composed config (its typed nodes refuse a value of the wrong type as Hydra would)."""
    (override,) = parse_overrides([f"{key}={value}"])
    cfg = copy.deepcopy(composed(name, tree_archive, tmp_path))
    try:
        with open_dict(cfg):
            OmegaConf.update(cfg, key, override.value(), merge=False)
    except OmegaConfBaseException as err:  # Hydra's own words for it
        raise ConfigCompositionException(f"Error merging override {key}={value}") from err
    return cfg


def outcome(name: str, key: str, value: str, tree_archive: Path, tmp_path: Path) -> str:
    """'hydra', 'refused' or 'valid'; raises AssertionError where a case breaks what its outcome promises."""
    try:
        cfg = with_override(name, key, value, tree_archive, tmp_path)
    except ConfigCompositionException as err:  # a typed key (data.batch_size=abc): Hydra refuses it
        line = one_line(err)
        assert "\n" not in line and key in line, f"the line does not name the key: {line}"
        return "hydra"
    try:
        check(cfg)
    except UserError as err:
        message = str(err)
        assert "\n" not in message, f"more than one line: {message}"
        assert key in message, f"the key is not named: {message}"
        return "refused"
    domain, plain = domain_of(key), dict(leaves(OmegaConf.to_container(cfg, resolve=True)))
    assert domain is None or key not in plain or domain.accepts(plain[key]), (
        "the check let through what its domain refuses"
    )
    try:
        builds(cfg)  # a value that passed the check must not fail later
    except Exception as err:
        raise AssertionError(f"passed the check, then failed to build: {type(err).__name__}: {err}") from err
    return "valid"


@pytest.mark.slow
def test_every_wrong_value_gets_one_line_or_is_valid_and_builds(hydra_conf, tree_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative logger.*.save_dir=abc builds its logger here, not in the checkout
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a build starts no W&B run (tests/test_trackers.py runs them)
    seen: Counter = Counter()
    valid, broken = [], []
    for name, key, value in ALL_CASES:
        try:
            result = outcome(name, key, value, tree_archive, tmp_path)
        except AssertionError as err:
            broken.append(f"{name}: {key}={value}: {str(err).splitlines()[0]}")
            continue
        seen[result] += 1
        if result == "valid":
            valid.append(f"{name}: {key}={value}")
    assert not broken, f"{len(broken)} cases broke their promise:\n" + "\n".join(broken)
    # What was found valid is printed, so that nothing passes unseen (pytest -rP shows it).
    print(f"{sum(seen.values())} cases: {dict(seen)}\nvalid:\n" + "\n".join(valid))
    keys = len({(name, key) for name, key, _ in ALL_CASES})
    documented = re.search(r"(\d+) keys × (\d+) values = (\d+)\s+cases", TABLE.read_text())
    assert documented, "docs/bad-input.md states how many keys × values the fuzz test tries"
    assert tuple(map(int, documented.groups())) == (keys, len(VALUES), keys * len(VALUES))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool", "args", "key"),
    [("train.py", ["model.stride=0"], "model.stride"),
     ("train.py", ["trainer.max_epochs=-5"], "trainer.max_epochs"),
     ("train.py", ["data.mean=[0.5,0.5]"], "data.mean"),
     ("train.py", ["optimizer=sgd_steplr", "scheduler.step_size=0"], "scheduler.step_size"),
     ("train.py", ["trainer=ddp", "trainer.devices=1000"], "trainer.devices"),
     ("shapes.py", ["model.stride=0"], "model.stride"),
     ("predict.py", ["device=cuda", "ckpt_path=x.ckpt", "inputs=."], "device")],
)  # fmt: skip
def test_a_few_wrong_values_end_to_end(tool, args, key, tree_archive, tmp_path):
    """Through a real process: exit status 1, one `error:` line naming the key, no traceback."""
    if key == "device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    data = [f"data.root={tree_archive}", f"data.cache_dir={tmp_path}"] if tool == "train.py" else []
    done = subprocess.run([sys.executable, str(ROOT / "src" / tool), *args, *data], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]
