"""DyLoRA (strategies/dylora.py): nested-rank forward, frozen/full gradients, truly frozen ranks under
AdamW, per-step shared rank sampling, evaluation ranks and the accuracy-vs-rank variants."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from cl_bench import config, loop
from cl_bench.errors import ConfigError
from cl_bench.optim import HFAdamW
from cl_bench.registry import STRATEGIES
from strategies.dylora import DyLoRA, DyLoRAConfig, DyLoRALinear, RankwiseAdamW
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context
from tests.peft_oracle import PeftLoRA

D_IN, D_OUT, R_MAX, ALPHA = 12, 10, 8, 16.0
CPU = torch.device("cpu")


def make_layer(mode: str = "frozen", seed: int = 0, zero_b: bool = False) -> DyLoRALinear:
    torch.manual_seed(seed)
    layer = DyLoRALinear(nn.Linear(D_IN, D_OUT), R_MAX, ALPHA, mode)  # type: ignore[arg-type]
    if not zero_b:
        with torch.no_grad():
            layer.Bt.normal_(std=0.1)
    return layer


def x_and_w(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, D_IN, generator=gen, dtype=dtype)
    return x, torch.randn(3, 5, D_OUT, generator=gen, dtype=dtype)


def backward(layer: DyLoRALinear, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(w * layer(x)) w.r.t. A [r_max, d_in] and B^T [r_max, d_out]."""
    layer.A.grad = layer.Bt.grad = None
    (layer(x) * w).sum().backward()
    assert layer.A.grad is not None
    assert layer.Bt.grad is not None
    return layer.A.grad, layer.Bt.grad


def nonzero_rows(grad: torch.Tensor) -> list[int]:
    return [i for i in range(grad.shape[0]) if torch.count_nonzero(grad[i]) > 0]


# ----------------------------------------------------------------------------- layer maths


def test_zero_b_gives_the_base_output_at_every_rank() -> None:
    layer = make_layer(zero_b=True)
    x, _ = x_and_w()
    for b in range(1, R_MAX + 1):
        layer.set_rank(b)
        assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("training", [True, False])
def test_forward_at_rank_b_is_alpha_over_b_times_the_truncated_product(training: bool) -> None:
    layer = make_layer().double()
    layer.train(training)
    x, _ = x_and_w(torch.float64)
    A, B = (t.detach() for t in layer.weights())
    for b in range(1, R_MAX + 1):
        layer.set_rank(b)
        expected = layer.base(x) + (ALPHA / b) * (x @ A[:b].t() @ B[:, :b].t())
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.delta_weight(), (ALPHA / b) * B[:, :b] @ A[:b], rtol=1e-12, atol=0)


@pytest.mark.parametrize("b", [1, 3, 5, 8])
def test_nested_truncation_equals_zero_padding_at_r_max_with_scale_alpha_over_b(b: int) -> None:
    layer = make_layer().double()
    x, _ = x_and_w(torch.float64)
    A, B = (t.detach().clone() for t in layer.weights())
    padded = DyLoRALinear(layer.base, R_MAX, ALPHA * R_MAX / b).double()  # alpha' / r_max = alpha / b
    A[b:] = 0
    B[:, b:] = 0
    padded.load_weights(A, B)
    padded.set_rank(R_MAX)
    layer.set_rank(b)
    torch.testing.assert_close(padded(x), layer(x), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("b", [1, 2, 5, 8])
def test_frozen_mode_only_the_b_th_row_and_column_receive_gradient(b: int) -> None:
    layer = make_layer("frozen")
    layer.set_rank(b)
    grad_A, grad_Bt = backward(layer, *x_and_w())
    assert nonzero_rows(grad_A) == [b - 1]
    assert nonzero_rows(grad_Bt) == [b - 1]
    assert torch.count_nonzero(grad_A[b - 1]) == D_IN
    assert torch.count_nonzero(grad_Bt[b - 1]) == D_OUT


@pytest.mark.parametrize("b", [1, 4, 8])
def test_full_mode_trains_the_first_b_ranks_and_leaves_the_rest(b: int) -> None:
    layer = make_layer("full")
    layer.set_rank(b)
    grad_A, grad_Bt = backward(layer, *x_and_w())
    assert nonzero_rows(grad_A) == list(range(b))
    assert nonzero_rows(grad_Bt) == list(range(b))


def test_frozen_gradients_equal_autograd_through_detached_lower_ranks() -> None:
    """Reference: the official construction, cat(A[:b-1].detach(), A[b-1]) through plain autograd.

    In float64: the fused layer and the reference sum in different orders, so fp32 differs by ulps.
    """
    layer = make_layer("frozen").double()
    x, w = x_and_w(torch.float64)
    for b in (1, 3, 8):
        layer.set_rank(b)
        xa = x.clone().requires_grad_(True)
        (layer(xa) * w).sum().backward()
        A, Bt = layer.A, layer.Bt
        A_b = torch.cat([A[: b - 1].detach(), A[b - 1 : b]])
        Bt_b = torch.cat([Bt[: b - 1].detach(), Bt[b - 1 : b]])
        xb = x.clone().requires_grad_(True)
        ref = layer.base(xb) + (ALPHA / b) * (xb @ A_b.t() @ Bt_b)
        ref_dx, ref_dA, ref_dBt = torch.autograd.grad((ref * w).sum(), [xb, A, Bt])
        torch.testing.assert_close(xa.grad, ref_dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.A.grad, ref_dA, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.Bt.grad, ref_dBt, rtol=1e-12, atol=1e-12)
        layer.A.grad = layer.Bt.grad = None


def test_full_mode_at_r_max_equals_peft_lora() -> None:
    layer = make_layer("full")
    layer.set_rank(R_MAX)
    A, B = (t.detach() for t in layer.weights())
    ref = PeftLoRA(layer.base, A, B, ALPHA)
    x, w = x_and_w()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref_out = layer(xa), ref(xb)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.A.grad, ref.A.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.Bt.grad.t(), ref.B.grad, rtol=1e-6, atol=1e-6)


def test_frozen_mode_at_rank_one_equals_peft_lora_of_rank_one() -> None:
    layer = make_layer("frozen")
    layer.set_rank(1)
    A, B = (t.detach() for t in layer.weights())
    ref = PeftLoRA(layer.base, A[:1], B[:, :1], ALPHA)  # scaling alpha / 1
    x, w = x_and_w()
    out, ref_out = layer(x), ref(x)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    # fp32, different summation orders (the rank weight alpha / b multiplies B before the GEMMs)
    torch.testing.assert_close(layer.A.grad[:1], ref.A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.Bt.grad[:1].t(), ref.B.grad, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_computes_in_bf16_with_fp32_parameter_gradients() -> None:
    layer = make_layer("full")
    layer.set_rank(5)
    x, w = x_and_w()
    grad_A, grad_Bt = (g.clone() for g in backward(layer, x, w))
    layer.A.grad = layer.Bt.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    (out.float() * w).sum().backward()
    assert layer.A.grad.dtype == torch.float32
    # bf16 arithmetic: compare as relative norms (single elements can cancel to noise)
    for got, want in ((layer.A.grad, grad_A), (layer.Bt.grad, grad_Bt)):
        assert float((got - want).norm() / want.norm()) < 2e-2


# ----------------------------------------------------------------------------- the optimizer


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_rankwise_adamw_is_torch_adamw_with_each_rank_as_its_own_parameter(mode: str) -> None:
    """Bitwise: a torch AdamW per rank (rows of A and B^T), stepped only when its rank trains."""
    layer = make_layer(mode)
    ranks = [layer.rank]
    optimizer = RankwiseAdamW([layer], [], lambda: layer.trained_ranks(), lr=0.05, weight_decay=0.1)
    rows = [
        (nn.Parameter(layer.A[i].detach().clone()), nn.Parameter(layer.Bt[i].detach().clone()))
        for i in range(R_MAX)
    ]
    reference = [torch.optim.AdamW(list(row), lr=0.05, weight_decay=0.1, foreach=True) for row in rows]
    x, w = x_and_w()
    for b in (8, 3, 5, 3, 1, 8, 2, 3):
        ranks.append(b)
        layer.set_rank(b)
        grad_A, grad_Bt = backward(layer, x, w)
        for i in layer.trained_ranks():
            rows[i][0].grad, rows[i][1].grad = grad_A[i].clone(), grad_Bt[i].clone()
            reference[i].step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i in range(R_MAX):
            assert torch.equal(layer.A[i], rows[i][0])
            assert torch.equal(layer.Bt[i], rows[i][1])
    trained = [sum(i in range(b - 1 if mode == "frozen" else 0, b) for b in ranks[1:]) for i in range(R_MAX)]
    assert optimizer.rank_steps == trained


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_rankwise_hf_adamw_is_hf_adamw_with_each_rank_as_its_own_parameter(mode: str) -> None:
    """Bitwise: an HFAdamW (transformers' arithmetic) per rank, stepped only when its rank trains;
    and not torch AdamW's numbers (the conventions differ in eps placement and decay order)."""
    layer = make_layer(mode)
    optimizer = RankwiseAdamW(
        [layer], [], lambda: layer.trained_ranks(), lr=0.05, weight_decay=0.1, convention="hf-adamw"
    )
    twin = make_layer(mode)
    twin.load_weights(layer.A.detach(), layer.Bt.detach().t())
    torch_optimizer = RankwiseAdamW([twin], [], lambda: twin.trained_ranks(), lr=0.05, weight_decay=0.1)
    rows = [
        (nn.Parameter(layer.A[i].detach().clone()), nn.Parameter(layer.Bt[i].detach().clone()))
        for i in range(R_MAX)
    ]
    reference = [HFAdamW(list(row), lr=0.05, eps=1e-8, weight_decay=0.1) for row in rows]
    x, w = x_and_w()
    for b in (8, 3, 5, 3, 1, 8, 2, 3):
        layer.set_rank(b)
        twin.set_rank(b)
        grad_A, grad_Bt = backward(layer, x, w)
        backward(twin, x, w)
        for i in layer.trained_ranks():
            rows[i][0].grad, rows[i][1].grad = grad_A[i].clone(), grad_Bt[i].clone()
            reference[i].step()
        for opt in (optimizer, torch_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
        for i in range(R_MAX):
            assert torch.equal(layer.A[i], rows[i][0])
            assert torch.equal(layer.Bt[i], rows[i][1])
    assert all(
        reference[i].state[rows[i][0]]["step"] == optimizer.rank_steps[i] for i in layer.trained_ranks()
    )
    assert not torch.equal(layer.A, twin.A)


def test_the_default_optimizer_is_hf_adamw_and_a_heads_bias_gets_no_decay() -> None:
    strategy = build("tiny-vit")
    assert strategy.cfg.optimizer == "hf-adamw"
    optimizer = strategy.make_optimizer(lr=1e-2, weight_decay=0.1)
    assert isinstance(optimizer, RankwiseAdamW)
    assert optimizer.convention == "hf-adamw"
    assert isinstance(optimizer.inner, HFAdamW)
    groups = [(g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.inner.param_groups]
    head = strategy.head.linear
    assert groups == [(0.1, [id(head.weight)]), (0.0, [id(head.bias)])]
    torch_optimizer = build("tiny-vit", optimizer="torch-adamw").make_optimizer(lr=1e-2, weight_decay=0.1)
    assert isinstance(torch_optimizer, RankwiseAdamW)
    assert torch_optimizer.convention == "torch-adamw"
    assert type(torch_optimizer.inner) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="optimizer"):
        DyLoRAConfig(optimizer="sgd")  # type: ignore[arg-type]


def build(backbone: str = "tiny-clip", **args: object) -> DyLoRA:
    model = tiny_backbone(backbone)
    cfg = config.build(DyLoRAConfig, args, "dylora")
    torch.manual_seed(1)
    return DyLoRA(cfg, model, head_for(model, 4), tiny_context())


def train_step(
    strategy: DyLoRA,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int = 0,
    *,
    rank: int | None = None,
    scheduler: Any = None,
) -> None:
    """The loop's own step (``cl_bench.loop.train_step``, every hook); with ``rank``, the rank its
    ``before_step`` samples is ``rank``."""
    if rank is not None:
        strategy.sample_rank = lambda: rank  # type: ignore[method-assign]
    info = experience_info(0, (0, 1), 4)
    loop.train_step(strategy, optimizer, scheduler, x, y, info, step, device=CPU, precision="fp32")


def test_frozen_ranks_stay_bitwise_unchanged_through_adamw_with_momentum_and_weight_decay() -> None:
    strategy = build(towers=["vision"], mode="frozen")
    with torch.no_grad():
        for a in strategy.adapters().values():
            a.Bt.normal_(std=0.05)  # B != 0: every rank's A row gets a gradient too
    strategy.train()
    optimizer = strategy.make_optimizer(lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    for step, b in enumerate((8, 7, 6, 5, 4, 3, 2, 1)):  # every rank trains once: momentum everywhere
        train_step(strategy, optimizer, x, y, step, rank=b)
        assert strategy.rank == b
    for a in strategy.adapters().values():
        for p in (a.A, a.Bt):
            assert all(torch.count_nonzero(optimizer.state[p]["exp_avg"][i]) > 0 for i in range(R_MAX))
    before = {name: (a.A.detach().clone(), a.Bt.detach().clone()) for name, a in strategy.adapters().items()}
    b = 4
    train_step(strategy, optimizer, x, y, 8, rank=b)
    for name, a in strategy.adapters().items():
        for kind, p, old in (("A", a.A, before[name][0]), ("Bt", a.Bt, before[name][1])):
            for i in range(R_MAX):
                if i == b - 1:
                    assert not torch.equal(p[i], old[i]), f"{name} {kind}[{i}] did not learn"
                else:
                    assert torch.equal(p[i], old[i]), f"{name} {kind}[{i}] moved"
    # the check has teeth: a plain AdamW (the official setting) moves rows whose gradient is zero
    a = strategy.adapters()["vision.1.fc1"]
    plain = torch.optim.AdamW([a.A], lr=1e-2, weight_decay=0.1)
    old = a.A.detach().clone()
    for step in (9, 10):
        train_step(strategy, plain, x, y, step, rank=8)
    assert not torch.equal(a.A[0], old[0])


def test_parameters_outside_the_adapters_are_stepped_with_the_scheduled_lr() -> None:
    strategy = build("tiny-vit")  # linear head: trainable, not an adapter
    strategy.train()
    optimizer = strategy.make_optimizer(lr=1e-2, weight_decay=0.0)
    assert isinstance(optimizer, RankwiseAdamW)
    assert optimizer.inner is not None
    head = strategy.head.linear.weight
    scheduler = loop.make_scheduler(optimizer, config.resolve([{"lr_schedule": "cosine"}]), 4)
    old = head.detach().clone()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    train_step(strategy, optimizer, x, y, 0, scheduler=scheduler)
    assert not torch.equal(head, old)
    scheduled = optimizer.param_groups[1]["lr"]  # the cosine's lr for step 1
    train_step(strategy, optimizer, x, y, 1, scheduler=scheduler)
    assert optimizer.inner.param_groups[0]["lr"] == scheduled < 1e-2


def test_rank_is_sampled_uniformly_once_per_step_and_shared_by_all_layers() -> None:
    strategy = build()
    adapters = list(strategy.adapters().values())
    counts = [0] * R_MAX
    sequence = []
    for step in range(4000):
        strategy.before_step(step)
        ranks = {a.rank for a in adapters}
        assert len(ranks) == 1
        b = ranks.pop()
        counts[b - 1] += 1
        sequence.append(b)
    assert all(400 <= c <= 600 for c in counts), counts  # expected 500, sd ~21
    chi2 = sum((c - 500) ** 2 / 500 for c in counts)
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    again = build()
    replay = []
    for step in range(50):
        again.before_step(step)
        replay.append(again.last_rank)
    assert replay == sequence[:50]
    assert strategy.final_report()["curves"]["sampled_ranks"]["y"] == counts


def test_evaluation_uses_the_eval_rank_not_the_last_sampled_one() -> None:
    strategy = build()
    strategy.train()
    strategy.before_step(0)
    while strategy.last_rank == R_MAX:
        strategy.before_step(1)
    strategy.eval()
    assert {a.rank for a in strategy.adapters().values()} == {R_MAX}
    other = build(eval_rank=3)
    other.eval()
    assert {a.rank for a in other.adapters().values()} == {3}


def test_final_variants_evaluate_at_each_rank_and_restore_the_eval_rank() -> None:
    strategy = build(eval_ranks=[1, 2, 4, 8])
    variants = strategy.final_variants()
    assert list(variants) == ["rank=1", "rank=2", "rank=4", "rank=8"]
    for label, make in variants.items():
        with make():
            strategy.eval()  # what the loop does inside the variant
            assert {a.rank for a in strategy.adapters().values()} == {int(label.split("=")[1])}
        strategy.eval()
        assert {a.rank for a in strategy.adapters().values()} == {R_MAX}


def test_merge_each_experience_merges_at_the_eval_rank_and_starts_fresh() -> None:
    strategy = build(merge_each_experience=True)
    with torch.no_grad():
        for a in strategy.adapters().values():
            a.Bt.normal_(std=0.05)
    info = experience_info(0, (0, 1), 4, training=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    strategy.eval()
    with torch.no_grad():
        before = strategy.forward(x, info)
        strategy.after_experience(info)
        strategy.head.invalidate()
        after = strategy.forward(x, info)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert all(torch.count_nonzero(a.Bt) == 0 for a in strategy.adapters().values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"r_max": 0}, "strategy.r_max"),
        ({"alpha": 0.0}, "strategy.alpha"),
        ({"r_max": 4, "eval_ranks": [1, 8]}, "strategy.eval_ranks"),
        ({"eval_ranks": [0, 2]}, "strategy.eval_ranks"),
        ({"eval_ranks": [2, 2]}, "strategy.eval_ranks"),
        ({"eval_rank": 9}, "strategy.eval_rank"),
        ({"mode": "partial"}, "frozen"),
    ],
)
def test_bad_configuration_fails_with_one_line(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config.build(DyLoRAConfig, args, "dylora")
    assert "\n" not in str(err.value)


def test_runs_end_to_end_with_the_accuracy_vs_rank_variants(run_quick) -> None:
    record = run_quick("dylora", strategy_args={"eval_ranks": [1, 8], "mode": "full"}, steps=4)
    assert record.status == "ok"
    variants = record.accuracy["variants"]
    assert list(variants) == ["main", "rank=1", "rank=8"]  # "main": the unchanged model, the speed baseline
    assert variants["rank=8"]["row"] == record.accuracy["matrix"][-1]  # the main eval is at r_max
    assert record.experiences[-1].strategy["eval_rank"] == R_MAX
    assert 1 <= record.experiences[-1].strategy["mean_sampled_rank"] <= R_MAX
    assert sum(record.strategy_report["curves"]["sampled_ranks"]["y"]) == 8
    assert "2210.07558" in STRATEGIES.get("dylora").paper
    assert "2210.07558" in STRATEGIES.entry("dylora").description


@pytest.mark.parametrize(
    ("r_max", "ranks"), [(8, (1, 2, 4, 8)), (4, (1, 2, 4)), (6, (1, 2, 4, 6)), (1, (1,))]
)
def test_default_eval_ranks_are_powers_of_two_and_r_max(r_max: int, ranks: tuple[int, ...]) -> None:
    assert config.build(DyLoRAConfig, {"r_max": r_max}, "dylora").eval_ranks == ranks


def test_every_layer_reads_one_rank_state_updated_in_place() -> None:
    """What lets one CUDA graph serve every sampled rank: all layers read the same rank tensors,
    and a new rank rewrites them in place (same storage), with the rank weights and mask of b."""
    strategy = build(mode="frozen")
    layers = list(strategy.adapters().values())
    state = strategy.rank_state
    assert all(layer.state is state for layer in layers)
    pointers = (state.weights.data_ptr(), state.grad_mask.data_ptr())
    factors = layers[0].low_rank()
    for b in (3, 1, R_MAX, 5):
        strategy.set_rank(b)
        assert (state.weights.data_ptr(), state.grad_mask.data_ptr()) == pointers
        assert factors.rank_scale is state.weights
        assert factors.grad_rank_mask is state.grad_mask
        want = torch.tensor([ALPHA / b if i < b else 0.0 for i in range(R_MAX)])
        torch.testing.assert_close(state.weights, want, rtol=0, atol=0)
        assert state.grad_mask.tolist() == [1.0 if i == b - 1 else 0.0 for i in range(R_MAX)]
        assert all(layer.rank == b for layer in layers)
    strategy.backbone.double()  # a dtype move converts the shared tensors once, for every layer
    assert state.weights.dtype == torch.float64
    assert all(layer.state is state for layer in layers)
    assert state.weights[0].item() == ALPHA / 5
