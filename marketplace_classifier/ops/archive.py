"""Build model_store/{image,text,combined}.mar from artifacts/ with torch-model-archiver.

Usage: marketplace-classifier archive [--artifacts-dir artifacts] [--model-store model_store] [--model ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from marketplace_classifier.project import ROOT as PROJECT_ROOT
from marketplace_classifier.serving.config import MODEL_CONFIG, ServingPlan
from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, ModelKind, model_kind
from marketplace_classifier.serving.runtimes import onnx_files
from marketplace_classifier.serving.settings import (
    CARD_FILE,
    REFERENCE_FILE,
    SETTINGS_FILE,
    TORCHSCRIPT,
    ModelSettings,
    SettingsError,
    read_card,
)

ROOT = PROJECT_ROOT
# What each archive carries besides the model: the TorchServe adapter and the serving core.
# Folders relative to the project root, laid out the same inside the archive: the worker imports
# marketplace_classifier from the archive's folder (ahead of any installed copy), so the serving
# core goes in whole.
PACKAGES = {"marketplace_classifier": ("__init__.py",),
            "marketplace_classifier/engines": ("__init__.py",),
            "marketplace_classifier/engines/torchserve": ("__init__.py", "listing_handler.py"),
            "marketplace_classifier/serving": tuple(sorted(
                path.name for path in (ROOT / "marketplace_classifier" / "serving").glob("*.py")))}
MODELS = MODEL_KINDS
HANDLERS = ROOT / "marketplace_classifier" / "engines" / "torchserve"
# What the serving core needs in the serving image; the KServe runtime images install the same file.
REQUIREMENTS_FILE = ROOT / "marketplace_classifier" / "serving" / "requirements.txt"
DEFAULT_VERSION = "1.0"  # exports made before model cards
ARCHIVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ArchiveError(RuntimeError):
    """An archive cannot be built from what was given."""


def required_files(artifacts: Path, model: str) -> list[Path]:
    """model.pt first (the archive's serialized file), then what the archive carries beside it:
    labels, settings, tokenizer, and the ONNX programs of the runtime preprocessing.json names."""
    folder = artifacts / model
    layout = ExportLayout(folder)
    files = [layout.model, layout.labels, layout.settings]
    for optional in (CARD_FILE, REFERENCE_FILE):  # exports before cards and drift references have none
        if (folder / optional).exists():
            files.append(folder / optional)
    if archive_kind(model).uses_text:
        files.append(layout.tokenizer)
    settings = read_settings(folder)
    if settings is not None and settings.runtime != TORCHSCRIPT:
        files += onnx_files(folder, archive_kind(model), settings.onnx_int8, settings.runtime)
    return files


def read_settings(folder: Path) -> ModelSettings | None:
    """The folder's preprocessing.json, None where there is none (build_archive names it missing)."""
    if not (folder / SETTINGS_FILE).exists():
        return None
    try:
        return ModelSettings.load(folder)
    except SettingsError as error:
        raise ArchiveError(str(error)) from error


def check_inside(path: Path, root: Path) -> Path:
    """Refuse paths outside the project (e.g. `../../etc`) and missing files."""
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ArchiveError(f"{path} is outside the project folder {root}")
    if not resolved.exists():
        raise ArchiveError(f"{path} is missing: run `marketplace-classifier export` first")
    return resolved


def stage(model: str, artifacts: Path, folder: Path, model_config: dict) -> None:
    """Lay out the extra files: the handler and serving packages, label and preprocessing JSON,
    tokenizer."""
    for package, names in PACKAGES.items():
        (folder / package).mkdir(parents=True)
        for name in names:
            shutil.copy2(ROOT / package / name, folder / package / name)
    for source in required_files(artifacts, model)[1:]:
        target = folder / source.relative_to(artifacts / model)  # onnx/<method>.onnx keeps its folder
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(model_config, sort_keys=False))
    shutil.copy2(REQUIREMENTS_FILE, folder / "requirements.txt")


def archive_kind(model: str) -> ModelKind:
    """`text_int8` -> text: a variant is served by its model's handler."""
    try:
        return model_kind(model)
    except ValueError as error:
        raise ArchiveError(str(error)) from error


def archive_version(folder: Path) -> str:
    """The version an archive of this export carries: its model card's (the training run's)."""
    return (read_card(folder) or {}).get("version") or DEFAULT_VERSION


def build_archive(model: str, artifacts: Path, store: Path, root: Path = ROOT,
                  model_config: dict | None = None, version: str | None = None,
                  file_name: str | None = None) -> Path:
    """store/<file_name or model>.mar for artifacts/<model>/, versioned as its model card says
    (or `version`)."""
    kind = archive_kind(model).name
    version = version or archive_version(artifacts / model)
    file_name = file_name or model
    if not ARCHIVE_NAME.fullmatch(file_name) or not ARCHIVE_NAME.fullmatch(version):
        raise ArchiveError(f"archive names and versions take letters, digits, '.', '_' and '-' only: "
                           f"{file_name!r}, {version!r}")
    artifacts, store = check_inside(artifacts, root), store.resolve()
    if store != root and root not in store.parents:
        raise ArchiveError(f"model store {store} is outside the project folder {root}")
    for path in required_files(artifacts, model):
        check_inside(path, root)
    config = model_config or MODEL_CONFIG
    config = ServingPlan.for_model(kind, config).model_config(config)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        extra, staged = Path(temporary) / "extra", Path(temporary) / "archive"
        staged.mkdir()
        stage(model, artifacts, extra, config)
        command = [
            shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", model, "--version", version,
            "--serialized-file", str(ExportLayout(artifacts / model).model),
            "--handler", str(HANDLERS / f"{kind}_handler.py"),
            "--extra-files", str(extra),
            "--config-file", str(extra / "model-config.yaml"),
            "--requirements-file", str(extra / "requirements.txt"),
            "--export-path", str(staged), "--force",
        ]
        # the archiver stages in $TMPDIR/<model name>: a private TMPDIR keeps parallel builds apart
        result = subprocess.run(command, capture_output=True, text=True,
                                env=os.environ | {"TMPDIR": temporary})
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed for {model}: {result.stderr.strip()[-500:]}")
        # moved beside its final name, then renamed: a server never sees half an archive
        atomic_write(store / f"{file_name}.mar",
                     lambda temporary: shutil.move(str(staged / f"{model}.mar"), str(temporary)))
    return store / f"{file_name}.mar"


def add_batching_options(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --max-batch-delay and --workers, defaulting to MODEL_CONFIG."""
    parser.add_argument("--batch-size", type=int, default=MODEL_CONFIG["batchSize"])
    parser.add_argument("--max-batch-delay", type=int, default=MODEL_CONFIG["maxBatchDelay"],
                        help="milliseconds a batch waits to fill")
    parser.add_argument("--workers", type=int, default=MODEL_CONFIG["minWorkers"],
                        help="workers per model (per GPU on GPU machines)")


def batching_config(args: argparse.Namespace) -> dict:
    """MODEL_CONFIG with the batching options given on the command line."""
    return MODEL_CONFIG | {"batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay,
                           "minWorkers": args.workers, "maxWorkers": args.workers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--model", nargs="+", default=list(MODELS),
                        help="image, text, combined (default: all three), text_int8, combined_int8")
    parser.add_argument("--versioned", action="store_true",
                        help="name each archive <model>-<version>.mar (a candidate for rollout stage)")
    add_batching_options(parser)
    args = parser.parse_args(argv)
    config = batching_config(args)
    try:
        for model in args.model:
            name = f"{model}-{archive_version(args.artifacts_dir / model)}" if args.versioned else None
            path = build_archive(model, args.artifacts_dir, args.model_store, model_config=config,
                                 file_name=name)
            print(json.dumps({"model": model, "version": archive_version(args.artifacts_dir / model),
                              "archive": str(path),
                              "megabytes": round(path.stat().st_size / 2**20, 1)}))
    except ArchiveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
