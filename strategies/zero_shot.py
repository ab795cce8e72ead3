"""zero-shot: no training. Every row of the accuracy matrix is the untrained model, scored with
that row's label space (the b row repeated up to the label-space rule)."""

from __future__ import annotations

from typing import Any

from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy


@STRATEGIES.register(
    "zero-shot", description="baseline: the untrained backbone (CLIP zero-shot), no training"
)
class ZeroShot(Strategy):
    paper = "Radford et al. 2021, CLIP (zero-shot classification with class-name prompts)"
    trains = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)
