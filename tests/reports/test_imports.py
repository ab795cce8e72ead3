"""The reporter reads JSON only: importing and running it must not load the training stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.reports.records import standard_set

HEAVY = ("torch", "torchvision", "avalanche", "open_clip", "transformers")

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
        cwd=Path(__file__).resolve().parents[2],
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert "HEAVY: \n" in result.stdout, result.stdout
