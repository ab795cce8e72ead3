"""``cl-bench list`` reads the registrations from source: the same listing as the imported registries."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cl_bench import catalog
from cl_bench.cli import COMPONENT_MODULES
from cl_bench.registry import BACKBONES, SCENARIOS, STRATEGIES
from tests import helpers  # noqa: F401  (fills the registries)


@pytest.mark.parametrize(
    ("kind", "registry"), [("strategies", STRATEGIES), ("scenarios", SCENARIOS), ("backbones", BACKBONES)]
)
def test_the_source_listing_equals_the_imported_registry(kind: str, registry) -> None:
    listed = catalog.read(COMPONENT_MODULES)[kind]
    assert listed == [catalog.Listing(e.name, e.description, e.aliases) for e in registry]


def test_list_imports_no_torch_and_prints_every_strategy() -> None:
    code = (
        "import sys\n"
        "from cl_bench.cli import main\n"
        "rc = main(['list'])\n"
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', 'open_clip'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.rstrip().splitlines()[-1] == "0 []"
    for name in STRATEGIES.names():
        assert f"\n  {name} " in out.stdout


def test_a_registration_that_is_not_literal_is_refused_naming_the_line(tmp_path: Path) -> None:
    source = tmp_path / "computed.py"
    source.write_text(
        textwrap.dedent(
            """
            from cl_bench.registry import STRATEGIES

            NAME = "x"

            @STRATEGIES.register(NAME, description="computed name")
            class X:
                pass
            """
        )
    )
    with pytest.raises(catalog.CatalogError, match=r"computed.py:6: a registration that is not literal"):
        catalog.registrations(source)


def test_aliases_and_implicitly_joined_descriptions_are_read(tmp_path: Path) -> None:
    source = tmp_path / "ok.py"
    source.write_text(
        'from cl_bench.registry import SCENARIOS\n\n\n@SCENARIOS.register(\n    "a-b",\n'
        '    description="one " "two",\n    aliases=("ab",),\n)\ndef make():\n    pass\n'
    )
    assert catalog.registrations(source) == [("scenarios", catalog.Listing("a-b", "one two", ("ab",)))]
