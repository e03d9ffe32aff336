"""The same behaviour on both engines: TorchServe (handlers/) and KServe's model server with Ray
Serve batching (kserve_ray/), both over the serving core and the same exported folders. Run them
alone with `pytest -m engines`."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from scripts import serve
from scripts.hostile import ordinary_photo, round_one, triggers
from tests.helpers import TEXTS, as_vector, in_process

pytestmark = [pytest.mark.serving, pytest.mark.engines]
READY_TIMEOUT = 300  # a bound on a hung start, not a measurement


class Engine:
    """How a test reaches one engine: v1 and v2 requests, and who serves them."""

    def __init__(self, name: str, v1: str, v2: str, headers: dict, workers, signals: str):
        self.name, self.v1_url, self.v2_url, self.headers, self.workers = name, v1, v2, headers, workers
        self.signals = signals  # the serving core's metrics, summed over workers (metrics_exporter)

    def post(self, url: str, body: bytes, content_type: str = "application/json") -> requests.Response:
        headers = self.headers | {"Content-Type": content_type}
        return requests.post(url, data=body, timeout=120, headers=headers)

    def v1(self, model: str, body: bytes, content_type: str = "application/json") -> requests.Response:
        return self.post(self.v1_url.format(model=model), body, content_type)

    def v2(self, model: str, body: bytes) -> requests.Response:
        return self.post(self.v2_url.format(model=model), body)


def replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::ServeReplica"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


@pytest.fixture(scope="module")
def kserve_ray(artifacts):
    if not serve.ENGINE_PYTHON.exists():
        pytest.skip("the second engine's environment is missing: make engine-venv (make test builds it)")
    port, state = serve.free_port(), Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
    grpc_port = serve.free_port()
    try:
        started = serve.start_kserve_ray(artifacts, state, port=port, replicas=1, timeout=READY_TIMEOUT,
                                         grpc_port=grpc_port)
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "state": state,
               "grpc": started["grpc"], "grpc_port": grpc_port, "signals": started["signals"]}
    finally:
        serve.stop_kserve_ray(state)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module", params=["torchserve", "kserve_ray"])
def engine(request) -> Engine:
    if request.param == "torchserve":
        server = request.getfixturevalue("server")
        url = server["properties"]["inference_address"] + "/predictions/{model}"
        return Engine("torchserve", url, url, {"Authorization": f"Bearer {server['token']}"},
                      lambda: serve.worker_pids(server["properties"], server["state"] / "key_file.json",
                                                ["image", "text", "combined"]), server["info"]["signals"])
    started = request.getfixturevalue("kserve_ray")
    base = started["base"]
    return Engine("kserve_ray", base + "/v1/models/{model}:predict", base + "/v2/models/{model}/infer", {},
                  replica_pids, started["signals"])


def b64(photo: bytes) -> str:
    return base64.b64encode(photo).decode()


PHOTOS = [ordinary_photo(seed) for seed in range(3)]
LISTINGS = [  # model, photos, text
    ("image", PHOTOS[:1], None), ("image", PHOTOS, None), ("text", [], TEXTS[0]),
    ("combined", PHOTOS[:2], TEXTS[1]), ("combined", [], TEXTS[2]),
]


@pytest.mark.parametrize(("model", "photos", "text"), LISTINGS)
def test_v1_answers_equal_the_torchscript_model(engine, artifacts, model, photos, text):
    listing = {"images": [b64(p) for p in photos]} if model != "text" else {}
    listing |= {"text": text} if text else {}
    response = engine.v1(model, json.dumps({"instances": [listing, listing]}).encode())
    assert response.status_code == 200, response.text[:300]
    expected = in_process(artifacts, model, photos, text)
    for answer in response.json()["predictions"]:
        assert (as_vector(answer, artifacts, model) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("model", "photos", "text"), LISTINGS)
def test_v2_answers_equal_the_torchscript_model(engine, artifacts, model, photos, text):
    inputs = [{"name": "image", "shape": [1, len(photos)], "datatype": "BYTES",
               "data": [b64(p) for p in photos]}] if photos else []
    inputs += [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}] if text else []
    response = engine.v2(model, json.dumps({"inputs": inputs}).encode())
    assert response.status_code == 200, response.text[:300]
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    names = json.loads((artifacts / model / "index_to_name.json").read_text())
    classes = outputs["classes"]["data"]
    served = [outputs["probabilities"]["data"][classes.index(names[str(i)])] for i in range(len(names))]
    expected = in_process(artifacts, model, photos, text)
    assert max(abs(a - b) for a, b in zip(served, expected.tolist(), strict=True)) <= 1e-5


def test_hostile_requests_get_4xx_json_and_their_batch_mates_are_answered(engine, artifacts):
    before = engine.workers()
    hostile = [(t.model, t.body, t.content_type) for t in (round_one() | triggers()).values()]
    listings = [("text", {"text": text}) for text in TEXTS] + [("image", {"image": b64(PHOTOS[0])})] * 2
    good = [(model, json.dumps({"instances": [listing]}).encode(), "application/json")
            for model, listing in listings]
    jobs = hostile + good
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: engine.v1(*job), jobs))
    for (_, body, _), response in zip(hostile, responses, strict=False):
        assert 400 <= response.status_code < 500, (engine.name, body[:80], response.status_code,
                                                   response.text[:200])
        assert isinstance(response.json(), dict) and response.json().get("error"), response.text[:200]
    for (model, body, _), response in zip(good, responses[len(hostile):], strict=True):
        assert response.status_code == 200, response.text[:300]
        listing = json.loads(body)["instances"][0]
        photos = [base64.b64decode(listing["image"])] if "image" in listing else []
        expected = in_process(artifacts, model, photos, listing.get("text"))
        assert (as_vector(response.json()["predictions"][0], artifacts, model) - expected).abs().max() <= 1e-5
    assert engine.workers() == before


def listening_addresses(port: int) -> set[str]:
    """The addresses a port listens on, as /proc/net/tcp{,6} writes them."""
    listening = [line for table in ("/proc/net/tcp", "/proc/net/tcp6")
                 for line in Path(table).read_text().splitlines()[1:]]
    return {line.split()[1].rsplit(":", 1)[0] for line in listening
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"}  # 0A: LISTEN


def test_the_second_engine_keeps_the_security_defaults(kserve_ray):
    assert listening_addresses(kserve_ray["port"]) == {"0100007F"}  # 127.0.0.1 only
    # gRPC: 127.0.0.1 too (as an IPv4-mapped IPv6 address), not KServe's [::]
    assert listening_addresses(kserve_ray["grpc_port"]) <= {"0100007F", "0000000000000000FFFF00000100007F"}
    assert listening_addresses(kserve_ray["grpc_port"])
    base = kserve_ray["base"]
    for path in ("/v2/repository/models/text/unload", "/v2/repository/models/text/load",
                 "/v2/repository/index", "/v1/models/text:explain"):
        assert requests.post(base + path, timeout=30).status_code in (404, 405), path
    assert requests.get(f"{base}/v2/models/text/ready", timeout=30).json()["ready"] is True
    requests.post(f"{base}/v1/models/text:predict", json={"instances": [{"text": "kettle"}]}, timeout=60)
    metrics = requests.get(f"{base}/metrics", timeout=30).text
    assert 'request_predict_seconds_count{model_name="text"}' in metrics


def test_the_second_engine_batches_concurrent_requests(kserve_ray):
    body = json.dumps({"instances": [{"text": "kettle"}]}).encode()
    with ThreadPoolExecutor(16) as pool:
        url = f"{kserve_ray['base']}/v1/models/text:predict"
        codes = list(pool.map(lambda _: requests.post(url, data=body, timeout=120).status_code, range(48)))
    assert set(codes) == {200}
    logs = "".join(path.read_text(errors="replace")
                   for path in (kserve_ray["state"] / "ray").rglob("worker-*") if path.is_file())
    sizes = [int(size) for size in re.findall(r"batch_size=(\d+) valid", logs)]
    assert sizes and max(sizes) > 1  # Ray Serve's @serve.batch gathered requests, not our code


# ---------------------------------------------------------------- Open Inference Protocol over gRPC
def grpc_answers(kserve_ray, bodies: list[dict]) -> list[dict]:
    """Each v2 body sent over gRPC by KServe's own generated client (kserve_ray/grpc_client.py)."""
    run = subprocess.run([str(serve.ENGINE_PYTHON), "-m", "kserve_ray.grpc_client", "--target",
                          kserve_ray["grpc"]], input=json.dumps(bodies), capture_output=True, text=True,
                         cwd=serve.ROOT, timeout=600)
    assert run.returncode in (0, 1), run.stderr[-2000:]
    return json.loads(run.stdout)


def v2_probabilities(answer: dict, artifacts, model: str) -> list[list[float]]:
    """Every listing's probabilities of an Open Inference Protocol answer, in the label order."""
    outputs = {output["name"]: output for output in answer["outputs"]}
    names = json.loads((artifacts / model / "index_to_name.json").read_text())
    classes, flat = outputs["classes"]["data"], outputs["probabilities"]["data"]
    rows = [flat[row * len(classes):(row + 1) * len(classes)] for row in range(len(flat) // len(classes))]
    return [[row[classes.index(names[str(i)])] for i in range(len(names))] for row in rows]


def test_grpc_answers_equal_the_torchscript_model_and_refusals_stay_per_request(kserve_ray, artifacts):
    bodies = []
    for model, photos, text in LISTINGS:
        inputs = [{"name": "image", "shape": [1, len(photos)], "datatype": "BYTES",
                   "data": [b64(p) for p in photos]}] if photos else []
        inputs += [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}] if text else []
        bodies.append({"model": model, "id": f"listing-{len(bodies)}", "inputs": inputs})

    def one(model: str, name: str, data: list) -> dict:
        tensor = {"name": name, "shape": [len(data)], "datatype": "BYTES", "data": data}
        return {"model": model, "inputs": [tensor]}

    refused = [  # each between two good requests on the same channel
        (one("text", "text", [{"b64": "/w=="}]), "INVALID_ARGUMENT", "UTF-8"),
        (one("image", "image", ["aGVsbG8="]), "INVALID_ARGUMENT", "not a readable image"),
        (one("text", "text", ["x"] * 65), "INVALID_ARGUMENT", "1 to 64 listings"),
        (one("text", "image", [b64(PHOTOS[0])]), "INVALID_ARGUMENT", "text"),
    ]
    mixed = [body for pair in zip(bodies, [r[0] for r in refused] + [None] * len(bodies), strict=False)
             for body in pair if body is not None]
    answers = grpc_answers(kserve_ray, mixed)
    by_id = {answer.get("id"): answer for answer in answers if "outputs" in answer}
    for index, (model, photos, text) in enumerate(LISTINGS):
        answer = by_id[f"listing-{index}"]
        (served,) = v2_probabilities(answer, artifacts, model)
        expected = in_process(artifacts, model, photos, text)
        assert max(abs(a - b) for a, b in zip(served, expected.tolist(), strict=True)) <= 1e-5
    refusals = [answer for answer in answers if "code" in answer]
    assert len(refusals) == len(refused)
    for answer, (_, code, words) in zip(refusals, refused, strict=True):
        assert answer["code"] == code and words in answer["details"], answer


def test_grpc_has_no_model_repository_and_keeps_the_model(kserve_ray):
    script = """
import json, sys, grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as services
stub = services.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
codes = []
for call, message in ((stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="text")),
                      (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="text"))):
    try:
        call(message, timeout=60)
        codes.append("OK")
    except grpc.RpcError as error:
        codes.append(error.code().name)
ready = stub.ModelReady(pb.ModelReadyRequest(name="text"), timeout=60).ready
print(json.dumps({"codes": codes, "ready": ready}))
"""
    run = subprocess.run([str(serve.ENGINE_PYTHON), "-c", script, kserve_ray["grpc"]], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {"codes": ["UNIMPLEMENTED", "UNIMPLEMENTED"], "ready": True}


def test_the_cli_reaches_the_second_engine_over_rest_and_grpc(kserve_ray, artifacts, tmp_path, capsys):
    from scripts import predict

    photo_file = tmp_path / "photo.jpg"
    photo_file.write_bytes(PHOTOS[0])
    names = json.loads((artifacts / "combined" / "index_to_name.json").read_text())
    expected = in_process(artifacts, "combined", [PHOTOS[0]], TEXTS[0])
    for protocol in ("rest", "grpc"):
        code = predict.main(["--engine", "kserve_ray", "--protocol", protocol, "--model", "combined",
                             "--image", str(photo_file), "--text", TEXTS[0],
                             "--engine-url", kserve_ray["base"], "--engine-grpc", kserve_ray["grpc"]])
        answer = json.loads(capsys.readouterr().out)
        assert code == 0 and answer["category"] == names[str(int(expected.argmax()))], (protocol, answer)
        assert abs(answer["probability"] - float(expected.max())) <= 1e-5 and answer["photos"] == 1
    assert predict.main(["--engine", "kserve_ray", "--protocol", "grpc", "--model", "text", "--text", "",
                         "--engine-grpc", kserve_ray["grpc"]]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def answered_count(engine: Engine, model: str) -> float:
    """marketplace_answers_total of `model`, all categories and versions, as the engine exports it."""
    total = 0.0
    for line in requests.get(engine.signals, timeout=30).text.splitlines():
        if line.startswith("marketplace_answers_total{") and f'model="{model}"' in line:
            assert 'version="' in line and 'category="' in line
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_engine_exports_the_cores_signals_of_every_worker(engine):
    before = answered_count(engine, "text")
    bodies = [json.dumps({"instances": [{"text": text}]}).encode() for text in TEXTS[:4]] * 2
    with ThreadPoolExecutor(4) as pool:  # spread over the workers (or replicas)
        assert all(r.status_code == 200 for r in pool.map(lambda body: engine.v1("text", body), bodies))
    assert answered_count(engine, "text") - before == len(bodies)
    exported = requests.get(engine.signals, timeout=30).text
    assert "marketplace_drift_window_listings{" in exported
    assert "marketplace_top_probability_bucket{" in exported
