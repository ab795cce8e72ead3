"""Resuming from the command line: ``--resume RUN_DIR``, ``--restart``, and the one-line refusals
(a checkpoint of another config, a corrupt or truncated one, a foreign file, bad settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_bench import checkpoint, results
from cl_bench.cli import main
from tests.helpers import CrashError, crash_before_steps

RUN_ID = "r"


def _args(out: Path, *more: str) -> list[str]:
    return [
        "run",
        "--strategy",
        "lora",
        "--scenario",
        "synthetic",
        "--out",
        str(out),
        "--run-id",
        RUN_ID,
        "--no-progress",
        "--threads",
        "1",
        "--set",
        "steps_per_experience=4",
        "--set",
        "batch_size=8",
        "--set",
        "checkpoint_every=1",
        "--set",
        "scenario.n_classes=4",
        "--set",
        "scenario.n_experiences=2",
        *more,
    ]


@pytest.fixture
def stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory whose run failed at step 6 (a checkpoint at step 5 in it)."""
    with monkeypatch.context() as patch:
        crash_before_steps(patch, {6})
        with pytest.raises(CrashError):
            main(_args(tmp_path))
    run_dir = tmp_path / RUN_ID
    assert results.load(run_dir)["status"] == "failed"
    assert checkpoint.read(run_dir) is not None
    return run_dir


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_resume_run_dir_continues_the_stopped_run(stopped: Path) -> None:
    assert main(["run", "--resume", str(stopped), "--no-progress"]) == 0
    record = results.load(stopped)
    assert record["status"] == "ok"
    assert record["timing"]["segments"] == 2
    assert not (stopped / checkpoint.CHECKPOINT_FILE).exists()  # deleted once ok


def test_another_config_is_refused_naming_the_keys(stopped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_args(stopped.parent, "--set", "lr=0.5", "--set", "strategy.r=4", "--set", "threads=2"))
    assert code == 2
    (line,) = _error_lines(capsys)
    assert "holds a checkpoint of a run with another config (differs in lr, strategy.r)" in line
    assert f"cl-bench run --resume {stopped}" in line
    assert results.load(stopped)["status"] == "failed"  # nothing was touched


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_a_damaged_checkpoint_is_one_line_and_restart_recovers(
    stopped: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    path = stopped / checkpoint.CHECKPOINT_FILE
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        import torch

        torch.save({"weights": torch.zeros(2)}, path)
    assert main(_args(stopped.parent)) == 2
    (line,) = _error_lines(capsys)
    assert str(path) in line
    assert "--restart" in line
    assert main(_args(stopped.parent, "--restart")) == 0
    record = results.load(stopped)
    assert record["status"] == "ok"
    assert "segments" not in record["timing"]


def test_resume_of_a_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    (line,) = _error_lines(capsys)
    assert "--resume" in line
    assert "no such run record" in line


@pytest.mark.parametrize(("key", "value"), [("checkpoint_every", "-1"), ("checkpoint_minutes", "-2.0")])
def test_bad_checkpoint_settings_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    assert main(_args(tmp_path, "--set", f"{key}={value}")) == 2
    (line,) = _error_lines(capsys)
    assert f"{key} must be >= 0" in line
