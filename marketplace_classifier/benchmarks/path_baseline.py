"""The text-only baseline of the category path: TF-IDF of name + description and a logistic
regression over full paths (cut at three levels), scored per level on the same split as
`marketplace-classifier evaluate`. Its figures go beside the models' in docs/results.md.

Usage: python -m marketplace_classifier.benchmarks.path_baseline --data-dir data/real [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from marketplace_classifier.serving.taxonomy import DEFAULT_MAX_DEPTH, join_path, split_path
from marketplace_classifier.training.data import CleanData


def baseline_figures(data: CleanData, split: str = "test", max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """Accuracy per level (over the listings whose true path reaches it) and of the full path."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    products = data.products
    train, scored = products[products["split"] == "train"], products[products["split"] == split]
    paths = {
        name: [join_path(split_path(p)[:max_depth]) for p in frame["category"].astype(str)]
        for name, frame in (("train", train), (split, scored))
    }
    vectoriser = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    features = vectoriser.fit_transform(train["text"])
    model = LogisticRegression(C=10.0, max_iter=2000).fit(features, paths["train"])
    answers = [split_path(p) for p in model.predict(vectoriser.transform(scored["text"]))]
    truths = [split_path(p) for p in paths[split]]
    levels = {}
    for level in range(1, max_depth + 1):
        judged = [
            (answer[:level] == truth[:level])
            for answer, truth in zip(answers, truths, strict=True)
            if len(truth) >= level
        ]
        levels[str(level)] = {"listings": len(judged), "accuracy": round(float(np.mean(judged)), 4)}
    full = np.mean([answer == truth for answer, truth in zip(answers, truths, strict=True)])
    return {
        "split": split,
        "levels": levels,
        "full_path": {"accuracy": round(float(full), 4)},
        "model": "TF-IDF (1-2 grams, sublinear) + logistic regression over full paths",
    }


def markdown(figures: dict) -> str:
    """The figures as a table of one row per level and the full path."""
    rows = [
        f"| {level} | {row['listings']} | {row['accuracy']:.3f} |" for level, row in figures["levels"].items()
    ]
    return (
        "| baseline level | listings | accuracy |\n|---|---|---|\n"
        + "\n".join(rows)
        + f"\n| full path | | {figures['full_path']['accuracy']:.3f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="cleaned and split folder")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    parser.add_argument(
        "--markdown", type=Path, help="also write them here as a table (docs/results.md includes it)"
    )
    args = parser.parse_args(argv)
    try:
        figures = baseline_figures(CleanData.load(args.data_dir), args.split)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(figures, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(figures))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
