"""What README's "Adding a strategy" promises, checked.

- The LoRA+ file printed there runs as written: it is read from the README, registered for one
  test at a time (the registry is restored afterwards), learns the README demo's stream through
  ``cl_bench.loop.run`` as every strategy must (tests/strategies/test_learning.py) and trains its
  B matrices at 16 times the learning rate of A.
- Every registered strategy follows the stated rules: the registry key is its module's name, the
  module is imported by ``strategies/__init__.py`` and opens with a docstring, the constructor is
  written out as ``(cfg, backbone, head, ctx)``, the config is a frozen dataclass that rejects
  unknown keys, the adapters are an ``AdapterSet`` over the frozen backbone, and with
  ``merge_each_experience`` the end of an experience folds them into W0 without changing the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import strategies
from cl_bench import config
from cl_bench.adapter_set import AdapterSet
from cl_bench.backbones.base import ROLES
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy
from tests.helpers import experience_info, head_for, tiny_backbone, tiny_context
from tests.strategies.test_learning import FLOOR, learn, plasticity

README = Path(__file__).resolve().parents[2] / "README.md"
RATIO = 16.0  # LoRA+'s default learning-rate ratio of B to A


def readme_strategy() -> str:
    """The Python block of README's "Adding a strategy" section, dedented."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Adding a strategy\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "the section shows one Python file"
    return textwrap.dedent(blocks[0][1])


def register_readme_strategy(monkeypatch: pytest.MonkeyPatch) -> type[Strategy]:
    """Run the README's file as a module whose registration lands in a copy of the registry that
    ``monkeypatch`` puts back at the end of the test."""
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    monkeypatch.setattr(STRATEGIES, "_aliases", dict(STRATEGIES._aliases))
    module = types.ModuleType("readme_lora_plus")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(readme_strategy(), f"{README}: Adding a strategy", "exec"), module.__dict__)
    strategy_cls: type[Strategy] = STRATEGIES.get("lora-plus")
    return strategy_cls


@pytest.fixture
def lora_plus(monkeypatch: pytest.MonkeyPatch) -> type[Strategy]:
    return register_readme_strategy(monkeypatch)


def test_the_readme_strategy_is_registered_for_the_test_only() -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_readme_strategy(monkeypatch)
        assert "lora-plus" in STRATEGIES
    assert "lora-plus" not in STRATEGIES
    assert "readme_lora_plus" not in sys.modules


def test_the_readme_strategy_learns_the_demo_stream(lora_plus: type[Strategy], tmp_path: Path) -> None:
    record = learn("lora-plus", tmp_path)
    assert record.status == "ok"
    value = plasticity(record)
    assert value >= FLOOR, f"lora-plus: plasticity {value:.3f} below the floor {FLOOR}"


def test_the_readme_strategy_trains_b_at_ratio_times_the_learning_rate(lora_plus: type[Strategy]) -> None:
    backbone = tiny_backbone("tiny-clip")
    cfg = config.build(lora_plus.Config, {}, "lora-plus")
    assert cfg.ratio == RATIO
    strategy = lora_plus(cfg, backbone, head_for(backbone, 4), tiny_context())
    adapters = strategy.adapters()
    assert isinstance(adapters, AdapterSet)
    assert len(adapters) == 6 * len(backbone.blocks)
    lr = 1e-3
    optimizer = strategy.make_optimizer(lr, 0.0)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(lr_of[id(a.B)] == lr * RATIO and lr_of[id(a.A)] == lr for a in adapters.values())
    # one Adam step from B = 0: A has no gradient yet and stays, each entry of B moves by its lr
    A = [a.A.detach().clone() for a in adapters.values()]
    info = experience_info(0, (0, 1), 4)
    strategy.train()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 4)
    strategy.loss(strategy.forward(x, info), y, info).backward()
    optimizer.step()
    assert all(torch.equal(a.A, before) for a, before in zip(adapters.values(), A, strict=True))
    moved = torch.cat([a.B.detach().abs().flatten() for a in adapters.values()])
    assert moved.max().item() == pytest.approx(lr * RATIO, rel=1e-3)


def test_the_readme_config_rejects_unknown_keys_and_a_bad_ratio(lora_plus: type[Strategy]) -> None:
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        config.build(lora_plus.Config, {"ratoi": 4.0}, "lora-plus")
    with pytest.raises(ConfigError, match="strategy.ratio must be > 0"):
        config.build(lora_plus.Config, {"ratio": 0.0}, "lora-plus")


# ----------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_file_follows_the_rules(name: str) -> None:
    cls = STRATEGIES.get(name)
    module = sys.modules[cls.__module__]
    assert cls.__module__.startswith("strategies.")
    assert cls.__module__.split(".")[1].replace("_", "-") == name, "registry key = file name, kebab-case"
    assert cls.__module__.split(".")[1] in strategies.__all__, "imported by strategies/__init__.py"
    assert (module.__doc__ or "").strip(), "the file opens with a docstring"
    signature = inspect.signature(cls.__init__)
    assert list(signature.parameters) == ["self", "cfg", "backbone", "head", "ctx"]
    assert all(p.annotation is not inspect.Parameter.empty for p in list(signature.parameters.values())[1:])
    assert dataclasses.is_dataclass(cls.Config)
    assert cls.Config.__dataclass_params__.frozen
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
        config.build(cls.Config, {"no_such_key": 1}, name)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_adapters_are_an_adapter_set_over_a_frozen_backbone(name: str) -> None:
    cls = STRATEGIES.get(name)
    backbone = tiny_backbone("tiny-clip")
    strategy = cls(config.build(cls.Config, {}, name), backbone, head_for(backbone, 4), tiny_context())
    adapters = strategy.adapters()
    assert isinstance(adapters, AdapterSet)
    pattern = re.compile(rf"^(vision|text)\.\d+\.({'|'.join(ROLES)})$")
    assert all(pattern.match(key) for key in adapters)
    if adapters:
        added = {id(t) for t in adapters.added_tensors()}
        assert all(id(p) in added for p in backbone.parameters() if p.requires_grad)
        assert all(not p.requires_grad for a in adapters.values() for p in a.base.parameters())


MERGE_ARGS = {"flylora": {"k": 32}}  # FlyLoRA folds into W0 at k = r only


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in STRATEGIES.names()
        if "merge_each_experience" in {f.name for f in dataclasses.fields(STRATEGIES.get(n).Config)}
    ],
)
def test_merge_each_experience_folds_the_adapters_into_w0(name: str) -> None:
    """After an experience, the merged model computes what the adapted one did, and every adapter
    starts again from a zero update."""
    cls = STRATEGIES.get(name)
    args = {"merge_each_experience": True, **MERGE_ARGS.get(name, {})}
    try:
        cfg = config.build(cls.Config, args, name)
    except ConfigError as refused:  # a method that never folds says so in its config
        pytest.skip(f"refused: {refused}")
    backbone = tiny_backbone("tiny-clip")
    torch.manual_seed(1)
    strategy = cls(cfg, backbone, head_for(backbone, 4), tiny_context())
    adapters = strategy.adapters()
    strategy.before_experience(experience_info(0, (0, 1), 4))
    with torch.no_grad():
        for adapter in adapters.values():
            for t in adapter.added_tensors():
                if t.requires_grad:
                    t.add_(0.05 * torch.randn_like(t))
    bases = [a.base.weight.detach().clone() for a in adapters.values()]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    info = experience_info(0, (0, 1), 4, training=False)
    strategy.eval()
    with torch.no_grad():
        adapted = strategy.forward(x, info)
        strategy.after_experience(info)
        merged = strategy.forward(x, info)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(a.base.weight, w) for a, w in zip(adapters.values(), bases, strict=True))
    assert all(not a.delta_weight().any() for a in adapters.values())
