"""Triton helpers of a per-row top-k on integer order keys, shared by the routing kernels of MoRA
(:mod:`strategies.mora.kernels`) and of the rank-1 mixtures SMoRA and FlyLoRA
(:mod:`cl_bench.rank_kernels`).

Imported only on first CUDA use: importing this module imports Triton.

The selection works on integer order keys (:func:`strategies.mora.routing.order_keys` is the torch
twin of :func:`order_keys`): one key per entry, unique in its row, whose integer order is the
selection's order (larger value first, the lowest column among equal values). The top K of a row
is then every entry whose key is >= the K-th largest key: a forward finds that key by integer
reductions only (one per round, below) and saves it, one integer per row; a backward rebuilds the
mask from the scores with one compare per entry, without any reduction for the selection.

Rounds: after the largest key (a max-reduction), each round finds the largest key below the last
one, ``next = last - 1 - min_j (last - 1 - key_j)``, the differences taken as unsigned integers:
keys at or above ``last`` give "negative" differences, i.e. huge unsigned ones, which the min
skips. That is one add per entry (``~key_j`` is precomputed) and one unsigned min-reduction per
round (a single warp-wide ``redux`` for 32-bit keys), instead of a float max plus an index min.
It needs every difference to fit in the signed range, i.e. all keys of a row, padding included,
within 2**31 of each other: int32 keys of 16-bit scores lie in [-(2**30) - 1, 2**30) (16 bits of
value times 2**15 columns, hence at most 32768 columns), int64 keys of float32 scores within
+-2**46.
"""

import triton
import triton.language as tl


@triton.jit
def order_keys(z_raw, cols, valid, KEY64: tl.constexpr):
    """The order keys of a tile of scores in their own dtype: ``value * 2**15 + (32767 - col)``.

    ``value`` is the sign-magnitude bit pattern of the score read as a two's-complement integer
    (monotone in the float value), with -0.0 mapped to +0.0 so that the two tie as in a float
    compare. 16-bit scores (bf16/fp16) give int32 keys in [-(2**30), 2**30), float32 scores int64
    keys (KEY64). Padding entries get a key below every real one, so they are never selected
    (K < R).
    """
    if KEY64:
        bits = z_raw.to(tl.int32, bitcast=True).to(tl.int64)
        value = tl.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
        padding = -(2**46) - 1
    else:
        bits = z_raw.to(tl.int16, bitcast=True).to(tl.int32)
        value = tl.where(bits < 0, -(bits & 0x7FFF), bits)
        padding = -(2**30) - 1
    keys = value * 32768 + (32767 - cols)[None, :]
    return tl.where(valid, keys, padding)


@triton.jit
def key_value(key, z_raw, KEY64: tl.constexpr):
    """The value (as float32) of the entry of the scores (tile ``z_raw``, for its dtype) whose
    order key is ``key`` (one per row): inverts :func:`order_keys`."""
    value = key >> 15
    if KEY64:
        bits = tl.where(value < 0, (-value) | 0x80000000, value).to(tl.int32)
    else:
        bits = tl.where(value < 0, (-value) | 0x8000, value).to(tl.int16)
    return bits.to(z_raw.dtype, bitcast=True).to(tl.float32)


@triton.jit
def top_and_kth(keys, K: tl.constexpr, KEY64: tl.constexpr):
    """The largest and the K-th largest key of each row: one max-reduction, then K - 1 rounds of
    one unsigned min-reduction (module docstring)."""
    top = tl.max(keys, axis=1)
    unsigned: tl.constexpr = tl.uint64 if KEY64 else tl.uint32
    below = (~keys).to(unsigned, bitcast=True)  # -1 - key_j
    last = top.to(unsigned, bitcast=True)
    for _ in tl.static_range(K - 1):
        last = last - 1 - tl.min(below + last[:, None], axis=1)
    return top, last.to(keys.dtype, bitcast=True)
