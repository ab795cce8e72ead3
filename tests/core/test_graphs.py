"""CUDA-graph replay of forward/backward: the contract on the CPU, equality with eager on a GPU."""

from __future__ import annotations

import pytest
import torch

from cl_bench import config, loop
from cl_bench.graphs import StepGraphs, _Captured, same_objects
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import ExperienceInfo
from tests.helpers import head_for, tiny_backbone, tiny_context

GRAPH_SAFE = sorted(n for n in STRATEGIES.names() if STRATEGIES.get(n).graph_safe)
# Graph-safe strategies whose graphs must not span experiences (Strategy.graph_key), and why.
NOT_SPANNING = {
    "mora": "adds a block of parameters at every experience and builds class masks from it",
    "lisa": "a new key every K steps that rarely recurs: nothing worth keeping across experiences",
}


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


def test_only_zero_shot_runs_eagerly() -> None:
    """Zero-shot trains nothing; LISA is keyed by its active blocks (a new key every K steps)."""
    assert set(STRATEGIES.names()) - set(GRAPH_SAFE) == {"zero-shot"}
    assert build("lora", torch.device("cpu")).graph_key() == ()


def test_lisa_keys_its_graph_by_the_active_blocks_of_each_tower() -> None:
    """Same key within an interval, a new one when the blocks are resampled, equal to the active
    sets: the parameters that get gradients and the checkpointed blocks are the key's."""
    lisa = build("lisa", torch.device("cpu"), {"gamma": 1, "interval_steps": 3})
    keys = []
    for step in range(12):
        lisa.before_step(step)
        key = lisa.graph_key()
        assert key == tuple((tower, tuple(lisa.active[tower])) for tower in lisa.towers)
        keys.append(key)
    assert all(keys[i] == keys[i - i % 3] for i in range(12))
    assert len(set(keys)) > 1
    trained = {id(p) for p in lisa.trainable_parameters() if p.requires_grad}
    for tower, chosen in keys[-1]:
        for i, params in enumerate(lisa.block_params[tower]):
            assert all((id(p) in trained) == (i in chosen) for p in params)
    assert (type(lisa).graph_cache_size, type(lisa).graph_rewarmup_steps) == (2, 0)


def test_graphs_span_experiences_for_the_strategies_whose_step_reads_no_experience_state() -> None:
    """Every graph-safe strategy keeps its captured graphs across experiences but those of
    NOT_SPANNING (MoRA and LISA); zero-shot runs eagerly. A new graph-safe strategy that does not
    declare ``graphs_span_experiences`` must say why in NOT_SPANNING."""
    spanning = {n for n in STRATEGIES.names() if STRATEGIES.get(n).graphs_span_experiences}
    assert spanning == set(GRAPH_SAFE) - set(NOT_SPANNING)
    assert set(NOT_SPANNING) <= set(GRAPH_SAFE)


def test_dylora_replays_one_graph_for_every_sampled_rank() -> None:
    """The rank reaches the step through device tensors rewritten in place: the key never changes."""
    strategy = build("dylora", torch.device("cpu"))
    ranks = set()
    for step in range(12):
        strategy.before_step(step)
        assert strategy.graph_key() == ()
        assert strategy.rank == strategy.last_rank
        ranks.add(strategy.rank)
    assert len(ranks) > 1


def test_no_graphs_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    strategy = build("lora", cpu)
    assert loop.step_graphs(strategy, training_info(cpu), device=cpu, precision="fp32") is None
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(lambda x, y: x.sum(), [], cpu)


class _FakeGraph:
    """Stands for a captured CUDA graph on the CPU: counts replays, records its reset."""

    def __init__(self) -> None:
        self.replays = 0
        self.was_reset = False

    def replay(self) -> None:
        self.replays += 1

    def reset(self) -> None:
        self.was_reset = True


def _fake_capture(self: StepGraphs, x: torch.Tensor, y: torch.Tensor) -> _Captured:
    self.n_captures += 1
    return _Captured(
        _FakeGraph(), x.clone(), y.clone(), torch.zeros(()), [torch.ones_like(p) for p in self.params]
    )


FAKE_CUDA = torch.device("cuda")  # StepGraphs only checks the type: nothing below runs on it


def _experience(strategy, buffers: dict, index: int, classes: list[int]) -> ExperienceInfo:
    """The loop's start of a training experience (before_experience, invalidate, optimizer)."""
    info = ExperienceInfo(
        index=index,
        classes=tuple(classes),
        seen_classes=tuple(classes),
        logit_classes=loop.static_classes(buffers, classes, torch.device("cpu")),
        task_label=0,
        n_samples=8,
        n_steps=4,
        training=True,
    )
    strategy.train()
    strategy.before_experience(info)
    strategy.head.invalidate()
    strategy.make_optimizer(1e-3, 0.0)
    return info


def test_static_classes_keep_one_buffer_per_length_written_in_place() -> None:
    buffers: dict = {}
    first = loop.static_classes(buffers, [0, 1], torch.device("cpu"))
    again = loop.static_classes(buffers, [2, 3], torch.device("cpu"))
    assert again is first
    assert again.tolist() == [2, 3]
    assert again.dtype == torch.long
    longer = loop.static_classes(buffers, [0, 1, 2, 3], torch.device("cpu"))
    assert longer is not first
    assert longer.tolist() == [0, 1, 2, 3]
    assert loop.static_classes(buffers, [0, 3], torch.device("cpu")) is first
    assert same_objects([first, longer], [first, longer])
    assert not same_objects([first], [first.clone()])


def test_runner_spans_experiences_only_when_declared_and_on_the_same_tensors(monkeypatch) -> None:
    """Same parameters, the same logit-classes buffer and the head's cache refreshed in place:
    the previous runner (and its graphs) again; anything else: a new runner, the old one released."""
    strategy = build("lora", torch.device("cpu"), {"towers": ["vision"]})  # frozen text: cached features
    run = lambda info, previous: loop.step_graphs(  # noqa: E731
        strategy, info, device=FAKE_CUDA, precision="fp32", previous=previous
    )
    buffers: dict = {}
    monkeypatch.setattr(type(strategy), "graphs_span_experiences", False)
    first = run(_experience(strategy, buffers, 0, [0, 1]), None)
    assert first is not None
    assert first.reads is None
    second = run(_experience(strategy, buffers, 1, [2, 3]), first)
    assert second is not first

    monkeypatch.setattr(type(strategy), "graphs_span_experiences", True)
    first = run(_experience(strategy, buffers, 0, [0, 1]), second)
    assert first is not None
    assert first.reads is not None
    logit_classes, cached = first.reads
    assert logit_classes is buffers[2]
    assert cached is strategy.head._cache
    info = _experience(strategy, buffers, 1, [2, 3])
    body = first.body
    assert run(info, first) is first  # same parameters, same buffer, cache refreshed in place
    assert first.body is not body  # eager and new captures run this experience's info
    assert logit_classes.tolist() == [2, 3]
    first._graphs["k"] = _fake_capture(first, torch.zeros(2), torch.zeros(2))
    graph = first._graphs["k"].graph
    seen = run(_experience(strategy, buffers, 2, [0, 1, 2, 3]), first)  # "seen": another length
    assert seen is not first
    assert seen is not None
    assert seen.reads is not None
    assert seen.reads[0] is buffers[4]
    assert graph.was_reset
    assert first.n_captured == 0


def _replace_head_cache(strategy) -> None:
    strategy.head._cache = None  # as after a shape or dtype change: the head builds a new tensor


@pytest.mark.parametrize(
    ("name", "args", "between"),
    [
        ("mora", {}, lambda strategy: None),  # a new block of parameters at every experience
        ("lora", {"towers": ["vision"]}, _replace_head_cache),
    ],
    ids=["new-parameters", "new-head-cache"],
)
def test_runner_is_not_reused_when_the_step_reads_other_tensors(monkeypatch, name, args, between) -> None:
    strategy = build(name, torch.device("cpu"), args)
    monkeypatch.setattr(type(strategy), "graphs_span_experiences", True)
    buffers: dict = {}
    first = loop.step_graphs(
        strategy, _experience(strategy, buffers, 0, [0, 1]), device=FAKE_CUDA, precision="fp32"
    )
    assert first is not None
    info = _experience(strategy, buffers, 1, [2, 3])
    between(strategy)
    assert loop.step_graphs(strategy, info, device=FAKE_CUDA, precision="fp32", previous=first) is not first


def test_a_spanning_runner_replays_the_short_batch_from_its_second_experience(monkeypatch) -> None:
    """The first two sights of a (key, shape) run eagerly, the third captures, later ones replay:
    over three experiences of three full batches and a short one, four eager steps and two captures."""
    monkeypatch.setattr(StepGraphs, "_capture", _fake_capture)
    param = torch.nn.Parameter(torch.ones(3))
    calls = []

    def body(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        loss = (param * x.sum()).sum()
        loss.backward()
        return loss

    runner = StepGraphs(body, [param], FAKE_CUDA, reads=())
    full, short = torch.ones(8), torch.ones(2)
    counts = []
    for _ in range(3):  # experiences, each: 3 full batches and the short one
        for x in (full, full, full, short):
            runner((), x, x)
            param.grad = None  # the optimizer's zero_grad
        counts.append((runner.n_eager, runner.n_captures, runner.n_replays))
    assert counts == [(3, 1, 1), (4, 1, 4), (4, 2, 8)]
    assert calls == [8, 8, 2, 2]  # only the warm-up steps ran the body
    graphs = [c.graph for c in runner._graphs.values()]
    assert [g.replays for g in graphs] == [7, 1]
    runner((), full, full)  # the last replay leaves the graph's gradient on the parameter
    assert param.grad is not None
    runner.release()
    assert runner.n_captured == 0
    assert all(g.was_reset for g in graphs)
    assert param.grad is None


def test_a_bounded_runner_keeps_the_newest_graphs_and_captures_new_keys_at_once(monkeypatch) -> None:
    """LISA's runner (max_graphs 2, rewarmup 0): the first key warms up twice; a later key at a
    shape already captured is captured at its first step; the least recently used graph is reset
    and dropped (its gradient off the parameter) before a capture beyond the limit; a new shape
    still warms up."""
    monkeypatch.setattr(StepGraphs, "_capture", _fake_capture)
    param = torch.nn.Parameter(torch.ones(3))

    def body(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = (param * x.sum()).sum()
        loss.backward()
        return loss

    runner = StepGraphs(body, [param], FAKE_CUDA, max_graphs=2, rewarmup_steps=0)
    full, short = torch.ones(8), torch.ones(2)
    for key in ("a", "a", "a", "b", "a", "c"):
        runner(key, full, full)
    assert (runner.n_eager, runner.n_captures, runner.n_replays, runner.n_evictions) == (2, 3, 4, 1)
    held = list(runner._graphs)
    assert [k[0] for k in held] == ["a", "c"]  # "b" was the least recently used
    first_grad = param.grad
    runner("d", full, full)  # evicts "a", whose gradient the parameter holds no more
    assert [k[0] for k in runner._graphs] == ["c", "d"]
    assert param.grad is not first_grad
    runner("d", short, short)  # a new shape warms up as the first key did
    assert runner.n_eager == 3
    with pytest.raises(ValueError, match="max_graphs"):
        StepGraphs(body, [param], FAKE_CUDA, max_graphs=0)


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
def test_lisa_graphs_train_exactly_as_eager_across_resampled_blocks() -> None:
    """LISA resampling one block per tower every 4 steps: 6 keys over 24 steps, each captured at its
    first step, the same losses and weights as eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    args = {"gamma": 1, "interval_steps": 4}
    eager, graphed = build("lisa", device, args), build("lisa", device, args)
    eager_losses, _ = _train(eager, device, graphs=False)
    graph_losses, runner = _train(graphed, device, graphs=True)
    assert runner is not None
    assert (runner.n_eager, runner.n_replays) == (2, 22)
    assert runner.n_captured <= 2
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(eager.trainable_parameters(), graphed.trainable_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


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
