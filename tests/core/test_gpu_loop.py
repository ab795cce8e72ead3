"""The loop on a CUDA device in bf16: split-digits and generated CIFAR-100 files, graphs on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl_bench import config, loop
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
