"""dylora: DyLoRA, dynamic search-free LoRA with nested ranks (Valipour et al., arXiv 2210.07558).

One adapter of maximal rank ``r_max`` (A [r_max, d_in] kaiming-uniform, B [d_out, r_max] zeros)
is trained so that every leading truncation works on its own. At each optimizer step a rank b is
drawn uniformly from 1..r_max (the paper's p_B, uniform), shared by all layers, and the layer computes

    y = W0 x + b + (alpha / b) B[:, :b] A[:b] x          (the paper's truncated forward, scaled alpha / b)

``mode: full`` (default here) trains all of A[:b] and B[:, :b]; ``mode: frozen`` (the official
code's training mode) lets only the b-th row of A and the b-th column of B learn. Both are the
paper's (it compares them). Why not frozen by default: in frozen mode a rank learns only in the
steps that sample it, 1 in r_max, and its A row only once its B column has left zero, so with the
~100 steps per experience of a continual-learning stream every rank gets ~12 updates. Measured on
split-digits (tiny-clip, CPU, 10 classes, 135 steps): LoRA 0.41, frozen DyLoRA 0.17 (0.24 at 4x
the lr, and worse at 8x: the low ranks train at alpha / b, up to 16, and overshoot), while a DyLoRA
that always samples b = 1 learns as a rank-1 LoRA (0.34 against 0.32), so the layer and the
optimizer are right and the starvation is the method's. On the five 2-class experiences of the
README demo frozen DyLoRA stayed at within-task chance (0.69, 0.69, 0.50, 0.50, 0.51 in the
just-learned cells), full mode reached plasticity 0.74 (LoRA 0.84). The paper trains for tens
of epochs (30 on MNLI), where frozen mode has the steps it needs. Evaluation uses
``eval_rank`` (r_max by default); ``eval_ranks`` evaluates the final model again at each listed
rank through :meth:`DyLoRA.final_variants`, labelled ``rank=<b>``, so the accuracy-vs-rank curve
of the run record is ``accuracy.variants["rank=<b>"]["acc_final"]`` over ``eval_ranks`` (a
strategy never sees accuracies, so :meth:`DyLoRA.final_report` carries the sampled-rank counts,
not the curve).

Choices where paper, official code (huawei-noah/Efficient-NLP ``DyLoRA/``) and CL differ
(STRATEGIES.md Part A and Part B §4):
- "frozen" must mean frozen in parameter space. The official code only detaches the leading
  rows, so AdamW momentum and weight decay still move them. Here the optimizer is
  :class:`RankwiseAdamW`: AdamW in which each rank (row i of A together with row i of B^T, in
  every layer) is its own parameter with its own moments and step count, and a rank that does not
  train in a step is not touched at all (no update, no moment decay, no weight decay). It computes
  exactly what its AdamW (``optimizer``, below) computes for a parameter stepped only when its rank
  trains. Parameters outside the adapters (a linear head) use a plain AdamW.
- the AdamW arithmetic is the ``optimizer`` convention (:mod:`cl_bench.optim`, docs/optimizers.md):
  ``hf-adamw`` (default, the official scripts' HF Trainer with transformers' ``AdamW``): eps =
  1e-8 added to sqrt(v) *before* the bias correction (step size ``lr sqrt(1 - beta2^t) /
  (1 - beta1^t)``), decoupled weight decay *after* the Adam update (``p -= lr wd p`` on the
  updated p); ``torch-adamw``: ``torch.optim.AdamW``'s, decay first (``p *= 1 - lr wd``), eps
  after the correction. Per rank in both, with the rank's own t. The adapter rows decay; norms
  and biases outside the adapters do not (HF Trainer's groups).
- B is stored transposed (``Bt`` [r_max, d_out]) so that each rank is a contiguous row for the
  multi-tensor optimizer kernels. Training runs through the fused low-rank linear of
  :mod:`cl_bench.lowrank` over all r_max ranks with per-rank weights ``alpha / b`` on ranks
  1..b and 0 above (the same function as the truncation ``(alpha / b) B[:, :b] A[:b]``) and a
  0/1 gradient mask: in frozen mode only rank b gets gradient, the others an exact zero (as with
  the official ``detach``). Weights and mask are device tensors shared by all layers
  (:class:`RankState`) and rewritten in place when the rank changes, so the step launches the
  same kernels at every rank and one CUDA graph serves them all. Parameter gradients stay fp32.
- the rank is sampled once per optimizer step (``before_step``) from the strategy's own seeded
  generator, never per layer; evaluation always uses ``eval_rank``, never the last sampled rank.
- continual learning: one adapter set trained through the whole stream, optimizer rebuilt every
  experience; ``merge_each_experience`` merges the adapter at ``eval_rank`` into W0 and starts a
  fresh one;
- federation (issue 19): a client sends all r_max rank rows of A and B (``"<adapter>.A"`` and
  ``"<adapter>.B"`` = Bt^T, LoRA's names and shapes): every truncation is the model, and the ranks
  a client trained change from step to step. A rank no client touched in a round comes back bit
  for bit (FedAvg of equal values is exact). ``aggregation = "product"`` averages ``B A`` at full
  rank r_max, whose SVD orders the refactored ranks by singular value (leading ranks first, which
  suits the nested truncations). The rank sampler is the strategy's one random stream
  (:meth:`DyLoRA.random_streams`), reseeded per client by the federation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear, check_targets
from cl_bench.backbones.base import ROLES, Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.lowrank import LowRank, init_lora_pair
from cl_bench.optim import CONVENTIONS, UPDATES, Convention, no_decay_ids
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyConfig, StrategyContext, adamw

Mode = Literal["frozen", "full"]


class RankState:
    """The rank every DyLoRA layer of a model uses now, as device tensors shared by all layers.

    ``weights`` [r_max]: ``alpha / b`` on ranks 0..b-1, 0 on the others (the forward's truncation
    and scale); ``grad_mask`` [r_max]: 1 on the ranks that learn at rank b (b - 1 in frozen mode,
    0..b-1 in full mode). Setting a rank copies one precomputed row into each (two tiny kernels
    for the whole model, no host sync), so the adapted layers run the same kernels on the same
    tensors at every rank: one CUDA graph serves every sampled rank, and every GEMM keeps the
    aligned width r_max (a truncated rank b gave misaligned GEMMs).
    """

    def __init__(
        self, r_max: int, alpha: float, mode: Mode, device: torch.device | str | None = None
    ) -> None:
        ranks = torch.arange(1, r_max + 1, dtype=torch.float64)
        below = torch.arange(r_max)[None, :] < ranks[:, None]  # [b - 1, i]: i < b
        self.r_max, self.alpha, self.mode = r_max, alpha, mode
        # float64 tables (alpha / b exact to the layer's precision); the shared tensors take the
        # layer's dtype when it is converted
        self.weight_table = torch.where(below, alpha / ranks[:, None], 0.0).to(device)
        learns = torch.eye(r_max, dtype=torch.bool) if mode == "frozen" else below
        self.mask_table = learns.double().to(device)
        self.weights = self.weight_table[-1].float()
        self.grad_mask = self.mask_table[-1].float()
        self.rank = r_max

    def set(self, b: int) -> None:
        if not 1 <= b <= self.r_max:
            raise ValueError(f"rank must be in 1..{self.r_max}, got {b}")
        if b != self.rank:
            self.weights.copy_(self.weight_table[b - 1])
            self.grad_mask.copy_(self.mask_table[b - 1])
            self.rank = b

    def trained_ranks(self) -> range:
        """0-based ranks that learn at the current rank b: b - 1 (frozen) or 0..b-1 (full)."""
        return range(self.rank - 1 if self.mode == "frozen" else 0, self.rank)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Convert the tensors as ``nn.Module._apply`` converts a layer's (device, dtype); every
        layer sharing this state applies it, and a conversion already done returns the same tensor."""
        self.weights, self.grad_mask = fn(self.weights), fn(self.grad_mask)
        device = self.weights.device
        self.weight_table, self.mask_table = self.weight_table.to(device), self.mask_table.to(device)
        self.weights.copy_(self.weight_table[self.rank - 1])  # at the new precision


class DyLoRALinear(AdaptedLinear):
    """``y = W0 x + b + (alpha / b) B[:, :b] A[:b] x`` at the current rank ``b`` of ``state``.

    Parameters: A [r_max, d_in] (kaiming-uniform) and ``Bt`` = B^T [r_max, d_out] (zeros), so rank
    i is row i of both. The rank lives in a :class:`RankState` shared by every layer of a model
    (a layer built alone gets its own).
    """

    def __init__(
        self, base: nn.Linear, r_max: int, alpha: float, mode: Mode = "frozen", state: RankState | None = None
    ) -> None:
        super().__init__(base)
        if r_max < 1:
            raise ValueError(f"DyLoRA r_max must be >= 1, got {r_max}")
        self.r_max = r_max
        self.alpha = alpha
        self.mode: Mode = mode
        self.state = state or RankState(r_max, alpha, mode, base.weight.device)
        A, B = init_lora_pair(r_max, base.in_features, base.out_features, base.weight.device)
        self.A = A
        self.Bt = nn.Parameter(B.data.t().contiguous())

    @property
    def rank(self) -> int:
        return self.state.rank

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DyLoRALinear:
        super()._apply(fn, recurse)
        self.state.apply(fn)  # device and dtype moves reach the shared rank tensors too
        return self

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r_max, d_in] and B [d_out, r_max] (a transposed view of ``Bt``)."""
        return self.A, self.Bt.t()

    @torch.no_grad()
    def load_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy a full A [r_max, d_in] and B [d_out, r_max] into the parameters."""
        self.A.copy_(A)
        self.Bt.copy_(B.t())

    def set_rank(self, b: int) -> None:
        self.state.set(b)

    def trained_ranks(self) -> range:
        """0-based ranks that learn at the current rank: b - 1 (frozen) or 0..b-1 (full)."""
        return self.state.trained_ranks()

    def low_rank(self) -> LowRank:
        """All r_max ranks with the rank weights ``alpha / b`` on the first b and 0 on the others
        (the paper's truncation ``(alpha / b) B[:, :b] A[:b]``); in frozen mode only rank b receives
        gradient, the others get exact zeros."""
        s = self.state
        return LowRank(self.A, self.Bt.t(), 1.0, rank_scale=s.weights, grad_rank_mask=s.grad_mask)

    def delta_weight(self, b: int | None = None) -> torch.Tensor:
        """``(alpha / b) B[:, :b] A[:b]`` as a dense [d_out, d_in] matrix."""
        b = self.rank if b is None else b
        return (self.Bt[:b].t() @ self.A[:b]) * (self.alpha / b)

    def reset(self) -> None:
        """Fresh adapter (kaiming A, zero B), e.g. after merging it into the backbone."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.Bt.zero_()


class RankwiseAdamW(torch.optim.Optimizer):
    """AdamW in which every rank of every DyLoRA layer is its own parameter.

    Rank i is row i of A and row i of Bt in all ``layers``. At each step only the ranks given by
    ``trained_ranks()`` (the same for every layer: the rank is sampled globally) are updated, with
    the rank's own step count and the arithmetic of ``convention`` (:mod:`cl_bench.optim`):
    ``torch-adamw``, that of ``torch.optim.AdamW`` (foreach implementation: decay first, eps after
    the bias correction), or ``hf-adamw``, that of transformers' ``AdamW`` (:class:`HFAdamW`: eps
    before the bias correction, decay after the update); every other row, and its moments, is left
    untouched. The adapter rows always decay (they are weights). Parameters in ``others`` (e.g. a
    linear head) are stepped by a plain :func:`cl_bench.strategy.adamw` in the same convention,
    without decay for the ids in ``no_decay`` (norms and biases), following this optimizer's
    learning rate.
    """

    def __init__(
        self,
        layers: list[DyLoRALinear],
        others: list[nn.Parameter],
        trained_ranks: Callable[[], range],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        convention: Convention = "torch-adamw",
        no_decay: Collection[int] = (),
    ) -> None:
        if convention not in UPDATES:
            raise ValueError(f"unknown optimizer convention {convention!r} (one of {', '.join(UPDATES)})")
        params = [p for layer in layers for p in (layer.A, layer.Bt) if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": params}]
        if others:
            groups.append({"params": others})
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self.trained_ranks = trained_ranks
        self.convention: Convention = convention
        self._update = UPDATES[convention]
        self.rank_steps = [0] * (layers[0].r_max if layers else 0)
        self.inner = (
            adamw(others, lr, weight_decay, betas, convention=convention, no_decay=no_decay)
            if others
            else None
        )
        for p in params:
            self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        # views of rank i of every parameter and moment, built once: the step runs every optimizer
        # step and is Python-bound on a GPU, where rebuilding hundreds of views costs milliseconds
        self._rank_views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = {}

    def _views(self, i: int, stepped: list[nn.Parameter]) -> tuple[list[torch.Tensor], ...]:
        """(parameters, exp_avgs, exp_avg_sqs) at rank i; cached when every parameter steps."""
        every = len(stepped) == len(self.param_groups[0]["params"])
        if every and i in self._rank_views:
            return self._rank_views[i]
        states = [self.state[p] for p in stepped]
        views = (
            [p[i] for p in stepped],
            [s["exp_avg"][i] for s in states],
            [s["exp_avg_sq"][i] for s in states],
        )
        if every:
            self._rank_views[i] = views
        return views

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        stepped = [p for p in group["params"] if p.grad is not None]
        if stepped:
            for i in self.trained_ranks():
                self.rank_steps[i] += 1
                params, exp_avgs, exp_avg_sqs = self._views(i, stepped)
                grads = [p.grad[i] for p in stepped]
                self._update(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    self.rank_steps[i],
                    group["lr"],
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                )
        if self.inner is not None:
            for inner_group in self.inner.param_groups:
                inner_group["lr"] = self.param_groups[1]["lr"]
            self.inner.step()
        return loss


@dataclass(frozen=True)
class DyLoRAConfig(StrategyConfig):
    r_max: int = 8
    alpha: float = 16.0
    mode: Mode = "full"  # frozen: the paper's slower variant (see the module docstring)
    eval_rank: int = 0  # rank of every evaluation row; 0: r_max
    eval_ranks: tuple[int, ...] = ()  # the final model again at each rank; empty: 1, 2, 4, ... and r_max
    roles: tuple[str, ...] = ROLES
    towers: tuple[str, ...] = ("vision", "text")
    merge_each_experience: bool = False
    optimizer: Convention = "hf-adamw"  # transformers' AdamW arithmetic (official) or torch's

    def __post_init__(self) -> None:
        if self.optimizer not in CONVENTIONS:
            raise ConfigError(
                f"strategy.optimizer must be one of {', '.join(CONVENTIONS)}, got {self.optimizer!r}"
            )
        if self.r_max < 1:
            raise ConfigError(f"strategy.r_max must be >= 1, got {self.r_max}")
        if self.alpha <= 0:
            raise ConfigError(f"strategy.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.eval_rank <= self.r_max:
            raise ConfigError(
                f"strategy.eval_rank must be in 0..r_max={self.r_max} (0: r_max), got {self.eval_rank}"
            )
        if not self.eval_ranks:  # filled in here, so the run record shows the ranks evaluated
            powers = [2**i for i in range(self.r_max.bit_length()) if 2**i < self.r_max]
            object.__setattr__(self, "eval_ranks", (*powers, self.r_max))
        bad = [b for b in self.eval_ranks if not 1 <= b <= self.r_max]
        if bad or len(set(self.eval_ranks)) != len(self.eval_ranks):
            raise ConfigError(
                f"strategy.eval_ranks must be distinct ranks in 1..r_max={self.r_max}, "
                f"got {list(self.eval_ranks)}"
            )
        check_targets(self.roles, self.towers)


@STRATEGIES.register(
    "dylora", description="DyLoRA: nested-rank LoRA, rank sampled per step (arXiv 2210.07558)"
)
class DyLoRA(Strategy):
    Config = DyLoRAConfig
    paper = (
        "Valipour et al. 2023, DyLoRA: Parameter-Efficient Tuning of Pretrained Models using Dynamic "
        "Search-Free Low Rank Adaptation (arXiv 2210.07558)"
    )
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: DyLoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.rank_state = RankState(cfg.r_max, cfg.alpha, cfg.mode)  # shared by every layer
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: DyLoRALinear(linear, cfg.r_max, cfg.alpha, cfg.mode, self.rank_state),
            roles=cfg.roles,
            towers=cfg.towers,
            merge_each_experience=cfg.merge_each_experience,
        )
        self.eval_rank = cfg.eval_rank or cfg.r_max
        self._generator = ctx.generator(salt=2210_07558)
        self._counts = [0] * cfg.r_max  # sampled ranks over the whole stream
        self._experience_ranks: list[int] = []  # sampled ranks of the current experience
        self.last_rank = self.eval_rank
        self._optimizer: RankwiseAdamW | None = None  # this experience's (for checkpoints)

    def adapters(self) -> AdapterSet[DyLoRALinear]:
        return self._adapters

    def set_rank(self, b: int) -> None:
        """Use rank ``b`` in every adapted layer (they share :attr:`rank_state`)."""
        self.rank_state.set(b)

    @property
    def rank(self) -> int:
        """The rank every layer uses now (the last sampled one in training, ``eval_rank`` in eval)."""
        return self.rank_state.rank

    def trained_ranks(self) -> range:
        """0-based ranks the optimizer updates at the current rank (the same in every layer)."""
        return self.rank_state.trained_ranks()

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """:class:`RankwiseAdamW` in the ``optimizer`` convention over the adapters (and a plain AdamW
        in the same convention for any other trainable parameter, no decay on norms and biases)."""
        layers = list(self._adapters.values())
        ids = {id(p) for layer in layers for p in (layer.A, layer.Bt)}
        others = [p for p in self.trainable_parameters() if id(p) not in ids]
        self._optimizer = RankwiseAdamW(
            layers,
            others,
            self.trained_ranks,
            lr,
            weight_decay,
            convention=self.cfg.optimizer,
            no_decay=no_decay_ids((self.backbone, self.head)),
        )
        return self._optimizer

    def sample_rank(self) -> int:
        """Draw b uniformly from 1..r_max with the strategy's own generator (CPU, no device sync)."""
        return int(torch.randint(1, self.cfg.r_max + 1, (1,), generator=self._generator))

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        if not mode:
            self.set_rank(self.eval_rank)

    def before_experience(self, exp: ExperienceInfo) -> None:
        self._experience_ranks = []

    def before_step(self, step: int) -> None:
        b = self.sample_rank()
        self.set_rank(b)
        self.last_rank = b
        self._counts[b - 1] += 1
        self._experience_ranks.append(b)

    # -- federation ---------------------------------------------------------------------------
    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A [r_max, d_in] and B = Bt^T [d_out, r_max] (a view: loading writes Bt) of every adapter,
        all ranks, and a linear head where one trains."""
        tensors: dict[str, torch.Tensor] = {}
        for name, adapter in self._adapters.items():
            tensors[f"{name}.A"] = adapter.A
            tensors[f"{name}.B"] = adapter.Bt.t()
        ids = {id(p) for a in self._adapters.values() for p in (a.A, a.Bt)}
        return tensors | self.trained_by_name(skip=ids)

    def lowrank_pairs(self) -> list[tuple[str, str]]:
        """Every adapter's (B, A): ``B A`` times ``alpha / r_max`` is its update at rank r_max."""
        return self.adapter_pairs()

    def random_streams(self) -> list[torch.Generator]:
        """The rank sampler (``before_step``)."""
        return [self._generator]

    def after_experience(self, exp: ExperienceInfo) -> None:
        """With ``merge_each_experience``: fold the adapters at ``eval_rank`` into W0, start fresh ones."""
        self._adapters.end_experience(lambda adapter: adapter.delta_weight(self.eval_rank))
        self._optimizer = None  # rebuilt by the next experience; a boundary checkpoint needs none

    # -- checkpoints --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """DyLoRA's state outside the module tensors (the loop saves A, Bt and the head, and the
        :class:`RankwiseAdamW` moments and learning rates through its ``state_dict``):

        - ``rank``: the current rank of the shared :class:`RankState` (its ``weights`` and
          ``grad_mask`` are plain tensors, not buffers, and are a row of its tables at that rank,
          so the rank rebuilds them exactly);
        - ``eval_rank`` and ``last_rank`` (evaluation and the report);
        - ``generator``: the state of the rank sampler's generator, so the resumed run draws the
          same ranks;
        - ``counts`` (sampled ranks over the stream, the final report) and ``experience_ranks``
          (the current experience's, the report's mean);
        - ``optimizer`` (inside an experience, None at a boundary): what the optimizer's
          ``state_dict`` leaves out, the per-rank step counts ``rank_steps`` (the bias correction of
          each rank) and the ``state_dict`` of the inner AdamW over the non-adapter parameters (its
          state is keyed by parameter position there, so it loads into the rebuilt optimizer)."""
        optimizer = self._optimizer
        saved_optimizer = None
        if optimizer is not None:
            saved_optimizer = {
                "rank_steps": list(optimizer.rank_steps),
                "inner": None if optimizer.inner is None else optimizer.inner.state_dict(),
            }
        return {
            "r_max": self.cfg.r_max,
            "rank": self.rank_state.rank,
            "eval_rank": self.eval_rank,
            "last_rank": self.last_rank,
            "generator": self._generator.get_state(),
            "counts": list(self._counts),
            "experience_ranks": list(self._experience_ranks),
            "optimizer": saved_optimizer,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` on a freshly built strategy: the rank (the shared weights and
        mask follow), ranks, counts and the sampler's generator. The layers' structure is the
        config's (r_max is checked), so the module tensors load as they are."""
        if int(state["r_max"]) != self.cfg.r_max or len(state["counts"]) != self.cfg.r_max:
            raise ValueError(f"DyLoRA checkpoint of r_max {state['r_max']}, this run has {self.cfg.r_max}")
        self.set_rank(int(state["rank"]))
        self.eval_rank = int(state["eval_rank"])
        self.last_rank = int(state["last_rank"])
        self._generator.set_state(state["generator"])
        self._counts = [int(c) for c in state["counts"]]
        self._experience_ranks = [int(b) for b in state["experience_ranks"]]

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """After :meth:`make_optimizer` on a resume inside an experience: the per-rank step counts
        and the inner AdamW's state (the loop then loads the moments and learning rates)."""
        saved = state["optimizer"]
        optimizer = self._optimizer
        if saved is None or optimizer is None:
            raise ValueError("DyLoRA checkpoint taken inside an experience lacks its optimizer state")
        if len(saved["rank_steps"]) != len(optimizer.rank_steps):
            raise ValueError(
                f"DyLoRA checkpoint has {len(saved['rank_steps'])} rank step counts, "
                f"the optimizer {len(optimizer.rank_steps)}"
            )
        optimizer.rank_steps = [int(t) for t in saved["rank_steps"]]
        if (saved["inner"] is None) != (optimizer.inner is None):
            raise ValueError("DyLoRA checkpoint: the parameters outside the adapters differ")
        if optimizer.inner is not None:
            optimizer.inner.load_state_dict(saved["inner"])

    @contextlib.contextmanager
    def evaluated_at(self, b: int) -> Iterator[None]:
        """Evaluate at rank ``b`` inside the block (the loop's ``eval()`` applies it), then restore."""
        previous = self.eval_rank
        self.eval_rank = b
        self.set_rank(b)
        try:
            yield
        finally:
            self.eval_rank = previous
            self.set_rank(previous)

    def final_variants(self) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
        """``rank=<b>`` for each of ``eval_ranks``: the accuracy-vs-rank curve of the final model."""
        return {f"rank={b}": functools.partial(self.evaluated_at, b) for b in self.cfg.eval_ranks}

    def report(self) -> dict[str, float | int]:
        ranks = self._experience_ranks
        return {
            "eval_rank": self.eval_rank,
            "mean_sampled_rank": sum(ranks) / len(ranks) if ranks else math.nan,
            "last_rank": self.last_rank,
        }

    def final_report(self) -> dict[str, Any]:
        return {
            "scalars": {"r_max": self.cfg.r_max, "eval_rank": self.eval_rank, "steps": sum(self._counts)},
            "curves": {
                "sampled_ranks": {
                    "x": list(range(1, self.cfg.r_max + 1)),
                    "y": list(self._counts),
                    "x_label": "rank",
                    "y_label": "steps",
                    "kind": "bar",
                }
            },
        }
