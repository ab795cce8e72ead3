"""``build_report`` on hand-made records: numbers, ordering, exclusions, CSVs, strategy figures.

Spreads are sample standard deviations (ddof=1) over seeds: acc_final 0.5 and 0.7 give
0.600 ± 0.141 (sqrt(0.02) = 0.1414).
"""

from __future__ import annotations

import base64
import html
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cl_bench.errors import ClBenchError
from cl_bench.metrics import FORMULAS
from cl_bench.results import find_records
from reports import tables
from reports.build import build_report, fmt_bytes, fmt_time, stat_parts
from tests.reports.conftest import Built
from tests.reports.records import last_row, make_record, strategy_figures_record, write_record

CSV_NAMES = ("overview", "runs", "parameters", "resources", "variants", "excluded")


def _build(paths: list[Path], out: Path) -> str:
    build_report(paths, out)
    return out.read_text(encoding="utf-8")


def _overview(out: Path) -> pd.DataFrame:
    return pd.read_csv(out.with_name(f"{out.stem}_overview.csv")).set_index(["scenario", "strategy"])


def test_overview_is_mean_and_sample_std_over_seeds(standard_report: Built) -> None:
    page = standard_report.page
    overview = _overview(standard_report.out)
    lora = overview.loc[("synthetic", "lora")]
    assert lora["n_runs"] == 2  # the failed seed 2 is not counted
    assert lora["seeds"] == "0,1"
    assert lora["acc_final_mean"] == pytest.approx(0.6)
    assert lora["acc_final_std"] == pytest.approx(math.sqrt(0.02))  # ddof=1: 0.1414
    assert lora["acc_final_n"] == 2
    assert lora["forgetting_mean"] == pytest.approx(0.25)  # (0.9-0.6 + 0.7-0.5) / 2
    assert lora["bwt_mean"] == pytest.approx(-0.25)
    finetune = overview.loc[("synthetic", "finetune")]
    assert finetune["n_runs"] == 1  # the running seed 1 is not counted
    assert finetune["acc_final_mean"] == pytest.approx(0.4)
    assert math.isnan(finetune["acc_final_std"])
    assert overview.loc[("split-digits", "lora"), "acc_final_mean"] == pytest.approx(0.9)
    assert ">0.600<small>± 0.141</small>" in page
    assert ">0.250<small>± 0.071</small>" in page


def test_a_run_that_did_not_learn_holds_no_mark_in_the_standard_set(standard_report: Built) -> None:
    # Before issue 15 finetune held the forgetting and bwt marks of synthetic (0.1 < 0.25); its
    # plasticity (0.5 + 0.4) / 2 = 0.45 is below the threshold 0.375 + 0.2 x 0.625 = 0.5 of two
    # experiences of 2 classes (label space seen: chance (1/2 + 1/4) / 2 = 0.375), so it is no
    # longer eligible, lora is the only eligible group of synthetic, and nothing is marked.
    page = standard_report.page
    overview = _overview(standard_report.out)
    finetune, lora = overview.loc[("synthetic", "finetune")], overview.loc[("synthetic", "lora")]
    assert finetune["plasticity_mean"] == pytest.approx(0.45)
    assert finetune["chance"] == pytest.approx(0.375)
    assert finetune["threshold"] == pytest.approx(0.5)
    assert finetune["not_eligible"] == "did not learn"
    assert not finetune["eligible"]
    assert lora["plasticity_mean"] == pytest.approx((0.85 + 0.6) / 2)
    assert lora["eligible"]
    assert overview.loc[("split-digits", "lora"), "eligible"]  # eligible, but alone in its competition
    records, _ = find_records([standard_report.runs])
    frame = tables.overview_frame(tables.runs_frame(records))
    assert tables.best_marks(frame, tables.OVERVIEW_METRICS) == set()
    assert 'class="stat best"' not in page
    assert page.count('mark-note" title="mean plasticity 0.450 &lt; 0.500') == 1


def test_failed_and_running_runs_are_listed_apart(standard_report: Built) -> None:
    page = standard_report.page
    excluded_section = page[page.index('id="excluded"') :]
    assert "c-lora-s2-failed" in excluded_section
    assert "DivergenceError: loss became nan at step 3" in excluded_section
    assert "d-finetune-s1-running" in excluded_section
    assert "status running: 1 of 2 experiences recorded" in excluded_section
    runs_section = page[page.index('id="runs"') : page.index('id="excluded"')]
    assert "c-lora-s2-failed" not in runs_section
    excluded_csv = standard_report.out.with_name("report_excluded.csv")
    excluded = pd.read_csv(excluded_csv)
    assert excluded[["run_id", "kind", "seed"]].values.tolist() == [
        ["d-finetune-s1-running", "incomplete", 1],
        ["c-lora-s2-failed", "failed", 2],
    ]
    assert ",2,DivergenceError" in excluded_csv.read_text(encoding="utf-8")  # seeds as integers, not 2.0
    err = standard_report.stderr.splitlines()
    assert any("c-lora-s2-failed left out of the averages" in line for line in err)


def test_csv_tables_are_written_next_to_the_html(standard_report: Built) -> None:
    site = standard_report.out.parent
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["report.html", *(f"report_{name}.csv" for name in CSV_NAMES)]
    )
    runs = pd.read_csv(site / "report_runs.csv")
    assert len(runs) == 6
    assert set(runs["status"]) == {"ok", "failed", "running"}
    params = pd.read_csv(site / "report_parameters.csv").set_index(["scenario", "strategy"])
    assert params.loc[("synthetic", "finetune"), "n_trainable_mean"] == 100_000
    assert params.loc[("synthetic", "lora"), "trainable_fraction_mean"] == pytest.approx(0.01)
    resources = pd.read_csv(site / "report_resources.csv").set_index(["scenario", "strategy"])
    assert resources.loc[("synthetic", "lora"), "peak_memory_train_bytes_mean"] == 2**30
    assert resources.loc[("synthetic", "lora"), "wall_time_s_mean"] == pytest.approx(6.5)


def test_ordering_is_deterministic(standard_report: Built, tmp_path: Path) -> None:
    runs_dir = standard_report.runs
    first = standard_report.page
    second = _build([runs_dir / "z-lora-s1", runs_dir], tmp_path / "report.html")

    def stable(page: str) -> str:
        page = re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", page)
        return re.sub(r"from .*?</span>", "", page, count=1)

    assert stable(first) == stable(second)
    runs_section = first[first.index('id="runs"') :]
    positions = [
        runs_section.index(f"run-{run_id}") for run_id in ("a-lora-digits", "b-finetune-s0", "y-lora-s0")
    ]
    positions.append(runs_section.index("run-z-lora-s1"))
    assert positions == sorted(positions)
    overview = pd.read_csv(standard_report.out.with_name("report_overview.csv"))
    assert overview[["scenario", "strategy"]].values.tolist() == [
        ["split-digits", "lora"],
        ["synthetic", "finetune"],
        ["synthetic", "lora"],
    ]


def test_broken_files_are_named_and_do_not_stop_the_report(
    broken_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    page = _build([broken_dir], out)
    unreadable = page[page.index('id="unreadable"') :]
    for name in ("t-truncated/result.json", "notes.json", "n-newer/result.json"):
        assert name in unreadable
    assert "schema version 99 is newer" in unreadable
    assert "truncated or corrupt" in unreadable
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 3
    assert _overview(out).loc[("synthetic", "lora"), "n_runs"] == 2
    excluded = pd.read_csv(tmp_path / "report_excluded.csv")
    assert (excluded["kind"] == "unreadable").sum() == 3


def test_no_usable_record_is_an_error_not_an_empty_report(broken_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report.html"
    with pytest.raises(ClBenchError, match="no usable run record"):
        build_report([empty], out)
    only_bad = tmp_path / "bad"
    write_record(only_bad, make_record("failed", status="failed"))
    (only_bad / "junk.json").write_text("{", encoding="utf-8")
    with pytest.raises(ClBenchError, match=r"1 failed or incomplete, 1 unreadable"):
        build_report([only_bad], out)
    assert not out.exists()


def test_strategy_figures_are_rendered_from_record_conventions(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, strategy_figures_record())
    out = tmp_path / "report.html"
    page = _build([runs], out)
    figures = page[page.index("own figures") :]
    # experiences[i].strategy: one small plot per name and a table
    assert "live_gates" in figures
    assert "total_gates" in figures
    assert "<td>40</td><td>48</td>" in figures
    # strategy_report sections
    assert "achieved_sparsity" in figures
    assert "0.4375" in figures
    assert 'alt="accuracy_vs_rank of sora-fig"' in figures
    assert "live_gates_per_layer over 3 layers" in figures
    assert "<b>sampled_blocks</b>: 2 entries" in figures
    # accuracy.variants: a table against the main model, and accuracy vs rank for rank=N labels
    assert "Evaluation variants of the final model" in figures
    assert tables.rank_variants(strategy_figures_record())["rank"].tolist() == [1, 2, 4]
    assert 'alt="accuracy vs rank of sora-fig"' in figures
    # one <img> each: heatmap, curves, scenario curves, per-experience, two curves, one per-layer, rank,
    # and the two forgetting trade-off plots of the scenario
    assert page.count("<img ") == 10
    assert_self_contained(page)
    variants_csv = pd.read_csv(tmp_path / "report_variants.csv")
    assert variants_csv["variant"].tolist() == ["main", "rank=4", "rank=1", "rank=2", "sliced"]


def test_variant_speed_is_relative_to_the_main_model_of_the_same_pass(tmp_path: Path) -> None:
    record = strategy_figures_record()
    variants = tables.variants_frame(record).set_index("variant")
    assert variants.index.tolist() == ["main", "rank=4", "rank=1", "rank=2", "sliced"]  # main once, first
    # the final experience evaluated at 600 samples/s in another pass; the same-pass main at 800
    assert record["experiences"][-1]["eval_samples_per_s"] == 600.0
    assert variants.loc["sliced", "speedup"] == pytest.approx(1200.0 / 800.0)
    assert variants.loc["rank=1", "speedup"] == pytest.approx(1100.0 / 800.0)
    assert variants.loc["sliced", "acc_delta"] == pytest.approx(0.0)
    assert variants.loc["rank=1", "acc_delta"] == pytest.approx(0.4 - 0.7)
    write_record(tmp_path / "runs", record)
    page = _build([tmp_path / "runs"], tmp_path / "report.html")
    table = page[page.index("Evaluation variants") : page.index("Final figures")]
    assert "<td>1.50×</td>" in table
    assert "<td>2.00×</td>" not in table
    assert table.count('<td class="l">main</td>') == 1
    assert "measured in the same evaluation pass" in table


def test_a_record_without_the_same_pass_main_variant_shows_no_speed_ratio(tmp_path: Path) -> None:
    record = strategy_figures_record()
    del record["accuracy"]["variants"]["main"]
    variants = tables.variants_frame(record).set_index("variant")
    assert variants.index.tolist() == ["(main)", "rank=4", "rank=1", "rank=2", "sliced"]
    assert variants["speedup"].isna().all()
    assert math.isnan(variants.loc["(main)", "eval_samples_per_s"])  # another pass's figure is no baseline
    assert variants.loc["(main)", "acc_final"] == pytest.approx(0.7)
    assert variants.loc["rank=1", "acc_delta"] == pytest.approx(0.4 - 0.7)
    write_record(tmp_path / "runs", record)
    page = _build([tmp_path / "runs"], tmp_path / "report.html")
    table = page[page.index("Evaluation variants") : page.index("Final figures")]
    assert "×" not in table
    assert "No speed ratio" in table


def test_a_lone_main_variant_is_no_variant_table() -> None:
    record = strategy_figures_record()
    record["accuracy"]["variants"] = {"main": record["accuracy"]["variants"]["main"]}
    assert tables.variants_frame(record).empty


def test_a_run_without_strategy_figures_has_no_empty_section(standard_report: Built) -> None:
    assert "own figures" not in standard_report.page


def test_backbone_without_pretrained_weights_is_flagged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, strategy_figures_record(pretrained=False))
    write_record(runs, make_record("pretrained-one", pretrained=True))
    page = _build([runs], tmp_path / "report.html")
    assert "Backbone without pretrained weights: tiny-clip" in page
    assert "1 of 2 completed runs used randomly initialised weights" in page
    assert page.count("NOT PRETRAINED") == 1

    # a failed run without pretrained weights is in no average, so not in the count either
    write_record(runs, make_record("failed-random", seed=3, pretrained=False, status="failed"))
    page = _build([runs], tmp_path / "report.html")
    assert "1 of 2 completed runs used randomly initialised weights" in page
    assert page.count("NOT PRETRAINED") == 2  # the provenance table still lists it

    clean = tmp_path / "clean"
    write_record(clean, make_record("pretrained-only", pretrained=True))
    assert "Backbone without pretrained weights" not in _build([clean], tmp_path / "clean.html")


def test_every_metric_formula_and_the_provenance_are_printed(standard_report: Built) -> None:
    page = standard_report.page
    for name, formula in FORMULAS.items():
        assert html.escape(formula) in page, name
    assert "0123456789abcdef0123456789abcdef01234567" in page
    assert "0123456789" in page[page.index('id="provenance"') :]
    assert "torch 2.4.0" in page
    assert "training 1, class order 0" in page
    assert "&#34;lr&#34;: 0.001" in page  # the resolved config, escaped


def test_runs_of_different_configurations_are_separate_groups(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, make_record("r8-s0", seed=0, matrix=last_row(0.5)))
    write_record(runs, make_record("r8-s1", seed=1, matrix=last_row(0.7)))
    # differs only in keys that do not define the experiment: same group as the two above
    provenance_only = {
        "compile": True,
        "cuda_graphs": False,
        "log_every": 5,
        "out": "elsewhere",
        "overwrite": True,
        "report": True,
        "order_seed": 3,
        "scenario_args": {"n_experiences": 2, "data_seed": 7, "protocol": "class"},
    }
    write_record(runs, make_record("r8-s2", seed=2, matrix=last_row(0.6), config_extra=provenance_only))
    r16 = {"strategy_args": {"r": 16}}
    write_record(runs, make_record("r16-s0", seed=0, matrix=last_row(0.8), config_extra=r16))
    write_record(runs, make_record("r16-s1", seed=1, matrix=last_row(0.9), config_extra=r16))
    write_record(runs, make_record("r16-s2", seed=2, status="failed", config_extra=r16))
    out = tmp_path / "report.html"
    page = _build([runs], out)
    overview = pd.read_csv(out.with_name("report_overview.csv"), keep_default_na=False)
    assert overview[["strategy", "config", "n_runs", "n_failed", "seeds"]].values.tolist() == [
        ["lora", "strategy_args.r=16", 2, 1, "0,1"],
        ["lora", "strategy_args.r=8", 3, 0, "0,1,2"],
    ]
    assert overview["acc_final_mean"].tolist() == pytest.approx([0.85, 0.6])
    assert "lora [strategy_args.r=16]" in page
    assert "lora [strategy_args.r=8]" in page
    assert "mixed config" not in page
    params = pd.read_csv(out.with_name("report_parameters.csv"), keep_default_na=False)
    assert params["config"].tolist() == ["strategy_args.r=16", "strategy_args.r=8"]
    excluded = pd.read_csv(out.with_name("report_excluded.csv"), keep_default_na=False)
    assert excluded["config"].tolist() == ["strategy_args.r=16"]


def test_which_config_keys_define_the_experiment() -> None:
    for key in (
        "lr",
        "strategy_args.r",
        "precision",
        "device",
        "eval_batch_size",
        "scenario_args.n_experiences",
    ):
        assert tables.defines_experiment(key), key
    for key in (
        "seed",
        "order_seed",
        "run_id",
        "out",
        "overwrite",
        "report",
        "log_every",
        "compile",
        "cuda_graphs",
        "scenario_args.data_seed",
        "scenario_args.split_seed",
        "scenario_args.root",
    ):
        assert not tables.defines_experiment(key), key
    older = make_record("old", seed=0)
    newer = make_record("new", seed=1, config_extra={"eval_batch_size": 64, "lr": 0.01})
    assert tables.config_labels([older, newer]) == {
        "old": "eval_batch_size=unset, lr=0.001",
        "new": "eval_batch_size=64, lr=0.01",
    }
    assert tables.config_labels([older, make_record("other-seed", seed=5)]) == {"old": "", "other-seed": ""}


def test_failed_and_incomplete_runs_are_counted_in_the_overview(standard_report: Built) -> None:
    overview = _overview(standard_report.out)
    assert overview.loc[("synthetic", "lora"), ["n_runs", "n_failed", "n_incomplete"]].tolist() == [2, 1, 0]
    assert overview.loc[("synthetic", "finetune"), ["n_runs", "n_failed", "n_incomplete"]].tolist() == [
        1,
        0,
        1,
    ]
    assert overview.loc[("split-digits", "lora"), ["n_runs", "n_failed", "n_incomplete"]].tolist() == [
        1,
        0,
        0,
    ]
    page = standard_report.page
    assert '>2<small><a class="excluded-n" href="#excluded">(+1 failed)</a></small></td>' in page
    assert '>1<small><a class="excluded-n" href="#excluded">(+1 incomplete)</a></small></td>' in page


def test_a_group_whose_runs_all_failed_still_has_an_overview_row(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, make_record("lora-ok", "lora", seed=0))
    write_record(runs, make_record("sora-0", "sora", seed=0, status="failed"))
    write_record(runs, make_record("sora-1", "sora", seed=1, status="failed"))
    out = tmp_path / "report.html"
    page = _build([runs], out)
    sora = _overview(out).loc[("synthetic", "sora")]
    assert sora[["n_runs", "n_failed", "n_incomplete"]].tolist() == [0, 2, 0]
    assert math.isnan(sora["acc_final_mean"])
    assert '>0<small><a class="excluded-n" href="#excluded">(+2 failed)</a></small></td>' in page
    assert 'class="stat best"' not in page  # one group with values: nothing to compare


def _image(page: str, alt: str) -> str:
    """The SVG text of the ``<img>`` whose alt text is ``alt``."""
    match = re.search(r'<img src="data:image/svg\+xml;base64,([^"]*)" alt="' + re.escape(alt) + '"', page)
    assert match, alt
    return base64.b64decode(match.group(1)).decode("utf-8")


def test_curves_of_kind_bar_are_bar_charts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, strategy_figures_record())
    page = _build([runs], tmp_path / "report.html")
    bars = _image(page, "sampled_ranks of sora-fig")
    lines = _image(page, "accuracy_vs_rank of sora-fig")
    color = "#0072b2"  # the only strategy's colour
    assert bars.count(f'style="fill: {color}"') == 4  # one filled rectangle per rank
    assert f"stroke: {color}" not in bars  # and no data line
    assert f"stroke: {color}" in lines
    assert "steps" in bars


def test_events_print_with_their_field_names(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, strategy_figures_record())
    page = _build([runs], tmp_path / "report.html")
    events = page[page.index("<h4>Events</h4>") :]
    assert "<li>step=10, sparsity=0.1</li>" in events
    assert "<li>[30]</li>" in events  # an entry that does not match its fields, as JSON
    assert "<b>prune_rounds</b>: 3 entries" in events
    assert "<li>[0, &#34;vision&#34;, [3, 7]]</li>" in events  # a plain list of entries, as before


def test_the_heatmap_diagonal_is_outlined_in_red(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, strategy_figures_record())
    page = _build([runs], tmp_path / "report.html")
    heatmap = _image(page, "accuracy matrix of sora-fig")
    outlines = re.findall(r"stroke: #d62728; stroke-width: ([0-9.]+)", heatmap)
    assert len(outlines) == 3  # one per diagonal cell of the 3 x 3 matrix
    assert all(float(w) == 1.5 for w in outlines)  # 1.5 pt = 2 px


def test_run_sections_are_collapsed_and_print_keeps_figures_whole(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in range(9):
        write_record(runs, make_record(f"run-{seed}", seed=seed))
    page = _build([runs], tmp_path / "report.html")
    sections = re.findall(r'<details class="run"[^>]*>', page)
    assert len(sections) == 9
    assert not any(" open" in s for s in sections)  # the script opens them all to print
    css = page[: page.index("</style>")]
    print_css = css[css.index("@media print") :].splitlines()[0]
    assert "figure { break-inside: avoid; }" in print_css
    assert "break-inside" not in css.replace(print_css, "")
    assert "details.run { break-inside" not in print_css


def test_the_provenance_table_leaves_versions_to_its_own_list(standard_report: Built) -> None:
    provenance = standard_report.page[standard_report.page.index('id="provenance"') :]
    table = provenance[: provenance.index("</table>")]
    assert "<th" in table
    assert ">torch<" not in table
    assert ">cl-bench<" not in table
    versions = provenance[provenance.index("<h3>Versions</h3>") :]
    assert "<dt>torch</dt><dd>2.4.0</dd>" in versions
    assert "<dt>cl-bench</dt><dd>0.1.0</dd>" in versions


def assert_self_contained(page: str) -> None:
    """One inline script and no other, no stylesheet link, every image an embedded SVG, links only to
    anchors or the CSVs."""
    assert re.findall(r"<script[^>]*>", page) == ["<script>"]
    assert "<link" not in page
    assert "@import" not in page
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert sources
    for src in sources:
        assert src.startswith("data:image/svg+xml;base64,")
        svg = ET.fromstring(base64.b64decode(src.split(",", 1)[1]))
        assert svg.tag.endswith("svg")
    for href in re.findall(r'\shref="([^"]*)"', page):
        assert href.startswith("#") or re.fullmatch(r"report_\w+\.csv", href), href


def test_the_page_is_self_contained(standard_report: Built) -> None:
    assert_self_contained(standard_report.page)
    assert len(standard_report.page) < 600_000


def test_a_single_run_report_next_to_its_record(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = runs_dir / "y-lora-s0"
    out = build_report([run_dir], run_dir / "report.html")
    assert out == run_dir / "report.html"
    assert (run_dir / "report_overview.csv").is_file()
    capsys.readouterr()
    build_report([runs_dir], runs_dir / "all.html")  # the report files found there are not records
    assert "warning: skipped" not in capsys.readouterr().err


def test_formatting_helpers() -> None:
    from reports.build import fmt_float

    def parts(*args: Any, **kw: Any) -> tuple[str, str, str]:
        p = stat_parts(*args, fmt=fmt_float, **kw)
        return p["value"], p["spread"], p["note"]

    assert parts(0.6, math.sqrt(0.02), 2, 2) == ("0.600", "± 0.141", "")
    assert parts(0.6, math.nan, 1, 1) == ("0.600", "", "")
    assert parts(0.6, 0.1, 1, 2) == ("0.600", "± 0.100", "(n=1)")
    assert parts(None, None, 0, 2) == ("—", "", "")
    assert parts(5.0, 0.0, 2, 2, always_std=False) == ("5.000", "", "")
    assert parts(5.0, 0.0, 2, 2) == ("5.000", "± 0.000", "")
    assert fmt_bytes(2**30) == "1.0 GiB"
    assert fmt_bytes(512) == "512 B"
    assert fmt_time("2026-01-01T09:30:59+02:00") == "2026-01-01 07:30"  # shown in UTC
    assert fmt_time(None) == "—"
    assert fmt_time("yesterday") == "yesterday"


def test_an_interrupted_run_is_listed_as_incomplete_with_its_signal(tmp_path: Path) -> None:
    stopped = make_record("lora-s1-stopped", seed=1, status="running")
    stopped["status"] = "interrupted"
    stopped["failure"] = {"type": "SIGTERM", "reason": "interrupted by SIGTERM"}
    paths = [write_record(tmp_path, make_record("lora-s0")), write_record(tmp_path, stopped)]
    out = tmp_path / "site" / "report.html"
    page = _build(paths, out)
    assert "SIGTERM: interrupted by SIGTERM" in page[page.index('id="excluded"') :]
    excluded = pd.read_csv(out.with_name("report_excluded.csv"))
    assert excluded[["run_id", "kind", "status"]].values.tolist() == [
        ["lora-s1-stopped", "incomplete", "interrupted"]
    ]
    assert _overview(out).loc[("synthetic", "lora"), ["n_runs", "n_failed", "n_incomplete"]].tolist() == [
        1,
        0,
        1,
    ]
