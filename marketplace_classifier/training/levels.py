"""The category path below the roots: its per-level temperatures and review thresholds, chosen on
the validation listings, and its figures on a split (serving/taxonomy.py decodes the answer)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch

from marketplace_classifier.serving.processing import listing_probabilities
from marketplace_classifier.serving.taxonomy import STOP, Level, Taxonomy, join_path, split_path
from marketplace_classifier.training.calibration import (
    coverage_at,
    listing_logits,
    pool_by_listing,
    review_threshold,
    wilson_interval,
)

LEVELS_MIX_GRID = [step / 4 for step in range(5)]
LEVELS_BRANCH_MIX_GRID = [step / 10 for step in range(11)]


@dataclass(frozen=True)
class PathWeight:
    """A weight of two sources of the category path's levels, chosen on validation after training:
    the model's buffer [1 - w, w], the candidates (the first wins ties) and what w weighs."""

    buffer: str
    grid: list[float]
    weighs: str


PATH_WEIGHTS = (
    # the combined model: the text model's own levels head against the fusion's
    PathWeight("levels_mix", LEVELS_MIX_GRID, "text levels"),
    # any model whose lexical branch answers the levels: that branch against the other
    PathWeight("levels_branch_mix", LEVELS_BRANCH_MIX_GRID, "lexical levels"),
)


TEMPERATURE_GRID = tuple(math.exp(x) for x in np.linspace(math.log(0.25), math.log(4.0), 49))


@dataclass
class SplitPaths:
    """One split's listings: their true paths (cut at the tree's depth, not folded), the root
    answers (calibrated) and the levels head's pooled log-probabilities."""

    truths: list[tuple[str, ...]]
    root_probabilities: torch.Tensor
    levels_log_probabilities: torch.Tensor


@torch.inference_mode()
def split_levels_logits(task, split: str, batch_size: int) -> torch.Tensor:
    """The levels' logits [N, K] of a split's samples, in the split's order: the part of the model's
    answer after the roots, its branches mixed as the served model mixes them."""
    classes, outputs = task.model.num_classes, []
    for batch in task.batches(split, batch_size):
        outputs.append(task.model.combine(task.network(*batch.inputs))[:, classes:].float().cpu())
    return torch.cat(outputs)


def split_paths(model, config, data, taxonomy: Taxonomy, split: str, task, temperature: float) -> SplitPaths:
    """What the served answers of a split's listings are made of, in the order of listing_logits."""
    pooled, _ = listing_logits(model, config, data, split, task)
    samples = data.samples(config.model, split)
    levels = split_levels_logits(task, split, config.batch_size)
    ids, levels_pooled, _ = pool_by_listing(levels, torch.zeros(len(levels)), samples["product_id"])
    path_of = dict(zip(data.products["id"], data.products["category"].astype(str), strict=True))
    truths = [split_path(path_of[product])[:taxonomy.max_depth] for product in ids]
    return SplitPaths(truths, listing_probabilities(pooled, temperature), levels_pooled)


# ------------------------------------------------------------------ temperatures per level
def level_cases(taxonomy: Taxonomy, truths: list[tuple[str, ...]], level: int) -> list[tuple[int, list, int]]:
    """The listings whose choice at `level` the tree can judge: (row, the terminals of each
    choice, the true choice's position), given their true parent."""
    cases = []
    for row, truth in enumerate(truths):
        folded = taxonomy.fold(truth)
        if len(folded) < level - 1:
            continue
        parent = folded[:level - 1]
        options = taxonomy.choices(parent)
        target = folded[:level] if len(folded) >= level else STOP
        if target not in options:
            continue
        terminals = [[taxonomy.terminal_index(parent)] if option == STOP else taxonomy.terminals_below(option)
                     for option in options]
        cases.append((row, terminals, options.index(target)))
    return cases


def conditional_nll(log_probabilities: torch.Tensor, cases: list, temperature: float) -> float:
    probabilities = torch.softmax(log_probabilities / temperature, dim=1)
    total = 0.0
    for row, terminals, target in cases:
        masses = torch.stack([probabilities[row, indices].sum() for indices in terminals])
        total -= math.log(max(float(masses[target] / masses.sum()), 1e-12))
    return total / max(len(cases), 1)


def fit_level_temperatures(taxonomy: Taxonomy, paths: SplitPaths) -> tuple[float, ...]:
    """Per level below the roots, the temperature of the levels head that minimises the
    validation listings' negative log-likelihood of their true choice given their true parent
    (1.0 for a level without such listings)."""
    temperatures = []
    for level in range(2, taxonomy.depth + 1):
        cases = level_cases(taxonomy, paths.truths, level)
        if not cases:
            temperatures.append(1.0)
            continue
        losses = [conditional_nll(paths.levels_log_probabilities, cases, t) for t in TEMPERATURE_GRID]
        temperatures.append(round(TEMPERATURE_GRID[int(np.argmin(losses))], 4))
    return tuple(temperatures)


def with_temperatures(taxonomy: Taxonomy, paths: SplitPaths) -> Taxonomy:
    """`taxonomy` with its per-level temperatures fitted on `paths` (the validation listings)."""
    return replace(taxonomy, temperatures=fit_level_temperatures(taxonomy, paths))


# ------------------------------------------------------------------ answers and thresholds
def decoded(taxonomy: Taxonomy, paths: SplitPaths) -> list[list[Level]]:
    return taxonomy.decode(paths.root_probabilities, paths.levels_log_probabilities)


def level_confidence(answers: list[list[Level]], truths: list[tuple[str, ...]], level: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per listing: whether its answer reaches `level`, the probability there, and whether the
    answer's first `level` categories are the true ones."""
    reaches = np.array([len(answer) >= level for answer in answers])
    confidence = np.array([answer[level - 1].probability if len(answer) >= level else 0.0
                           for answer in answers])
    correct = np.array([len(answer) >= level and tuple(a.name for a in answer[:level]) == truth[:level]
                        for answer, truth in zip(answers, truths, strict=True)])
    return reaches, confidence, correct


def path_right(answers: list[list[Level]], truths: list[tuple[str, ...]]) -> np.ndarray:
    """Per listing: whether its answer is its whole true path (the same categories, and ending
    where the truth ends)."""
    return np.array([tuple(a.name for a in answer) == truth
                     for answer, truth in zip(answers, truths, strict=True)])


def full_path_accuracy(taxonomy: Taxonomy, paths: SplitPaths) -> float:
    """The share of listings whose answer is their whole true path (as levels_figures reports it)."""
    return round(float(path_right(decoded(taxonomy, paths), paths.truths).mean()), 4)


def choose_level_thresholds(taxonomy: Taxonomy, paths: SplitPaths, target_precision: float
                            ) -> tuple[float | None, ...]:
    """Per level below the roots, the lowest probability at which the answers reaching that level
    are right down to it `target_precision` of the time (None: no threshold reaches it)."""
    answers = decoded(taxonomy, paths)
    thresholds = []
    for level in range(2, taxonomy.depth + 1):
        reaches, confidence, correct = level_confidence(answers, paths.truths, level)
        thresholds.append(review_threshold(confidence[reaches], correct[reaches], target_precision)
                          if reaches.any() else None)
    return tuple(thresholds)


def choose_end_thresholds(taxonomy: Taxonomy, paths: SplitPaths, target_precision: float
                          ) -> tuple[float | None, ...]:
    """Per level below the roots, the lowest probability at which the answers that end at that
    level, each of their levels past its review threshold, are right to the end (the listing's
    path ends there too) `target_precision` of the time (None: no threshold reaches it)."""
    answers = decoded(taxonomy, paths)
    lengths = np.array([len(answer) for answer in answers])
    confident = np.array([taxonomy.confident_depth(answer, 0.0) for answer in answers]) == lengths
    last = np.array([answer[-1].probability for answer in answers])
    right = path_right(answers, paths.truths)
    thresholds = []
    for level in range(2, taxonomy.depth + 1):
        ends = confident & (lengths == level)
        thresholds.append(review_threshold(last[ends], right[ends], target_precision) if ends.any() else None)
    return tuple(thresholds)


def calibrated_taxonomy(taxonomy: Taxonomy, paths: SplitPaths, target_precision: float) -> Taxonomy:
    """`taxonomy` with its per-level temperatures, review thresholds and end thresholds chosen on
    `paths` (the validation listings)."""
    tuned = replace(with_temperatures(taxonomy, paths), end_thresholds=())
    tuned = replace(tuned, thresholds=choose_level_thresholds(tuned, paths, target_precision))
    return replace(tuned, end_thresholds=choose_end_thresholds(tuned, paths, target_precision))


# ------------------------------------------------------------------ figures
def levels_figures(taxonomy: Taxonomy, paths: SplitPaths, root_threshold: float | None) -> dict:
    """Per level: accuracy with its 95% interval and macro-F1 over the listings whose true path
    reaches it, and the share filed automatically at the level's threshold with its precision;
    the full path's accuracy, and the share filed down to the end of its answer."""
    from sklearn.metrics import f1_score

    answers = decoded(taxonomy, paths)
    depths = np.array([taxonomy.confident_depth(answer, root_threshold) for answer in answers])
    figures: dict = {"levels": {}}
    for level in range(1, taxonomy.depth + 1):
        has_level = np.array([len(truth) >= level for truth in paths.truths])
        reaches, confidence, correct = level_confidence(answers, paths.truths, level)
        judged = correct[has_level]
        truth_names = [join_path(truth[:level])
                       for truth, keep in zip(paths.truths, has_level, strict=True) if keep]
        answer_names = [join_path([a.name for a in answer[:level]]) if len(answer) >= level else "(none)"
                        for answer, keep in zip(answers, has_level, strict=True) if keep]
        filed = depths >= level
        figures["levels"][str(level)] = {
            "listings": int(has_level.sum()),
            "accuracy": round(float(judged.mean()), 4) if len(judged) else None,
            "accuracy_95ci": wilson_interval(int(judged.sum()), int(len(judged))),
            "macro_f1": round(float(f1_score(truth_names, answer_names, labels=sorted(set(truth_names)),
                                             average="macro", zero_division=0)), 4) if truth_names else None,
            "threshold": root_threshold if level == 1 else _at(taxonomy.thresholds, level - 2),
            "filed": round(float(filed.mean()), 4),
            "filed_precision": round(float(correct[filed].mean()), 4) if filed.any() else None,
        }
    full = path_right(answers, paths.truths)
    to_end = depths == np.array([len(answer) for answer in answers])
    figures["full_path"] = {"accuracy": round(float(full.mean()), 4),
                            "accuracy_95ci": wilson_interval(int(full.sum()), len(full)),
                            "filed_to_end": round(float(to_end.mean()), 4),
                            "filed_to_end_precision": round(float(full[to_end].mean()), 4)
                            if to_end.any() else None}
    figures["within_root"] = within_root_confusions(answers, paths.truths)
    figures["listings"] = len(answers)
    return figures


def within_root_confusions(answers: list[list[Level]], truths: list[tuple[str, ...]], top: int = 10) -> dict:
    """Second-level mistakes under the right root: their share of the listings whose true path
    reaches level 2 and the root was right, and the most frequent (truth, answer) pairs."""
    pairs: Counter = Counter()
    judged = 0
    for answer, truth in zip(answers, truths, strict=True):
        if len(truth) < 2 or answer[0].name != truth[0]:
            continue
        judged += 1
        answered = answer[1].name if len(answer) > 1 else "(stopped at the root)"
        if answered != truth[1]:
            pairs[truth[0], truth[1], answered] += 1
    return {"listings": judged, "error_rate": round(sum(pairs.values()) / judged, 4) if judged else None,
            "most_confused": [{"root": root, "truth": truth, "answer": answer, "count": count}
                              for (root, truth, answer), count in pairs.most_common(top)]}


def exported_path_figures(model, config, data, split: str, answers: dict, task) -> dict:
    """levels_figures of `split` under the taxonomy an export's answers carry (its temperatures
    and thresholds as chosen on validation), as the server decodes paths."""
    names = [data.index_to_name[str(i)] for i in range(data.num_classes)]
    taxonomy = Taxonomy.from_json(names, answers["taxonomy"])
    paths = split_paths(model, config, data, taxonomy, split, task, answers["temperature"])
    return levels_figures(taxonomy, paths, answers.get("review_threshold"))


def depth_shares(taxonomy: Taxonomy, paths: SplitPaths, root_threshold: float | None) -> list[float]:
    """The share of listings at each confident depth 0..depth (what the served signal counts)."""
    depths = [taxonomy.confident_depth(answer, root_threshold) for answer in decoded(taxonomy, paths)]
    counts = np.bincount(depths, minlength=taxonomy.depth + 1)
    return [round(float(c), 6) for c in counts / max(len(depths), 1)]


def _at(values: tuple, index: int):
    return values[index] if index < len(values) else None


__all__ = ["PATH_WEIGHTS", "PathWeight", "SplitPaths", "calibrated_taxonomy", "coverage_at", "depth_shares",
           "exported_path_figures", "full_path_accuracy", "levels_figures", "split_paths",
           "with_temperatures"]
