"""Score a whole catalogue: one answer per listing of a marketplace export folder, a CSV or a
JSONL, written to JSONL, CSV or Parquet; in-process on an exported folder (the default), through
a running server (--url) or on Ray Data (--ray). Run it again after an interruption and it scores
only the listings it has not answered yet.

Usage: marketplace-classifier score --input EXPORT_DIR|FILE.csv|FILE.jsonl --out FILE.jsonl|.csv|.parquet
           [--model combined] [--artifacts-dir artifacts | --url http://127.0.0.1:8080 | --ray auto|ADDRESS]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from marketplace_classifier.client import ClassifierError, Client
from marketplace_classifier.ops.bulk import BulkRun, InProcessScorer, ServedScorer
from marketplace_classifier.ops.bulk_io import BulkError, check_output, journal_for, read_rows
from marketplace_classifier.serving.model_kinds import MODEL_KINDS


def scorer_for(args: argparse.Namespace):
    if args.url:
        key_file = args.key_file if args.key_file and Path(args.key_file).exists() else None
        token = args.token or None
        return ServedScorer(
            Client(
                args.url,
                args.model,
                token=token,
                key_file=None if token else key_file,
                timeout=args.timeout,
                retries=args.retries,
            )
        )
    return InProcessScorer(Path(args.artifacts_dir) / args.model, args.threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a marketplace export folder (Products.csv, Images.csv, images/), a .csv or a .jsonl",
    )
    parser.add_argument("--out", type=Path, required=True, help="the answers: .jsonl, .csv or .parquet")
    parser.add_argument("--model", choices=MODEL_KINDS, default="combined")
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        default=Path("artifacts"),
        help="in-process and with --ray: the exported models' folder",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--url", help="through a running server at this address (TorchServe, the second engine or the proxy)"
    )
    where.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="on Ray Data: 'auto' (a running cluster) or its address (needs the second engine's environment)",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=Path(".serve/key_file.json"),
        help="with --url: TorchServe's key file, read when it exists",
    )
    parser.add_argument("--token", help="with --url: the token to send (the proxy's)")
    parser.add_argument("--batch-size", type=int, default=16, help="listings a request (or batch)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT listings of the input (default: all)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="batches at once: in-process one is decoded while another runs the model; "
                             "with --url, requests in flight")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request (with --url)")
    parser.add_argument("--retries", type=int, default=3, help="retries of a 503 or a lost connection")
    parser.add_argument("--threads", type=int, default=0, help="in-process: torch threads (0: all cores)")
    parser.add_argument("--actors", type=int, default=2, help="with --ray: model replicas")
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= 64 or args.concurrency < 1:
        parser.error("--batch-size must be 1 to 64 and --concurrency at least 1")
    return args


def stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a service manager's stop (SIGTERM) leaves the journal as Ctrl-C does: whole rows only
    signal.signal(signal.SIGTERM, stop)
    try:
        check_output(args.out)  # before a model is loaded: what is wrong with the files first
        read_rows(args.input)
        if args.ray:
            from marketplace_classifier.ops.bulk_ray import run_on_ray

            counts = run_on_ray(args)
        else:
            counts = BulkRun(args.input, args.out, args.model, scorer_for(args), args.batch_size,
                             args.concurrency, limit=args.limit).run()
    except KeyboardInterrupt:
        print(
            f"interrupted: the answers so far are in {journal_for(args.out)}; run the same command "
            "again to score the rest",
            file=sys.stderr,
        )
        return 130
    except (BulkError, ClassifierError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "placement" in counts:  # listings scored by each node's actors
        print(f"placement: {json.dumps(counts['placement'])}", file=sys.stderr)
    print(
        f"{counts['answered']} answered, {counts['errors']} refused (their reason is in the 'error' column), "
        f"{counts['resumed_from']} from an earlier run: {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
