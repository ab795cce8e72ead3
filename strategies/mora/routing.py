"""MoRA's self-activated routing of rank-1 experts: ``h = w * z`` from the key matches ``z``.

For one token with key matches z [R] (``z_i = A_i x``)::

    n   = max(||z||_2, 1e-12)              s = z / n          (signed self-activation)
    S   = the k largest entries of s (equivalently of z: n > 0), k = min(k, R)
    w_i = softmax_{i in S}(s_i / tau), 0 outside S
    w_i = w_i * 1[s_i >= delta]            eval only, delta > 0, no renormalisation
    h_i = w_i z_i                          (the layer then adds B h to its output)

:func:`route` returns the dense ``h`` [..., R] and the number of non-zero weights per token. Two
implementations compute the same function:

- the reference (any device): ``torch.topk`` on z, a softmax over the k selected entries and one
  scatter; autograd differentiates it;
- on CUDA, two Triton kernels, one pass each over z: the forward reads a tile of rows, takes
  the norm, selects the top k by k rounds of arg-max (ties: the lowest index), and writes h and
  the counts; the backward recomputes the selection from z (nothing but z is saved) and writes
  the gradient of z in closed form (below). On an H200 ``torch.topk`` alone took ~0.1 ms per
  layer for 25k tokens x 160 ranks (~16 ms of a ViT-B/16 training step at batch 128); the
  kernels replace the top-k, softmax, scatter and their backward (~15 kernels per layer).

Gradient of ``h`` with the selection S fixed (g = dL/dh, a_i = g_i z_i, q = softmax-backward)::

    q_i  = w_i (a_i - sum_{l in S} a_l w_l)                      for i in S
    dz_j = 1[j in S] (g_j w_j + q_j / (tau n)) - z_j (sum_{l in S} q_l z_l) / (tau n^3)

(the second term is the derivative of the norm; at the 1e-12 clamp it is 0, as autograd's).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

NORM_EPS = 1e-12  # F.normalize's default, as the official X-TAIL layer
ROWS_PER_PROGRAM = 4096  # elements of z one Triton program holds (rows x padded ranks)


def self_activation(
    z: torch.Tensor, k: int, tau: float, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference routing: ``(w_sel, z_sel, idx)``, each [..., min(k, R)].

    The top-k is taken on z itself (dividing by the positive norm keeps the order), so only k
    entries of s are ever formed; ``idx`` is None when every rank is selected (k >= R). Norm,
    softmax and ``z_sel`` are in float32 at least (a bf16 z is read once by the norm and the
    top-k, never copied whole to float32).
    """
    route_dtype = torch.promote_types(z.dtype, torch.float32)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=route_dtype).clamp_min(NORM_EPS)
    if k < z.shape[-1]:
        z_sel, idx = torch.topk(z, k, dim=-1)
    else:
        z_sel, idx = z, None
    z_sel = z_sel.to(route_dtype)
    s_sel = z_sel / norm
    w_sel = torch.softmax(s_sel / tau, dim=-1)
    if threshold > 0:
        w_sel = torch.where(s_sel >= threshold, w_sel, torch.zeros_like(w_sel))
    return w_sel, z_sel, idx


def route_reference(
    z: torch.Tensor, k: int, tau: float, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, counts)``: dense ``h = w * z`` in z's dtype and the non-zero weights per token (int32)."""
    w_sel, z_sel, idx = self_activation(z, k, tau, threshold)
    h = (w_sel * z_sel).to(z.dtype)
    if idx is not None:
        h = torch.zeros_like(z).scatter(-1, idx, h)
    return h, torch.count_nonzero(w_sel, dim=-1).to(torch.int32)


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
    block_n = max(1, ROWS_PER_PROGRAM // block_r)
    return triton.cdiv(n_rows, block_n), block_n, block_r


def _route_triton(z: torch.Tensor, k: int, tau: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    forward_kernel, _ = _kernels()
    R = z.shape[-1]
    z2 = z.reshape(-1, R).contiguous()
    h = torch.empty_like(z2)
    counts = torch.empty(z2.shape[0], dtype=torch.int32, device=z.device)
    grid, block_n, block_r = _launch_shape(z2.shape[0], R)
    forward_kernel[(grid,)](
        z2, h, counts, z2.shape[0], R, 1.0 / tau, threshold,
        K=min(k, R), BLOCK_N=block_n, BLOCK_R=block_r, GATE=threshold > 0,
    )  # fmt: skip
    return h.view(z.shape), counts.view(z.shape[:-1])


def _route_backward_triton(z: torch.Tensor, grad_h: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    _, backward_kernel = _kernels()
    R = z.shape[-1]
    z2 = z.reshape(-1, R).contiguous()
    g2 = grad_h.reshape(-1, R).contiguous()
    dz = torch.empty_like(z2)
    grid, block_n, block_r = _launch_shape(z2.shape[0], R)
    backward_kernel[(grid,)](
        z2, g2, dz, z2.shape[0], R, 1.0 / tau,
        K=min(k, R), BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return dz.view(z.shape)


def use_triton(z: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA tensors of a float dtype, when Triton imports."""
    if not z.is_cuda or z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


@torch.no_grad()
def route(
    z: torch.Tensor, k: int, tau: float, threshold: float = 0.0, *, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, counts)`` of :func:`route_reference`, without autograd (the layer differentiates it
    with :func:`route_backward`); by the Triton kernel where it applies, unless ``fused=False``."""
    if fused and use_triton(z):
        return _route_triton(z, k, tau, threshold)
    return route_reference(z, k, tau, threshold)


def route_backward(
    z: torch.Tensor, grad_h: torch.Tensor, k: int, tau: float, *, fused: bool = True
) -> torch.Tensor:
    """dL/dz from dL/dh for the training routing (no eval gate), in the closed form of the module
    docstring; the selection is recomputed from z. The Triton kernel where it applies."""
    if fused and use_triton(z):
        return _route_backward_triton(z, grad_h, k, tau)
    dtype = torch.promote_types(z.dtype, torch.float32)
    z32, g = z.to(dtype), grad_h.to(dtype)
    raw = torch.linalg.vector_norm(z32, dim=-1, keepdim=True)
    norm = raw.clamp_min(NORM_EPS)
    if k < z.shape[-1]:
        selected = torch.zeros_like(z, dtype=torch.bool).scatter(-1, torch.topk(z, k, dim=-1).indices, True)
    else:
        selected = torch.ones_like(z, dtype=torch.bool)
    w = torch.softmax(torch.where(selected, z32 / (norm * tau), float("-inf")), dim=-1)
    a = torch.where(selected, g * z32, 0.0)
    q = w * (a - (a * w).sum(-1, keepdim=True))
    c = torch.where(raw < NORM_EPS, 0.0, (q * z32).sum(-1, keepdim=True) / (tau * norm**3))
    dz = torch.where(selected, g * w + q / (tau * norm), 0.0) - z32 * c
    return dz.to(z.dtype)
