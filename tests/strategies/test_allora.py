"""ALLoRA (strategies/allora.py): forward, the row-scaled A/B gradients, the unscaled input gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bench import config
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from strategies.allora import ALLoRA, ALLoRAConfig, ALLoRALinear, row_scale
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context
from tests.peft_oracle import PeftLoRA

D_IN, D_OUT, R = 12, 10, 4


def make_layer(eta: float = 2.0, norm: str = "l2", seed: int = 0, zero_b: bool = False) -> ALLoRALinear:
    torch.manual_seed(seed)
    layer = ALLoRALinear(nn.Linear(D_IN, D_OUT), R, eta, norm)  # type: ignore[arg-type]
    if not zero_b:
        with torch.no_grad():
            layer.B.normal_()
    return layer


def grads(layer: nn.Module, params: list[torch.Tensor], x: torch.Tensor, w: torch.Tensor):
    """(output, dx, d params) of the loss sum(w * layer(x))."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.autograd.grad((out * w).sum(), [x, *params])
    return out.detach(), g[0], g[1:]


def inputs(seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D_IN, generator=gen, dtype=dtype)
    w = torch.randn(3, 5, D_OUT, generator=gen, dtype=dtype)  # upstream gradient delta
    return x, w


def test_c_equals_eta_exactly_at_zero_b() -> None:
    for eta in (2.0, 1.0, 3.0, 0.7, 2**0.5):
        layer = make_layer(eta=eta, zero_b=True)
        c = layer.row_scale()
        assert torch.equal(c, torch.full((D_OUT,), eta, dtype=torch.float32))


@pytest.mark.parametrize("norm", ["l2", "l2_squared"])
def test_c_matches_the_formula_on_the_dense_product(norm: str) -> None:
    layer = make_layer(norm=norm)
    n = torch.linalg.vector_norm((layer.B @ layer.A).double(), dim=1)
    n = n**2 if norm == "l2_squared" else n
    expected = 1.0 / torch.sqrt(n + 1.0 / 2.0**2)
    torch.testing.assert_close(layer.row_scale().double(), expected, rtol=1e-6, atol=0)


def test_c_decreases_as_a_row_norm_grows() -> None:
    layer = make_layer()
    previous = None
    for t in (0.0, 0.1, 0.5, 1.0, 3.0, 10.0):
        with torch.no_grad():
            layer.B[2] = t * torch.linspace(-1, 1, R)
        c = layer.row_scale()
        if previous is not None:
            assert c[2] < previous[2]
            others = [i for i in range(D_OUT) if i != 2]
            assert torch.equal(c[others], previous[others])
        previous = c
    assert previous is not None
    assert previous[2] < 0.5


def test_forward_is_w0x_plus_ba_x_without_scaling_or_dropout() -> None:
    layer = make_layer(eta=4.0).double()
    x, _ = inputs(dtype=torch.float64)
    expected = x @ layer.base.weight.t() + layer.base.bias + x @ (layer.B @ layer.A).t()
    layer.train()
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
    torch.testing.assert_close(train_out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(train_out.detach(), eval_out)
    assert not any(isinstance(m, nn.Dropout) for m in layer.modules())


def test_forward_and_input_gradient_equal_peft_lora_with_unit_scaling() -> None:
    layer = make_layer()
    ref = PeftLoRA(layer.base, layer.A.detach(), layer.B.detach(), alpha=R)  # alpha / r = 1
    x, w = inputs()
    out, dx, _ = grads(layer, [layer.A, layer.B], x, w)
    ref_out, ref_dx, _ = grads(ref, [ref.A], x, w)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=1e-6)


def test_ab_gradients_equal_the_row_scaled_reference() -> None:
    """Independent float64 reference: dB = (c*delta)^T (x A^T), dA = ((c*delta) B)^T x."""
    layer = make_layer().double()
    x, w = inputs(dtype=torch.float64)
    _, _, (dA, dB) = grads(layer, [layer.A, layer.B], x, w)
    A, B = layer.A.detach(), layer.B.detach()
    c = 1.0 / torch.sqrt(torch.linalg.vector_norm(B @ A, dim=1) + 1.0 / 4.0)
    delta = (w * c).reshape(-1, D_OUT)
    xf = x.reshape(-1, D_IN)
    torch.testing.assert_close(dB, delta.t() @ (xf @ A.t()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dA, (delta @ B).t() @ xf, rtol=1e-10, atol=1e-10)


def test_ab_gradients_equal_peft_with_the_output_rescaling_trick_but_input_gradients_do_not() -> None:
    """On peft's LoRA, y' = c*y + ((1-c)*y).detach() on the branch gives ALLoRA's dA, dB exactly,
    but it also rescales the input gradient, which ALLoRA must not do."""
    layer = make_layer()
    c = layer.row_scale()
    ref = PeftLoRA(layer.base, layer.A.detach(), layer.B.detach(), alpha=R)
    ref.up.register_forward_hook(lambda m, i, y: c * y + ((1 - c) * y).detach())
    x, w = inputs()
    _, dx, (dA, dB) = grads(layer, [layer.A, layer.B], x, w)
    _, ref_dx, (ref_dA, ref_dB) = grads(ref, [ref.A, ref.B], x, w)
    torch.testing.assert_close(dA, ref_dA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dB, ref_dB, rtol=1e-5, atol=1e-6)
    assert (dx - ref_dx).abs().max() > 1e-3


def test_at_zero_b_grad_b_is_eta_times_plain_lora_and_grad_a_is_zero() -> None:
    layer = make_layer(eta=2.0, zero_b=True)
    ref = PeftLoRA(layer.base, layer.A.detach(), layer.B.detach(), alpha=R)
    x, w = inputs()
    _, _, (dA, dB) = grads(layer, [layer.A, layer.B], x, w)
    _, _, (ref_dB,) = grads(ref, [ref.B], x, w)
    assert torch.count_nonzero(dA) == 0
    assert torch.count_nonzero(dB) > 0
    torch.testing.assert_close(dB, 2.0 * ref_dB, rtol=1e-6, atol=1e-6)


def test_degenerate_eta_one_at_zero_b_equals_peft_lora() -> None:
    """eta = 1 and B = 0 give c = 1: forward, input and A/B gradients are plain LoRA's (alpha/r = 1)."""
    layer = make_layer(eta=1.0, zero_b=True)
    ref = PeftLoRA(layer.base, layer.A.detach(), layer.B.detach(), alpha=R)
    ref_params = [ref.A, ref.B]
    x, w = inputs()
    out, dx, (dA, dB) = grads(layer, [layer.A, layer.B], x, w)
    ref_out, ref_dx, (ref_dA, ref_dB) = grads(ref, ref_params, x, w)
    for got, expected in ((out, ref_out), (dx, ref_dx), (dA, ref_dA), (dB, ref_dB)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_input_without_grad_still_gives_ab_gradients() -> None:
    layer = make_layer()
    x, w = inputs()
    (dA, dB) = torch.autograd.grad((layer(x) * w).sum(), [layer.A, layer.B])
    _, _, (dA2, dB2) = grads(layer, [layer.A, layer.B], x, w)
    torch.testing.assert_close(dA, dA2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dB, dB2, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_runs_the_function_in_bf16_and_keeps_fp32_parameter_grads() -> None:
    layer = make_layer()
    x, w = inputs()
    _, _, (dA, dB) = grads(layer, [layer.A, layer.B], x, w)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xg)
    assert out.dtype == torch.bfloat16
    (out.float() * w).sum().backward()
    assert layer.A.grad is not None
    assert layer.A.grad.dtype == torch.float32
    assert xg.grad is not None
    assert xg.grad.dtype == torch.float32
    torch.testing.assert_close(layer.A.grad, dA, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(layer.B.grad, dB, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("args", "message"),
    [({"r": 0}, "strategy.r"), ({"eta": 0.0}, "strategy.eta"), ({"eta": -2}, "strategy.eta")],
)
def test_bad_configuration_fails_with_one_line(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config.build(ALLoRAConfig, args, "allora")
    assert "\n" not in str(err.value)


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ConfigError, match="l2_squared"):
        config.build(ALLoRAConfig, {"norm": "l1"}, "allora")


def build(**args: object) -> ALLoRA:
    backbone = tiny_backbone("tiny-clip")
    cfg = config.build(ALLoRAConfig, args, "allora")
    return ALLoRA(cfg, backbone, head_for(backbone, 4), tiny_context())


def test_strategy_adapts_every_role_of_both_towers_and_trains_only_a_and_b() -> None:
    strategy = build()
    adapters = strategy.adapters()
    assert len(adapters) == 6 * 8  # tiny-clip: 4 + 4 blocks
    trainable = {id(p) for p in strategy.trainable_parameters()}
    expected = {id(p) for a in adapters.values() for p in (a.A, a.B)}
    assert trainable == expected
    assert strategy.report() == {"c_mean": 2.0, "c_min": 2.0, "eta": 2.0}


def test_step_scales_are_computed_batched_per_shape_and_live_only_until_after_backward() -> None:
    strategy = build()
    torch.manual_seed(3)
    for a in strategy.adapters().values():
        with torch.no_grad():
            a.B.normal_()
    fresh = {name: a.row_scale() for name, a in strategy.adapters().items()}
    buffers = {name: a.step_scale for name, a in strategy.adapters().items()}
    strategy.refresh_scales()
    for name, a in strategy.adapters().items():
        assert a.scale_fresh
        assert a.row_scale() is buffers[name]  # written in place: a CUDA graph reads this step's c
        torch.testing.assert_close(a.row_scale(), fresh[name], rtol=1e-6, atol=0)
    strategy.after_backward(0)
    assert not any(a.scale_fresh for a in strategy.adapters().values())
    with torch.no_grad():
        layers = list(strategy.adapters().values())
        layers[0].B.mul_(3.0)
    assert not torch.equal(layers[0].row_scale(), buffers[next(iter(buffers))])  # recomputed, not stale
    layers = list(strategy.adapters().values())[:3]  # same shape (q, k, v)
    batched = row_scale(torch.stack([a.A for a in layers]), torch.stack([a.B for a in layers]), 2.0)
    assert batched.shape == (3, layers[0].out_features)
    for a, c in zip(layers, batched, strict=True):
        torch.testing.assert_close(c, a.row_scale(), rtol=1e-6, atol=0)


def test_a_training_forward_refreshes_the_step_scales_and_an_evaluation_forward_does_not() -> None:
    strategy = build()
    torch.manual_seed(4)
    for a in strategy.adapters().values():
        with torch.no_grad():
            a.B.normal_()
    x = torch.randn(2, 3, strategy.backbone.image_size, strategy.backbone.image_size)
    info = experience_info(0, (0, 1), 4)
    with torch.no_grad():
        strategy.forward(x, info)
    assert not any(a.scale_fresh for a in strategy.adapters().values())
    assert all(torch.equal(a.step_scale, torch.ones_like(a.step_scale)) for a in strategy.adapters().values())
    strategy.forward(x, info)
    for a in strategy.adapters().values():
        assert a.scale_fresh
        torch.testing.assert_close(a.step_scale, row_scale(a.A, a.B, 2.0), rtol=1e-6, atol=0)


def test_merge_each_experience_keeps_the_function_and_starts_a_fresh_adapter() -> None:
    strategy = build(merge_each_experience=True)
    for a in strategy.adapters().values():
        with torch.no_grad():
            a.B.normal_(std=0.05)
    info = experience_info(0, (0, 1), 4, training=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    strategy.eval()
    with torch.no_grad():
        before = strategy.forward(x, info)
    strategy.after_experience(info)
    strategy.head.invalidate()
    with torch.no_grad():
        after = strategy.forward(x, info)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert all(torch.count_nonzero(a.B) == 0 for a in strategy.adapters().values())


def test_runs_end_to_end_and_reports(run_quick) -> None:
    record = run_quick("allora", strategy_args={"eta": 1.5, "norm": "l2_squared"})
    assert record.status == "ok"
    figures = record.experiences[-1].strategy
    assert 0 < figures["c_min"] <= figures["c_mean"] <= 1.5
    assert set(record.strategy_report) == {"scalars", "per_layer"}
    assert "2410.09692" in STRATEGIES.get("allora").paper
    assert "2410.09692" in STRATEGIES.entry("allora").description
