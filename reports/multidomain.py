"""The report's "X-TAIL / MTIL" section: the benchmarks' own numbers and per-domain accuracy matrices.

X-TAIL and MTIL train one domain per experience and publish three numbers per method, Transfer /
Average / Last in percent with one decimal (docs/metrics.md, "X-TAIL and MTIL"). For the records of
these scenarios (:func:`benchmark_of`) the section gives one table per benchmark, scenario and domain
order (``scenario.domains``, so MTIL's Order I and Order II never share a mean), one row per group of
runs that differ only in seed (the groups of :mod:`reports.tables`), mean ± sample std over the
seeds, the X-TAIL scripts' masked Transfer beside Transfer for X-TAIL; and per group the mean
accuracy matrix with the domain names on both axes.

A record whose ``scenario.domains`` cannot name its experiences (absent, not a list of strings, or
of another length than the matrix) is still counted, under "domain order not recorded", with
numeric heatmap axes and one warning: a malformed name list costs the names, never the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cl_bench.metrics import FORMULAS, MULTIDOMAIN_BENCHMARKS, transfer_xtail_masked
from reports import plots, tables

TITLES: dict[str, str] = {"x-tail": "X-TAIL", "mtil": "MTIL"}
"""How the papers spell each benchmark."""
ORDER = "domain_order"
"""Column of a run's domain order, the names joined by :data:`ARROW` (``""`` when not recorded)."""
ARROW = " → "
KEYS: list[str] = ["benchmark", "scenario", ORDER, "strategy", "backbone", tables.CONFIG]
"""One table per benchmark, scenario and domain order; one row per group of seeds within it."""
MASKED = "transfer_xtail_masked"
COLUMNS: tuple[tuple[str, str], ...] = (
    ("transfer", "Transfer"),
    ("avg", "Average"),
    ("last", "Last"),
    (MASKED, "Transfer (masked)"),
)
"""The section's metrics and their headings; the masked Transfer is shown for X-TAIL only."""
NO_ORDER = "domain order not recorded"


def benchmark_of(record: dict[str, Any]) -> str | None:
    """``x-tail`` or ``mtil`` for a record of these benchmarks (``scenario.benchmark``, else
    ``scenario.name``), None for every other record."""
    scenario = record.get("scenario") or {}
    for value in (scenario.get("benchmark"), scenario.get("name")):
        if isinstance(value, str) and value in MULTIDOMAIN_BENCHMARKS:
            return value
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def domains_problem(record: dict[str, Any]) -> str | None:
    """Why ``scenario.domains`` cannot name the record's experiences (one line), or None when it can:
    a list of one string per row and column of the accuracy matrix."""
    domains = (record.get("scenario") or {}).get("domains")
    T = len((record.get("accuracy") or {}).get("matrix") or [])
    if domains is None:
        return "scenario.domains is absent"
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        return f"scenario.domains is {_show(domains)}, not a list of names"
    if len(domains) != T:
        return f"scenario.domains names {len(domains)} domains for {T} experiences"
    return None


def record_domains(record: dict[str, Any]) -> list[str] | None:
    """The record's domain names in experience order, None when :func:`domains_problem` has one."""
    return None if domains_problem(record) else list((record.get("scenario") or {})["domains"])


def _metric(record: dict[str, Any], name: str) -> float:
    """A metric of the record as a float (NaN where undefined); the masked Transfer of a record
    written before it was derived is computed from the record's own matrix."""
    metrics = record.get("metrics") or {}
    if name == MASKED and name not in metrics:
        value: Any = transfer_xtail_masked((record.get("accuracy") or {}).get("matrix") or [[math.nan]])
    else:
        value = metrics.get(name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if number else math.nan


def multidomain_frame(records: Sequence[dict[str, Any]], labels: dict[str, str]) -> pd.DataFrame:
    """One row per record of a multi-domain benchmark (others are left out): ``run_id``,
    :data:`KEYS` (``labels`` are the :data:`reports.tables.CONFIG` labels by run id), ``seed`` and
    the metrics of :data:`COLUMNS` as fractions."""
    rows = []
    for record in records:
        name = benchmark_of(record)
        if name is None:
            continue
        config = record.get("config") or {}
        domains = record_domains(record)
        rows.append(
            {
                "run_id": str(record["run_id"]),
                "benchmark": name,
                "scenario": str(config.get("scenario")),
                ORDER: ARROW.join(domains) if domains else "",
                "strategy": str(config.get("strategy")),
                "backbone": str(config.get("backbone")),
                tables.CONFIG: labels.get(str(record["run_id"]), ""),
                "seed": config.get("seed"),
                **{metric: _metric(record, metric) for metric, _ in COLUMNS},
            }
        )
    return pd.DataFrame(rows, columns=["run_id", *KEYS, "seed", *(m for m, _ in COLUMNS)])


def percent(value: Any) -> str:
    """A fraction in percent with one decimal, as the X-TAIL and MTIL papers print it (``63.3``)."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return f"{100 * value:.1f}" if number else "—"


def _cell(row: pd.Series, metric: str) -> dict[str, Any]:
    """A table cell: the mean, ``± std`` with several seeds, ``(n=k)`` where only k runs define it."""
    mean, std, n, n_runs = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"], int(row["n_runs"])
    if pd.isna(mean):
        return {"value": "—", "spread": "", "note": "", "best": False}
    spread = "" if pd.isna(std) else f"± {percent(std)}"
    note = f"(n={int(n)})" if int(n) < n_runs else ""
    return {"value": percent(mean), "spread": spread, "note": note, "best": False}


def _mean_matrix(records: Sequence[dict[str, Any]]) -> list[list[float]]:
    """The cell-wise mean accuracy matrix of the runs of one group (NaN where no run has a value);
    runs whose matrix has another shape than the first run's are left out (a malformed order only)."""
    matrices = [np.asarray((r.get("accuracy") or {}).get("matrix") or [], dtype=np.float64) for r in records]
    cells = np.stack([m for m in matrices if m.shape == matrices[0].shape])
    count = np.isfinite(cells).sum(axis=0)
    total = np.nansum(cells, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).tolist()


def _group_label(row: pd.Series, several_backbones: bool) -> str:
    name = f"{row['strategy']} / {row['backbone']}" if several_backbones else str(row["strategy"])
    config = row[tables.CONFIG]
    return f"{name} [{config}]" if isinstance(config, str) and config else name


def shown_columns(benchmark: str) -> list[tuple[str, str]]:
    """The :data:`COLUMNS` of a benchmark's table: the masked Transfer is the X-TAIL scripts' number,
    so MTIL's tables (whose notebook never masks) leave it out."""
    return [(m, h) for m, h in COLUMNS if m != MASKED or benchmark == "x-tail"]


def _table_title(benchmark: str, scenario: str, order: str) -> str:
    title = TITLES[benchmark] + ("" if scenario == benchmark else f" · scenario {scenario}")
    return f"{title} · {order or NO_ORDER}"


def multidomain_view(
    records: Sequence[dict[str, Any]],
    labels: dict[str, str],
    colors: dict[str, str],
    warn: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The section's tables, one per benchmark, scenario and domain order (sorted), each with its
    headings, rows and one mean-matrix heatmap per row; ``[]`` when no record is of X-TAIL or MTIL.

    ``records`` are the completed runs; each whose ``scenario.domains`` is unusable gets one
    ``warn`` line naming the run and the problem."""
    frame = multidomain_frame(records, labels)
    if frame.empty:
        return []
    by_id = {str(r["run_id"]): r for r in records}
    for run_id in frame.loc[frame[ORDER] == "", "run_id"]:
        warn(
            f"run {run_id}: {domains_problem(by_id[run_id])}; its X-TAIL / MTIL table row is under "
            f"'{NO_ORDER}' and its matrix has numeric axes"
        )
    stats = tables.aggregate(frame, [m for m, _ in COLUMNS], keys=KEYS)
    stat_rows = {tuple(row[k] for k in KEYS): row for _, row in stats.iterrows()}
    tables_of: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key, members in frame.groupby(KEYS, sort=True):
        row = stat_rows[key]
        name, scenario, order = str(row["benchmark"]), str(row["scenario"]), str(row[ORDER])
        group = [by_id[run_id] for run_id in members["run_id"]]
        siblings = stats[
            (stats["benchmark"] == name) & (stats["scenario"] == scenario) & (stats[ORDER] == order)
        ]
        tables_of.setdefault((name, scenario, order), []).append(
            {
                "label": _group_label(row, siblings["backbone"].nunique() > 1),
                "color": colors.get(str(row["strategy"]), "#333"),
                "n": int(row["n_runs"]),
                "seeds": row["seeds"],
                "cells": [_cell(row, m) for m, _ in shown_columns(name)],
                "heatmap": plots.accuracy_heatmap(
                    _mean_matrix(group), None, record_domains(group[0]) if order else None
                ),
            }
        )
    return [
        {
            "title": _table_title(name, scenario, order),
            "headers": [{"name": h, "formula": FORMULAS[m]} for m, h in shown_columns(name)],
            "rows": rows,
        }
        for (name, scenario, order), rows in tables_of.items()
    ]
