"""What every strategy communicates in a federated run (issue 19), and its server rules.

For every trainable strategy: stable keys, an in-place load that changes exactly the communicated
tensors (parameter objects kept), and the per-strategy rules: MoRA sends only the current block,
SoRA's gates every client zeroed stay zero, LoRAPrune's masks agree by weighted majority, the
low-rank pairs multiply to the adapters' updates, zero-shot has nothing to federate.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cl_bench import loop
from cl_bench.errors import FederationError
from cl_bench.federation.aggregate import fedavg, state_bytes
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy
from strategies.loraprune import mask_agreement
from tests.helpers import experience_info
from tests.strategies.test_contract import CONTRACT, build

TRAINABLE = sorted(n for n in CONTRACT if STRATEGIES.get(n).trains)
CPU = torch.device("cpu")
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 0, 1])


def train(strategy: Strategy, index: int, steps: range) -> None:
    """One experience of ``steps`` optimizer steps on a fixed batch, every hook in the loop's order."""
    info = experience_info(index, (2 * index, 2 * index + 1), 4, n_steps=len(steps))
    strategy.train()
    strategy.before_experience(info)
    optimizer = strategy.make_optimizer(1e-2, 0.0)
    for step in steps:
        loop.train_step(strategy, optimizer, None, X, Y, info, step, device=CPU, precision="fp32")
    strategy.after_experience(info)


def trained(name: str) -> Strategy:
    _, _, strategy = build(name)
    train(strategy, 0, range(2))
    return strategy


def snapshot(strategy: Strategy) -> dict[str, Any]:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in strategy.state_dict().items()
    }


def differing(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not _same(before[k], after[k])}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def modified(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value changed: +0.5 on floats, a group mask with its first unit pruned."""
    out = {}
    for k, v in state.items():
        if k.endswith(".mask"):
            m = torch.ones_like(v)
            m[0] = 0.0
            out[k] = m
        else:
            out[k] = v + 0.5
    return out


def storage_keys(strategy: Strategy) -> set[str]:
    """The state_dict keys whose tensors share storage with a communicated tensor."""
    ptrs = {t.untyped_storage().data_ptr() for t in strategy.communicated_state().values()}
    return {
        k
        for k, v in strategy.state_dict().items()
        if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in ptrs
    }


# -- every trainable strategy ------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINABLE)
def test_communicated_keys_are_stable(name: str) -> None:
    _, _, strategy = build(name)
    initial = {k: tuple(v.shape) for k, v in strategy.communicated_state().items()}
    assert initial
    train(strategy, 0, range(3))
    assert {k: tuple(v.shape) for k, v in strategy.communicated_state().items()} == initial
    train(strategy, 1, range(3, 6))  # a second experience (MoRA: a new block, LISA: resampled)
    assert {k: tuple(v.shape) for k, v in strategy.communicated_state().items()} == initial
    assert list(strategy.communicated_state()) == list(initial)  # the same order


@pytest.mark.parametrize("name", TRAINABLE)
def test_loading_is_in_place_and_changes_exactly_the_communicated_tensors(name: str) -> None:
    """After a few steps: loading the state just sent changes nothing; loading other values changes
    exactly the state_dict entries behind the communicated tensors (same parameter objects); a bad
    key or shape fails before anything is written; K = 1 aggregation gives the upload back bit for
    bit (SoRA: no second proximal step; LoRAPrune: its own mask)."""
    strategy = trained(name)
    params = [p for m in (strategy.backbone, strategy.head) for p in m.parameters()]
    trainable = strategy.trainable_parameters()
    before = snapshot(strategy)
    upload = {k: v.clone() for k, v in strategy.communicated_state().items()}
    strategy.load_communicated_state(strategy.communicated_state())
    strategy.load_communicated_state(upload)
    assert differing(before, snapshot(strategy)) == set()
    assert all(torch.equal(strategy.communicated_state()[k], v) for k, v in upload.items())

    for mode in ("fedavg", "product") if strategy.lowrank_pairs() else ("fedavg",):
        out = strategy.aggregate([upload], [12.0], mode)
        assert out.keys() == upload.keys()
        assert all(torch.equal(out[k], v) for k, v in upload.items()), mode

    new = modified(upload)
    with pytest.raises(FederationError, match="no communicated tensor 'nonsense'"):
        strategy.load_communicated_state({**new, "nonsense": torch.zeros(1)})
    first = next(iter(new))
    with pytest.raises(FederationError, match="shape"):
        strategy.load_communicated_state({**new, first: torch.zeros(*new[first].shape, 2)})
    assert differing(before, snapshot(strategy)) == set()

    expected = storage_keys(strategy)
    if name == "loraprune":  # the group masks are expanded into their layers' masks
        expected |= {k for k in strategy.state_dict() if k.endswith(".mask")}
    strategy.load_communicated_state(new)
    assert expected
    assert differing(before, snapshot(strategy)) == expected
    now = strategy.communicated_state()
    assert now.keys() == new.keys()
    for k, v in new.items():
        assert torch.equal(now[k], v), k
    assert [id(p) for m in (strategy.backbone, strategy.head) for p in m.parameters()] == [
        id(p) for p in params
    ]
    assert [id(p) for p in strategy.trainable_parameters()] == [id(p) for p in trainable]


@pytest.mark.parametrize("name", TRAINABLE)
def test_training_draws_only_from_the_random_streams(name: str) -> None:
    """Two trainings from the same model with the strategy's streams seeded alike and the global RNG
    seeded differently send the same state: nothing in training draws from the global RNG."""
    uploads = []
    for global_seed in (1, 2):
        _, _, strategy = build(name)
        for g in strategy.random_streams():
            g.manual_seed(99)
        torch.manual_seed(global_seed)
        train(strategy, 0, range(3))
        uploads.append(strategy.communicated_state())
    assert all(torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])


# -- random streams ----------------------------------------------------------------------------
def test_dylora_samples_its_ranks_from_its_stream() -> None:
    _, _, strategy = build("dylora")
    (stream,) = strategy.random_streams()
    stream.manual_seed(7)
    ranks = [strategy.sample_rank() for _ in range(6)]
    g = torch.Generator().manual_seed(7)
    r_max = strategy.cfg.r_max
    assert ranks == [int(torch.randint(1, r_max + 1, (1,), generator=g)) for _ in range(6)]


def test_lisa_samples_its_blocks_from_its_stream() -> None:
    _, _, strategy = build("lisa")
    (stream,) = strategy.random_streams()
    stream.manual_seed(7)
    strategy.before_step(0)
    g = torch.Generator().manual_seed(7)
    expected = {
        tower: sorted(torch.randperm(len(blocks), generator=g)[: strategy.cfg.gamma].tolist())
        for tower, blocks in strategy.block_params.items()
    }
    assert strategy.active == expected


@pytest.mark.parametrize("name", sorted(set(TRAINABLE) - {"dylora", "lisa"}))
def test_other_strategies_have_no_stream(name: str) -> None:
    assert build(name)[2].random_streams() == []


# -- what each strategy sends ------------------------------------------------------------------
def test_adapter_strategies_send_only_their_adapters_on_clip() -> None:
    fields = {
        "lora": ("A", "B"),
        "allora": ("A", "B"),
        "dylora": ("A", "B"),
        "mora": ("A", "B"),
        "sora": ("A", "B", "gate"),
        "smora": ("A", "B", "router", "balance_bias"),
        "flylora": ("B", "d"),
    }
    for name, names in fields.items():
        strategy = build(name)[2]
        expected = [f"{layer}.{f}" for layer in strategy.adapters() for f in names]
        extra = ["threshold"] if name == "sora" else []
        assert list(strategy.communicated_state()) == expected + extra, name


def test_full_training_strategies_send_every_trained_tensor() -> None:
    for name in ("finetune", "linear-probe", "lisa"):
        strategy = build(name)[2]
        names = {id(p): f"backbone.{n}" for n, p in strategy.backbone.named_parameters()}
        state = strategy.communicated_state()
        assert list(state) == [names[id(p)] for p in strategy.trainable_parameters()], name
    finetune = build("finetune")[2]
    assert "backbone.model.logit_scale" not in finetune.communicated_state()
    lisa = build("lisa")[2]  # every block, sampled or not
    n_block_params = sum(len(ps) for blocks in lisa.block_params.values() for ps in blocks)
    assert len(lisa.communicated_state()) == len(lisa.always) + n_block_params


def test_a_linear_head_travels_with_the_adapters() -> None:
    from cl_bench import config
    from tests.helpers import head_for, tiny_backbone, tiny_context

    backbone = tiny_backbone("tiny-vit")
    head = head_for(backbone, 4)
    cls = STRATEGIES.get("lora")
    strategy = cls(config.build(cls.Config, {}, "lora"), backbone, head, tiny_context())
    state = strategy.communicated_state()
    assert [k for k in state if k.startswith("head.")] == [f"head.{n}" for n, _ in head.named_parameters()]


def test_mora_sends_only_the_current_block() -> None:
    _, _, strategy = build("mora")
    train(strategy, 0, range(3))
    first = {k: v.clone() for k, v in strategy.communicated_state().items()}
    first_bytes = state_bytes(first)
    train(strategy, 1, range(3, 6))
    second = strategy.communicated_state()
    assert second.keys() == first.keys()
    assert state_bytes(second) == first_bytes
    for name, layer in strategy.adapters().items():
        assert layer.n_old == layer.r  # the first block is in the bank ...
        assert torch.equal(layer.bank_a, first[f"{name}.A"])
        assert torch.equal(layer.bank_b, first[f"{name}.B"])
        assert torch.equal(second[f"{name}.A"], layer.A)
        assert torch.equal(second[f"{name}.B"], layer.B)
        assert not torch.equal(second[f"{name}.A"], first[f"{name}.A"])  # ... and never travels
        assert not torch.equal(second[f"{name}.B"], first[f"{name}.B"])
    bank = {n: (a.bank_a.clone(), a.bank_b.clone()) for n, a in strategy.adapters().items()}
    strategy.load_communicated_state(modified(second))
    for name, layer in strategy.adapters().items():
        assert torch.equal(layer.bank_a, bank[name][0])
        assert torch.equal(layer.bank_b, bank[name][1])


def test_sora_gates_every_client_zeroed_stay_zero() -> None:
    strategy = trained("sora")
    base = {k: v.clone() for k, v in strategy.communicated_state().items()}
    layer, other = list(strategy.adapters())[:2]
    key, only = f"{layer}.gate", f"{other}.gate"
    r = base[key].numel()
    rows = [[0.0, 1.0, 0.05], [0.0, 0.0, 0.05], [0.0, 2.0, 0.05]]
    states = []
    for k, row in enumerate(rows):
        state = {**base, key: torch.tensor(row + [1.0] * (r - 3)), "threshold": torch.tensor(0.1)}
        if k:
            state.pop(only)  # sent by client 0 alone
        states.append(state)
    state0_only = states[0][only].clone()
    out = strategy.aggregate(states, [1.0, 1.0, 2.0], "fedavg")
    # mean (0, 1.25, 0.05, 1, ...) then soft-threshold 0.1: (0, 1.15, 0, 0.9, ...)
    expected = torch.tensor([0.0, 1.25, 0.05] + [1.0] * (r - 3))
    expected = expected - expected.clamp(-0.1, 0.1)
    assert torch.equal(out[key], expected)
    assert out[key][0].item() == 0.0
    assert out[key][2].item() == 0.0
    assert torch.equal(out[only], state0_only)  # one sender: thresholded by its own last step only
    single = strategy.aggregate(states[:1], [1.0], "fedavg")  # K = 1: no second shrink by lambda
    assert all(torch.equal(single[k], v) for k, v in states[0].items())
    strategy.load_communicated_state(out)
    assert strategy.threshold == pytest.approx(0.1)
    assert torch.equal(strategy.adapters()[layer].gate.detach(), expected)


def test_sora_gates_zero_in_every_client_survive_training_and_aggregation() -> None:
    uploads = []
    for seed in (1, 2, 3):
        strategy = trained("sora")
        layer = next(iter(strategy.adapters().values()))
        with torch.no_grad():
            layer.gate[:2] = 0.0
        state = {k: v.clone() for k, v in strategy.communicated_state().items()}
        state = {k: (v + 0.01 * seed if k.endswith(".B") else v) for k, v in state.items()}
        uploads.append(state)
    out = strategy.aggregate(uploads, [3.0, 1.0, 2.0], "fedavg")
    first = f"{next(iter(strategy.adapters()))}.gate"
    assert torch.equal(out[first][:2], torch.zeros(2))
    assert bool((out[first][2:] != 0).all())


def test_loraprune_mask_agreement_is_a_weighted_majority() -> None:
    masks = [
        torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]),
        torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]),
        torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]),
    ]
    # weights 2, 1, 1 (total 4, half 2): kept weights 3, 2, 2, 1, 2 -> ties (2) keep
    assert torch.equal(mask_agreement(masks, [2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
    # weights 3, 1, 1 (total 5, half 2.5): kept weights 4, 3, 2, 1, 3
    assert torch.equal(mask_agreement(masks, [3.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(mask_agreement(masks[1:2], [5.0]), masks[1])


def test_loraprune_aggregates_masks_by_agreement_and_loads_them_into_the_layers() -> None:
    strategy = trained("loraprune")
    base = {k: v.clone() for k, v in strategy.communicated_state().items()}
    group = strategy.groups[0]
    key = f"{group.name}.mask"
    n = group.n
    patterns = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # per client: which of units 0..2 it pruned
    states = []
    for pruned in patterns:
        mask = torch.ones(n)
        mask[:3] = 1.0 - torch.tensor(pruned, dtype=torch.float32)
        states.append({**base, key: mask})
    out = strategy.aggregate(states, [2.0, 1.0, 1.0], "fedavg")
    # unit 0 pruned by client 2 (kept weight 3 of 4), unit 1 by client 1 (3 of 4), unit 2 by client 0
    # (kept weight 2 of 4: a tie keeps): nothing pruned; with weights 1, 1, 3 unit 0 loses (2 of 5)
    assert torch.equal(out[key], torch.ones(n))
    out = strategy.aggregate(states, [1.0, 1.0, 3.0], "fedavg")
    expected = torch.ones(n)
    expected[0] = 0.0
    assert torch.equal(out[key], expected)
    assert torch.equal(out[f"{group.name}.importance"], base[f"{group.name}.importance"])  # all alike
    strategy.load_communicated_state(out)
    assert group.n_pruned == 1
    rows = expected[:, None].expand(n, group.size).reshape(-1)
    for layer in group.fan_out:
        assert torch.equal(layer.mask, rows)
    with pytest.raises(FederationError, match="other than 0 and 1"):
        strategy.load_communicated_state({key: torch.full((n,), 0.5)})


SCALE = {
    "lora": lambda a: a.scaling,
    "allora": lambda a: 1.0,
    "dylora": lambda a: a.alpha / a.r_max,
    "loraprune": lambda a: a.scaling,
}


@pytest.mark.parametrize("name", sorted(SCALE))
def test_lowrank_pairs_multiply_to_the_adapters_updates(name: str) -> None:
    strategy = trained(name)
    state = strategy.communicated_state()
    strategy.load_communicated_state({k: torch.randn_like(v) for k, v in state.items() if k.endswith(".B")})
    state = strategy.communicated_state()
    pairs = strategy.lowrank_pairs()
    assert pairs == [(f"{n}.B", f"{n}.A") for n in strategy.adapters()]
    for (b, a), adapter in zip(pairs, strategy.adapters().values(), strict=True):
        delta = adapter.delta_weight(adapter.r_max) if name == "dylora" else adapter.delta_weight()
        torch.testing.assert_close(state[b] @ state[a] * SCALE[name](adapter), delta)


def test_product_mode_averages_the_products_of_two_lora_clients() -> None:
    uploads, products = [], []
    for seed in (1, 2):
        strategy = trained("lora")
        torch.manual_seed(seed)
        state = strategy.communicated_state()
        strategy.load_communicated_state({k: torch.randn_like(v) for k, v in state.items()})
        uploads.append({k: v.clone() for k, v in strategy.communicated_state().items()})
        products.append({n: a.delta_weight() for n, a in strategy.adapters().items()})
    out = strategy.aggregate(uploads, [1.0, 3.0], "product")
    assert set(strategy.aggregation_residuals) == {b for b, _ in strategy.lowrank_pairs()}
    strategy.load_communicated_state(out)
    for name, adapter in strategy.adapters().items():
        mean = (products[0][name] + 3 * products[1][name]) / 4  # rank <= 2r: B'A' is its rank-r part
        U, S, Vh = torch.linalg.svd(mean)
        r = adapter.r
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        torch.testing.assert_close(adapter.delta_weight(), best, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mora", "smora", "sora", "finetune", "lisa", "linear-probe"])
def test_product_mode_fails_fast_without_lowrank_pairs(name: str) -> None:
    strategy = build(name)[2]
    state = strategy.communicated_state()
    with pytest.raises(FederationError, match="no such pairs"):
        strategy.aggregate([state, state], [1.0, 1.0], "product")


def test_flylora_product_mode_is_fedavg() -> None:
    """A is frozen and shared, so the product mean is (mean B) A: FedAvg of B, exactly."""
    strategy = trained("flylora")
    state = {k: v.clone() for k, v in strategy.communicated_state().items()}
    other = {k: v + 1.0 for k, v in state.items()}
    product = strategy.aggregate([state, other], [1.0, 2.0], "product")
    plain = fedavg([state, other], [1.0, 2.0])
    assert all(torch.equal(product[k], plain[k]) for k in plain)


def test_unknown_aggregation_mode_fails() -> None:
    strategy = build("lora")[2]
    state = strategy.communicated_state()
    with pytest.raises(FederationError, match="unknown aggregation 'median'"):
        strategy.aggregate([state], [1.0], "median")


def test_zero_shot_has_nothing_to_federate() -> None:
    strategy = build("zero-shot")[2]
    assert not strategy.federable
    with pytest.raises(FederationError, match="zero-shot trains nothing: there is nothing to federate"):
        strategy.communicated_state()
    assert all(STRATEGIES.get(n).federable for n in TRAINABLE)
