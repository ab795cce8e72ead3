from __future__ import annotations

import pytest

from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES, Registry


def test_register_get_alias_and_listing() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("big-one", description="a big one", aliases=("big",))(1)
    reg.register("small", description="a small one")(2)
    assert reg.get("big-one") == 1
    assert reg.get("big") == 1
    assert reg.canonical("big") == "big-one"
    assert reg.names() == ["big-one", "small"]
    assert [e.description for e in reg] == ["a big one", "a small one"]


def test_duplicates_and_non_kebab_names_raise() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", description="")(1)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a", description="")(2)
    with pytest.raises(ValueError, match="kebab"):
        reg.register("Not_Kebab", description="")(3)


def test_unknown_name_lists_valid_choices_and_closest_match() -> None:
    with pytest.raises(ConfigError) as err:
        STRATEGIES.get("lorra")
    message = str(err.value)
    assert "did you mean 'lora'?" in message
    assert "finetune" in message
    assert "\n" not in message
