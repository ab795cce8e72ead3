"""linear-probe: only the head-side parameters train.

For a linear head, the head itself; for CLIP (whose text-prototype head has no parameters), the
final norms and projections of both towers (the backbone's ``head_names``).

Federation (issue 19): a client sends exactly those trained tensors, under their state_dict names
(the base :meth:`Strategy.federated_tensors`).
"""

from __future__ import annotations

from cl_bench.backbones.base import Backbone
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy, StrategyConfig, StrategyContext


@STRATEGIES.register(
    "linear-probe", description="baseline: train only the head (CLIP: final norms and projections)"
)
class LinearProbe(Strategy):
    paper = "linear probing (Kornblith et al. 2019; Radford et al. 2021)"
    default_lr = 1e-3
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: StrategyConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_(name.startswith(self.backbone.head_names))
