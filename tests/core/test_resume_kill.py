"""The kill test: a run SIGKILLed at random points and resumed each time ends bit-identical to the
run that never stopped, and no kill ever leaves an ``ok`` record that is incomplete, an unreadable
JSON or a temporary file behind.

Each attempt is a child process (a ``forkserver`` that imported torch, avalanche, open_clip and
cl-bench once, so an attempt starts in well under a second) running the same run id; it is
killed with SIGKILL either at a chosen moment of the run (before a given training step, halfway
through a checkpoint write or a record write: the temporary file is complete but not renamed,
between experiences: before an evaluation row) or after a random delay. The next attempt
resumes. Points and delays are drawn from a fixed seed, so a failure can be replayed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cl_bench import checkpoint, results
from tests.core.test_resume import _same_run
from tests.helpers import quick_run

STRATEGY, ARGS = "mora", {"r": 2, "topk": 2}
N_POINTS = 30
# 8 experiences x 12 steps, a checkpoint after every step: each attempt gets only a step or two
# further before its kill, so the run needs more than N_POINTS attempts and every point is used
SCENARIO = {"n_classes": 16, "n_experiences": 8, "train_per_class": 8, "test_per_class": 2}
STEPS = 12
RUN = {"checkpoint_every": 1, "threads": 1}
STEP_PAUSE_S = 0.03  # the attempts' steps last at least this long (the tiny model's take ~5 ms)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _attempt(tmp: str, how: str, at: int) -> None:
    """One attempt of the run (a child process): SIGKILLs itself at the ``at``-th event ``how``."""
    from cl_bench import checkpoint as checkpoint_
    from cl_bench import loop
    from cl_bench import results as results_

    torch.set_num_threads(1)
    calls = [0]
    step = loop.train_step

    def slow_step(*args: Any, **kwargs: Any) -> Any:  # a random-delay kill lands mid-run
        time.sleep(STEP_PAUSE_S)
        return step(*args, **kwargs)

    loop.train_step = slow_step  # type: ignore[assignment]

    def counting(original: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == at:
                _kill_self()
            return original(*args, **kwargs)

        return wrapped

    target = checkpoint_.CHECKPOINT_FILE if how == "checkpoint-write" else results_.RESULT_FILE

    def replace_then_die(src: Any, dst: Any) -> None:  # the temporary file is whole, not renamed
        if Path(dst).name == target:
            calls[0] += 1
            if calls[0] == at:
                _kill_self()
        os.replace(src, dst)

    if how == "step":
        loop.train_step = counting(loop.train_step)  # type: ignore[assignment]
    elif how == "row":
        loop.evaluate_row = counting(loop.evaluate_row)  # type: ignore[assignment]
    elif how in ("checkpoint-write", "record-write"):
        results_.os = _OsWith(replace_then_die)  # type: ignore[attr-defined]
    _run(Path(tmp))


class _OsWith:
    """``os`` with ``replace`` swapped (a module's view of os, for one child process)."""

    def __init__(self, replace: Any) -> None:
        self.replace = replace

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _run(tmp: Path) -> Any:
    return quick_run(
        tmp,
        STRATEGY,
        steps=STEPS,
        strategy_args=ARGS,
        scenario_args=SCENARIO,
        log_every=2,
        keep_checkpoints=True,
        **RUN,
    )


def _points(rng: random.Random) -> list[tuple[str, int, float]]:
    """``N_POINTS`` kills: (how, at, delay); a ``delay`` kill comes from the parent after that many
    seconds. Every kind of point appears; steps, writes and delays are random."""
    kinds = [
        "step",
        "checkpoint-write",
        "step",
        "delay",
        "step",
        "checkpoint-write",
        "record-write",
        "step",
        "checkpoint-write",
        "row",
    ]
    points = []
    for i in range(N_POINTS):
        how = kinds[i % len(kinds)]
        at = {
            "step": rng.randint(1, 3),
            "checkpoint-write": rng.randint(1, 2),
            "record-write": rng.randint(1, 2),
        }
        points.append((how, at.get(how, 1), rng.uniform(0.05, 0.6)))
    rng.shuffle(points)
    return points


def _check_after_kill(run_dir: Path) -> None:
    """What a killed attempt may leave: a readable record that is not ok, or none yet."""
    if (run_dir / results.RESULT_FILE).exists():
        record = results.load(run_dir)
        if record["status"] == "ok":  # the kill came after the run completed
            assert len(record["accuracy"]["matrix"]) == SCENARIO["n_experiences"]
            assert record["metrics"]
    if (run_dir / checkpoint.CHECKPOINT_FILE).exists():
        assert checkpoint.read(run_dir) is not None


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    reference = _run(tmp_path / "reference")
    context = multiprocessing.get_context("forkserver")
    # avalanche alone takes ~3 s to import: without the preload every attempt would pay it
    preload = ["torch", "avalanche.benchmarks.scenarios", "open_clip", "cl_bench.loop", "tests.helpers"]
    context.set_forkserver_preload([*preload, "scenarios", "strategies", __name__])
    run_dir = tmp_path / "killed" / "runs" / f"{STRATEGY}-test"
    table = {"killed": 0, "finished before the kill": 0}
    points_used, log = [], [f"{'kill point':>16} {'at':>3} {'exit':>5} {'step':>5}"]
    for how, at, delay in _points(random.Random(20261207)):
        points_used.append((how, at))
        child = context.Process(
            target=_attempt, args=(str(tmp_path / "killed"), how, at if how != "delay" else 0)
        )
        child.start()
        if how == "delay":
            child.join(delay)
            if child.exitcode is None:
                child.kill()
        child.join(120)
        assert child.exitcode in (0, -signal.SIGKILL), (how, at, child.exitcode)
        table["killed" if child.exitcode else "finished before the kill"] += 1
        _check_after_kill(run_dir)
        saved = checkpoint.read(run_dir) if run_dir.exists() else None
        log.append(
            f"{how:>16} {at:>3} {child.exitcode:>5} {saved.data['loop']['global_step'] if saved else '-':>5}"
        )
        if child.exitcode == 0:
            break
    else:
        final = context.Process(target=_attempt, args=(str(tmp_path / "killed"), "none", 0))
        final.start()
        final.join(120)
        assert final.exitcode == 0
    assert table["killed"] >= 20, table
    print("\n".join(log))
    print(f"kill test: {table['killed']} kills at {len(points_used)} points, resumed identical")
    record = results.from_dict(results.load(run_dir))
    _same_run(reference, record, tmp_path / "reference" / "runs" / f"{STRATEGY}-test", run_dir)
    assert record.timing["segments"] > 1
    hidden = [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert hidden == []
    assert not [p for p in run_dir.rglob("*.tmp")]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_the_next_step_and_the_run_resumes_from_it(tmp_path: Path, name: str) -> None:
    """A graceful stop: the signal arrives inside a step, the run checkpoints after it and ends
    ``interrupted`` (exit 143/130 in the CLI); re-running continues from that very step."""
    from cl_bench import loop
    from cl_bench.errors import RunInterrupted

    reference = _run(tmp_path / "reference")
    original, calls = loop.train_step, [0]
    stopped = {"steps": STEPS, "strategy_args": ARGS, "scenario_args": SCENARIO, "log_every": 2}

    def signalled(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), getattr(signal, name))
            time.sleep(0.05)
        return original(*args, **kwargs)

    loop.train_step = signalled  # type: ignore[assignment]
    try:
        with pytest.raises(RunInterrupted):
            quick_run(
                tmp_path / "stopped",
                STRATEGY,
                **stopped,
                keep_checkpoints=True,
                handle_signals=True,
                checkpoint_every=0,
                threads=1,
            )
    finally:
        loop.train_step = original  # type: ignore[assignment]
    run_dir = tmp_path / "stopped" / "runs" / f"{STRATEGY}-test"
    assert results.load(run_dir)["status"] == "interrupted"
    saved = checkpoint.read(run_dir)
    assert saved is not None
    assert saved.training
    assert saved.data["loop"]["global_step"] == 7
    resumed = quick_run(
        tmp_path / "stopped",
        STRATEGY,
        **stopped,
        keep_checkpoints=True,
        checkpoint_every=0,
        threads=1,
    )
    _same_run(reference, resumed, tmp_path / "reference" / "runs" / f"{STRATEGY}-test", run_dir)
