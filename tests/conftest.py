"""Shared fixtures: one small generated sample and its cleaned copy per test session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from training.cleaning import clean
from training.sample import SampleConfig, generate
from training.splits import write_splits

SAMPLE_PRODUCTS = 200
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "marketplace"


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def raw_sample(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("raw")
    summary = generate(folder, SampleConfig(products=SAMPLE_PRODUCTS, seed=3))
    return folder, summary


@pytest.fixture(scope="session")
def clean_sample(raw_sample, tmp_path_factory) -> tuple[Path, object]:
    """Cleaned at a small image size (64) to keep the suite fast; split by product."""
    out = tmp_path_factory.mktemp("clean")
    report = clean(raw_sample[0], out, size=64, workers=2)
    write_splits(out, 0.2, 0.2, seed=0)
    return out, report


@pytest.fixture(scope="session")
def trained(clean_sample, tmp_path_factory) -> dict:
    """Tiny image, text and combined models trained on the clean sample (frozen encoders)."""
    from training.train import TrainConfig, train

    work = tmp_path_factory.mktemp("trained")
    common = {"data_dir": str(clean_sample[0]), "checkpoint_dir": str(work / "checkpoints"),
              "runs_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": 0,
              "batch_size": 32}
    configs = {
        "image": TrainConfig(model="image", image_backbone="efficientnet_lite0", image_weights="none",
                             image_size=64, epochs=4, lr=3e-3, **common),
        "text": TrainConfig(model="text", max_length=32, epochs=4, lr=3e-3, **common),
        "combined": TrainConfig(model="combined", epochs=2, lr=1e-3, **common),
    }
    paths = {kind: train(config) for kind, config in configs.items()}
    return {"work": work, "configs": configs, "paths": paths, "data_dir": clean_sample[0]}


@pytest.fixture(scope="session")
def artifacts(trained, tmp_path_factory) -> Path:
    """TorchScript exports of the tiny trained models, inside a throwaway project root."""
    from training.export import export

    root = tmp_path_factory.mktemp("project")
    for kind in ("image", "text", "combined"):
        export(trained["paths"][kind], trained["data_dir"], root / "artifacts")
    return root / "artifacts"


class FakeContext:
    """The parts of TorchServe's Context a handler uses, for in-process handler tests."""

    def __init__(self, model_dir: Path, content_types: list[str | None] | None = None,
                 model_yaml_config: dict | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": "model.pt", "modelName": model_dir.name}}
        self.model_yaml_config = model_yaml_config or {"minWorkers": 1, "handler": {}}
        self.content_types = content_types or []
        self.statuses: dict[int, tuple[int, str]] = {}

    def get_request_header(self, index: int, key: str):
        if key.lower() == "content-type" and index < len(self.content_types):
            return self.content_types[index]
        return None

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def handler_dir(handler) -> Path:
    """The model folder an in-process handler was initialised from."""
    return Path(handler.model_pt_path).parent


@pytest.fixture(scope="session")
def handlers_in_process(artifacts) -> dict:
    """An initialised handler per model, exactly as a TorchServe worker builds it."""
    from handlers.combined_handler import CombinedHandler
    from handlers.image_handler import ImageHandler
    from handlers.text_handler import TextHandler

    built = {}
    for kind, cls in (("image", ImageHandler), ("text", TextHandler), ("combined", CombinedHandler)):
        handler = cls()
        handler.initialize(FakeContext(artifacts / kind))
        built[kind] = handler
    return built
