"""The Python client of the served models: `Client` over HTTP (needs only `requests`) and
`GrpcClient` over gRPC (needs `grpcio`), the `Listing` they send, the `Classification` they
return, and one exception per refusal."""

from marketplace_classifier.client.base import read_token
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
from marketplace_classifier.client.grpc import GrpcClient
from marketplace_classifier.client.http import Client
from marketplace_classifier.client.types import Choice, Classification, Level, Listing

__all__ = [
    "BadRequest",
    "Choice",
    "Classification",
    "ClassifierError",
    "Client",
    "GatewayTimeout",
    "GrpcClient",
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
