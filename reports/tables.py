"""The report's tables as pandas DataFrames: one row per run, per-group aggregates, per-run details.

Every table here is plain data (numbers, not formatted strings) so that it can be written to CSV
as is; ``reports.build`` formats them for the page.

Groups. Runs are grouped by scenario, strategy and backbone (:data:`GROUP`) and then split by
every other configuration key whose value differs between them (:data:`GROUP_KEYS` adds the
``config`` label, e.g. ``strategy_args.r=16``; empty when the runs agree), so that a group's
runs are seeds of one experiment and never a mix of configurations. A group's figures are the
mean and the sample standard deviation (``ddof=1``, undefined for a single run) over its
completed runs, with the number of runs that had a value; its failed and incomplete runs are
counted apart (``n_failed``, ``n_incomplete``), never averaged.

Keys that do not define the experiment never split a group (:func:`defines_experiment`):

- seeds: ``seed``, ``order_seed`` and any nested ``*seed`` key (``scenario_args.data_seed``,
  ``scenario_args.split_seed``): the runs of a group are meant to differ in them;
- where and how a run was recorded: ``run_id``, ``out``, ``overwrite``, ``report``, ``log_every``
  (``--no-progress`` is a command-line flag, not part of the config);
- execution settings that compute the same model: ``compile``, ``cuda_graphs``,
  ``strategy_args.checkpoint_frozen`` (LISA's recomputation of frozen blocks);
- where the data lives: ``scenario_args.root``, ``scenario_args.verify_checksums``.

Everything else splits, including ``device``, ``precision``, ``eval_batch_size`` and
``steps_per_experience``: they change the accuracies or the memory and time figures. A key
present in some runs and absent from others (a record from an older cl-bench) splits too, shown
as ``key=unset``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from cl_bench.results import RecordProblem, run_row

GROUP: list[str] = ["scenario", "strategy", "backbone"]
"""The identity of an experiment; runs that share it and their whole config but seeds are averaged."""
CONFIG = "config"
"""Column of the label naming a group's configuration keys that differ from its siblings'."""
GROUP_KEYS: list[str] = [*GROUP, CONFIG]
"""The keys of an aggregated row: :data:`GROUP` split by configuration (see the module docstring)."""

NON_EXPERIMENT_KEYS: frozenset[str] = frozenset(
    {
        "seed",
        "order_seed",
        "run_id",
        "out",
        "overwrite",
        "report",
        "log_every",
        "compile",
        "cuda_graphs",
        "strategy_args.checkpoint_frozen",
        "scenario_args.root",
        "scenario_args.verify_checksums",
    }
)
"""Dotted config keys that never split a group (with nested ``*seed`` keys; module docstring)."""

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


def defines_experiment(key: str) -> bool:
    """False for the dotted config keys listed in :data:`NON_EXPERIMENT_KEYS` and nested ``*seed`` keys."""
    return key not in NON_EXPERIMENT_KEYS and not ("." in key and key.endswith("seed"))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_UNSET = object()


def _group_of(record: dict[str, Any]) -> tuple[Any, ...]:
    row = run_row(record)
    return tuple(row[k] for k in GROUP)


def config_differences(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[str]]:
    """Per :data:`GROUP`, the dotted config keys that define the experiment and differ between its
    runs (sorted), for the groups where any do."""
    by_group: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        by_group.setdefault(_group_of(record), []).append(_flatten(record.get("config") or {}))
    differences: dict[tuple[Any, ...], list[str]] = {}
    for key, configs in by_group.items():
        names = sorted({name for cfg in configs for name in cfg if defines_experiment(name)})
        differing = [name for name in names if len({repr(cfg.get(name, _UNSET)) for cfg in configs}) > 1]
        if differing:
            differences[key] = differing
    return differences


def _label_value(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def config_labels(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``run_id`` -> the :data:`CONFIG` label of its group: ``key=value`` for each key of
    :func:`config_differences` (``"strategy_args.r=16, lr=0.01"``), ``""`` where its group's runs agree.

    Labels depend on the records given: pass all of them (any status) so that a failed run and the
    completed runs of its configuration land in the same group.
    """
    records = list(records)
    differences = config_differences(records)
    labels: dict[str, str] = {}
    for record in records:
        flat = _flatten(record.get("config") or {})
        keys = differences.get(_group_of(record), [])
        labels[str(record.get("run_id"))] = ", ".join(
            f"{k}={_label_value(flat.get(k, _UNSET))}" for k in keys
        )
    return labels


def runs_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (any status), in record order: the columns of
    :func:`cl_bench.results.run_row` plus :data:`CONFIG` (the label of :func:`config_labels`,
    computed over these records); seeds as nullable integers."""
    records = list(records)
    labels = config_labels(records)
    columns = list(run_row({}).keys())
    frame = pd.DataFrame([run_row(r) for r in records], columns=columns)
    frame.insert(columns.index("backbone") + 1, CONFIG, [labels[str(r.get("run_id"))] for r in records])
    for col in ("seed", "order_seed"):
        frame[col] = _int_column(frame[col])
    return frame


def _int_column(values: pd.Series) -> pd.Series:
    """Integers with missing values (``Int64``), not floats: seed 2 stays ``2`` in a CSV."""
    return pd.to_numeric(values, errors="coerce").round().astype("Int64")


def _with_config(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a :data:`CONFIG` column (empty labels for a frame built without one, such as
    :func:`cl_bench.results.load_runs`)."""
    return runs if CONFIG in runs.columns else runs.assign(**{CONFIG: ""})


def aggregate(runs: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count of each column per group of :data:`GROUP_KEYS`.

    ``runs`` are the runs to average (the report passes the completed ones). Returns one row per
    group with columns ``n_runs``, ``seeds`` and ``<col>_mean``, ``<col>_std``, ``<col>_n`` for
    each column (``_n`` counts the runs where the value is defined: forgetting of a one-experience
    run is undefined, not 0). Groups are sorted by scenario, strategy, backbone, config.
    """
    columns = list(columns)
    runs = _with_config(runs)
    out_columns = [*GROUP_KEYS, "n_runs", "seeds"] + [
        f"{c}_{s}" for c in columns for s in ("mean", "std", "n")
    ]
    if runs.empty:
        return pd.DataFrame(columns=out_columns)
    values = runs[[*GROUP_KEYS, *columns]].copy()
    for col in columns:
        values[col] = pd.to_numeric(values[col], errors="coerce").astype("float64")
    grouped = values.groupby(GROUP_KEYS, sort=True, dropna=False)
    stats = grouped[columns].agg(["mean", "std", "count"])
    stats.columns = [f"{c}_{'n' if s == 'count' else s}" for c, s in stats.columns]
    seeds = runs.groupby(GROUP_KEYS, sort=True, dropna=False)["seed"].agg(
        lambda s: ",".join(str(v) for v in sorted(pd.to_numeric(s, errors="coerce").dropna().astype(int)))
    )
    stats.insert(0, "seeds", seeds)
    stats.insert(0, "n_runs", grouped.size())
    return stats.reset_index()[out_columns]


def overview_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`aggregate` of the completed runs over :data:`OVERVIEW_METRICS`, with every group of
    ``runs`` (any status) and its ``n_failed`` and ``n_incomplete`` (status ``running``: crashed,
    killed or still going) after ``n_runs``.

    A group whose runs all failed has a row too, with ``n_runs`` 0 and no values: the overview
    shows every experiment that was attempted, not only those that worked.
    """
    runs = _with_config(runs)
    stats = aggregate(runs[runs["status"] == "ok"], OVERVIEW_METRICS)
    counts = (
        runs.assign(
            n_failed=(runs["status"] == "failed").astype(int),
            n_incomplete=(runs["status"] == "running").astype(int),
        )
        .groupby(GROUP_KEYS, sort=True, dropna=False)[["n_failed", "n_incomplete"]]
        .sum()
        .reset_index()
    )
    merged = counts.merge(stats, on=GROUP_KEYS, how="outer", sort=True)
    merged["n_runs"] = merged["n_runs"].fillna(0).astype(int)
    merged["seeds"] = merged["seeds"].fillna("")
    for col in ("n_failed", "n_incomplete"):
        merged[col] = merged[col].fillna(0).astype(int)
    order = [*GROUP_KEYS, "n_runs", "n_failed", "n_incomplete"]
    merged = merged.sort_values(GROUP_KEYS, kind="stable", na_position="last").reset_index(drop=True)
    return merged[order + [c for c in stats.columns if c not in order]]


def best_in_scenario(overview: pd.DataFrame, metrics: Iterable[str]) -> set[tuple[int, str]]:
    """``(row position, metric)`` pairs holding the best mean of their scenario.

    Direction follows :data:`LOWER_IS_BETTER`. Means are compared at the displayed precision
    (3 decimals) so that ties are all marked; a scenario with a single group of completed runs
    marks nothing.
    """
    marks: set[tuple[int, str]] = set()
    for _, rows in overview.reset_index(drop=True).groupby("scenario", sort=False, dropna=False):
        if (rows["n_runs"] > 0).sum() < 2:
            continue
        for metric in metrics:
            means = rows[f"{metric}_mean"].round(3).dropna()
            if means.empty:
                continue
            best = means.min() if metric in LOWER_IS_BETTER else means.max()
            marks.update((int(pos), metric) for pos in means.index[means == best])
    return marks


def problems_frame(
    records: Iterable[dict[str, Any]],
    problems: Iterable[RecordProblem],
    labels: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Failed or incomplete runs (with their reason) and unreadable files, one row each.

    ``labels`` are the :data:`CONFIG` labels of :func:`config_labels` over all records of the
    report (by default over ``records`` alone); seeds are nullable integers.
    """
    records = list(records)
    labels = config_labels(records) if labels is None else labels
    identity = ("run_id", "status", "scenario", "strategy", "backbone")
    rows: list[dict[str, Any]] = []
    for record in records:
        row = run_row(record)
        rows.append(
            {
                "kind": "failed" if row["status"] == "failed" else "incomplete",
                **{k: row[k] for k in identity},
                CONFIG: labels.get(str(row["run_id"]), ""),
                "seed": row["seed"],
                "reason": failure_reason(record),
                "path": row["path"],
            }
        )
    rows.extend({"kind": "unreadable", "reason": p.reason, "path": str(p.path)} for p in problems)
    columns = ["kind", *identity, CONFIG, "seed", "reason", "path"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["seed"] = _int_column(frame["seed"])
    return frame


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
