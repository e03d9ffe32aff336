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


# A measured figure: a decimal, a percentage or a ratio (`2.5x`). Not one: a setting in a code span,
# a version after its product's name, a target after ≥ or ≤, a level before "precision" or
# "interval", and others' published figures in a paragraph that says so.
FIGURE = re.compile(r"(?<![\w.#/-])\d+(?:,\d{3})*(?:(?:\.\d+)?[x×]\b|\.\d+(?:\s?%)?|\s?%)(?![.\d])")
NOT_MEASURED_BEFORE = re.compile(r"(?:[≥≤]|\b[A-Z][\w-]*) $")
NOT_MEASURED_AFTER = re.compile(r"\s+(?:precision|bootstrap|interval|confidence)")
GENERATED = re.compile(r"<!-- include .*?<!-- end include -->|<!-- value .*?<!-- end -->|```.*?```|`[^`]*`",
                       re.DOTALL)


def typed_figures(text: str) -> list[str]:
    prose = re.sub(r"\n(?![\n|])", " ", GENERATED.sub("", text))  # a paragraph on one line
    return [f"{figure.group(0)!r} in {line.strip()[:80]!r}"
            for line in prose.splitlines() if "published" not in line
            for figure in FIGURE.finditer(line)
            if not NOT_MEASURED_BEFORE.search(line[:figure.start()])
            and not NOT_MEASURED_AFTER.match(line[figure.end():])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_measured_figures_are_copied_from_reports_not_typed(doc):
    assert typed_figures(doc.read_text()) == [], "put it in a report, copy it with ops.publish"


def test_a_typed_figure_is_found_and_a_version_or_target_is_not():
    sample = ("TorchServe 0.12 served 34.5 items/s, 2.8x the naive one; 59.7% filed at 95% precision "
              "(target ≥ 0.76) on 127.0.0.1; `--lite 1.25` <!-- value r.json | a -->0.8<!-- end -->\n")
    assert [item.split(" in ")[0] for item in typed_figures(sample)] == ["'34.5'", "'2.8x'", "'59.7%'"]
