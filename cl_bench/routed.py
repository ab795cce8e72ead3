"""The fused path of routed low-rank adapters (SMoRA, FlyLoRA): several layers that share an input.

A routed layer computes ``y = W0 x + b + s B h(z, l)`` with ``z = A x`` [r] (the ranks), optional
router logits ``l = R x`` and a per-token gate ``h`` (top-k of the ranks, weighted or binary):
nothing folds into W0, unlike :class:`cl_bench.lowrank.LowRank`. Run unfused, as
``base(x) + delta(x)``, each layer reads x twice, writes its update beside the base output and
adds the two (three passes over the [tokens, d_out] activations forwards, three more for the input
gradient), and q, k, v each repeat it all. :func:`routed_linears` instead does, for the k layers
of a group (q, k, v of an attention, or one layer):

- forward: ``y = x [W0_1; ...]^T + b`` (one GEMM), ``[z_1, l_1, ...] = x [A_1; R_1; ...]^T`` (one
  skinny GEMM), each layer's gate from its own slice, and ``y_i += s_i h_i B_i^T`` in place (the
  update accumulates in the GEMM's epilogue);
- backward: ``grad_x = g [W0_1; ...]`` (one GEMM) plus, in place, ``[dz_1, dl_1, ...] [A_1; R_1; ...]``;
  the factor gradients ``dB_i = s_i g_i^T h_i`` and ``[dA_i; dR_i] = [dz_i, dl_i]^T x``.

The gate is the adapter's own torch code (:meth:`RoutedUpdate.route`); its backward is taken
with autograd on the gate alone, so the maths stays in one place (the strategy file) and equals
the unfused path's up to the order of float sums. Fixed shapes and no host sync: a CUDA graph can
replay the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cl_bench.lowrank import compute_dtype

Route = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class RoutedUpdate:
    """What a routed adapter hands the fused path.

    ``A`` [r, d_in] (trained or a frozen buffer), ``router`` [r_l, d_in] or None (A x routes
    itself), ``B`` [d_out, r], ``scaling`` s, and ``route(z, l)`` -> h [tokens, r] in z's dtype: the
    gated ranks (z and l in the compute dtype, differentiable; it may count its selections)."""

    A: torch.Tensor
    router: torch.Tensor | None
    B: torch.Tensor
    scaling: float
    route: Route

    @property
    def width(self) -> int:
        """Columns of ``[z, l]``."""
        return self.A.shape[0] + (0 if self.router is None else self.router.shape[0])

    def down(self) -> torch.Tensor:
        """``[A; R]`` [width, d_in]."""
        return self.A if self.router is None else torch.cat([self.A, self.router])

    @property
    def trains_down(self) -> bool:
        """Whether A or the router is trained: only then does the backward read the input x."""
        return any(t is not None and t.requires_grad for t in (self.A, self.router))

    def trained(self) -> list[torch.Tensor]:
        """The tensors that get gradients, in a fixed order: A (if trained), the router, B."""
        return [t for t in (self.A, self.router, self.B) if t is not None and t.requires_grad]


RoutedLayer = tuple[torch.Tensor, torch.Tensor | None, RoutedUpdate]  # frozen W0, frozen bias, update
Gates = list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]  # per layer (z, l, h)

FUSED: bool | None = None
"""Which path routed adapters take: None (default) the fused path on CUDA and the unfused
reference (``base(x) + delta(x)``, whose CPU numbers the regression goldens pin) elsewhere; True
or False force one (the tests compare the two on the CPU)."""


def use_fused(x: torch.Tensor) -> bool:
    """Whether :func:`routed_linears` serves input ``x`` (see :data:`FUSED`)."""
    return x.is_cuda if FUSED is None else FUSED


def _concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _weights(
    layers: Sequence[RoutedLayer], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``[W0_1; ...]``, the biases (zeros for a layer without one; None if none has one) and
    ``[A_1; R_1; ...]``, in ``dtype`` and detached (the Function computes their gradients)."""
    W = _concat([w.to(dtype) for w, _, _ in layers])
    bias = None
    if any(b is not None for _, b, _ in layers):
        bias = _concat([w.new_zeros(w.shape[0]) if b is None else b for w, b, _ in layers]).to(dtype)
    return W, bias, _concat([u.down().detach().to(dtype) for _, _, u in layers])


def _gates(zl: torch.Tensor, layers: Sequence[RoutedLayer], *, grad: bool) -> Gates:
    """Per layer (z, l, h) from the slices of ``zl``; with ``grad``, z and l are detached leaves
    that require a gradient, so that h's graph is the gate alone."""
    out = []
    col = 0
    for _, _, u in layers:
        r = u.A.shape[0]
        z = zl[:, col : col + r]
        l = None if u.router is None else zl[:, col + r : col + u.width]
        col += u.width
        if grad:
            z = z.detach().requires_grad_()
            l = None if l is None else l.detach().requires_grad_()
            with torch.enable_grad():
                h = u.route(z, l)
        else:
            h = u.route(z, l)
        out.append((z, l, h))
    return out


def _accumulate(y: torch.Tensor, layers: Sequence[RoutedLayer], hs: Sequence[torch.Tensor]) -> None:
    """``y_i += s_i h_i B_i^T`` for every layer's column block of ``y``, in place."""
    row = 0
    for (_, _, u), h in zip(layers, hs, strict=True):
        d_out = u.B.shape[0]
        y[:, row : row + d_out].addmm_(h, u.B.detach().to(y.dtype).t(), alpha=u.scaling)
        row += d_out


def _forward(
    x: torch.Tensor, layers: Sequence[RoutedLayer], *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Gates]:
    """(y, x2, W, D, gates): the output in x's shape, then what the backward reads: the flat input
    and weights in the compute dtype, and each layer's gate graph (``grad``: see :func:`_gates`)."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        W, bias, D = _weights(layers, dtype)
        y = F.linear(x2, W, bias)
        gates = _gates(x2 @ D.t(), layers, grad=grad)
        _accumulate(y, layers, [h.detach() for _, _, h in gates])
    return y.reshape(*x.shape[:-1], y.shape[-1]), x2, W, D, gates


class _RoutedLinears(torch.autograd.Function):
    """The trained forward and its backward (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, layers: tuple[RoutedLayer, ...], *trained: torch.Tensor
    ) -> torch.Tensor:
        y, x2, W, D, gates = _forward(x, layers, grad=True)
        # x is read back only for the gradients of trained down-projections (not FlyLoRA's frozen A)
        ctx.save_for_backward(x2 if any(u.trains_down for _, _, u in layers) else None, W, D)
        ctx.gates = gates
        ctx.meta = (x.shape, x.dtype, layers)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, W, D = ctx.saved_tensors
        shape, x_dtype, layers = ctx.meta
        gates = ctx.gates
        ctx.gates = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(W.dtype)
            d_zl: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            row = 0
            for (_, _, u), (z, l, h) in zip(layers, gates, strict=True):
                d_out = u.B.shape[0]
                g_i = g[:, row : row + d_out]
                row += d_out
                B_c = u.B.detach().to(g.dtype)
                dh = (g_i @ B_c) * u.scaling
                inputs = [z] if l is None else [z, l]
                raw = torch.autograd.grad(h, inputs, dh, allow_unused=True)
                d_inputs = [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, raw, strict=True)]
                d_zl.extend(d_inputs)
                r = u.A.shape[0]
                if u.trains_down:
                    dA = _concat_cols(d_inputs).t() @ x2  # [width, d_in]: rows of A, then of the router
                    if u.A.requires_grad:
                        grads.append(dA[:r].to(u.A.dtype))
                    if u.router is not None and u.router.requires_grad:
                        grads.append(dA[r:].to(u.router.dtype))
                if u.B.requires_grad:
                    grads.append((torch.mm(g_i.t(), h.detach()) * u.scaling).to(u.B.dtype))
            grad_x = None
            if ctx.needs_input_grad[0]:
                dx = g @ W
                dx.addmm_(_concat_cols(d_zl), D)
                grad_x = dx.reshape(shape).to(x_dtype)
        return (grad_x, None, *grads)


def _concat_cols(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=-1)


def routed_linears(x: torch.Tensor, layers: tuple[RoutedLayer, ...]) -> torch.Tensor:
    """Frozen linear layers with routed low-rank updates, sharing the input ``x``; outputs
    concatenated (module docstring). Without gradients (evaluation): the same GEMMs, no autograd."""
    trained = [t for _, _, u in layers for t in u.trained()]
    if torch.is_grad_enabled() and (x.requires_grad or trained):
        return _RoutedLinears.apply(x, layers, *trained)
    return _forward(x, layers, grad=False)[0]
