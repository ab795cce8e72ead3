"""The regression gate: run the pinned grid and compare every run record with its golden record.

``python -m regression.gate`` (what ``tox -e regression`` runs) trains every registered
strategy on every scenario and seed of ``regression/grid.toml`` in this one process, on the
CPU, and compares each new run record with the committed golden record
``regression/golden/<strategy>__<scenario>__s<seed>.json``:

- accuracy matrix cells, derived metrics, training losses and the strategies' own figures within
  the absolute tolerances of the grid file;
- parameter counts, shapes, classes, the resolved config, strategy events and the status exactly;
- throughput, memory and timing are shown, never gated (they measure the machine, not the code).

It prints a table of what moved (run, metric, golden, now, delta, tolerance), writes an HTML report
of the new records with :func:`reports.build.build_report` and a CSV of every compared value next
to it, prints a one-line summary and exits 1 on any breach, missing or stale golden, or failed run.
``--update-golden`` rewrites the goldens of the selected runs instead (docs/regression.md says
when that is right). Golden files are plain run records, so ``cl-bench report`` renders them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cl_bench import config, loop, results
from cl_bench.cli import load_components
from cl_bench.errors import ClBenchError
from cl_bench.registry import SCENARIOS, STRATEGIES, closest
from cl_bench.results import METRIC_COLUMNS
from reports.build import build_report

HERE = Path(__file__).resolve().parent
GRID_FILE = HERE / "grid.toml"
GOLDEN_DIR = HERE / "golden"
DEFAULT_RUNS = Path("build") / "regression"  # not runs/: the user's own records stay apart
UPDATE_COMMAND = "tox -e regression -- --update-golden"

# Config keys that name where and how a run was stored or shown, not what it computed (the gate
# sets the threads of the whole grid itself).
CONFIG_IGNORED = frozenset({"run_id", "out", "overwrite", "report", "threads", "log"})
# where the generated fixture and its image cache lie on this machine (``root = "@fixture"``)
CONFIG_IGNORED_PATHS = frozenset({"scenario_args.root", "scenario_args.cache_dir"})
FIXTURE = "@fixture"  # a scenario root the gate generates: ``cl-bench data fixture`` into <runs>/fixtures
# Figures of the machine: shown next to the golden's, never gated.
EXPERIENCE_INFO = (
    "train_samples_per_s",
    "eval_samples_per_s",
    "peak_memory_train_bytes",
    "peak_memory_eval_bytes",
    "train_time_s",
    "eval_time_s",
)
EXPERIENCE_EXACT = ("index", "classes", "n_train", "steps", "n_trainable", "n_added")
EXPERIENCE_EXACT_OPTIONAL = ("adapter_bytes", "memory_kind")
EXPERIENCE_LOSSES = ("loss_first", "loss_last", "loss_mean")
TOLERANCE_KEYS = ("accuracy", "loss", "strategy", "metrics", "active")
_EPS = 1e-9  # absorbs the rounding of |a - b| itself at the tolerance boundary


class GridError(ClBenchError):
    """The grid file is malformed or names an unknown strategy, scenario or key."""


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Tolerances:
    """Absolute tolerances: accuracy cells, losses, strategy figures, one per derived metric, and
    active parameters (0: exact; a routed method measures them as an average over inputs)."""

    accuracy: float
    loss: float
    strategy: float
    metrics: dict[str, float]
    active: float = 0.0

    def metric(self, name: str) -> float:
        """The tolerance of derived metric ``name``; a metric without one is a grid error, loudly."""
        if name not in self.metrics:
            raise GridError(
                f"no tolerance for metric '{name}': add `{name} = ...` to [tolerance.metrics] in {GRID_FILE}"
            )
        return self.metrics[name]

    def updated(self, override: Mapping[str, Any]) -> Tolerances:
        """These tolerances with a strategy's ``[strategies.<name>.tolerance]`` applied."""
        metrics = {**self.metrics, **override.get("metrics", {})}
        scalars = {k: float(v) for k, v in override.items() if k != "metrics"}
        return replace(self, metrics=metrics, **scalars)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid and the config layer that defines it."""

    strategy: str
    scenario: str
    seed: int
    layer: dict[str, Any]
    tolerances: Tolerances

    @property
    def run_id(self) -> str:
        """Deterministic name of the run, its record directory and its golden file."""
        return f"{self.strategy}__{self.scenario}__s{self.seed}"

    def golden_path(self, golden_dir: Path) -> Path:
        return golden_dir / f"{self.run_id}.json"


@dataclass(frozen=True)
class Grid:
    """The parsed grid file: what runs, with which settings, compared how closely."""

    path: Path
    scenarios: tuple[str, ...]
    seeds: tuple[int, ...]
    threads: int
    run: dict[str, Any]
    scenario_args: dict[str, dict[str, Any]]
    strategy_args: dict[str, dict[str, Any]]
    strategy_run: dict[str, dict[str, Any]]
    strategy_tolerance: dict[str, dict[str, Any]]
    tolerances: Tolerances
    cells: tuple[tuple[str, str, int], ...] = ()  # extra (strategy, scenario, seed) runs beside the grid

    def strategies(self) -> list[str]:
        """Every registered strategy: the grid never lists them, so a new one joins automatically."""
        return STRATEGIES.names()

    def specs(
        self,
        strategies: Sequence[str] = (),
        scenarios: Sequence[str] = (),
        seeds: Sequence[int] = (),
    ) -> list[RunSpec]:
        """The runs of the grid, optionally restricted to some strategies, scenarios or seeds."""
        chosen_strategies = [STRATEGIES.canonical(s) for s in strategies] or self.strategies()
        chosen_scenarios = [SCENARIOS.canonical(s) for s in scenarios] or list(self.scenarios)
        cell_scenarios = {cell[1] for cell in self.cells}
        for name in chosen_scenarios:
            if name not in self.scenarios and name not in cell_scenarios:
                raise GridError(f"scenario '{name}' is not in the grid ({', '.join(self.scenarios)})")
        cell_seeds = {cell[2] for cell in self.cells}
        for seed in seeds:
            if seed not in self.seeds and seed not in cell_seeds:
                raise GridError(f"seed {seed} is not in the grid ({', '.join(map(str, self.seeds))})")
        grid_runs = [
            (strategy, scenario, seed)
            for scenario in chosen_scenarios
            if scenario in self.scenarios
            for strategy in chosen_strategies
            for seed in (list(seeds) or list(self.seeds))
            if seed in self.seeds
        ]
        cells = [
            cell
            for cell in self.cells
            if (not strategies or cell[0] in chosen_strategies)
            and (not scenarios or cell[1] in chosen_scenarios)
            and (not seeds or cell[2] in seeds)
        ]
        return [self._spec(*run) for run in [*grid_runs, *cells]]

    def _spec(self, strategy: str, scenario: str, seed: int) -> RunSpec:
        return RunSpec(
            strategy,
            scenario,
            seed,
            {
                **self.run,
                "seed": seed,
                "strategy": {"name": strategy, **self.strategy_args.get(strategy, {})},
                "scenario": {"name": scenario, **self.scenario_args.get(scenario, {})},
                **self.strategy_run.get(strategy, {}),
            },
            self.tolerances.updated(self.strategy_tolerance.get(strategy, {})),
        )


def _table(data: Mapping[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise GridError(f"{where}: [{key}] must be a table")
    return dict(value)


def _check_keys(table: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in table:
        if key not in valid:
            raise GridError(
                f"unknown key '{key}' in {where}{closest(key, list(valid))}; valid: {', '.join(valid)}"
            )


def load_grid(path: Path = GRID_FILE) -> Grid:
    """Parse and validate the grid file (unknown keys and unregistered names fail, naming the valid ones)."""
    load_components()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise GridError(f"cannot read the grid file {path}: {err}") from None
    _check_keys(data, ("grid", "run", "scenarios", "strategies", "tolerance", "cells"), str(path))
    grid = _table(data, "grid", path)
    _check_keys(grid, ("scenarios", "seeds", "threads"), f"{path} [grid]")
    tolerance = _table(data, "tolerance", path)
    _check_keys(tolerance, TOLERANCE_KEYS, f"{path} [tolerance]")
    missing = [k for k in ("accuracy", "loss", "strategy", "metrics") if k not in tolerance]
    if missing or not grid.get("scenarios") or not grid.get("seeds"):
        raise GridError(f"{path}: needs [grid] scenarios and seeds, and [tolerance] {', '.join(missing)}")
    strategies = _table(data, "strategies", path)
    for name, table in strategies.items():
        STRATEGIES.canonical(name)  # an unknown name fails with the closest registered one
        _check_keys(table, ("args", "run", "tolerance"), f"{path} [strategies.{name}]")
        _check_keys(table.get("tolerance", {}), TOLERANCE_KEYS, f"[{name}]")
    metrics = tolerance["metrics"]
    untolerated = [m for m in METRIC_COLUMNS if m not in metrics]
    if not isinstance(metrics, Mapping) or untolerated:
        raise GridError(f"{path}: [tolerance.metrics] lacks {', '.join(untolerated)}")
    scenario_args = _table(data, "scenarios", path)
    for name in [*grid["scenarios"], *scenario_args]:
        SCENARIOS.canonical(name)
    cells = []
    for k, cell in enumerate(data.get("cells", [])):
        where = f"{path} [[cells]] #{k + 1}"
        if not isinstance(cell, Mapping) or sorted(cell) != ["scenario", "seed", "strategy"]:
            raise GridError(f"{where}: a cell is a table of strategy, scenario and seed")
        cells.append(
            (STRATEGIES.canonical(cell["strategy"]), SCENARIOS.canonical(cell["scenario"]), int(cell["seed"]))
        )
    return Grid(
        path=path,
        scenarios=tuple(SCENARIOS.canonical(s) for s in grid["scenarios"]),
        seeds=tuple(int(s) for s in grid["seeds"]),
        threads=int(grid.get("threads", 1)),
        run=_table(data, "run", path),
        scenario_args={SCENARIOS.canonical(k): dict(v) for k, v in scenario_args.items()},
        strategy_args={k: dict(v.get("args", {})) for k, v in strategies.items()},
        strategy_run={k: dict(v.get("run", {})) for k, v in strategies.items()},
        strategy_tolerance={k: dict(v.get("tolerance", {})) for k, v in strategies.items()},
        tolerances=Tolerances(
            accuracy=float(tolerance["accuracy"]),
            loss=float(tolerance["loss"]),
            strategy=float(tolerance["strategy"]),
            metrics={k: float(v) for k, v in tolerance["metrics"].items()},
            active=float(tolerance.get("active", 0.0)),
        ),
        cells=tuple(cells),
    )


def with_fixtures(specs: Sequence[RunSpec], runs_dir: Path) -> list[RunSpec]:
    """The specs with every ``root = "@fixture"`` scenario pointed at a generated fixture of its
    domains under ``<runs_dir>/fixtures/<scenario>`` (written once, deterministic: the same bytes on
    every machine with the same Pillow), its image cache beside it."""
    out = []
    for spec in specs:
        scenario = dict(spec.layer["scenario"])
        if scenario.get("root") == FIXTURE:
            from scenarios.multidomain import write_fixture

            root = runs_dir / "fixtures" / spec.scenario
            if not root.is_dir():
                cls = SCENARIOS.get(spec.scenario)
                args = {k: v for k, v in scenario.items() if k not in ("name", "root")}
                write_fixture(config.build(cls, args, spec.scenario), root)
            scenario.update(root=str(root), cache_dir=str(runs_dir / "fixtures" / "cache"))
            spec = replace(spec, layer={**spec.layer, "scenario": scenario})
        out.append(spec)
    return out


# ----------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Check:
    """One compared value: ``tolerance`` None means exact; ``gated`` False means shown only."""

    run: str
    metric: str
    golden: Any
    now: Any
    tolerance: float | None = None
    gated: bool = True

    @property
    def delta(self) -> float | None:
        if _is_number(self.golden) and _is_number(self.now):
            return float(self.now) - float(self.golden)
        return None

    @property
    def ok(self) -> bool:
        if not self.gated:
            return True
        if self.tolerance is None or self.delta is None:
            return bool(self.golden == self.now)
        return abs(self.delta) <= self.tolerance + _EPS


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Leaves of nested dicts as (dotted name, value); lists are leaves."""
    if isinstance(value, Mapping):
        for key in sorted(value):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


class _Comparer:
    """Collects the checks of one run (a small class so the rules below read as a list)."""

    def __init__(self, run: str, tol: Tolerances) -> None:
        self.run, self.tol = run, tol
        self.checks: list[Check] = []
        self.notes: list[str] = []

    def exact(self, metric: str, golden: Any, now: Any) -> None:
        self.checks.append(Check(self.run, metric, golden, now))

    def close(self, metric: str, golden: Any, now: Any, tolerance: float) -> None:
        if _is_number(golden) and _is_number(now):
            self.checks.append(Check(self.run, metric, golden, now, tolerance))
        else:  # None (an undefined metric), NaN stored as null, or a type change: exactly
            self.checks.append(Check(self.run, metric, golden, now))

    def count(self, metric: str, golden: Any, now: Any, tolerance: float) -> None:
        """A parameter count: exact, unless ``tolerance`` > 0 (a measured average, see Tolerances)."""
        if tolerance > 0:
            self.close(metric, golden, now, tolerance)
        else:
            self.exact(metric, golden, now)

    def info(self, metric: str, golden: Any, now: Any) -> None:
        self.checks.append(Check(self.run, metric, golden, now, gated=False))

    def same_length(self, metric: str, golden: Any, now: Any) -> bool:
        """Compare list lengths exactly (a shape); True when the elements can be compared."""
        g_len = len(golden) if isinstance(golden, list) else None
        n_len = len(now) if isinstance(now, list) else None
        self.exact(f"len({metric})", g_len, n_len)
        return g_len is not None and g_len == n_len

    def tree(self, metric: str, golden: Any, now: Any, tolerance: float) -> None:
        """Recursive: dict keys and list lengths exactly, numbers within ``tolerance``, else exactly."""
        if isinstance(golden, Mapping) and isinstance(now, Mapping):
            self.exact(f"keys({metric})", sorted(golden), sorted(now))
            for key in sorted(set(golden) & set(now)):
                self.tree(f"{metric}.{key}", golden[key], now[key], tolerance)
        elif isinstance(golden, list) and isinstance(now, list):
            if self.same_length(metric, golden, now):
                for i, (g, n) in enumerate(zip(golden, now, strict=True)):
                    self.tree(f"{metric}[{i}]", g, n, tolerance)
        elif isinstance(golden, int) and isinstance(now, int) and not isinstance(golden, bool):
            self.exact(metric, golden, now)  # counts, steps, indices
        else:
            self.close(metric, golden, now, tolerance)


def _compared_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's resolved config as dotted leaves, less the keys the gate does not compare."""
    top = {k: v for k, v in record.get("config", {}).items() if k not in CONFIG_IGNORED}
    return {k: v for k, v in _flatten(top, "") if k not in CONFIG_IGNORED_PATHS}


def compare(run: str, golden: Mapping[str, Any], now: Mapping[str, Any], tol: Tolerances) -> _Comparer:
    """Every check of record ``now`` against record ``golden`` (the rules of the module docstring)."""
    c = _Comparer(run, tol)
    c.exact("status", golden.get("status"), now.get("status"))

    g_config, n_config = _compared_config(golden), _compared_config(now)
    for key in sorted(set(g_config) | set(n_config)):
        if key in g_config and key in n_config:
            c.exact(f"config.{key}", g_config[key], n_config[key])
        else:  # a new or removed config key changes nothing by itself; the numbers will tell
            side = "the golden" if key in g_config else "this run"
            c.notes.append(f"{run}: config.{key} exists only in {side}")

    g_acc, n_acc = golden.get("accuracy", {}), now.get("accuracy", {})
    for key in ("n_test", "label_space", "protocol"):
        c.exact(f"accuracy.{key}", g_acc.get(key), n_acc.get(key))
    g_matrix, n_matrix = g_acc.get("matrix"), n_acc.get("matrix")
    c.exact(
        "shape(accuracy.matrix)",
        [len(row) for row in g_matrix] if isinstance(g_matrix, list) else None,
        [len(row) for row in n_matrix] if isinstance(n_matrix, list) else None,
    )
    if c.checks[-1].ok and isinstance(g_matrix, list) and isinstance(n_matrix, list):
        for i, (g_row, n_row) in enumerate(zip(g_matrix, n_matrix, strict=True)):
            for j, (g, n) in enumerate(zip(g_row, n_row, strict=True)):
                c.close(f"accuracy.matrix[{i}][{j}]", g, n, tol.accuracy)
    for key in ("initial", "seen"):
        if c.same_length(f"accuracy.{key}", g_acc.get(key), n_acc.get(key)):
            for j, (g, n) in enumerate(zip(g_acc[key], n_acc[key], strict=True)):
                c.close(f"accuracy.{key}[{j}]", g, n, tol.accuracy)
    g_var, n_var = g_acc.get("variants") or {}, n_acc.get("variants") or {}
    c.exact("keys(accuracy.variants)", sorted(g_var), sorted(n_var))
    for label in sorted(set(g_var) & set(n_var)):
        c.tree(
            f"accuracy.variants[{label}].row", g_var[label].get("row"), n_var[label].get("row"), tol.accuracy
        )
        c.close(
            f"accuracy.variants[{label}].acc_final",
            g_var[label].get("acc_final"),
            n_var[label].get("acc_final"),
            tol.accuracy,
        )
        for key in ("eval_samples_per_s", "peak_memory_eval_bytes"):
            c.info(f"accuracy.variants[{label}].{key}", g_var[label].get(key), n_var[label].get(key))

    g_metrics, n_metrics = golden.get("metrics") or {}, now.get("metrics") or {}
    for name in sorted(set(g_metrics) | set(n_metrics)):
        c.close(f"metrics.{name}", g_metrics.get(name), n_metrics.get(name), tol.metric(name))

    g_exps, n_exps = golden.get("experiences") or [], now.get("experiences") or []
    if c.same_length("experiences", g_exps, n_exps):
        for i, (g, n) in enumerate(zip(g_exps, n_exps, strict=True)):
            for key in EXPERIENCE_EXACT:
                c.exact(f"experiences[{i}].{key}", g.get(key), n.get(key))
            c.count(f"experiences[{i}].n_active", g.get("n_active"), n.get("n_active"), tol.active)
            for key in EXPERIENCE_EXACT_OPTIONAL:
                if key in g or key in n:
                    c.exact(f"experiences[{i}].{key}", g.get(key), n.get(key))
            for key in EXPERIENCE_LOSSES:
                c.close(f"experiences[{i}].{key}", g.get(key), n.get(key), tol.loss)
            c.tree(
                f"experiences[{i}].strategy", g.get("strategy") or {}, n.get("strategy") or {}, tol.strategy
            )
            for key in EXPERIENCE_INFO:
                c.info(f"experiences[{i}].{key}", g.get(key), n.get(key))

    g_params, n_params = golden.get("parameters") or {}, now.get("parameters") or {}
    for key in sorted(set(g_params) | set(n_params)):
        if key == "active":
            c.count("parameters.active", g_params.get(key), n_params.get(key), tol.active)
        else:
            c.exact(f"parameters.{key}", g_params.get(key), n_params.get(key))
    c.exact(
        "backbone.n_parameters",
        golden.get("backbone", {}).get("n_parameters"),
        now.get("backbone", {}).get("n_parameters"),
    )
    c.exact(
        "scenario.class_order",
        golden.get("scenario", {}).get("class_order"),
        now.get("scenario", {}).get("class_order"),
    )
    c.tree(
        "strategy_report", golden.get("strategy_report") or {}, now.get("strategy_report") or {}, tol.strategy
    )
    for key in ("train_s", "eval_s", "total_s", "peak_memory_train_bytes", "peak_memory_eval_bytes"):
        c.info(f"timing.{key}", (golden.get("timing") or {}).get(key), (now.get("timing") or {}).get(key))
    return c


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What became of one run of the grid."""

    spec: RunSpec
    seconds: float = 0.0
    record_path: Path | None = None
    record: dict[str, Any] | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None  # a failed run or a missing golden: a breach without a table row

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the per-run chatter (the tiny backbone's no-weights warning, per-experience lines)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _missing_golden_message(spec: RunSpec, path: Path) -> str:
    """How to add the missing golden: the exact command (and the files to commit)."""
    command = f"{UPDATE_COMMAND} --strategy {spec.strategy}"
    if path.parent.resolve() != GOLDEN_DIR.resolve():
        command += f" --golden-dir {_show(path.parent)}"
    return (
        f"no golden record {_show(path)}. A new strategy (or scenario, seed)? Review its numbers in "
        f"the report, then add its goldens with\n    {command}\n"
        f"and commit {_show(path.parent)}/{spec.strategy}__*.json with the change."
    )


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_spec(spec: RunSpec, runs_dir: Path) -> tuple[dict[str, Any] | None, Path, str | None]:
    """Run one spec; return (its record or None, the record path, a failure reason or None)."""
    cfg = config.resolve([{**spec.layer, "out": str(runs_dir), "run_id": spec.run_id, "overwrite": True}])
    path = runs_dir / spec.run_id / results.RESULT_FILE
    try:
        with _quiet():
            loop.run(cfg, progress=False)
    except Exception as err:
        reason = str(err) if isinstance(err, ClBenchError) else f"{type(err).__name__}: {err}"
        return None, path, f"run failed: {reason}"
    return results.load(path), path, None


def evaluate(spec: RunSpec, runs_dir: Path, golden_dir: Path) -> Outcome:
    """Run one spec and compare it with its golden record."""
    tic = time.perf_counter()
    record, path, failure = run_spec(spec, runs_dir)
    outcome = Outcome(spec, time.perf_counter() - tic, path, record, problem=failure)
    golden_path = spec.golden_path(golden_dir)
    if record is None:
        return outcome
    if not golden_path.is_file():
        outcome.problem = _missing_golden_message(spec, golden_path)
        return outcome
    try:
        golden = results.load(golden_path)
    except results.RecordError as err:
        outcome.problem = f"golden unreadable: {err}"
        return outcome
    try:
        compared = compare(spec.run_id, golden, record, spec.tolerances)
    except GridError as err:
        outcome.problem = str(err)
        return outcome
    outcome.checks, outcome.notes = compared.checks, compared.notes
    return outcome


def stale_goldens(golden_dir: Path, specs: Sequence[RunSpec]) -> list[Path]:
    """Golden files that belong to no run of the (full) grid: a removed strategy, scenario or seed."""
    expected = {spec.golden_path(golden_dir).name for spec in specs}
    return sorted(p for p in golden_dir.glob("*.json") if p.name not in expected)


def write_golden(record: Mapping[str, Any], path: Path) -> None:
    """Store a run record as a golden, as it is (environment and timing stay, never compared)."""
    results.write_json_atomic(path, {k: v for k, v in record.items() if not k.startswith("_")})


# ----------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 28 else text[:25] + "..."


def _fmt_delta(delta: float | None) -> str:
    return "-" if delta is None else f"{delta:+.6g}"


def _priority(check: Check) -> tuple[str, int]:
    """Table order within a run: exact values (counts, shapes, config), metrics, losses, cells, the rest."""
    if check.tolerance is None or check.delta is None:
        rank = 0
    elif check.metric.startswith("metrics."):
        rank = 1
    elif ".loss_" in check.metric:
        rank = 2
    elif check.metric.startswith("accuracy."):
        rank = 3
    else:
        rank = 4
    return check.run, rank


def breach_table(checks: Sequence[Check], per_run: int = 12, limit: int = 240) -> str:
    """The table of what moved: at most ``per_run`` rows per run and ``limit`` in all (the CSV has all)."""
    header = ("run", "metric", "golden", "now", "delta", "tolerance")
    rows: list[tuple[str, ...]] = []
    shown: dict[str, int] = {}
    for check in sorted(checks, key=_priority):
        if shown.get(check.run, 0) >= per_run or len(rows) >= limit:
            continue
        shown[check.run] = shown.get(check.run, 0) + 1
        tolerance = "exact" if check.tolerance is None or check.delta is None else f"{check.tolerance:g}"
        rows.append(
            (check.run, check.metric, _fmt(check.golden), _fmt(check.now), _fmt_delta(check.delta), tolerance)
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    if len(rows) < len(checks):
        lines.append(f"... {len(checks) - len(rows)} more not shown (every value is in the CSV)")
    return "\n".join(lines)


def write_checks_csv(outcomes: Sequence[Outcome], path: Path) -> None:
    """Every compared value of every run (gated or shown only) with its verdict."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", "metric", "golden", "now", "delta", "tolerance", "gated", "ok"])
    for outcome in outcomes:
        for c in outcome.checks:
            tolerance = "" if not c.gated else ("exact" if c.tolerance is None else c.tolerance)
            writer.writerow([c.run, c.metric, c.golden, c.now, c.delta, tolerance, c.gated, c.ok])
    results.write_text_atomic(path, buffer.getvalue())


def _rate(record: Mapping[str, Any] | None) -> str:
    """Training throughput and peak memory of a record (shown, never gated)."""
    if not record:
        return ""
    row = results.run_row(dict(record))
    rate, peak = row.get("train_samples_per_s"), row.get("peak_memory_train_bytes")
    parts = [f"{rate:,.0f} samples/s" if isinstance(rate, float) and rate > 0 else "no training"]
    if isinstance(peak, int | float):
        parts.append(f"peak {peak / 2**20:,.0f} MiB")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m regression.gate",
        description="Run the pinned regression grid and compare it with the committed golden records.",
        epilog="Goldens: regression/golden/. Rewrite them (after review) with "
        f"`{UPDATE_COMMAND}`; see docs/regression.md.",
    )
    parser.add_argument(
        "--update-golden",
        action="store_true",
        help="rewrite the goldens of the selected runs (full grid: also delete stale goldens)",
    )
    parser.add_argument("--strategy", action="append", default=[], help="only this strategy (repeatable)")
    parser.add_argument("--scenario", action="append", default=[], help="only this scenario (repeatable)")
    parser.add_argument("--seed", action="append", type=int, default=[], help="only this seed (repeatable)")
    parser.add_argument("--grid", type=Path, default=GRID_FILE, help="grid file (default: %(default)s)")
    parser.add_argument("--golden-dir", type=Path, default=GOLDEN_DIR, help="golden records directory")
    parser.add_argument(
        "--runs", type=Path, default=DEFAULT_RUNS, help="where the new run records go (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="HTML report path (default: <runs>/report.html)")
    parser.add_argument("--threads", type=int, help="override the grid's torch threads (tolerance studies)")
    parser.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gate; 0 when every run matches its golden (or goldens were written), 1 otherwise."""
    args = _parser().parse_args(argv)
    try:
        grid = load_grid(args.grid)
        specs = with_fixtures(grid.specs(args.strategy, args.scenario, args.seed), args.runs)
        for spec in specs:  # validate every config before spending minutes on the first runs
            loop.plan(config.resolve([{**spec.layer, "out": str(args.runs), "overwrite": True}]))
    except ClBenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(spec.run_id for spec in specs))
        return 0
    full_grid = not (args.strategy or args.scenario or args.seed)
    threads = args.threads or grid.threads
    print(
        f"regression gate: {len(specs)} runs ({len(grid.strategies())} strategies x "
        f"{len(grid.scenarios)} scenarios x {len(grid.seeds)} seeds{'' if full_grid else ', a subset'}), "
        f"CPU, {threads} thread(s), goldens in {_show(args.golden_dir)}",
        flush=True,
    )
    started = time.perf_counter()
    outcomes = run_grid(specs, args.runs, args.golden_dir, threads, update=args.update_golden)
    elapsed = time.perf_counter() - started

    stale = stale_goldens(args.golden_dir, specs) if full_grid else []
    breaches = [c for o in outcomes for c in o.breaches]
    if breaches:
        print(
            f"\nwhat moved ({len(breaches)} values beyond tolerance"
            f"{'; written as the new goldens' if args.update_golden else ''}):"
        )
        print(breach_table(breaches))
    for note in sorted({note for o in outcomes for note in o.notes}):
        print(f"note: {note}")
    problems = [o for o in outcomes if o.problem and not (args.update_golden and o.record is not None)]
    for outcome in problems:
        print(f"\n{outcome.spec.run_id}: {outcome.problem}")

    if args.update_golden:
        written = [o for o in outcomes if o.record is not None]
        for outcome in written:
            write_golden(outcome.record or {}, outcome.spec.golden_path(args.golden_dir))
        for path in stale:
            path.unlink()
        print(f"\nwrote {len(written)} golden(s) to {_show(args.golden_dir)}, removed {len(stale)} stale")
        if written:
            print(f"review `git diff --stat {_show(args.golden_dir)}` and commit them with the change")
    for path in [] if args.update_golden else stale:
        print(
            f"\nstale golden {_show(path)}: no run of the grid has this name (a removed strategy, "
            f"scenario or seed?); delete it, or run `{UPDATE_COMMAND}`, which removes it"
        )

    report = write_report(outcomes, args.out or args.runs / "report.html")
    failed = sum(o.record is None for o in outcomes)
    if args.update_golden:
        code = 1 if failed else 0
        verdict = "FAIL (a failed run has no golden)" if failed else "GOLDENS WRITTEN"
    else:
        code = 1 if (breaches or problems or stale) else 0
        verdict = "FAIL" if code else "PASS"
    if report is not None:
        print(f"report: {report.resolve()}")
    missing = sum(1 for o in outcomes if o.record is not None and o.problem)
    new, removed = ("new", " removed") if args.update_golden else ("missing", "")
    print(
        f"summary: {verdict}: {len(outcomes)} runs, {len(breaches)} breaches in "
        f"{sum(1 for o in outcomes if o.breaches)} runs, {missing} {new} goldens, {failed} failed runs, "
        f"{len(stale)} stale goldens{removed}, {elapsed:.0f} s ({threads} thread(s))"
    )
    return code


def run_grid(
    specs: Sequence[RunSpec], runs_dir: Path, golden_dir: Path, threads: int, *, update: bool = False
) -> list[Outcome]:
    """Run and compare every spec in this process with ``threads`` torch threads, one line per run."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    outcomes: list[Outcome] = []
    try:
        for k, spec in enumerate(specs, 1):
            outcome = evaluate(spec, runs_dir, golden_dir)
            outcomes.append(outcome)
            if outcome.record is None:
                verdict = "FAILED"
            elif outcome.problem:
                verdict = "new golden" if update else "NO GOLDEN"
            else:
                n = len(outcome.breaches)
                verdict = f"{'ok' if n == 0 else 'MOVED'} ({n}/{sum(c.gated for c in outcome.checks)})"
            print(
                f"[{k:>{len(str(len(specs)))}}/{len(specs)}] {spec.run_id:<34} {outcome.seconds:5.1f} s  "
                f"{verdict:<14} {_rate(outcome.record)}",
                flush=True,
            )
    finally:
        torch.set_num_threads(previous_threads)
    return outcomes


def write_report(outcomes: Sequence[Outcome], out: Path) -> Path | None:
    """The HTML report of the new records (``build_report``) and ``<stem>_regression.csv`` beside it."""
    records = [o.record_path for o in outcomes if o.record_path is not None and o.record_path.is_file()]
    if not records:
        return None
    try:
        with _quiet():
            report = build_report(records, out)
    except ClBenchError as err:
        print(f"no report: {err}")
        return None
    write_checks_csv(outcomes, out.with_name(f"{out.stem}_regression.csv"))
    return report


if __name__ == "__main__":
    sys.exit(main())
