from __future__ import annotations

import json
import os

import pytest

from cl_bench import results
from cl_bench.errors import RecordWriteError
from cl_bench.results import RecordError, RunResult


def record(status: str = "ok") -> RunResult:
    return RunResult(
        run_id="r1",
        status=status,
        created="2026-01-01T00:00:00+00:00",
        config={"seed": 0},
        strategy={"name": "lora"},
        scenario={"name": "synthetic"},
        backbone={"name": "tiny-clip"},
        environment={},
        metrics={"acc_final": 0.5, "fwt": float("nan")},
    )


def test_save_and_load_round_trip_with_non_finite_as_null(tmp_path) -> None:
    path = results.save(record(), tmp_path / "r1")
    data = results.load(tmp_path / "r1")
    assert path.name == "result.json"
    assert data["metrics"] == {"acc_final": 0.5, "fwt": None}
    assert data["schema_version"] == results.SCHEMA_VERSION
    assert [p.name for p in (tmp_path / "r1").iterdir()] == ["result.json"]  # no temp file left behind


def test_failed_write_leaves_the_previous_record_intact(tmp_path, monkeypatch) -> None:
    results.save(record(), tmp_path)
    before = (tmp_path / "result.json").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RecordWriteError, match=r"^cannot write the run record .*result\.json: disk full$"):
        results.save(record("failed"), tmp_path)
    assert (tmp_path / "result.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schema_version": 1, "run_id": "x", "status": "ok", "config"', "truncated or corrupt"),
        ("not json at all", "truncated or corrupt"),
        ('{"run_id": "x"}', "no schema_version"),
        ('{"schema_version": 99, "run_id": "x", "status": "ok", "config": {}}', "newer"),
        ('{"schema_version": 1, "run_id": "x"}', "lacks status, config"),
    ],
)
def test_unusable_records_raise_record_error_naming_the_file(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "result.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=message) as err:
        results.load(path)
    assert str(path) in str(err.value)


def test_existing_status(tmp_path) -> None:
    assert results.existing_status(tmp_path) is None
    results.save(record("failed"), tmp_path)
    assert results.existing_status(tmp_path) == "failed"
    (tmp_path / "result.json").write_text("{")
    assert results.existing_status(tmp_path) == "unreadable"


def test_environment_captures_versions_and_git() -> None:
    env = results.environment("cpu", "x86_64", "fp32")
    assert env["versions"]["torch"]
    assert env["precision"] == "fp32"
    assert set(env) >= {"git_sha", "git_dirty", "python", "platform", "device", "device_name"}
    json.dumps(env)
