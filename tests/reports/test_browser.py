"""The report in a real headless Chromium (Debian's chromium package, driven by playwright).

Run with ``pytest -m browser tests/reports`` (``tox -e browser``); the default run deselects it.
The page must render with no console error and no request leaving the file, every image must
decode (naturalWidth > 0), and a full-page screenshot must be a real picture.

Chromium is the ``chromium`` on PATH (``shutil.which``, as tox's install step checks). Without it
or without playwright the test is skipped, except where ``CL_BENCH_REQUIRE_BROWSER=1`` (set by
``tox -e browser``): there a missing browser is a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import importlib
import os
import shutil
import struct
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from reports.build import build_report
from tests.reports.records import make_record, standard_set, strategy_figures_record, write_record

pytestmark = pytest.mark.browser

REQUIRE_ENV = "CL_BENCH_REQUIRE_BROWSER"
# Without the background-networking flags Chromium tries to reach Google services, and this
# machine's closed network refuses the connections (reported as console noise or hangs).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(what: str) -> NoReturn:
    """Skip, or fail where the environment requires the browser test to run."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{what}, and {REQUIRE_ENV}=1 requires the browser test to run")
    pytest.skip(what)


def browser() -> tuple[ModuleType, str]:
    """``playwright.sync_api`` and the path of ``chromium``, or skip/fail (see the module docstring)."""
    try:
        sync_api = importlib.import_module("playwright.sync_api")
    except ImportError:
        _missing("playwright is not installed (pip install playwright)")
    chromium = shutil.which("chromium")
    if chromium is None:
        _missing("chromium is not on PATH (apt-get install chromium)")
    return sync_api, chromium


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    runs = root / "runs"
    standard_set(runs)
    write_record(runs, strategy_figures_record())
    write_record(runs, make_record("many-exp", "lora", "split-digits", 1, matrix=[[0.5] * 12] * 12))
    (runs / "junk.json").write_text("not json", encoding="utf-8")
    return build_report([runs], root / "report.html")


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    sync_api, chromium = browser()
    console: list[str] = []
    requests: list[str] = []
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: console.append(f"requestfailed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
                " w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
            )
            provenance = page.evaluate(
                "(() => { const t = document.querySelector('#provenance table');"
                " return [t.scrollWidth, t.parentElement.clientWidth]; })()"
            )
            title = page.title()
            overview_rows = page.locator("table.overview tbody tr:not(.competition)").count()
            competitions = page.locator("table.overview tbody tr.competition").all_inner_texts()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert console == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert title == "cl-bench report"
    assert provenance[0] <= provenance[1], provenance  # fits the 1240 px column without scrolling
    # split-digits lora with 2 and with 12 experiences (two configurations); synthetic finetune, lora, sora
    assert overview_rows == 5
    # one header row per competition (scenario, protocol, label space) above its runs
    assert [c.split(" · ")[0].strip() for c in competitions] == ["split-digits", "synthetic"], competitions
    assert len(images) == report.read_text(encoding="utf-8").count("<img ")
    assert len(images) >= 15
    broken = [i["alt"] for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert broken == []
    assert all(i["shown"] > 50 for i in images if "many-exp" not in i["alt"])
    width, height = _png_size(shot)
    assert width >= 1200
    assert height >= 3000
    assert shot.stat().st_size > 100_000
