"""``cl-bench report`` and ``cl-bench run --report`` end to end: real quick runs in, HTML and CSV out."""

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


@pytest.mark.slow
def test_run_with_report_writes_the_page_and_tables_next_to_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "run",
        "--strategy",
        "lora",
        "--scenario",
        "synthetic",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
        "--run-id",
        "lora-report",
        "--report",
        "--no-progress",
        *("--set", "scenario.n_classes=4", "--set", "scenario.n_experiences=2"),
        *("--set", "scenario.train_per_class=8", "--set", "scenario.test_per_class=4"),
        *("--set", "steps_per_experience=3", "--set", "batch_size=8", "--set", "eval_batch_size=64"),
    ]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "lora-report"
    assert (run_dir / "result.json").is_file()
    out = run_dir / "report.html"
    assert out.is_file()
    for name in ("overview", "runs", "parameters", "resources", "variants", "excluded"):
        assert (run_dir / f"report_{name}.csv").is_file(), name
    page = out.read_text(encoding="utf-8")
    assert "lora-report" in page
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
