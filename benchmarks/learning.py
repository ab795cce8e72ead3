"""Learning table: plasticity, forgetting and acc_final of several strategies on one stream.

``python -m benchmarks.learning --scenario split-digits`` runs every training strategy of the
registry (or ``--strategies``) through the same scenario with the same run settings, one
``cl-bench run`` each (the loop's own :func:`cl_bench.loop.run`), and prints one row per run:
plasticity (mean accuracy on each experience right after learning it), chance of that mean under
the run's label space, forgetting, acc_final, trainable parameters, wall time. A strategy may be
given as ``name`` or ``label=name:key=value,key=value`` to run a variant (strategy keys), e.g.
``dylora-full=dylora:mode=full``. Run keys are set with ``--set`` as for ``cl-bench run``
(``--set steps_per_experience=60 --set scenario.root=DIR``). Records go to ``--out`` (a temporary
directory by default) and the table is printed last, also as JSON with ``--json``.

It answers the question of issue 15 (does every method learn?) with numbers a reader can check
against the records, not a pass/fail: the unit test ``tests/strategies/test_learning.py`` asserts
the margins on a smaller stream.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from cl_bench import config, loop
from cl_bench.registry import STRATEGIES


def chance_of_plasticity(record: Any) -> float:
    """Mean over experiences j of 1 / (classes scored in cell (j, j)), the plasticity of guessing."""
    per_exp = record.scenario["classes_per_experience"]
    space, protocol = record.accuracy["label_space"], record.accuracy["protocol"]
    n_all = sum(len(c) for c in per_exp)
    scored = [
        len(c) if protocol == "task" else (n_all if space == "all" else sum(len(e) for e in per_exp[: j + 1]))
        for j, c in enumerate(per_exp)
    ]
    return sum(1 / k for k in scored) / len(scored)


def parse_strategy(text: str) -> tuple[str, str, dict[str, Any]]:
    """``label=name:key=value,...`` (label and keys optional) -> (label, name, strategy keys)."""
    head, _, keys = text.partition(":")
    label, _, name = head.rpartition("=")
    args = {}
    for item in filter(None, keys.split(",")):
        key, _, value = item.partition("=")
        args[key] = config.parse_value(value)
    return label or text.replace(":", "-").replace(",", "-").replace("=", ""), name, args


def main(argv: list[str] | None = None) -> int:
    from cl_bench.cli import load_components

    load_components()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="split-digits")
    parser.add_argument("--backbone", default="")
    parser.add_argument("--strategies", nargs="*", default=None, help="names or label=name:key=value,...")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    specs = args.strategies or [n for n in STRATEGIES.names() if STRATEGIES.get(n).trains]
    out = args.out or tempfile.mkdtemp(prefix="cl-bench-learning-")
    rows = []
    for spec in specs:
        label, name, strategy_args = parse_strategy(spec)
        layers: list[dict[str, Any]] = [
            {
                "strategy": {"name": name, **strategy_args},
                "scenario": args.scenario,
                "seed": args.seed,
                "out": out,
                "run_id": f"{label}-{args.scenario}-s{args.seed}",
                "overwrite": True,
                **({"backbone": args.backbone} if args.backbone else {}),
            },
            config.parse_set(args.sets),
        ]
        record = loop.run(config.resolve(layers), progress=False)
        m = record.metrics
        rows.append(
            {
                "run": label,
                "plasticity": m["plasticity"],
                "chance": chance_of_plasticity(record),
                "forgetting": m.get("forgetting"),
                "acc_final": m["acc_final"],
                "trainable": record.parameters["trainable"],
                "total_s": record.timing["total_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.scenario} ({record.backbone['name']}, {record.environment.get('device_name', '')})")
    print("| run | plasticity | chance | forgetting | acc_final | trainable | time s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        forgetting = "n/a" if r["forgetting"] is None else f"{r['forgetting']:.3f}"
        print(
            f"| {r['run']} | {r['plasticity']:.3f} | {r['chance']:.3f} | {forgetting} | "
            f"{r['acc_final']:.3f} | {r['trainable']:,} | {r['total_s']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
