"""The house as docs/design.md draws it: every room in one layer of its table, no import from a room to a layer
above its own, no import cycle, each file opening with the one thing it holds, none over 300 lines."""

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

SRC = ROOT / "src"
DESIGN = ROOT / "docs" / "design.md"
LAYERS = ("entries", "tools", "pieces", "base")  # top to bottom, as the table lists them


def layer_table() -> dict[str, int]:
    """docs/design.md's table of layers: room (`train`, `data.sources`, `src/train.py`) → its layer, 0 at the top."""
    rooms = {}
    for line in DESIGN.read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0] in LAYERS:
            for room in re.findall(r"`([^`]+)`", cells[1]):
                rooms[room] = LAYERS.index(cells[0])
    return rooms


def room_of(path: Path) -> str:
    """src/train.py → `src/train.py`; src/cnnlab/data/sources.py → `data.sources`; src/cnnlab/__init__.py → cnnlab."""
    if path.parent == SRC:
        return f"src/{path.name}"
    parts = path.relative_to(SRC / "cnnlab").with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "cnnlab"


def imported_rooms(path: Path) -> set[str]:
    """The cnnlab rooms a file imports, at its top or inside a function (a lazy import is an import too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from cnnlab import train
    rooms = {name.removeprefix("cnnlab.") if name != "cnnlab" else "cnnlab" for name in names
             if name == "cnnlab" or name.startswith("cnnlab.")}  # fmt: skip
    table = layer_table()
    return {room for room in rooms if room in table}


def source_files() -> list[Path]:
    return sorted([*SRC.glob("*.py"), *(SRC / "cnnlab").rglob("*.py")])


def test_every_room_is_in_the_table_of_layers():
    table = layer_table()
    missing = [room_of(path) for path in source_files() if room_of(path) not in table]
    gone = sorted(set(table) - {room_of(path) for path in source_files()})
    assert not missing and not gone, f"not in docs/design.md's layers: {missing}; named there but not in src/: {gone}"


def test_no_room_imports_a_layer_above_its_own():
    table = layer_table()
    upward = [
        f"{room_of(path)} ({LAYERS[table[room_of(path)]]}) imports {room} ({LAYERS[table[room]]})"
        for path in source_files()
        for room in imported_rooms(path)
        if table[room] < table[room_of(path)]
    ]
    assert not upward, "; ".join(upward)


def test_the_imports_have_no_cycle():
    graph = {room_of(path): imported_rooms(path) - {room_of(path)} for path in source_files()}
    graph = {room: {other for other in uses if other != "cnnlab" or room != "cnnlab"} for room, uses in graph.items()}

    def cycle_from(room: str, trail: list[str]) -> list[str] | None:
        if room in trail:
            return trail[trail.index(room) :] + [room]
        for other in sorted(graph.get(room, ())):
            if other.startswith(f"{room}.") or room == "cnnlab":
                continue  # a package and its own modules, or the base package's __init__, are one room
            found = cycle_from(other, [*trail, room])
            if found:
                return found
        return None

    cycles = [cycle for room in graph if (cycle := cycle_from(room, []))]
    assert not cycles, "import cycle: " + " → ".join(cycles[0])


def test_each_file_opens_with_what_it_holds_and_stays_short():
    problems = []
    for path in source_files():
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text))
        if not docstring or len(docstring.splitlines()[0]) < 20:
            problems.append(f"{path.relative_to(ROOT)}: no opening line saying what it holds")
        if len(text.splitlines()) > 300:
            problems.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines (> 300)")
    assert not problems, "; ".join(problems)
