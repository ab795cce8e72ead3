"""``cl-bench report`` end to end: a real quick run in, an HTML file out; nothing usable, an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_bench.cli import main
from tests.helpers import quick_run


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quick_run(tmp_path, "lora")
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(tmp_path / "runs"), "-o", str(out)]) == 0
    assert out.is_file()
    assert out.with_name("report_overview.csv").is_file()
    page = out.read_text(encoding="utf-8")
    assert "lora-test" in page
    assert "<img " in page
    assert f"report: {out}" in capsys.readouterr().out


def test_report_without_a_usable_record_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "broken.json").write_text('{"schema_version": 1, "run_id"', encoding="utf-8")
    out = tmp_path / "report.html"
    assert main(["report", str(runs), "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable run record")
    assert any(line.startswith("warning: skipped") and "broken.json" in line for line in err)
    assert not out.exists()
