"""Where a report may be written, and the temp files a killed report left there.

``cl-bench report runs/ -o runs/x/result.json`` would replace a run record with a web page: the
report refuses (:func:`output_refusal`) any ``.json`` path, any input record, a directory, and any
existing file that is not an HTML report cl-bench wrote, which it recognises by the
:data:`GENERATOR_MARKER` its template puts in the page's head. Rewriting such a report is allowed.

Pages and tables are written atomically (:func:`cl_bench.results.write_text_atomic`: a temp file
``.<name>.<random>.tmp`` beside the target, then a rename), so a report killed mid-write (SIGKILL,
out of memory) leaves that temp file behind and nothing else would remove it:
:func:`remove_stale_temps` does, for the files the report is about to write.
"""

from __future__ import annotations

import contextlib
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path

GENERATOR_MARKER = '<meta name="generator" content="cl-bench report">'
"""In the head of every page ``templates/report.html.j2`` renders (there since the first report)."""
HTML_SUFFIXES = (".html", ".htm")
HEAD_BYTES = 4096
"""How much of an existing file is searched for :data:`GENERATOR_MARKER`."""
STALE_AFTER_S = 60.0
"""A temp file at least this old is stale: a report writes each of its files (text rendered
beforehand) in well under a second, so a younger one may be a concurrent report's write in flight,
and removing it would make that report fail at its rename."""


def is_cl_bench_report(path: Path) -> bool:
    """Whether ``path`` is an HTML file whose head holds :data:`GENERATOR_MARKER`."""
    if path.suffix.lower() not in HTML_SUFFIXES or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError:
        return False
    return GENERATOR_MARKER.encode("utf-8") in head


def output_refusal(output: Path, records: Iterable[Path]) -> str | None:
    """Why the report must not be written to ``output``, or None where it may.

    ``records`` are the files read as run records (usable or not): writing onto one would destroy
    it, whatever its name. A ``.json`` path is refused even when new, since records are JSON and
    ``find_records`` would take the page for a corrupt record.
    """
    if output.suffix.lower() == ".json":
        return f"refusing to write the report to {output}: .json files are run records; name an .html file"
    target = output.resolve()
    if any(Path(p).resolve() == target for p in records):
        return f"refusing to write the report to {output}: it is an input run record"
    if output.is_dir():
        return f"refusing to write the report to {output}: it is a directory; name an .html file in it"
    if output.exists() and not is_cl_bench_report(output):
        return (
            f"refusing to overwrite {output}: it exists and is not an HTML report written by cl-bench "
            "(remove it or name another file)"
        )
    return None


def remove_stale_temps(targets: Iterable[Path], *, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temp files of an atomic write of any of ``targets`` that a killed writer left:
    regular files named ``.<target name>.<random>.tmp`` (the shape of ``tempfile.mkstemp`` in
    ``write_text_atomic``; the random part has no dot, so ``.report.html.bak.<random>.tmp``, a temp
    of another file, is left alone) in the target's directory, at least ``older_than_s`` seconds
    old. Returns the paths removed."""
    by_dir: dict[Path, list[str]] = {}
    for target in targets:
        by_dir.setdefault(target.parent, []).append(re.escape(f".{target.name}."))
    removed = []
    deadline = time.time() - older_than_s
    for directory, prefixes in by_dir.items():
        pattern = re.compile(f"(?:{'|'.join(prefixes)})[A-Za-z0-9_]+\\.tmp")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in directory.iterdir():
                if not pattern.fullmatch(entry.name):
                    continue
                with contextlib.suppress(FileNotFoundError):  # another report removed it first
                    info = entry.lstat()
                    if stat.S_ISREG(info.st_mode) and info.st_mtime <= deadline:
                        entry.unlink()
                        removed.append(entry)
    return removed
