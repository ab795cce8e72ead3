"""LoRAPrune (strategies/loraprune.py): importance, schedule, masks, slicing, run record."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cl_bench import config
from cl_bench.backbones.base import Backbone
from cl_bench.backbones.open_clip import load_open_clip
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from strategies import loraprune
from strategies.loraprune import LoRAPrune, MaskedLoRALinear, prunable_blocks, sparsity_schedule
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context

N_CLASSES = 4
ROLE_GROUPS = {"attn": (("q", "k", "v"), "out"), "mlp": (("fc1",), "fc2")}


def make(backbone: str | Backbone = "tiny-clip", steps: tuple[int, ...] = (50, 50), **args: Any) -> LoRAPrune:
    bb = tiny_backbone(backbone) if isinstance(backbone, str) else backbone
    cfg = config.build(LoRAPrune.Config, args, "loraprune")
    torch.manual_seed(1)
    return LoRAPrune(cfg, bb, head_for(bb, N_CLASSES), tiny_context(steps=steps, n_classes=N_CLASSES))


def randomize_lora(strategy: LoRAPrune, seed: int = 0) -> None:
    """Non-zero B, so that every term of the importance and of the merged weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in strategy.adapters().values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=g) * 0.05)


def drive_schedule(strategy: LoRAPrune, steps: range, seed: int = 0) -> None:
    """Run the pruning hook over ``steps`` with random importances (ties to zero every third step)."""
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        for group in strategy.groups:
            group.importance.copy_(torch.rand(group.n, generator=g) * (step % 3 != 0))
        strategy.after_backward(step)  # no gradients: only the pruning round runs


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def eval_logits(strategy: LoRAPrune, x: torch.Tensor) -> torch.Tensor:
    strategy.eval()
    strategy.head.invalidate()
    with torch.no_grad():
        return strategy.forward(x, experience_info(0, (0, 1), N_CLASSES, training=False))


def expected_group_importance(strategy: LoRAPrune, group: Any) -> torch.Tensor:
    """Eq. 7-8 evaluated in float64 from the autograd gradients, reduced as the official code
    (layers without gradients contribute nothing)."""
    fan_out, fan_in = ROLE_GROUPS[group.kind]
    total = torch.zeros(group.n, dtype=torch.float64)
    for role in (*fan_out, fan_in):
        layer = strategy.adapters()[f"{group.block.name}.{role}"]
        if layer.A.grad is None:
            continue
        A, B = layer.A.detach().double(), layer.B.detach().double()
        gA, gB = layer.A.grad.double(), layer.B.grad.double()
        g_hat = gB @ A + B @ gA - gB @ gA
        importance = (g_hat * (layer.base.weight.double() + layer.scaling * B @ A)).abs()
        per_unit = importance.sum(1) if role in fan_out else importance.sum(0)
        per_group = per_unit.reshape(group.n, group.size).sum(1)
        total += per_group / (per_group.norm() + 1e-8)
    return total


def backward_once() -> LoRAPrune:
    """A LoRAPrune with random B after one training forward and backward (gradients in place)."""
    strategy = make()
    randomize_lora(strategy)
    info = experience_info(0, (0, 1), N_CLASSES)
    x, y = batch()
    strategy.train()
    strategy.loss(strategy.forward(x, info), y, info).backward()
    return strategy


def test_registered_with_the_paper() -> None:
    assert STRATEGIES.get("loraprune") is LoRAPrune
    assert "2305.18403" in LoRAPrune.paper


def test_importance_equals_the_formula_from_autograd_gradients() -> None:
    strategy = make()
    randomize_lora(strategy)
    info = experience_info(0, (0, 1), N_CLASSES)
    probe = strategy.adapters()["vision.1.q"]
    probe.base.weight.requires_grad_(True)  # reference full-weight gradient G for the sanity identity
    strategy.train()
    expected = []
    for step, seed in enumerate((0, 1)):
        x, y = batch(seed)
        strategy.loss(strategy.forward(x, info), y, info).backward()
        if step == 0:  # dL/dB = s G A^T, dL/dA = s B^T G: the LoRA gradients carry the scaling
            G, s = probe.base.weight.grad, probe.scaling
            torch.testing.assert_close(probe.B.grad, s * G @ probe.A.detach().t(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(probe.A.grad, s * probe.B.detach().t() @ G, rtol=1e-4, atol=1e-7)
        expected.append({g.name: expected_group_importance(strategy, g) for g in strategy.groups})
        strategy.after_backward(step)  # steps 0, 1 are in the warm-up: no pruning
        for p in strategy.trainable_parameters():
            p.grad = None
        probe.base.weight.grad = None
    assert len(strategy.groups) == 2 * 3 * 2  # attn + mlp of blocks 0-2 of both towers
    for g in strategy.groups:
        ema = 0.9 * (0.1 * expected[0][g.name]) + 0.1 * expected[1][g.name]
        torch.testing.assert_close(g.importance.double(), ema, rtol=1e-4, atol=1e-9)
        assert g.importance.abs().sum() > 0
        assert bool((g.mask == 1).all())


@pytest.mark.parametrize("chunk", [2**25, 1])
def test_batched_importance_with_missing_gradients_and_chunks_equals_the_formula(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched importance (layers of one shape scored together, in chunks when large) equals
    the per-layer formula when some layers have no gradient (their group sums the others), and a
    group none of whose layers has one keeps its average; chunk 1 scores every layer alone
    (the index path of partial buckets)."""
    monkeypatch.setattr(loraprune, "_SCORE_CHUNK", chunk)
    strategy = backward_once()
    adapters = strategy.adapters()
    adapters["vision.1.k"].A.grad = adapters["vision.1.k"].B.grad = None
    for role in ("fc1", "fc2"):  # the whole MLP group of text block 2
        adapters[f"text.2.{role}"].A.grad = adapters[f"text.2.{role}"].B.grad = None
    silent = next(g for g in strategy.groups if g.name == "text.2.mlp")
    silent.importance.fill_(0.5)
    expected = {g.name: expected_group_importance(strategy, g) for g in strategy.groups}
    strategy.after_backward(0)
    assert strategy._plan is not None
    # tiny-clip's towers have equal widths: a position's layers of both towers share one bucket (q, k,
    # v, out, fc1, fc2); one at a time, the 36 layers less the 3 without gradients
    assert len(strategy._plan.buckets) == (33 if chunk == 1 else 6)
    for g in strategy.groups:
        if g is silent:
            assert torch.equal(g.importance, torch.full_like(g.importance, 0.5))
        else:
            torch.testing.assert_close(g.importance.double(), 0.1 * expected[g.name], rtol=1e-4, atol=1e-9)
            assert g.importance.abs().sum() > 0


def test_a_non_finite_importance_skips_the_whole_update() -> None:
    strategy = backward_once()
    strategy.after_backward(0)
    before = [g.importance.clone() for g in strategy.groups]
    strategy.adapters()["text.2.fc2"].A.grad[0, 0] = float("nan")
    strategy.after_backward(1)
    assert all(torch.equal(g.importance, b) for g, b in zip(strategy.groups, before, strict=True))


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, 0.0), (0.1, 0.0), (0.3, 0.5 * (1 - 0.75**3)), (0.5, 0.5 * (1 - 0.5**3)), (0.9, 0.5), (1.0, 0.5)],
)
def test_schedule_matches_the_closed_form(fraction: float, expected: float) -> None:
    T = 1000
    assert sparsity_schedule(round(fraction * T), T, 0.5) == pytest.approx(expected, abs=1e-12)


def test_schedule_is_cubic_and_monotone_over_the_stream() -> None:
    T, R = 200, 0.4
    values = [sparsity_schedule(t, T, R) for t in range(T + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[20] == 0.0
    assert values[21] > 0.0
    assert values[180] == R
    t = 77
    assert values[t] == pytest.approx(R * (1 - (1 - (t - 20) / 160) ** 3), abs=1e-12)


def test_first_tenth_and_last_block_are_never_pruned() -> None:
    assert prunable_blocks(4) == [0, 1, 2]
    assert prunable_blocks(12) == list(range(1, 11))
    assert prunable_blocks(24) == list(range(2, 23))
    strategy = make()
    assert [g.name for g in strategy.groups] == [
        f"{t}.{i}.{k}" for t in ("vision", "text") for i in range(3) for k in ("attn", "mlp")
    ]
    for name, adapter in strategy.adapters().items():
        _tower, index, role = name.split(".")
        masked = int(index) < 3 and role in ("q", "k", "v", "fc1")
        assert (adapter.mask is not None) == masked, name


def test_pruning_rounds_follow_the_schedule_and_masks_are_monotone() -> None:
    T = 100
    strategy = make(steps=(60, 40))
    previous = {g.name: g.mask.clone() for g in strategy.groups}
    g = torch.Generator().manual_seed(0)
    for step in range(T):
        for group in strategy.groups:  # importance reshuffled every step, ties at zero every 3rd
            group.importance.copy_(torch.rand(group.n, generator=g) * (step % 3 != 0))
        strategy.after_backward(step)
        for group in strategy.groups:
            assert bool((group.mask <= previous[group.name]).all()), f"{group.name} revived at {step}"
            previous[group.name] = group.mask.clone()
            if strategy.prune_events:
                ratio = strategy.prune_events[-1][1]
                assert int((group.mask == 0).sum()) == math.floor(ratio * group.n)
            expanded = group.mask.repeat_interleave(group.size)
            for layer in group.fan_out:
                assert torch.equal(layer.mask, expanded)
            assert group.fan_in.mask is None
    assert [e[0] for e in strategy.prune_events] == [20, 30, 40, 50, 60, 70, 80]
    assert all(0 < e[1] < 0.5 for e in strategy.prune_events)
    last = strategy.prune_events[-1][1]
    assert last == pytest.approx(0.5 * (1 - (1 - 70 / 80) ** 3))
    report = strategy.final_report()
    fractions = report["per_layer"]["pruned_fraction"]
    assert fractions["vision.0.attn"] == math.floor(last * 4) / 4  # 4 heads of 16 in tiny-clip
    assert fractions["text.2.mlp"] == math.floor(last * 256) / 256
    assert fractions["vision.3.attn"] == 0.0
    assert fractions["text.3.mlp"] == 0.0
    assert report["scalars"]["achieved_sparsity"] < 0.5
    assert strategy.report()["sparsity"] == report["scalars"]["achieved_sparsity"]


def zeroed(group: Any) -> list[int]:
    """Indices of the pruned heads/channels of a group, ascending."""
    return torch.nonzero(group.mask == 0).flatten().tolist()


def least_important(importance: torch.Tensor, pruned: list[int], k: int) -> list[int]:
    """``argsort(importance)[:k]`` with the already-pruned groups ranked lowest (counted among the k)."""
    score = importance.clone()
    score[pruned] = -math.inf
    return sorted(torch.argsort(score)[:k].tolist())


def distinct_importance(n: int, seed: int) -> torch.Tensor:
    """The values 1..n in a random order (no ties)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float() + 1.0


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_prune_to_zeroes_the_least_important_groups(kind: str) -> None:
    """With a pruned group that now has the highest (stale) importance and a live one at 0: the
    zeroed set is argsort(importance)[:floor(ratio n)], the pruned group counted among them."""
    strategy = make()
    group = next(g for g in strategy.groups if g.kind == kind)
    n = group.n
    importance = distinct_importance(n, seed=0)
    dead = int(torch.argmin(importance))
    group.importance.copy_(importance)
    group.prune_to(1.5 / n)  # floor(1.5) = 1: only the least important group
    assert zeroed(group) == [dead]
    importance = distinct_importance(n, seed=1)
    importance[dead] = n + 1.0  # the pruned group would now rank highest
    live = [j for j in range(n) if j != dead]
    zero = live[int(torch.argmax(importance[live]))]
    importance[zero] = 0.0  # the most important live group drops to 0: just above the pruned one
    group.importance.copy_(importance)
    ratio = 0.75
    k = math.floor(ratio * n)
    group.prune_to(ratio)
    expected = least_important(importance, [dead], k)
    assert zeroed(group) == expected
    assert len(expected) == k
    assert dead in expected
    assert zero in expected
    assert expected != sorted(torch.argsort(importance)[:k].tolist())  # dead is counted, not re-ranked
    assert torch.equal(group.importance, importance)  # pruning leaves the importance alone
    for layer in group.fan_out:
        assert torch.equal(layer.mask, group.mask.repeat_interleave(group.size))


def test_pruning_rounds_zero_the_least_important_groups_of_every_layer() -> None:
    """Through the strategy's hook at two pruning steps (T = 100, ratio 0.9: steps 30 and 80)."""
    strategy = make(steps=(50, 50), ratio=0.9)
    first: dict[str, list[int]] = {}
    for round_, step in enumerate((30, 80)):
        target = strategy.target(step)
        assert 0.0 < target < 0.9
        set_to = {}
        for i, group in enumerate(strategy.groups):
            importance = distinct_importance(group.n, seed=100 * round_ + i)
            if round_ == 1:  # the pruned groups now carry the highest importance, a live one is 0
                importance[first[group.name]] = group.n + 1.0 + torch.arange(len(first[group.name])).float()
                live = [j for j in range(group.n) if j not in first[group.name]]
                importance[live[int(torch.argmax(importance[live]))]] = 0.0
            group.importance.copy_(importance)
            set_to[group.name] = importance
        strategy.after_backward(step)  # no gradients: the importance stays as set, a round runs
        assert strategy.prune_events[-1] == [step, target]
        for group in strategy.groups:
            k = math.floor(target * group.n)
            expected = least_important(set_to[group.name], first.get(group.name, []), k)
            assert zeroed(group) == expected, f"{group.name} at step {step}"
            assert set(first.get(group.name, [])) <= set(expected)
            first[group.name] = expected
    assert {len(first[g.name]) for g in strategy.groups if g.kind == "attn"} == {3}  # floor(0.898 * 4)


def test_masks_zero_whole_heads_and_channels_of_the_layer_output() -> None:
    """Per layer and through the fused q/k/v projection the attention uses: bias included."""
    from cl_bench.adapters import fused_projections

    strategy = make(steps=(50, 50))
    randomize_lora(strategy)
    drive_schedule(strategy, range(60))
    group = next(g for g in strategy.groups if g.name == "vision.1.attn")
    mlp = next(g for g in strategy.groups if g.name == "vision.1.mlp")
    adapters = strategy.adapters()
    x = torch.randn(2, 5, adapters["vision.1.q"].in_features, generator=torch.Generator().manual_seed(0))
    strategy.eval()
    with torch.no_grad():
        outputs = {role: adapters[f"vision.1.{role}"](x) for role in ("q", "k", "v", "fc1")}
        grouped = fused_projections(x, [adapters[f"vision.1.{role}"] for role in ("q", "k", "v")])
    assert grouped is not None
    torch.testing.assert_close(grouped, torch.cat([outputs[r] for r in ("q", "k", "v")], dim=-1))
    pruned_heads = torch.nonzero(group.mask == 0).flatten()
    assert pruned_heads.numel() == 1
    for role in ("q", "k", "v"):
        heads = outputs[role].unflatten(-1, (group.n, group.size))
        assert bool((heads[..., pruned_heads, :] == 0).all())  # bias included
        assert bool((heads[..., group.mask > 0, :] != 0).any())
    pruned_channels = mlp.mask == 0
    assert bool((outputs["fc1"][..., pruned_channels] == 0).all())
    assert bool((outputs["fc1"][..., ~pruned_channels] != 0).all())


@pytest.mark.parametrize("backbone_name", ["tiny-clip", "tiny-hf-clip", "tiny-vit"])
def test_sliced_model_computes_the_masked_function(backbone_name: str) -> None:
    strategy = make(backbone_name)
    randomize_lora(strategy)
    drive_schedule(strategy, range(60))
    x = batch()[0]
    masked = eval_logits(strategy, x)
    n_before = sum(p.numel() for p in strategy.backbone.model.parameters())
    n_lora = sum(p.numel() for a in strategy.adapters().values() for p in (a.A, a.B))
    removed = sum(g.removed_parameters() for g in strategy.groups)
    assert removed > 0
    variants = strategy.final_variants()
    assert list(variants) == ["merged", "sliced"]
    with variants["merged"]():
        torch.testing.assert_close(eval_logits(strategy, x), masked, rtol=1e-5, atol=1e-5)
    with variants["sliced"]():
        torch.testing.assert_close(eval_logits(strategy, x), masked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in strategy.backbone.model.parameters()) == n_before - n_lora - removed
    for g in strategy.groups:
        kept = int((g.mask > 0).sum())
        fan_out, fan_in = ROLE_GROUPS[g.kind]
        for role in fan_out:
            layer = strategy.backbone.linear(g.block, role)
            assert type(layer) is nn.Linear
            assert layer.out_features == kept * g.size
        assert strategy.backbone.linear(g.block, fan_in).in_features == kept * g.size
    assert not any(isinstance(m, MaskedLoRALinear) for m in strategy.backbone.modules())
    scalars = strategy.final_report()["scalars"]
    assert scalars["backbone_parameters_removed"] == removed
    assert scalars["backbone_parameters_pruned_model"] == n_before - n_lora - removed
    assert scalars["backbone_sparsity"] == removed / (n_before - n_lora)


def test_a_stream_too_short_to_prune_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        make(steps=(3, 3))
    assert "no pruning round fits in the 6 steps" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        make(steps=(3, 3), prune_every=1)
    assert "no pruning round" not in caplog.text


def test_slicing_is_exact_in_float64() -> None:
    strategy = make()
    randomize_lora(strategy)
    drive_schedule(strategy, range(60))
    strategy.backbone.double()
    x = batch()[0].double()
    masked = eval_logits(strategy, x)
    strategy.slice()
    torch.testing.assert_close(eval_logits(strategy, x), masked, rtol=0, atol=1e-12)


def test_heads_are_read_from_a_vit_b_width_model(tmp_path: Path) -> None:
    """Width 768 in heads of 64 (ViT-B): 12 heads per block, sliced by whole heads."""
    name = "cl-bench-test-vit-b-width"
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 768, "patch_size": 16, "head_width": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    backbone = load_open_clip(name, "", name=name, config_dir=tmp_path)
    strategy = make(backbone)
    attn = [g for g in strategy.groups if g.kind == "attn"]
    assert [(g.name, g.n, g.size) for g in attn] == [
        ("vision.0.attn", 12, 64),
        ("vision.1.attn", 12, 64),
        ("text.0.attn", 2, 64),
    ]
    randomize_lora(strategy)
    drive_schedule(strategy, range(60))
    x = batch()[0]
    masked = eval_logits(strategy, x)
    strategy.slice()
    torch.testing.assert_close(eval_logits(strategy, x), masked, rtol=1e-4, atol=1e-4)
    ratio = strategy.prune_events[-1][1]
    kept = 12 - math.floor(ratio * 12)
    module = strategy.backbone.block_module(attn[0].block).attn
    assert module.q_proj.weight.shape == (kept * 64, 768)
    assert module.out_proj.weight.shape == (768, kept * 64)
    assert module.n_heads == kept


def test_run_record_has_sparsity_and_the_sliced_variant(run_quick) -> None:
    record = run_quick("loraprune", strategy_args={"prune_every": 1})
    assert record.status == "ok"
    variants = record.accuracy["variants"]
    assert [v for v in variants if v != "main"] == ["merged", "sliced"]  # "main": the loop's baseline
    assert variants["sliced"]["row"] == record.accuracy["matrix"][-1]
    assert variants["sliced"]["eval_samples_per_s"] > 0
    report = record.strategy_report
    T = 6  # 2 experiences x 3 steps
    ratio = sparsity_schedule(5, T, 0.5)
    assert report["events"]["prune_rounds"]["fields"] == ["step", "ratio"]
    expected = [[t, sparsity_schedule(t, T, 0.5)] for t in range(1, 6)]
    assert report["events"]["prune_rounds"]["entries"] == expected
    fractions = report["per_layer"]["pruned_fraction"]
    assert fractions["vision.1.attn"] == math.floor(ratio * 4) / 4
    assert fractions["vision.1.mlp"] == math.floor(ratio * 256) / 256
    assert fractions["vision.3.mlp"] == 0.0
    assert 0 < report["scalars"]["achieved_sparsity"] < 0.5
    assert record.experiences[-1].strategy["sparsity"] == report["scalars"]["achieved_sparsity"]


def test_state_dict_restores_lora_and_masks() -> None:
    source = make()
    randomize_lora(source)
    drive_schedule(source, range(60))
    target = make()
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.groups, target.groups, strict=True):
        assert torch.equal(a.mask, b.mask)
        assert a.n_pruned == b.n_pruned > 0
    x = batch()[0]
    torch.testing.assert_close(eval_logits(target, x), eval_logits(source, x), rtol=0, atol=0)


def test_merge_each_experience_keeps_the_function_and_restarts_lora() -> None:
    strategy = make(merge_each_experience=True)
    randomize_lora(strategy)
    drive_schedule(strategy, range(30))
    x = batch()[0]
    before = eval_logits(strategy, x)
    strategy.after_experience(experience_info(0, (0, 1), N_CLASSES))
    assert all(bool((a.B == 0).all()) for a in strategy.adapters().values())
    torch.testing.assert_close(eval_logits(strategy, x), before, rtol=1e-5, atol=1e-5)


def test_masked_layer_keeps_the_autocast_dtype() -> None:
    layer = MaskedLoRALinear(nn.Linear(8, 6), r=2, alpha=4.0, masked=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"ratio": -0.1}, "ratio must be in"),
        ({"r": 0}, "r must be"),
        ({"prune_every": 0}, "prune_every"),
        ({"warmup": 0.5, "cooldown": 0.5}, "warmup"),
        ({"ema": 1.0}, "ema"),
        ({"towers": ["audio"]}, "towers"),
    ],
)
def test_bad_config_fails_with_one_line(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config.build(LoRAPrune.Config, args, "loraprune")
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_importance_and_pruning_do_not_sync_on_cuda() -> None:
    strategy = make()
    strategy.to(torch.device("cuda"))
    randomize_lora(strategy)
    info = experience_info(0, (0, 1), N_CLASSES)
    info = dataclasses.replace(info, logit_classes=info.logit_classes.cuda())
    x, y = (t.cuda() for t in batch())
    strategy.train()
    strategy.loss(strategy.forward(x, info), y, info).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        strategy.after_backward(20)  # a pruning round (T = 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert strategy.prune_events == [[20, sparsity_schedule(20, 100, 0.5)]]
