"""Beyond one process: DDP that also works inside a Hydra sweep (`-m`), and sweeps that run jobs side by side.

Lightning's DDP starts the extra processes of a run by running the script's command line again. Inside a
sweep that command line is the whole sweep: every extra process would start a sweep of its own (Lightning
#11300). `SweepSafeDDPStrategy` (conf/trainer/ddp.yaml) starts them with this job's own overrides instead, as a
single run in the job's folder; outside a sweep that is the same command as Lightning's.

`share_the_machine`: a job of a sweep that runs several jobs at once (hydra/launcher=parallel or joblib) takes
a GPU of its own on a machine with GPUs. Its share of the CPU threads it gets from joblib already: loky starts
its workers with OMP_NUM_THREADS = cores // n_jobs.
"""

import os
import subprocess
import sys
from contextlib import contextmanager

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# The variables the launcher set in this process, with their values before: a set LOCAL_RANK tells Lightning that
# the processes exist already, so the next job of a sweep would wait for extra processes nobody started.
LAUNCHED_ENVIRONMENT: dict[str, str | None] = {}


class JobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher, with each extra process given this Hydra job's overrides and folder."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd, to_absolute_path

        if not HydraConfig.initialized():  # not run through a Hydra entry point: Lightning's own way
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.procs = []
        environment = {
            "MASTER_ADDR": self.cluster_environment.main_address,
            "MASTER_PORT": str(self.cluster_environment.main_port),
            "NODE_RANK": str(self.cluster_environment.node_rank()),
            "LOCAL_RANK": str(self.cluster_environment.local_rank()),
            "WORLD_SIZE": f"{self.num_processes * self.num_nodes}",
        }
        for key, value in environment.items():  # kept until the run ends: fit and test must not launch twice
            LAUNCHED_ENVIRONMENT.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        hydra = HydraConfig.get()
        for local_rank in range(1, self.num_processes):
            command = [sys.executable, to_absolute_path(sys.argv[0]), *hydra.overrides.task,
                       f"hydra.run.dir=\"{hydra.runtime.output_dir}\"", "hydra.output_subdir=null",
                       f"hydra.job.name={hydra.job.name}_process_{local_rank}"]  # fmt: skip
            child = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=child, cwd=get_original_cwd()))


class SweepSafeDDPStrategy(DDPStrategy):
    """DDP whose extra processes run this job only, in its folder (see the module's docstring)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = JobScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


@contextmanager
def process_group_ended_after():
    """Around a run: after it, the process group is gone and the launcher's variables are undone, so that the next
    job of a sweep, in this same process, starts its own processes and process group."""
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in LAUNCHED_ENVIRONMENT.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        LAUNCHED_ENVIRONMENT.clear()
