"""Typed, frozen run configuration.

Precedence: dataclass defaults < the scenario's ``run_defaults`` < ``--config run.toml`` <
command-line flags < repeated ``--set key=value``.
Every component (strategy, scenario, backbone) declares its own frozen ``Config`` dataclass and
:func:`build` turns a plain mapping into it, rejecting unknown keys (naming the valid ones and
the closest match) and wrong types. No Hydra, no dotted import strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from cl_bench.errors import ConfigError
from cl_bench.registry import BACKBONES, SCENARIOS, STRATEGIES, closest

C = TypeVar("C")

Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
LabelSpace = Literal["seen", "all"]
TrainClasses = Literal["seen", "current"]
Schedule = Literal["cosine", "constant"]

COMPONENTS = ("strategy", "scenario", "backbone")
# Tables of keys without a name: [federation] (cl_bench/federation/config.py), --set federation.<key>
TABLES = ("federation",)
# A run id names a directory under ``out``: no separators, no "..", no hidden directory.
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# Field metadata of RunConfig keys filled from the [strategy]/[scenario]/[backbone] tables: a user
# never sets them by name, so error messages do not offer them.
_INTERNAL = {"internal": True}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. Component arguments are built into their own Configs."""

    strategy: str = ""
    scenario: str = ""
    backbone: str = ""  # empty: the scenario's default backbone
    seed: int = 0  # training seed: init, batches, augmentation, sampling inside strategies
    order_seed: int = 0  # class order of the scenario, separate from the training seed
    epochs: int = 1  # epochs per experience (ignored when steps_per_experience > 0)
    steps_per_experience: int = 0  # > 0: this many optimizer steps per experience, cycling the data
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float | None = None  # None: the strategy's default
    weight_decay: float | None = None  # None: the strategy's default
    lr_schedule: Schedule = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0: no clipping
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: Device = "auto"
    compile: bool = False
    cuda_graphs: bool = True  # CUDA: replay forward/backward of graph-safe strategies from CUDA graphs
    augment: bool = True  # the scenario's augmentations (crop/flip for CIFAR, none for digits)
    label_space: LabelSpace = "seen"  # METRICS.md: scoring label space of the accuracy matrix
    train_classes: TrainClasses = "seen"  # classes that compete in the default training loss
    log_every: int = 10
    out: str = "runs"
    run_id: str = ""  # empty: <timestamp>-<strategy>-<scenario>-s<seed>
    overwrite: bool = False
    report: bool = False
    threads: int = (
        0  # CPU threads of torch; 0: leave the process's setting (the CLI passes the CPUs it may use)
    )
    log: tuple[str, ...] = ()  # experiment trackers: tensorboard, mlflow, wandb (docs/logging.md)
    checkpoint_every: int = 0  # > 0: also checkpoint every this many optimizer steps
    checkpoint_minutes: float = 10.0  # > 0: also checkpoint when this much time passed since the last
    keep_checkpoints: bool = False  # keep checkpoint.pt (the final weights) when the run ends ok
    restart: bool = False  # discard the run's checkpoint and start it over
    # an experience whose images exceed this many GiB is streamed from its memory-mapped cache
    # instead of being copied to memory
    host_memory_gb: float = 8.0
    strategy_args: dict[str, Any] = field(default_factory=dict, metadata=_INTERNAL)
    scenario_args: dict[str, Any] = field(default_factory=dict, metadata=_INTERNAL)
    backbone_args: dict[str, Any] = field(default_factory=dict, metadata=_INTERNAL)
    federation_args: dict[str, Any] = field(default_factory=dict, metadata=_INTERNAL)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_experience", "warmup_steps", "threads", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.checkpoint_minutes >= 0 and math.isfinite(self.checkpoint_minutes)):
            raise ConfigError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if not (self.host_memory_gb > 0 and math.isfinite(self.host_memory_gb)):
            raise ConfigError(f"host_memory_gb must be > 0, got {self.host_memory_gb}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            raise ConfigError(
                f"run_id {self.run_id!r}: use letters, digits, '.', '_' and '-' only, "
                "not starting with a dot (it names a directory under out)"
            )


# ----------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = [str(a) for a in get_args(tp)]
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(choices)}{closest(str(value), choices)}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def build(cls: type[C], data: Mapping[str, Any], where: str, *, more: str = "") -> C:
    """Build the frozen dataclass ``cls`` from ``data``, strictly.

    Unknown keys raise a ConfigError naming the valid keys (fields marked ``internal`` in their
    metadata are accepted but not offered) and the closest match, then ``more``; values are
    type-checked against the annotations (ints are accepted for floats, lists become tuples).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        if key not in fields:
            valid = sorted(k for k, f in fields.items() if not f.metadata.get("internal"))
            listing = ", ".join(valid) or "none"
            raise ConfigError(
                f"unknown key '{key}' in {where}{closest(key, valid)}; valid keys: {listing}{more}"
            )
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**values)


def takes_text(cls: type, key: str) -> bool:
    """Whether field ``key`` of dataclass ``cls`` is a string (``str`` or ``str | None``)."""
    tp = typing.get_type_hints(cls).get(key)
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return options == [str]
    return tp is str


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- sources


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (``8``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``).

    Anything that is not valid TOML is taken as a bare string, so paths need no quotes.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


class SetLayer(dict[str, Any]):
    """The layer of ``--set`` items: a nested mapping of typed values, plus ``texts``, the raw text
    of every value that did not parse as a string, by (RunConfig key, component key or "")."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[tuple[str, str], str] = {}


def parse_set(items: Sequence[str]) -> SetLayer:
    """Turn ``["lr=1e-3", "strategy.r=16"]`` into a nested mapping like a TOML file's.

    Values are typed as TOML values; :func:`resolve` gives a string field the raw text back
    (``scenario.root=2024`` is the directory "2024", not the integer 2024).
    """
    out = SetLayer()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in COMPONENTS + TABLES):
            raise ConfigError(
                f"--set key {key!r}: use a run key (e.g. lr=1e-3) or one of "
                f"{', '.join(c + '.<key>' for c in COMPONENTS + TABLES)}"
            )
        value = parse_value(text.strip())
        if len(parts) == 2:
            table = out.setdefault(parts[0], {})
            if not isinstance(table, dict):
                table = out[parts[0]] = {"name": table}
            table[parts[1]] = value
            path = (f"{parts[0]}_args", parts[1]) if parts[1] != "name" else (parts[0], "")
        elif parts[0] in COMPONENTS and isinstance(out.get(parts[0]), dict):
            out[parts[0]]["name"] = value
            path = (parts[0], "")
        else:
            out[parts[0]] = value
            path = (parts[0], "")
        out.texts.pop(path, None)
        if not isinstance(value, str):
            out.texts[path] = text.strip()
    return out


def load_toml(
    path: str | Path, *, what: str = "config file", error: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """Read a TOML file (a run config, or a sweep file: ``what`` names it in the message); a
    missing, unreadable or malformed file is a one-line ``error``."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise error(f"{what} {p} is not valid TOML: {err}") from None


def _flatten(layer: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``{strategy: {name: x, r: 8}}`` onto RunConfig's ``strategy``/``strategy_args`` keys."""
    flat: dict[str, Any] = {}
    for key, value in layer.items():
        if key in COMPONENTS and isinstance(value, Mapping):
            args = dict(value)
            if "name" in args:
                flat[key] = args.pop("name")
            flat[f"{key}_args"] = args
        elif key in TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a table ([{key}] or --set {key}.<key>=...), got {value!r}")
            flat[f"{key}_args"] = dict(value)
        elif key in {f"{c}_args" for c in COMPONENTS + TABLES}:
            raise ConfigError(f"use a [{key[:-5]}] table (or --set {key[:-5]}.<key>=...), not {key}")
        else:
            flat[key] = value
    return flat


def resolve(layers: Sequence[Mapping[str, Any]]) -> RunConfig:
    """Merge config layers (lowest precedence first) into a validated RunConfig.

    Between the RunConfig defaults and the first layer sit the chosen scenario's
    ``run_defaults`` (e.g. more epochs for the small digits demo), when the scenario is registered.
    """
    merged: dict[str, Any] = {}
    texts: dict[tuple[str, str], str] = {}  # raw --set texts of the values that are still merged
    for layer in layers:
        for key, value in _flatten(layer).items():
            if key.endswith("_args"):
                merged[key] = {**merged.get(key, {}), **value}
                for sub in value:
                    texts.pop((key, sub), None)
            else:
                merged[key] = value
                texts.pop((key, ""), None)
        texts.update(getattr(layer, "texts", {}))
    _restore_texts(merged, texts)
    scenario = merged.get("scenario")
    if isinstance(scenario, str) and scenario in SCENARIOS:
        for key, value in getattr(SCENARIOS.get(scenario), "run_defaults", {}).items():
            merged.setdefault(key, value)
    return build(
        RunConfig,
        merged,
        "run config",
        more=f"; component keys go in {', '.join(f'{c}.<key>' for c in COMPONENTS)}",
    )


def _component_config(component: str, merged: Mapping[str, Any]) -> type | None:
    """The config dataclass of the merged ``component`` (None when it is not known yet)."""
    if component == "federation":
        from cl_bench.federation.config import FederationConfig

        return FederationConfig
    name = merged.get(component)
    if component == "backbone" and not name:
        scenario = merged.get("scenario")
        if isinstance(scenario, str) and scenario in SCENARIOS:
            name = getattr(SCENARIOS.get(scenario), "default_backbone", "")
    registry = {"strategy": STRATEGIES, "scenario": SCENARIOS, "backbone": BACKBONES}[component]
    if not isinstance(name, str) or name not in registry:
        return None  # unknown names fail later, naming the valid ones
    obj = registry.get(name)
    return getattr(obj, "Config", obj)  # strategies register a class with a Config


def _restore_texts(merged: dict[str, Any], texts: Mapping[tuple[str, str], str]) -> None:
    """Give string fields the raw ``--set`` text back: ``--set scenario.root=2024`` parses as
    the integer 2024 before the field's type is known; a string field takes "2024" instead."""
    for (key, sub), text in sorted(texts.items(), key=lambda item: item[0][1] != ""):  # run keys first
        if not sub:
            if key in {f.name for f in dataclasses.fields(RunConfig)} and takes_text(RunConfig, key):
                merged[key] = text
            continue
        cls = _component_config(key.removesuffix("_args"), merged)
        if cls is not None and dataclasses.is_dataclass(cls) and takes_text(cls, sub):
            merged[key][sub] = text
