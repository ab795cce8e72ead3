"""Records that are valid JSON of the right shape at the top but hostile inside, the report's output
path, and temp files left by a killed report.

A hostile record sits beside good ones: the report is still written for the good records, the
hostile one is skipped with one ``warning: skipped <file>: <reason>`` line on stderr, and the exit
code is 0. Values the record format allows (``null`` or NaN for an undefined number, a missing
``parameters`` section as in a failed run) are no hostility: such a record is rendered with dashes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cl_bench.cli import main
from reports import build, output
from reports.build import build_report
from reports.validate import record_problem
from tests.reports.records import make_record, strategy_figures_record, write_record

HUGE = 10**400
"""An integer JSON carries and Python parses, but no float holds (``float(HUGE)`` overflows)."""
NAN = float("nan")

Mutation = Callable[[dict[str, Any]], None]


def _set(dotted: str, value: Any) -> Mutation:
    """Set the value at ``a.b.0.c`` (integers index lists) in a record."""

    def mutate(record: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        node: Any = record
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _drop(dotted: str) -> Mutation:
    """Delete the key at ``a.b.c`` of a record."""

    def mutate(record: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        node: Any = record
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return mutate


def _hostile_base() -> dict[str, Any]:
    """A good record of every convention (3 experiences, strategy figures, variants) to mutate."""
    return strategy_figures_record("hostile-run")


# (id, mutation, a fragment of the reason printed for the skipped record)
HOSTILE: list[tuple[str, Mutation, str]] = [
    ("matrix-of-strings", _set("accuracy.matrix", [["a", "b", "c"]] * 3), "accuracy.matrix"),
    ("matrix-ragged", _set("accuracy.matrix", [[0.8], [0.6, 0.85], [0.5, 0.7, 0.9]]), "accuracy.matrix"),
    ("matrix-flat", _set("accuracy.matrix", [0.8, 0.85, 0.9]), "accuracy.matrix"),
    ("matrix-a-string", _set("accuracy.matrix", "0.8 0.85 0.9"), "accuracy.matrix"),
    ("matrix-cell-a-dict", _set("accuracy.matrix.1.1", {"acc": 0.85}), "accuracy.matrix"),
    ("matrix-cell-bool", _set("accuracy.matrix.0.0", True), "accuracy.matrix"),
    ("matrix-not-square", _set("accuracy.matrix", [[0.8, 0.2], [0.6, 0.85], [0.5, 0.7]]), "accuracy.matrix"),
    (
        "matrix-size-vs-n_experiences",
        _set("accuracy.matrix", [[0.8, 0.2], [0.6, 0.85]]),
        "n_experiences",
    ),
    ("matrix-huge-int", _set("accuracy.matrix.2.2", HUGE), "accuracy.matrix"),
    ("initial-a-number", _set("accuracy.initial", 0.25), "accuracy.initial"),
    ("seen-strings", _set("accuracy.seen", ["high", "low", "mid"]), "accuracy.seen"),
    ("variants-a-list", _set("accuracy.variants", ["rank=4"]), "accuracy.variants"),
    ("variant-huge-acc", _set("accuracy.variants.rank=4.acc_final", HUGE), "accuracy.variants"),
    ("metric-a-string", _set("metrics.acc_final", "0.7"), "metrics.acc_final"),
    ("metric-a-dict", _set("metrics.forgetting", {"mean": 0.1}), "metrics.forgetting"),
    ("metric-huge-int", _set("metrics.bwt", HUGE), "metrics.bwt"),
    ("experiences-a-dict", _set("experiences", {"0": {"index": 0}}), "experiences"),
    ("experience-a-string", _set("experiences.1", "exp 1"), "experiences[1]"),
    ("experience-missing-keys", _set("experiences.1", {"classes": [2, 3]}), "experiences[1]"),
    ("experience-time-a-string", _set("experiences.0.train_time_s", "2 s"), "experiences[0].train_time_s"),
    ("experience-classes-a-number", _set("experiences.2.classes", 2), "experiences[2].classes"),
    ("experience-strategy-a-list", _set("experiences.0.strategy", [40, 48]), "experiences[0].strategy"),
    ("experience-index-nan", _set("experiences.0.index", NAN), "experiences[0].index"),
    ("experience-figure-huge", _set("experiences.1.strategy.live_gates", HUGE), "experiences[1]"),
    ("seed-a-string", _set("config.seed", "three"), "config.seed"),
    ("seed-huge", _set("config.seed", HUGE), "config.seed"),
    ("seed-nan", _set("config.seed", NAN), "config.seed"),
    ("strategy-a-list", _set("config.strategy", ["sora", "lora"]), "config.strategy"),
    ("backbone-a-dict", _set("config.backbone", {"name": "tiny-clip"}), "config.backbone"),
    ("parameters-a-string", _set("parameters", "many"), "parameters"),
    ("parameter-huge-int", _set("parameters.trainable", HUGE), "parameters.trainable"),
    ("timing-a-list", _set("timing", [1.0, 2.0]), "timing"),
    ("n_classes-nan", _set("scenario.n_classes", NAN), "scenario.n_classes"),
    ("scenario-a-string", _set("scenario", "synthetic"), "scenario"),
    ("environment-versions-a-list", _set("environment.versions", ["torch 2.4"]), "environment.versions"),
    ("git-sha-a-number", _set("environment.git_sha", 1234567), "environment.git_sha"),
    ("failure-a-string", _set("failure", "boom"), "failure"),
    ("strategy-report-a-list", _set("strategy_report", ["sparsity", 0.4]), "strategy_report"),
    ("curves-a-list", _set("strategy_report.curves", [[1, 2], [0.4, 0.5]]), "strategy_report.curves"),
    ("events-a-string", _set("strategy_report.events", "pruned twice"), "strategy_report.events"),
    (
        "per-layer-huge",
        lambda r: r["strategy_report"]["per_layer"]["live_gates_per_layer"].update({"vision.0.q": HUGE}),
        "strategy_report.per_layer",
    ),
    ("run_id-a-list", _set("run_id", ["hostile-run"]), "run_id"),
]

# Mutations the record format allows: the run is rendered (dashes, gaps), nothing is skipped.
TOLERATED: list[tuple[str, Mutation]] = [
    ("metrics-null", lambda r: r["metrics"].update(dict.fromkeys(r["metrics"]))),
    ("metrics-nan", lambda r: r["metrics"].update(dict.fromkeys(r["metrics"], NAN))),
    (
        "matrix-cells-null-and-nan",
        _set("accuracy.matrix", [[None, 0.2, 0.1], [0.6, NAN, 0.2], [0.5, 0.7, 0.9]]),
    ),
    ("initial-null", _set("accuracy.initial", None)),
    ("experience-losses-nan", _set("experiences.0.loss_first", NAN)),
    ("parameters-missing", _drop("parameters")),
    ("timing-missing", _drop("timing")),
    ("environment-missing", _drop("environment")),
    ("strategy-report-missing", _drop("strategy_report")),
    ("large-but-finite-count", _set("parameters.trainable", 10**30)),
    (
        "infinities",  # JSON's Infinity, as other writers emit it: not finite, so a dash
        lambda r: (
            r["metrics"].update(dict.fromkeys(r["metrics"], math.inf)),
            r["parameters"].update(trainable=math.inf),
            _set("accuracy.matrix.0.0", -math.inf)(r),
        ),
    ),
]


def _good_runs(root: Path) -> list[str]:
    """Two completed runs and a failed one beside the hostile record; their run ids."""
    records = [
        make_record("good-lora-s0", "lora", seed=0, matrix=[[0.9, 0.2], [0.7, 0.8]]),
        make_record("good-lora-s1", "lora", seed=1, matrix=[[0.8, 0.2], [0.6, 0.9]]),
        make_record("good-lora-failed", "lora", seed=2, status="failed"),
    ]
    for record in records:
        write_record(root, record)
    return [r["run_id"] for r in records]


def _report(argv: list[str]) -> tuple[int, list[str]]:
    """``cl-bench <argv>``: its exit code and its stderr lines."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().splitlines()


@pytest.mark.parametrize(("mutate", "fragment"), [p[1:] for p in HOSTILE], ids=[p[0] for p in HOSTILE])
def test_a_hostile_record_is_skipped_with_one_warning(
    tmp_path: Path, mutate: Mutation, fragment: str
) -> None:
    runs = tmp_path / "runs"
    good = _good_runs(runs)
    record = _hostile_base()
    mutate(record)
    hostile = write_record(runs, {**record, "run_id": "hostile-run"})
    if record["run_id"] != "hostile-run":  # the run_id variant: keep the hostile value in the file
        hostile.write_text(json.dumps(record), encoding="utf-8")
    out = tmp_path / "site" / "report.html"
    code, err = _report(["report", str(runs), "-o", str(out)])
    assert code == 0, err
    warnings = [line for line in err if str(hostile) in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: skipped {hostile}: ")
    assert fragment in warnings[0]
    assert not any(line.startswith("error:") for line in err)
    page = out.read_text(encoding="utf-8")
    assert all(run_id in page for run_id in good)
    assert 'id="run-hostile-run"' not in page
    assert "hostile-run/result.json" in page[page.index('id="unreadable"') :]


@pytest.mark.parametrize("mutate", [p[1] for p in TOLERATED], ids=[p[0] for p in TOLERATED])
def test_values_the_format_allows_are_rendered_not_skipped(tmp_path: Path, mutate: Mutation) -> None:
    runs = tmp_path / "runs"
    _good_runs(runs)
    record = _hostile_base()
    mutate(record)
    write_record(runs, record)
    out = tmp_path / "report.html"
    code, err = _report(["report", str(runs), "-o", str(out)])
    assert code == 0, err
    assert not [line for line in err if "hostile-run" in line], err
    assert 'id="run-hostile-run"' in out.read_text(encoding="utf-8")


def test_the_good_record_has_no_problem() -> None:
    assert record_problem(_hostile_base()) is None
    assert record_problem(make_record("running", status="running")) is None
    assert record_problem(make_record("failed", status="failed")) is None


def test_only_hostile_records_is_one_error_line_and_no_report(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for run_id, mutate in (("bad-a", _set("accuracy.matrix", [["x"]])), ("bad-b", _set("metrics.avg", "hi"))):
        record = make_record(run_id)
        mutate(record)
        write_record(runs, record)
    out = tmp_path / "report.html"
    code, err = _report(["report", str(runs), "-o", str(out)])
    assert code == 2
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert err[-1].startswith("error: no usable run record")
    assert "2 unreadable" in err[-1]
    assert sum(line.startswith("warning: skipped") for line in err) == 2
    assert not out.exists()
    assert not list(tmp_path.glob("report_*.csv"))


def test_a_run_section_that_fails_to_build_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    good = _good_runs(runs)
    real = build.plots.run_curves

    def fragile(record: dict[str, Any], color: str) -> str:
        if record["run_id"] == "good-lora-s1":
            raise ZeroDivisionError("something nobody foresaw")
        return real(record, color)

    monkeypatch.setattr(build.plots, "run_curves", fragile)
    out = tmp_path / "report.html"
    code, err = _report(["report", str(runs), "-o", str(out)])
    assert code == 0, err
    assert [line for line in err if "good-lora-s1" in line] == [
        "warning: run good-lora-s1: its section could not be drawn (ZeroDivisionError: something nobody "
        "foresaw); the page shows its overview figures only"
    ]
    page = out.read_text(encoding="utf-8")
    assert all(f'id="run-{run_id}"' in page for run_id in good[:2])
    section = page[page.index('id="run-good-lora-s1"') :]
    assert "could not be drawn" in section[: section.index("</details>")]
    assert 'alt="accuracy curves of good-lora-s0"' in page


# ----------------------------------------------------------------------------- the output path


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    _good_runs(runs)
    return runs


def _refused(argv: list[str], fragment: str) -> None:
    code, err = _report(argv)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert fragment in err[0]


def test_report_onto_a_record_is_refused_and_writes_nothing(two_runs: Path) -> None:
    target = two_runs / "good-lora-s0" / "result.json"
    before = target.read_bytes()
    files = sorted(p for p in two_runs.rglob("*"))
    _refused(["report", str(two_runs), "-o", str(target)], ".json")
    assert target.read_bytes() == before
    assert sorted(p for p in two_runs.rglob("*")) == files


def test_report_onto_any_json_path_is_refused(two_runs: Path, tmp_path: Path) -> None:
    _refused(["report", str(two_runs), "-o", str(tmp_path / "new.JSON")], ".json")
    assert not (tmp_path / "new.JSON").exists()


def test_report_onto_a_record_of_another_name_is_refused(two_runs: Path, tmp_path: Path) -> None:
    record = tmp_path / "run.record"
    record.write_bytes((two_runs / "good-lora-s0" / "result.json").read_bytes())
    _refused(["report", str(record), "-o", str(record)], "input run record")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", "my notes\n"),
        ("page.html", "<!DOCTYPE html><html><head><title>mine</title></head></html>\n"),
        ("report.htm", "<html>hand written, mentions cl-bench report</html>\n"),
    ],
)
def test_report_onto_a_file_it_did_not_write_is_refused(
    two_runs: Path, tmp_path: Path, name: str, content: str
) -> None:
    target = tmp_path / name
    target.write_text(content, encoding="utf-8")
    _refused(["report", str(two_runs), "-o", str(target)], "not an HTML report written by cl-bench")
    assert target.read_text(encoding="utf-8") == content
    assert not list(tmp_path.glob("*.csv"))


def test_report_onto_a_directory_is_refused(two_runs: Path, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    _refused(["report", str(two_runs), "-o", str(tmp_path / "site")], "directory")


def test_a_cl_bench_report_may_be_overwritten(two_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert _report(["report", str(two_runs), "-o", str(out)])[0] == 0
    assert output.GENERATOR_MARKER in out.read_text(encoding="utf-8")[:4096]
    out.write_text(out.read_text(encoding="utf-8").replace("good-lora-s0", "stale"), encoding="utf-8")
    assert _report(["report", str(two_runs), "-o", str(out)])[0] == 0
    assert "good-lora-s0" in out.read_text(encoding="utf-8")


def test_the_template_carries_the_generator_marker() -> None:
    template = (Path(build.TEMPLATES) / "report.html.j2").read_text(encoding="utf-8")
    assert output.GENERATOR_MARKER in template[:4096]


# ----------------------------------------------------------------------------- stale temp files


def test_stale_temp_files_of_the_report_are_removed(two_runs: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    stale = [
        site / ".report.html.k3j_x9aa.tmp",
        site / ".report_overview.csv.0a1b2c3d.tmp",
        site / ".report_excluded.csv.zz.tmp",
    ]
    unrelated = [
        site / ".other.html.k3j_x9aa.tmp",  # another page's
        site / ".report.html.bak.k3j_x9aa.tmp",  # a temp of report.html.bak
        site / ".report.html.tmp",  # not a mkstemp name
        site / ".report.html.k3j_x9aa.tmp.keep",
        site / "report.html.k3j_x9aa.tmp",  # not hidden
        site / ".report_overview.csv.x.tmp.d",
    ]
    (site / ".report.html.dir.tmp").mkdir()  # a directory is never removed
    old = time.time() - 2 * output.STALE_AFTER_S
    for path in [*stale, *unrelated]:
        path.write_text("half a page", encoding="utf-8")
        os.utime(path, (old, old))
    fresh = site / ".report_runs.csv.fresh123.tmp"  # a concurrent writer's, seconds old
    fresh.write_text("being written", encoding="utf-8")
    build_report([two_runs], site / "report.html")
    assert not [p for p in stale if p.exists()]
    assert all(p.read_text(encoding="utf-8") == "half a page" for p in unrelated)
    assert fresh.exists()
    assert (site / ".report.html.dir.tmp").is_dir()
    assert (site / "report.html").is_file()
