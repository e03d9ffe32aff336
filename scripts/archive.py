"""Build model_store/{image,text,combined}.mar from artifacts/ with torch-model-archiver.

Usage: python scripts/archive.py [--artifacts-dir artifacts] [--model-store model_store] [--model ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from serving.config import MODEL_CONFIG, MODEL_HANDLER_OPTIONS
from serving.model_kinds import MODEL_KINDS, ModelKind, model_kind
from serving.runtimes import onnx_files
from serving.settings import SETTINGS_FILE, TORCHSCRIPT, ModelSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
# What each archive carries besides the model: the TorchServe adapter and the serving core.
PACKAGES = {"handlers": ("__init__.py", "listing_handler.py"),
            "serving": ("__init__.py", "core.py", "exported.py", "model_kinds.py", "settings.py", "files.py",
                        "runtimes.py", "processing.py", "budget.py", "payloads.py", "protocols.py")}
MODELS = MODEL_KINDS
# What the handlers need in the serving image; the KServe runtime image installs the same file.
REQUIREMENTS_FILE = ROOT / "handlers" / "requirements.txt"


class ArchiveError(RuntimeError):
    """An archive cannot be built from what was given."""


def required_files(artifacts: Path, model: str) -> list[Path]:
    """model.pt first (the archive's serialized file), then what the archive carries beside it:
    labels, settings, tokenizer, and the ONNX programs of the runtime preprocessing.json names."""
    folder = artifacts / model
    files = [folder / name for name in ("model.pt", "index_to_name.json", "preprocessing.json")]
    if archive_kind(model).uses_text:
        files.append(folder / "tokenizer")
    settings = read_settings(folder)
    if settings is not None and settings.runtime != TORCHSCRIPT:
        files += onnx_files(folder, archive_kind(model), settings.onnx_int8)
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
        raise ArchiveError(f"{path} is missing: run `python -m training export` first")
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


def build_archive(model: str, artifacts: Path, store: Path, root: Path = ROOT,
                  model_config: dict | None = None, version: str = "1.0") -> Path:
    kind = archive_kind(model).name
    artifacts, store = check_inside(artifacts, root), store.resolve()
    if store != root and root not in store.parents:
        raise ArchiveError(f"model store {store} is outside the project folder {root}")
    for path in required_files(artifacts, model):
        check_inside(path, root)
    config = model_config or MODEL_CONFIG
    config = config | {"handler": config.get("handler", {}) | MODEL_HANDLER_OPTIONS.get(kind, {})}
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        extra = Path(temporary) / "extra"
        stage(model, artifacts, extra, config)
        command = [
            shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", model, "--version", version,
            "--serialized-file", str(artifacts / model / "model.pt"),
            "--handler", str(ROOT / "handlers" / f"{kind}_handler.py"),
            "--extra-files", str(extra),
            "--config-file", str(extra / "model-config.yaml"),
            "--requirements-file", str(extra / "requirements.txt"),
            "--export-path", str(store), "--force",
        ]
        # the archiver stages in $TMPDIR/<model name>: a private TMPDIR keeps parallel builds apart
        result = subprocess.run(command, capture_output=True, text=True,
                                env=os.environ | {"TMPDIR": temporary})
    if result.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed for {model}: {result.stderr.strip()[-500:]}")
    return store / f"{model}.mar"


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--model", nargs="+", default=list(MODELS),
                        help="image, text, combined (default: all three), text_int8, combined_int8")
    add_batching_options(parser)
    args = parser.parse_args(argv)
    config = batching_config(args)
    try:
        for model in args.model:
            path = build_archive(model, args.artifacts_dir, args.model_store, model_config=config)
            print(json.dumps({"model": model, "archive": str(path),
                              "megabytes": round(path.stat().st_size / 2**20, 1)}))
    except ArchiveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
