"""Shared fixtures (helpers live in tests/helpers.py, importable as ``tests.helpers``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cl_bench import config
from cl_bench.registry import SCENARIOS
from cl_bench.results import RunResult
from tests.helpers import QUICK_SCENARIO, quick_run

REQUIRE_GPU_ENV = "CL_BENCH_REQUIRE_GPU"


def pytest_configure(config: pytest.Config) -> None:
    """``CL_BENCH_REQUIRE_GPU=1`` (set by ``tox -e gpu``) makes a missing CUDA device an error.

    Without it every ``gpu`` test skips on a machine without CUDA, and a GPU CI job whose driver
    is broken would pass with nothing run.
    """
    if os.environ.get(REQUIRE_GPU_ENV) == "1":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{REQUIRE_GPU_ENV}=1 but torch sees no CUDA device")


@pytest.fixture
def run_quick(tmp_path: Path) -> Callable[..., RunResult]:
    """``run_quick(strategy, **kw)``: a complete CPU run of a few steps in ``tmp_path``."""
    return lambda strategy, **kw: quick_run(tmp_path, strategy, **kw)


@pytest.fixture(scope="session")
def synthetic_scenario() -> Any:
    return config.build(SCENARIOS.get("synthetic"), QUICK_SCENARIO, "synthetic").build(order_seed=0)
