"""The Strategy base class: typed no-op hooks with explicit arguments, one level of inheritance.

The loop (``cl_bench/loop.py``) calls, per experience::

    before_experience(exp); opt = make_optimizer(lr, weight_decay)
    for each step:  before_step(step) -> forward -> loss -> backward -> [clip]
                    -> after_backward(step) -> opt.step() -> after_step(step)
    after_experience(exp)

Every strategy is built as ``cls(cfg, backbone, head, ctx)``, its constructor written out as
``__init__(self, cfg: <its Config>, backbone: Backbone, head: Head, ctx: StrategyContext)``. A
strategy owns its state (adapters, extra optimizers, schedules, random generators) and never
reaches into the loop. One that adapts the backbone's linears keeps them in an
:class:`~cl_bench.adapter_set.AdapterSet` returned by :meth:`adapters`, through which the loop
counts what it added and stores the frozen weights in bf16. It reports its own figures through
:meth:`report` (per experience) and :meth:`final_report`, and can ask the loop to evaluate the
final model under named variants (:meth:`final_variants`, e.g. DyLoRA at several ranks or
LoRAPrune's sliced model).

Federation (issue 19, :mod:`cl_bench.federation`): a strategy says what one client uploads and the
server broadcasts (:meth:`Strategy.communicated_state`, loaded back in place by
:meth:`Strategy.load_communicated_state`), how the server merges the uploads
(:meth:`Strategy.aggregate`), which of them are low-rank factor pairs (:meth:`Strategy.lowrank_pairs`)
and which generators it draws from while training (:meth:`Strategy.random_streams`), so the
federation can give each client its own streams.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear, check_targets, count
from cl_bench.backbones.base import ROLES, Backbone
from cl_bench.errors import ConfigError, FederationError
from cl_bench.federation.aggregate import fedavg, product_average
from cl_bench.heads import Head
from cl_bench.optim import Convention, make_adamw, no_decay_ids


@dataclass(frozen=True)
class StrategyConfig:
    """Base class of strategy configs; each strategy declares its own frozen subclass."""


@dataclass(frozen=True)
class AdapterTargetsConfig(StrategyConfig):
    """The fields of every method that puts rank-``r`` adapters on the backbone's linears,
    validated here: rank ``r``, the adapted ``roles`` of the ``towers``, and
    ``merge_each_experience`` (fold the adapters into W0 after each experience and start fresh
    ones). ALLoRA, which has no alpha, subclasses this directly."""

    r: int = 8
    roles: tuple[str, ...] = ROLES
    towers: tuple[str, ...] = ("vision", "text")
    merge_each_experience: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"strategy.r must be >= 1, got {self.r}")
        check_targets(self.roles, self.towers)


@dataclass(frozen=True)
class LoRAFamilyConfig(AdapterTargetsConfig):
    """The fields a LoRA-family config shares (STRATEGIES.md Part A): those of
    :class:`AdapterTargetsConfig` and the scale ``alpha`` (the update is scaled by alpha over a
    rank). A subclass adds its own fields, may change a default, and calls
    ``super().__post_init__()`` first in its own ``__post_init__``."""

    alpha: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"strategy.alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class ExperienceInfo:
    """What a strategy knows about the experience being trained or evaluated."""

    index: int
    classes: tuple[int, ...]  # global labels of this experience
    seen_classes: tuple[int, ...]  # classes of experiences 0..index
    logit_classes: torch.Tensor  # classes scored by forward (long tensor on the device)
    task_label: int
    n_samples: int
    n_steps: int  # optimizer steps of this experience (0 when evaluating)
    training: bool


@dataclass(frozen=True)
class StrategyContext:
    """Run-level facts a strategy may need when it is built."""

    device: torch.device
    precision: str  # "fp32" | "bf16"
    seed: int
    n_experiences: int
    n_classes: int
    steps_per_experience: tuple[int, ...]
    batch_size: int

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_experience)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator for the strategy's own sampling, seeded from the run seed and ``salt``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (salt + 1))


def adamw(
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    convention: Convention = "torch-adamw",
    no_decay: Collection[int] = (),
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (:func:`cl_bench.optim.make_adamw`): ``torch-adamw`` by default, fused on
    CUDA (one kernel for all parameters) and foreach on CPU; no decay for the ids in ``no_decay``."""
    return make_adamw(params, lr, weight_decay, convention, no_decay=no_decay, betas=betas)


class Strategy:
    """Base strategy: trains every parameter that requires grad with AdamW and cross-entropy."""

    Config: ClassVar[type[Any]] = StrategyConfig
    paper: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3
    default_weight_decay: ClassVar[float] = 0.0
    trains: ClassVar[bool] = True  # False: the loop evaluates but never trains (zero-shot)
    graph_safe: ClassVar[bool] = False  # True: forward/backward may be replayed from CUDA graphs
    # True: a graph captured in one experience may be replayed in later ones (see graph_key)
    graphs_span_experiences: ClassVar[bool] = False
    # graphs held at once by the step's runner (None: one per key and shape, for the runner's life)
    # and eager steps of a new key at an input shape already captured (cl_bench.graphs): a strategy
    # whose key changes often and never recurs (LISA) keeps few graphs and captures new keys at once
    graph_cache_size: ClassVar[int | None] = None
    graph_rewarmup_steps: ClassVar[int] = 2
    # False: nothing to federate; communicated_state raises FederationError (zero-shot)
    federable: ClassVar[bool] = True

    def __init__(self, cfg: Any, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.head = head
        self.ctx = ctx
        # relative residual of each low-rank pair in the last aggregation (``product`` mode)
        self.aggregation_residuals: dict[str, float] = {}

    # -- what trains ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters handed to the optimizer (default: every parameter that requires grad)."""
        seen: set[int] = set()
        params = []
        for module in (self.backbone, self.head):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def adapters(self) -> AdapterSet[AdaptedLinear]:
        """The adapters the method injected (:class:`cl_bench.adapter_set.AdapterSet`; none by default)."""
        return _NO_ADAPTERS

    def n_trainable(self) -> int:
        """Trainable parameters now (LISA's trainable set changes every K steps)."""
        return count(p for p in self.trainable_parameters() if p.requires_grad)

    def n_added(self) -> int:
        """Elements of the tensors the method added to the backbone (adapters, gates, banks, masks)."""
        return self.adapters().n_added()

    def n_active(self) -> int | None:
        """Added parameters used per input, where the method routes or gates (None: all of them)."""
        return None

    def adapter_bytes(self) -> int:
        """Bytes needed to store what the method adds to the backbone."""
        return self.adapters().nbytes()

    # -- the step -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, exp: ExperienceInfo) -> torch.Tensor:
        """Logits over all classes (``-inf`` outside ``exp.logit_classes``)."""
        return self.head(self.backbone.encode_image(x), exp.logit_classes)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, exp: ExperienceInfo) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """A fresh optimizer for this experience (rebuilt at every experience by the loop).

        AdamW in :meth:`optimizer_convention` over :meth:`trainable_parameters`, with weight decay
        on all but the norms and biases of backbone and head (:func:`cl_bench.optim.no_decay_ids`,
        HF Trainer's rule; docs/optimizers.md).
        """
        return adamw(
            self.trainable_parameters(),
            lr,
            weight_decay,
            convention=self.optimizer_convention(),
            no_decay=no_decay_ids((self.backbone, self.head)),
        )

    def optimizer_convention(self) -> Convention:
        """The AdamW convention of the main optimizer: the config's ``optimizer`` where the strategy
        has one (SoRA, DyLoRA: ``hf-adamw`` by default, as their official code), else ``torch-adamw``."""
        convention: Convention = getattr(self.cfg, "optimizer", "torch-adamw")
        return convention

    def graph_key(self) -> Hashable | None:
        """The key of this step's forward + loss + backward for CUDA-graph replay; None: run it eagerly.

        Called after :meth:`before_step`. Steps with the same key must launch the same kernels on
        the same tensors: whatever the forward and the loss read that changes between steps must be
        a parameter or a buffer updated in place, never a tensor rebuilt by a hook (the graph would
        keep reading the old one). The hooks themselves, the optimizer and any host-side logic
        always run eagerly. Default: ``()`` for strategies that declare ``graph_safe``.

        Across experiences: without ``graphs_span_experiences`` every experience gets a new runner
        (a warm-up step and a capture per key). With it, the loop keeps the runner, and replays its
        graphs in the next experience, while the trained parameters are the same objects in the
        same order, ``exp.logit_classes`` is the same tensor (the loop keeps one buffer per length
        and writes each experience's classes into it) and so are the head's cached text features
        (recomputed in place). The key must then also cover everything experience-dependent that
        the forward and the loss decide in Python (``exp.index``, ``exp.classes``,
        ``exp.seen_classes``, ``exp.task_label``, a stage or a schedule value, a mask or tensor
        rebuilt per experience): either it reaches the graph only through tensors updated in place,
        or the key changes with it. A strategy that replaces parameters or buffers the forward
        reads (a new block per experience) must not declare ``graphs_span_experiences``.
        """
        return () if self.graph_safe else None

    # -- hooks (no-ops) -------------------------------------------------------------------------
    def before_experience(self, exp: ExperienceInfo) -> None:
        """Before the optimizer of experience ``exp`` is built: add or reset parameters here."""

    def before_step(self, step: int) -> None:
        """Before the forward of global optimizer step ``step`` (0-based across the stream)."""

    def after_backward(self, step: int) -> None:
        """Gradients are populated (and clipped, if enabled); the optimizer has not stepped."""

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()``, the scheduler step and ``zero_grad`` of the loop's optimizer;
        parameters outside that optimizer (e.g. SoRA's gates) still hold their gradients here."""

    def after_experience(self, exp: ExperienceInfo) -> None:
        """After the last step of ``exp``, before its evaluation row."""

    # -- modes and state --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        self.backbone.train(mode)
        self.head.train(mode)

    def eval(self) -> None:
        self.train(False)

    def to(self, device: torch.device) -> None:
        self.backbone.to(device)
        self.head.to(device)

    def store_frozen_weights(self, dtype: torch.dtype) -> None:
        """Keep the frozen base layers of the adapters in ``dtype`` (bf16 runs; see
        :meth:`cl_bench.adapter_set.AdapterSet.store_frozen`)."""
        self.adapters().store_frozen(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What must be saved to restore the trained method: every parameter of backbone and head."""
        state = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    # -- checkpoints (cl_bench/checkpoint.py) ---------------------------------------------------
    def changes_frozen_weights(self) -> bool:
        """True: training writes into the backbone's original frozen weights, so a checkpoint keeps
        them all (default: with ``merge_each_experience``; LISA says so too). Otherwise they are
        left out of it and only fingerprinted."""
        return self.adapters().merge_each_experience

    def extra_state(self) -> dict[str, Any]:
        """The strategy's own state besides its modules' tensors, for a checkpoint: counters,
        schedules, histories, generator states, the structure of what it added (e.g. MoRA's block
        count) and the state of optimizers it keeps itself. Plain containers (dict, list, tuple,
        str, int, float, bool, None) and tensors only: the checkpoint is read with
        ``weights_only=True``. Default: nothing (LoRA has no state outside its parameters)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` on a freshly built strategy, before its modules' tensors are
        loaded and before any optimizer exists: rebuild here whatever structure the tensors need
        (added blocks, pruned ranks), so that they load with the right shapes."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """A resume inside an experience, after :meth:`make_optimizer`: restore from the same
        ``state`` what ``make_optimizer`` rebuilt (the optimizers the strategy keeps itself and any
        field it resets). Default: nothing."""

    # -- federation (cl_bench/federation, issue 19) ----------------------------------------------
    def communicated_state(self) -> dict[str, torch.Tensor]:
        """What one client uploads after its local round and the server broadcasts back: name ->
        tensor (detached, sharing storage with the model: the loop clones what it keeps). Only what
        a real deployment sends: the tensors that train (:meth:`federated_tensors`), never frozen
        weights every client already holds. Raises :class:`FederationError` for a strategy that
        cannot be federated (``federable = False``)."""
        if not self.federable:
            raise FederationError(f"{type(self).__name__} cannot be federated")
        return {name: t.detach() for name, t in self.federated_tensors().items()}

    def client_upload(self) -> dict[str, torch.Tensor]:
        """What a client uploads after its local round: :meth:`communicated_state` by default. A
        strategy whose clients train only part of it in a round (LISA's sampled blocks) sends that
        part; :func:`~cl_bench.federation.aggregate.fedavg` averages each key over the clients that
        sent it, so a tensor one client trained is not shrunk by the others' untouched copies."""
        return self.communicated_state()

    @torch.no_grad()
    def load_communicated_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model *in place* (``t.data.copy_``: the same parameter objects, so
        optimizers and captured CUDA graphs stay valid); keys missing from ``state`` are left as they
        are. Every key is checked before anything is written: an unknown key or a wrong shape is a
        :class:`FederationError`. The head's cached text features are invalidated (the text tower
        may have changed)."""
        live = self.federated_tensors()
        unknown = [k for k in state if k not in live]
        if unknown:
            raise FederationError(
                f"{type(self).__name__} has no communicated tensor {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more unknown keys)" if len(unknown) > 1 else "")
            )
        for name, value in state.items():
            if tuple(value.shape) != tuple(live[name].shape):
                raise FederationError(
                    f"communicated {name!r} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(live[name].shape)}"
                )
        for name, value in state.items():
            live[name].data.copy_(value)
        self.head.invalidate()

    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors behind :meth:`communicated_state`, by name: parameters, buffers or views
        of them, which :meth:`load_communicated_state` writes in place. Default: every tensor of
        :meth:`trainable_parameters` under its :meth:`state_dict` name (``backbone.<name>``,
        ``head.<name>``), the full trained tensors: federated full fine-tuning, the baseline FLoRA
        (arXiv 2404.15182) compares against. Adapter methods override it (:meth:`adapter_tensors`)."""
        return self.trained_by_name()

    def trained_by_name(self, skip: Collection[int] = ()) -> dict[str, torch.Tensor]:
        """:meth:`trainable_parameters` (but the ids in ``skip``) by their :meth:`state_dict` names."""
        names: dict[int, str] = {}
        for prefix, module in (("backbone.", self.backbone), ("head.", self.head)):
            for name, p in module.named_parameters():
                names.setdefault(id(p), prefix + name)
        trained: dict[str, torch.Tensor] = {}
        for p in self.trainable_parameters():
            if id(p) in skip:
                continue
            if id(p) not in names:
                raise FederationError(f"{type(self).__name__} trains a parameter outside backbone and head")
            trained[names[id(p)]] = p
        return trained

    def adapter_tensors(self, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        """``"<adapter name>.<field>"`` (e.g. ``"vision.3.q.A"``) -> that tensor of every adapter, in
        model order, then every other trained parameter (a linear head) by its state_dict name."""
        tensors = {f"{name}.{f}": getattr(a, f) for name, a in self.adapters().items() for f in fields}
        return tensors | self.trained_by_name(skip={id(t) for t in tensors.values()})

    def aggregate(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], mode: str
    ) -> dict[str, torch.Tensor]:
        """The server's rule over the clients' uploads (``weights``: their sample counts).

        ``fedavg``: :func:`cl_bench.federation.aggregate.fedavg`, the weighted mean per key over the
        clients that sent it (for LoRA factors, FedAvg of A and B separately, as FLoRA, arXiv
        2404.15182). ``product``: :func:`cl_bench.federation.aggregate.product_average`, the exact
        mean of every ``B @ A`` of :meth:`lowrank_pairs` refactored to rank r, fedavg for the other
        keys; the residuals it discards are kept in :attr:`aggregation_residuals`. A strategy without
        low-rank pairs fails fast in product mode (:class:`FederationError`).
        """
        self.aggregation_residuals = {}
        self.check_aggregation(mode)
        if mode == "fedavg":
            return fedavg(states, weights)
        state, self.aggregation_residuals = product_average(states, weights, self.lowrank_pairs())
        return state

    def check_aggregation(self, mode: str) -> None:
        """A :class:`FederationError` unless :meth:`aggregate` can run ``mode`` for this strategy;
        the session calls it when it builds the strategy, so a bad pairing fails before any client
        trains."""
        if mode not in ("fedavg", "product"):
            raise FederationError(f"unknown aggregation {mode!r} (one of fedavg, product)")
        if mode == "product" and not self.lowrank_pairs():
            raise FederationError(
                f"aggregation = 'product' averages low-rank products B @ A, and "
                f"{type(self).__name__} communicates no such pairs (use aggregation = 'fedavg')"
            )

    def lowrank_pairs(self) -> list[tuple[str, str]]:
        """(B name, A name) pairs of :meth:`communicated_state` whose product ``B @ A`` is the
        adapter's update up to its fixed scale (for ``aggregation = "product"``); default none, and
        product mode then fails fast."""
        return []

    def adapter_pairs(self) -> list[tuple[str, str]]:
        """``("<adapter>.B", "<adapter>.A")`` for every adapter (LoRA-style factors)."""
        return [(f"{name}.B", f"{name}.A") for name in self.adapters()]

    def random_streams(self) -> list[torch.Generator]:
        """Every generator the strategy draws from while training (LISA's block sampling, DyLoRA's
        rank sampling, ...), which the federation reseeds per client and restores afterwards.
        Default: none."""
        return []

    # -- figures ----------------------------------------------------------------------------------
    def report(self) -> dict[str, float | int]:
        """Scalar figures after the current experience (e.g. ranks, live gates, sparsity)."""
        return {}

    def final_report(self) -> dict[str, Any]:
        """Figures after the stream: ``{"scalars": {...}, "curves": {...}, "per_layer": {...},
        "events": {...}}`` (see docs/run-record.md)."""
        return {}

    def final_variants(self) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
        """Named ways to evaluate the final model (each a context-manager factory), evaluated in order."""
        return {}


_NO_ADAPTERS: AdapterSet[AdaptedLinear] = AdapterSet()


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    """The context of the main evaluation: no variant."""
    yield
