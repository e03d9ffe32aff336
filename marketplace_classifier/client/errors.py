"""One exception per way a server refuses a listing, each carrying the server's own message, and
the table from an HTTP status to its exception (the client's side of serving/errors.py)."""

from __future__ import annotations


class ClassifierError(Exception):
    """A request the server refused or could not answer: `status` (0 when no HTTP answer came),
    the server's `message`, and `retry_after` seconds where the server gave them."""

    status = 0

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class ServerUnreachable(ClassifierError):
    """No answer: the server is not running there, or the connection failed every retry."""


class BadRequest(ClassifierError):
    status = 400


class Unauthorized(ClassifierError):
    """The token is missing or wrong (TorchServe's key file, the proxy's token)."""

    status = 401


class ModelNotFound(ClassifierError):
    status = 404


class RequestTimeout(ClassifierError):
    status = 408


class PayloadTooLarge(ClassifierError):
    """The request asks for more work than one request may cost (photos, pixels, bytes)."""

    status = 413


class UnsupportedMediaType(ClassifierError):
    status = 415


class TooManyRequests(ClassifierError):
    status = 429


class ServerError(ClassifierError):
    status = 500


class ServiceUnavailable(ClassifierError):
    """The server is full or starting; raised once the retries that honour Retry-After are spent."""

    status = 503


class GatewayTimeout(ClassifierError):
    """The model did not answer within the server's response timeout."""

    status = 504


ERRORS_BY_STATUS: dict[int, type[ClassifierError]] = {
    error.status: error
    for error in (
        BadRequest,
        Unauthorized,
        ModelNotFound,
        RequestTimeout,
        PayloadTooLarge,
        UnsupportedMediaType,
        TooManyRequests,
        ServerError,
        ServiceUnavailable,
        GatewayTimeout,
    )
}
RETRIED_STATUSES = frozenset({503})
TORCHSERVE_TOKEN_REFUSAL = "Token Authorization failed"


def error_for(status: int, body: dict, retry_after: float | None = None) -> ClassifierError:
    """The exception for a refusal: its class by status (5xx without its own class: ServerError,
    other 4xx: BadRequest) with the server's message (`error`, else `message`, else the body)."""
    message = body.get("error") or body.get("message") or body.get("detail") or str(body)[:500]
    cls = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequest)
    if TORCHSERVE_TOKEN_REFUSAL in str(message):  # TorchServe 0.12 answers a wrong token with 400
        cls = Unauthorized
    return cls(str(message), status, retry_after)
