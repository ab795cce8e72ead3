"""The report's federated section (issue 19): what each federated run communicated, for what accuracy.

A run is federated when its record has a ``federation`` section (docs/federation.md: the config
of the federation, the clients' partition sizes, one entry per (experience, round) and the byte
totals); the section appears only when some completed run is. Per competition (scenario, protocol,
label space, as in the overview, whose accuracies are comparable) it gives:

- a table, one row per run: strategy, clients K, rounds R per experience, participation (and the
  clients that trained per round, from the rounds' client lists), partition (Dirichlet ``alpha``),
  aggregation, backend, bytes communicated (upload + download) in total, per round, uploaded and
  downloaded (binary units, with the exact byte count), ``acc_final`` and ``forgetting``
  (METRICS.md), the run's training time, the clients' summed training time and the peak memory of
  any client in any round;
- final accuracy against total bytes communicated (log scale), one point per run: the question
  FLoRA asks, which method keeps old tasks best for how much communication;
- the seen-class accuracy after every round, one line per run, on the experience axis (round r of
  experience e at e + (r + 1) / R, experience boundaries dashed).

A record whose ``federation`` section the section cannot read (:func:`federation_problem`: not an
object, a byte total that is no count, a round without its experience...) is left out of the
section with one warning and a note naming the run and the field; the rest of the report shows it
like any other run. The main tables carry ``communication_bytes`` of every run
(:func:`cl_bench.results.run_row`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cl_bench.results import run_row
from reports import plots, tables

COUNTS = ("communication_bytes", "upload_bytes_total", "download_bytes_total")
"""Byte totals every federated record must hold, each a count."""
ROUND_LISTS = (
    "clients",
    "upload_bytes",
    "download_bytes",
    "client_train_s",
    "client_peak_bytes",
    "client_samples",
    "loss_mean",
)
"""Per-client lists of a round entry: lists of numbers (or null) where present."""


def is_federated(record: dict[str, Any]) -> bool:
    """Whether the record claims a federated run: it has a ``federation`` value other than null."""
    return record.get("federation") is not None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    """An integer in [0, 2**63): a byte total, a client or round count, an index."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or _number(v) for v in value)


def _problems(federation: Any) -> Iterator[str]:
    """Every problem of a ``federation`` value, in the order the fields are documented; a check
    runs only once those before it passed."""
    if not isinstance(federation, dict):
        yield f"federation is {_show(federation)}, not an object"
    config = federation.get("config")
    if not isinstance(config, dict):
        yield f"federation.config is {_show(config)}, not an object"
    for key in ("clients", "rounds"):
        if not _count(config.get(key)) or config[key] < 1:
            yield f"federation.config.{key} is {_show(config.get(key))}, not a positive integer"
    for key in ("participation", "alpha"):
        if config.get(key) is not None and not _number(config[key]):
            yield f"federation.config.{key} is {_show(config[key])}, not a number"
    for key in ("partition", "aggregation", "backend"):
        if config.get(key) is not None and not isinstance(config[key], str):
            yield f"federation.config.{key} is {_show(config[key])}, not a name"
    if federation.get("backend") is not None and not isinstance(federation["backend"], str):
        yield f"federation.backend is {_show(federation['backend'])}, not a name"
    for key in COUNTS:
        if not _count(federation.get(key)):
            yield f"federation.{key} is {_show(federation.get(key))}, not a count of bytes"
    for key in ("bytes_per_round", "wall_s"):
        if federation.get(key) is not None and not _number(federation[key]):
            yield f"federation.{key} is {_show(federation[key])}, not a number"
    rounds = federation.get("rounds")
    if not isinstance(rounds, list):
        yield f"federation.rounds is {_show(rounds)}, not a list"
    for i, entry in enumerate(rounds):
        where = f"federation.rounds[{i}]"
        if not isinstance(entry, dict):
            yield f"{where} is {_show(entry)}, not an object"
        for key in ("experience", "round"):
            if not _count(entry.get(key)):
                yield f"{where}.{key} is {_show(entry.get(key))}, not an index"
        accuracy = entry.get("seen_accuracy")
        if accuracy is not None and not _number(accuracy):
            yield f"{where}.seen_accuracy is {_show(accuracy)}, not a number or null"
        for key in ROUND_LISTS:
            if entry.get(key) is not None and not _numbers(entry[key]):
                yield f"{where}.{key} is {_show(entry[key])}, not a list of numbers"


def federation_problem(record: dict[str, Any]) -> str | None:
    """Why the section cannot read the record's ``federation`` (one line naming the field), or None
    when it can (or the record is not federated)."""
    return next(_problems(record["federation"]), None) if is_federated(record) else None


def _floats(values: Any) -> list[float]:
    """The finite numbers of a per-client list (absent, null and non-finite entries left out)."""
    return [float(v) for v in values or [] if _number(v) and math.isfinite(v)]


def _float(value: Any) -> float:
    return float(value) if _number(value) else math.nan


def _per_round(rounds: list[dict[str, Any]]) -> str:
    """The number of clients that trained per round, from the rounds' client lists: ``5``, or
    ``3–5`` where it varies; ``""`` when no round lists its clients."""
    sizes = sorted({len(r["clients"]) for r in rounds if isinstance(r.get("clients"), list)})
    if not sizes:
        return ""
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"


def round_series(federation: dict[str, Any]) -> tuple[list[float], list[float]]:
    """``(x, seen accuracy)`` of a readable ``federation`` (:func:`federation_problem` None), in the
    rounds' order: round r of experience e at e + (r + 1) / R_e, where R_e is the larger of the
    configured rounds and the rounds experience e recorded (see :class:`reports.plots.RoundSeries`)."""
    rounds = federation["rounds"]
    configured = federation["config"]["rounds"]
    per_experience: dict[int, int] = {}
    for entry in rounds:
        e = entry["experience"]
        per_experience[e] = max(per_experience.get(e, configured), entry["round"] + 1)
    x = [e["experience"] + (e["round"] + 1) / per_experience[e["experience"]] for e in rounds]
    return x, [_float(e.get("seen_accuracy")) for e in rounds]


def federated_row(record: dict[str, Any], label: str) -> dict[str, Any]:
    """The table row of one readable federated run: identity, federation settings, byte totals,
    accuracy and cost figures as plain numbers and names (NaN and ``""`` where absent).

    ``label`` is the run's :data:`reports.tables.CONFIG` label."""
    federation = record["federation"]
    config = federation["config"]
    row = run_row(record)
    protocol, label_space = tables.scoring(record)
    rounds = federation["rounds"]
    peaks = [p for r in rounds for p in _floats(r.get("client_peak_bytes"))]
    train_s = [s for r in rounds for s in _floats(r.get("client_train_s"))]
    return {
        "run_id": str(record["run_id"]),
        "scenario": str(row["scenario"]),
        "protocol": protocol,
        "label_space": label_space,
        "strategy": str(row["strategy"]),
        "backbone": str(row["backbone"]),
        tables.CONFIG: label,
        "seed": row["seed"],
        "clients": config["clients"],
        "rounds": config["rounds"],
        "participation": _float(config.get("participation")),
        "clients_per_round": _per_round(rounds),
        "partition": str(config.get("partition") or ""),
        "alpha": _float(config.get("alpha")),
        "aggregation": str(config.get("aggregation") or ""),
        "backend": str(federation.get("backend") or config.get("backend") or ""),
        "communication_bytes": federation["communication_bytes"],
        "bytes_per_round": _float(federation.get("bytes_per_round")),
        "upload_bytes": federation["upload_bytes_total"],
        "download_bytes": federation["download_bytes_total"],
        "n_rounds": len(rounds),
        "acc_final": _float(row["acc_final"]),
        "forgetting": _float(row["forgetting"]),
        "train_time_s": _float(row["train_time_s"]),
        "client_train_s": math.fsum(train_s) if train_s else math.nan,
        "peak_client_bytes": max(peaks) if peaks else math.nan,
        "wall_s": _float(federation.get("wall_s")),
        "n_experiences": row["n_experiences"] or 0,
    }


# ----------------------------------------------------------------------------- the page's view


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _number(value) and math.isfinite(value) else "—"


def _seconds(value: Any) -> str:
    return f"{value:,.1f} s" if _number(value) and math.isfinite(value) else "—"


def _bytes_cell(value: Any) -> dict[str, str]:
    """A byte figure in binary units, the exact count below it (``12.0 MiB`` / ``12,582,912 B``)."""
    if not _number(value) or not math.isfinite(value):
        return {"value": "—", "exact": ""}
    exact = f"{int(value):,} B" if float(value).is_integer() else f"{value:,.1f} B"
    return {"value": plots.human_bytes(value), "exact": exact}


def _partition(row: dict[str, Any]) -> str:
    """``iid``, ``dirichlet (α = 0.5)``; the alpha is shown for a Dirichlet partition only."""
    name = row["partition"] or "—"
    return f"{name} (α = {row['alpha']:g})" if name == "dirichlet" and math.isfinite(row["alpha"]) else name


def _participation(row: dict[str, Any]) -> str:
    """``0.5`` and, where the rounds list their clients, ``· 5/round``."""
    share = f"{row['participation']:g}" if math.isfinite(row["participation"]) else "—"
    return f"{share} · {row['clients_per_round']}/round" if row["clients_per_round"] else share


def _name(row: dict[str, Any]) -> str:
    """A run's strategy, with its config label in brackets where its group has one."""
    return row["strategy"] + (f" [{row[tables.CONFIG]}]" if row[tables.CONFIG] else "")


def _label(row: dict[str, Any]) -> str:
    """A run's name in the plots: :func:`_name` and its seed."""
    return f"{_name(row)}, seed {row['seed']}" if row["seed"] is not None else _name(row)


def _view_row(row: dict[str, Any], colors: dict[str, str], anchor: Callable[[str], str]) -> dict[str, Any]:
    return {
        "run_id": row["run_id"],
        "anchor": anchor(row["run_id"]),
        "label": _name(row),
        "color": colors.get(row["strategy"], "#333"),
        "seed": "—" if row["seed"] is None else str(row["seed"]),
        "clients": str(row["clients"]),
        "rounds": str(row["rounds"]),
        "participation": _participation(row),
        "partition": _partition(row),
        "aggregation": row["aggregation"] or "—",
        "backend": row["backend"] or "—",
        "bytes": [
            _bytes_cell(row[key])
            for key in ("communication_bytes", "bytes_per_round", "upload_bytes", "download_bytes")
        ],
        "acc_final": _fmt(row["acc_final"]),
        "forgetting": _fmt(row["forgetting"]),
        "train_time": _seconds(row["train_time_s"]),
        "client_train": _seconds(row["client_train_s"]),
        "peak_client": _bytes_cell(row["peak_client_bytes"])["value"],
    }


def federated_view(
    records: Sequence[dict[str, Any]],
    labels: dict[str, str],
    colors: dict[str, str],
    warn: Callable[[str], None],
    title: Callable[[str, str, str], str],
    anchor: Callable[[str], str],
) -> dict[str, Any] | None:
    """The section: per competition (``title(scenario, protocol, label_space)``, sorted) its table
    rows and two plots, and the federated runs left out with why; None when no record is federated.

    ``records`` are the completed runs, ``labels`` their :data:`reports.tables.CONFIG` labels by run
    id, ``anchor`` a run id's section anchor. Each run left out gets one ``warn`` line."""
    federated = [r for r in records if is_federated(r)]
    if not federated:
        return None
    skipped, rows = [], []
    for record in federated:
        problem = federation_problem(record)
        if problem is None:
            rows.append((record, federated_row(record, labels.get(str(record["run_id"]), ""))))
            continue
        skipped.append({"run_id": str(record["run_id"]), "reason": problem})
        warn(f"run {record['run_id']}: {problem}; it is left out of the federated section")
    competitions: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    order = sorted(
        rows, key=lambda p: (p[1]["strategy"], p[1][tables.CONFIG], p[1]["seed"] or 0, p[1]["run_id"])
    )
    for record, row in order:
        competitions.setdefault((row["scenario"], row["protocol"], row["label_space"]), []).append(
            (record, row)
        )
    views = []
    for key in sorted(competitions):
        members = competitions[key]
        points = [
            plots.CommunicationPoint(
                _label(row), row["strategy"], row["communication_bytes"], row["acc_final"]
            )
            for _, row in members
        ]
        series = [
            plots.RoundSeries(_label(row), row["strategy"], *round_series(r["federation"]))
            for r, row in members
        ]
        views.append(
            {
                "title": title(*key),
                "rows": [_view_row(row, colors, anchor) for _, row in members],
                "communication": plots.communication_plot(points, colors),
                "not_placed": [
                    row["run_id"]
                    for _, row in members
                    if not (row["communication_bytes"] > 0 and math.isfinite(row["acc_final"]))
                ],
                "rounds": plots.round_curves(series, colors, max(row["n_experiences"] for _, row in members)),
            }
        )
    return {"competitions": views, "skipped": skipped}
