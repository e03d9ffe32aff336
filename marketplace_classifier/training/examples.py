"""Real example batches for export's checks, traces and timings: several sizes and, for text,
several padded lengths; and forward's inputs regrouped as listings."""

from __future__ import annotations

import torch

from marketplace_classifier.serving.processing import model_inputs
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.features import load_model_image
from marketplace_classifier.training.tasks import text_settings

BATCH_SIZES = (1, 3, 8)


def example_batches(config: TrainConfig, data: CleanData, tokenizer) -> list[tuple]:
    """Real batches of several sizes and, for text, several padded lengths."""
    samples = data.samples(config.model, "test")
    if len(samples) < max(BATCH_SIZES):
        samples = data.samples(config.model)
    if config.kind.uses_text:
        lengths = samples["text"].str.len()
        samples = samples.iloc[lengths.argsort().to_numpy()].reset_index(drop=True)
    batches = []
    for size in BATCH_SIZES:
        # short texts first, the longest last: each batch pads to a different length
        chosen = samples.iloc[list(range(size - 1)) + [len(samples) - 1 - size]]
        batches.append(sample_inputs(config, data, chosen, tokenizer))
    return batches


def sample_inputs(config: TrainConfig, data: CleanData, chosen, tokenizer) -> tuple:
    """The model inputs of some rows of `data.samples(config.model)`."""
    images = [load_model_image(data.image_path(i), config.image_size) for i in chosen["id"]] \
        if config.kind.uses_image else None
    return model_inputs(config.kind, images, list(chosen["text"]), tokenizer,
                        text_settings(config))


def listings_example_per_photo(example: tuple) -> tuple:
    """forward's inputs as listings of one photo each: listings must then answer as forward."""
    images, *text = example
    return (images, torch.arange(len(images)), *text)


def listings_example(example: tuple) -> tuple:
    """forward's inputs (one text row per photo) as listings' inputs: the first two photos share
    the first text, every other photo keeps its own."""
    images, *text = example
    rows = [0, *range(2, len(images))]
    listing_of_photo = torch.tensor([0, *range(len(images) - 1)])
    return (images, listing_of_photo, *(tensor[rows] for tensor in text))
