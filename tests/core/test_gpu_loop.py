"""The loop on a CUDA device in bf16: split-digits and generated CIFAR-100 files, graphs on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl_bench import config, loop
from cl_bench.registry import STRATEGIES
from scenarios.cifar_files import write_cifar

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _run(tmp_path: Path, run_id: str, scenario: dict, **run) -> loop.RunResult:
    layers = [
        {
            "strategy": {"name": "lora"},
            "scenario": scenario,
            "steps_per_experience": 12,
            "batch_size": 32,
            "device": "cuda",
            "out": str(tmp_path / "runs"),
            "run_id": run_id,
            **run,
        }
    ]
    return loop.run(config.resolve(layers), progress=False)


def test_split_digits_runs_on_cuda_in_bf16(tmp_path: Path) -> None:
    record = _run(tmp_path, "digits", {"name": "split-digits"})
    assert record.status == "ok"
    assert record.config["device"] == "cuda"
    assert record.config["precision"] == "bf16"
    assert record.config["cuda_graphs"] is True
    assert record.environment["device"] == "cuda"
    assert all(
        e.peak_memory_train_bytes > 0 and e.memory_kind == "cuda_max_allocated" for e in record.experiences
    )


def test_generated_cifar100_runs_through_the_real_loader_on_cuda(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", "cifar100", n_train=2000, n_test=500)
    scenario = {"name": "split-cifar100", "root": str(tmp_path / "cifar"), "verify_checksums": False}
    record = _run(tmp_path, "cifar", scenario, backbone="tiny-clip")
    assert record.status == "ok"
    assert len(record.accuracy["matrix"]) == 10
    assert record.config["precision"] == "bf16"


def test_graphs_and_eager_runs_give_the_same_accuracy_matrix(tmp_path: Path) -> None:
    """fp32 without TF32: replaying the captured kernels computes what launching them does."""
    matrices = []
    for graphs in (True, False):
        record = _run(
            tmp_path,
            f"graphs-{graphs}",
            {"name": "split-digits"},
            cuda_graphs=graphs,
            precision="fp32",
        )
        matrices.append(record.accuracy["matrix"])
    assert matrices[0] == matrices[1]


# Strategies that declare graphs_span_experiences but are checked for reuse, not for equality with
# the eager run (test_finetune_spans_experiences), and why.
NOT_BITWISE = {
    "finetune": "trains the token embedding, whose backward accumulates with atomics (not reproducible)"
}
SPANNING = [
    n for n in STRATEGIES.names() if STRATEGIES.get(n).graphs_span_experiences and n not in NOT_BITWISE
]
STEP_GRAPHS = loop.step_graphs


def test_every_spanning_strategy_is_checked_against_eager_or_says_why_not() -> None:
    declared = {n for n in STRATEGIES.names() if STRATEGIES.get(n).graphs_span_experiences}
    assert set(NOT_BITWISE) <= declared
    assert set(SPANNING) == declared - set(NOT_BITWISE)
    assert "lora" in SPANNING


def _spanning_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, run_id: str, strategy_args=None, **run
) -> tuple[loop.RunResult, list]:
    """Three experiences of 5 full batches and a short one (88 images, batch 16), fp32, with the
    strategy's own ``graphs_span_experiences``; returns the record and the runner each experience
    trained with."""
    runners: list = []

    def recorded(*args, **kwargs):
        runner = STEP_GRAPHS(*args, **kwargs)
        runners.append(runner)
        return runner

    monkeypatch.setattr(loop, "step_graphs", recorded)
    scenario = {"name": "synthetic", "n_classes": 6, "n_experiences": 3, "train_per_class": 44}
    layers = [
        {
            "strategy": {"name": name, **(strategy_args or {})},
            "scenario": scenario,
            "backbone": "tiny-clip",
            "epochs": 1,
            "batch_size": 16,
            "train_classes": "current",
            "precision": "fp32",
            "device": "cuda",
            "out": str(tmp_path / "runs"),
            "run_id": run_id,
            **run,
        }
    ]
    return loop.run(config.resolve(layers), progress=False), runners


@pytest.mark.parametrize(
    ("name", "args"),
    [*((n, {}) for n in SPANNING), ("lora", {"strategy_args": {"towers": ["vision"]}})],
    ids=[*SPANNING, "lora-frozen-text"],
)
def test_a_runner_spanning_experiences_trains_as_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, args: dict
) -> None:
    """One runner for all three experiences (the frozen-text case reads the head's cached text
    features, refreshed in place), and the same accuracy matrix as the eager run."""
    graphed, runners = _spanning_run(tmp_path, monkeypatch, name, "graphs", **args)
    eager, _ = _spanning_run(tmp_path, monkeypatch, name, "eager", cuda_graphs=False, **args)
    assert len(runners) == 3
    assert runners[1] is runners[0]
    assert runners[2] is runners[0]
    assert runners[0].n_replays > runners[0].n_eager
    assert graphed.accuracy["matrix"] == eager.accuracy["matrix"]
    assert graphed.accuracy["initial"] == eager.accuracy["initial"]


def test_a_spanning_runner_captures_once_and_replays_short_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """18 steps: the full batch warms up twice and is captured in experience 1, the short one (8
    images) warms up in experiences 1 and 2 and is captured in experience 3; every other step
    replays. The loop releases the runner after the last experience."""
    record, runners = _spanning_run(tmp_path, monkeypatch, "lora", "counts")
    runner = runners[0]
    assert all(r is runner for r in runners)
    assert [e.steps for e in record.experiences] == [6, 6, 6]
    assert (runner.n_eager, runner.n_captures, runner.n_replays) == (4, 2, 14)
    assert runner.n_captured == 0  # released at the end of training


def test_finetune_spans_experiences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record, runners = _spanning_run(tmp_path, monkeypatch, "finetune", "finetune")
    assert record.status == "ok"
    assert all(r is runners[0] for r in runners)
    assert (runners[0].n_eager, runners[0].n_captures) == (4, 2)


def test_growing_logit_classes_get_a_new_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_classes=seen: a longer class list each experience, so no graph carries over; each
    replaced runner is released."""
    record, runners = _spanning_run(tmp_path, monkeypatch, "lora", "seen", train_classes="seen")
    assert record.status == "ok"
    assert len({id(r) for r in runners}) == 3
    assert all(r.n_captured == 0 for r in runners)
