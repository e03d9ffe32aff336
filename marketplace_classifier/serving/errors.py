"""One table from a refusal to what every engine answers: the HTTP status, the JSON body
(`error`, `status`, `grpc_code`) and the headers. The core builds its answers with it, and an
engine that refuses a request before the core sees it (the second engine's body limits) too."""

from __future__ import annotations

from http import HTTPStatus

from marketplace_classifier.serving.processing import InputError, ascii_message

MAX_ERROR_CHARS = 1000
# gRPC status names for the HTTP codes the core answers with, for clients of a gRPC API whose
# engine cannot send a per-request status (TorchServe 0.12: see SECURITY.md).
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED",
              415: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
RETRY_AFTER_SECONDS = 1


def refusal(error: Exception) -> tuple[int, dict, dict[str, str]]:
    """A refusal's status, JSON body and headers: the message is ASCII, at most
    MAX_ERROR_CHARS, and quotes the request only through `quote`; an unexpected failure says
    only its exception type; 503 carries Retry-After."""
    code = error.status if isinstance(error, InputError) else 500
    message = str(error) if isinstance(error, InputError) else f"internal error: {type(error).__name__}"
    return code, error_body(code, message), retry_headers(code)


def error_body(code: int, message: str) -> dict:
    return {"error": ascii_message(message, MAX_ERROR_CHARS), "status": code,
            "grpc_code": GRPC_CODES.get(code, "UNKNOWN")}


def retry_headers(code: int) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if code == HTTPStatus.SERVICE_UNAVAILABLE else {}
