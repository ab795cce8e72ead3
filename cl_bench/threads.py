"""How many CPU threads a run may use: the CPUs this process is allowed, not the host's.

torch sizes its pool from the host's cores; in a container with a CPU quota, under ``taskset`` or
on a shared machine that oversubscribes the CPUs the process may really use and every op slows
down. ``cl-bench run --threads`` defaults to :func:`available_cpus`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_quota(path: Path = CGROUP_CPU_MAX) -> int | None:
    """The cgroup v2 CPU quota in whole CPUs (``"200000 100000"`` -> 2), None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(allowed, quota) if quota else allowed)


@contextmanager
def using(threads: int) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` inside the block (0: the process's setting),
    restored after it: a run from a notebook or a test leaves the process as it found it."""
    import torch

    previous = torch.get_num_threads()
    if threads > 0 and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
