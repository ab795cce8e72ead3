"""The fused low-rank layer's factor-gradient kernel (cl_bench/lowrank_kernels.py) against its torch
twin (``factor_grads(..., fused=False)``): in Triton's interpreter on the CPU, and on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from cl_bench import lowrank as adapters
from cl_bench.lowrank import LowRank, factor_grads, lora_linears
from tests.helpers import run_interpreted

# (d_out, d_in, r): tiles split unevenly, one rank, ranks that are not a power of two, many tiles
SHAPES = [(40, 24, 3), (64, 48, 8), (700, 33, 1), (3000, 520, 16)]

INTERPRETED = """
import itertools, json, sys, torch
from cl_bench import lowrank as adapters

out = []
for (d_out, d_in, r), dtype, scale, gate, gate_grad, mask, scaling in itertools.product(
    json.loads(sys.argv[1]), ("bfloat16", "float32"), *[(False, True)] * 4, (1.0, 2.0)
):
    if gate_grad and not gate:
        continue
    g = torch.Generator().manual_seed(d_out + r)
    P_all = torch.randn(d_out + 5, r + 4, generator=g).to(getattr(torch, dtype))
    P = P_all[3 : 3 + d_out, 2 : 2 + r]  # a block of a larger matrix, as in the layer
    GA = torch.randn(r, d_in, generator=g).to(P.dtype)
    factors = (
        torch.rand(d_out, generator=g) if scale else None,
        torch.randn(r, generator=g) if gate else None,
        torch.randn(d_out, r, generator=g) if gate_grad else None,
        (torch.rand(r, generator=g) > 0.4).float() if mask else None,
    )
    ref = adapters.factor_grads(P, GA, scaling, *factors, fused=False)
    got = adapters._factor_grads_triton(P, GA, scaling, *factors)
    out.append({
        "case": [d_out, d_in, r, dtype, scale, gate, gate_grad, mask, scaling],
        "A": torch.equal(got[0], ref[0]) and got[0].dtype == torch.float32,
        "B": torch.equal(got[1], ref[1]) and got[1].dtype == torch.float32,
        "g": None if ref[2] is None else float((got[2] - ref[2]).abs().max() / (ref[2].abs().max() + 1)),
        "g_none": got[2] is None,
    })
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_kernel_equals_the_torch_twin_in_the_interpreter() -> None:
    """Every combination of row scale, gate (fixed or trained), rank mask and scaling, for bf16 and
    fp32 blocks: grad_A and grad_B bitwise equal (the same products in the same order), the gate's
    gradient within float32 summation order."""
    results = run_interpreted(INTERPRETED, json.dumps(SHAPES))
    assert len(results) == len(SHAPES) * 2 * 2 * 3 * 2 * 2  # gate: none, fixed, trained
    for result in results:
        assert result["A"], result["case"]
        assert result["B"], result["case"]
        trained = result["case"][6]
        assert result["g_none"] is not trained, result["case"]
        if trained:
            assert result["g"] < 1e-5, result["case"]


def test_the_kernel_is_used_only_for_cuda_blocks_with_float32_factors() -> None:
    P, GA = torch.zeros(8, 2), torch.zeros(2, 8)
    assert not adapters._use_factor_kernel(P, GA)  # CPU: the torch twin
    if torch.cuda.is_available():
        P, GA = P.cuda(), GA.cuda()
        assert not adapters._use_factor_kernel(P, GA, torch.zeros(8, device="cuda", dtype=torch.float64))
        assert not adapters._use_factor_kernel(torch.zeros(8, 300, device="cuda"), GA)  # rank > 256


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
@pytest.mark.parametrize("trained_gate", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_kernel_equals_the_torch_twin_on_the_gpu(
    d_out: int, d_in: int, r: int, trained_gate: bool
) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    P = torch.randn(d_out + 3, r + 2, device="cuda", generator=g).bfloat16()[3:, 2:]
    GA = torch.randn(r, d_in, device="cuda", generator=g).bfloat16()
    scale = torch.rand(d_out, device="cuda", generator=g)
    gate = torch.randn(r, device="cuda", generator=g)
    B = torch.randn(d_out, r, device="cuda", generator=g) if trained_gate else None
    mask = (torch.rand(r, device="cuda", generator=g) > 0.4).float()
    assert adapters._use_factor_kernel(P, GA, scale, gate, B, mask)
    got = factor_grads(P, GA, 2.0, scale, gate, B, mask)
    ref = factor_grads(P, GA, 2.0, scale, gate, B, mask, fused=False)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])
    if trained_gate:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    else:
        assert got[2] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fused_bf16_layer_group_gets_the_same_gradients_with_and_without_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """q/k/v-like group under bf16 autocast with a trained gate, a row scale and a rank mask."""
    g = torch.Generator(device="cuda").manual_seed(1)
    d, r = 96, 8
    weights = [torch.randn(d, d, device="cuda", generator=g) for _ in range(3)]
    A = [torch.randn(r, d, device="cuda", generator=g, requires_grad=True) for _ in range(3)]
    B = [torch.randn(d, r, device="cuda", generator=g, requires_grad=True) for _ in range(3)]
    gate = torch.randn(r, device="cuda", generator=g, requires_grad=True)
    scale = torch.rand(d, device="cuda", generator=g)
    mask = (torch.arange(r, device="cuda") < 5).float()
    x = torch.randn(4, 33, d, device="cuda", generator=g)
    upstream = torch.randn(4, 33, 3 * d, device="cuda", generator=g)

    def gradients() -> list[torch.Tensor]:
        layers = (
            (weights[0], None, LowRank(A[0], B[0], 2.0, rank_scale=gate, grad_rank_mask=mask)),
            (weights[1], None, LowRank(A[1], B[1], 1.0, grad_row_scale=scale)),
            (weights[2], None, LowRank(A[2], B[2], 0.5)),
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = lora_linears(x, layers)
        return list(torch.autograd.grad(out, [*A, *B, gate], upstream.to(out.dtype)))

    fused = gradients()
    monkeypatch.setattr(adapters, "_use_factor_kernel", lambda *args: False)
    plain = gradients()
    for got, want in zip(fused[:-1], plain[:-1], strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    torch.testing.assert_close(fused[-1], plain[-1], rtol=1e-5, atol=1e-5)
