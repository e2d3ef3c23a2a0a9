"""The fast tier (every test not marked slow) executes every module under src/. Under coverage (`make test-full`
and CI run the fast tier with pytest --cov first) a line inside a function of each module must have run, not only
its imports: this test, run last, reads what coverage has recorded so far. Without coverage (`make test`, where
the tracer would cost 1.8× the tier's time on Python 3.11) the check is weaker: each src/*.py was run, each
module imported. It says nothing when only a part of a tier runs (a file, `-k`, `--ignore`)."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCRIPTS_RUN, WHOLE_TIER

SRC = ROOT / "src"


def called_lines(path: Path) -> set[int]:
    """The lines of a module that run only when something in it is called: the statements inside its functions."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        statement.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, functions)
        for body_statement in node.body
        for statement in ast.walk(body_statement)
        if isinstance(statement, ast.stmt)
    }


def not_executed(executed_lines_of) -> list[str]:
    """The modules under src/ with no line of a function run (or, for one without functions, no line at all)."""
    missed = []
    for path in sorted(SRC.rglob("*.py")):
        if not ast.parse(path.read_text()).body:
            continue  # an empty __init__.py: nothing to execute
        executed, called = set(executed_lines_of(path)), called_lines(path)
        if not (executed & called if called else executed):
            missed.append(str(path.relative_to(ROOT)))
    return missed


def not_loaded(loaded: set[Path]) -> list[str]:
    """The modules under src/ neither imported nor run as a script (`loaded`: their resolved paths)."""
    return [str(path.relative_to(ROOT)) for path in sorted(SRC.rglob("*.py")) if path.resolve() not in loaded]


def test_the_check_without_coverage_names_a_module_never_imported():
    everything = {path.resolve() for path in SRC.rglob("*.py")}
    assert not_loaded(everything) == []
    assert not_loaded(everything - {(SRC / "lr_find.py").resolve()}) == ["src/lr_find.py"]


def test_the_check_tells_a_module_imported_from_one_whose_code_ran():
    module = SRC / "cnnlab" / "data" / "pixels.py"
    top_level = {node.lineno for node in ast.parse(module.read_text()).body}  # what importing it runs
    inside = called_lines(module)
    assert inside and not inside & top_level

    def run(lines_of_module: set[int]):
        """Executed lines as coverage would give them: `lines_of_module` in the module, the others all called."""
        return lambda path: lines_of_module if path == module else called_lines(path) or {1}

    assert not_executed(run(top_level)) == ["src/cnnlab/data/pixels.py"]
    assert not_executed(run(top_level | {min(inside)})) == []


# A module that runs only with an optional extra (make install installs them all; CI too): left out without it.
NEEDS = {"src/hydra_plugins/cnnlab_optuna/optuna_sweeper.py": "optuna"}


def test_the_fast_tier_executes_every_module_under_src(request):
    if not request.config.stash.get(WHOLE_TIER, False):
        pytest.skip("a part of a tier ran: which modules a tier executes shows only when all of it runs")
    try:
        import coverage

        measured = coverage.Coverage.current()
    except ImportError:
        measured = None
    if measured is not None:  # make test-full (and CI): a line inside a function of each module ran
        data = measured.get_data()
        missed = not_executed(lambda path: data.lines(str(path)) or ())
    else:  # make test: no tracer (it would cost 1.8× the tier's time on Python 3.11): each script ran, each
        # module was imported (collection imports most of them: the check with teeth is the one above)
        imported = {Path(module.__file__).resolve() for module in list(sys.modules.values())
                    if getattr(module, "__file__", None)}  # fmt: skip
        missed = not_loaded(imported | {Path(script) for script in SCRIPTS_RUN})
    missed = [module for module in missed if module not in NEEDS or importlib.util.find_spec(NEEDS[module])]
    assert not missed, f"the fast tier runs nothing of {missed}: add a test not marked slow that does"
