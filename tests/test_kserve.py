"""KServe: the manifests, the storage layout, and a TorchServe started from the generated pod
config answering KServe v1 and v2 requests like the plain REST API (no cluster needed)."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from scripts import serve
from scripts.archive import MODEL_CONFIG, MODELS, build_archive
from scripts.kserve_storage import StorageError, lay_out, main
from tests.helpers import free_port, photo

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kserve"
TEXTS = ["ps5 console with two controllers", "oak dining table and six chairs", "electric kettle"]


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def test_manifests_carry_what_kserve_requires():
    runtimes = {doc["metadata"]["name"]: doc for doc in documents("serving-runtime.yaml")}
    for runtime in runtimes.values():
        assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
        formats = runtime["spec"]["supportedModelFormats"]
        assert {"name": "pytorch", "version": "1", "autoSelect": False} in formats
        container = runtime["spec"]["containers"][0]
        assert container["name"] == "kserve-container"
        assert "--ts-config=/mnt/models/config/config.properties" in container["args"]
        assert "--model-store=/mnt/models/model-store" in container["args"]
        assert "env" not in container  # no TS_SERVICE_ENVELOPE: the handlers read the protocols
    protocols = set()
    for name in ("inferenceservice-v1.yaml", "inferenceservice-v2.yaml", "inferenceservice-v2-gpu.yaml"):
        (service,) = documents(name)
        assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"])
        model = service["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] == "pytorch" and model["storageUri"]
        assert model["protocolVersion"] in runtimes[model["runtime"]]["spec"]["protocolVersions"]
        protocols.add(model["protocolVersion"])
        gpus = model["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == name.endswith("-gpu.yaml")
    assert protocols == {"v1", "v2"}


def test_runtime_image_installs_the_handlers_requirements():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY handlers/requirements.txt" in dockerfile and "torchserve-kfs:0.12.0" in dockerfile
    requirements = (ROOT / "handlers" / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in requirements and "transformers==5.24.0" in requirements


def test_storage_layout_and_pod_config(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    for model in MODELS:
        (store / f"{model}.mar").write_bytes(model.encode())
    out = tmp_path / "storage"
    assert main(["--model-store", str(store), "--out", str(out), "--batch-size", "16"]) == 0
    copied = sorted(path.name for path in (out / "model-store").iterdir())
    assert copied == ["combined.mar", "image.mar", "text.mar"]
    properties = serve.read_properties(out / "config" / "config.properties")
    assert properties["inference_address"] == "http://0.0.0.0:8085"
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["enable_envvars_config"] == "false" and properties["enable_model_api"] == "false"
    assert serve.tokens_disabled(properties) and "service_envelope" not in properties
    assert serve.model_names(properties) == list(MODELS)
    snapshot = yaml.safe_load(properties["model_snapshot"])["models"]
    assert snapshot["text"]["1.0"]["batchSize"] == 16
    assert snapshot["image"]["1.0"]["maxBatchDelay"] == MODEL_CONFIG["maxBatchDelay"]
    (store / "text.mar").unlink()
    assert main(["--model-store", str(store), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("run `python scripts/archive.py` first")
    with pytest.raises(StorageError):
        lay_out(store, out, ["text"])


# ------------------------------------------------------------------ a pod's TorchServe, locally
def localise(config: Path) -> Path:
    """The generated pod config on loopback and free ports; every other setting as generated."""
    ports = {":8085": f":{free_port()}", ":8082": f":{free_port()}",
             "=7070": f"={free_port()}", "=7071": f"={free_port()}"}
    text = config.read_text()
    for old, new in ports.items():
        text = text.replace(old, new)
    local = config.with_name("local.properties")
    local.write_text(text.replace("0.0.0.0", "127.0.0.1"))
    return local


@pytest.fixture(scope="module")
def pod(artifacts, tmp_path_factory):
    work = tmp_path_factory.mktemp("kserve")
    archives = artifacts.parent / "kserve_archives"
    for model in MODELS:
        build_archive(model, artifacts, archives, root=artifacts.parent)
    storage = work / "storage"
    # a long batch delay so that concurrent requests share a batch
    config = lay_out(archives, storage, list(MODELS), MODEL_CONFIG | {"batchSize": 8, "maxBatchDelay": 300},
                     mount=str(storage))
    local = localise(config)
    state = work / "state"
    try:
        serve.start(local, storage / "model-store", state, timeout=300)
        yield {"url": serve.read_properties(local)["inference_address"], "state": state}
    finally:
        serve.stop(state)


def listings(model: str) -> list[dict]:
    colours = ((30, 140, 60), (200, 20, 20), (0, 0, 0))
    photos = [base64.b64encode(photo(colour)).decode() for colour in colours]
    return [({"image": p} if model != "text" else {}) | ({"text": t} if model != "image" else {})
            for p, t in zip(photos, TEXTS, strict=True)]


def close(served: dict, plain: dict) -> bool:
    return served["category"] == plain["category"] and \
        served["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-5)


@pytest.mark.serving
@pytest.mark.parametrize("model", MODELS)
def test_kserve_v1_and_v2_answers_equal_the_plain_rest_answers(pod, model):
    items = listings(model)
    plain = [requests.post(f"{pod['url']}/predictions/{model}", json=item, timeout=60).json()
             for item in items]
    instances = [item | ({"image": {"b64": item["image"]}} if "image" in item else {}) for item in items]
    v1 = requests.post(f"{pod['url']}/v1/models/{model}:predict", json={"instances": instances}, timeout=60)
    assert v1.status_code == 200, v1.text
    assert all(close(s, p) for s, p in zip(v1.json()["predictions"], plain, strict=True))

    inputs = [{"name": name, "shape": [len(items)], "datatype": "BYTES", "data": [i[name] for i in items]}
              for name in ("image", "text") if name in items[0]]
    v2 = requests.post(f"{pod['url']}/v2/models/{model}/infer", timeout=60,
                       json={"id": "listing-batch-1", "inputs": inputs, "parameters": {"top_k": 2}})
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert body["id"] == "listing-batch-1" and body["model_name"] == model
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["category"]["data"] == [answer["category"] for answer in plain]
    assert outputs["top_categories"]["shape"] == [3, 2]
    classes = outputs["classes"]["data"]
    for row, answer in enumerate(plain):
        values = outputs["probabilities"]["data"][row * len(classes):(row + 1) * len(classes)]
        assert values == pytest.approx([answer["probabilities"][c] for c in classes], abs=1e-5)


@pytest.mark.serving
def test_kserve_requests_are_batched_and_bad_ones_get_a_json_4xx(pod):
    url = f"{pod['url']}/v1/models/text:predict"
    bodies = [{"instances": [{"text": f"{TEXTS[i % 3]} {i}"}]} for i in range(12)]
    bodies[5] = {"instances": [{"text": "sofa"}, {"colour": "red"}]}
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: requests.post(url, json=body, timeout=60), bodies))
    assert responses[5].status_code == 400
    assert responses[5].json()["error"].startswith("instance 1: unknown field")
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 5)
    v2 = requests.post(f"{pod['url']}/v2/models/text/infer", timeout=60,
                       json={"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
    assert v2.status_code == 400 and "BYTES" in v2.json()["error"]
    log = (pod["state"] / "logs" / "model_log.log").read_text()
    sizes = [int(size) for size in re.findall(r"batch_size=(\d+)", log)]
    assert max(sizes) > 1  # several KServe requests went through the model together
