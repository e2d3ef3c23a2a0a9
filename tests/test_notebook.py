"""The lecture's notebook cannot rot: it runs, top to bottom, on the tiny data set with short settings set after its
parameters cell; and the outputs saved with it come from its cells as they are (notebooks/run.py executed it and
stamped each code cell with the hash of its source), which the check shows it notices when they do not."""

import ast
import copy
import importlib.util
import json
import subprocess
import sys

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell

from cnnlab.compare import SLIDES
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("notebook_run", ROOT / "notebooks" / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)


@pytest.fixture
def committed():
    return nbformat.read(run.NOTEBOOK, as_version=4)


def parameter_names(cell) -> set[str]:
    return {
        target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for target in node.targets
    }


@pytest.mark.slow
def test_the_notebook_runs_on_the_tiny_data_set(committed, tree_archive, tmp_path):
    tiny = {
        "DATA_ROOT": str(tree_archive),
        "EPOCHS": 1,
        "LIMIT_BATCHES": 2,
        "OUTPUTS_ROOT": str(tmp_path / "outputs"),
        "TRAINER": "cpu",
        "EXTRA": [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_size=20",
            "data.batch_size=16",
            "data.eval_batch_size=16",
            "trainer.log_every_n_steps=1",
        ],
    }
    (at,) = [i for i, cell in enumerate(committed.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert set(tiny) <= parameter_names(committed.cells[at])  # each name set here is one the notebook reads
    injected = new_code_cell("\n".join(f"{name} = {value!r}" for name, value in tiny.items()))
    injected.metadata["tags"] = ["injected-parameters"]  # as papermill marks it
    notebook = copy.deepcopy(committed)
    notebook.cells.insert(at + 1, injected)

    run.execute(notebook, timeout=300)  # raises at the first cell that fails, with its traceback

    run.stamp(notebook, wall_s=0)
    assert run.stale(notebook) == []  # every cell ran, in order, and showed something, no error
    runs = {}
    for metrics in (tmp_path / "outputs" / "runs").glob("*/metrics.json"):
        overrides = yaml.safe_load((metrics.parent / ".hydra" / "overrides.yaml").read_text())
        runs[next(o for o in overrides if o.startswith("optimizer="))] = json.loads(metrics.read_text())
    assert sorted(runs) == ["optimizer=adam", "optimizer=sgd_steplr"]  # both options, trained and tested
    assert all(0 <= metrics["test/acc"] <= 1 and metrics["epochs"] == 1 for metrics in runs.values())
    cells = {cell.id: cell for cell in notebook.cells}
    for figure in ("conv-by-hand", "conv2d", "permute", "curves", "filters", "activations", "predict"):
        assert any("image/png" in output.get("data", {}) for output in cells[figure].outputs), figure
    results = "".join(output["data"].get("text/markdown", "") for output in cells["results"].outputs)
    for name, accuracy in SLIDES.values():  # each option's result, with the slides' figure beside it
        assert name in results and f"{100 * accuracy:.2f} %" in results
    shapes = "".join(output["data"].get("text/markdown", "") for output in cells["shape-table"].outputs)
    assert "`Linear(2304, 10)`" in shapes  # CIFAR-10's network, whatever images the tiny set has
    assert len(list((tmp_path / "outputs" / "notebook-images").glob("*.png"))) == 4


@pytest.mark.slow
def test_the_saved_outputs_come_from_the_current_cells():
    done = subprocess.run([sys.executable, str(run.NOTEBOOK.parent / "run.py"), "--check"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_check_notices_an_edited_cell_a_cell_not_run_and_a_run_out_of_order(committed):
    # The committed notebook as a run leaves it (stamped, numbered, each cell with an output), whatever its state
    # now: then each change below is the one thing the check has to find.
    ran = copy.deepcopy(committed)
    run.stamp(ran, wall_s=0)
    for number, cell in enumerate(run.code_cells(ran), 1):
        cell.execution_count = number
        cell.outputs = cell.outputs or [nbformat.v4.new_output("stream", text="…")]
    assert run.stale(ran) == []

    edited = copy.deepcopy(ran)
    cell = run.code_cells(edited)[3]
    cell.source += "\n# changed after the run"
    assert run.stale(edited) == [f"code cell 4 ({first_line(cell)}): edited since its outputs were made"]

    cleared = copy.deepcopy(ran)
    cell = run.code_cells(cleared)[5]
    cell.outputs, cell.execution_count = [], None
    assert run.stale(cleared) == [f"code cell 6 ({first_line(cell)}): execution_count None, not 6: not run top to "
                                  f"bottom", f"code cell 6 ({first_line(cell)}): no outputs"]  # fmt: skip

    swapped = copy.deepcopy(ran)
    a, b = run.code_cells(swapped)[1:3]
    a.execution_count, b.execution_count = b.execution_count, a.execution_count
    assert run.stale(swapped) == [
        f"code cell 2 ({first_line(a)}): execution_count 3, not 2: not run top to bottom",
        f"code cell 3 ({first_line(b)}): execution_count 2, not 3: not run top to bottom",
    ]


def first_line(cell) -> str:
    return cell.source.strip().splitlines()[0][:60]
