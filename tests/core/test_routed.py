"""The fused path of routed adapters (cl_bench.routed) against their unfused reference, on the CPU.

The fused path serves CUDA inputs by default; here it is forced on (``routed.FUSED``) and every
output, input gradient, factor gradient and routing counter is compared with ``base(x) + delta(x)``
on identical weights, for one layer and for a q/k/v group.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from cl_bench import routed
from cl_bench.adapters import AdaptedLinear, fused_projections
from strategies.flylora import FlyLoRALinear
from strategies.smora import SMoRALinear

Make = Callable[[nn.Linear, int], AdaptedLinear]


def _smora(base: nn.Linear, seed: int) -> AdaptedLinear:
    return SMoRALinear(base, r=8, k=3, alpha=4.0)


def _smora_exclude(base: nn.Linear, seed: int) -> AdaptedLinear:
    return SMoRALinear(base, r=8, k=4, alpha=4.0, rank_partition=2, gate_bias="exclude")


def _flylora(base: nn.Linear, seed: int) -> AdaptedLinear:
    return FlyLoRALinear(base, r=8, k=3, alpha=16.0, seed=seed)


def _flylora_abs(base: nn.Linear, seed: int) -> AdaptedLinear:
    return FlyLoRALinear(base, r=8, k=3, alpha=16.0, seed=seed, topk_score="abs")


MAKERS = {
    "smora": _smora,
    "smora-P2-exclude": _smora_exclude,
    "flylora": _flylora,
    "flylora-abs": _flylora_abs,
}


@pytest.fixture
def force_fused() -> Iterator[None]:
    previous = routed.FUSED
    yield
    routed.FUSED = previous


def _layers(make: Make, n: int, d_in: int = 16, d_out: int = 24) -> list[AdaptedLinear]:
    torch.manual_seed(0)
    layers = []
    for i in range(n):
        layer = make(nn.Linear(d_in, d_out), i)
        with torch.no_grad():
            for name in ("B", "balance_bias", "d"):
                t = getattr(layer, name, None)
                if t is not None:
                    t.copy_(torch.randn_like(t) * (0.01 if name != "B" else 0.5))
        layers.append(layer)
    return layers


def _trained(layers: list[AdaptedLinear]) -> list[torch.Tensor]:
    return [p for m in layers for p in m.parameters() if p.requires_grad]


def _counters(layers: list[AdaptedLinear]) -> list[torch.Tensor]:
    return [t.clone() for m in layers for t in (m.usage.step, m.usage.usage, m.usage.tokens)]  # type: ignore[union-attr]


def _run(
    layers: list[AdaptedLinear], x: torch.Tensor, fused: bool | None, group: bool
) -> tuple[torch.Tensor, ...]:
    routed.FUSED = fused
    x = x.clone().requires_grad_()
    y = fused_projections(x, layers) if group else torch.cat([m(x) for m in layers], dim=-1)
    assert y is not None
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).square().sum().backward()
    assert x.grad is not None
    return (y.detach(), x.grad, *(p.grad for p in _trained(layers)))  # type: ignore[misc]


@pytest.mark.parametrize("group", [False, True], ids=["one-layer", "qkv-group"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_fused_path_equals_the_reference(name: str, group: bool, force_fused: None) -> None:
    reference = _layers(MAKERS[name], 3 if group else 1)
    fused = copy.deepcopy(reference)
    x = torch.randn(5, 7, 16)
    if group:  # the reference runs one layer at a time: fused_projections refuses unfused routed layers
        routed.FUSED = False
        assert fused_projections(x, reference) is None
    want = _run(reference, x, fused=False, group=False)
    got = _run(fused, x, fused=True, group=group)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(_counters(fused), _counters(reference), strict=True):
        assert torch.equal(g, w)
    assert all(int(m.usage.step.sum()) == 35 * m.k for m in fused)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(MAKERS))
def test_fused_evaluation_equals_the_reference_and_counts_no_step(name: str, force_fused: None) -> None:
    reference = _layers(MAKERS[name], 3)
    fused = copy.deepcopy(reference)
    x = torch.randn(4, 6, 16)
    for m in reference + fused:
        m.eval()
    with torch.no_grad():
        routed.FUSED = False
        want = torch.cat([m(x) for m in reference], dim=-1)
        routed.FUSED = True
        got = fused_projections(x, fused)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(_counters(fused), _counters(reference), strict=True):
        assert torch.equal(g, w)
    assert all(int(m.usage.step.sum()) == 0 and int(m.usage.usage[1].sum()) == 24 * m.k for m in fused)  # type: ignore[union-attr]


def test_frozen_a_gets_no_gradient_on_the_fused_path(force_fused: None) -> None:
    (layer,) = _layers(_flylora, 1)
    routed.FUSED = True
    A = layer.A.clone()  # type: ignore[union-attr]
    layer(torch.randn(3, 16)).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.grad is not None] == ["B"]
    assert torch.equal(layer.A, A)  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "keeps_input"), [("flylora", False), ("smora", True)])
def test_the_input_is_kept_for_the_backward_only_when_a_down_projection_trains(
    name: str, keeps_input: bool, force_fused: None
) -> None:
    routed.FUSED = True
    (layer,) = _layers(MAKERS[name], 1)
    out = layer(torch.randn(4, 16, requires_grad=True))
    x_saved, W, D = out.grad_fn.saved_tensors  # type: ignore[union-attr]
    assert (x_saved is not None) == keeps_input  # FlyLoRA's A is frozen: no [tokens, d_in] copy held
    assert W.shape == (24, 16)
    assert D.shape[1] == 16


def test_bf16_autocast_fused_path_is_close_to_the_reference(force_fused: None) -> None:
    reference = _layers(_smora, 3)
    fused = copy.deepcopy(reference)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(reference, x, fused=False, group=False)
        got = _run(fused, x, fused=True, group=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        # bf16 roundings fall elsewhere (the update accumulates in the GEMM, not after a rounding)
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 0.02


def test_dropout_and_detached_input_take_the_reference_path(force_fused: None) -> None:
    routed.FUSED = True
    x = torch.randn(2, 16)
    assert SMoRALinear(nn.Linear(16, 8), r=4, k=2, alpha=1.0, dropout=0.1).routed(x) is None
    fly = FlyLoRALinear(nn.Linear(16, 8), r=4, k=2, alpha=1.0, seed=0, detach_branch_input=True)
    assert fly.routed(x) is None
    routed.FUSED = None
    assert SMoRALinear(nn.Linear(16, 8), r=4, k=2, alpha=1.0).routed(x) is None  # CPU default: reference


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["smora", "flylora"])
def test_cuda_takes_the_fused_path_and_matches_the_reference(name: str, force_fused: None) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reference = [m.cuda() for m in _layers(MAKERS[name], 3, d_in=256, d_out=384)]
    fused = copy.deepcopy(reference)
    x = torch.randn(64, 50, 256, device="cuda")
    routed.FUSED = None
    assert all(m.routed(x) is not None for m in fused)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _run(reference, x, fused=False, group=False)
        got = _run(fused, x, fused=None, group=True)
    for g, w in zip(got, want, strict=True):
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 0.02
