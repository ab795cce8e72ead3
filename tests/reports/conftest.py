"""Fixtures of the reporter tests: a directory of hand-made records, one with broken files, and
the report of a large comparison (44 runs) for the layout tests."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from reports.build import build_report
from tests.reports.records import make_record, many_runs_set, standard_set, write_record


@dataclass(frozen=True)
class Built:
    """A report built once per module from :func:`standard_set` (figures are slow to draw)."""

    runs: Path
    out: Path
    page: str
    stderr: str


@pytest.fixture(scope="module")
def standard_report(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("standard")
    standard_set(root / "runs")
    out = root / "site" / "report.html"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        build_report([root / "runs"], out)
    return Built(root / "runs", out, out.read_text(encoding="utf-8"), stderr.getvalue())


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """The :func:`standard_set` of records under ``tmp_path/runs``."""
    root = tmp_path / "runs"
    standard_set(root)
    return root


@pytest.fixture
def broken_dir(runs_dir: Path) -> Path:
    """``runs_dir`` plus a truncated record, a non-JSON ``.json`` file and a newer-schema record."""
    good = json.dumps(make_record("t-truncated", "lora", "synthetic", 5))
    truncated = runs_dir / "t-truncated" / "result.json"
    truncated.parent.mkdir()
    truncated.write_text(good[: len(good) // 2], encoding="utf-8")
    (runs_dir / "notes.json").write_text("these are notes, not JSON\n", encoding="utf-8")
    newer = make_record("n-newer", "lora", "synthetic", 6)
    newer["schema_version"] = 99
    write_record(runs_dir, newer)
    return runs_dir


@pytest.fixture(scope="session")
def many_report(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A report of :func:`many_runs_set` (44 runs, group labels over 60 characters), built once."""
    root = tmp_path_factory.mktemp("many")
    many_runs_set(root / "runs")
    out = root / "report.html"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        build_report([root / "runs"], out)
    return Built(root / "runs", out, out.read_text(encoding="utf-8"), stderr.getvalue())
