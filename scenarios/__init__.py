"""Scenario factories (registered in cl_bench.registry.SCENARIOS on import).

This package and :mod:`scenarios.common` are the only places that import Avalanche.
"""

from scenarios import multidomain, split_cifar, split_digits, synthetic

__all__ = ["multidomain", "split_cifar", "split_digits", "synthetic"]
