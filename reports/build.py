"""``build_report``: run records in, one self-contained HTML report and its CSV tables out.

The page opens offline: CSS is inline, figures are embedded SVG data URIs, there is no external
resource. It spans the window's width (wide tables scroll in their own box, the group or run column
and the header staying in view), and each run's details are a section collapsed to one line; the one
inline script adds expand-all/collapse-all buttons, opens a section its link points to and opens them
all to print (without it the page is the same, each section opening on a click).

It reads JSON only (``cl_bench.results`` and ``cl_bench.metrics``, which need numpy alone), so it
never imports torch, avalanche, open_clip or transformers.

Strategy-specific figures are drawn generically from the record conventions of
``docs/run-record.md``, so a new strategy needs no reporter code: per-experience
``experiences[i].strategy`` numbers become small line plots and a table; ``strategy_report``
``scalars``/``curves``/``per_layer``/``events`` become a table, line plots (bars for a curve of
``"kind": "bar"``), bar charts and event summaries (with field names where the strategy gives
``fields``); ``accuracy.variants`` becomes a table against the same-pass ``main`` model (and an
accuracy-vs-rank plot when the labels are ``rank=N``).

Sections that appear only for the records they are about: X-TAIL / MTIL (:mod:`reports.multidomain`)
and federated runs (:mod:`reports.federated`: bytes communicated against accuracy, per-round
curves), whose ``communication_bytes`` is then also a column of the memory and time table.

The overview groups its rows by competition (scenario, protocol, label space) and marks the best
mean of each metric (★) only among the groups of one competition that trained and learned
(plasticity at least ``chance + margin x (1 - chance)``, :mod:`reports.tables`); the page prints
the rule, each group's threshold and why an unmarked group is not eligible, and plots forgetting
against trainable parameters and training time per competition.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import jinja2
import pandas as pd

from cl_bench.errors import ClBenchError
from cl_bench.metrics import FORMULAS, MULTIDOMAIN_METRICS, SOURCES
from cl_bench.results import METRIC_COLUMNS, RecordProblem, find_records, write_text_atomic
from reports import federated, multidomain, plots, tables
from reports.output import output_refusal, remove_stale_temps
from reports.validate import record_problem

TEMPLATES = Path(__file__).parent / "templates"
DASH = "—"


# ----------------------------------------------------------------------------- formatting


def _is_num(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt_float(value: Any, digits: int = 3) -> str:
    """A fraction or score with fixed decimals; missing or non-finite values as a dash."""
    return f"{value:.{digits}f}" if _is_num(value) else DASH


def fmt_int(value: Any) -> str:
    """A count with thousands separators."""
    return f"{round(value):,}" if _is_num(value) else DASH


def fmt_bytes(value: Any) -> str:
    """A byte count in binary units (the plots' format), a dash when there is none."""
    return plots.human_bytes(value) if _is_num(value) else DASH


def fmt_rate(value: Any) -> str:
    """Samples per second, three significant digits at least."""
    if not _is_num(value):
        return DASH
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fmt_seconds(value: Any) -> str:
    return f"{value:,.1f} s" if _is_num(value) else DASH


def fmt_percent(value: Any) -> str:
    return f"{100 * value:.2f} %" if _is_num(value) else DASH


def fmt_time(value: Any) -> str:
    """An ISO timestamp of a record as ``2026-01-01 09:30`` in UTC; anything else as given."""
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return DASH if value is None else str(value)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M")


def fmt_value(value: Any) -> str:
    """Any scalar from a strategy figure: integers as counts, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH if value is None else str(value)
    if not math.isfinite(value):
        return DASH
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def stat_parts(
    mean: Any, std: Any, n: Any, n_runs: int, fmt: Callable[[Any], str], always_std: bool = True
) -> dict[str, str]:
    """A group statistic for display: ``value`` (the mean), ``spread`` (``± std``) and ``note``.

    The spread is the sample std over seeds (absent with one run); ``always_std=False`` drops a zero
    spread (parameter counts identical across seeds read better as one number). ``note`` is
    ``(n=k)`` when only k of the group's runs define the value.
    """
    if not _is_num(mean):
        return {"value": DASH, "spread": "", "note": ""}
    spread = f"± {fmt(std)}" if _is_num(std) and (always_std or std > 0) else ""
    note = f"(n={int(n)})" if _is_num(n) and int(n) < n_runs else ""
    return {"value": fmt(mean), "spread": spread, "note": note}


# ----------------------------------------------------------------------------- view models


def _anchor(run_id: str) -> str:
    return "run-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)


def _direction(metric: str) -> str:
    return "lower is better" if metric in tables.LOWER_IS_BETTER else "higher is better"


def _metric_defs() -> list[dict[str, str]]:
    return [
        {
            "name": name,
            "formula": FORMULAS[name],
            "source": SOURCES.get(name, ""),
            "direction": _direction(name),
        }
        for name in (*METRIC_COLUMNS, *MULTIDOMAIN_METRICS)
    ]


def group_label(strategy: Any, config: Any) -> str:
    """A group's name on the page: the strategy, and its differing config keys in brackets
    (``lora [strategy_args.r=16]``) when its scenario has runs of other configurations."""
    config = "" if config is None or pd.isna(config) else str(config)
    return f"{strategy} [{config}]" if config else str(strategy)


def excluded_note(n_failed: int, n_incomplete: int) -> str:
    """``(+2 failed)``, ``(+1 incomplete)``, ``(+2 failed, +1 incomplete)`` or ``""``."""
    parts = [f"+{n} {kind}" for n, kind in ((n_failed, "failed"), (n_incomplete, "incomplete")) if n]
    return f"({', '.join(parts)})" if parts else ""


def _group_view(row: pd.Series, colors: dict[str, str]) -> dict[str, Any]:
    """The identity cells shared by the overview, parameter and resource rows."""
    return {
        "scenario": row["scenario"],
        "strategy": row["strategy"],
        "label": group_label(row["strategy"], row[tables.CONFIG]),
        "backbone": row["backbone"],
        "color": colors.get(row["strategy"], "#333"),
        "n": int(row["n_runs"]),
    }


PROTOCOL_NAMES = {
    "class": "class-incremental",
    "task": "task-incremental (each sample against its own task's classes)",
}


def competition_title(scenario: Any, protocol: Any, label_space: Any) -> str:
    """``synthetic · class-incremental · label space seen``: the heading of a competition."""

    def text(value: Any) -> str:
        return "unknown" if value is None or pd.isna(value) else str(value)

    protocol_name = PROTOCOL_NAMES.get(text(protocol), f"protocol {text(protocol)}")
    return f"{scenario} · {protocol_name} · label space {text(label_space)}"


def _competitions(frame: pd.DataFrame) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    """The rows of an overview-keyed frame per :data:`reports.tables.COMPETITION`, in frame order
    (index = row position in ``frame``, as :func:`reports.tables.best_marks` counts)."""
    grouped = frame.reset_index(drop=True).groupby(tables.COMPETITION, sort=False, dropna=False)
    return [(tuple(None if pd.isna(v) else v for v in key), rows) for key, rows in grouped]


def _eligibility_view(row: pd.Series) -> dict[str, str]:
    """The threshold cell and the flag of one overview row (``flag`` empty for an eligible one)."""
    reason = str(row["not_eligible"])
    plasticity, threshold, chance = row["plasticity_mean"], row["threshold"], row["chance"]
    if reason == tables.NO_TRAINING:
        why = "no experience of these runs recorded a training step: never marked"
    elif reason == tables.NOT_LEARNED:
        why = (
            f"mean plasticity {fmt_float(plasticity)} < {fmt_float(threshold)}, the learning threshold "
            f"at chance {fmt_float(chance)}: its numbers hold no mark"
        )
    elif reason == tables.CHANCE_UNKNOWN:
        why = "the records do not say how many classes compete (or give no plasticity): never marked"
    else:
        why = ""
    return {
        "threshold": fmt_float(threshold),
        "chance": f"chance {fmt_float(chance)}" if _is_num(chance) else "",
        "flag": reason,
        "flag_kind": "muted" if reason == tables.NO_TRAINING else "warn",
        "why": why,
    }


def _overview_view(overview: pd.DataFrame, colors: dict[str, str]) -> list[dict[str, Any]]:
    """The overview table per competition: heading, then its rows with cells, marks and flags."""
    best = tables.best_marks(overview, tables.OVERVIEW_METRICS)
    competitions = []
    for key, frame in _competitions(overview):
        rows = []
        for pos, (_, row) in zip(frame.index.tolist(), frame.iterrows(), strict=True):
            n_runs = int(row["n_runs"])
            rows.append(
                {
                    **_group_view(row, colors),
                    "seeds": row["seeds"],
                    "excluded": excluded_note(int(row["n_failed"]), int(row["n_incomplete"])),
                    "eligibility": _eligibility_view(row) if n_runs else None,
                    "cells": [
                        {
                            **stat_parts(row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"], n_runs, fmt_float),
                            "best": (int(pos), m) in best,
                            "metric": m,
                        }
                        for m in tables.OVERVIEW_METRICS
                    ],
                }
            )
        competitions.append({"title": competition_title(*key), "rows": rows})
    return competitions


def _tradeoff_view(runs: pd.DataFrame, colors: dict[str, str], margin: float) -> list[dict[str, Any]]:
    """Per competition, forgetting against trainable parameters and against training time."""
    frame = tables.tradeoff_frame(runs, margin)
    several_backbones = frame.groupby("scenario")["backbone"].transform("nunique") > 1
    views = []
    for key, rows in _competitions(frame.assign(several_backbones=several_backbones)):
        title = competition_title(*key)

        def points(cost: str, rows: pd.DataFrame = rows) -> list[plots.TradeoffPoint]:
            return [
                plots.TradeoffPoint(
                    label=group_label(
                        f"{row['strategy']} / {row['backbone']}"
                        if row["several_backbones"]
                        else row["strategy"],
                        row[tables.CONFIG],
                    ),
                    strategy=str(row["strategy"]),
                    forgetting=_float(row["forgetting_mean"]),
                    forgetting_std=_float(row["forgetting_std"]),
                    cost=_float(row[f"{cost}_mean"]),
                    cost_std=_float(row[f"{cost}_std"]),
                    n=int(row["n_runs"]),
                    note=str(row["not_eligible"]),
                )
                for _, row in rows.iterrows()
            ]

        views.append(
            {
                "title": title,
                "parameters": plots.tradeoff_plot(
                    points("n_trainable"),
                    colors,
                    x_label="trainable parameters (log scale)",
                    title="forgetting vs trainable parameters",
                    log_x=True,
                    zero_label="no trainable parameters (dashed line)",
                ),
                "time": plots.tradeoff_plot(
                    points("train_time_s"),
                    colors,
                    x_label="training time (s, all experiences)",
                    title="forgetting vs training time",
                ),
            }
        )
    return views


def _float(value: Any) -> float:
    return float(value) if _is_num(value) else math.nan


def _aggregate_view(
    frame: pd.DataFrame, columns: Sequence[tuple[str, str, Callable[[Any], str]]], colors: dict[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for _, row in frame.iterrows():
        n_runs = int(row["n_runs"])
        rows.append(
            {
                **_group_view(row, colors),
                "cells": [
                    {
                        **stat_parts(
                            row[f"{c}_mean"], row[f"{c}_std"], row[f"{c}_n"], n_runs, f, always_std=False
                        ),
                        "best": False,
                    }
                    for c, _, f in columns
                ],
            }
        )
    return rows


PARAMETER_VIEW: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("n_trainable", "trainable", fmt_int),
    ("n_added", "added by the method", fmt_int),
    ("n_active", "active per input", fmt_int),
    ("adapter_bytes", "stored adapter", fmt_bytes),
    ("trainable_fraction", "% of the backbone", fmt_percent),
    ("backbone_parameters", "backbone", fmt_int),
)
RESOURCE_VIEW: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("peak_memory_train_bytes", "peak memory, train", fmt_bytes),
    ("peak_memory_eval_bytes", "peak memory, eval", fmt_bytes),
    ("train_samples_per_s", "train samples/s", fmt_rate),
    ("eval_samples_per_s", "eval samples/s", fmt_rate),
    ("train_time_s", "train time", fmt_seconds),
    ("eval_time_s", "eval time", fmt_seconds),
    ("wall_time_s", "wall time", fmt_seconds),
    (tables.COMMUNICATION, "communicated (federated)", fmt_bytes),
)
"""The resource table's columns; the last only where some run is federated (:func:`_resource_view`)."""
EXPERIENCE_VIEW: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("index", "exp", fmt_int),
    ("n_train", "train samples", fmt_int),
    ("steps", "steps", fmt_int),
    ("train_time_s", "train", fmt_seconds),
    ("eval_time_s", "eval", fmt_seconds),
    ("train_samples_per_s", "train samples/s", fmt_rate),
    ("eval_samples_per_s", "eval samples/s", fmt_rate),
    ("peak_memory_train_bytes", "mem train", fmt_bytes),
    ("peak_memory_eval_bytes", "mem eval", fmt_bytes),
    ("n_trainable", "trainable", fmt_int),
    ("n_added", "added", fmt_int),
    ("n_active", "active", fmt_int),
    ("adapter_bytes", "adapter", fmt_bytes),
    ("loss_first", "loss first", lambda v: fmt_float(v, 3)),
    ("loss_last", "loss last", lambda v: fmt_float(v, 3)),
)


def _resource_view(columns: Sequence[str]) -> list[tuple[str, str, Callable[[Any], str]]]:
    """The :data:`RESOURCE_VIEW` entries of ``columns`` (:func:`reports.tables.resource_columns`)."""
    return [entry for entry in RESOURCE_VIEW if entry[0] in columns]


def _table(frame: pd.DataFrame, view: Sequence[tuple[str, str, Callable[[Any], str]]]) -> dict[str, Any]:
    return {
        "headers": [label for _, label, _ in view],
        "rows": [[f(None if pd.isna(row[c]) else row[c]) for c, _, f in view] for _, row in frame.iterrows()],
    }


def _curve_series(curve: dict[str, Any]) -> tuple[list[Any], dict[str, list[Any]]] | None:
    """``x`` and named ``y`` series of a ``strategy_report.curves`` entry, or None if malformed."""
    x, y = curve.get("x"), curve.get("y")
    if not isinstance(x, list) or not x:
        return None
    if isinstance(y, list):
        return x, {curve.get("y_label") or "y": y}
    if isinstance(y, dict) and all(isinstance(v, list) for v in y.values()):
        return x, {str(k): v for k, v in y.items()}
    return None


def _event_entries(entries: Any) -> tuple[list[str], list[Any]]:
    """``(fields, entries)`` of a ``strategy_report.events`` value: a list of entries, or
    ``{"fields": [names], "entries": [...]}`` naming the positions of each entry."""
    if isinstance(entries, dict) and isinstance(entries.get("entries"), list):
        fields = entries.get("fields")
        names = [str(f) for f in fields] if isinstance(fields, list) else []
        return names, entries["entries"]
    return [], entries if isinstance(entries, list) else [entries]


def _event_text(entry: Any, fields: list[str]) -> str:
    """One event as ``step=20, tower=vision, blocks=[1, 4]`` when its fields are named, else JSON."""

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))

    if fields and isinstance(entry, list) and len(entry) == len(fields):
        return ", ".join(f"{f}={text(v)}" for f, v in zip(fields, entry, strict=True))
    return json.dumps(entry, separators=(", ", ": "))


def _strategy_view(record: dict[str, Any], color: str) -> dict[str, Any]:
    """The strategy's own figures of one run, from the generic record conventions."""
    view: dict[str, Any] = {
        "per_experience": None,
        "scalars": [],
        "curves": [],
        "per_layer": [],
        "events": [],
        "variants": None,
    }
    per_exp = tables.strategy_scalars_frame(record)
    if not per_exp.empty and len(per_exp.columns):
        view["per_experience"] = {
            "plot": plots.small_multiples(per_exp, color),
            "headers": ["exp", *per_exp.columns],
            "rows": [
                [str(idx), *(fmt_value(None if pd.isna(v) else v) for v in row)]
                for idx, row in zip(per_exp.index, per_exp.itertuples(index=False), strict=True)
            ],
        }
    report = record.get("strategy_report") or {}
    scalars = report.get("scalars") or {}
    if isinstance(scalars, dict) and scalars:
        view["scalars"] = [(str(k), fmt_value(v)) for k, v in scalars.items()]
    curves = []
    for name, curve in (report.get("curves") or {}).items():
        series = _curve_series(curve) if isinstance(curve, dict) else None
        if series is None:
            continue
        x, ys = series
        x_label, y_label = str(curve.get("x_label", "")), str(curve.get("y_label", ""))
        if curve.get("kind") == "bar":  # counts per x (DyLoRA's steps per sampled rank)
            values = ys if len(ys) > 1 else next(iter(ys.values()))
            plot = plots.bar_plot(x, values, x_label=x_label, y_label=y_label, title=str(name), color=color)
        else:
            plot = plots.line_plot(x, ys, x_label=x_label, y_label=y_label, title=str(name), color=color)
        curves.append({"name": str(name), "plot": plot})
    if curves:
        view["curves"] = curves
    per_layer = []
    for name, values in (report.get("per_layer") or {}).items():
        if isinstance(values, dict) and values:
            per_layer.append(
                {
                    "name": str(name),
                    "n": len(values),
                    "plot": plots.bar_plot(list(values), list(values.values()), title=str(name), color=color),
                }
            )
    if per_layer:
        view["per_layer"] = per_layer
    events = []
    for name, entries in (report.get("events") or {}).items():
        fields, items = _event_entries(entries)
        events.append(
            {
                "name": str(name),
                "count": len(items),
                "fields": fields,
                "first": [_event_text(e, fields)[:160] for e in items[:5]],
            }
        )
    if events:
        view["events"] = events
    variants = tables.variants_frame(record)
    if not variants.empty:
        view["variants"] = {
            "plot": None,
            "same_pass": variants["variant"].iloc[0] == tables.MAIN_VARIANT,
            "rows": [
                [
                    row.variant,
                    fmt_float(row.acc_final),
                    "" if pos == 0 else _signed(row.acc_delta),
                    fmt_rate(row.eval_samples_per_s),
                    "" if pos == 0 else (f"{row.speedup:.2f}×" if _is_num(row.speedup) else DASH),
                    fmt_bytes(row.peak_memory_eval_bytes),
                ]
                for pos, row in enumerate(variants.itertuples(index=False))
            ],
        }
        ranks = tables.rank_variants(record)
        if len(ranks) >= 2:
            main_acc = (record.get("metrics") or {}).get("acc_final")
            view["variants"]["plot"] = plots.line_plot(
                ranks["rank"].tolist(),
                {"acc_final": ranks["acc_final"].tolist()},
                x_label="rank",
                y_label="acc_final",
                title="accuracy vs rank (final model)",
                color=color,
                reference=("main model", float(main_acc)) if _is_num(main_acc) else None,
                log2_x=True,
            )
    view["present"] = any(view.values())
    return view


def _signed(value: Any) -> str:
    return f"{value:+.3f}" if _is_num(value) else DASH


def _run_learning(record: dict[str, Any], margin: float) -> dict[str, str]:
    """One run's plasticity against its chance and learning threshold, and its flag if below."""
    plasticity = (record.get("metrics") or {}).get("plasticity")
    chance = tables.chance_plasticity(record)
    threshold = None if chance is None else tables.learned_threshold(chance, margin)
    if not tables.trained(record):
        flag = tables.NO_TRAINING
    elif threshold is None or not _is_num(plasticity):
        flag = tables.CHANCE_UNKNOWN
    elif round(plasticity, 3) < round(threshold, 3):
        flag = tables.NOT_LEARNED
    else:
        flag = ""
    return {
        "plasticity": fmt_float(plasticity),
        "chance": fmt_float(chance),
        "threshold": fmt_float(threshold),
        "flag": flag,
        "flag_kind": "muted" if flag == tables.NO_TRAINING else "warn",
    }


def _run_view(record: dict[str, Any], color: str, config_label: str, margin: float) -> dict[str, Any]:
    config = record.get("config") or {}
    accuracy = record.get("accuracy") or {}
    metrics = record.get("metrics") or {}
    env = record.get("environment") or {}
    backbone = record.get("backbone") or {}
    run_id = str(record["run_id"])
    return {
        "id": run_id,
        "anchor": _anchor(run_id),
        "error": None,
        "strategy": config.get("strategy"),
        "label": group_label(config.get("strategy"), config_label),
        "strategy_class": (record.get("strategy") or {}).get("class"),
        "paper": (record.get("strategy") or {}).get("paper"),
        "scenario": config.get("scenario"),
        "backbone": config.get("backbone"),
        "pretrained": backbone.get("pretrained"),
        "seed": config.get("seed"),
        "order_seed": config.get("order_seed"),
        "color": color,
        "label_space": accuracy.get("label_space"),
        "protocol": accuracy.get("protocol"),
        "learning": _run_learning(record, margin),
        "metrics": [
            {"name": m, "value": fmt_float(metrics.get(m)), "formula": FORMULAS[m]}
            for m in (*METRIC_COLUMNS, *(m for m in MULTIDOMAIN_METRICS if m in metrics))
        ],
        "heatmap": plots.accuracy_heatmap(
            accuracy.get("matrix") or [],
            accuracy.get("initial"),
            multidomain.record_domains(record) if multidomain.benchmark_of(record) else None,
        ),
        "curves": plots.run_curves(record, color),
        "experiences": _table(tables.experiences_frame(record), EXPERIENCE_VIEW),
        "memory_kind": ((record.get("experiences") or [{}])[-1]).get("memory_kind"),
        "strategy_figures": _strategy_view(record, color),
        "provenance": {
            "git": f"{env.get('git_sha') or 'unknown'}"
            + (" (uncommitted changes)" if env.get("git_dirty") else ""),
            "device": " / ".join(str(v) for v in (env.get("device"), env.get("device_name")) if v),
            "precision": env.get("precision"),
            "python": env.get("python"),
            "platform": env.get("platform"),
            "hostname": env.get("hostname"),
            "created": record.get("created"),
            "finished": record.get("finished"),
            "weights": backbone.get("weights") or backbone.get("source"),
            "versions": ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v),
            "path": record.get("_path"),
            "config": json.dumps(config, indent=1, sort_keys=False),
        },
    }


def _run_section(record: dict[str, Any], color: str, config_label: str, margin: float) -> dict[str, Any]:
    """:func:`_run_view`, or where building it raises, a section saying so (with a warning).

    The records are checked beforehand (:mod:`reports.validate`), but a run's section draws many
    figures from strategy-specific data: a failure nobody foresaw there must cost that section, not
    the page of every other run. Its overview numbers, computed apart, stay in the page.
    """
    try:
        return _run_view(record, color, config_label, margin)
    except Exception as err:  # any failure of one section: the warning names it
        error = " ".join(f"{type(err).__name__}: {err}".split())
        _warn(
            f"run {record['run_id']}: its section could not be drawn ({error}); "
            "the page shows its overview figures only"
        )
        config = record.get("config") or {}
        return {
            "id": str(record["run_id"]),
            "anchor": _anchor(str(record["run_id"])),
            "error": error,
            "label": group_label(config.get("strategy"), config_label),
            "scenario": config.get("scenario"),
            "seed": config.get("seed"),
            "color": color,
            "path": record.get("_path"),
        }


def _multidomain_section(
    ok: list[dict[str, Any]], labels: dict[str, str], colors: dict[str, str]
) -> dict[str, Any]:
    """The X-TAIL / MTIL section (:func:`reports.multidomain.multidomain_view`): its tables, or
    where drawing them raises, the error (with a warning) so that the rest of the page stands."""
    try:
        return {"tables": multidomain.multidomain_view(ok, labels, colors, _warn), "error": None}
    except Exception as err:  # any failure of the section: the warning names it
        error = " ".join(f"{type(err).__name__}: {err}".split())
        _warn(f"the X-TAIL / MTIL section could not be drawn ({error})")
        return {"tables": [], "error": error}


def _federated_section(
    ok: list[dict[str, Any]], labels: dict[str, str], colors: dict[str, str]
) -> dict[str, Any]:
    """The federated section (:func:`reports.federated.federated_view`; ``view`` None without a
    federated run), or where drawing it raises, the error (with a warning) so that the rest of the
    page stands."""
    try:
        view = federated.federated_view(ok, labels, colors, _warn, competition_title, _anchor)
        return {"view": view, "error": None}
    except Exception as err:  # any failure of the section: the warning names it
        error = " ".join(f"{type(err).__name__}: {err}".split())
        _warn(f"the federated section could not be drawn ({error})")
        return {"view": None, "error": error}


def _provenance_rows(records: Iterable[dict[str, Any]], colors: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        config = record.get("config") or {}
        env = record.get("environment") or {}
        backbone = record.get("backbone") or {}
        sha = env.get("git_sha")
        rows.append(
            {
                "run_id": record["run_id"],
                "anchor": _anchor(str(record["run_id"])),
                "status": record.get("status"),
                "strategy": config.get("strategy"),
                "color": colors.get(str(config.get("strategy")), "#333"),
                "scenario": config.get("scenario"),
                "backbone": config.get("backbone"),
                "pretrained": backbone.get("pretrained"),
                "seed": config.get("seed"),
                "order_seed": config.get("order_seed"),
                "git": (sha[:10] if sha else "unknown") + ("*" if env.get("git_dirty") else ""),
                "device": " / ".join(str(v) for v in (env.get("device"), env.get("device_name")) if v),
                "precision": env.get("precision"),
                "created": fmt_time(record.get("created")),
            }
        )
    return rows


def _versions_summary(records: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each package with the distinct versions the runs used (one value in the common case)."""
    seen: dict[str, list[str]] = {}
    for record in records:
        env = record.get("environment") or {}
        pairs = [("python", env.get("python")), *(env.get("versions") or {}).items()]
        for name, version in pairs:
            values = seen.setdefault(str(name), [])
            text = str(version) if version else "not installed"
            if text not in values:
                values.append(text)
    return [(name, ", ".join(values)) for name, values in seen.items()]


# ----------------------------------------------------------------------------- entry point


def _warn(message: str) -> None:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr)


def _csv_paths(output: Path) -> dict[str, Path]:
    names = ("overview", "runs", "parameters", "resources", "variants", "excluded")
    return {name: output.with_name(f"{output.stem}_{name}.csv") for name in names}


def _variants_all(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frames = []
    for record in records:
        frame = tables.variants_frame(record)
        if not frame.empty:
            frame.insert(0, "run_id", record["run_id"])
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "variant"])


def build_report(paths: list[Path], output: Path, *, margin: float = tables.LEARNED_MARGIN) -> Path:
    """Write the HTML report of every run record under ``paths`` to ``output``; return its path.

    Next to it go the tables as CSV (``<stem>_overview.csv``, ``_runs.csv``, ``_parameters.csv``,
    ``_resources.csv``, ``_variants.csv``, ``_excluded.csv``). Unreadable files, and records whose
    contents the report cannot read (:func:`reports.validate.record_problem`), are named on stderr
    and in the report; failed or incomplete runs are listed apart and never averaged. Raises
    ClBenchError when no completed run record is found, so an empty report never looks good, and
    before writing anything when ``output`` is no place for a report
    (:func:`reports.output.output_refusal`: a ``.json`` path, an input record, a file that is not a
    cl-bench report). Temp files a killed report left for these files are removed first
    (:func:`reports.output.remove_stale_temps`).

    ``margin`` sets when a group counts as having learned, and so may hold a best mark: mean
    plasticity >= chance + margin x (1 - chance) (:func:`reports.tables.learned_threshold`); the
    page prints the rule and every group's threshold.
    """
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be a share of the gap to perfect accuracy in [0, 1], got {margin}")
    output = Path(output)
    records, problems = find_records(paths)
    read = [Path(p) for p in paths if Path(p).is_file()]
    read += [Path(r["_path"]) for r in records] + [p.path for p in problems]
    if (refusal := output_refusal(output, read)) is not None:
        raise ClBenchError(refusal)
    records, hostile = _usable(records)
    problems = [*problems, *hostile]
    for problem in problems:
        _warn(f"skipped {problem.path}: {problem.reason}")
    ok = [r for r in records if r["status"] == "ok"]
    excluded = [r for r in records if r["status"] != "ok"]
    for record in excluded:
        _warn(f"run {record['run_id']} left out of the averages: {tables.failure_reason(record)}")
    if not ok:
        where = ", ".join(str(p) for p in paths)
        raise ClBenchError(
            f"no usable run record in {where} ({len(excluded)} failed or incomplete, "
            f"{len(problems)} unreadable): nothing to report"
        )
    html = render(ok, excluded, problems, paths, output, margin=margin)
    csvs = _csv_paths(output)
    runs = tables.runs_frame(records)
    ok_runs = runs[runs["status"] == "ok"]
    frames = {
        "overview": tables.overview_frame(runs, margin),
        "runs": runs,
        "parameters": tables.aggregate(ok_runs, tables.PARAMETER_COLUMNS),
        "resources": tables.aggregate(ok_runs, tables.resource_columns(ok_runs)),
        "variants": _variants_all(ok),
        "excluded": tables.problems_frame(excluded, problems, _labels(runs)),
    }
    remove_stale_temps([*csvs.values(), output])
    for name, frame in frames.items():
        write_text_atomic(csvs[name], frame.to_csv(index=False))
    write_text_atomic(output, html)
    return output


def _usable(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[RecordProblem]]:
    """The records the report can read, and a :class:`RecordProblem` for each of the others
    (:func:`reports.validate.record_problem`): they are skipped like unreadable files."""
    usable, problems = [], []
    for record in records:
        why = record_problem(record)
        if why is None:
            usable.append(record)
        else:
            problems.append(RecordProblem(Path(record["_path"]), why))
    return usable, problems


def _labels(runs: pd.DataFrame) -> dict[str, str]:
    """``run_id`` -> config label, from a :func:`reports.tables.runs_frame`."""
    return dict(zip(runs["run_id"].astype(str), runs[tables.CONFIG], strict=True))


def _scenario_groups(
    ok: list[dict[str, Any]], labels: dict[str, str]
) -> list[tuple[str, dict[str, list[Any]]]]:
    """Per scenario (sorted), its completed runs by group label (backbone named where it varies)."""
    out = []
    for scenario in sorted({str(r["config"]["scenario"]) for r in ok}):
        records = [r for r in ok if str(r["config"]["scenario"]) == scenario]
        several_backbones = len({str(r["config"].get("backbone")) for r in records}) > 1
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            config = record["config"]
            name = str(config["strategy"]) + (f" / {config.get('backbone')}" if several_backbones else "")
            groups.setdefault(group_label(name, labels[str(record["run_id"])]), []).append(record)
        out.append((scenario, groups))
    return out


def render(
    ok: list[dict[str, Any]],
    excluded: list[dict[str, Any]],
    problems: list[RecordProblem],
    paths: Sequence[Path],
    output: Path,
    *,
    margin: float = tables.LEARNED_MARGIN,
) -> str:
    """The HTML page for completed runs ``ok`` (sorted), with ``excluded`` runs and ``problems`` listed;
    ``margin`` as in :func:`build_report`."""
    colors = plots.strategy_colors([str(r["config"]["strategy"]) for r in ok + excluded])
    all_runs = tables.runs_frame(ok + excluded)
    labels = _labels(all_runs)
    runs = all_runs[all_runs["status"] == "ok"]
    resource_view = _resource_view(tables.resource_columns(runs))
    scenarios = [
        {"name": scenario, "plot": plots.scenario_curves(groups, colors)}
        for scenario, groups in _scenario_groups(ok, labels)
    ]
    not_pretrained = [r for r in ok if (r.get("backbone") or {}).get("pretrained") is False]
    excluded_rows = tables.problems_frame(excluded, [], labels).to_dict("records")
    for row in excluded_rows:
        row["color"] = colors.get(row["strategy"], "#333")
        row["label"] = group_label(row["strategy"], row[tables.CONFIG])
        row["seed"] = DASH if pd.isna(row["seed"]) else int(row["seed"])
    context = {
        "title": "cl-bench report",
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "inputs": [str(p) for p in paths],
        "n_ok": len(ok),
        "n_excluded": len(excluded),
        "n_unreadable": len(problems),
        "csv_files": [p.name for p in _csv_paths(output).values()],
        "metric_defs": _metric_defs(),
        "overview_metrics": [
            {"name": m, "formula": FORMULAS[m], "direction": "↓" if m in tables.LOWER_IS_BETTER else "↑"}
            for m in tables.OVERVIEW_METRICS
        ],
        "overview": _overview_view(tables.overview_frame(all_runs, margin), colors),
        "multidomain": _multidomain_section(ok, labels, colors),
        "federated": _federated_section(ok, labels, colors),
        "margin": f"{margin:.2f}",
        "tradeoffs": _tradeoff_view(all_runs, colors, margin),
        "non_experiment_keys": sorted(tables.NON_EXPERIMENT_KEYS),
        "parameter_headers": [label for _, label, _ in PARAMETER_VIEW],
        "parameters": _aggregate_view(
            tables.aggregate(runs, tables.PARAMETER_COLUMNS), PARAMETER_VIEW, colors
        ),
        "resource_headers": [label for _, label, _ in resource_view],
        "resources": _aggregate_view(
            tables.aggregate(runs, [c for c, _, _ in resource_view]), resource_view, colors
        ),
        "memory_kinds": sorted({str(k) for k in runs["memory_kind"].dropna()}),
        "scenarios": scenarios,
        "runs": [
            _run_section(r, colors[str(r["config"]["strategy"])], labels[str(r["run_id"])], margin)
            for r in ok
        ],
        "excluded": excluded_rows,
        "problems": [{"path": str(p.path), "reason": p.reason} for p in problems],
        "not_pretrained": [
            {"run_id": r["run_id"], "backbone": (r.get("backbone") or {}).get("name")} for r in not_pretrained
        ],
        "not_pretrained_backbones": sorted(
            {str((r.get("backbone") or {}).get("name")) for r in not_pretrained}
        ),
        "provenance": _provenance_rows(ok + excluded, colors),
        "versions": _versions_summary(ok + excluded),
        "strategies": [{"name": n, "color": c} for n, c in colors.items()],
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**context)
