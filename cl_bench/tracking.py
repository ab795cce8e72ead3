"""Experiment trackers: a run's loss windows, accuracy rows and final metrics in TensorBoard, MLflow or W&B.

The run record (``result.json``) stays the one source of truth; a tracker is a view of the same
numbers in a UI people already use, written through that UI's own library (docs/logging.md says
where each writes and what it logs under which name). Each backend is an optional extra
(``pip install 'cl-bench[tensorboard]'``, ``[mlflow]``, ``[wandb]``, all three: ``[logging]``) and
is imported only when it is selected, so importing this module imports none of them, nor torch.

Step axes: a loss window is logged at the global optimizer step; an accuracy row at "experiences
trained" (``row + 1``: 0 is row b, before training, k is row k-1 of the matrix), so each test
experience's curve is its column of the accuracy matrix, the forgetting curve, even for a
strategy that never trains (whose global step stays 0).

A backend that fails while the run goes on (a full disk, a locked database) logs one warning and
logs nothing more; it never decides a run's outcome. One that cannot be opened fails the run
before it trains, with one line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cl_bench.errors import ClBenchError, ConfigError
from cl_bench.registry import closest

log = logging.getLogger("cl_bench.tracking")

TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")

# The top-level modules each backend imports, and the extra that installs them.
_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
}

WANDB_PROJECT = "cl-bench"
MLFLOW_DB = "mlflow.db"  # in the runs directory: one store for every run written there
MLFLOW_ARTIFACTS = "mlartifacts"


def check(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` (one line) for an unknown tracker name or a missing library.

    Called before a run starts so a typo or a missing extra costs no training time. Looks the
    libraries up without importing them (``importlib.util.find_spec``).
    """
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"unknown tracker {name!r}{closest(name, list(TRACKERS))}; valid: {', '.join(TRACKERS)}"
            )
        missing = [module for module in _MODULES[name] if not _installed(module)]
        if missing:
            raise ConfigError(
                f"tracker {name!r} needs {', '.join(missing)}, not installed: pip install 'cl-bench[{name}]'"
            )


def _installed(module: str) -> bool:
    """Whether top-level ``module`` can be imported (``None`` in ``sys.modules`` counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec (a stub): importable
        return True


class Tracker(Protocol):
    """What the loop tells an experiment tracker; every backend and the fan-out implement it."""

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        """One loss window: the mean training loss of the last ``log_every`` steps, at global ``step``."""
        ...

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        """Row ``row`` of the accuracy matrix (-1: row b), one accuracy per test experience.

        ``seen_accuracy`` is the accuracy on the experiences seen so far (None for row b);
        ``step`` is the global optimizer step at which the row was evaluated.
        """
        ...

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        """The derived metrics (None: undefined, skipped), parameter counts and timings of the run."""
        ...

    def close(self, status: str) -> None:
        """End the tracker's run as ``"ok"`` or ``"failed"`` and flush its files."""
        ...


def open_trackers(names: Sequence[str], *, run_dir: Path, run_id: str, config: Mapping[str, Any]) -> Tracker:
    """One :class:`Tracker` that fans out to every named backend (none: a tracker that does nothing).

    Files: TensorBoard event files in ``<run_dir>/tensorboard/``; MLflow an SQLite store shared by
    every run of the runs directory, ``<run_dir>/../mlflow.db`` (experiment: the scenario, run
    name: ``run_id``, params: the flattened ``config``); W&B an offline run in ``<run_dir>/wandb/``
    (never the network; ``wandb sync`` uploads it later). ``config`` is the run record's resolved
    config. Raises :class:`ClBenchError` (one line) when a backend cannot be opened, after closing
    the ones already opened.
    """
    check(names)
    opened: list[tuple[str, Tracker]] = []
    for name in dict.fromkeys(names):  # each backend once, in the order given
        try:
            opened.append((name, _OPENERS[name](Path(run_dir), run_id, config)))
        except ClBenchError:
            FanOut(opened).close("failed")
            raise
        except Exception as err:
            FanOut(opened).close("failed")
            raise ClBenchError(f"could not open tracker {name!r}: {type(err).__name__}: {err}") from err
    return FanOut(opened)


class FanOut:
    """The loop's one tracker: passes every call to each backend; a backend that raises is dropped.

    A tracker is a view of the run record, so a broken one (disk full, database locked, a dead W&B
    service) must not fail a run that may have trained for hours: it warns once and is removed.
    """

    def __init__(self, backends: Sequence[tuple[str, Tracker]]) -> None:
        self.backends = list(backends)

    @property
    def names(self) -> list[str]:
        """The backends still logging."""
        return [name for name, _ in self.backends]

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                log.warning(
                    "tracker %s failed in %s (%s: %s); it logs nothing more",
                    name,
                    method,
                    type(err).__name__,
                    err,
                )
                self.backends.remove((name, backend))

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        """One loss window, to every backend."""
        self._each("log_losses", step, experience, loss, samples_per_s)

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        """One accuracy-matrix row, to every backend."""
        self._each("log_row", row, list(accuracies), seen_accuracy, step)

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        """The final metrics, parameters and timing, to every backend."""
        self._each("log_final", metrics, parameters, timing)

    def close(self, status: str) -> None:
        """Close every backend (each one even when another fails)."""
        self._each("close", status)
        self.backends = []


# ----------------------------------------------------------------------------- what is logged


def loss_scalars(experience: int, loss: float, samples_per_s: float) -> dict[str, float]:
    """The scalars of one loss window, by name."""
    return {"train/loss": loss, "train/samples_per_s": samples_per_s, "train/experience": experience}


def row_scalars(accuracies: Sequence[float], seen_accuracy: float | None) -> dict[str, float]:
    """The scalars of one accuracy row: ``accuracy/exp{j}`` per test experience j, ``accuracy/seen``."""
    scalars = {f"accuracy/exp{j}": float(a) for j, a in enumerate(accuracies)}
    if seen_accuracy is not None:
        scalars["accuracy/seen"] = float(seen_accuracy)
    return scalars


def final_scalars(
    metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
) -> dict[str, float]:
    """``final/<metric>``, ``parameters/<name>`` and ``timing/<name>``: the numbers only.

    Undefined metrics (None), non-numbers and non-finite values are left out: every UI here
    stores a float per name and none of them has a "not defined" value.
    """
    scalars: dict[str, float] = {}
    for prefix, values in (("final", metrics), ("parameters", parameters), ("timing", timing)):
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                scalars[f"{prefix}/{name}"] = float(value)
    return scalars


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config tables as dotted keys (``strategy_args.r``); lists and None as JSON text."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, str | int | float | bool):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def trained(row: int) -> int:
    """The accuracy rows' step: experiences trained when row ``row`` was evaluated (row b: 0)."""
    return row + 1


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard/`` written by torch's ``SummaryWriter``.

    Scalars as named in docs/logging.md; the resolved config as text (``config``) and, with the
    final metrics, in the HPARAMS tab (written into the same event file rather than the subfolder
    ``add_hparams`` would make, so one run stays one run in TensorBoard).
    """

    def __init__(self, run_dir: Path, run_id: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)
        self.hparams = flatten(config)
        self.writer.add_text("config", "```json\n" + json.dumps(dict(config), indent=2) + "\n```", 0)

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        """One loss window at global ``step``."""
        for name, value in loss_scalars(experience, loss, samples_per_s).items():
            self.writer.add_scalar(name, value, step)

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        """One accuracy row at step "experiences trained"."""
        for name, value in row_scalars(accuracies, seen_accuracy).items():
            self.writer.add_scalar(name, value, trained(row))

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        """Final scalars at step 0 and the HPARAMS entry of the run (config against final metrics)."""
        from torch.utils.tensorboard.summary import hparams

        scalars = final_scalars(metrics, parameters, timing)
        finals = {name: value for name, value in scalars.items() if name.startswith("final/")}
        file_writer = self.writer.file_writer
        assert file_writer is not None, "log_final after close"
        for summary in hparams(self.hparams, finals):
            file_writer.add_summary(summary)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, 0)

    def close(self, status: str) -> None:
        """Flush and close the event file (TensorBoard has no run status; ``status`` is unused)."""
        self.writer.close()


# ----------------------------------------------------------------------------- MLflow


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's and alembic's INFO lines ("Creating initial MLflow database tables...") and
    SQLAlchemy's deprecation warnings about MLflow's own queries are not the user's business."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class MLflowTracker:
    """One MLflow run in the SQLite store ``<run_dir>/../mlflow.db`` (artifacts: ``../mlartifacts``).

    MLflow 3 refuses its file store (``./mlruns``, "maintenance mode") unless an environment
    variable opts back in, and names SQLite as the replacement, so that is the store. Every run of
    a runs directory shares it: ``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db`` shows
    them all. Experiment: the scenario; run name: the run id; params: the flattened config.
    Written through ``MlflowClient`` (no global active run); creating the store and the experiment
    holds a file lock so parallel sweep cells do not race. MLflow's usage telemetry is off unless
    ``MLFLOW_DISABLE_TELEMETRY`` is set otherwise: a benchmark on an offline cluster must not wait
    on the network.
    """

    def __init__(self, run_dir: Path, run_id: str, config: Mapping[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from filelock import FileLock
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        out = run_dir.resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{out / MLFLOW_DB}"
        experiment_name = str(config.get("scenario") or "cl-bench")
        with _quiet_mlflow(), FileLock(str(out / f"{MLFLOW_DB}.lock"), timeout=120):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise ClBenchError(
                    f"MLflow experiment {experiment_name!r} is deleted in {out / MLFLOW_DB}: restore it "
                    f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or purge it "
                    f"(mlflow gc --backend-store-uri {self.tracking_uri})"
                )
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(
                    experiment_name, artifact_location=(out / MLFLOW_ARTIFACTS / experiment_name).as_uri()
                )
            )
            tags = {"cl_bench.run_id": run_id, "cl_bench.run_dir": str(run_dir.resolve())}
            for key in ("strategy", "scenario", "backbone"):
                if config.get(key):
                    tags[f"cl_bench.{key}"] = str(config[key])
            self.run_id = self.client.create_run(experiment_id, run_name=run_id, tags=tags).info.run_id
            params = [Param(key, _param_value(value)) for key, value in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            self.client.log_batch(self.run_id, tags=[RunTag("mlflow.note.content", _note(run_id, config))])

    def _log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars.items()]
        with _quiet_mlflow():
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        """One loss window at global ``step``."""
        self._log(loss_scalars(experience, loss, samples_per_s), step)

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        """One accuracy row at step "experiences trained"."""
        self._log(row_scalars(accuracies, seen_accuracy), trained(row))

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        """Final metrics, parameter counts and timings as metrics at step 0 (comparable across runs)."""
        self._log(final_scalars(metrics, parameters, timing), 0)

    def close(self, status: str) -> None:
        """End the MLflow run as FINISHED (``"ok"``) or FAILED."""
        with _quiet_mlflow():
            self.client.set_terminated(self.run_id, "FINISHED" if status == "ok" else "FAILED")


def _param_value(value: str | int | float | bool) -> str:
    """A param as MLflow stores it: text, cut to MLflow's length limit (the record has it whole)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return str(value)[:MAX_PARAM_VAL_LENGTH]


def _note(run_id: str, config: Mapping[str, Any]) -> str:
    """The run's description in the MLflow UI: what ran, and where its record lies."""
    what = " / ".join(str(config[key]) for key in ("strategy", "scenario", "backbone") if config.get(key))
    return f"cl-bench run `{run_id}`: {what}. The full record: `{run_id}/result.json` in the runs directory."


# ----------------------------------------------------------------------------- W&B


class WandbTracker:
    """An offline W&B run in ``<run_dir>/wandb/`` (project ``cl-bench``, group: the scenario).

    ``mode="offline"`` is passed explicitly, so it works under the ``WANDB_MODE=disabled`` the CLI
    sets for avalanche's import of wandb, and nothing goes to the network; ``wandb sync
    <run_dir>/wandb/offline-run-*`` uploads the run later. Two step axes, declared with
    ``define_metric``: ``train/*`` against ``train/step`` (the global optimizer step) and
    ``accuracy/*`` against ``accuracy/trained`` (experiences trained). The final numbers go to the
    run summary, which is what the W&B runs table compares. Console capture is off (it would fight
    the progress bar) and git is not read (the record holds the commit).
    """

    def __init__(self, run_dir: Path, run_id: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        tags = [str(config[key]) for key in ("strategy", "scenario", "backbone") if config.get(key)]
        self.run = wandb.init(
            mode="offline",
            dir=str(run_dir),
            project=WANDB_PROJECT,
            name=run_id,
            group=str(config["scenario"]) if config.get("scenario") else None,
            job_type=str(config["strategy"]) if config.get("strategy") else None,
            tags=tags,
            config=dict(config),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
        )
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("accuracy/trained")
        self.run.define_metric("accuracy/*", step_metric="accuracy/trained")
        log.info(
            "wandb: offline run in %s (upload later: wandb sync %s)", self.run.dir, Path(self.run.dir).parent
        )

    def log_losses(self, step: int, experience: int, loss: float, samples_per_s: float) -> None:
        """One loss window against ``train/step``."""
        self.run.log({**loss_scalars(experience, loss, samples_per_s), "train/step": step})

    def log_row(self, row: int, accuracies: Sequence[float], seen_accuracy: float | None, step: int) -> None:
        """One accuracy row against ``accuracy/trained``; the global step rides along as ``accuracy/step``."""
        self.run.log(
            {
                **row_scalars(accuracies, seen_accuracy),
                "accuracy/trained": trained(row),
                "accuracy/step": step,
            }
        )

    def log_final(
        self, metrics: Mapping[str, float | None], parameters: Mapping[str, Any], timing: Mapping[str, Any]
    ) -> None:
        """Final metrics, parameter counts and timings into the run summary."""
        self.run.summary.update(final_scalars(metrics, parameters, timing))

    def close(self, status: str) -> None:
        """Finish the run (exit code 0 for ``"ok"``, 1 otherwise) and stop wandb's service process
        when no other run of this process still uses it."""
        self.run.finish(exit_code=0 if status == "ok" else 1)
        if self.wandb.run is None:
            self.wandb.teardown()


_OPENERS: dict[str, Callable[[Path, str, Mapping[str, Any]], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}
