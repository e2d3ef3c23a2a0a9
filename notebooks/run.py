"""Run notebooks/cnn_modules.ipynb for real and keep its outputs: every cell, top to bottom, in a fresh kernel, with
the parameters cell's defaults (CIFAR-10, a few minutes on a CPU); then each code cell is stamped with the sha256 of
its source, so that the committed outputs are shown to come from the cells as they are (tests/test_notebook.py).

    python notebooks/run.py            # execute in place (the notebook is rewritten only when every cell ran)
    python notebooks/run.py --check    # only check: are the committed outputs the current cells'? (exit 1 if not)
"""

import argparse
import hashlib
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().with_name("cnn_modules.ipynb")
KEY = "cnnlab"  # cell.metadata.cnnlab.source_sha256; notebook.metadata.cnnlab: when, where and how long it ran
BATCH = "CNNLAB_NOTEBOOK_BATCH"  # set for the kernel: a batch run starts no TensorBoard server


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def is_parameters(cell) -> bool:
    """The parameters cell, or one set after it (papermill's tags): assignments, nothing shown."""
    return bool({"parameters", "injected-parameters"} & set(cell.metadata.get("tags", [])))


def execute(notebook, timeout: int | None = None):
    """Every cell of `notebook`, in order, in a fresh python3 kernel of this interpreter, started in notebooks/;
    raises nbclient's CellExecutionError at the first cell that fails."""
    from nbclient import NotebookClient

    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # fmt: skip
    client.execute(env={**os.environ, BATCH: "1"})  # the kernel's environment
    return notebook


def stamp(notebook, wall_s: float) -> None:
    """Each code cell: the hash of the source that made its outputs; the notebook: the run that made them."""
    for cell in code_cells(notebook):
        cell.metadata[KEY] = {"source_sha256": source_hash(cell.source)}
    cpu = next((line.split(":", 1)[1].strip() for line in cpu_info() if line.startswith("model name")), "")
    notebook.metadata[KEY] = {
        "executed": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(wall_s),
        "machine": f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS", "torch's default"),
        "python": platform.python_version(),
    }


def cpu_info() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def stale(notebook) -> list[str]:
    """Why the saved outputs are not a top-to-bottom run of the current cells (empty: they are): a cell edited
    since (its source differs from the stamped one), run out of order or not at all, without outputs, or failed."""
    problems = []
    cells = code_cells(notebook)
    for number, cell in enumerate(cells, 1):
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else "(empty)"
        where = f"code cell {number} ({first[:60]})"
        if cell.execution_count != number:
            problems.append(f"{where}: execution_count {cell.execution_count}, not {number}: not run top to bottom")
        if cell.metadata.get(KEY, {}).get("source_sha256") != source_hash(cell.source):
            problems.append(f"{where}: edited since its outputs were made")
        if not cell.outputs and not is_parameters(cell):
            problems.append(f"{where}: no outputs")
        if any(output.output_type == "error" for output in cell.outputs):
            problems.append(f"{where}: its output is an error")
    if not cells:
        problems.append("no code cells")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the saved outputs against the cells")
    parser.add_argument("--timeout", type=int, default=None, help="seconds a cell may run (default: no limit)")
    args = parser.parse_args()
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if not args.check:
        start = time.perf_counter()
        execute(notebook, args.timeout)
        stamp(notebook, time.perf_counter() - start)
        nbformat.write(notebook, NOTEBOOK)
        print(f"{NOTEBOOK.name}: executed in {notebook.metadata[KEY]['wall_s']} s and saved")
    problems = stale(notebook)
    for problem in problems:
        print(f"{NOTEBOOK.name}: {problem}", file=sys.stderr)
    if problems:
        print("run it again: python notebooks/run.py", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
