"""How a training process uses its machine: the memory it frees, its own GPU in a sweep of parallel jobs, and whether
its CPU computes bf16 natively."""

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


def emulated_bf16(cfg) -> str | None:
    """A warning, not a refusal: bf16 autocast on a CPU without native bf16 (AVX-512 BF16 or AMX) runs, emulated by
    oneDNN, many times slower than fp32 (bench/precision_cost.py: 6–16× on an AVX2 AMD EPYC)."""
    trainer = cfg.get("trainer")
    if trainer is None or not str(trainer.get("precision")).startswith("bf16"):
        return None
    if trainer.get("accelerator") not in ("cpu", "auto") or torch.cuda.is_available():
        return None
    if trainer.get("accelerator") == "auto" and torch.backends.mps.is_available():  # auto: the Apple GPU
        return None
    if native_bf16():
        return None
    return (f"warning: trainer.precision={trainer.precision} on a CPU without native bfloat16 (no AVX-512 BF16 or "
            f"AMX: {torch.backends.cpu.get_cpu_capability()}) is emulated, many times slower than fp32; "
            f"add precision=fp32 (the same accuracy)")  # fmt: skip


def native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX-512 BF16, AMX), as torch itself asks."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: no way to tell, so no warning
        return True
