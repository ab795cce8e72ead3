"""The report's tables as pandas DataFrames: one row per run, per-group aggregates, per-run details.

Every table here is plain data (numbers, not formatted strings) so that it can be written to CSV
as is; ``reports.build`` formats them for the page. Runs are grouped by scenario, strategy and
backbone; a group's figures are the mean and the sample standard deviation (``ddof=1``, undefined
for a single run) over its runs, i.e. over seeds, with the number of runs that had a value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from cl_bench.results import RecordProblem, run_row

GROUP: list[str] = ["scenario", "strategy", "backbone"]
"""Runs that share these keys are seeds of one configuration and are averaged together."""

OVERVIEW_METRICS: tuple[str, ...] = (
    "acc_final",
    "acc_avg_incremental",
    "forgetting",
    "bwt",
    "fwt",
    "transfer",
    "avg",
    "last",
)
LOWER_IS_BETTER: frozenset[str] = frozenset({"forgetting", "forgetting_first_last"})
"""Metrics where the smallest value is best; for every other metric the largest is."""

PARAMETER_COLUMNS: tuple[str, ...] = (
    "n_trainable",
    "n_added",
    "n_active",
    "adapter_bytes",
    "trainable_fraction",
    "backbone_parameters",
)
RESOURCE_COLUMNS: tuple[str, ...] = (
    "peak_memory_train_bytes",
    "peak_memory_eval_bytes",
    "train_samples_per_s",
    "eval_samples_per_s",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
)

# Config keys that legitimately differ between the seeds of one group.
_SEED_LIKE = re.compile(r"(^|\.)(seed|order_seed|run_id|out|overwrite|report|[a-z_]*_seed)$")


def runs_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (any status), columns of :func:`cl_bench.results.run_row`, in record order."""
    columns = list(run_row({}).keys())
    return pd.DataFrame([run_row(r) for r in records], columns=columns)


def aggregate(runs: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count of each column per group of :data:`GROUP`.

    Returns one row per group with columns ``n_runs``, ``seeds`` and ``<col>_mean``, ``<col>_std``,
    ``<col>_n`` for each column (``_n`` counts the runs where the value is defined: forgetting of a
    one-experience run is undefined, not 0). Groups are sorted by scenario, strategy, backbone.
    """
    columns = list(columns)
    out_columns = [*GROUP, "n_runs", "seeds"] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
    if runs.empty:
        return pd.DataFrame(columns=out_columns)
    values = runs[[*GROUP, *columns]].copy()
    for col in columns:
        values[col] = pd.to_numeric(values[col], errors="coerce").astype("float64")
    grouped = values.groupby(GROUP, sort=True, dropna=False)
    stats = grouped[columns].agg(["mean", "std", "count"])
    stats.columns = [f"{c}_{'n' if s == 'count' else s}" for c, s in stats.columns]
    seeds = runs.groupby(GROUP, sort=True, dropna=False)["seed"].agg(
        lambda s: ",".join(str(v) for v in sorted(s.dropna().astype(int)))
    )
    stats.insert(0, "seeds", seeds)
    stats.insert(0, "n_runs", grouped.size())
    return stats.reset_index()[out_columns]


def best_in_scenario(overview: pd.DataFrame, metrics: Iterable[str]) -> set[tuple[int, str]]:
    """``(row position, metric)`` pairs holding the best mean of their scenario.

    Direction follows :data:`LOWER_IS_BETTER`. Means are compared at the displayed precision
    (3 decimals) so that ties are all marked; a scenario with a single group marks nothing.
    """
    marks: set[tuple[int, str]] = set()
    for _, rows in overview.reset_index(drop=True).groupby("scenario", sort=False, dropna=False):
        if len(rows) < 2:
            continue
        for metric in metrics:
            means = rows[f"{metric}_mean"].round(3).dropna()
            if means.empty:
                continue
            best = means.min() if metric in LOWER_IS_BETTER else means.max()
            marks.update((int(pos), metric) for pos in means.index[means == best])
    return marks


def config_differences(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[str]]:
    """Per group, the config keys (dotted) whose values differ between its runs, seeds excluded.

    Averaging runs that differ in, say, ``lr`` is rarely intended; the report names such keys next
    to the group instead of hiding the mix.
    """
    by_group: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        row = run_row(record)
        flat = pd.json_normalize(record.get("config") or {}, sep=".").iloc[0].to_dict()
        by_group.setdefault(tuple(row[k] for k in GROUP), []).append(flat)
    differences: dict[tuple[Any, ...], list[str]] = {}
    for key, configs in by_group.items():
        names = sorted({name for cfg in configs for name in cfg})
        differing = [
            name
            for name in names
            if not _SEED_LIKE.search(name) and len({repr(cfg.get(name)) for cfg in configs}) > 1
        ]
        if differing:
            differences[key] = differing
    return differences


def problems_frame(records: Iterable[dict[str, Any]], problems: Iterable[RecordProblem]) -> pd.DataFrame:
    """Failed or incomplete runs (with their reason) and unreadable files, one row each."""
    rows: list[dict[str, Any]] = []
    for record in records:
        row = run_row(record)
        rows.append(
            {
                "kind": "failed" if row["status"] == "failed" else "incomplete",
                **{k: row[k] for k in ("run_id", "status", "scenario", "strategy", "backbone", "seed")},
                "reason": failure_reason(record),
                "path": row["path"],
            }
        )
    rows.extend(
        {
            "kind": "unreadable",
            "run_id": None,
            "status": None,
            "scenario": None,
            "strategy": None,
            "backbone": None,
            "seed": None,
            "reason": p.reason,
            "path": str(p.path),
        }
        for p in problems
    )
    columns = ["kind", "run_id", "status", "scenario", "strategy", "backbone", "seed", "reason", "path"]
    return pd.DataFrame(rows, columns=columns)


def failure_reason(record: dict[str, Any]) -> str:
    """One line saying why a run is not in the averages."""
    if record.get("status") == "failed":
        failure = record.get("failure") or {}
        kind, reason = failure.get("type"), failure.get("reason")
        if kind and reason:
            return f"{kind}: {reason}"
        return str(reason or kind or "failed without a recorded reason")
    done = len(record.get("experiences") or [])
    total = (record.get("scenario") or {}).get("n_experiences")
    progress = f"{done} of {total}" if total else str(done)
    return (
        f"status {record.get('status')}: {progress} experiences recorded; the run crashed, was killed "
        "or is still in progress"
    )


def experiences_frame(record: dict[str, Any]) -> pd.DataFrame:
    """The per-experience figures of one run (times, throughput, memory, parameters, loss)."""
    columns = [
        "index",
        "n_classes",
        "n_train",
        "steps",
        "train_time_s",
        "eval_time_s",
        "train_samples_per_s",
        "eval_samples_per_s",
        "peak_memory_train_bytes",
        "peak_memory_eval_bytes",
        "n_trainable",
        "n_added",
        "n_active",
        "adapter_bytes",
        "loss_first",
        "loss_last",
    ]
    rows = [{**exp, "n_classes": len(exp.get("classes") or [])} for exp in record.get("experiences") or []]
    return pd.DataFrame(rows, columns=columns)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def strategy_scalars_frame(record: dict[str, Any]) -> pd.DataFrame:
    """``experiences[i].strategy`` as a table: one row per experience, one column per numeric name.

    Names are kept in first-seen order; an experience that lacks a name has NaN there.
    """
    experiences = record.get("experiences") or []
    names: list[str] = []
    for exp in experiences:
        for name, value in (exp.get("strategy") or {}).items():
            if _number(value) and name not in names:
                names.append(name)
    rows = [{name: (exp.get("strategy") or {}).get(name) for name in names} for exp in experiences if names]
    frame = pd.DataFrame(rows, columns=names, dtype="float64")
    frame.index = pd.Index([exp.get("index", i) for i, exp in enumerate(experiences)][: len(frame)])
    frame.index.name = "experience"
    return frame


MAIN_VARIANT = "main"
"""The ``accuracy.variants`` label of the unmodified final model, evaluated in the same pass as the
other variants: the baseline of every variant's speed ratio."""


_VARIANT_FIGURES = ("acc_final", "eval_samples_per_s", "peak_memory_eval_bytes")


def _variant_figures(figures: Any) -> dict[str, float]:
    """The numbers of one ``accuracy.variants`` entry (NaN where missing or not a number)."""
    figures = figures if isinstance(figures, dict) else {}
    return {k: float(figures[k]) if _number(figures.get(k)) else math.nan for k in _VARIANT_FIGURES}


def variants_frame(record: dict[str, Any]) -> pd.DataFrame:
    """``accuracy.variants`` of one run, below a first row for the main (unmodified) final model.

    Columns: variant, acc_final, eval_samples_per_s, peak_memory_eval_bytes, and ``speedup`` and
    ``acc_delta`` of each variant relative to the first row (e.g. LoRAPrune's sliced model against
    the masked one). The first row is the :data:`MAIN_VARIANT` entry when the record has one: the
    final model re-evaluated in the same pass just before the variants, so that the speed ratio
    compares like with like. Older records lack it; their first row is ``(main)`` with the main
    matrix's accuracy only, and ``speedup`` is NaN throughout: the eval throughput and memory of the
    final experience were measured in another pass and are no baseline (noise alone moved the
    throughput by 20%). A record whose only variant is ``main`` gives an empty frame.
    """
    variants = (record.get("accuracy") or {}).get("variants") or {}
    columns = ["variant", "acc_final", "eval_samples_per_s", "peak_memory_eval_bytes", "speedup", "acc_delta"]
    others = {str(label): figures for label, figures in variants.items() if str(label) != MAIN_VARIANT}
    if not others:
        return pd.DataFrame(columns=columns)
    same_pass = isinstance(variants.get(MAIN_VARIANT), dict)
    if same_pass:
        baseline = _variant_figures(variants[MAIN_VARIANT])
    else:
        baseline = _variant_figures({"acc_final": (record.get("metrics") or {}).get("acc_final")})
    rows = [{"variant": MAIN_VARIANT if same_pass else "(main)", **baseline}]
    rows += [{"variant": label, **_variant_figures(figures)} for label, figures in others.items()]
    frame = pd.DataFrame(rows, columns=columns[:4])
    main_sps = baseline["eval_samples_per_s"]
    frame["speedup"] = frame["eval_samples_per_s"] / main_sps if main_sps > 0 else math.nan
    frame["acc_delta"] = frame["acc_final"] - baseline["acc_final"]
    return frame


_RANK_LABEL = re.compile(r"^\s*rank\s*=\s*(\d+)\s*$")


def rank_variants(record: dict[str, Any]) -> pd.DataFrame:
    """Variants labelled ``rank=N`` as (rank, acc_final, eval_samples_per_s), sorted by rank."""
    variants = (record.get("accuracy") or {}).get("variants") or {}
    rows = [
        {
            "rank": int(match.group(1)),
            "acc_final": figures.get("acc_final"),
            "eval_samples_per_s": figures.get("eval_samples_per_s"),
        }
        for label, figures in variants.items()
        if isinstance(figures, dict) and (match := _RANK_LABEL.match(str(label)))
    ]
    frame = pd.DataFrame(rows, columns=["rank", "acc_final", "eval_samples_per_s"])
    return frame.sort_values("rank", kind="stable").reset_index(drop=True)
