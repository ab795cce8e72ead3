"""Experiment trackers: each backend writes what docs/logging.md says, read back with its own reader.

The logged values are exact in float32 (TensorBoard stores scalars as float32), so the checks
compare with ``==``. MLflow's first open creates its SQLite store (~3 s of migrations), so one MLflow
test writes both of its runs into one runs directory, which also shows that it has one store.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from cl_bench import tracking
from cl_bench.errors import ClBenchError, ConfigError

CONFIG: dict[str, Any] = {
    "strategy": "lora",
    "scenario": "split-digits",
    "backbone": "tiny-clip",
    "lr": 0.001,
    "log": ["tensorboard"],
    "lr_x": None,
    "strategy_args": {"r": 8, "roles": ["q", "k"]},
}
METRICS = {"acc_final": 0.625, "fwt": None, "bwt": -0.125}
PARAMETERS = {"trainable": 1024, "trainable_fraction": 0.5}
TIMING = {"train_s": 2.5, "total_s": 4.0}
FINALS = {  # what every backend keeps of METRICS, PARAMETERS and TIMING: fwt (None) is left out
    "final/acc_final": 0.625,
    "final/bwt": -0.125,
    "parameters/trainable": 1024.0,
    "parameters/trainable_fraction": 0.5,
    "timing/train_s": 2.5,
    "timing/total_s": 4.0,
}


def play(tracker: tracking.Tracker, status: str = "ok") -> None:
    """What the loop does for two experiences with log_every windows at steps 10, 20 and 30."""
    tracker.log_row(-1, [0.25, 0.5], None, 0)
    tracker.log_losses(10, 0, 1.5, 100.0)
    tracker.log_losses(20, 0, 1.25, 110.0)
    tracker.log_row(0, [0.75, 0.5], 0.75, 20)
    tracker.log_losses(30, 1, 1.0, 120.0)
    tracker.log_row(1, [0.5, 0.875], 0.6875, 30)
    tracker.log_final(METRICS, PARAMETERS, TIMING)
    tracker.close(status)


def backend(tracker: tracking.Tracker) -> Any:
    assert isinstance(tracker, tracking.FanOut)
    ((_, only),) = tracker.backends
    return only


# ----------------------------------------------------------------------------- choosing


def test_import_loads_no_tracking_library() -> None:
    code = (
        "import sys, cl_bench.tracking as t; t.check([]);"
        "t.open_trackers([], run_dir=None, run_id='', config={});"
        "print([m for m in ('torch', 'tensorboard', 'mlflow', 'wandb') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_unknown_tracker_is_one_line_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        tracking.check(["tensorboard", "tensorbord"])
    assert (
        str(err.value)
        == "unknown tracker 'tensorbord' (did you mean 'tensorboard'?); valid: tensorboard, mlflow, wandb"
    )


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "alembic", None)  # None in sys.modules: not importable
    message = "tracker 'mlflow' needs alembic, not installed: pip install 'cl-bench[mlflow]'"
    with pytest.raises(ConfigError) as err:
        tracking.check(["mlflow"])
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="cl-bench\\[mlflow\\]"):
        tracking.open_trackers(["mlflow"], run_dir=tmp_path / "r", run_id="r", config=CONFIG)
    assert not (tmp_path / "mlflow.db").exists()


def test_no_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = tracking.open_trackers([], run_dir=tmp_path / "r", run_id="r", config=CONFIG)
    play(tracker)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- what is logged


def test_final_scalars_keep_numbers_only() -> None:
    scalars = tracking.final_scalars(
        {"acc_final": 0.5, "fwt": None, "bwt": math.nan},
        {"trainable": 3, "merged": True},
        {"train_s": 1.0, "device": "cpu"},
    )
    assert scalars == {"final/acc_final": 0.5, "parameters/trainable": 3.0, "timing/train_s": 1.0}


def test_flatten_dots_tables_and_writes_lists_as_json() -> None:
    assert tracking.flatten({"a": 1, "t": {"r": 8, "roles": ["q", "k"], "x": None}}) == {
        "a": 1,
        "t.r": 8,
        "t.roles": '["q", "k"]',
        "t.x": "null",
    }


class Recorder:
    """A backend that records its calls, and raises in the method named ``fail``."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[str] = []
        self.fail = fail

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise OSError("disk full")

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        self._call("log_losses")

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        self._call("log_row")

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        self._call("log_final")

    def close(self, status: str) -> None:
        self._call("close")


def test_a_failing_backend_warns_once_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    broken, good = Recorder(fail="log_losses"), Recorder()
    tracker = tracking.FanOut([("broken", broken), ("good", good)])
    with caplog.at_level("WARNING", logger="cl_bench.tracking"):
        play(tracker)
    assert broken.calls == ["log_row", "log_losses"]
    assert good.calls == [
        "log_row",
        "log_losses",
        "log_losses",
        "log_row",
        "log_losses",
        "log_row",
        "log_final",
        "close",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "tracker broken failed in log_losses (OSError: disk full); it logs nothing more"
    ]


def test_a_backend_that_cannot_open_fails_in_one_line_and_closes_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    opened = Recorder()

    def refuse(run_dir: Path, run_id: str, config: Mapping[str, Any]) -> tracking.Tracker:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tracking, "_OPENERS", {"tensorboard": lambda *a: opened, "wandb": refuse})
    with pytest.raises(ClBenchError) as err:
        tracking.open_trackers(["tensorboard", "wandb"], run_dir=tmp_path, run_id="r", config=CONFIG)
    assert str(err.value) == "could not open tracker 'wandb': PermissionError: read-only file system"
    assert opened.calls == ["close"]


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "runs" / "r1"
    play(tracking.open_trackers(["tensorboard"], run_dir=run_dir, run_id="r1", config=CONFIG))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert series("train/loss") == [(10, 1.5), (20, 1.25), (30, 1.0)]
    assert series("train/samples_per_s") == [(10, 100.0), (20, 110.0), (30, 120.0)]
    assert series("train/experience") == [(10, 0.0), (20, 0.0), (30, 1.0)]
    assert series("accuracy/exp0") == [(0, 0.25), (1, 0.75), (2, 0.5)]
    assert series("accuracy/exp1") == [(0, 0.5), (1, 0.5), (2, 0.875)]
    assert series("accuracy/seen") == [(1, 0.75), (2, 0.6875)]
    assert series("final/acc_final") == [(0, 0.625)]
    assert series("final/bwt") == [(0, -0.125)]
    assert series("parameters/trainable") == [(0, 1024.0)]
    assert series("timing/train_s") == [(0, 2.5)]
    assert "final/fwt" not in events.Tags()["scalars"]
    assert "config/text_summary" in events.Tags()["tensors"]
    hparams = events.PluginTagToContent("hparams")
    assert set(hparams) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    assert b"strategy_args.r" in hparams["_hparams_/session_start_info"]


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_runs_share_the_runs_directory_store(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    mlflow_out = tmp_path / "runs"

    play(tracking.open_trackers(["mlflow"], run_dir=mlflow_out / "r1", run_id="r1", config=CONFIG))
    assert capfd.readouterr().err == ""  # no "Creating initial MLflow database tables", no warnings
    assert sorted(p.name for p in mlflow_out.iterdir()) == ["mlflow.db", "mlflow.db.lock"]

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("split-digits")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'r1'")
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "strategy": "lora",
        "scenario": "split-digits",
        "backbone": "tiny-clip",
        "lr": "0.001",
        "log": '["tensorboard"]',
        "lr_x": "null",
        "strategy_args.r": "8",
        "strategy_args.roles": '["q", "k"]',
    }
    assert run.data.tags["cl_bench.run_id"] == "r1"
    assert run.data.tags["cl_bench.strategy"] == "lora"

    def series(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert series("train/loss") == [(10, 1.5), (20, 1.25), (30, 1.0)]
    assert series("train/samples_per_s") == [(10, 100.0), (20, 110.0), (30, 120.0)]
    assert series("accuracy/exp0") == [(0, 0.25), (1, 0.75), (2, 0.5)]
    assert series("accuracy/exp1") == [(0, 0.5), (1, 0.5), (2, 0.875)]
    assert series("accuracy/seen") == [(1, 0.75), (2, 0.6875)]
    finals = {k: v for k, v in run.data.metrics.items() if not k.startswith(("train/", "accuracy/"))}
    assert finals == FINALS

    # a second run, failed: the same store, the same experiment
    tracker = tracking.open_trackers(["mlflow"], run_dir=mlflow_out / "r2", run_id="r2", config=CONFIG)
    tracker.log_row(-1, [0.25, 0.5], None, 0)
    tracker.close("failed")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("r1", "FINISHED"), ("r2", "FAILED")]


# ----------------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI's WANDB_MODE=disabled (the backend must still log offline), wandb's files in tmp."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def inspect(path: Path, *args: str) -> str:
    """wandb's own reader of a .wandb transaction log (``wandb leet inspect``)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", *args, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("wandb_home")
def test_wandb_offline_run_holds_the_history(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    play(tracking.open_trackers(["wandb"], run_dir=run_dir, run_id="r1", config=CONFIG))
    assert [p.name for p in psutil.Process().children(recursive=True) if "wandb" in p.name()] == []

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    summary = json.loads(inspect(offline, "--summary"))
    assert (summary["name"], summary["project"], summary["state"], summary["exit_code"]) == (
        "r1",
        "cl-bench",
        "finished",
        0,
    )
    assert summary["config"]["strategy_args"] == {"r": 8, "roles": ["q", "k"]}
    finals = {
        k: v for k, v in summary["summary"].items() if k.startswith(("final/", "parameters/", "timing/"))
    }
    assert finals == FINALS

    records = [json.loads(line) for line in inspect(offline).splitlines()]
    history = [
        {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
        for r in records
        if r["type"] == "history"
    ]
    assert history == [
        {"accuracy/exp0": 0.25, "accuracy/exp1": 0.5, "accuracy/trained": 0, "accuracy/step": 0},
        {"train/loss": 1.5, "train/samples_per_s": 100.0, "train/experience": 0, "train/step": 10},
        {"train/loss": 1.25, "train/samples_per_s": 110.0, "train/experience": 0, "train/step": 20},
        {
            "accuracy/exp0": 0.75,
            "accuracy/exp1": 0.5,
            "accuracy/seen": 0.75,
            "accuracy/trained": 1,
            "accuracy/step": 20,
        },
        {"train/loss": 1.0, "train/samples_per_s": 120.0, "train/experience": 1, "train/step": 30},
        {
            "accuracy/exp0": 0.5,
            "accuracy/exp1": 0.875,
            "accuracy/seen": 0.6875,
            "accuracy/trained": 2,
            "accuracy/step": 30,
        },
    ]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("wandb_home")
def test_wandb_failed_run_exits_non_zero(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    tracker = tracking.open_trackers(["wandb"], run_dir=run_dir, run_id="r1", config=CONFIG)
    tracker.close("failed")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert json.loads(inspect(offline, "--summary"))["exit_code"] == 1


# ----------------------------------------------------------------------------- the loop


@pytest.mark.slow  # alone, the first loop run of a process costs ~12 s (imports, tiny-clip); in a suite ~1 s
def test_a_run_logs_through_the_loop(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import quick_run

    record = quick_run(tmp_path, "linear-probe", steps=4, log_every=2, log=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "runs" / record.run_id / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.value for e in events.Scalars("accuracy/exp1")] == pytest.approx(
        [record.accuracy["initial"][1], *(row[1] for row in record.accuracy["matrix"])]
    )
    assert events.Scalars("final/acc_final")[0].value == pytest.approx(record.metrics["acc_final"])
