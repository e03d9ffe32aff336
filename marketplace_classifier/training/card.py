"""The model card written at export (model_card.json): which version this is, what it was trained
on and with, and how it did on the validation and test listings. Archives carry it, the serving
core shows it, and the rollout compares versions by it."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from marketplace_classifier.project import ROOT as PROJECT_ROOT
from marketplace_classifier.serving.processing import listing_probabilities
from marketplace_classifier.training.calibration import listing_logits, wilson_interval
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData

ROOT = PROJECT_ROOT
DATA_FILES = ("products.csv", "images.csv", "splits.csv", "images_manifest.json", "index_to_name.json")
OPTIONS = ("image_backbone", "image_weights", "image_size", "finetune", "text_encoder", "max_length",
           "lexical_buckets", "lexical_head_words", "finetune_encoder", "epochs", "batch_size", "lr",
           "seed")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(folder: Path) -> str:
    """sha256 over the cleaned folder's tables (photos enter through images_manifest.json)."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        if (Path(folder) / name).exists():
            digest.update(f"{name}:{file_digest(Path(folder) / name)}\n".encode())
    return digest.hexdigest()


def version_of(checkpoint_path: Path) -> str:
    """A training run's version: the day its best checkpoint was written and that file's digest
    (two runs never share one; the same run exported twice keeps it)."""
    written = datetime.fromtimestamp(Path(checkpoint_path).stat().st_mtime, UTC)
    return f"{written:%Y%m%d}.{file_digest(checkpoint_path)[:8]}"


def code_commit(root: Path = ROOT) -> dict | None:
    """The commit the code was at, and whether the work tree differed; None outside git."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError):
        return None


def split_figures(model, config: TrainConfig, data: CleanData, split: str, answers: dict,
                  task=None) -> dict:
    """Accuracy per listing with its interval, and the share filed automatically at the review
    threshold with its precision, on `split` as the server answers (photos pooled, temperature)."""
    if len(data.samples(config.model, split)) == 0:
        return {"listings": 0}
    pooled, labels = listing_logits(model, config, data, split, task)
    probabilities = listing_probabilities(pooled, answers["temperature"])
    confidence, predicted = probabilities.max(1)
    correct = predicted == labels
    threshold = answers.get("review_threshold")
    filed = confidence >= threshold if threshold is not None else torch.zeros_like(correct)
    figures = {"listings": len(labels), "accuracy": round(correct.float().mean().item(), 4),
               "accuracy_95ci": wilson_interval(int(correct.sum()), len(labels)),
               "filed_automatically": round(filed.float().mean().item(), 4),
               "precision_filed": round(correct[filed].float().mean().item(), 4) if filed.any() else None}
    if answers.get("taxonomy"):  # per level of the category path, as the server decodes it
        from marketplace_classifier.training.levels import exported_path_figures

        figures["path"] = exported_path_figures(model, config, data, split, answers, task)
    return figures


def training_seconds(checkpoint: dict) -> float | None:
    """Wall time of the training epochs (the history rows' seconds; older checkpoints lack them)."""
    seconds = [row.get("seconds") for row in checkpoint.get("history", [])]
    return round(sum(seconds), 1) if seconds and None not in seconds else None


def split_settings(folder: Path) -> dict | None:
    import json

    from marketplace_classifier.training.splits import SPLIT_SETTINGS_FILE

    path = Path(folder) / SPLIT_SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def model_card(model, checkpoint_path: Path, checkpoint: dict, config: TrainConfig, data: CleanData,
               answers: dict, task=None) -> dict:
    """Everything but the export's own figures (parity, runtime), which export adds."""
    options = asdict(config)
    return {
        "model": config.model,
        "version": version_of(checkpoint_path),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_commit(),
        "data": {"folder": str(config.data_dir), "digest": data_digest(data.folder),
                 "split": split_settings(data.folder)},
        "training": {"options": {name: options[name] for name in OPTIONS if name in options},
                     "branches": {name: {key: branch.get(key) for key in OPTIONS if key in branch}
                                  for name, branch in (config.branches or {}).items()},
                     "best_epoch": checkpoint.get("best_epoch"),
                     "epochs_run": len(checkpoint.get("history", [])),
                     "wall_seconds": training_seconds(checkpoint)},
        "calibration": {"temperature": answers["temperature"],
                        "text_only_temperature": answers.get("text_only_temperature"),
                        "review_threshold": answers.get("review_threshold"),
                        "target_precision": answers.get("target_precision")},
        "validation": split_figures(model, config, data, "val", answers, task),
        "test": split_figures(model, config, data, "test", answers, task),
    }
