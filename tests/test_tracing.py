"""OpenTelemetry traces: a SERVER span per RPC (RPC semantic conventions), the caller's W3C trace
context continued, check phases as span events, the trace id in the audit record, and the SDK
propagating the caller's context. Spans are collected with the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import bearer, channel, issuer_token, run
from conftest import RunningStack
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from private_stack import private_stack

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.client_sdk import AsyncClient, Client, PermissionDeniedError, StaticToken
from aigis.server import tracing
from aigis.server.app import StartupError

ADD = "aigis.calculator.v1.Calculator/Add"
FIBONACCI = "aigis.calculator.v1.Calculator/Fibonacci"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # The process-wide provider, set the way an application (or opentelemetry-instrument) would;
    # the server uses it instead of building its own OTLP one.
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    with private_stack(tmp_path_factory.mktemp("tracing"), tracing_enabled=True) as running:
        yield running


@pytest.fixture(autouse=True)
def clear_spans() -> None:
    EXPORTER.clear()


def sdk(stack: RunningStack, client: str = "demo") -> Client:
    ca, cert, key = stack.client_files(client)
    return Client(stack.target, ca=ca, cert=cert, key=key, token_provider=StaticToken(issuer_token(stack, client)))


def server_spans(name: str, wait: float = 5.0) -> list[ReadableSpan]:
    """The finished server spans called `name`. A span ends just after the status is sent, so the
    client can see its answer first: wait (bounded) for one to appear."""
    deadline = time.monotonic() + wait
    while True:
        spans = [s for s in EXPORTER.get_finished_spans() if s.kind is SpanKind.SERVER and s.name == name]
        if spans or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def test_server_span_continues_the_callers_trace(stack: RunningStack) -> None:
    """The SDK sends the caller's traceparent; the server span is its child, named and attributed
    per the RPC semantic conventions, with the check phases as events."""
    tracer = trace.get_tracer("test-caller")
    with sdk(stack) as client, tracer.start_as_current_span("caller") as caller:
        assert client.add(2, 3) == 5
    (span,) = server_spans(ADD)
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
    assert span.parent.is_remote
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert (attributes["rpc.service"], attributes["rpc.method"]) == ("aigis.calculator.v1.Calculator", "Add")
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert isinstance(attributes["network.peer.port"], int)
    assert span.status.status_code is StatusCode.UNSET
    assert events(span) == ["aigis.check.certificate", "aigis.check.token", "aigis.check.decision"]
    certificate, token, decision = span.events
    assert certificate.attributes == {"aigis.principal": "spiffe://aigis.local/client/demo"}
    assert token.attributes is not None and token.attributes["aigis.client_id"] == "demo"
    assert decision.attributes is not None and decision.attributes["aigis.matched_rule"] == "calculator"
    assert all("Bearer" not in str(v) for e in span.events for v in (e.attributes or {}).values())


def test_denied_call_span_and_audit_record_share_the_trace_id(stack: RunningStack) -> None:
    """A denial is a span with the gRPC status and the reason event; its audit record names the trace."""
    with sdk(stack, "reader") as client, pytest.raises(PermissionDeniedError):
        client.add(2, 3)
    (span,) = server_spans(ADD)
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert span.status.status_code is StatusCode.UNSET  # a client error, not a server error (semconv)
    decision = span.events[-1]
    assert decision.name == "aigis.check.decision"
    assert decision.attributes is not None and decision.attributes["aigis.reason"] == "scope_missing"
    record = stack.audit_records()[-1]
    assert record["reason"] == "scope_missing"
    assert record["trace_id"] == format(span.context.trace_id, "032x")


def test_unauthenticated_call_still_gets_a_span(stack: RunningStack) -> None:
    """A call without a token is traced too: no token event, the denial reason on the decision."""
    with channel(stack, "demo") as ch:
        stub = calc_grpc.CalculatorStub(ch)
        outcome = run(lambda: stub.Add(calc.AddRequest(a=1, b=1), timeout=10))
    assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
    (span,) = server_spans(ADD)
    assert span.parent is None  # no traceparent from this caller: a new trace
    assert events(span) == ["aigis.check.certificate", "aigis.check.decision"]
    assert dict(span.events[-1].attributes or {})["aigis.reason"] == "token_missing"


def test_streaming_call_span_ends_with_the_stream(stack: RunningStack) -> None:
    """Server streaming: one span for the whole stream, status OK once it is done."""
    with sdk(stack) as client:
        assert list(client.fibonacci(6)) == [0, 1, 1, 2, 3, 5]
    (span,) = server_spans(FIBONACCI)
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == 0


def test_async_sdk_propagates_the_context(stack: RunningStack) -> None:
    """The asyncio client sends the caller's traceparent too."""
    ca, cert, key = stack.client_files("demo")
    provider = StaticToken(issuer_token(stack, "demo"))
    tracer = trace.get_tracer("test-caller")

    async def scenario() -> Any:
        async with AsyncClient(stack.target, ca=ca, cert=cert, key=key, token_provider=provider) as client:
            with tracer.start_as_current_span("async-caller") as caller:
                assert await client.add(1, 2) == 3
                return caller.get_span_context()

    caller = asyncio.run(scenario())
    (span,) = server_spans(ADD)
    assert span.context.trace_id == caller.trace_id
    assert span.parent is not None and span.parent.span_id == caller.span_id


def test_raw_traceparent_header_is_honoured(stack: RunningStack) -> None:
    """Any W3C caller (grpc-go, Envoy, a collector-instrumented client) is continued, not only our SDK."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    token = issuer_token(stack, "demo")
    with channel(stack, "demo") as ch:
        stub = calc_grpc.CalculatorStub(ch)
        metadata = (*bearer(token), ("traceparent", traceparent))
        assert run(lambda: stub.Add(calc.AddRequest(a=1, b=1), metadata=metadata, timeout=10).sum).value == 2
    (span,) = server_spans(ADD)
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "b7ad6b7169203331"


def test_tracing_is_off_by_default(tmp_path: Path) -> None:
    """Without [tracing] enabled no span is made (and nothing is added to the request path)."""
    with private_stack(tmp_path) as plain, sdk(plain) as client:
        assert client.add(2, 3) == 5
    assert server_spans(ADD, wait=0.5) == []


def test_stream_messages_naming_a_model_are_events_too(stack: RunningStack) -> None:
    """ClassifyStream is judged per message (the model each names): one event per message."""
    samples = Path(__file__).resolve().parent.parent / "server" / "models" / "digits" / "samples"
    with sdk(stack) as client:
        results = list(client.classify_stream([samples / "7.png", samples / "3.png"]))
    assert [r.category for r in results] == ["7", "3"]
    (span,) = server_spans("aigis.classifier.v1.ImageClassificationService/ClassifyStream")
    messages = [e for e in span.events if e.name == "aigis.check.message_decision"]
    assert len(messages) == 2
    assert all((e.attributes or {}).get("aigis.authorized") is True for e in messages)


def test_tracing_without_the_extra_stops_start_up_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[tracing] enabled where OpenTelemetry is not installed: a clear start-up error, not a traceback."""
    monkeypatch.setattr(tracing, "trace", None)  # as after a failed `import opentelemetry`
    with (
        pytest.raises(StartupError, match=r"pip install 'aigis\[otel\]'"),
        private_stack(tmp_path, tracing_enabled=True),
    ):
        pass
