"""What every client of the served models shares, whatever it travels over: the public calls
(`classify`, `classify_many`, ...), grouping listings into requests, and isolating the listings
a request was refused for. A transport (client/http.py, client/grpc.py) sends one request."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from marketplace_classifier.client.errors import ClassifierError
from marketplace_classifier.client.types import Classification, Listing, Photo

MAX_LISTINGS_PER_REQUEST = 64  # the servers' limit (serving/protocols.py)
DEFAULT_REQUEST_BYTES = 8 * 2**20  # below every engine's 20 MB body limit, with room for JSON
# refusals that are about a listing's content, not about the server: bad input, too much work, a type
LISTING_STATUSES = frozenset({400, 413, 415})
APIS = ("auto", "torchserve", "kserve")


def read_token(key_file: str | Path, kind: str = "inference") -> str:
    """The `kind` token of a TorchServe key file (key_file.json), or ValueError saying why not."""
    path = Path(key_file)
    try:
        return str(json.loads(path.read_text())[kind]["key"])
    except FileNotFoundError as error:
        raise ValueError(f"no key file at {path}: is TorchServe running with token authorization?") from error
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a TorchServe key file (no {kind} key)") from error


class BaseClient:
    """Classify listings with one served model; a subclass sends the requests (`_send`)."""

    def __init__(
        self,
        model: str,
        *,
        api: str,
        token: str | None,
        key_file: str | Path | None,
        timeout: float,
        retries: int,
        max_retry_wait: float,
        listings_per_request: int,
        max_request_bytes: int,
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
        self.model, self.api = model, api
        self.token = read_token(key_file) if key_file is not None else token
        self.timeout, self.retries, self.max_retry_wait = timeout, retries, max_retry_wait
        self.listings_per_request, self.max_request_bytes = listings_per_request, max_request_bytes
        self.sleep = sleep

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
        raise NotImplementedError

    def close(self) -> None:
        """Release the connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ requests
    def chunks(self, listings: list[Listing]) -> Iterator[list[Listing]]:
        """Listings grouped into requests of at most listings_per_request and max_request_bytes
        (and of one `request_kind`)."""
        chunk: list[Listing] = []
        size = 0
        for listing in listings:
            grown = size + listing.json_size()
            if chunk and (
                len(chunk) == self.listings_per_request
                or grown > self.max_request_bytes
                or self.request_kind(listing) != self.request_kind(chunk[0])
            ):
                yield chunk
                chunk, grown = [], listing.json_size()
            chunk.append(listing)
            size = grown
        if chunk:
            yield chunk

    def request_kind(self, listing: Listing) -> object:
        """What listings sharing one request must have in common (nothing, for a JSON body)."""
        return None

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
        raise NotImplementedError

    def _answers(self, predictions: object, listings: list[Listing]) -> list[Classification]:
        if not isinstance(predictions, list) or len(predictions) != len(listings):
            count = len(predictions) if isinstance(predictions, list) else 0
            raise ClassifierError(f"the server sent {count} answers for {len(listings)} listings")
        return [Classification.from_json(prediction) for prediction in predictions]


def backoff(attempt: int, wait: float | None, cap: float) -> float:
    """Seconds before retry `attempt` (0-based): the server's Retry-After, else 1, 2, 4 ... s."""
    return min(wait if wait is not None else 2.0**attempt, cap)
