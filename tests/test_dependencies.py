"""Every module of the package imports, and every third-party import it makes is a declared dependency.

The first fails in a fresh environment (CI's, .ci/run) when a dependency is missing; the second fails
anywhere when a module imports a distribution that is only installed as someone else's dependency.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The source folder of each package of the distribution (setup.py maps them the same way).
PACKAGE_FOLDERS = {"loracompose": "compose", "loracompose.pipelines": "pipelines", "loracompose.attention": "attention",
                   "loracompose.eval": "eval", "loracompose.ui": "ui"}


def package_modules() -> list[str]:
    names = []
    for package, folder in PACKAGE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts if part != "__init__"]
            if parts[-1:] != ["__main__"]:  # running it is the CLI, not an import
                names.append(".".join([package, *parts]))
    return names


def third_party_imports() -> dict[str, set[str]]:
    """Top-level name of each non-stdlib module imported anywhere in the package -> the files importing it."""
    found: dict[str, set[str]] = {}
    for folder in PACKAGE_FOLDERS.values():
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"loracompose"}:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_runtime_distributions() -> set[str]:
    """Distributions named in pyproject.toml's dependencies and its extras other than ``test``."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [group for name, group in project.get("optional-dependencies", {}).items() if name != "test"]
    requirements = [*project["dependencies"], *(requirement for group in extras for requirement in group)]
    return {normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)) for requirement in requirements}


@pytest.mark.parametrize("module", package_modules())
def test_every_module_of_the_package_imports(module: str) -> None:
    importlib.import_module(module)


def test_every_third_party_import_is_a_declared_dependency() -> None:
    imports = third_party_imports()
    assert {"torch", "diffusers", "PIL", "yaml"} <= set(imports), "the scan sees the package's imports"
    providers = packages_distributions()
    declared = declared_runtime_distributions()
    undeclared = {name: sorted(files) for name, files in imports.items()
                  if not {normalized(dist) for dist in providers.get(name, [name])} & declared}
    assert undeclared == {}, "declare these in pyproject.toml (or an extra, if the import is optional)"
