"""Temperature scaling: one temperature per model, fitted on the validation split, so that the
answer's probabilities mean what they say; and the expected calibration error that measures it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ECE_BINS = 15


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
def split_outputs(task, split: str, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each branch's logits [N, C] and the labels [N] of a split, in the split's order."""
    branches, labels = [], []
    for batch in task.batches(split, batch_size):
        branches.append([output.float().cpu() for output in task.network(*batch.inputs)])
        labels.append(batch.labels.cpu())
    if not labels:
        raise ValueError(f"the {split} split has no {task.kind} samples")
    return [torch.cat([batch[i] for batch in branches]) for i in range(len(branches[0]))], \
        torch.cat(labels)


def split_logits(model, config, data, split: str, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (what softmax turns into its answer) and the labels of a split;
    `task` (from training.tasks.make_task) is built when not given."""
    if task is None:
        from training.tasks import make_task

        task = make_task(model.eval(), config, data, torch.device("cpu"))
    branches, labels = split_outputs(task, split, config.batch_size)
    with torch.inference_mode():
        return model.combine(branches).float(), labels


def validation_temperature(model, config, data, task=None) -> float:
    """The temperature fitted on the validation split (1.0 when it has no samples)."""
    if len(data.samples(config.model, "val")) == 0:
        return 1.0
    return fit_temperature(*split_logits(model, config, data, "val", task))
