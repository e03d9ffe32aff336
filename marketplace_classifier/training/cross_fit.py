"""Cross-fitting: out-of-fold answers of the text model and a frozen image model on the training
split, and what a fusion of the two learnt from them gains on validation. A measurement
(docs/results.md); it changes no model.

Each training listing is answered by a copy of its model's trainable part that was trained,
for the epochs the full run kept, on the other folds only (folds by product), so a fusion fitted
on these answers sees how often each branch is right on listings it did not fit.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from marketplace_classifier.serving.model_kinds import IMAGE, TEXT
from marketplace_classifier.training.calibration import pool_by_listing, split_outputs
from marketplace_classifier.training.checkpoints import build_model, config_from, load_checkpoint
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.tasks import TrainablePart, make_task
from marketplace_classifier.training.train import fit_lexical_idf, seed_everything, train_on_positions

WEIGHT_GRID = [step / 10 for step in range(11)]
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1]


def product_folds(products: list, folds: int, seed: int) -> np.ndarray:
    """The fold of each sample; all samples of a product share one."""
    unique = sorted(set(products))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {product: int(order[index] % folds) for index, product in enumerate(unique)}
    return np.array([fold_of[product] for product in products])


def branch_log_probabilities(task, split: str, batch_size: int, order: list[int] | None = None
                             ) -> list[torch.Tensor]:
    """Each branch's log-probabilities over `split` (in `order`: positions in the split)."""
    task.model.eval()
    branches, _ = split_outputs(task, split, batch_size, order)
    return [torch.log_softmax(logits, 1) for logits in branches]


def out_of_fold(checkpoint_path: Path, data: CleanData, folds: int, cache_dir: str | None) -> dict:
    """The checkpoint's branches on validation, and out-of-fold on the training split."""
    full, checkpoint = load_checkpoint(checkpoint_path)
    config = config_from(checkpoint["config"])
    if config.kind.fuses or not config.frozen:
        raise ValueError(f"{checkpoint_path}: cross-fitting takes a frozen-encoder image or text model")
    config = replace(config, cache_dir=cache_dir)
    device = torch.device("cpu")
    task = make_task(full, config, data, device)
    samples = data.samples(config.model, "train")
    fold = product_folds(list(samples["product_id"]), folds, config.seed)
    result = {"val": branch_log_probabilities(task, "val", config.batch_size), "fold": fold}
    answers: list[torch.Tensor] | None = None
    for k in tqdm(range(folds), desc=f"cross-fitting {config.model}", unit="fold"):
        seed_everything(config.seed + k)
        model = _fresh_trainable_copy(full, config, data, samples["text"][fold != k])
        task.model, task.network = model, TrainablePart(model, config.kind)
        train_on_positions(task, config, np.flatnonzero(fold != k).tolist(), checkpoint["best_epoch"],
                           config.seed + k)
        held = np.flatnonzero(fold == k).tolist()
        held_answers = branch_log_probabilities(task, "train", config.batch_size, held)
        if answers is None:
            answers = [torch.zeros(len(samples), a.shape[1]) for a in held_answers]
        for column, part in zip(answers, held_answers, strict=True):
            column[torch.tensor(held)] = part
    result["train"] = answers
    return result


def _fresh_trainable_copy(full, config, data: CleanData, fit_texts) -> torch.nn.Module:
    """A new trainable part (head, lexical branch) around the full model's frozen encoder."""
    model = build_model(config, data.num_classes, pretrained=False)
    if not config.kind.uses_text:
        model.backbone = full.backbone
        return model
    model.encoder = full.encoder
    fit_lexical_idf(model, config, fit_texts)  # the idf of the texts this copy trains on
    return model


def listing_table(data: CleanData, text: dict, image: dict, split: str) -> dict[str, torch.Tensor]:
    """Per listing with photos: the image answer pooled over its photos (mean log-probability),
    the text model's branches, the label."""
    photos = data.samples(IMAGE, split)
    products, pooled, labels = pool_by_listing(image[split][0], torch.tensor(photos["label"].to_numpy()),
                                               photos["product_id"])
    row_of = {product: row for row, product in enumerate(data.samples(TEXT, split)["product_id"])}
    rows = torch.tensor([row_of[p] for p in products])
    return {"image": pooled, "text": [branch[rows] for branch in text[split]], "label": labels}


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return scores.argmax(1).eq(labels).float().mean().item()


def _stack_features(table: dict) -> torch.Tensor:
    return torch.cat([*table["text"], table["image"]], dim=1)


def fit_stacker(features: torch.Tensor, labels: torch.Tensor, l2: float, classes: int) -> torch.nn.Linear:
    """A multinomial logistic regression over the branches' log-probabilities (L-BFGS, L2)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(features.shape[1], classes)
    optimiser = torch.optim.LBFGS(layer.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(features), labels) + l2 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return layer


def fusion_gains(train: dict, val: dict, text_mix: float, classes: int) -> dict:
    """Validation accuracy per listing of the text model alone, a late fusion whose weights are
    chosen on the out-of-fold answers, and a logistic-regression stacker fitted on them."""
    def late(table, lexical_weight, image_weight):
        encoder, lexical = table["text"][0], table["text"][-1]
        return (1 - lexical_weight) * encoder + lexical_weight * lexical + image_weight * table["image"]

    grid = [(a, b) for a in WEIGHT_GRID for b in WEIGHT_GRID]
    chosen = max(grid, key=lambda ab: (_accuracy(late(train, *ab), train["label"]), -ab[1]))
    stackers = {l2: fit_stacker(_stack_features(train), train["label"], l2, classes) for l2 in L2_GRID}
    with torch.no_grad():
        stacked = {l2: _accuracy(layer(_stack_features(val)), val["label"]) for l2, layer in stackers.items()}
        stacked_train = {l2: _accuracy(layer(_stack_features(train)), train["label"])
                         for l2, layer in stackers.items()}
    return {
        "listings": {"train": len(train["label"]), "val": len(val["label"])},
        "text_model": {split: _accuracy(late(table, text_mix, 0.0), table["label"])
                       for split, table in (("train_out_of_fold", train), ("val", val))},
        "image_model": {split: _accuracy(table["image"], table["label"])
                        for split, table in (("train_out_of_fold", train), ("val", val))},
        "late_fusion": {"lexical_weight": chosen[0], "image_weight": chosen[1],
                        "train_out_of_fold": _accuracy(late(train, *chosen), train["label"]),
                        "val": _accuracy(late(val, *chosen), val["label"])},
        "stacker": {"val_by_l2": stacked, "train_out_of_fold_by_l2": stacked_train},
    }


def cross_fit(data_dir: Path, text_checkpoint: Path, image_checkpoint: Path, folds: int,
              cache_dir: str | None, out: Path | None) -> dict:
    if folds < 2:
        raise ValueError(f"--folds {folds}: needs at least 2")
    data = CleanData.load(Path(data_dir))
    text = out_of_fold(Path(text_checkpoint), data, folds, cache_dir)
    image = out_of_fold(Path(image_checkpoint), data, folds, cache_dir)
    mix = torch.load(text_checkpoint, map_location="cpu", weights_only=False).get("mix", {})
    tables = {split: listing_table(data, text, image, split) for split in ("train", "val")}
    result = fusion_gains(tables["train"], tables["val"], mix.get("lexical_weight", 0.0), data.num_classes)
    result["folds"] = folds
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
