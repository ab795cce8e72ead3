"""One writer per run: a file lock in the run directory, naming its owner.

Two processes started with the same ``--out`` and ``--run-id`` would write the same record (and,
with different configs, replace a completed one). :func:`hold` takes an exclusive OS lock on
``<run_dir>/.lock`` (``filelock``: ``flock`` on POSIX) for the whole run; a second process is
refused at once with the owner's pid, host and start time, read from ``<run_dir>/.owner``. The OS
drops the lock when its process dies however it dies (SIGKILL, out of memory), so a stale lock is
taken over by the next run without any clean-up, and the ``.owner`` a dead process left tells
whose run died (:attr:`Held.previous_owner`; a clean exit removes it). Both names are hidden, so
record readers never look at them; a run that never wrote a record leaves no directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cl_bench.errors import RunLockedError

LOCK_FILE, OWNER_FILE = ".lock", ".owner"


@dataclass(frozen=True)
class Held:
    """A lock this process holds, and the owner a dead earlier holder left (None: none died)."""

    path: Path
    previous_owner: dict[str, Any] | None


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    """The owner written by the process that holds, or last held, the run's lock (None: unknown)."""
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads((run_dir / OWNER_FILE).read_text(encoding="utf-8"))
        if isinstance(owner, dict):
            return owner
    return None


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('started')})"


@contextlib.contextmanager
def hold(run_dir: Path, started: str) -> Iterator[Held]:
    """Hold the lock of the run in ``run_dir`` for the ``with`` block, or raise
    :class:`RunLockedError` at once if a live process holds it."""
    created = not run_dir.exists()
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{run_dir} is being written by another process, {describe(read_owner(run_dir))}; "
            "wait for it, stop it, or pick another --run-id"
        ) from None
    except OSError as err:
        raise RunLockedError(f"cannot lock the run directory {run_dir}: {err.strerror or err}") from None
    owner_file = run_dir / OWNER_FILE
    try:
        previous = read_owner(run_dir)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        with contextlib.suppress(OSError):
            owner_file.write_text(json.dumps(owner), encoding="utf-8")
        yield Held(run_dir / LOCK_FILE, previous)
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
            if created and {p.name for p in run_dir.iterdir()} == {LOCK_FILE}:
                (run_dir / LOCK_FILE).unlink()  # nothing was written: leave no directory
                run_dir.rmdir()
        lock.release()
