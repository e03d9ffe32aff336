"""The Python client of the served models (needs only `requests`): `Client`, the `Listing` it
sends, the `Classification` it returns, and one exception per refusal."""

from marketplace_classifier.client.errors import (
    BadRequest,
    ClassifierError,
    GatewayTimeout,
    ModelNotFound,
    PayloadTooLarge,
    ServerError,
    ServerUnreachable,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from marketplace_classifier.client.http import Client, read_token
from marketplace_classifier.client.types import Choice, Classification, Level, Listing

__all__ = [
    "BadRequest",
    "Choice",
    "Classification",
    "ClassifierError",
    "Client",
    "GatewayTimeout",
    "Level",
    "Listing",
    "ModelNotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServerUnreachable",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "read_token",
]
