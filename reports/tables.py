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

Competitions and best marks. The overview compares groups only within a competition
(:data:`COMPETITION`: scenario, protocol, label space), because a task-incremental accuracy (a
sample against its own task's classes) and a class-incremental one (against every class seen so
far, or all of them) are different numbers of the same data. Within a competition a group can
hold a best mark (★) only when it is *eligible* (:func:`overview_frame`): its strategy trains
(:func:`trained`: zero-shot does not, and low forgetting without learning is not a win) and it
learned, judged from the records alone: its mean ``plasticity`` (1/T) sum_j R[j][j] reaches
:func:`learned_threshold` of its chance level (:func:`chance_plasticity`), i.e. closes at least
``margin`` (default :data:`LEARNED_MARGIN` = 0.2) of the gap between chance and perfect accuracy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeGuard

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

COMPETITION: list[str] = ["scenario", "protocol", "label_space"]
"""Groups compete for a best mark only with the groups that share these (module docstring)."""
OVERVIEW_KEYS: list[str] = [*COMPETITION, "strategy", "backbone", CONFIG]
"""The keys (and sort order) of an overview row: :data:`GROUP_KEYS` within its competition."""

LEARNED_MARGIN = 0.2
"""Default share of the gap between chance and perfect accuracy that a run's plasticity must close
to count as having learned (:func:`learned_threshold`)."""

OVERVIEW_METRICS: tuple[str, ...] = (
    "acc_final",
    "acc_avg_incremental",
    "plasticity",
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
COST_COLUMNS: tuple[str, ...] = ("n_trainable", "train_time_s")
"""The costs the forgetting trade-off plots set forgetting against (:func:`tradeoff_frame`)."""
RESOURCE_COLUMNS: tuple[str, ...] = (
    "peak_memory_train_bytes",
    "peak_memory_eval_bytes",
    "train_samples_per_s",
    "eval_samples_per_s",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
)
COMMUNICATION = "communication_bytes"
"""A federated run's bytes uploaded plus downloaded (:func:`cl_bench.results.run_row`): a resource
column where some run is federated (:func:`resource_columns`)."""


def resource_columns(runs: pd.DataFrame) -> tuple[str, ...]:
    """:data:`RESOURCE_COLUMNS`, and :data:`COMMUNICATION` after them where some run of ``runs``
    communicated (a federated run): a report without federated runs has no empty bytes column."""
    federated = COMMUNICATION in runs.columns and bool(runs[COMMUNICATION].notna().any())
    return (*RESOURCE_COLUMNS, COMMUNICATION) if federated else RESOURCE_COLUMNS


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
    computed over these records), ``protocol`` and ``label_space`` (:func:`scoring`), and at the
    end ``trained`` (:func:`trained`) and ``chance`` (:func:`chance_plasticity`, NaN when the record
    does not say how many classes compete); seeds and ``communication_bytes`` as nullable integers."""
    records = list(records)
    labels = config_labels(records)
    columns = list(run_row({}).keys())
    frame = pd.DataFrame([run_row(r) for r in records], columns=columns)
    at = columns.index("backbone") + 1
    frame.insert(at, CONFIG, [labels[str(r.get("run_id"))] for r in records])
    frame.insert(at + 1, "protocol", [scoring(r)[0] for r in records])
    frame.insert(at + 2, "label_space", [scoring(r)[1] for r in records])
    for col in ("seed", "order_seed", COMMUNICATION):
        frame[col] = _int_column(frame[col])
    frame["trained"] = pd.Series([trained(r) for r in records], index=frame.index, dtype="boolean")
    chances = [chance_plasticity(r) for r in records]
    frame["chance"] = pd.Series(
        [math.nan if c is None else c for c in chances], index=frame.index, dtype="float64"
    )
    return frame


# ----------------------------------------------------------------------------- eligibility


def scoring(record: dict[str, Any]) -> tuple[str, str]:
    """``(protocol, label_space)`` of a run's accuracy matrix (METRICS.md).

    From ``accuracy.protocol`` / ``accuracy.label_space``, else ``scenario.protocol`` /
    ``config.label_space``, else the defaults a run without the key had: ``class`` and ``seen``.
    """
    accuracy = record.get("accuracy") or {}
    protocol = accuracy.get("protocol") or (record.get("scenario") or {}).get("protocol") or "class"
    label_space = accuracy.get("label_space") or (record.get("config") or {}).get("label_space") or "seen"
    return str(protocol), str(label_space)


def trained(record: dict[str, Any]) -> bool:
    """Whether the run trained, from what the record says happened, not from the strategy's name.

    True when some experience recorded training steps (``steps`` > 0) with trainable parameters
    (``n_trainable`` > 0 where recorded); the loop records 0 steps and 0 trainable parameters for a
    strategy that does not train (zero-shot). A record whose experiences carry no ``steps`` falls
    back on ``parameters.trainable`` > 0. Without either there is no evidence of training: False.
    """
    experiences = [e for e in record.get("experiences") or [] if isinstance(e, dict)]
    with_steps = [e for e in experiences if _number(e.get("steps"))]
    if with_steps:
        return any(
            e["steps"] > 0 and (not _number(e.get("n_trainable")) or e["n_trainable"] > 0) for e in with_steps
        )
    trainable = (record.get("parameters") or {}).get("trainable")
    return _number(trainable) and trainable > 0


def _classes_per_experience(record: dict[str, Any], T: int) -> list[set[str]] | None:
    """The classes of each of the T experiences: ``scenario.classes_per_experience``, else
    ``experiences[i].classes``; None when neither lists all T."""

    def sets(lists: Any) -> list[set[str]] | None:
        if not isinstance(lists, list) or len(lists) != T:
            return None
        if not all(isinstance(c, list) and c for c in lists):
            return None
        return [{repr(v) for v in c} for c in lists]

    listed = sets((record.get("scenario") or {}).get("classes_per_experience"))
    if listed is not None:
        return listed
    experiences = record.get("experiences") or []
    return sets([e.get("classes") if isinstance(e, dict) else None for e in experiences])


def competing_classes(record: dict[str, Any]) -> list[int] | None:
    """K_j: the number of classes that compete in diagonal cell (j, j) of the accuracy matrix.

    By the scoring rule of the run (METRICS.md, :func:`scoring`): task-incremental, the classes of
    experience j; class-incremental with label space ``all``, every class of the scenario
    (``scenario.n_classes``, else the union of the experiences' classes); with ``seen``, the
    classes of experiences 0..j. The classes come from :func:`_classes_per_experience`; a record
    that lists none but gives ``scenario.n_classes`` is taken as an even split (n_classes / T per
    experience). None when the record allows neither.
    """
    T = len((record.get("accuracy") or {}).get("matrix") or [])
    if T == 0:
        return None
    protocol, label_space = scoring(record)
    n_classes = (record.get("scenario") or {}).get("n_classes")
    per_exp = _classes_per_experience(record, T)
    if per_exp is not None:
        if protocol == "task":
            return [len(c) for c in per_exp]
        if label_space == "all":
            union = len(set().union(*per_exp))
            return [max(union, int(n_classes)) if _number(n_classes) else union] * T
        return [len(set().union(*per_exp[: j + 1])) for j in range(T)]
    if not _number(n_classes) or n_classes < T:
        return None
    share = n_classes / T
    if protocol == "task":
        return [round(share)] * T
    if label_space == "all":
        return [int(n_classes)] * T
    return [round(share * (j + 1)) for j in range(T)]


def chance_plasticity(record: dict[str, Any]) -> float | None:
    """The plasticity of uniform random guessing: (1/T) sum_j 1/K_j (:func:`competing_classes`).

    None when the record does not say how many classes compete.
    """
    counts = competing_classes(record)
    if not counts or any(k < 1 for k in counts):
        return None
    return sum(1.0 / k for k in counts) / len(counts)


def learned_threshold(chance: float, margin: float = LEARNED_MARGIN) -> float:
    """The plasticity a run must reach to count as having learned: chance + margin x (1 - chance).

    A share of the gap between chance and perfect accuracy, so that it stays reachable on binary
    tasks (chance 0.5, margin 0.2: 0.6) and is a clear step above chance on many classes
    (10 experiences of 10 CIFAR-100 classes, label space ``seen``: chance 0.029, threshold 0.223;
    a multiple of chance such as 2 x 0.029 = 0.059 would call a run at 6 % accuracy a learner).
    """
    return chance + margin * (1.0 - chance)


def _int_column(values: pd.Series) -> pd.Series:
    """Integers with missing values (``Int64``), not floats: seed 2 stays ``2`` in a CSV."""
    return pd.to_numeric(values, errors="coerce").round().astype("Int64")


def _with_keys(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the columns :func:`runs_frame` adds, for a frame built without them (such as
    :func:`cl_bench.results.load_runs`): empty :data:`CONFIG` labels, unknown ``protocol`` and
    ``label_space`` (one competition), no ``chance`` and no evidence of training (never eligible)."""
    defaults: dict[str, Any] = {CONFIG: "", "protocol": None, "label_space": None, "trained": False}
    missing = {k: v for k, v in defaults.items() if k not in runs.columns}
    if "chance" not in runs.columns:
        missing["chance"] = math.nan
    return runs.assign(**missing) if missing else runs


def aggregate(runs: pd.DataFrame, columns: Iterable[str], keys: Sequence[str] = GROUP_KEYS) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count of each column per group of ``keys`` (:data:`GROUP_KEYS`).

    ``runs`` are the runs to average (the report passes the completed ones). Returns one row per
    group with columns ``n_runs``, ``seeds`` and ``<col>_mean``, ``<col>_std``, ``<col>_n`` for
    each column (``_n`` counts the runs where the value is defined: forgetting of a one-experience
    run is undefined, not 0). Groups are sorted by ``keys`` (scenario, strategy, backbone, config).
    """
    columns = list(columns)
    keys = list(keys)
    runs = _with_keys(runs)
    out_columns = [*keys, "n_runs", "seeds"] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
    if runs.empty:
        return pd.DataFrame(columns=out_columns)
    values = runs[[*keys, *columns]].copy()
    for col in columns:
        values[col] = pd.to_numeric(values[col], errors="coerce").astype("float64")
    grouped = values.groupby(keys, sort=True, dropna=False)
    stats = grouped[columns].agg(["mean", "std", "count"])
    stats.columns = [f"{c}_{'n' if s == 'count' else s}" for c, s in stats.columns]
    seeds = runs.groupby(keys, sort=True, dropna=False)["seed"].agg(
        lambda s: ",".join(str(v) for v in sorted(pd.to_numeric(s, errors="coerce").dropna().astype(int)))
    )
    stats.insert(0, "seeds", seeds)
    stats.insert(0, "n_runs", grouped.size())
    return stats.reset_index()[out_columns]


NO_TRAINING = "does not train"
NOT_LEARNED = "did not learn"
CHANCE_UNKNOWN = "chance unknown"
"""Reasons in an overview's ``not_eligible`` column (empty for an eligible group)."""


def overview_frame(runs: pd.DataFrame, margin: float = LEARNED_MARGIN) -> pd.DataFrame:
    """:func:`aggregate` of the completed runs over :data:`OVERVIEW_METRICS` per :data:`OVERVIEW_KEYS`,
    with every group of ``runs`` (any status), its ``n_failed`` and ``n_incomplete`` (status
    ``running``: crashed, killed or still going) after ``n_runs``, and its eligibility for a best mark.

    A group whose runs all failed has a row too, with ``n_runs`` 0 and no values: the overview
    shows every experiment that was attempted, not only those that worked.

    Eligibility columns (module docstring): ``chance`` (mean :func:`chance_plasticity` of the
    completed runs), ``threshold`` (:func:`learned_threshold` of it with ``margin``), ``trains``
    (every completed run :func:`trained`), ``learned`` (mean plasticity >= threshold, both at the
    displayed 3 decimals), ``eligible`` (completed runs, trains and learned) and ``not_eligible``:
    :data:`NO_TRAINING`, :data:`NOT_LEARNED`, :data:`CHANCE_UNKNOWN` (no class counts in the
    records, or no plasticity), or ``""``.
    """
    runs = _with_keys(runs)
    ok = runs[runs["status"] == "ok"]
    stats = aggregate(ok, OVERVIEW_METRICS, keys=OVERVIEW_KEYS)
    facts = (
        ok.assign(
            chance=pd.to_numeric(ok["chance"], errors="coerce").astype("float64"),
            trained=ok["trained"].fillna(False).astype(bool),
        )
        .groupby(OVERVIEW_KEYS, sort=True, dropna=False)
        .agg(chance=("chance", "mean"), trains=("trained", "all"))
        .reset_index()
    )
    counts = (
        runs.assign(
            n_failed=(runs["status"] == "failed").astype(int),
            n_incomplete=runs["status"].isin(["running", "interrupted"]).astype(int),
        )
        .groupby(OVERVIEW_KEYS, sort=True, dropna=False)[["n_failed", "n_incomplete"]]
        .sum()
        .reset_index()
    )
    merged = counts.merge(stats, on=OVERVIEW_KEYS, how="outer", sort=True)
    merged = merged.merge(facts, on=OVERVIEW_KEYS, how="left", sort=False)
    merged["n_runs"] = merged["n_runs"].fillna(0).astype(int)
    merged["seeds"] = merged["seeds"].fillna("")
    for col in ("n_failed", "n_incomplete"):
        merged[col] = merged[col].fillna(0).astype(int)
    merged["trains"] = merged["trains"].astype("boolean").fillna(False).astype(bool)
    merged["threshold"] = learned_threshold(merged["chance"].astype("float64"), margin)
    plasticity = merged["plasticity_mean"].astype("float64").round(3)
    merged["learned"] = (plasticity >= merged["threshold"].round(3)).astype(bool)
    merged["eligible"] = (merged["n_runs"] > 0) & merged["trains"] & merged["learned"]
    merged["not_eligible"] = [_reason(row) for _, row in merged.iterrows()]
    order = [*OVERVIEW_KEYS, "n_runs", "n_failed", "n_incomplete"]
    merged = merged.sort_values(OVERVIEW_KEYS, kind="stable", na_position="last").reset_index(drop=True)
    eligibility = ["chance", "threshold", "trains", "learned", "eligible", "not_eligible"]
    return merged[order + [c for c in stats.columns if c not in order] + eligibility]


def _reason(row: pd.Series) -> str:
    if row["n_runs"] == 0 or row["eligible"]:
        return ""
    if not row["trains"]:
        return NO_TRAINING
    if pd.isna(row["chance"]) or pd.isna(row["plasticity_mean"]):
        return CHANCE_UNKNOWN
    return NOT_LEARNED


def best_marks(overview: pd.DataFrame, metrics: Iterable[str]) -> set[tuple[int, str]]:
    """``(row position, metric)`` pairs of an :func:`overview_frame` holding the best mean of their
    competition (:data:`COMPETITION`) among its eligible groups.

    Direction follows :data:`LOWER_IS_BETTER`. Means are compared at the displayed precision
    (3 decimals) so that ties are all marked; a competition with fewer than two eligible groups
    marks nothing (a best of one says nothing), and an ineligible group is never marked, however
    low its forgetting.
    """
    marks: set[tuple[int, str]] = set()
    metrics = list(metrics)
    frame = overview.reset_index(drop=True)
    for _, rows in frame.groupby(COMPETITION, sort=False, dropna=False):
        rows = rows[rows["eligible"].astype(bool)]
        if len(rows) < 2:
            continue
        for metric in metrics:
            means = rows[f"{metric}_mean"].astype("float64").round(3).dropna()
            if means.empty:
                continue
            best = means.min() if metric in LOWER_IS_BETTER else means.max()
            marks.update((int(pos), metric) for pos in means.index[means == best])
    return marks


def tradeoff_frame(runs: pd.DataFrame, margin: float = LEARNED_MARGIN) -> pd.DataFrame:
    """The groups with completed runs as in :func:`overview_frame`, with the mean, std and count of
    :data:`COST_COLUMNS` beside them: the data of the forgetting vs parameters and time plots."""
    runs = _with_keys(runs)
    overview = overview_frame(runs, margin)
    costs = aggregate(runs[runs["status"] == "ok"], COST_COLUMNS, keys=OVERVIEW_KEYS)
    costs = costs.drop(columns=["n_runs", "seeds"])
    merged = overview[overview["n_runs"] > 0].merge(costs, on=OVERVIEW_KEYS, how="left", sort=False)
    return merged.reset_index(drop=True)


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
    if record.get("status") in ("failed", "interrupted"):
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


def _number(value: Any) -> TypeGuard[int | float]:
    """A real number (``True`` is no count)."""
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
