"""The config around Hydra: run-dir resolvers, the entry points' handling of the command line.

The entry points (and the tests) import this module before composing; it registers everything on import and
imports nothing heavy, so `python src/train.py --help` stays quick.

- Resolvers `run_name`, `unique_dir` and `run_dir` (conf/hydra/default.yaml): run dirs
  `<date>_<time>_<overrides>`, readable and never shared by two runs; a resumed run continues in its own.
- `OutputDirCheck`: a Hydra callback that refuses, in one line, a run or sweep dir that cannot be written
  (Hydra itself would stop with a traceback).
- `run_entry`: Hydra's own errors about a command line (an unknown key or option) as one `error:` line, and a
  resumed run's own overrides. The domain of every value (its type too) is cnnlab.checks', checked right after
  composing.
"""

import os
import re
import sys
import tempfile
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

MAX_SUMMARY = 80


def run_name(stamp: str, overrides: str = "") -> str:
    """`stamp` plus the override summary, made safe as one folder name (no `/`, at most 80 characters)."""
    summary = re.sub(r"[^\w.,=+-]+", "-", overrides)[:MAX_SUMMARY].strip("-")
    return f"{stamp}_{summary}" if summary else stamp


def unique_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, … : the first that did not exist, claimed by creating it (atomic), so two
    runs started in the same second with the same overrides get two folders."""
    candidate, n = Path(path), 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")


def run_dir(new_dir: str, ckpt_path: str | None, outputs_root: str) -> str:
    """A resumed run continues in the run dir that holds its checkpoint (<run dir>/checkpoints/*.ckpt): one log,
    one TensorBoard run, and its ModelCheckpoint keeps its record of the best checkpoint. Any other run, or a
    checkpoint kept outside a run dir, gets `new_dir` (claimed with unique_dir)."""
    if ckpt_path is not None:
        from cnnlab import UserError
        from cnnlab.resume import find_checkpoint, run_dir_of

        try:
            held_by = run_dir_of(find_checkpoint(str(ckpt_path), outputs_root))
        except UserError:
            held_by = None  # train() says what is wrong with ckpt_path, in the new run's log
        if held_by is not None:
            return str(held_by)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:  # torchrun: every rank composes
        return shared_run_dir(new_dir, outputs_root)
    return unique_dir(new_dir)


RENDEZVOUS_WAIT_S = 120


def shared_run_dir(new_dir: str, outputs_root: str) -> str:
    """Under torchrun every process composes the config and resolves its own run dir: rank 0 claims one and hands
    its path to the others through torchrun's own key-value store, the TCPStore that its agent serves at
    MASTER_ADDR:MASTER_PORT for this job alone (TORCHELASTIC_USE_AGENT_STORE, torchrun's default): no file of an
    earlier job on the same port is read and no clock is compared, on one node or several. Where the agent serves
    no store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), the path goes through <outputs_root>/.rendezvous/<rendezvous
    id>: then `torchrun --rdzv-id` must name the job (TORCHELASTIC_RUN_ID), and outputs_root be shared."""
    is_first = os.environ["RANK"] == "0"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts a failed job's processes
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=RENDEZVOUS_WAIT_S))  # fmt: skip
        key = f"cnnlab/run_dir/{attempt}"
        if is_first:
            claimed = unique_dir(new_dir)
            store.set(key, str(Path(claimed).resolve()))
            return claimed
        try:
            return store.get(key).decode()  # waits for the first process's set
        except RuntimeError as err:  # torch's DistStoreError: the first process never got there
            sys.stderr.write(f"warning: rank 0's run dir did not arrive ({err}): this rank writes into its own\n")
            return unique_dir(new_dir)
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job in ("", "none"):
        sys.stderr.write("warning: torchrun without its agent's store and without --rdzv-id: each process writes "
                         "into a run dir of its own\n")  # fmt: skip
        return unique_dir(new_dir)
    note = Path(outputs_root) / ".rendezvous" / re.sub(r"[^\w.-]+", "_", f"{job}-{attempt}")
    if is_first:
        claimed = unique_dir(new_dir)
        note.parent.mkdir(parents=True, exist_ok=True)
        temp = note.with_name(f".{note.name}.{os.getpid()}.tmp")
        temp.write_text(str(Path(claimed).resolve()))
        os.replace(temp, note)  # atomic: another rank reads the whole path or nothing
        return claimed
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    while not note.is_file():
        if time.monotonic() > deadline:
            sys.stderr.write(f"warning: rank 0's run dir did not appear in {note}: this rank writes into its own\n")
            return unique_dir(new_dir)
        time.sleep(0.1)
    return note.read_text()


# use_cache: Hydra resolves the run dir more than once (and copies the cache into each multirun job); each
# resolution must give the folder claimed the first time.
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True, replace=True)


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
    from cnnlab.resume import find_checkpoint, load_checkpoint

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
    import logging

    logging.raiseExceptions = False  # a log file that cannot be written (a full disk): no traceback for every line
    if resume:
        try:
            sys.argv[1:] = with_the_runs_own_overrides(sys.argv[1:])
        except OverrideParseException as err:  # Hydra will say it again, in its own words: one line
            sys.exit(f"error: {one_line(err)}")
    full_errors = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises its exception instead of printing it: ours to say
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        if full_errors:  # asked for by the user: the whole story
            raise
        sys.exit(f"error: {one_line(err)}")


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


def writable_dir(path: str | Path) -> str | None:
    """None if `path` is (or can be made) a folder we can write files into, else why not."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return None
    except OSError as err:
        return err.strerror or str(err)


class OutputDirCheck(Callback):
    """Before Hydra creates the run dir (or the sweep dir): one line and exit 1 if it cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if launcher.startswith("hydra_plugins."):  # a launcher plugin of ours (conf/hydra/launcher): installed?
            import importlib.util

            plugin = ".".join(launcher.split(".")[:2])
            if importlib.util.find_spec(plugin) is None:
                sys.exit(f"error: the launcher {launcher.rsplit('.', 1)[-1]} is not installed ({plugin}): it comes "
                         f"with cnnlab's scale extra, pip install -e '.[scale]' (make install does it)")  # fmt: skip
        self.check(config, "hydra.sweep.dir")

    @staticmethod
    def check(config: DictConfig, key: str) -> None:
        try:
            folder = OmegaConf.select(config, key)
            problem = writable_dir(folder)
        except Exception as err:  # our resolvers create the folder while Hydra resolves the key
            folder, problem = None, str(err.__cause__ or err).splitlines()[0]
        if problem:
            where = f"{key}={folder}" if folder else key
            sys.exit(f"error: {where}: cannot write the run's outputs there ({problem}); "
                     f"choose another folder with {key}=... or outputs_root=...")  # fmt: skip
