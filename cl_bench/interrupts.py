"""Signals that stop a run: SIGINT, SIGTERM and SIGHUP become :class:`RunInterrupted`.

Python turns only SIGINT into an exception; SIGTERM (a batch scheduler's preemption, ``kill``)
and SIGHUP (a closed terminal) end the process at once, so the record would stay ``running``
for ever. Inside :func:`raising` all three raise :class:`~cl_bench.errors.RunInterrupted` in the
main thread, wherever the loop is, so the record is saved ``interrupted`` with the signal's name
and the CLI exits with the shell's code for it (130, 143, 129). The old handlers come back on
exit. Only the CLI asks for this: a notebook or a Ray worker keeps its own handlers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from cl_bench.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise RunInterrupted(signal.Signals(signum).name, 128 + signum)


@contextlib.contextmanager
def raising(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise RunInterrupted (main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
