"""The SDK's exceptions: one class per gRPC status code, so `grpc.RpcError` never reaches users.

A denied call carries only a coarse code, a generic message and the server's request id (trailing
metadata `aigis-request-id`); the reason a call was refused lives in the server's audit log, and
the request id is how an operator finds it there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

REQUEST_ID_KEY = "aigis-request-id"
# The server repeats a denied request stream's status code name here, in the response headers.
STATUS_HEADER = "aigis-status"
# A request id is a short opaque string; anything longer is not ours and is not worth carrying.
_MAX_REQUEST_ID = 128


class AigisError(Exception):
    """Base of every SDK error: a message, the gRPC status code (if any) and the request id."""

    code: grpc.StatusCode | None = None

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.code is not None:
            parts.append(f"code={self.code.name}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts) if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


class InvalidResponseError(AigisError):
    """The server's answer could not be understood (e.g. a tensor whose bytes do not fit its shape)."""


class AuthenticationError(AigisError):
    """UNAUTHENTICATED: the certificate or token was refused (the server never says which)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(AigisError):
    """PERMISSION_DENIED: the caller is identified but its policy or scopes do not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgumentError(AigisError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRangeError(AigisError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFoundError(AigisError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(AigisError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(AigisError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(AigisError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(AigisError):
    """UNAVAILABLE: no connection, including a TLS handshake the server refused (bad certificate)."""

    code = grpc.StatusCode.UNAVAILABLE


class CallCancelledError(AigisError):
    """CANCELLED. Not named CancelledError so it never shadows asyncio's."""

    code = grpc.StatusCode.CANCELLED


class UnimplementedError(AigisError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(AigisError):
    code = grpc.StatusCode.INTERNAL


class StatusLostError(InternalError):
    """The server ended a bidirectional stream while the asyncio client was still sending, and
    grpc.aio replaced the server's status with INTERNAL "Internal error from Core" (grpc/grpc#36066,
    unfixed in grpcio 1.85), and the response headers did not repeat it (aigis repeats it for
    denials, so this is left for streams ended mid-way for other reasons): the real code and request
    id are gone. Not retried. The blocking `Client` reports such statuses correctly."""


class TokenError(AigisError):
    """An access token could not be obtained. `error` is the OAuth2 error code (RFC 6749 §5.2),
    e.g. "invalid_client", or None when the token endpoint could not be reached or answered
    nonsense. Never carries the client secret."""

    def __init__(self, message: str, *, error: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.http_status = http_status

    def __str__(self) -> str:
        extra = [f"{k}={v}" for k, v in (("error", self.error), ("http_status", self.http_status)) if v]
        return f"{self.message} ({', '.join(extra)})" if extra else self.message


# The one place a status code becomes an exception class. Anything else is a plain AigisError.
STATUS_ERRORS: Mapping[grpc.StatusCode, type[AigisError]] = {
    cls.code: cls
    for cls in (
        AuthenticationError,
        PermissionDeniedError,
        InvalidArgumentError,
        OutOfRangeError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        CallCancelledError,
        UnimplementedError,
        InternalError,
    )
    if cls.code is not None
}


def request_id_from(trailing_metadata: Iterable[Any] | None) -> str | None:
    """The server's `aigis-request-id` from trailing metadata (sync tuples or aio Metadata)."""
    for key, value in trailing_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return value[:_MAX_REQUEST_ID]
    return None


def error_from_status(
    code: grpc.StatusCode | None, details: str | None, trailing_metadata: Iterable[Any] | None = None
) -> AigisError:
    """Build the exception for a failed call's status."""
    cls = STATUS_ERRORS.get(code, AigisError) if code is not None else AigisError
    message = details or (code.name if code is not None else "call failed")
    return cls(message, code, request_id_from(trailing_metadata))


def error_from_rpc(exc: grpc.RpcError) -> AigisError:
    """Convert a sync `grpc.RpcError` (a `grpc.Call`) or a `grpc.aio.AioRpcError`."""
    code = _safe(exc, "code")
    return error_from_status(
        code if isinstance(code, grpc.StatusCode) else None,
        _safe(exc, "details"),
        _safe(exc, "trailing_metadata"),
    )


def status_lost(exc: grpc.RpcError) -> bool:
    """grpc.aio's signature for a failed request write that overwrote the status the server sent
    (see StatusLostError)."""
    debug = _safe(exc, "debug_error_string")
    return (
        _safe(exc, "code") == grpc.StatusCode.INTERNAL
        and _safe(exc, "details") == "Internal error from Core"
        and isinstance(debug, str)
        and "SendMessageOperation" in debug
    )


def status_from_headers(initial_metadata: Iterable[Any] | None) -> tuple[grpc.StatusCode, str | None] | None:
    """The (code, request id) a denied request stream announced in its response headers, if any:
    what the server said, when grpc.aio lost the status itself."""
    headers = {key: value for key, value in initial_metadata or () if isinstance(value, str)}
    code = getattr(grpc.StatusCode, headers.get(STATUS_HEADER, ""), None)
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        return None
    request_id = headers.get(REQUEST_ID_KEY)
    return code, request_id[:_MAX_REQUEST_ID] if request_id else None


def _safe(exc: grpc.RpcError, name: str) -> Any:
    # A bare grpc.RpcError (not a Call) has none of these accessors.
    method = getattr(exc, name, None)
    return method() if callable(method) else None
