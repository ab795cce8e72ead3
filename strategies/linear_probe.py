"""linear-probe: only the head-side parameters train.

For a linear head, the head itself; for CLIP (whose text-prototype head has no parameters), the
final norms and projections of both towers (the backbone's ``head_names``).
"""

from __future__ import annotations

from typing import Any

from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy


@STRATEGIES.register(
    "linear-probe", description="baseline: train only the head (CLIP: final norms and projections)"
)
class LinearProbe(Strategy):
    paper = "linear probing (Kornblith et al. 2019; Radford et al. 2021)"
    default_lr = 1e-3
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_(name.startswith(self.backbone.head_names))
