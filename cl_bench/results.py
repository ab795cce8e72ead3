"""Run records: the versioned JSON schema, atomic save/load and environment capture.

A run record is the only thing reports read. It is written atomically (temporary file, fsync,
rename), first with ``status: "running"`` when the run starts, then once more at the end with
``"ok"`` or ``"failed"`` and the reason, so a crashed or killed run is never mistaken for a good
one. The schema is documented field by field in ``docs/run-record.md``.
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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from cl_bench.errors import ClBenchError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
Status = Literal["running", "ok", "failed"]


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null (a NaN must never look like a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(result: RunResult, run_dir: Path) -> Path:
    """Write ``run_dir/result.json`` atomically and return its path."""
    path = run_dir / RESULT_FILE
    write_json_atomic(path, result.to_dict())
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read one record (a ``result.json`` or its run directory); raise RecordError if unusable."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{p}: no such run record") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
