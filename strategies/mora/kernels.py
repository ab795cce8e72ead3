"""Triton kernels of MoRA's routing (see :mod:`strategies.mora.routing` for the maths).

Imported only on first CUDA use: importing this module imports Triton.

The selection works on the integer order keys of :mod:`cl_bench.topk_kernels` (shared with the
rank-1 mixtures' kernels; :func:`strategies.mora.routing.order_keys` is their torch twin): the top
K of a row is every entry of z whose key is >= the K-th largest key. The forward finds that key by
integer reductions only and saves it, one integer per row; the backward rebuilds the mask from z
with one compare per entry, without any reduction for the selection.
"""

import triton
import triton.language as tl

from cl_bench.topk_kernels import key_value, order_keys, top_and_kth


@triton.jit
def _weights(z, scale, selected, top_z):
    """The softmax of ``z * scale`` (scale = 1 / (norm tau) > 0, per row) over the selected entries
    of each row, 0 elsewhere. ``top_z``: the largest selected z of each row, so the max of the
    exponents is ``top_z * scale`` exactly (rounding is monotone) without a float reduction; None:
    reduce."""
    u = tl.where(selected, z * scale[:, None], float("-inf"))
    top_u = tl.max(u, axis=1) if top_z is None else top_z * scale
    e = tl.exp(u - top_u[:, None])
    return e * (1.0 / tl.sum(e, axis=1))[:, None]


@triton.jit
def forward_kernel(
    z_ptr, h_ptr, count_ptr, kth_ptr, tail_ptr, active_ptr, tokens_ptr,
    n_rows, R, n_tail, inv_tau, threshold,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GATE: tl.constexpr,
    SELECT: tl.constexpr, KEY64: tl.constexpr, TAIL: tl.constexpr, TOTALS: tl.constexpr,
):  # fmt: skip
    """h = w * z and the non-zero weights per row; with SELECT (K < R) also the K-th largest
    order key per row (the selection, for the backward); with TAIL also h's last ``n_tail``
    columns into a contiguous [n_rows, n_tail] tensor; with TOTALS also adds the non-zero weights
    and the rows to two int64 counters (one atomic add each per program)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_R)
    in_rows = rows < n_rows
    valid = in_rows[:, None] & (cols[None, :] < R)
    offsets = rows[:, None] * R + cols[None, :]
    z_raw = tl.load(z_ptr + offsets, mask=valid, other=0.0)
    z = z_raw.to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), 1e-12)
    if SELECT:
        keys = order_keys(z_raw, cols, valid, KEY64)
        top, kth = top_and_kth(keys, K, KEY64)
        tl.store(kth_ptr + rows, kth, mask=in_rows)
        selected = keys >= kth[:, None]  # padding keys are below any kth of a real row
        w = _weights(z, inv_tau / norm, selected, key_value(top, z_raw, KEY64))
    else:
        w = _weights(z, inv_tau / norm, valid, None)
    if GATE:
        w = tl.where(z / norm[:, None] >= threshold, w, 0.0)
    h = (w * z).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offsets, h, mask=valid)
    if TAIL:
        first = R - n_tail
        tail_offsets = rows[:, None] * n_tail + (cols - first)[None, :]
        tl.store(tail_ptr + tail_offsets, h, mask=valid & (cols >= first)[None, :])
    count = tl.sum((w != 0.0).to(tl.int32), axis=1)
    tl.store(count_ptr + rows, count, mask=in_rows)
    if TOTALS:
        tl.atomic_add(active_ptr, tl.sum(tl.where(in_rows, count, 0).to(tl.int64), axis=0))
        tl.atomic_add(tokens_ptr, tl.sum(in_rows.to(tl.int64), axis=0))


@triton.jit
def backward_kernel(
    z_ptr, g_ptr, kth_ptr, dz_ptr, n_rows, R, inv_tau,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SELECT: tl.constexpr, KEY64: tl.constexpr,
):  # fmt: skip
    """dz from dh in closed form; the selection is the forward's saved K-th key per row (SELECT),
    or every rank."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_R)
    in_rows = rows < n_rows
    valid = in_rows[:, None] & (cols[None, :] < R)
    offsets = rows[:, None] * R + cols[None, :]
    z_raw = tl.load(z_ptr + offsets, mask=valid, other=0.0)
    z = z_raw.to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    raw_norm = tl.sqrt(tl.sum(z * z, axis=1))
    clamped = raw_norm < 1e-12
    norm = tl.maximum(raw_norm, 1e-12)
    scale = inv_tau / norm
    if SELECT:
        keys = order_keys(z_raw, cols, valid, KEY64)
        kth = tl.load(kth_ptr + rows, mask=in_rows, other=0)
        selected = keys >= kth[:, None]
        # the row's largest z is selected: one integer max-reduction (a warp-wide redux for int32)
        w = _weights(z, scale, selected, key_value(tl.max(keys, axis=1), z_raw, KEY64))
    else:
        selected = valid
        w = _weights(z, scale, selected, None)
    a = tl.where(selected, g * z, 0.0)
    q = w * (a - tl.sum(a * w, axis=1)[:, None])
    c = tl.where(clamped, 0.0, tl.sum(q * z, axis=1) * scale / (norm * norm))
    dz = tl.where(selected, g * w + q * scale[:, None], 0.0) - z * c[:, None]
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=valid)
