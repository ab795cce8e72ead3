"""cl-bench: a continual-learning benchmark harness for LoRA-family parameter-efficient fine-tuning.

The core package is method-agnostic. Strategies, scenarios and reports live in the top-level
packages ``strategies``, ``scenarios`` and ``reports``; only ``cl_bench.cli`` imports them.
"""

__version__ = "0.1.0"
