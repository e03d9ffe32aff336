"""The second engine's front door, before KServe or Ray see a byte of a request: what TorchServe's
frontend and the proxy refuse, refused as early here (SECURITY.md).

- `BodyGuard` (ASGI): a body over the limit is refused with 413 from its Content-Length before it
  is read, and a chunked one as soon as it passes the limit; a body that stalls is answered 408;
  a JSON body with more values than any request may hold is refused (413) before anything parses
  it (serving/payloads.py, check_json_size), so no such body reaches Ray's object store.
- `HeaderDeadline` (uvicorn's protocol): a connection that has not sent a whole request head
  within the deadline is closed, on its first request and on every keep-alive request after it.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from marketplace_classifier.serving.errors import error_body
from marketplace_classifier.serving.payloads import check_content_type, check_json_size
from marketplace_classifier.serving.processing import InputError

HEADER_TIMEOUT_S = 10  # a request head is a few hundred bytes
BODY_READ_TIMEOUT_S = 30  # between two reads of a body, as the proxy's client_body_timeout
BODY_TIMEOUT_S = 120  # a whole body: 20 MB at about 170 KB/s
JSON_TYPES = (b"application/json",)


class BodyGuard:
    """ASGI middleware: reads each POST body within `max_bytes` and the deadlines, checks a JSON
    body's size of structure, then hands the body on whole."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = BODY_READ_TIMEOUT_S,
                 total_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes = app, max_bytes
        self.read_timeout_s, self.total_timeout_s = read_timeout_s, total_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").strip()
        if declared and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await respond(send, 413, f"request body over {self.max_bytes} bytes"
                                 if declared.isdigit() else "invalid Content-Length")
        try:  # the core's rule, before the body is read: 415 as TorchServe's handlers answer it
            check_content_type(headers.get(b"content-type", b"").decode("latin-1"))
        except InputError as error:
            return await respond(send, error.status, str(error))
        try:
            body = await self.read_body(receive)
        except InputError as error:
            return await respond(send, error.status, str(error))
        except TimeoutError:
            return await respond(send, 408, "the request body was not sent in time")
        if body is None:  # the client went away
            return None
        if looks_like_json(headers.get(b"content-type", b""), body):
            try:
                check_json_size(body)
            except InputError as error:
                return await respond(send, error.status, str(error))
        return await self.app(scope, replay(body, receive), send)

    async def read_body(self, receive) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline, chunks, size = loop.time() + self.total_timeout_s, [], 0
        while True:
            left = min(self.read_timeout_s, deadline - loop.time())
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), left)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge(f"request body over {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class TooLarge(InputError):
    status = 413


def looks_like_json(content_type: bytes, body: bytes) -> bool:
    media = content_type.split(b";")[0].strip().lower()
    return media.endswith(JSON_TYPES) or media.endswith(b"+json") or \
        (not media and body.lstrip()[:1] in (b"{", b"["))


def replay(body: bytes, receive):
    """A `receive` that gives the body read once, then what the connection says next."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def respond(send, status: int, message: str) -> None:
    payload = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on each request head (uvicorn has none: a client
    that drips one header line every 20 s holds its connection for ever)."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        self.head_deadline = None
        super().connection_made(transport)
        self.arm_head_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.arm_head_deadline()

    def on_headers_complete(self) -> None:
        self.disarm_head_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self.disarm_head_deadline()
        super().connection_lost(exc)

    def arm_head_deadline(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.header_timeout_s, self.head_too_slow)

    def disarm_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
