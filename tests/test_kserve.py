"""KServe: the manifests, the storage layout, and a TorchServe started from the generated pod
config answering KServe v1 and v2 requests like the plain REST API (no cluster needed)."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import MODELS, build_archive
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.ops.kserve_storage import StorageError, lay_out, main
from marketplace_classifier.ops.serve import free_port
from marketplace_classifier.serving.config import MODEL_CONFIG
from tests.helpers import photo

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kserve"
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
WRAPPER = DEPLOY / "wrapper" / "kserve_torchserve.py"
TEXTS = ["ps5 console with two controllers", "oak dining table and six chairs", "electric kettle"]


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def assert_restricted(container: dict) -> None:
    """What a "restricted" namespace requires of a container."""
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]


def test_manifests_carry_what_kserve_requires():
    runtimes = {doc["metadata"]["name"]: doc for doc in documents("serving-runtime.yaml")}
    for runtime in runtimes.values():
        assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
        formats = runtime["spec"]["supportedModelFormats"]
        assert {"name": "pytorch", "version": "1", "autoSelect": False} in formats
        container = runtime["spec"]["containers"][0]
        assert container["name"] == "kserve-container" and "args" not in container  # the entrypoint's
        assert "env" not in container  # no TS_SERVICE_ENVELOPE: the handlers read the protocols
        # a valid, lowercase reference whose registry cannot resolve until kustomization sets it
        assert re.fullmatch(r"registry\.invalid/[a-z0-9-]+:[a-z0-9.-]+", container["image"])
        assert_restricted(container)
    protocols, services = set(), ["marketplace-classifier-ray-v2"]
    for name in ("inferenceservice-v1.yaml", "inferenceservice-v2.yaml", "inferenceservice-v2-gpu.yaml"):
        (service,) = documents(name)
        assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"])
        model = service["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] == "pytorch" and model["storageUri"]
        assert model["protocolVersion"] in runtimes[model["runtime"]]["spec"]["protocolVersions"]
        protocols.add(model["protocolVersion"])
        # KServe sets PROTOCOL_VERSION only for its own torchserve runtime: the service sets it
        assert {"name": "PROTOCOL_VERSION", "value": model["protocolVersion"]} in model["env"]
        gpus = model["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == name.endswith("-gpu.yaml")
        if not gpus:
            cpu_runtime = runtimes["marketplace-torchserve"]["spec"]["containers"][0]
            assert model["resources"] == cpu_runtime["resources"]
            assert_room_for_measured_memory(cpu_runtime, "torchserve")
        services.append(service["metadata"]["name"])
    assert protocols == {"v1", "v2"}
    (policy,) = documents("networkpolicy.yaml")
    selected = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert selected["key"] == "serving.kserve.io/inferenceservice"
    assert sorted(selected["values"]) == sorted(services)
    assert {rule["port"] for rule in policy["spec"]["ingress"][0]["ports"]} == {8080, 8012, 8082}
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml")
    assert kustomization["images"][0]["name"] == container["image"].split(":")[0]


def measured_memory(engine: str) -> dict[str, int]:
    """The engine's row of docs/benchmark.md's memory table (benchmarks/server_memory.py), in MiB."""
    section = (ROOT / "docs" / "benchmark.md").read_text().split("## Memory of each engine", 1)[1]
    (row,) = [line for line in section.splitlines() if line.startswith(f"| {engine} |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    mib = [int(re.match(r"([\d,]+) MiB", cell)[1].replace(",", "")) for cell in cells[2:8]]
    return {"peak": max(mib[2], mib[4]), "after_load": mib[3]}


def assert_room_for_measured_memory(container: dict, engine: str) -> None:
    """A request that holds what the engine keeps after its heaviest load, a limit with a quarter's
    headroom over its measured peak."""
    gib = {kind: int(container["resources"][kind]["memory"].removesuffix("Gi")) * 1024
           for kind in ("requests", "limits")}
    measured = measured_memory(engine)
    assert measured["after_load"] <= gib["requests"] <= gib["limits"]
    assert gib["limits"] >= measured["peak"] * 1.25


def test_the_second_engines_runtime_has_no_jvm_and_room_for_its_measured_memory():
    (runtime,) = documents("serving-runtime-ray.yaml")
    assert runtime["kind"] == "ServingRuntime" and set(runtime["spec"]["protocolVersions"]) == {"v1", "v2"}
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container" and "args" not in container
    assert re.fullmatch(r"registry\.invalid/[a-z0-9-]+:[a-z0-9.-]+", container["image"])
    assert_restricted(container)
    assert_room_for_measured_memory(container, "kserve_ray")
    (service,) = documents("inferenceservice-ray-v2.yaml")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["resources"] == container["resources"]
    dockerfile = (DEPLOY / "Dockerfile.ray").read_text()
    commands = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"java|jdk|jre|torchserve", commands, re.IGNORECASE)
    assert re.search(r"^FROM python:3\.11-", commands, re.MULTILINE) and "USER 1000" in commands
    for requirements in ("marketplace_classifier/engines/kserve_ray/requirements.txt",
                         "marketplace_classifier/serving/requirements.txt"):
        assert f"-r /opt/marketplace/{requirements}" in commands
        assert f"-r {requirements}" in (ROOT / "Makefile").read_text()  # what make engine-venv installs
    assert ('"-m", "marketplace_classifier.engines.kserve_ray.server", "--artifacts-dir", "/mnt/models"'
            in commands)
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert container["image"].split(":")[0] in [image["name"] for image in kustomization["images"]]


def test_runtime_image_installs_what_the_tests_ran():
    """The Dockerfile installs the pins the tests ran with: TorchServe, the archiver and PyYAML
    as pyproject.toml pins them, the handlers' requirements, and KServe's model server from the
    file `make kserve-venv` installs; on Python 3.11 (torch 2.14.1 has no 3.9 wheels)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert re.search(r"^FROM python:3\.11-", dockerfile, re.MULTILINE)
    for package in ("torchserve", "torch-model-archiver", "pyyaml"):
        assert f"{package}=={pins[package]}" in dockerfile
    assert "-r /opt/marketplace/serving-requirements.txt" in dockerfile
    assert ("COPY marketplace_classifier/serving/requirements.txt /opt/marketplace/serving-requirements.txt"
            in dockerfile)
    assert "-r /opt/marketplace/wrapper/requirements.txt" in dockerfile
    requirements = (ROOT / "marketplace_classifier" / "serving" / "requirements.txt").read_text().split()
    assert f"torch=={pins.get('torch', '2.14.1')}" in requirements
    assert f"transformers=={pins['transformers']}" in requirements
    makefile = (ROOT / "Makefile").read_text()
    assert "-r deploy/kserve/wrapper/requirements.txt" in makefile
    entrypoint = (DEPLOY / "wrapper" / "entrypoint.sh").read_text()
    assert "kserve_torchserve.py" in entrypoint and "--ts-config" in entrypoint
    assert "USER 1000" in dockerfile and 'ENTRYPOINT ["/opt/marketplace/wrapper/entrypoint.sh"]' in dockerfile


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
    assert properties["inference_address"] == "http://127.0.0.1:8085"  # only the wrapper calls it
    assert properties["management_address"] == "http://127.0.0.1:8085"
    assert properties["grpc_inference_address"] == "127.0.0.1"
    assert properties["metrics_address"] == "http://0.0.0.0:8082"  # read-only, for Prometheus
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["enable_envvars_config"] == "false" and properties["enable_model_api"] == "false"
    assert serve.tokens_disabled(properties) and "service_envelope" not in properties
    assert serve.model_names(properties) == list(MODELS)
    snapshot = yaml.safe_load(properties["model_snapshot"])["models"]
    assert snapshot["text"]["1.0"]["batchSize"] == 16
    assert snapshot["image"]["1.0"]["maxBatchDelay"] == MODEL_CONFIG["maxBatchDelay"]
    (store / "text.mar").unlink()
    assert main(["--model-store", str(store), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("run `marketplace-classifier archive` first")
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
    local.write_text(text)
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
    with TorchServe(state, local, storage / "model-store", timeout=300) as engine:
        yield {"url": engine.addresses.rest, "state": state, "config": local}


@pytest.fixture(scope="module")
def kserve(pod, tmp_path_factory):
    """KServe's own model server (deploy/kserve/wrapper, in .venv-kserve as the runtime image
    installs it) in front of the pod's TorchServe, once per protocol: {"v1": url, "v2": url}."""
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: run `make kserve-venv` (make test does)")
    logs, fronts, processes = tmp_path_factory.mktemp("kserve_front"), {}, []
    try:
        for protocol in ("v1", "v2"):
            port = free_port()
            log = (logs / f"{protocol}.log").open("w")
            processes.append(subprocess.Popen(
                [str(KSERVE_PYTHON), str(WRAPPER), "--ts-config", str(pod["config"]), "--protocol", protocol,
                 "--http-port", str(port)], stdout=log, stderr=subprocess.STDOUT))
            fronts[protocol] = f"http://127.0.0.1:{port}"
            wait_for_kserve(fronts[protocol], processes[-1], logs / f"{protocol}.log")
        yield fronts
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def wait_for_kserve(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"KServe's model server exited: {log.read_text()[-2000:]}")
        try:
            if all(requests.get(f"{url}/v1/models/{m}", timeout=2).json().get("ready") for m in MODELS):
                return
        except (requests.ConnectionError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"KServe's model server was not ready after {timeout} s: {log.read_text()[-2000:]}")


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
def test_kserve_v1_and_v2_answers_equal_the_plain_rest_answers(pod, kserve, model):
    """Through KServe's model server (its predictor client forwarding to TorchServe's
    /v1/models/<m>:predict and /v2/models/<m>/infer), against TorchServe's plain REST API."""
    items = listings(model)
    plain = [requests.post(f"{pod['url']}/predictions/{model}", json=item, timeout=60).json()
             for item in items]
    instances = [item | ({"image": {"b64": item["image"]}} if "image" in item else {}) for item in items]
    v1 = requests.post(f"{kserve['v1']}/v1/models/{model}:predict", json={"instances": instances}, timeout=60)
    assert v1.status_code == 200, v1.text
    assert all(close(s, p) for s, p in zip(v1.json()["predictions"], plain, strict=True))

    inputs = [{"name": name, "shape": [len(items)], "datatype": "BYTES", "data": [i[name] for i in items]}
              for name in ("image", "text") if name in items[0]]
    v2 = requests.post(f"{kserve['v2']}/v2/models/{model}/infer", timeout=60,
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
def test_kserve_requests_are_batched_and_bad_ones_get_a_json_4xx(pod, kserve):
    url = f"{kserve['v1']}/v1/models/text:predict"
    bodies = [{"instances": [{"text": f"{TEXTS[i % 3]} {i}"}]} for i in range(12)]
    bodies[5] = {"instances": [{"text": "sofa"}, {"colour": "red"}]}
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: requests.post(url, json=body, timeout=60), bodies))
    assert responses[5].status_code == 400
    assert responses[5].json()["error"].startswith("instance 1: unknown field")
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 5)
    v2 = requests.post(f"{kserve['v2']}/v2/models/text/infer", timeout=60,
                       json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}]})
    assert v2.status_code == 400 and "text is empty" in v2.json()["error"]
    log = (pod["state"] / "logs" / "model_log.log").read_text()
    sizes = [int(size) for size in re.findall(r"batch_size=(\d+)", log)]
    assert max(sizes) > 1  # several KServe requests went through the model together


@pytest.mark.serving
def test_a_multi_photo_listing_through_kserve_gets_one_answer_with_a_review_flag(pod, kserve):
    photos = [base64.b64encode(photo(colour)).decode() for colour in ((30, 140, 60), (200, 20, 20))]
    plain = requests.post(f"{pod['url']}/predictions/combined", timeout=60,
                          json={"images": photos, "text": TEXTS[1]}).json()
    assert plain["photos"] == 2 and isinstance(plain["needs_review"], bool)
    v1 = requests.post(f"{kserve['v1']}/v1/models/combined:predict", timeout=60, json={"instances": [
        {"images": [{"b64": p} for p in photos], "text": TEXTS[1]}]})
    assert v1.status_code == 200, v1.text
    assert close(v1.json()["predictions"][0], plain) and v1.json()["predictions"][0]["photos"] == 2
    v2 = requests.post(f"{kserve['v2']}/v2/models/combined/infer", timeout=60, json={"inputs": [
        {"name": "image", "shape": [2, 2], "datatype": "BYTES", "data": [*photos, photos[0], ""]},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": [TEXTS[1], TEXTS[1]]}]})
    assert v2.status_code == 200, v2.text
    outputs = {output["name"]: output for output in v2.json()["outputs"]}
    assert outputs["photos"]["data"] == [2, 1]
    assert outputs["needs_review"]["data"][0] == plain["needs_review"]
    classes = outputs["classes"]["data"]
    assert outputs["probabilities"]["data"][:len(classes)] == pytest.approx(
        [plain["probabilities"][name] for name in classes], abs=1e-5)
    too_many = requests.post(f"{kserve['v1']}/v1/models/image:predict", timeout=60, json={"instances": [
        {"images": photos * 6}]})
    assert too_many.status_code == 400 and "at most 10" in too_many.json()["error"]


def run_schema_check(*files: Path) -> subprocess.CompletedProcess:
    if not KSERVE_PYTHON.exists():
        pytest.skip("KServe's environment is missing: make kserve-venv (make test builds it)")
    return subprocess.run([str(KSERVE_PYTHON), "-m", "marketplace_classifier.ops.kserve_schema",
                           *map(str, files)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_manifest_passes_the_schemas_of_kserve_and_kubernetes():
    manifests = sorted(DEPLOY.glob("*.yaml"))
    result = run_schema_check(*manifests)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    checked = [line for line in result.stdout.splitlines() if ": checked as " in line]
    assert len(checked) == sum(1 for path in manifests for document in yaml.safe_load_all(path.read_text())
                               if document and document["kind"] != "Kustomization")


def test_the_schema_check_finds_a_misspelt_field_a_wrong_type_and_a_missing_required_one(tmp_path):
    (runtime,) = documents("serving-runtime-ray.yaml")
    container = runtime["spec"]["containers"][0]
    container["imagePullPolcy"] = container.pop("imagePullPolicy", "IfNotPresent")  # misspelt
    container.pop("name")  # required by Kubernetes' Container
    runtime["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"  # a bool
    broken = tmp_path / "runtime.yaml"
    broken.write_text(yaml.safe_dump(runtime))
    result = run_schema_check(broken)
    assert result.returncode == 1
    assert "containers[0].imagePullPolcy: not a field of V1Container" in result.stdout
    assert "autoSelect: expected bool, got str 'yes'" in result.stdout
    assert "V1Container: name Input should be a valid string" in result.stdout


def merged(base: dict, patch: dict) -> dict:
    """A strategic-merge patch of maps onto `base` (the overlays patch no lists)."""
    result = dict(base)
    for key, value in patch.items():
        deeper = isinstance(value, dict) and isinstance(base.get(key), dict)
        result[key] = merged(base[key], value) if deeper else value
    return result


@pytest.mark.parametrize(("overlay", "percent"), [("canary", 10), ("promote", 100), ("rollback", 0)])
def test_the_canary_overlays_patch_the_base_and_pass_the_schemas(overlay, percent, tmp_path):
    folder = DEPLOY / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert [(folder / resource).resolve() for resource in kustomization["resources"]] == [DEPLOY.resolve()]
    base = {(doc["kind"], doc["metadata"]["name"]): doc for name in yaml.safe_load(
        (DEPLOY / "kustomization.yaml").read_text())["resources"] for doc in documents(name)}
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((folder / entry["path"]).read_text())
        target = base[(patch["kind"], patch["metadata"]["name"])]  # the patch names a base resource
        assert patch["spec"]["predictor"]["canaryTrafficPercent"] == percent
        whole = merged(target, patch)
        assert whole["spec"]["predictor"]["model"]["protocolVersion"] == "v2"  # the base kept
        (tmp_path / entry["path"]).write_text(yaml.safe_dump(whole))
        result = run_schema_check(folder / entry["path"], tmp_path / entry["path"])
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
