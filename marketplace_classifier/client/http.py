"""`Client`: the served models from Python, over one pooled HTTP session. It sends the listing
API's KServe v1 body ({"instances": [...]}) which every engine reads: TorchServe at
/predictions/<model>, the second engine at /v1/models/<model>:predict, and either behind the
nginx proxy. 503 answers are retried after their Retry-After, failed connections with backoff."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from marketplace_classifier.client.errors import (
    RETRIED_STATUSES,
    ClassifierError,
    ModelNotFound,
    ServerUnreachable,
    ServiceUnavailable,
    error_for,
)
from marketplace_classifier.client.types import Classification, Listing, Photo

APIS = ("auto", "torchserve", "kserve")
MAX_LISTINGS_PER_REQUEST = 64  # the servers' limit (serving/protocols.py)
DEFAULT_REQUEST_BYTES = 8 * 2**20  # below every engine's 20 MB body limit, with room for JSON
# refusals that are about a listing's content, not about the server: bad input, too much work, a type
LISTING_STATUSES = frozenset({400, 413, 415})


def read_token(key_file: str | Path, kind: str = "inference") -> str:
    """The `kind` token of a TorchServe key file (key_file.json), or ValueError saying why not."""
    path = Path(key_file)
    try:
        return str(json.loads(path.read_text())[kind]["key"])
    except FileNotFoundError as error:
        raise ValueError(f"no key file at {path}: is TorchServe running with token authorization?") from error
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a TorchServe key file (no {kind} key)") from error


class Client:
    """Classify listings with one served model.

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
        if api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {api!r}")
        if token is not None and key_file is not None:
            raise ValueError("give either token or key_file, not both")
        if not 1 <= listings_per_request <= MAX_LISTINGS_PER_REQUEST:
            raise ValueError(f"listings_per_request must be 1 to {MAX_LISTINGS_PER_REQUEST}")
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be positive and retries not negative")
        self.url, self.model, self.api = url.rstrip("/"), model, api
        self.probed = False
        self.token = read_token(key_file) if key_file is not None else token
        self.timeout, self.retries, self.max_retry_wait = timeout, retries, max_retry_wait
        self.listings_per_request, self.max_request_bytes = listings_per_request, max_request_bytes
        self.sleep = sleep
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    # ------------------------------------------------------------ the public calls
    def classify(
        self,
        text: str | None = None,
        photos: Sequence[Photo] = (),
        *,
        name: str | None = None,
        description: str | None = None,
        top_k: int | None = None,
        min_confidence: float | None = None,
    ) -> Classification:
        """One listing: its text (or name and description) and its photos (bytes or paths)."""
        return self.classify_listing(
            Listing.of(
                text, photos, name=name, description=description, top_k=top_k, min_confidence=min_confidence
            )
        )

    def classify_listing(self, listing: Listing) -> Classification:
        return self._send([listing])[0]

    def classify_many(
        self, listings: Iterable[Listing], concurrency: int = 1, errors: str = "raise"
    ) -> list[Classification | ClassifierError]:
        """Every listing, in order, sent several to a request and `concurrency` requests at once.
        errors="raise": the first refusal raises; errors="return": a refused request is resent
        listing by listing and each refused listing's place holds its ClassifierError."""
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        return [
            answer for chunk in self.answer_chunks(list(listings), concurrency, errors) for answer in chunk
        ]

    def answer_chunks(
        self, listings: list[Listing], concurrency: int = 1, errors: str = "raise"
    ) -> Iterator[list[Classification | ClassifierError]]:
        """The answers of `listings`, one list per request sent, in order (for bulk scoring)."""
        chunks = list(self.chunks(listings))
        if concurrency <= 1:
            yield from (self.classify_chunk(chunk, errors) for chunk in chunks)
            return
        with ThreadPoolExecutor(concurrency) as pool:
            yield from pool.map(lambda chunk: self.classify_chunk(chunk, errors), chunks)

    def classify_chunk(
        self, listings: list[Listing], errors: str = "raise"
    ) -> list[Classification | ClassifierError]:
        """The listings in one request (up to listings_per_request): their answers in order."""
        return list(self._send(listings)) if errors == "raise" else self._send_isolating(listings)

    def ready(self) -> bool:
        """Whether the server answers its health check."""
        path = "/v2/health/ready" if self.resolved_api() == "kserve" else "/ping"
        try:
            return self.session.get(self.url + path, timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ requests
    def chunks(self, listings: list[Listing]) -> Iterator[list[Listing]]:
        """Listings grouped into requests of at most listings_per_request and max_request_bytes."""
        chunk: list[Listing] = []
        size = 0
        for listing in listings:
            grown = size + listing.json_size()
            if chunk and (len(chunk) == self.listings_per_request or grown > self.max_request_bytes):
                yield chunk
                chunk, grown = [], listing.json_size()
            chunk.append(listing)
            size = grown
        if chunk:
            yield chunk

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

    def _send_isolating(self, listings: list[Listing]) -> list[Classification | ClassifierError]:
        """Answers, or for a request refused for its content, each listing sent alone so that
        only the bad ones hold their error; refusals of the server's state still raise."""
        try:
            return list(self._send(listings))
        except ClassifierError as error:
            if error.status not in LISTING_STATUSES:
                raise
            if len(listings) == 1:
                return [error]
        return [answer for listing in listings for answer in self._send_isolating([listing])]

    def _send(self, listings: list[Listing]) -> list[Classification]:
        body = json.dumps({"instances": [listing.to_json() for listing in listings]}).encode()
        answer = self._predict(body)
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(listings):
            raise ClassifierError(
                f"the server sent {len(predictions or [])} answers for {len(listings)} listings"
            )
        return [Classification.from_json(prediction) for prediction in predictions]

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
                self.sleep(min(2.0**attempt, self.max_retry_wait))
                continue
            if response.status_code == 200:
                return response_json(response)
            wait = retry_after(response.headers.get("Retry-After"))
            if response.status_code in RETRIED_STATUSES and not last:
                self.sleep(min(wait if wait is not None else 2.0**attempt, self.max_retry_wait))
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
