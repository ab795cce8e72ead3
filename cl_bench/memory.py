"""Peak-memory measurement: CUDA allocator peaks on GPU, peak resident set size on CPU."""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def kind(device: torch.device) -> str:
    """What :func:`peak_bytes` measures on ``device``, as stored in the run record's ``memory_kind``:
    ``cuda_max_allocated`` (the CUDA allocator's peak) or ``cpu_peak_rss`` (peak resident set)."""
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"


def reset_peak(device: torch.device) -> None:
    """Start a new peak window (CUDA: reset_peak_memory_stats; Linux CPU: clear VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    # not Linux, or not permitted: the peak then covers the whole process
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak memory since the last :func:`reset_peak` (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
