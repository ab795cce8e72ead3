"""Shared building blocks for strategies: attention unfusing, adapter injection, LoRA maths,
parameter counting.

Strategies share code through these functions, not through mixins or deep class hierarchies.
Every adapter wraps a frozen ``nn.Linear`` (``base``) and adds a method-specific ``delta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import ROLES, Backbone, Block, Tower

# ----------------------------------------------------------------------------- attention


class UnfusedAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` made of four ``nn.Linear`` layers.

    ``nn.MultiheadAttention`` fuses q/k/v into ``in_proj_weight`` and never calls ``out_proj`` as
    a module, so wrapping its linears silently changes nothing. This module computes the same
    function with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears and
    ``F.scaled_dot_product_attention``. The number of heads is derived from the q projection's
    output width and the fixed ``head_dim``, so structured pruning can slice whole heads.
    ``causal=True`` replaces the additive causal mask of a text tower by ``is_causal`` (same
    result, lets SDPA use its fused kernels).
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        *,
        bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {n_heads} heads")
        self.embed_dim = embed_dim
        self.n_heads = n_heads
        self.head_dim = embed_dim // n_heads
        self.batch_first = batch_first
        self.causal = causal
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, *, causal: bool = False) -> UnfusedAttention:
        """Copy the weights of a self-attention ``nn.MultiheadAttention`` into a new module."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only self-attention with a fused in_proj_weight can be unfused")
        if mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise ValueError("bias_k/bias_v, add_zero_attn and attention dropout are not supported")
        d = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(d, mha.num_heads, bias=bias, batch_first=mha.batch_first, causal=causal)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d : (i + 1) * d])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * d : (i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("UnfusedAttention does not return attention weights")
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported")
        if torch.is_autocast_enabled(query.device.type):
            # one cast of the (fp32 layer-norm) input, not one per projection
            query = query.to(torch.get_autocast_dtype(query.device.type))
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length = query.shape[0], query.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], -1, self.head_dim).transpose(1, 2)

        qkv = None
        if key is query and value is query:  # self-attention: one GEMM for q, k and v when possible
            qkv = fused_projections(query, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:
            widths = [_out_width(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
            q, k, v = (heads(t) for t in qkv.split(widths, dim=-1))
        else:
            q = heads(self.q_proj(query))
            k = heads(self.k_proj(key))
            v = heads(self.v_proj(value))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = (
                attn_mask.to(q.dtype)
                if attn_mask is not None and attn_mask.is_floating_point()
                else attn_mask
            )
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _out_width(module: nn.Module) -> int:
    """Output width of a linear layer or of an adapter around one."""
    width = module.out_features  # nn.Linear and AdaptedLinear both expose it
    assert isinstance(width, int)
    return width


# ----------------------------------------------------------------------------- injection


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

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Parameters added by the method (everything except the frozen base layer)."""
        base_ids = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base_ids]


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


def freeze(module: nn.Module) -> None:
    module.requires_grad_(False)


# ----------------------------------------------------------------------------- LoRA maths


def init_lora_pair(
    r: int, d_in: int, d_out: int, device: torch.device | None = None
) -> tuple[nn.Parameter, nn.Parameter]:
    """A [r, d_in] kaiming-uniform (a=sqrt(5), as loralib/peft) and B [d_out, r] zeros."""
    A = torch.empty(r, d_in, device=device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.zeros(d_out, r, device=device)
    return nn.Parameter(A), nn.Parameter(B)


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ``scaling * B diag(g) A`` of a linear layer, with what LoRA variants change.

    - ``rank_scale`` g [r]: a per-rank gate, trainable (SoRA) or not (DyLoRA's rank weights
      ``alpha / b`` on the first b ranks, 0 on the others); None: all ones.
    - ``grad_row_scale`` [d_out]: the output gradient reaching A, B and g is scaled per row by it
      (ALLoRA); the gradient to the layer input is not.
    - ``out_mask`` [d_out]: the whole output row (base, update and bias) is multiplied by it
      (LoRAPrune's head/channel masks); gradients follow the masked function.
    - ``grad_rank_mask`` m [r] of 0/1: the gradients of A's rows, B's columns and g are multiplied
      by it, so masked ranks get exact zeros (DyLoRA's frozen mode); None: every rank learns.
    A and B may be views or results of differentiable expressions. Per-step values (a gate, DyLoRA's
    rank weights, ALLoRA's row scale) are tensors updated in place, so one CUDA graph serves all steps.
    """

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scaling: float = 1.0
    rank_scale: torch.Tensor | None = None
    grad_row_scale: torch.Tensor | None = None
    out_mask: torch.Tensor | None = None
    grad_rank_mask: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The differentiable inputs: A, B and the gate if it is trainable."""
        gate = self.rank_scale
        return (self.A, self.B) if gate is None or not gate.requires_grad else (self.A, self.B, gate)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone, computed unfused with autograd (reference path)."""
        A, B, gate = self.A, self.B, self.rank_scale
        if self.grad_rank_mask is not None:  # same values, gradient only where the mask is 1
            m = self.grad_rank_mask
            A = A * m[:, None] + (A * (1 - m[:, None])).detach()
            B = B * m + (B * (1 - m)).detach()
            if gate is not None:
                gate = gate * m + (gate * (1 - m)).detach()
        z = F.linear(x, A.to(x.dtype))
        if gate is not None:
            z = z * gate.to(z.dtype)
        out = F.linear(z, B.to(z.dtype)) * self.scaling
        return out if self.out_mask is None else out * self.out_mask.to(out.dtype)

    def weight(self, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``W0 + scaling * B diag(g) A`` (rows masked) in ``dtype``, rounded once.

        One ``addmm`` with fp32 accumulation in the base's dtype (a bf16 base in a bf16 run: one
        rounding to bf16; an fp32 base: summed in fp32, then cast), so no update is rounded away
        twice.
        """
        work = base.dtype
        B = self.B.detach()
        B = (B if self.rank_scale is None else B * self.rank_scale.detach()).to(work)
        merged = torch.addmm(base, B, self.A.detach().to(work), alpha=self.scaling)
        if self.out_mask is not None:
            merged = merged * self.out_mask.to(work)[:, None]
        return merged.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when autocast is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


Layer = tuple[torch.Tensor, torch.Tensor | None, LowRank]  # frozen weight, frozen bias, update


class _FusedLowRankLinears(torch.autograd.Function):
    """``y = x [W_1; ...; W_k]^T + [b_1; ...; b_k]`` with ``W_i = W0_i + s_i B_i diag(g_i) A_i``: k
    adapted linears that share their input (q, k, v of an attention, or a single layer), fused.

    Forward: each update is merged into its weight on the fly (an [d_out, d_in] addmm, negligible
    next to the activations), so the k layers cost one GEMM like a plain linear, plus the skinny
    ``z = x [A_1; ...]^T`` kept for the B and g gradients. Backward: ``grad_x = g W`` (one GEMM),
    one product ``g B`` with the block-diagonal of the (row-scaled) ``s_i B_i diag(g_i)`` that
    gives every A_i, and one ``g^T z`` whose diagonal blocks give every B_i and g_i. Compared with
    the unfused ``W0 x + s B (A x)`` per layer, this removes the elementwise sums and products over
    the activations and most of the small kernels, which dominated the step on the GPU (in kernel
    time and in launch time).

    The per-layer work on the (small) factors is written to launch as few kernels as possible:
    a float32 factor (gate, row scale, rank mask) multiplies a bf16 tensor into a float32 result
    directly, which is also the cast of the parameter gradient; a product with the gate is
    rounded to the compute dtype once.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layers: tuple[Layer, ...], *factors: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            weights, biases, a_blocks, b_blocks, backward_meta = [], [], [], [], []
            for weight, bias, f in layers:
                A_c = f.A.detach().to(dtype)
                gate = None if f.rank_scale is None else f.rank_scale.detach()
                B_c = (f.B.detach() if gate is None else f.B.detach() * gate).to(dtype)  # B diag(g)
                if weight.dtype == dtype:  # one addmm, one rounding (see LowRank.weight)
                    merged = torch.addmm(weight, B_c, A_c, alpha=f.scaling)
                    if f.out_mask is not None:
                        merged = merged * f.out_mask.to(dtype)[:, None]
                    weights.append(merged)
                else:
                    weights.append(f.weight(weight, dtype))
                if bias is not None:
                    biases.append(bias if f.out_mask is None else bias * f.out_mask.to(bias.dtype))
                scale = f.grad_row_scale
                if f.out_mask is not None:
                    scale = f.out_mask if scale is None else scale * f.out_mask
                b_block = B_c if f.scaling == 1 else B_c * f.scaling
                if scale is not None:  # one kernel: the float32 scale times bf16, rounded to bf16
                    b_block = torch.mul(b_block, scale[:, None], out=torch.empty_like(b_block))
                b_blocks.append(b_block)
                a_blocks.append(A_c)
                trained_gate = f.rank_scale is not None and f.rank_scale.requires_grad
                backward_meta.append(
                    (
                        weight.shape[0],
                        f.A.shape[0],
                        f.scaling,
                        scale,
                        gate,
                        f.B.detach() if trained_gate else None,
                        f.grad_rank_mask,
                        [t.dtype for t in f.tensors()],
                    )
                )
            W = weights[0] if len(weights) == 1 else torch.cat(weights)
            b = None if not biases else (biases[0] if len(biases) == 1 else torch.cat(biases)).to(dtype)
            y = F.linear(x2, W, b)
            A_cat = a_blocks[0] if len(a_blocks) == 1 else torch.cat(a_blocks)
            z = x2 @ A_cat.t()  # [N, sum r]
            B_bd = b_blocks[0] if len(b_blocks) == 1 else torch.block_diag(*b_blocks)
        ctx.save_for_backward(x2, z, W, B_bd)
        ctx.meta = (shape, x.dtype, backward_meta)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z, W, B_bd = ctx.saved_tensors
        shape, x_dtype, backward_meta = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(W.dtype)
            grad_x = (g @ W).reshape(shape).to(x_dtype) if ctx.needs_input_grad[0] else None
            grad_A_all = (g @ B_bd).t() @ x2  # [sum r, d_in]: (g_i c_i s_i B_i diag(g_i))^T x per block
            P_all = g.t() @ z  # [sum d_out, sum r]: the diagonal blocks are g_i^T z_i
        grads: list[torch.Tensor | None] = []
        row = col = 0
        for d_out, r, scaling, scale, gate, B_for_gate, mask, dtypes in backward_meta:
            out = factor_grads(
                P_all[row : row + d_out, col : col + r],
                grad_A_all[col : col + r],
                scaling,
                scale,
                gate,
                B_for_gate,
                mask,
            )
            grads.extend(t.to(dt) for t, dt in zip((t for t in out if t is not None), dtypes, strict=True))
            row, col = row + d_out, col + r
        return (grad_x, None, *grads)


FactorGrads = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
FACTOR_TILE = 4096  # elements per program of the factor-gradient kernel
MAX_KERNEL_RANK = 256  # larger ranks take the torch path (a program holds a tile of all ranks)


def factor_grads(
    P: torch.Tensor,
    GA: torch.Tensor,
    scaling: float,
    scale: torch.Tensor | None,
    gate: torch.Tensor | None,
    B_for_gate: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    fused: bool = True,
) -> FactorGrads:
    """``(grad_A, grad_B, grad_g)`` of one layer of :class:`_FusedLowRankLinears`, float32 at least.

    From the layer's rows ``GA`` [r, d_in] of ``((dL/dy) B_bd)^T x`` (the B block already holds
    ``s c B diag(g)``) and its block ``P`` [d_out, r] of ``(dL/dy)^T z``:
    ``grad_A = GA m``, ``grad_B = s c P diag(g) m`` and, when the gate trains (``B_for_gate``: B),
    ``grad_g = m sum_o (s c P)_o B_o`` (c: the row scale, g: the gate, m: the rank mask; each
    omitted when None). ``fused``: one Triton kernel on CUDA (:mod:`cl_bench.lowrank_kernels`)
    instead of up to seven small torch kernels; it multiplies in the same order, so grad_A and
    grad_B are bitwise the torch result and grad_g differs by the order of its float32 sum.
    """
    if fused and _use_factor_kernel(P, GA, scale, gate, B_for_gate, mask):
        return _factor_grads_triton(P, GA, scaling, scale, gate, B_for_gate, mask)
    grad_A = GA if mask is None else torch.mul(GA, mask[:, None])
    grad_A = grad_A.to(torch.promote_types(grad_A.dtype, torch.float32))
    grad_Bg = P if scale is None else torch.mul(P, scale[:, None])  # c P, float32 from here on
    grad_Bg = grad_Bg.to(torch.promote_types(grad_Bg.dtype, torch.float32))
    if scaling != 1:
        grad_Bg = grad_Bg * scaling
    grad_B = grad_Bg if gate is None else grad_Bg * gate
    grad_g = None if B_for_gate is None else (grad_Bg * B_for_gate).sum(0)  # sum_o (s c P)_oi B_oi
    if mask is not None:
        grad_B = grad_B * mask
        grad_g = None if grad_g is None else grad_g * mask
    return grad_A, grad_B, grad_g


def _factor_kernel() -> Any:
    """The Triton kernel, imported (with Triton) on first CUDA use."""
    from cl_bench import lowrank_kernels

    return lowrank_kernels.factor_grads_kernel


def _use_factor_kernel(P: torch.Tensor, GA: torch.Tensor, *factors: torch.Tensor | None) -> bool:
    """The kernel takes CUDA blocks of a float dtype, float32 factors, and ranks up to MAX_KERNEL_RANK."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if not P.is_cuda or P.dtype not in floats or GA.dtype not in floats or P.shape[1] > MAX_KERNEL_RANK:
        return False
    if any(f is not None and (f.dtype != torch.float32 or not f.is_cuda) for f in factors):
        return False
    try:
        _factor_kernel()
    except ImportError:
        return False
    return True


def _factor_grads_triton(
    P: torch.Tensor,
    GA: torch.Tensor,
    scaling: float,
    scale: torch.Tensor | None,
    gate: torch.Tensor | None,
    B_for_gate: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> FactorGrads:
    import triton

    kernel = _factor_kernel()
    d_out, r = P.shape
    d_in = GA.shape[1]
    grad_A = torch.empty(r, d_in, device=P.device, dtype=torch.float32)
    grad_B = torch.empty(d_out, r, device=P.device, dtype=torch.float32)
    grad_g = None if B_for_gate is None else torch.empty(r, device=P.device, dtype=torch.float32)
    block_r = max(2, triton.next_power_of_2(r))
    block = max(16, FACTOR_TILE // block_r)
    n_a, n_b = triton.cdiv(d_in, block), triton.cdiv(d_out, block)
    scale, gate, mask = (None if t is None else t.contiguous() for t in (scale, gate, mask))
    B = P if B_for_gate is None else B_for_gate
    kernel[(n_a + n_b + (grad_g is not None),)](
        P, P.stride(0), P.stride(1),
        GA, GA.stride(0), GA.stride(1),
        P if scale is None else scale, P if gate is None else gate, B, B.stride(0), B.stride(1),
        P if mask is None else mask,
        grad_A, grad_B, grad_B if grad_g is None else grad_g,
        d_out, d_in, r, float(scaling), n_a, n_b,
        BLOCK_R=block_r, BLOCK_O=block, BLOCK_I=block,
        HAS_SCALE=scale is not None, HAS_GATE=gate is not None, GATE_GRAD=grad_g is not None,
        HAS_MASK=mask is not None, num_warps=4,
    )  # fmt: skip
    return grad_A, grad_B, grad_g


def lora_linears(x: torch.Tensor, layers: tuple[Layer, ...]) -> torch.Tensor:
    """Frozen linear layers with low-rank updates, sharing the input ``x``; outputs concatenated.

    Fused (one GEMM) when an update or the input needs a gradient; one GEMM with the merged
    weights otherwise (evaluation). A trainable base weight falls back to plain autograd.
    """
    if any(w.requires_grad or (b is not None and b.requires_grad) for w, b, _ in layers):
        outs = []
        for weight, bias, f in layers:
            out = F.linear(x, weight, bias)
            out = out if f.out_mask is None else out * f.out_mask.to(out.dtype)
            outs.append(out + f.delta(x))
        return torch.cat(outs, dim=-1)
    factors = [t for _, _, f in layers for t in f.tensors()]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in factors)):
        return _FusedLowRankLinears.apply(x, layers, *factors)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        weights = [f.weight(w, dtype) for w, _, f in layers]
        biases = [
            b if f.out_mask is None else b * f.out_mask.to(b.dtype) for _, b, f in layers if b is not None
        ]
        W = weights[0] if len(weights) == 1 else torch.cat(weights)
        bias = None if not biases else (biases[0] if len(biases) == 1 else torch.cat(biases)).to(dtype)
        return F.linear(x.to(dtype), W, bias)


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factors: LowRank
) -> torch.Tensor:
    """One frozen linear layer with a low-rank update (see :func:`lora_linears`)."""
    return lora_linears(x, ((weight, bias, factors),))


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


# ----------------------------------------------------------------------------- counting


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


# ----------------------------------------------------------------------------- shared config


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


# ----------------------------------------------------------------------------- rank-wise routing
# Shared by the routed rank-1 mixtures whose experts are single ranks chosen per token by a top-k
# (SMoRA, FlyLoRA): the selection mask, the per-rank counters and the sign-rule balancing step.


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (``scores``' dtype, no gradient) of the ``k`` largest entries along the last dim.

    Fixed shapes and no host sync (a CUDA graph can replay it); ties follow ``torch.topk``."""
    scores = scores.detach()
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


class RankUsage(nn.Module):
    """Device counters of how often each of ``r`` ranks is selected (never trained, never saved).

    - ``step`` [r]: selections by the training forwards (train mode, gradients on) since the last
      :func:`balance_biases`, i.e. of one optimizer step;
    - ``usage`` [2, r]: selections in the current experience, [train, eval] (module mode);
    - ``tokens`` [2]: tokens counted, [train, eval].
    All int64 and updated in place, so counting never syncs with the host.
    """

    step: torch.Tensor
    usage: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, r: int, device: torch.device | None = None) -> None:
        super().__init__()
        for name, shape in (("step", (r,)), ("usage", (2, r)), ("tokens", (2,))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long, device=device), persistent=False)

    def record(self, mask: torch.Tensor, training: bool) -> None:
        """Count one forward's selections: ``mask`` [tokens, ..., r] of 0/1 (extra dims: branches)."""
        counts = torch.count_nonzero(mask.reshape(-1, mask.shape[-1]), dim=0)
        mode = 0 if training else 1
        self.usage[mode].add_(counts)
        self.tokens[mode].add_(mask.shape[0])
        if training and torch.is_grad_enabled():
            self.step.add_(counts)

    def reset(self) -> None:
        self.step.zero_()
        self.usage.zero_()
        self.tokens.zero_()


@torch.no_grad()
def balance_biases(usages: Sequence[RankUsage], biases: Sequence[torch.Tensor], rate: float) -> None:
    """The loss-free balancing step of every layer at once: ``b += rate * sign(mean(c) - c)`` with
    ``c`` the layer's ``step`` counts, which then restart from 0 (a step without tokens moves nothing).

    ``sign`` is invariant to scaling c, so a step whose forwards ran twice on the same inputs (a
    recompute) moves the biases as once. A handful of kernels for all layers (no host sync)."""
    if not usages:
        return
    steps = [u.step for u in usages]
    if rate != 0:
        c = torch.stack(steps).double()
        moves = torch.sign(c.mean(dim=1, keepdim=True) - c).to(biases[0].dtype)
        torch._foreach_add_(list(biases), list(moves.unbind(0)), alpha=rate)
    torch._foreach_zero_(steps)


def usage_figures(counts: Sequence[int]) -> tuple[float, float, float]:
    """(max / mean, min / mean, fraction of ranks never selected) of one layer's selection counts
    (NaN, NaN, NaN when nothing was counted)."""
    total = sum(counts)
    if not counts or total == 0:
        return math.nan, math.nan, math.nan
    mean = total / len(counts)
    return max(counts) / mean, min(counts) / mean, sum(1 for c in counts if c == 0) / len(counts)


def most_used(counts: Sequence[int], k: int) -> frozenset[int]:
    """The ``k`` most selected ranks that were selected at all (ties: the lower index)."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return frozenset(i for i in order[:k] if counts[i] > 0)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """``|a & b| / |a | b|`` (NaN when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else math.nan


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


class RoutingHistory:
    """The routing state of a strategy's routed layers and the figures built on it
    (STRATEGIES-rankwise.md Part A).

    ``layers`` maps names to adapters that hold a :class:`RankUsage` as ``usage`` and a balancing
    bias buffer named ``bias`` (looked up at each use: moving a module replaces its buffers).
    Per experience it keeps each layer's training selection counts and the drift of the biases;
    the figures are the selected ranks per token (train, eval), the per-layer load max/mean and
    min/mean, the fraction of ranks never selected in the experience, the Jaccard overlap of each
    experience's ``k`` most used ranks per layer with those of every earlier experience (the "task
    decoupling" view), and mean and max |bias|.
    """

    def __init__(self, layers: Mapping[str, nn.Module], k: int, bias: str) -> None:
        self.layers = layers
        self.k = k
        self.bias = bias
        self.counts: list[dict[str, list[int]]] = []  # one {layer: counts [r]} per experience
        self.drift: list[tuple[float, float]] = []  # (mean, max) |bias| after each experience

    # -- state ---------------------------------------------------------------------------------
    def usages(self) -> list[RankUsage]:
        usages = [layer.usage for layer in self.layers.values()]
        assert all(isinstance(u, RankUsage) for u in usages)
        return usages  # type: ignore[return-value]

    def biases(self) -> list[torch.Tensor]:
        biases = [getattr(layer, self.bias) for layer in self.layers.values()]
        assert all(isinstance(b, torch.Tensor) for b in biases)
        return biases

    def start_experience(self) -> None:
        """The counters of a new experience start from 0."""
        for usage in self.usages():
            usage.reset()

    def balance(self, rate: float) -> None:
        """One balancing step of every layer from the counts of the step (:func:`balance_biases`)."""
        balance_biases(self.usages(), self.biases(), rate)

    def end_experience(self) -> None:
        """Keep this experience's training counts and the bias drift (two host syncs)."""
        rows = torch.stack([u.usage[0] for u in self.usages()]).tolist()
        self.counts.append(dict(zip(self.layers, rows, strict=True)))
        self.drift.append(self._bias_figures())

    # -- figures -------------------------------------------------------------------------------
    def _bias_figures(self) -> tuple[float, float]:
        flat = torch.cat([b.detach().reshape(-1).float() for b in self.biases()]).abs()
        mean, top = torch.stack([flat.mean(), flat.max()]).tolist()
        return mean, top

    def _jaccards(self, t: int) -> list[float]:
        """Mean over layers of the overlap of experience ``t``'s most used ranks with each earlier one."""
        now = {name: most_used(c, self.k) for name, c in self.counts[t].items()}
        return [
            _nanmean(jaccard(now[name], most_used(c, self.k)) for name, c in self.counts[j].items())
            for j in range(t)
        ]

    def active_per_token(self) -> tuple[float, float]:
        """Selected ranks per token, (train, eval), mean over layers of this experience (NaN: none ran)."""
        rows = torch.stack([torch.stack([u.usage.sum(dim=1), u.tokens]) for u in self.usages()]).tolist()
        return (
            _nanmean(s[0] / n[0] if n[0] else math.nan for s, n in rows),
            _nanmean(s[1] / n[1] if n[1] else math.nan for s, n in rows),
        )

    def figures(self) -> dict[str, float]:
        """Scalar figures now: active ranks of the current counters, load and overlap of the last
        kept experience (means over layers), and the bias drift."""
        train, evaluation = self.active_per_token()
        figures = {"active_ranks_train": train, "active_ranks_eval": evaluation}
        if self.counts:
            per_layer = [usage_figures(c) for c in self.counts[-1].values()]
            figures |= {
                "load_max_mean": _nanmean(f[0] for f in per_layer),
                "load_min_mean": _nanmean(f[1] for f in per_layer),
                "never_used_fraction": _nanmean(f[2] for f in per_layer),
                "jaccard_earlier": _nanmean(self._jaccards(len(self.counts) - 1)),
            }
        mean, top = self.drift[-1] if self.drift else self._bias_figures()
        return figures | {"bias_abs_mean": mean, "bias_abs_max": top}

    def sections(self) -> dict[str, dict[str, Any]]:
        """``curves``, ``per_layer`` and ``events`` of a final report."""
        x = list(range(len(self.counts)))
        per_exp = [{n: usage_figures(c) for n, c in layers.items()} for layers in self.counts]
        mean = [[_nanmean(f[i] for f in layers.values()) for layers in per_exp] for i in range(3)]
        sorted_load = {}
        for t, layers in enumerate(self.counts):
            profiles = [
                [c / (sum(counts) / len(counts)) for c in sorted(counts, reverse=True)]
                for counts in layers.values()
                if sum(counts)
            ]
            if profiles:
                sorted_load[f"experience {t}"] = [
                    _nanmean(p[i] for p in profiles) for i in range(len(profiles[0]))
                ]
        curves: dict[str, Any] = {
            "load": {
                "x": x,
                "y": {"max/mean": mean[0], "min/mean": mean[1]},
                "x_label": "experience",
                "y_label": "rank load / mean (layer mean)",
            },
            "never_used_fraction": {
                "x": x,
                "y": mean[2],
                "x_label": "experience",
                "y_label": "ranks never selected",
            },
            "jaccard_earlier": {
                "x": x,
                "y": [_nanmean(self._jaccards(t)) for t in x],
                "x_label": "experience",
                "y_label": f"Jaccard of top-{self.k} ranks vs earlier",
            },
            "bias_drift": {
                "x": list(range(len(self.drift))),
                "y": {"mean |bias|": [m for m, _ in self.drift], "max |bias|": [t for _, t in self.drift]},
                "x_label": "experience",
                "y_label": f"balancing bias ({self.bias})",
            },
        }
        if sorted_load:
            r = len(next(iter(sorted_load.values())))
            curves["load_sorted"] = {
                "x": list(range(1, r + 1)),
                "y": sorted_load,
                "x_label": "rank, most selected first",
                "y_label": "load / mean (layer mean)",
            }
        last = per_exp[-1] if per_exp else {}
        top = torch.stack([b.detach().abs().max() for b in self.biases()]).tolist()
        return {
            "curves": curves,
            "per_layer": {
                "load_max_mean": {n: f[0] for n, f in last.items()},
                "load_min_mean": {n: f[1] for n, f in last.items()},
                "never_used_fraction": {n: f[2] for n, f in last.items()},
                "bias_abs_max": dict(zip(self.layers, top, strict=True)),
            },
            "events": {
                "load_per_layer": {
                    "fields": ["experience", "layer", "max_mean", "min_mean", "never_used"],
                    "entries": [[t, n, *f] for t, layers in enumerate(per_exp) for n, f in layers.items()],
                },
                "jaccard": {
                    "fields": ["experience", "earlier", "mean_jaccard"],
                    "entries": [[t, j, v] for t in x for j, v in enumerate(self._jaccards(t))],
                },
            },
        }
