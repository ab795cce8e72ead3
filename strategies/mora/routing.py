"""MoRA's self-activated routing of rank-1 experts: ``h = w * z`` from the key matches ``z``.

For one token with key matches z [R] (``z_i = A_i x``)::

    n   = max(||z||_2, 1e-12)              s = z / n          (signed self-activation)
    S   = the k largest entries of s (equivalently of z: n > 0), k = min(k, R)
    w_i = softmax_{i in S}(s_i / tau), 0 outside S
    w_i = w_i * 1[s_i >= delta]            eval only, delta > 0, no renormalisation
    h_i = w_i z_i                          (the layer then adds B h to its output)

Ties in the top k: among equal values the lowest index wins, and -0.0 equals +0.0 (a float
compare). A NaN in z (a diverged run) ranks above +inf in the reference and in the kernels, except
that the kernels rank a NaN with its sign bit set below -inf.

:func:`route` returns the dense ``h`` [..., R], the number of non-zero weights per token, the
selection S in a compact form (what :func:`route_backward` takes, so the backward never selects
again) and, on request, h's last columns as a contiguous tensor (the layer keeps them for its B
gradient). Two implementations compute the same function:

- the reference (any device): a stable descending sort of z (the lowest index first among ties),
  a softmax over the k first entries and one scatter; autograd differentiates it. Its selection
  is the [..., k] index tensor of the top k;
- on CUDA, two Triton kernels, one pass each over z (:mod:`strategies.mora.kernels`). Every entry
  gets an integer order key, unique in its row and ordered as the selection (:func:`order_keys`),
  so the top k is every entry whose key is >= the k-th largest key. The forward finds that key by
  k - 1 rounds of one integer max-reduction and writes h, the counts and the k-th key per row (the
  selection: one integer per token); the backward rebuilds S from z and that key (one compare
  per entry) and writes the gradient of z in closed form (below). On an H200 ``torch.topk`` alone
  took ~0.1 ms per layer for 25k tokens x 160 ranks (~16 ms of a ViT-B/16 training step at batch
  128); the kernels replace the top-k, softmax, scatter and their backward (~15 kernels per
  layer).

With k >= R every rank is selected: no sort, no keys, and the selection is None.

Gradient of ``h`` with the selection S fixed (g = dL/dh, a_i = g_i z_i, q = softmax-backward)::

    q_i  = w_i (a_i - sum_{l in S} a_l w_l)                      for i in S
    dz_j = 1[j in S] (g_j w_j + q_j / (tau n)) - z_j (sum_{l in S} q_l z_l) / (tau n^3)

(the second term is the derivative of the norm; at the 1e-12 clamp it is 0, as autograd's).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

NORM_EPS = 1e-12  # F.normalize's default, as the official X-TAIL layer

# Launch shape of both kernels: a program holds a tile of BLOCK_N rows x BLOCK_R columns (R padded
# to a power of 2), TILE entries, over NUM_WARPS warps. Triton lays a 256-column row over one warp
# (8 columns per thread), so at R = 160 (BLOCK_R = 256, BLOCK_N = 8) each thread holds 2 rows, whose
# dependent chains of reductions (k rounds, each an in-thread min and one warp-wide ``redux``)
# interleave. ptxas (sm_90a, compiled offline from this code) then allocates 63-80 registers for
# bf16/fp16 z (fp32: 111-166) without spills: ~7 resident programs (28 warps) per SM to hide the
# latency. The former 4096 entries on 4 warps (4 rows per thread) took 128-168 registers for bf16
# (the backward with stack use) and 164-255 for fp32. Larger R gets fewer rows per program (R =
# 1024: 2), smaller R more (R = 40: 32). Both constants are free to change (powers of 2).
TILE = 2048
NUM_WARPS = 4
MAX_RANKS = 32768  # the order keys hold the column in 15 bits


class Routed(NamedTuple):
    """What :func:`route` returns."""

    h: torch.Tensor  # [..., R], z's dtype
    counts: torch.Tensor  # [...] int32: the non-zero routing weights per token
    selection: torch.Tensor | None  # the top k, for route_backward (None: every rank)
    tail: torch.Tensor | None  # h[..., -tail:], contiguous (None unless asked for)


def order_keys(z: torch.Tensor) -> torch.Tensor:
    """Integer order keys of a bf16/fp16 (int32 keys) or float32 (int64 keys) z, as the kernels
    compute them: ``value * 2**15 + (32767 - column)``, where ``value`` is z's sign-magnitude bit
    pattern read as a two's-complement integer (monotone in the float value; -0.0 is mapped to
    +0.0). Unique in a row; a larger key is a larger value, or an equal value at a lower column."""
    if z.dtype in (torch.bfloat16, torch.float16):
        bits, magnitude = z.view(torch.int16).to(torch.int32), 0x7FFF
    elif z.dtype == torch.float32:
        bits, magnitude = z.view(torch.int32).to(torch.int64), 0x7FFFFFFF
    else:
        raise TypeError(f"order keys are defined for bf16, fp16 and float32, not {z.dtype}")
    if z.shape[-1] > MAX_RANKS:
        raise ValueError(f"order keys hold at most {MAX_RANKS} columns, got {z.shape[-1]}")
    value = torch.where(bits < 0, -(bits & magnitude), bits)
    cols = torch.arange(z.shape[-1], device=z.device, dtype=bits.dtype)
    return value * 32768 + (32767 - cols)


def select(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference top k of each row, ``(values, indices)`` [..., k] in descending order, the
    lowest index first among equal values; None when k >= R (every rank)."""
    if k >= z.shape[-1]:
        return None
    values, indices = torch.sort(z, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def selection_mask(z: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
    """The boolean mask [..., R] of a selection of either implementation: the reference's top-k
    indices [..., k], the kernels' k-th largest order key per row [...], or None (every rank)."""
    if selection is None:
        return torch.ones_like(z, dtype=torch.bool)
    if selection.dim() == z.dim():
        return torch.zeros_like(z, dtype=torch.bool).scatter(-1, selection, True)
    return order_keys(z) >= selection.unsqueeze(-1)


def self_activation(
    z: torch.Tensor, k: int, tau: float, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference routing: ``(w_sel, z_sel, idx)``, each [..., min(k, R)].

    The top k is taken on z itself (dividing by the positive norm keeps the order), so only k
    entries of s are ever formed; ``idx`` is None when every rank is selected (k >= R). Norm,
    softmax and ``z_sel`` are in float32 at least (a bf16 z is read once by the norm and the
    sort, never copied whole to float32).
    """
    route_dtype = torch.promote_types(z.dtype, torch.float32)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=route_dtype).clamp_min(NORM_EPS)
    top = select(z, k)
    z_sel, idx = (z, None) if top is None else top
    z_sel = z_sel.to(route_dtype)
    s_sel = z_sel / norm
    w_sel = torch.softmax(s_sel / tau, dim=-1)
    if threshold > 0:
        w_sel = torch.where(s_sel >= threshold, w_sel, torch.zeros_like(w_sel))
    return w_sel, z_sel, idx


Totals = tuple[torch.Tensor, torch.Tensor]  # int64 device scalars: non-zero weights, tokens


def _route_torch(
    z: torch.Tensor, k: int, tau: float, threshold: float, tail: int, totals: Totals | None = None
) -> Routed:
    w_sel, z_sel, idx = self_activation(z, k, tau, threshold)
    h = (w_sel * z_sel).to(z.dtype)
    if idx is not None:
        h = torch.zeros_like(z).scatter(-1, idx, h)
    counts = torch.count_nonzero(w_sel, dim=-1).to(torch.int32)
    if totals is not None:
        totals[0].add_(counts.sum())
        totals[1].add_(counts.numel())
    return Routed(h, counts, idx, h[..., z.shape[-1] - tail :].contiguous() if tail else None)


def route_reference(
    z: torch.Tensor, k: int, tau: float, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, counts)``: dense ``h = w * z`` in z's dtype and the non-zero weights per token (int32)."""
    routed = _route_torch(z, k, tau, threshold, 0)
    return routed.h, routed.counts


def dense_weights(z: torch.Tensor, k: int, tau: float, threshold: float = 0.0) -> torch.Tensor:
    """The routing weights w [..., R] themselves (zeros off the top-k; for inspection and tests)."""
    w_sel, _, idx = self_activation(z, k, tau, threshold)
    return w_sel if idx is None else torch.zeros_like(z, dtype=w_sel.dtype).scatter(-1, idx, w_sel)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The Triton kernels, imported (with Triton) on first CUDA use."""
    from strategies.mora import kernels

    return kernels.forward_kernel, kernels.backward_kernel


def _launch_shape(n_rows: int, R: int) -> tuple[int, int, int]:
    import triton

    block_r = triton.next_power_of_2(R)
    block_n = max(1, TILE // block_r)
    return triton.cdiv(n_rows, block_n), block_n, block_r


def _route_triton(
    z: torch.Tensor, k: int, tau: float, threshold: float, tail: int = 0, totals: Totals | None = None
) -> Routed:
    forward_kernel, _ = _kernels()
    R = z.shape[-1]
    z2 = z.reshape(-1, R).contiguous()
    n = z2.shape[0]
    h = torch.empty_like(z2)
    counts = torch.empty(n, dtype=torch.int32, device=z.device)
    key64 = z.dtype == torch.float32
    selecting = k < R
    kth = torch.empty(n, dtype=torch.int64 if key64 else torch.int32, device=z.device) if selecting else None
    h_tail = torch.empty(n, tail, dtype=z.dtype, device=z.device) if tail else None
    grid, block_n, block_r = _launch_shape(n, R)
    active, tokens = (counts, counts) if totals is None else totals
    forward_kernel[(grid,)](
        z2, h, counts, counts if kth is None else kth, h if h_tail is None else h_tail, active, tokens,
        n, R, tail, 1.0 / tau, threshold,
        K=min(k, R), BLOCK_N=block_n, BLOCK_R=block_r, GATE=threshold > 0,
        SELECT=selecting, KEY64=key64, TAIL=h_tail is not None, TOTALS=totals is not None,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    batch = z.shape[:-1]
    return Routed(
        h.view(z.shape),
        counts.view(batch),
        None if kth is None else kth.view(batch),
        None if h_tail is None else h_tail.view(*batch, tail),
    )


def _route_backward_triton(
    z: torch.Tensor, grad_h: torch.Tensor, selection: torch.Tensor | None, tau: float
) -> torch.Tensor:
    _, backward_kernel = _kernels()
    R = z.shape[-1]
    key_dtype = torch.int64 if z.dtype == torch.float32 else torch.int32
    if selection is not None and (selection.shape != z.shape[:-1] or selection.dtype != key_dtype):
        raise ValueError(
            f"the fused routing backward takes the k-th order key per token ({key_dtype}, "
            f"{tuple(z.shape[:-1])}) of the fused forward, got {selection.dtype} {tuple(selection.shape)}"
        )
    z2 = z.reshape(-1, R).contiguous()
    g2 = grad_h.reshape(-1, R).contiguous()
    dz = torch.empty_like(z2)
    grid, block_n, block_r = _launch_shape(z2.shape[0], R)
    backward_kernel[(grid,)](
        z2, g2, dz if selection is None else selection.reshape(-1).contiguous(), dz,
        z2.shape[0], R, 1.0 / tau,
        BLOCK_N=block_n, BLOCK_R=block_r, SELECT=selection is not None,
        KEY64=key_dtype == torch.int64, num_warps=NUM_WARPS,
    )  # fmt: skip
    return dz.view(z.shape)


def use_triton(z: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA tensors of a float dtype, when Triton imports."""
    if not z.is_cuda or z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if z.shape[-1] > MAX_RANKS:
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


@torch.no_grad()
def route(
    z: torch.Tensor,
    k: int,
    tau: float,
    threshold: float = 0.0,
    *,
    fused: bool = True,
    tail: int = 0,
    totals: Totals | None = None,
) -> Routed:
    """``(h, counts, selection, tail)``: ``h`` and ``counts`` of :func:`route_reference`, the
    top-k selection for :func:`route_backward` (taken before the eval gate) and, with ``tail >
    0``, ``h[..., -tail:]`` contiguous. ``totals``: two int64 scalars on z's device to which the
    sum of ``counts`` and the number of tokens are added (by the kernel itself: no extra kernels).
    Without autograd (the layer differentiates it with :func:`route_backward`); by the Triton
    kernel where it applies, unless ``fused=False``."""
    if not 0 <= tail <= z.shape[-1]:
        raise ValueError(f"tail must be in [0, {z.shape[-1]}], got {tail}")
    if totals is not None and any(t.dtype != torch.int64 or t.numel() != 1 for t in totals):
        raise ValueError("totals must be two int64 scalars")
    if fused and use_triton(z):
        return _route_triton(z, k, tau, threshold, tail, totals)
    return _route_torch(z, k, tau, threshold, tail, totals)


def route_backward(
    z: torch.Tensor, grad_h: torch.Tensor, selection: torch.Tensor | None, tau: float, *, fused: bool = True
) -> torch.Tensor:
    """dL/dz from dL/dh for the training routing (no eval gate), in the closed form of the module
    docstring, with the selection that :func:`route` returned for this z (same ``fused``). The
    Triton kernel where it applies; the torch path takes a selection of either form."""
    if fused and use_triton(z):
        return _route_backward_triton(z, grad_h, selection, tau)
    dtype = torch.promote_types(z.dtype, torch.float32)
    z32, g = z.to(dtype), grad_h.to(dtype)
    raw = torch.linalg.vector_norm(z32, dim=-1, keepdim=True)
    norm = raw.clamp_min(NORM_EPS)
    selected = selection_mask(z, selection)
    w = torch.softmax(torch.where(selected, z32 / (norm * tau), float("-inf")), dim=-1)
    a = torch.where(selected, g * z32, 0.0)
    q = w * (a - (a * w).sum(-1, keepdim=True))
    c = torch.where(raw < NORM_EPS, 0.0, (q * z32).sum(-1, keepdim=True) / (tau * norm**3))
    dz = torch.where(selected, g * w + q / (tau * norm), 0.0) - z32 * c
    return dz.to(z.dtype)
