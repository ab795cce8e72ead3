from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from cl_bench import config
from cl_bench.errors import ConfigError


@dataclass(frozen=True)
class Example:
    r: int = 8
    alpha: float = 16.0
    mode: Literal["frozen", "full"] = "frozen"
    ranks: tuple[int, ...] = (1, 2)
    name: str = "x"
    flag: bool = False
    opt: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


def test_build_coerces_ints_to_floats_and_lists_to_tuples() -> None:
    built = config.build(Example, {"r": 4, "alpha": 8, "ranks": [1, 4, 8], "opt": 2}, "example")
    assert built == Example(r=4, alpha=8.0, ranks=(1, 4, 8), opt=2.0)
    assert isinstance(built.alpha, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"rr": 4},
            "unknown key 'rr' in example (did you mean 'r'?); "
            "valid keys: alpha, betas, flag, mode, name, opt, r, ranks",
        ),
        ({"r": "4"}, "example.r: expected an integer, got '4'"),
        ({"r": True}, "example.r: expected an integer, got True"),
        ({"alpha": "big"}, "example.alpha: expected a number, got 'big'"),
        ({"mode": "frozn"}, "example.mode: 'frozn' is not one of frozen, full (did you mean 'frozen'?)"),
        ({"ranks": [1, "a"]}, "example.ranks[1]: expected an integer, got 'a'"),
        ({"flag": 1}, "example.flag: expected true or false, got 1"),
    ],
)
def test_build_rejects_bad_input_with_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(Example, data, "example")
    assert str(err.value) == message


def test_fixed_length_tuples_are_checked_per_position() -> None:
    assert config.build(Example, {"betas": [0.9, 1]}, "example").betas == (0.9, 1.0)
    with pytest.raises(ConfigError, match="expected 2 values"):
        config.build(Example, {"betas": [0.9]}, "example")
    with pytest.raises(ConfigError, match=r"example.betas\[1\]: expected a number"):
        config.build(Example, {"betas": [0.9, "x"]}, "example")


def test_parse_set_types_values_and_routes_components() -> None:
    parsed = config.parse_set(
        [
            "lr=1e-3",
            "epochs=3",
            "strategy.r=16",
            "strategy.eval_ranks=[1, 2]",
            "scenario.root=/data/cifar",
            "compile=true",
            "strategy=mora",
        ]
    )
    assert parsed == {
        "lr": 1e-3,
        "epochs": 3,
        "strategy": {"r": 16, "eval_ranks": [1, 2], "name": "mora"},
        "scenario": {"root": "/data/cifar"},
        "compile": True,
    }


@pytest.mark.parametrize("item", ["novalue", "=3", "a.b.c=1", "model.r=3"])
def test_parse_set_rejects_malformed_items(item: str) -> None:
    with pytest.raises(ConfigError):
        config.parse_set([item])


def test_precedence_defaults_scenario_toml_set(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'scenario = "split-digits"\nlr = 0.01\nbatch_size = 16\n[strategy]\nname = "lora"\nr = 4\n'
    )
    cfg = config.resolve([config.load_toml(toml), config.parse_set(["lr=0.02", "strategy.alpha=8"])])
    assert cfg.strategy == "lora"
    assert cfg.lr == 0.02  # --set beats the file
    assert cfg.batch_size == 16  # the file beats the default
    assert cfg.epochs == 10  # split-digits' run_defaults beat the RunConfig default
    assert cfg.strategy_args == {"r": 4, "alpha": 8}
    explicit = config.resolve([{"scenario": "split-digits", "epochs": 2}])
    assert explicit.epochs == 2  # any explicit layer beats the scenario's run defaults


def test_run_config_rejects_unknown_keys_and_bad_ranges(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        config.resolve([{"epoch": 3}])
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        config.resolve([{"batch_size": 0}])
    with pytest.raises(ConfigError, match="precision"):
        config.resolve([{"precision": "fp16"}])
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load_toml(tmp_path / "missing.toml")
