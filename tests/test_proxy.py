"""nginx in front of a real TorchServe and of the second engine (ops/proxy.py, deploy/nginx/):
the frontend defects no handler can fix, replayed through it. TorchServe alone fails each of the
TorchServe tests."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import socket
import time
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import empty_pb2

from marketplace_classifier.client import Client, Unauthorized
from marketplace_classifier.ops import proxy as nginx
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.predict import ClientError, grpc_predict, grpc_stubs
from tests.helpers import TEXTS, as_vector, in_process, photo

pytestmark = pytest.mark.serving
SOCKET_TIMEOUT = 30  # a bound on a hung test, not a measurement


@pytest.fixture(scope="module")
def proxied(server):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (make test installs nginx-light where it runs as root)")
    settings = nginx.ProxySettings(listen=f"127.0.0.1:{serve.free_port()}",
                                   grpc_listen=f"127.0.0.1:{serve.free_port()}",
                                   max_connections=4, client_timeout=3)
    nginx.start(nginx.torchserve_upstream(server["config"], server["state"]), server["state"], settings)
    try:
        host, port = settings.listen.split(":")
        yield server | {"address": (host, int(port)), "rest": f"http://{settings.listen}",
                        "grpc": settings.grpc_listen, "settings": settings}
    finally:
        nginx.stop(server["state"])


def exchange(address: tuple[str, int], data: bytes, stop_after: int | None = None) -> bytes:
    """Send raw bytes, read until the proxy closes (or `stop_after` responses have arrived)."""
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(data)
        received = b""
        while stop_after is None or received.count(b"HTTP/1.1 ") < stop_after or not complete(received):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def complete(received: bytes) -> bool:
    """Whether the last response read so far has its whole body (Content-Length)."""
    head, _, body = received.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    length = [line.split(b":")[1] for line in head.split(b"\r\n")
              if line.lower().startswith(b"content-length")]
    return bool(length) and len(body) >= int(length[0])


def http(path: str, body: bytes, content_type: str, token: str | None, extra: str = "",
         close: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"] + ([f"Authorization: Bearer {token}"] if token else [])
    lines += [extra] if extra else []
    lines += ["Connection: close"] if close else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def statuses(received: bytes) -> list[int]:
    return [int(part[:3]) for part in received.split(b"HTTP/1.1 ")[1:]]


def bodies(received: bytes) -> list[dict]:
    return [json.loads(part.partition(b"\r\n\r\n")[2]) for part in received.split(b"HTTP/1.1 ")[1:]]


def test_answers_through_the_proxy_equal_the_torchscript_model(proxied):
    headers = {"Authorization": f"Bearer {proxied['token']}"}
    answer = requests.post(f"{proxied['rest']}/predictions/text", data=TEXTS[0].encode(), timeout=60,
                           headers=headers | {"Content-Type": "text/plain"}).json()
    expected = in_process(proxied["artifacts"], "text", None, TEXTS[0])
    assert (as_vector(answer, proxied["artifacts"], "text") - expected).abs().max() <= 1e-4
    grpc = grpc_predict(proxied["grpc"], "image", photo(), {}, 3, proxied["token"])
    expected = in_process(proxied["artifacts"], "image", photo(), None)
    assert (as_vector(grpc, proxied["artifacts"], "image") - expected).abs().max() <= 1e-4


def test_pipelined_requests_are_answered_in_order(proxied):
    token = proxied["token"]
    for _ in range(3):
        pipeline = http("/predictions/image", photo(), "image/jpeg", token) + \
            http("/predictions/text", b"oak dining table", "text/plain", token)
        answers = bodies(exchange(proxied["address"], pipeline, stop_after=2))
        assert "photos" in answers[0] and "photos" not in answers[1]
    # an error answer in the middle neither resets the connection nor drops what follows
    pipeline = http("/predictions/image", b"%PDF-1.7", "application/octet-stream", token) + \
        http("/predictions/text", b"kettle", "text/plain", token) + \
        http("/predictions/text", b"", "text/plain", None)
    received = exchange(proxied["address"], pipeline, stop_after=3)
    assert statuses(received) == [400, 200, 401]
    assert "PDF" in bodies(received)[0]["error"] and bodies(received)[1]["category"]


def test_a_tokenless_upload_is_refused_before_its_body_is_read(proxied):
    head = http("/predictions/image", b"", "image/jpeg", None).replace(b"Content-Length: 0",
                                                                      b"Content-Length: 19000000")
    with socket.create_connection(proxied["address"], timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(head + bytes(1_000_000))  # then stalls: 18 MB never come
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401") and b"missing or wrong token" in answer


def test_form_bodies_and_query_strings_are_refused_before_the_body(proxied):
    token = proxied["token"]
    head = http("/predictions/text", b"", "application/x-www-form-urlencoded", token).replace(
        b"Content-Length: 0", b"Content-Length: 6000000")
    with socket.create_connection(proxied["address"], timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(head)  # no body at all
        assert connection.recv(65536).startswith(b"HTTP/1.1 415")
    received = exchange(proxied["address"], http("/predictions/text?text=Oak+sofa", b"PS5 console",
                                                 "text/plain", token, close=True))
    assert statuses(received) == [400] and "query string" in bodies(received)[0]["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/workflows?url=http://example.invalid/w.war"), ("GET", "/models"), ("GET", "/metrics"),
    ("OPTIONS", "/"), ("GET", "/api-description"), ("POST", "/v2/models/text/infer"),
    ("POST", "/wfpredict/text"), ("POST", "/predictions/no-such-model"), ("POST", "/explanations/text"),
])
def test_only_ping_and_predictions_are_reachable(proxied, method, path):
    response = requests.request(method, proxied["rest"] + path, timeout=30,
                                headers={"Authorization": f"Bearer {proxied['token']}"})
    assert response.status_code == 404 and response.json()["status"] == 404


def test_request_smuggling_tricks_are_refused(proxied):
    token = proxied["token"]
    chunked = http("/predictions/text", b"3\r\nabc\r\n0\r\n\r\n", "text/plain", token,
                   extra="Transfer-Encoding: chunked, gzip").replace(b"Content-Length: 15\r\n", b"")
    assert statuses(exchange(proxied["address"], chunked)) == [501]
    signed = http("/predictions/text", b"PS5 console", "text/plain", token).replace(
        b"Content-Length: 11", b"Content-Length: +11")
    assert statuses(exchange(proxied["address"], signed)) == [400]
    bare_lf = http("/predictions/text", b"PS5 console", "text/plain", token).replace(b"\r\n", b"\n") + \
        http("/predictions/text", b"kettle", "text/plain", token, close=True)
    received = exchange(proxied["address"], bare_lf)
    assert statuses(received) == [200, 200]  # read as two requests, each framed by nginx


def test_bodies_over_the_cap_are_refused_with_json(proxied):
    response = requests.post(f"{proxied['rest']}/predictions/text", data=bytes(21_000_000), timeout=60,
                             headers={"Authorization": f"Bearer {proxied['token']}",
                                      "Content-Type": "text/plain"})
    assert response.status_code == 413 and response.json()["grpc_code"] == "RESOURCE_EXHAUSTED"


def test_connections_per_client_are_capped(proxied):
    limit = proxied["settings"].max_connections
    head = http("/predictions/text", b"", "text/plain", proxied["token"]).replace(
        b"Content-Length: 0", b"Content-Length: 1000")
    held = [socket.create_connection(proxied["address"], timeout=SOCKET_TIMEOUT) for _ in range(limit)]
    try:
        for connection in held:
            connection.sendall(head + b"x" * 10)  # a body still being sent: the request is in progress
        received = exchange(proxied["address"], http("/predictions/text", b"kettle", "text/plain",
                                                     proxied["token"], close=True))
        assert statuses(received) == [429] and "too many connections" in bodies(received)[0]["error"]
    finally:
        for connection in held:
            connection.close()


def test_a_stalled_client_is_dropped(proxied):
    with socket.create_connection(proxied["address"], timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(b"POST /predictions/text HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
        assert connection.recv(65536) == b""  # closed by the proxy's client_timeout (3 s here)


def test_grpc_through_the_proxy_needs_the_token_and_only_predicts(proxied):
    with pytest.raises(ClientError, match="UNAUTHENTICATED"):
        grpc_predict(proxied["grpc"], "text", None, {"text": "kettle"}, 3, None)
    answer = grpc_predict(proxied["grpc"], "text", None, {"text": "kettle"}, 3, proxied["token"])
    assert answer["category"]
    _, services = grpc_stubs()
    with grpc.insecure_channel(proxied["grpc"]) as channel:
        ping = services.InferenceAPIsServiceStub(channel).Ping
        with pytest.raises(grpc.RpcError) as refused:
            ping(empty_pb2.Empty(), timeout=30, metadata=[("authorization", f"Bearer {proxied['token']}")])
    assert refused.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)


def test_reload_keeps_serving(proxied):
    nginx.reload(nginx.torchserve_upstream(proxied["config"], proxied["state"]), proxied["state"],
                 proxied["settings"])
    response = requests.post(f"{proxied['rest']}/predictions/text", data=b"kettle", timeout=60,
                             headers={"Authorization": f"Bearer {proxied['token']}",
                                      "Content-Type": "text/plain"})
    assert response.status_code == 200


# ---------------------------------------------------------------- the same proxy in front of either engine
@pytest.fixture(scope="module", params=["torchserve", "kserve_ray"])
def fronted(request):
    """The shipped template rendered for one engine, with a short header timeout."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (make test installs nginx-light where it runs as root)")
    if request.param == "torchserve":
        server = request.getfixturevalue("server")
        state = server["state"] / "front"
        upstream = nginx.torchserve_upstream(server["config"], server["state"])
        predict = ("/predictions/text", b"kettle", "text/plain")
    else:
        engine = request.getfixturevalue("kserve_ray")
        state = engine["state"] / "front"
        upstream = nginx.kserve_ray_upstream(f"127.0.0.1:{engine['port']}", engine["grpc"],
                                             ["image", "text", "combined"], state)
        predict = ("/v1/models/text:predict", json.dumps({"instances": [{"text": "kettle"}]}).encode(),
                   "application/json")
    settings = nginx.ProxySettings(listen=f"127.0.0.1:{serve.free_port()}",
                                   grpc_listen=f"127.0.0.1:{serve.free_port()}", header_timeout=20)
    nginx.start(upstream, state, settings)
    try:
        host, port = settings.listen.split(":")
        yield {"engine": request.param, "address": (host, int(port)), "rest": f"http://{settings.listen}",
               "token": upstream.client_token, "predict": predict, "settings": settings}
    finally:
        nginx.stop(state)


def predicted(fronted) -> requests.Response:
    path, body, content_type = fronted["predict"]
    headers = {"Authorization": f"Bearer {fronted['token']}", "Content-Type": content_type}
    return requests.post(fronted["rest"] + path, data=body, timeout=60, headers=headers)


def test_the_proxy_answers_ping_without_a_token_and_predictions_only_with_it(fronted):
    ping = requests.get(fronted["rest"] + "/ping", timeout=30)
    assert ping.status_code == 200, ping.text[:200]
    assert predicted(fronted).status_code == 200
    path, body, content_type = fronted["predict"]
    refused = requests.post(fronted["rest"] + path, data=body, timeout=60,
                            headers={"Content-Type": content_type})
    assert refused.status_code == 401 and refused.json()["grpc_code"] == "UNAUTHENTICATED"


def hold_half_sent(address: tuple[str, int], count: int, sources: int) -> list[socket.socket]:
    """`count` connections from `sources` loopback addresses, each with an unfinished request head."""
    held = []
    for index in range(count):
        connection = socket.socket()
        connection.bind((f"127.0.0.{2 + index % sources}", 0))
        connection.settimeout(SOCKET_TIMEOUT)
        connection.connect(address)
        connection.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        held.append(connection)
    return held


def test_the_proxy_keeps_answering_while_thousands_of_half_sent_requests_are_held(fronted):
    """More half-sent requests than the 4,096 connections nginx used to have, from 66 client
    addresses (each within the per-client cap): a new client is still answered, and the held
    ones are closed once their header timeout passes."""
    count = 4300
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 1000:
        pytest.skip(f"this process may open {hard} files; the test holds {count} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 1000), hard))
    held = hold_half_sent(fronted["address"], count, sources=66)
    try:
        assert requests.get(fronted["rest"] + "/ping", timeout=30).status_code == 200
        assert predicted(fronted).status_code == 200
        time.sleep(fronted["settings"].header_timeout + 2)
        closed = b""
        with contextlib.suppress(ConnectionResetError):
            closed = held[0].recv(65536)
        assert closed == b"" or closed.startswith(b"HTTP/1.1 408"), closed[:100]
    finally:
        for connection in held:
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_python_client_works_unchanged_through_the_proxy(fronted):
    """The client finds the engine's API behind the proxy, sends the proxy's token, and a wrong
    token raises its typed error."""
    with Client(fronted["rest"], "text", token=fronted["token"], timeout=60) as client:
        direct = client.classify(text=TEXTS[0])
        assert client.resolved_api() == ("torchserve" if fronted["engine"] == "torchserve" else "kserve")
    assert direct.category and direct.path and direct.path[0].name == direct.category
    with Client(fronted["rest"], "text", token="wrong", timeout=60) as client, pytest.raises(Unauthorized):
        client.classify(text=TEXTS[0])
