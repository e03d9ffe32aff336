"""The front door: a README a newcomer reads in five minutes, links that lead somewhere, no
words of the project's history, and `make help` listing the targets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "deploy").glob("*/README.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HISTORY = re.compile(r"the outside test|the accuracy issue|\(#\d+\)|\bissue #?\d+", re.IGNORECASE)


def relative_links(doc: Path) -> list[str]:
    return [target for target in LINK.findall(doc.read_text())
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def test_every_relative_link_of_the_docs_leads_to_a_file():
    dead = [f"{doc.relative_to(ROOT)} -> {target}" for doc in DOCS for target in relative_links(doc)
            if not (doc.parent / target.split("#")[0]).exists()]
    assert dead == []
    assert len(relative_links(ROOT / "README.md")) >= 8  # the README leads to the rest


def test_the_readme_is_short_and_the_docs_keep_no_project_history():
    assert len((ROOT / "README.md").read_text().split()) <= 1200
    assert [f"{doc.relative_to(ROOT)}: {match.group(0)}" for doc in DOCS
            for match in HISTORY.finditer(doc.read_text())] == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_the_everyday_targets():
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    targets = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert {"demo", "test", "train-real", "serve", "bench", "clean-demo", "clean-all", "help"} <= targets
