"""Adapters: a frozen ``nn.Linear`` (``base``) plus a method-specific update, and putting them in.

:class:`AdaptedLinear` is the base of every adapter (:class:`LoRALinear` is plain LoRA);
:func:`inject` replaces the backbone's linears by adapters; :func:`fused_projections` runs several
layers that read the same input as one GEMM; :func:`count` and :func:`nbytes` count what a method
adds; :func:`check_targets` validates the roles and towers of a config. The low-rank maths lives in
:mod:`cl_bench.lowrank`, the set of a strategy's adapters in :mod:`cl_bench.adapter_set`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import ROLES, Backbone, Block, Tower
from cl_bench.lowrank import LowRank, init_lora_pair, lora_linear, lora_linears


class AdaptedLinear(nn.Module):
    """Base of every adapter: a frozen ``base`` linear plus a method-specific ``delta(x)``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight W0 (adapters never change it)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def low_rank(self) -> LowRank | None:
        """The update as low-rank factors, for the fused path (None: the method has its own ``delta``)."""
        return None

    def routed(self, x: torch.Tensor) -> Any:
        """The update as a :class:`cl_bench.routed.RoutedUpdate` for the fused routed path, when
        that path serves input ``x`` (None: ``low_rank`` or ``delta``; SMoRA and FlyLoRA say)."""
        return None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone (reference path; the fused path never calls it)."""
        factors = self.low_rank()
        if factors is None:
            raise NotImplementedError
        return factors.delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.low_rank()
        if factors is None:
            update = self.routed(x)
            if update is not None:
                from cl_bench.routed import routed_linears  # routed.py builds on this module

                return routed_linears(x, ((self.base.weight, self.base.bias, update),))
            return self.base(x) + self.delta(x)
        return lora_linear(x, self.base.weight, self.base.bias, factors)

    def added_tensors(self) -> list[torch.Tensor]:
        """What the method added to this layer, for counting (default: every parameter except the
        frozen base layer's; methods with banks, masks or bias buffers list those too)."""
        base_ids = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base_ids]

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense [d_out, d_in] matrix, to fold it into W0 (methods that can)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be folded into its base weight")

    def reset(self) -> None:
        """A fresh adapter in place (the method's initialisation), e.g. after folding it into W0."""
        raise NotImplementedError(f"{type(self).__name__} cannot be reset")


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` at a role, unwrapping any adapter."""
    while isinstance(module, AdaptedLinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
    return module


def select_blocks(backbone: Backbone, towers: Sequence[str]) -> list[Block]:
    """The blocks of the named towers (``"vision"``, ``"text"``), in model order."""
    unknown = set(towers) - {"vision", "text"}
    if unknown:
        raise ValueError(f"unknown tower(s) {sorted(unknown)}; valid: vision, text")
    return [b for b in backbone.blocks if b.tower in towers]


AdapterT = TypeVar("AdapterT", bound=AdaptedLinear)


def inject(
    backbone: Backbone,
    factory: Callable[[nn.Linear, Block, str], AdapterT],
    *,
    roles: Sequence[str] = ROLES,
    towers: Sequence[str] = ("vision", "text"),
) -> dict[str, AdapterT]:
    """Replace the linear at each ``role`` of each block of ``towers`` by ``factory(linear, block, role)``.

    Returns ``{"vision.3.q": adapter, ...}`` in model order. The new modules are moved to the
    base weight's device. Roles missing from a block (none for CLIP/ViT) are an error.
    """
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"unknown role(s) {bad}; valid: {', '.join(ROLES)}")
    adapters: dict[str, AdapterT] = {}
    for block in select_blocks(backbone, towers):
        block_module = backbone.block_module(block)
        for role in roles:
            path = block.linears[role]
            parent_path, _, attr = path.rpartition(".")
            parent = block_module.get_submodule(parent_path) if parent_path else block_module
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{block.name}.{role} is already adapted ({type(linear).__name__})")
            adapter = factory(linear, block, role).to(linear.weight.device)
            setattr(parent, attr, adapter)
            adapters[f"{block.name}.{role}"] = adapter
    return adapters


def fused_projections(x: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor | None:
    """The outputs of several linear layers that read the same ``x``, concatenated, in one GEMM.

    Works when every module is a plain ``nn.Linear`` (weights concatenated; gradients flow back to
    each), every module is an adapter with low-rank factors (:func:`lora_linears`), or every module
    is a routed adapter on its fused path (:func:`cl_bench.routed.routed_linears`). Returns None
    otherwise (e.g. MoRA's routed layers, or a mix), and the caller runs them one by one.
    """
    if all(type(m) is nn.Linear for m in modules):
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        weight = torch.cat([m.weight for m in linears])
        biases = [m.bias for m in linears]
        bias = torch.cat([b for b in biases if b is not None]) if all(b is not None for b in biases) else None
        if bias is None and any(b is not None for b in biases):
            return None
        return F.linear(x, weight, bias)
    if not all(isinstance(m, AdaptedLinear) for m in modules):
        return None
    adapted = [m for m in modules if isinstance(m, AdaptedLinear)]
    updates = [m.routed(x) for m in adapted]
    if all(u is not None for u in updates):
        from cl_bench.routed import routed_linears  # routed.py builds on this module

        return routed_linears(
            x, tuple((m.base.weight, m.base.bias, u) for m, u in zip(adapted, updates, strict=True))
        )
    layers = []
    for m in adapted:
        f = m.low_rank()
        if f is None:
            return None
        layers.append((m.base.weight, m.base.bias, f))
    return lora_linears(x, tuple(layers))


class LoRALinear(AdaptedLinear):
    """Plain LoRA (Hu et al. 2021, Eq. 3): ``y = W0 x + b + (alpha / r) B A x``, B = 0 at start."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__(base)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.A, self.B = init_lora_pair(r, base.in_features, base.out_features, base.weight.device)

    def low_rank(self) -> LowRank:
        return LowRank(self.A, self.B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` as a dense [d_out, d_in] matrix."""
        return (self.B @ self.A) * self.scaling

    def reset(self) -> None:
        """Fresh adapter (kaiming A, zero B), e.g. after merging it into the backbone."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()


@torch.no_grad()
def merge_into_base(adapter: AdaptedLinear, delta_weight: torch.Tensor) -> None:
    """Add a dense update to the frozen base weight (in its own dtype)."""
    adapter.base.weight.add_(delta_weight.to(adapter.base.weight.dtype))


def count(params: Iterable[torch.Tensor]) -> int:
    """Number of elements of the unique tensors in ``params``."""
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def nbytes(params: Iterable[torch.Tensor]) -> int:
    """Storage bytes of the unique tensors in ``params``."""
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def check_targets(roles: Sequence[str], towers: Sequence[str]) -> None:
    """Validate the adapter target names of a strategy config (raises ConfigError)."""
    from cl_bench.errors import ConfigError

    bad_roles = [r for r in roles if r not in ROLES]
    bad_towers = [t for t in towers if t not in ("vision", "text")]
    if bad_roles or not roles:
        raise ConfigError(
            f"strategy.roles must be a non-empty subset of {', '.join(ROLES)}, got {list(roles)}"
        )
    if bad_towers or not towers:
        raise ConfigError(f"strategy.towers must be a non-empty subset of vision, text, got {list(towers)}")


def available_towers(backbone: Backbone, towers: Sequence[str]) -> tuple[Tower, ...]:
    """The requested towers the backbone has (a vision-only backbone drops ``text``)."""
    return tuple(t for t in towers if t in backbone.towers())
