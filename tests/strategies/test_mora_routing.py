"""MoRA's routing (strategies/mora/routing.py): the closed-form backward against autograd on the
CPU, and the Triton kernels against the torch reference on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from strategies.mora import MoRALinear
from strategies.mora.routing import route, route_backward, route_reference, use_triton

SHAPES = [(64, 16, 16), (300, 48, 16), (1000, 160, 16), (50, 300, 2), (7, 5, 16)]  # (N, R, k)


def scores(n: int, R: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, R, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
def test_closed_form_backward_equals_autograd_of_the_reference(n: int, R: int, k: int) -> None:
    z = scores(n, R, torch.float64, "cpu").requires_grad_(True)
    g = scores(n, R, torch.float64, "cpu", seed=1)
    h, _ = route_reference(z, k, 0.05)
    (expected,) = torch.autograd.grad(h, z, g)
    torch.testing.assert_close(route_backward(z.detach(), g, k, 0.05), expected, rtol=1e-10, atol=1e-12)


def test_zero_keys_take_no_norm_gradient() -> None:
    """A token whose key matches are all 0: the clamped norm passes no gradient (as autograd)."""
    z = torch.zeros(3, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, dtype=torch.float64)
    h, _ = route_reference(z, 4, 0.1)
    (expected,) = torch.autograd.grad(h, z, g)
    torch.testing.assert_close(route_backward(z.detach(), g, 4, 0.1), expected, rtol=0, atol=0)


def test_counts_are_the_non_zero_weights_per_token() -> None:
    z = scores(200, 40, torch.float32, "cpu")
    h, counts = route_reference(z, 16, 0.01, threshold=0.2)
    assert counts.dtype == torch.int32
    assert torch.equal(counts, (h != 0).sum(-1).to(torch.int32))
    assert int(counts.max()) <= 16
    assert int(counts.min()) < 16  # the gate and the softmax underflow drop some


INTERPRETED = """
import json, sys, torch
from strategies.mora import routing
out = []
for n, R, k in json.loads(sys.argv[1]):
    for threshold in (0.0, 0.2):
        z = torch.randn(n, R, generator=torch.Generator().manual_seed(n + R))
        h, counts = routing._route_triton(z, k, 0.01, threshold)
        h_ref, counts_ref = routing.route_reference(z, k, 0.01, threshold)
        g = torch.randn(n, R, generator=torch.Generator().manual_seed(7))
        dz = routing._route_backward_triton(z, g, k, 0.01)
        dz_ref = routing.route_backward(z, g, k, 0.01, fused=False)
        out.append({
            "h": float((h - h_ref).abs().max() / h_ref.abs().max()),
            "counts": bool(torch.equal(counts, counts_ref)),
            "dz": float((dz - dz_ref).abs().max() / dz_ref.abs().max()),
        })
print(json.dumps(out))
"""


def test_triton_kernels_equal_the_reference_in_the_interpreter() -> None:
    """The kernels' code runs on the CPU in Triton's interpreter (CI has no GPU)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED, json.dumps(SHAPES)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(SHAPES)
    for result in results:
        assert result["counts"]
        assert result["h"] < 1e-5
        assert result["dz"] < 1e-5


needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and use_triton(torch.zeros(1, device="cuda"))),
    reason="needs CUDA and Triton",
)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_triton_forward_equals_the_reference(n: int, R: int, k: int, threshold: float) -> None:
    z = scores(n, R, torch.float32, "cuda")
    h, counts = route(z, k, 0.01, threshold)
    h_ref, counts_ref = route_reference(z, k, 0.01, threshold)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts_ref)
    zb = z.bfloat16()
    hb, counts_b = route(zb, k, 0.01, threshold)
    hb_ref, _ = route_reference(zb, k, 0.01, threshold)
    assert hb.dtype == torch.bfloat16
    torch.testing.assert_close(hb.float(), hb_ref.float(), rtol=1e-2, atol=1e-2)
    assert (counts_b <= min(k, R)).all()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
def test_triton_backward_equals_the_closed_form(n: int, R: int, k: int) -> None:
    z = scores(n, R, torch.float32, "cuda")
    g = scores(n, R, torch.float32, "cuda", seed=1)
    fused = route_backward(z, g, k, 0.01)
    reference = route_backward(z, g, k, 0.01, fused=False)
    scale = reference.abs().max()
    assert (fused - reference).abs().max() <= 1e-5 * scale


@pytest.mark.gpu
@needs_triton
def test_fused_layer_on_cuda_equals_the_reference_layer() -> None:
    """Forward and gradients of a 160-rank layer: Triton routing vs the torch reference."""
    torch.backends.cuda.matmul.allow_tf32 = False  # other GPU tests (the loop) switch TF32 on
    layers = []
    for fused in (True, False):
        torch.manual_seed(0)
        layer = MoRALinear(nn.Linear(64, 48), 16, 16, 0.01, 0.2, capacity=160, fused=fused).cuda()
        for _ in range(9):
            with torch.no_grad():
                layer.B.normal_()
            layer.increment()
        with torch.no_grad():
            layer.B.normal_()
        layers.append(layer)
    x = torch.randn(4, 50, 64, device="cuda")
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer.train()(xi)
        y.square().sum().backward()
        with torch.no_grad():
            evaluated = layer.eval()(x)
        grads.append((y.detach(), evaluated, xi.grad, layer.A.grad, layer.B.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-4)
