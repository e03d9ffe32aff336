"""Temperature scaling: one temperature per model, fitted on the validation listings (photos
pooled as the handler pools them), so that the answer's probabilities mean what they say; the
expected calibration error that measures it; and the review threshold chosen on validation for
a target precision of automatic filing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from marketplace_classifier.serving.model_kinds import TEXT
from marketplace_classifier.serving.processing import listing_probabilities, pool_photos

ECE_BINS = 15
DEFAULT_TARGET_PRECISION = 0.95  # of the listings filed without review


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().float().clone(), labels.detach().long().clone()
        log_t = torch.zeros(1, requires_grad=True)
        optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimiser.step(closure)
        return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def ece_of_a_calibrated_model(probabilities: np.ndarray, rounds: int = 200, seed: int = 0
                               ) -> dict[str, float]:
    """The ECE that a perfectly calibrated model with these answers would still show on a split
    of this size: labels drawn from the answers' own probabilities, measured like the real ones
    (mean and 95th percentile over `rounds` draws). An ECE below the 95th percentile cannot be
    told apart from perfect calibration on this split."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(probabilities, axis=1)
    errors = []
    for _ in range(rounds):
        draws = rng.random((len(probabilities), 1)) * cumulative[:, -1:]
        labels = np.minimum((cumulative < draws).sum(axis=1), probabilities.shape[1] - 1)
        errors.append(expected_calibration_error(probabilities, labels))
    return {"mean": float(np.mean(errors)), "p95": float(np.percentile(errors, 95))}


def plot_reliability(before: np.ndarray, after: np.ndarray, labels: np.ndarray, path: Path,
                     title: str, bins: int = ECE_BINS) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for name, probabilities in (("before", before), ("after", after)):
        confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
        edges = np.linspace(0, 1, bins + 1)
        centres, accuracy = [], []
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            inside = (confidence > low) & (confidence <= high)
            if inside.any():
                centres.append(confidence[inside].mean())
                accuracy.append(correct[inside].mean())
        ece = expected_calibration_error(probabilities, labels, bins)
        axes.plot(centres, accuracy, marker="o", label=f"{name} (ECE {ece:.3f})")
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@torch.inference_mode()
def split_outputs(task, split: str, batch_size: int, order: list[int] | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each branch's root logits [N, C] and the labels [N] of a split, in the split's order (or
    in `order`: positions in the split)."""
    branches, labels, classes = [], [], task.model.num_classes
    for batch in task.batches(split, batch_size, order):
        branches.append([output[:, :classes].float().cpu() for output in task.network(*batch.inputs)])
        labels.append(batch.labels.cpu())
    if not labels:
        raise ValueError(f"the {split} split has no {task.kind} samples")
    return [torch.cat([batch[i] for batch in branches]) for i in range(len(branches[0]))], \
        torch.cat(labels)


def split_logits(model, config, data, split: str, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (what softmax turns into its answer) and the labels of a split;
    `task` (from marketplace_classifier.training.tasks.make_task) is built when not given."""
    if task is None:
        from marketplace_classifier.training.tasks import make_task

        task = make_task(model.eval(), config, data, torch.device("cpu"))
    branches, labels = split_outputs(task, split, config.batch_size)
    with torch.inference_mode():
        return model.combine(branches).float(), labels


def listing_logits(model, config, data, split: str, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per listing, what the handler turns into its answer: the mean of its photos'
    log-probabilities (one row per listing for the text model), and the listing labels."""
    logits, labels = split_logits(model, config, data, split, task)
    product_ids = data.samples(config.model, split)["product_id"]
    _, pooled, listing_labels = pool_by_listing(logits, labels, product_ids)
    return pooled, listing_labels


def pool_by_listing(logits: torch.Tensor, labels: torch.Tensor, product_ids
                    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The listings in order of first appearance, their pooled log-probabilities (as the handler
    pools a listing's photos) and their labels."""
    codes, ids = pd.factorize(np.asarray(product_ids))
    _, first = np.unique(codes, return_index=True)  # codes count up in order of first appearance
    pooled = pool_photos(logits, torch.from_numpy(codes), len(ids))
    return ids, pooled, labels[torch.from_numpy(first)]


def validation_answers(model, config, data, target_precision: float, task=None) -> dict:
    """Chosen on the validation listings as the handler answers them: the temperature, and the
    lowest confidence at which the listings filed automatically are right `target_precision` of
    the time (no validation listings: T 1 and no threshold, so every answer is reviewed)."""
    if len(data.samples(config.model, "val")) == 0:
        return {"temperature": 1.0, "review_threshold": None}
    pooled, labels = listing_logits(model, config, data, "val", task)
    temperature = fit_temperature(pooled, labels)
    probabilities = listing_probabilities(pooled, temperature).numpy()
    threshold = review_threshold(probabilities.max(1), probabilities.argmax(1) == labels.numpy(),
                                 target_precision)
    return {"temperature": temperature, "review_threshold": threshold}


def text_only_temperature(model, config, data) -> float:
    """Combined model: the temperature of its text branch alone, which answers listings that
    come without a photo."""
    from marketplace_classifier.training.checkpoints import config_from

    text_config = config_from(config.branches["text"] | {"data_dir": config.data_dir})
    if len(data.samples(TEXT, "val")) == 0:
        return 1.0
    return fit_temperature(*listing_logits(model.text_model, text_config, data, "val"))


def review_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float
                     ) -> float | None:
    """The lowest confidence at which the answers at or above it are right at least
    `target_precision` of the time (the most listings filed automatically); None when no
    threshold reaches it."""
    order = np.argsort(-confidence, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # a threshold can only fall between distinct confidences
    last_of_value = np.r_[confidence[order][1:] != confidence[order][:-1], True]
    reaching = np.flatnonzero((precision >= target_precision) & last_of_value)
    return float(confidence[order][reaching[-1]]) if len(reaching) else None


def coverage_at(confidence: np.ndarray, correct: np.ndarray, threshold: float | None) -> dict:
    """Share of listings filed automatically at `threshold` and the precision among them."""
    filed = confidence >= threshold if threshold is not None else np.zeros(len(confidence), bool)
    return {"threshold": threshold, "coverage": float(filed.mean()) if len(filed) else 0.0,
            "precision": float(correct[filed].mean()) if filed.any() else None,
            "listings": int(len(filed))}


def plot_coverage(confidence: np.ndarray, correct: np.ndarray, threshold: float | None,
                  path: Path, title: str) -> None:
    """Accuracy of the listings filed automatically against their share, over all thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-confidence, kind="stable")
    coverage = np.arange(1, len(order) + 1) / len(order)
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(coverage, accuracy, label="filed automatically")
    if threshold is not None:
        point = coverage_at(confidence, correct, threshold)
        axes.scatter([point["coverage"]], [point["precision"] or 0], color="red", zorder=3,
                     label=f"threshold {threshold:.2f}: {point['coverage']:.0%} filed")
    axes.set_xlabel("coverage (share of listings filed automatically)")
    axes.set_ylabel("accuracy of the filed listings")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return [0.0, 1.0]
    share = correct / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
