"""The reporter reads JSON only: importing and running it must not load the training stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.reports.records import standard_set

HEAVY = ("torch", "torchvision", "avalanche", "open_clip", "transformers")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path
import reports.build
from reports.build import build_report
build_report([Path(sys.argv[1])], Path(sys.argv[2]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print("HEAVY:", ",".join(heavy))
"""


def test_building_a_report_imports_no_heavy_library(tmp_path: Path) -> None:
    standard_set(tmp_path / "runs")
    out = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=set(HEAVY)), str(tmp_path / "runs"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert "HEAVY: \n" in result.stdout, result.stdout


def _imported(importtime_stderr: str) -> set[str]:
    """Module names listed by ``python -X importtime`` ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_the_report_command_imports_no_heavy_library(tmp_path: Path) -> None:
    standard_set(tmp_path / "runs")
    out = tmp_path / "report.html"
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "cl_bench.cli",
            "report",
            str(tmp_path / "runs"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
    imported = _imported(result.stderr)
    assert "reports.build" in imported  # the listing is read correctly
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy[:10]
