"""Peak memory of the current process on a device, in MiB (for logs, unit records and benchmarks)."""

from __future__ import annotations

import resource

import torch

MIB = 2**20


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the CUDA peak counter (the CPU peak RSS is per process and cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device | str) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux reports KiB
