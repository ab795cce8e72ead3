"""cl-bench: a continual-learning benchmark harness for LoRA-family parameter-efficient fine-tuning.

The core package is method-agnostic. Strategies, scenarios and reports live in the top-level
packages ``strategies``, ``scenarios`` and ``reports``; only ``cl_bench.cli`` imports them.
"""

from typing import Any

__version__ = "0.1.0"

# The Python API for notebooks (``cl_bench.run(strategy="lora", scenario="split-digits")``,
# ``cl_bench.load_results("runs/")``), imported on first use so that ``import cl_bench`` stays free
# of pandas, numpy and torch.
_LAZY = {
    "run": "cl_bench.api",
    "load_results": "cl_bench.results",
    "load_matrices": "cl_bench.results",
    "load_runs": "cl_bench.results",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cl_bench' has no attribute {name!r}")
