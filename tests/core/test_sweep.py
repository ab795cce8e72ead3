"""``cl-bench sweep``: the sweep file, run ids, skip/restart decisions, and a real Ray-local sweep.

The Ray test starts Ray itself (2 CPUs, no dashboard) and shuts it down at the end; the sweeps use
the running instance. Each cell runs in its own worker process, so every cell pays the import of
cl-bench's components: the cells are as small as the loop allows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cl_bench import results, sweep
from cl_bench.cli import main
from tests.helpers import QUICK_SCENARIO

ray = pytest.importorskip("ray")

RUN = {
    "backbone": "tiny-clip",
    "device": "cpu",
    "steps_per_experience": 3,
    "batch_size": 8,
    "eval_batch_size": 64,
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_sweep(
    path: Path,
    *,
    sweep_table: dict[str, Any],
    extra: str = "",
    axes: str = "",
    run: dict[str, Any] | None = None,
) -> Path:
    """A sweep file of tiny synthetic cells: ``sweep_table`` as [sweep], ``RUN | run`` as [run], then
    ``axes`` and ``extra``."""
    lines = ["[sweep]", *(f"{k} = {_toml_value(v)}" for k, v in sweep_table.items())]
    lines += ["[run]", *(f"{k} = {_toml_value(v)}" for k, v in (RUN | (run or {})).items())]
    lines += ["[scenarios.synthetic]", *(f"{k} = {v}" for k, v in QUICK_SCENARIO.items())]
    path.write_text("\n".join(lines) + "\n" + axes + "\n" + extra, encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- the file, no Ray


def test_run_ids_are_deterministic_and_follow_the_config(tmp_path: Path) -> None:
    base = {"strategies": ["lora", "zero-shot"], "scenarios": ["synthetic"], "seeds": [0, 1]}
    first = sweep.load(write_sweep(tmp_path / "a.toml", sweep_table=base, axes="[axes]\nlr = [1e-3, 1e-2]\n"))
    again = sweep.load(write_sweep(tmp_path / "b.toml", sweep_table=base, axes="[axes]\nlr = [1e-3, 1e-2]\n"))
    changed = sweep.load(
        write_sweep(tmp_path / "c.toml", sweep_table=base, axes="[axes]\nlr = [1e-3, 2e-2]\n")
    )
    ids = [c.run_id for c in first.cells]
    assert len(ids) == 8 == len(set(ids))
    assert ids == [c.run_id for c in again.cells]  # same file content, same ids
    assert ids[0] == changed.cells[0].run_id  # lr=1e-3 cells are unchanged
    assert ids[1] != changed.cells[1].run_id  # the changed override gives a new id
    assert ids[0].startswith("lora-synthetic-s0-")
    assert first.cells[0].overrides == {"lr": 1e-3}
    aliased = sweep.load(write_sweep(tmp_path / "d.toml", sweep_table={**base, "strategies": ["lora"]}))
    explicit_default = write_sweep(
        tmp_path / "e.toml",
        sweep_table={**base, "strategies": ["lora"]},
        extra="[strategies.lora]\nargs = { r = 8 }\n",
    )
    # a strategy default written out resolves to the same config, so to the same run
    assert [c.run_id for c in aliased.cells] == [c.run_id for c in sweep.load(explicit_default).cells]
    assert first.out == Path("runs") / "a"


def test_extra_cells_strategy_axes_and_the_dry_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write_sweep(
        tmp_path / "grid.toml",
        sweep_table={"strategies": ["lora"], "scenarios": ["synthetic"], "seeds": [0]},
        extra='[strategies.lora]\naxes = { "strategy.r" = [2, 4] }\n'
        '[[cells]]\nstrategy = { name = "finetune" }\nscenario = "synthetic"\nseeds = [3, 4]\nlr = 1e-4\n',
    )
    code, out, _ = run_cli(capsys, "sweep", str(path), "--dry-run", "--out", str(tmp_path / "runs"))
    assert code == 0
    plan = sweep.load(path, out=tmp_path / "runs")
    assert [(c.strategy, c.seed) for c in plan.cells] == [
        ("lora", 0),
        ("lora", 0),
        ("finetune", 3),
        ("finetune", 4),
    ]
    assert "4 cells (2 from the product, 2 extra), 4 to run" in out
    for cell in plan.cells:
        assert cell.run_id in out
    assert "strategy.r=2" in out
    assert "lr=0.0001" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    ("table", "extra", "expected"),
    [
        ({"strategies": ["lora"], "scenarios": ["synthetic"], "seedz": [0]}, "", "unknown key 'seedz'"),
        (
            {"strategies": ["lorra"], "scenarios": ["synthetic"]},
            "",
            "unknown strategy 'lorra' (did you mean 'lora'?)",
        ),
        ({"strategies": ["lora"], "scenarios": ["synthetc"]}, "", "unknown scenario 'synthetc'"),
        (
            {"strategies": ["lora"], "scenarios": ["synthetic"]},
            "[axes]\n'strategy.rank' = [1]\n",
            "unknown key 'rank'",
        ),
        (
            {"strategies": ["lora"], "scenarios": ["synthetic"]},
            "[axes]\nlr = 1e-3\n",
            "an axis is a non-empty list",
        ),
        ({"strategies": ["lora"], "scenarios": ["synthetic"]}, "[grid]\nx = 1\n", "unknown key 'grid'"),
        (
            {"strategies": ["lora"], "scenarios": ["synthetic"], "gpus_per_cell": -1},
            "",
            "gpus_per_cell must be >= 0",
        ),
        ({"scenarios": ["synthetic"]}, "", "needs strategies and scenarios"),
    ],
)
def test_a_bad_sweep_file_is_one_error_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, table: dict[str, Any], extra: str, expected: str
) -> None:
    path = write_sweep(tmp_path / "bad.toml", sweep_table=table, extra=extra)
    code, _, err = run_cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert expected in lines[0]


def _record(run_dir: Path, status: str, failure: dict[str, str] | None = None) -> None:
    data = {"schema_version": 1, "run_id": run_dir.name, "status": status, "config": {}, "failure": failure}
    results.write_json_atomic(run_dir / results.RESULT_FILE, data)


def test_what_a_rerun_does_with_each_existing_record(tmp_path: Path) -> None:
    _record(tmp_path / "ok", "ok")
    _record(tmp_path / "running", "running")
    _record(tmp_path / "failed", "failed", {"type": "DivergenceError", "reason": "nan"})
    _record(tmp_path / "stopped", "failed", {"type": "KeyboardInterrupt", "reason": "interrupted"})
    decide = sweep.decide
    assert not decide(tmp_path / "ok", retry_failed=True).run
    assert decide(tmp_path / "running", retry_failed=False).run  # a dead run restarts (no checkpoints)
    assert decide(tmp_path / "missing", retry_failed=False).run
    assert not decide(tmp_path / "failed", retry_failed=False).run
    assert decide(tmp_path / "failed", retry_failed=True).run
    assert decide(tmp_path / "stopped", retry_failed=False).run  # interrupted is not the cell's failure


def test_import_cl_bench_stays_light_and_exposes_the_results_api() -> None:
    code = (
        "import sys, cl_bench\n"
        "heavy = [m for m in ('torch', 'pandas', 'ray', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(cl_bench.load_results) and callable(cl_bench.load_matrices)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_results_and_matrices(run_quick: Any, tmp_path: Path) -> None:
    import cl_bench

    run_quick("lora", run_id="a", lr=1e-3)
    run_quick("lora", run_id="b", lr=2e-3, strategy_args={"r": 4})
    (tmp_path / "runs" / sweep.SWEEP_FILE).write_text("{}")  # a sweep summary is not a record
    frame = cl_bench.load_results(tmp_path / "runs")
    assert list(frame.run_id) == ["a", "b"]
    assert list(frame.lr) == [1e-3, 2e-3]
    assert list(frame["strategy.r"]) == [8, 4]
    assert {"acc_final", "forgetting", "scenario.n_experiences", "steps_per_experience"} <= set(frame.columns)
    assert "out" not in frame.columns
    matrices = cl_bench.load_matrices(tmp_path / "runs")
    assert sorted(matrices) == ["a", "b"]
    assert matrices["a"].shape == (2, 2)
    assert cl_bench.load_matrices(tmp_path / "runs", initial=True)["a"].shape == (3, 2)


# ----------------------------------------------------------------------------- Ray, for real
#
# One test function holds every check of the default run that needs Ray: the run spreads tests over two
# pytest-xdist workers, and split tests would start Ray twice on 2 cores (the benchmark check is slow).


@pytest.mark.timeout(900)  # 80 s alone on 2 cores; several times that beside other CPU work
def test_a_ray_sweep_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's workers inherit this environment: with PYTHONDONTWRITEBYTECODE set (some shells and CI
    # images set it) every fresh worker compiles torch & co from source again (~20 s a cell).
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        plan, path = _check_a_sweep_retries_a_killed_cell_and_records_a_failing_one(tmp_path / "grid")
        _check_a_rerun_skips_ok_cells_and_keeps_failed_ones(plan, path, capsys)
        _check_ctrl_c_marks_the_running_cell_interrupted(tmp_path / "stop")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_sweep_benchmark_runs_quick_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # see test_a_ray_sweep_end_to_end
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _check_the_sweep_benchmark_runs_quick_on_the_cpu(tmp_path, capsys)
    finally:
        ray.shutdown()


def _check_a_sweep_retries_a_killed_cell_and_records_a_failing_one(root: Path) -> tuple[sweep.Sweep, Path]:
    """4 cells, 2 at a time: three good ones (one killed mid-run in its first attempt) and a diverging one."""
    root.mkdir()
    path = write_sweep(
        root / "sweep.toml",
        sweep_table={
            "strategies": ["lora"],
            "scenarios": ["synthetic"],
            "seeds": [0, 1],
            "cpus_per_cell": 1,
            "gpus_per_cell": 0,
            "max_retries": 1,
            "test_kill_first_attempt": ["lora-synthetic-s1-"],
        },
        extra='[[cells]]\nstrategy = "zero-shot"\nscenario = "synthetic"\nseed = 0\n'
        '[[cells]]\nstrategy = "finetune"\nscenario = "synthetic"\nseed = 0\nlr = 1e30\n',
    )
    plan = sweep.load(path, out=root / "runs")
    from reports.build import build_report

    outcome = sweep.run(plan, max_parallel=2, progress=True, report=build_report)
    cells = {(s.cell.strategy, s.cell.seed): s for s in outcome.cells}
    assert {k: s.status for k, s in cells.items()} == {
        ("lora", 0): "ok",
        ("lora", 1): "ok",
        ("zero-shot", 0): "ok",
        ("finetune", 0): "failed",
    }
    assert outcome.exit_code == 1  # one cell failed, the others finished
    killed = cells[("lora", 1)]
    assert len(killed.attempts) == 2
    assert killed.attempts[0]["outcome"] == "worker died"
    assert killed.attempts[0]["pid"] != killed.attempts[1]["pid"]
    assert len({s.attempts[-1]["pid"] for s in outcome.cells}) == 4  # each cell in its own process
    failed = results.load(plan.run_dir(cells[("finetune", 0)].cell))
    assert failed["status"] == "failed"
    assert failed["failure"]["type"] == "DivergenceError"
    assert "non-finite loss" in outcome.summary()

    summary = json.loads((plan.out / sweep.SWEEP_FILE).read_text())
    entry = {c["run_id"]: c for c in summary["cells"]}[killed.cell.run_id]
    assert entry["n_attempts"] == 2
    assert "died" in entry["attempts"][0]["reason"]
    retried = results.load(plan.run_dir(killed.cell))
    assert retried["status"] == "ok"
    assert [a["outcome"] for a in retried["sweep"]["attempts"]] == ["worker died", "ok"]
    assert "died" in retried["sweep"]["attempts"][0]["reason"]
    assert entry["status"] == "ok"
    assert entry["wall_s"] > 0
    assert entry["pid"]
    assert entry["hostname"]
    assert summary["counts"] == {"ok": 3, "failed": 1}
    assert outcome.report is not None
    assert outcome.report.is_file()
    csv = (plan.out / sweep.RESULTS_CSV).read_text().splitlines()
    assert len(csv) == 5
    assert "strategy.r" in csv[0]
    records, problems = results.find_records([plan.out])  # sweep.json is not taken for a record
    assert len(records) == 4
    assert not problems
    return plan, path


def _check_a_rerun_skips_ok_cells_and_keeps_failed_ones(
    plan: sweep.Sweep, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mtimes = {c.run_id: (plan.run_dir(c) / results.RESULT_FILE).stat().st_mtime_ns for c in plan.cells}
    again = sweep.run(sweep.load(path, out=plan.out), progress=False)
    assert {s.status for s in again.cells} == {"skipped", "not retried"}
    assert mtimes == {
        c.run_id: (plan.run_dir(c) / results.RESULT_FILE).stat().st_mtime_ns for c in plan.cells
    }
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "sweep", str(path), "--out", str(plan.out), "--dry-run", "--retry-failed")
    assert code == 0
    finetune = next(c for c in plan.cells if c.strategy == "finetune")
    assert any(finetune.run_id in line and "retry (failed)" in line for line in out.splitlines())
    assert sum("skip (ok)" in line for line in out.splitlines()) == 3


def _check_ctrl_c_marks_the_running_cell_interrupted(root: Path) -> None:
    root.mkdir()
    path = write_sweep(
        root / "stop.toml",
        sweep_table={"strategies": ["lora"], "scenarios": ["synthetic"], "seeds": [5], "gpus_per_cell": 0},
        run={"steps_per_experience": 100_000},  # minutes of work: it cannot finish before Ctrl-C lands
    )
    plan = sweep.load(path, out=root / "runs")
    record = plan.run_dir(plan.cells[0]) / results.RESULT_FILE

    def interrupt_once_running() -> None:
        """What Ctrl-C does, once the cell runs (the driver then waits inside its loop)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if results.existing_status(record.parent) == "running":
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    outcome = sweep.run(plan, progress=False)
    assert outcome.interrupted
    assert outcome.exit_code == 130
    assert outcome.cells[0].status == "interrupted"
    assert results.existing_status(record.parent) != "ok"
    summary = json.loads((plan.out / sweep.SWEEP_FILE).read_text())
    assert summary["cells"][0]["status"] == "interrupted"
    assert sweep.decide(record.parent, retry_failed=False).run  # a re-run restarts it


def _check_the_sweep_benchmark_runs_quick_on_the_cpu(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import sweep_bench

    capsys.readouterr()
    args = [
        "--quick",
        "--cells",
        "2",
        "--workdir",
        str(root),
        "--json",
        str(root / "b.json"),
        "--no-run-vs-sweep",
    ]
    code = sweep_bench.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    payload = json.loads((root / "b.json").read_text())
    (row,) = payload["packings"]
    assert row["n_ok"] == 2
    assert row["cells_per_hour"] > 0
    assert 0 < row["overhead_fraction"] < 1
    table = out[out.index("gpus/cell") :]  # the table comes last
    assert "cells/h" in table
    assert "ray start: reused an initialised Ray" in table
