"""The Python client (marketplace_classifier/client/): typed answers equal to the in-process model on
both engines, one exception per refusal carrying the server's message, 503 retried after its
Retry-After, lost connections retried with a limit, and the CLI that uses it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from marketplace_classifier.client import (
    BadRequest,
    Classification,
    Client,
    Listing,
    ModelNotFound,
    PayloadTooLarge,
    ServerUnreachable,
    ServiceUnavailable,
    Unauthorized,
)
from marketplace_classifier.client.errors import ERRORS_BY_STATUS, error_for
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import ordinary_photo
from marketplace_classifier.serving.budget import WorkBudget
from tests.helpers import ROOT, TEXTS, in_process_path, same_path

PHOTOS = [ordinary_photo(seed) for seed in range(2)]
ANSWER = {
    "category": "Toys",
    "probability": 0.9,
    "needs_review": False,
    "top_k": [{"category": "Toys", "probability": 0.9}],
    "path": [{"name": "Toys", "probability": 0.9}, {"name": "Games", "probability": 0.8}],
    "confident_depth": 2,
    "model_version": "2.0",
    "probabilities": {"Toys": 0.9, "Other": 0.1},
}


# ---------------------------------------------------------------- without a server
class Scripted(BaseHTTPRequestHandler):
    """A server that answers from a script: (status, headers, body) per request, in order."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        status, headers, answer = self.script.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def scripted():
    Scripted.script, Scripted.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", Scripted
    server.shutdown()


def test_a_503_is_retried_after_the_servers_retry_after_and_then_answered(scripted):
    url, handler = scripted
    handler.script = [
        (503, {"Retry-After": "7"}, {"error": "full", "status": 503}),
        (503, {"Retry-After": "2"}, {"error": "full", "status": 503}),
        (200, {}, {"predictions": [ANSWER]}),
    ]
    waits = []
    client = Client(url, "text", token="secret", api="torchserve", sleep=waits.append)
    answer = client.classify(text="lego set")
    assert waits == [7.0, 2.0]
    assert answer.path_names == ["Toys", "Games"] and answer.confident_path == ["Toys", "Games"]
    assert answer.model_version == "2.0" and answer.probabilities["Other"] == 0.1
    assert [seen[0] for seen in handler.seen] == ["/predictions/text"] * 3
    assert handler.seen[0][1] == "Bearer secret" and handler.seen[0][2] == {
        "instances": [{"text": "lego set"}]
    }


def test_a_503_that_outlasts_the_retries_raises_with_the_servers_message(scripted):
    url, handler = scripted
    handler.script = [(503, {"Retry-After": "100"}, {"error": "the batch budget was full"})] * 3
    waits = []
    client = Client(url, "text", api="kserve", retries=2, max_retry_wait=5, sleep=waits.append)
    with pytest.raises(ServiceUnavailable, match="the batch budget was full") as raised:
        client.classify(text="x")
    assert waits == [5, 5] and raised.value.retry_after == 100  # capped by max_retry_wait
    assert handler.seen[0][0] == "/v1/models/text:predict"


def test_a_lost_connection_is_retried_with_backoff_up_to_the_limit():
    waits = []
    client = Client(
        f"http://127.0.0.1:{serve.free_port()}",
        "text",
        api="torchserve",
        retries=3,
        timeout=2,
        sleep=waits.append,
    )
    with pytest.raises(ServerUnreachable, match="after 4 tries"):
        client.classify(text="kettle")
    assert waits == [1.0, 2.0, 4.0]


def test_each_refusal_status_has_its_exception_and_keeps_the_message():
    for status, cls in ERRORS_BY_STATUS.items():
        error = error_for(status, {"error": f"reason {status}"})
        assert type(error) is cls and error.status == status and f"reason {status}" in str(error)
    assert type(error_for(502, {"message": "bad gateway"})).__name__ == "ServerError"
    token = error_for(400, {"message": "Token Authorization failed. Token either incorrect"})
    assert isinstance(token, Unauthorized) and token.status == 400  # TorchServe's answer to a wrong token


def test_a_refused_listing_is_isolated_and_its_batch_mates_answered(scripted):
    url, handler = scripted
    handler.script = [
        (400, {}, {"error": "instance 1: photo 1 of 1: not an image"}),
        (200, {}, {"predictions": [ANSWER]}),
        (400, {}, {"error": "photo 1 of 1: not an image"}),
        (200, {}, {"predictions": [ANSWER]}),
    ]
    client = Client(url, "image", api="torchserve")
    listings = [Listing(text="a"), Listing(images=(b"junk",)), Listing(text="c")]
    answers = client.classify_many(listings, errors="return")
    assert isinstance(answers[0], Classification) and isinstance(answers[2], Classification)
    assert isinstance(answers[1], BadRequest) and "not an image" in answers[1].message
    assert [len(seen[2]["instances"]) for seen in handler.seen] == [3, 1, 1, 1]


def test_an_empty_listing_is_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="needs text"):
        Listing(text="   ")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "marketplace_classifier.ops.predict",
            "--model",
            "text",
            "--url",
            f"http://127.0.0.1:{serve.free_port()}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "needs text" in run.stderr and "Traceback" not in run.stderr


def test_the_client_imports_no_torch():
    code = "import sys, marketplace_classifier.client; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


# ---------------------------------------------------------------- against both engines
@pytest.fixture(scope="module", params=["torchserve", "kserve_ray"])
def engine_client(request):
    if request.param == "torchserve":
        server = request.getfixturevalue("server")
        url, options = (
            server["properties"]["inference_address"],
            {"key_file": server["state"] / "key_file.json"},
        )
    else:
        url, options = request.getfixturevalue("kserve_ray")["base"], {}
    return request.param, url, options


@pytest.mark.serving
@pytest.mark.engines
def test_answers_equal_the_in_process_model_and_refusals_are_typed(engine_client, artifacts):
    name, url, options = engine_client
    with Client(url, "combined", timeout=120, **options) as client:
        assert client.resolved_api() == ("torchserve" if name == "torchserve" else "kserve")
        answers = client.classify_many(
            [Listing.of(TEXTS[0], PHOTOS), Listing.of(TEXTS[1]), Listing.of(TEXTS[2], PHOTOS[:1])],
            concurrency=2,
        )
        for answer, (text, photos) in zip(
            answers, [(TEXTS[0], PHOTOS), (TEXTS[1], []), (TEXTS[2], PHOTOS[:1])], strict=True
        ):
            expected = in_process_path(artifacts, "combined", photos, text)
            served = [{"name": level.name, "probability": level.probability} for level in answer.path]
            assert same_path(served, expected), (served, expected)
        mixed = client.classify_many(
            [Listing.of(TEXTS[2]), Listing(images=(b"not a photo",), text="x")], errors="return"
        )
        assert isinstance(mixed[0], Classification)
        assert isinstance(mixed[1], BadRequest) and "photo 1 of 1" in mixed[1].message
        with pytest.raises(PayloadTooLarge, match="photos per request"):
            client.classify_chunk([Listing(images=(PHOTOS[0],) * 10, text="x")] * 4)
    with Client(url, "no_such_model", **options) as client, pytest.raises(ModelNotFound):
        client.classify(text="kettle")
    if name == "torchserve":
        with Client(url, "text", token="wrong") as client, pytest.raises(Unauthorized):
            client.classify(text="kettle")


@pytest.mark.serving
@pytest.mark.engines
def test_requests_refused_with_503_are_answered_after_retry_after(engine_client):
    """Heavy requests (a whole request budget each) at once: the ones that do not fit a batch are
    refused with 503 + Retry-After: 1, and the client sends them again after that second."""
    from tests.test_engines import heavy_photo

    name, url, options = engine_client
    budget = WorkBudget()
    import base64

    photos = tuple(base64.b64decode(heavy_photo(seed)) for seed in range(4))
    heavy = [Listing(images=photos * 2) for _ in range(budget.photos_per_request // 8)]
    waits: list[float] = []

    def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        threading.Event().wait(seconds)

    with (
        Client(
            url,
            "image",
            timeout=300,
            retries=6,
            listings_per_request=64,
            max_request_bytes=19 * 2**20,  # one request a call, each a whole request budget
            sleep=recorded_sleep,
            **options,
        ) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        answers = list(pool.map(lambda _: client.classify_many(heavy), range(4)))
    assert all(len(batch) == len(heavy) for batch in answers)
    assert 1.0 in waits, waits  # at least one 503, retried after the server's Retry-After


@pytest.mark.serving
@pytest.mark.engines
def test_the_grpc_client_answers_as_the_http_client_on_each_engine(engine_client, request):
    """GrpcClient over TorchServe's Predictions and the second engine's ModelInfer: the same typed
    answers as over HTTP (listings of different photo counts in one request, a listing's own
    min_confidence), a bad listing isolated with its reason, an unknown model and a wrong token
    as their exceptions."""
    from marketplace_classifier.client.grpc import GrpcClient

    name, url, options = engine_client
    if name == "torchserve":
        properties = request.getfixturevalue("server")["properties"]
        target, api = f"127.0.0.1:{properties['grpc_inference_port']}", "torchserve"
    else:
        target, api = request.getfixturevalue("kserve_ray")["grpc"], "kserve"
    listings = [Listing.of(TEXTS[0], PHOTOS), Listing.of(TEXTS[1], PHOTOS[:1]), Listing.of(TEXTS[2]),
                Listing.of(name="Oak table", description="seats six", top_k=2),
                Listing.of("running shoes size 42", min_confidence=0.99)]
    with Client(url, "combined", timeout=120, **options) as http, \
            GrpcClient(target, "combined", timeout=120, **options) as grpc_client:
        assert grpc_client.ready()
        over_http, over_grpc = http.classify_many(listings), grpc_client.classify_many(listings)
        assert grpc_client.api == api
        for served, expected in zip(over_grpc, over_http, strict=True):
            assert served.path_names == expected.path_names and served.category == expected.category
            assert served.confident_depth == expected.confident_depth
            assert served.probability == pytest.approx(expected.probability, abs=1e-5)
            assert [choice.category for choice in served.top_k] == [c.category for c in expected.top_k]
        assert len(over_grpc[3].top_k) == 2
        mixed = grpc_client.classify_many([Listing.of(TEXTS[2]), Listing(images=(b"not a photo",), text="x")],
                                          errors="return")
        assert isinstance(mixed[0], Classification)
        assert isinstance(mixed[1], BadRequest) and "photo 1 of 1" in mixed[1].message
    with GrpcClient(target, "no_such_model", api=api, **options) as grpc_client, pytest.raises(ModelNotFound):
        grpc_client.classify(text="kettle")
    if name == "torchserve":
        with GrpcClient(target, "text", token="wrong") as grpc_client, pytest.raises(Unauthorized):
            grpc_client.classify(text="kettle")
    with GrpcClient(f"127.0.0.1:{serve.free_port()}", "text", retries=1, sleep=lambda _: None) as nowhere:
        assert not nowhere.ready()
        with pytest.raises(ServerUnreachable):
            nowhere.classify(text="kettle")
