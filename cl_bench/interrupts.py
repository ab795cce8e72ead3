"""Signals that stop a run: SIGINT, SIGTERM and SIGHUP become :class:`RunInterrupted`.

Python turns only SIGINT into an exception; SIGTERM (a batch scheduler's preemption, ``kill``)
and SIGHUP (a closed terminal) end the process at once, so the record would stay ``running``
for ever. Inside :func:`raising` all three raise :class:`~cl_bench.errors.RunInterrupted` in the
main thread, wherever the loop is, so the record is saved ``interrupted`` with the signal's name
and the CLI exits with the shell's code for it (130, 143, 129). The old handlers come back on
exit. Only the CLI asks for this: a notebook or a Ray worker keeps its own handlers.

Inside :func:`deferred` (the loop's training steps) the first signal does not raise: it is kept
as :func:`pending`, so the loop can finish the step, write a checkpoint and then raise it with
:func:`raise_pending`; a second signal raises at once (a user who presses Ctrl-C twice).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from cl_bench.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_deferring = False
_pending: RunInterrupted | None = None


def _raise(signum: int, _frame: FrameType | None) -> None:
    global _pending
    interrupted = RunInterrupted(signal.Signals(signum).name, 128 + signum)
    if _deferring and _pending is None:
        _pending = interrupted
        return
    raise interrupted


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, the first signal is kept for :func:`raise_pending` instead of raised."""
    global _deferring, _pending
    _deferring, _pending = True, None
    try:
        yield
    finally:
        _deferring = False


def pending() -> bool:
    """True once a signal arrived inside :func:`deferred` and was not raised yet."""
    return _pending is not None


def raise_pending() -> None:
    """Raise the signal kept by :func:`deferred`, if any."""
    global _pending
    interrupted, _pending = _pending, None
    if interrupted is not None:
        raise interrupted


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
