"""pyproject.toml declares every package the code imports, so `pip install .` alone gives a working install."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from tests.helpers import ROOT

RUN_AS_TOOLS = {"accelerate", "dvc-s3"}  # declared for their commands and plugins, never imported


def imported(*packages: str) -> set[str]:
    """Top-level third-party modules imported anywhere under ``packages`` (absolute imports only)."""
    mods = set()
    for package in packages:
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods.add(node.module.split(".")[0])
    ours = {"politune", "stages", "tests", "demo", "bench"}
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ours}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[;]", r, 1)[0].strip().lower().replace("_", "-") for r in requirements}


def test_every_imported_package_is_declared_and_every_declared_one_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    distributions = md.packages_distributions()
    needed = {}
    for module in imported("politune", "stages"):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert dists, f"{module}: imported by the package but no installed distribution provides it"
        needed[module] = dists
    missing = {m: d for m, d in needed.items() if not d & (declared | extras["cpu"])}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    used = set().union(*needed.values())
    assert not declared - used - RUN_AS_TOOLS, f"declared but never imported: {declared - used - RUN_AS_TOOLS}"
    for module in imported("tests"):  # the tests' own imports: the package's, or the test extra's
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert dists & (declared | extras["cpu"] | extras["test"]), f"tests import {module}, declared nowhere"
