"""allora: ALLoRA, adaptive learning rate LoRA without dropout or scaling (Huang & Balestriero,
arXiv 2410.09692).

Forward: ``y = W0 x + b + B A x``, with no ``alpha / r`` factor and no dropout; A is
kaiming-uniform and B = 0, so the adapted model equals the backbone at the start.

Backward: the output gradient ``delta = dL/dy`` that reaches A and B is scaled per output row i by

    c_i = 1 / sqrt(||(B A)_i||_2 + 1 / eta^2)          (``norm: l2``, default)
    c_i = 1 / sqrt(||(B A)_i||_2^2 + 1 / eta^2)        (``norm: l2_squared``)

so ``dL/dB = (c ⊙ delta)^T (x A^T)`` and ``dL/dA = ((c ⊙ delta) B)^T x``, while the gradient sent
to the layer input stays the unscaled ``(delta B) A`` (the paper's "one more implementation
detail"). At B = 0, ``c = eta`` exactly: every row starts with an ``eta``-fold larger step, and a
row's step then shrinks as its norm grows (an inversely norm-proportional learning rate). ``c``
is a function of the weights only and is not differentiated through.

Choices (STRATEGIES.md Part A and Part B §6; there is no official code):
- the norm is taken over the rows of the product B A (third-party layer (a)), not of A and B
  separately, and it is recomputed at every step, not frozen at optimizer-state init;
- plain norm under the square root by default (as the third-party code), ``l2_squared`` as a flag
  (the abstract's "inverse to the l2 norm" reading); eta = 2 by default (sweep eta^2 in {1, 2, 4});
- implemented as a custom autograd function, because a hook on the branch output would also
  rescale the input gradient. The row norms come from the r x r Gram matrix,
  ``||(B A)_i||^2 = B_i (A A^T) B_i^T``, so B A ([d_out, d_in]) is never formed; they are computed
  in fp32 with autocast off, once per step at the start of the training forward for all layers
  of one shape together (a batched matmul instead of a dozen tiny kernels per layer; inside the
  forward, a CUDA-graph step replays this pass with the rest instead of launching it from
  Python). Under bf16 autocast the function receives x, A, B already cast to the autocast dtype
  (its device type is taken from the input), so its matmuls run in bf16 as ``nn.Linear`` would;
- continual learning: one adapter set trained through the whole stream, the optimizer rebuilt
  every experience; ``merge_each_experience`` folds ``B A`` into W0 and starts a fresh adapter;
- federation (issue 19): A and B of every adapter travel, as LoRA's (FLoRA, arXiv 2404.15182);
  ``c`` is a function of them, so nothing else does. ``aggregation = "product"`` averages ``B A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear
from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.lowrank import LowRank, init_lora_pair
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import AdapterTargetsConfig, ExperienceInfo, Strategy, StrategyContext

Norm = Literal["l2", "l2_squared"]


def row_scale(A: torch.Tensor, B: torch.Tensor, eta: float, norm: Norm = "l2") -> torch.Tensor:
    """``c_i = 1 / sqrt(n_i + 1 / eta^2)`` per output row i, with ``n_i = ||(B A)_i||`` (or its square).

    Evaluated as ``eta / sqrt(eta^2 n_i + 1)`` (the same number), which is exactly ``eta`` at
    B = 0. Computed in fp32 without forming B A: ``n_i^2 = B_i G B_i^T`` with the Gram matrix
    ``G = A A^T`` ([r, r]), in fp32 at least. A [..., r, d_in] and B [..., d_out, r] may carry
    leading batch dimensions (layers of one shape at once). The result has no autograd history.
    """
    with torch.no_grad(), torch.autocast(A.device.type, enabled=False):
        dtype = torch.promote_types(A.dtype, torch.float32)
        A32, B32 = A.to(dtype), B.to(dtype)
        squared = ((B32 @ (A32 @ A32.mT)) * B32).sum(dim=-1).clamp_min_(0.0)
        n = squared if norm == "l2_squared" else squared.sqrt_()
        return n.mul_(eta**2).add_(1.0).rsqrt_().mul_(eta)


class ALLoRALinear(AdaptedLinear):
    """``y = W0 x + b + B A x`` whose A/B gradients see the output gradient scaled by ``c`` (row_scale)."""

    step_scale: torch.Tensor

    def __init__(self, base: nn.Linear, r: int, eta: float, norm: Norm = "l2") -> None:
        super().__init__(base)
        if r < 1:
            raise ValueError(f"ALLoRA rank must be >= 1, got {r}")
        if not eta > 0:
            raise ValueError(f"ALLoRA eta must be > 0, got {eta}")
        self.r = r
        self.eta = eta
        self.norm: Norm = norm
        self.A, self.B = init_lora_pair(r, base.in_features, base.out_features, base.weight.device)
        # c of the current step, written in place by the strategy before the forward (a buffer, so
        # a step replayed from a CUDA graph reads this step's value); valid while ``scale_fresh``
        self.register_buffer(
            "step_scale", torch.ones(base.out_features, device=base.weight.device), persistent=False
        )
        self.scale_fresh = False

    def row_scale(self) -> torch.Tensor:
        """The per-row gradient scale ``c`` [d_out] (fp32) of the current A and B."""
        if self.scale_fresh:
            return self.step_scale
        return row_scale(self.A, self.B, self.eta, self.norm)

    def low_rank(self) -> LowRank:
        """``B A`` with no scaling; while A or B trains, their gradients see the output gradient scaled
        per row by ``c`` (the fused layer applies it to the A/B gradients only, not to the input's)."""
        training = torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)
        return LowRank(self.A, self.B, 1.0, grad_row_scale=self.row_scale() if training else None)

    def delta_weight(self) -> torch.Tensor:
        """``B A`` as a dense [d_out, d_in] matrix (no scaling factor)."""
        return self.B @ self.A

    def reset(self) -> None:
        """Fresh adapter (kaiming A, zero B), e.g. after merging it into the backbone."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()


@dataclass(frozen=True)
class ALLoRAConfig(AdapterTargetsConfig):
    eta: float = 2.0  # c = eta at B = 0; the paper sweeps eta^2 in {1, 2, 4}
    norm: Norm = "l2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ConfigError(f"strategy.eta must be a finite number > 0, got {self.eta}")


@STRATEGIES.register(
    "allora",
    description="ALLoRA: LoRA with per-row adaptive gradient scale, no dropout/alpha (arXiv 2410.09692)",
)
class ALLoRA(Strategy):
    Config = ALLoRAConfig
    paper = (
        "Huang & Balestriero 2024, ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws "
        "(arXiv 2410.09692)"
    )
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: ALLoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: ALLoRALinear(linear, cfg.r, cfg.eta, cfg.norm),
            roles=cfg.roles,
            towers=cfg.towers,
            merge_each_experience=cfg.merge_each_experience,
        )

        groups: dict[tuple[int, ...], list[ALLoRALinear]] = {}
        for adapter in self._adapters.values():
            groups.setdefault((*adapter.A.shape, *adapter.B.shape), []).append(adapter)
        self._groups = list(groups.values())

    def adapters(self) -> AdapterSet[ALLoRALinear]:
        return self._adapters

    def forward(self, x: torch.Tensor, exp: ExperienceInfo) -> torch.Tensor:
        """The backbone's logits; a forward that trains A or B first computes this step's ``c``."""
        if torch.is_grad_enabled() and any(
            a.A.requires_grad or a.B.requires_grad for a in self._adapters.values()
        ):
            self.refresh_scales()
        return super().forward(x, exp)

    def refresh_scales(self) -> None:
        """Compute this step's ``c`` of every layer, batched over the layers of one shape.

        One stacked computation per shape instead of a dozen small kernels per layer, run inside
        the training forward (so a CUDA graph replays it with the step). The cache lives from here
        to ``after_backward``, while A and B cannot change.
        """
        with torch.no_grad():
            for layers in self._groups:
                A = torch.stack([a.A for a in layers])
                B = torch.stack([a.B for a in layers])
                scales = row_scale(A, B, self.cfg.eta, self.cfg.norm)
                torch._foreach_copy_([a.step_scale for a in layers], list(scales.unbind(0)))
                for adapter in layers:
                    adapter.scale_fresh = True

    def after_backward(self, step: int) -> None:
        for adapter in self._adapters.values():
            adapter.scale_fresh = False

    def after_experience(self, exp: ExperienceInfo) -> None:
        self._adapters.end_experience()

    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A and B of every adapter (and a linear head where one trains); ``c`` follows from them."""
        return self.adapter_tensors(("A", "B"))

    def lowrank_pairs(self) -> list[tuple[str, str]]:
        """Every adapter's (B, A): its update is ``B A`` (no scale)."""
        return self.adapter_pairs()

    def report(self) -> dict[str, float | int]:
        """Mean and minimum gradient scale c over all adapted rows (eta at B = 0; smaller as rows grow)."""
        scales = torch.cat([a.row_scale() for a in self._adapters.values()])
        return {"c_mean": float(scales.mean()), "c_min": float(scales.min()), "eta": self.cfg.eta}

    def final_report(self) -> dict[str, Any]:
        return {
            "scalars": {**self.report()},
            "per_layer": {
                "c_mean": {name: float(a.row_scale().mean()) for name, a in self._adapters.items()}
            },
        }
