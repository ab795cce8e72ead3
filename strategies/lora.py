"""lora: plain LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3), the reference adapter.

``y = W0 x + b + (alpha / r) B A x`` with A kaiming-uniform and B = 0 (the adapted model equals
the backbone at the start, exactly), on q/k/v/out/fc1/fc2 of every block of both CLIP towers by
default. Continual-learning protocol (STRATEGIES.md Part A): one set of adapters trained on
through the whole stream, optimizer rebuilt at every experience; ``merge_each_experience``
folds the adapter into the backbone after each experience and starts a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl_bench.adapters import ROLES, LoRALinear, available_towers, check_targets, inject, merge_into_base
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyConfig


@dataclass(frozen=True)
class LoRAConfig(StrategyConfig):
    r: int = 8
    alpha: float = 16.0
    roles: tuple[str, ...] = ROLES
    towers: tuple[str, ...] = ("vision", "text")
    merge_each_experience: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"strategy.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"strategy.alpha must be > 0, got {self.alpha}")
        check_targets(self.roles, self.towers)


@STRATEGIES.register(
    "lora", description="baseline: plain LoRA r=8, alpha=16 on q/k/v/out/fc1/fc2 of both towers"
)
class LoRA(Strategy):
    Config = LoRAConfig
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: LoRAConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.backbone.requires_grad_(False)
        self._adapters = inject(
            self.backbone,
            lambda linear, block, role: LoRALinear(linear, cfg.r, cfg.alpha),
            roles=cfg.roles,
            towers=available_towers(self.backbone, cfg.towers),
        )

    def adapters(self) -> dict[str, LoRALinear]:  # type: ignore[override]
        return self._adapters

    def after_experience(self, exp: ExperienceInfo) -> None:
        if self.cfg.merge_each_experience:
            for adapter in self._adapters.values():
                merge_into_base(adapter, adapter.delta_weight())
                adapter.reset()
