"""Strategies, one file each, registered in cl_bench.registry.STRATEGIES on import.

Adding a strategy touches three places: its file here, one import line below, and one row in
the contract test matrix (tests/strategies/test_contract.py).
"""

from strategies import (
    allora,
    dylora,
    finetune,
    flylora,
    linear_probe,
    lisa,
    lora,
    loraprune,
    mora,
    smora,
    sora,
    zero_shot,
)

__all__ = [
    "allora",
    "dylora",
    "finetune",
    "flylora",
    "linear_probe",
    "lisa",
    "lora",
    "loraprune",
    "mora",
    "smora",
    "sora",
    "zero_shot",
]
