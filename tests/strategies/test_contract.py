"""The contract every registered strategy must meet (one row per strategy in CONTRACT).

A new strategy adds one row: its registry name -> the strategy args used by these tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from cl_bench import config, loop
from cl_bench.backbones.base import RECOMPILE_LIMIT
from cl_bench.registry import STRATEGIES
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context

CONTRACT: dict[str, dict] = {
    "zero-shot": {},
    "finetune": {},
    "linear-probe": {},
    "lora": {},
    "mora": {},
    "loraprune": {},
    "sora": {},
    "dylora": {},
    "lisa": {},
    "allora": {},
    "smora": {},
    "flylora": {},
}


def test_every_registered_strategy_has_a_contract_row() -> None:
    missing = sorted(set(STRATEGIES.names()) - set(CONTRACT))
    assert not missing, f"add a row to CONTRACT in {__file__} for: {', '.join(missing)}"


def build(name: str, backbone_name: str = "tiny-clip", n_classes: int = 4):
    backbone = tiny_backbone(backbone_name)
    head = head_for(backbone, n_classes)
    cls = STRATEGIES.get(name)
    cfg = config.build(cls.Config, CONTRACT[name], name)
    torch.manual_seed(1)
    return backbone, head, cls(cfg, backbone, head, tiny_context(n_classes=n_classes))


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_runs_end_to_end_and_writes_an_ok_record(name: str, run_quick) -> None:
    record = run_quick(name, strategy_args=CONTRACT[name])
    assert record.status == "ok"
    matrix = record.accuracy["matrix"]
    assert len(matrix) == 2
    assert all(len(row) == 2 for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert math.isfinite(record.metrics["acc_final"])
    assert record.metrics["forgetting"] is not None
    assert len(record.experiences) == 2
    trains = STRATEGIES.get(name).trains
    assert all((e.n_trainable > 0) == trains for e in record.experiences)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_untrained_strategy_computes_the_backbone_function(name: str) -> None:
    """Adapters start as the identity (B = 0 or equivalent): outputs equal the plain backbone's."""
    reference_backbone = tiny_backbone("tiny-clip")
    reference_head = head_for(reference_backbone, 4)
    _, _, strategy = build(name)
    strategy.before_experience(experience_info(0, (0, 1), 4))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classes = torch.arange(4)
    strategy.eval()
    reference_backbone.eval()
    with torch.no_grad():
        expected = reference_head(reference_backbone.encode_image(x), classes)
        got = strategy.forward(x, experience_info(0, (0, 1), 4, training=False))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_same_seed_gives_identical_matrix(name: str, tmp_path) -> None:
    from tests.helpers import quick_run

    a = quick_run(tmp_path / "a", name, strategy_args=CONTRACT[name])
    b = quick_run(tmp_path / "b", name, strategy_args=CONTRACT[name])
    assert a.accuracy["correct"] == b.accuracy["correct"]
    assert a.experiences[-1].loss_last == b.experiences[-1].loss_last


@pytest.mark.parametrize("name", sorted(CONTRACT))
@pytest.mark.parametrize("backbone_name", ["tiny-hf-clip", "tiny-vit"])
def test_trains_on_transformers_backbones(name: str, backbone_name: str, run_quick) -> None:
    record = run_quick(name, strategy_args=CONTRACT[name], backbone=backbone_name)
    assert record.status == "ok"
    assert record.backbone["kind"] == ("vision" if backbone_name == "tiny-vit" else "clip")


# Strategies that change, between steps of one experience, block state dynamo specialises on:
# LISA the trainable blocks, DyLoRA the sampled rank. They compile one graph per distinct state.
PER_STEP_GRAPHS = {"lisa", "dylora"}
# LISA resamples twice per experience; DyLoRA with 4 ranks (its graphs grow with r_max; tracing is slow)
COMPILE_ARGS = {"lisa": {"interval_steps": 3}, "dylora": {"r_max": 4, "eval_ranks": [1, 2, 4]}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in CONTRACT if STRATEGIES.get(n).trains))
def test_compiled_blocks_stay_compiled(name: str) -> None:
    """``--set compile=true`` never silently falls back to eager: over two experiences of training
    and evaluation every block stays under the recompile limit (a fallback raises here), and a
    strategy whose blocks keep their state between steps compiles nothing after its first steps
    (a per-step Python counter on a module would recompile every step). Dynamo's ``eager``
    backend: the tracing and guards of ``torch.compile`` without inductor's code generation."""
    torch._dynamo.reset()
    backbone = tiny_backbone("tiny-clip")
    cls = STRATEGIES.get(name)
    cfg = config.build(cls.Config, {**CONTRACT[name], **COMPILE_ARGS.get(name, {})}, name)
    strategy = cls(cfg, backbone, head_for(backbone, 4), tiny_context(steps=(6, 6), n_classes=4))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    cpu = torch.device("cpu")

    def train(info, steps: range, optimizer) -> None:
        strategy.train()
        for step in steps:
            loop.train_step(strategy, optimizer, None, x, y, info, step, device=cpu, precision="fp32")

    def evaluate(info) -> None:
        strategy.eval()
        with torch.no_grad():
            strategy.forward(x, info)

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        first = experience_info(0, (0, 1), 4, n_steps=6)
        strategy.train()
        strategy.before_experience(first)
        backbone.compile_towers(backend="eager")
        assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
        optimizer = strategy.make_optimizer(1e-3, 0.0)
        train(first, range(2), optimizer)
        evaluate(first)
        steady = torch._dynamo.config.patch(error_on_recompile=name not in PER_STEP_GRAPHS)
        with steady:
            train(first, range(2, 6), optimizer)
            evaluate(first)
        strategy.after_experience(first)
        second = experience_info(1, (2, 3), 4, n_steps=6)
        strategy.train()
        strategy.before_experience(second)
        train(second, range(6, 12), strategy.make_optimizer(1e-3, 0.0))
        evaluate(second)
        strategy.after_experience(second)
    torch._dynamo.reset()
