"""zero-shot: no training. Every row of the accuracy matrix is the untrained model, scored with
that row's label space (the b row repeated up to the label-space rule)."""

from __future__ import annotations

from cl_bench.backbones.base import Backbone
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy, StrategyConfig, StrategyContext


@STRATEGIES.register(
    "zero-shot", description="baseline: the untrained backbone (CLIP zero-shot), no training"
)
class ZeroShot(Strategy):
    paper = "Radford et al. 2021, CLIP (zero-shot classification with class-name prompts)"
    trains = False

    def __init__(self, cfg: StrategyConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)
