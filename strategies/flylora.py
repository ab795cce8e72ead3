"""flylora: FlyLoRA, implicit rank-wise mixture of experts with a frozen sparse random A (arXiv 2510.08396).

Paper: Zou, Zang, Xu, Zhu, Ji, "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via
Implicit Rank-Wise Mixture-of-Experts" (NeurIPS 2025, arXiv 2510.08396). Official code:
github.com/gfyddha/FlyLoRA, the PEFT fork ``peft/src/peft/tuners/lora/layer.py`` (the code behind
the paper's numbers, with ``scripts/run_mmlu.sh``), ``flylora.py`` and ``merge_lora_adapters.py``;
this file follows the PEFT code (STRATEGIES-rankwise.md, Part A and Part B §2).

Every adapted linear layer (q, k, v, out, fc1, fc2 of every block of both towers) holds a frozen
sparse random A [r, d_in], a trainable B [d_out, r] (each column b_i a rank-1 expert b_i a_i^T),
and a balancing bias d [r]. A x is both the down-projection and the router. Per token x::

    z   = A dropout(x)                              (frozen A: no router parameters)
    S   = top-k of z + d     (topk_score = signed, the code)   or of |z + d|  (abs, paper text)
    m   = one-hot(S)                                 binary gate: d only selects
    y   = W0 x + b + (alpha / r) B (m * z)

A: each row exactly p = floor(d_in k / r) non-zeros (at least 1) at distinct uniformly drawn
columns, values N(0, 1 / r^2); a buffer drawn from a ``torch.Generator`` seeded by (run seed, layer
name) (and the experience with ``a_seed = per_experience``), so it does not depend on the order in
which modules are built. B = 0, so the adapted model equals the backbone at the start. Balancing:
with c_i the tokens that selected rank i, d <- d + u sign(mean(c) - c).

Defaults (``scripts/run_mmlu.sh``): r = 32, k = 8, alpha = 64, scaling alpha / r (not alpha / k),
u = 1e-3, dropout 0; AdamW lr 3e-4 (the official run's; its schedule is the run's). Only B trains.

Where paper, code and cl-bench differ (Part A):
- ``topk_score``: the PEFT code ranks the signed z + d (default); the paper text and ``flylora.py``
  rank magnitudes, here |z + d| as ``flylora.py`` does (``abs``).
- the PEFT code computes z under ``no_grad`` (no gradient reaches x through the branch); the 4-bit
  path and ``flylora.py`` keep it. Default: kept (``detach_branch_input = false``); ``true``
  reproduces the PEFT path.
- p: the PEFT code uses d_in // (r // k) (= floor(d_in k / r) when k divides r); ``flylora.py``
  max(1, floor(d_in k / r)), as here.
- the PEFT code moves d after every forward, in eval and generation too; here the counts of all
  training forwards of one optimizer step accumulate on the device and d moves once, in
  ``after_step``, never in eval (``flylora.py`` at 0da2ffb also guards it by ``training``).
- merging: the PEFT ``merge()`` would fold the unrouted (alpha / r) B A, the k = r model. For
  k < r nothing folds into W0: ``merge_each_experience`` is refused and
  :meth:`FlyLoRALinear.delta_weight` raises; at k = r it is exact.

Continual learning (``cl_mode``):
- ``sequential`` (default): A fixed for the whole stream, B and d continue, the optimizer rebuilt
  per experience (``reset_balance_bias_each_experience`` zeroes d at each new one);
- ``merge``: the paper's multi-task merging recast as CL. Each experience trains a fresh adapter
  (B = 0, d = 0) on the bare backbone; the evaluation after experience t uses the mean of adapters
  1..t. ``a_seed``: ``shared`` (one A for every experience, as the official pipeline's fixed seed
  gives [read]) or ``per_experience`` (an independent A per experience, the paper's "independent
  random projections"). ``merge_rule``: ``params`` (the element-wise mean of A, B and d, as
  ``merge_lora_adapters.py``; with a shared A the merged A is that A, bitwise) or ``branches``
  (the mean of the per-experience routed branch outputs, each with its own A, B, d). Defaults:
  params with a shared A, branches with per-experience A; params with per-experience A averages
  unrelated random projections into a router no experience trained with: allowed, flagged in the
  record and the log.

Federation (issue 19), only what training moves: B and the balancing bias d of every layer
(``"<adapter>.B"``, ``"<adapter>.d"``), plus a linear head where one trains. A never travels: it is
frozen and drawn from (run seed, layer name[, experience]), so every replica holds the same A
bitwise; the merge-mode bank is built by every replica from the broadcast adapters. d is moved by
the balancing rule during the local steps (left out, the global d would never move). Both are
averaged (FedAvg). ``aggregation = "product"`` is FedAvg here, exactly: with one A for every
client, the mean of the products B_k A is (mean B_k) A, and the routed update is linear in B. With
``dropout`` > 0 the layer draws its dropout masks from the global RNG.

Compute: z and m * z for all r ranks (the mask zeroes the others), two GEMMs (on CUDA the q, k, v
layers of an attention as one group on the fused path of :mod:`cl_bench.routed`). On CUDA the gate
of one adapter (score, top-k, m * z and the counters) runs as one Triton kernel forward and one
backward (:mod:`cl_bench.rank_gates`, maths in :mod:`cl_bench.rank_kernels`), selecting the lowest
rank among equal scores (``torch.topk``'s choice in the torch code, which the CPU runs); the mean
of several branches (a ``branches`` merge) keeps the torch code of :func:`routed_delta`. Fixed
shapes and in-place device counters only (no host sync), so a training step can be replayed from a
CUDA graph. Figures (``report`` / ``final_report``): selected ranks per token, the per-layer load of
each experience (max/mean, min/mean, fraction of ranks never selected), the Jaccard overlap of each
experience's k most used ranks with earlier ones, the drift of d, and how A was seeded per
experience; the record's scalars name the CL mode, the A seeding and the merge rule.
"""

from __future__ import annotations

import hashlib
import logging
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
from cl_bench.rank_routing import RankUsage, RoutingHistory, topk_mask
from cl_bench.registry import STRATEGIES
from cl_bench.routed import RoutedUpdate, use_fused
from cl_bench.strategy import ExperienceInfo, LoRAFamilyConfig, Strategy, StrategyContext

log = logging.getLogger(__name__)

TopkScore = Literal["signed", "abs"]
ClMode = Literal["sequential", "merge"]
ASeed = Literal["shared", "per_experience"]
MergeRule = Literal["params", "branches"]


def nonzeros_per_row(d_in: int, r: int, k: int) -> int:
    """p = max(1, floor(d_in k / r)): the non-zeros of each row of A."""
    return max(1, d_in * k // r)


def a_seed(run_seed: int, layer: str, experience: int | None = None) -> int:
    """The generator seed of a layer's A: a hash of (run seed, layer name[, experience]), so it
    depends neither on the order in which layers are built nor on Python's hash randomisation."""
    key = f"flylora-A:{run_seed}:{layer}" + ("" if experience is None else f":{experience}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def sparse_projection(r: int, d_in: int, p: int, seed: int) -> torch.Tensor:
    """A [r, d_in] (float32, CPU): per row p distinct uniformly drawn columns holding N(0, 1 / r^2)."""
    generator = torch.Generator().manual_seed(seed)
    columns = torch.rand(r, d_in, generator=generator).argsort(dim=1)[:, :p]  # a uniform p-subset per row
    values = torch.randn(r, p, generator=generator) / r
    return torch.zeros(r, d_in).scatter_(1, columns, values)


def routed_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    d: torch.Tensor,
    k: int,
    scaling: float,
    *,
    signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scaling * mean_t B_t (m_t * A_t x)`` over T branches, and the masks m [N, T, r].

    ``x`` [N, d_in]; ``A`` [T, r, d_in], ``B`` [T, d_out, r], ``d`` [T, r] (T = 1: one adapter);
    m_t = one-hot of the top-k of ``A_t x + d_t`` (or of its magnitude when not ``signed``)."""
    T, r, d_in = A.shape
    z = F.linear(x, A.reshape(T * r, d_in))  # [N, T r]
    score = z.view(-1, T, r).to(torch.promote_types(z.dtype, d.dtype)) + d
    mask = topk_mask(score if signed else score.abs(), k)
    h = z * mask.view(-1, T * r).to(z.dtype)
    out = F.linear(h, B.permute(1, 0, 2).reshape(B.shape[1], T * r))
    return out * (scaling / T), mask


class FlyLoRALinear(AdaptedLinear):
    """One FlyLoRA layer: ``y = W0 x + b + (alpha / r) B (m(x) * A x)``, A frozen, only B trains.

    ``capacity`` > 0 (merge mode) preallocates the bank of finished experiences' adapters (B and d,
    and A when ``keep_a``); :meth:`push` adds the current adapter, and the eval forward then uses
    the merged adapter (``merge_rule``)."""

    A: torch.Tensor
    d: torch.Tensor
    bank_a: torch.Tensor
    bank_b: torch.Tensor
    bank_d: torch.Tensor
    merged_a: torch.Tensor
    merged_b: torch.Tensor
    merged_d: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        k: int,
        alpha: float,
        seed: int,
        *,
        topk_score: TopkScore = "signed",
        detach_branch_input: bool = False,
        dropout: float = 0.0,
        capacity: int = 0,
        keep_a: bool = False,
        merge_rule: MergeRule = "params",
    ) -> None:
        super().__init__(base)
        if not 1 <= k <= r:
            raise ValueError(f"bad FlyLoRA layer settings r={r} k={k}")
        self.r, self.k, self.scaling = r, k, alpha / r
        self.p = nonzeros_per_row(base.in_features, r, k)
        self.signed = topk_score == "signed"
        self.detach_input = detach_branch_input
        self.dropout = dropout
        self.merge_rule = merge_rule
        device = base.weight.device
        self.register_buffer("A", sparse_projection(r, base.in_features, self.p, seed).to(device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        self.register_buffer("d", torch.zeros(r, device=device))  # never trained
        self.usage = RankUsage(r, device)
        self.n_merged = 0  # adapters in the bank (merge mode)
        d_in, d_out = base.in_features, base.out_features
        banks = {
            "bank_b": (capacity, d_out, r),
            "bank_d": (capacity, r),
            "bank_a": (capacity if keep_a else 0, r, d_in),
            "merged_b": (d_out, r) if capacity else (0, r),
            "merged_d": (r,) if capacity else (0,),
            "merged_a": (r, d_in) if keep_a else (0, d_in),
        }
        for name, shape in banks.items():
            self.register_buffer(name, torch.zeros(shape, device=device))
        self.keep_a = keep_a

    # -- forward -------------------------------------------------------------------------------
    def _adapter(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, d) stacked over branches: the live adapter in training (or before any merge),
        else the merged adapter of the bank."""
        if self.training or self.n_merged == 0:
            return self.A[None], self.B[None], self.d[None]
        n = self.n_merged
        if self.merge_rule == "params":
            A = self.merged_a if self.keep_a else self.A  # a shared A is every experience's A, bitwise
            return A[None], self.merged_b[None], self.merged_d[None]
        A_bank = self.bank_a[:n] if self.keep_a else self.A.expand(n, -1, -1)
        return A_bank, self.bank_b[:n], self.bank_d[:n]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.dropout > 0:
            x2 = F.dropout(x2, self.dropout, self.training)
        if self.detach_input:
            x2 = x2.detach()
        A, B, d = self._adapter()
        if A.shape[0] == 1 and rank_gates.kernels_enabled(x2):  # one adapter: the gate kernels (route)
            out = F.linear(self.route(F.linear(x2, A[0]), d[0]), B[0]) * self.scaling
        else:
            out, mask = routed_delta(x2, A, B, d, self.k, self.scaling, signed=self.signed)
            self.usage.record(mask, self.training)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def route(self, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """One adapter's masked ranks ``m * z`` [N, r] (z's dtype) with balancing bias ``d`` [r];
        counts the selections. On CUDA one Triton kernel each way
        (:func:`cl_bench.rank_gates.flylora_gate`); elsewhere, and for what the kernels do not
        take, this torch code (that of :func:`routed_delta` at T = 1), the reference. Several
        branches (a ``branches`` merge) always take :func:`routed_delta`."""
        if rank_gates.flylora_serves(z, d):
            return rank_gates.flylora_gate(z, d, self.k, self.signed, self.usage, self.training)
        score = z.to(torch.promote_types(z.dtype, d.dtype)) + d
        mask = topk_mask(score if self.signed else score.abs(), self.k)
        self.usage.record(mask, self.training)
        return z * mask.to(z.dtype)

    def routed(self, x: torch.Tensor) -> RoutedUpdate | None:
        """The fused path's view of this layer (:mod:`cl_bench.routed`): one adapter (training,
        or a ``params`` merge); None with dropout or a detached branch input (the base input gets
        its gradient, the branch's does not), or for a mean of several branches."""
        if self.dropout > 0 or self.detach_input or not use_fused(x):
            return None
        A, B, d = self._adapter()
        if A.shape[0] != 1:
            return None
        bias = d[0]

        def route(z: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
            return self.route(z, bias)

        return RoutedUpdate(A[0], None, B[0], self.scaling, route)

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The selection mask [N, r] of the live adapter for tokens ``x`` (nothing counted)."""
        z = F.linear(x.reshape(-1, x.shape[-1]).to(self.A.dtype), self.A)
        score = z + self.d
        return topk_mask(score if self.signed else score.abs(), self.k)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``: the layer's update as a dense matrix, exact only at k = r."""
        if self.k < self.r:
            raise ConfigError(
                f"FlyLoRA cannot be folded into W0 at k = {self.k} < r = {self.r} (top-k routing per token)"
            )
        return (self.B @ self.A) * self.scaling

    # -- merge mode ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, A: torch.Tensor | None = None) -> None:
        """A fresh adapter in place (B = 0, d = 0, and a new A if given): same tensors, so a captured
        CUDA graph stays valid."""
        self.B.zero_()
        self.d.zero_()
        if A is not None:
            self.A.copy_(A)

    @torch.no_grad()
    def resize_bank(self, rows: int) -> None:
        """Grow the bank to ``rows`` adapters (zeros after the current ones); no-op if it holds them."""
        for name in ("bank_b", "bank_d", *(("bank_a",) if self.keep_a else ())):
            old = getattr(self, name)
            if rows > old.shape[0]:
                setattr(self, name, torch.cat([old, old.new_zeros(rows - old.shape[0], *old.shape[1:])]))

    @torch.no_grad()
    def push(self) -> None:
        """The current adapter joins the bank; the merged means follow."""
        n = self.n_merged
        if n == self.bank_b.shape[0]:  # more experiences than planned: double the bank
            self.resize_bank(2 * n)
        self.bank_b[n].copy_(self.B)
        self.bank_d[n].copy_(self.d)
        if self.keep_a:
            self.bank_a[n].copy_(self.A)
        self.n_merged = n + 1
        self._refresh_means()

    def _refresh_means(self) -> None:
        n = self.n_merged
        if n and self.merged_b.numel():
            self.merged_b.copy_(self.bank_b[:n].mean(dim=0))
            self.merged_d.copy_(self.bank_d[:n].mean(dim=0))
            if self.keep_a:
                self.merged_a.copy_(self.bank_a[:n].mean(dim=0))

    def added_tensors(self) -> list[torch.Tensor]:
        """A, B, d and the bank of merged adapters."""
        bank = [self.bank_b[: self.n_merged], self.bank_d[: self.n_merged]]
        if self.keep_a:
            bank.append(self.bank_a[: self.n_merged])
        return [self.A, self.B, self.d, *(t for t in bank if t.numel())]

    def n_active(self) -> int:
        """Parameters used per token: all of A (it routes), d, and k columns of B (per branch)."""
        branches = 1 if self.training or self.merge_rule == "params" else max(1, self.n_merged)
        return branches * (self.A.numel() + self.r + self.k * self.out_features)

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_merged": self.n_merged}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_merged = int(state["n_merged"])


@dataclass(frozen=True)
class FlyLoRAConfig(LoRAFamilyConfig):
    """The LoRA-family fields (scaling ``alpha / r``; ``merge_each_experience``: sequential mode at
    k = r only, fold into W0 and start a fresh B) and those of the routing and the CL mode."""

    r: int = 32
    alpha: float = 64.0
    k: int = 8  # active ranks per token
    topk_score: TopkScore = "signed"  # signed: PEFT code; abs: paper text and flylora.py (|z + d|)
    bias_rate: float = 1e-3  # u of the sign rule (0: no balancing)
    detach_branch_input: bool = False  # true: no gradient to x through A (the PEFT no_grad path)
    dropout: float = 0.0
    cl_mode: ClMode = "sequential"
    a_seed: ASeed = "shared"  # merge mode: one A for all experiences, or one per experience
    merge_rule: MergeRule | None = None  # merge mode; None: params (shared A) or branches (per-experience A)
    reset_balance_bias_each_experience: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.r:
            raise ConfigError(f"strategy.k must be in [1, r = {self.r}], got {self.k}")
        if not (self.bias_rate >= 0 and math.isfinite(self.bias_rate)):
            raise ConfigError(f"strategy.bias_rate must be a finite number >= 0, got {self.bias_rate}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"strategy.dropout must be in [0, 1), got {self.dropout}")
        for key, valid in (
            ("topk_score", ("signed", "abs")),
            ("cl_mode", ("sequential", "merge")),
            ("a_seed", ("shared", "per_experience")),
        ):
            if getattr(self, key) not in valid:
                raise ConfigError(
                    f"strategy.{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}"
                )
        if self.cl_mode == "sequential":
            if self.a_seed != "shared":
                raise ConfigError(
                    "strategy.a_seed = per_experience needs cl_mode = merge (sequential keeps one A)"
                )
            if self.merge_rule is not None:
                raise ConfigError("strategy.merge_rule needs cl_mode = merge")
        else:
            if self.merge_rule is None:  # resolved here, so the run record holds the rule used
                rule = "params" if self.a_seed == "shared" else "branches"
                object.__setattr__(self, "merge_rule", rule)
            if self.merge_rule not in ("params", "branches"):
                raise ConfigError(
                    f"strategy.merge_rule must be one of params, branches, got {self.merge_rule!r}"
                )
            if self.merge_each_experience:
                raise ConfigError("strategy.merge_each_experience needs cl_mode = sequential")
        if self.merge_each_experience and self.k < self.r:
            raise ConfigError(
                f"strategy.merge_each_experience: FlyLoRA cannot be folded into W0 at k = {self.k} < r = "
                f"{self.r} (top-k routing per token); set k = r"
            )

    @property
    def flagged_merge(self) -> bool:
        """params merging of independent random projections (allowed, flagged)."""
        return self.cl_mode == "merge" and self.a_seed == "per_experience" and self.merge_rule == "params"


@STRATEGIES.register(
    "flylora",
    description="FlyLoRA (arXiv 2510.08396): frozen sparse random A routes top-8 of 32 rank-1 experts",
)
class FlyLoRA(Strategy):
    """Inject :class:`FlyLoRALinear` everywhere; balance once per optimizer step; sequential or merge CL."""

    Config = FlyLoRAConfig
    paper = (
        "Zou, Zang, Xu, Zhu, Ji 2025, FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via "
        "Implicit Rank-Wise Mixture-of-Experts (NeurIPS 2025, arXiv 2510.08396)"
    )
    default_lr = 3e-4
    default_weight_decay = 0.0
    graph_safe = True
    graphs_span_experiences = True  # merge mode resets the same tensors in place

    def __init__(self, cfg: FlyLoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        merge = cfg.cl_mode == "merge"
        per_experience = cfg.a_seed == "per_experience"
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: FlyLoRALinear(
                linear,
                cfg.r,
                cfg.k,
                cfg.alpha,
                self.seed_of(f"{block.name}.{role}", 0),
                topk_score=cfg.topk_score,
                detach_branch_input=cfg.detach_branch_input,
                dropout=cfg.dropout,
                capacity=max(1, ctx.n_experiences) if merge else 0,
                keep_a=merge and per_experience,
                merge_rule=cfg.merge_rule or "params",
            ),
            roles=cfg.roles,
            towers=cfg.towers,
            merge_each_experience=cfg.merge_each_experience,
        )
        self.routing = RoutingHistory(self._adapters, cfg.k, "d")
        self._a_events: list[list[Any]] = []  # [experience, a_seed, seed of the first layer, sum A^2]
        if cfg.flagged_merge:
            log.warning(
                "flylora: merge_rule = params with a_seed = per_experience averages independent random "
                "projections into an A no experience trained with (branches is the coherent rule)"
            )

    def seed_of(self, layer: str, experience: int) -> int:
        """The seed of ``layer``'s A in ``experience`` (the experience counts only with per-experience A)."""
        per_experience = self.cfg.a_seed == "per_experience"
        return a_seed(self.ctx.seed, layer, experience if per_experience else None)

    def adapters(self) -> AdapterSet[FlyLoRALinear]:
        return self._adapters

    def n_active(self) -> int:
        return sum(a.n_active() for a in self._adapters.values())

    def biases(self) -> list[torch.Tensor]:
        return self.routing.biases()

    def before_experience(self, exp: ExperienceInfo) -> None:
        """Merge mode: a fresh adapter (B = 0, d = 0, a new A with per-experience seeds)."""
        self.routing.start_experience()
        redrawn = False
        for name, adapter in self._adapters.items():
            if self.cfg.cl_mode == "merge":
                A = None
                if self.cfg.a_seed == "per_experience" and exp.index > 0:
                    seed = self.seed_of(name, exp.index)
                    A = sparse_projection(adapter.r, adapter.in_features, adapter.p, seed)
                    redrawn = True
                adapter.reset(A)
            elif self.cfg.reset_balance_bias_each_experience and exp.index > 0:
                with torch.no_grad():
                    adapter.d.zero_()
        first = next(iter(self._adapters))
        fingerprint = torch.stack([a.A.double().square().sum() for a in self._adapters.values()]).sum()
        self._a_events.append(
            [exp.index, "redrawn" if redrawn else "kept", self.seed_of(first, exp.index), fingerprint.item()]
        )

    def after_step(self, step: int) -> None:
        """The balancing step from the counts of this step's training forwards."""
        self.routing.balance(self.cfg.bias_rate)

    # -- federation ---------------------------------------------------------------------------
    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """B and the balancing bias d of every layer (A is frozen and the same in every replica)."""
        return self.adapter_tensors(("B", "d"))

    def aggregate(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], mode: str
    ) -> dict[str, torch.Tensor]:
        """FedAvg in both modes: ``product`` equals it exactly, A being shared (module docstring)."""
        return super().aggregate(states, weights, "fedavg" if mode == "product" else mode)

    def after_experience(self, exp: ExperienceInfo) -> None:
        self.routing.end_experience()
        if self.cfg.cl_mode == "merge":
            for adapter in self._adapters.values():
                adapter.push()
        else:  # merge_each_experience needs k = r (checked by the config): exact
            self._adapters.end_experience()

    # -- checkpoint -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """What the module tensors do not hold (A, B, d, the banks and the merged means are
        persistent buffers and parameters, saved by the loop; each layer's bank size ``n_merged``
        travels as its module extra state):

        - ``routing``: the routing history (:meth:`RoutingHistory.state`), each finished
          experience's training counts per layer and the drift of d after it, and the layers'
          device counters of the experience in progress (the load, Jaccard and drift figures);
        - ``a_events``: the A-seeding event of every experience begun (``final_report``), which
          ``before_experience`` appends and a resume inside an experience does not rerun;
        - ``bank_rows``: the rows each layer's bank holds (merge mode), so that a bank doubled by
          :meth:`FlyLoRALinear.push` (more experiences than planned) is regrown before its
          tensors load.
        """
        return {
            "routing": self.routing.state(),
            "a_events": [list(event) for event in self._a_events],
            "bank_rows": {name: int(a.bank_b.shape[0]) for name, a in self._adapters.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` on a freshly built strategy: grow the banks to the saved
        size (zeros, the checkpoint's tensors then fill them), then the history and the events."""
        bank_rows = state["bank_rows"]
        if set(bank_rows) != set(self._adapters):
            raise ValueError("the checkpoint's FlyLoRA layers do not fit the model")
        for name, adapter in self._adapters.items():
            adapter.resize_bank(int(bank_rows[name]))
        self.routing.load_state(state["routing"])
        self._a_events = [
            [int(index), str(kind), int(seed), float(fingerprint)]
            for index, kind, seed, fingerprint in state["a_events"]
        ]

    # -- figures --------------------------------------------------------------------------------
    def report(self) -> dict[str, float | int]:
        figures: dict[str, float | int] = dict(self.routing.figures())
        if self.cfg.cl_mode == "merge":
            figures["merged_adapters"] = next(iter(self._adapters.values())).n_merged
        return figures

    def final_report(self) -> dict[str, Any]:
        sections = self.routing.sections()
        sections["per_layer"]["nonzeros_per_row"] = {n: a.p for n, a in self._adapters.items()}
        sections["events"]["a_seed"] = {
            "fields": ["experience", "A", "seed of the first layer", "sum of A^2 over layers"],
            "entries": self._a_events,
        }
        cfg = self.cfg
        scalars: dict[str, Any] = {
            **self.report(),
            "ranks_per_layer": cfg.r,
            "active_per_token": cfg.k,
            "topk_score": cfg.topk_score,
            "cl_mode": cfg.cl_mode,
            "a_seed": cfg.a_seed if cfg.cl_mode == "merge" else "shared (one A for the stream)",
            "merge_rule": cfg.merge_rule or "none",
        }
        if cfg.flagged_merge:
            scalars["merge_rule_flag"] = "params averages independent random projections"
        return {"scalars": scalars, **sections}
