"""Low-rank updates of frozen linear layers and their fused autograd.

:class:`LowRank` describes ``scaling * B diag(g) A`` with what the LoRA variants change (a per-rank
gate, a per-row gradient scale, an output mask, a per-rank gradient mask); :func:`lora_linears`
runs frozen linears that share an input with their updates as one GEMM (:class:`_FusedLowRankLinears`),
whose factor gradients :func:`factor_grads` computes, in one Triton kernel on CUDA
(:mod:`cl_bench.lowrank_kernels`, beside this module) or in torch elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
