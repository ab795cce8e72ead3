"""zero-shot: no training. Every row of the accuracy matrix is the untrained model, scored with
that row's label space (the b row repeated up to the label-space rule).

Federation (issue 19): nothing trains, so nothing can be federated (``federable = False``;
:meth:`ZeroShot.communicated_state` raises :class:`~cl_bench.errors.FederationError`)."""

from __future__ import annotations

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import FederationError
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy, StrategyConfig, StrategyContext


@STRATEGIES.register(
    "zero-shot", description="baseline: the untrained backbone (CLIP zero-shot), no training"
)
class ZeroShot(Strategy):
    paper = "Radford et al. 2021, CLIP (zero-shot classification with class-name prompts)"
    trains = False
    federable = False

    def __init__(self, cfg: StrategyConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)

    def communicated_state(self) -> dict[str, torch.Tensor]:
        raise FederationError("zero-shot trains nothing: there is nothing to federate")
