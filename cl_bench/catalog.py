"""The registered names, aliases and descriptions, read from the component files without importing them.

``cl-bench list`` answers in a fraction of a second this way: importing the component modules to
run their ``@REGISTRY.register(...)`` decorators pulls in torch, avalanche and open_clip (2-3 s).
The decorators' arguments are literals, so Python's own parser reads them from the source;
``tests/core/test_catalog.py`` checks that this reading equals the imported registries. Anything
that is not a literal raises :class:`CatalogError`, and the caller imports the components instead.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

REGISTRY_NAMES = {"STRATEGIES": "strategies", "SCENARIOS": "scenarios", "BACKBONES": "backbones"}
"""The registry variables of :mod:`cl_bench.registry` and the kind each lists."""


class CatalogError(Exception):
    """A registration the parser cannot read without running the code."""


@dataclass(frozen=True)
class Listing:
    """One registration as ``cl-bench list`` shows it."""

    name: str
    description: str
    aliases: tuple[str, ...] = ()


def module_files(module: str) -> list[Path]:
    """The source files of ``module`` (a package: every ``.py`` under it), found without importing it.

    ``cl_bench.*`` names are resolved inside this package's directory, so that the (torch-importing)
    ``cl_bench.backbones`` package is not executed to find its submodules.
    """
    parts = module.split(".")
    if parts[0] == "cl_bench":
        base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    else:
        spec = importlib.util.find_spec(parts[0])
        if spec is None or spec.origin is None:
            raise CatalogError(f"cannot find the package {parts[0]!r}")
        base = Path(spec.origin).parent.joinpath(*parts[1:])
    if base.is_dir():
        return sorted(base.rglob("*.py"))
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    raise CatalogError(f"cannot find the source of {module!r}")


def registrations(path: Path) -> list[tuple[str, Listing]]:
    """``(kind, listing)`` of every ``@<REGISTRY>.register(name, description=..., aliases=...)`` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if not (
                isinstance(decorator, ast.Call)
                and isinstance(decorator.func, ast.Attribute)
                and decorator.func.attr == "register"
                and isinstance(decorator.func.value, ast.Name)
                and decorator.func.value.id in REGISTRY_NAMES
            ):
                continue
            where = f"{path}:{decorator.lineno}"
            try:
                (name,) = (ast.literal_eval(arg) for arg in decorator.args)
                keywords = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords}
                listing = Listing(name, keywords["description"], tuple(keywords.get("aliases", ())))
            except (ValueError, KeyError) as err:
                raise CatalogError(f"{where}: a registration that is not literal ({err!r})") from None
            found.append((REGISTRY_NAMES[decorator.func.value.id], listing))
    return found


def read(modules: tuple[str, ...]) -> dict[str, list[Listing]]:
    """Kind -> listings sorted by name (as :class:`cl_bench.registry.Registry` iterates them)."""
    kinds: dict[str, list[Listing]] = {kind: [] for kind in REGISTRY_NAMES.values()}
    for module in modules:
        for path in module_files(module):
            for kind, listing in registrations(path):
                kinds[kind].append(listing)
    return {kind: sorted(listings, key=lambda e: e.name) for kind, listings in kinds.items()}
