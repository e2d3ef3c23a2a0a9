"""Run dirs: `<date>_<time>_<overrides>`, never shared by two runs, a resumed run in its own; the torchrun handshake.

Hydra resolves `hydra.run.dir` with the resolvers registered here (conf/hydra/default.yaml): `run_name`,
`unique_dir` (a suffix when the name is taken) and `run_dir` (a resumed run continues in the run dir of its
checkpoint; the processes of a torchrun job agree on one folder through torchrun's own store). `OutputDirCheck`,
a Hydra callback, refuses in one line a run or sweep dir that cannot be written (Hydra would stop with a
traceback).
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
        from cnnlab.checkpoints import find_checkpoint, run_dir_of

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


def sweep_experiment(base: str) -> str:
    """Where a tracker files a run (an MLflow experiment, a W&B group): `base` for a single run, and for the jobs of
    a sweep `base/<sweep dir's name>`, so that a sweep's jobs land together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{base}/{Path(HydraConfig.get().sweep.dir).name}"
    return base


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("sweep_experiment", sweep_experiment, replace=True)
OmegaConf.register_new_resolver("name_of", lambda path: Path(str(path)).name, replace=True)
OmegaConf.register_new_resolver("absolute", lambda path: str(Path(str(path)).expanduser().resolve()), replace=True)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True, replace=True)
