"""The report's federated section (issue 19): a table of what each federated run communicated for what
accuracy, the communication-vs-accuracy plot, per-round curves, ``communication_bytes`` as a column of
the main tables, and federation records the section cannot read.

Byte figures (tests/reports/records.py, ``federated_record``): 2 experiences x 2 rounds, 2 of 4 clients
per round. lora uploads 786,432 B and downloads 1,048,576 B per client and round: 8 x 786,432 =
6,291,456 B up (6.0 MiB), 8 x 1,048,576 = 8,388,608 B down (8.0 MiB), 14,680,064 B in all (14.0 MiB),
3,670,016 B per round (3.5 MiB). finetune sends 402,653,184 B (384 MiB) each way: 3,221,225,472 B
(3.0 GiB) up and down, 6,442,450,944 B (6.0 GiB) in all, 1,610,612,736 B (1.5 GiB) per round.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from markupsafe import escape

from cl_bench.results import run_row
from reports import build, federated, plots
from reports.build import build_report
from tests.reports.conftest import Built
from tests.reports.records import federated_record, make_record, write_record

HUGE = 10**400
LORA_SEEN = [0.45, 0.5, 0.3, 0.62]
FINETUNE_SEEN = [0.5, 0.55, 0.35, 0.7]
TITLE = "synthetic · class-incremental · label space seen"
COMMUNICATION_ALT = f"final accuracy vs bytes communicated, {TITLE}"
ROUNDS_ALT = f"seen-class accuracy after each round, {TITLE}"


def _records() -> list[dict[str, Any]]:
    """Federated lora and finetune (acc_final 0.75 and 0.55), a non-federated sora run."""
    return [
        federated_record("fed-lora", "lora", seen=LORA_SEEN),
        federated_record(
            "fed-finetune",
            "finetune",
            upload=402_653_184,
            download=402_653_184,
            seen=FINETUNE_SEEN,
            peak_bytes=[3 * 2**30, 5 * 2**30, 4 * 2**30, 2 * 2**30],
            matrix=[[0.9, 0.2], [0.3, 0.8]],
            partition="iid",
            backend="flower",
            n_trainable=100_000,
        ),
        make_record("plain-sora", "sora"),
    ]


@dataclass(frozen=True)
class Page:
    page: str
    stderr: str
    out: Path

    def section(self) -> str:
        start = self.page.index('<section id="federated">')
        return self.page[start : self.page.index("</section>", start)]

    def row(self, run_id: str) -> str:
        """The federated table's row of ``run_id``."""
        match = re.search(
            rf'<tr><td class="l mono"><a href="#run-{run_id}">{run_id}</a>.*?</tr>', self.section(), re.S
        )
        assert match, run_id
        return match.group(0)

    def csv(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.out.with_name(f"{self.out.stem}_{name}.csv"))


def _build(records: list[dict[str, Any]], root: Path) -> Page:
    for record in records:
        write_record(root / "runs", record)
    out = root / "report.html"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        build_report([root / "runs"], out)
    return Page(out.read_text(encoding="utf-8"), stderr.getvalue(), out)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Page:
    return _build(_records(), tmp_path_factory.mktemp("federated"))


def _svg(page: str, alt: str) -> str:
    match = re.search(r'<img src="data:image/svg\+xml;base64,([^"]*)" alt="' + re.escape(alt) + '"', page)
    assert match, alt
    return base64.b64decode(match.group(1)).decode("utf-8")


def _cells(row: str) -> list[str]:
    """The text of each cell of a table row, tags removed (``<small>`` parts joined with ``|``)."""
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    return [re.sub(r"<[^>]+>", "", c.replace("<small>", "|")).strip() for c in cells]


def test_the_section_and_its_link_appear_with_federated_runs(report: Page) -> None:
    assert 'href="#federated">Federated</a>' in report.page
    assert re.findall(r"<h3>(.*?)</h3>", report.section()) == [TITLE]
    assert "plain-sora" not in report.section()
    assert "warning" not in report.stderr
    assert "the clients' counters are not collected yet" in " ".join(report.section().split())


def test_the_table_gives_each_run_its_settings_and_exact_byte_figures(report: Page) -> None:
    assert _cells(report.row("fed-lora")) == [
        "fed-lora",
        "lora",
        "0",
        "4",
        "2",
        "0.5 · 2/round",
        "dirichlet (α = 0.5)",
        "fedavg",
        "sequential",
        "14.0 MiB|14,680,064 B",
        "3.5 MiB|3,670,016 B",
        "6.0 MiB|6,291,456 B",
        "8.0 MiB|8,388,608 B",
        "0.750",  # acc_final: (0.6 + 0.9) / 2
        "0.200",  # forgetting: 0.8 - 0.6
        "4.0 s",  # timing.train_s: 2 experiences x 2.0 s
        "2.0 s",  # 8 client rounds x 0.25 s
        "259.0 MiB",  # 2**28 + 3 MiB, the last round's peak
    ]
    assert _cells(report.row("fed-finetune")) == [
        "fed-finetune",
        "finetune",
        "0",
        "4",
        "2",
        "0.5 · 2/round",
        "iid",
        "fedavg",
        "flower",
        "6.0 GiB|6,442,450,944 B",
        "1.5 GiB|1,610,612,736 B",
        "3.0 GiB|3,221,225,472 B",
        "3.0 GiB|3,221,225,472 B",
        "0.550",
        "0.600",
        "4.0 s",
        "2.0 s",
        "5.0 GiB",  # the largest of the rounds' peaks
    ]
    order = [m.group(1) for m in re.finditer(r'<a href="#run-([^"]+)">', report.section())]
    assert order == ["fed-finetune", "fed-lora"]  # by strategy


def test_communication_bytes_is_a_column_of_the_runs_and_resources_tables(report: Page) -> None:
    runs = report.csv("runs").set_index("run_id")
    assert runs.loc["fed-lora", "communication_bytes"] == 14_680_064
    assert runs.loc["fed-finetune", "communication_bytes"] == 6_442_450_944
    assert pd.isna(runs.loc["plain-sora", "communication_bytes"])
    text = report.out.with_name("report_runs.csv").read_text(encoding="utf-8")
    assert ",6442450944," in text  # an integer, not 6442450944.0
    resources = report.csv("resources").set_index("strategy")
    assert resources.loc["lora", "communication_bytes_mean"] == 14_680_064
    assert resources.loc["finetune", "communication_bytes_mean"] == 6_442_450_944
    assert resources.loc["sora", "communication_bytes_n"] == 0
    part = report.page[report.page.index('<section id="resources">') :]
    part = part[: part.index("</table>")]
    assert "<th>communicated (federated)</th>" in part
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", part[: part.index("</thead>")])
    rows = {
        re.sub(r"<[^>]+>", "", cells[1]): cells
        for cells in (
            re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in re.findall(r"<tr>(.*?)</tr>", part, re.S)
        )
        if cells
    }
    at = headers.index("communicated (federated)")
    assert rows["lora"][at] == "14.0 MiB"
    assert rows["finetune"][at] == "6.0 GiB"
    assert rows["sora"][at] == "—"


def test_run_row_has_communication_bytes_only_for_a_federated_record() -> None:
    lora, _, sora = _records()
    assert run_row(lora)["communication_bytes"] == 14_680_064
    assert run_row(sora)["communication_bytes"] is None
    assert run_row({})["communication_bytes"] is None
    for value in ("14 MiB", True, -1, 1.5, float("nan"), 2**64, None):
        assert run_row({"federation": {"communication_bytes": value}})["communication_bytes"] is None, value
    assert run_row({"federation": {"communication_bytes": 1024.0}})["communication_bytes"] == 1024
    assert run_row({"federation": "lots"})["communication_bytes"] is None


def test_the_communication_plot_places_each_run_by_bytes_and_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[list[plots.CommunicationPoint]] = []
    real = plots.communication_plot

    def spy(points: list[plots.CommunicationPoint], colors: dict[str, str]) -> str | None:
        drawn.append(list(points))
        return real(points, colors)

    monkeypatch.setattr(plots, "communication_plot", spy)
    page = _build(_records(), tmp_path)
    assert drawn == [
        [
            plots.CommunicationPoint("finetune, seed 0", "finetune", 6_442_450_944, 0.55),
            plots.CommunicationPoint("lora, seed 0", "lora", 14_680_064, 0.75),
        ]
    ]
    svg = _svg(page.page, COMMUNICATION_ALT)
    for text in (
        ">lora<",
        ">finetune<",
        ">lora, seed 0<",
        ">finetune, seed 0<",
        ">16 MiB<",
        ">4 GiB<",
        ">acc_final<",
    ):
        assert text in svg, text
    assert "(log scale)" in svg


def test_the_round_curves_put_each_round_on_the_experience_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[list[plots.RoundSeries], int]] = []
    real = plots.round_curves

    def spy(series: list[plots.RoundSeries], colors: dict[str, str], n: int) -> str | None:
        drawn.append((list(series), n))
        return real(series, colors, n)

    monkeypatch.setattr(plots, "round_curves", spy)
    page = _build(_records(), tmp_path)
    assert drawn == [
        (
            [
                plots.RoundSeries("finetune, seed 0", "finetune", [0.5, 1.0, 1.5, 2.0], FINETUNE_SEEN),
                plots.RoundSeries("lora, seed 0", "lora", [0.5, 1.0, 1.5, 2.0], LORA_SEEN),
            ],
            2,
        )
    ]
    svg = _svg(page.page, ROUNDS_ALT)
    assert ">seen-class accuracy after each round<" in svg
    assert "dashed: experience boundaries" in svg
    assert svg.count("stroke-dasharray") >= 1  # the boundary between experiences 0 and 1


def test_round_series_with_rounds_of_unequal_count() -> None:
    record = federated_record("r", rounds=3, matrix=[[0.5, 0.1], [0.4, 0.6]])
    x, y = federated.round_series(record["federation"])
    assert x == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0])
    assert y == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    del record["federation"]["rounds"][5]  # the last round of experience 1 missing: still thirds
    x, _ = federated.round_series(record["federation"])
    assert x == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3])


def test_no_section_and_no_communication_column_without_federated_runs(standard_report: Built) -> None:
    assert 'id="federated"' not in standard_report.page
    assert 'href="#federated"' not in standard_report.page
    assert "communicated (federated)" not in standard_report.page
    site = standard_report.out.parent
    assert pd.read_csv(site / "report_runs.csv")["communication_bytes"].isna().all()
    assert "communication_bytes_mean" not in pd.read_csv(site / "report_resources.csv").columns


def _set(path: str, value: Any) -> Any:
    def mutate(record: dict[str, Any]) -> None:
        node: Any = record
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _drop(path: str) -> Any:
    def mutate(record: dict[str, Any]) -> None:
        node: Any = record
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return mutate


MALFORMED: list[tuple[str, Any, str]] = [
    ("a-string", _set("federation", "lots of bytes"), "federation is 'lots of bytes', not an object"),
    ("a-list", _set("federation", [1, 2]), "federation is [1, 2], not an object"),
    ("empty", _set("federation", {}), "federation.config is None, not an object"),
    ("no-config", _drop("federation.config"), "federation.config is None, not an object"),
    (
        "clients-zero",
        _set("federation.config.clients", 0),
        "federation.config.clients is 0, not a positive integer",
    ),
    (
        "rounds-string",
        _set("federation.config.rounds", "5"),
        "federation.config.rounds is '5', not a positive integer",
    ),
    (
        "alpha-string",
        _set("federation.config.alpha", "0.5"),
        "federation.config.alpha is '0.5', not a number",
    ),
    (
        "partition-number",
        _set("federation.config.partition", 3),
        "federation.config.partition is 3, not a name",
    ),
    (
        "no-communication",
        _drop("federation.communication_bytes"),
        "federation.communication_bytes is None, not a count of bytes",
    ),
    (
        "communication-string",
        _set("federation.communication_bytes", "14 MiB"),
        "federation.communication_bytes is '14 MiB', not a count of bytes",
    ),
    (
        "upload-negative",
        _set("federation.upload_bytes_total", -5),
        "federation.upload_bytes_total is -5, not a count of bytes",
    ),
    (
        "download-float",
        _set("federation.download_bytes_total", 1.5),
        "federation.download_bytes_total is 1.5, not a count of bytes",
    ),
    (
        "per-round-string",
        _set("federation.bytes_per_round", "3.5 MiB"),
        "federation.bytes_per_round is '3.5 MiB'",
    ),
    ("rounds-a-dict", _set("federation.rounds", {"0": {}}), "federation.rounds is {'0': {}}, not a list"),
    ("round-a-number", _set("federation.rounds.1", 7), "federation.rounds[1] is 7, not an object"),
    (
        "round-no-experience",
        _drop("federation.rounds.2.experience"),
        "federation.rounds[2].experience is None",
    ),
    (
        "round-negative",
        _set("federation.rounds.0.round", -1),
        "federation.rounds[0].round is -1, not an index",
    ),
    (
        "seen-string",
        _set("federation.rounds.3.seen_accuracy", "62 %"),
        "federation.rounds[3].seen_accuracy is '62 %', not a number or null",
    ),
    (
        "peaks-strings",
        _set("federation.rounds.0.client_peak_bytes", ["1 GiB"]),
        "federation.rounds[0].client_peak_bytes is ['1 GiB'], not a list of numbers",
    ),
    (
        "train-s-a-number",
        _set("federation.rounds.0.client_train_s", 0.5),
        "federation.rounds[0].client_train_s is 0.5, not a list of numbers",
    ),
]
"""(id, mutation of a federated record, the reason the warning and the page give)."""


def _malformed(name: str, mutate: Any) -> dict[str, Any]:
    record = federated_record(f"fed-bad-{name}", "sora", seed=3)
    mutate(record)
    return record


@pytest.fixture(scope="module")
def malformed_report(tmp_path_factory: pytest.TempPathFactory) -> Page:
    """:func:`_records` and one sora run per :data:`MALFORMED` case (``fed-bad-<id>``) in one report."""
    bad = [_malformed(name, mutate) for name, mutate, _ in MALFORMED]
    return _build([*_records(), *bad], tmp_path_factory.mktemp("malformed"))


@pytest.mark.parametrize(("name", "mutate", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_federation_is_named_by_its_first_problem(name: str, mutate: Any, reason: str) -> None:
    problem = federated.federation_problem(_malformed(name, mutate))
    assert problem is not None
    assert problem.startswith(reason)


@pytest.mark.parametrize("name", [m[0] for m in MALFORMED])
def test_a_malformed_federation_is_left_out_of_the_section_with_a_note(
    malformed_report: Page, name: str
) -> None:
    run_id = f"fed-bad-{name}"
    reason = next(r for n, _, r in MALFORMED if n == name)
    warnings = [line for line in malformed_report.stderr.splitlines() if f"run {run_id}:" in line]
    assert len(warnings) == 1, malformed_report.stderr
    assert warnings[0].startswith(f"warning: run {run_id}: {reason}")
    assert warnings[0].endswith("; it is left out of the federated section")
    section = malformed_report.section()
    note = section[section.index('id="federated-skipped"') : section.index("</div>")]
    assert f'<li><span class="mono">{run_id}</span>: {escape(reason)}' in note
    assert f'href="#run-{run_id}"' not in section
    assert f'id="run-{run_id}"' in malformed_report.page  # the run itself is still reported


def test_malformed_federations_leave_the_good_runs_and_the_page(malformed_report: Page) -> None:
    assert _cells(malformed_report.row("fed-lora"))[9] == "14.0 MiB|14,680,064 B"
    assert _cells(malformed_report.row("fed-finetune"))[9] == "6.0 GiB|6,442,450,944 B"
    assert "could not be drawn" not in malformed_report.page
    assert "warning: skipped" not in malformed_report.stderr  # the records themselves are readable
    assert len(malformed_report.stderr.splitlines()) == len(MALFORMED)


def test_a_report_whose_only_federated_record_is_malformed_has_the_note_only(tmp_path: Path) -> None:
    bad = federated_record("fed-bad")
    bad["federation"]["rounds"] = None
    page = _build([bad, make_record("plain-sora", "sora")], tmp_path)
    section = page.section()
    assert "federation.rounds is None, not a list" in section
    assert "<h3>" not in section
    assert "<table" not in section
    # its byte total is readable: the main tables keep it
    assert page.csv("runs").set_index("run_id").loc["fed-bad", "communication_bytes"] == 14_680_064


def test_a_huge_byte_count_skips_the_whole_record_as_other_huge_numbers_do(tmp_path: Path) -> None:
    bad = federated_record("fed-huge")
    bad["federation"]["rounds"][0]["upload_bytes"] = [HUGE, 1]
    page = _build([*_records(), bad], tmp_path)
    path = tmp_path / "runs" / "fed-huge" / "result.json"
    assert (
        f"warning: skipped {path}: federation.rounds[0].upload_bytes[0] is an integer too large"
        in page.stderr
    )
    assert 'id="run-fed-huge"' not in page.page
    assert "fed-lora" in page.section()


def test_a_section_that_fails_to_draw_leaves_the_rest_of_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise ZeroDivisionError("nobody foresaw this")

    monkeypatch.setattr(build.federated, "federated_view", broken)
    page = _build(_records(), tmp_path)
    assert "warning: the federated section could not be drawn (ZeroDivisionError: nobody foresaw this)" in (
        page.stderr
    )
    assert "This section could not be drawn (ZeroDivisionError: nobody foresaw this)" in page.section()
    assert 'id="run-fed-lora"' in page.page
