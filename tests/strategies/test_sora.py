"""SoRA (strategies/sora.py): gated forward, both thresholds, the proximal gate step, the xi schedule,
physical pruning of zero-gate ranks, and plain LoRA as the g = 1 special case."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cl_bench import config, loop
from cl_bench.errors import ConfigError
from cl_bench.optim import HFAdamW, SparseAdamW
from cl_bench.registry import STRATEGIES
from strategies.sora import (
    XI_END,
    SoRA,
    SoRAConfig,
    SoRALinear,
    code_threshold,
    soft_threshold,
    xi_stages,
)
from tests.core.test_cli import error_line, run_cli
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context
from tests.peft_oracle import PeftLoRA

D_IN, D_OUT, R, ALPHA = 12, 10, 4, 8.0


def make_layer(seed: int = 0) -> SoRALinear:
    torch.manual_seed(seed)
    layer = SoRALinear(nn.Linear(D_IN, D_OUT), R, ALPHA)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def x_and_w(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, D_IN, generator=gen, dtype=dtype), torch.randn(
        3, 5, D_OUT, generator=gen, dtype=dtype
    )


# ----------------------------------------------------------------------------- thresholds


def test_soft_threshold_on_a_hand_made_tensor() -> None:
    u = torch.tensor([-3.0, -1.5, -1.0, -0.5, -0.0, 0.0, 0.25, 1.0, 1.75, 4.0])
    got = soft_threshold(u, 1.0)
    assert got.tolist() == [-2.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75, 3.0]
    assert not torch.signbit(got[2:8]).any()  # zeros are +0.0


def test_soft_threshold_equals_the_closed_form_bitwise() -> None:
    u = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for lam in (1e-3, 0.1, 0.7, 2.5):
        closed = torch.sign(u) * torch.clamp(u.abs() - lam, min=0.0)
        got = soft_threshold(u, lam)
        assert torch.equal(got, closed)
        assert torch.all(got[u.abs() <= lam] == 0.0)


def test_code_threshold_on_a_hand_made_tensor() -> None:
    u = torch.tensor([-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    got = code_threshold(u, 1.0)
    # (xi, 2 xi) ends at 0; exactly +-xi is untouched; 2 xi shrinks to xi and survives
    assert got.tolist() == [-2.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.5]


def official_masked_updates(u: torch.Tensor, xi: float) -> torch.Tensor:
    """The three in-place masked updates of the official SparseAdamW, applied in turn."""
    p = u.clone()
    p[p > xi] -= xi
    p[p < -xi] += xi
    p[p.abs() < xi] = 0.0
    return p


def test_code_threshold_equals_the_official_three_step_update() -> None:
    u = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for xi in (1e-3, 0.1, 0.7):
        assert torch.equal(code_threshold(u, xi), official_masked_updates(u, xi))
    assert not torch.equal(code_threshold(u, 0.7), soft_threshold(u, 0.7))


# ----------------------------------------------------------------------------- layer


def test_forward_is_alpha_over_r_times_b_diag_g_a() -> None:
    layer = make_layer().double()
    x, _ = x_and_w(torch.float64)
    A, B, g = layer.A.detach(), layer.B.detach(), layer.gate.detach()
    expected = layer.base(x) + x @ ((ALPHA / R) * B @ torch.diag(g) @ A).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), (ALPHA / R) * B @ torch.diag(g) @ A, rtol=1e-12, atol=0)


def test_gate_fixed_to_one_and_frozen_is_peft_lora() -> None:
    layer = make_layer()
    with torch.no_grad():
        layer.gate.fill_(1.0)
    layer.gate.requires_grad_(False)
    ref = PeftLoRA(layer.base, layer.A.detach(), layer.B.detach(), ALPHA)
    x, w = x_and_w()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref_out = layer(xa), ref(xb)
    dA, dB = torch.autograd.grad((out * w).sum(), [layer.A, layer.B], retain_graph=True)
    (dx,) = torch.autograd.grad((out * w).sum(), [xa])
    ref_params = [ref.A, ref.B, xb]
    ref_dA, ref_dB, ref_dx = torch.autograd.grad((ref_out * w).sum(), ref_params)
    for got, expected in ((out, ref_out), (dx, ref_dx), (dA, ref_dA), (dB, ref_dB)):
        # fp32, 1e-6 relative and absolute: the fused layer sums in another order than peft (ulps)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_pruning_a_layer_removes_zero_gate_ranks_exactly_in_float64() -> None:
    layer = make_layer().double()
    with torch.no_grad():
        layer.gate[1] = 0.0
        layer.gate[3] = 0.0
    x, _ = x_and_w(torch.float64)
    before = layer(x)
    A, B = layer.A.detach().clone(), layer.B.detach().clone()
    layer.prune()
    assert layer.A.shape == (2, D_IN)
    assert layer.B.shape == (D_OUT, 2)
    assert torch.equal(layer.A, A[[0, 2]])
    assert torch.equal(layer.B, B[:, [0, 2]])
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        layer.gate.zero_()
    layer.prune()
    assert layer.A.shape == (0, D_IN)
    assert torch.equal(layer(x), layer.base(x))


# ----------------------------------------------------------------------------- strategy


def build(**args: object) -> SoRA:
    backbone = tiny_backbone("tiny-clip")
    cfg = config.build(SoRAConfig, {"towers": ["vision"], **args}, "sora")
    torch.manual_seed(1)
    return SoRA(cfg, backbone, head_for(backbone, 4), tiny_context(steps=(4, 4, 4)))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])


def test_the_main_optimizer_never_holds_the_gates() -> None:
    strategy = build()
    main = strategy.make_optimizer(1e-3, 0.1)
    gate_ids = {id(g) for g in strategy.gates()}
    main_ids = {id(p) for group in main.param_groups for p in group["params"]}
    assert not gate_ids & main_ids
    assert main_ids == {id(p) for a in strategy.adapters().values() for p in (a.A, a.B)}
    assert strategy.gate_optimizer is not None
    assert {id(p) for p in strategy.gate_optimizer.param_groups[0]["params"]} == gate_ids
    assert strategy.gate_optimizer.param_groups[0]["weight_decay"] == 0.0


def test_optimizers_default_to_the_official_conventions() -> None:
    """Main: transformers' AdamW (eps 1e-8 before the bias correction, decay after the update);
    gates: SparseAdamW (eps 1e-6, no decay); ``optimizer: torch-adamw`` gives torch's AdamW."""
    strategy = build()
    assert strategy.cfg.optimizer == "hf-adamw"
    main = strategy.make_optimizer(1e-3, 0.1)
    assert type(main) is HFAdamW
    assert [g["eps"] for g in main.param_groups] == [1e-8]
    assert type(strategy.gate_optimizer) is SparseAdamW
    assert strategy.gate_optimizer.param_groups[0]["eps"] == 1e-6
    torch_main = build(optimizer="torch-adamw").make_optimizer(1e-3, 0.1)
    assert type(torch_main) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="optimizer"):
        SoRAConfig(optimizer="sgd")  # type: ignore[arg-type]


def test_the_main_optimizer_exempts_a_linear_heads_bias_from_decay() -> None:
    backbone = tiny_backbone("tiny-vit")
    cfg = config.build(SoRAConfig, {}, "sora")
    strategy = SoRA(cfg, backbone, head_for(backbone, 4), tiny_context())
    main = strategy.make_optimizer(1e-3, 0.1)
    bias = strategy.head.linear.bias
    (exempt,) = [g for g in main.param_groups if g["weight_decay"] == 0.0]
    assert [id(p) for p in exempt["params"]] == [id(bias)]
    assert all(id(p) != id(bias) for g in main.param_groups if g["weight_decay"] == 0.1 for p in g["params"])


@pytest.mark.parametrize("threshold", ["paper", "code"])
def test_a_gate_step_is_adam_then_the_threshold_and_zeroes_every_small_gate(threshold: str) -> None:
    lr = 0.05
    xi = 20.0 if threshold == "paper" else 1.0  # lambda = lr * xi = 1.0 or xi = 1.0
    strategy = build(threshold=threshold, xi=[xi])
    strategy.train()
    info = experience_info(0, (0, 1), 4)
    strategy.before_experience(info)
    main = strategy.make_optimizer(lr, 0.0)
    x, y = batch()
    gates: list[torch.Tensor] = []
    gate_step = strategy.after_step

    def after_step(step: int) -> None:
        """The official gate optimizer's Adam step (eps 1e-6) on copies, then the strategy's own."""
        gates.extend(g.detach().clone().requires_grad_(True) for g in strategy.gates())
        for clone, g in zip(gates, strategy.gates(), strict=True):
            clone.grad = g.grad.clone()
        SparseAdamW(gates, lr=lr).step()
        gate_step(step)

    strategy.after_step = after_step  # type: ignore[method-assign]
    loop.train_step(strategy, main, None, x, y, info, 0, device=torch.device("cpu"), precision="fp32")
    assert len(gates) == len(strategy.gates())
    assert strategy.threshold == 1.0
    u = torch.cat([g.detach() for g in gates])
    got = torch.cat([g.detach() for g in strategy.gates()])
    expected = soft_threshold(u, 1.0) if threshold == "paper" else official_masked_updates(u, 1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    small = u.abs() < 1.0
    assert small.any()
    assert (~small).any()
    assert torch.all(got[small] == 0.0)
    assert all(g.grad is None for g in strategy.gates())


def loop_steps(
    strategy: SoRA, main: torch.optim.Optimizer, scheduler: Any, n_steps: int
) -> list[tuple[float, float, float]]:
    """The loop's own step (``cl_bench.loop.train_step``) on a fixed batch. Per step: the main
    learning rate its ``step()`` used, then the gate optimizer's lr and ``strategy.threshold``
    after ``after_step`` (the gate step)."""
    info = experience_info(0, (0, 1), 4)
    x, y = batch()
    strategy.train()
    seen = []
    for step in range(n_steps):
        lr_t = main.param_groups[0]["lr"]  # the scheduler steps after the main optimizer
        loop.train_step(
            strategy, main, scheduler, x, y, info, step, device=torch.device("cpu"), precision="fp32"
        )
        assert strategy.gate_optimizer is not None
        seen.append((lr_t, strategy.gate_optimizer.param_groups[0]["lr"], strategy.threshold))
    return seen


@pytest.mark.parametrize("threshold", ["paper", "code"])
@pytest.mark.parametrize("gate_lr", [0.0, 2e-2])
@pytest.mark.parametrize("schedule", ["cosine", "warmup"])
def test_gate_learning_rate_and_threshold_follow_the_main_schedule(
    schedule: str, gate_lr: float, threshold: str
) -> None:
    """lambda = eta_t * xi in paper mode, with eta_t the gate lr of step t: the main lr of that
    step (``gate_lr`` 0) or ``gate_lr`` scaled by the same schedule factor; xi in code mode."""
    lr, xi, n_steps = 1e-2, 0.3, 6
    strategy = build(threshold=threshold, xi=[xi], gate_lr=gate_lr)
    strategy.before_experience(experience_info(0, (0, 1), 4))
    main = strategy.make_optimizer(lr, 0.0)
    run = config.resolve([{"lr_schedule": "cosine", "warmup_steps": 0 if schedule == "cosine" else 2}])
    seen = loop_steps(strategy, main, loop.make_scheduler(main, run, n_steps), n_steps)
    assert len({lr_t for lr_t, _, _ in seen}) == n_steps  # the schedule changes the lr at every step
    for lr_t, gate_lr_t, lam in seen:
        eta_t = (gate_lr or lr) * lr_t / lr
        assert gate_lr_t == pytest.approx(eta_t, rel=1e-12)
        assert lam == pytest.approx(eta_t * xi if threshold == "paper" else xi, rel=1e-12)


def test_xi_schedule_one_stage_per_experience_growing_along_the_stream() -> None:
    cfg = config.build(SoRAConfig, {"xi_start": 0.0, "xi_end": 0.6}, "sora")
    assert xi_stages(cfg, 4) == pytest.approx([0.0, 0.2, 0.4, 0.6])
    cfg = config.build(SoRAConfig, {"xi_schedule": "exp_linear", "xi_start": 0.01, "xi_end": 1.0}, "sora")
    assert xi_stages(cfg, 3) == pytest.approx([0.01, 0.1, 1.0])
    cfg = config.build(SoRAConfig, {"xi_schedule": "log_linear", "xi_start": 0.0, "xi_end": 1.0}, "sora")
    assert xi_stages(cfg, 3) == pytest.approx(np.log(np.linspace(1.0, math.e, 3)).tolist())
    strategy = build(xi_start=0.1, xi_end=0.3, experiences_per_stage=2)
    assert strategy.stages == pytest.approx([0.1, 0.3])  # ceil(3 / 2) stages
    seen = []
    for i in range(3):
        strategy.before_experience(experience_info(i, (0,), 4))
        seen.append(strategy.xi)
    assert seen == pytest.approx([0.1, 0.1, 0.3])
    listed = build(xi=[0.5, 0.25])
    listed.before_experience(experience_info(2, (0,), 4))
    assert listed.xi == 0.25  # the last stage repeats


def test_xi_defaults_depend_on_the_threshold_mode_and_explicit_values_are_kept() -> None:
    """Paper mode: xi in step-size units, 0 -> 0.5; code mode: absolute, 0 -> 7e-4 (the official
    schedule script's xi_max, STRATEGIES.md Part B §3)."""
    paper = config.build(SoRAConfig, {}, "sora")
    code = config.build(SoRAConfig, {"threshold": "code"}, "sora")
    assert (paper.xi_start, paper.xi_end) == (0.0, 0.5) == (0.0, XI_END["paper"])
    assert (code.xi_start, code.xi_end) == (0.0, 7e-4) == (0.0, XI_END["code"])
    assert xi_stages(code, 8) == pytest.approx(np.linspace(0.0, 7e-4, 8).tolist())
    assert config.build(SoRAConfig, {"threshold": "code", "xi_end": 0.5}, "sora").xi_end == 0.5
    assert config.build(SoRAConfig, {"xi_end": 7e-4}, "sora").xi_end == 7e-4
    assert SoRAConfig(threshold="code").xi_end == 7e-4  # direct construction resolves it too
    assert config.to_dict(code)["xi_end"] == 7e-4  # the run record holds the value used


@pytest.mark.parametrize("threshold", ["paper", "code"])
def test_default_xi_keeps_the_gates_alive_over_a_short_run(run_quick, threshold: str) -> None:
    """12 steps per experience at the last stage's xi: an absolute xi of 0.5 in code mode would
    shrink every gate by 0.5 a step and kill all of them (|g| < 6.5 dies in 12 steps)."""
    record = run_quick("sora", strategy_args={"threshold": threshold}, steps=12)
    assert record.status == "ok"
    last = record.experiences[-1].strategy
    assert last["xi"] == XI_END[threshold]
    assert last["live_gates"] >= 0.9 * last["total_gates"]
    if threshold == "code":
        assert last["threshold"] == 7e-4
    else:  # lambda = eta_t * xi at the last step of a cosine schedule from the default lr
        assert 0.0 < last["threshold"] < SoRA.default_lr * 0.5
    assert record.config["strategy_args"]["xi_end"] == XI_END[threshold]


def test_l1_term_is_added_to_the_loss() -> None:
    strategy = build(l1=0.5)
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    info = experience_info(0, (0, 1), 4)
    gates = torch.cat([g.detach() for g in strategy.gates()])
    expected = torch.nn.functional.cross_entropy(logits, y) + 0.5 * gates.abs().mean()
    torch.testing.assert_close(strategy.loss(logits, y, info), expected)
    assert torch.equal(build().loss(logits, y, info), torch.nn.functional.cross_entropy(logits, y))


def kill_some_gates(strategy: SoRA) -> None:
    with torch.no_grad():
        for i, g in enumerate(strategy.gates()):
            g[i % g.numel()] = 0.0
            g[(i + 3) % g.numel()] = 0.0
        for a in strategy.adapters().values():
            a.B.normal_(std=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruned_model_gives_the_same_logits_and_fewer_parameters(dtype: torch.dtype) -> None:
    """Exact in float64 (issue 8, STRATEGIES.md Part B §3); in fp32 within 1e-6, since the shorter
    rank reduction may sum in another order."""
    strategy = build()
    kill_some_gates(strategy)
    strategy.backbone.to(dtype)
    strategy.head.to(dtype)
    info = experience_info(0, (0, 1), 4, training=False)
    x = batch()[0].to(dtype)
    strategy.eval()
    with torch.no_grad():
        before = strategy.forward(x, info)
    full = {name: (a.A, a.B, a.gate) for name, a in strategy.adapters().items()}
    n_before = strategy.n_added()
    live = strategy.live_per_layer()
    with strategy.final_variants()["pruned"]():
        strategy.eval()
        assert all(a.A.shape[0] == live[name] for name, a in strategy.adapters().items())
        assert all(torch.count_nonzero(a.gate) == a.gate.numel() for a in strategy.adapters().values())
        assert strategy.n_added() == strategy.n_active() < n_before
        with torch.no_grad():
            pruned = strategy.forward(x, info)
    if dtype == torch.float64:
        assert torch.equal(pruned, before)
    else:
        assert (pruned - before).abs().max() <= 1e-6
    reference = tiny_backbone("tiny-clip").to(dtype)
    reference.eval()
    with torch.no_grad():
        plain = head_for(reference, 4).to(dtype)(reference.encode_image(x), info.logit_classes)
    assert (before - plain).abs().max() > 1e-3  # the live ranks do change the function
    for name, a in strategy.adapters().items():  # the full adapters are back, as the same tensors
        assert (a.A, a.B, a.gate) == full[name]


def test_n_active_counts_the_parameters_of_live_ranks() -> None:
    strategy = build()
    assert strategy.n_active() == strategy.n_added()
    kill_some_gates(strategy)
    expected = sum(
        int(torch.count_nonzero(a.gate)) * (a.in_features + a.out_features + 1)
        for a in strategy.adapters().values()
    )
    assert strategy.n_active() == expected < strategy.n_added()
    report = strategy.report()
    assert report["total_gates"] == 6 * 4 * 8
    assert report["live_gates"] == report["total_gates"] - 2 * 6 * 4
    assert report["live_gates_vision"] == report["live_gates"]


def test_merge_each_experience_keeps_the_function_and_starts_fresh() -> None:
    strategy = build(merge_each_experience=True)
    kill_some_gates(strategy)
    info = experience_info(0, (0, 1), 4, training=False)
    x, _ = batch()
    strategy.eval()
    with torch.no_grad():
        before = strategy.forward(x, info)
        strategy.after_experience(info)
        strategy.head.invalidate()
        after = strategy.forward(x, info)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert all(torch.count_nonzero(a.B) == 0 for a in strategy.adapters().values())
    assert all(torch.count_nonzero(a.gate) == a.gate.numel() for a in strategy.adapters().values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"r": 0}, "strategy.r"),
        ({"alpha": -1.0}, "strategy.alpha"),
        ({"threshold": "hard"}, "paper"),
        ({"xi_end": -0.1}, "strategy.xi_end"),
        ({"xi": [0.1, -1.0]}, "strategy.xi"),
        ({"xi_schedule": "exp_linear"}, "xi_start > 0"),
        ({"experiences_per_stage": 0}, "strategy.experiences_per_stage"),
    ],
)
def test_bad_configuration_fails_with_one_line(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config.build(SoRAConfig, args, "sora")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("strategy.r=0", "strategy.r must be >= 1, got 0"),
        ("strategy.threshold=hard", "strategy 'sora' config.threshold: 'hard' is not one of paper, code"),
        ("strategy.xi_end=-1", "strategy.xi_end must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_config_through_the_cli_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, setting: str, message: str
) -> None:
    args = ["--strategy", "sora", "--scenario", "synthetic", "--set", setting]
    code, _, err = run_cli(capsys, "run", "--no-progress", "--out", str(tmp_path), *args)
    assert code == 2
    assert error_line(err).startswith(f"error: {message}")


def test_runs_end_to_end_records_live_gates_and_the_pruned_variant(run_quick) -> None:
    # lambda = lr * xi = 5e-4 * 400 = 0.2 per step: gates below ~0.2 die in the first steps
    record = run_quick("sora", strategy_args={"xi": [0.0, 400.0]}, steps=3)
    assert record.status == "ok"
    first, last = (e.strategy for e in record.experiences)
    assert first["live_gates"] == first["total_gates"]  # xi = 0 in the first experience
    assert last["xi"] == 400.0
    assert last["live_gates"] < first["live_gates"]
    assert record.experiences[-1].n_active < record.experiences[-1].n_added
    report = record.strategy_report
    assert sum(report["per_layer"]["live_gates"].values()) == last["live_gates"]
    assert report["curves"]["live_gates"]["y"] == [first["live_gates"], last["live_gates"]]
    assert len(report["events"]["live_gates_per_layer"]) == 2 * len(report["per_layer"]["live_gates"])
    assert record.accuracy["variants"]["pruned"]["row"] == record.accuracy["matrix"][-1]
    assert "2311.11696" in STRATEGIES.get("sora").paper
    assert "2311.11696" in STRATEGIES.entry("sora").description
