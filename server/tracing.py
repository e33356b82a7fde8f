"""OpenTelemetry traces: one SERVER span per RPC, the check phases as span events.

Optional: `pip install 'aigis[otel]'` and `[tracing] enabled = true`. Without the extra, or turned
off, nothing here runs on the request path (the wrappers are simply not installed).

The span follows the RPC semantic conventions: name `package.Service/Method`, kind SERVER,
`rpc.system` grpc, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `network.peer.*`; status
ERROR only for the codes the conventions call server errors (UNKNOWN, DEADLINE_EXCEEDED,
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS). A W3C `traceparent` (and `tracestate`) in the
caller's metadata makes the span a child of the caller's. The auth layer knows nothing of
OpenTelemetry: it is handed `phase_event` (Guard) and `current_trace_id` (Enforcer, for the audit
record's `trace_id`) as plain callables.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger("aigis.tracing")

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the [otel] extra is not installed
    trace = None  # type: ignore[assignment]

TRACER_NAME = "aigis.server"
# RPC semantic conventions: server span status is ERROR only for these codes.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the [otel] extra is not installed."""


def available() -> bool:
    return trace is not None


def setup_provider(service_name: str = "aigis") -> Any:
    """The tracer provider to use: an already configured global one (the application's, or
    `opentelemetry-instrument`'s, or a test's), else a new SDK provider exporting over OTLP, set up
    by the standard OTEL_EXPORTER_OTLP_* environment variables."""
    if trace is None:
        raise TracingUnavailable("[tracing] enabled needs the OpenTelemetry extra: pip install 'aigis[otel]'")
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def phase_event(name: str, attributes: Mapping[str, str | bool]) -> None:
    """The Guard's hook: one event `aigis.check.<name>` on the current span (timestamped now)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(f"aigis.check.{name}", attributes)


def current_trace_id() -> str | None:
    """The Enforcer's hook: the current trace id (32 hex digits), for the audit record."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class RpcTracer:
    """Wraps servicer behaviours (already secured) in a SERVER span per call."""

    def __init__(self, provider: Any) -> None:
        if trace is None:
            raise TracingUnavailable("OpenTelemetry is not installed: pip install 'aigis[otel]'")
        self._tracer = provider.get_tracer(TRACER_NAME)

    def wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """`behavior` (a coroutine function or an async generator function) inside a span."""
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        base = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        tracer = self._tracer
        # Only the headers the configured propagators read (traceparent, tracestate, ... or b3 when
        # OTEL_PROPAGATORS says so); without any, extraction is skipped: it costs ~10 µs.
        fields = frozenset(propagate.get_global_textmap().fields)

        def start(context: aio.ServicerContext) -> Any:
            carrier = {k: v for k, v in context.invocation_metadata() or () if k in fields and isinstance(v, str)}
            return tracer.start_as_current_span(
                name,
                context=propagate.extract(carrier) if carrier else None,
                kind=SpanKind.SERVER,
                attributes={**base, **_peer(context.peer())},
                record_exception=False,  # statuses, not tracebacks: the audit log has the detail
                set_status_on_exception=False,
            )

        if inspect.isasyncgenfunction(behavior):

            async def traced_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                with start(context) as span:
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except BaseException:
                        _finish(span, context.code() or grpc.StatusCode.CANCELLED)
                        raise
                    _finish(span, context.code() or grpc.StatusCode.OK)

            return traced_stream

        async def traced(request: Any, context: aio.ServicerContext) -> Any:
            with start(context) as span:
                try:
                    response = await behavior(request, context)
                except BaseException:
                    _finish(span, context.code() or grpc.StatusCode.CANCELLED)
                    raise
                _finish(span, context.code() or grpc.StatusCode.OK)
                return response

        return traced


def _finish(span: Any, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))


def _peer(peer: str) -> dict[str, str | int]:
    """`ipv4:127.0.0.1:5555` / `ipv6:[::1]:5555` as network.peer.address and .port."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    address, _, port = rest.rpartition(":")
    if not port.isdigit():
        return {}
    return {"network.peer.address": address.strip("[]"), "network.peer.port": int(port)}
