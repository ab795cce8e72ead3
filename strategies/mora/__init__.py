"""mora: MoRA / MoRAM, a self-activated sparse mixture of rank-1 experts (arXiv 2506.21035).

Paper: "MoRA: ... Self-Activated Sparse Mixture-of-Rank ..." (v1/v2), renamed in v5 "Little by
Little: Continual Learning via Incremental Mixture of Rank-1 Associative Memory Experts" (MoRAM,
ICML 2026). Official code: github.com/Artificer-AI-Lab/MoRAM, ``XTAIL/loralib/moram.py`` and
``XTAIL/models/moram.py``; this file follows it with the runner values (STRATEGIES.md, Part A).

Every adapted linear layer (q, k, v, out, fc1, fc2 of every block of both towers) holds a frozen
bank of rank-1 experts (keys A_i, values B_i) and a trainable block of r new ones. For a token x,
with R = r * (experiences so far) ranks stacked as A [R, d_in], B [d_out, R] (the paper's
self-activation, top-k budget and rank-pruning equations, which the project page summarises as
Eqs. 2-8)::

    z   = A x                                   key match of every rank-1 expert
    s   = z / max(||z||_2, 1e-12)               signed self-activation, across the R ranks
    w   = softmax(s_topk / tau)                 top-k budget, k = max(topk, 2); 0 off the top-k
    w_i = w_i * 1[s_i >= delta]                 eval only (delta > 0), no renormalisation
    y   = W0 x + b + B (w * z)                  no alpha / r scaling, no dropout

At each new experience the current block joins the bank bitwise and a fresh block starts
(A kaiming-uniform, B = 0); the loop rebuilds the optimizer, which holds exactly the new block.
A fresh block with B = 0 adds no value term, but it enters the normalisation and the top-k
softmax, so the outputs change at an increment (as in the official code).

Where paper and official code differ, cl-bench follows the code (STRATEGIES.md, Part B §1):
- the gate delta applies only in eval mode, and only when delta > 0 (delta = 0: train == eval);
- the top-k uses the signed score s, not |s|, and k is floored at 2;
- the weights are not renormalised after the delta gate;
- r, topk, tau, delta = 16, 16, 0.01, 0.2 (runner values; the argparse defaults differ), AdamW
  lr 5e-4, betas (0.9, 0.9999), weight decay 0; eps 1e-12 of the X-TAIL code (TRACE uses 1e-8).

Loss (official X-TAIL code, ``train_model``; both terms switchable):
- image-to-text: cross-entropy of the logits. ``image_to_text_classes = "run"`` (default) lets
  the classes the loop scored compete (the run key ``train_classes``, as for every other
  strategy: by default every class seen so far); ``"current"`` is the official masking, where
  only the current experience's classes compete (every other column is -inf) whatever the run
  scored. Both are the same with ``train_classes = "current"``, the setting of the official
  X-TAIL runs. Why not the official masking by default: in a class-incremental stream it never
  trains a new class against the old ones, so the old prompts keep winning on new images. On the
  README's split-digits demo it gave accuracies of 0.99, 0.07, 0.32, 0.04, 0.18 on each
  experience right after learning it (chance 0.5 to 0.1), against 0.99, 0.89, 0.93, 0.82, 0.87 with
  ``"run"``; in X-TAIL's domains the label spaces are disjoint, which hides this;
- text-to-image: for each current class c, logits scale * <text_c, image_j> over the batch's
  images j (the transpose of the image-to-text columns, so no second text pass) and the soft
  cross-entropy against the multi-hot target 1[y_j = c], NOT normalised (the official code passes
  the raw 0/1 mask to ``F.cross_entropy``), averaged over the rows of all classes seen so far
  (the official rows of past classes have zero targets: they add nothing but count in the mean).
  ``normalize_text_targets`` divides each target row by its number of images instead.
Text features come from the adapted text tower (the head recomputes them with grad every step).
On a backbone without text tower (``kind == "vision"``, linear head) there is no text term: the
loss is the image-to-text cross-entropy alone (over the same classes), and the linear head trains
with the block.

Implementation: per layer the bank lives in two preallocated stores, ``a_store`` [capacity, d_in]
and ``bt_store`` [capacity, d_out] (B transposed, so a block is a contiguous row range; capacity =
r * n_experiences, grown by doubling if exceeded). The trainable block (parameters ``A`` [r, d_in],
``B`` [d_out, r]) is written into its rows at every forward (2r rows, never the bank), so z and
the output are single matmuls over one stacked matrix, with no Python loop over experts (under
autocast: into kept copies of the stores in the compute dtype, cast once per change of the bank,
so that a forward casts only the block). In training the whole layer is one autograd function
(:class:`_MoRALayer`): the frozen GEMM, z, the routing and an ``addmm`` of ``B h`` onto the
frozen output; its backward gives x the gradient through all R ranks (``g W0 + dz A`` in one GEMM
and one ``addmm``) and computes the weight gradient of the new block only (a plain ``cat`` would
compute it for all R ranks and discard most of it). Routing is O(N R) and lives in
:mod:`strategies.mora.routing`: on CUDA two Triton kernels (one pass over z forward, one backward
from the forward's selection, in float32 registers), elsewhere a stable sort of z (same order as
s; ties: the lowest index), a softmax over the k entries and one scatter. For N tokens a layer
costs 2 N R (d_in + d_out) flops forward, as much for the input gradient, and 2 N r (d_in +
d_out) for the weight gradient (a rank-r LoRA: 2 N r (d_in + d_out) for each of the three), and
keeps z [N, R] for backward besides what a LoRA keeps. There is no host sync in the forward: the
active-rank counters accumulate on the device (the routing kernel adds to them itself) and are
read only by :meth:`MoRA.report`, so the step can be replayed from a CUDA graph. Eval throughput
as the bank grows is the loop's ``eval_samples_per_s``. ``fused_routing = false`` takes the torch
routing on CUDA too.

Federation (issue 19): a client sends only the current experience's block, ``A`` [r, d_in] and
``B`` [d_out, r] of every layer (``"<adapter>.A"``, ``"<adapter>.B"``; the same names in every
experience, since each experience's block is a new pair of parameters under them), and a linear
head where one trains. The frozen bank never travels: every replica built it itself from the
blocks it was sent, and :meth:`MoRALinear.increment` copies the current (aggregated) block into
it bitwise at the next experience, so all replicas hold the same bank. The fresh block of a new
experience is drawn from the global RNG on each replica, and the server's is broadcast at the
first round. ``aggregation = "product"`` is refused: every rank is a routed expert (z = A x is
both key match and routing score), and a refactored product would mix the experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import AdaptedLinear, check_targets
from cl_bench.backbones.base import ROLES, Backbone
from cl_bench.errors import ConfigError
from cl_bench.heads import Head
from cl_bench.lowrank import compute_dtype, init_lora_pair
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyConfig, StrategyContext, adamw
from strategies.mora.routing import dense_weights, route, route_backward, route_reference


class _MoRALayer(torch.autograd.Function):
    """``y = W0 x + b + B_full route(A_full x)`` for training, one autograd node per layer.

    ``a_full`` [R, d_in] and ``bt_full`` [R, d_out] stack the frozen bank and the trainable block
    (its last r rows, written there by :meth:`MoRALinear.stacked`); ``A``/``B`` are the block's
    parameters, which receive the gradient of those rows only. Forward: one GEMM for the frozen
    layer, one for z, the routing, and one ``addmm`` adding ``h Bt_full`` onto the frozen output.
    Backward: ``grad_h = g Bt_full^T``, the routing backward, then ``grad_x = g W0 + dz A_full``
    (one GEMM and one ``addmm``) and the block's ``dz[:, -r:]^T x`` and ``g^T h[:, -r:]``. Only x
    and z are kept (plus h's last r columns, which the routing writes contiguous, and the routing's
    selection, one integer per token on CUDA), as a LoRA keeps x and its skinny projection. Both
    ``addmm`` write onto the frozen term in place (``out=`` the added matrix): out of place, torch
    copies that matrix first, a device-to-device memcpy of [N, d_out] or [N, d_in] each (and
    ``addmm_`` would hide the GEMM from torch's flop counter).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        layer: MoRALinear,
        a_full: torch.Tensor,
        bt_full: torch.Tensor,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            weight = layer.base.weight.to(dtype)
            bias = None if layer.base.bias is None else layer.base.bias.to(dtype)
            Af, Btf = a_full.to(dtype), bt_full.to(dtype)
            z = x2 @ Af.t()
            r = A.shape[0]
            routed = route(z, layer.k, layer.tau, fused=layer.fused, tail=r, totals=layer.totals(True))
            y = F.linear(x2, weight, bias)
            torch.addmm(y, routed.h, Btf, out=y)  # in place (see the class docstring)
        ctx.save_for_backward(x2, z, routed.tail, weight, routed.selection)
        # the stores are rewritten (with the same values) by every forward, also between a forward
        # and its backward when a layer runs twice in one step: kept without a version check
        ctx.Af, ctx.Btf = Af, Btf
        ctx.meta = (shape, x.dtype, r, A.dtype, B.dtype, layer.tau, layer.fused)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z, h_tail, weight, selection = ctx.saved_tensors
        Af, Btf = ctx.Af, ctx.Btf
        shape, x_dtype, r, a_dtype, b_dtype, tau, fused = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            grad_h = g @ Btf.t()
            dz = route_backward(z, grad_h, selection, tau, fused=fused)
            grad_A = (dz[:, -r:].t() @ x2).to(a_dtype) if ctx.needs_input_grad[1] else None
            grad_B = (g.t() @ h_tail).to(b_dtype) if ctx.needs_input_grad[2] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ weight
                torch.addmm(grad_x, dz, Af, out=grad_x)  # in place
                grad_x = grad_x.reshape(shape).to(x_dtype)
        return grad_x, grad_A, grad_B, None, None, None


class MoRALinear(AdaptedLinear):
    """One MoRA layer: ``y = W0 x + b + B (w * z)`` over a frozen rank bank plus a trainable block.

    ``A`` [r, d_in] and ``B`` [d_out, r] are the trainable block; :attr:`bank_a` [R_old, d_in] and
    :attr:`bank_b` [d_out, R_old] are frozen (views of non-trainable buffers). ``capacity``
    preallocates the rank stores (rows), so increments within it never reallocate.
    """

    a_store: torch.Tensor
    bt_store: torch.Tensor
    active_sum: torch.Tensor
    n_tokens: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        topk: int,
        tau: float,
        threshold: float,
        capacity: int = 0,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__(base)
        if r < 1 or topk < 1 or tau <= 0 or not 0 <= threshold <= 1:
            raise ValueError(f"bad MoRA layer settings r={r} topk={topk} tau={tau} delta={threshold}")
        self.r, self.k, self.tau, self.threshold = r, max(topk, 2), tau, threshold
        self.fused = fused  # Triton routing kernels on CUDA (False: the reference everywhere)
        self.n_old = 0  # ranks in the frozen bank
        device, rows = base.weight.device, max(capacity, r)
        self.register_buffer("a_store", torch.zeros(rows, base.in_features, device=device), persistent=False)
        self.register_buffer(
            "bt_store", torch.zeros(rows, base.out_features, device=device), persistent=False
        )
        # non-zero routing weights summed over tokens and the tokens counted, [train, eval]: device
        # tensors, so counting neither syncs nor (under torch.compile) changes a guarded Python value
        self.register_buffer("active_sum", torch.zeros(2, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("n_tokens", torch.zeros(2, dtype=torch.long, device=device), persistent=False)
        self.A, self.B = init_lora_pair(r, base.in_features, base.out_features, device)
        self._casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # see _cast_stores

    # -- the bank ------------------------------------------------------------------------------
    @property
    def n_ranks(self) -> int:
        """R: frozen plus trainable ranks."""
        return self.n_old + self.r

    @property
    def bank_a(self) -> torch.Tensor:
        return self.a_store[: self.n_old]

    @property
    def bank_b(self) -> torch.Tensor:
        return self.bt_store[: self.n_old].t()

    def stacked(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([bank_a; A], [bank_b, B])``, [R, d_in] and [d_out, R], in ``dtype`` (None: the
        stores'): views of the stores or of their kept copies in ``dtype`` (:meth:`_cast_stores`),
        after writing the trainable block into its rows (2r rows; the bank is never copied)."""
        a, bt = self.a_store, self.bt_store
        if dtype is not None and dtype != a.dtype:
            a, bt = self._cast_stores(dtype)
        with torch.no_grad():
            a[self.n_old : self.n_ranks].copy_(self.A)
            bt[self.n_old : self.n_ranks].copy_(self.B.t())
        return a[: self.n_ranks], bt[: self.n_ranks].t()

    def _cast_stores(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stores cast to ``dtype`` (the compute dtype under autocast), cast once and kept: a
        forward then writes the block there (two small cast-copies) instead of writing it into the
        float32 stores and casting both stacked matrices (a memcpy and four kernels per layer).
        Same values: the bank's rows are those of the stores, cast. The layer re-casts them
        whenever it changes the bank (:meth:`_refresh_casts`), so the stores must be written only
        by the layer's methods."""
        cast = self._casts.get(dtype)
        if cast is None:
            # normal tensors even when first built in an evaluation under inference mode, which
            # a later training forward could not write
            with torch.inference_mode(False), torch.no_grad():
                cast = (self.a_store.to(dtype), self.bt_store.to(dtype))
            self._casts[dtype] = cast
        return cast

    @torch.no_grad()
    def _refresh_casts(self) -> None:
        """After a change of the bank: re-cast the stores into the kept copies in place (their
        addresses stay, so a CUDA graph reading them stays valid), or drop the copies whose shape
        or device no longer match the stores."""
        for dtype, (a, bt) in list(self._casts.items()):
            same = (a.shape, a.device, bt.shape, bt.device) == (
                self.a_store.shape,
                self.a_store.device,
                self.bt_store.shape,
                self.bt_store.device,
            )
            if same:
                a.copy_(self.a_store)
                bt.copy_(self.bt_store)
            else:
                del self._casts[dtype]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Module conversions (``.to``, ``.cuda``, ``.double`` ...) replace the stores: drop the
        cast copies with them."""
        self._casts = {}
        return super()._apply(fn, recurse)

    def _reserve(self, rows: int) -> None:
        """Grow the stores (doubling) so they hold ``rows`` ranks, keeping their content."""
        have = self.a_store.shape[0]
        if rows <= have:
            return
        rows = max(rows, 2 * have)
        for name in ("a_store", "bt_store"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1])
            new[:have] = old
            setattr(self, name, new)
        self._refresh_casts()

    @torch.no_grad()
    def increment(self) -> None:
        """The trainable block joins the frozen bank (bitwise) and a fresh one starts (kaiming A, B = 0)."""
        self._reserve(self.n_ranks + self.r)
        self.stacked()
        self.n_old = self.n_ranks
        self._refresh_casts()
        A, B = init_lora_pair(self.r, self.in_features, self.out_features, self.base.weight.device)
        self.A = nn.Parameter(A.to(self.A.dtype))
        self.B = nn.Parameter(B.to(self.B.dtype))

    def added_tensors(self) -> list[torch.Tensor]:
        """What the method added to this layer: the frozen bank and the trainable block."""
        return [self.bank_a, self.bank_b, self.A, self.B] if self.n_old else [self.A, self.B]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the fused layer (:class:`_MoRALayer`); without gradients: the same function
        in three GEMMs and the routing; eval with gradients (tests, analysis): the reference."""
        dtype = compute_dtype(x)
        A_full, B_full = self.stacked(dtype)
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.A.requires_grad or self.B.requires_grad
        )
        if wants_grad and self.training:
            out: torch.Tensor = _MoRALayer.apply(x, self.A, self.B, self, A_full, B_full.t())
            return out
        if wants_grad:
            return self.base(x) + self.delta(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            bias = None if self.base.bias is None else self.base.bias.to(dtype)
            z = x2 @ A_full.t()
            routed = route(
                z, self.k, self.tau, self.gate, fused=self.fused, totals=self.totals(self.training)
            )
            y = F.linear(x2, self.base.weight.to(dtype), bias)
            torch.addmm(y, routed.h, B_full.t(), out=y)  # in place (see _MoRALayer)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @property
    def gate(self) -> float:
        """The eval-only activation gate delta (0 in training)."""
        return 0.0 if self.training else self.threshold

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B (w * z)`` alone by the reference routing and plain autograd over ``[bank; block]``."""
        A_full = torch.cat([self.bank_a, self.A])
        B_full = torch.cat([self.bank_b, self.B], dim=1)
        dtype = compute_dtype(x)
        z = F.linear(x.to(dtype), A_full.to(dtype))
        h, counts = route_reference(z, self.k, self.tau, self.gate)
        self.count(counts, training=self.training)
        return F.linear(h, B_full.to(dtype))

    @torch.no_grad()
    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense routing weights w [..., R] of the current mode (for inspection and tests)."""
        A_full, _ = self.stacked()
        return dense_weights(F.linear(x.to(A_full.dtype), A_full), self.k, self.tau, self.gate)

    def totals(self, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The device counters of a mode (views): non-zero routing weights summed over tokens, tokens."""
        mode = 0 if training else 1
        return self.active_sum.select(0, mode), self.n_tokens.select(0, mode)

    def count(self, counts: torch.Tensor, *, training: bool) -> None:
        """Add the non-zero routing weights of ``counts`` (one per token) to the device counters."""
        active, tokens = self.totals(training)
        active.add_(counts.sum())
        tokens.add_(counts.numel())

    # -- measurements and state ----------------------------------------------------------------
    def reset_counts(self) -> None:
        self.active_sum.zero_()
        self.n_tokens.zero_()

    def get_extra_state(self) -> dict[str, Any]:
        """The bank and its size travel with ``state_dict`` (the stores themselves are not saved)."""
        return {
            "n_old": self.n_old,
            "bank_a": self.bank_a.clone(),
            "bank_bt": self.bt_store[: self.n_old].clone(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_old = int(state["n_old"])
        self._reserve(self.n_ranks)
        with torch.no_grad():
            self.a_store[: self.n_old].copy_(state["bank_a"])
            self.bt_store[: self.n_old].copy_(state["bank_bt"])
        self._refresh_casts()


@dataclass(frozen=True)
class MoRAConfig(StrategyConfig):
    r: int = 16  # rank-1 experts added per experience
    topk: int = 16  # top-k budget, floored at 2
    tau: float = 0.01  # softmax temperature
    delta: float = 0.2  # eval-only activation gate on s (0: off)
    roles: tuple[str, ...] = ROLES
    towers: tuple[str, ...] = ("vision", "text")
    betas: tuple[float, ...] = (0.9, 0.9999)  # AdamW (beta1, beta2)
    use_image_to_text: bool = True
    use_text_to_image: bool = True
    normalize_text_targets: bool = False  # official: raw multi-hot targets
    # "run": the classes the loop scores compete (train_classes); "current": official X-TAIL masking
    image_to_text_classes: Literal["run", "current"] = "run"
    fused_routing: bool = True  # CUDA: the Triton routing kernels (false: the torch reference)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"strategy.r must be >= 1, got {self.r}")
        if self.topk < 1:
            raise ConfigError(f"strategy.topk must be >= 1, got {self.topk}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"strategy.tau must be > 0, got {self.tau}")
        if not 0 <= self.delta <= 1:
            raise ConfigError(f"strategy.delta must be in [0, 1], got {self.delta}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"strategy.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not (self.use_image_to_text or self.use_text_to_image):
            raise ConfigError("strategy.use_image_to_text and use_text_to_image are both false: no loss")
        check_targets(self.roles, self.towers)


@STRATEGIES.register(
    "mora",
    description="MoRA/MoRAM (arXiv 2506.21035): self-activated sparse mixture of rank-1 experts, 16 per exp",
)
class MoRA(Strategy):
    """The strategy: inject :class:`MoRALinear`, grow the bank per experience, official CLIP loss."""

    Config = MoRAConfig
    paper = (
        "MoRA/MoRAM: Little by Little: Continual Learning via Incremental Mixture of Rank-1 "
        "Associative Memory Experts (arXiv 2506.21035; v1: Self-Activated Sparse Mixture-of-Rank)"
    )
    default_lr = 5e-4
    graph_safe = True
    default_weight_decay = 0.0

    def __init__(self, cfg: MoRAConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        self.clip = backbone.kind == "clip"
        if not self.clip and not cfg.use_image_to_text:
            raise ConfigError(
                f"strategy.use_image_to_text=false needs a CLIP backbone; {backbone.name} has no text term"
            )
        capacity = cfg.r * max(1, ctx.n_experiences)
        self._adapters = AdapterSet.inject(
            backbone,
            lambda linear, block, role: MoRALinear(
                linear, cfg.r, cfg.topk, cfg.tau, cfg.delta, capacity, fused=cfg.fused_routing
            ),
            roles=cfg.roles,
            towers=cfg.towers,
        )
        self.n_blocks = 1  # the first block exists from construction on
        self._masks: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def adapters(self) -> AdapterSet[MoRALinear]:
        return self._adapters

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the current block of every layer (plus a linear head, on non-CLIP backbones)."""
        params = [p for a in self._adapters.values() for p in (a.A, a.B)]
        return params + [p for p in self.head.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(
            self.trainable_parameters(), lr, weight_decay, betas=(self.cfg.betas[0], self.cfg.betas[1])
        )

    def federated_tensors(self) -> dict[str, torch.Tensor]:
        """The current block of every layer (A, B; never the frozen bank) and a trained linear head."""
        return self.adapter_tensors(("A", "B"))

    def before_experience(self, exp: ExperienceInfo) -> None:
        """A new experience freezes the current blocks into the banks and starts fresh ones."""
        if exp.index >= self.n_blocks:
            for adapter in self._adapters.values():
                adapter.increment()
            self.n_blocks += 1
        for adapter in self._adapters.values():
            adapter.reset_counts()
        self._masks.clear()

    # -- checkpoint -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """What the module tensors do not hold. Each layer's frozen bank and its size ``n_old``
        travel as the layer's module extra state and the current block (``A``, ``B``) as its
        parameters, saved by the loop; the strategy adds:

        - ``n_blocks``: the blocks begun so far, which decides whether ``before_experience``
          increments (a resumed run must neither start a block twice nor skip one; each layer's
          ``n_old`` is then ``r * (n_blocks - 1)``);
        - ``counters``: every layer's device counters of the experience in progress, ``active_sum``
          and ``n_tokens`` [train, eval] (non-persistent buffers): a resume inside an experience
          needs the training counts of its steps before the checkpoint for ``report``.
        The cast copies of the stores and the class masks are rebuilt on use.
        """
        return {
            "n_blocks": self.n_blocks,
            "counters": {
                name: {
                    "active_sum": a.active_sum.detach().cpu().clone(),
                    "n_tokens": a.n_tokens.detach().cpu().clone(),
                }
                for name, a in self._adapters.items()
            },
        }

    @torch.no_grad()
    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` on a freshly built strategy (the banks themselves are
        rebuilt by :meth:`MoRALinear.set_extra_state` when the module tensors load)."""
        counters = state["counters"]
        if set(counters) != set(self._adapters):
            raise ValueError("the checkpoint's MoRA layers do not fit the model")
        n_blocks = int(state["n_blocks"])
        if n_blocks < 1:
            raise ValueError(f"bad MoRA block count {n_blocks}")
        self.n_blocks = n_blocks
        for name, adapter in self._adapters.items():
            adapter.active_sum.copy_(counters[name]["active_sum"])
            adapter.n_tokens.copy_(counters[name]["n_tokens"])
        self._masks.clear()

    # -- loss (official X-TAIL train_model) -----------------------------------------------------
    def _current(
        self, exp: ExperienceInfo, n_classes: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The current classes (long) and their boolean mask over all classes, built once per experience."""
        key = (exp.classes, n_classes, device)
        if key not in self._masks:
            current = torch.tensor(exp.classes, dtype=torch.long, device=device)
            mask = torch.zeros(n_classes, dtype=torch.bool, device=device).index_fill(0, current, True)
            self._masks[key] = (current, mask)
        return self._masks[key]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, exp: ExperienceInfo) -> torch.Tensor:
        """Image-to-text CE over the scored (or the current) classes + text-to-image soft CE (see
        the module docstring)."""
        logits = logits.float()
        current, is_current = self._current(exp, logits.shape[1], logits.device)
        total = logits.new_zeros(())
        if self.cfg.use_image_to_text or not self.clip:
            competing = logits
            if self.cfg.image_to_text_classes == "current":
                competing = logits.masked_fill(~is_current, float("-inf"))
            total = total + F.cross_entropy(competing, y)
        if self.clip and self.cfg.use_text_to_image:
            # scale * <text_c, image_j> for the current classes c: the transposed image-to-text columns
            t_logits = logits.index_select(1, current).t()
            targets = (current[:, None] == y[None, :]).float()
            if self.cfg.normalize_text_targets:
                targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(1.0)
            t2i = -(targets * t_logits.log_softmax(dim=1)).sum() / len(exp.seen_classes)
            total = total + t2i
        return total

    # -- figures --------------------------------------------------------------------------------
    def _active(self) -> tuple[list[float], list[float]]:
        """Mean non-zero routing weights per token and layer, (train, eval); NaN where none ran."""
        layers = list(self._adapters.values())
        counts = torch.stack([torch.stack([a.active_sum, a.n_tokens]) for a in layers]).tolist()  # one sync
        per_mode: tuple[list[float], list[float]] = ([], [])
        for sums, tokens in counts:
            for mode in (0, 1):
                n = tokens[mode]
                per_mode[mode].append(sums[mode] / n if n else math.nan)
        return per_mode

    @staticmethod
    def _mean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def n_active(self) -> int | None:
        """Added parameters used per token: sum over layers of (mean active ranks in the last
        evaluation) x (d_in + d_out). None before any evaluation."""
        _, active = self._active()
        if all(math.isnan(v) for v in active):
            return None
        return round(
            sum(
                v * (a.in_features + a.out_features)
                for v, a in zip(active, self._adapters.values(), strict=True)
                if not math.isnan(v)
            )
        )

    def report(self) -> dict[str, float | int]:
        """Ranks per layer, mean active ranks per token (train, eval: layer means) and the block size."""
        train, active = self._active()
        ranks = next(iter(self._adapters.values())).n_ranks
        return {
            "ranks_per_layer": ranks,
            "total_ranks": ranks * len(self._adapters),
            "active_ranks_train": self._mean(train),
            "active_ranks_eval": self._mean(active),
            "added_per_experience": sum(
                a.r * (a.in_features + a.out_features) for a in self._adapters.values()
            ),
        }

    def final_report(self) -> dict[str, Any]:
        train, active = self._active()
        names = list(self._adapters)
        return {
            "scalars": {**self.report(), "bank_parameters": self.n_added()},
            "per_layer": {
                "active_ranks_eval": dict(zip(names, active, strict=True)),
                "active_ranks_train": dict(zip(names, train, strict=True)),
            },
        }
