"""cnnlab from Python (cnnlab.api): compose with the command line's overrides, train twice in one process, predict,
the shape table; and an import that stays cheap."""

import json
import logging
import subprocess
import sys

import pytest
from hydra.core.hydra_config import HydraConfig

from cnnlab.api import compose, predict, shape_table, train
from tests.conftest import CLASSES, ROOT


@pytest.fixture(autouse=True)
def no_run_config_left_behind():
    """compose() sets Hydra's config of the run for the process, as a run does (a notebook's next cell reads it);
    the other tests call train() on configs composed without it, as runs of their own."""
    yield
    HydraConfig.instance().cfg = None


def test_importing_the_api_imports_neither_torch_nor_lightning():
    done = subprocess.run([sys.executable, "-c", "import sys, cnnlab.api; print(sorted({'torch', 'lightning'} & "
                           "set(sys.modules)))"], capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_compose_takes_the_command_lines_overrides_and_claims_a_run_dir(tmp_path):
    cfg = compose(["optimizer=sgd_steplr", "trainer.max_epochs=3", f"outputs_root={tmp_path}"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.scheduler.step_size == 10
    assert cfg.trainer.max_epochs == 3 and "hydra" not in cfg
    run_dir = cfg.output_dir  # as the command line names it: outputs/runs/<time>_<overrides>
    assert run_dir.startswith(str(tmp_path / "runs")) and run_dir.endswith("optimizer=sgd_steplr,trainer.max_epochs=3")


def test_train_twice_in_one_process_then_predict(tree_archive, tmp_path, monkeypatch):
    # As `import lightning` leaves its loggers where logging was not set up yet (a notebook's first cell): a
    # handler of its own on `lightning` (which would print each record a second time, unfiltered) and on
    # `lightning.pytorch`, which does not propagate
    import cnnlab.train  # noqa: F401  (imported already, as after a notebook's first run: its own tidy-up done)

    own = logging.Handler()
    own.emit = lambda record: printed_twice.append(record.getMessage())
    printed_twice = []
    monkeypatch.setattr(logging.getLogger("lightning"), "handlers", [own])
    lightning = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(lightning, "handlers", [logging.StreamHandler()])
    monkeypatch.setattr(lightning, "propagate", False)
    overrides = [f"data.root={tree_archive}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=20",
                 "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=1", f"outputs_root={tmp_path}"]  # fmt: skip
    first, second = train(compose(overrides)), train(compose(overrides))  # a notebook cell run again
    assert first["run_dir"] != second["run_dir"]
    assert first["test/acc"] == second["test/acc"] and first["confusion_matrix"] == second["confusion_matrix"]
    for metrics in (first, second):  # what the command line leaves: .hydra/, the log, metrics.json
        run = tmp_path / "runs" / metrics["run_dir"].rsplit("/", 1)[-1]
        assert json.loads((run / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
        assert (run / ".hydra" / "config.yaml").is_file()
        assert "`Trainer.fit` stopped" in (run / "train.log").read_text()  # Lightning's records reach the run's log
    assert printed_twice == []  # and only the run's handlers print them

    found = predict(second["run_dir"], str(ROOT / "docs" / "inside-filters.png"), top_k=3)  # a run dir: its best
    (only,) = found
    probabilities = [entry["probability"] for entry in only["top"]]
    assert [entry["class"] in CLASSES for entry in only["top"]] == [True] * 3
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_the_shape_table_of_another_data_set():
    rows = {row["name"]: row for row in shape_table(["data=mnist"])}
    assert rows["conv1"]["shape_in"] == (1, 28, 28) and rows["fc1"]["layer"] == "Linear(1600, 10)"
