"""Triton kernel of the fused low-rank layer's backward: every factor gradient of one layer at once.

Imported only on first CUDA use (importing this module imports Triton). The maths and the torch
twin are in :func:`cl_bench.lowrank.factor_grads`. Per adapted layer the torch code runs four to
seven small elementwise kernels and a reduction on the factors (casts to float32, the scaling, the
row scale, the gate, the rank mask, the gate's gradient); 144 layers make that a thousand launches
per step whose cost, even replayed from a CUDA graph, is mostly the gap between them. Here one
launch computes, in float32 and in the torch code's order of operations:

- ``grad_A = GA * m`` (``GA``: the layer's rows of the A-gradient GEMM, in the compute dtype);
- ``grad_B = ((((P * c) * s) * g) * m)`` (``P``: the layer's block of ``dL/dy^T z``);
- ``grad_g = sum_o (((P * c) * s) * B)_o * m``, only when the gate trains.

Programs ``[0, n_a)`` each write a tile of columns of grad_A, programs ``[n_a, n_a + n_b)`` a tile of
rows of grad_B, and the last one (with ``GATE_GRAD``) sums the gate's gradient over all rows by
itself, so the result does not depend on how the rows are split (no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def _scaled_block(
    P, p_stride_o, p_stride_r, scale_ptr, rows, rows_ok, ranks, ok, scaling, HAS_SCALE: tl.constexpr
):
    """``(P * c) * s`` on a tile of rows, in float32 (c = 1 without ``HAS_SCALE``); 0 outside ``ok``."""
    t = tl.load(P + rows[:, None] * p_stride_o + ranks[None, :] * p_stride_r, mask=ok, other=0.0)
    t = t.to(tl.float32)
    if HAS_SCALE:
        t = t * tl.load(scale_ptr + rows, mask=rows_ok, other=0.0)[:, None]
    return t * scaling


@triton.jit
def factor_grads_kernel(
    P, p_stride_o, p_stride_r,
    GA, ga_stride_r, ga_stride_i,
    scale_ptr, gate_ptr, B, b_stride_o, b_stride_r, mask_ptr,
    out_A, out_B, out_g,
    d_out, d_in, r, scaling, n_a, n_b,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_GATE: tl.constexpr, GATE_GRAD: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    if pid < n_a:  # a tile of columns of grad_A
        cols = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = rank_ok[:, None] & (cols < d_in)[None, :]
        ga = tl.load(GA + ranks[:, None] * ga_stride_r + cols[None, :] * ga_stride_i, mask=ok, other=0.0)
        ga = ga.to(tl.float32)
        if HAS_MASK:
            ga = ga * tl.load(mask_ptr + ranks, mask=rank_ok, other=0.0)[:, None]
        tl.store(out_A + ranks[:, None] * d_in + cols[None, :], ga, mask=ok)
    elif pid < n_a + n_b:  # a tile of rows of grad_B
        rows = (pid - n_a) * BLOCK_O + tl.arange(0, BLOCK_O)
        rows_ok = rows < d_out
        ok = rows_ok[:, None] & rank_ok[None, :]
        t = _scaled_block(P, p_stride_o, p_stride_r, scale_ptr, rows, rows_ok, ranks, ok, scaling, HAS_SCALE)
        if HAS_GATE:
            t = t * tl.load(gate_ptr + ranks, mask=rank_ok, other=0.0)[None, :]
        if HAS_MASK:
            t = t * tl.load(mask_ptr + ranks, mask=rank_ok, other=0.0)[None, :]
        tl.store(out_B + rows[:, None] * r + ranks[None, :], t, mask=ok)
    elif GATE_GRAD:  # the gate's gradient: one program sums over every row
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, d_out, BLOCK_O):
            rows = start + tl.arange(0, BLOCK_O)
            rows_ok = rows < d_out
            ok = rows_ok[:, None] & rank_ok[None, :]
            t = _scaled_block(
                P, p_stride_o, p_stride_r, scale_ptr, rows, rows_ok, ranks, ok, scaling, HAS_SCALE
            )
            b = tl.load(B + rows[:, None] * b_stride_o + ranks[None, :] * b_stride_r, mask=ok, other=0.0)
            acc += tl.sum(t * b, axis=0)
        if HAS_MASK:
            acc = acc * tl.load(mask_ptr + ranks, mask=rank_ok, other=0.0)
        tl.store(out_g + ranks, acc, mask=rank_ok)
