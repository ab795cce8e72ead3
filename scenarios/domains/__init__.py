"""The image domains of the multi-domain benchmarks (X-TAIL, MTIL), one module per dataset.

Importing this package registers every domain in :data:`scenarios.domains.base.DOMAINS`.
"""

from scenarios.domains.base import (
    BENCHMARKS,
    DOMAINS,
    Benchmark,
    DomainData,
    DomainSpec,
    ReadOptions,
    Split,
    lookup,
)

__all__ = ["BENCHMARKS", "DOMAINS", "Benchmark", "DomainData", "DomainSpec", "ReadOptions", "Split", "lookup"]
