"""Every process's random generators, saved in each checkpoint and given back to each process on resume."""

import random

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer


class RngState(Callback):
    """Saves every process's random generators in each checkpoint and gives each process its own back when
    training starts.

    The generators draw the dropout masks and the augmentations, which differ between processes as soon as one
    process draws a number the others do not (a callback on the first process only, say). A checkpoint is written
    by all processes together: each hands its states (torch's, its CUDA device's, numpy's, Python's) to the first,
    which saves them all; on resume process r restores state r (train() refuses a checkpoint of another number of
    processes: `check_processes`).

    Restored at on_train_start, after everything Lightning does while setting up, right before the first batch
    draws. Stored as tensors and plain numbers (numpy's array as a tensor), so the checkpoint still loads with
    torch.load(weights_only=True).
    """

    def __init__(self):
        self.to_restore: dict | None = None
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        own = self.own_state()
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return {"processes": [own]}
        processes = [None] * trainer.world_size  # a collective call: every process is saving this checkpoint
        torch.distributed.all_gather_object(processes, own)
        return {"processes": processes}

    def own_state(self) -> dict:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        }  # fmt: skip
        device = self.cuda_device()
        if device is not None:  # this process's own GPU only: a resume on a machine with fewer GPUs still works
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def cuda_device(self) -> torch.device | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module.device if module is not None and module.device.type == "cuda" else None

    def load_state_dict(self, state_dict: dict) -> None:
        self.to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.to_restore is None:
            return
        saved, self.to_restore = self.to_restore, None
        processes = saved.get("processes", [saved])  # an earlier checkpoint holds one process's state
        state = processes[trainer.global_rank % len(processes)]
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        if "cuda" in state and pl_module.device.type == "cuda":
            cuda = state["cuda"]  # older checkpoints: a list, one state per GPU of the machine
            if isinstance(cuda, list):
                cuda = cuda[pl_module.device.index] if pl_module.device.index < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, pl_module.device)
