"""Triton kernels of MoRA's routing (see :mod:`strategies.mora.routing` for the maths).

Imported only on first CUDA use: importing this module imports Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _select(z, cols, valid, K: tl.constexpr):
    """Boolean mask of the K largest entries of each row of z (ties: lowest column)."""
    work = tl.where(valid, z, float("-inf"))
    selected = work < float("-inf")  # all False, shaped like the tile
    for _ in tl.static_range(K):
        top = tl.max(work, axis=1)
        first = tl.min(tl.where(work == top[:, None], cols[None, :], 1 << 30), axis=1)
        hit = cols[None, :] == first[:, None]
        selected = selected | hit
        work = tl.where(hit, float("-inf"), work)
    return selected


@triton.jit
def _weights(z, norm, cols, valid, inv_tau, K: tl.constexpr):
    """``(selected, w)``: the top-K mask and the softmax of ``z / (norm tau)`` over it (0 elsewhere)."""
    selected = _select(z, cols, valid, K)
    u = tl.where(selected, z / norm[:, None] * inv_tau, float("-inf"))
    e = tl.exp(u - tl.max(u, axis=1)[:, None])
    return selected, e / tl.sum(e, axis=1)[:, None]


@triton.jit
def forward_kernel(
    z_ptr, h_ptr, count_ptr, n_rows, R, inv_tau, threshold,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_R)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < R)
    offsets = rows[:, None] * R + cols[None, :]
    z = tl.load(z_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), 1e-12)
    _, w = _weights(z, norm, cols, valid, inv_tau, K)
    if GATE:
        w = tl.where(z / norm[:, None] >= threshold, w, 0.0)
    tl.store(h_ptr + offsets, (w * z).to(h_ptr.dtype.element_ty), mask=valid)
    count = tl.sum((w != 0.0).to(tl.int32), axis=1)
    tl.store(count_ptr + rows, count, mask=rows < n_rows)


@triton.jit
def backward_kernel(
    z_ptr, g_ptr, dz_ptr, n_rows, R, inv_tau,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_R)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < R)
    offsets = rows[:, None] * R + cols[None, :]
    z = tl.load(z_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    raw_norm = tl.sqrt(tl.sum(z * z, axis=1))
    clamped = raw_norm < 1e-12
    norm = tl.maximum(raw_norm, 1e-12)
    selected, w = _weights(z, norm, cols, valid, inv_tau, K)
    a = tl.where(selected, g * z, 0.0)
    q = w * (a - tl.sum(a * w, axis=1)[:, None])
    c = tl.where(clamped, 0.0, tl.sum(q * z, axis=1) * inv_tau / (norm * norm * norm))
    dz = tl.where(selected, g * w + q * inv_tau / norm[:, None], 0.0) - z * c[:, None]
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=valid)
