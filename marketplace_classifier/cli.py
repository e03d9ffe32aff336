"""`marketplace-classifier <command> ...`: the one command over the project (the CLI layer; nothing
imports it). Each command runs one module's `main`, imported only when that command is asked for.

Data and models:  sample, clean, check, split, train, evaluate, export, cross-fit
Serving:          archive, serve, predict, proxy, rollout, kserve-storage, grpc-stubs, openapi
Catalogues:       score (in-process, through a server, or on Ray Data; resumable)
Review:           review (the queue of flagged listings, its web page, corrections as training data)
Reports:          publish, classify-samples
"""

from __future__ import annotations

import importlib
import sys

PROG = "marketplace-classifier"
TRAINING = ("sample", "clean", "check", "split", "train", "evaluate", "export", "cross-fit")
OPERATIONS = {"archive": "archive", "serve": "engines", "predict": "predict", "proxy": "proxy",
              "rollout": "rollout", "kserve-storage": "kserve_storage", "grpc-stubs": "grpc_stubs",
              "publish": "publish", "classify-samples": "classify_samples", "score": "score",
              "openapi": "client.openapi", "review": "review.commands"}


def usage() -> str:
    return __doc__.split("\n\n", 1)[1].rstrip() + f"\n\n{PROG} <command> --help: the command's options"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} <command> [options]\n\n{usage()}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in TRAINING:
        from marketplace_classifier.training.cli import main as training_main

        return one_line_errors(command, lambda: training_main(argv))
    if command not in OPERATIONS:
        print(f"{PROG}: error: unknown command {command!r}; choose one of "
              f"{', '.join((*TRAINING, *OPERATIONS))}", file=sys.stderr)
        return 2
    name = OPERATIONS[command]
    module = importlib.import_module(f"marketplace_classifier.{name if '.' in name else 'ops.' + name}")
    sys.argv = [f"{PROG} {command}", *rest]  # argparse names the command in its usage and errors
    return one_line_errors(command, lambda: module.main(rest))


def one_line_errors(command: str, run) -> int:
    """A command's run; a file or folder it cannot read or write, or a server it cannot reach
    (requests' errors are OSErrors), is one line and exit 2 rather than a traceback."""
    try:
        return run()
    except OSError as error:
        print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
