"""The outside test's findings against a real TorchServe: every trigger sent inside batches of
good requests; the good ones must get their right answers and no worker may die."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import round_one, triggers
from marketplace_classifier.ops.predict import ClientError, grpc_predict, grpc_stubs
from tests.helpers import TEXTS, as_vector, in_process, photo

pytestmark = pytest.mark.serving

STANDARD_PHRASES = {"Bad Request", "Unsupported Media Type", "Request Entity Too Large",
                    "Payload Too Large", "Service Unavailable"}
TRIGGERS = {name: (t.model, t.body, t.content_type) for name, t in round_one().items()}
ROUND_TWO = triggers()


def workers(server) -> dict[str, list[int]]:
    return serve.worker_pids(server["properties"], server["state"] / "key_file.json", ["image", "text"])


def post(server, model: str, body: bytes, content_type: str | bytes) -> requests.Response:
    url = f"{server['properties']['inference_address']}/predictions/{model}"
    headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": content_type}
    return requests.post(url, data=body, headers=headers, timeout=120)


def test_every_trigger_is_refused_inside_a_batch_whose_good_requests_succeed(server):
    before = workers(server)
    good = [("text", text.encode(), "text/plain") for text in TEXTS * 3] + \
        [("image", photo(), "image/jpeg")] * 3 + [("text", b"kettle " * 2_200_000, "text/plain")]
    jobs = list(TRIGGERS.values()) + good
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: post(server, *job), jobs))
    for name, response in zip(TRIGGERS, responses, strict=False):
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        assert response.reason in STANDARD_PHRASES, (name, response.reason[:100])
        assert response.json()["error"].isascii() and len(response.text) < 2000, name
    for (model, body, _), response in zip(good, responses[len(TRIGGERS):], strict=True):
        assert response.status_code == 200, response.text[:300]
        expected = in_process(server["artifacts"], model, body if model == "image" else None,
                              body.decode() if model == "text" else None)
        assert (as_vector(response.json(), server["artifacts"], model) - expected).abs().max() <= 1e-4
    assert workers(server) == before  # no worker died


def test_the_messages_say_what_was_wrong(server):
    assert "PDF document" in post(server, *TRIGGERS["PDF to the image model"]).json()["error"]
    assert "SVG" in post(server, *TRIGGERS["SVG to the image model"]).json()["error"]
    assert "nested deeper" in post(server, *TRIGGERS["v2 nested 900 deep"]).json()["error"]
    # counted on the body's bytes before anything parses it
    assert "values; a request holds at most" in post(server, *TRIGGERS["v2 5 M rows"]).json()["error"]
    long_key = post(server, *TRIGGERS["100 KB key"]).json()["error"]
    assert "100000 characters" in long_key and len(long_key) < 400


def test_a_long_text_answers_as_its_cut_does(server):
    text = "kettle " * 2_200_000
    cut = post(server, "text", text[:10_000].encode(), "text/plain")
    whole = post(server, "text", text.encode(), "text/plain")
    assert whole.status_code == cut.status_code == 200
    assert whole.json()["probabilities"] == cut.json()["probabilities"]


def test_grpc_stream_predictions_answers_and_keeps_the_worker(server):
    before = workers(server)
    messages, services = grpc_stubs()
    target = f"127.0.0.1:{server['properties']['grpc_inference_port']}"
    metadata = [("authorization", f"Bearer {server['token']}")]
    with grpc.insecure_channel(target) as channel:
        stub = services.InferenceAPIsServiceStub(channel)
        for _ in range(3):
            request = messages.PredictionsRequest(model_name="text", input={"text": b"oak table"})
            replies = list(stub.StreamPredictions(request, metadata=metadata, timeout=60))
            assert len(replies) == 1 and json.loads(replies[0].prediction)["category"]
        refused = messages.PredictionsRequest(model_name="text", input={"tëxt": b"oak"})
        body = json.loads(list(stub.StreamPredictions(refused, metadata=metadata, timeout=60))[0]
                          .prediction)
        assert body["status"] == 400 and body["grpc_code"] == "INVALID_ARGUMENT"
    time.sleep(1)
    assert workers(server) == before


def test_grpc_client_raises_the_refusal_code(server):
    target = f"127.0.0.1:{server['properties']['grpc_inference_port']}"
    with pytest.raises(ClientError, match="INVALID_ARGUMENT: text is empty"):
        grpc_predict(target, "text", None, {"text": "   "}, 3, server["token"])
    with pytest.raises(ClientError, match="gRPC"):
        grpc_predict(target, "no-such-model", None, {"text": "a"}, 3, server["token"])


def test_handler_metrics_reach_the_metrics_endpoint(server):
    for text in TEXTS:
        assert post(server, "text", text.encode(), "text/plain").status_code == 200
    metrics = requests.get(f"{server['properties']['metrics_address']}/metrics", timeout=10).text
    for name in ("HandlerTime", "PredictionTime", "RequestsPerBatch", "ListingsPerBatch"):
        lines = [line for line in metrics.splitlines()
                 if line.startswith(name) and 'ModelName="text"' in line]
        assert lines, name
        assert float(lines[0].rsplit(" ", 1)[1]) > 0, lines[0]


# ---------------------------------------------------------------- round 2: work, not bytes
def test_round_two_triggers_are_refused_inside_batches_whose_good_requests_succeed(server):
    before = workers(server)
    good = [("text", text.encode(), "text/plain") for text in TEXTS * 2] + \
        [("image", photo(), "image/jpeg")] * 4
    jobs = [(t.model, t.body, t.content_type) for t in ROUND_TWO.values()] + good
    with ThreadPoolExecutor(8) as pool:  # in batches of up to 8, triggers and good requests mixed
        responses = list(pool.map(lambda job: post(server, *job), jobs))
    for (name, trigger), response in zip(ROUND_TWO.items(), responses, strict=False):
        assert response.status_code in trigger.expected, (name, response.status_code, response.text[:200])
        assert response.reason in STANDARD_PHRASES and response.json()["error"].isascii(), name
    for (model, body, _), response in zip(good, responses[len(ROUND_TWO):], strict=True):
        assert response.status_code == 200, response.text[:300]
        expected = in_process(server["artifacts"], model, body if model == "image" else None,
                              body.decode() if model == "text" else None)
        assert (as_vector(response.json(), server["artifacts"], model) - expected).abs().max() <= 1e-4
    assert workers(server) == before


@pytest.mark.parametrize(("name", "says"), [
    ("progressive JPEG repeating one scan", "3010 scans; at most 32"),
    ("3 KB of 7070x7070 WebPs, v1 5 x 10", "50 photos in one request; the work budget is 32"),
    ("v1 32 listings x 10 ordinary photos", "320 photos in one request"),
    ("5,000-digit top_k", "number in it is too long"),
    ("v1 b64 nested 985 deep", "nested"),  # the handler parses the JSON (below the worker's frames)
    ("PSD file to the image model", "Photoshop (PSD) file, not a photo"),
    ("EPS file to the image model", "PostScript (EPS) file, not a photo"),
])
def test_round_two_refusals_name_what_was_wrong(server, name, says):
    trigger = ROUND_TWO[name]
    response = post(server, trigger.model, trigger.body, trigger.content_type)
    assert says in response.json()["error"], response.text[:300]


def test_a_title_that_begins_with_a_bracket_is_text(server):
    title = "[NEW] PS5 console two pads"
    response = post(server, "text", title.encode(), "text/plain")
    assert response.status_code == 200, response.text[:200]
    expected = in_process(server["artifacts"], "text", None, title)
    assert (as_vector(response.json(), server["artifacts"], "text") - expected).abs().max() <= 1e-4


def test_the_query_string_never_replaces_the_body(server):
    url = f"{server['properties']['inference_address']}/predictions/text"
    headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": "text/plain"}
    with_query = requests.post(url + "?text=Oak+sofa&top_k=13", data=b"PS5 console", headers=headers,
                               timeout=60)
    plain = requests.post(url, data=b"PS5 console", headers=headers, timeout=60)
    # TorchServe 0.12 drops the query string before the handler; the proxy refuses it (test_proxy.py)
    assert with_query.status_code == plain.status_code == 200
    assert with_query.json() == plain.json() and len(plain.json()["top_k"]) == 3


def test_a_part_without_a_usable_name_is_the_frontends_answer_and_harms_no_worker(server):
    before = workers(server)
    url = f"{server['properties']['inference_address']}/predictions/text"
    response = requests.post(url, files={"\x00": (None, "PS5 console")}, timeout=60,
                             headers={"Authorization": f"Bearer {server['token']}"})
    # Netty's multipart decoder refuses the name before any worker sees the request: TorchServe
    # 0.12 answers 500 with a JSON body (SECURITY.md, "frontend defects"); nothing runs.
    assert response.json()["type"] == "ErrorDataDecoderException"
    assert workers(server) == before
