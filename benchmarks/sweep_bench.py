"""Sweep benchmark: what Ray's packing buys and what a sweep costs per cell (issue 18's figures).

``python -m benchmarks.sweep_bench`` (GPU) runs one sweep of small cells (default 8: lora, dylora,
sora, mora x 2 seeds on split-CIFAR-10-shaped data written in torchvision's format, 32 px images
resized on the GPU, open_clip ViT-B-16 with random weights, batch 32, 1 epoch per experience) once
per ``gpus_per_cell`` value (default 1 and 0.25: one cell per GPU, then four cells sharing one) and
reports, per packing:

- cells per hour (cells / sweep wall time, Ray already started) and the ratio to the first packing;
- peak GPU memory: the device's used memory sampled by ``nvidia-smi`` every 0.5 s during the sweep
  (every process on the GPU, CUDA contexts included) and the largest cell's own peak allocation;
- the per-cell overhead as a share of the cell's time in its worker: Ray's worker start (process
  start to the task's first line), importing cl-bench's components, and the run's setup (data
  and model build, ``timing.setup_s`` of the record);

then Ray's start (``ray.init`` on this machine) and the overhead of a 1-cell ``cl-bench sweep``
against ``cl-bench run`` of the same cell, both timed as fresh processes (the sweep's wall time
includes starting Ray). The table is printed last and written as JSON (``--json``).

``--quick`` runs the same code on the CPU with tiny cells (``tiny-clip``, the synthetic scenario,
a few steps; ``gpus_per_cell = 0``): it exercises the benchmark, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench import sweep

GPU_STRATEGIES = ("lora", "dylora", "sora", "mora")
QUICK_SCENARIO = {"n_classes": 4, "n_experiences": 2, "train_per_class": 8, "test_per_class": 4}


@dataclass
class PackingRow:
    """The figures of one sweep at one ``gpus_per_cell``."""

    gpus_per_cell: float
    n_cells: int
    n_ok: int
    wall_s: float
    cells_per_hour: float
    peak_gpu_used_mib: float | None
    max_cell_peak_allocated_mib: float | None
    cell_s: float
    worker_start_s: float
    import_s: float
    setup_s: float
    overhead_fraction: float
    errors: list[str] = field(default_factory=list)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: Mapping[str, Any]) -> str:
    """A TOML text of nested tables of scalars and lists (enough for the sweep and run files here)."""
    lines: list[str] = []

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in scalars.items())
        for key, value in body.items():
            if isinstance(value, Mapping):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines) + "\n"


def cell_settings(quick: bool, data_root: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Run keys, scenario name and scenario arguments of every cell."""
    if quick:
        run = {
            "backbone": "tiny-clip",
            "device": "cpu",
            "steps_per_experience": 3,
            "batch_size": 8,
            "eval_batch_size": 64,
        }
        return run, "synthetic", dict(QUICK_SCENARIO)
    run = {
        "backbone": "clip-vit-b-16",
        "device": "cuda",
        "epochs": 1,
        "batch_size": 32,
        "eval_batch_size": 512,
    }
    return run, "split-cifar10", {"root": str(data_root), "verify_checksums": False}


def sweep_file(
    path: Path,
    cells: Sequence[tuple[str, int]],
    gpus: float,
    run: Mapping[str, Any],
    scenario: str,
    scenario_args: Mapping[str, Any],
) -> Path:
    """Write a sweep file of exactly ``cells`` (strategy, seed), as explicit ``[[cells]]``."""
    data = {
        "sweep": {"gpus_per_cell": gpus, "cpus_per_cell": 1},
        "run": dict(run),
        "scenarios": {scenario: dict(scenario_args)},
    }
    text = to_toml(data) + "".join(
        "\n[[cells]]\n" + to_toml({"strategy": strategy, "scenario": scenario, "seed": seed})
        for strategy, seed in cells
    )
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def gpu_memory_sampler(period_s: float = 0.5) -> Iterator[list[float]]:
    """Sample the GPUs' used memory (MiB, summed over GPUs) with nvidia-smi; yields the samples."""
    samples: list[float] = []
    stop = threading.Event()
    smi = shutil.which("nvidia-smi")

    def poll() -> None:
        while smi and not stop.is_set():
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                out = subprocess.run(
                    [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
                samples.append(sum(float(line) for line in out.split()))
            stop.wait(period_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=10)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def measure_packing(sweep_path: Path, out: Path, gpus: float) -> PackingRow:
    """Run one sweep (Ray already initialised) and derive its row."""
    plan = sweep.load(sweep_path, out=out)
    with gpu_memory_sampler() as samples:
        result = sweep.run(plan, progress=True)
    ok = [s for s in result.cells if s.status == "ok"]
    cell_s, worker_s, import_s, setup_s, peaks = [], [], [], [], []
    for state in ok:
        last = state.attempts[-1] if state.attempts else {}
        if state.finished is not None and "process_started" in last:
            cell_s.append(state.finished - float(last["process_started"]))
            worker_s.append(float(last["started"]) - float(last["process_started"]))
        import_s.append(state.import_s or 0.0)
        setup_s.append(state.setup_s or 0.0)
        with contextlib.suppress(Exception):
            record = json.loads((out / state.cell.run_id / "result.json").read_text(encoding="utf-8"))
            if record["experiences"][-1]["memory_kind"] == "cuda_max_allocated":
                peaks.append(record["timing"]["peak_memory_train_bytes"] / 2**20)
    overhead = [
        (w + i + s) / c for w, i, s, c in zip(worker_s, import_s, setup_s, cell_s, strict=True) if c > 0
    ]
    return PackingRow(
        gpus_per_cell=gpus,
        n_cells=len(result.cells),
        n_ok=len(ok),
        wall_s=result.wall_s,
        cells_per_hour=len(ok) / result.wall_s * 3600 if result.wall_s > 0 else 0.0,
        peak_gpu_used_mib=max(samples) if samples else None,
        max_cell_peak_allocated_mib=max(peaks) if peaks else None,
        cell_s=_mean(cell_s),
        worker_start_s=_mean(worker_s),
        import_s=_mean(import_s),
        setup_s=_mean(setup_s),
        overhead_fraction=_mean(overhead),
        errors=[
            f"{s.cell.run_id}: {(s.failure or {}).get('reason')}" for s in result.cells if s.status != "ok"
        ],
    )


def _timed(cmd: Sequence[str]) -> tuple[float, int, str]:
    tic = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return time.perf_counter() - tic, proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def run_vs_sweep(
    workdir: Path, strategy: str, run: Mapping[str, Any], scenario: str, scenario_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Wall time of ``cl-bench run`` and of a 1-cell ``cl-bench sweep`` of the same cell, fresh processes."""
    run_file = workdir / "one-run.toml"
    run_file.write_text(
        to_toml({**run, "strategy": {"name": strategy}, "scenario": {"name": scenario, **scenario_args}}),
        encoding="utf-8",
    )
    gpus = 1.0 if run.get("device") == "cuda" else 0.0
    one = sweep_file(workdir / "one-cell.toml", [(strategy, 0)], gpus, run, scenario, scenario_args)
    cli = [sys.executable, "-m", "cl_bench.cli"]
    run_s, run_rc, run_log = _timed(
        [
            *cli,
            "run",
            "--config",
            str(run_file),
            "--out",
            str(workdir / "one-run"),
            "--run-id",
            "x",
            "--no-progress",
        ]
    )
    sweep_s, sweep_rc, sweep_log = _timed(
        [*cli, "sweep", str(one), "--out", str(workdir / "one-sweep"), "--no-progress"]
    )
    out: dict[str, Any] = {
        "run_s": run_s,
        "sweep_s": sweep_s,
        "overhead": sweep_s / run_s - 1 if run_s > 0 else None,
    }
    if run_rc or sweep_rc:
        out["error"] = f"run exit {run_rc}, sweep exit {sweep_rc}: {run_log if run_rc else sweep_log}"
    return out


def table(rows: Sequence[PackingRow], ray_start_s: float | None, versus: Mapping[str, Any] | None) -> str:
    """The printed table: one line per packing, then Ray's start and the 1-cell overhead."""
    header = (
        "gpus/cell",
        "cells ok",
        "wall s",
        "cells/h",
        "vs first",
        "peak GPU MiB",
        "max cell MiB",
        "cell s",
        "worker s",
        "import s",
        "setup s",
        "overhead",
    )
    base = rows[0].cells_per_hour if rows and rows[0].cells_per_hour else None

    def mib(v: float | None) -> str:
        return f"{v:,.0f}" if v is not None else "-"

    body = [
        (
            f"{r.gpus_per_cell:g}",
            f"{r.n_ok}/{r.n_cells}",
            f"{r.wall_s:.1f}",
            f"{r.cells_per_hour:,.0f}",
            f"{r.cells_per_hour / base:.2f}x" if base else "-",
            mib(r.peak_gpu_used_mib),
            mib(r.max_cell_peak_allocated_mib),
            f"{r.cell_s:.1f}",
            f"{r.worker_start_s:.1f}",
            f"{r.import_s:.1f}",
            f"{r.setup_s:.1f}",
            f"{100 * r.overhead_fraction:.0f}%",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    lines.append("overhead = (worker start + import + setup) / cell time in its worker, mean over ok cells")
    lines.append("ray start: " + (f"{ray_start_s:.1f} s" if ray_start_s else "reused an initialised Ray"))
    if versus:
        if versus.get("error"):
            lines.append(f"1-cell sweep vs cl-bench run: error: {versus['error']}")
        else:
            lines.append(
                f"1-cell sweep vs cl-bench run: {versus['sweep_s']:.1f} s vs {versus['run_s']:.1f} s "
                f"(+{100 * versus['overhead']:.0f}%, Ray start included)"
            )
    for r in rows:
        lines.extend(f"error (gpus/cell {r.gpus_per_cell:g}): {e}" for e in r.errors)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny cells on the CPU: exercises the code only")
    parser.add_argument("--cells", type=int, help="cells per sweep (default 8; --quick: 2)")
    parser.add_argument(
        "--gpus-per-cell", type=float, nargs="+", help="packings to compare (default 1 0.25; --quick: 0)"
    )
    parser.add_argument("--n-train", type=int, default=10_000, help="CIFAR-10-shaped training images (GPU)")
    parser.add_argument("--n-test", type=int, default=2_000, help="CIFAR-10-shaped test images (GPU)")
    parser.add_argument("--workdir", type=Path, help="where data and records go (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=Path("sweep_bench.json"), help="JSON of the table")
    parser.add_argument("--no-run-vs-sweep", action="store_true", help="skip the 1-cell sweep vs run timing")
    args = parser.parse_args(argv)

    import ray

    from cl_bench.cli import load_components

    load_components()
    n_cells = args.cells or (2 if args.quick else 8)
    packings = args.gpus_per_cell or ([0.0] if args.quick else [1.0, 0.25])
    strategies = ["lora", "zero-shot"] if args.quick else list(GPU_STRATEGIES)
    cells = [(strategies[k % len(strategies)], k // len(strategies)) for k in range(n_cells)]
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-bench-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.quick:
            from scenarios.cifar_files import write_cifar

            write_cifar(workdir / "cifar", "cifar10", n_train=args.n_train, n_test=args.n_test)
        run, scenario, scenario_args = cell_settings(args.quick, workdir / "cifar")
        owns, ray_start_s = sweep.init_ray(None)
        rows = []
        try:
            for gpus in packings:
                path = sweep_file(workdir / f"sweep-{gpus:g}.toml", cells, gpus, run, scenario, scenario_args)
                print(f"\n== gpus_per_cell {gpus:g}: {len(cells)} cells", flush=True)
                rows.append(measure_packing(path, workdir / f"runs-{gpus:g}", gpus))
        finally:
            if owns:
                ray.shutdown()
        versus = None
        if not args.no_run_vs_sweep:
            versus = run_vs_sweep(workdir, strategies[0], run, scenario, scenario_args)
    payload = {"ray_start_s": ray_start_s, "packings": [r.__dict__ for r in rows], "run_vs_sweep": versus}
    args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print()
    print(table(rows, ray_start_s if owns else None, versus))
    failed = any(r.errors for r in rows) or bool(versus and versus.get("error"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
