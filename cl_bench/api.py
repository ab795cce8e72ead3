"""The Python API: ``cl_bench.run(strategy="lora", scenario="split-digits", **overrides)``.

The same run as ``cl-bench run`` (same config resolution, same loop, same record on disk), for
notebooks and scripts; ``cl_bench.load_results("runs/")`` reads the records back as a DataFrame.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cl_bench.config import COMPONENTS


def run(
    strategy: str,
    scenario: str,
    *,
    backbone: str = "",
    config: str | Path | None = None,
    strategy_args: Mapping[str, Any] | None = None,
    scenario_args: Mapping[str, Any] | None = None,
    backbone_args: Mapping[str, Any] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Train ``strategy`` through ``scenario``; the run record (:class:`~cl_bench.results.RunResult`).

    ``overrides`` are run keys (``steps_per_experience=20, lr=1e-3, out="runs/nb"``); component keys
    go in ``strategy_args={"r": 16}`` etc. (or as ``**{"strategy.r": 16}``). ``config`` is a run
    TOML file, applied first. Raises :class:`~cl_bench.errors.ClBenchError` subclasses with the
    CLI's messages for bad names, keys or data. ``progress``: a bar on a terminal, plain lines
    otherwise (False: silent).
    """
    from cl_bench import cli, loop
    from cl_bench import config as config_

    cli.load_components()
    layers: list[Mapping[str, Any]] = []
    if config is not None:
        layers.append(config_.load_toml(config))
    tables: dict[str, dict[str, Any]] = {
        "strategy": {"name": strategy, **(strategy_args or {})},
        "scenario": {"name": scenario, **(scenario_args or {})},
        "backbone": {**({"name": backbone} if backbone else {}), **(backbone_args or {})},
    }
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        component, dot, sub = key.partition(".")
        if dot and component in COMPONENTS:
            tables[component][sub] = value
        else:
            flat[key] = value
    layers.append({**flat, **{k: v for k, v in tables.items() if v}})
    return loop.run(config_.resolve(layers), progress=progress)
