"""Profile strategies on the GPU: where the time of a training step (or an evaluation) goes.

``python -m benchmarks.profile_step lora dylora`` builds each strategy on open_clip ViT-B-16
(random weights, batch 128, bf16) exactly as ``cl-bench bench`` does, warms it up in the mode
``cl-bench run`` uses (CUDA graphs where the strategy allows them; ``--eager`` for every kernel
launched from Python), then profiles ``--steps`` steps and prints:

- the step's wall time (timed without the profiler), the GPU's kernel time per step, and the
  host time of each phase of :func:`cl_bench.loop.train_step` (``step.*`` labels): a step whose
  wall time is well above its kernel time waits for the host, and the phases say for what;
- the kernels that take the GPU time (``--rows``).

``--eval`` profiles the evaluation forward instead (batch 512). Two pseudo-strategies give
LoRAPrune's models at exactly 50% of heads and MLP channels: ``loraprune-dense`` (masks folded
into dense weights) and ``loraprune-sliced`` (physically sliced).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import (
    PeftLoRA,
    Setting,
    build,
    eval_forward,
    half_pruned_loraprune,
    prepare_training,
    step_function,
    warm_up,
)
from cl_bench.strategy import Strategy

PHASES = ("step.before_step", "step.forward_backward", "step.optimizer", "step.after_step")


def _device_time(event: Any) -> float:
    """Microseconds on the device (the attribute was renamed from ``cuda`` to ``device``)."""
    value = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return float(value or 0)


def _wall_ms(fn: Callable[[], None], n: int) -> float:
    """Median wall milliseconds of ``fn`` over 3 windows of ``n`` calls."""
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) * 1000 / n)
    return statistics.median(times)


def _is_kernel(event: Any) -> bool:
    """A kernel, memcpy or memset on the device (not the device-side span of a ``step.*`` label)."""
    return event.device_type == DeviceType.CUDA and not event.key.startswith(("step.", "Optimizer."))


def _idle(prof: Any, n: int, rows: int) -> list[str]:
    """Where the GPU waits: gaps between consecutive device activities, grouped by the activity
    before and after the gap (a gap before the first kernel of a graph means the host was late)."""
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA),
        key=lambda e: e.start_ns(),
    )
    events = [e for e in events if not e.name().startswith(("step.", "Optimizer."))]
    groups: dict[tuple[str, str], list[float]] = {}
    end, previous = None, ""
    for event in events:
        if end is not None and event.start_ns() > end:
            key = (previous[:50], event.name()[:50])
            groups.setdefault(key, []).append((event.start_ns() - end) / 1e6)
        if end is None or event.end_ns() > end:
            end, previous = event.end_ns(), event.name()
    total = sum(sum(g) for g in groups.values())
    lines = [f"  GPU idle between activities: {total / n:.2f} ms per step; largest (ms, gaps per step):"]
    for (before, after), gaps in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"    {sum(gaps) / n:7.3f}  {len(gaps) / n:6.1f}  after {before} -> before {after}")
    single = sorted(((gap, key) for key, gaps in groups.items() for gap in gaps), reverse=True)[:rows]
    lines.append("  longest single gaps (ms): the host was late where they recur once per step")
    for gap, (before, after) in single:
        lines.append(f"    {gap:7.3f}  after {before} -> before {after}")
    return lines


def kernel_table(prof: Any, n: int) -> dict[str, dict[str, float]]:
    """Every kernel of the profile: ``{name: {"ms": per call of the profiled function, "calls": ...}}``
    (``--dump``: two strategies' tables side by side show which kernels one adds)."""
    return {
        e.key: {"ms": _device_time(e) / 1000 / n, "calls": e.count / n}
        for e in prof.key_averages()
        if _is_kernel(e)
    }


def _summary(prof: Any, fn_name: str, n: int, wall: float, rows: int, phases: tuple[str, ...]) -> str:
    averages = prof.key_averages()
    kernel_us = sum(_device_time(e) for e in averages if _is_kernel(e))
    lines = [
        f"{fn_name}: wall {wall:.2f} ms, GPU kernels {kernel_us / 1000 / n:.2f} ms "
        f"({kernel_us / 1000 / n / wall:.0%} of the wall time busy)"
    ]
    by_key = {e.key: e for e in averages}
    for phase in phases:
        if phase in by_key:
            lines.append(f"  host {phase:<24} {by_key[phase].cpu_time_total / 1000 / n:7.2f} ms/step")
    kernels = sorted((e for e in averages if _is_kernel(e)), key=_device_time, reverse=True)
    lines.append(f"  top kernels (ms per {fn_name}, calls per {fn_name}):")
    for e in kernels[:rows]:
        lines.append(f"    {_device_time(e) / 1000 / n:7.3f}  {e.count / n:6.1f}  {e.key[:100]}")
    lines.extend(_idle(prof, n, min(rows, 6)))
    return "\n".join(lines)


def profile_training(
    name: str, s: Setting, rows: int, experiences: int, steps: int, eager: bool
) -> tuple[str, Any]:
    """The summary of ``steps`` profiled training steps, and the profile."""
    strategy = build(name, s, cls=PeftLoRA if name == "peft-lora" else None)
    info, optimizer, x, y = prepare_training(strategy, s, experiences)
    step, graphs = step_function(strategy, optimizer, x, y, info, s, graphs=not eager)
    warm_up(step, graphs, s, s.warmup)
    wall = _wall_ms(step, steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    mode = "eager" if graphs is None else "graphs"
    return _summary(prof, f"step ({mode})", steps, wall, rows, PHASES), prof


def _eval_model(name: str, s: Setting) -> Strategy:
    if name not in ("loraprune-dense", "loraprune-sliced"):
        return build(name, s, cls=PeftLoRA if name == "peft-lora" else None)
    strategy = half_pruned_loraprune(s)
    if name == "loraprune-sliced":
        strategy.slice()  # type: ignore[attr-defined]
    return strategy


def profile_eval(name: str, s: Setting, rows: int, steps: int) -> tuple[str, Any]:
    """The summary of ``steps`` profiled evaluation forwards, and the profile."""
    forward = eval_forward(_eval_model(name, s), s)
    for _ in range(s.warmup):
        forward()
    wall = _wall_ms(forward, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward()
        torch.cuda.synchronize()
    return _summary(prof, f"eval forward (batch {s.eval_batch})", steps, wall, rows, ()), prof


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="+")
    parser.add_argument("--rows", type=int, default=18, help="kernels listed")
    parser.add_argument("--steps", type=int, default=10, help="steps profiled (and timed)")
    parser.add_argument("--experiences", type=int, default=1, help="experience boundaries before profiling")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--eval", action="store_true", help="profile the evaluation forward instead")
    parser.add_argument("--dump", type=Path, help="directory for each strategy's kernel times (<name>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: profiling needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    s = Setting()
    for name in args.strategies:
        print(f"\n===== {name}: batch {s.eval_batch if args.eval else s.batch}, "
              f"after {args.experiences} experience(s)", flush=True)  # fmt: skip
        if args.eval:
            text, prof = profile_eval(name, s, args.rows, args.steps)
        else:
            text, prof = profile_training(name, s, args.rows, args.experiences, args.steps, args.eager)
        print(text, flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.json").write_text(json.dumps(kernel_table(prof, args.steps), indent=1))
    return 0


if __name__ == "__main__":
    from cl_bench.cli import load_components

    load_components()
    sys.exit(main())
