"""The same behaviour on both engines: TorchServe (engines/torchserve/) and KServe's model server with Ray
Serve batching (marketplace_classifier/engines/kserve_ray/), both over the serving core and the same exported
folders. Run them
alone with `pytest -m engines`."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import ordinary_photo, round_one, triggers
from marketplace_classifier.serving.budget import WorkBudget
from marketplace_classifier.serving.config import MAX_REQUEST_BYTES
from tests.helpers import TEXTS, as_vector, in_process, in_process_path, same_path, v2_paths

pytestmark = [pytest.mark.serving, pytest.mark.engines]


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


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::ServeReplica"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


@pytest.fixture(scope="module", params=["torchserve", "kserve_ray"])
def engine(request) -> Engine:
    if request.param == "torchserve":
        server = request.getfixturevalue("server")
        url = server["properties"]["inference_address"] + "/predictions/{model}"
        return Engine("torchserve", url, url, {"Authorization": f"Bearer {server['token']}"},
                      lambda: serve.worker_pids(server["properties"], server["state"] / "key_file.json",
                                                ["image", "text", "combined"]),
                      server["engine"].addresses.signals)
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
    path = in_process_path(artifacts, model, photos, text)
    for answer in response.json()["predictions"]:
        assert (as_vector(answer, artifacts, model) - expected).abs().max() <= 1e-5
        assert same_path(answer["path"], path), (answer["path"], path)
        assert 0 <= answer["confident_depth"] <= len(path)
        assert (answer["confident_depth"] == 0) == answer["needs_review"]


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
    assert same_path(v2_paths(response.json())[0], in_process_path(artifacts, model, photos, text))
    assert outputs["confident_depth"]["datatype"] == "INT32"


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
    assert sizes and max(sizes) > 1  # the replica's CostBatcher gathered concurrent requests


# ---------------------------------------------------------------- Open Inference Protocol over gRPC
def grpc_answers(kserve_ray, bodies: list[dict]) -> list[dict]:
    """Each v2 body sent over gRPC by KServe's own generated client (engines/kserve_ray/grpc_client.py)."""
    module = "marketplace_classifier.engines.kserve_ray.grpc_client"
    run = subprocess.run([str(serve.ENGINE_PYTHON), "-m", module, "--target", kserve_ray["grpc"]],
                         input=json.dumps(bodies), capture_output=True, text=True, cwd=serve.ROOT,
                         timeout=600)
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
        assert same_path(v2_paths(answer)[0], in_process_path(artifacts, model, photos, text))
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
    from marketplace_classifier.ops import predict

    photo_file = tmp_path / "photo.jpg"
    photo_file.write_bytes(PHOTOS[0])
    names = json.loads((artifacts / "combined" / "index_to_name.json").read_text())
    expected = in_process(artifacts, "combined", [PHOTOS[0]], TEXTS[0])
    expected_path = in_process_path(artifacts, "combined", [PHOTOS[0]], TEXTS[0])
    for protocol in ("rest", "grpc"):
        code = predict.main(["--engine", "kserve_ray", "--protocol", protocol, "--model", "combined",
                             "--image", str(photo_file), "--text", TEXTS[0],
                             "--engine-url", kserve_ray["base"], "--engine-grpc", kserve_ray["grpc"]])
        printed = capsys.readouterr()
        answer = json.loads(printed.out)
        assert code == 0 and answer["category"] == names[str(int(expected.argmax()))], (protocol, answer)
        assert abs(answer["probability"] - float(expected.max())) <= 1e-5 and answer["photos"] == 1
        assert same_path(answer["path"], expected_path), (protocol, answer["path"], expected_path)
        assert printed.err.startswith("path: ") and expected_path[0]["name"] in printed.err
    assert predict.main(["--engine", "kserve_ray", "--protocol", "grpc", "--model", "text", "--text", "",
                         "--engine-grpc", kserve_ray["grpc"]]) == 2
    assert "needs text" in capsys.readouterr().err  # refused by the client before anything is sent


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


# ---------------------------------------------------------------- limits before the work
def send_until_answered(engine: Engine, head: bytes, body_chunks) -> tuple[int, bytes]:
    """Send a request head, then body chunks until the server answers or closes; returns how many
    body bytes went out and what came back."""
    host, port = address(engine.v1_url)
    with socket.create_connection((host, port), timeout=60) as connection:
        connection.sendall(head)
        sent = 0
        try:
            for chunk in body_chunks:
                connection.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    return sent, received


def request_head(engine: Engine, model: str, framing: str) -> bytes:
    path = "/" + engine.v1_url.format(model=model).split("//")[1].split("/", 1)[1]
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", framing,
             "Connection: close"] + [f"{name}: {value}" for name, value in engine.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_an_over_limit_body_is_refused_before_it_is_read(engine):
    """Declared (800 MB) and chunked bodies over the 20 MB limit: 413 with the JSON error body,
    after a few MiB at most (what the sockets' buffers hold) for a declared one."""
    mib = b"x" * 2**20
    declared = request_head(engine, "text", "Content-Length: 800000000")
    sent, received = send_until_answered(engine, declared, (mib for _ in range(800)))
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    assert sent <= 16 * 2**20, sent
    chunked = request_head(engine, "text", "Transfer-Encoding: chunked")
    chunks = (b"%x\r\n" % len(mib) + mib + b"\r\n" for _ in range(800))
    sent, received = send_until_answered(engine, chunked, chunks)
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    assert sent <= MAX_REQUEST_BYTES + 16 * 2**20, sent
    if engine.name == "kserve_ray":  # the core's JSON error body (TorchServe's frontend has its own)
        error = json.loads(received.partition(b"\r\n\r\n")[2])
        assert error["status"] == 413 and error["grpc_code"] == "RESOURCE_EXHAUSTED"


def serving_memory(engine: Engine, kserve_ray_pid: int | None) -> int:
    """The resident memory of the processes that read the text model's requests: its workers
    (TorchServe) or every replica and the driver (the second engine)."""
    workers = engine.workers()
    pids = list(workers["text"]) if isinstance(workers, dict) else workers + [kserve_ray_pid]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def test_a_body_of_millions_of_empty_listings_is_refused_unbuilt_and_leaves_no_memory(engine, request):
    """6.6 million `{}` in 19.9 MB: json.loads would build them (+500 MB a worker, most of it
    kept); counted on the bytes instead, each is refused (413) and memory stays put."""
    driver = request.getfixturevalue("kserve_ray")["pid"] if engine.name == "kserve_ray" else None
    body = b'{"instances": [' + b"{}," * 6_600_000 + b"{}]}"
    assert len(body) < MAX_REQUEST_BYTES
    ordinary = json.dumps({"instances": [{"text": "kettle"}]}).encode()
    with ThreadPoolExecutor(4) as pool:  # every worker warm before measuring
        assert set(pool.map(lambda _: engine.v1("text", ordinary).status_code, range(8))) == {200}
    before = serving_memory(engine, driver)
    for _ in range(4):
        response = engine.v1("text", body)
        assert response.status_code == 413 and "values" in response.json()["error"], response.text[:200]
    grown = serving_memory(engine, driver) - before
    assert engine.v1("text", ordinary).status_code == 200
    # Parsed, one such body is about 500 MB in one worker. Refused unparsed, a worker still reads
    # each 20 MB body (and its allocator may keep a copy or two), which measured up to 150 MB over
    # the four: the bound sits between the two.
    assert grown < 300 * 2**20, f"{grown / 2**20:.0f} MB more after four refused bodies"


def heavy_photo(seed: int, side: int = 1700) -> str:
    """A smooth photo of about 3 megapixels that compresses small (a few hundred KB)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = (ramp[None, :, None] + ramp[:, None, None] * rng.random() + rng.integers(0, 8, (side, side, 3)))
    encoded = io.BytesIO()
    Image.fromarray((pixels % 255).astype(np.uint8)).save(encoded, "JPEG", quality=85)
    return b64(encoded.getvalue())


def test_heavy_requests_beside_ordinary_ones_are_admitted_by_cost(engine):
    """Four requests of a whole request budget each (32 photos of 3 MP) and ordinary one-photo
    requests beside them: what does not fit a batch's budget is refused at once with 503 +
    Retry-After, so the ordinary ones are answered rather than queued behind the heavy work."""
    budget = WorkBudget()
    photos = [heavy_photo(seed) for seed in range(4)]
    heavy = json.dumps({"instances": [{"images": photos * 2} for _ in range(budget.photos_per_request // 8)]})
    ordinary = json.dumps({"instances": [{"image": b64(PHOTOS[0])}]})

    def post(body: str) -> requests.Response:
        return engine.v1("image", body.encode())

    with ThreadPoolExecutor(8) as pool:
        heavy_answers = [pool.submit(post, heavy) for _ in range(4)]
        time.sleep(0.3)  # the heavy ones are waiting or running
        ordinary_answers = [pool.submit(post, ordinary) for _ in range(3)]
        heavy_answers = [answer.result() for answer in heavy_answers]
        ordinary_answers = [answer.result() for answer in ordinary_answers]
    assert [answer.status_code for answer in ordinary_answers] == [200] * 3, ordinary_answers[0].text[:200]
    codes = [answer.status_code for answer in heavy_answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for answer in heavy_answers:
        if answer.status_code == 503:
            assert answer.headers["Retry-After"] == "1" and "did not fit" in answer.json()["error"]
            assert answer.json()["grpc_code"] == "UNAVAILABLE"


def test_every_engine_answers_the_cores_status_and_body_for_each_refusal(engine):
    too_many = json.dumps({"instances": [{"images": [b64(PHOTOS[0])] * 10}] * 4}).encode()
    response = engine.v1("image", too_many)
    assert response.status_code == 413 and "photos per request" in response.json()["error"]
    response = engine.v1("image", b"x", "application/x-unknown")
    assert response.status_code == 415, response.text[:300]
    assert response.json()["error"].startswith("unsupported content type 'application/x-unknown'")
    if engine.name == "kserve_ray":  # the core's whole body (TorchServe's frontend writes its own keys)
        assert response.json()["grpc_code"] == "INVALID_ARGUMENT" and response.json()["status"] == 415


LOOPBACK_ADDRESSES = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_ray_keeps_its_files_private_its_token_explicit_and_its_ports_on_loopback(kserve_ray):
    driver = psutil.Process(kserve_ray["pid"])
    listening = [(process.name(), socket_.laddr) for process in [driver, *driver.children(recursive=True)]
                 for socket_ in process.net_connections("inet") if socket_.status == psutil.CONN_LISTEN]
    assert len(listening) >= 10  # REST, gRPC, GCS, raylet, agents, each replica...
    assert [entry for entry in listening if entry[1].ip not in LOOPBACK_ADDRESSES] == []
    state = kserve_ray["state"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    token = state / "ray_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) >= 32
    shared = [path for path in [state, *state.rglob("*")] if path.is_dir() and not path.is_symlink()
              and path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    assert not shared, shared[:5]
    # Ray's own processes (GCS, raylet), started by the driver after the server set them
    ray_processes = [child for child in psutil.Process(kserve_ray["pid"]).children(recursive=True)
                     if child.name() in ("gcs_server", "raylet")]
    assert len(ray_processes) >= 2
    for process in ray_processes:
        environment = process.environ()
        assert environment["RAY_AUTH_MODE"] == "token" and environment["RAY_AUTH_TOKEN_PATH"] == str(token)


def test_each_engine_keeps_its_own_signals_and_exporter(tmp_path):
    """Starting TorchServe empties its metrics folder only: the second engine's, in its own
    folder, keeps the counters of its running replicas, and each has its own exporter pid file."""
    second = serve.engine_state(tmp_path, "kserve_ray")
    (second / "metrics").mkdir(parents=True)
    (second / "metrics" / "counter_1.db").write_bytes(b"counts")
    serve.fresh_metrics_folder(serve.engine_state(tmp_path, "torchserve"))
    assert (second / "metrics" / "counter_1.db").read_bytes() == b"counts"
    assert serve.engine_state(tmp_path, "torchserve") / serve.EXPORTER_PID != second / serve.EXPORTER_PID


def test_every_front_door_reads_the_same_body_limit():
    properties = serve.read_properties(serve.ROOT / "config.properties")
    assert int(properties["max_request_size"]) == MAX_REQUEST_BYTES
    from marketplace_classifier.ops.proxy import ProxySettings

    assert ProxySettings().max_body == f"{MAX_REQUEST_BYTES // 2**20}m"


def test_the_second_engine_closes_a_connection_whose_request_head_stalls(kserve_ray):
    """uvicorn alone would hold a connection that drips its headers for ever."""
    with socket.create_connection(("127.0.0.1", kserve_ray["port"]), timeout=60) as held:  # deadline 10 s
        held.sendall(b"POST /v1/models/text:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        closed = b""
        with contextlib.suppress(ConnectionResetError):  # a socket timeout here: it was never closed
            closed = held.recv(65536)
        assert closed == b""
