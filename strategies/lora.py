"""lora: plain LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3), the reference adapter.

``y = W0 x + b + (alpha / r) B A x`` with A kaiming-uniform and B = 0 (the adapted model equals
the backbone at the start, exactly), on q/k/v/out/fc1/fc2 of every block of both CLIP towers by
default. Continual-learning protocol (STRATEGIES.md Part A): one set of adapters trained on
through the whole stream, optimizer rebuilt at every experience; ``merge_each_experience``
folds the adapter into the backbone after each experience and starts a fresh one.

Federation (issue 19): a client sends A and B of every adapter (``"<adapter>.A"``,
``"<adapter>.B"``, e.g. ``"vision.3.q.A"``) and a linear head where one trains, as FLoRA (arXiv
2404.15182) shares only the adapters; the server averages the factors (FedAvg) or, with
``aggregation = "product"``, the products B A (:meth:`LoRA.lowrank_pairs`). With
``merge_each_experience`` every replica folds the same broadcast adapter into its W0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import LoRALinear
from cl_bench.backbones.base import Backbone
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, LoRAFamilyConfig, Strategy, StrategyContext


@dataclass(frozen=True)
class LoRAConfig(LoRAFamilyConfig):
    """The shared LoRA-family fields only: r = 8, alpha = 16, q/k/v/out/fc1/fc2 of both towers."""


@STRATEGIES.register(
    "lora", description="baseline: plain LoRA r=8, alpha=16 on q/k/v/out/fc1/fc2 of both towers"
)
class LoRA(Strategy):
    Config = LoRAConfig
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: LoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: LoRALinear(linear, cfg.r, cfg.alpha),
            roles=cfg.roles,
            towers=cfg.towers,
            merge_each_experience=cfg.merge_each_experience,
        )

    def adapters(self) -> AdapterSet[LoRALinear]:
        return self._adapters

    def after_experience(self, exp: ExperienceInfo) -> None:
        self._adapters.end_experience()

    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A and B of every adapter (and a linear head where one trains)."""
        return self.adapter_tensors(("A", "B"))

    def lowrank_pairs(self) -> list[tuple[str, str]]:
        """Every adapter's (B, A): its update is ``(alpha / r) B A``."""
        return self.adapter_pairs()
