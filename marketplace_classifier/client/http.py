"""`Client`: the served models from Python, over one pooled HTTP session. It sends the listing
API's KServe v1 body ({"instances": [...]}) which every engine reads: TorchServe at
/predictions/<model>, the second engine at /v1/models/<model>:predict, and either behind the
nginx proxy. 503 answers are retried after their Retry-After, failed connections with backoff."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from marketplace_classifier.client.base import (
    DEFAULT_REQUEST_BYTES,
    BaseClient,
    backoff,
)
from marketplace_classifier.client.errors import (
    RETRIED_STATUSES,
    ModelNotFound,
    ServerUnreachable,
    ServiceUnavailable,
    error_for,
)
from marketplace_classifier.client.types import Classification, Listing

__all__ = ["Client"]


class Client(BaseClient):
    """Classify listings with one served model over HTTP.

    >>> client = Client("http://127.0.0.1:8080", model="combined", key_file=".serve/key_file.json")
    >>> client.classify(text="Oak dining table, seats six", photos=["table.jpg"]).path_names
    """

    def __init__(
        self,
        url: str,
        model: str = "combined",
        *,
        token: str | None = None,
        key_file: str | Path | None = None,
        api: str = "auto",
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        listings_per_request: int = 16,
        max_request_bytes: int = DEFAULT_REQUEST_BYTES,
        pool_size: int = 8,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__(model, api=api, token=token, key_file=key_file, timeout=timeout, retries=retries,
                         max_retry_wait=max_retry_wait, listings_per_request=listings_per_request,
                         max_request_bytes=max_request_bytes, sleep=sleep)
        self.url, self.probed = url.rstrip("/"), False
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def ready(self) -> bool:
        """Whether the server answers its health check."""
        path = "/v2/health/ready" if self.resolved_api() == "kserve" else "/ping"
        try:
            return self.session.get(self.url + path, timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.session.close()

    def resolved_api(self) -> str:
        """The engine's API: as given, else the second engine's where its v2 health route answers
        (probed once), else TorchServe's until a prediction says otherwise (behind the proxy the
        health route is /ping for both)."""
        if self.api == "auto" and not self.probed:
            self.probed = True
            try:
                probe = self.session.get(f"{self.url}/v2/health/ready", timeout=self.timeout)
            except requests.RequestException as error:
                raise ServerUnreachable(f"cannot reach {self.url}: is the server running?") from error
            if probe.status_code == 200:
                self.api = "kserve"
        return "torchserve" if self.api == "auto" else self.api

    def predict_url(self, api: str | None = None) -> str:
        if (api or self.resolved_api()) == "kserve":
            return f"{self.url}/v1/models/{self.model}:predict"
        return f"{self.url}/predictions/{self.model}"

    def _predict(self, body: bytes) -> dict:
        """The answer to one request body; an API still unknown is settled by the first answer:
        TorchServe's path, else (404) the second engine's."""
        api = self.resolved_api()
        if self.api != "auto":
            return self._post(self.predict_url(api), body)
        try:
            answer = self._post(self.predict_url("torchserve"), body)
        except ModelNotFound:
            answer = self._post(self.predict_url("kserve"), body)
            self.api = "kserve"
            return answer
        self.api = "torchserve"
        return answer

    def _send(self, listings: list[Listing]) -> list[Classification]:
        body = json.dumps({"instances": [listing.to_json() for listing in listings]}).encode()
        return self._answers(self._predict(body).get("predictions"), listings)

    def _post(self, url: str, body: bytes) -> dict:
        """POST with retries: a 503 after its Retry-After (capped), a failed connection after
        1, 2, 4... seconds; other refusals raise at once."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.post(
                    url, data=body, timeout=self.timeout, headers={"Content-Type": "application/json"}
                )
            except (requests.ConnectionError, requests.Timeout) as error:
                if last:
                    raise ServerUnreachable(
                        f"no answer from {url} after {attempt + 1} tries: {type(error).__name__}"
                    ) from error
                self.sleep(backoff(attempt, None, self.max_retry_wait))
                continue
            if response.status_code == 200:
                return response_json(response)
            wait = retry_after(response.headers.get("Retry-After"))
            if response.status_code in RETRIED_STATUSES and not last:
                self.sleep(backoff(attempt, wait, self.max_retry_wait))
                continue
            raise error_for(response.status_code, response_json(response), wait)
        raise ServiceUnavailable(f"no answer from {url}")  # not reached: the last try returns or raises


def response_json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"error": response.text[:500] or response.reason or "no body"}
    return body if isinstance(body, dict) else {"error": f"unexpected answer: {str(body)[:200]}"}


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the servers send a number of seconds; a date is not honoured)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
