"""Shared fixtures: one small generated sample and its cleaned copy per test session."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import build_archive
from marketplace_classifier.ops.engines import KServeRay, TorchServe
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.training.cleaning import clean
from marketplace_classifier.training.sample import SampleConfig, generate
from marketplace_classifier.training.splits import write_splits
from tests.helpers import SERVER_BATCH_SIZE, FakeContext, write_test_config

SAMPLE_PRODUCTS = 200


# The runtime each test export names for serving (export measures and checks all of them).
EXPORT_RUNTIMES = {"image": "openvino", "text": "torchscript", "combined": "onnxruntime"}


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
    from marketplace_classifier.training.train import TrainConfig, train

    work = tmp_path_factory.mktemp("trained")
    common = {"data_dir": str(clean_sample[0]), "checkpoint_dir": str(work / "checkpoints"),
              "runs_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": 0,
              "batch_size": 32, "min_listings": 2}  # a tree of three levels from 200 listings
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
    """Exports of the tiny trained models, inside a throwaway project root, each naming the
    runtime of EXPORT_RUNTIMES: every served test then runs each runtime under each engine."""
    from marketplace_classifier.training.export import export

    root = tmp_path_factory.mktemp("project")
    for kind, runtime in EXPORT_RUNTIMES.items():
        # int8 gates are tested on their own (tests/test_runtimes.py): not tried here, for time
        export(trained["paths"][kind], trained["data_dir"], root / "artifacts", runtime=runtime,
               measure_seconds=0.1, try_reduced_precision=False)
    return root / "artifacts"


@pytest.fixture(scope="session")
def handlers_in_process(artifacts) -> dict:
    """An initialised handler per model, exactly as a TorchServe worker builds it."""
    from marketplace_classifier.engines.torchserve.combined_handler import CombinedHandler
    from marketplace_classifier.engines.torchserve.image_handler import ImageHandler
    from marketplace_classifier.engines.torchserve.text_handler import TextHandler

    built = {}
    for kind, cls in (("image", ImageHandler), ("text", TextHandler), ("combined", CombinedHandler)):
        handler = cls()
        handler.initialize(FakeContext(artifacts / kind))
        built[kind] = handler
    return built


@pytest.fixture(scope="session")
def server(artifacts, tmp_path_factory):
    """One TorchServe with the three test archives for every module that serves them (a start
    costs about a minute on two cores); a test that stops or restarts it leaves it running."""
    work = tmp_path_factory.mktemp("serving")
    store = artifacts.parent / "model_store"  # the archive builder keeps to the project folder
    # a long batch delay so that concurrent test requests share a batch
    config = MODEL_CONFIG | {"maxBatchDelay": 300, "batchSize": SERVER_BATCH_SIZE}
    for model in ("image", "text", "combined"):
        build_archive(model, artifacts, store, root=artifacts.parent, model_config=config)
    properties = write_test_config(work / "config.properties", store)
    state = work / "state"
    with TorchServe(state, work / "config.properties", store, timeout=300) as engine:
        yield {"properties": properties, "engine": engine, "state": state,
               "config": work / "config.properties", "token": serve.read_key(state / "key_file.json"),
               "artifacts": artifacts}


@pytest.fixture(scope="session")
def kserve_ray(artifacts):
    """One second engine (KServe's server with Ray Serve, one replica a model) for every module
    that serves through it."""
    if not serve.ENGINE_PYTHON.exists():
        pytest.skip("the second engine's environment is missing: make engine-venv (make test builds it)")
    port = serve.free_port(span=3)  # its signals listen two ports after its REST
    state = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
    grpc_port = serve.free_port()
    engine = KServeRay(state, artifacts, timeout=300, port=port, grpc_port=grpc_port, replicas=1)
    try:
        with engine:
            yield {"base": engine.addresses.rest, "port": port, "state": engine.state_dir,
                   "pid": engine.addresses.pid, "grpc": engine.addresses.grpc, "grpc_port": grpc_port,
                   "signals": engine.addresses.signals, "engine": engine}
    finally:
        shutil.rmtree(state, ignore_errors=True)
