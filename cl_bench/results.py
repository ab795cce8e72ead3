"""Run records: the versioned JSON schema, atomic save/load and environment capture.

A run record is the only thing reports read. It is written atomically (temporary file, fsync,
rename), first with ``status: "running"`` when the run starts, then once more at the end with
``"ok"``, ``"failed"`` (an error) or ``"interrupted"`` (a signal) and the reason, so a crashed or
killed run is never mistaken for a good one. The schema is documented field by field in
``docs/run-record.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from cl_bench.errors import ClBenchError, RecordWriteError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.json"  # a sweep's summary (cl_bench/sweep.py): JSON beside the records, not one
Status = Literal["running", "ok", "failed", "interrupted"]
STATUSES: tuple[str, ...] = ("running", "ok", "failed", "interrupted")
PARTIAL_FILE = "result.json.partial"  # an --overwrite run's record until it completes (see save)


class RecordError(ClBenchError):
    """A run record that cannot be read: missing, truncated, not JSON, or of a newer schema."""


@dataclass
class ExperienceRecord:
    """Figures of one training experience (times in seconds, memory in bytes)."""

    index: int
    classes: list[int]
    n_train: int
    steps: int
    train_time_s: float
    eval_time_s: float
    train_samples_per_s: float
    eval_samples_per_s: float
    peak_memory_train_bytes: int
    peak_memory_eval_bytes: int
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss"
    n_trainable: int
    n_added: int
    n_active: int | None
    adapter_bytes: int
    loss_first: float | None
    loss_last: float | None
    loss_mean: float | None
    strategy: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """One run: configuration, provenance, the accuracy matrix and everything derived from it."""

    run_id: str
    status: Status
    created: str
    config: dict[str, Any]
    strategy: dict[str, Any]
    scenario: dict[str, Any]
    backbone: dict[str, Any]
    environment: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    finished: str | None = None
    failure: dict[str, Any] | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    experiences: list[ExperienceRecord] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    strategy_report: dict[str, Any] = field(default_factory=dict)
    federation: dict[str, Any] | None = None  # a federated run's rounds and bytes (docs/federation.md)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(data: dict[str, Any]) -> RunResult:
    """The :class:`RunResult` of a record's dict (``to_dict``'s inverse; a checkpoint's copy)."""
    fields = dict(data)
    fields["experiences"] = [ExperienceRecord(**e) for e in fields.get("experiences", [])]
    return RunResult(**fields)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp to the second (records' and sweeps' times)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null (a NaN must never look like a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON (non-finite numbers as null) with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(jsonable(data), indent=1, allow_nan=False))


def save(result: RunResult, run_dir: Path, name: str = RESULT_FILE) -> Path:
    """Write ``run_dir/<name>`` atomically and return its path; an OS error (a full disk, a
    read-only or vanished directory) becomes one :class:`RecordWriteError` line.

    ``name`` is ``result.json``, or :data:`PARTIAL_FILE` for an ``--overwrite`` run of a completed
    record: the completed one stays in place until the new run completes (:func:`promote`)."""
    path = run_dir / name
    try:
        write_json_atomic(path, result.to_dict())
    except OSError as err:
        raise RecordWriteError(f"cannot write the run record {path}: {err.strerror or err}") from None
    return path


def promote(run_dir: Path, name: str) -> Path:
    """Make ``run_dir/<name>`` the run's ``result.json`` (one atomic rename; nothing if it is)."""
    path = run_dir / RESULT_FILE
    if name == RESULT_FILE:
        return path
    try:
        os.replace(run_dir / name, path)
        _fsync_dir(run_dir)
    except OSError as err:
        raise RecordWriteError(f"cannot replace the run record {path}: {err.strerror or err}") from None
    return path


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left in ``run_dir``
    (``.<name>.<random>.tmp``); call it only while holding the run's lock, so none is live."""
    removed = []
    for tmp in run_dir.glob(".*.tmp") if run_dir.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def load(path: str | Path) -> dict[str, Any]:
    """Read one record (a ``result.json`` or its run directory); raise RecordError if unusable."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{p}: no such run record") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError; an int past Python's digit limit
        raise RecordError(f"{p}: not a readable JSON record (truncated or corrupt: {err})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise RecordError(f"{p}: not a cl-bench run record (no schema_version)")
    version = data["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordError(
            f"{p}: schema version {version!r} is newer than this cl-bench understands ({SCHEMA_VERSION})"
        )
    missing = [k for k in ("run_id", "status", "config") if k not in data]
    if missing:
        raise RecordError(f"{p}: record lacks {', '.join(missing)}")
    return data


def existing_status(run_dir: Path) -> str | None:
    """The status of the record already in ``run_dir`` ("unreadable" if it cannot be read)."""
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        return str(load(path)["status"])
    except RecordError:
        return "unreadable"


# ----------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str, device_name: str, precision: str) -> dict[str, Any]:
    """Versions, git state and hardware of this run (no heavy imports)."""
    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": sha,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": device,
        "device_name": device_name,
        "precision": precision,
        "versions": {
            name: _version(name)
            for name in (
                "cl-bench",
                "torch",
                "torchvision",
                "avalanche-lib",
                "open_clip_torch",
                "transformers",
                "numpy",
            )
        },
    }


# ----------------------------------------------------------------------------- reading many records


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    Temporary file in the same directory, fsync, rename, fsync of the directory: an interrupted
    run or ``cl-bench report`` never leaves half a record, half a page or half a checkpoint
    behind. The file gets the mode an ordinary ``open()`` would give it (``0o666`` less the
    umask), not the private ``0o600`` of the temporary file, so records and reports stay readable
    by the group.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (its entry), not only the file's bytes."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class RecordProblem:
    """A file that looked like a run record but was skipped, and why (one line)."""

    path: Path
    reason: str


def _candidate_files(path: Path) -> list[Path]:
    """Record files under ``path``: the path itself, ``<dir>/result.json``, or every ``*.json`` below.

    A run directory (it holds ``result.json``) yields just that record, and the other files in
    and below it (``shots/<domain>.json``) are never taken for records. Any other directory is
    searched recursively for ``*.json`` files, skipping hidden names (temporary files of atomic
    writes, notebook checkpoints) and sweep summaries (``sweep.json``); every other one is expected
    to be a record, so a stray or corrupt JSON file is reported rather than silently ignored. Files
    without the ``.json`` suffix inside a directory (reports, CSVs, logs) are not records and are
    not looked at.
    """
    if path.is_dir():
        if (path / RESULT_FILE).is_file():
            return [path / RESULT_FILE]
        found = [p for p in path.rglob("*.json") if p.is_file()]
        run_dirs = {p.parent for p in found if p.name == RESULT_FILE}
        return sorted(
            p
            for p in found
            if p.name != SWEEP_FILE
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            # the other files of a run directory (shots/<domain>.json) are not records
            and (p.name == RESULT_FILE or not run_dirs.intersection(p.parents))
        )
    return [path]


def _incomplete_ok_record(data: dict[str, Any]) -> str | None:
    """Why a record cannot be reported (its config names no strategy or scenario, or it is marked
    ``ok`` without its results), or None if it can."""
    config = data.get("config")
    if not isinstance(config, dict) or not config.get("strategy") or not config.get("scenario"):
        return "the record's config names no strategy or scenario"
    if data.get("status") != "ok":
        return None
    accuracy = data.get("accuracy")
    if not isinstance(accuracy, dict) or not accuracy.get("matrix"):
        return "status ok but the record has no accuracy matrix"
    if not isinstance(data.get("metrics"), dict):
        return "status ok but the record has no metrics"
    return None


def find_records(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[RecordProblem]]:
    """Load every run record found under ``paths``; return ``(records, problems)``.

    Each path is a ``result.json`` (or any record file), a run directory, or a directory of runs
    searched recursively. Unreadable, truncated, non-JSON and newer-schema files, records of an
    unknown status, ``ok`` records without their results, and a second record with an already
    seen ``run_id`` become :class:`RecordProblem` entries instead of errors, so one bad file never
    hides the others. Each returned record gains a ``_path`` key (where it was read from). Records
    come back in a deterministic order: scenario, strategy, seed, run_id.
    """
    records: list[dict[str, Any]] = []
    problems: list[RecordProblem] = []
    seen_files: set[Path] = set()
    seen_ids: dict[str, Path] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            problems.append(RecordProblem(root, "no such file or directory"))
            continue
        candidates = _candidate_files(root)
        if root.is_dir() and not candidates:
            problems.append(RecordProblem(root, "directory holds no run record (*.json)"))
        for file in candidates:
            resolved = file.resolve()
            if resolved in seen_files:
                continue
            seen_files.add(resolved)
            try:
                data = load(file)
            except RecordError as err:
                reason = str(err)
                prefix = f"{file}: "
                problems.append(
                    RecordProblem(file, reason[len(prefix) :] if reason.startswith(prefix) else reason)
                )
                continue
            status = data.get("status")
            why = (
                f"unknown status {status!r} (expected {', '.join(STATUSES)})"
                if status not in STATUSES
                else _incomplete_ok_record(data)
            )
            if why is None and str(data["run_id"]) in seen_ids:
                first = seen_ids[str(data["run_id"])]
                why = f"duplicate run_id {data['run_id']!r}, already read from {first}"
            if why is not None:
                problems.append(RecordProblem(file, why))
                continue
            seen_ids[str(data["run_id"])] = file
            data["_path"] = str(file)
            records.append(data)
    records.sort(key=record_sort_key)
    return records, problems


def record_sort_key(record: dict[str, Any]) -> tuple[str, str, int, str]:
    """The report order of runs: scenario, strategy, seed, run_id."""
    config = record.get("config") or {}
    seed = config.get("seed")
    return (
        str(config.get("scenario", "")),
        str(config.get("strategy", "")),
        seed if isinstance(seed, int) else -1,
        str(record.get("run_id", "")),
    )


def _weighted_rate(experiences: list[dict[str, Any]], rate_key: str, time_key: str) -> float | None:
    """Samples per second over the whole run: sum(rate * time) / sum(time) over experiences."""
    pairs: list[tuple[float, float]] = []
    for exp in experiences:
        rate, time = exp.get(rate_key), exp.get(time_key)
        if isinstance(rate, int | float) and isinstance(time, int | float) and time > 0:
            pairs.append((float(rate), float(time)))
    total_time = sum(t for _, t in pairs)
    if total_time <= 0:
        return None
    return sum(r * t for r, t in pairs) / total_time


METRIC_COLUMNS: tuple[str, ...] = (
    "acc_final",
    "acc_last_seen",
    "acc_avg_incremental",
    "forgetting",
    "forgetting_first_last",
    "bwt",
    "fwt",
    "transfer",
    "avg",
    "last",
    "plasticity",
)


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row of a record: identity, status, every metric, parameter and memory/time figure.

    Parameter and resource columns are ``None`` when the record lacks them (a failed run). Train and
    eval throughput are time-weighted over experiences (total samples / total time).
    ``communication_bytes`` is a federated run's ``federation.communication_bytes`` (bytes uploaded
    plus downloaded over every round, docs/federation.md); ``None`` for a run that is not federated,
    or whose ``federation`` holds no byte count (a whole number in [0, 2**63)).
    """
    config = record.get("config") or {}
    metrics = record.get("metrics") or {}
    params = record.get("parameters") or {}
    timing = record.get("timing") or {}
    experiences = record.get("experiences") or []
    env = record.get("environment") or {}
    backbone = record.get("backbone") or {}
    failure = record.get("failure") or {}
    last_exp = experiences[-1] if experiences else {}
    federation = record.get("federation")
    sent: Any = federation.get("communication_bytes") if isinstance(federation, dict) else None
    whole = isinstance(sent, int) and not isinstance(sent, bool)
    whole = whole or (isinstance(sent, float) and sent.is_integer())  # NaN and infinities are not
    communicated = int(sent) if whole and 0 <= sent < 2**63 else None  # else the federated section says why
    reason = failure.get("reason")
    if failure.get("type") and reason:
        reason = f"{failure['type']}: {reason}"
    return {
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "strategy": config.get("strategy"),
        "scenario": config.get("scenario"),
        "backbone": config.get("backbone", backbone.get("name")),
        "seed": config.get("seed"),
        "order_seed": config.get("order_seed"),
        "n_experiences": len((record.get("accuracy") or {}).get("matrix") or []) or None,
        **{name: metrics.get(name) for name in METRIC_COLUMNS},
        "backbone_parameters": params.get("backbone"),
        "n_trainable": params.get("trainable"),
        "n_added": params.get("added"),
        "n_active": params.get("active"),
        "adapter_bytes": params.get("adapter_bytes"),
        "trainable_fraction": params.get("trainable_fraction"),
        "peak_memory_train_bytes": timing.get("peak_memory_train_bytes"),
        "peak_memory_eval_bytes": timing.get("peak_memory_eval_bytes"),
        "memory_kind": last_exp.get("memory_kind"),
        "train_samples_per_s": _weighted_rate(experiences, "train_samples_per_s", "train_time_s"),
        "eval_samples_per_s": _weighted_rate(experiences, "eval_samples_per_s", "eval_time_s"),
        "train_time_s": timing.get("train_s"),
        "eval_time_s": timing.get("eval_s"),
        "wall_time_s": timing.get("total_s"),
        "communication_bytes": communicated,
        "pretrained": backbone.get("pretrained"),
        "device": env.get("device"),
        "precision": env.get("precision", config.get("precision")),
        "git_sha": env.get("git_sha"),
        "failure": reason,
        "path": record.get("_path"),
    }


def _readable_records(path: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """The records under ``path`` for the ``load_*`` functions: unreadable files are skipped with a
    warning naming them, attributed to the caller of ``load_*``."""
    import warnings

    records, problems = find_records([path] if isinstance(path, str | Path) else list(path))
    for problem in problems:
        warnings.warn(f"skipped {problem.path}: {problem.reason}", stacklevel=3)
    return records


def load_runs(path: str | Path | Sequence[str | Path]) -> Any:
    """All run records under ``path`` as a pandas DataFrame, one row per run (see :func:`run_row`).

    For notebooks: ``load_runs("runs/").query("status == 'ok'").groupby("strategy").acc_final.mean()``.
    Failed and incomplete runs are included (filter on ``status``); files that cannot be read are
    skipped with a warning naming them. Rows are ordered by scenario, strategy, seed, run_id.

    This is the raw per-run table: it has no group statistics. The report's groups (scenario,
    strategy, backbone, split by the config keys that differ) and their mean, sample std and
    counts, failed runs apart, live in ``reports.tables``: ``runs_frame(records)`` adds the
    ``config`` label of each run's group, ``aggregate`` and ``overview_frame`` compute the
    statistics (the report's ``report_overview.csv``). ``cl_bench`` never imports the ``reports``
    package (ARCHITECTURE.md), so this function stops at the per-run rows.
    """
    import pandas as pd

    records = _readable_records(path)
    columns = list(run_row({}).keys())
    return pd.DataFrame([run_row(r) for r in records], columns=columns)


# Config keys that say where and how a run was stored, not what it computed: not columns of
# load_results (the row's ``run_id`` and ``path`` already say where it is).
_STORAGE_CONFIG_KEYS = frozenset({"out", "run_id", "overwrite", "report"})


def config_columns(record: dict[str, Any]) -> dict[str, Any]:
    """A record's resolved config as flat columns named like ``--set`` keys.

    Run keys keep their names (``lr``, ``epochs``); component arguments become
    ``strategy.<key>``, ``scenario.<key>``, ``backbone.<key>``. Storage keys (``out``,
    ``run_id``, ``overwrite``, ``report``) are left out.
    """
    out: dict[str, Any] = {}
    for key, value in (record.get("config") or {}).items():
        if key in _STORAGE_CONFIG_KEYS:
            continue
        if key.endswith("_args") and isinstance(value, dict):
            component = key.removesuffix("_args")
            out.update({f"{component}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def load_results(path: str | Path | Sequence[str | Path]) -> Any:
    """Every run record under ``path`` as one tidy pandas DataFrame: one row per run.

    The columns of :func:`run_row` (identity, status, every metric, parameter, memory and time
    figure) followed by the resolved config of :func:`config_columns` (``lr``, ``strategy.r``,
    ``scenario.n_experiences``...), so a sweep's axes are columns to group by::

        df = cl_bench.load_results("runs/my-sweep")
        df.query("status == 'ok'").groupby(["strategy", "lr"]).forgetting.agg(["mean", "std"])

    Where a config key and a :func:`run_row` column share a name (``backbone``, ``seed``,
    ``device``, ``precision``...), the run_row value is kept: it is what the run actually used.
    Unreadable files are skipped with a warning, as in :func:`load_runs`.
    """
    import pandas as pd

    records = _readable_records(path)
    base = list(run_row({}).keys())
    rows = []
    extra: dict[str, None] = {}  # config columns in first-seen order
    for record in records:
        row = run_row(record)
        for key, value in config_columns(record).items():
            if key not in row:
                row[key] = value
                extra.setdefault(key)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*base, *extra])


def load_matrices(
    path: str | Path | Sequence[str | Path], *, initial: bool = False, status: str | None = "ok"
) -> dict[str, Any]:
    """The accuracy matrix of every run under ``path``, by run id, as numpy arrays.

    ``matrix[i, j]`` is the accuracy on test experience ``j`` after training experience ``i``
    (future columns included, docs/metrics.md). ``initial=True`` prepends the before-training row
    b, so row 0 is the untrained model and row ``i + 1`` follows experience ``i``. Only records of
    ``status`` (default ``ok``; None: every record that has a matrix, partial ones included).
    """
    import numpy as np

    records = _readable_records(path)
    out: dict[str, Any] = {}
    for record in records:
        accuracy = record.get("accuracy") or {}
        rows = list(accuracy.get("matrix") or [])
        if (status is not None and record.get("status") != status) or not rows:
            continue
        if initial and accuracy.get("initial"):
            rows = [accuracy["initial"], *rows]
        out[str(record["run_id"])] = np.array(rows, dtype=float)
    return out
