"""SMoRA (strategies/smora.py): layer maths against an independent float64 reference, the exact
reduction to LoRA, gradients of unselected ranks, the balancing bias, and the run record.

The references are written from STRATEGIES-rankwise.md Part B §1 (per token: s = sigmoid(W_r x)
repeated P times, v = s + beta, S = top-k of v, g_i = k v_i / sum_S v_j (``include``) or
k s_i / sum_S s_j (``exclude``), y = W0 x + b + (alpha / k) sum_S g_i (a_i . x) b_i), never from
the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cl_bench import config, loop
from cl_bench.adapters import LoRALinear
from cl_bench.errors import ConfigError
from cl_bench.rank_routing import RankUsage, RoutingHistory, balance_biases, jaccard, most_used, usage_figures
from cl_bench.registry import STRATEGIES
from strategies.smora import SMoRA, SMoRAConfig, SMoRALinear
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context

# ----------------------------------------------------------------------------- references


def reference(layer: SMoRALinear, x: torch.Tensor, *, include: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy, token by token: (outputs [N, d_out], gates [N, r])."""
    A = layer.A.detach().double().numpy()
    B = layer.B.detach().double().numpy()
    Wr = layer.router.detach().double().numpy()
    beta = layer.balance_bias.double().numpy()
    W0 = layer.base.weight.detach().double().numpy()
    b0 = layer.base.bias.detach().double().numpy()
    r, k, P = A.shape[0], layer.k, layer.partition
    outputs, gates = [], []
    for token in x.detach().double().reshape(-1, x.shape[-1]).numpy():
        s = np.repeat(1 / (1 + np.exp(-(Wr @ token))), P)
        v = s + beta
        chosen = np.argsort(-v, kind="stable")[:k]
        w = v if include else s
        g = np.zeros(r)
        g[chosen] = k * w[chosen] / w[chosen].sum()
        y = W0 @ token + b0
        for i in chosen:
            y = y + layer.scaling * g[i] * (A[i] @ token) * B[:, i]
        outputs.append(y)
        gates.append(g)
    return np.stack(outputs), np.stack(gates)


def make_layer(
    *, d_in: int = 6, d_out: int = 5, r: int = 8, k: int = 3, P: int = 1, seed: int = 0, **kw
) -> SMoRALinear:
    """A float64 SMoRA layer with a trained-looking state: random B and a non-zero beta."""
    torch.manual_seed(seed)
    layer = SMoRALinear(nn.Linear(d_in, d_out), r, k, 16.0, rank_partition=P, **kw).double()
    with torch.no_grad():
        layer.B.normal_()
        layer.router.mul_(3.0)  # spread the sigmoid scores
        layer.balance_bias.copy_(torch.linspace(-0.05, 0.05, r, dtype=torch.float64))
    return layer


def tokens(n: int = 40, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- layer maths


@pytest.mark.parametrize("gate_bias", ["include", "exclude"])
@pytest.mark.parametrize(("r", "k", "P"), [(8, 3, 1), (8, 4, 2), (6, 6, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_forward_equals_float64_reference(gate_bias: str, r: int, k: int, P: int, training: bool) -> None:
    layer = make_layer(r=r, k=k, P=P, gate_bias=gate_bias).train(training)
    x = tokens().reshape(4, 10, 6)  # leading dims are tokens
    expected, gates = reference(layer, x, include=gate_bias == "include")
    np.testing.assert_allclose(layer(x).detach().reshape(-1, 5).numpy(), expected, rtol=0, atol=1e-12)
    got_gates, mask = layer.routing(x)
    np.testing.assert_allclose(got_gates.numpy(), gates, rtol=0, atol=1e-12)
    assert torch.equal(mask, (torch.from_numpy(gates) != 0).double())


def test_gates_have_k_non_zeros_summing_to_k_and_are_non_negative_at_zero_bias() -> None:
    layer = make_layer(r=16, k=5)
    layer.balance_bias.zero_()
    gates, mask = layer.routing(tokens(200))
    assert torch.equal(mask.sum(dim=1), torch.full((200,), 5.0, dtype=torch.float64))
    assert torch.equal((gates != 0).sum(dim=1), torch.full((200,), 5))
    torch.testing.assert_close(
        gates.sum(dim=1), torch.full((200,), 5.0, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (gates >= 0).all()


def test_zero_router_zero_bias_and_k_equal_r_is_exactly_lora() -> None:
    """v = 1/2 for every rank, g = 1: Delta y = (alpha / r) B A x, as a LoRA with the same A and B."""
    layer = make_layer(r=8, k=8)
    with torch.no_grad():
        layer.router.zero_()
        layer.balance_bias.zero_()
    gates, _ = layer.routing(tokens())
    assert torch.equal(gates, torch.ones_like(gates))
    lora = LoRALinear(nn.Linear(6, 5), 8, 16.0).double()
    lora.base = layer.base
    with torch.no_grad():
        lora.A.copy_(layer.A)
        lora.B.copy_(layer.B)
    x = tokens()
    torch.testing.assert_close(layer(x), lora(x), rtol=0, atol=1e-13)
    W0, A, B = (t.detach().numpy() for t in (layer.base.weight, layer.A, layer.B))
    expected = x.numpy() @ (W0 + 16.0 / 8 * B @ A).T + layer.base.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=0, atol=1e-12)


def test_k_equal_r_alone_is_not_lora_the_gates_stay_input_dependent() -> None:
    layer = make_layer(r=8, k=8)
    gates, _ = layer.routing(tokens())
    assert gates.std(dim=0).max() > 0.05
    torch.testing.assert_close(gates.sum(dim=1), torch.full((40,), 8.0, dtype=torch.float64))


def test_rank_partition_gates_are_constant_on_each_block() -> None:
    layer = make_layer(r=12, k=6, P=3)
    layer.balance_bias.zero_()
    gates, mask = layer.routing(tokens(100))
    blocks = gates.reshape(100, 4, 3)
    assert torch.equal(blocks, blocks[:, :, :1].expand_as(blocks))
    assert torch.equal(mask.reshape(100, 4, 3).sum(dim=(1, 2)), torch.full((100,), 6.0, dtype=torch.float64))
    assert layer.router.shape == (4, 6)


def test_ranks_selected_by_no_token_get_exact_zero_gradients_and_x_sees_only_selected_ranks() -> None:
    layer = make_layer(r=8, k=3)
    dead = [1, 4, 6]
    with torch.no_grad():
        layer.balance_bias[dead] = -10.0  # sigmoid < 1: never in the top 3
    x = tokens().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * weights).sum().backward()
    assert torch.equal(layer.A.grad[dead], torch.zeros(3, 6, dtype=torch.float64))
    assert torch.equal(layer.B.grad[:, dead], torch.zeros(5, 3, dtype=torch.float64))
    assert torch.equal(layer.router.grad[dead], torch.zeros(3, 6, dtype=torch.float64))
    live = [i for i in range(8) if i not in dead]
    assert layer.A.grad[live].abs().sum(dim=1).min() > 0
    # per token: the gradient reaching x equals that of a model made of the token's selected ranks only
    _, mask = layer.routing(x)
    for n in range(0, 40, 7):
        chosen = mask[n].nonzero().flatten()
        token = x[n].detach().clone().requires_grad_(True)
        s = torch.sigmoid(layer.router[chosen].detach() @ token)
        v = s + layer.balance_bias[chosen]
        g = 3 * v / v.sum()
        z = layer.A[chosen].detach() @ token
        out = layer.base(token) + layer.scaling * layer.B[:, chosen].detach() @ (g * z)
        (out * weights[n]).sum().backward()
        torch.testing.assert_close(x.grad[n], token.grad, rtol=0, atol=1e-12)


def assert_no_host_sync(monkeypatch: pytest.MonkeyPatch, layer: nn.Module, bias: torch.Tensor) -> None:
    """Forward and backward in both modes and a balancing step never read a tensor on the host
    (what would break a CUDA graph); also used by test_flylora.py."""
    x = tokens(d=layer.in_features).float().requires_grad_(True)

    def sync(*args, **kwargs):
        raise AssertionError(f"host sync in the {type(layer).__name__} forward/backward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for training in (True, False):
        layer.train(training)
        layer(x).sum().backward()
    balance_biases([layer.usage], [bias], 1e-3)


def test_forward_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer().float()
    assert_no_host_sync(monkeypatch, layer, layer.balance_bias)


def test_bf16_autocast_forward_and_backward() -> None:
    layer = make_layer(d_in=32, d_out=16, r=16, k=4).float()
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for p in (layer.A, layer.B, layer.router):
        assert p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    assert layer.balance_bias.dtype == torch.float32


# ----------------------------------------------------------------------------- balancing bias


def test_balancing_step_on_a_hand_made_count_vector() -> None:
    """c = [5, 0, 3, 4, 3]: mean 3, beta moves by u * sign(3 - c) = u * [-1, +1, 0, -1, 0]."""
    usage = RankUsage(5)
    usage.step.copy_(torch.tensor([5, 0, 3, 4, 3]))
    beta = torch.tensor([0.0, 0.5, -0.25, 1.0, 0.0])
    before = beta.clone()
    balance_biases([usage], [beta], 0.125)  # a power of two: every move is exact
    assert torch.equal(beta - before, torch.tensor([-0.125, 0.125, 0.0, -0.125, 0.0]))
    assert torch.equal(usage.step, torch.zeros(5, dtype=torch.long))  # the next step counts afresh
    balance_biases([usage], [beta], 0.125)  # no tokens counted: nothing moves
    assert torch.equal(beta - before, torch.tensor([-0.125, 0.125, 0.0, -0.125, 0.0]))


def build(steps: tuple[int, ...] = (4, 4), **args) -> SMoRA:
    backbone = tiny_backbone()
    cfg = config.build(SMoRAConfig, args, "smora")
    return SMoRA(cfg, backbone, head_for(backbone, 4), tiny_context(steps=steps))


def test_bias_is_a_buffer_outside_the_optimizer_moving_by_u_once_per_step_and_never_in_eval() -> None:
    strategy = build(bias_rate=1e-2)
    info = experience_info(0, (0, 1), 4)
    strategy.train()
    strategy.before_experience(info)
    optimizer = strategy.make_optimizer(1e-3, 0.0)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    biases = strategy.biases()
    assert not any(id(b) in held or b.requires_grad for b in biases)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    for step in range(3):
        before = [b.clone() for b in biases]
        strategy.loss(strategy.forward(x, info), y, info).backward()
        strategy.forward(x, info)  # a second forward in the same step: its counts join the step's
        assert all(b.grad is None for b in biases)
        assert all(torch.equal(b, p) for b, p in zip(biases, before, strict=True))  # not in forward
        optimizer.step()
        optimizer.zero_grad()
        strategy.after_step(step)
        moves = torch.cat([b - p for b, p in zip(biases, before, strict=True)])
        on_grid = torch.isclose(moves.abs(), torch.tensor(1e-2), rtol=1e-4, atol=0) | (moves == 0)
        assert on_grid.all()
        assert (moves != 0).any()
    before = [b.clone() for b in biases]
    strategy.eval()
    with torch.no_grad():
        strategy.forward(x, experience_info(0, (0, 1), 4, training=False))
    strategy.after_step(99)
    assert all(torch.equal(b, p) for b, p in zip(biases, before, strict=True))
    # a training-mode forward without gradients (no optimizer step) is not counted either
    strategy.train()
    with torch.no_grad():
        strategy.forward(x, info)
    strategy.after_step(100)
    assert all(torch.equal(b, p) for b, p in zip(biases, before, strict=True))


def test_a_recomputed_forward_moves_beta_as_the_single_forward() -> None:
    """A checkpoint-style recompute (the same forward twice in one step) doubles every count: the
    sign rule moves beta exactly as after one forward."""
    once, twice = make_layer(r=8, k=3).train(), make_layer(r=8, k=3).train()
    x = tokens()
    once(x)
    twice(x)
    twice(x)
    for layer in (once, twice):
        balance_biases([layer.usage], [layer.balance_bias], 0.25)
    assert torch.equal(once.balance_bias, twice.balance_bias)
    assert not torch.equal(once.balance_bias, make_layer(r=8, k=3).balance_bias)


def test_exclude_leaves_the_output_unchanged_when_beta_shifts_without_changing_the_selection() -> None:
    x = tokens()
    for gate_bias, unchanged in (("exclude", True), ("include", False)):
        layer = make_layer(gate_bias=gate_bias).eval()
        with torch.no_grad():
            before = layer(x)
            layer.balance_bias.add_(0.25)  # same order of v: same S for every token
            after = layer(x)
        assert torch.equal(before, after) is unchanged


def test_balancing_lowers_the_load_of_a_router_biased_towards_few_ranks() -> None:
    torch.manual_seed(0)
    layer = SMoRALinear(nn.Linear(16, 8), 16, 2, 16.0)
    with torch.no_grad():
        layer.router.zero_()
        layer.router[:, 0] = torch.linspace(1.0, 0.0, 16)  # ranks 0, 1, ... preferred when x_0 > 0
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3)).abs()

    def load() -> float:
        counts = layer.routing(x)[1].sum(dim=0)
        return float(counts.max() / counts.mean())

    start = load()
    layer.train()
    for _ in range(40):
        layer(x)
        balance_biases([layer.usage], [layer.balance_bias], 0.02)
    assert start > 4.0
    assert load() < 0.5 * start


def test_load_and_overlap_figures_on_hand_made_counts() -> None:
    assert usage_figures([4, 0, 2, 2]) == (2.0, 0.0, 0.25)  # mean 2
    assert most_used([3, 5, 5, 0], 2) == {1, 2}
    assert most_used([3, 5, 5, 0], 4) == {0, 1, 2}  # a rank never selected is not "used"
    assert jaccard(frozenset({0, 1}), frozenset({1, 2})) == 1 / 3

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.usage = RankUsage(4)
            self.register_buffer("bias", torch.tensor([0.0, -0.5, 0.25, 0.0]))

    layers = {"a": Layer(), "b": Layer()}
    history = RoutingHistory(layers, 2, "bias")
    for counts in ([[6, 2, 0, 0], [1, 1, 1, 1]], [[0, 2, 6, 0], [1, 1, 1, 1]]):  # layer a, layer b
        history.start_experience()
        for layer, c in zip(layers.values(), counts, strict=True):
            layer.usage.usage[0].copy_(torch.tensor(c))
        history.end_experience()
    figures = history.figures()
    assert figures["load_max_mean"] == (3.0 + 1.0) / 2
    assert figures["load_min_mean"] == (0.0 + 1.0) / 2
    assert figures["never_used_fraction"] == (0.5 + 0.0) / 2
    # a: {0, 1} then {2, 1}: 1/3; b: ties go to the lower index, {0, 1} both times: 1
    assert figures["jaccard_earlier"] == pytest.approx((1 / 3 + 1) / 2)
    assert (figures["bias_abs_mean"], figures["bias_abs_max"]) == (0.1875, 0.5)
    events = history.sections()["events"]["jaccard"]["entries"]
    assert events == [[1, 0, pytest.approx(2 / 3)]]


# ----------------------------------------------------------------------------- strategy


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"r": 0}, "strategy.r"),
        ({"k": 0}, "strategy.k"),
        ({"k": 65}, "strategy.k"),
        ({"rank_partition": 3}, "strategy.rank_partition"),
        ({"r": 8, "k": 2, "rank_partition": 4}, "strategy.rank_partition"),
        ({"alpha": 0}, "strategy.alpha"),
        ({"gate_bias": "both"}, "gate_bias"),
        ({"bias_rate": -1e-5}, "strategy.bias_rate"),
        ({"dropout": 1.0}, "strategy.dropout"),
        ({"merge_each_experience": True}, "k = 8 < r = 64"),
        ({"merge_each_experience": True, "k": 64}, "gates still depend on x"),
        ({"towers": ["audio"]}, "strategy.towers"),
    ],
)
def test_bad_config_fails_with_one_line(args: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(SMoRAConfig, args, "smora")
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_delta_weight_refuses_to_fold_a_routed_adapter() -> None:
    with pytest.raises(ConfigError, match="cannot be folded"):
        make_layer().delta_weight()


def test_registered_with_the_paper_and_official_defaults() -> None:
    cls = STRATEGIES.get("smora")
    assert cls is SMoRA
    assert "2501.15103" in cls.paper
    assert (cls.default_lr, cls.default_weight_decay) == (1e-4, 0.0)
    cfg = SMoRAConfig()
    assert (cfg.r, cfg.k, cfg.rank_partition, cfg.alpha, cfg.bias_rate) == (64, 8, 1, 16.0, 1e-5)
    assert (cfg.gate_bias, cfg.dropout, cfg.reset_balance_bias_each_experience) == ("include", 0.0, False)


def test_every_linear_of_both_towers_is_adapted_and_a_b_router_train() -> None:
    strategy = build()
    adapters = strategy.adapters()
    assert len(adapters) == 6 * len(strategy.backbone.blocks)
    assert {name.split(".")[0] for name in adapters} == {"vision", "text"}
    trainable = {id(p) for p in strategy.trainable_parameters()}
    expected = {id(p) for a in adapters.values() for p in (a.A, a.B, a.router)}
    assert trainable == expected
    layer = adapters["vision.0.q"]
    assert layer.scaling == 16.0 / 8
    assert torch.count_nonzero(layer.B) == 0
    assert "balance_bias" in dict(layer.named_buffers())
    assert strategy.n_active() == sum(
        a.router.numel() + 64 + 8 * (a.in_features + a.out_features) for a in adapters.values()
    )


def test_reset_balance_bias_each_experience() -> None:
    for reset in (False, True):
        strategy = build(reset_balance_bias_each_experience=reset)
        with torch.no_grad():
            for b in strategy.biases():
                b.fill_(0.5)
        strategy.before_experience(experience_info(0, (0, 1), 4))
        assert all(torch.equal(b, torch.full_like(b, 0.5)) for b in strategy.biases())
        strategy.before_experience(experience_info(1, (2, 3), 4))
        assert all(torch.equal(b, torch.full_like(b, 0.0 if reset else 0.5)) for b in strategy.biases())


def test_state_dict_carries_the_balancing_bias() -> None:
    a, b = build(), build()
    with torch.no_grad():
        for bias in a.biases():
            bias.normal_()
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.biases(), b.biases(), strict=True))


def test_run_records_routing_figures(run_quick) -> None:
    record = run_quick("smora", strategy_args={"r": 16, "k": 4, "bias_rate": 1e-3})
    assert record.status == "ok"
    for exp in record.experiences:
        figures = exp.strategy
        assert figures["active_ranks_train"] == 4.0  # exactly k selected ranks per token
        assert figures["active_ranks_eval"] == 4.0
        assert figures["load_max_mean"] >= 1.0 >= figures["load_min_mean"] >= 0.0
        assert 0.0 <= figures["never_used_fraction"] < 1.0
        assert 0 < figures["bias_abs_max"] <= 1e-3 * exp.steps * (exp.index + 1) + 1e-9
    first = record.experiences[0].strategy["jaccard_earlier"]
    assert first is None or math.isnan(first)  # nothing earlier to compare with
    assert 0.0 <= record.experiences[1].strategy["jaccard_earlier"] <= 1.0
    report = record.strategy_report
    assert report["scalars"]["gate_bias"] == "include"
    assert set(report["curves"]) >= {
        "load",
        "never_used_fraction",
        "jaccard_earlier",
        "load_sorted",
        "bias_drift",
    }
    assert len(report["curves"]["load_sorted"]["x"]) == 16
    assert len(report["per_layer"]["load_max_mean"]) == 48
    jaccard = report["events"]["jaccard"]["entries"]
    assert [e[:2] for e in jaccard] == [[1, 0]]


# ----------------------------------------------------------------------------- learning


def learn_digits(name: str, out, **run) -> float:
    """Plasticity on split-digits, task protocol (chance 0.5 per experience), the method's defaults
    (also used by test_flylora.py)."""
    layer = {
        "strategy": {"name": name},
        "scenario": {"name": "split-digits", "protocol": "task"},
        "steps_per_experience": 40,
        "batch_size": 32,
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "out": str(out),
        "run_id": name,
    }
    return float(loop.run(config.resolve([{**layer, **run}]), progress=False).metrics["plasticity"])


@pytest.mark.slow
def test_learns_split_digits_at_its_default_lr_near_lora(tmp_path) -> None:
    """Measured (seed 0): lora 0.811, smora 0.815 at lr 1e-4 (seed 1: 0.814, 0.795)."""
    lora = learn_digits("lora", tmp_path / "lora")
    smora = learn_digits("smora", tmp_path / "smora")
    assert smora >= 0.7
    assert smora >= lora - 0.08, (smora, lora)
