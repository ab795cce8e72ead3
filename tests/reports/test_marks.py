"""Best marks (★) only among runs that learned, per competition, and the forgetting trade-off plots.

Issue 15: the report marked DyLoRA best for the lowest forgetting at plasticity 0.06, and zero-shot
(which never trains) on synthetic. The records of :func:`tests.reports.records.marks_set` rebuild
both traps in a class-incremental and a task-incremental competition; the expected values are
worked out in its docstring.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd
import pytest

from cl_bench.results import find_records
from reports import tables
from reports.build import build_report
from tests.reports.records import make_record, marks_set, write_record

CLASS = "synthetic · class-incremental · label space seen"
TASK = "synthetic · task-incremental (each sample against its own task's classes) · label space seen"


@pytest.fixture(scope="module")
def marks_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The report of :func:`marks_set` at the default margin: (its path, the page)."""
    root = tmp_path_factory.mktemp("marks")
    marks_set(root / "runs")
    out = build_report([root / "runs"], root / "report.html")
    return out, out.read_text(encoding="utf-8")


def _overview(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out.with_name(f"{out.stem}_overview.csv"), keep_default_na=False)
    return frame.set_index(["protocol", "strategy"])


def _marked(out: Path, margin: float = tables.LEARNED_MARGIN) -> set[tuple[str, str, str]]:
    """``(protocol, strategy, metric)`` of every best mark of the report's records."""
    records, _ = find_records([out.parent / "runs"])
    overview = tables.overview_frame(tables.runs_frame(records), margin)
    return {
        (overview.loc[pos, "protocol"], overview.loc[pos, "strategy"], metric)
        for pos, metric in tables.best_marks(overview, tables.OVERVIEW_METRICS)
    }


def _rows(page: str) -> dict[str, str]:
    """Each overview row's HTML by its group label (the text after the colour swatch)."""
    table = page[page.index('<table class="overview">') : page.index("</table>")]
    table = table[table.index("<tbody>") :]
    rows = re.findall(r'<tr(?: class="ineligible")?>(.*?)</tr>', table, flags=re.S)
    out = {}
    for row in rows:
        label = re.search(r'class="swatch"[^>]*></span>([^<]*?)\s*(?:<span|</td>)', row)
        assert label, row
        key = label.group(1).strip()
        out[key] = row
    return out


def _cells(row: str) -> list[str]:
    """The overview statistic cells of a row: their class and value, e.g. ``best 0.100``."""
    return [
        f"{cls.replace('stat', '').strip()} {value}".strip()
        for cls, value in re.findall(r'<td class="(stat[^"]*)"[^>]*>([^<]*)', row)
    ]


def test_chance_counts_the_classes_that_compete_in_each_diagonal_cell() -> None:
    seen = make_record("seen", matrix=[[0.5] * 3] * 3)  # 3 experiences of 2 classes
    assert tables.competing_classes(seen) == [2, 4, 6]
    assert tables.chance_plasticity(seen) == pytest.approx((1 / 2 + 1 / 4 + 1 / 6) / 3)
    every = make_record("all", matrix=[[0.5] * 3] * 3, label_space="all")
    assert tables.competing_classes(every) == [6, 6, 6]
    task = make_record("task", matrix=[[0.5] * 3] * 3, protocol="task")
    assert tables.competing_classes(task) == [2, 2, 2]
    assert tables.chance_plasticity(task) == pytest.approx(0.5)
    # without scenario.classes_per_experience, the experiences' own class lists
    del seen["scenario"]["classes_per_experience"]
    assert tables.competing_classes(seen) == [2, 4, 6]
    # without any class list, scenario.n_classes split evenly over the experiences
    for exp in seen["experiences"]:
        del exp["classes"]
    assert tables.competing_classes(seen) == [2, 4, 6]
    # without a class count: chance unknown, and such a run is never marked
    del seen["scenario"]["n_classes"]
    assert tables.competing_classes(seen) is None
    assert tables.chance_plasticity(seen) is None


def test_the_learning_threshold_closes_a_share_of_the_gap_to_perfect_accuracy() -> None:
    assert tables.LEARNED_MARGIN == 0.2
    assert tables.learned_threshold(0.375) == pytest.approx(0.5)
    assert tables.learned_threshold(0.5) == pytest.approx(0.6)  # binary tasks: reachable, unlike 2 x chance
    cifar = sum(1 / (10 * (j + 1)) for j in range(10)) / 10  # 10 x 10 CIFAR-100 classes, label space seen
    assert cifar == pytest.approx(0.02929, abs=1e-5)
    assert tables.learned_threshold(cifar) == pytest.approx(0.2234, abs=1e-4)  # DyLoRA's 0.06 is below it
    assert tables.learned_threshold(0.375, margin=0.4) == pytest.approx(0.625)


def test_training_is_read_from_the_record_not_from_the_strategy_name() -> None:
    zero_shot = make_record("zs", "zero-shot", steps=0, n_trainable=0, train_time_s=0.0)
    assert not tables.trained(zero_shot)
    assert not tables.trained(make_record("renamed", "my-baseline", steps=0, n_trainable=0))
    assert tables.trained(make_record("lora", "lora"))
    assert not tables.trained(make_record("no-params", "lora", n_trainable=0))  # steps without parameters
    older = make_record("older", "lora")
    for exp in older["experiences"]:
        del exp["steps"]
    assert tables.trained(older)  # falls back on parameters.trainable = 1000
    older["parameters"]["trainable"] = 0
    assert not tables.trained(older)


def test_eligibility_of_every_group(marks_report: tuple[Path, str]) -> None:
    out, _ = marks_report
    overview = _overview(out)
    columns = [
        "plasticity_mean",
        "forgetting_mean",
        "chance",
        "threshold",
        "trains",
        "eligible",
        "not_eligible",
    ]
    got = {key: overview.loc[key, columns].tolist() for key in overview.index}
    assert got == {
        ("class", "dylora"): [pytest.approx(0.375), 0.0, 0.375, 0.5, True, False, "did not learn"],
        ("class", "lora"): [pytest.approx(0.875), pytest.approx(0.1), 0.375, 0.5, True, True, ""],
        ("class", "sora"): [pytest.approx(0.75), pytest.approx(0.2), 0.375, 0.5, True, True, ""],
        ("class", "zero-shot"): [pytest.approx(0.925), 0.0, 0.375, 0.5, False, False, "does not train"],
        ("task", "dylora"): [pytest.approx(0.55), 0.0, 0.5, 0.6, True, False, "did not learn"],
        ("task", "finetune"): [pytest.approx(0.925), pytest.approx(0.2), 0.5, 0.6, True, True, ""],
        ("task", "lora"): [pytest.approx(0.96), pytest.approx(0.05), 0.5, 0.6, True, True, ""],
    }
    # rows ordered by competition (scenario, protocol, label space), then strategy
    assert [tuple(k) for k in overview.index] == [
        ("class", "dylora"),
        ("class", "lora"),
        ("class", "sora"),
        ("class", "zero-shot"),
        ("task", "dylora"),
        ("task", "finetune"),
        ("task", "lora"),
    ]


def test_marks_go_to_the_best_run_that_learned_in_each_competition(marks_report: tuple[Path, str]) -> None:
    out, page = marks_report
    every = {
        "acc_final",
        "acc_avg_incremental",
        "plasticity",
        "forgetting",
        "bwt",
        "fwt",
        "transfer",
        "avg",
        "last",
    }
    expected = (
        {("class", "lora", m) for m in every}
        | {("class", "sora", "fwt"), ("class", "sora", "transfer")}  # ties with lora: -0.050 and 0.200
        | {("task", "lora", m) for m in every}
        | {("task", "finetune", "fwt"), ("task", "finetune", "transfer")}  # ties: 0.250 and 0.500
    )
    assert _marked(out) == expected
    assert page.count('class="stat best"') == len(expected) == 22
    rows = _rows(page)
    # the lowest forgetting of each competition (0.000: dylora at chance, zero-shot) is not marked;
    # the forgetting mark of each competition goes to its lora, class and task apart
    forgetting = tables.OVERVIEW_METRICS.index("forgetting") + 2  # after n and the threshold cell
    assert _cells(rows["dylora [scenario_args.protocol=class]"])[forgetting] == "0.000"
    assert _cells(rows["zero-shot"])[forgetting] == "0.000"
    assert _cells(rows["lora [scenario_args.protocol=class]"])[forgetting] == "best 0.100"
    assert _cells(rows["dylora [scenario_args.protocol=task]"])[forgetting] == "0.000"
    assert _cells(rows["lora [scenario_args.protocol=task]"])[forgetting] == "best 0.050"
    # zero-shot's best plasticity and accuracies hold no mark either
    assert not any(cell.startswith("best") for cell in _cells(rows["zero-shot"]))
    assert not any(cell.startswith("best") for cell in _cells(rows["dylora [scenario_args.protocol=class]"]))


def test_ineligible_rows_carry_a_visible_flag_that_says_why(marks_report: tuple[Path, str]) -> None:
    _, page = marks_report
    rows = _rows(page)
    assert (
        '<span class="flag warn mark-note" title="mean plasticity 0.375 &lt; 0.500, the learning threshold '
        'at chance 0.375: its numbers hold no mark">did not learn</span>'
    ) in rows["dylora [scenario_args.protocol=class]"]
    assert (
        'title="mean plasticity 0.550 &lt; 0.600, the learning threshold at chance 0.500: its numbers hold '
        'no mark">did not learn</span>'
    ) in rows["dylora [scenario_args.protocol=task]"]
    assert '<span class="flag muted mark-note"' in rows["zero-shot"]
    assert ">does not train</span>" in rows["zero-shot"]
    assert "mark-note" not in rows["lora [scenario_args.protocol=class]"]
    assert page.count("mark-note") == 3
    runs = page[page.index('id="runs"') :]
    assert runs.count('<span class="flag warn">did not learn</span>') == 2  # each dylora run's section
    assert runs.count('<span class="flag muted">does not train</span>') == 1
    assert "Plasticity 0.375 against chance\n0.375: learning threshold 0.500." in runs


def test_the_competitions_head_their_rows(marks_report: tuple[Path, str]) -> None:
    _, page = marks_report
    table = page[page.index('<table class="overview">') : page.index("</table>")]
    headings = re.findall(r'<tr class="competition"><th colspan="14">([^<]*)</th></tr>', table)
    assert [html.unescape(h) for h in headings] == [CLASS, TASK]
    task_part = table[table.index("task-incremental") :]
    assert "scenario_args.protocol=class" not in task_part


def test_plasticity_sits_beside_forgetting_with_its_threshold(marks_report: tuple[Path, str]) -> None:
    _, page = marks_report
    head = page[page.index('<table class="overview">') : page.index("</thead>")]
    names = re.findall(r"<th[^>]*>([^<]+?)\s*<span", head)
    assert names == [
        "acc_final",
        "acc_avg_incremental",
        "learned if plasticity ≥",
        "plasticity",
        "forgetting",
        "bwt",
        "fwt",
        "transfer",
        "avg",
        "last",
    ]
    cells = _cells(_rows(page)["sora"])
    assert cells[3:6] == ["threshold 0.500", "0.750", "0.200"]  # threshold, plasticity, forgetting
    assert '<td class="stat threshold">0.500<small>chance 0.375</small></td>' in page
    assert '<td class="stat threshold">0.600<small>chance 0.500</small></td>' in page
    assert "plasticity" in tables.OVERVIEW_METRICS


def test_the_rule_and_its_threshold_are_printed(marks_report: tuple[Path, str], tmp_path: Path) -> None:
    _, page = marks_report
    assert "<b>plasticity ≥ chance + 0.20 × (1 − chance)</b> (margin 0.20)" in page
    assert "it closes 0.20 of the gap between chance and perfect accuracy" in page
    # a stricter margin: class threshold 0.375 + 0.7 x 0.625 = 0.8125, sora (0.75) drops out and lora is
    # alone in its competition (no mark); task threshold 0.5 + 0.7 x 0.5 = 0.85, both still learned
    marks_set(tmp_path / "runs")
    out = build_report([tmp_path / "runs"], tmp_path / "report.html", margin=0.7)
    strict = out.read_text(encoding="utf-8")
    assert "<b>plasticity ≥ chance + 0.70 × (1 − chance)</b> (margin 0.70)" in strict
    assert '<td class="stat threshold">0.812<small>chance 0.375</small></td>' in strict
    assert '<td class="stat threshold">0.850<small>chance 0.500</small></td>' in strict
    overview = _overview(out)
    assert overview.loc[("class", "sora"), "not_eligible"] == "did not learn"
    assert overview.loc[("class", "sora"), "threshold"] == pytest.approx(0.8125)
    assert {p for p, _, _ in _marked(out, margin=0.7)} == {"task"}
    with pytest.raises(ValueError, match="margin"):
        build_report([tmp_path / "runs"], tmp_path / "bad.html", margin=1.5)


def _svg(page: str, alt: str) -> str:
    match = re.search(r'<img src="data:image/svg\+xml;base64,([^"]*)" alt="' + re.escape(alt) + '"', page)
    assert match, alt
    return base64.b64decode(match.group(1)).decode("utf-8")


def test_forgetting_vs_parameters_and_time_plots(marks_report: tuple[Path, str]) -> None:
    _, page = marks_report
    section = page[page.index('<section id="tradeoff">') : page.index('<section id="curves">')]
    alts = [html.unescape(a) for a in re.findall(r'<img src="[^"]*" alt="([^"]*)"', section)]
    assert alts == [
        f"forgetting vs trainable parameters, {CLASS}",
        f"forgetting vs training time, {CLASS}",
        f"forgetting vs trainable parameters, {TASK}",
        f"forgetting vs training time, {TASK}",
    ]
    params = _svg(page, html.escape(alts[0], quote=True))
    time = _svg(page, html.escape(alts[1], quote=True))
    for svg in (params, time):
        assert "forgetting (lower is better)" in svg
        assert "dylora [scenario_args.protocol=class] (n=1) — did not learn" in svg
        assert "lora [scenario_args.protocol=class] (n=2)" in svg
        assert "sora (n=1)" in svg
    # zero-shot has no trainable parameter: a dashed line on the log axis, a hollow point at 0 s
    assert "zero-shot (n=1) — does not train; no trainable parameters (dashed line)" in params
    assert "zero-shot (n=1) — does not train<" in time
    assert "trainable parameters (log scale)" in params
    assert "training time (s, all experiences)" in time
    # hollow markers (white fill) for the ineligible groups, each drawn twice (the point and its legend
    # handle): dylora (#0072b2) in both plots, zero-shot (#cc79a7) as a point in the time plot only
    hollow = "fill: #ffffff; fill-opacity: 0.6; stroke: "
    assert (params.count(hollow + "#0072b2"), params.count(hollow + "#cc79a7")) == (2, 0)
    assert (time.count(hollow + "#0072b2"), time.count(hollow + "#cc79a7")) == (2, 2)
    assert "fill: #009e73; stroke: #009e73" in params  # lora, eligible: filled


def test_the_trade_off_data_is_the_mean_over_seeds() -> None:
    records = [
        make_record("s0", "lora", seed=0, matrix=[[0.9, 0.2], [0.8, 0.9]], train_time_s=3.0),
        make_record("s1", "lora", seed=1, matrix=[[0.8, 0.2], [0.7, 0.9]], train_time_s=4.0),
        make_record(
            "zs", "zero-shot", matrix=[[0.95, 0.9], [0.95, 0.9]], steps=0, n_trainable=0, train_time_s=0.0
        ),
    ]
    frame = tables.tradeoff_frame(tables.runs_frame(records)).set_index("strategy")
    assert frame.loc["lora", ["train_time_s_mean", "train_time_s_n", "n_trainable_mean"]].tolist() == [
        7.0,
        2,
        1000.0,
    ]
    assert frame.loc["lora", "train_time_s_std"] == pytest.approx(2**0.5)
    assert frame.loc["zero-shot", ["n_trainable_mean", "forgetting_mean", "not_eligible"]].tolist() == [
        0.0,
        0.0,
        "does not train",
    ]


def test_a_report_of_one_experience_has_no_trade_off_plot(tmp_path: Path) -> None:
    write_record(tmp_path / "runs", make_record("one", matrix=[[0.9]]))
    page = build_report([tmp_path / "runs"], tmp_path / "report.html").read_text(encoding="utf-8")
    section = page[page.index('<section id="tradeoff">') : page.index('<section id="curves">')]
    assert "<img" not in section
    assert "forgetting is undefined for every group here (one experience)" in section
