"""``record_problem``: whether the report can read a run record's contents, and if not, why.

:func:`cl_bench.results.find_records` vouches for the file (readable JSON of a known schema with
``run_id``, ``status`` and a ``config`` naming strategy and scenario), not for what is inside it. A
record edited by hand, damaged, or written by another tool can still hold an accuracy matrix of
strings or of ragged rows, a metric that is a dict, a count too large for any float: the report's
tables and figures would then raise a traceback, or print the value as if it were a number. This
module checks every field the report reads, its type and its shape, so that ``build_report`` skips
such a record with a one-line reason, as it skips an unreadable file, and reports the others.

What docs/run-record.md allows is no problem: ``null`` for an undefined number (and NaN, which JSON
writers other than cl-bench emit for it), a section a run does not have (a failed run has no
``parameters``), extra keys.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any

from cl_bench.metrics import MULTIDOMAIN_METRICS
from cl_bench.results import METRIC_COLUMNS, ExperienceRecord

SECTIONS = (
    "config",
    "strategy",
    "scenario",
    "backbone",
    "environment",
    "accuracy",
    "metrics",
    "parameters",
    "timing",
    "strategy_report",
    "failure",
)
"""Top-level keys that hold an object (or ``null``, or are absent)."""

EXPERIENCE_NUMBERS = tuple(
    f.name
    for f in dataclasses.fields(ExperienceRecord)
    if f.name not in ("index", "classes", "memory_kind", "strategy")
)
"""The per-experience figures: each a number or null."""

VARIANT_NUMBERS = ("acc_final", "eval_samples_per_s", "peak_memory_eval_bytes")
STRATEGY_REPORT_SECTIONS = ("scalars", "curves", "per_layer", "events")

Predicate = Callable[[Any], bool]


def record_problem(record: dict[str, Any]) -> str | None:
    """One line saying why the report cannot use ``record`` (a record of :func:`find_records`), or
    None when it can. The first problem found is named with the field's path
    (``accuracy.matrix[1][0] is 'a', not a number or null``)."""
    return next(_problems(record), None)


def _number(value: Any) -> bool:
    """A number or null; ``True`` is no number. NaN and infinities count: the report shows a dash."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _count(value: Any) -> bool:
    """An integer that fits the report's 64-bit integer columns (a seed, an index, a class count)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _count_or_null(value: Any) -> bool:
    return value is None or _count(value)


def _name_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _object_or_null(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _list_or_null(value: Any) -> bool:
    return value is None or isinstance(value, list)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


def _show(value: Any) -> str:
    """A value as the reason quotes it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _expect(obj: dict[str, Any], key: str, where: str, ok: Predicate, expected: str) -> Iterator[str]:
    """The problem of ``obj[key]`` when present and not ``ok`` (an absent key is no problem)."""
    if key in obj and not ok(obj[key]):
        yield f"{where}.{key} is {_show(obj[key])}, not {expected}"


def _section(record: dict[str, Any], key: str) -> dict[str, Any]:
    """A top-level object of the record, ``{}`` when absent (checked to be an object beforehand)."""
    return record.get(key) or {}


def _too_large(record: dict[str, Any]) -> Iterator[str]:
    """Integers beyond the float range anywhere in the record (JSON carries them, Python parses them,
    and every table and figure of the report turns numbers into floats: ``OverflowError``).

    Iterative, so that a deeply nested value cannot exhaust the recursion limit."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not -sys.float_info.max <= value <= sys.float_info.max:
            yield f"{where} is an integer too large for a float ({value.bit_length()} bits)"


def _problems(record: dict[str, Any]) -> Iterator[str]:
    """Every problem of ``record``, cheapest first; a check runs only once those before it passed,
    so each may rely on the types the earlier ones established."""
    yield from _too_large(record)
    run_id = record.get("run_id")
    if isinstance(run_id, bool) or not isinstance(run_id, str | int):
        yield f"run_id is {_show(run_id)}, not a string"
    for key in SECTIONS:
        if not _object_or_null(record.get(key)):
            yield f"{key} is {_show(record[key])}, not an object"
    if not _list_or_null(record.get("experiences")):
        yield f"experiences is {_show(record['experiences'])}, not a list"
    config = _section(record, "config")
    for key in ("strategy", "scenario"):
        yield from _expect(config, key, "config", lambda v: isinstance(v, str), "a name")
    yield from _expect(config, "backbone", "config", _name_or_null, "a name or null")
    for key in ("seed", "order_seed"):
        yield from _expect(config, key, "config", _count_or_null, "an integer or null")
    yield from _expect(_section(record, "backbone"), "name", "backbone", _name_or_null, "a name or null")
    scenario = _section(record, "scenario")
    for key in ("n_classes", "n_experiences"):
        yield from _expect(scenario, key, "scenario", _count_or_null, "an integer or null")
    environment = _section(record, "environment")
    yield from _expect(environment, "git_sha", "environment", _name_or_null, "a string or null")
    yield from _expect(environment, "versions", "environment", _object_or_null, "an object or null")
    yield from _accuracy(record)
    metrics = _section(record, "metrics")
    for key in (*METRIC_COLUMNS, *MULTIDOMAIN_METRICS):
        yield from _expect(metrics, key, "metrics", _number, "a number or null")
    for name in ("parameters", "timing"):
        section = _section(record, name)
        for key in section:
            yield from _expect(section, key, name, _number, "a number or null")
    yield from _experiences(record.get("experiences") or [])
    strategy_report = _section(record, "strategy_report")
    for key in STRATEGY_REPORT_SECTIONS:
        yield from _expect(strategy_report, key, "strategy_report", _object_or_null, "an object or null")


def _accuracy(record: dict[str, Any]) -> Iterator[str]:
    """The matrix: a list of rows of one length T, no more rows than T (a running record has fewer),
    cells numbers or null; square and T = ``scenario.n_experiences`` when the run is ``ok``. Then
    ``initial`` (T values), ``seen`` (one per row) and the variants' figures."""
    accuracy = _section(record, "accuracy")
    matrix = accuracy.get("matrix") or []
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        yield f"accuracy.matrix is {_show(matrix)}, not a list of rows"
    T = len(matrix[0]) if matrix else 0
    for i, row in enumerate(matrix):
        if len(row) != T:
            yield f"accuracy.matrix is ragged: row {i} has {len(row)} cells, row 0 has {T}"
        for j, cell in enumerate(row):
            if not _number(cell):
                yield f"accuracy.matrix[{i}][{j}] is {_show(cell)}, not a number or null"
    if len(matrix) > T:
        yield f"accuracy.matrix has {len(matrix)} rows of {T} cells: more rows than test experiences"
    n_experiences = _section(record, "scenario").get("n_experiences")
    if record.get("status") == "ok":
        if len(matrix) != T:
            yield f"status ok but accuracy.matrix is {len(matrix)} x {T}, not square"
        if n_experiences is not None and n_experiences != T:
            yield f"status ok but accuracy.matrix is {T} x {T}, scenario.n_experiences {n_experiences}"
    for key, length in (("initial", T), ("seen", len(matrix))):
        values = accuracy.get(key)
        if values is None:
            continue
        if not _numbers(values):
            yield f"accuracy.{key} is {_show(values)}, not a list of numbers or null"
        if matrix and len(values) != length:
            yield f"accuracy.{key} has {len(values)} values for an accuracy matrix of {len(matrix)} x {T}"
    variants = accuracy.get("variants")
    if not _object_or_null(variants):
        yield f"accuracy.variants is {_show(variants)}, not an object"
    for label, figures in (variants or {}).items():
        where = f"accuracy.variants[{label!r}]"
        if not isinstance(figures, dict):
            yield f"{where} is {_show(figures)}, not an object"
        for key in VARIANT_NUMBERS:
            yield from _expect(figures, key, where, _number, "a number or null")


def _experiences(experiences: list[Any]) -> Iterator[str]:
    """Each experience an object with an integer ``index``; its figures numbers or null, ``classes``
    a list and ``strategy`` an object where present."""
    for i, experience in enumerate(experiences):
        where = f"experiences[{i}]"
        if not isinstance(experience, dict):
            yield f"{where} is {_show(experience)}, not an object"
        if "index" not in experience:
            yield f"{where} has no index (keys: {_show(sorted(experience))})"
        yield from _expect(experience, "index", where, _count, "an integer")
        for key in EXPERIENCE_NUMBERS:
            yield from _expect(experience, key, where, _number, "a number or null")
        yield from _expect(experience, "classes", where, _list_or_null, "a list")
        yield from _expect(experience, "strategy", where, _object_or_null, "an object")
