"""The server's aggregation rules over the clients' communicated states (issue 19, docs/federation.md).

- :func:`fedavg`: FedAvg (McMahan et al. 2017), the weighted mean of every tensor over the clients
  that sent it, weighted by their sample counts. Applied to the LoRA factors A and B separately it
  is what FLoRA (arXiv 2404.15182) and most federated LoRA work do; the mean of the factors is not
  the factors of the mean update (mean(B_k) mean(A_k) != mean(B_k A_k)), the price of sending only
  the factors.
- :func:`product_average`: the exact alternative for low-rank pairs: the weighted mean of the
  products ``B_k @ A_k``, factored back to the original rank by a truncated SVD; exact whenever the
  mean has rank <= r (one client, or clients sharing A), otherwise the best rank-r approximation
  (Eckart-Young), with the relative residual it discards reported.
- :func:`state_bytes`: what a state costs on the wire (the communication figures of the record).

Every rule computes in float32 at least (float64 tensors stay float64) and casts the result back
to the dtype and device of the first client's tensor, so bf16 factors average without bf16 sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from cl_bench.errors import FederationError

State = Mapping[str, torch.Tensor]


def _check_weights(states: Sequence[State], weights: Sequence[float]) -> None:
    if not states:
        raise FederationError("aggregation of no client state")
    if len(states) != len(weights):
        raise FederationError(f"aggregation of {len(states)} client states with {len(weights)} weights")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise FederationError(f"aggregation weights must be finite and >= 0, got {list(weights)}")


def _holders(
    states: Sequence[State], weights: Sequence[float], key: str
) -> tuple[list[torch.Tensor], list[float]]:
    """The tensors sent under ``key`` and their clients' weights, shapes checked, weights > 0 in sum."""
    tensors = [s[key] for s in states if key in s]
    held = [float(w) for s, w in zip(states, weights, strict=True) if key in s]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise FederationError(f"clients sent {key!r} with different shapes {sorted(shapes)}")
    if sum(held) <= 0:
        raise FederationError(f"the clients that sent {key!r} have a total weight of 0")
    return tensors, held


def _accumulation_dtype(t: torch.Tensor, key: str) -> torch.dtype:
    if not (t.is_floating_point() or t.is_complex()):
        raise FederationError(f"cannot average {key!r} of dtype {t.dtype} (floating tensors only)")
    return torch.promote_types(t.dtype, torch.float32)


def _weighted_mean(tensors: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
    """``sum_k w_k t_k / sum_k w_k`` in float32 at least, as the first tensor (dtype, device).

    Evaluated as ``t_1 + sum_k w_k (t_k - t_1) / sum_k w_k``, the same mean, so that an entry every
    client sent unchanged comes back bit for bit (the differences are exact zeros), e.g. a LISA block
    no client sampled or a DyLoRA rank no client trained; one tensor: a clone of it."""
    first = tensors[0].detach()
    if len(tensors) == 1:
        return first.clone()
    dtype = _accumulation_dtype(first, key)
    anchor = first.to(dtype)
    total = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        total.add_(t.detach().to(device=first.device, dtype=dtype) - anchor, alpha=w)
    return total.div_(sum(weights)).add_(anchor).to(first.dtype)


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: for every key, the weighted mean over the clients that sent it.

    The weights (the clients' sample counts) are renormalised among the clients holding the key,
    so a key only some clients send (e.g. a block only they trained) is their mean, not a mean
    shrunk towards zero. Computed as ``sum_k w_k t_k / sum_k w_k`` in float32 (float64 stays
    float64; anchored at the first holder's tensor, so values every client sent alike come back
    bit for bit) and cast back to the first holder's dtype; a key held by one client is a clone of
    its tensor (exact: K = 1 reproduces the centralised run). Keys appear in first-seen order.
    Raises :class:`FederationError` for shapes that differ across clients (naming the key), a
    non-floating tensor, or weights that are negative, non-finite or sum to 0 for a key.
    """
    _check_weights(states, weights)
    keys = list(dict.fromkeys(k for s in states for k in s))
    return {key: _weighted_mean(*_holders(states, weights, key), key) for key in keys}


def _refactor(mean: torch.Tensor, r: int, a_row_norm: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B' [d_out, r], A' [r, d_in], relative residual) with B' A' the best rank-r approximation of
    ``mean``: ``B' = U_r sqrt(S_r)``, ``A' = sqrt(S_r) V_r^T``.

    Singular values at the numerical-rank tolerance of ``mean`` (numpy's ``matrix_rank`` rule,
    ``max(d_out, d_in) eps S_max``) count as zero: such a direction gets a zero column of B' and the
    row ``a_row_norm * v_i^T`` of A' (the product is unchanged), so a rank the average does not use
    can still learn, as a fresh LoRA rank does (B = 0, A != 0); split as ``sqrt(0)`` on both sides
    its gradients would be zero forever. Ranks beyond ``min(d_out, d_in)`` are handled the same way.
    The residual is ``||S_(r:)|| / ||S||`` over the singular values above the tolerance: exactly 0
    when ``mean`` has numerical rank <= r.
    """
    d_out, d_in = mean.shape
    U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
    n = S.shape[0]
    tol = max(d_out, d_in) * torch.finfo(S.dtype).eps * float(S[0]) if n else 0.0
    live = S.gt(tol)
    kept = min(r, n)
    B = torch.zeros(d_out, r, dtype=mean.dtype, device=mean.device)
    A = torch.zeros(r, d_in, dtype=mean.dtype, device=mean.device)
    root = S[:kept].sqrt()
    use = live[:kept]
    B[:, :kept] = torch.where(use, U[:, :kept] * root, torch.zeros_like(U[:, :kept]))
    A[:kept] = torch.where(use[:, None], root[:, None] * Vh[:kept], a_row_norm * Vh[:kept])
    if kept < r:  # r > min(d_out, d_in): more ranks than directions; the extra ones repeat v_i
        A[kept:] = a_row_norm * Vh[torch.arange(r - kept, device=mean.device) % n]
    significant = torch.where(live, S, torch.zeros_like(S))
    total = float(torch.linalg.vector_norm(significant))
    residual = float(torch.linalg.vector_norm(significant[kept:])) / total if total > 0 else 0.0
    return B, A, residual


def product_average(
    states: Sequence[State], weights: Sequence[float], pairs: Sequence[tuple[str, str]]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The exact mean of the low-rank updates, factored back to rank r; returns (state, residuals).

    For every ``(B name, A name)`` pair of ``pairs``: ``M = sum_k w_k B_k A_k / sum_k w_k`` over the
    clients that sent the pair (B [d_out, r], A [r, d_in]; float32 at least), then the truncated SVD
    ``M ~ U_r S_r V_r^T`` gives ``B' = U_r sqrt(S_r)`` and ``A' = sqrt(S_r) V_r^T`` (the balanced
    split; :func:`_refactor` for directions of zero singular value), cast back to the first client's
    dtypes. ``residuals[B name]`` is the relative Frobenius norm discarded,
    ``||M - B' A'||_F / ||M||_F``: 0 whenever M has rank <= r, e.g. clients that share A
    (``M = (mean B_k) A``), in which case ``B' A' = M`` within float tolerance (the factors
    themselves differ from the clients': the SVD picks its own basis). One client: its own factors
    back, bit for bit, residual 0. Every key in no pair is :func:`fedavg`'d. A client that sends
    one factor of a pair without the other is an error (:class:`FederationError`).
    """
    _check_weights(states, weights)
    in_pairs = {name for pair in pairs for name in pair}
    out = fedavg([{k: v for k, v in s.items() if k not in in_pairs} for s in states], weights)
    residuals: dict[str, float] = {}
    for b_name, a_name in pairs:
        if any((b_name in s) != (a_name in s) for s in states):
            raise FederationError(f"a client sent only one of the low-rank pair {b_name!r}, {a_name!r}")
        Bs, held = _holders(states, weights, b_name)
        As, _ = _holders(states, weights, a_name)
        if Bs[0].ndim != 2 or As[0].ndim != 2 or Bs[0].shape[1] != As[0].shape[0]:
            raise FederationError(
                f"{b_name!r} {tuple(Bs[0].shape)} @ {a_name!r} {tuple(As[0].shape)} is not a low-rank product"
            )
        if len(Bs) == 1:
            out[b_name], out[a_name] = Bs[0].detach().clone(), As[0].detach().clone()
            residuals[b_name] = 0.0
            continue
        device = Bs[0].device
        dtype = torch.promote_types(_accumulation_dtype(Bs[0], b_name), _accumulation_dtype(As[0], a_name))
        mean = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=dtype, device=device)
        row_norms = []
        for B, A, w in zip(Bs, As, held, strict=True):
            A32 = A.detach().to(device=device, dtype=dtype)
            mean.addmm_(B.detach().to(device=device, dtype=dtype), A32, alpha=w)
            row_norms.append(float(torch.linalg.vector_norm(A32, dim=1).mean()))
        mean.div_(sum(held))
        B_new, A_new, residuals[b_name] = _refactor(mean, As[0].shape[0], sum(row_norms) / len(row_norms))
        out[b_name], out[a_name] = B_new.to(Bs[0].dtype), A_new.to(As[0].dtype)
    order = dict.fromkeys(k for s in states for k in s)  # first-seen order, as fedavg's
    return {k: out[k] for k in order}, residuals


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a communicated state on the wire: ``sum numel * element_size`` over its tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())
