"""Checkpoint cost per strategy: size, write time, and the step-time overhead it implies.

For each named strategy, one real ``loop.run`` on the synthetic scenario with ``clip-vit-b-16``
(random weights; the sizes are those of the real model) writes a checkpoint every
``--every`` steps (``keep_checkpoints``); the record gives the checkpoints' size, their mean write
time and the mean step time. The overhead columns are the write time over the time between two
checkpoints: at the default interval (``checkpoint_minutes``, 10) and every ``--every`` steps.

    python -m benchmarks.checkpoint_cost --device cuda
    python -m benchmarks.checkpoint_cost --device cpu --strategies lora --steps 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cl_bench import config, loop
from cl_bench.cli import load_components
from cl_bench.config import RunConfig

DEFAULT_STRATEGIES = (
    "lora",
    "allora",
    "dylora",
    "sora",
    "loraprune",
    "mora",
    "smora",
    "flylora",
    "lisa",
    "finetune",
)
MiB = 2**20


def measure(strategy: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One run of ``strategy``; its checkpoint figures."""
    cfg: RunConfig = config.resolve(
        [
            {
                "strategy": {"name": strategy},
                "scenario": {"name": "synthetic", "n_classes": 20, "n_experiences": 2, "test_per_class": 2},
                "backbone": {"name": "clip-vit-b-16"},
                "steps_per_experience": args.steps,
                "batch_size": args.batch_size,
                "device": args.device,
                "checkpoint_every": args.every,
                "keep_checkpoints": True,
                "out": str(out),
                "run_id": strategy,
            }
        ]
    )
    record = loop.run(cfg, progress=False)
    timing = record.timing
    steps = sum(e.steps for e in record.experiences)
    step_s = sum(e.train_time_s for e in record.experiences) / steps
    write_s = timing["checkpoint_write_s"] / max(1, timing["checkpoints_written"])
    return {
        "size_mib": timing["checkpoint_bytes"] / MiB,
        "write_s": write_s,
        "step_ms": 1000 * step_s,
        "overhead_default": write_s / (60 * cfg.checkpoint_minutes),
        "overhead_every": write_s / (args.every * step_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--steps", type=int, default=40, help="steps per experience (2 experiences)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--every", type=int, default=20, help="checkpoint every this many steps")
    args = parser.parse_args(argv)
    load_components()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            rows[name] = measure(name, args, Path(tmp))
    print(f"\ncheckpoints on {args.device}, clip-vit-b-16, batch {args.batch_size}")
    every = f"every {args.every}"
    head = f"{'strategy':<12} {'size MiB':>9} {'write s':>8} {'step ms':>8} {'at 10 min':>10} {every:>10}"
    print(head)
    for name, r in rows.items():
        print(
            f"{name:<12} {r['size_mib']:>9.1f} {r['write_s']:>8.3f} {r['step_ms']:>8.1f} "
            f"{r['overhead_default']:>10.4%} {r['overhead_every']:>10.2%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
