"""Triton kernels of the rank-1 mixtures' gates: SMoRA's weighted top-k and FlyLoRA's binary top-k
over the r ranks of each token, one kernel forward and one backward per gate.

Imported only on first CUDA use: importing this module imports Triton. The torch side (the
autograd nodes, the launch shape, when the kernels serve) is :mod:`cl_bench.rank_gates`; the
torch reference of each gate stays in its strategy file (``SMoRALinear.gates``/``route``,
``FlyLoRALinear.route``) and is what the CPU runs.

Why: the torch gate is ~15 small elementwise kernels forward (sigmoid, the bias, ``torch.topk``,
a scatter, products, a sum, a division, casts, the counters' ``count_nonzero`` and adds) and ~10
backward, each a full pass over the [tokens, r] scores (25k tokens per layer at batch 128 of a
ViT-B/16). Here each direction is one pass over the tile, in float32 registers.

Maths, per token (row), with the selection S of the k largest scores (the order keys of
:mod:`cl_bench.topk_kernels`: larger first, the lowest rank among equal scores; the scores are
float32, so the keys are int64)::

    SMoRA   s = sigmoid(l) (float32), rank j reads logit j // P   (P = rank_partition)
            v = s + beta;  S = top-k of v;  w = v (include) or s (exclude) on S, 0 elsewhere
            W = sum_S w;   g = (w / W) k;  h = z * g   (g rounded to z's dtype first, as the torch
            code's ``z * g.to(z.dtype)``)
    FlyLoRA score = z + d (or |z + d|);  S = top-k of score;  m = 1 on S, 0 elsewhere;  h = z * m

Backward, the selection fixed (it is piecewise constant: no gradient through it), with dh given::

    SMoRA   dz = dh * g;   dg = dh * z (rounded to z's dtype, as the torch product's gradient)
            dw_j = (k / W) (dg_j - sum_i dg_i g_i / k)  for j in S, 0 off S
            ds_c = sum of dw_j over the P ranks j of logit c;  dl = ds (1 - s) s
            (beta is not trained; include and exclude differ only in w and W)
    FlyLoRA dz = dh * m

The first line of dw is the quotient rule on g_j = k w_j / W: d g_i / d w_j = (k / W)(1[i = j] -
w_i / W), so dw_j = (k / W)(dg_j - sum_i dg_i w_i / W) and w_i / W = g_i / k.

Saved for the backward: the k-th largest key of each row (one int64 per token; none when k = r,
every rank selected), besides the inputs z, l (SMoRA) and the bias. The backward recomputes the
scores with the same float32 operations (bitwise the same) and the selection by one compare per
entry (key >= k-th key), so it needs no reduction for the selection and no [tokens, r] tensor of
the forward.

Counting: every forward adds its selections to the layer's :class:`cl_bench.rank_routing.RankUsage`
counters itself, ``usage[mode] += per-rank counts`` and ``tokens[mode] += rows`` (and ``step +=
counts`` when ``STEP``: a training forward with gradients on), by atomic adds: no extra kernel and
no host sync, so a CUDA graph can replay the step.

Launch shape: a tile is BLOCK_N rows x BLOCK_R columns (r padded to a power of 2),
``cl_bench.rank_gates.TILE`` entries (at r = 64: 16 rows; r = 32: 32 rows); rows and columns
beyond the tensor are masked (padding keys are below every real one). The backward kernels take
one tile per program. A forward program takes TILES consecutive tiles
(``cl_bench.rank_gates.TILES``), adds up its selections per rank in registers and then once to
the counters: r atomic adds per counter and program, and one add of the rows by program 0. With
one tile per program every rank's counter would take one atomic add per tile (~1600 per layer
at 25k tokens, r = 64), all to the same r addresses.
"""

import triton
import triton.language as tl

from cl_bench.topk_kernels import order_keys, top_and_kth


@triton.jit
def _tile(start, n_rows, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rows from ``start`` and the columns of a tile, and their masks."""
    rows = start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_R)
    in_rows = rows < n_rows
    in_cols = cols < R
    return rows, cols, in_rows, in_cols, in_rows[:, None] & in_cols[None, :]


@triton.jit
def _selection(
    scores, cols, valid, rows, in_rows, kth_ptr, K: tl.constexpr, SELECT: tl.constexpr, FORWARD: tl.constexpr
):
    """The top-K mask of float32 ``scores``: the forward finds and saves the K-th largest order key
    per row, the backward reads it back; without SELECT (K = R) every valid entry."""
    if SELECT:
        keys = order_keys(scores, cols, valid, True)
        if FORWARD:
            _, kth = top_and_kth(keys, K, True)
            tl.store(kth_ptr + rows, kth, mask=in_rows)
        else:
            kth = tl.load(kth_ptr + rows, mask=in_rows, other=0)
        # padding keys are below the kth of a real row; a row past the end is all padding
        selected = valid & (keys >= kth[:, None])
    else:
        selected = valid
    return selected


@triton.jit
def _count(counts, n_rows, R, usage_ptr, tokens_ptr, step_ptr, BLOCK_R: tl.constexpr, STEP: tl.constexpr):
    """Add a program's selections per rank (``counts`` [BLOCK_R]) to ``usage`` (and ``step``);
    program 0 adds the rows of the launch to ``tokens``."""
    cols = tl.arange(0, BLOCK_R)
    counts = counts.to(tl.int64)
    tl.atomic_add(usage_ptr + cols, counts, mask=cols < R, sem="relaxed")
    if STEP:
        tl.atomic_add(step_ptr + cols, counts, mask=cols < R, sem="relaxed")
    rows = tl.zeros([], dtype=tl.int64) + n_rows  # n_rows may come as a constexpr (1)
    tl.atomic_add(tokens_ptr, rows, mask=tl.program_id(0) == 0, sem="relaxed")


@triton.jit
def _smora_scores(l_ptr, beta_ptr, rows, cols, in_cols, valid, stride_l, P: tl.constexpr):
    """(s, v) [BLOCK_N, BLOCK_R] in float32: the sigmoid of each rank's logit and s + beta."""
    logits = tl.load(l_ptr + rows[:, None] * stride_l + (cols // P)[None, :], mask=valid, other=0.0)
    s = tl.sigmoid(logits.to(tl.float32))
    beta = tl.load(beta_ptr + cols, mask=in_cols, other=0.0)
    return s, s + beta[None, :]


@triton.jit
def _smora_gates(s, v, selected, K: tl.constexpr, INCLUDE: tl.constexpr):
    """(g, W): the gates ``(w / W) K`` and the row sums W of the selected w (v or s)."""
    w = tl.where(selected, v if INCLUDE else s, 0.0)
    total = tl.sum(w, axis=1)
    return w / total[:, None] * K, total


@triton.jit
def smora_forward_kernel(
    z_ptr, l_ptr, beta_ptr, h_ptr, kth_ptr, usage_ptr, tokens_ptr, step_ptr,
    n_rows, R, stride_z, stride_l,
    K: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    TILES: tl.constexpr, SELECT: tl.constexpr, INCLUDE: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """SMoRA's ``h = z * g`` [n_rows, R] (contiguous, z's dtype) from z (row stride ``stride_z``)
    and the logits (``stride_l``); with SELECT (K < R) the K-th largest key per row into
    ``kth``; the counters (module docstring). A program takes TILES consecutive tiles."""
    counts = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.int32)  # summed over the rows at the end
    for t in range(TILES):
        start = (tl.program_id(0) * TILES + t) * BLOCK_N
        rows, cols, in_rows, in_cols, valid = _tile(start, n_rows, R, BLOCK_N, BLOCK_R)
        s, v = _smora_scores(l_ptr, beta_ptr, rows, cols, in_cols, valid, stride_l, P)
        selected = _selection(v, cols, valid, rows, in_rows, kth_ptr, K, SELECT, True)
        g, _ = _smora_gates(s, v, selected, K, INCLUDE)
        z_raw = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=valid, other=0.0)
        h = z_raw.to(tl.float32) * g.to(z_raw.dtype).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * R + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=valid)
        counts += selected.to(tl.int32)
    _count(tl.sum(counts, axis=0), n_rows, R, usage_ptr, tokens_ptr, step_ptr, BLOCK_R, STEP)


@triton.jit
def smora_backward_kernel(
    z_ptr, l_ptr, beta_ptr, kth_ptr, dh_ptr, dz_ptr, dl_ptr,
    n_rows, R, stride_z, stride_l, stride_dh,
    K: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr, SELECT: tl.constexpr, INCLUDE: tl.constexpr,
):  # fmt: skip
    """SMoRA's dz [n_rows, R] and dl [n_rows, R / P] (contiguous, in z's and l's dtypes) from dh,
    in closed form (module docstring). BLOCK_L = BLOCK_R / P (P a power of 2): the columns of a
    tile of logits, whose P ranks are summed by a reshape."""
    rows, cols, in_rows, in_cols, valid = _tile(tl.program_id(0) * BLOCK_N, n_rows, R, BLOCK_N, BLOCK_R)
    s, v = _smora_scores(l_ptr, beta_ptr, rows, cols, in_cols, valid, stride_l, P)
    selected = _selection(v, cols, valid, rows, in_rows, kth_ptr, K, SELECT, False)
    g, total = _smora_gates(s, v, selected, K, INCLUDE)
    z_raw = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=valid, other=0.0)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    dz = dh * g.to(z_raw.dtype).to(tl.float32)
    tl.store(dz_ptr + rows[:, None] * R + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)
    dg = (dh * z_raw.to(tl.float32)).to(z_raw.dtype).to(tl.float32)
    t = tl.sum(dg * g, axis=1)
    dw = tl.where(selected, (K / total)[:, None] * (dg - (t / K)[:, None]), 0.0)
    if P == 1:
        ds = dw
        s_l = s
        lcols = cols
        l_valid = valid
    else:
        ds = tl.sum(tl.reshape(dw, [BLOCK_N, BLOCK_L, P]), axis=2)
        lcols = tl.arange(0, BLOCK_L)
        l_valid = in_rows[:, None] & (lcols < R // P)[None, :]
        logits = tl.load(l_ptr + rows[:, None] * stride_l + lcols[None, :], mask=l_valid, other=0.0)
        s_l = tl.sigmoid(logits.to(tl.float32))
    dl = ds * (1.0 - s_l) * s_l
    tl.store(dl_ptr + rows[:, None] * (R // P) + lcols[None, :], dl.to(dl_ptr.dtype.element_ty), mask=l_valid)


@triton.jit
def _flylora_scores(z_raw, d_ptr, cols, in_cols, ABS: tl.constexpr):
    """FlyLoRA's float32 scores ``z + d`` (or their magnitude)."""
    score = z_raw.to(tl.float32) + tl.load(d_ptr + cols, mask=in_cols, other=0.0)[None, :]
    if ABS:
        score = tl.abs(score)
    return score


@triton.jit
def flylora_forward_kernel(
    z_ptr, d_ptr, h_ptr, kth_ptr, usage_ptr, tokens_ptr, step_ptr,
    n_rows, R, stride_z,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    TILES: tl.constexpr, SELECT: tl.constexpr, ABS: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """FlyLoRA's ``h = z * m`` [n_rows, R] (contiguous, z's dtype); with SELECT (K < R) the K-th
    largest key per row into ``kth``; the counters (module docstring). A program takes TILES
    consecutive tiles."""
    counts = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.int32)  # summed over the rows at the end
    for t in range(TILES):
        start = (tl.program_id(0) * TILES + t) * BLOCK_N
        rows, cols, in_rows, in_cols, valid = _tile(start, n_rows, R, BLOCK_N, BLOCK_R)
        z_raw = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=valid, other=0.0)
        score = _flylora_scores(z_raw, d_ptr, cols, in_cols, ABS)
        selected = _selection(score, cols, valid, rows, in_rows, kth_ptr, K, SELECT, True)
        h = z_raw.to(tl.float32) * selected.to(tl.float32)  # a product, as the torch code's z * m
        tl.store(h_ptr + rows[:, None] * R + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=valid)
        counts += selected.to(tl.int32)
    _count(tl.sum(counts, axis=0), n_rows, R, usage_ptr, tokens_ptr, step_ptr, BLOCK_R, STEP)


@triton.jit
def flylora_backward_kernel(
    z_ptr, d_ptr, kth_ptr, dh_ptr, dz_ptr,
    n_rows, R, stride_z, stride_dh,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SELECT: tl.constexpr, ABS: tl.constexpr,
):  # fmt: skip
    """FlyLoRA's ``dz = dh * m`` [n_rows, R] (contiguous, z's dtype), the mask rebuilt from z, d
    and the forward's K-th key per row."""
    rows, cols, in_rows, in_cols, valid = _tile(tl.program_id(0) * BLOCK_N, n_rows, R, BLOCK_N, BLOCK_R)
    z_raw = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=valid, other=0.0)
    score = _flylora_scores(z_raw, d_ptr, cols, in_cols, ABS)
    selected = _selection(score, cols, valid, rows, in_rows, kth_ptr, K, SELECT, False)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=valid, other=0.0)
    dz = dh.to(tl.float32) * selected.to(tl.float32)
    tl.store(dz_ptr + rows[:, None] * R + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)
