"""The browser test skips where no browser is installed, but fails under ``tox -e browser``."""

from __future__ import annotations

import configparser
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.reports import test_browser


@pytest.fixture
def playwright_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``playwright.sync_api`` so that only chromium is missing."""
    monkeypatch.setitem(sys.modules, "playwright.sync_api", ModuleType("playwright.sync_api"))


@pytest.fixture
def playwright_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import raises ImportError


def test_a_missing_chromium_skips_by_default(
    monkeypatch: pytest.MonkeyPatch, playwright_present: None
) -> None:
    monkeypatch.delenv(test_browser.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception)) as caught:
        test_browser.browser()
    assert isinstance(caught.value, pytest.skip.Exception)


def test_a_missing_chromium_fails_where_the_browser_is_required(
    monkeypatch: pytest.MonkeyPatch, playwright_present: None
) -> None:
    monkeypatch.setenv(test_browser.REQUIRE_ENV, "1")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="chromium is not on PATH"):
        test_browser.browser()


def test_a_missing_playwright_fails_where_the_browser_is_required(
    monkeypatch: pytest.MonkeyPatch, playwright_missing: None
) -> None:
    monkeypatch.setenv(test_browser.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="playwright is not installed"):
        test_browser.browser()
    monkeypatch.delenv(test_browser.REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception):
        test_browser.browser()


def test_chromium_is_looked_up_on_path(monkeypatch: pytest.MonkeyPatch, playwright_present: None) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/bin/{name}")
    assert test_browser.browser()[1] == "/opt/bin/chromium"


def test_tox_browser_env_requires_the_browser() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(Path(__file__).resolve().parents[2] / "tox.ini", encoding="utf-8")
    setenv = tox["testenv:browser"].get("setenv", "")
    assert f"{test_browser.REQUIRE_ENV} = 1" in setenv
