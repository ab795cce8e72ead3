"""smora: SMoRA, every rank an expert with an explicit router and loss-free balancing (arXiv 2501.15103).

Paper: Zhao, Zhou et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for
Multi-Task Learning" (arXiv 2501.15103; the official code calls it SRMoLE). Official code:
github.com/StyxXuan/smora, ``packages/peft/src/peft/tuners/srmole/layer.py`` and the ``*srmole*``
training configs; this file follows them (STRATEGIES-rankwise.md, Part A and Part B §1).

Every adapted linear layer (q, k, v, out, fc1, fc2 of every block of both towers) holds r rank-1
experts (rows a_i of A [r, d_in], columns b_i of B [d_out, r]), a bias-free router
W_r [r/P, d_in] and a balancing bias beta [r]. Per token x (all leading dims are tokens)::

    x~  = dropout(x)
    s   = sigmoid(W_r x~), each entry repeated P times      -> [r]   (P = rank_partition)
    v   = s + beta
    S   = the k largest v (hard top-k: no noise, no straight-through)
    g_i = k v_i / sum_{j in S} v_j  for i in S, else 0       gate_bias = include (code)
    g_i = k s_i / sum_{j in S} s_j                           gate_bias = exclude (DeepSeek-V3 rule)
    y   = W0 x + b + (alpha / k) sum_{i in S} g_i (a_i . x~) b_i

The gates sum to k per token (mean gate 1). Balancing (no auxiliary loss): with c_i the number of
tokens that selected rank i, beta <- beta + u sign(mean(c) - c).

Defaults (the released configs): r = 64, P = 1, k = ``activate_r`` = 8, alpha = 16, scaling
alpha / k, u = 1e-5, dropout 0; A kaiming-uniform (a = sqrt 5), B = 0 (the adapted model equals the
backbone at the start), the router keeps nn.Linear's kaiming-uniform init; AdamW lr 1e-4 (the
official lr; its cosine/warm-up schedule is the run's).

Where paper, code and cl-bench differ (Part A):
- beta is a buffer moved only by the balancing rule. The official run in fact also hands beta to
  AdamW (PEFT's ``set_adapter`` switches requires_grad on for every adapter tensor): not followed.
- the official layer moves beta at every training forward, i.e. per micro-batch and again in a
  gradient-checkpoint recompute; here the counts of all forwards of one optimizer step accumulate
  on the device and beta moves once, in ``after_step``, never in eval. (sign() ignores a common
  factor, so a forward run twice on the same inputs would not change the step anyway.)
- the paper's exact gate equation was not retrieved; ``gate_bias = include`` is the code's.
- with P > 1, r and k must be multiples of P, so that (with beta = 0) whole blocks are selected.
- u is fixed at 1e-5 in the code; here ``bias_rate`` (0 disables balancing).
- continual learning (the paper has none, it trains on a joint mixture): one adapter trained on
  through the stream, the optimizer rebuilt per experience, beta kept across experiences
  (``reset_balance_bias_each_experience`` zeroes it at each new one). The gates depend on the input
  at every k (a top-k below r, normalised sigmoid gates at k = r), so the adapter never folds into
  W0: ``merge_each_experience`` is refused and :meth:`SMoRALinear.delta_weight` raises.

Compute: the official TVM kernels gather the k selected rows of A and columns of B; this layer
takes the code's ``dense_compute`` route (one GEMM for [A; W_r] x, the gates applied to all r
entries, 0 off S, one GEMM with B), whose values and gradients are the same: ranks outside S get
exact-zero gradients. On CUDA the q, k, v layers of an attention run as one group on the fused
path of :mod:`cl_bench.routed` (base and update GEMMs shared, the update accumulated in place),
and the gate (sigmoid, bias, top-k, normalisation, h = g * z and the counters) runs as one Triton
kernel forward and one backward in closed form (:mod:`cl_bench.rank_gates`, maths in
:mod:`cl_bench.rank_kernels`) instead of ~25 small torch kernels; among equal scores it selects the
lowest rank (``torch.topk``'s choice in the torch code, which the CPU runs). Routing uses fixed
shapes and in-place device counters only (no host sync), so a training step can be replayed from a
CUDA graph.

Federation (issue 19), only what training moves: A, B and the router of every layer (AdamW) and
the balancing bias beta (``"<adapter>.A"``, ``.B``, ``.router``, ``.balance_bias``), plus a linear
head where one trains. beta is moved by the balancing rule during the local steps; left out, the
global beta would never move (each client starts from the server's) and federated SMoRA would have
no balancing. All are averaged (FedAvg; for beta, the mean drift of the clients, which all start
from the same beta). ``aggregation = "product"`` is refused: every rank is an expert selected by
the router, and a refactored product would break the rank-router correspondence. With ``dropout``
> 0 the layer draws its dropout masks from the global RNG (no stream of its own).

Figures (``report`` / ``final_report``): selected ranks per token (train, eval), the per-layer load
of each experience (max/mean, min/mean, fraction of ranks never selected), the Jaccard overlap of
each experience's k most used ranks with earlier experiences, and the drift of beta (mean and max
|beta|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import rank_gates
from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear
from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.lowrank import init_lora_pair
from cl_bench.rank_routing import RankUsage, RoutingHistory, topk_mask
from cl_bench.registry import STRATEGIES
from cl_bench.routed import RoutedUpdate, use_fused
from cl_bench.strategy import ExperienceInfo, LoRAFamilyConfig, Strategy, StrategyContext

GateBias = Literal["include", "exclude"]


def not_foldable(k: int, r: int) -> str:
    """Why an SMoRA adapter cannot be merged into W0 (one line)."""
    why = f"k = {k} < r = {r}: top-k routing per token" if k < r else "k = r: the gates still depend on x"
    return f"SMoRA cannot be folded into W0 ({why})"


class SMoRALinear(AdaptedLinear):
    """One SMoRA layer: ``y = W0 x + b + (alpha / k) B (g(x) * A x)`` with a routed top-k gate g."""

    balance_bias: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        k: int,
        alpha: float,
        *,
        rank_partition: int = 1,
        gate_bias: GateBias = "include",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base)
        if not (1 <= k <= r and rank_partition >= 1 and r % rank_partition == 0):
            raise ValueError(f"bad SMoRA layer settings r={r} k={k} rank_partition={rank_partition}")
        self.r, self.k, self.partition = r, k, rank_partition
        self.scaling = alpha / k
        self.include_bias = gate_bias == "include"
        self.dropout = dropout
        device = base.weight.device
        self.A, self.B = init_lora_pair(r, base.in_features, base.out_features, device)
        router = torch.empty(r // rank_partition, base.in_features, device=device)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))  # nn.Linear's default, as the official router
        self.router = nn.Parameter(router)
        self.register_buffer("balance_bias", torch.zeros(r, device=device))  # never trained
        self.usage = RankUsage(r, device)

    def gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates g [N, r], selection mask [N, r]) from the router logits [N, r / P], in float32 at least."""
        s = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        if self.partition > 1:
            s = s.repeat_interleave(self.partition, dim=-1)
        v = s + self.balance_bias
        mask = topk_mask(v, self.k)
        w = (v if self.include_bias else s) * mask
        return w / w.sum(dim=-1, keepdim=True) * self.k, mask

    def route(self, z: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """The gated ranks ``g(l) * z`` [N, r] in z's dtype; counts the selections. On CUDA one
        Triton kernel each way (:func:`cl_bench.rank_gates.smora_gate`); elsewhere, and for what
        the kernels do not take, this torch code (:meth:`gates`), the reference."""
        assert logits is not None
        beta = self.balance_bias
        if rank_gates.smora_serves(z, logits, beta, self.partition):
            return rank_gates.smora_gate(
                z, logits, beta, self.k, self.partition, self.include_bias, self.usage, self.training
            )
        g, mask = self.gates(logits)
        self.usage.record(mask, self.training)
        return z * g.to(z.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.dropout > 0:
            x2 = F.dropout(x2, self.dropout, self.training)
        z, logits = F.linear(x2, torch.cat([self.A, self.router])).split(
            (self.r, self.router.shape[0]), dim=-1
        )
        out = F.linear(self.route(z, logits), self.B) * self.scaling
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def routed(self, x: torch.Tensor) -> RoutedUpdate | None:
        """The fused path's view of this layer (:mod:`cl_bench.routed`); None with dropout, which
        applies to the branch input only."""
        if self.dropout > 0 or not use_fused(x):
            return None
        return RoutedUpdate(self.A, self.router, self.B, self.scaling, self.route)

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates, mask) of tokens ``x`` [..., d_in] (dropout off, nothing counted), for inspection."""
        x2 = x.reshape(-1, x.shape[-1]).to(self.router.dtype)
        return self.gates(F.linear(x2, self.router))

    def delta_weight(self) -> torch.Tensor:
        raise ConfigError(not_foldable(self.k, self.r))

    def n_active(self) -> int:
        """Parameters used per token: the router, beta, and k rows of A and columns of B."""
        return self.router.numel() + self.r + self.k * (self.in_features + self.out_features)

    def added_tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B, self.router, self.balance_bias]


@dataclass(frozen=True)
class SMoRAConfig(LoRAFamilyConfig):
    """The LoRA-family fields (``r``: rank-1 experts per layer, scaling ``alpha / k``;
    ``merge_each_experience`` is refused: SMoRA never folds into W0) and the router's."""

    r: int = 64
    k: int = 8  # active ranks per token (the official activate_r)
    rank_partition: int = 1  # P: ranks per router output (P > 1: block experts)
    gate_bias: GateBias = "include"  # include: gates from s + beta (code); exclude: beta only selects
    bias_rate: float = 1e-5  # u of the sign rule (0: no balancing)
    dropout: float = 0.0
    reset_balance_bias_each_experience: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.r:
            raise ConfigError(f"strategy.k must be in [1, r = {self.r}], got {self.k}")
        if self.rank_partition < 1 or self.r % self.rank_partition or self.k % self.rank_partition:
            raise ConfigError(
                f"strategy.rank_partition must be >= 1 and divide r = {self.r} and k = {self.k}, "
                f"got {self.rank_partition}"
            )
        if self.gate_bias not in ("include", "exclude"):
            raise ConfigError(f"strategy.gate_bias must be one of include, exclude, got {self.gate_bias!r}")
        if not (self.bias_rate >= 0 and math.isfinite(self.bias_rate)):
            raise ConfigError(f"strategy.bias_rate must be a finite number >= 0, got {self.bias_rate}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"strategy.dropout must be in [0, 1), got {self.dropout}")
        if self.merge_each_experience:
            raise ConfigError(f"strategy.merge_each_experience: {not_foldable(self.k, self.r)}")


@STRATEGIES.register(
    "smora",
    description="SMoRA (arXiv 2501.15103): 64 rank-1 experts, top-8 by a router, loss-free balancing",
)
class SMoRA(Strategy):
    """Inject :class:`SMoRALinear` everywhere; balance once per optimizer step; report the routing."""

    Config = SMoRAConfig
    paper = (
        "Zhao, Zhou et al. 2025, Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA "
        "for Multi-Task Learning (SMoRA, arXiv 2501.15103)"
    )
    default_lr = 1e-4
    default_weight_decay = 0.0
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: SMoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: SMoRALinear(
                linear,
                cfg.r,
                cfg.k,
                cfg.alpha,
                rank_partition=cfg.rank_partition,
                gate_bias=cfg.gate_bias,
                dropout=cfg.dropout,
            ),
            roles=cfg.roles,
            towers=cfg.towers,
        )
        self.routing = RoutingHistory(self._adapters, cfg.k, "balance_bias")

    def adapters(self) -> AdapterSet[SMoRALinear]:
        return self._adapters

    def n_active(self) -> int:
        return sum(a.n_active() for a in self._adapters.values())

    def biases(self) -> list[torch.Tensor]:
        return self.routing.biases()

    def before_experience(self, exp: ExperienceInfo) -> None:
        self.routing.start_experience()
        if self.cfg.reset_balance_bias_each_experience and exp.index > 0:
            with torch.no_grad():
                torch._foreach_zero_(self.biases())

    def after_step(self, step: int) -> None:
        """The balancing step from the counts of this step's training forwards."""
        self.routing.balance(self.cfg.bias_rate)

    def after_experience(self, exp: ExperienceInfo) -> None:
        self.routing.end_experience()

    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A, B, the router and the balancing bias of every layer (and a trained linear head)."""
        return self.adapter_tensors(("A", "B", "router", "balance_bias"))

    # -- checkpoint -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """The routing history (:meth:`RoutingHistory.state`): each finished experience's training
        selection counts per layer and the drift of beta after it, and every layer's device
        counters of the experience in progress. Without it a resumed run trains the same (beta,
        A, B and the router are module tensors, saved by the loop) but reports other load,
        Jaccard and drift figures. The structure never changes, so nothing else is needed."""
        return {"routing": self.routing.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.routing.load_state(state["routing"])

    # -- figures --------------------------------------------------------------------------------
    def report(self) -> dict[str, float | int]:
        return dict(self.routing.figures())

    def final_report(self) -> dict[str, Any]:
        return {
            "scalars": {
                **self.report(),
                "ranks_per_layer": self.cfg.r,
                "active_per_token": self.cfg.k,
                "gate_bias": self.cfg.gate_bias,
                "cl_protocol": "sequential, bias "
                + ("reset" if self.cfg.reset_balance_bias_each_experience else "kept"),
            },
            **self.routing.sections(),
        }
