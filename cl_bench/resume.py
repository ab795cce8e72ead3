"""Writing a run's checkpoints and continuing a run from one (the loop's side of
:mod:`cl_bench.checkpoint`).

:class:`Checkpointer` decides when a checkpoint is due (every ``checkpoint_every`` steps, every
``checkpoint_minutes``; the loop adds experience boundaries and signals) and writes the session's
state. :func:`find` reads the checkpoint a re-run of the same run id finds, refusing one whose
experiment config or frozen weights differ; :func:`restore` puts its state into a freshly built
session and returns the partial record. The resumed run then continues at the same step, with the
same sample order, generator states and optimizer state, so that on the CPU its accuracy matrix,
losses and weights are bit-identical to a run that never stopped (tests/core/test_resume_kill.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cl_bench import checkpoint, results
from cl_bench.checkpoint import Checkpoint, CheckpointError
from cl_bench.data import BatchCursor
from cl_bench.errors import ConfigError, RecordWriteError
from cl_bench.results import RunResult

if TYPE_CHECKING:
    from cl_bench.loop import Session

log = logging.getLogger("cl_bench")


@dataclass
class ExperienceProgress:
    """The loop's state inside experience ``index``: what a checkpoint taken there must hold."""

    index: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cursor: BatchCursor
    window: torch.Tensor  # sum of the losses of the open window (a device scalar)
    window_start: int  # global step at which the open window began
    losses: list[float] = field(default_factory=list)
    seconds_before: float = 0.0  # training seconds of this experience in earlier segments
    started: float = field(default_factory=time.perf_counter)  # of this segment's training

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


@dataclass(frozen=True)
class Resumed:
    """Where a restored session continues: experience ``experience`` from the saved progress
    (``training``) or from its start (a boundary checkpoint)."""

    experience: int
    training: dict[str, Any] | None  # the checkpoint's optimizer, scheduler, cursor and window


class Checkpointer:
    """Writes ``checkpoint.pt`` for one run and counts what that cost (for the record)."""

    def __init__(self, run_dir: Path, every: int, minutes: float, enabled: bool) -> None:
        self.run_dir, self.every, self.minutes, self.enabled = run_dir, every, minutes, enabled
        self.last = time.monotonic()
        self.written = 0
        self.seconds = 0.0
        self.bytes = 0

    def due(self, step: int) -> bool:
        """True when ``step`` (global, just finished) ends an interval of steps or of minutes."""
        if not self.enabled:
            return False
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self.last >= 60 * self.minutes

    def save(
        self, session: Session, record: RunResult, progress: ExperienceProgress | None, next_experience: int
    ) -> None:
        """Checkpoint the session: inside experience ``progress.index`` after the step just taken,
        or (``progress`` None) at the boundary before ``next_experience``."""
        if not self.enabled:
            return
        tic = time.perf_counter()
        data = snapshot(session, record, progress, next_experience)
        try:
            _, size = checkpoint.write(self.run_dir, data)
        except OSError as err:
            path = self.run_dir / checkpoint.CHECKPOINT_FILE
            raise RecordWriteError(f"cannot write the checkpoint {path}: {err.strerror or err}") from None
        self.last = time.monotonic()
        self.written += 1
        self.bytes = size
        self.seconds += time.perf_counter() - tic

    def figures(self) -> dict[str, float]:
        return {
            "checkpoints_written": self.written,
            "checkpoint_write_s": self.seconds,
            "checkpoint_bytes": self.bytes,
        }


def model_modules(session: Session) -> dict[str, torch.nn.Module]:
    return {"backbone": session.strategy.backbone, "head": session.strategy.head}


def frozen_skip(session: Session) -> frozenset[int]:
    """The parameters a checkpoint leaves out: the original frozen weights, unless the strategy
    writes into them."""
    return frozenset() if session.strategy.changes_frozen_weights() else session.frozen_ids


def snapshot(
    session: Session, record: RunResult, progress: ExperienceProgress | None, next_experience: int
) -> dict[str, Any]:
    """The checkpoint's contents (module docstring of :mod:`cl_bench.checkpoint`)."""
    saved, skipped = checkpoint.model_tensors(model_modules(session), frozen_skip(session))
    training = None
    if progress is not None:
        cursor = progress.cursor
        training = {
            "optimizer": progress.optimizer.state_dict(),
            "scheduler": progress.scheduler.state_dict() if progress.scheduler is not None else None,
            "cursor": {
                "order": None if cursor.order is None else cursor.order.cpu(),
                "start": cursor.start,
                "done": cursor.done,
            },
            "window": progress.window.detach().cpu(),
            "window_start": progress.window_start,
            "losses": list(progress.losses),
            "seconds": progress.seconds(),
        }
    return {
        "config": checkpoint.config_text(record.config),
        "backbone_fingerprint": checkpoint.fingerprint(skipped),
        "skipped": sorted(skipped),
        "model": saved,
        "strategy": session.strategy.extra_state(),
        "rng": checkpoint.rng_state(session.generator),
        "loop": {
            "training": training is not None,
            "experience": progress.index if progress is not None else next_experience,
            "global_step": session.step,
            "elapsed_s": session.elapsed_before + time.perf_counter() - session.started,
            "written_at": time.time(),
        },
        "progress": training,
        "record": json.dumps(results.jsonable(record.to_dict())),
    }


def find(session: Session, config: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint this run continues from, or None (none there, ``--restart``, ``--overwrite``,
    or a strategy that does not train). Refuses one whose experiment config or frozen weights
    differ from this run's."""
    p = session.plan
    if p.cfg.restart or p.cfg.overwrite or not session.strategy.trains:
        if (p.run_dir / checkpoint.CHECKPOINT_FILE).exists():
            log.info(
                "discarding the checkpoint in %s (%s)",
                p.run_dir,
                "--restart" if p.cfg.restart else "a new run",
            )
            checkpoint.remove(p.run_dir)
        return None
    saved = checkpoint.read(p.run_dir)
    if saved is None:
        return None
    keys = checkpoint.differing_keys(json.loads(saved.data["config"]), config)
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ConfigError(
            f"{p.run_dir} holds a checkpoint of a run with another config (differs in {shown}); "
            f"resume it with `cl-bench run --resume {p.run_dir}`, or pass --restart to discard it"
        )
    _, skipped = checkpoint.model_tensors(model_modules(session), frozen_skip(session))
    if checkpoint.fingerprint(skipped) != saved.data["backbone_fingerprint"]:
        raise CheckpointError(
            f"the frozen backbone weights differ from those of the run checkpointed in {p.run_dir} "
            "(another weights file or backbone?); pass --restart to start the run over"
        )
    return saved


def restore(session: Session, saved: Checkpoint) -> tuple[RunResult, Resumed]:
    """Put the checkpoint's state into the freshly built ``session``; the partial record (one more
    segment, the time lost since the checkpoint) and where to continue."""
    data = saved.data
    strategy = session.strategy
    try:
        strategy.load_extra_state(data["strategy"])
        checkpoint.load_model(model_modules(session), data["model"], set(data["skipped"]))
        checkpoint.set_rng_state(data["rng"], session.generator)
        record = results.from_dict(json.loads(data["record"]))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(
            f"the checkpoint {saved.path} does not fit this run ({type(err).__name__}: {err}); "
            "pass --restart to start the run over"
        ) from None
    loop = data["loop"]
    session.step = int(loop["global_step"])
    session.elapsed_before = float(loop["elapsed_s"])
    lost = max(0.0, _last_sign_of_life(session.plan.run_dir) - float(loop["written_at"]))
    timing = record.timing
    timing["segments"] = int(timing.get("segments", 1)) + 1
    timing["lost_s"] = float(timing.get("lost_s", 0.0)) + lost
    record.status, record.failure, record.finished = "running", None, None
    where = f"step {session.step}" + (" (inside experience" if saved.training else " (before experience")
    log.warning(
        "resuming %s from its checkpoint at %s %d); segment %d",
        session.plan.run_dir,
        where,
        saved.experience,
        timing["segments"],
    )
    training = {**data["progress"], "strategy": data["strategy"]} if saved.training else None
    return record, Resumed(saved.experience, training)


def load_progress(progress: ExperienceProgress, saved: dict[str, Any], device: torch.device) -> None:
    """Restore the optimizer, schedule, sample order and loss window of a checkpoint taken inside
    an experience, after ``make_optimizer`` (and the strategy's own optimizers)."""
    progress.optimizer.load_state_dict(saved["optimizer"])
    if progress.scheduler is not None:
        progress.scheduler.load_state_dict(saved["scheduler"])
    cursor = saved["cursor"]
    order = cursor["order"]
    progress.cursor.order = None if order is None else order.to(progress.cursor.device)
    progress.cursor.start, progress.cursor.done = int(cursor["start"]), int(cursor["done"])
    progress.window.copy_(saved["window"].to(device))
    progress.window_start = int(saved["window_start"])
    progress.losses[:] = [float(v) for v in saved["losses"]]
    progress.seconds_before = float(saved["seconds"])


def _last_sign_of_life(run_dir: Path) -> float:
    """The newest modification time among the run's files: when the dead run last wrote."""
    times = [f.stat().st_mtime for f in run_dir.rglob("*") if f.is_file() and f.name != ".lock"]
    return max(times, default=0.0)
