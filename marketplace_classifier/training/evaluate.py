"""Honest evaluation on the test split: metrics, confusion matrix and training curves."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import torch

from marketplace_classifier.serving.processing import listing_probabilities
from marketplace_classifier.training.calibration import (
    DEFAULT_TARGET_PRECISION,
    coverage_at,
    ece_of_a_calibrated_model,
    expected_calibration_error,
    plot_coverage,
    plot_reliability,
    pool_by_listing,
    split_outputs,
    validation_answers,
)
from marketplace_classifier.training.checkpoints import choose_device, config_from, load_checkpoint
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.levels import (
    PATH_WEIGHTS,
    calibrated_taxonomy,
    levels_figures,
    split_paths,
)
from marketplace_classifier.training.tasks import make_task, taxonomy_of

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from marketplace_classifier.serving.model_kinds import KINDS, MODEL_KINDS


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    size = len(names)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {}
    for index, name in enumerate(names):
        true_positive = confusion[index, index]
        predicted, actual = confusion[:, index].sum(), confusion[index].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(actual)}
    present = [m["f1"] for m in per_class.values() if m["support"] > 0]
    return {"accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            "macro_f1": float(np.mean(present)) if present else 0.0,
            "samples": int(confusion.sum()), "per_class": per_class,
            "confusion_matrix": confusion.tolist()}


def predict_split(model, task, config: TrainConfig, split: str
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Labels, class probabilities and each branch's log-probabilities of every sample of a
    split, in the split's order."""
    branches, labels = split_outputs(task, split, config.batch_size)
    with torch.inference_mode():
        probabilities = torch.softmax(model.combine(branches).float(), 1)
    return labels.numpy(), probabilities.numpy(), \
        [torch.log_softmax(branch, 1).numpy() for branch in branches]


def calibration_report(model, task, config: TrainConfig, data: CleanData, split: str, labels: np.ndarray,
                       probabilities: np.ndarray, out: Path,
                       target_precision: float = DEFAULT_TARGET_PRECISION) -> dict:
    """Per listing, as served: expected calibration error before and after the temperature that
    export fits on the validation listings (reliability diagram), and the review threshold
    chosen on validation with the coverage and precision it reaches on this split (curve)."""
    answers = validation_answers(model, config, data, target_precision, task)
    temperature, threshold = answers["temperature"], answers["review_threshold"]
    _, truth, pooled = per_listing(data.samples(config.model, split), labels, probabilities)
    before = listing_probabilities(pooled, 1.0).numpy()
    after = listing_probabilities(pooled, temperature).numpy()
    confidence, correct = after.max(1), after.argmax(1) == truth
    out.mkdir(parents=True, exist_ok=True)
    plot_reliability(before, after, truth, out / "reliability.png",
                     f"{config.model} model: reliability per listing")
    plot_coverage(confidence, correct, threshold, out / "coverage.png",
                  f"{config.model} model: automatic filing ({split} split)")
    return {"temperature": temperature, "ece_before": expected_calibration_error(before, truth),
            "ece_after": expected_calibration_error(after, truth),
            "ece_if_calibrated": ece_of_a_calibrated_model(after),
            "review": coverage_at(confidence, correct, threshold) | {"target_precision": target_precision}}


def branch_ablation(samples, labels: np.ndarray, branches: list[np.ndarray], mix: list[float],
                    names: list[str], texts: dict) -> dict:
    """Per-listing accuracy of each branch alone and of their mix (the weight chosen on val)."""
    if len(branches) < 2:
        return {}
    first, lexical = branches
    rows = {"encoder/fusion branch alone": first, "lexical branch alone": lexical,
            f"mixed ({mix[0]:.2f} / {mix[1]:.2f}, chosen on val)": mix[0] * first + mix[1] * lexical}
    return {name: listing_metrics(samples, labels, softmax(values), names, texts)["accuracy"]
            for name, values in rows.items()}


def calibration_cell(calibration: dict | None) -> str:
    if not calibration:
        return "n/a"
    floor = calibration.get("ece_if_calibrated")
    noise = f"; a calibrated model: {floor['mean']:.3f}, p95 {floor['p95']:.3f}" if floor else ""
    return (f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} "
            f"(T {calibration['temperature']:.2f}{noise})")


def review_cell(calibration: dict | None) -> str:
    review = (calibration or {}).get("review")
    if not review:
        return "n/a"
    if review["threshold"] is None:
        return f"none reaches {review['target_precision']:.2f} on val"
    precision = "n/a" if review["precision"] is None else f"{review['precision']:.3f}"
    return (f"{review['coverage']:.1%} at p >= {review['threshold']:.2f} "
            f"({precision}; target {review['target_precision']:.2f})")


def softmax(values: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.array(values)), dim=1).numpy()


def per_listing(samples, labels: np.ndarray, probabilities: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Listing ids, labels and pooled log-probabilities of each listing: the mean of its photos'
    log-probabilities, as the handler answers (chosen on validation over the mean of the
    probabilities; docs/results.md)."""
    log_probabilities = torch.from_numpy(np.log(np.clip(probabilities, 1e-12, None)))
    ids, pooled, truth = pool_by_listing(log_probabilities, torch.from_numpy(labels),
                                         samples["product_id"])
    return ids, truth.numpy(), pooled


def bootstrap_interval(correct: np.ndarray, rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of `correct` (resampling items)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(correct.astype(float), size=(rounds, len(correct)), replace=True).mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def most_confused(confusion: np.ndarray, names: list[str], labels: np.ndarray,
                  predictions: np.ndarray, examples: list[str], count: int = 5) -> list[dict]:
    """The `count` largest off-diagonal cells, each with one listing that fell in it."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    cells = np.dstack(np.unravel_index(np.argsort(off, axis=None)[::-1], off.shape))[0][:count]
    pairs = []
    for true, predicted in cells:
        if off[true, predicted] == 0:
            break
        first = int(np.flatnonzero((labels == true) & (predictions == predicted))[0])
        pairs.append({"true": names[true], "predicted": names[predicted],
                      "count": int(off[true, predicted]), "example": examples[first][:120]})
    return pairs


def listing_metrics(samples, labels: np.ndarray, probabilities: np.ndarray, names: list[str],
                    texts: dict) -> dict:
    """Per-listing metrics (photos averaged), with the interval and the most confused pairs."""
    ids, truth, pooled = per_listing(samples, labels, probabilities)
    predictions = pooled.argmax(1).numpy()
    metrics = classification_metrics(truth, predictions, names)
    metrics["accuracy_95ci"] = bootstrap_interval(predictions == truth)
    metrics["most_confused"] = most_confused(np.array(metrics["confusion_matrix"]), names, truth,
                                             predictions, [texts[i] for i in ids])
    metrics["right"] = {str(i): bool(p == t) for i, p, t in zip(ids, predictions, truth, strict=True)}
    return metrics


def complementarity(reports_dir: Path) -> str:
    """How much a photo can add to the text: of the test listings both single models answered,
    those the text model gets wrong and the image model right, and the share that at least one
    of them gets right (no fusion of the two can do better without new information)."""
    right = {}
    for model in MODEL_KINDS:
        path = reports_dir / model / "metrics.json"
        if path.exists():
            right[model] = json.loads(path.read_text()).get("listing", {}).get("right")
    if not right.get("image") or not right.get("text"):
        return ""
    both = sorted(set(right["image"]) & set(right["text"]))
    text_wrong = [i for i in both if not right["text"][i]]
    rescued = sum(right["image"][i] for i in text_wrong)
    either = sum(right["image"][i] or right["text"][i] for i in both) / len(both)
    line = (f"\nOf the {len(both)} test listings with photos, the text model gets {len(text_wrong)} wrong; "
            f"the image model gets {rescued} of those right. At least one of the two is right on "
            f"{either:.3f} of them, an upper bound for any fusion of their answers")
    if right.get("combined"):
        combined = [right["combined"][i] for i in both if i in right["combined"]]
        line += f" (the combined model: {sum(combined) / max(len(combined), 1):.3f})"
    return line + ".\n"


def evaluate(checkpoint_path: Path, data_dir: Path, reports_dir: Path, split: str = "test",
             device: str = "auto", target_precision: float = DEFAULT_TARGET_PRECISION) -> dict:
    """Write reports/<model>/ (metrics.json, confusion_matrix.png, curves.png) and return the metrics."""
    model, checkpoint = load_checkpoint(checkpoint_path)
    config = replace(config_from(checkpoint["config"]), data_dir=str(data_dir))
    data = CleanData.load(Path(data_dir))
    names = [checkpoint["index_to_name"][str(i)] for i in range(len(checkpoint["index_to_name"]))]
    task = make_task(model.to(choose_device(device)).eval(), config, data, choose_device(device))
    labels, probabilities, branches = predict_split(model, task, config, split)
    metrics = classification_metrics(labels, probabilities.argmax(1), names)
    metrics["accuracy_95ci"] = bootstrap_interval(probabilities.argmax(1) == labels)
    samples = data.samples(config.model, split)
    texts = dict(zip(data.products["id"], data.products["text"], strict=True))
    metrics["listing"] = listing_metrics(samples, labels, probabilities, names, texts)
    metrics["product_accuracy"] = metrics["listing"]["accuracy"]
    metrics["calibration"] = calibration_report(model, task, config, data, split, labels, probabilities,
                                                Path(reports_dir) / config.model, target_precision)
    metrics["path"] = path_figures(model, task, config, data, split, target_precision)
    for weight in PATH_WEIGHTS:  # chosen on val after training
        if metrics["path"] is not None and weight.buffer in checkpoint:
            metrics["path"][weight.buffer] = checkpoint[weight.buffer]
    metrics["branches"] = branch_ablation(samples, labels, branches, model.mix.tolist()
                                          if hasattr(model, "mix") else [1.0, 0.0], names, texts)
    metrics.update(model=config.model, split=split, unit="photo" if config.kind.per_photo else "product",
                   training=describe_training(config), best_epoch=checkpoint["best_epoch"],
                   best_val_accuracy=checkpoint["best_val_accuracy"])
    out = Path(reports_dir) / config.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion(np.array(metrics["confusion_matrix"]), names, out / "confusion_matrix.png",
                   f"{config.model} model, {split} split")
    plot_curves(checkpoint["history"], out / "curves.png", config.model)
    write_summary(Path(reports_dir))
    return metrics


def path_figures(model, task, config: TrainConfig, data: CleanData, split: str,
                 target_precision: float) -> dict | None:
    """Per level of the category path: accuracy, macro-F1, the share filed automatically; the
    temperatures and thresholds chosen on validation, as export chooses them (None: roots only)."""
    taxonomy = taxonomy_of(config, data)
    if taxonomy is None or not taxonomy.terminals or len(data.samples(config.model, "val")) == 0:
        return None
    answers = validation_answers(model, config, data, target_precision, task)
    validation = split_paths(model, config, data, taxonomy, "val", task, answers["temperature"])
    tuned = calibrated_taxonomy(taxonomy, validation, target_precision)
    tested = split_paths(model, config, data, tuned, split, task, answers["temperature"])
    figures = levels_figures(tuned, tested, answers["review_threshold"])
    return figures | {"taxonomy": {"terminals": len(tuned.terminals), "depth": tuned.depth,
                                   "min_listings": tuned.min_listings,
                                   "temperatures": list(tuned.temperatures),
                                   "thresholds": list(tuned.thresholds),
                                   "end_thresholds": list(tuned.end_thresholds)}}


def describe_training(config: TrainConfig) -> str:
    if config.kind.fuses:
        image, text = config_from(config.branches["image"]), config_from(config.branches["text"])
        return f"fusion of [{describe_training(image)}] and [{describe_training(text)}]"
    if config.kind.uses_image:
        mode = {"none": "frozen backbone", "all": "fine-tuned (all)"}.get(
            config.finetune, f"last stage fine-tuned on {config.cached_views} cached views of each photo")
        return f"{config.image_backbone} ({config.image_weights} weights), {mode}, {config.image_size}px"
    mode = "fine-tuned encoder" if config.finetune_encoder else "frozen encoder"
    head = f", the first {config.lexical_head_words} words also apart" if config.lexical_head_words else ""
    levels = f", the levels from {config.lexical_levels_buckets} buckets" \
        if config.lexical_levels_buckets and config.levels > 1 else ""
    lexical = f" + hashed n-gram lexical branch ({config.lexical_buckets} buckets{head}{levels})" \
        if config.lexical_buckets else ""
    return f"{config.text_encoder} encoder, {mode}, 1-D CNN head, max {config.max_length} tokens{lexical}"


def plot_confusion(confusion: np.ndarray, names: list[str], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(9, 8))
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    for (row, column), count in np.ndenumerate(confusion):
        if count:
            axes.text(column, row, str(count), ha="center", va="center", fontsize=6,
                      color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_curves(history: list[dict], path: Path, model: str) -> None:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_axes.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker="o",
                           label=split)
    loss_axes.set_title(f"{model}: loss")
    accuracy_axes.set_title(f"{model}: accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def path_table(reports_dir: Path) -> str:
    """Per model and level of the category path: accuracy, macro-F1, filed automatically."""
    rows = []
    for model in MODEL_KINDS:
        path = reports_dir / model / "metrics.json"
        figures = json.loads(path.read_text()).get("path") if path.exists() else None
        if not figures:
            continue
        for level, row in figures["levels"].items():
            accuracy = "n/a" if row["accuracy"] is None else \
                f"{row['accuracy']:.3f} [{row['accuracy_95ci'][0]:.3f}, {row['accuracy_95ci'][1]:.3f}]"
            precision = "n/a" if row["filed_precision"] is None else f"{row['filed_precision']:.3f}"
            rows.append(f"| {model} | {level} | {row['listings']} | {accuracy} | "
                        f"{row['macro_f1'] or 0:.3f} | "
                        f"{row['filed']:.1%} ({precision}) |")
        full = figures["full_path"]
        precision = "n/a" if full["filed_to_end_precision"] is None \
            else f"{full['filed_to_end_precision']:.3f}"
        rows.append(f"| {model} | full path | {figures['listings']} | {full['accuracy']:.3f} "
                    f"[{full['accuracy_95ci'][0]:.3f}, {full['accuracy_95ci'][1]:.3f}] | | "
                    f"{full['filed_to_end']:.1%} to the end of the answer ({precision}) |")
        confused = figures.get("within_root", {}).get("most_confused", [])[:3]
        if confused:
            pairs = "; ".join(f"{c['truth']} → {c['answer']} ({c['count']})" for c in confused)
            rows.append(f"| {model} | within a root | {figures['within_root']['listings']} | "
                        f"{figures['within_root']['error_rate']:.3f} wrong at level 2 | | {pairs} |")
    if not rows:
        return ""
    return ("\nThe category path, per listing (a level counts the listings whose true path reaches it; "
            "filed: the answer is confident down to that level, with the precision there):\n\n"
            "| model | level | listings | accuracy [95% CI] | macro-F1 | filed (precision) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def write_summary(reports_dir: Path) -> str:
    """reports/summary.md: one row per evaluated model and its most confused pairs."""
    lines = ["| model | accuracy per listing [95% CI] | macro-F1 per listing | accuracy per photo "
             "[95% CI] | listings | photos | ECE per listing, before -> after T | filed automatically "
             "(precision) | training |",
             "|---|---|---|---|---|---|---|---|---|"]
    confused = []
    for model in MODEL_KINDS:
        path = reports_dir / model / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        listing = m.get("listing", m)
        per_photo = "n/a" if m["unit"] == "product" else \
            f"{m['accuracy']:.3f} [{m['accuracy_95ci'][0]:.3f}, {m['accuracy_95ci'][1]:.3f}]"
        lines.append(f"| {model} | {listing['accuracy']:.3f} [{listing['accuracy_95ci'][0]:.3f}, "
                     f"{listing['accuracy_95ci'][1]:.3f}] | {listing['macro_f1']:.3f} | {per_photo} | "
                     f"{listing['samples']} | {m['samples'] if m['unit'] == 'photo' else 'n/a'} | "
                     f"{calibration_cell(m.get('calibration'))} | {review_cell(m.get('calibration'))} | "
                     f"{m['training']} |")
        confused += [f"| {model} | {pair['true']} | {pair['predicted']} | {pair['count']} | "
                     f"{pair['example'].replace('|', '/')} |" for pair in listing.get("most_confused", [])]
    table = "\n".join(lines) + "\n"
    ablation = [f"| {model} | {name} | {accuracy:.3f} |" for model in MODEL_KINDS if KINDS[model].uses_text
                if (reports_dir / model / "metrics.json").exists()
                for name, accuracy in json.loads((reports_dir / model / "metrics.json").read_text())
                .get("branches", {}).items()]
    if ablation:
        table += ("\nBranches of the same model, per listing:\n\n| model | answer from | accuracy |\n"
                  "|---|---|---|\n" + "\n".join(ablation) + "\n")
    table += path_table(reports_dir)
    table += complementarity(reports_dir)
    if confused:
        table += ("\nMost confused pairs per listing (true -> predicted), with one listing each:\n\n"
                  "| model | true | predicted | listings | example |\n|---|---|---|---|---|\n"
                  + "\n".join(confused) + "\n")
    (reports_dir / "summary.md").write_text(table)
    return table
