"""Copy measured figures from reports/ into the docs, so that no table is typed by hand.

A doc marks each generated block:

    <!-- include reports/real/summary.md#1 -->
    (replaced)
    <!-- end include -->

`PATH` includes the whole file, `PATH#N` its N-th block of lines separated by blank lines.
A figure inside a sentence comes from a JSON report the same way, by its keys and a format:

    in-process scoring ran at <!-- value reports/bulk/bulk.json | ways/in-process/listings_per_second
    | .1f -->78.0<!-- end --> listings/s

(keys separated by `/`, which a key may also hold; a list's item by its index; the format is
Python's, e.g. `.1f`, `.1%`, `,`). `--keep-missing` leaves the blocks whose report is absent.
Usage: python -m marketplace_classifier.ops.publish [docs/results.md docs/benchmark.md] [--check]
       [--keep-missing]
(--check changes nothing and exits 1 when a doc differs from its reports.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from marketplace_classifier.project import ROOT as PROJECT_ROOT

ROOT = PROJECT_ROOT
DOCS = (ROOT / "docs" / "results.md", ROOT / "docs" / "benchmark.md")
BLOCK = re.compile(r"(<!-- include (?P<source>[^ #]+)(?:#(?P<part>\d+))? -->\n)(?P<body>.*?)"
                   r"(<!-- end include -->)", re.DOTALL)


VALUE = re.compile(r"(<!-- value (?P<source>[^|]+?)\s*\|\s*(?P<keys>[^|]+?)\s*"
                   r"(?:\|\s*(?P<format>[^|]*?)\s*)?-->)(?P<body>[^<]*)(<!-- end -->)", re.DOTALL)


class PublishError(RuntimeError):
    """A doc names a report that cannot be included."""


def report_text(source: str, root: Path) -> str:
    path = root / source
    if not path.is_file():
        raise PublishError(f"{source} not found: run the command that writes it first")
    return path.read_text()


def included(source: str, part: str | None, root: Path) -> str:
    text = report_text(source, root)
    if part is None:
        return text.rstrip("\n") + "\n"
    blocks = [block for block in re.split(r"\n\s*\n", text.strip("\n")) if block.strip()]
    if not 1 <= int(part) <= len(blocks):
        raise PublishError(f"{source}#{part}: the file has {len(blocks)} block(s)")
    return blocks[int(part) - 1] + "\n"


def value(source: str, keys: str, format_spec: str | None, root: Path) -> str:
    """One figure of a JSON report, formatted: `keys` is a `/`-separated path into it."""
    found = json.loads(report_text(source, root))
    parts = " ".join(keys.split()).split("/")
    while parts:
        try:
            found, parts = step_into(found, parts)
        except (KeyError, IndexError, ValueError, TypeError):
            raise PublishError(f"{source} has no {keys!r} (stopped at {parts[0]!r})") from None
    try:
        return format(found, format_spec or "")
    except (TypeError, ValueError) as error:
        raise PublishError(f"{source} {keys!r}: format {format_spec!r}: {error}") from None


def step_into(found, parts: list[str]) -> tuple[object, list[str]]:
    """One level down: a list's item by index, else the longest run of parts that is a key (a
    report's key may itself hold a `/`)."""
    if isinstance(found, list):
        return found[int(parts[0])], parts[1:]
    for length in range(len(parts), 0, -1):
        key = "/".join(parts[:length])
        if key in found:
            return found[key], parts[length:]
    raise KeyError(parts[0])


def publish(doc: Path, root: Path | None = None, missing: list[str] | None = None) -> str:
    """The doc with every include block and every value filled from its report (paths relative
    to `root`). With a `missing` list, a block whose report file is absent keeps what it holds
    and its report is added to the list; otherwise it is an error."""
    root = root or ROOT

    def kept_when_missing(match: re.Match, make) -> str:
        source = match["source"].strip()
        if missing is not None and not (root / source).is_file():
            missing.append(source)
            return match.group(0)
        # the opening comment, the filled body, then the closing comment (each pattern's last group)
        return match.group(1) + make() + match.group(match.lastindex)

    def fill(match: re.Match) -> str:
        return kept_when_missing(match, lambda: included(match["source"], match["part"], root))

    def fill_value(match: re.Match) -> str:
        return kept_when_missing(
            match, lambda: value(match["source"].strip(), match["keys"], match["format"], root))

    return VALUE.sub(fill_value, BLOCK.sub(fill, doc.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("docs", nargs="*", type=Path, default=list(DOCS))
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc is out of date")
    parser.add_argument("--keep-missing", action="store_true",
                        help="leave the blocks whose report this machine lacks as they are (named on stderr)")
    args = parser.parse_args(argv)
    stale = []
    for doc in args.docs:
        missing = [] if args.keep_missing else None
        try:
            text = publish(doc, missing=missing)
        except (OSError, PublishError) as error:
            print(f"error: {doc}: {error}", file=sys.stderr)
            return 2
        for source in dict.fromkeys(missing or []):
            print(f"kept as it was in {doc}: {source} not found", file=sys.stderr)
        if text != doc.read_text():
            stale.append(str(doc))
            if not args.check:
                doc.write_text(text)
    verb = "out of date" if args.check else "updated"
    print(f"{verb}: {', '.join(stale)}" if stale else "docs match their reports")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
