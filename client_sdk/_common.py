"""What the sync and asyncio clients share: channel credentials, options, deadlines, retry rule."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

try:  # OpenTelemetry is optional (the [otel] extra); the SDK then propagates the caller's trace.
    from opentelemetry.propagate import inject as _inject
except ImportError:  # pragma: no cover - exercised where the extra is absent
    _inject = None  # type: ignore[assignment]

from aigis.client_sdk.errors import InvalidArgumentError, InvalidResponseError, TokenError
from aigis.client_sdk.tokens import TokenProvider
from aigis.inference import grpc_service_pb2 as inference_pb2
from aigis.inference.tensors import TensorError, decode_outputs, encode_inputs

PemSource = str | PathLike[str] | bytes
ImageSource = bytes | str | PathLike[str]

# Images travel whole in one message; gRPC's 4 MiB default would refuse a large photo.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Services the server answers without a token (the health check must work before the issuer is up).
TOKENLESS_SERVICES = frozenset({"grpc.health.v1.Health"})

T = TypeVar("T")
M = TypeVar("M")


def read_pem(source: PemSource) -> bytes:
    """PEM bytes as given, or read from a path."""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def read_image(image: ImageSource) -> bytes:
    """Encoded image bytes as given, or read from a path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | PathLike):
        return Path(image).read_bytes()
    raise TypeError(f"image must be bytes or a path, not {type(image).__name__}")


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """W3C `traceparent` / `tracestate` of the caller's current OpenTelemetry span, if any.

    Injected per call, not in BearerPlugin: gRPC runs plugins on a thread of its own, where the
    caller's context is not current. Without OpenTelemetry installed (it is optional) or without a
    current span, no metadata is added.
    """
    if _inject is None:
        return None
    carrier: dict[str, str] = {}
    _inject(carrier)
    return tuple(carrier.items()) or None


class BearerPlugin(grpc.AuthMetadataPlugin):
    """Adds `authorization: Bearer <token>` to every call but the health check.

    gRPC runs it on a thread of its own, with the sync and the asyncio channel alike, so the
    provider's blocking fetch never runs on an event loop.
    """

    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        if context.service_url.rsplit("/", 1)[-1] in TOKENLESS_SERVICES:
            callback((), None)
            return
        try:
            token = self._provider.token()
        except Exception as exc:
            # The clients fetch the token before each call, so this is only a refresh that failed
            # between that fetch and this one; gRPC fails the call with the exception's text.
            callback((), exc)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def channel_credentials(
    ca: PemSource, cert: PemSource, key: PemSource, provider: TokenProvider
) -> grpc.ChannelCredentials:
    """mTLS to the server, plus the bearer token on each call."""
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            root_certificates=read_pem(ca), private_key=read_pem(key), certificate_chain=read_pem(cert)
        ),
        grpc.metadata_call_credentials(BearerPlugin(provider), name="aigis-bearer"),
    )


# Every aigis RPC is idempotent (a pure calculation or a read), so each may be sent again when it
# failed UNAVAILABLE before any reply arrived: a replica that died, drained or refused the
# connection. gRPC retries on another address of the target (round_robin), within the call's deadline.
RETRIED_SERVICES = ("aigis.calculator.v1.Calculator", "aigis.classifier.v1.ImageClassificationService",
                    "grpc.health.v1.Health")
SERVICE_CONFIG = {
    # Spread calls over every address the target resolves to (dns:///headless-service:50051 gives
    # one per pod; ipv4:a:p,b:p lists them); the default, pick_first, would use one address only.
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: each address is watched through grpc.health.v1 Watch, and one that
    # reports NOT_SERVING (a replica draining after SIGTERM) gets no new calls while its running
    # calls finish. Health needs no token (any verified mTLS peer), so the watch works before login.
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{"service": name} for name in RETRIED_SERVICES],
            "retryPolicy": {
                "maxAttempts": 5,  # gRPC's cap
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(server_name: str | None, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # Ours only: a service config published in DNS TXT records is not taken from the network.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if server_name is not None:
        # Only when asked: overriding the checked host name is for tests and IP-address targets.
        options.append(("grpc.ssl_target_name_override", server_name))
    options.extend(extra)
    return options


def check_timeout(timeout: float, what: str = "timeout") -> float:
    """Every call has a deadline: a positive, finite number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{what} must be a number of seconds")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"{what} must be a positive, finite number of seconds")
    return float(timeout)


class Deadline:
    """One deadline for a method call, shared by its attempt and its retry."""

    __slots__ = ("_end",)

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.0)


def is_replayable(requests: object) -> bool:
    """Only a list or tuple can be sent again; any other iterable may be one-shot."""
    return isinstance(requests, list | tuple)


def is_refusal(exc: grpc.RpcError) -> bool:
    """UNAUTHENTICATED. The server never says why (expired token, revoked certificate, ...)."""
    code = getattr(exc, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAUTHENTICATED


def retry_after_refusal(provider: TokenProvider, refused: str, may_retry: bool) -> bool:
    """After UNAUTHENTICATED: drop the refused token so no later call sends it again, and say whether
    to retry — only if the call may be sent again (`may_retry`) and the provider now offers a
    different token. Blocking (the provider may fetch).

    If no fresh token can be had (e.g. the client was revoked at the issuer too), the caller raises
    the server's refusal — with its request id, which the audit log knows — not the TokenError."""
    provider.invalidate(refused)
    if not may_retry:
        return False
    try:
        return provider.token() != refused
    except TokenError:
        return False


class RequestStream(Generic[T, M]):
    """Converts the caller's items to request messages for one attempt, and keeps any exception
    the caller's iterable (or the conversion) raised: gRPC would replace it with a bare UNKNOWN."""

    def __init__(self, source: Iterable[T], convert: Callable[[T], M]) -> None:
        self._source = source
        self._convert = convert
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[M]:
        try:
            for item in self._source:
                yield self._convert(item)
        except Exception as exc:
            self.error = exc
            raise


def infer_request(model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None, version: str | None,
                  request_id: str = "") -> inference_pb2.ModelInferRequest:
    """A ModelInferRequest with `inputs` (name -> numpy array, or anything np.asarray takes) sent raw."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a non-empty mapping of input name to array")
    request = inference_pb2.ModelInferRequest(model_name=model, model_version=version or "", id=request_id)
    try:
        encode_inputs(request, {name: np.asarray(value) for name, value in inputs.items()})
    except TensorError as exc:
        raise TypeError(str(exc)) from None
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def infer_outputs(response: inference_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as numpy arrays (a malformed response raises InvalidResponseError)."""
    try:
        return decode_outputs(response)
    except TensorError as exc:
        raise InvalidResponseError(f"the server's response is malformed: {exc}") from None


def stream_reply(reply: inference_pb2.ModelStreamInferResponse) -> dict[str, np.ndarray]:
    """One ModelStreamInfer reply: its outputs, or the error the server reported for that request."""
    if reply.error_message:
        raise InvalidArgumentError(reply.error_message, grpc.StatusCode.INVALID_ARGUMENT)
    return infer_outputs(reply.infer_response)
