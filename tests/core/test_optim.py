"""cl_bench/optim.py: transformers' AdamW and SoRA's SparseAdamW against hand-written float64
references, the weight-decay groups on a tiny CLIP, and the optimizer convention of each strategy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_bench import config
from cl_bench.optim import (
    HFAdamW,
    SparseAdamW,
    decay_groups,
    hf_adamw_update,
    is_norm,
    make_adamw,
    no_decay_ids,
    torch_adamw_update,
)
from cl_bench.registry import STRATEGIES
from strategies.sora import code_threshold, soft_threshold
from tests.helpers import head_for, tiny_backbone, tiny_context

LR, WD, BETAS, N_STEPS = 0.05, 0.1, (0.9, 0.999), 6


def grads_for(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def hf_reference(
    p0: torch.Tensor, grads: list[torch.Tensor], lr: float, eps: float, wd: float
) -> torch.Tensor:
    """transformers.AdamW.step (correct_bias=True), written out elementwise in float64."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    beta1, beta2 = BETAS
    for t, g in enumerate(grads, start=1):
        m = m * beta1 + (1 - beta1) * g
        v = v * beta2 + (1 - beta2) * g * g
        denom = v.sqrt() + eps  # eps before the bias correction
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = p - step_size * m / denom
        p = p - lr * wd * p  # decay after the update, on the updated p
    return p


def torch_reference(
    p0: torch.Tensor, grads: list[torch.Tensor], lr: float, eps: float, wd: float
) -> torch.Tensor:
    """torch.optim.AdamW, written out: decay first, eps after the bias correction."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    beta1, beta2 = BETAS
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = m * beta1 + (1 - beta1) * g
        v = v * beta2 + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    return p


def run(optimizer_cls: type[torch.optim.Optimizer], p0: torch.Tensor, grads: list[torch.Tensor], **kw: float):
    p = nn.Parameter(p0.clone())
    optimizer = optimizer_cls([p], lr=LR, **kw)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach()


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_hf_adamw_is_the_transformers_arithmetic_in_float64(eps: float) -> None:
    """Several steps with weight decay: exact to 1e-12 against the written-out transformers step;
    and a different optimizer from torch AdamW (which matches its own reference), so the test can fail."""
    p0 = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_for((5, 7), N_STEPS)
    # small gradients on some entries make eps matter
    grads = [g * torch.logspace(-6, 0, 7, dtype=torch.float64) for g in grads]
    got = run(HFAdamW, p0, grads, eps=eps, weight_decay=WD)
    torch.testing.assert_close(got, hf_reference(p0, grads, LR, eps, WD), rtol=0, atol=1e-12)
    theirs = run(torch.optim.AdamW, p0, grads, eps=eps, weight_decay=WD)
    torch.testing.assert_close(theirs, torch_reference(p0, grads, LR, eps, WD), rtol=0, atol=1e-12)
    assert (got - theirs).abs().max() > 1e-6


def test_hf_adamw_decay_after_the_update_differs_from_decay_before() -> None:
    """Large eps isolates the decay order: the references with and without decay-after differ."""
    p0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = grads_for((4, 4), N_STEPS, seed=3)
    got = run(HFAdamW, p0, grads, eps=1e-8, weight_decay=0.5)
    torch.testing.assert_close(got, hf_reference(p0, grads, LR, 1e-8, 0.5), rtol=0, atol=1e-12)
    no_decay = run(HFAdamW, p0, grads, eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(no_decay, hf_reference(p0, grads, LR, 1e-8, 0.0), rtol=0, atol=1e-12)
    assert (got - no_decay).abs().max() > 1e-3


def test_hf_adamw_skips_parameters_without_gradient_and_counts_steps_per_parameter() -> None:
    p0 = torch.randn(3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    optimizer = HFAdamW([a, b], lr=LR, eps=1e-8, weight_decay=WD)
    grads = grads_for((3,), 4, seed=5)
    for i, g in enumerate(grads):
        a.grad = g.clone()
        b.grad = g.clone() if i % 2 else None  # b steps at 2 of the 4 steps only
        optimizer.step()
    assert optimizer.state[a]["step"] == 4
    assert optimizer.state[b]["step"] == 2
    torch.testing.assert_close(a.detach(), hf_reference(p0, grads, LR, 1e-8, WD), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), hf_reference(p0, grads[1::2], LR, 1e-8, WD), rtol=0, atol=1e-12)


def test_foreach_updates_match_single_tensor_implementations_bitwise() -> None:
    """torch_adamw_update is torch AdamW's foreach arithmetic; hf_adamw_update the per-tensor HFAdamW's."""
    p0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(6))
    grads = [g.float() for g in grads_for((6, 3), N_STEPS, seed=7)]
    reference = nn.Parameter(p0.clone())
    optimizer = torch.optim.AdamW([reference], lr=LR, weight_decay=WD, foreach=True)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        reference.grad = g.clone()
        optimizer.step()
        torch_adamw_update([p], [g], [m], [v], t, LR, BETAS, 1e-8, WD)
        assert torch.equal(p, reference.detach())
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    hf = run(HFAdamW, p0, grads, eps=1e-8, weight_decay=WD)
    for t, g in enumerate(grads, start=1):
        hf_adamw_update([p], [g], [m], [v], t, LR, BETAS, 1e-8, WD)
    assert torch.equal(p, hf)


# ----------------------------------------------------------------------------- SparseAdamW


def sparse_adamw_reference(
    g0: torch.Tensor, grads: list[torch.Tensor], lr: float, xi: float, mode: str
) -> torch.Tensor:
    """SoRA's SparseAdamW.step in float64 (eps 1e-6 before the correction, no decay), each step
    followed by the threshold: the official three masked updates (``code``) or T_{lr xi} (``paper``)."""
    p, m, v = g0.clone(), torch.zeros_like(g0), torch.zeros_like(g0)
    beta1, beta2 = BETAS
    for t, g in enumerate(grads, start=1):
        m = m * beta1 + (1 - beta1) * g
        v = v * beta2 + (1 - beta2) * g * g
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = p + (m / (v.sqrt() + 1e-6)) * (-step_size)
        if mode == "code":
            p = p.clone()
            p[p > xi] -= xi
            p[p < -xi] += xi
            p[p.abs() < xi] = 0.0
        else:
            lam = lr * xi
            p = torch.sign(p) * torch.clamp(p.abs() - lam, min=0.0)
    return p


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_sparse_adamw_then_threshold_is_the_official_gate_step_in_float64(mode: str) -> None:
    lr = 0.05
    xi = 0.6 if mode == "paper" else 0.03  # lambda = 0.03 in both
    g0 = torch.randn(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.2
    grads = [g * torch.logspace(-7, 0, 64, dtype=torch.float64) for g in grads_for((64,), N_STEPS, seed=9)]
    gate = nn.Parameter(g0.clone())
    optimizer = SparseAdamW([gate], lr=lr)
    assert optimizer.param_groups[0]["eps"] == 1e-6
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    for g in grads:
        gate.grad = g.clone()
        optimizer.step()
        with torch.no_grad():
            gate.copy_(soft_threshold(gate, lr * xi) if mode == "paper" else code_threshold(gate, xi))
    expected = sparse_adamw_reference(g0, grads, lr, xi, mode)
    torch.testing.assert_close(gate.detach(), expected, rtol=0, atol=1e-12)
    assert torch.equal(gate.detach() == 0, expected == 0)
    assert 0 < int((expected == 0).sum()) < 64
    # torch's Adam (eps 1e-8 after the correction) gives other gates: the test can fail
    adam = run(torch.optim.Adam, g0, grads[:1])
    first = sparse_adamw_reference(g0, grads[:1], lr, 0.0, "code")
    assert (adam - first).abs().max() > 1e-6


# ----------------------------------------------------------------------------- decay groups


def test_decay_groups_on_a_tiny_clip_exempt_every_norm_and_bias() -> None:
    backbone = tiny_backbone("tiny-clip")
    params = list(backbone.parameters())
    decay, no_decay = decay_groups(params, [backbone])
    decay_ids, no_decay_set = {id(p) for p in decay}, {id(p) for p in no_decay}
    assert not decay_ids & no_decay_set
    assert len(decay) + len(no_decay) == len(params)
    n_norms = n_linears = 0
    for module in backbone.modules():
        if isinstance(module, nn.LayerNorm):
            n_norms += 1
            assert {id(module.weight), id(module.bias)} <= no_decay_set
        if isinstance(module, nn.Linear):
            n_linears += 1
            assert id(module.weight) in decay_ids
            if module.bias is not None:
                assert id(module.bias) in no_decay_set
        if isinstance(module, nn.MultiheadAttention):
            assert id(module.in_proj_weight) in decay_ids
            assert id(module.in_proj_bias) in no_decay_set
    assert n_norms > 0
    assert n_linears > 0
    # HF Trainer's rule, not timm's: 1-D embeddings and the projections decay
    named = dict(backbone.named_parameters())
    for name in ("model.visual.class_embedding", "model.visual.positional_embedding", "model.visual.proj"):
        assert id(named[name]) in decay_ids, name
    assert no_decay_set == {id(p) for n, p in named.items() if "bias" in n or ".ln_" in n}


def test_norms_are_found_by_module_type() -> None:
    class LlamaRMSNorm(nn.Module):  # a foreign norm: matched by its class name
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class Scaled(nn.LayerNorm):  # a subclass, named like nothing
        pass

    model = nn.Sequential(nn.Linear(4, 4), LlamaRMSNorm(), Scaled(4), nn.GroupNorm(2, 4), nn.Linear(4, 4))
    assert all(is_norm(m) for m in list(model)[1:4])
    assert not is_norm(model[0])
    exempt = no_decay_ids([model])
    expected = [model[0].bias, model[1].weight, model[2].weight, model[2].bias, model[3].weight]
    assert exempt == {id(p) for p in [*expected, model[3].bias, model[4].bias]}


@pytest.mark.parametrize("convention", ["torch-adamw", "hf-adamw"])
def test_make_adamw_puts_norms_and_biases_in_a_group_without_decay(convention: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    params = list(model.parameters())
    optimizer = make_adamw(params, 1e-3, 0.1, convention, no_decay=no_decay_ids([model]))  # type: ignore[arg-type]
    assert isinstance(optimizer, HFAdamW if convention == "hf-adamw" else torch.optim.AdamW)
    groups = [(g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
    assert groups == [(0.1, [id(model[0].weight)]), (0.0, [id(p) for p in params[1:]])]
    no_wd = make_adamw(params, 1e-3, 0.0, convention, no_decay=no_decay_ids([model]))  # type: ignore[arg-type]
    assert len(no_wd.param_groups) == 1


@pytest.mark.parametrize("name", ["finetune", "lisa", "lora"])
def test_full_and_lora_strategies_exempt_norms_and_biases_when_decay_is_on(name: str) -> None:
    backbone = tiny_backbone("tiny-clip")
    strategy_cls = STRATEGIES.get(name)
    cfg = config.build(strategy_cls.Config, {}, name)
    strategy = strategy_cls(cfg, backbone, head_for(backbone, 4), tiny_context())
    optimizer = strategy.make_optimizer(1e-3, 0.1)
    exempt = no_decay_ids([backbone])
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= exempt if group["weight_decay"] == 0 else not ids & exempt
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if name != "lora":
        assert any(g["weight_decay"] == 0 for g in optimizer.param_groups)
        assert held & exempt


@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_the_optimizer_convention_of_every_strategy(name: str) -> None:
    """SoRA and DyLoRA: hf-adamw (their official code's transformers AdamW); every other: torch-adamw."""
    strategy_cls = STRATEGIES.get(name)
    if not strategy_cls.trains:
        pytest.skip("does not train")
    backbone = tiny_backbone("tiny-clip")
    cfg = config.build(strategy_cls.Config, {}, name)
    strategy = strategy_cls(cfg, backbone, head_for(backbone, 4), tiny_context())
    expected = "hf-adamw" if name in ("sora", "dylora") else "torch-adamw"
    assert strategy.optimizer_convention() == expected
    optimizer = strategy.make_optimizer(1e-3, 0.0)
    if name == "dylora":
        assert optimizer.convention == "hf-adamw"  # type: ignore[attr-defined]
    elif expected == "hf-adamw":
        assert isinstance(optimizer, HFAdamW)
    elif name != "mora":  # mora builds its own torch AdamW (its betas)
        assert type(optimizer) is torch.optim.AdamW
