"""The command line around Hydra: composing a run's config, a resumed run's own overrides, errors as one line.

The entry points (and the tests) import this module before composing; it registers the run-dir resolvers
(cnnlab.rundir) and `channels_of` (the network's input channels from data.channels) on import and imports
nothing heavy, so `python src/train.py --help` stays quick.

- `run_entry`: Hydra's own errors about a command line (an unknown key or option) as one `error:` line, and a
  resumed run's own overrides (`with_the_runs_own_overrides`). The domain of every value (its type too) is
  cnnlab.checks', checked right after composing.
- `parse_overrides`: Hydra's own parser, the one every room uses to read a command line.
"""

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

import cnnlab.rundir  # noqa: F401  (registers the run-dir resolvers)
from cnnlab import CHANNELS

# model.in_channels: ${channels_of:${data.channels}}. An unknown name gives null, which the domains refuse under
# data.channels, the key that was given.
OmegaConf.register_new_resolver("channels_of", lambda channels: CHANNELS.get(channels), replace=True)


def fastest_cpu_precision() -> str:
    """bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16, AMX), else fp32: emulated bf16 is 5–15×
    slower (bench/precision_cost.py). The CPU recipes (experiment=fast_cpu, best) take their precision from it."""
    from cnnlab.process import native_bf16

    return "bf16-mixed" if native_bf16() else "32-true"


OmegaConf.register_new_resolver("fastest_cpu_precision", fastest_cpu_precision, replace=True)

# use_cache: Hydra resolves the run dir more than once (and copies the cache into each multirun job); each
# resolution must give the folder claimed the first time.


# ------------------------------------------------------------------------------------------ checks

PRECISIONS = {"32": "32-true", "16": "16-mixed"}  # what people type → the trainer.precision it means


def refuse_numeric_precision(argv: list[str]) -> None:
    """`precision=32` is what people type, but Hydra reads 32 as a number and a group's option must be a name:
    it would stop with a traceback before any code of ours runs. One line instead (the entry points call this)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "precision" and value in PRECISIONS:
            sys.exit(f"error: precision={value}: the precision group's options are fp32, bf16, fp16 (Hydra reads "
                     f"{value} as a number, not an option's name); "
                     f"or give trainer.precision={PRECISIONS[value]}")  # fmt: skip


def quote_paths(argv: list[str]) -> list[str]:
    """`ckpt_path=<a run folder as cnnlab names it>` works pasted as it is: a value that is an existing file or
    folder and holds what Hydra's grammar reads as syntax (`=` `,` and the like, in a run dir's overrides) is
    quoted for Hydra, as `ckpt_path='…'`. Values that name no existing path are left to Hydra (its error line then
    says how to quote them)."""
    quoted = []
    for arg in argv:
        key, equals, value = arg.partition("=")
        grammar = any(c in value for c in "=,[]{}()'\" ") and value[:1] not in ("'", '"')
        if equals and grammar and not arg.startswith("-") and Path(value).expanduser().exists():
            value = value.replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


HOW_TO_QUOTE = (
    " (a value holding = , [ ] or spaces, such as a run folder's name, is quoted for Hydra: give it as \"key='value'\")"
)


def overridden(group: str) -> list[str]:
    """The keys of `group` given on the command line (none outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = [override.key_or_group for override in parse_overrides(HydraConfig.get().overrides.task)]
    return [key.removeprefix(f"{group}.") for key in keys if key.startswith(f"{group}.")]


def parse_overrides(overrides: list[str]):
    """Hydra's own parse of command-line overrides (key_or_group, value, input_line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


NOT_CARRIED = ("ckpt_path", "hydra.")  # what a resumed run does not take from the run it resumes


def with_the_runs_own_overrides(argv: list[str]) -> list[str]:
    """A resumed run (ckpt_path=<file> or `last`) starts from the config of the run it resumes: that run's own
    overrides, recorded in its checkpoints, then this command's, which win where they name the same key (a longer
    trainer.max_epochs, say). Says in one line what it took. A sweep, or a checkpoint without a record, is left
    as it is (train() then says what it finds wrong)."""
    if any(arg.startswith("-") for arg in argv) or os.environ.get("LOCAL_RANK", "0") != "0":
        return argv  # a sweep, --help, …; or an extra process of a DDP run, started with the whole command already
    given = {override.key_or_group: override for override in parse_overrides(argv)}
    ckpt_path = given.get("ckpt_path")
    if ckpt_path is None or ckpt_path.value() in (None, "null"):
        return argv
    from cnnlab import UserError
    from cnnlab.checkpoints import find_checkpoint, load_checkpoint

    root = given["outputs_root"].value() if "outputs_root" in given else default_of("outputs_root")
    try:
        path = find_checkpoint(str(ckpt_path.value()), str(root))
        recorded = (load_checkpoint(path).get("cnnlab") or {}).get("run", {}).get("overrides")
    except UserError:
        return argv
    if recorded is None:
        return argv
    kept = [o.input_line for o in parse_overrides(recorded)
            if o.key_or_group not in given and not o.key_or_group.startswith(NOT_CARRIED)]  # fmt: skip
    print(f"resuming {path} with its run's own overrides: {' '.join(kept) or '(none)'}; then this command's: "
          f"{' '.join(argv)}", file=sys.stderr)  # fmt: skip
    return [*kept, *argv]


def default_of(key: str, config: str = "train"):
    """A default as conf/<config>.yaml sets it (the one place it is set): default_of("root", "data/cifar10")."""
    return OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / f"{config}.yaml")[key]


def run_entry(main, resume: bool = False) -> None:
    """Run a @hydra.main entry point. A mistake on the command line that Hydra finds while composing the config (an
    unknown key or option, a value of the wrong type, an override it cannot parse) ends in one `error:` line and
    exit status 1; Hydra alone would print several lines and a hint about HYDRA_FULL_ERROR. With `resume`, a
    command that resumes a run takes that run's own overrides first (with_the_runs_own_overrides)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    refuse_numeric_precision(sys.argv[1:])
    sys.argv[1:] = quote_paths(sys.argv[1:])
    import logging

    logging.raiseExceptions = False  # a log file that cannot be written (a full disk): no traceback for every line
    if resume:
        try:
            sys.argv[1:] = with_the_runs_own_overrides(sys.argv[1:])
        except OverrideParseException as err:  # Hydra will say it again, in its own words: one line
            sys.exit(f"error: {one_line(err)}{HOW_TO_QUOTE}")
    full_errors = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises its exception instead of printing it: ours to say
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        if full_errors:  # asked for by the user: the whole story
            raise
        sys.exit(f"error: {one_line(err)}{HOW_TO_QUOTE if isinstance(err, OverrideParseException) else ''}")


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their cause's) as one line: the lines joined with "; ", a
    list (one tab-indented item a line) as "a, b, c", without the full_key / object_type lines that repeat the key."""
    parts: list[str] = []
    for error in (err, err.__cause__):
        items: list[str] = []
        for raw in [*str(error or "").split("\nConfig search path")[0].splitlines(), ""]:  # not where Hydra looked
            line = raw.strip()
            if raw.startswith("\t") and line:
                items.append(line)
                continue
            if items:
                parts[-1] += " " + ", ".join(items)
                items = []
            if line and line not in parts and not line.startswith(("full_key:", "object_type=", "reference_type=")):
                parts.append(line.rstrip("."))
    return "; ".join(parts)
