"""aigis client SDK: typed sync and asyncio clients over mutual TLS with OAuth2 bearer tokens.

    from aigis.client_sdk import Client, ClientCredentials

    tokens = ClientCredentials("https://issuer:8443/oauth2/token", ca="certs/ca.pem",
                               cert="certs/clients/demo.pem", key="certs/clients/demo-key.pem")
    with Client("localhost:50051", ca="certs/ca.pem", cert="certs/clients/demo.pem",
                key="certs/clients/demo-key.pem", token_provider=tokens) as client:
        client.add(2, 3)
        client.infer("digits", {"pixels": numpy.zeros((1, 64), numpy.float32)})["probabilities"]

Failures are `AigisError` subclasses carrying the status code and the server's request id.
"""

from aigis.client_sdk.aio import AsyncClient
from aigis.client_sdk.client import Client
from aigis.client_sdk.errors import (
    STATUS_ERRORS,
    AigisError,
    AuthenticationError,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidResponseError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StatusLostError,
    TokenError,
    UnavailableError,
    UnimplementedError,
)
from aigis.client_sdk.tokens import ClientCredentials, StaticToken, TokenProvider, decode_unverified
from aigis.client_sdk.types import (
    Classification,
    LabelProbability,
    ModelInfo,
    ModelMetadata,
    SumResult,
    TensorInfo,
)

__all__ = [
    "STATUS_ERRORS",
    "AigisError",
    "AsyncClient",
    "AuthenticationError",
    "CallCancelledError",
    "Classification",
    "Client",
    "ClientCredentials",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidResponseError",
    "LabelProbability",
    "ModelInfo",
    "ModelMetadata",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "StaticToken",
    "StatusLostError",
    "SumResult",
    "TensorInfo",
    "TokenError",
    "TokenProvider",
    "UnavailableError",
    "UnimplementedError",
    "decode_unverified",
]
