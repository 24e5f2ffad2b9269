"""Every package dlm imports is declared in pyproject.toml (a core dependency or an extra)."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {"tensorboard"}  # a tracker used only when installed (train.trackers: auto)


def _imports() -> dict[str, str]:
    found = {}
    for folder in ("dlm", "train", "decode", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "dlm":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_imported_package_is_declared():
    declared, provides = _declared(), packages_distributions()
    for module, where in _imports().items():
        if module in OPTIONAL:
            continue
        dists = {d.lower().replace("_", "-") for d in provides.get(module, [module])}
        assert dists & declared, f"{where} imports {module} ({', '.join(sorted(dists))}): not in pyproject.toml"


def test_the_dev_extra_is_eval_and_rl_plus_test_tools():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["dev"][0] == "dlm[eval,rl]"
