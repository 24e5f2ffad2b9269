"""The repository explains itself: every docs page is linked from the README, every test a page
cites exists, and nothing points at documents outside the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / f for f in out.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every text file
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert DOCS
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_every_test_a_docs_page_cites_exists():
    cited = 0
    for page in DOCS:
        for file, name in re.findall(r"tests/(test_\w+\.py)::(test_\w+)", page.read_text()):
            source = ROOT / "tests" / file
            assert source.is_file() and re.search(rf"^def {name}\(", source.read_text(), re.M), (
                f"{page.name} cites tests/{file}::{name}, which does not exist"
            )
            cited += 1
    assert cited > 100


def test_relative_links_between_docs_pages_resolve():
    for page in [*DOCS, ROOT / "README.md"]:
        for target in re.findall(r"\]\(((?:\.\./|docs/)?[\w./-]+\.(?:md|png))(?:#[\w-]+)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name} links {target}, which is missing"


def test_nothing_refers_to_documents_outside_the_repository():
    pattern = re.compile(r"\bS" + r"PEC\b|\.\./" + "shared")  # in parts, so that this file passes too
    for path in _tracked():
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", "") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            assert not pattern.search(line), f"{path.relative_to(ROOT)}:{number} refers outside the repo: {line}"
