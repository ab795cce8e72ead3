"""A run's record survives signals, concurrent writers, failed overwrites and full disks.

The subprocess tests signal a real ``cl-bench run`` while it trains; the others drive
``loop.run`` in-process and break it at one named point.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cl_bench import loop, results, run_lock
from cl_bench.errors import DivergenceError, RecordWriteError, RunInterrupted
from cl_bench.registry import STRATEGIES
from tests.helpers import quick_run


def _cli(out: Path, run_id: str, steps: int) -> subprocess.Popen[str]:
    args = ["run", "--strategy", "lora", "--scenario", "synthetic", "--out", str(out), "--run-id", run_id]
    args += ["--set", f"steps_per_experience={steps}", "--set", "batch_size=8", "--no-progress"]
    args += ["--set", "scenario.n_classes=4", "--set", "scenario.n_experiences=2", "--threads", "1"]
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from cl_bench.cli import main; sys.exit(main())", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _training(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Wait until the run's record holds row b (the run is past setup and trains)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if results.load(run_dir)["accuracy"].get("initial"):
                return
        except results.RecordError:
            pass
        time.sleep(0.2)
    raise AssertionError("the run never started training")


def test_signals_end_a_run_interrupted_and_a_second_writer_is_refused(tmp_path: Path) -> None:
    procs = {name: _cli(tmp_path, name, 100_000) for name in ("SIGINT", "SIGTERM", "SIGHUP")}
    for name, proc in procs.items():
        _training(tmp_path / name, proc)
    second = _cli(tmp_path, "SIGTERM", 5)
    _, second_err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert f"being written by another process, pid {procs['SIGTERM'].pid} on" in second_err
    for name, proc in procs.items():
        proc.send_signal(getattr(signal, name))
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + getattr(signal, name), err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: interrupted by {name}" + (" (Ctrl-C)" if name == "SIGINT" else "")
        ]
        record = results.load(tmp_path / name)
        assert record["status"] == "interrupted"
        assert record["failure"]["type"] == name
        # stopped at the end of a step, after a checkpoint (tests/core/test_resume_kill.py resumes one)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            ".lock",
            "checkpoint.pt",
            "result.json",
        ]
        records, problems = results.find_records([tmp_path / name])
        assert [r["status"] for r in records] == ["interrupted"]
        assert not problems


def _fail_in_second_experience(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    lora = STRATEGIES.get("lora")
    original = lora.before_experience

    def before_experience(self: Any, exp: Any) -> None:
        if exp.index == 1:
            raise error
        original(self, exp)

    monkeypatch.setattr(lora, "before_experience", before_experience)


def test_a_failed_overwrite_keeps_the_completed_record(tmp_path, monkeypatch, caplog) -> None:
    first = quick_run(tmp_path, "lora")
    run_dir = tmp_path / "runs" / first.run_id
    completed = (run_dir / "result.json").read_text()
    with monkeypatch.context() as m:
        _fail_in_second_experience(m, DivergenceError("non-finite loss (nan)"))
        with pytest.raises(DivergenceError), caplog.at_level(logging.WARNING, "cl_bench"):
            quick_run(tmp_path, "lora", overwrite=True, seed=1)
    assert (run_dir / "result.json").read_text() == completed
    attempt = json.loads((run_dir / results.PARTIAL_FILE).read_text())
    assert attempt["status"] == "failed"
    assert attempt["config"]["seed"] == 1
    assert f"this attempt's record, failed, is {run_dir / results.PARTIAL_FILE}" in caplog.text
    records, _ = results.find_records([tmp_path / "runs"])
    assert [r["config"]["seed"] for r in records] == [0]  # the attempt is not read as a record

    again = quick_run(tmp_path, "lora", overwrite=True, seed=1)
    assert results.load(run_dir)["config"]["seed"] == 1
    assert again.status == "ok"
    assert not (run_dir / results.PARTIAL_FILE).exists()


def test_ctrl_c_in_a_notebook_marks_the_run_interrupted(tmp_path, monkeypatch) -> None:
    _fail_in_second_experience(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        quick_run(tmp_path, "lora")
    record = results.load(tmp_path / "runs" / "lora-test")
    assert record["status"] == "interrupted"
    assert record["failure"] == {"type": "SIGINT", "reason": "interrupted by SIGINT (Ctrl-C)"}
    assert len(record["accuracy"]["matrix"]) == 1  # experience 0 is kept, the run is not ok


def test_a_running_record_of_a_dead_process_is_started_over(tmp_path, caplog) -> None:
    killed = quick_run(tmp_path, "lora").to_dict() | {"status": "running", "finished": None}
    run_dir = tmp_path / "runs" / "lora-test"
    (run_dir / "result.json").write_text(json.dumps(killed))
    dead = {"pid": 999_999, "host": "node7", "started": "2026-12-01T00:00:00+00:00"}
    (run_dir / run_lock.OWNER_FILE).write_text(json.dumps(dead))  # what a SIGKILL leaves behind
    (run_dir / ".result.json.x1y2.tmp").write_text('{"half": ')  # a killed atomic write
    with caplog.at_level(logging.INFO, "cl_bench"):
        rec = quick_run(tmp_path, "lora")
    assert rec.status == "ok"
    assert "the previous run (pid 999999 on node7 (since 2026-12-01T00:00:00+00:00)) died" in caplog.text
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "result.json"]


def test_a_run_that_never_starts_leaves_no_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(loop, "build_session", lambda p: (_ for _ in ()).throw(DivergenceError("boom")))
    with pytest.raises(DivergenceError):
        quick_run(tmp_path, "lora")
    assert list((tmp_path / "runs").iterdir()) == []


def _disk_full_on_call(monkeypatch: pytest.MonkeyPatch, failing: set[int]) -> list[str]:
    """Make the n-th record writes (0-based) fail with ENOSPC; returns the statuses written."""
    written: list[str] = []
    real = results.write_json_atomic

    def write(path: Path, data: dict[str, Any]) -> None:
        written.append(data["status"])
        if len(written) - 1 in failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(results, "write_json_atomic", write)
    return written


@pytest.mark.parametrize(
    "failing", [{0}, {1}, {-1}, {1, 2}], ids=["first", "row-b", "final", "row-b-and-its-failed-save"]
)
def test_a_full_disk_gives_one_line_and_never_an_ok_record(tmp_path, monkeypatch, failing) -> None:
    calls = _disk_full_on_call(monkeypatch, set())
    quick_run(tmp_path / "count", "lora")  # how many writes a run makes: the last one is "ok"
    n = len(calls)
    failing = {n - 1 if i == -1 else i for i in failing}
    monkeypatch.undo()
    _disk_full_on_call(monkeypatch, failing)
    with pytest.raises(RecordWriteError, match=r"^cannot write the run record .*result\.json: No space left"):
        quick_run(tmp_path, "lora")
    run_dir = tmp_path / "runs" / "lora-test"
    status = results.existing_status(run_dir)
    if failing == {0}:
        assert not run_dir.exists()
    expected = {0: None, 1: "failed", n - 1: "running"}[min(failing)] if failing != {1, 2} else "running"
    assert status == expected  # never "ok": the last record written is running or failed


def test_the_cli_prints_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from cl_bench.cli import main

    _disk_full_on_call(monkeypatch, {0})
    args = ["run", "--strategy", "lora", "--scenario", "synthetic", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--set", "steps_per_experience=1", "--set", "scenario.n_experiences=2"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "No space left on device" in line
    ]
    assert "Traceback" not in err


def test_run_interrupted_is_a_keyboard_interrupt_with_the_shell_exit_code() -> None:
    err = RunInterrupted("SIGTERM", 128 + signal.SIGTERM)
    assert isinstance(err, KeyboardInterrupt)
    assert err.exit_code == 143
    assert err.reason == "interrupted by SIGTERM"
