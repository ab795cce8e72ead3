"""The checkpoint contract: every registered strategy, stopped anywhere and resumed, ends exactly
as the run that never stopped (CPU, float32, bit for bit).

A run is made to fail at a chosen training step (an exception from ``train_step``, in-process:
the SIGKILL version is tests/core/test_resume_kill.py), is run again with the same run id, and
its record (accuracy matrix, metrics, losses, the strategy's figures) and its final checkpoint
(every saved tensor and the strategy's ``extra_state``) are compared with those of an
uninterrupted run of the same config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cl_bench import checkpoint
from cl_bench.registry import STRATEGIES
from cl_bench.results import RunResult
from tests.helpers import CrashError, crash_before_steps, quick_run

SCENARIO = {"n_classes": 6, "n_experiences": 3, "train_per_class": 8, "test_per_class": 4}
STEPS = 5  # per experience: global steps 1-5, 6-10, 11-15

# (strategy, its args): every registered strategy that trains, and the variants that change what
# the strategy keeps between steps (merging, per-experience structure, schedules, pruning)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("lora", {}),
    ("lora", {"merge_each_experience": True}),
    ("allora", {}),
    ("finetune", {}),
    ("linear-probe", {}),
    ("dylora", {}),
    ("dylora", {"mode": "frozen", "merge_each_experience": True}),
    ("sora", {}),
    ("sora", {"xi": [0.0, 0.5], "experiences_per_stage": 1}),
    ("lisa", {"gamma": 1, "interval_steps": 2}),
    ("lisa", {"gamma": 1, "interval_steps": 3, "optimizer_state": "reset"}),
    ("loraprune", {"prune_every": 1, "warmup": 0.0, "cooldown": 0.0}),
    ("loraprune", {"prune_every": 2, "merge_each_experience": True}),
    ("mora", {"r": 2, "topk": 2}),
    ("smora", {"r": 8, "k": 2}),
    ("smora", {"r": 8, "k": 2, "reset_balance_bias_each_experience": True}),
    ("flylora", {"r": 8, "k": 2}),
    ("flylora", {"r": 8, "k": 2, "cl_mode": "merge", "a_seed": "per_experience"}),
    ("flylora", {"r": 8, "k": 2, "cl_mode": "merge", "a_seed": "shared"}),
]


def test_every_training_strategy_has_a_case() -> None:
    covered = {name for name, _ in CASES}
    trainers = {name for name in STRATEGIES.names() if STRATEGIES.get(name).trains}
    assert trainers == covered


def _run(tmp: Path, strategy: str, args: dict[str, Any], **run: Any) -> RunResult:
    return quick_run(
        tmp,
        strategy,
        steps=STEPS,
        strategy_args=args,
        scenario_args=SCENARIO,
        log_every=2,
        keep_checkpoints=True,
        **run,
    )


def _interrupted_run(
    tmp: Path,
    strategy: str,
    args: dict[str, Any],
    crashes: list[int],
    monkeypatch: pytest.MonkeyPatch,
    **run: Any,
) -> RunResult:
    """Fail at each global step of ``crashes`` in turn (one per attempt), then finish."""
    done = 0
    for at in crashes:
        with monkeypatch.context() as patch:
            crash_before_steps(patch, {at - done})
            with pytest.raises(CrashError):
                _run(tmp, strategy, args, **run)
        saved = checkpoint.read(tmp / "runs" / f"{strategy}-test")
        done = saved.data["loop"]["global_step"] if saved else 0
    return _run(tmp, strategy, args, **run)


def _equal(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """The places where two checkpoint values differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        if not same:
            yield where
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            yield f"{where} keys {sorted(set(a) ^ set(b))[:4]}"
        for key in a.keys() & b.keys():
            yield from _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            yield f"{where} length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from _equal(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} != {b!r}"


def _without_timings(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The accuracy part of a record less the final variants' speed and memory (measurements)."""
    timed = ("eval_samples_per_s", "peak_memory_eval_bytes")
    variants = {
        k: {f: v for f, v in row.items() if f not in timed} for k, row in accuracy["variants"].items()
    }
    return {**accuracy, "variants": variants}


def _same_run(reference: RunResult, resumed: RunResult, ref_dir: Path, res_dir: Path) -> None:
    assert resumed.status == "ok"
    assert _without_timings(resumed.accuracy) == _without_timings(reference.accuracy)
    assert resumed.metrics == reference.metrics
    assert resumed.parameters == reference.parameters
    assert resumed.strategy_report == reference.strategy_report
    fields = ("loss_first", "loss_last", "loss_mean", "n_trainable", "n_added", "n_active", "strategy")
    for a, b in zip(reference.experiences, resumed.experiences, strict=True):
        assert {f: getattr(b, f) for f in fields} == {f: getattr(a, f) for f in fields}
    ref, res = checkpoint.read(ref_dir), checkpoint.read(res_dir)
    assert ref is not None
    assert res is not None
    for part in ("model", "strategy", "skipped", "backbone_fingerprint"):
        assert list(_equal(ref.data[part], res.data[part], part)) == []


@pytest.mark.parametrize(("strategy", "args"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_stopped_twice_inside_experiences_and_resumed_is_bit_identical(
    tmp_path: Path, strategy: str, args: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _run(tmp_path / "reference", strategy, args, checkpoint_every=2)
    resumed = _interrupted_run(tmp_path / "resumed", strategy, args, [8, 14], monkeypatch, checkpoint_every=2)
    assert resumed.timing["segments"] == 3
    run_dir = f"runs/{strategy}-test"
    _same_run(reference, resumed, tmp_path / "reference" / run_dir, tmp_path / "resumed" / run_dir)


@pytest.mark.parametrize(("strategy", "args"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_stopped_after_a_boundary_and_resumed_is_bit_identical(
    tmp_path: Path, strategy: str, args: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only experience-boundary checkpoints: the run continues at the start of experience 2."""
    run = {"checkpoint_every": 0, "checkpoint_minutes": 0.0}
    reference = _run(tmp_path / "reference", strategy, args, **run)
    resumed = _interrupted_run(tmp_path / "resumed", strategy, args, [13], monkeypatch, **run)
    assert resumed.timing["segments"] == 2
    run_dir = f"runs/{strategy}-test"
    _same_run(reference, resumed, tmp_path / "reference" / run_dir, tmp_path / "resumed" / run_dir)
