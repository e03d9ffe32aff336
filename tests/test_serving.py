"""End to end: a real TorchServe from a test copy of config.properties, archives built from
the tiny trained models, called over REST and gRPC. The server is stopped whatever happens."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.predict import ClientError, grpc_predict, rest_predict
from tests.helpers import SERVER_BATCH_SIZE, TEXTS, as_vector, in_process, photo

pytestmark = pytest.mark.serving

@pytest.mark.parametrize("protocol", ["rest", "grpc"])
@pytest.mark.parametrize("model", ["image", "text", "combined"])
def test_served_answers_equal_the_torchscript_model(server, model, protocol):
    properties = server["properties"]
    image = photo() if model != "text" else None
    text = TEXTS[0] if model != "image" else None
    fields = {"text": text} if text else {}
    if protocol == "rest":
        answer = rest_predict(properties["inference_address"], model, image, fields, 4, server["token"])
    else:
        target = f"127.0.0.1:{properties['grpc_inference_port']}"
        answer = grpc_predict(target, model, image, fields, 4, server["token"])
    expected = in_process(server["artifacts"], model, image, text)
    served = as_vector(answer, server["artifacts"], model)
    assert served.argmax() == expected.argmax()
    assert (served - expected).abs().max() <= 1e-4
    assert len(answer["top_k"]) == 4 and answer["category"] == answer["top_k"][0]["category"]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_served_multi_photo_listing_equals_the_torchscript_answer(server, protocol):
    properties = server["properties"]
    photos = [photo(colour) for colour in ((30, 140, 60), (200, 20, 20), (20, 20, 200))]
    target = f"127.0.0.1:{properties['grpc_inference_port']}"
    for model, listing_photos in (("image", photos), ("combined", photos[:2]), ("combined", [])):
        text = TEXTS[1] if model == "combined" else None
        fields = {"text": text} if text else {}
        if protocol == "rest":
            answer = rest_predict(properties["inference_address"], model, listing_photos, fields, 3,
                                  server["token"])
        else:
            answer = grpc_predict(target, model, listing_photos, fields, 3, server["token"])
        expected = in_process(server["artifacts"], model, listing_photos, text)
        assert (as_vector(answer, server["artifacts"], model) - expected).abs().max() <= 1e-4
        assert answer["photos"] == len(listing_photos) and isinstance(answer["needs_review"], bool)
        assert ("answered_from" in answer) == (not listing_photos)


def test_concurrent_requests_are_batched(server):
    url = f"{server['properties']['inference_address']}/predictions/text"
    headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": "text/plain"}
    texts = [f"{TEXTS[i % 3]} number {i}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda t: requests.post(url, data=t.encode(), headers=headers,
                                                          timeout=60), texts))
    assert [response.status_code for response in responses] == [200] * 16
    log = (server["state"] / "logs" / "model_log.log").read_text()
    sizes = [int(size) for size in re.findall(r"batch_size=(\d+)", log)]
    assert max(sizes) > 1


def test_bad_inputs_get_4xx_while_the_good_request_in_the_batch_succeeds(server):
    url = f"{server['properties']['inference_address']}/predictions/combined"
    headers = {"Authorization": f"Bearer {server['token']}"}
    good = {"files": {"image": ("p.jpg", photo(), "image/jpeg")}, "data": {"text": "sofa"}}
    bad = [
        {"files": {"image": ("p.jpg", b"not an image", "image/jpeg")}, "data": {"text": "sofa"}},
        {"files": {"image": ("p.jpg", photo()[:500], "image/jpeg")}, "data": {"text": "sofa"}},
        {"files": {"image": ("p.jpg", photo(), "image/jpeg")}},
        {"json": {"image": "###", "text": "sofa"}},
        {"json": ["not", "an", "object"]},
        {"data": b"<xml/>", "headers": {"Content-Type": "application/xml"}},
    ]

    def send(kwargs):
        extra = kwargs.pop("headers", {})
        return requests.post(url, headers=headers | extra, timeout=60, **kwargs)

    with ThreadPoolExecutor(len(bad) + 1) as pool:
        responses = list(pool.map(send, [dict(good)] + [dict(b) for b in bad]))
    assert responses[0].status_code == 200 and "category" in responses[0].json()
    for response in responses[1:]:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]
    log = (server["state"] / "logs" / "model_log.log").read_text()
    mixed = [(int(a), int(b)) for a, b in re.findall(r"batch_size=(\d+) valid=(\d+)", log)]
    assert any(0 < valid < size for size, valid in mixed)
    ping = requests.get(f"{server['properties']['inference_address']}/ping", headers=headers, timeout=10)
    assert ping.json()["status"] == "Healthy"


def test_requests_without_the_token_are_refused(server):
    properties = server["properties"]
    response = requests.post(f"{properties['inference_address']}/predictions/text", data=b"kettle",
                             headers={"Content-Type": "text/plain"}, timeout=30)
    assert 400 <= response.status_code < 500 and "Token Authorization failed" in response.text
    with pytest.raises(ClientError, match="PERMISSION_DENIED"):
        grpc_predict(f"127.0.0.1:{properties['grpc_inference_port']}", "text", None,
                     {"text": "kettle"}, 3, "wrong-token")


def test_model_registration_api_is_off(server):
    url = f"{server['properties']['management_address']}/models?url=https://example.com/x.mar"
    token = serve.read_key(server["state"] / "key_file.json", "management")
    response = requests.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code >= 400


def test_client_cli_prints_the_answer_or_one_error_line(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = server["state"].parent / "config.properties"
    command = Path(sys.executable).parent / "marketplace-classifier"  # the installed entry point
    common = [str(command), "predict", "--config", str(config),
              "--key-file", str(server["state"] / "key_file.json")]
    (tmp_path / "photo.jpg").write_bytes(photo())
    for protocol in ("rest", "grpc"):
        done = subprocess.run(common + ["--model", "combined", "--image", str(tmp_path / "photo.jpg"),
                                        "--text", "oak table", "--protocol", protocol, "--top-k", "2"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert len(answer["top_k"]) == 2 and "probabilities" not in answer
    explained = subprocess.run(common + ["--model", "text", "--text", "oak table", "--explain"],
                               capture_output=True, text=True, timeout=120)
    assert explained.returncode == 0, explained.stderr
    lexical = json.loads(explained.stdout)["explanation"]["text"]["lexical"]
    assert lexical["terms"] and f"{lexical['terms'][0]['term']} (" in explained.stderr.split("why: ")[1]
    empty = subprocess.run(common + ["--model", "text", "--text", "   "], capture_output=True,
                           text=True, timeout=120)  # refused by the client, before anything is sent
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines() == [
        "error: a listing needs text, a name, a description or at least one photo"]
    refused = subprocess.run(common + ["--model", "text", "--text", "kettle", "--top-k", "0"],
                             capture_output=True, text=True, timeout=120)  # refused by the server
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HTTP 400: ") and "top_k" in lines[0], lines


def test_oversized_requests_are_refused_and_the_server_stays_healthy(server):
    properties = server["properties"]
    headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": "image/jpeg"}
    limit = int(properties["max_request_size"])
    response = requests.post(f"{properties['inference_address']}/predictions/image",
                             data=b"\xff\xd8\xff" + bytes(limit + 1024), headers=headers, timeout=60)
    assert response.status_code == 413
    ping = requests.get(f"{properties['inference_address']}/ping", headers=headers, timeout=10)
    assert ping.json()["status"] == "Healthy"
    answer = rest_predict(properties["inference_address"], "image", photo(), {}, 3, server["token"])
    assert answer["category"]


def test_wrong_token_is_refused_and_the_key_file_is_private(server):
    response = requests.post(f"{server['properties']['inference_address']}/predictions/text",
                             data=b"kettle", timeout=30,
                             headers={"Content-Type": "text/plain", "Authorization": "Bearer nope"})
    assert 400 <= response.status_code < 500 and "Token Authorization failed" in response.text
    assert (server["state"] / "key_file.json").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- faults (these run last: they
# kill a worker and restart the server)
def model_workers(server, model: str) -> list[dict]:
    token = serve.read_key(server["state"] / "key_file.json", "management")
    url = f"{server['properties']['management_address']}/models/{model}"
    return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).json()[0]["workers"]


def test_a_killed_worker_is_restarted_and_no_request_hangs(server):
    import os
    import signal
    import time

    before = model_workers(server, "text")
    old_pid = before[0]["pid"]
    url = f"{server['properties']['inference_address']}/predictions/text"
    headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": "text/plain"}
    timeout = 30  # these answers take well under a second; a dropped one must not hold the suite

    def send(index: int):
        time.sleep(index * 0.05)
        try:
            return requests.post(url, data=f"kettle {index}".encode(), headers=headers,
                                 timeout=timeout).status_code
        except requests.RequestException as error:
            return type(error).__name__

    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(send, i) for i in range(40)]
        time.sleep(0.3)
        os.kill(old_pid, signal.SIGKILL)
        outcomes = [future.result() for future in pending]  # every request ends: none hangs
    # TorchServe 0.12 answers the killed worker's batch with a 5xx, except the jobs its thread was
    # still collecting for the next batch: those it drops, and only the client's timeout ends them
    # (at most one batch of them).
    timed_out = [outcome for outcome in outcomes if outcome == "ReadTimeout"]
    assert len(timed_out) <= SERVER_BATCH_SIZE, outcomes
    assert all(outcome == 200 or isinstance(outcome, int) and outcome >= 500
               for outcome in outcomes if outcome != "ReadTimeout"), outcomes
    def restarted(workers: list[dict]) -> bool:
        return len(workers) == len(before) and old_pid not in [worker["pid"] for worker in workers] \
            and all(worker["status"] == "READY" for worker in workers)

    started = time.monotonic()
    while time.monotonic() - started < 180 and not restarted(workers := model_workers(server, "text")):
        time.sleep(1)
    assert restarted(workers), workers
    resumed = requests.post(url, data=b"kettle", headers=headers, timeout=timeout)
    assert resumed.status_code == 200 and resumed.json()["category"]
    print(f"killed worker: {outcomes.count(200)}/40 answered, {len(timed_out)} dropped, "
          f"answers resumed {time.monotonic() - started:.1f}s after the batch ended")


def test_stop_and_start_under_load_refuses_but_never_answers_wrong(server):
    import hashlib
    import threading
    import time

    store = server["artifacts"].parent / "model_store"
    files = sorted(store.glob("*.mar")) + [server["state"].parent / "config.properties"]
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    text = "oak dining table"
    expected = in_process(server["artifacts"], "text", None, text)
    url = f"{server['properties']['inference_address']}/predictions/text"
    outcomes, stop = [], threading.Event()

    def load():
        while not stop.is_set() and len(outcomes) < 2000:
            try:
                token = serve.read_key(server["state"] / "key_file.json")
                response = requests.post(url, data=text.encode(), timeout=30, headers={
                    "Authorization": f"Bearer {token}", "Content-Type": "text/plain"})
                outcomes.append(("answer", response.status_code, response.content))
            except (requests.ConnectionError, serve.ServeError, ValueError, KeyError):
                outcomes.append(("refused", None, b""))
                time.sleep(0.1)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        server["engine"].stop()
        time.sleep(1)
        server["engine"].start()
        server["token"] = serve.read_key(server["state"] / "key_file.json")
        time.sleep(1)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert any(kind == "refused" for kind, _, _ in outcomes)
    answered = [json.loads(body) for kind, code, body in outcomes if kind == "answer" and code == 200]
    assert answered
    for answer in answered:
        assert (as_vector(answer, server["artifacts"], "text") - expected).abs().max() <= 1e-4
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files} == before
