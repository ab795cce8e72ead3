"""``cl-bench sweep``: a strategy x scenario x seed x override grid, executed by Ray.

A sweep file (TOML, ``docs/sweeps.md``) reuses the run config's keys and the regression grid's
layout (``regression/grid.toml``)::

    [sweep]                      # what to cross, and how to run it
    strategies = ["lora", "mora"]
    scenarios = ["split-cifar10"]
    seeds = [0, 1, 2]
    gpus_per_cell = 0.25         # fractional: four small cells share one GPU
    [run]                        # run keys of every cell (RunConfig; [run.backbone] etc. allowed)
    epochs = 1
    [axes]                       # override axes, crossed with everything above (--set keys)
    lr = [1e-4, 1e-3]
    [scenarios.split-cifar10]    # scenario arguments of one scenario
    root = "/data"
    [strategies.lora]            # one strategy's arguments, run keys and own axes
    args = { r = 8 }
    axes = { "strategy.r" = [4, 16] }
    [[cells]]                    # explicit extra cells: a run config layer each
    strategy = "finetune"
    scenario = "split-cifar10"
    lr = 1e-5

Every cell gets a deterministic run id, ``<strategy>-<scenario>-s<seed>-<hash>``, the hash being
that of its fully resolved config (component defaults filled in, storage keys left out), so the
same file names the same runs and a changed override names a new one. A re-run skips cells whose
record is ``ok``, restarts the others (there are no checkpoints yet: an interrupted cell starts
again from its first step) and re-runs ``failed`` cells only when asked (``retry_failed``).

Ray executes the cells: each in its own worker process (``max_calls=1``: CUDA contexts, compiled
graphs and allocator state die with the cell), with the sweep's CPUs and (fractional) GPUs per
cell, retried by Ray when its worker or node dies (``max_retries``). A small actor, the board,
counts attempts and records where each ran, so a retried cell's ``sweep.json`` entry says which
worker died. This module never imports the ``reports`` package (ARCHITECTURE.md): the caller
passes the report builder in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cl_bench import config, results
from cl_bench.errors import ClBenchError, ConfigError
from cl_bench.registry import BACKBONES, SCENARIOS, STRATEGIES, closest

log = logging.getLogger("cl_bench")

SWEEP_FILE = results.SWEEP_FILE
RESULTS_CSV = "results.csv"
REPORT_FILE = "report.html"
CELL_LOG = "cell.log"
SWEEP_SCHEMA_VERSION = 1
# Config keys that say where and how a run is stored, not what it computes: not hashed.
STORAGE_KEYS = frozenset({"out", "run_id", "overwrite", "report"})
# RunConfig keys that the sweep sets itself, per cell; a [run] table must not set them.
CELL_KEYS = frozenset({"strategy", "scenario", "seed", "out", "run_id"})
# Failure types of a record left by a stop, not by the cell's own fault: such cells restart.
INTERRUPTION_TYPES = frozenset({"KeyboardInterrupt", "SystemExit", "TaskCancelledError"})
TOP_LEVEL_KEYS = ("sweep", "run", "axes", "scenarios", "strategies", "cells")


class SweepError(ConfigError):
    """A sweep file that cannot be used: unknown key, unknown name, bad value, infeasible resources."""


@dataclass(frozen=True)
class SweepSettings:
    """The ``[sweep]`` table: what is crossed and how each cell is executed."""

    strategies: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    gpus_per_cell: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_cell: float = 1.0
    max_retries: int = 2  # Ray task retries when a cell's worker process or node dies
    max_parallel: int = 0  # 0: as many cells at once as the cluster's resources allow
    out: str = ""  # "": runs/<sweep file stem>
    # Test-only fault injection: cells whose run id starts with one of these SIGKILL their own worker
    # process in their first attempt, mid-run (after the before-training evaluation), so that the
    # retry path is exercised for real (tests/core/test_sweep.py).
    test_kill_first_attempt: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.gpus_per_cell is not None and self.gpus_per_cell < 0:
            raise SweepError(f"[sweep] gpus_per_cell must be >= 0, got {self.gpus_per_cell}")
        if self.gpus_per_cell is not None and self.gpus_per_cell > 1 and self.gpus_per_cell % 1:
            raise SweepError(
                f"[sweep] gpus_per_cell above 1 must be a whole number, got {self.gpus_per_cell}"
            )
        if not self.cpus_per_cell >= 0:
            raise SweepError(f"[sweep] cpus_per_cell must be >= 0, got {self.cpus_per_cell}")
        if self.max_retries < 0:
            raise SweepError(f"[sweep] max_retries must be >= 0, got {self.max_retries}")
        if self.max_parallel < 0:
            raise SweepError(f"[sweep] max_parallel must be >= 0 (0: no limit), got {self.max_parallel}")
        if not self.seeds:
            raise SweepError("[sweep] seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"[sweep] seeds lists a seed twice: {list(self.seeds)}")


@dataclass(frozen=True)
class StrategyTable:
    """A ``[strategies.<name>]`` table: the strategy's arguments, run keys and own override axes."""

    args: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its id, its config layers (lowest precedence first) and its overrides."""

    run_id: str
    strategy: str
    scenario: str
    seed: int
    layers: tuple[dict[str, Any], ...]
    overrides: dict[str, Any]  # the axis values (or an extra cell's own keys) that define it
    config: dict[str, Any]  # the resolved config that the id's hash is taken of

    @property
    def label(self) -> str:
        """A short human name: strategy, scenario, seed and overrides."""
        extra = " ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.strategy} {self.scenario} s{self.seed}" + (f" {extra}" if extra else "")


@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep file: its settings and every cell, in a deterministic order."""

    path: Path
    settings: SweepSettings
    cells: tuple[Cell, ...]
    out: Path
    n_product: int  # cells of the cartesian product (the rest are extra cells)

    def run_dir(self, cell: Cell) -> Path:
        return self.out / cell.run_id


# ----------------------------------------------------------------------------- the sweep file


def _check_keys(table: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in table:
        if key not in valid:
            raise SweepError(
                f"unknown key '{key}' in {where}{closest(key, list(valid))}; valid keys: {', '.join(valid)}"
            )


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: [{key}] must be a table")
    return dict(value)


def _axis_layer(key: str, value: Any, where: str) -> dict[str, Any]:
    """The config layer of one override, ``key`` written as for ``--set`` (``lr``, ``strategy.r``)."""
    parts = key.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in config.COMPONENTS) or not all(parts):
        raise SweepError(
            f"{where}: axis key {key!r}: use a run key (e.g. lr) or one of "
            f"{', '.join(c + '.<key>' for c in config.COMPONENTS)}"
        )
    if parts[0] in CELL_KEYS and len(parts) == 1:
        raise SweepError(f"{where}: {key!r} cannot be an axis; list it in [sweep] {key}s or add [[cells]]")
    if len(parts) == 2:
        if parts[1] == "name":
            raise SweepError(f"{where}: {key!r} cannot be an axis; list names in [sweep] or add [[cells]]")
        return {parts[0]: {parts[1]: value}}
    return {key: value}


def _axes(table: Mapping[str, Any], where: str) -> list[list[tuple[str, Any]]]:
    """Each axis as its list of ``(key, value)`` choices, in the file's order."""
    out = []
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}.{key}: an axis is a non-empty list of values, got {values!r}")
        _axis_layer(key, values[0], where)
        out.append([(key, v) for v in values])
    return out


def _component_dict(cfg: config.RunConfig) -> dict[str, Any]:
    """The fully resolved config of a cell, as a JSON-friendly dict (what its run id hashes).

    Names are canonical (aliases give the same id) and each component's config is built with its
    defaults filled in, which also validates every key before anything runs. Device-dependent
    resolution (``device = "auto"``, the default precision) is left as written: the driver may
    have no GPU while its workers do.
    """
    strategy = STRATEGIES.canonical(cfg.strategy)
    scenario = SCENARIOS.canonical(cfg.scenario)
    strategy_cfg = config.build(
        STRATEGIES.get(strategy).Config, cfg.strategy_args, f"strategy '{strategy}' config"
    )
    scenario_cfg = config.build(SCENARIOS.get(scenario), cfg.scenario_args, f"scenario '{scenario}' config")
    backbone = BACKBONES.canonical(cfg.backbone or scenario_cfg.default_backbone)
    backbone_cfg = config.build(BACKBONES.get(backbone), cfg.backbone_args, f"backbone '{backbone}' config")
    resolved = dataclasses.replace(cfg, strategy=strategy, scenario=scenario, backbone=backbone)
    out = {k: v for k, v in config.to_dict(resolved).items() if k not in STORAGE_KEYS}
    out["strategy_args"] = config.to_dict(strategy_cfg)
    out["scenario_args"] = config.to_dict(scenario_cfg)
    out["backbone_args"] = config.to_dict(backbone_cfg)
    return out


def config_hash(resolved: Mapping[str, Any], length: int = 10) -> str:
    """A short, stable hash of a resolved config (sorted keys, JSON floats written as repr)."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def make_cell(layers: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any], where: str) -> Cell:
    """Resolve one cell's layers into a :class:`Cell` with its deterministic run id."""
    try:
        cfg = config.resolve(list(layers))
        resolved = _component_dict(cfg)
    except SweepError:
        raise
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None
    strategy, scenario = resolved["strategy"], resolved["scenario"]
    run_id = f"{strategy}-{scenario}-s{cfg.seed}-{config_hash(resolved)}"
    return Cell(
        run_id=run_id,
        strategy=strategy,
        scenario=scenario,
        seed=cfg.seed,
        layers=tuple(dict(layer) for layer in layers),
        overrides=dict(overrides),
        config=resolved,
    )


def _name_of(value: Any, what: str, where: str) -> str:
    """The component name of a cell's ``strategy``/``scenario`` key (a string or a table's name)."""
    name = value.get("name") if isinstance(value, Mapping) else value
    if not isinstance(name, str) or not name:
        raise SweepError(f"{where}: an extra cell needs a {what} name (a string, or a table with name)")
    return name


def load(path: str | Path, *, out: str | Path | None = None) -> Sweep:
    """Parse and validate a sweep file into its cells (every cell's config is built here).

    Needs the registries filled (``cl_bench.cli.load_components``). ``out`` overrides the file's
    ``[sweep] out``; the default is ``runs/<file stem>``, one directory per sweep, so that its
    ``sweep.json``, report and ``results.csv`` never mix with another sweep's.
    """
    p = Path(path)
    data = config.load_toml(p, what="sweep file", error=SweepError)
    _check_keys(data, TOP_LEVEL_KEYS, str(p))
    settings = config.build(SweepSettings, _table(data, "sweep", str(p)), f"{p} [sweep]")
    run = _table(data, "run", str(p))
    for key in run:
        if key in CELL_KEYS:
            raise SweepError(f"{p} [run]: '{key}' is set per cell; list values in [sweep] or add [[cells]]")
    axes = _axes(_table(data, "axes", str(p)), f"{p} [axes]")
    scenario_args = {
        SCENARIOS.canonical(k): dict(v) if isinstance(v, Mapping) else _not_table(p, f"scenarios.{k}")
        for k, v in _table(data, "scenarios", str(p)).items()
    }
    strategy_tables: dict[str, StrategyTable] = {}
    for name, table in _table(data, "strategies", str(p)).items():
        if not isinstance(table, Mapping):
            _not_table(p, f"strategies.{name}")
        strategy_tables[STRATEGIES.canonical(name)] = config.build(
            StrategyTable, table, f"{p} [strategies.{name}]"
        )
    strategies = [STRATEGIES.canonical(s) for s in settings.strategies]
    scenarios = [SCENARIOS.canonical(s) for s in settings.scenarios]
    extra = data.get("cells", [])
    if not isinstance(extra, list) or not all(isinstance(c, Mapping) for c in extra):
        raise SweepError(f"{p}: cells must be an array of tables ([[cells]])")
    if not extra and not (strategies and scenarios):
        raise SweepError(f"{p}: [sweep] needs strategies and scenarios (or at least one [[cells]] table)")

    def base(strategy: str, scenario: str) -> list[dict[str, Any]]:
        table = strategy_tables.get(strategy, StrategyTable())
        return [
            run,
            {"scenario": {"name": scenario, **scenario_args.get(scenario, {})}},
            {"strategy": {"name": strategy, **table.args}},
            table.run,
        ]

    cells: list[Cell] = []
    for scenario in scenarios:
        for strategy in strategies:
            own = _axes(
                strategy_tables.get(strategy, StrategyTable()).axes, f"{p} [strategies.{strategy}.axes]"
            )
            for seed in settings.seeds:
                for combo in itertools.product(*axes, *own):
                    layers = [*base(strategy, scenario), {"seed": seed}]
                    layers += [_axis_layer(k, v, str(p)) for k, v in combo]
                    where = f"{p}: cell {strategy} {scenario} s{seed}"
                    cells.append(make_cell(layers, dict(combo), where))
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.run_id, cell)  # equal cells (an axis listing a value twice) run once
    n_product = len(unique)
    extra_cells: list[Cell] = []
    for i, cell_table in enumerate(extra):
        where = f"{p}: [[cells]] #{i + 1}"
        own_keys = dict(cell_table)
        seeds = own_keys.pop("seeds", None)
        if seeds is not None and "seed" in own_keys:
            raise SweepError(f"{where}: give seed or seeds, not both")
        strategy = STRATEGIES.canonical(_name_of(own_keys.get("strategy"), "strategy", where))
        scenario = SCENARIOS.canonical(_name_of(own_keys.get("scenario"), "scenario", where))
        if "seed" in own_keys:
            seed_list = [own_keys.pop("seed")]
        elif isinstance(seeds, list) and seeds:
            seed_list = seeds
        elif seeds is None:
            seed_list = list(settings.seeds)
        else:
            raise SweepError(f"{where}: seeds must be a non-empty list of integers")
        for key in ("out", "run_id"):
            if key in own_keys:
                raise SweepError(f"{where}: '{key}' is set by the sweep (its id comes from the config)")
        for seed in seed_list:
            layers = [*base(strategy, scenario), own_keys, {"seed": seed}]
            shown = _shown_overrides(own_keys)
            extra_cells.append(make_cell(layers, shown, f"{where} seed {seed}"))
    for cell in extra_cells:
        unique.setdefault(cell.run_id, cell)  # an extra cell equal to a product cell runs once
    out_dir = Path(out) if out else Path(settings.out) if settings.out else Path("runs") / p.stem
    return Sweep(p, settings, tuple(unique.values()), out_dir, n_product)


def _shown_overrides(layer: Mapping[str, Any]) -> dict[str, Any]:
    """An extra cell's own keys as ``--set`` style overrides (component names left out)."""
    shown: dict[str, Any] = {}
    for key, value in layer.items():
        if key in config.COMPONENTS and isinstance(value, Mapping):
            shown.update({f"{key}.{k}": v for k, v in value.items() if k != "name"})
        elif key not in ("strategy", "scenario"):
            shown[key] = value
    return shown


def _not_table(path: Path, key: str) -> Any:
    raise SweepError(f"{path}: [{key}] must be a table")


# ----------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class Decision:
    """What a sweep does with one cell given its existing record: run it or not, and why."""

    run: bool
    previous: str | None  # the existing record's status (None: no record)
    why: str


def decide(run_dir: Path, *, retry_failed: bool) -> Decision:
    """Skip ``ok`` records, restart missing/running/unreadable/interrupted ones, retry failed on request."""
    status = results.existing_status(run_dir)
    if status == "ok":
        return Decision(False, status, "skip (ok)")
    if status == "failed":
        failure = results.load(run_dir).get("failure") or {}
        if failure.get("type") in INTERRUPTION_TYPES:
            return Decision(True, status, "restart (interrupted)")
        if retry_failed:
            return Decision(True, status, "retry (failed)")
        return Decision(False, status, "failed earlier (pass --retry-failed)")
    if status is None:
        return Decision(True, None, "run")
    return Decision(True, status, f"restart ({status}; no checkpoints: from the start)")


def describe(sweep: Sweep, *, retry_failed: bool = False) -> str:
    """The ``--dry-run`` text: every cell, its run id and what a sweep would do with it."""
    s = sweep.settings
    n_extra = len(sweep.cells) - sweep.n_product
    decisions = [decide(sweep.run_dir(c), retry_failed=retry_failed) for c in sweep.cells]
    n_run = sum(d.run for d in decisions)
    head = (
        f"sweep {sweep.path}: {len(sweep.cells)} cells ({sweep.n_product} from the product"
        f"{f', {n_extra} extra' if n_extra else ''}), {n_run} to run, {len(sweep.cells) - n_run} to skip; "
        f"records in {sweep.out}; per cell {s.cpus_per_cell:g} CPU, "
        f"{'auto' if s.gpus_per_cell is None else f'{s.gpus_per_cell:g}'} GPU, max_retries {s.max_retries}"
    )
    width = max(len(c.run_id) for c in sweep.cells)
    action_width = max(len(d.why) for d in decisions)
    lines = [head]
    for cell, decision in zip(sweep.cells, decisions, strict=True):
        extra = " ".join(f"{k}={v}" for k, v in cell.overrides.items())
        lines.append(f"  {cell.run_id:<{width}}  {decision.why:<{action_width}}  {extra}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the worker side


class Board:
    """Ray actor (0 CPUs) that counts each cell's attempts and records where every attempt ran.

    Ray retries a task whose worker died without telling the driver; the board is how a retried
    cell learns its attempt number and how the driver learns of the attempts that died.
    """

    def __init__(self) -> None:
        self._attempts: dict[str, list[dict[str, Any]]] = {}

    def started(self, run_id: str, where: dict[str, Any]) -> int:
        attempts = self._attempts.setdefault(run_id, [])
        attempts.append({"attempt": len(attempts) + 1, **where})
        return len(attempts)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return self._attempts


def _kill_when_running(path: Path, since: float) -> None:
    """Fault injection: SIGKILL this process once its record is written ``running`` with row b."""
    while True:
        with contextlib.suppress(OSError, ValueError):
            if path.stat().st_mtime >= since:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("status") == "running" and (data.get("accuracy") or {}).get("initial"):
                    os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this worker's stdout/stderr (Python and C level) to ``path``: the cell's own log.

    Safe only because a cell's worker process runs this one task and exits (``max_calls=1``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with path.open("a", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        yield
        sys.stdout.flush()
        sys.stderr.flush()


def run_cell(job: dict[str, Any], board: Any) -> dict[str, Any]:
    """Execute one cell in this (dedicated) Ray worker process; return its outcome.

    Never raises for a cell's own failure: a config or data error, a diverged loss or any bug
    becomes ``status: failed`` with the reason (the record says the same), so Ray retries only
    what it should, the death of the worker or its node.
    """
    import psutil
    import ray

    entered = time.time()
    ctx = ray.get_runtime_context()
    where = {
        "hostname": platform.node(),
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "started": entered,
    }
    attempt = ray.get(board.started.remote(job["run_id"], where))
    run_dir = Path(job["out"]) / job["run_id"]
    outcome: dict[str, Any] = {"run_id": job["run_id"], "attempt": attempt, **where, "failure": None}
    with _output_to(run_dir / CELL_LOG):
        where_now = f"pid {os.getpid()} on {platform.node()}"
        print(f"--- {results.utc_now()} attempt {attempt} of {job['run_id']}: {where_now}")
        if attempt == 1 and job.get("kill_first_attempt"):
            threading.Thread(
                target=_kill_when_running, args=(run_dir / results.RESULT_FILE, entered), daemon=True
            ).start()
        try:
            from cl_bench import loop
            from cl_bench.cli import load_components

            load_components()
            outcome["import_s"] = time.time() - entered
            cfg = config.resolve([*job["layers"], {"out": job["out"], "run_id": job["run_id"]}])
            if results.existing_status(run_dir) != "ok":  # a retry after the record was complete: done
                loop.run(cfg, progress=False)
            outcome["status"] = "ok"
        except ClBenchError as err:
            outcome["status"], outcome["failure"] = "failed", {"type": type(err).__name__, "reason": str(err)}
        except KeyboardInterrupt:
            outcome["status"] = "interrupted"
            outcome["failure"] = {"type": "KeyboardInterrupt", "reason": "interrupted"}
        except Exception as err:
            traceback.print_exc()
            outcome["status"] = "failed"
            outcome["failure"] = {"type": type(err).__name__, "reason": f"{type(err).__name__}: {err}"}
        print(f"--- {results.utc_now()} attempt {attempt}: {outcome['status']}")
    outcome["finished"] = time.time()
    with contextlib.suppress(results.RecordError):
        outcome["record"] = results.load(run_dir)
    return outcome


# ----------------------------------------------------------------------------- the driver side


@dataclass
class CellState:
    """What the driver knows of one cell; becomes its entry in ``sweep.json``."""

    cell: Cell
    decision: Decision
    status: str = "pending"  # pending | running | ok | failed | interrupted | skipped | not retried
    attempts: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, Any] | None = None
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    import_s: float | None = None
    setup_s: float | None = None

    def to_dict(self, out: Path) -> dict[str, Any]:
        last = self.attempts[-1] if self.attempts else {}
        record = out / self.cell.run_id / results.RESULT_FILE
        return {
            "run_id": self.cell.run_id,
            "strategy": self.cell.strategy,
            "scenario": self.cell.scenario,
            "seed": self.cell.seed,
            "overrides": self.cell.overrides,
            "status": self.status,
            "previous_status": self.decision.previous,
            "action": self.decision.why,
            "failure": self.failure,
            "n_attempts": len(self.attempts),
            "attempts": self.attempts,
            "hostname": last.get("hostname"),
            "node_id": last.get("node_id"),
            "pid": last.get("pid"),
            "submitted": _iso(self.submitted),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "wall_s": None if self.started is None or self.finished is None else self.finished - self.started,
            "worker_start_s": _worker_start(last),
            "import_s": self.import_s,
            "setup_s": self.setup_s,
            "record": str(record) if record.is_file() else None,
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _worker_start(attempt: Mapping[str, Any]) -> float | None:
    """Seconds from the worker process's start to the cell's first line (Ray's worker boot)."""
    if "process_started" in attempt and "started" in attempt:
        return float(attempt["started"]) - float(attempt["process_started"])
    return None


@dataclass
class SweepResult:
    """The outcome of :func:`run`: per-cell states, the files written and the exit code."""

    cells: list[CellState]
    sweep_json: Path
    report: Path | None
    results_csv: Path | None
    interrupted: bool
    wall_s: float
    ray_init_s: float

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state in self.cells:
            out[state.status] = out.get(state.status, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if all(s.status in ("ok", "skipped") for s in self.cells) else 1

    def summary(self) -> str:
        lines = []
        for state in self.cells:
            if state.status in ("failed", "interrupted", "not retried"):
                reason = (state.failure or {}).get("reason", "")
                lines.append(f"  {state.status}: {state.cell.run_id}: {reason}".rstrip(": "))
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        lines.append(f"sweep: {len(self.cells)} cells: {counts}; {self.wall_s:.0f} s")
        lines.append(f"  sweep.json: {self.sweep_json}")
        if self.report is not None:
            lines.append(f"  report: {self.report}")
        if self.results_csv is not None:
            lines.append(f"  results: {self.results_csv}")
        return "\n".join(lines)


class _Progress:
    """The live view: a tqdm bar on a terminal, one plain line per event otherwise."""

    def __init__(self, states: Sequence[CellState], *, enabled: bool, tty: bool) -> None:
        self.states = states
        self.enabled = enabled
        self.total = sum(s.decision.run for s in states)
        self.bar: Any = None
        self.started = time.perf_counter()
        if enabled and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="cell", desc="sweep", dynamic_ncols=True, file=sys.stdout)

    def counts(self) -> str:
        n = {k: sum(s.status == k for s in self.states) for k in ("ok", "running", "failed", "skipped")}
        n["skipped"] += sum(s.status == "not retried" for s in self.states)
        return f"done {n['ok']} running {n['running']} failed {n['failed']} skipped {n['skipped']}"

    def _eta(self) -> str:
        done = sum(s.decision.run and s.finished is not None for s in self.states)
        if not done or done >= self.total:
            return ""
        elapsed = time.perf_counter() - self.started
        return f", eta {(self.total - done) * elapsed / done:.0f} s"

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(f"{text}  [{self.counts()}{self._eta()}]", flush=True)

    def refresh(self, running: Mapping[str, str]) -> None:
        """Counts and the running cells' experience progress (``running``: label -> progress)."""
        if self.bar is None:
            return
        busy = ", ".join(f"{label} {p}" for label, p in list(running.items())[:3])
        self.bar.set_postfix_str(f"{self.counts()}" + (f" | {busy}" if busy else ""), refresh=False)
        self.bar.n = sum(s.decision.run and s.finished is not None for s in self.states)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _experience_progress(run_dir: Path) -> str | None:
    """``"2/5"`` experiences done, from the record the loop rewrites after each experience."""
    with contextlib.suppress(results.RecordError, OSError):
        data = results.load(run_dir)
        if data.get("status") == "running":
            n_total = len((data.get("accuracy") or {}).get("n_test") or [])
            return f"exp {len(data.get('experiences') or [])}/{n_total}" if n_total else "setup"
    return None


def init_ray(address: str | None) -> tuple[bool, float]:
    """Start Ray locally (all of this machine's CPUs/GPUs) or connect to ``address``.

    Returns whether this call started the connection (and so must shut it down) and its seconds.
    An already initialised Ray (a test, a notebook, the benchmark) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False, 0.0
    tic = time.perf_counter()
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}}
    kwargs: dict[str, Any] = {"runtime_env": env, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"cannot start or reach Ray at {address or 'local'}: {err}") from None
    return True, time.perf_counter() - tic


def _check_resources(cpus: float, gpus: float) -> None:
    """A cell no node can hold would wait forever in Ray's queue: fail now, in one line."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = any(
        n.get("Resources", {}).get("CPU", 0) >= cpus and n.get("Resources", {}).get("GPU", 0) >= gpus
        for n in nodes
    )
    if not fits:
        have = ray.cluster_resources()
        raise SweepError(
            f"no Ray node has {cpus:g} CPU and {gpus:g} GPU for one cell (cluster: "
            f"{have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU); lower cpus_per_cell/gpus_per_cell"
        )


def run(
    sweep: Sweep,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    report: Callable[[list[Path], Path], Path] | None = None,
) -> SweepResult:
    """Execute the sweep's cells on Ray; write ``sweep.json``, ``results.csv`` and the report.

    A failing cell never stops the others. Ctrl-C cancels the running cells (their worker
    processes are killed, so their records stay ``running``, never ``ok``), marks them
    ``interrupted`` in ``sweep.json`` and still writes what finished.
    """
    import ray

    started = time.perf_counter()
    out = sweep.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    states = [CellState(c, decide(out / c.run_id, retry_failed=retry_failed)) for c in sweep.cells]
    for state in states:
        if not state.decision.run:
            state.status = "skipped" if state.decision.previous == "ok" else "not retried"
            if state.status == "not retried":
                state.failure = (results.load(out / state.cell.run_id).get("failure")) or None
    todo = [s for s in states if s.decision.run]
    view = _Progress(states, enabled=progress, tty=sys.stdout.isatty())
    owns_ray, ray_init_s = (False, 0.0)
    interrupted = False
    meta: dict[str, Any] = {"address": address or "local", "created": results.utc_now()}
    try:
        if todo:
            owns_ray, ray_init_s = init_ray(address)
            meta["ray_init_s"] = ray_init_s
            meta["ray_resources"] = ray.cluster_resources()
            interrupted = _execute(sweep, out, todo, states, view, max_parallel, meta)
    finally:
        view.close()
        if owns_ray:
            ray.shutdown()
    meta["finished"] = results.utc_now()
    wall = time.perf_counter() - started
    sweep_json = out / SWEEP_FILE
    _write_sweep_json(sweep, out, states, meta, wall)
    dirs = [out / s.cell.run_id for s in states if (out / s.cell.run_id / results.RESULT_FILE).is_file()]
    csv_path = None
    if dirs:
        csv_path = out / RESULTS_CSV
        results.write_text_atomic(csv_path, results.load_results(dirs).to_csv(index=False))
    report_path = None
    if report is not None and any(s.status in ("ok", "skipped") for s in states):
        try:
            report_path = report(dirs, out / REPORT_FILE)
        except ClBenchError as err:
            log.warning("no report: %s", err)
    meta["report"] = str(report_path) if report_path else None
    meta["results_csv"] = str(csv_path) if csv_path else None
    _write_sweep_json(sweep, out, states, meta, wall)
    return SweepResult(states, sweep_json, report_path, csv_path, interrupted, wall, ray_init_s)


def _execute(
    sweep: Sweep,
    out: Path,
    todo: list[CellState],
    states: list[CellState],
    view: _Progress,
    max_parallel: int | None,
    meta: dict[str, Any],
) -> bool:
    """Submit ``todo`` to Ray and follow it to the end; return whether Ctrl-C stopped it."""
    import ray
    from ray.exceptions import RayError

    s = sweep.settings
    gpus = s.gpus_per_cell
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    _check_resources(s.cpus_per_cell, gpus)
    meta["gpus_per_cell"], meta["cpus_per_cell"] = gpus, s.cpus_per_cell
    board: Any = ray.remote(num_cpus=0)(Board).remote()
    task = ray.remote(max_calls=1)(run_cell)
    resources = {"num_cpus": s.cpus_per_cell, "num_gpus": gpus, "max_retries": s.max_retries}
    limit = max_parallel if max_parallel is not None else s.max_parallel
    queue = list(todo)
    inflight: dict[Any, CellState] = {}
    view.line(
        f"sweep: {len(states)} cells, {len(todo)} to run ({len(states) - len(todo)} skipped or not retried), "
        f"{s.cpus_per_cell:g} CPU + {gpus:g} GPU per cell, on {meta['address']}"
    )
    caught: list[str] = []  # the signals received while the loop runs
    restore = _defer_interrupts(caught)
    try:
        while queue or inflight:
            while queue and (not limit or len(inflight) < limit):  # Ray's pattern to bound pending tasks
                state = queue.pop(0)
                job = {
                    "run_id": state.cell.run_id,
                    "layers": list(state.cell.layers),
                    "out": str(out),
                    "kill_first_attempt": any(
                        state.cell.run_id.startswith(x) for x in s.test_kill_first_attempt
                    ),
                }
                state.submitted = time.time()
                inflight[task.options(**resources, name=f"cell {state.cell.run_id}").remote(job, board)] = (
                    state
                )
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if caught:
                raise KeyboardInterrupt
            attempts = ray.get(board.snapshot.remote())
            for state in inflight.values():
                seen = attempts.get(state.cell.run_id, [])
                if seen and state.status == "pending":
                    state.status, state.started = "running", seen[-1]["started"]
                    view.line(f"start {state.cell.run_id} on {seen[-1]['hostname']} pid {seen[-1]['pid']}")
                if len(seen) > len(state.attempts) and state.attempts:
                    view.line(
                        f"retry {state.cell.run_id}: attempt {len(seen)} (the worker of the last one died)"
                    )
                state.attempts = _with_deaths(seen)
            for ref in ready:
                state = inflight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except RayError as err:  # retries used up: the worker or node died every time
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    outcome = {"status": "failed", "failure": {"type": type(err).__name__, "reason": first}}
                _finish(state, outcome, ray.get(board.snapshot.remote()).get(state.cell.run_id, []), out)
                wall = f"{state.finished - state.started:.1f} s" if state.started and state.finished else ""
                why = f": {(state.failure or {}).get('reason', '')}" if state.status != "ok" else ""
                view.line(f"{state.status} {state.cell.run_id} {wall} (attempt {len(state.attempts)}){why}")
                _write_sweep_json(sweep, out, states, meta, None)
            view.refresh(
                {
                    f"{st.cell.strategy} s{st.cell.seed}": p
                    for st in inflight.values()
                    if st.status == "running" and (p := _experience_progress(out / st.cell.run_id))
                }
            )
    except KeyboardInterrupt:
        for ref, state in inflight.items():
            with contextlib.suppress(RayError, OSError, RuntimeError):  # Ray itself may be gone already
                ray.cancel(ref, force=True)
            if results.existing_status(out / state.cell.run_id) == "ok":  # it completed meanwhile
                state.status = "ok"
            elif state.status == "running":
                state.status = "interrupted"
                why = "Ctrl-C" if not caught or caught[0] == "SIGINT" else caught[0]
                state.failure = {"type": "KeyboardInterrupt", "reason": f"sweep interrupted ({why})"}
            if state.status != "pending":
                state.finished = time.time()
        view.line(f"interrupted: {len(inflight)} cells stopped, {len(queue)} never started")
        return True
    finally:
        restore()
    return False


def _defer_interrupts(caught: list[str]) -> Callable[[], None]:
    """Turn Ctrl-C (and SIGTERM) into a name appended to ``caught``; return what puts the old handlers back.

    A KeyboardInterrupt raised inside ``ray.wait`` (compiled code) can be lost or come back as a
    SystemError, and the driver would then wait for the cell to end; instead the loop raises it
    itself between two waits, at most a second later. Outside the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: caught.append(signal.Signals(signum).name))

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _with_deaths(attempts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The board's attempts, each earlier one marked as died (Ray retried the cell after it)."""
    out = []
    for i, attempt in enumerate(attempts):
        entry = dict(attempt)
        if i < len(attempts) - 1:
            entry["outcome"] = "worker died"
            entry["reason"] = (
                f"the worker process (pid {attempt.get('pid')} on {attempt.get('hostname')}) died during "
                "the cell (killed, out of memory, or its node was lost); Ray retried the cell"
            )
        out.append(entry)
    return out


def _finish(state: CellState, outcome: Mapping[str, Any], attempts: list[dict[str, Any]], out: Path) -> None:
    """Record a finished cell; write the returned record when the driver does not see the worker's files."""
    state.finished = float(outcome.get("finished") or time.time())
    state.status = str(outcome["status"])
    state.failure = outcome.get("failure")
    state.import_s = outcome.get("import_s")
    state.attempts = _with_deaths(attempts)
    if state.attempts:
        state.attempts[-1]["outcome"] = state.status
        state.attempts[-1]["finished"] = state.finished
        state.started = state.started or state.attempts[0]["started"]
    record = outcome.get("record")
    if isinstance(record, dict):
        state.setup_s = (record.get("timing") or {}).get("setup_s")
        run_dir = out / state.cell.run_id
        retried = len(state.attempts) > 1
        if retried:  # the record says why it took more than one attempt, not only sweep.json
            record = {**record, "sweep": {"attempts": state.attempts}}
        if retried or results.existing_status(run_dir) != record.get("status"):  # or no shared file system
            results.write_json_atomic(run_dir / results.RESULT_FILE, record)


def _write_sweep_json(
    sweep: Sweep, out: Path, states: Sequence[CellState], meta: Mapping[str, Any], wall: float | None
) -> None:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.status] = counts.get(state.status, 0) + 1
    data = {
        "sweep_schema_version": SWEEP_SCHEMA_VERSION,
        "sweep_file": str(sweep.path),
        "out": str(out),
        **meta,
        "wall_s": wall,
        "settings": config.to_dict(sweep.settings),
        "counts": counts,
        "cells": [s.to_dict(out) for s in states],
    }
    results.write_json_atomic(out / SWEEP_FILE, data)
