"""sora: SoRA, sparse low-rank adaptation with a gate per rank (Ding et al., EMNLP 2023, arXiv 2311.11696).

Each adapted layer carries A [r, d_in] (kaiming-uniform), B [d_out, r] (zeros) and a gate
g [r] (standard normal):

    y = W0 x + b + (alpha / r) B diag(g) A x                     (the paper's gated forward)

A and B train with the main AdamW. The gates have their own optimizer and a proximal step
(the paper's proximal gradient update of the gate):

    g <- T_lambda(g - step(grad_g)),   T_lambda(u) = sign(u) max(|u| - lambda, 0)

where ``step`` is an Adam step (as in the official code) and ``lambda`` depends on ``threshold``:
- ``paper`` (default): the exact soft-threshold with ``lambda = eta_t * xi``, eta_t the gate
  learning rate at step t, so ``xi`` is in units of the step size;
- ``code``: the official ``SparseAdamW`` (TsinghuaC3I/SoRA ``src/sparse_optimizer.py``):
  ``lambda = xi`` not multiplied by the learning rate, applied as three masked updates in turn
  (subtract xi where g > xi, add xi where g < -xi, then zero where |g| < xi), so values in
  (xi, 2 xi) end at 0 and values exactly at +-xi stay unchanged. Here ``xi`` is absolute (the
  official ``sparse_lambda_2``, e.g. 3e-4).
A rank whose gate is 0 contributes nothing and is removed physically by :meth:`SoRA.prune`
(the ``pruned`` entry of :meth:`SoRA.final_variants`), which leaves the logits unchanged.

Sparsifying scheduler (Algorithm 1, the official ``lambda_schedule``): xi is stepped through a
list of stages. In continual learning one stage lasts ``experiences_per_stage`` experiences (one
by default), so xi grows as the stream goes on: the explicit list ``xi``, or ``xi_schedule``
(``linear`` / ``log_linear`` / ``exp_linear`` as in the official code) from ``xi_start`` to
``xi_end`` over ceil(n_experiences / experiences_per_stage) stages. The defaults depend on the
threshold mode, since xi is in step-size units in one and absolute in the other; both follow the
official RTE schedule script (STRATEGIES.md Part B §3, Defaults: xi_0 = 0, xi_max = 7e-4 at
lr 1.2e-3, 7 stages; the no-schedule scripts use xi = 3e-4):
- ``paper``: 0 -> 0.5 step sizes (7e-4 / 1.2e-3 is about 0.6, rounded down);
- ``code``: 0 -> 7e-4, absolute, as ``sparse_lambda_2``. Paper mode's 0.5 as an absolute
  threshold would shrink every gate by 0.5 a step and kill them all within a few steps.
``xi_end`` left unset takes its mode's value (``XI_END``); ``xi_start`` is 0 in both; values
given explicitly are kept as they are. An Adam step moves a gate by about its learning rate, so
in paper mode a gate survives only while its normalised gradient drift exceeds xi (xi >= 1
kills every gate eventually), and a gate of size |g| needs about |g| / (gate_lr * xi) steps to
die: short experiences sparsify little unless ``gate_lr`` is raised. In code mode a gate of
size |g| needs about |g| / xi steps, whatever the learning rate.

Optimizers (the official code's conventions; docs/optimizers.md, :mod:`cl_bench.optim`):
- the main optimizer (A, B and any other trainable parameter, never the gates) is AdamW in the
  ``optimizer`` convention: ``hf-adamw`` (default, the official code's HF Trainer with
  transformers' ``AdamW``): eps = 1e-8 added to sqrt(v) *before* the bias correction, which is
  folded into the step size ``lr sqrt(1 - beta2^t) / (1 - beta1^t)``, and the decoupled weight
  decay applied *after* the Adam update (``p -= lr wd p`` on the updated p); ``torch-adamw``:
  ``torch.optim.AdamW``, decay first (``p *= 1 - lr wd``), eps 1e-8 *after* the correction.
  Either way norms and biases get no decay (HF Trainer's groups, as the official ``create_optimizer``);
- the gate optimizer is the official ``SparseAdamW``'s Adam step exactly
  (:class:`cl_bench.optim.SparseAdamW`): the same hf arithmetic with eps = 1e-6 (before the bias
  correction), no weight decay, the update added as ``(m / (sqrt(v) + eps)) * -step_size``; then
  the threshold of the configured mode. Learning rate ``gate_lr`` (0: the run's lr, as the
  official ``sparse_lr``), following the main optimizer's schedule; it is rebuilt at every
  experience like the main one, and stepped in ``after_step``. Zeroed gates keep receiving
  gradients and may revive, as proximal methods allow.

Further choices (STRATEGIES.md Part A and Part B §3):
- the official code also adds ``sparse_lambda * sum|g| / n_gates`` to the loss; the paper does
  not. It is ``l1`` here, 0 by default;
- continual learning: one adapter set (gates included) trained through the whole stream;
  ``merge_each_experience`` folds ``(alpha/r) B diag(g) A`` into W0 and starts a fresh adapter
  (kaiming A, zero B, standard-normal gates).

Federation (issue 19): a client sends A, B and the gates of every adapter (``"<adapter>.A"``,
``"<adapter>.B"``, ``"<adapter>.gate"``) and the threshold lambda of its last step
(``"threshold"``, a 0-dim tensor: the clients of a round share the schedule, so they send the same
value). The server averages them all (FedAvg, as FLoRA, arXiv 2404.15182, does for factors) and
then applies SoRA's proximal step (:meth:`SoRA.proximal_step`, the same operator as training) with
the averaged lambda to the averaged gates: a gate every client zeroed averages to exactly 0 and
stays 0, a gate the clients' mean brings within lambda of 0 dies as in a local step. A gate only
one client sent is not thresholded again: that client's last step has just applied the operator,
and a second application would shrink it by 2 lambda (K = 1 must reproduce the centralised run).
``aggregation = "product"`` is refused: the gates sit between the factors and carry the sparsity,
and a refactored product has no per-rank gates left to threshold.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear
from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.lowrank import LowRank, init_lora_pair
from cl_bench.optim import CONVENTIONS, SPARSE_ADAMW_EPS, Convention, SparseAdamW, no_decay_ids
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, LoRAFamilyConfig, Strategy, StrategyContext, adamw

Threshold = Literal["paper", "code"]
XiSchedule = Literal["linear", "log_linear", "exp_linear"]

# Default last xi of the sparsifying schedule per threshold mode (xi_start is 0 in both, the
# official schedule script's xi_0). Code mode: xi is absolute, the schedule script's xi_max = 7e-4
# (STRATEGIES.md Part B §3, Defaults: RTE, lr 1.2e-3; the no-schedule script uses 3e-4). Paper
# mode: lambda = eta_t * xi, so xi is in step-size units: 7e-4 / 1.2e-3 is about 0.6 step sizes,
# rounded down to 0.5. Paper mode's 0.5 used as an absolute code-mode xi would kill every gate.
XI_END: dict[str, float] = {"paper": 0.5, "code": 7e-4}
THRESHOLD_KEY = "threshold"  # the communicated last lambda (federation)


def soft_threshold(u: torch.Tensor, lam: float) -> torch.Tensor:
    """``T_lam(u) = sign(u) max(|u| - lam, 0)`` (the paper's soft-threshold), as ``u - clamp(u, -lam, lam)``.

    The two forms are equal bitwise (``u - lam`` and ``u + lam`` are the only roundings), and this
    one gives +0.0 for every ``|u| <= lam``.
    """
    return u - u.clamp(-lam, lam)


def code_threshold(u: torch.Tensor, xi: float) -> torch.Tensor:
    """The official SparseAdamW thresholding: shrink by xi outside [-xi, xi], then zero ``|g| < xi``."""
    shrunk = torch.where(u > xi, u - xi, torch.where(u < -xi, u + xi, u))
    return torch.where(shrunk.abs() < xi, torch.zeros_like(shrunk), shrunk)


def xi_stages(cfg: SoRAConfig, n_experiences: int) -> list[float]:
    """xi of each stage of the sparsifying scheduler."""
    if cfg.xi:
        return list(cfg.xi)
    n = max(1, math.ceil(n_experiences / cfg.experiences_per_stage))
    a, b = cfg.xi_start, cfg.xi_end
    assert b is not None  # resolved per threshold mode in SoRAConfig.__post_init__
    if cfg.xi_schedule == "linear":
        values = np.linspace(a, b, n)
    elif cfg.xi_schedule == "log_linear":
        values = np.log(np.linspace(np.exp(a), np.exp(b), n))
    else:
        values = np.exp(np.linspace(np.log(a), np.log(b), n))
    return [float(v) for v in values]


class SoRALinear(AdaptedLinear):
    """``y = W0 x + b + (alpha / r) B diag(g) A x``; the gate multiplies the r-dim intermediate."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__(base)
        if r < 1:
            raise ValueError(f"SoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r  # fixed by the initial rank, kept when ranks are pruned
        self.A, self.B = init_lora_pair(r, base.in_features, base.out_features, base.weight.device)
        self.gate = nn.Parameter(torch.randn(r, device=base.weight.device))

    def low_rank(self) -> LowRank:
        """``(alpha / r) B diag(g) A``: the fused layer takes the gate as a per-rank scale and returns
        its gradient analytically (no extra autograd nodes per layer)."""
        return LowRank(self.A, self.B, self.scaling, rank_scale=self.gate)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B diag(g) A`` as a dense [d_out, d_in] matrix."""
        return (self.B * (self.gate * self.scaling)) @ self.A

    def live(self) -> torch.Tensor:
        """Number of non-zero gates (a 0-dim tensor on the device)."""
        return torch.count_nonzero(self.gate)

    @torch.no_grad()
    def prune(self) -> None:
        """Remove the ranks whose gate is exactly 0 (rows of A, columns of B, gate entries)."""
        keep = self.gate != 0
        self.A = nn.Parameter(self.A[keep].clone(), requires_grad=self.A.requires_grad)
        self.B = nn.Parameter(self.B[:, keep].clone(), requires_grad=self.B.requires_grad)
        self.gate = nn.Parameter(self.gate[keep].clone(), requires_grad=self.gate.requires_grad)

    def reset(self) -> None:
        """Fresh adapter (kaiming A, zero B, standard-normal gates), e.g. after merging it."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()
            self.gate.normal_()


@dataclass(frozen=True)
class SoRAConfig(LoRAFamilyConfig):
    """The LoRA-family fields (``r`` is the paper's r_max) and those of the gates and their schedule."""

    threshold: Threshold = "paper"
    xi: tuple[float, ...] = ()  # explicit xi per stage (overrides xi_schedule); the last one repeats
    xi_schedule: XiSchedule = "linear"
    xi_start: float = 0.0  # paper mode: in units of the gate learning rate; code mode: absolute
    xi_end: float | None = None  # None: XI_END[threshold], 0.5 (paper) or 7e-4 (code)
    experiences_per_stage: int = 1
    gate_lr: float = 0.0  # 0: the run's learning rate
    l1: float = 0.0  # the official code's sparse_lambda (L1 on the gates); not in the paper
    optimizer: Convention = "hf-adamw"  # the main AdamW: transformers' (official) or torch's

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in CONVENTIONS:
            raise ConfigError(
                f"strategy.optimizer must be one of {', '.join(CONVENTIONS)}, got {self.optimizer!r}"
            )
        if self.threshold not in XI_END:  # config.build checks the Literal; direct construction too
            raise ConfigError(f"strategy.threshold must be one of paper, code, got {self.threshold!r}")
        if self.xi_end is None:  # resolved here, so the run record holds the value used
            object.__setattr__(self, "xi_end", XI_END[self.threshold])
        for name in ("xi_start", "xi_end", "gate_lr", "l1"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"strategy.{name} must be a finite number >= 0, got {value}")
        if any(not (v >= 0 and math.isfinite(v)) for v in self.xi):
            raise ConfigError(f"strategy.xi must hold finite numbers >= 0, got {list(self.xi)}")
        if self.xi_schedule == "exp_linear" and not self.xi and self.xi_start <= 0:
            raise ConfigError("strategy.xi_schedule 'exp_linear' needs xi_start > 0")
        if self.experiences_per_stage < 1:
            raise ConfigError(
                f"strategy.experiences_per_stage must be >= 1, got {self.experiences_per_stage}"
            )


@STRATEGIES.register(
    "sora", description="SoRA: LoRA with per-rank gates sparsified by a proximal step (arXiv 2311.11696)"
)
class SoRA(Strategy):
    Config = SoRAConfig
    paper = "Ding et al. 2023, Sparse Low-rank Adaptation of Pre-trained Language Models (arXiv 2311.11696)"
    default_lr = 5e-4
    graph_safe = True
    graphs_span_experiences = True

    def __init__(self, cfg: SoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: SoRALinear(linear, cfg.r, cfg.alpha),
            roles=cfg.roles,
            towers=cfg.towers,
            merge_each_experience=cfg.merge_each_experience,
        )
        self.stages = xi_stages(cfg, ctx.n_experiences)
        self.xi = self.stages[0]
        self.threshold = 0.0  # the last lambda applied
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self._main: torch.optim.Optimizer | None = None
        self._base_lr = 1.0
        self._lr_factor = 1.0
        self._history: list[dict[str, int]] = []  # live gates per layer after each experience

    def adapters(self) -> AdapterSet[SoRALinear]:
        return self._adapters

    def gates(self) -> list[torch.Tensor]:
        return [a.gate for a in self._adapters.values()]

    # -- optimizers ---------------------------------------------------------------------------
    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The main AdamW (everything but the gates; ``optimizer`` convention, no decay on norms and
        biases) and the gate optimizer (:class:`cl_bench.optim.SparseAdamW`, eps 1e-6, no decay)."""
        gate_ids = {id(g) for g in self.gates()}
        self._main = adamw(
            [p for p in self.trainable_parameters() if id(p) not in gate_ids],
            lr,
            weight_decay,
            convention=self.cfg.optimizer,
            no_decay=no_decay_ids((self.backbone, self.head)),
        )
        self._base_lr = lr
        gates = [g for g in self.gates() if g.requires_grad]
        self.gate_optimizer = (
            SparseAdamW(gates, lr=self.cfg.gate_lr or lr, eps=SPARSE_ADAMW_EPS, weight_decay=0.0)
            if gates
            else None
        )
        return self._main

    def before_experience(self, exp: ExperienceInfo) -> None:
        stage = exp.index // self.cfg.experiences_per_stage
        self.xi = self.stages[min(stage, len(self.stages) - 1)]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, exp: ExperienceInfo) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), y)
        if self.cfg.l1 > 0:
            gates = torch.cat(self.gates())
            loss = loss + self.cfg.l1 * gates.abs().sum() / gates.numel()
        return loss

    def after_backward(self, step: int) -> None:
        # the learning rate of this step (the loop steps the scheduler before after_step)
        if self._main is not None:
            self._lr_factor = self._main.param_groups[0]["lr"] / self._base_lr

    def after_step(self, step: int) -> None:
        """SparseAdamW's Adam step on the gates, then the proximal (thresholding) step."""
        if self.gate_optimizer is None:
            return
        group = self.gate_optimizer.param_groups[0]
        group["lr"] = (self.cfg.gate_lr or self._base_lr) * self._lr_factor
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)
        self.threshold = group["lr"] * self.xi if self.cfg.threshold == "paper" else self.xi
        self.proximal_step(self.threshold)

    @torch.no_grad()
    def proximal_step(self, lam: float, gates: list[torch.Tensor] | None = None) -> None:
        """Threshold every gate with ``lam`` (``soft_threshold`` or ``code_threshold``), in one pass:
        the model's gates, or the tensors ``gates`` in place (the server's aggregated gates)."""
        if lam <= 0:
            return
        gates = self.gates() if gates is None else gates
        if not gates:
            return
        flat = torch.cat([g.reshape(-1) for g in gates])
        flat = soft_threshold(flat, lam) if self.cfg.threshold == "paper" else code_threshold(flat, lam)
        torch._foreach_copy_(gates, list(flat.split([g.numel() for g in gates])))

    # -- federation ---------------------------------------------------------------------------
    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """A, B and the gate of every adapter (and a linear head where one trains)."""
        return self.adapter_tensors(("A", "B", "gate"))

    def communicated_state(self) -> dict[str, torch.Tensor]:
        """The adapters' A, B, gates and the last threshold lambda (``"threshold"``, 0-dim float32)."""
        state = super().communicated_state()
        state[THRESHOLD_KEY] = torch.tensor(self.threshold, dtype=torch.float32)
        return state

    def load_communicated_state(self, state: dict[str, torch.Tensor]) -> None:
        """The tensors in place, and ``threshold`` (the report's last lambda) when sent."""
        rest = {k: v for k, v in state.items() if k != THRESHOLD_KEY}
        super().load_communicated_state(rest)
        if THRESHOLD_KEY in state:
            self.threshold = float(state[THRESHOLD_KEY])

    def aggregate(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], mode: str
    ) -> dict[str, torch.Tensor]:
        """FedAvg of factors, gates and thresholds, then the proximal step on the averaged gates
        sent by more than one client, with the averaged threshold (the module docstring)."""
        state = super().aggregate(states, weights, mode)
        lam = float(state[THRESHOLD_KEY]) if THRESHOLD_KEY in state else 0.0
        keys = [f"{name}.gate" for name in self._adapters]
        shared = [state[k] for k in keys if sum(k in s for s in states) > 1]
        self.proximal_step(lam, shared)
        return state

    # -- pruning ------------------------------------------------------------------------------
    def prune(self) -> None:
        """Physically remove every rank whose gate is 0 (in every adapted layer)."""
        for adapter in self._adapters.values():
            adapter.prune()

    @contextlib.contextmanager
    def pruned(self) -> Iterator[None]:
        """The model with zero-gate ranks removed inside the block; the full adapters are restored after."""
        saved = {name: (a.A, a.B, a.gate) for name, a in self._adapters.items()}
        self.prune()
        try:
            yield
        finally:
            for name, (A, B, gate) in saved.items():
                adapter = self._adapters[name]
                adapter.A, adapter.B, adapter.gate = A, B, gate

    def final_variants(self) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
        return {"pruned": self.pruned}

    def after_experience(self, exp: ExperienceInfo) -> None:
        self._history.append(self.live_per_layer())
        self._adapters.end_experience()

    # -- checkpoints --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """SoRA's state outside the module tensors (the loop saves A, B, the gates and the head,
        and the main AdamW with its schedule):

        - ``ranks``: the number of ranks of each adapted layer (``gate.numel()``, by layer name), so
          that a model whose ranks were pruned is rebuilt with the saved shapes before its tensors
          load;
        - ``stages`` (checked against the config's) and ``xi``: the sparsifying schedule's current
          value, set in ``before_experience``, which a resume inside an experience does not rerun;
        - ``threshold``: the last lambda applied (the report);
        - ``base_lr`` and ``lr_factor``: the gate learning rate follows the main schedule through
          them (``make_optimizer`` resets ``base_lr``);
        - ``history``: live gates per layer after each experience (report and final figures);
        - ``gate_optimizer``: the ``state_dict`` of the gate optimizer (SparseAdamW: per-gate step
          counts and moments, keyed by gate position), which the loop does not own; None when
          no gate trains. Only a resume inside an experience loads it (the next experience builds a
          fresh one), but it is a few numbers per gate, so a boundary checkpoint keeps it too."""
        gate_optimizer = self.gate_optimizer
        return {
            "ranks": {name: int(a.gate.numel()) for name, a in self._adapters.items()},
            "stages": list(self.stages),
            "xi": self.xi,
            "threshold": self.threshold,
            "base_lr": self._base_lr,
            "lr_factor": self._lr_factor,
            "history": [dict(h) for h in self._history],
            "gate_optimizer": None if gate_optimizer is None else gate_optimizer.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` on a freshly built strategy: give every adapted layer the
        saved number of ranks (new A, B and gate parameters of the saved shapes, the module tensors
        loaded next fill them), then xi, threshold, the learning-rate factors and the history."""
        ranks = state["ranks"]
        if sorted(ranks) != sorted(self._adapters):
            raise ValueError(
                f"SoRA checkpoint of layers {sorted(ranks)[:3]}..., "
                f"this run has {sorted(self._adapters)[:3]}..."
            )
        if [float(v) for v in state["stages"]] != self.stages:
            raise ValueError(f"SoRA checkpoint of xi stages {state['stages']}, this run has {self.stages}")
        for name, adapter in self._adapters.items():
            r = int(ranks[name])
            if r != adapter.gate.numel():
                self._resize(adapter, r)
        self.xi = float(state["xi"])
        self.threshold = float(state["threshold"])
        self._base_lr = float(state["base_lr"])
        self._lr_factor = float(state["lr_factor"])
        self._history = [{str(k): int(v) for k, v in h.items()} for h in state["history"]]

    @staticmethod
    def _resize(adapter: SoRALinear, r: int) -> None:
        """New A [r, d_in], B [d_out, r] and gate [r] (zeros, same dtype, device and requires_grad):
        the shapes of a layer pruned to ``r`` ranks, for the checkpoint's tensors to load into."""
        if r < 1:
            raise ValueError(f"SoRA checkpoint: a layer with {r} ranks")
        A, B, gate = adapter.A, adapter.B, adapter.gate
        adapter.A = nn.Parameter(A.new_zeros(r, A.shape[1]), requires_grad=A.requires_grad)
        adapter.B = nn.Parameter(B.new_zeros(B.shape[0], r), requires_grad=B.requires_grad)
        adapter.gate = nn.Parameter(gate.new_zeros(r), requires_grad=gate.requires_grad)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """After :meth:`make_optimizer` on a resume inside an experience: the gate optimizer's
        state, and ``base_lr``/``lr_factor`` (the first reset by ``make_optimizer``)."""
        saved = state["gate_optimizer"]
        if (saved is None) != (self.gate_optimizer is None):
            raise ValueError("SoRA checkpoint: the trainable gates differ from this run's")
        if self.gate_optimizer is not None:
            self.gate_optimizer.load_state_dict(saved)
        self._base_lr = float(state["base_lr"])
        self._lr_factor = float(state["lr_factor"])

    # -- figures ------------------------------------------------------------------------------
    def live_per_layer(self) -> dict[str, int]:
        """Non-zero gates per adapted layer (one device sync)."""
        counts = torch.stack([a.live() for a in self._adapters.values()]).tolist()
        return dict(zip(self._adapters, counts, strict=True))

    def n_active(self) -> int:
        """Parameters of the live ranks: a row of A, a column of B and the gate per live rank."""
        live = self.live_per_layer()
        return sum(
            n * (a.in_features + a.out_features + 1)
            for n, a in zip(live.values(), self._adapters.values(), strict=True)
        )

    def report(self) -> dict[str, float | int]:
        live = self._history[-1] if self._history else self.live_per_layer()
        total = sum(a.gate.numel() for a in self._adapters.values())
        figures: dict[str, float | int] = {
            "live_gates": sum(live.values()),
            "total_gates": total,
            "live_fraction": sum(live.values()) / total,
            "xi": self.xi,
            "threshold": self.threshold,
        }
        for tower in ("vision", "text"):
            counts = [n for name, n in live.items() if name.startswith(f"{tower}.")]
            if counts:
                figures[f"live_gates_{tower}"] = sum(counts)
        return figures

    def final_report(self) -> dict[str, Any]:
        final = self._history[-1] if self._history else self.live_per_layer()
        totals = [sum(h.values()) for h in self._history]
        return {
            "scalars": {
                "live_gates": sum(final.values()),
                "total_gates": sum(a.gate.numel() for a in self._adapters.values()),
                "xi_final": self.xi,
            },
            "curves": {
                "live_gates": {
                    "x": list(range(len(totals))),
                    "y": totals,
                    "x_label": "experience",
                    "y_label": "live gates",
                },
                "xi": {
                    "x": list(range(len(self.stages))),
                    "y": list(self.stages),
                    "x_label": "stage",
                    "y_label": "xi",
                },
            },
            "per_layer": {"live_gates": final},
            "events": {
                "live_gates_per_layer": [
                    [i, name, n] for i, layer in enumerate(self._history) for name, n in layer.items()
                ]
            },
        }
