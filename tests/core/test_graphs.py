"""CUDA-graph replay of forward/backward: the contract on the CPU, equality with eager on a GPU."""

from __future__ import annotations

import pytest
import torch

from cl_bench import config, loop
from cl_bench.graphs import StepGraphs
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo
from tests.helpers import head_for, tiny_backbone, tiny_context

GRAPH_SAFE = sorted(n for n in STRATEGIES.names() if STRATEGIES.get(n).graph_safe)


def build(name: str, device: torch.device, args: dict | None = None):
    backbone = tiny_backbone("tiny-clip")
    head = head_for(backbone, 4)
    cls = STRATEGIES.get(name)
    cfg = config.build(cls.Config, args or {}, name)
    torch.manual_seed(1)
    ctx = tiny_context(steps=(12, 12))
    ctx = type(ctx)(**{**ctx.__dict__, "device": device})
    strategy = cls(cfg, backbone, head, ctx)
    loop.place(strategy, device, "fp32")
    return strategy


def training_info(device: torch.device) -> ExperienceInfo:
    return ExperienceInfo(
        index=0,
        classes=(0, 1),
        seen_classes=(0, 1),
        logit_classes=torch.tensor([0, 1], device=device),
        task_label=0,
        n_samples=8,
        n_steps=12,
        training=True,
    )


def test_only_lisa_and_zero_shot_run_eagerly() -> None:
    """LISA flips requires_grad every K steps (a new set of gradients): it stays eager."""
    assert set(STRATEGIES.names()) - set(GRAPH_SAFE) == {"lisa", "zero-shot"}
    lisa = build("lisa", torch.device("cpu"))
    lisa.before_step(0)
    assert lisa.graph_key() is None
    assert build("lora", torch.device("cpu")).graph_key() == ()


def test_dylora_keys_its_graphs_by_the_sampled_rank() -> None:
    strategy = build("dylora", torch.device("cpu"))
    for step in range(6):
        strategy.before_step(step)
        assert strategy.graph_key() == strategy.rank == strategy.last_rank


def test_no_graphs_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    strategy = build("lora", cpu)
    assert loop.step_graphs(strategy, training_info(cpu), device=cpu, precision="fp32") is None
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(lambda x, y: x.sum(), [], cpu)


def test_cuda_graphs_is_a_typed_run_key() -> None:
    assert config.resolve([{"cuda_graphs": False}]).cuda_graphs is False
    with pytest.raises(config.ConfigError, match="true or false"):
        config.resolve([{"cuda_graphs": "yes"}])


def _train(strategy, device: torch.device, *, graphs: bool, n_steps: int = 24):
    info = training_info(device)
    strategy.train()
    strategy.before_experience(info)
    strategy.head.invalidate()
    optimizer = strategy.make_optimizer(1e-2, 0.01)
    runner = loop.step_graphs(strategy, info, device=device, precision="fp32") if graphs else None
    g = torch.Generator(device=device).manual_seed(0)
    losses = []
    for step in range(n_steps):
        x = torch.randn(8, 3, 32, 32, device=device, generator=g)
        y = torch.randint(0, 2, (8,), device=device, generator=g)
        losses.append(
            loop.train_step(
                strategy, optimizer, None, x, y, info, step, device=device, precision="fp32", graphs=runner
            ).item()
        )
    strategy.after_experience(info)
    return losses, runner


@pytest.mark.gpu
@pytest.mark.parametrize("name", GRAPH_SAFE)
def test_graph_replay_trains_exactly_as_eager(name: str) -> None:
    """Same init, same batches: losses and every trained parameter match the eager run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = build(name, device)
    graphed = build(name, device)
    eager_losses, _ = _train(eager, device, graphs=False)
    graph_losses, runner = _train(graphed, device, graphs=True)
    assert runner is not None
    assert runner.n_replays >= 4, (runner.n_replays, runner.n_eager)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(eager.trainable_parameters(), graphed.trainable_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    untrained = build(name, device).trainable_parameters()
    assert any(
        not torch.equal(a, b) for a, b in zip(graphed.trainable_parameters(), untrained, strict=True)
    ), "the graphed run did not train"
