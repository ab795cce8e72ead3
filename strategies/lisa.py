"""lisa: Layerwise Importance Sampled AdamW (Pan et al. 2024, arXiv 2403.17919, Algorithm 1).

Full-parameter training in which the embedding and the head always train and, every ``K`` steps,
``gamma`` of the ``N_L`` middle (transformer) blocks of each tower are drawn uniformly without
replacement and unfrozen; all other blocks are frozen. Per block the selection probability is

    p_embedding = p_head = 1,    p_block = gamma / N_L                    (paper, Alg. 1)

and each interval runs AdamW for ``K`` steps on E + H + the sampled blocks with the global LR
schedule. Despite the name there is no learned importance: sampling is uniform.

CLIP mapping (STRATEGIES.md Part A): "embedding" = the backbone's ``embedding_names`` (patch,
class and positional embeddings, ``ln_pre``; token and positional embeddings of the text tower),
"head" = its ``head_names`` (final norms and projections of both towers) plus the linear
classifier where there is one; the middle layers are ``backbone.blocks`` of every tower in
``towers``, sampled per tower. CLIP's ``logit_scale`` and anything else outside these stays frozen.

Choices where the paper, the official code (LMFlow ``lisa_trainer.py``) and CL leave room:

- The optimizer holds every candidate parameter from the start (E, H and all blocks of the chosen
  towers), so a block first sampled late is updated: the LMFlow #726 bug (optimizer built from
  the parameters that required grad at creation) cannot happen. Frozen blocks have
  ``grad is None`` (the loop zeroes gradients with ``set_to_none=True``), so AdamW, foreach or
  fused, skips them entirely: no moment update and no weight decay on frozen blocks.
- Optimizer state of a re-sampled block: ``keep`` (default, as LMFlow: stale Adam moments resume)
  or ``reset`` (the block's state is dropped whenever it is sampled, as in the paper's runs where
  every interval was a separate job; LMFlow #729/#768). The optimizer itself is rebuilt at every
  experience by the loop (CL protocol of STRATEGIES.md Part A), so no state crosses experiences.
- Sampling happens in ``before_step`` when the global step (across the stream) is a multiple of
  ``K``, with the strategy's own generator (``ctx.generator``), never the global RNG; an interval
  may straddle an experience boundary and then keeps its blocks.
- ``checkpoint_frozen`` (default true): frozen blocks are recomputed in the backward pass
  (activation checkpointing) and keep only their input. LISA's memory argument is about
  optimizer state, which dominates for LLMs; for a ViT at batch 128 the activations dominate, and
  since the embedding always trains, the gradient flows back through every frozen block, whose
  activations would otherwise stay alive. Recomputing them costs one extra forward of the frozen
  blocks and changes no number (the same operations run again).
- CUDA graphs (issue 21): the step's forward and backward are replayed from a graph keyed by
  the active blocks (:meth:`LISA.graph_key`): which parameters get gradients and which blocks run
  under checkpointing is decided in Python, so each interval is a new key, captured at its first
  step (``graph_rewarmup_steps = 0``: the runner's first key did the warm-up) and replayed for the
  rest of the interval; a key rarely recurs (C(12, 2)^2 sets for ViT-B/16's two towers), so the
  runner keeps only the two most recent graphs (``graph_cache_size``: the full and the short
  batch). A capture costs about one eager step, once per K steps.
- Optimizer: ``torch.optim.AdamW`` (LMFlow's HF Trainer builds torch's AdamW, ``adamw_torch``,
  since transformers 4.x): per step ``p *= 1 - lr wd`` first, then the Adam update with eps = 1e-8
  added *after* the bias correction. Weight decay in HF Trainer's groups: no decay for any norm
  layer's weight and bias (``ln_pre``, ``ln_1``, ``ln_2``, ``ln_final``, ``ln_post``) or for any
  parameter named ``*bias*``; every other parameter decays, the class and positional embeddings
  included (:mod:`cl_bench.optim`, docs/optimizers.md).
- Federation (issue 19): the server broadcasts every tensor LISA may train, under its
  state_dict name (:meth:`Strategy.federated_tensors` over :meth:`LISA.trainable_parameters`):
  the embedding and head parameters and every block of the chosen towers. A client uploads what
  it trained in its round (:meth:`LISA.client_upload`): the embedding and head, and the blocks it
  had active at any step of the round, so a block is averaged over the clients that trained it
  (:func:`~cl_bench.federation.aggregate.fedavg` renormalises per key) instead of being shrunk by
  the untouched copies of the others, and a block no client sampled keeps its global value. This is
  federated full fine-tuning of the sampled blocks (FLoRA's baseline, arXiv 2404.15182). The block
  sampler is the strategy's random stream (:meth:`LISA.random_streams`), reseeded per client:
  clients sample different blocks. Every client starts its round with no active block (the
  server's model never trains), so it samples at its first step: an interval never spans rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy, StrategyConfig, StrategyContext

_SALT = 5  # generator salt of LISA's block sampling


@dataclass(frozen=True)
class LISAConfig(StrategyConfig):
    """``gamma`` blocks per tower unfrozen every ``interval_steps`` (K) steps; ``optimizer_state``
    of a re-sampled block: ``keep`` or ``reset``; ``towers`` whose embedding, head and blocks train."""

    gamma: int = 2
    interval_steps: int = 20
    optimizer_state: Literal["keep", "reset"] = "keep"
    towers: tuple[str, ...] = ("vision", "text")
    checkpoint_frozen: bool = True

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ConfigError(f"strategy.gamma must be >= 1, got {self.gamma}")
        if self.interval_steps < 1:
            raise ConfigError(f"strategy.interval_steps (K) must be >= 1, got {self.interval_steps}")
        if not self.towers or any(t not in ("vision", "text") for t in self.towers):
            raise ConfigError(
                f"strategy.towers must be a non-empty subset of vision, text, got {self.towers}"
            )


def checkpoint_when(module: nn.Module, frozen: Callable[[], bool]) -> None:
    """Run ``module`` under activation checkpointing whenever it trains with ``frozen()`` true.

    The module's ``forward`` is wrapped in place, so names, parameters and paths stay as they are.
    """
    forward = module.forward

    def maybe_checkpointed(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled() and frozen():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = maybe_checkpointed


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether parameter ``name`` is, or lies inside, one of the dotted ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@STRATEGIES.register(
    "lisa",
    description="LISA (arXiv 2403.17919): embedding+head train, 2 blocks/tower resampled every 20 steps",
)
class LISA(Strategy):
    Config = LISAConfig
    paper = (
        "Pan et al. 2024, LISA: Layerwise Importance Sampling for Memory-Efficient Large Language "
        "Model Fine-Tuning (arXiv 2403.17919)"
    )
    default_lr = 1e-5  # full-parameter training, as the finetune baseline
    graph_safe = True
    graph_cache_size = 2
    graph_rewarmup_steps = 0

    def __init__(self, cfg: LISAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.towers = [t for t in self.backbone.towers() if t in cfg.towers]  # available_towers, typed
        if not self.towers:
            raise ConfigError(
                f"strategy.towers {list(cfg.towers)} names no tower of backbone {self.backbone.name} "
                f"(it has {', '.join(self.backbone.towers())})"
            )
        for tower in self.towers:  # needs the backbone: the block count is known only here
            n = len(self.backbone.blocks_of(tower))
            if cfg.gamma > n:
                raise ConfigError(
                    f"strategy.gamma={cfg.gamma} exceeds the {n} blocks of the {tower} tower of "
                    f"{self.backbone.name} (gamma must be between 1 and {n})"
                )
        self.backbone.requires_grad_(False)
        text = self.backbone.text_prefixes
        outside = self.backbone.embedding_names + self.backbone.head_names
        self.always: list[nn.Parameter] = [
            p
            for name, p in self.backbone.model.named_parameters()
            if _matches(name, outside) and (("text" if _matches(name, text) else "vision") in self.towers)
        ]
        self.always.extend(self.head.parameters())  # a linear classifier, where present
        for p in self.always:
            p.requires_grad_(True)
        self.block_params: dict[str, list[list[nn.Parameter]]] = {
            tower: [list(self.backbone.block_module(b).parameters()) for b in self.backbone.blocks_of(tower)]
            for tower in self.towers
        }
        self.generator = self.ctx.generator(_SALT)
        self.active: dict[str, list[int]] = {}
        self.events: list[list[Any]] = []  # [step, tower, [indices]] per sampling
        self.counts = {tower: [0] * len(blocks) for tower, blocks in self.block_params.items()}
        self.n_intervals = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._trained_blocks: set[tuple[str, int]] = set()  # active since the last download
        if cfg.checkpoint_frozen:
            for tower in self.towers:
                for i, block in enumerate(self.backbone.blocks_of(tower)):
                    checkpoint_when(self.backbone.block_module(block), self._frozen_test(tower, i))

    def random_streams(self) -> list[torch.Generator]:
        """The block sampler (``before_step``)."""
        return [self.generator]

    def _frozen_test(self, tower: str, index: int) -> Callable[[], bool]:
        return lambda: index not in self.active.get(tower, ())

    # -- what trains --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every candidate parameter, frozen or not: the optimizer must know late-sampled blocks."""
        seen: set[int] = set()
        params = []
        for p in [*self.always, *(p for blocks in self.block_params.values() for ps in blocks for p in ps)]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """torch AdamW over every candidate, without decay for norms and biases (HF Trainer's groups)."""
        self._optimizer = super().make_optimizer(lr, weight_decay)
        return self._optimizer

    # -- federation ---------------------------------------------------------------------------
    def load_communicated_state(self, state: dict[str, torch.Tensor]) -> None:
        """The base load; a client's round starts here, so the blocks trained in it start over
        from those active now."""
        super().load_communicated_state(state)
        self._trained_blocks = {(tower, i) for tower, chosen in self.active.items() for i in chosen}

    def client_upload(self) -> dict[str, torch.Tensor]:
        """The embedding and head, and every block active at some step since the download."""
        sent = {id(p) for p in self.always}
        for tower, i in self._trained_blocks:
            sent.update(id(p) for p in self.block_params[tower][i])
        return {name: t.detach() for name, t in self.trained_by_name().items() if id(t) in sent}

    # -- checkpoints --------------------------------------------------------------------------
    def changes_frozen_weights(self) -> bool:
        """True: every block of the chosen towers trains for some intervals, so a block frozen at
        checkpoint time may still differ from the pretrained weights; the checkpoint keeps them all."""
        return True

    def extra_state(self) -> dict[str, Any]:
        """LISA's state outside the tensors: the blocks active per tower (the interval in progress:
        which blocks require grad and which run under activation checkpointing), the sampling
        generator (the blocks of the next intervals), and the figures (selection counts per
        block, the number of intervals, the sampling events). The optimizer is the loop's (saved by
        it); ``self._optimizer`` is only a reference to it, set again by :meth:`make_optimizer`."""
        return {
            "towers": list(self.towers),
            "n_blocks": {tower: len(blocks) for tower, blocks in self.block_params.items()},
            "active": {tower: list(chosen) for tower, chosen in self.active.items()},
            "generator": self.generator.get_state(),
            "counts": {tower: list(counts) for tower, counts in self.counts.items()},
            "n_intervals": self.n_intervals,
            "events": [
                [int(step), str(tower), [int(i) for i in chosen]] for step, tower, chosen in self.events
            ],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` and the ``requires_grad`` of every block as at checkpoint time
        (the active blocks train, all others are frozen), so that the interval in progress goes on
        with the same blocks and ``before_step`` resamples at the same step. LISA keeps no optimizer
        of its own (``load_optimizer_state`` is the base no-op): the loop restores the one
        :meth:`make_optimizer` returned, which ``self._optimizer`` refers to, so a resampling later
        in the experience drops state from the restored optimizer as the uninterrupted run does."""
        n_blocks = {tower: len(blocks) for tower, blocks in self.block_params.items()}
        if list(state["towers"]) != self.towers or dict(state["n_blocks"]) != n_blocks:
            raise ValueError(
                f"LISA checkpoint of towers {state['towers']} with blocks {state['n_blocks']}, "
                f"this run has {self.towers} with {n_blocks}"
            )
        active = {str(tower): [int(i) for i in chosen] for tower, chosen in state["active"].items()}
        for tower, blocks in self.block_params.items():
            chosen = active.get(tower, [])
            for i, params in enumerate(blocks):
                for p in params:
                    p.requires_grad_(i in chosen)
        self.active = active
        self.generator.set_state(state["generator"])
        self.counts = {str(tower): [int(c) for c in counts] for tower, counts in state["counts"].items()}
        self.n_intervals = int(state["n_intervals"])
        self.events = [
            [int(step), str(tower), [int(i) for i in chosen]] for step, tower, chosen in state["events"]
        ]

    # -- sampling -----------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """At every multiple of K: freeze all blocks, unfreeze gamma blocks per tower (Alg. 1)."""
        if step % self.cfg.interval_steps and self.active:
            return
        self.n_intervals += 1
        for tower, blocks in self.block_params.items():
            chosen = sorted(torch.randperm(len(blocks), generator=self.generator)[: self.cfg.gamma].tolist())
            for i, params in enumerate(blocks):
                for p in params:
                    p.requires_grad_(i in chosen)
            if self.cfg.optimizer_state == "reset" and self._optimizer is not None:
                for i in chosen:
                    for p in blocks[i]:
                        self._optimizer.state.pop(p, None)
            self.active[tower] = chosen
            self._trained_blocks.update((tower, i) for i in chosen)
            self.events.append([step, tower, chosen])
            for i in chosen:
                self.counts[tower][i] += 1

    def graph_key(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The active blocks per tower: they decide which parameters get gradients and which
        blocks are checkpointed, so each sampled set is its own graph (module docstring)."""
        return tuple((tower, tuple(self.active.get(tower, ()))) for tower in self.towers)

    # -- figures ------------------------------------------------------------------------------
    def report(self) -> dict[str, float | int]:
        return {"intervals": self.n_intervals, "active_blocks": sum(len(a) for a in self.active.values())}

    def final_report(self) -> dict[str, Any]:
        """Sampled sets over time (events), selection counts per block, and the settings."""
        return {
            "scalars": {
                "gamma": self.cfg.gamma,
                "interval_steps": self.cfg.interval_steps,
                "intervals": self.n_intervals,
            },
            "per_layer": {
                "selections": {
                    f"{tower}.{i}": c for tower, counts in self.counts.items() for i, c in enumerate(counts)
                }
            },
            "events": {
                "sampled_blocks": {
                    "fields": ["step", "tower", "blocks"],
                    "entries": [list(e) for e in self.events],
                }
            },
        }
