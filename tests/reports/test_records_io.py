"""Record discovery and the notebook DataFrame: ``find_records``, ``load_runs``, ``write_text_atomic``."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cl_bench.results import METRIC_COLUMNS, find_records, load_runs, write_json_atomic, write_text_atomic
from reports.build import build_report
from tests.reports.records import make_record, write_record

ORDER = [  # scenario, strategy, seed, run_id
    "a-lora-digits",
    "b-finetune-s0",
    "d-finetune-s1-running",
    "y-lora-s0",
    "z-lora-s1",
    "c-lora-s2-failed",
]


def test_find_records_orders_by_scenario_strategy_seed_run_id(runs_dir: Path) -> None:
    records, problems = find_records([runs_dir])
    assert problems == []
    assert [r["run_id"] for r in records] == ORDER
    assert all(Path(r["_path"]).name == "result.json" for r in records)


def test_find_records_accepts_run_dirs_and_files_and_skips_duplicates(runs_dir: Path) -> None:
    records, problems = find_records(
        [runs_dir / "y-lora-s0", runs_dir / "z-lora-s1" / "result.json", runs_dir]
    )
    assert problems == []
    assert [r["run_id"] for r in records] == ORDER


def test_find_records_reports_bad_files_by_name(broken_dir: Path) -> None:
    records, problems = find_records([broken_dir, broken_dir / "missing"])
    assert [r["run_id"] for r in records] == ORDER
    reasons = {p.path.relative_to(broken_dir).as_posix(): p.reason for p in problems}
    assert set(reasons) == {"t-truncated/result.json", "notes.json", "n-newer/result.json", "missing"}
    assert "truncated or corrupt" in reasons["t-truncated/result.json"]
    assert "not a readable JSON record" in reasons["notes.json"]
    assert "schema version 99 is newer" in reasons["n-newer/result.json"]
    assert reasons["missing"] == "no such file or directory"


def test_find_records_reports_a_second_record_with_the_same_run_id(tmp_path: Path) -> None:
    write_record(tmp_path / "a", make_record("same"))
    write_record(tmp_path / "b", make_record("same"))
    records, problems = find_records([tmp_path])
    assert len(records) == 1
    assert len(problems) == 1
    assert "duplicate run_id 'same'" in problems[0].reason


def test_find_records_rejects_an_ok_record_without_results(tmp_path: Path) -> None:
    record = make_record("hollow")
    del record["accuracy"]
    write_record(tmp_path, record)
    records, problems = find_records([tmp_path])
    assert records == []
    assert "no accuracy matrix" in problems[0].reason


def test_find_records_rejects_a_record_whose_config_names_no_strategy(tmp_path: Path) -> None:
    record = make_record("anonymous", status="failed")
    del record["config"]["strategy"]
    write_record(tmp_path, record)
    records, problems = find_records([tmp_path])
    assert records == []
    assert "names no strategy or scenario" in problems[0].reason


def test_load_runs_returns_one_row_per_run(runs_dir: Path) -> None:
    frame = load_runs(runs_dir)
    assert isinstance(frame, pd.DataFrame)
    assert frame["run_id"].tolist() == ORDER
    for column in (
        "run_id",
        "status",
        "strategy",
        "scenario",
        "backbone",
        "seed",
        "order_seed",
        *METRIC_COLUMNS,
        "n_trainable",
        "n_added",
        "n_active",
        "adapter_bytes",
        "trainable_fraction",
        "peak_memory_train_bytes",
        "peak_memory_eval_bytes",
        "train_samples_per_s",
        "eval_samples_per_s",
        "wall_time_s",
    ):
        assert column in frame.columns, column
    by_id = frame.set_index("run_id")
    assert by_id.loc["z-lora-s1", "acc_final"] == pytest.approx(0.7)
    assert by_id.loc["z-lora-s1", "forgetting"] == pytest.approx(0.3)
    assert by_id.loc["z-lora-s1", "status"] == "ok"
    assert by_id.loc["b-finetune-s0", "n_trainable"] == 100_000
    assert by_id.loc["b-finetune-s0", "adapter_bytes"] == 400_000
    assert by_id.loc["y-lora-s0", "peak_memory_train_bytes"] == 2**30
    # Eval throughput is time-weighted over experiences: (400 + 500) / 2 with equal times.
    assert by_id.loc["y-lora-s0", "eval_samples_per_s"] == pytest.approx(450.0)
    assert by_id.loc["y-lora-s0", "wall_time_s"] == pytest.approx(6.5)
    assert by_id.loc["c-lora-s2-failed", "status"] == "failed"
    assert by_id.loc["c-lora-s2-failed", "failure"] == "DivergenceError: loss became nan at step 3"
    assert pd.isna(by_id.loc["c-lora-s2-failed", "acc_final"])
    ok = frame.query("status == 'ok'")
    assert ok.groupby("strategy")["acc_final"].count().to_dict() == {"finetune": 1, "lora": 3}


def test_load_runs_warns_about_skipped_files(broken_dir: Path) -> None:
    with pytest.warns(UserWarning, match="^skipped ") as caught:
        frame = load_runs([broken_dir])
    assert len(frame) == len(ORDER)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert all(m.startswith("skipped ") for m in messages)
    assert any("notes.json" in m for m in messages)


def test_load_runs_of_an_empty_directory_is_an_empty_frame_with_columns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no run record"):
        frame = load_runs(tmp_path)
    assert frame.empty
    assert "acc_final" in frame.columns


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_mode_of_an_ordinary_open(tmp_path: Path, umask_022: None) -> None:
    write_text_atomic(tmp_path / "page.html", "x")
    write_json_atomic(tmp_path / "result.json", {"schema_version": 1})
    assert _mode(tmp_path / "page.html") == 0o644  # not mkstemp's 0o600
    assert _mode(tmp_path / "result.json") == 0o644
    os.umask(0o027)
    write_text_atomic(tmp_path / "page.html", "y")  # replacing a file applies the umask again
    assert _mode(tmp_path / "page.html") == 0o640


def test_report_and_csv_files_are_readable_by_others(runs_dir: Path, tmp_path: Path, umask_022: None) -> None:
    out = build_report([runs_dir], tmp_path / "site" / "report.html")
    written = sorted(out.parent.iterdir())
    assert len(written) == 7  # report.html and six CSVs
    assert {p.name: _mode(p) for p in written} == {p.name: 0o644 for p in written}


def test_records_written_here_are_valid_json(runs_dir: Path) -> None:
    for path in runs_dir.rglob("result.json"):
        assert json.loads(path.read_text(encoding="utf-8"))["schema_version"] == 1
