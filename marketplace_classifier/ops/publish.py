"""Copy measured figures from reports/ into the docs, so that no table is typed by hand.

A doc marks each generated block:

    <!-- include reports/real/summary.md#1 -->
    (replaced)
    <!-- end include -->

`PATH` includes the whole file, `PATH#N` its N-th block of lines separated by blank lines.
Usage: python -m marketplace_classifier.ops.publish [docs/results.md docs/benchmark.md] [--check]
(--check changes nothing and exits 1 when a doc differs from its reports.)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from marketplace_classifier.project import ROOT as PROJECT_ROOT

ROOT = PROJECT_ROOT
DOCS = (ROOT / "docs" / "results.md", ROOT / "docs" / "benchmark.md")
BLOCK = re.compile(r"(<!-- include (?P<source>[^ #]+)(?:#(?P<part>\d+))? -->\n)(?P<body>.*?)"
                   r"(<!-- end include -->)", re.DOTALL)


class PublishError(RuntimeError):
    """A doc names a report that cannot be included."""


def included(source: str, part: str | None, root: Path) -> str:
    path = root / source
    if not path.is_file():
        raise PublishError(f"{source} not found: run the command that writes it first")
    text = path.read_text()
    if part is None:
        return text.rstrip("\n") + "\n"
    blocks = [block for block in re.split(r"\n\s*\n", text.strip("\n")) if block.strip()]
    if not 1 <= int(part) <= len(blocks):
        raise PublishError(f"{source}#{part}: the file has {len(blocks)} block(s)")
    return blocks[int(part) - 1] + "\n"


def publish(doc: Path, root: Path | None = None) -> str:
    """The doc with every include block filled from its report (paths relative to `root`)."""
    root = root or ROOT

    def fill(match: re.Match) -> str:
        return match.group(1) + included(match["source"], match["part"], root) + match.group(5)

    return BLOCK.sub(fill, doc.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("docs", nargs="*", type=Path, default=list(DOCS))
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc is out of date")
    args = parser.parse_args(argv)
    stale = []
    for doc in args.docs:
        try:
            text = publish(doc)
        except (OSError, PublishError) as error:
            print(f"error: {doc}: {error}", file=sys.stderr)
            return 2
        if text != doc.read_text():
            stale.append(str(doc))
            if not args.check:
                doc.write_text(text)
    verb = "out of date" if args.check else "updated"
    print(f"{verb}: {', '.join(stale)}" if stale else "docs match their reports")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
