"""The report's X-TAIL / MTIL section: tables of Transfer / Average / Last in percent per benchmark and
domain order, per-domain heatmaps with the domain names on both axes, and malformed domain lists."""

from __future__ import annotations

import base64
import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cl_bench import metrics
from reports import multidomain
from reports.build import build_report
from tests.reports.conftest import Built
from tests.reports.records import make_record, write_record

XTAIL_DOMAINS = ["Aircraft", "Caltech101", "DTD"]
MTIL_ORDER_I = ["Aircraft", "Caltech101", "CIFAR100"]
MTIL_ORDER_II = ["CIFAR100", "Aircraft", "Caltech101"]

# X-TAIL lora, seed 0: Transfer = (R01 + (R02 + R12) / 2) / 2 = (0.4 + 0.16) / 2 = 0.28; masked, R02 = 0
# is dropped: (0.4 + 0.32) / 2 = 0.36; Average = 5.72 / 9 = 0.63556; Last = (0.7 + 0.8 + 0.9) / 3 = 0.8.
XTAIL_S0 = [[0.9, 0.4, 0.0], [0.8, 0.9, 0.32], [0.7, 0.8, 0.9]]
# seed 1: Transfer = (0.22 + (0.1 + 0.3) / 2) / 2 = 0.21, masked the same (no zero); Average = 5.12 / 9
# = 0.56889; Last = 0.7.
XTAIL_S1 = [[0.8, 0.22, 0.1], [0.7, 0.9, 0.3], [0.6, 0.7, 0.8]]
# Over the two seeds, in percent (std = |a - b| / sqrt 2): Transfer 24.5 ± 4.9 (0.07 / 1.414 = 0.0495),
# Average 60.2 ± 4.7 (0.06667 / 1.414 = 0.0471), Last 75.0 ± 7.1, masked 28.5 ± 10.6 (0.15 / 1.414).
XTAIL_LORA_CELLS = (
    '<td class="stat">24.5<small>± 4.9</small></td><td class="stat">60.2<small>± 4.7</small></td>'
    '<td class="stat">75.0<small>± 7.1</small></td><td class="stat">28.5<small>± 10.6</small></td></tr>'
)
# MTIL lora, Order I, one seed: Transfer (0.6 + (0.0 + 0.2) / 2) / 2 = 0.35 (unmasked: the 0 counts),
# Average 4.2 / 9 = 0.46667, Last 1.8 / 3 = 0.6; no ± and no masked column (it would be 40.0).
MTIL_I = [[0.5, 0.6, 0.0], [0.4, 0.7, 0.2], [0.3, 0.6, 0.9]]
MTIL_I_CELLS = '<td class="stat">35.0</td><td class="stat">46.7</td><td class="stat">60.0</td></tr>'
# MTIL lora, Order II: Transfer (0.1 + (0.2 + 0.4) / 2) / 2 = 0.2, Average 5.4 / 9 = 0.6, Last 2.4 / 3 = 0.8.
MTIL_II = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.4], [0.7, 0.8, 0.9]]
MTIL_II_CELLS = '<td class="stat">20.0</td><td class="stat">60.0</td><td class="stat">80.0</td></tr>'


def multidomain_record(
    run_id: str, strategy: str, benchmark: str, seed: int, matrix: list[list[float]], domains: Any
) -> dict[str, Any]:
    """A record as the multi-domain scenarios write it: ``scenario.name`` and ``scenario.benchmark``
    the benchmark, ``scenario.domains`` the domain of each experience, metrics derived as the loop does."""
    record = make_record(run_id, strategy, benchmark, seed, matrix=matrix, label_space="all")
    record["scenario"].update(benchmark=benchmark, domains=domains)
    accuracy = record["accuracy"]
    record["metrics"] = metrics.derive(matrix, accuracy["initial"], accuracy["seen"], benchmark)
    return record


@dataclass(frozen=True)
class Page:
    page: str
    stderr: str

    def section(self) -> str:
        """The X-TAIL / MTIL section of the page."""
        start = self.page.index('<section id="multidomain">')
        return self.page[start : self.page.index("</section>", start)]

    def table(self, title: str) -> str:
        """The part of the section from the heading ``title`` to the next table's heading."""
        section = self.section()
        start = section.index(f"<h3>{title}</h3>")
        end = section.find("<h3>", start + 1)
        return section[start : end if end > 0 else len(section)]


def _build(runs: Path, out: Path) -> Page:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        build_report([runs], out)
    return Page(out.read_text(encoding="utf-8"), stderr.getvalue())


def _image(page: str, alt: str) -> str:
    """The SVG text of the ``<img>`` whose alt text is ``alt``."""
    match = re.search(r'<img src="data:image/svg\+xml;base64,([^"]*)" alt="' + re.escape(alt) + '"', page)
    assert match, alt
    return base64.b64decode(match.group(1)).decode("utf-8")


XTAIL_TITLE = "X-TAIL · Aircraft → Caltech101 → DTD"
MTIL_I_TITLE = "MTIL · Aircraft → Caltech101 → CIFAR100"
MTIL_II_TITLE = "MTIL · CIFAR100 → Aircraft → Caltech101"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Page:
    """X-TAIL lora seeds 0 and 1 and zero-shot seed 0, MTIL lora in Orders I and II, a synthetic run."""
    runs = tmp_path_factory.mktemp("multidomain") / "runs"
    for record in (
        multidomain_record("x-lora-s0", "lora", "x-tail", 0, XTAIL_S0, XTAIL_DOMAINS),
        multidomain_record("x-lora-s1", "lora", "x-tail", 1, XTAIL_S1, XTAIL_DOMAINS),
        multidomain_record("x-zero-shot", "zero-shot", "x-tail", 0, XTAIL_S1, XTAIL_DOMAINS),
        multidomain_record("m-lora-1", "lora", "mtil", 0, MTIL_I, MTIL_ORDER_I),
        multidomain_record("m-lora-2", "lora", "mtil", 0, MTIL_II, MTIL_ORDER_II),
        make_record("synthetic-lora", "lora", "synthetic", 0),
    ):
        write_record(runs, record)
    return _build(runs, runs.parent / "report.html")


def test_no_section_without_x_tail_or_mtil_records(standard_report: Built) -> None:
    assert 'id="multidomain"' not in standard_report.page
    assert "X-TAIL / MTIL</a>" not in standard_report.page


def test_section_has_one_table_per_benchmark_and_domain_order(report: Page) -> None:
    assert 'href="#multidomain">X-TAIL / MTIL</a>' in report.page
    titles = re.findall(r"<h3>(.*?)</h3>", report.section())
    assert titles == [MTIL_I_TITLE, MTIL_II_TITLE, XTAIL_TITLE]
    assert "synthetic-lora" not in report.section()


def test_x_tail_numbers_are_mean_and_sample_std_over_seeds_in_percent(report: Page) -> None:
    table = report.table(XTAIL_TITLE)
    assert 'title="seeds 0,1">2</td>' + XTAIL_LORA_CELLS in table
    # zero-shot, one seed (XTAIL_S1): 21.0 / 56.9 / 70.0 and masked 21.0, without ±
    zero_shot = '<td class="stat">21.0</td><td class="stat">56.9</td><td class="stat">70.0</td>'
    assert 'title="seeds 0">1</td>' + zero_shot + '<td class="stat">21.0</td></tr>' in table
    headers = re.findall(r"<th title=\"[^\"]*\">([^<]*)<span", table)
    assert headers == ["Transfer (%)", "Average (%)", "Last (%)", "Transfer (masked) (%)"]


def test_mtil_tables_have_no_masked_transfer_and_no_spread_for_one_seed(report: Page) -> None:
    first, second = report.table(MTIL_I_TITLE), report.table(MTIL_II_TITLE)
    assert 'title="seeds 0">1</td>' + MTIL_I_CELLS in first
    assert 'title="seeds 0">1</td>' + MTIL_II_CELLS in second
    for table in (first, second):
        assert "masked" not in table
        assert "±" not in table


def test_heatmaps_name_the_domains_on_both_axes(report: Page) -> None:
    svg = _image(report.page, f"per-domain accuracy matrix of lora, {XTAIL_TITLE}")
    for domain in XTAIL_DOMAINS:
        assert f">{domain}<" in svg
        assert f">after {domain}<" in svg
    assert ">test domain<" in svg
    assert ">0.31<" in svg  # the mean over the seeds of R01: (0.4 + 0.22) / 2
    mtil = _image(report.page, f"per-domain accuracy matrix of lora, {MTIL_II_TITLE}")
    assert ">after CIFAR100<" in mtil
    run_heatmap = _image(report.page, "accuracy matrix of x-lora-s0")  # the run's own section too
    assert ">after Caltech101<" in run_heatmap


def test_run_sections_and_definitions_show_the_masked_transfer(report: Page) -> None:
    assert '<td class="l">transfer_xtail_masked</td><td>0.360</td>' in report.page  # x-lora-s0
    definitions = report.page[report.page.index('id="definitions"') :]
    assert "<b>transfer_xtail_masked</b>" in definitions


MALFORMED: list[tuple[str, Any, str]] = [
    (
        "lora",
        "Aircraft, Caltech101, DTD",
        "scenario.domains is 'Aircraft, Caltech101, DTD', not a list of names",
    ),
    ("sora", ["Aircraft", 7, "DTD"], "scenario.domains is ['Aircraft', 7, 'DTD'], not a list of names"),
    ("dylora", ["Aircraft", "DTD"], "scenario.domains names 2 domains for 3 experiences"),
    ("mora", None, "scenario.domains is absent"),
]
"""(strategy, ``scenario.domains``, the warning's reason): one X-TAIL run (XTAIL_S0) each."""


def test_malformed_domains_fall_back_to_numeric_axes_with_a_warning(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for strategy, domains, _ in MALFORMED:
        write_record(runs, multidomain_record(f"x-{strategy}", strategy, "x-tail", 0, XTAIL_S0, domains))
    built = _build(runs, tmp_path / "report.html")
    title = "X-TAIL · domain order not recorded"
    table = built.table(title)
    for strategy, _, reason in MALFORMED:
        assert f"warning: run x-{strategy}: {reason}; its X-TAIL / MTIL table row" in built.stderr
        # XTAIL_S0 alone: 28.0 / 63.6 / 80.0 and masked 36.0
        cells = '<td class="stat">28.0</td><td class="stat">63.6</td><td class="stat">80.0</td>'
        assert f"{strategy}</td>" + '<td class="stat" title="seeds 0">1</td>' + cells in table
        svg = _image(built.page, f"per-domain accuracy matrix of {strategy}, {title}")
        for domain in XTAIL_DOMAINS:
            assert f">{domain}<" not in svg
            assert f">after {domain}<" not in svg
        assert ">0<" in svg
        assert ">2<" in svg
        assert ">test experience j<" in svg
        assert ">after training experience i<" in svg


def test_a_masked_transfer_that_is_no_number_skips_the_record(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, multidomain_record("x-good", "lora", "x-tail", 0, XTAIL_S0, XTAIL_DOMAINS))
    hostile = multidomain_record("x-hostile", "lora", "x-tail", 1, XTAIL_S1, XTAIL_DOMAINS)
    hostile["metrics"]["transfer_xtail_masked"] = "36 %"
    path = write_record(runs, hostile)
    built = _build(runs, tmp_path / "report.html")
    assert f"warning: skipped {path}: metrics.transfer_xtail_masked is '36 %', not a number or null" in (
        built.stderr
    )
    assert 'title="seeds 0">1</td><td class="stat">28.0</td>' in built.table(XTAIL_TITLE)


def test_benchmark_comes_from_the_scenario_section() -> None:
    record = multidomain_record("m", "lora", "mtil", 0, MTIL_I, MTIL_ORDER_I)
    assert multidomain.benchmark_of(record) == "mtil"
    record["scenario"] = {"name": "mtil-few-shot", "benchmark": "mtil"}
    assert multidomain.benchmark_of(record) == "mtil"
    record["scenario"] = {"name": "x-tail", "benchmark": 5}
    assert multidomain.benchmark_of(record) == "x-tail"
    assert multidomain.benchmark_of(make_record("s", scenario="synthetic")) is None


def test_frame_keeps_the_masked_transfer_of_the_record_or_computes_it_from_the_matrix() -> None:
    with_key = multidomain_record("a", "lora", "x-tail", 0, XTAIL_S0, XTAIL_DOMAINS)
    without_key = multidomain_record("b", "lora", "x-tail", 1, XTAIL_S0, XTAIL_DOMAINS)
    del without_key["metrics"]["transfer_xtail_masked"]
    frame = multidomain.multidomain_frame([with_key, without_key], {})
    assert frame["transfer_xtail_masked"].tolist() == pytest.approx([0.36, 0.36], abs=1e-12)
    assert frame["transfer"].tolist() == pytest.approx([0.28, 0.28], abs=1e-12)
    assert frame["domain_order"].tolist() == ["Aircraft → Caltech101 → DTD"] * 2
