"""How a training process uses its machine: the memory it frees, and its own GPU in a sweep of parallel jobs."""

import ctypes
import sys

import torch


def keep_freed_memory(keep: bool = True) -> None:
    """Let this process keep the memory it frees, for the next step to reuse (glibc's malloc; elsewhere nothing).

    A CPU training step allocates its activations and gradients, tens of MB, and frees them at its end. glibc
    gives freed blocks that large back to the kernel (mmap threshold, heap trimming), so the next step faults
    the same memory in again page by page, thousands of page faults a step. With glibc's largest mmap
    threshold (32 MiB) and no trimming, the freed memory is reused. The process keeps its largest heap. The
    counts, with the command that makes them: docs/benchmarks.md (bench/step_breakdown.py)."""
    if not keep or not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's (musl's does nothing)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
        mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def share_the_machine(cfg) -> None:
    """In a job of a parallel sweep (hydra/launcher=parallel or joblib) on a machine with GPUs: GPU number
    job % GPUs, so that the jobs running at once do not share one. Elsewhere it changes nothing. (The CPU threads
    are shared by joblib itself: cores // n_jobs per worker, tests/test_scale.py checks it.)"""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if not HydraConfig.initialized() or "joblib" not in str(HydraConfig.get().launcher.get("_target_", "")):
        return
    trainer = cfg.trainer
    if torch.cuda.is_available() and trainer.accelerator in ("gpu", "cuda", "auto") and trainer.devices == 1:
        with open_dict(cfg):
            trainer.devices = [HydraConfig.get().job.num % torch.cuda.device_count()]
