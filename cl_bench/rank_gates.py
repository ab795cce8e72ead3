"""The gates of the rank-1 mixtures (SMoRA, FlyLoRA) as single autograd nodes over Triton kernels.

``SMoRALinear.route`` and ``FlyLoRALinear.route`` (strategies/smora.py, strategies/flylora.py)
call :func:`smora_gate` / :func:`flylora_gate` where :func:`smora_serves` / :func:`flylora_serves`
say the kernels apply (CUDA, by default), and their torch code otherwise (the CPU, whose numbers
the regression goldens pin; the torch code is also the reference the tests compare with). Each
gate is then one :class:`torch.autograd.Function`: one kernel forward that writes h, saves the
k-th order key per token and adds the selections to the layer's :class:`RankUsage` counters, and
one kernel backward in closed form (maths, saved state and launch shape:
:mod:`cl_bench.rank_kernels`). The fused path of :mod:`cl_bench.routed`, which differentiates
``route`` with ``torch.autograd.grad``, then reaches this backward unchanged.

What differs from the torch code: the order of the float32 sums (W, the gate gradient's row sum),
the sigmoid's and the division's last bits, and ties in the top-k (equal scores; here the lowest
rank first, ``torch.topk``'s choice there). Fixed shapes, no host sync: a CUDA graph can replay
a step. Only one adapter per layer (FlyLoRA's mean of several merged branches stays on torch),
ranks up to 32768, SMoRA's ``rank_partition`` a power of 2, float32/bf16/fp16 z and logits with a
float32 bias; anything else takes the torch code.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import Any

import torch

from cl_bench.rank_routing import RankUsage

KERNELS: bool | None = None
"""Whether the gates run as kernels: None (default) on CUDA when Triton imports; True also on the
CPU (the tests, under Triton's interpreter, ``TRITON_INTERPRET=1``); False never."""

# Launch shape (cl_bench/rank_kernels.py): tiles of BLOCK_N rows x BLOCK_R columns (r padded to a
# power of 2) of TILE entries over NUM_WARPS warps, 8 entries per thread; a forward program takes
# TILES consecutive tiles (fewer counter atomics), a backward program one. Compiled offline for
# sm_90 (Triton 3.8's ptxas, pointers, row strides and r specialised as multiples of 16 as the
# launcher does for r = 64 / 32, k = 8; bf16 | fp32 z) a row lies within one warp (8 threads of 8
# bf16 columns) and the registers are: SMoRA forward 80 | 72, backward 43 | 48; FlyLoRA forward
# 72 | 71, backward 30 | 32; no spills. TILE = 2048 took up to 128. Free to change (powers of 2);
# not yet timed on a GPU. An r or a row stride that is not a multiple of 16 gives unvectorised
# loads and a row spread over two warps (slower reductions), still correct.
TILE = 1024
NUM_WARPS = 4
TILES = 4
MAX_RANKS = 32768  # the order keys hold the column in 15 bits

FLOATS = (torch.float32, torch.bfloat16, torch.float16)

Targets = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # RankUsage.targets


@functools.cache
def _kernels() -> ModuleType:
    """:mod:`cl_bench.rank_kernels`, imported (with Triton) on first use."""
    from cl_bench import rank_kernels

    return rank_kernels


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the kernels may serve tensors on ``t``'s device (:data:`KERNELS`, Triton present);
    the inputs' other conditions are :func:`smora_serves` and :func:`flylora_serves`."""
    if KERNELS is False or (KERNELS is None and not t.is_cuda):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


def _fits(z: torch.Tensor, bias: torch.Tensor) -> bool:
    r = z.shape[-1]
    return (
        z.dtype in FLOATS
        and 1 <= r <= MAX_RANKS
        and bias.dtype == torch.float32
        and bias.shape == (r,)
        and bias.device == z.device
    )


def smora_serves(z: torch.Tensor, logits: torch.Tensor, beta: torch.Tensor, partition: int) -> bool:
    """Whether :func:`smora_gate` takes these inputs (module docstring)."""
    r = z.shape[-1]
    return (
        _fits(z, beta)
        and logits.dtype in FLOATS
        and logits.device == z.device
        and partition >= 1
        and partition & (partition - 1) == 0
        and r % partition == 0
        and logits.shape == (*z.shape[:-1], r // partition)
        and kernels_enabled(z)
    )


def flylora_serves(z: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether :func:`flylora_gate` takes these inputs (module docstring)."""
    return _fits(z, d) and kernels_enabled(z)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, columns] with unit column stride (a view where possible: the kernels take
    the row stride, so the column slices of the fused path's ``[z, l]`` are read in place)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _forward_buffers(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A gate forward's rows of ``z`` [N, r] (:func:`_rows`), its output h [N, r] in z's dtype and
    the k-th order key per row it saves for the backward (None when k = r: every rank selected)."""
    z2 = _rows(z)
    n, r = z2.shape
    h = torch.empty((n, r), dtype=z.dtype, device=z.device)
    return z2, h, (torch.empty(n, dtype=torch.int64, device=z.device) if k < r else None)


def _launch(n: int, r: int, tiles: int = 1) -> tuple[int, int, int]:
    """(grid, BLOCK_N, BLOCK_R) of ``n`` rows of ``r`` ranks, ``tiles`` tiles per program."""
    import triton

    block_r = triton.next_power_of_2(r)
    block_n = max(1, TILE // block_r)
    return triton.cdiv(n, block_n * tiles), block_n, block_r


def _device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _counters(targets: Targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counters' pointer arguments: ``usage`` stands in for an absent step (STEP off)."""
    usage, tokens, step = targets
    return usage, tokens, usage if step is None else step


class _SMoRAGate(torch.autograd.Function):
    """``h = z * g(l)``: SMoRA's gate as one node (:func:`smora_gate`)."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        logits: torch.Tensor,
        beta: torch.Tensor,
        k: int,
        partition: int,
        include: bool,
        targets: Targets,
    ) -> torch.Tensor:
        kernels = _kernels()
        z2, h, kth = _forward_buffers(z, k)
        l2 = _rows(logits)
        n, r = z2.shape
        if n:
            grid, block_n, block_r = _launch(n, r, TILES)
            with _device(z):
                kernels.smora_forward_kernel[(grid,)](
                    z2, l2, beta, h, h if kth is None else kth, *_counters(targets),
                    n, r, z2.stride(0), l2.stride(0),
                    K=k, P=partition, BLOCK_N=block_n, BLOCK_R=block_r, TILES=TILES,
                    SELECT=kth is not None, INCLUDE=include, STEP=targets[2] is not None,
                    num_warps=NUM_WARPS,
                )  # fmt: skip
        ctx.save_for_backward(z2, l2, beta, kth)
        ctx.meta = (z.shape, logits.shape, k, partition, include)
        return h.view(z.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernels = _kernels()
        z2, l2, beta, kth = ctx.saved_tensors
        z_shape, l_shape, k, partition, include = ctx.meta
        n, r = z2.shape
        dh = _rows(grad_h)
        dz = torch.empty((n, r), dtype=z2.dtype, device=z2.device)
        dl = torch.empty((n, r // partition), dtype=l2.dtype, device=l2.device)
        if n:
            grid, block_n, block_r = _launch(n, r)
            with _device(z2):
                kernels.smora_backward_kernel[(grid,)](
                    z2, l2, beta, dz if kth is None else kth, dh, dz, dl,
                    n, r, z2.stride(0), l2.stride(0), dh.stride(0),
                    K=k, P=partition, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_L=block_r // partition,
                    SELECT=kth is not None, INCLUDE=include, num_warps=NUM_WARPS,
                )  # fmt: skip
        return dz.view(z_shape), dl.view(l_shape), None, None, None, None, None


class _FlyLoRAGate(torch.autograd.Function):
    """``h = z * m(z + d)``: FlyLoRA's gate as one node (:func:`flylora_gate`)."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, d: torch.Tensor, k: int, signed: bool, targets: Targets
    ) -> torch.Tensor:
        kernels = _kernels()
        z2, h, kth = _forward_buffers(z, k)
        n, r = z2.shape
        if n:
            grid, block_n, block_r = _launch(n, r, TILES)
            with _device(z):
                kernels.flylora_forward_kernel[(grid,)](
                    z2, d, h, h if kth is None else kth, *_counters(targets),
                    n, r, z2.stride(0),
                    K=k, BLOCK_N=block_n, BLOCK_R=block_r, TILES=TILES,
                    SELECT=kth is not None, ABS=not signed, STEP=targets[2] is not None,
                    num_warps=NUM_WARPS,
                )  # fmt: skip
        ctx.save_for_backward(z2, d, kth)
        ctx.meta = (z.shape, k, signed)
        return h.view(z.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernels = _kernels()
        z2, d, kth = ctx.saved_tensors
        z_shape, k, signed = ctx.meta
        n, r = z2.shape
        dh = _rows(grad_h)
        dz = torch.empty((n, r), dtype=z2.dtype, device=z2.device)
        if n:
            grid, block_n, block_r = _launch(n, r)
            with _device(z2):
                kernels.flylora_backward_kernel[(grid,)](
                    z2, d, dz if kth is None else kth, dh, dz,
                    n, r, z2.stride(0), dh.stride(0),
                    K=k, BLOCK_N=block_n, BLOCK_R=block_r,
                    SELECT=kth is not None, ABS=not signed, num_warps=NUM_WARPS,
                )  # fmt: skip
        return dz.view(z_shape), None, None, None, None


def smora_gate(
    z: torch.Tensor,
    logits: torch.Tensor,
    beta: torch.Tensor,
    k: int,
    partition: int,
    include: bool,
    usage: RankUsage,
    training: bool,
) -> torch.Tensor:
    """SMoRA's gated ranks ``h = z * g`` [..., r] in z's dtype (``SMoRALinear.route``), the
    selections added to ``usage`` (:meth:`RankUsage.record`'s rule). ``z`` [..., r], ``logits``
    [..., r / P] (P = ``partition``), ``beta`` [r] float32 (not differentiated); ``include``: the
    gates weigh s + beta, else s. Differentiable in z and the logits (the backward kernel)."""
    return _SMoRAGate.apply(z, logits, beta, k, partition, include, usage.targets(training))


def flylora_gate(
    z: torch.Tensor, d: torch.Tensor, k: int, signed: bool, usage: RankUsage, training: bool
) -> torch.Tensor:
    """FlyLoRA's masked ranks ``h = z * m`` [..., r] in z's dtype, m the top-k of ``z + d`` (or of
    ``|z + d|`` unless ``signed``), the selections added to ``usage``. ``d`` [r] float32 (not
    differentiated). Differentiable in z (the backward kernel)."""
    return _FlyLoRAGate.apply(z, d, k, signed, usage.targets(training))
