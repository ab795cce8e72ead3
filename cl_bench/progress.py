"""What a run shows while it works: a tqdm bar on a terminal, plain progress lines otherwise.

A run on a CPU can sit for minutes in one evaluation; with output going to a file or a CI log a
``\\r``-redrawn bar is unreadable, so there the same progress is a line every ``interval`` seconds
(and one when such a long phase ends). tqdm has no line mode, hence the small :class:`_Lines` below.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal, TextIO

from tqdm.auto import tqdm

Mode = Literal["bar", "lines", "off"]


def choose(progress: bool | Mode, stream: TextIO | None = None) -> Mode:
    """``True``: a bar when ``stream`` (default stderr) is a terminal, lines otherwise; ``False``: off."""
    if progress is True:
        stream = stream or sys.stderr
        return "bar" if stream.isatty() else "lines"
    if progress is False:
        return "off"
    if progress not in ("bar", "lines", "off"):
        raise ValueError(f"progress must be a bool or one of bar, lines, off; got {progress!r}")
    return progress


class Phase:
    """Progress of one phase of a run (training steps, or the images of one evaluation)."""

    def __init__(
        self, mode: Mode, *, total: int, desc: str, unit: str, interval: float = 30.0, leave: bool = True
    ) -> None:
        self.mode = mode
        self._bar: Any = None
        self._lines: _Lines | None = None
        if mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
        elif mode == "lines":
            self._lines = _Lines(total=total, desc=desc, unit=unit, interval=interval)

    def describe(self, desc: str) -> None:
        """Rename the phase (the bar's label, the lines' prefix)."""
        if self._bar is not None:
            self._bar.set_description(desc)
        elif self._lines is not None:
            self._lines.desc = desc

    def update(self, n: int = 1, **figures: str) -> None:
        """``n`` more units done; ``figures`` (loss=..., samples_s=...) shown beside the count."""
        if self._bar is not None:
            self._bar.update(n)
            if figures:
                self._bar.set_postfix(figures, refresh=False)
        elif self._lines is not None:
            self._lines.update(n, figures)

    def write(self, message: str) -> None:
        """A line of its own (a finished experience), above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self.mode == "lines":
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._lines is not None:
            self._lines.finish()


class _Lines:
    """``desc: done/total unit (pct), elapsed, ~left [figures]`` at most every ``interval`` s."""

    def __init__(self, *, total: int, desc: str, unit: str, interval: float) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0
        self.figures: dict[str, str] = {}
        self.started = self.last = time.monotonic()

    def update(self, n: int, figures: dict[str, str]) -> None:
        self.done += n
        self.figures.update(figures)
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self._emit(now)

    def finish(self) -> None:
        """The closing line of a phase that someone waited for (one that printed lines before)."""
        if self.last > self.started:
            self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        elapsed = now - self.started
        parts = [f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{elapsed:.0f} s")
        if 0 < self.done < self.total:
            parts.append(f"~{elapsed * (self.total - self.done) / self.done:.0f} s left")
        parts += [f"{k} {v}" for k, v in self.figures.items()]
        print(", ".join(parts), file=sys.stderr, flush=True)
