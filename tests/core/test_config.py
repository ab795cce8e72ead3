from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

import tests.helpers  # noqa: F401  (fills the registries that resolve consults)
from cl_bench import config
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES
from scenarios.split_cifar import SplitCifar100


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


# ----------------------------------------------------------------------------- --set values of string fields


@pytest.mark.parametrize("text", ["2024", "1e3", "1.50", "true", "2024-01-01", "[1, 2]", "0x10"])
def test_a_numeric_looking_set_value_of_a_string_field_keeps_its_text(text: str) -> None:
    cfg = config.resolve(
        [{"strategy": "lora", "scenario": "split-cifar"}, config.parse_set([f"scenario.root={text}"])]
    )
    assert cfg.scenario_args == {"root": text}
    assert config.build(SplitCifar100, cfg.scenario_args, "scenario").root == text


def test_string_run_keys_and_backbone_keys_keep_their_text_and_other_fields_stay_typed() -> None:
    cfg = config.resolve(
        [
            config.parse_set(
                [
                    "strategy=lora",
                    "scenario=synthetic",  # default backbone tiny-clip: weights is a str field
                    "out=2024",
                    "run_id=007",
                    "backbone.weights=12",
                    "strategy.r=16",
                    "lr=1e-3",
                ]
            )
        ]
    )
    assert (cfg.out, cfg.run_id, cfg.lr) == ("2024", "007", 1e-3)
    assert cfg.backbone_args == {"weights": "12"}
    assert cfg.strategy_args == {"r": 16}  # an int field keeps the typed value
    with pytest.raises(ConfigError, match="expected an integer, got '16x'"):
        config.build(
            STRATEGIES.get("lora").Config,
            config.resolve([config.parse_set(["strategy=lora", "strategy.r=16x"])]).strategy_args,
            "strategy",
        )


def test_a_later_layer_replaces_the_set_text() -> None:
    """The raw text belongs to the --set value only while that value is the merged one."""
    set_layer = config.parse_set(["scenario=split-cifar", "out=2024"])
    cfg = config.resolve([set_layer, {"out": "runs-b"}])
    assert cfg.out == "runs-b"
    typed = config.resolve([{"scenario": "split-cifar", "out": "x"}, {"scenario": {"root": 2024}}])
    assert typed.scenario_args == {"root": 2024}  # a TOML file's integer stays one (and fails in build)


def test_the_cli_accepts_a_numeric_looking_root(tmp_path, capsys) -> None:
    from cl_bench.cli import main

    args = ["run", "--strategy", "lora", "--scenario", "split-cifar", "--set", "scenario.root=2024"]
    code = main([*args, "--out", str(tmp_path), "--run-id", "r", "--no-progress"])
    assert code == 2
    assert "CIFAR-100 not found: expected 2024/cifar-100-python/" in capsys.readouterr().err


# ----------------------------------------------------------------------------- messages and run ids


def test_unknown_run_key_lists_only_keys_a_user_can_set() -> None:
    with pytest.raises(ConfigError) as err:
        config.resolve([{"r": 16}])
    message = str(err.value)
    assert message.startswith("unknown key 'r' in run config")
    assert "_args" not in message
    assert "valid keys: augment, backbone, batch_size," in message
    assert message.endswith("; component keys go in strategy.<key>, scenario.<key>, backbone.<key>")
    with pytest.raises(ConfigError) as err:
        config.resolve([{"strategy_arg": {}}])
    assert "(did you mean 'strategy'?)" in str(err.value)  # not strategy_args, which is not settable
    assert "_args" not in str(err.value)


@pytest.mark.parametrize("run_id", ["../../x", "a/b", ".hidden", "..", "", "x y", "é"])
def test_run_id_must_be_a_plain_directory_name(run_id: str) -> None:
    if not run_id:  # empty: the default <time>-<strategy>-<scenario>-s<seed>
        assert config.resolve([{"run_id": run_id}]).run_id == ""
        return
    with pytest.raises(ConfigError) as err:
        config.resolve([{"run_id": run_id}])
    assert str(err.value) == (
        f"run_id {run_id!r}: use letters, digits, '.', '_' and '-' only, not starting with a dot "
        "(it names a directory under out)"
    )


@pytest.mark.parametrize("run_id", ["lora-test", "2024.01.01_run-3", "A", "_x"])
def test_plain_run_ids_are_accepted(run_id: str) -> None:
    assert config.resolve([{"run_id": run_id}]).run_id == run_id


def test_run_id_escaping_out_through_the_cli_is_one_error_line(tmp_path, capsys) -> None:
    from cl_bench.cli import main

    out = tmp_path / "a" / "b"
    code = main(
        ["run", "--strategy", "lora", "--scenario", "synthetic", "--out", str(out), "--run-id", "../../x"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: run_id '../../x': use letters, digits, '.', '_' and '-' only, not starting with a dot "
        "(it names a directory under out)"
    ]
    assert not (tmp_path / "x").exists()
    assert not out.exists()
