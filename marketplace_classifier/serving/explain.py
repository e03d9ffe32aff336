"""Why a model answered what it did, on request (`explain: true`), for the answered root.

- **Lexical branch, exact.** The branch is a linear model over hashed terms: its logit for a
  class is the bias plus, for each term bucket, the bucket's TF-IDF weight times its class
  weight. Each bucket's part is split among the term occurrences hashed into it and summed by
  what a reader calls them (a word with its character n-grams, or a word pair), so the terms'
  contributions, the unlisted remainder and the bias add up to the branch's logit.
- **Encoder branch, by occlusion.** Each of the first `MAX_OCCLUDED_WORDS` words is removed in
  turn and the text model run again; a word's contribution is how much the encoder branch's
  log-odds of the answer drop without it (the lexical branch's exact part is taken out of the
  model's output, so the figure is the encoder's alone; log-odds, not log-probability, so that a
  confident answer's words still differ).
- **Branches' shares.** The answer's margin over the runner-up (in pooled log-probability) is a
  weighted sum of each branch's margin; a branch's `contribution` is its part of it and its
  `share` that part over the margin (negative: it argued for the runner-up; a close call makes
  shares large, the contributions stay readable).
- **Photos, by occlusion on a grid.** Each cell of a `GRID` x `GRID` grid is painted grey in
  turn; a cell's value is how much the photo's log-odds of the answer drop. Only the first
  `MAX_EXPLAINED_PHOTOS` photos as sent are explained; the time it took is reported.

Every occluded variant is a row through the model, so an explained listing costs that many
more photos in the work budget (`explained_rows`), checked before any work is done.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from marketplace_classifier.serving.processing import (
    labelled_lexical_terms,
    lexical_bucket,
    lexical_ids,
    text_inputs,
)

GRID = 4
MAX_EXPLAINED_PHOTOS = 1  # the first photo as sent
MAX_OCCLUDED_WORDS = 16
WORDS_PER_PHOTO = 4  # text rows one photo row costs (real combined model: 1.2 vs 4.9 ms a row)
TOP_TERMS = 5  # the terms that pushed most toward the answer, and most against it
GREY = 128
WORDS = re.compile(r"\w+")
LEXICAL_METHOD = ("exact: the lexical branch's logit of the answer is its bias plus these terms' "
                  "TF-IDF-weighted class weights plus the unlisted terms' (`other_terms`)")
ENCODER_METHOD = ("occlusion: each of the first {words} words removed in turn; the drop in the encoder "
                  "branch's log-odds of the answer")
PHOTO_METHOD = ("occlusion: each cell of a {grid}x{grid} grid painted grey; the drop in the photo's "
                "log-odds of the answer")


def explained_rows(photos: int, has_text: bool, text: str | None) -> int:
    """The extra work an explanation sends through the model, in photos: a grid of variants per
    explained photo, and one text row per occluded word at WORDS_PER_PHOTO text rows a photo."""
    rows = min(photos, MAX_EXPLAINED_PHOTOS) * GRID * GRID
    if has_text and text:
        rows += math.ceil(min(len(WORDS.findall(text)), MAX_OCCLUDED_WORDS) / WORDS_PER_PHOTO)
    return rows


def index(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class LexicalWeights:
    """The lexical branch's parameters (read from the exported TorchScript) and its weight in
    the mix of branches (`mix`: the main branch's, the lexical branch's)."""

    idf: torch.Tensor  # [buckets]
    weight: torch.Tensor  # [buckets, classes]
    bias: torch.Tensor  # [classes]
    mix: tuple[float, float]

    @classmethod
    def of(cls, lexical, mix: torch.Tensor) -> LexicalWeights:
        return cls(lexical.idf.detach().float(), lexical.bag.weight.detach().float(),
                   lexical.bias.detach().float(), (float(mix[0]), float(mix[1])))

    def bucket_weights(self, ids: list[int], counts: list[float]) -> torch.Tensor:
        """Each bucket's TF-IDF weight, L2-normalised over the text, as the branch computes it."""
        values = (1 + torch.log(torch.tensor(counts).clamp(min=1))) * self.idf[index(ids)]
        return values / values.norm().clamp(min=1e-6)

    def logits(self, text: str, settings) -> torch.Tensor:
        """The branch's logits of one text [classes] (roots first)."""
        ids, counts = lexical_ids(text, settings)
        if not ids:
            return self.bias.clone()
        return self.bucket_weights(ids, counts) @ self.weight[index(ids)] + self.bias

    def contributions(self, text: str, settings, answer: int) -> dict[str, float]:
        """Each term label's exact part of the logit of class `answer` (bias excluded): a
        bucket's part shared equally by the term occurrences hashed into it."""
        ids, counts = lexical_ids(text, settings)
        if not ids:
            return {}
        parts = self.bucket_weights(ids, counts) * self.weight[index(ids), answer]
        per_occurrence = {bucket: float(part) / count
                          for bucket, part, count in zip(ids, parts, counts, strict=True)}
        totals: dict[str, float] = defaultdict(float)
        for term, label in labelled_lexical_terms(text, settings):
            totals[label] += per_occurrence[lexical_bucket(term, settings)]
        return dict(totals)


def lexical_explanation(weights: LexicalWeights, text: str, settings, answer: int) -> dict:
    """The lexical branch's exact account of its logit for `answer`: the TOP_TERMS terms for
    and against it, the rest summed, the bias, and the logit they add up to."""
    parts = weights.contributions(text, settings, answer)
    ranked = sorted(parts.items(), key=lambda item: item[1], reverse=True)
    shown = ranked[:TOP_TERMS] + [item for item in ranked[TOP_TERMS:][-TOP_TERMS:] if item[1] < 0]
    shown_labels = {label for label, _ in shown}
    return {"method": LEXICAL_METHOD,
            "logit": float(weights.logits(text, settings)[answer]),
            "bias": float(weights.bias[answer]),
            "other_terms": sum(value for label, value in parts.items() if label not in shown_labels),
            "terms": [{"term": label, "contribution": value} for label, value in shown]}


def without_word(text: str, match: re.Match) -> str:
    return (text[:match.start()] + text[match.end():]).strip() or "."


def occluded_texts(text: str) -> list[tuple[re.Match, str]]:
    """The text with each of its first MAX_OCCLUDED_WORDS words removed, one variant each."""
    return [(match, without_word(text, match)) for match in list(WORDS.finditer(text))[:MAX_OCCLUDED_WORDS]]


def encoder_log_probabilities(output: torch.Tensor, classes: int, lexical: torch.Tensor | None,
                              mix: tuple[float, float] | None) -> torch.Tensor:
    """The encoder (or fused) branch's root log-probabilities [N, classes] from a text model's
    output rows: its mixed log-probabilities less the lexical branch's exact part."""
    roots = output[:, :classes].float()
    if lexical is None or mix is None:
        return torch.log_softmax(roots, dim=1)
    return (roots - mix[1] * torch.log_softmax(lexical[:, :classes], dim=1)) / mix[0]


def log_odds(log_probabilities: torch.Tensor, answer: int) -> torch.Tensor:
    """log(p / (1 - p)) of class `answer` for each row of log-probabilities [N, classes]."""
    others = torch.cat([log_probabilities[:, :answer], log_probabilities[:, answer + 1:]], dim=1)
    return log_probabilities[:, answer] - torch.logsumexp(others, dim=1)


def branch_shares(margin: float, lexical_margin: float, main_name: str) -> list[dict]:
    """The answer's margin over the runner-up split between the main branch and the lexical one."""
    if not math.isfinite(margin) or abs(margin) < 1e-9:
        return []
    lexical_share = lexical_margin / margin
    return [{"branch": main_name, "share": 1.0 - lexical_share, "contribution": margin - lexical_margin},
            {"branch": "lexical", "share": lexical_share, "contribution": lexical_margin}]


def occluded_photos(photo: torch.Tensor) -> torch.Tensor:
    """GRID*GRID copies of a uint8 photo [3,S,S], each with one cell painted grey."""
    size = photo.shape[-1]
    edges = [round(size * step / GRID) for step in range(GRID + 1)]
    variants = photo.unsqueeze(0).repeat(GRID * GRID, 1, 1, 1)
    for row in range(GRID):
        for column in range(GRID):
            top, bottom, left, right = edges[row], edges[row + 1], edges[column], edges[column + 1]
            variants[row * GRID + column, :, top:bottom, left:right] = GREY
    return variants


def photo_explanation(log_probabilities: torch.Tensor, answer: int, started: float) -> dict:
    """A photo's grid from the log-probabilities of the photo [0] and its occluded variants [1:]:
    each cell's drop in the answer's log-odds when it is occluded."""
    odds = log_odds(log_probabilities, answer)
    drops = (odds[0] - odds[1:]).tolist()
    return {"method": PHOTO_METHOD.format(grid=GRID), "grid": GRID,
            "cells": [drops[row * GRID:(row + 1) * GRID] for row in range(GRID)],
            "milliseconds": round((time.perf_counter() - started) * 1000, 1)}


def read_lexical_weights(model_file, text_only: bool) -> LexicalWeights | None:
    """The lexical branch of an exported TorchScript (None: the model has none), and the mix
    of the answer that uses it: the text model's for a text-only answer, else the model's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is what the export writes
        module = torch.jit.load(str(model_file), map_location="cpu")
    text_model = getattr(module, "text_model", module)
    lexical = getattr(text_model, "lexical", None)
    if lexical is None:
        return None
    mix = text_model.mix if text_only or text_model is module else module.mix
    return LexicalWeights.of(lexical, mix)


class Explainer:
    """Explanations of one served model's answers (see the module's docstring). It runs the
    service's own model through the service's `run`; the lexical weights are read from the
    exported TorchScript on the first explanation."""

    def __init__(self, service):
        self.service = service
        self._lexical: dict[bool, LexicalWeights | None] = {}

    def lexical(self, text_only: bool) -> LexicalWeights | None:
        if not self.service.kind.uses_text:
            return None
        key = text_only or not self.service.kind.uses_image
        if key not in self._lexical:
            self._lexical[key] = read_lexical_weights(self.service.model_dir / "model.pt", key)
        return self._lexical[key]

    def explain(self, item, probabilities: torch.Tensor, text_only: bool) -> dict:
        """The explanation of one answered listing: `probabilities` its calibrated roots'."""
        service, answer = self.service, int(probabilities.argmax())
        explanation: dict = {"category": service.index_to_name[str(answer)], "level": "root"}
        lexical = self.lexical(text_only)
        if service.kind.uses_text and item.text:
            text: dict = {}
            if lexical is not None:
                settings = service.settings.text.lexical
                text["lexical"] = lexical_explanation(lexical, item.text, settings, answer)
            text["encoder"] = self.encoder_occlusion(item.text, answer, lexical)
            explanation["text"] = text
            if lexical is not None:
                explanation["branches"] = self.shares(probabilities, item.text, lexical, text_only)
        if service.kind.uses_image and item.images and not text_only:
            # the photos were put in the order of their bytes; explain the first ones as sent
            sent = sorted(range(len(item.images)), key=lambda index: item.positions[index])
            explanation["photos"] = [self.photo_occlusion(item.images[index], item.text, answer)
                                     | {"photo": item.positions[index] + 1}
                                     for index in sent[:MAX_EXPLAINED_PHOTOS]]
        return explanation

    def text_model_output(self, texts: list[str]) -> torch.Tensor:
        """The text model's output rows for `texts` (the combined model's text_only)."""
        service = self.service
        method = service.model.text_only if service.kind.uses_image else service.model
        inputs = text_inputs(service.tokenizer, texts, service.settings.text)
        return service.run_in_chunks(method, tuple(inputs))

    def encoder_occlusion(self, text: str, answer: int, lexical: LexicalWeights | None) -> dict:
        variants = occluded_texts(text)
        texts = [text] + [variant for _, variant in variants]
        classes, settings = self.service.settings.num_classes, self.service.settings.text.lexical
        output = self.text_model_output(texts)
        lexical_logits = torch.stack([lexical.logits(t, settings) for t in texts]) if lexical else None
        encoder = encoder_log_probabilities(output, classes, lexical_logits, lexical.mix if lexical else None)
        odds = log_odds(torch.log_softmax(encoder, dim=1), answer)
        drops = (odds[0] - odds[1:]).tolist()
        return {"method": ENCODER_METHOD.format(words=MAX_OCCLUDED_WORDS),
                "words": [{"word": match.group(0), "start": match.start(), "contribution": drop}
                          for (match, _), drop in zip(variants, drops, strict=True)]}

    def shares(self, probabilities: torch.Tensor, text: str, lexical: LexicalWeights, text_only: bool
               ) -> list[dict]:
        """The branches' shares of the answer's margin over the runner-up: the margin in pooled
        log-probability is the temperature times the log ratio of the two probabilities."""
        settings = self.service.settings
        temperature = settings.text_only_temperature if text_only and settings.text_only_temperature \
            else settings.temperature
        answer, runner_up = torch.topk(probabilities, 2).indices.tolist()
        margin = temperature * math.log(max(float(probabilities[answer]), 1e-30)
                                        / max(float(probabilities[runner_up]), 1e-30))
        logits = lexical.logits(text, settings.text.lexical)[:settings.num_classes]
        branch = torch.log_softmax(logits, dim=0)
        main = "text encoder" if text_only or not self.service.kind.uses_image else "photos and text encoder"
        return branch_shares(margin, lexical.mix[1] * float(branch[answer] - branch[runner_up]), main)

    def photo_occlusion(self, photo: torch.Tensor, text: str | None, answer: int) -> dict:
        started, service = time.perf_counter(), self.service
        images = torch.cat([photo.unsqueeze(0), occluded_photos(photo)])
        if service.kind.uses_text:
            inputs = text_inputs(service.tokenizer, [text or ""], service.settings.text)
            if service.text_once:
                rows = torch.zeros(len(images), dtype=torch.long)
                output = service.run(service.model.listings, (images, rows, *inputs))
            else:
                repeated = tuple(tensor.expand(len(images), *tensor.shape[1:]) for tensor in inputs)
                output = service.run_in_chunks(service.model, (images, *repeated))
        else:
            output = service.run_in_chunks(service.model, (images,))
        log_probabilities = torch.log_softmax(output[:, :service.settings.num_classes].float(), dim=1)
        return photo_explanation(log_probabilities, answer, started)
