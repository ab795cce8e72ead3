"""LISA (strategies/lisa.py): what trains when, optimizer coverage, sampling statistics, determinism."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from cl_bench import config, loop
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from strategies.lisa import LISA
from tests.core.test_cli import error_line, run_cli
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context

N_CLASSES = 4
# tiny-clip parameters outside the blocks that must always train (embedding + head), by name
TINY_CLIP_ALWAYS = {
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.weight",
    "visual.ln_pre.bias",
    "visual.ln_post.weight",
    "visual.ln_post.bias",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
}


def make(backbone_name: str = "tiny-clip", seed: int = 0, **args: Any) -> LISA:
    backbone = tiny_backbone(backbone_name)
    head = head_for(backbone, N_CLASSES)
    cfg = config.build(LISA.Config, args, "lisa")
    return LISA(cfg, backbone, head, tiny_context(steps=(40, 40), n_classes=N_CLASSES, seed=seed))


def trainable_blocks(strategy: LISA) -> dict[str, list[int]]:
    """Blocks whose parameters all require grad; asserts no block is partly trainable."""
    out: dict[str, list[int]] = {}
    for tower, blocks in strategy.block_params.items():
        flags = [[p.requires_grad for p in params] for params in blocks]
        assert all(len(set(f)) == 1 for f in flags), "a block is partly frozen"
        out[tower] = [i for i, f in enumerate(flags) if f[0]]
    return out


def train_steps(strategy: LISA, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """The loop's own step (:func:`cl_bench.loop.train_step`) on a fixed batch."""
    info = experience_info(0, (0, 1), N_CLASSES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 0, 1])
    strategy.train()
    for step in steps:
        loop.train_step(
            strategy, optimizer, None, x, y, info, step, device=torch.device("cpu"), precision="fp32"
        )


def test_registered_with_the_paper() -> None:
    assert STRATEGIES.get("lisa") is LISA
    assert "2403.17919" in LISA.paper


def test_embedding_and_head_always_train_and_nothing_else_outside_blocks() -> None:
    strategy = make()
    strategy.before_step(0)
    block_ids = {id(p) for blocks in strategy.block_params.values() for ps in blocks for p in ps}
    outside = {
        n for n, p in strategy.backbone.model.named_parameters() if id(p) not in block_ids and p.requires_grad
    }
    assert outside == TINY_CLIP_ALWAYS
    assert not strategy.backbone.model.logit_scale.requires_grad


def test_vision_tower_only_keeps_the_text_tower_frozen() -> None:
    strategy = make(towers=("vision",))
    strategy.before_step(0)
    assert list(strategy.block_params) == ["vision"]
    text = strategy.backbone.text_parameters()
    assert len(text) > 10
    assert not any(p.requires_grad for p in text)
    names = {n for n, p in strategy.backbone.model.named_parameters() if any(p is q for q in strategy.always)}
    assert names == {n for n in TINY_CLIP_ALWAYS if n.startswith("visual.")}


@pytest.mark.parametrize("backbone_name", ["tiny-clip", "tiny-hf-clip", "tiny-vit"])
def test_exactly_gamma_blocks_per_tower_and_changes_only_at_multiples_of_k(backbone_name: str) -> None:
    K, gamma = 3, 2
    strategy = make(backbone_name, gamma=gamma, interval_steps=K)
    n_always = sum(p.numel() for p in strategy.always)
    assert n_always > 0
    previous: dict[str, list[int]] | None = None
    changes = 0
    for step in range(40):
        strategy.before_step(step)
        active = trainable_blocks(strategy)
        assert set(active) == set(strategy.backbone.towers())
        assert all(len(blocks) == gamma for blocks in active.values())
        assert all(p.requires_grad for p in strategy.always)
        expected = n_always + sum(
            p.numel() for t, idx in active.items() for i in idx for p in strategy.block_params[t][i]
        )
        assert strategy.n_trainable() == expected
        if previous is not None and active != previous:
            assert step % K == 0, f"the sampled set changed at step {step}"
            changes += 1
        previous = active
    assert changes > 5  # it does change (13 resamplings of 4-choose-2 sets)
    if backbone_name == "tiny-vit":  # the linear classifier trains as the head
        assert all(p.requires_grad for p in strategy.head.parameters())
        assert {id(p) for p in strategy.head.parameters()} <= {id(p) for p in strategy.always}


def test_optimizer_holds_every_candidate_from_the_start() -> None:
    strategy = make()
    optimizer = strategy.make_optimizer(1e-3, 0.0)  # before any block was sampled
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    candidates = [p for blocks in strategy.block_params.values() for ps in blocks for p in ps]
    assert {id(p) for p in candidates} <= held
    assert {id(p) for p in strategy.always} <= held


def test_weight_decay_groups_exempt_norms_and_biases_as_hf_trainer() -> None:
    """torch AdamW; with decay: every LayerNorm weight and bias and every bias in a 0-decay group,
    every other candidate (Linear and attention weights, embeddings, projections) decayed."""
    strategy = make()
    named = {name: p for name, p in strategy.backbone.model.named_parameters()}
    optimizer = strategy.make_optimizer(1e-3, 0.1)
    assert type(optimizer) is torch.optim.AdamW
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    held = {name for name, p in named.items() if id(p) in decay_of}
    assert held >= TINY_CLIP_ALWAYS
    exempt = {name for name in held if decay_of[id(named[name])] == 0.0}
    assert exempt == {name for name in held if "bias" in name or ".ln_" in f".{name}"}
    assert {"visual.ln_pre.weight", "ln_final.weight", "visual.transformer.resblocks.0.ln_1.weight"} <= exempt
    for name in ("visual.class_embedding", "visual.positional_embedding", "visual.proj", "text_projection"):
        assert decay_of[id(named[name])] == 0.1, name
    assert len(strategy.make_optimizer(1e-3, 0.0).param_groups) == 1  # no decay: one group


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_blocks_bitwise_unchanged_sampled_blocks_change(fused: bool) -> None:
    """Weight decay 0.1: a frozen block with a zero (not None) gradient would still move."""
    strategy = make(gamma=1, interval_steps=2)
    params = strategy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused)
    for step in range(6):
        before = [
            [[p.detach().clone() for p in ps] for ps in blocks] for blocks in strategy.block_params.values()
        ]
        always_before = [p.detach().clone() for p in strategy.always]
        train_steps(strategy, optimizer, range(step, step + 1))
        active = trainable_blocks(strategy)
        for (tower, blocks), old in zip(strategy.block_params.items(), before, strict=True):
            for i, (ps, olds) in enumerate(zip(blocks, old, strict=True)):
                for p, o in zip(ps, olds, strict=True):
                    if i in active[tower]:
                        assert not torch.equal(p, o), f"{tower}.{i} was sampled but did not change"
                    else:
                        assert torch.equal(p, o), f"{tower}.{i} was frozen but changed"
                        assert p.grad is None
        assert all(not torch.equal(p, o) for p, o in zip(strategy.always, always_before, strict=True))


def test_block_first_sampled_late_is_updated() -> None:
    """LMFlow #726: an optimizer built from the initially trainable blocks never updates later ones."""
    strategy = make(gamma=1, interval_steps=1, towers=("vision",))
    optimizer = strategy.make_optimizer(1e-2, 0.0)
    initial = {
        (t, i): [p.detach().clone() for p in ps]
        for t, blocks in strategy.block_params.items()
        for i, ps in enumerate(blocks)
    }
    train_steps(strategy, optimizer, range(8))
    first: dict[tuple[str, int], int] = {}
    for step, tower, indices in strategy.events:
        for i in indices:
            first.setdefault((tower, i), step)
    late = [key for key, step in first.items() if step >= 3]
    assert late, f"no block was first sampled at interval >= 3: {strategy.events}"
    for key in late:
        ps = strategy.block_params[key[0]][key[1]]
        assert any(not torch.equal(p, o) for p, o in zip(ps, initial[key], strict=True))
    never = set(initial) - set(first)
    for key in never:  # never sampled: bitwise untouched
        assert all(
            torch.equal(p, o)
            for p, o in zip(strategy.block_params[key[0]][key[1]], initial[key], strict=True)
        )


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_optimizer_state_of_a_resampled_block(policy: str) -> None:
    """Adam's per-parameter step count: ``keep`` counts every step the block trained, ``reset``
    restarts it whenever the block is sampled (K = 2: at most 2)."""
    K = 2
    strategy = make(gamma=3, interval_steps=K, optimizer_state=policy, towers=("vision",))  # 3 of 4 blocks
    optimizer = strategy.make_optimizer(1e-3, 0.0)
    resampled = False
    for step in range(8):
        train_steps(strategy, optimizer, range(step, step + 1))
        for tower, indices in strategy.active.items():
            for i in indices:
                intervals = sum(1 for e in strategy.events if e[1] == tower and i in e[2])
                resampled |= intervals > 1
                in_interval = step % K + 1
                expected = in_interval if policy == "reset" else K * (intervals - 1) + in_interval
                for p in strategy.block_params[tower][i]:
                    assert int(optimizer.state[p]["step"]) == expected
    assert resampled


def test_selection_frequencies_match_gamma_over_n() -> None:
    """Chi-square over 3000 intervals: per-block counts ~ gamma/N, and every pair equally likely."""
    gamma, n_intervals = 2, 3000
    strategy = make(gamma=gamma, interval_steps=1, towers=("vision",))
    pairs: dict[tuple[int, ...], int] = dict.fromkeys(itertools.combinations(range(4), 2), 0)
    for step in range(n_intervals):
        strategy.before_step(step)
        chosen = tuple(strategy.active["vision"])
        assert len(set(chosen)) == gamma  # without replacement
        pairs[chosen] += 1
    counts = strategy.counts["vision"]
    assert sum(counts) == gamma * n_intervals
    assert chisquare(counts, [gamma / 4 * n_intervals] * 4).pvalue > 1e-3
    assert chisquare(list(pairs.values())).pvalue > 1e-3


def test_chi_square_would_catch_a_biased_sampler() -> None:
    """The statistic above has power: counts skewed by 10% towards one block are rejected."""
    expected = 1500
    skewed = [expected * 1.1, expected * 0.9, expected, expected]
    assert chisquare(skewed, [expected] * 4).pvalue < 1e-3


def test_same_seed_same_sequence_own_generator() -> None:
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    state = torch.random.get_rng_state()
    for step in range(0, 200, 20):
        for s in (a, b, c):
            s.before_step(step)
    assert torch.equal(state, torch.random.get_rng_state()), "LISA consumed the global RNG"
    assert a.events == b.events
    assert a.events != c.events


def test_final_report_records_sampled_sets_and_counts() -> None:
    K = 5
    strategy = make(interval_steps=K)
    for step in range(23):
        strategy.before_step(step)
    report = strategy.final_report()
    assert report["events"]["sampled_blocks"]["fields"] == ["step", "tower", "blocks"]
    events = report["events"]["sampled_blocks"]["entries"]
    assert [e[0] for e in events] == [0, 0, 5, 5, 10, 10, 15, 15, 20, 20]
    assert [e[1] for e in events] == ["vision", "text"] * 5
    assert all(len(e[2]) == 2 and e[2] == sorted(e[2]) for e in events)
    selections = report["per_layer"]["selections"]
    assert list(selections) == [f"vision.{i}" for i in range(4)] + [f"text.{i}" for i in range(4)]
    for tower in ("vision", "text"):
        assert sum(v for k, v in selections.items() if k.startswith(tower)) == 2 * 5
        for i in range(4):
            assert selections[f"{tower}.{i}"] == sum(i in e[2] for e in events if e[1] == tower)
    assert report["scalars"] == {"gamma": 2, "interval_steps": K, "intervals": 5}
    assert strategy.report() == {"intervals": 5, "active_blocks": 4}


def test_run_record_counts_embedding_head_and_gamma_blocks(run_quick) -> None:
    record = run_quick("lisa", steps=3)
    assert record.status == "ok"
    backbone = tiny_backbone("tiny-clip")
    params = dict(backbone.model.named_parameters())
    block = {
        t: sum(p.numel() for p in backbone.block_module(backbone.blocks_of(t)[0]).parameters())
        for t in ("vision", "text")
    }
    expected = sum(params[n].numel() for n in TINY_CLIP_ALWAYS) + 2 * block["vision"] + 2 * block["text"]
    assert [e.n_trainable for e in record.experiences] == [expected, expected]
    events = record.strategy_report["events"]["sampled_blocks"]["entries"]
    assert [e[:2] for e in events] == [[0, "vision"], [0, "text"]]  # 6 steps < K = 20: one interval
    assert record.experiences[-1].strategy == {"intervals": 1, "active_blocks": 4}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"gamma": 0}, "gamma must be >= 1"),
        ({"interval_steps": 0}, "interval_steps"),
        ({"towers": ["audio"]}, "towers"),
        ({"optimizer_state": "forget"}, "keep"),
    ],
)
def test_bad_static_config_fails_with_one_line(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config.build(LISA.Config, args, "lisa")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("towers", "tower"), [(("vision", "text"), "vision"), (("text",), "text")])
def test_gamma_larger_than_the_blocks_fails_with_one_line(towers: tuple[str, ...], tower: str) -> None:
    with pytest.raises(ConfigError) as err:
        make(gamma=5, towers=towers)
    assert str(err.value) == (
        f"strategy.gamma=5 exceeds the 4 blocks of the {tower} tower of tiny-clip "
        "(gamma must be between 1 and 4)"
    )
    make(gamma=4, towers=towers)  # every block of the tower is allowed


def test_bad_config_through_the_cli_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """gamma > blocks is found when the strategy is built, gamma < 1 and K < 1 by the config."""
    for setting, message in (
        ("gamma=50", "strategy.gamma=50 exceeds the 4 blocks of the vision tower of tiny-clip"),
        ("gamma=0", "strategy.gamma must be >= 1, got 0"),
        ("interval_steps=0", "strategy.interval_steps (K) must be >= 1, got 0"),
    ):
        args = ("--strategy", "lisa", "--scenario", "synthetic", "--set", f"strategy.{setting}")
        code, _, err = run_cli(capsys, "run", "--no-progress", "--out", str(tmp_path), *args)
        assert code == 2, setting
        assert error_line(err).startswith(f"error: {message}"), err


@pytest.mark.gpu
def test_no_host_sync_when_resampling_on_cuda() -> None:
    strategy = make(interval_steps=1)
    strategy.to(torch.device("cuda"))
    optimizer = strategy.make_optimizer(1e-3, 0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            strategy.before_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optimizer is strategy._optimizer


def test_checkpointing_frozen_blocks_changes_no_number() -> None:
    """Recomputing frozen blocks in backward gives bitwise the same parameters after training."""
    results = []
    for checkpointed in (True, False):
        torch.manual_seed(0)
        strategy = make(gamma=1, interval_steps=2, checkpoint_frozen=checkpointed)
        optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=1e-2, weight_decay=0.1)
        train_steps(strategy, optimizer, range(5))
        results.append([p.detach().clone() for p in strategy.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_only_frozen_blocks_are_checkpointed(monkeypatch) -> None:
    import strategies.lisa as lisa_module

    calls: list[int] = []
    real = lisa_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(1)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(lisa_module, "checkpoint", counting)
    strategy = make(gamma=1, interval_steps=2)
    optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=1e-3)
    train_steps(strategy, optimizer, range(1))
    n_blocks = sum(len(blocks) for blocks in strategy.block_params.values())
    # every block runs once per step (text tower: once for the prompts); gamma=1 per tower trains
    assert len(calls) == n_blocks - len(strategy.block_params)
    calls.clear()
    strategy.eval()
    with torch.no_grad():
        strategy.forward(torch.randn(2, 3, 32, 32), experience_info(0, (0, 1), N_CLASSES, training=False))
    assert calls == []
