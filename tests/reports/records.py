"""Hand-made run records (schema version 1, docs/run-record.md) for reporter tests.

``make_record`` builds a complete, valid record from an accuracy matrix, deriving the metrics
with ``cl_bench.metrics.derive`` exactly as the loop does, so hand-computed expectations in the
tests only depend on the matrices chosen here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cl_bench import metrics

ENVIRONMENT: dict[str, Any] = {
    "git_sha": "0123456789abcdef0123456789abcdef01234567",
    "git_dirty": False,
    "python": "3.11.7",
    "platform": "Linux-test",
    "hostname": "testhost",
    "device": "cpu",
    "device_name": "x86_64",
    "precision": "fp32",
    "versions": {"cl-bench": "0.1.0", "torch": "2.4.0", "numpy": "2.0.0"},
}


def make_record(
    run_id: str,
    strategy: str = "lora",
    scenario: str = "synthetic",
    seed: int = 0,
    *,
    matrix: list[list[float]] | None = None,
    initial: list[float] | None = None,
    status: str = "ok",
    pretrained: bool = True,
    backbone: str = "tiny-clip",
    n_trainable: int = 1000,
    n_active: int | None = None,
    exp_strategy: list[dict[str, float]] | None = None,
    strategy_report: dict[str, Any] | None = None,
    variants: dict[str, Any] | None = None,
    config_extra: dict[str, Any] | None = None,
    protocol: str = "class",
    label_space: str = "seen",
    steps: int = 5,
    train_time_s: float = 2.0,
) -> dict[str, Any]:
    """A complete record; ``status`` "failed"/"running" records carry a failure or a partial stream.

    Experience i holds classes 2i and 2i+1 (``scenario.classes_per_experience`` and
    ``experiences[i].classes``); ``protocol`` and ``label_space`` are recorded in the config
    (``scenario_args.protocol``, ``label_space``) and the accuracy block as the loop does. A strategy
    that does not train (zero-shot) is ``steps=0, n_trainable=0, train_time_s=0.0``.
    """
    matrix = matrix if matrix is not None else [[0.8, 0.3], [0.6, 0.9]]
    T = len(matrix)
    classes = [[2 * i, 2 * i + 1] for i in range(T)]
    initial = initial if initial is not None else [0.25] * T
    seen = [sum(matrix[i][: i + 1]) / (i + 1) for i in range(T)]
    experiences = [
        {
            "index": i,
            "classes": classes[i],
            "n_train": 32,
            "steps": steps,
            "train_time_s": train_time_s,
            "eval_time_s": 0.5,
            "train_samples_per_s": 80.0,
            "eval_samples_per_s": 400.0 + 100 * i,
            "peak_memory_train_bytes": 2**30,
            "peak_memory_eval_bytes": 2**29,
            "memory_kind": "cpu_peak_rss",
            "n_trainable": n_trainable,
            "n_added": n_trainable,
            "n_active": n_active,
            "adapter_bytes": 4 * n_trainable,
            "loss_first": 1.5,
            "loss_last": 0.5,
            "loss_mean": 1.0,
            "strategy": (exp_strategy[i] if exp_strategy else {}),
        }
        for i in range(T)
    ]
    config = {
        "strategy": strategy,
        "scenario": scenario,
        "backbone": backbone,
        "seed": seed,
        "order_seed": 0,
        "lr": 0.001,
        "label_space": label_space,
        "out": "runs",
        "run_id": run_id,
        "strategy_args": {"r": 8},
        "scenario_args": {"n_experiences": T, "data_seed": 0, "protocol": protocol},
        "backbone_args": {},
        **(config_extra or {}),
    }
    record: dict[str, Any] = {
        "schema_version": 1,
        "run_id": run_id,
        "status": status,
        "created": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00",
        "failure": None,
        "config": config,
        "strategy": {"name": strategy, "class": strategy.upper(), "paper": "A paper 2024"},
        "scenario": {
            "name": scenario,
            "protocol": protocol,
            "n_experiences": T,
            "n_classes": 2 * T,
            "classes_per_experience": classes,
        },
        "backbone": {
            "name": backbone,
            "kind": "clip",
            "source": f"open_clip:{backbone}",
            "pretrained": pretrained,
            "weights": "/weights/model.bin" if pretrained else None,
            "n_parameters": 100_000,
        },
        "environment": copy.deepcopy(ENVIRONMENT),
        "accuracy": {
            "matrix": matrix,
            "initial": initial,
            "seen": seen,
            "n_test": [16] * T,
            "label_space": label_space,
            "protocol": protocol,
            "variants": variants or {},
        },
        "metrics": metrics.derive(matrix, initial, seen),
        "experiences": experiences,
        "parameters": {
            "backbone": 100_000,
            "trainable": n_trainable,
            "added": n_trainable,
            "active": n_active,
            "adapter_bytes": 4 * n_trainable,
            "trainable_fraction": n_trainable / 100_000,
        },
        "timing": {
            "setup_s": 1.0,
            "initial_eval_s": 0.5,
            "train_s": train_time_s * T,
            "eval_s": 0.5 * T,
            "total_s": 1.5 + (train_time_s + 0.5) * T,
            "peak_memory_train_bytes": 2**30,
            "peak_memory_eval_bytes": 2**29,
        },
        "strategy_report": strategy_report or {},
    }
    if status == "failed":
        record["failure"] = {"type": "DivergenceError", "reason": "loss became nan at step 3"}
        record["metrics"] = {}
    elif status == "running":
        record["finished"] = None
        record["experiences"] = experiences[:1]
    return record


def write_record(root: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``root/<run_id>/result.json`` and return that path."""
    path = root / record["run_id"] / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path


def last_row(acc: float, T: int = 2) -> list[list[float]]:
    """A T x T matrix whose final row averages to ``acc`` (so ``acc_final == acc``)."""
    rows = [[0.5] * T for _ in range(T - 1)]
    return [*rows, [acc] * T]


def standard_set(root: Path) -> dict[str, Path]:
    """Runs of two scenarios, three strategies, a failed and a running run, written under ``root``.

    lora on synthetic: seeds 0, 1 with acc_final 0.5 and 0.7 (mean 0.600, sample std 0.141);
    finetune on synthetic: seed 0 with acc_final 0.4; lora on split-digits: seed 0, acc_final 0.9;
    a failed lora seed 2 (acc would be 0.0) and a running finetune seed 1 must stay out of the means.
    Records are written in an order unlike the report order on purpose.
    """
    records = [
        make_record("z-lora-s1", "lora", "synthetic", 1, matrix=[[0.9, 0.2], [0.6, 0.8]]),
        make_record("b-finetune-s0", "finetune", "synthetic", 0, matrix=last_row(0.4), n_trainable=100_000),
        make_record("a-lora-digits", "lora", "split-digits", 0, matrix=last_row(0.9)),
        make_record("y-lora-s0", "lora", "synthetic", 0, matrix=[[0.7, 0.1], [0.5, 0.5]]),
        make_record("c-lora-s2-failed", "lora", "synthetic", 2, matrix=last_row(0.0), status="failed"),
        make_record("d-finetune-s1-running", "finetune", "synthetic", 1, status="running"),
    ]
    return {r["run_id"]: write_record(root, r) for r in records}


def strategy_figures_record(run_id: str = "sora-fig", pretrained: bool = False) -> dict[str, Any]:
    """A record exercising every generic strategy-figure convention of docs/run-record.md."""
    return make_record(
        run_id,
        "sora",
        "synthetic",
        0,
        matrix=[[0.8, 0.2, 0.1], [0.6, 0.85, 0.2], [0.5, 0.7, 0.9]],
        pretrained=pretrained,
        n_active=600,
        exp_strategy=[
            {"live_gates": 40, "total_gates": 48},
            {"live_gates": 31, "total_gates": 48},
            {"live_gates": 27, "total_gates": 48},
        ],
        strategy_report={
            "scalars": {"achieved_sparsity": 0.4375},
            "curves": {
                "accuracy_vs_rank": {
                    "x": [1, 2, 4, 8],
                    "y": {"train": [0.4, 0.5, 0.6, 0.61], "eval": [0.41, 0.52, 0.6, 0.6]},
                    "x_label": "rank",
                    "y_label": "acc_final",
                },
                "sampled_ranks": {
                    "x": [1, 2, 3, 4],
                    "y": [12, 9, 11, 8],
                    "kind": "bar",
                    "x_label": "rank",
                    "y_label": "steps",
                },
            },
            "per_layer": {"live_gates_per_layer": {"vision.0.q": 5, "vision.0.k": 8, "vision.1.q": 3}},
            "events": {
                "sampled_blocks": [[0, "vision", [3, 7]], [20, "vision", [1, 4]]],
                "prune_rounds": {"fields": ["step", "sparsity"], "entries": [[10, 0.1], [20, 0.2], [30]]},
            },
        },
        variants={
            # the unmodified final model, evaluated in the variants' pass (the speed baseline)
            "main": {
                "row": [0.5, 0.7, 0.9],
                "acc_final": 0.7,
                "eval_samples_per_s": 800.0,
                "peak_memory_eval_bytes": 2**29,
            },
            "rank=4": {"row": [0.5, 0.6, 0.8], "acc_final": 0.6333, "eval_samples_per_s": 900.0},
            "rank=1": {"row": [0.3, 0.4, 0.5], "acc_final": 0.4, "eval_samples_per_s": 1100.0},
            "rank=2": {"row": [0.4, 0.5, 0.7], "acc_final": 0.5333, "eval_samples_per_s": 1000.0},
            "sliced": {
                "row": [0.5, 0.7, 0.9],
                "acc_final": 0.7,
                "eval_samples_per_s": 1200.0,
                "peak_memory_eval_bytes": 2**28,
            },
        },
    )


def marks_set(root: Path) -> dict[str, Path]:
    """Runs built to test the best marks (issue 15), two experiences of 2 classes each.

    Class-incremental, label space seen (chance (1/2 + 1/4) / 2 = 0.375, learning threshold at the
    default margin 0.2: 0.375 + 0.2 x 0.625 = 0.5):

    - lora, seeds 0 and 1: plasticity 0.9 and 0.85 (mean 0.875), forgetting 0.1 and 0.1;
    - sora: plasticity 0.75, forgetting 0.2;
    - dylora: plasticity 0.375, at chance, with the lowest forgetting of all (0.0);
    - zero-shot (never trains: 0 steps, 0 trainable parameters): the best plasticity (0.925),
      acc_final (0.925) and forgetting (0.0) of the group.

    Task-incremental (chance 1/2, threshold 0.5 + 0.2 x 0.5 = 0.6):

    - lora: plasticity 0.96, forgetting 0.05; finetune: plasticity 0.925, forgetting 0.2;
    - dylora: plasticity 0.55, above the class-incremental threshold but below this one, forgetting 0.0.
    """
    records = [
        make_record("c-lora-s0", "lora", seed=0, matrix=[[0.9, 0.2], [0.8, 0.9]], train_time_s=3.0),
        make_record("c-lora-s1", "lora", seed=1, matrix=[[0.8, 0.2], [0.7, 0.9]], train_time_s=4.0),
        make_record("c-sora", "sora", matrix=[[0.8, 0.2], [0.6, 0.7]], n_trainable=500),
        make_record("c-dylora", "dylora", matrix=[[0.4, 0.1], [0.4, 0.35]], n_trainable=2000),
        make_record(
            "c-zero-shot",
            "zero-shot",
            matrix=[[0.95, 0.9], [0.95, 0.9]],
            steps=0,
            n_trainable=0,
            train_time_s=0.0,
        ),
        make_record("t-lora", "lora", matrix=[[0.95, 0.5], [0.9, 0.97]], protocol="task"),
        make_record(
            "t-finetune", "finetune", matrix=[[0.9, 0.5], [0.7, 0.95]], protocol="task", n_trainable=100_000
        ),
        make_record(
            "t-dylora", "dylora", matrix=[[0.55, 0.5], [0.55, 0.55]], protocol="task", n_trainable=2000
        ),
    ]
    return {r["run_id"]: write_record(root, r) for r in records}


MANY_STRATEGIES = ("dylora", "finetune", "lora", "mora", "sora")
MANY_INITS = ("orthogonal-scaled-kaiming-uniform", "gaussian-with-fan-in-scaling-v2")


def many_runs_set(root: Path, seeds: int = 2) -> dict[str, Path]:
    """A large comparison for layout tests (issue 22): 40 runs + 4 of a second scenario.

    On ``synthetic``, 5 strategies x 2 ranks x 2 initialisations x ``seeds`` seeds, four experiences;
    the configurations differ in ``strategy_args.r`` and ``strategy_args.initialisation``, so every
    group label is longer than 60 characters (``lora [strategy_args.initialisation=..., strategy_args.r=4]``).
    ``split-digits`` holds 4 lora runs of one configuration (short labels). Accuracies vary with the
    run's position so that no two curves coincide.
    """
    records = []
    for s, strategy in enumerate(MANY_STRATEGIES):
        for r, rank in enumerate((4, 16)):
            for i, init in enumerate(MANY_INITS):
                for seed in range(seeds):
                    shift = 0.02 * (4 * s + 2 * r + i) + 0.01 * seed
                    records.append(
                        make_record(
                            f"many-{strategy}-r{rank}-i{i}-s{seed}",
                            strategy,
                            "synthetic",
                            seed,
                            matrix=_staircase(4, 0.55 + shift, 0.02 + 0.01 * s),
                            n_trainable=250 * rank * (s + 1),
                            train_time_s=1.0 + 0.5 * s + 0.1 * i,
                            config_extra={"strategy_args": {"r": rank, "initialisation": init}},
                        )
                    )
    for seed in range(4):
        records.append(
            make_record(f"many-digits-s{seed}", "lora", "split-digits", seed, matrix=last_row(0.8))
        )
    return {r["run_id"]: write_record(root, r) for r in records}


def _staircase(T: int, learned: float, decay: float) -> list[list[float]]:
    """A T x T matrix: ``learned`` on the experience just trained, ``decay`` less per later one."""
    return [[max(0.0, learned - decay * (i - j)) if j <= i else 0.1 for j in range(T)] for i in range(T)]


def federated_record(
    run_id: str,
    strategy: str = "lora",
    seed: int = 0,
    *,
    upload: int = 786_432,
    download: int = 1_048_576,
    seen: list[float] | None = None,
    peak_bytes: list[int] | None = None,
    matrix: list[list[float]] | None = None,
    clients: int = 4,
    rounds: int = 2,
    participation: float = 0.5,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    backend: str = "sequential",
    n_trainable: int = 1000,
) -> dict[str, Any]:
    """A federated run as the loop records it (docs/federation.md): ``matrix`` (default 2 x 2) over
    ``clients`` clients, ``rounds`` rounds per experience, ``max(1, round(participation x clients))``
    clients per round (clients 0, 1, ... in order), each uploading ``upload`` and downloading
    ``download`` bytes per round, training 0.25 s per round, with peak memory ``peak_bytes[i]`` in
    the i-th (experience, round) (default 2**28 + i MiB); ``seen`` is the seen-class accuracy
    after each (experience, round). The totals are derived from the per-round lists as the loop
    derives them, so with the defaults (2 experiences, 2 rounds, 2 clients per round):
    upload 6,291,456 B (6.0 MiB), download 8,388,608 B (8.0 MiB), communication 14,680,064 B
    (14.0 MiB), 3,670,016 B per round (3.5 MiB)."""
    matrix = matrix if matrix is not None else [[0.8, 0.3], [0.6, 0.9]]
    T = len(matrix)
    n_rounds = T * rounds
    seen = seen if seen is not None else [0.1 * (i + 1) for i in range(n_rounds)]
    peak_bytes = peak_bytes if peak_bytes is not None else [2**28 + i * 2**20 for i in range(n_rounds)]
    per_round = max(1, round(participation * clients))
    federation_args: dict[str, Any] = {
        "clients": clients,
        "rounds": rounds,
        "local_steps": 5,
        "local_epochs": 1,
        "participation": participation,
        "participation_seed": 0,
        "partition": partition,
        "alpha": alpha,
        "partition_seed": 0,
        "aggregation": "fedavg",
        "backend": backend,
        "client_cpus": 1.0,
        "client_gpus": 0.0,
    }
    record = make_record(
        run_id,
        strategy,
        "synthetic",
        seed,
        matrix=matrix,
        n_trainable=n_trainable,
        config_extra={"federation_args": federation_args},
    )
    entries: list[dict[str, Any]] = [
        {
            "experience": i // rounds,
            "round": i % rounds,
            "clients": list(range(per_round)),
            "seen_accuracy": seen[i],
            "upload_bytes": [upload] * per_round,
            "download_bytes": [download] * per_round,
            "client_train_s": [0.25] * per_round,
            "client_peak_bytes": [peak_bytes[i]] * per_round,
            "client_samples": [8] * per_round,
            "loss_mean": [1.0] * per_round,
        }
        for i in range(n_rounds)
    ]
    uploaded = sum(sum(e["upload_bytes"]) for e in entries)
    downloaded = sum(sum(e["download_bytes"]) for e in entries)
    record["federation"] = {
        "config": federation_args,
        "partition": [[32 // clients] * clients for _ in range(T)],
        "rounds": entries,
        "upload_bytes_total": uploaded,
        "download_bytes_total": downloaded,
        "communication_bytes": uploaded + downloaded,
        "bytes_per_round": (uploaded + downloaded) / n_rounds,
        "backend": backend,
        "wall_s": 0.25 * per_round * n_rounds,
    }
    return record
