"""The domain of every value a user can set (its type, range or names), read from the `# ∈` beside its default.

Each default in conf/ carries its domain on its own line, written with the constructors below:

    lr: 0.001  # ∈ number(0).means("the learning rate, e.g. optimizer.lr=0.001") · what follows · is for the reader

`domain_of(key)` reads every `# ∈` of conf/ once, by the dotted key each line sits under (with its file's package:
conf/optimizer/adam.yaml is `@package _global_`, conf/model/slide_cnn.yaml is `model`). Every `_target_` is a
class or function to build, whose keys cnnlab.checks holds to its signature; every `_partial_` must be true. A
key declared in two files (ckpt_path in each tool's config) must be declared alike. cnnlab.checks applies the
domains right after composing; tests/test_fuzz.py fails for a key of any tool's config that has none.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Domain:
    """What a value must be: `what` completes "… must be", `accepts` decides, `meaning` says what the value is."""

    what: str
    accepts: Callable[[Any], bool]
    meaning: str = ""

    def __or__(self, other: "Domain") -> "Domain":
        return Domain(f"{self.what}, or {other.what}", lambda v: self.accepts(v) or other.accepts(v))

    def means(self, meaning: str) -> "Domain":
        return Domain(self.what, self.accepts, meaning)

    def refusal(self, key: str, value) -> str:
        return f"{key}={value!r} must be {self.what}" + (f": {self.meaning}" if self.meaning else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(low, high, above, below) -> str:
    parts = [f"≥ {low}" if low is not None else "", f"> {above}" if above is not None else "",
             f"≤ {high}" if high is not None else "", f"< {below}" if below is not None else ""]  # fmt: skip
    return " and ".join(part for part in parts if part)


def _within(value, low, high, above, below) -> bool:
    return ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above) and (below is None or value < below))  # fmt: skip


def integer(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(f"an integer {bounds}".strip(), lambda v: _is_int(v) and _within(v, low, high, above, below))


def number(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(f"a number {bounds}".strip(), lambda v: _is_number(v) and _within(v, low, high, above, below))


def boolean() -> Domain:
    return Domain("true or false", lambda v: isinstance(v, bool))


def one_of(*choices) -> Domain:
    names = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return Domain(f"one of {names}" if len(choices) > 1 else names,
                  lambda v: any(type(v) is type(c) and v == c for c in choices))  # fmt: skip


def text() -> Domain:
    """A name or a path. Hydra reads outputs_root=7 as a number: a name made of digits is quoted, outputs_root='7'."""
    return Domain(
        "a non-empty text (a number as a name: quoted, key='7')", lambda v: isinstance(v, str) and v.strip() != ""
    )


def url(*schemes: str) -> Domain:
    """A URL of one of `schemes` (sqlite:///…, http://…); a scheme with a driver counts as its own (mysql+pymysql)."""
    return Domain(f"a URL whose scheme is one of {', '.join(schemes)}", lambda v: isinstance(v, str)
                  and ":" in v and v.split(":", 1)[0].split("+")[0] in schemes)  # fmt: skip


def null() -> Domain:
    return Domain("null", lambda v: v is None)


def numbers(low=None, high=None, *, above=None, below=None) -> Domain:
    bounds = _bounds(low, high, above, below)
    return Domain(
        f"a list of numbers {bounds}".strip(),
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(x) and _within(x, low, high, above, below)
                                                             for x in v),
    )  # fmt: skip


def texts() -> Domain:
    return Domain("a list of non-empty texts, e.g. [a.ckpt,b.ckpt]", lambda v: isinstance(v, list) and len(v) > 0
                  and all(isinstance(x, str) and x.strip() for x in v))  # fmt: skip


def signal_names() -> Domain:
    import signal

    names = {s.name for s in signal.Signals}
    return Domain("a list of signal names (SIGINT, SIGTERM, …)", lambda v: isinstance(v, list) and set(v) <= names)


def device_numbers() -> Domain:
    return Domain("a list of device numbers", lambda v: isinstance(v, list) and len(v) > 0
                  and all(_is_int(d) and d >= 0 for d in v))  # fmt: skip


TARGET = text()  # a class or function to build (Hydra's _target_): that it imports is checked with its keys
PARTIAL = one_of(True)  # the optimizer's and the schedule's parameters are given when the module builds them
METRICS = ("val/acc", "val/loss", "val/acc_best", "train/loss_epoch", "train/acc")  # what a checkpoint may watch
CONF = Path(__file__).resolve().parents[2] / "conf"
KEY = re.compile(r"^( *)([A-Za-z_]\w*):")  # a key of a YAML mapping, with its indentation
DECLARED = " # ∈ "
CONSTRUCTORS = {"integer": integer, "number": number, "boolean": boolean, "one_of": one_of, "text": text,
                "null": null, "numbers": numbers, "signal_names": signal_names, "device_numbers": device_numbers,
                "url": url, "texts": texts, "METRICS": METRICS}  # fmt: skip


def package(path: Path, conf: Path) -> str | None:
    """Where a file of conf/ puts its keys: its `# @package`, else its group's folder; None for Hydra's own."""
    group = path.relative_to(conf).parts[:-1]
    if group[:1] == ("hydra",):
        return None
    header = re.search(r"^# @package (\S+)", path.read_text(), re.MULTILINE)
    if header:
        return "" if header.group(1) == "_global_" else header.group(1)
    return ".".join(group)


def expression(comment: str) -> str:
    """The domain at the start of a `# ∈` comment: the shortest run of its ` · ` parts that is one expression."""
    parts = comment.split(" · ")
    for end in range(1, len(parts) + 1):
        candidate = " · ".join(parts[:end]).strip()
        try:
            compile(candidate, "<domain>", "eval")
            return candidate
        except SyntaxError:
            continue
    raise SyntaxError(f"not a domain: {comment}")


@cache
def declared(conf: Path = CONF) -> dict[str, Domain]:
    """Every `# ∈` of conf/: dotted key → Domain."""
    domains: dict[str, Domain] = {}
    written: dict[str, tuple[str, str]] = {}  # key → (expression, file:line), to hold two declarations alike
    for path in sorted(conf.rglob("*.yaml")):
        prefix = package(path, conf)
        if prefix is None:
            continue
        above: list[tuple[int, str]] = []  # the keys this line sits under, with their indentation
        for number, line in enumerate(path.read_text().splitlines(), 1):
            key = KEY.match(line)
            if not key:
                continue
            indent = len(key.group(1))
            while above and above[-1][0] >= indent:
                above.pop()
            above.append((indent, key.group(2)))
            if DECLARED not in line:
                continue
            full = ".".join([*([prefix] if prefix else []), *(name for _, name in above)])
            text_ = expression(line.split(DECLARED, 1)[1])
            where = f"{path.relative_to(conf)}:{number}"
            if full in written and written[full][0] != text_:
                raise ValueError(f"{where}: {full} ∈ {text_}, but ∈ {written[full][0]} at {written[full][1]}")
            domains[full] = eval(text_, {"__builtins__": {}}, CONSTRUCTORS)  # conf/'s own text, not a user's
            written[full] = (text_, where)
    return domains


def domain_of(key: str) -> Domain | None:
    """The declared domain of a dotted key, None if conf/ declares none."""
    if key.rsplit(".", 1)[-1] == "_target_":
        return TARGET
    if key.rsplit(".", 1)[-1] == "_partial_":
        return PARTIAL
    return declared().get(key)


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value in a plain config; a node set to null, or empty, is a value."""
    if not isinstance(node, dict) or not node:
        return [(prefix, node)] if prefix else []
    return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}" if not prefix
                                                                       else f"{prefix}.{key}")]  # fmt: skip
