"""The fused low-rank linear: forward and gradients equal an independent float64 evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bench.adapters import LoRALinear, fused_projections
from cl_bench.lowrank import LowRank, lora_linear, lora_linears

D_IN, D_OUT, R, N = 12, 10, 4, 7


def setup(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D_OUT, D_IN, generator=g, dtype=dtype))
        base.bias.copy_(torch.randn(D_OUT, generator=g, dtype=dtype))
    base.requires_grad_(False)
    A = torch.randn(R, D_IN, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(D_OUT, R, generator=g, dtype=dtype, requires_grad=True)
    x = torch.randn(2, N, D_IN, generator=g, dtype=dtype, requires_grad=True)
    return base, A, B, x


def reference(x, base, A, B, s, mask=None):
    y = x @ base.weight.t() + base.bias + s * (x @ A.t()) @ B.t()
    return y if mask is None else y * mask


def grads(out, tensors, upstream):
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_and_gradients_equal_the_reference(with_mask: bool) -> None:
    base, A, B, x = setup()
    mask = (torch.arange(D_OUT) % 3 != 0).double() if with_mask else None
    upstream = torch.randn(2, N, D_OUT, dtype=torch.float64)
    got = lora_linear(x, base.weight, base.bias, LowRank(A, B, 0.5, out_mask=mask))
    want = reference(x, base, A, B, 0.5, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g_got, g_want in zip(grads(got, (x, A, B), upstream), grads(want, (x, A, B), upstream), strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_row_scale_reaches_a_and_b_gradients_but_not_the_input() -> None:
    base, A, B, x = setup()
    c = torch.linspace(0.5, 2.0, D_OUT, dtype=torch.float64)
    upstream = torch.randn(2, N, D_OUT, dtype=torch.float64)
    got = lora_linear(x, base.weight, base.bias, LowRank(A, B, 1.0, grad_row_scale=c))
    gx, gA, gB = grads(got, (x, A, B), upstream)
    gx_ref, _, _ = grads(reference(x, base, A, B, 1.0), (x, A, B), upstream)
    _, gA_ref, gB_ref = grads(reference(x, base, A, B, 1.0), (x, A, B), upstream * c)  # A/B: row-scaled
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gA, gA_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gB, gB_ref, rtol=0, atol=1e-12)


def test_grad_rank_mask_zeroes_the_masked_ranks_exactly() -> None:
    base, A, B, x = setup()
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)[: A.shape[0]]
    out = lora_linear(x, base.weight, base.bias, LowRank(A, B, 1.0, grad_rank_mask=mask))
    gA, gB = torch.autograd.grad(out.sum(), (A, B))
    _, gA_ref, gB_ref = grads(
        reference(x, base, A, B, 1.0), (x, A, B), torch.ones(2, N, D_OUT, dtype=torch.float64)
    )
    off = mask == 0
    assert torch.all(gA[off] == 0)
    assert torch.all(gB[:, off] == 0)
    torch.testing.assert_close(gA[~off], gA_ref[~off], rtol=0, atol=1e-12)
    torch.testing.assert_close(gB[:, ~off], gB_ref[:, ~off], rtol=0, atol=1e-12)
    # the reference path (plain autograd) masks the same gradients
    delta = LowRank(A, B, 1.0, grad_rank_mask=mask).delta(x)
    dA, dB = torch.autograd.grad(delta.sum(), (A, B))
    torch.testing.assert_close(dA, gA, rtol=0, atol=1e-12)
    torch.testing.assert_close(dB, gB, rtol=0, atol=1e-12)


def test_fixed_rank_weights_scale_the_update_and_get_no_gradient() -> None:
    """DyLoRA's rank weights: a non-trainable rank_scale; the update is B diag(w) A, and the
    fused function returns gradients for A and B only."""
    base, A, B, x = setup()
    w = torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=torch.float64)[: A.shape[0]]
    out = lora_linear(x, base.weight, base.bias, LowRank(A, B, 1.0, rank_scale=w))
    want = reference(x, base, A, B * w, 1.0)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    upstream = torch.randn(2, N, D_OUT, dtype=torch.float64)
    gA, gB = torch.autograd.grad(out, (A, B), upstream)
    Bw = (B * w).detach().requires_grad_()
    _, gA_ref, gBw = grads(reference(x, base, A, Bw, 1.0), (x, A, Bw), upstream)
    torch.testing.assert_close(gA, gA_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gB, gBw * w, rtol=0, atol=1e-12)
    assert torch.all(gB[:, w == 0] == 0)


def test_evaluation_uses_the_merged_weight_and_equals_the_reference() -> None:
    base, A, B, x = setup()
    with torch.no_grad():
        got = lora_linear(x, base.weight, base.bias, LowRank(A, B, 0.25))
        torch.testing.assert_close(got, reference(x, base, A, B, 0.25), rtol=0, atol=1e-12)


def test_lora_layer_at_zero_b_is_exactly_the_base_layer() -> None:
    base, _, _, x = setup(dtype=torch.float32)
    layer = LoRALinear(base, 4, 8.0)
    x = x.float().detach()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_bf16_autocast_computes_in_bf16_with_fp32_parameter_gradients() -> None:
    base, A, B, x = setup(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, base.weight, base.bias, LowRank(A, B, 2.0))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert A.grad.dtype == torch.float32
    assert B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    want = reference(x.detach().double(), base.double(), A.detach().double(), B.detach().double(), 2.0)
    assert (out.double() - want).abs().max() / want.abs().max() < 2e-2


def test_grouped_layers_equal_each_layer_on_its_own() -> None:
    """q/k/v-style grouping: one GEMM for three layers, each with its own variant of the update."""
    layers, refs = [], []
    mask = (torch.arange(D_OUT) % 2 == 0).double()
    c = torch.linspace(0.5, 2.0, D_OUT, dtype=torch.float64)
    last_rank = torch.zeros(R, dtype=torch.float64)
    last_rank[-1] = 1
    variants = [{"out_mask": mask}, {"grad_row_scale": c}, {"grad_rank_mask": last_rank}]
    for seed, extra in enumerate(variants):
        base, A, B, _ = setup(seed)
        layers.append((base.weight, base.bias, LowRank(A, B, 0.5 + seed, **extra)))
        refs.append((base, A, B, 0.5 + seed, extra))
    x = torch.randn(2, N, D_IN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, N, 3 * D_OUT, dtype=torch.float64)
    out = lora_linears(x, tuple(layers))
    tensors = [x] + [t for _, _, f in layers for t in (f.A, f.B)]
    got = torch.autograd.grad(out, tensors, upstream)
    want_x = torch.zeros_like(x)
    for i, (base, A, B, s, extra) in enumerate(refs):
        g = upstream[..., i * D_OUT : (i + 1) * D_OUT]
        y = reference(x, base, A, B, s, extra.get("out_mask"))
        torch.testing.assert_close(out[..., i * D_OUT : (i + 1) * D_OUT], y, rtol=0, atol=1e-12)
        gx, gA, gB = torch.autograd.grad(y, (x, A, B), g)
        if "grad_row_scale" in extra:
            _, gA, gB = torch.autograd.grad(
                reference(x, base, A, B, s), (x, A, B), g * extra["grad_row_scale"]
            )
        if "grad_rank_mask" in extra:
            gA, gB = gA * last_rank[:, None], gB * last_rank
        want_x += gx
        torch.testing.assert_close(got[1 + 2 * i], gA, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2 + 2 * i], gB, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0], want_x, rtol=0, atol=1e-12)


def test_fused_projections_of_plain_linears_keep_their_gradients() -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(D_IN, D_OUT).double() for _ in range(3)]
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fused = fused_projections(x, linears)
    separate = torch.cat([m(x) for m in linears], dim=-1)
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-12)
    fused.square().sum().backward()
    grads = [m.weight.grad.clone() for m in linears]
    for m in linears:
        m.weight.grad = None
    separate.square().sum().backward()
    for m, g in zip(linears, grads, strict=True):
        torch.testing.assert_close(g, m.weight.grad, rtol=0, atol=1e-12)
    assert fused_projections(x, [linears[0], LoRALinear(nn.Linear(D_IN, D_OUT).double(), 2, 2.0)]) is None


@pytest.mark.parametrize("row_scale", [False, True])
def test_rank_scale_gate_gradients_equal_the_reference(row_scale: bool) -> None:
    """SoRA's y = W0 x + b + s B diag(g) A x: analytic gradients of A, B, g and x."""
    base, A, B, x = setup()
    gate = torch.randn(R, dtype=torch.float64, requires_grad=True)
    c = torch.linspace(0.5, 2.0, D_OUT, dtype=torch.float64) if row_scale else None
    upstream = torch.randn(2, N, D_OUT, dtype=torch.float64)
    got = lora_linear(x, base.weight, base.bias, LowRank(A, B, 0.5, rank_scale=gate, grad_row_scale=c))
    want = x @ base.weight.t() + base.bias + 0.5 * ((x @ A.t()) * gate) @ B.t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(got, (x, A, B, gate), upstream)
    gx_ref = torch.autograd.grad(want, x, upstream, retain_graph=True)[0]
    g_ref = torch.autograd.grad(want, (A, B, gate), upstream if c is None else upstream * c)
    torch.testing.assert_close(g_got[0], gx_ref, rtol=0, atol=1e-12)
    for a, b in zip(g_got[1:], g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            lora_linear(x, base.weight, base.bias, LowRank(A, B, 0.5, rank_scale=gate)),
            want,
            rtol=0,
            atol=1e-12,
        )
