"""loraprune: LoRA-guided structured pruning (Zhang et al. 2024, arXiv 2305.18403, ACL Findings).

LoRA (``y = W0 x + b + s B A x``, s = alpha / r, B = 0 at start) on q/k/v/out/fc1/fc2 of every
block, plus structured masks: whole attention heads (head count and head size read from the
model, e.g. 12 x 64 for CLIP ViT-B, never a hard-coded 32 x 128) and MLP channels. A mask
multiplies the output of q, k, v (per head) and fc1 (per channel), bias included; out and fc2
are the fan-in side of the same groups and are sliced along their input dimension.

Importance (paper Sec. 3, the LoRA-guided criterion; official ``compute_sensitivity``; the
numbers (1)-(4) are this file's): the full-weight gradient is estimated from the LoRA gradients,

    G_hat = dB A + B dA - dB dA                                            (1)

(``dA``, ``dB`` are the autograd gradients, which already contain s), and the element importance
is the first-order Taylor term on the merged weight,

    I = | G_hat * (W0 + s B A) |                                           (2)

reduced per group: row sums of q/k/v/fc1 and column sums of out/fc2, summed within a head. Each
layer's group vector is L2-normalised (``||.|| + 1e-8``), the vectors of a group's layers are
summed, and the result is smoothed, ``I_bar = 0.9 I_bar + 0.1 I_hat`` (3), starting at 0;
a step whose importance is not finite anywhere leaves every average unchanged.

Sparsity schedule (cubic, as AdaLoRA's budget; official ``schedule_sparsity_ratio``) over the
T steps of the whole stream, with warm-up w = 0.1 and cool-down c = 0.1:

    ratio(t) = 0                                      for t <= w T
    ratio(t) = R                                      for t > T - c T
    ratio(t) = R (1 - (1 - (t - w T) / (T - (w + c) T))^3)     otherwise      (4)

Every 10 steps, when 0 < ratio(t) < R strictly, each prunable block keeps its groups ranked by
``I_bar`` and zeroes the lowest ``floor(ratio(t) n)`` ("local" pruning: every layer to the same
ratio). No pruning happens in the cool-down, so the achieved sparsity ends slightly under R, by
design. The first ``floor(0.1 L)`` blocks and the last block of each tower are never pruned.

After the stream the model is physically sliced (``final_variants()["sliced"]``): LoRA and masks
are folded into plain ``nn.Linear`` layers, q/k/v rows and out columns of the pruned heads and
fc1 rows and fc2 columns of the pruned channels are removed. Attention of open_clip
(:class:`~cl_bench.backbones.attention.UnfusedAttention`) and of transformers CLIP/ViT reshape with ``-1``
heads, so the sliced blocks run unchanged. ``final_variants()["merged"]`` is the same dense
model before slicing, the speed reference without LoRA overhead.

Choices where the paper, the official code and continual learning leave room:

- CL: one schedule over the stream's total steps; masks persist across experiences and never
  revive; the importance average is kept across experiences (the official code resets it only
  at the start of ``train()``, which here is the start of the stream).
- Monotone masks: the official code ranks ``I_bar * mask`` and rebuilds the mask from ones, so an
  already pruned group (score 0) could tie with a live group of importance 0 and revive. Pruned
  groups are ranked strictly lowest here, and the new mask is multiplied by the old one.
- Importance is computed in ``after_backward`` (after clipping, before ``optimizer.step``, as in
  the official trainer) for every prunable block, on the device, with no host synchronisation;
  the non-finite skip uses ``torch.where`` instead of the official ``isnan(...).sum()`` check.
  Layers of one shape and group position are scored by one batched product
  (:class:`ImportancePlan`): on ViT-B/16 a step issues 282 top-level ops for it instead of 2,402.
- LoRA dropout is 0 (the official default is 0.05); all six roles are adapted (every layer of a
  pruning group needs its LoRA gradients).

Federation (issue 19): a client sends the LoRA factors of every adapter (``"<adapter>.A"``,
``"<adapter>.B"``), and per pruning group its mask and its importance average
(``"<group>.mask"``, ``"<group>.importance"``, e.g. ``"vision.3.attn.mask"``: one entry per head
or channel, not the expanded layer masks, which follow from them). The server averages factors
and importance (FedAvg; the importance must travel because clients start every round from the
server's state, whose average would otherwise never move) and agrees on the masks by weighted
majority (:func:`mask_agreement`): a unit is kept iff the clients keeping it hold at least half
of the weight of the clients that sent the mask (ties keep; one client: its mask). Every client
starts a round from the global mask and only prunes further, so the global mask still never
revives a unit across rounds; a unit a minority pruned comes back, and the schedule prunes it (or
another) again in a later round. ``aggregation = "product"`` averages the LoRA products.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import LoRALinear, base_linear, check_targets
from cl_bench.backbones.base import ROLES, Backbone, Block
from cl_bench.errors import ConfigError, FederationError
from cl_bench.heads import Head
from cl_bench.lowrank import LowRank
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyConfig, StrategyContext

log = logging.getLogger(__name__)
_GROUPS = {"attn": (("q", "k", "v"), "out"), "mlp": (("fc1",), "fc2")}


def sparsity_schedule(
    step: int, total: int, target: float, warmup: float = 0.1, cooldown: float = 0.1
) -> float:
    """Cubic target sparsity at ``step`` of ``total`` steps, from 0 to ``target`` (Eq. 4)."""
    if step <= warmup * total:
        return 0.0
    if step > total - cooldown * total:
        return target
    progress = (step - warmup * total) / (total - (warmup + cooldown) * total)
    return target * (1.0 - (1.0 - progress) ** 3)


def mask_agreement(masks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted-majority mask: a unit is kept (1) iff the clients keeping it (mask > 0) hold at
    least half of the total weight of ``weights``; a tie keeps it. One client: its mask, exactly.
    Weights summed in float64, so a tie is decided exactly."""
    if not masks or len(masks) != len(weights):
        raise FederationError(f"mask agreement of {len(masks)} masks with {len(weights)} weights")
    if len({tuple(m.shape) for m in masks}) > 1:
        raise FederationError(f"masks of different shapes {sorted({tuple(m.shape) for m in masks})}")
    total = sum(float(w) for w in weights)
    if not total > 0:
        raise FederationError(f"mask agreement needs a positive total weight, got {list(weights)}")
    first = masks[0]
    kept = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for m, w in zip(masks, weights, strict=True):
        kept.add_((m.to(first.device) > 0).double(), alpha=float(w))
    return (2.0 * kept >= total).to(first.dtype)


def prunable_blocks(n_blocks: int) -> list[int]:
    """Block indices that may be pruned: all but the first ``floor(0.1 n)`` and the last."""
    return [i for i in range(n_blocks) if int(0.1 * n_blocks) <= i < n_blocks - 1]


class MaskedLoRALinear(LoRALinear):
    """LoRA whose whole output (``W0 x + b + s B A x``) may be multiplied by a {0,1} ``mask`` buffer."""

    mask: torch.Tensor | None

    def __init__(self, base: nn.Linear, r: int, alpha: float, masked: bool) -> None:
        super().__init__(base, r, alpha)
        ones = torch.ones(base.out_features, device=base.weight.device) if masked else None
        self.register_buffer("mask", ones)

    def low_rank(self) -> LowRank:
        """LoRA with the mask on whole output rows (base, update and bias), folded into the fused layer."""
        return LowRank(self.A, self.B, self.scaling, out_mask=self.mask)

    def added_tensors(self) -> list[torch.Tensor]:
        """The LoRA factors and the mask buffer."""
        return super().added_tensors() + ([] if self.mask is None else [self.mask])

    def folded(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (LoRA merged, mask folded into rows)."""
        base = self.base
        linear = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        dtype = torch.promote_types(base.weight.dtype, torch.float32)  # merge at least in fp32
        with torch.no_grad():
            weight = base.weight.to(dtype) + self.delta_weight().to(dtype)
            bias = base.bias.to(dtype) if base.bias is not None else None
            if self.mask is not None:
                weight = weight * self.mask[:, None]
                bias = bias * self.mask if bias is not None else None
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear


@dataclass
class PruneGroup:
    """One pruning group: the heads of a block's attention or the channels of its MLP."""

    name: str  # e.g. "vision.3.attn"
    block: Block
    kind: str  # "attn" | "mlp"
    fan_out: list[MaskedLoRALinear]  # masked along the output dimension
    fan_in: MaskedLoRALinear  # contributes importance along its input dimension
    size: int  # head_dim for attention, 1 for MLP channels
    n: int  # number of heads / channels
    importance: torch.Tensor  # EMA of the normalised group importance [n]
    mask: torch.Tensor  # group mask [n], 1 = kept
    n_pruned: int = 0

    def scored_layers(self) -> list[tuple[MaskedLoRALinear, int]]:
        """The group's layers in the order their importance is summed, each with the weight
        dimension its units lie along (0: output rows, q/k/v/fc1; 1: input columns, out/fc2)."""
        return [*((m, 0) for m in self.fan_out), (self.fan_in, 1)]

    def prune_to(self, ratio: float) -> None:
        """Zero the ``floor(ratio n)`` lowest-importance groups; pruned groups stay pruned."""
        k = math.floor(ratio * self.n)
        if k <= self.n_pruned:
            return
        score = torch.where(self.mask > 0, self.importance, torch.full_like(self.importance, -1.0))
        order = torch.argsort(score, stable=True)
        new = torch.ones_like(self.mask).scatter_(0, order[:k], 0.0)  # index assignment would sync
        self.mask.mul_(new)
        self.n_pruned = k
        expanded = self.mask[:, None].expand(self.n, self.size).reshape(-1)
        for layer in self.fan_out:
            assert layer.mask is not None
            layer.mask.copy_(expanded)

    def removed_parameters(self) -> int:
        """Backbone parameters removed by slicing (weights and biases; LoRA is merged first)."""
        units = self.n_pruned * self.size
        removed = sum(units * (m.in_features + (m.bias is not None)) for m in self.fan_out)
        return removed + units * self.fan_in.out_features


# At most this many weight elements per batched importance product (2**25 fp32: 128 MiB each of
# the three transient tensors), so a large model's layers of one shape are scored in chunks.
_SCORE_CHUNK = 2**25


def layer_scores(layers: Sequence[MaskedLoRALinear], along: int) -> torch.Tensor:
    """``|G_hat * (W0 + s B A)|`` (Eq. 1-2) of same-shaped layers, summed onto the units ``along``
    (0: a sum per output row; 1: per input column): [len(layers), units].

    One batched product for all the layers instead of ~10 kernels each: the importance runs in
    the eager part of every step, after the graph's backward, and ~120 layers' worth of small
    kernels launched from Python (2,400 on ViT-B/16) made LoRAPrune's step wait for the host.
    ``G_hat = dB A + (B - dB) dA`` is one GEMM of rank 2r (Eq. 1).
    """
    A = torch.stack([m.A for m in layers])  # under no_grad (the caller's): no detach ops needed
    B = torch.stack([m.B for m in layers])
    gA = torch.stack([m.A.grad for m in layers])  # type: ignore[misc]  # the caller checked: not None
    gB = torch.stack([m.B.grad for m in layers])  # type: ignore[misc]
    g_hat = torch.cat([gB, B - gB], dim=2).bmm(torch.cat([A, gA], dim=1))
    merged = torch.stack([m.base.weight for m in layers]).to(A.dtype)
    merged.baddbmm_(B, A, alpha=layers[0].scaling)
    return g_hat.mul_(merged).abs_().sum(dim=2 - along)


@dataclass(frozen=True)
class _Bucket:
    """Layers of one shape, one position in their groups (q, k, v or out ...) and one group size,
    scored together; ``rows`` are their groups' rows in the family's totals."""

    layers: tuple[MaskedLoRALinear, ...]
    along: int
    n: int
    size: int
    family: int
    rows: torch.Tensor


class ImportancePlan:
    """The batched form of the per-group importance of one step (Eq. 1-3's inputs).

    For each group: the sum over its layers, in the order of :meth:`PruneGroup.scored_layers`, of
    each layer's unit importance reduced per group and L2-normalised (``||.|| + 1e-8``). Layers are
    batched by shape and position in their group; a group's sum accumulates its positions in order,
    as the per-layer loop would. Built for one set of layers with gradients (the index tensors live
    on the device, so a step uploads nothing) and rebuilt when that set changes.
    """

    def __init__(self, groups: Sequence[PruneGroup], live: tuple[tuple[bool, ...], ...]) -> None:
        self.live = live  # per group, per scored layer: has gradients
        families: dict[tuple[int, int, torch.device], list[int]] = {}
        for gi, g in enumerate(groups):
            if any(live[gi]):
                families.setdefault((g.n, g.size, g.importance.device), []).append(gi)
        self.families = list(families.values())
        where = {gi: (f, r) for f, members in enumerate(self.families) for r, gi in enumerate(members)}
        grouped: dict[tuple[Any, ...], list[tuple[MaskedLoRALinear, int]]] = {}
        for gi, g in enumerate(groups):
            for position, ((layer, along), has_grad) in enumerate(
                zip(g.scored_layers(), live[gi], strict=True)
            ):
                if not has_grad:
                    continue
                key = (
                    position,
                    along,
                    where[gi][0],
                    layer.scaling,
                    tuple(layer.base.weight.shape),
                    layer.A.dtype,
                    layer.base.weight.dtype,
                )
                grouped.setdefault(key, []).append((layer, where[gi][1]))
        self.buckets: list[_Bucket] = []
        for key in sorted(grouped, key=lambda k: k[0]):  # positions in order: the per-group sum order
            _, along, family = key[:3]
            first = groups[self.families[family][0]]  # a family's groups share n and size
            members = grouped[key]
            per_layer = members[0][0].base.weight.numel()
            step = max(1, _SCORE_CHUNK // per_layer)
            device = members[0][0].A.device
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                self.buckets.append(
                    _Bucket(
                        layers=tuple(m for m, _ in chunk),
                        along=along,
                        n=first.n,
                        size=first.size,
                        family=family,
                        rows=torch.tensor([r for _, r in chunk], device=device),
                    )
                )

    def totals(self) -> list[torch.Tensor]:
        """Per family, the step's importance of its groups [groups, n] (rows as ``families``)."""
        out: list[torch.Tensor | None] = [None] * len(self.families)
        for b in self.buckets:
            per_group = layer_scores(b.layers, b.along).view(len(b.layers), b.n, b.size).sum(2)
            per_group = per_group / (torch.linalg.vector_norm(per_group, dim=1, keepdim=True) + 1e-8)
            acc = out[b.family]
            if acc is None:
                acc = out[b.family] = per_group.new_zeros(len(self.families[b.family]), b.n)
            if b.rows.numel() == acc.shape[0]:  # every group of the family, in order (the usual case)
                acc.add_(per_group)
            else:
                acc.index_add_(0, b.rows, per_group)
        return [t for t in out if t is not None]


@dataclass(frozen=True)
class LoRAPruneConfig(StrategyConfig):
    """``ratio``: target sparsity R; ``warmup``/``cooldown``: fractions of the stream's steps;
    ``prune_every``: steps between pruning rounds; ``ema``: importance smoothing (Eq. 3)."""

    r: int = 8
    alpha: float = 16.0
    ratio: float = 0.5
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10
    ema: float = 0.9
    towers: tuple[str, ...] = ("vision", "text")
    merge_each_experience: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"strategy.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"strategy.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"strategy.ratio must be in [0, 1), got {self.ratio}")
        if not (
            0.0 <= self.warmup < 1.0 and 0.0 <= self.cooldown < 1.0 and self.warmup + self.cooldown < 1.0
        ):
            raise ConfigError(
                f"strategy.warmup and strategy.cooldown must be in [0, 1) with a sum below 1, "
                f"got {self.warmup} and {self.cooldown}"
            )
        if self.prune_every < 1:
            raise ConfigError(f"strategy.prune_every must be >= 1, got {self.prune_every}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"strategy.ema must be in [0, 1), got {self.ema}")
        check_targets(ROLES, self.towers)


def _replace(backbone: Backbone, block: Block, role: str, module: nn.Module) -> None:
    path = block.linears[role]
    parent_path, _, attr = path.rpartition(".")
    block_module = backbone.block_module(block)
    parent = block_module.get_submodule(parent_path) if parent_path else block_module
    setattr(parent, attr, module)


def _sliced(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``linear`` keeping only the output rows (dim 0) or input columns (dim 1) in ``keep``."""
    weight = linear.weight.detach().index_select(dim, keep)
    bias: torch.Tensor | None = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, keep)
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(False)
    return new


@STRATEGIES.register(
    "loraprune",
    description="LoRAPrune (arXiv 2305.18403): LoRA + head/channel pruning by LoRA-gradient importance",
)
class LoRAPrune(Strategy):
    Config = LoRAPruneConfig
    paper = (
        "Zhang et al. 2024, LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient "
        "Fine-Tuning (arXiv 2305.18403)"
    )
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: LoRAPruneConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.n_backbone = sum(p.numel() for p in backbone.model.parameters())  # before LoRA
        towers = [t for t in backbone.towers() if t in cfg.towers]  # available_towers, typed
        if not towers:
            raise ConfigError(
                f"strategy.towers {list(cfg.towers)} names no tower of backbone {backbone.name}"
            )
        prunable = {(tower, i) for tower in towers for i in prunable_blocks(len(backbone.blocks_of(tower)))}
        masked_roles = {r for fan_out, _ in _GROUPS.values() for r in fan_out}

        def factory(linear: nn.Linear, block: Block, role: str) -> MaskedLoRALinear:
            masked = (block.tower, block.index) in prunable and role in masked_roles
            return MaskedLoRALinear(linear, cfg.r, cfg.alpha, masked)

        self._adapters = AdapterSet.inject(
            backbone, factory, roles=ROLES, towers=towers, merge_each_experience=cfg.merge_each_experience
        )
        self.groups: list[PruneGroup] = []
        for block in self.backbone.blocks:
            if (block.tower, block.index) not in prunable:
                continue
            for kind, (fan_out, fan_in) in _GROUPS.items():
                layers = [self._adapters[f"{block.name}.{role}"] for role in fan_out]
                size = block.head_dim if kind == "attn" else 1
                if any(m.out_features % size for m in layers):
                    raise ConfigError(
                        f"{block.name}: q/k/v width {layers[0].out_features} is not a multiple of the "
                        f"head size {size}"
                    )
                n = layers[0].out_features // size
                device = layers[0].weight.device
                self.groups.append(
                    PruneGroup(
                        name=f"{block.name}.{kind}",
                        block=block,
                        kind=kind,
                        fan_out=layers,
                        fan_in=self._adapters[f"{block.name}.{fan_in}"],
                        size=size,
                        n=n,
                        importance=torch.zeros(n, device=device),
                        mask=torch.ones(n, device=device),
                    )
                )
        self.towers = towers
        self._plan: ImportancePlan | None = None  # built at the first step with gradients
        self.total_steps = ctx.total_steps
        self.prune_events: list[list[float]] = []  # [step, ratio]
        self.last_target = 0.0  # scheduled sparsity at the last step trained
        self._state = "masked"  # -> "merged" -> "sliced" (final variants, in place)
        rounds = [t for t in range(0, self.total_steps, cfg.prune_every) if 0.0 < self.target(t) < cfg.ratio]
        if cfg.ratio > 0 and self.groups and not rounds:
            log.warning(
                "loraprune: no pruning round fits in the %d steps of this stream (one every %d steps, "
                "between the warm-up and the cool-down); the model will not be pruned",
                self.total_steps,
                cfg.prune_every,
            )

    def adapters(self) -> AdapterSet[MaskedLoRALinear]:
        return self._adapters

    def to(self, device: torch.device) -> None:
        super().to(device)
        for g in self.groups:
            g.importance = g.importance.to(device)
            g.mask = g.mask.to(device)
        self._plan = None  # its index tensors and families were on the old device

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore LoRA and the layer masks, and rebuild the group masks from them."""
        super().load_state_dict(state)
        with torch.no_grad():
            for g in self.groups:
                assert g.fan_out[0].mask is not None
                g.mask.copy_(g.fan_out[0].mask.view(g.n, g.size)[:, 0])
                g.n_pruned = int((g.mask == 0).sum())

    # -- checkpoints --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """LoRAPrune's state outside the module tensors. The loop saves LoRA and the layer masks
        (module buffers); the group tensors are plain attributes, so per group (by name): the
        importance EMA (Eq. 3, which ranks the next pruning rounds), the group mask and
        ``n_pruned`` (which decide whether a round prunes at all). Also ``last_target`` (the
        report), ``prune_events`` (the figures) and ``_state`` (masked, or a final variant: merged
        or sliced, rebuilt on load). ``total_steps`` comes from the config and is checked."""
        return {
            "total_steps": self.total_steps,
            "groups": {
                g.name: {
                    "n": g.n,
                    "importance": g.importance.detach().cpu().clone(),
                    "mask": g.mask.detach().cpu().clone(),
                    "n_pruned": g.n_pruned,
                }
                for g in self.groups
            },
            "last_target": self.last_target,
            "prune_events": [[int(step), float(ratio)] for step, ratio in self.prune_events],
            "state": self._state,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` into the groups of a freshly built strategy (before the module
        tensors load, which bring the layer masks matching the group masks), and rebuild the merged
        or sliced model where the checkpoint was taken after :meth:`merge` or :meth:`slice` (the
        sliced shapes follow the restored group masks, so the saved tensors fit)."""
        groups = state["groups"]
        if int(state["total_steps"]) != self.total_steps or sorted(groups) != sorted(
            g.name for g in self.groups
        ):
            raise ValueError(
                f"LoRAPrune checkpoint of {state['total_steps']} steps and groups {sorted(groups)[:3]}..., "
                f"this run has {self.total_steps} steps and {sorted(g.name for g in self.groups)[:3]}..."
            )
        with torch.no_grad():
            for g in self.groups:
                saved = groups[g.name]
                if int(saved["n"]) != g.n:
                    raise ValueError(
                        f"LoRAPrune checkpoint: group {g.name} has {saved['n']} units, not {g.n}"
                    )
                g.importance.copy_(saved["importance"])
                g.mask.copy_(saved["mask"])
                g.n_pruned = int(saved["n_pruned"])
        self.last_target = float(state["last_target"])
        self.prune_events = [[int(step), float(ratio)] for step, ratio in state["prune_events"]]
        target = str(state["state"])
        if target in ("merged", "sliced"):
            self.merge()
        if target == "sliced":
            self.slice()

    # -- the step -----------------------------------------------------------------------------
    def target(self, step: int) -> float:
        """Scheduled sparsity at global ``step`` over the whole stream."""
        return sparsity_schedule(step, self.total_steps, self.cfg.ratio, self.cfg.warmup, self.cfg.cooldown)

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA of the group importance (Eq. 3); the whole update is skipped if any value is not finite.

        Groups none of whose layers has gradients keep their average. The step's importance is
        batched (:class:`ImportancePlan`, ~13 kernels per layer shape instead of ~10 per layer), and
        each family's EMA is written back by one multi-tensor copy instead of one copy per group."""
        live = tuple(
            tuple(layer.A.grad is not None and layer.B.grad is not None for layer, _ in g.scored_layers())
            for g in self.groups
        )
        if not any(any(row) for row in live):
            return
        if self._plan is None or self._plan.live != live:
            self._plan = ImportancePlan(self.groups, live)
        totals = self._plan.totals()
        finite = torch.stack([torch.isfinite(t).all() for t in totals]).all()
        beta = self.cfg.ema
        for members, fresh in zip(self._plan.families, totals, strict=True):
            old = torch.stack([self.groups[gi].importance for gi in members])
            new = torch.where(finite, beta * old + (1.0 - beta) * fresh, old)
            torch._foreach_copy_([self.groups[gi].importance for gi in members], list(new.unbind(0)))

    def after_backward(self, step: int) -> None:
        """Importance from this step's LoRA gradients, then a pruning round every ``prune_every`` steps."""
        self.update_importance()
        ratio = self.last_target = self.target(step)
        if step % self.cfg.prune_every == 0 and 0.0 < ratio < self.cfg.ratio:
            with torch.no_grad():
                for g in self.groups:
                    g.prune_to(ratio)
            self.prune_events.append([step, ratio])

    def after_experience(self, exp: ExperienceInfo) -> None:
        self._adapters.end_experience()

    # -- federation ---------------------------------------------------------------------------
    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A and B of every adapter, each group's mask and importance average (and a trained
        linear head)."""
        tensors = self.adapter_tensors(("A", "B"))
        for g in self.groups:
            tensors[f"{g.name}.mask"] = g.mask
            tensors[f"{g.name}.importance"] = g.importance
        return tensors

    def lowrank_pairs(self) -> list[tuple[str, str]]:
        """Every adapter's (B, A): its update is ``(alpha / r) B A`` (the masks are separate)."""
        return self.adapter_pairs()

    def load_communicated_state(self, state: dict[str, torch.Tensor]) -> None:
        """The tensors in place; a group mask (checked to hold only 0 and 1) is expanded into its
        layers' masks and sets the group's pruned count."""
        for g in self.groups:
            mask = state.get(f"{g.name}.mask")
            if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
                raise FederationError(f"communicated {g.name}.mask holds values other than 0 and 1")
        super().load_communicated_state(state)
        with torch.no_grad():
            for g in self.groups:
                if f"{g.name}.mask" in state:
                    expanded = g.mask[:, None].expand(g.n, g.size).reshape(-1)
                    for layer in g.fan_out:
                        assert layer.mask is not None
                        layer.mask.copy_(expanded)
                    g.n_pruned = int((g.mask == 0).sum())

    def aggregate(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], mode: str
    ) -> dict[str, torch.Tensor]:
        """Factors and importance by ``mode`` (FedAvg or the product average), masks by
        :func:`mask_agreement` over the clients that sent each."""
        mask_keys = [f"{g.name}.mask" for g in self.groups]
        masked = set(mask_keys)
        state = super().aggregate(
            [{k: v for k, v in s.items() if k not in masked} for s in states], weights, mode
        )
        for key in mask_keys:
            held = [(s[key], w) for s, w in zip(states, weights, strict=True) if key in s]
            if held:
                state[key] = mask_agreement([m for m, _ in held], [w for _, w in held])
        return state

    # -- the pruned model ---------------------------------------------------------------------
    def merge(self) -> None:
        """Fold LoRA and masks into plain ``nn.Linear`` layers of unchanged shape (exact function)."""
        if self._state != "masked":
            return
        for name, adapter in self._adapters.items():
            tower, index, role = name.split(".")
            block = next(b for b in self.backbone.blocks if b.tower == tower and b.index == int(index))
            _replace(self.backbone, block, role, adapter.folded())
        self._state = "merged"

    def slice(self) -> None:
        """Physically remove pruned heads (q/k/v rows, out columns) and channels (fc1 rows, fc2 columns)."""
        self.merge()
        if self._state == "sliced":
            return
        for g in self.groups:
            keep = torch.nonzero(g.mask > 0).flatten()
            rows = (keep[:, None] * g.size + torch.arange(g.size, device=keep.device)).flatten()
            fan_out, fan_in = _GROUPS[g.kind]
            for role in fan_out:
                _replace(
                    self.backbone,
                    g.block,
                    role,
                    _sliced(base_linear(self.backbone.linear(g.block, role)), rows, 0),
                )
            _replace(
                self.backbone,
                g.block,
                fan_in,
                _sliced(base_linear(self.backbone.linear(g.block, fan_in)), rows, 1),
            )
            if g.kind == "attn":
                attn = self.backbone.block_module(g.block).get_submodule(
                    g.block.linears["q"].rpartition(".")[0]
                )
                for attr in ("n_heads", "num_heads", "num_attention_heads"):
                    if isinstance(getattr(attn, attr, None), int):
                        setattr(attn, attr, int(keep.numel()))
        self.head.invalidate()
        self._state = "sliced"

    def final_variants(self) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
        """``merged``: dense model, LoRA and masks folded in; ``sliced``: the physically pruned model."""

        @contextlib.contextmanager
        def merged() -> Iterator[None]:
            self.merge()
            yield

        @contextlib.contextmanager
        def sliced() -> Iterator[None]:
            self.slice()
            yield

        return {"merged": merged, "sliced": sliced}

    # -- figures ------------------------------------------------------------------------------
    def _sparsity(self) -> float:
        """Fraction of the prunable layers' weights removed by the masks (weights of q/k/v/out/fc1/fc2)."""
        total = removed = 0
        for g in self.groups:
            for layer in [*g.fan_out, g.fan_in]:
                total += layer.in_features * layer.out_features
            removed += g.n_pruned * g.size * (sum(m.in_features for m in g.fan_out) + g.fan_in.out_features)
        return removed / total if total else 0.0

    def report(self) -> dict[str, float | int]:
        return {"sparsity": self._sparsity(), "target_sparsity": self.last_target}

    def final_report(self) -> dict[str, Any]:
        """Achieved sparsity (overall, per group), parameters removed, the pruning rounds."""
        removed = sum(g.removed_parameters() for g in self.groups)
        pruned = {g.name: g.n_pruned / g.n for g in self.groups}
        per_layer = {
            f"{b.name}.{kind}": pruned.get(f"{b.name}.{kind}", 0.0)
            for b in self.backbone.blocks
            if b.tower in self.towers
            for kind in _GROUPS
        }
        return {
            "scalars": {
                "achieved_sparsity": self._sparsity(),
                "target_sparsity": self.cfg.ratio,
                "backbone_parameters_removed": removed,
                "backbone_sparsity": removed / self.n_backbone,
                "backbone_parameters_pruned_model": self.n_backbone - removed,
                "pruning_rounds": len(self.prune_events),
            },
            "curves": {
                "sparsity_vs_step": {
                    "x": [e[0] for e in self.prune_events],
                    "y": [e[1] for e in self.prune_events],
                    "x_label": "step",
                    "y_label": "scheduled sparsity",
                }
            },
            "per_layer": {"pruned_fraction": per_layer},
            "events": {"prune_rounds": {"fields": ["step", "ratio"], "entries": self.prune_events}},
        }
