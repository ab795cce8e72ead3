"""Profile the training step of strategies on the GPU: the CUDA kernels that take the time.

``python -m benchmarks.profile_step lora dylora`` builds each strategy on open_clip ViT-B-16
(random weights, batch 128, bf16) exactly as ``cl-bench bench`` does, runs a few warm steps, then
profiles 5 steps and prints the top kernels by CUDA time (``--rows``).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import PeftLoRA, Setting, _experience_classes, _info, _inputs, build
from cl_bench import loop


def profile_strategy(name: str, s: Setting, rows: int, experiences: int = 1) -> str:
    device = torch.device(s.device)
    strategy = build(name, s, cls=PeftLoRA if name == "peft-lora" else None)
    strategy.train()
    for index in range(experiences):
        info = _info(index, _experience_classes(index, s), s.n_classes, device, training=True)
        strategy.before_experience(info)
    strategy.head.invalidate()
    optimizer = strategy.make_optimizer(s.lr, 0.0)
    x, y = _inputs(s, s.batch, strategy.backbone.image_size, device)
    for step in range(5):
        loop.train_step(strategy, optimizer, None, x, y, info, step, device=device, precision=s.precision)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(5, 10):
            loop.train_step(strategy, optimizer, None, x, y, info, step, device=device, precision=s.precision)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="+")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--experiences", type=int, default=1, help="experience boundaries before profiling")
    args = parser.parse_args(argv)
    s = Setting()
    for name in args.strategies:
        print(f"\n===== {name}: 5 steps, batch {s.batch}, after {args.experiences} experience(s)")
        print(profile_strategy(name, s, args.rows, args.experiences))
    return 0


if __name__ == "__main__":
    from cl_bench.cli import load_components

    load_components()
    sys.exit(main())
