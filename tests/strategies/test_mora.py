"""MoRA / MoRAM (strategies/mora.py): layer maths against an independent float64 reference, the
frozen bank across increments, routing invariants, the official CLIP loss, and the run record.

The references here are written from STRATEGIES.md Part B §1 (per token: z = A x, s = z / ||z||,
top-k of the signed s with k = max(topk, 2), w = softmax(s_topk / tau), eval-only gate
s_i >= delta without renormalising, y = W0 x + b + B (w * z)), never from the implementation.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cl_bench import config, loop
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo
from strategies.mora import MoRA, MoRAConfig, MoRALinear
from strategies.mora.routing import route_reference
from tests.helpers import experience_info, head_for, quick_run, tiny_backbone, tiny_context

# ----------------------------------------------------------------------------- references


def reference(
    layer: MoRALinear, x: torch.Tensor, *, topk: int, tau: float, delta: float, training: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy evaluation of the layer token by token: (outputs [N, d_out], weights [N, R])."""
    A = np.concatenate([layer.bank_a.double().numpy(), layer.A.detach().double().numpy()], axis=0)
    B = np.concatenate([layer.bank_b.double().numpy(), layer.B.detach().double().numpy()], axis=1)
    W0 = layer.base.weight.detach().double().numpy()
    b = layer.base.bias.detach().double().numpy()
    xs = x.detach().double().reshape(-1, x.shape[-1]).numpy()
    R = A.shape[0]
    k = min(max(topk, 2), R)
    outputs, weights = [], []
    for token in xs:
        z = A @ token
        s = z / max(math.sqrt(float((z * z).sum())), 1e-12)
        chosen = np.argsort(-s, kind="stable")[:k]
        e = np.exp((s[chosen] - s[chosen].max()) / tau)
        w = np.zeros(R)
        w[chosen] = e / e.sum()
        if not training and delta > 0:
            w[s < delta] = 0.0
        y = W0 @ token + b
        for i in range(R):
            y = y + w[i] * z[i] * B[:, i]
        outputs.append(y)
        weights.append(w)
    return np.stack(outputs), np.stack(weights)


def autograd_reference(
    layer: MoRALinear, x: torch.Tensor, topk: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(y * g) w.r.t. (x, A, B) by plain autograd over the concatenated bank
    (official formulation: -inf outside the top-k, softmax over all ranks), float64."""
    x = x.detach().double().requires_grad_(True)
    A_new = layer.A.detach().double().requires_grad_(True)
    B_new = layer.B.detach().double().requires_grad_(True)
    A = torch.cat([layer.bank_a.double(), A_new], 0)
    B = torch.cat([layer.bank_b.double(), B_new], 1)
    z = x @ A.t()
    s = F.normalize(z, dim=-1)
    values, idx = s.topk(min(max(topk, 2), A.shape[0]), dim=-1)
    w = torch.softmax(torch.full_like(s, float("-inf")).scatter(-1, idx, values) / tau, dim=-1)
    y = F.linear(x, layer.base.weight.double(), layer.base.bias.double()) + (w * z) @ B.t()
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    return torch.autograd.grad((y * g).sum(), (x, A_new, B_new))


def make_layer(
    *,
    d_in: int = 6,
    d_out: int = 5,
    r: int = 4,
    topk: int = 3,
    tau: float = 0.5,
    delta: float = 0.2,
    increments: int = 0,
    seed: int = 0,
    capacity: int = 0,
) -> MoRALinear:
    """A MoRA layer on a small random linear with every block trained (random B), ``increments`` done."""
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(d_in, d_out), r, topk, tau, delta, capacity)
    for i in range(increments + 1):
        with torch.no_grad():
            layer.B.normal_()
        if i < increments:
            layer.increment()
    return layer


def tokens(n: int = 40, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layer maths


@pytest.mark.parametrize("increments", [0, 2])  # R = r (first experience) and R = 3r
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("topk", [3, 1, 16])  # k < R; k floored at 2; k >= R (every rank)
def test_forward_equals_float64_reference(increments: int, training: bool, topk: int) -> None:
    layer = make_layer(topk=topk, increments=increments).double()
    layer.train(training)
    x = tokens().double().reshape(4, 10, 6)  # batched tokens [batch, length, d]
    expected, _ = reference(layer, x, topk=topk, tau=0.5, delta=0.2, training=training)
    got = layer(x).detach().reshape(-1, 5).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # float32 layer, same weights
    layer32 = make_layer(topk=topk, increments=increments).train(training)
    np.testing.assert_allclose(layer32(x.float()).detach().reshape(-1, 5).numpy(), expected, atol=2e-5)


def test_default_temperature_and_gate_equal_the_reference() -> None:
    """tau = 0.01, delta = 0.2, topk 16 over R = 48 ranks (three experiences of 16)."""
    layer = make_layer(d_in=24, d_out=20, r=16, topk=16, tau=0.01, increments=2).double()
    x = tokens(30, 24).double()
    for training in (True, False):
        layer.train(training)
        expected, weights = reference(layer, x, topk=16, tau=0.01, delta=0.2, training=training)
        np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=0, atol=1e-11)
        np.testing.assert_allclose(layer.routing_weights(x).numpy(), weights, rtol=0, atol=1e-12)


def test_an_increment_changes_the_output_although_the_new_block_has_b_zero() -> None:
    layer = make_layer(increments=1).double().eval()
    x = tokens().double()
    before = layer(x).detach()
    layer.increment()
    assert torch.count_nonzero(layer.B) == 0
    assert layer.n_ranks == 12
    after = layer(x).detach()
    assert (after - before).abs().max() > 1e-3  # the fresh keys take part in the routing
    expected, _ = reference(layer, x, topk=3, tau=0.5, delta=0.2, training=False)
    np.testing.assert_allclose(after.numpy(), expected, rtol=0, atol=1e-12)


def test_gradients_equal_plain_autograd_over_the_concatenated_bank() -> None:
    """The custom backward: x gets the gradient through every rank, A and B that of the new block."""
    layer = make_layer(increments=2).double().train()
    x = tokens().double().requires_grad_(True)
    y = layer(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * g).sum().backward()
    grad_x, grad_A, grad_B = autograd_reference(layer, x, topk=3, tau=0.5)
    torch.testing.assert_close(x.grad, grad_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.A.grad, grad_A, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.B.grad, grad_B, rtol=0, atol=1e-12)
    assert grad_A.abs().max() > 0
    assert grad_B.abs().max() > 0


def test_increment_freezes_the_bank_bitwise_and_it_never_trains() -> None:
    layer = make_layer(increments=1)
    blocks = [(layer.bank_a.clone(), layer.bank_b.clone())]
    A_old, B_old = layer.A.detach().clone(), layer.B.detach().clone()
    layer.increment()
    assert torch.equal(layer.bank_a, torch.cat([blocks[0][0], A_old]))
    assert torch.equal(layer.bank_b, torch.cat([blocks[0][1], B_old], dim=1))
    assert not layer.bank_a.requires_grad
    assert not layer.bank_b.requires_grad
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(layer.A), id(layer.B)]
    bank = (layer.bank_a.clone(), layer.bank_b.clone())
    opt = torch.optim.AdamW(trainable, lr=0.1, betas=(0.9, 0.9999))
    x = tokens()
    for _ in range(3):
        layer(x).square().sum().backward()
        assert layer.a_store.grad is None
        assert layer.bt_store.grad is None
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.bank_a, bank[0])
    assert torch.equal(layer.bank_b, bank[1])
    assert torch.count_nonzero(layer.B) > 0  # the new block did train


def test_fresh_block_is_kaiming_uniform_a_and_zero_b() -> None:
    layer = make_layer(d_in=64, r=8, increments=1)
    layer.increment()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.A.abs().max() <= bound
    assert layer.A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.device == layer.base.weight.device


def test_preallocated_stores_are_not_reallocated_or_copied_per_step() -> None:
    layer = make_layer(increments=0, capacity=12)
    pointers = (layer.a_store.data_ptr(), layer.bt_store.data_ptr())
    layer.increment()
    layer.increment()
    layer(tokens()).sum().backward()
    assert (layer.a_store.data_ptr(), layer.bt_store.data_ptr()) == pointers
    grown = make_layer(increments=2)  # capacity r: grows on demand, keeping the bank
    assert grown.a_store.shape[0] >= 12


def test_routing_weights_sparsity_sum_and_eval_gate() -> None:
    layer = make_layer(increments=2)  # R = 12, k = 3
    x = tokens(200)
    train = layer.train().routing_weights(x)
    assert int((train != 0).sum(dim=1).max()) <= 3
    torch.testing.assert_close(train.sum(dim=1), torch.ones(200), rtol=0, atol=1e-6)
    scores = F.normalize(x @ torch.cat([layer.bank_a, layer.A.detach()]).t(), dim=-1)
    gated = layer.eval().routing_weights(x)
    dropped = (scores < 0.2) & (train != 0)
    assert dropped.any()  # the gate is exercised
    assert torch.all(gated[scores < 0.2] == 0)
    assert torch.equal(gated[~dropped], train[~dropped])  # kept entries are not renormalised
    assert torch.all(gated.sum(dim=1) <= 1 + 1e-6)
    few = make_layer(r=1, topk=16, d_in=6)  # R = 1 < k: every rank, weight exactly 1
    assert torch.equal(few.train().routing_weights(x), torch.ones(200, 1))


def test_routing_is_invariant_to_the_scale_of_x_and_the_delta_is_linear() -> None:
    layer = make_layer(increments=2).train()
    x = tokens()
    w = layer.routing_weights(x)
    assert torch.equal(layer.routing_weights(4.0 * x), w)  # exact: a power of two scales exactly
    torch.testing.assert_close(layer.routing_weights(3.7 * x), w, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta(3.7 * x), 3.7 * layer.delta(x), rtol=1e-5, atol=1e-6)


def test_delta_zero_makes_train_and_eval_equal() -> None:
    x = tokens()
    for delta, equal in ((0.0, True), (0.2, False)):
        layer = make_layer(delta=delta, increments=2)
        with torch.no_grad():
            assert torch.equal(layer.train()(x), layer.eval()(x)) is equal


def test_forward_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(increments=2)
    x = tokens().requires_grad_(True)

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the MoRA forward/backward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for training in (True, False):
        layer.train(training)
        layer(x).sum().backward()


def test_flops_of_the_bank_are_forward_and_input_gradient_only() -> None:
    """Per step: 2 N R (d_in + d_out) forward, the same for the input gradient, and the weight
    gradient of the r new ranks only (a concatenated-parameter forward would pay it for all R)."""
    N, d_in, d_out, r = 10, 32, 24, 4
    layer = make_layer(d_in=d_in, d_out=d_out, r=r, increments=9)
    R = layer.n_ranks
    x = torch.randn(N, d_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    base = 2 * (2 * N * d_in * d_out)  # W0 x and its input gradient
    assert counter.get_total_flops() == base + 2 * (2 * N * R * (d_in + d_out)) + 2 * N * r * (d_in + d_out)


def test_bf16_autocast_forward_and_backward() -> None:
    layer = make_layer(d_in=32, d_out=16, r=8, topk=4, increments=2)
    x = torch.randn(64, 32)
    reference32 = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # tokens whose 4th and 5th largest key matches are within bf16's resolution may route to
    # another expert in bf16 (an exact bf16 tie goes to the lower index): compare the others
    with torch.no_grad():
        top = F.linear(x, torch.cat([layer.bank_a, layer.A])).topk(5, dim=-1).values
    clear = top[:, 3] - top[:, 4] > 2**-6 * top[:, 3].abs()
    assert int(clear.sum()) > 48
    error = (y.float() - reference32).abs().amax(dim=-1) / reference32.abs().max()
    assert error[clear].max() < 0.05
    y.float().square().sum().backward()
    assert layer.A.grad.dtype == torch.float32
    assert layer.B.grad.dtype == torch.float32
    assert torch.isfinite(layer.A.grad).all()
    assert layer.A.grad.abs().max() > 0


def test_autocast_reads_cast_copies_of_the_stores_that_follow_the_bank() -> None:
    """Under autocast the stacked matrices come from copies of the stores in the compute dtype,
    cast once and kept: the output equals casting the stacked matrices at every forward (bitwise)
    and follows the trainable block (an optimizer step), a loaded bank (the copy is refreshed in
    place) and an increment; a module conversion drops the copies."""
    layer = make_layer(d_in=32, d_out=16, r=8, topk=4, increments=2).eval()
    x = torch.randn(20, 32)
    bf16 = torch.bfloat16

    def expected() -> torch.Tensor:
        A = torch.cat([layer.bank_a, layer.A.detach()]).to(bf16)
        Bt = torch.cat([layer.bank_b, layer.B.detach()], dim=1).t().contiguous().to(bf16)
        x2 = x.to(bf16)
        h, _ = route_reference(x2 @ A.t(), layer.k, layer.tau, layer.threshold)
        y = F.linear(x2, layer.base.weight.to(bf16), layer.base.bias.to(bf16))
        return torch.addmm(y, h, Bt)

    def run() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=bf16):
            return layer(x)

    assert torch.equal(run(), expected())
    pointer = layer._casts[bf16][0].data_ptr()
    stores = (layer.a_store.clone(), layer.bt_store.clone())
    with torch.no_grad():  # an optimizer step
        layer.A.add_(0.5)
        layer.B.mul_(2.0)
    assert torch.equal(run(), expected())
    assert torch.equal(layer.a_store, stores[0])  # the float32 stores are not written per step
    assert torch.equal(layer.bt_store, stores[1])
    layer.load_state_dict(make_layer(d_in=32, d_out=16, r=8, topk=4, increments=2, seed=5).state_dict())
    assert torch.equal(run(), expected())
    assert layer._casts[bf16][0].data_ptr() == pointer
    layer.increment()
    with torch.no_grad():
        layer.B.normal_()
    assert torch.equal(run(), expected())
    layer.double()
    assert not layer._casts


def test_state_dict_round_trip_restores_the_bank() -> None:
    layer = make_layer(increments=2)
    state = layer.state_dict()
    fresh = MoRALinear(nn.Linear(6, 5), 4, 3, 0.5, 0.2)
    fresh.load_state_dict(state)
    assert fresh.n_ranks == 12
    assert torch.equal(fresh.bank_a, layer.bank_a)
    x = tokens()
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- strategy


def build(backbone_name: str = "tiny-clip", n_experiences: int = 3, **args) -> MoRA:
    backbone = tiny_backbone(backbone_name)
    head = head_for(backbone, 6)
    cfg = config.build(MoRAConfig, args, "mora")
    torch.manual_seed(1)
    return MoRA(cfg, backbone, head, tiny_context(steps=(2,) * n_experiences, n_classes=6))


def info(
    index: int, classes: tuple[int, ...], seen: tuple[int, ...], logit: tuple[int, ...]
) -> ExperienceInfo:
    base = experience_info(index, classes, 6)
    return replace(base, seen_classes=seen, logit_classes=torch.tensor(logit))


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"r": 0}, "strategy.r"),
        ({"topk": 0}, "strategy.topk"),
        ({"tau": 0.0}, "strategy.tau"),
        ({"delta": -0.1}, "strategy.delta"),
        ({"delta": 1.5}, "strategy.delta"),
        ({"betas": [0.9, 1.0]}, "strategy.betas"),
        ({"betas": [0.9]}, "strategy.betas"),
        ({"use_image_to_text": False, "use_text_to_image": False}, "no loss"),
        ({"roles": ["qkv"]}, "strategy.roles"),
    ],
)
def test_bad_config_fails_with_one_line(args: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(MoRAConfig, args, "mora")
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_registered_with_the_paper_and_defaults() -> None:
    cls = STRATEGIES.get("mora")
    assert cls is MoRA
    assert "2506.21035" in cls.paper
    assert (cls.default_lr, cls.default_weight_decay) == (5e-4, 0.0)
    cfg = MoRAConfig()
    assert (cfg.r, cfg.topk, cfg.tau, cfg.delta, cfg.betas) == (16, 16, 0.01, 0.2, (0.9, 0.9999))


def test_every_linear_of_both_towers_is_adapted_and_only_the_new_block_trains() -> None:
    strategy = build()
    backbone = strategy.backbone
    assert len(strategy.adapters()) == 6 * len(backbone.blocks)
    assert {a.n_ranks for a in strategy.adapters().values()} == {16}
    strategy.before_experience(info(0, (0, 1), (0, 1), (0, 1)))
    assert {a.n_ranks for a in strategy.adapters().values()} == {16}  # no increment at index 0
    previous = {n: (a.A.detach().clone(), a.B.detach().clone()) for n, a in strategy.adapters().items()}
    strategy.before_experience(info(1, (2, 3), (0, 1, 2, 3), (2, 3)))
    strategy.head.invalidate()
    for name, adapter in strategy.adapters().items():
        assert adapter.n_ranks == 32
        assert torch.equal(adapter.bank_a, previous[name][0])
        assert torch.equal(adapter.bank_b, previous[name][1])
    opt = strategy.make_optimizer(5e-4, 0.0)
    assert opt.param_groups[0]["betas"] == (0.9, 0.9999)
    new_block = {id(p) for a in strategy.adapters().values() for p in (a.A, a.B)}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == new_block
    frozen = [p for n, p in backbone.named_parameters() if id(p) not in new_block]
    assert frozen
    assert not any(p.requires_grad for p in frozen)
    bank = {n: (a.bank_a.clone(), a.bank_b.clone()) for n, a in strategy.adapters().items()}
    exp = info(1, (2, 3), (0, 1, 2, 3), (2, 3))
    strategy.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])
    for step in range(2):
        loop.train_step(strategy, opt, None, x, y, exp, step, device=torch.device("cpu"), precision="fp32")
    for name, adapter in strategy.adapters().items():
        assert torch.equal(adapter.bank_a, bank[name][0])
        assert torch.equal(adapter.bank_b, bank[name][1])
    text = [a for n, a in strategy.adapters().items() if n.startswith("text.")]
    assert text
    assert all(torch.count_nonzero(a.B) > 0 for a in text)


def official_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    y: torch.Tensor,
    past: list[int],
    current: list[int],
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The X-TAIL training loss as the official code builds it: rows [past prompts; current prompts]."""
    embeddings = torch.cat([text[past], text[current]])
    labels = torch.tensor([len(past) + current.index(int(c)) for c in y])
    per_image = scale * image @ embeddings.t()
    per_image[:, : len(past)] = float("-inf")
    image_to_text = F.cross_entropy(per_image, labels)
    mask = (labels[:, None] == torch.arange(len(embeddings))[None, :]).float().t()
    if normalize:
        mask = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    text_to_image = F.cross_entropy(scale * embeddings @ image.t(), mask)
    return image_to_text, text_to_image


@pytest.mark.parametrize("logit", [(2, 3, 4), (0, 1, 2, 3, 4)])  # train_classes current / seen
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("classes", ["current", "run"])
def test_loss_equals_the_official_clip_loss(logit: tuple[int, ...], normalize: bool, classes: str) -> None:
    """``current`` is the official loss whatever the loop scored; ``run`` lets the scored classes
    compete in the image-to-text term, which is the official loss when they are the current ones."""
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = 20.0
    y = torch.tensor([2, 4, 4, 2, 4, 4, 2])  # class 3 is current but absent from the batch
    logits = torch.full((7, 6), float("-inf"))
    logits[:, list(logit)] = scale * image @ text[list(logit)].t()
    exp = info(1, (2, 3, 4), (0, 1, 2, 3, 4), logit)
    i2t, t2i = official_loss(image, text, scale, y, [0, 1], [2, 3, 4], normalize)
    if classes == "run" and logit == (0, 1, 2, 3, 4):  # the seen classes compete, none masked
        i2t = F.cross_entropy(scale * image @ text[list(logit)].t(), y)
    for use_i2t, use_t2i in ((True, True), (True, False), (False, True)):
        strategy = build(
            use_image_to_text=use_i2t,
            use_text_to_image=use_t2i,
            normalize_text_targets=normalize,
            image_to_text_classes=classes,
        )
        expected = use_i2t * i2t + use_t2i * t2i
        torch.testing.assert_close(strategy.loss(logits, y, exp), expected, rtol=1e-6, atol=1e-6)


def test_the_scored_classes_compete_unlike_the_official_masking() -> None:
    """The bug of the README demo: with the official masking an image of a new class is never
    pushed away from the old prompts, so its loss ignores them; by default it does not."""
    logits = torch.tensor([[9.0, 0.0, 1.0, 0.0]])  # an old prompt (class 0) wins on a class-2 image
    y = torch.tensor([2])
    exp = info(1, (2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
    run = build(use_text_to_image=False).loss(logits, y, exp)
    official = build(use_text_to_image=False, image_to_text_classes="current").loss(logits, y, exp)
    torch.testing.assert_close(run, F.cross_entropy(logits, y))
    torch.testing.assert_close(official, F.cross_entropy(logits[:, 2:], y - 2))
    assert run > official + 7


@pytest.mark.parametrize("classes", ["current", "run"])
def test_vision_backbone_uses_the_image_to_text_cross_entropy(classes: str) -> None:
    strategy = build("tiny-vit", image_to_text_classes=classes)
    logits = torch.randn(5, 6)
    y = torch.tensor([2, 3, 3, 2, 2])
    exp = info(1, (2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
    expected = F.cross_entropy(logits[:, 2:4], y - 2) if classes == "current" else F.cross_entropy(logits, y)
    torch.testing.assert_close(strategy.loss(logits, y, exp), expected, rtol=1e-6, atol=1e-6)
    assert any(p is strategy.head.linear.weight for p in strategy.trainable_parameters())
    with pytest.raises(ConfigError, match="CLIP"):
        build("tiny-vit", use_image_to_text=False)


def test_active_rank_counters_are_exact_and_added_parameters_count_the_bank() -> None:
    strategy = build(topk=4)
    strategy.before_experience(info(0, (0, 1), (0, 1), (0, 1)))
    strategy.before_experience(info(1, (2, 3), (0, 1, 2, 3), (2, 3)))
    strategy.head.invalidate()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, adapter in strategy.adapters().items():
        adapter.register_forward_hook(
            lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0])
        )
    x = torch.randn(3, 3, 32, 32)
    strategy.eval()
    with torch.no_grad():
        strategy.forward(x, experience_info(1, (2, 3), 6, training=False))
    report, final = strategy.report(), strategy.final_report()
    expected = {}
    for name, adapter in strategy.adapters().items():
        w = torch.cat([adapter.routing_weights(t).reshape(-1, adapter.n_ranks) for t in seen[name]])
        expected[name] = (w != 0).sum().item() / w.shape[0]
        assert final["per_layer"]["active_ranks_eval"][name] == expected[name]
        assert math.isnan(final["per_layer"]["active_ranks_train"][name])
    assert report["active_ranks_eval"] == pytest.approx(sum(expected.values()) / len(expected))
    assert 0 < report["active_ranks_eval"] <= 4
    sizes = {n: a.in_features + a.out_features for n, a in strategy.adapters().items()}
    assert strategy.n_active() == round(sum(expected[n] * sizes[n] for n in sizes))
    assert report["ranks_per_layer"] == 32
    assert report["total_ranks"] == 32 * len(sizes)
    assert report["added_per_experience"] == 16 * sum(sizes.values())
    assert strategy.n_added() == 32 * sum(sizes.values())  # frozen bank + trainable block
    assert strategy.n_trainable() == 16 * sum(sizes.values())
    assert strategy.adapter_bytes() == 4 * strategy.n_added()


def test_run_records_ranks_active_ranks_and_parameters(tmp_path) -> None:
    record = quick_run(tmp_path, "mora", strategy_args={"topk": 4})
    assert record.status == "ok"
    n_layers = 6 * 8  # tiny-clip: 4 + 4 blocks
    width_sum = sum(e.strategy["added_per_experience"] for e in record.experiences[:1]) // 16
    for i, exp in enumerate(record.experiences):
        figures = exp.strategy
        assert figures["ranks_per_layer"] == 16 * (i + 1)
        assert figures["total_ranks"] == 16 * (i + 1) * n_layers
        assert 0 < figures["active_ranks_train"] <= 4
        assert 0 <= figures["active_ranks_eval"] <= 4
        assert exp.n_added == 16 * (i + 1) * width_sum
        assert exp.n_trainable == 16 * width_sum
        assert exp.n_active is not None
        assert 0 <= exp.n_active <= 4 * width_sum
        assert exp.eval_samples_per_s > 0
    report = record.strategy_report
    assert report["scalars"]["ranks_per_layer"] == 32
    assert len(report["per_layer"]["active_ranks_eval"]) == n_layers


def test_bf16_run_on_cpu(tmp_path) -> None:
    record = quick_run(tmp_path, "mora", precision="bf16")
    assert record.status == "ok"
    assert math.isfinite(record.experiences[-1].loss_last)
