"""Federated lora against federated full fine-tuning (FLoRA's comparison, arXiv 2404.15182 §4).

``python -m benchmarks.federated --device cuda`` runs, in one process and on the same
split-CIFAR-100-shaped experiences (the ``synthetic`` scenario: 2 experiences of 10 classes, 500
training and 20 test images per class, 32 px), K clients and R rounds per experience:

1. lora, sequential backend;
2. finetune (every weight trains and travels: "federated full fine-tuning"), sequential backend;
3. lora again on Flower's simulation engine (``--runs`` picks the runs);

and prints each run's client training time, peak client memory and bytes per round, then the
ratios finetune / lora (FLoRA reports up to 34.72x faster training and 2.47x less memory for
LoRA) and Flower / sequential wall time. Client training time is compute only: nothing here
sends bytes over a network, which FLoRA's wall-clock figures include.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from cl_bench import config, loop
from cl_bench.cli import load_components
from cl_bench.results import RunResult


def run_one(out: Path, strategy: str, backend: str, args: argparse.Namespace) -> RunResult:
    """One federated run of ``strategy`` through the first ``--experiences`` of the stream."""
    layer: dict[str, Any] = {
        "strategy": {"name": strategy},
        "scenario": {
            "name": "synthetic",
            "n_classes": 10 * args.experiences,  # the synthetic scenario has at most 20
            "n_experiences": args.experiences,
            "train_per_class": 500,
            "test_per_class": 20,
            "image_size": 32,
        },
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "eval_batch_size": 512,
        "device": args.device,
        "out": str(out),
        "run_id": f"{strategy}-{backend}",
        "checkpoint_minutes": 0.0,
        "train_classes": "current",
        "federation": {
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "partition": "dirichlet",
            "alpha": 0.5,
            "backend": backend,
            "client_gpus": args.client_gpus if args.device == "cuda" else 0.0,
        },
    }
    return loop.run(config.resolve([layer]), progress=False)


def figures(record: RunResult) -> dict[str, float]:
    fed = record.federation
    assert fed is not None
    rounds = fed["rounds"]
    return {
        "client_train_s": sum(sum(r["client_train_s"]) for r in rounds),
        "wall_s": fed["wall_s"],
        "peak_gib": max(max(r["client_peak_bytes"]) for r in rounds) / 2**30,
        "mib_per_round": fed["bytes_per_round"] / 2**20,
        "upload_mib_per_client_round": rounds[0]["upload_bytes"][0] / 2**20,
        "acc": record.accuracy["seen"][-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--backbone", default="clip-vit-b-16")
    parser.add_argument("--experiences", type=int, default=2, help="of 10 classes each (at most 2)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--client-gpus", type=float, default=0.5, help="Flower: GPU share per client")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=["lora/sequential", "finetune/sequential", "lora/flower"],
        help="strategy/backend pairs to run, in order (default: all three)",
    )
    args = parser.parse_args(argv)
    load_components()
    runs = [tuple(r.split("/", 1)) for r in args.runs]
    table: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cl-bench-fed-") as tmp:
        for strategy, backend in runs:
            table[strategy, backend] = figures(run_one(Path(tmp), strategy, backend, args))
    print(
        f"\nfederated runs ({args.backbone}, {args.device}, K={args.clients}, R={args.rounds}, "
        f"{args.local_steps} local steps, batch {args.batch_size}, {args.experiences} experiences)"
    )
    head = ("run", "client train s", "wall s", "peak GiB", "MiB/round", "up MiB/client", "seen acc")
    print("".join(f"{h:>16}" if i else f"{h:>20}" for i, h in enumerate(head)))
    for (strategy, backend), f in table.items():
        print(
            f"{strategy + '/' + backend:>20}{f['client_train_s']:16.1f}{f['wall_s']:16.1f}"
            f"{f['peak_gib']:16.2f}{f['mib_per_round']:16.1f}{f['upload_mib_per_client_round']:16.2f}"
            f"{f['acc']:16.3f}"
        )
    lora, full, flower = (
        table.get(k) for k in (("lora", "sequential"), ("finetune", "sequential"), ("lora", "flower"))
    )
    if lora and full:
        print(
            f"\nfinetune / lora client training time: {full['client_train_s'] / lora['client_train_s']:.2f}x"
        )
        print(f"finetune / lora peak client memory:   {full['peak_gib'] / lora['peak_gib']:.2f}x")
        print(f"finetune / lora bytes per round:      {full['mib_per_round'] / lora['mib_per_round']:.1f}x")
    if lora and flower:
        print(f"flower / sequential wall time (lora): {flower['wall_s'] / lora['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
