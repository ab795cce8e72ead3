"""``cl-bench``: the command line, and the composition root.

This is the only module that reads argv/environment and the only one in ``cl_bench`` that imports
the component packages (``strategies``, ``scenarios``, ``reports``) to fill the registries. Heavy
libraries are imported only by the commands that need them: ``--help`` imports none, and
``report`` reads JSON without ever importing torch, avalanche or open_clip.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_bench.errors import ClBenchError, MissingDataError, RunInterrupted

log = logging.getLogger("cl_bench")


COMPONENT_MODULES = (
    "cl_bench.backbones.open_clip",
    "cl_bench.backbones.hf",
    "cl_bench.backbones.tiny",
    "scenarios",
    "strategies",
)


COMMANDS = ("run", "list", "report", "bench", "sweep", "data")

REGISTRY_COMMANDS = frozenset({"run", "bench", "sweep", "data"})
"""Commands that look components up in the registries; ``report`` reads JSON only and must not
import the component packages (they pull in torch, avalanche and open_clip), and ``list`` reads
the registrations from the source files (:mod:`cl_bench.catalog`)."""


def load_components() -> None:
    """Import every component module so its registrations run.

    Not free: the component modules import torch (and the scenarios avalanche), so only the
    commands of :data:`REGISTRY_COMMANDS` call it.
    """
    for name in COMPONENT_MODULES:
        importlib.import_module(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-bench",
        description="Continual-learning benchmark harness for LoRA-family fine-tuning.",
        epilog="Examples: cl-bench run --strategy lora --scenario split-digits | cl-bench list strategies | "
        "cl-bench report runs/ -o report.html | cl-bench sweep sweep.toml --dry-run",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    run = sub.add_parser("run", help="train one strategy through one scenario and write a run record")
    run.add_argument("--strategy", help="registered strategy name (cl-bench list strategies)")
    run.add_argument("--scenario", help="registered scenario name (cl-bench list scenarios)")
    run.add_argument("--backbone", help="registered backbone name (default: the scenario's)")
    run.add_argument(
        "--config",
        metavar="RUN.TOML",
        help="TOML file with run keys and [strategy]/[scenario]/[backbone] tables",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run key (lr=1e-3) or a component key (strategy.r=16, scenario.root=DIR); "
        "repeatable, applied last",
    )
    run.add_argument("--out", help="directory of run records (default runs/)")
    run.add_argument(
        "--run-id", help="name of the run directory (default: <time>-<strategy>-<scenario>-s<seed>)"
    )
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: CUDA when present")
    run.add_argument("--seed", type=int, help="training seed")
    run.add_argument("--order-seed", type=int, help="class-order seed (separate from the training seed)")
    run.add_argument("--overwrite", action="store_true", help="replace a completed run with the same id")
    run.add_argument("--report", action="store_true", help="also write report.html next to the record")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the stopped run in RUN_DIR from its checkpoint, with the config of its record "
        "(re-running the same command with the same --out/--run-id does the same)",
    )
    run.add_argument("--restart", action="store_true", help="discard the run's checkpoint and start it over")
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress (default: a bar on a terminal, a plain line every 30 s otherwise)",
    )
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: the CPUs this process may use: its affinity mask within the "
        "cgroup CPU quota, so a shared machine is not oversubscribed)",
    )
    run.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="TRACKER",
        help="also log to tensorboard, mlflow or wandb (offline); repeatable or comma-separated "
        "(docs/logging.md)",
    )

    data = sub.add_parser(
        "data", help="check a multi-domain data root (x-tail, mtil), or write a tiny fixture of one"
    )
    data.add_argument("action", choices=("check", "fixture"))
    data.add_argument("--scenario", required=True, help="x-tail or mtil")
    data.add_argument("--config", metavar="RUN.TOML", help="TOML file with a [scenario] table")
    data.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a scenario key: scenario.root=DIR, scenario.domains=[...] (repeatable)",
    )
    data.add_argument("--out", help="fixture: the data root to write (every domain in one layout)")
    data.add_argument(
        "--layout", type=int, default=0, help="fixture: which accepted layout of each domain (0: the first)"
    )

    lst = sub.add_parser("list", help="show registered strategies, scenarios and backbones")
    lst.add_argument("kind", nargs="?", choices=("strategies", "scenarios", "backbones"))

    rep = sub.add_parser("report", help="turn run records into one self-contained HTML report")
    rep.add_argument("paths", nargs="+", metavar="RUNS_DIR", help="run directories or result.json files")
    rep.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    bench = sub.add_parser(
        "bench", help="GPU speed benchmark of every strategy vs HF peft (benchmarks/speed.py)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark (--help)")

    sweep = sub.add_parser(
        "sweep", help="run a strategy x scenario x seed x override grid on Ray (docs/sweeps.md)"
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.TOML", help="the sweep file")
    sweep.add_argument(
        "--address",
        help="an existing Ray cluster (auto, or ray://host:port); default: start Ray on this machine",
    )
    sweep.add_argument(
        "--out", help="directory of the sweep's records (default: [sweep] out, or runs/<file stem>)"
    )
    sweep.add_argument(
        "--max-parallel", type=int, help="at most this many cells at once (default: resources)"
    )
    sweep.add_argument(
        "--dry-run", action="store_true", help="print the cells and their run ids, run nothing"
    )
    sweep.add_argument("--retry-failed", action="store_true", help="also re-run cells whose record is failed")
    sweep.add_argument("--no-progress", action="store_true", help="no progress view")
    return parser


def _run_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cl_bench import config, threads

    layers: list[dict[str, Any]] = [{"threads": threads.available_cpus()}]  # under the file and flags
    if args.resume:
        layers.append(_resume_layer(Path(args.resume)))
    if args.config:
        layers.append(config.load_toml(args.config))
    flags = {
        "strategy": args.strategy,
        "scenario": args.scenario,
        "backbone": args.backbone,
        "out": args.out,
        "run_id": args.run_id,
        "device": args.device,
        "seed": args.seed,
        "order_seed": args.order_seed,
        "threads": args.threads,
        "log": [name.strip() for value in args.log for name in value.split(",") if name.strip()] or None,
    }
    layers.append({k: v for k, v in flags.items() if v is not None})
    if args.overwrite:
        layers.append({"overwrite": True})
    if args.restart:
        layers.append({"restart": True})
    if args.report:
        layers.append({"report": True})
    layers.append(config.parse_set(args.overrides))
    return layers


def _resume_layer(run_dir: Path) -> dict[str, Any]:
    """The config layer of ``--resume RUN_DIR``: the run's own config, from its record, in
    ``RUN_DIR``'s parent under its name (later flags and ``--set`` still apply on top)."""
    from cl_bench import results
    from cl_bench.errors import ConfigError

    try:
        saved = results.load(run_dir)["config"]
    except results.RecordError as err:
        raise ConfigError(f"--resume {run_dir}: {err}") from None
    layer: dict[str, Any] = {k: v for k, v in saved.items() if not k.endswith("_args")}
    for component in ("strategy", "scenario", "backbone"):
        layer[component] = {"name": saved.get(component, ""), **saved.get(f"{component}_args", {})}
    layer.pop("threads", None)  # this machine's CPUs, not the stopped run's
    layer.update(
        out=str(run_dir.resolve().parent), run_id=run_dir.resolve().name, restart=False, overwrite=False
    )
    return layer


def _check_data_early(args: argparse.Namespace) -> None:
    """A missing or corrupt CIFAR root fails before the components (and torch) are imported.

    Config errors are left to the full resolution after the imports, which names valid choices.
    """
    from cl_bench import cifar_layout, config

    try:
        cfg = config.resolve(_run_layers(args))
    except ClBenchError:
        return
    cifar_layout.precheck(cfg.scenario, cfg.scenario_args)


def _summary(record: Any, path: Path) -> str:
    m, p, t = record.metrics, record.parameters, record.timing

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        ("acc_final", fmt(m["acc_final"])),
        ("acc_avg_incremental", fmt(m["acc_avg_incremental"])),
        ("forgetting", fmt(m["forgetting"])),
        ("bwt", fmt(m["bwt"])),
        ("fwt", fmt(m["fwt"])),
        ("trainable params", f"{p['trainable']:,} ({100 * p['trainable_fraction']:.2f}% of backbone)"),
        (
            "peak memory (train)",
            f"{t['peak_memory_train_bytes'] / 2**20:,.1f} MiB ({record.experiences[-1].memory_kind})",
        ),
        ("time", f"{t['total_s']:.1f} s (train {t['train_s']:.1f} s, eval {t['eval_s']:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [
        f"{record.config['strategy']} on {record.config['scenario']} ({record.config['backbone']}, "
        f"{record.environment['device']}, {record.environment['precision']})"
    ]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  record: {path}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from cl_bench import config, loop

    cfg = config.resolve(_run_layers(args))
    check_multidomain(cfg)
    record = loop.run(cfg, progress=not args.no_progress, handle_signals=True)
    run_dir = Path(record.config["out"]) / record.run_id
    print(_summary(record, run_dir / "result.json"))
    if record.config["report"]:
        from reports.build import build_report

        out = build_report([run_dir], run_dir / "report.html")
        print(f"  report: {out}")
    return 0


def _scenario_config(args: argparse.Namespace) -> Any:
    """The scenario config of ``data``'s --scenario/--config/--set (a run's precedence)."""
    from cl_bench import config
    from cl_bench.errors import ConfigError
    from cl_bench.registry import SCENARIOS

    layers: list[dict[str, Any]] = []
    if args.config:
        layers.append(config.load_toml(args.config))
    layers.append({"scenario": args.scenario})
    layers.append(config.parse_set(args.overrides))
    cfg = config.resolve(layers)
    cls = SCENARIOS.get(cfg.scenario)
    if not hasattr(cls, "check"):
        raise ConfigError(
            f"cl-bench data works on the multi-domain scenarios (x-tail, mtil), not {cfg.scenario}"
        )
    return config.build(cls, cfg.scenario_args, f"scenario '{cfg.scenario}' config")


def cmd_data(args: argparse.Namespace) -> int:
    """``data check``: one row per domain (layout, classes, images, missing files), exit 1 when any
    domain is missing or incomplete; ``data fixture``: write a tiny copy of every domain."""
    from cl_bench.errors import ConfigError

    scenario = _scenario_config(args)
    if args.action == "fixture":
        if not args.out:
            raise ConfigError("cl-bench data fixture needs --out DIR (the data root to write)")
        from scenarios.multidomain import write_fixture

        root = write_fixture(scenario, Path(args.out), layout=args.layout)
        print(f"fixture: {root} ({', '.join(spec.name for spec in scenario.specs())})")
        return 0
    rows = scenario.check()
    header = ("domain", "layout", "classes", "train", "test", "published", "missing")
    table = [header] + [
        (r.domain, r.layout, str(r.classes), str(r.train), str(r.test), r.published, str(r.missing))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    bad = [r for r in rows if r.error]
    for r in bad:
        print(f"error: {r.error}", file=sys.stderr)
    if bad:
        return 1
    print(f"ok: {len(rows)} domains under {scenario.root or 'scenario.roots'}")
    return 0


def check_multidomain(cfg: Any) -> None:
    """``cl-bench run`` on x-tail/mtil: the data check before any model is built (a missing
    domain fails in seconds, with the exact path)."""
    from cl_bench import config
    from cl_bench.errors import DataError
    from cl_bench.registry import SCENARIOS

    cls = SCENARIOS.get(cfg.scenario)
    if not hasattr(cls, "check"):
        return
    scenario = config.build(cls, cfg.scenario_args, f"scenario '{cfg.scenario}' config")
    bad = [r for r in scenario.check() if r.error]
    if bad:
        more = f" (and {len(bad) - 1} more domains: cl-bench data check lists them)" if len(bad) > 1 else ""
        raise DataError(bad[0].error + more)


def cmd_list(args: argparse.Namespace) -> int:
    from cl_bench import catalog

    try:  # the registrations as the source files state them: no torch import (< 0.5 s)
        kinds = catalog.read(COMPONENT_MODULES)
    except catalog.CatalogError as err:
        log.debug("reading the registrations from source failed (%s); importing the components", err)
        load_components()
        from cl_bench.registry import BACKBONES, SCENARIOS, STRATEGIES

        registries = {"strategies": STRATEGIES, "scenarios": SCENARIOS, "backbones": BACKBONES}
        kinds = {
            kind: [catalog.Listing(e.name, e.description, e.aliases) for e in registry]
            for kind, registry in registries.items()
        }
    for kind, entries in kinds.items():
        if args.kind and args.kind != kind:
            continue
        print(f"{kind}:")
        labels = [e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "") for e in entries]
        width = max(map(len, labels))
        for label, e in zip(labels, entries, strict=True):
            print(f"  {label:<{width}}  {e.description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.build import build_report

    out = build_report([Path(p) for p in args.paths], Path(args.output))
    print(f"report: {out}")
    return 0


class _OwnInfoOnly(logging.Filter):
    """cl-bench's own INFO and above; other libraries (open_clip logs to root) only from ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("cl_bench") or record.levelno >= logging.ERROR


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, not as it was at setup: a stream bound
    once outlives a redirection (a test's capture, ``contextlib.redirect_stderr``) and then fails
    on every later record with "I/O operation on closed file"."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _configure_logging() -> None:
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_OwnInfoOnly())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def cmd_sweep(args: argparse.Namespace) -> int:
    from cl_bench import sweep

    if args.max_parallel is not None and args.max_parallel < 0:
        raise sweep.SweepError(f"--max-parallel must be >= 0 (0: no limit), got {args.max_parallel}")
    plan = sweep.load(args.sweep_file, out=args.out)
    if args.dry_run:
        print(sweep.describe(plan, retry_failed=args.retry_failed))
        return 0
    from reports.build import build_report

    outcome = sweep.run(
        plan,
        address=args.address,
        max_parallel=args.max_parallel,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        report=build_report,
    )
    print(outcome.summary())
    return outcome.exit_code


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.speed import main as bench_main

    return bench_main(args.bench_args)


def unknown_command(argv: Sequence[str]) -> str | None:
    """The error line for a first argument that is no command (``rnu`` -> did you mean 'run'?)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None or first in COMMANDS or argv[0].startswith("-"):
        return None
    from cl_bench.registry import closest

    return f"unknown command '{first}'{closest(first, list(COMMANDS))}; commands: {', '.join(COMMANDS)}"


def data_hint(err: MissingDataError, argv: Sequence[str]) -> str:
    """Where the missing data comes from and the user's own command with ``scenario.root`` set."""
    from cl_bench import cifar_layout

    root = err.root or "data"
    kept: list[str] = []
    for arg in argv:  # the user's own scenario.root is replaced by the one at the end
        if arg.startswith("--set=scenario.root="):
            continue
        if arg.startswith("scenario.root=") and kept and kept[-1] == "--set":
            kept.pop()
            continue
        kept.append(arg)
    command = shlex.join(["cl-bench", *kept, "--set", f"scenario.root={root}"])
    lines = [
        "  get the data (on any machine with internet; copy the folder over if this one has none):",
        f"    {cifar_layout.download_command(err.variant, shlex.quote(root))}",
        "  then run:",
        f"    {command}",
        "  no data at hand? scikit-learn's bundled digits run offline in about a minute:",
        "    cl-bench run --strategy lora --scenario split-digits",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network for weights
    os.environ.setdefault("WANDB_MODE", "disabled")  # avalanche imports wandb at module level
    argv = list(sys.argv[1:] if argv is None else argv)
    if (problem := unknown_command(argv)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # REMAINDER leaves leading options (--quick, --help) unparsed
        args.bench_args = [*extra, *args.bench_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging()
    commands = {
        "run": cmd_run,
        "list": cmd_list,
        "report": cmd_report,
        "bench": cmd_bench,
        "sweep": cmd_sweep,
        "data": cmd_data,
    }
    try:
        if args.command == "run":
            _check_data_early(args)
        if args.command in REGISTRY_COMMANDS:
            load_components()
        return commands[args.command](args)
    except ClBenchError as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, MissingDataError) and args.command == "run":
            print(data_hint(err, argv), file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"error: {err.reason}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
