"""`marketplace-classifier <command>`: sample, clean, check, split, train, evaluate, export, cross-fit."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit status 2."""


def _sample(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.sample import SampleConfig, generate

    summary = generate(args.out, SampleConfig(products=args.products, seed=args.seed), args.overwrite)
    print(f"wrote {summary['products']} product rows and {summary['images']} photos to {args.out}")
    print("quirks: " + json.dumps(summary["quirks"]))


def _clean(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.cleaning import clean

    report = clean(args.data_dir, args.out, size=args.image_size, workers=args.workers)
    print(report.summary())
    print(f"report: {Path(args.out) / 'cleaning_report.json'}")


def _check(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.cleaning import check_clean_images

    size = json.loads((Path(args.data_dir) / "cleaning.json").read_text())["image_size"]
    problems = check_clean_images(args.data_dir, size)
    for problem in problems:
        print(problem)
    if problems:
        raise UserError(f"{len(problems)} cleaned images are wrong")
    print(f"all cleaned images are {size}x{size} RGB")


def _split(args: argparse.Namespace) -> None:
    from marketplace_classifier.training.splits import write_splits

    splits = write_splits(args.data_dir, args.val, args.test, args.seed)
    print(splits["split"].value_counts().to_string())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marketplace-classifier", description=__doc__)
    # every command's --help shows its defaults
    with_defaults = functools.partial(argparse.ArgumentParser,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=with_defaults)

    sample = commands.add_parser("sample", help="generate sample data in the marketplace layout")
    sample.add_argument("--out", type=Path, default=Path("data/sample"), help="the folder to write")
    sample.add_argument("--products", type=int, default=1000, help="listings to generate")
    sample.add_argument("--seed", type=int, default=0, help="the same seed, the same data")
    sample.add_argument("--overwrite", action="store_true", help="replace earlier sample data in --out")
    sample.set_defaults(run=_sample)

    clean = commands.add_parser("clean", help="clean tables and photos, report what was dropped")
    clean.add_argument("--data-dir", type=Path, required=True, help="raw export folder (read only)")
    clean.add_argument("--out", type=Path, required=True, help="the cleaned folder to write")
    clean.add_argument("--image-size", type=int, default=512, help="side of the square photos written")
    clean.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    clean.set_defaults(run=_clean)

    check = commands.add_parser("check", help="verify every cleaned photo's size and channels")
    check.add_argument("--data-dir", type=Path, required=True, help="cleaned folder")
    check.set_defaults(run=_check)

    split = commands.add_parser("split", help="train/val/test by product, stratified")
    split.add_argument("--data-dir", type=Path, required=True, help="cleaned folder")
    split.add_argument("--val", type=float, default=0.15, help="share of products for validation")
    split.add_argument("--test", type=float, default=0.15, help="share of products for test")
    split.add_argument("--seed", type=int, default=0, help="the same seed, the same split")
    split.set_defaults(run=_split)

    from marketplace_classifier.training import commands as model_commands

    model_commands.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from marketplace_classifier.training.commands import Interrupted

    try:
        args.run(args)
    except Interrupted as error:
        print(f"error: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; finished work is kept, rerun the command to continue",
              file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
