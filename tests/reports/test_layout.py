"""The report's layout with many runs (issue 22): full width, collapsed run sections, wide tables
scrolling in their own box with a sticky header and group column.

The browser half (no page-level sideways scroll at 1280 and 1920 px, sections opening on a click)
is in :mod:`tests.reports.test_browser`, the legends in :mod:`tests.reports.test_legends`; here
the HTML is read as text.
"""

from __future__ import annotations

import re

import pytest

from tests.reports.conftest import Built


def _css(page: str) -> str:
    return page[page.index("<style>") : page.index("</style>")]


def _rule(css: str, selector: str) -> str:
    """The declarations of the first rule whose selector is exactly ``selector``."""
    match = re.search(rf"(?m)^{re.escape(selector)} {{([^}}]*)}}", css)
    assert match, selector
    return match.group(1)


def test_the_page_has_no_width_cap(many_report: Built) -> None:
    css = _css(many_report.page)
    for selector in ("html", "body", "main"):
        rule = re.search(rf"(?m)^{selector} {{([^}}]*)}}", css)
        declarations = rule.group(1) if rule else ""
        assert "max-width" not in declarations, selector
        assert not re.search(r"(?<!-)width:\s*\d", declarations), selector
    # the only fixed widths left are prose measures and header formulas, never a layout column
    capped = re.findall(r"(?m)^([^{\n]+){[^}]*max-width:\s*\d+px", css)
    assert sorted(s.strip() for s in capped) == [".note", "p.rule", "th .formula"], capped


def test_run_sections_are_collapsed_with_a_summary(many_report: Built) -> None:
    sections = re.findall(r'<details class="run"[^>]*>\s*<summary>', many_report.page)
    assert len(sections) == 44
    assert not any(" open" in s for s in sections)
    runs = many_report.page[many_report.page.index('<section id="runs">') :]
    assert '<p class="run-controls" hidden>' in runs  # shown by the script, absent without it
    assert '<button type="button" id="expand-all">' in runs
    assert '<button type="button" id="collapse-all">' in runs


def test_the_only_script_is_inline(many_report: Built) -> None:
    scripts = re.findall(r"<script[^>]*>", many_report.page)
    assert scripts == ["<script>"]
    script = many_report.page[many_report.page.index("<script>") : many_report.page.index("</script>")]
    assert "beforeprint" in script  # printing opens every section
    assert not re.search(r"fetch|XMLHttpRequest|import\(|https?:", script)


@pytest.mark.parametrize("section", ["overview", "parameters", "resources", "provenance"])
def test_wide_tables_scroll_in_their_box_with_a_sticky_key_column(many_report: Built, section: str) -> None:
    page = many_report.page
    part = page[page.index(f'<section id="{section}">') :]
    part = part[: part.index("</table>")]
    assert '<div class="scroll sticky">' in part
    header = part[part.index("<thead>") : part.index("</thead>")]
    assert header.count(" key") == 1
    rows = re.findall(r"<tr[ >](?:(?!</tr>).)*</tr>", part[part.index("<tbody>") :], re.S)
    data_rows = [r for r in rows if 'class="competition"' not in r]
    assert len(data_rows) >= 21
    assert all(len(re.findall(r'<td class="[^"]*\bkey\b', r)) == 1 for r in data_rows)
    css = _css(page)
    assert "position: sticky" in _rule(css, ".scroll.sticky thead th")
    assert "position: sticky" in _rule(css, ".scroll.sticky .key")
    assert "max-height: none" in css[css.index("@media print") :]  # print shows whole tables
