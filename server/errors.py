"""Errors a servicer raises on bad input; the interceptor turns them into statuses in one place.

Servicers never call `context.abort` themselves: they raise one of these with a message written
for the client (it is sent as is, so it must never contain internals). Any other exception becomes
INTERNAL with a generic message and the request id, and is logged server-side.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service refuses, with a client-facing message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
