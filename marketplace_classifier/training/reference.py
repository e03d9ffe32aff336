"""What the live traffic is compared with (reference.json, written by export beside the model):
the training split's category shares, text lengths, photos per listing and photo sizes, and the
validation listings' top probability and review share, each over the same buckets as the served
signals (marketplace_classifier/serving/signals.py), so that
marketplace_classifier/serving/metrics_exporter.py can measure drift."""

from __future__ import annotations

import numpy as np
import pandas as pd

from marketplace_classifier.serving.processing import listing_probabilities
from marketplace_classifier.serving.signals import (
    PHOTO_SIDE_BUCKETS,
    PHOTOS_BUCKETS,
    TEXT_CHARS_BUCKETS,
    TOP_PROBABILITY_BUCKETS,
)
from marketplace_classifier.training.calibration import listing_logits
from marketplace_classifier.training.cleaning import PHOTO_SIZES
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData

QUANTILES = (0.05, 0.5, 0.95)


def bucket_shares(values, upper_bounds: tuple) -> list[float]:
    """The share of `values` in each Prometheus bucket (le = each bound, then +Inf), not cumulative."""
    values = np.asarray(values, dtype=float)
    edges = [-np.inf, *upper_bounds, np.inf]
    counts = [int(((values > low) & (values <= high)).sum())
              for low, high in zip(edges, edges[1:], strict=False)]
    total = max(sum(counts), 1)
    return [round(count / total, 6) for count in counts]


def distribution(values, upper_bounds: tuple) -> dict:
    values = np.asarray(values, dtype=float)
    return {"buckets": list(upper_bounds), "shares": bucket_shares(values, upper_bounds),
            "quantiles": {str(q): float(np.quantile(values, q)) for q in QUANTILES} if len(values) else {},
            "count": int(len(values))}


def reference_distributions(model, config: TrainConfig, data: CleanData, answers: dict,
                            task=None) -> dict:
    """The reference of one exported model (what reference.json holds)."""
    kind, train = config.kind, data.products[data.products["split"] == "train"]
    names = [data.index_to_name[str(i)] for i in range(data.num_classes)]
    shares = train["label"].value_counts(normalize=True)
    reference = {"training_labels": {"names": names, "shares": [round(float(shares.get(i, 0.0)), 6)
                                                                for i in range(len(names))]}}
    if kind.uses_text:
        reference["text_chars"] = distribution(train["text"].str.len(), TEXT_CHARS_BUCKETS)
    if kind.uses_image:
        photos = data.images[data.images["split"] == "train"]
        counts = photos.groupby("product_id").size().reindex(train["id"], fill_value=0)
        if not kind.uses_text:  # the image model answers only listings with photos
            counts = counts[counts > 0]
        reference["photos_per_listing"] = distribution(counts, PHOTOS_BUCKETS)
        sizes_file = data.folder / PHOTO_SIZES
        if sizes_file.exists():  # cleaned folders older than the photo-size record have none
            sizes = pd.read_csv(sizes_file, dtype={"id": str})
            sizes = sizes[sizes["id"].isin(set(photos["id"]))]
            reference["photo_side"] = distribution(np.maximum(sizes["width"], sizes["height"]),
                                                   PHOTO_SIDE_BUCKETS)
    if len(data.samples(config.model, "val")):
        pooled, _ = listing_logits(model, config, data, "val", task)
        probabilities = listing_probabilities(pooled, answers["temperature"])
        top, answered = probabilities.max(1).values.numpy(), probabilities.argmax(1).numpy()
        # what the live answers are compared with: the model's own answers on unseen listings
        # (its biases included), not the training labels
        counts = np.bincount(answered, minlength=len(names))
        reference["categories"] = {"names": names, "count": int(counts.sum()),
                                   "shares": [round(float(c), 6) for c in counts / counts.sum()]}
        reference["top_probability"] = distribution(top, TOP_PROBABILITY_BUCKETS)
        threshold = answers.get("review_threshold")
        review = float((top < threshold).mean()) if threshold is not None else 1.0
        reference["review_share"] = {"validation": round(review, 6), "listings": int(len(top))}
        if answers.get("taxonomy"):
            reference["confident_depth"] = confident_depth_reference(model, config, data, answers, task)
    return reference


def confident_depth_reference(model, config: TrainConfig, data: CleanData, answers: dict, task) -> dict:
    """The validation listings' shares at each confident depth (0: not even the root), the
    reference of the served marketplace_confident_depth counter."""
    from marketplace_classifier.serving.taxonomy import Taxonomy
    from marketplace_classifier.training.levels import depth_shares, split_paths

    names = [data.index_to_name[str(i)] for i in range(data.num_classes)]
    taxonomy = Taxonomy.from_json(names, answers["taxonomy"])
    paths = split_paths(model, config, data, taxonomy, "val", task, answers["temperature"])
    return {"depths": list(range(taxonomy.depth + 1)),
            "shares": depth_shares(taxonomy, paths, answers.get("review_threshold")),
            "listings": len(paths.truths)}
