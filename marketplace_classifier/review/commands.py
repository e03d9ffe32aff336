"""`marketplace-classifier review <step>`: the review queue from the command line.

  migrate        bring the database's schema up to date (every other step does it too)
  add-reviewer   create a reviewer (password from --password-file, or generated and printed)
  ingest         enqueue the flagged listings of bulk scoring's output (--scores, --listings) or
                 of the request log (--request-log), explained by the exported model (--model-dir)
  serve          the review page on 127.0.0.1 (a printed address; sign in as a reviewer)
  export         reviewed listings in the marketplace layout (Products.csv, Images.csv, images/)
  status         how many listings are open and decided

The database is --db: sqlite:///FILE (default review/review.db) or postgresql://USER@HOST/NAME.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from marketplace_classifier.review.db import DEFAULT_URL, Database, DatabaseError
from marketplace_classifier.review.queue import ReviewError, ReviewQueue

STEPS = ("migrate", "add-reviewer", "ingest", "serve", "export", "status")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the steps' list kept as written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--db", default=DEFAULT_URL, help="the database URL")
    parser.add_argument("--name", help="add-reviewer: the reviewer's name")
    parser.add_argument("--password-file", type=Path, help="add-reviewer: a file holding the password")
    parser.add_argument("--replace", action="store_true",
                        help="add-reviewer: give an existing reviewer the new password")
    parser.add_argument("--scores", type=Path, help="ingest: bulk scoring's output (.csv, .jsonl, .parquet)")
    parser.add_argument("--listings", type=Path,
                        help="ingest: what was scored (an export folder, .csv, .jsonl)")
    parser.add_argument("--request-log", type=Path, help="ingest: a request log folder instead of --scores")
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts/combined"),
                        help="ingest: the exported model that answers and explains")
    parser.add_argument("--source", default="catalogue", help="ingest: the name the listings' ids belong to")
    parser.add_argument("--below-depth", type=int, default=0,
                        help="ingest: also the listings confident to fewer levels than this "
                             "(0: the flagged ones only)")
    parser.add_argument("--host", default="127.0.0.1", help="serve: the address")
    parser.add_argument("--port", type=int, default=8090, help="serve: the port")
    parser.add_argument("--out", type=Path, help="export: the folder to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        database = Database(args.db)
        database.migrate()
        return STEP_FUNCTIONS[args.step](args, ReviewQueue(database))
    except (DatabaseError, ReviewError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def migrate(args: argparse.Namespace, queue: ReviewQueue) -> int:
    print(f"schema at version {queue.database.version()}")
    return 0


def add_reviewer(args: argparse.Namespace, queue: ReviewQueue) -> int:
    if not args.name:
        raise ReviewError("add-reviewer needs --name")
    generated = args.password_file is None
    password = secrets.token_urlsafe(12) if generated else args.password_file.read_text().strip()
    if args.replace and queue.set_password(args.name, password):
        print(f"reviewer {args.name}: new password" + (f" {password}" if generated else " set"))
        return 0
    queue.add_reviewer(args.name, password)
    print(f"reviewer {args.name} added" + (f"; password: {password}" if generated else ""))
    return 0


def ingest(args: argparse.Namespace, queue: ReviewQueue) -> int:
    from marketplace_classifier.review.ingest import Ingester

    if (args.scores is None) == (args.request_log is None):
        raise ReviewError("ingest needs --scores (with --listings) or --request-log")
    if args.scores is not None and args.listings is None:
        raise ReviewError("ingest --scores needs --listings: the export or file that was scored")
    ingester = Ingester(queue, args.model_dir, args.source)
    counts = ingester.from_scores(args.scores, args.listings, args.below_depth) if args.scores else \
        ingester.from_request_log(args.request_log)
    print(json.dumps(counts))
    return 0


def serve(args: argparse.Namespace, queue: ReviewQueue) -> int:
    import uvicorn

    from marketplace_classifier.review.app import create_app

    print(f"the review page: http://{args.host}:{args.port}/ ({queue.counts()['open']} listings to review)",
          flush=True)
    uvicorn.run(create_app(queue), host=args.host, port=args.port, log_level="warning")
    return 0


def export(args: argparse.Namespace, queue: ReviewQueue) -> int:
    from marketplace_classifier.review.corrections import export_decisions

    if args.out is None:
        raise ReviewError("export needs --out")
    written = export_decisions(queue, args.out)
    print(f"{written} reviewed listings written to {args.out} (Products.csv, Images.csv, images/)")
    return 0


def status(args: argparse.Namespace, queue: ReviewQueue) -> int:
    print(json.dumps(queue.counts()))
    return 0


STEP_FUNCTIONS = {"migrate": migrate, "add-reviewer": add_reviewer, "ingest": ingest, "serve": serve,
                  "export": export, "status": status}


if __name__ == "__main__":
    raise SystemExit(main())
