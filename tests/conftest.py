"""Shared fixtures (helpers live in tests/helpers.py, importable as ``tests.helpers``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cl_bench import config
from cl_bench.registry import SCENARIOS
from cl_bench.results import RunResult
from tests.helpers import QUICK_SCENARIO, quick_run


@pytest.fixture
def run_quick(tmp_path: Path) -> Callable[..., RunResult]:
    """``run_quick(strategy, **kw)``: a complete CPU run of a few steps in ``tmp_path``."""
    return lambda strategy, **kw: quick_run(tmp_path, strategy, **kw)


@pytest.fixture(scope="session")
def synthetic_scenario() -> Any:
    return config.build(SCENARIOS.get("synthetic"), QUICK_SCENARIO, "synthetic").build(order_seed=0)
