"""Every explicit limit is enforced: rate, metadata size, streams per connection, messages per
stream, keepalive pings, connection age. Each runs against a private server over real mTLS."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import grpc
import pytest
from calls import RPC_KINDS, assert_denied, bearer, channel, issuer_token, numbers, run, wait_until

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.server.app import grpc_options
from aigis.server.config import Config, Limits

DEMO = "spiffe://aigis.local/client/demo"


def limited(start_stack: Any, **limits: Any) -> Any:
    return start_stack(limits=replace(Limits(), **limits))


def test_every_limit_reaches_grpc() -> None:
    """The configured limits are the options the gRPC server is built with."""
    config = replace(Config(), limits=replace(Limits(), max_concurrent_streams=7, max_metadata_bytes=4096))
    options = dict(grpc_options(config))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_metadata_size"] == 4096
    assert options["grpc.max_receive_message_length"] == config.max_message_bytes
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    assert options["grpc.http2.max_ping_strikes"] == 2


def test_rate_limit_per_principal_is_audited(start_stack: Any) -> None:
    """Past its burst a principal gets RESOURCE_EXHAUSTED (audited `rate_limited`); others are unaffected."""
    stack = limited(start_stack, rate_per_second=0.001, rate_burst=3)
    demo = bearer(issuer_token(stack, "demo"))
    with channel(stack, "demo") as ch:
        outcomes = [run(lambda: RPC_KINDS["unary"](ch, demo)) for _ in range(5)]
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    records = stack.audit_records()
    assert [r["reason"] for r in records] == ["rate_limited", "rate_limited"]
    assert [r["request_id"] for r in records] == [o.request_id for o in outcomes[3:]]
    with channel(stack, "calc-only") as ch:
        assert RPC_KINDS["unary"](ch, bearer(issuer_token(stack, "calc-only"))) == 5


def test_metadata_over_the_limit_is_refused(start_stack: Any) -> None:
    """Request headers above max_metadata_bytes are refused by gRPC (unary calls: before any of our code runs)."""
    stack = limited(start_stack, max_metadata_bytes=2048)
    token = bearer(issuer_token(stack, "demo"))
    with channel(stack, "demo") as ch:
        big = run(lambda: RPC_KINDS["unary"](ch, (*token, ("x-padding", "p" * 4096))))
        assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert RPC_KINDS["unary"](ch, token) == 5


def test_messages_per_stream_are_capped(start_stack: Any) -> None:
    """A client stream longer than max_stream_messages ends in RESOURCE_EXHAUSTED, not an endless call."""
    stack = limited(start_stack, max_stream_messages=10)
    token = bearer(issuer_token(stack, "demo"))
    with channel(stack, "demo") as ch:
        stub = calc_grpc.CalculatorStub(ch)
        assert stub.Sum(iter(numbers([1] * 10)), metadata=token, timeout=10).sum == 10
        over = run(lambda: stub.Sum(iter(numbers([1] * 20)), metadata=token, timeout=10))
        assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 10 messages" in over.details and over.request_id
        bidi = run(lambda: list(stub.RunningSum(iter(numbers([1] * 20)), metadata=token, timeout=10)))
        assert bidi.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.audit_records() == []  # bad input is not a denial


def test_concurrent_streams_per_connection_are_capped(start_stack: Any) -> None:
    """With max_concurrent_streams=2, a third call on the same connection waits until one ends."""
    stack = limited(start_stack, max_concurrent_streams=2)
    token = bearer(issuer_token(stack, "demo"))
    release = threading.Event()

    def held_open() -> Any:
        release.wait(10)
        yield calc.Number(value=1)

    with channel(stack, "demo") as ch:
        stub = calc_grpc.CalculatorStub(ch)
        assert stub.Add(calc.AddRequest(a=1, b=1), metadata=token, timeout=10).sum == 2  # connection is up
        open_calls = [stub.Sum.future(held_open(), metadata=token, timeout=10) for _ in range(2)]
        wait_until(lambda: stack.server.streams.held(DEMO) == 2, what="both streams admitted")
        third = run(lambda: stub.Add(calc.AddRequest(a=1, b=1), metadata=token, timeout=0.5))
        assert third.code == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert [f.result(timeout=10).sum for f in open_calls] == [1, 1]
        assert stub.Add(calc.AddRequest(a=1, b=1), metadata=token, timeout=10).sum == 2


def test_connection_age_forces_a_new_connection(start_stack: Any) -> None:
    """After max_connection_age the server closes the connection; the client reconnects (new handshake)."""
    stack = limited(start_stack, max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5)
    with channel(stack, "demo") as ch:
        first = run(lambda: RPC_KINDS["unary"](ch, ()))  # denied: the audit record names the peer port
        time.sleep(1.5)
        second = run(lambda: RPC_KINDS["unary"](ch, ()))
    assert first.code == second.code == grpc.StatusCode.UNAUTHENTICATED
    peers = [r["peer"] for r in stack.audit_records()]
    assert len(peers) == 2 and peers[0] != peers[1]


def test_keepalive_ping_flood_is_cut_off(start_stack: Any) -> None:
    """A client pinging faster than min_ping_interval gets GOAWAY after max_ping_strikes."""
    stack = limited(start_stack, min_ping_interval_seconds=5.0, max_ping_strikes=1)
    ca, cert, key = stack.client_files("demo")
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    options = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    token = bearer(issuer_token(stack, "demo"))
    release = threading.Event()

    def idle_stream() -> Any:
        release.wait(5)
        yield calc.Number(value=1)

    with grpc.secure_channel(stack.target, credentials, options=options) as ch:
        stub = calc_grpc.CalculatorStub(ch)
        outcome = run(lambda: stub.Sum(idle_stream(), metadata=token, timeout=5))
        release.set()
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.details == "Too many pings"


@pytest.mark.parametrize("kind", list(RPC_KINDS))
def test_limits_do_not_disturb_normal_calls(start_stack: Any, kind: str) -> None:
    """Default limits leave every RPC kind working."""
    stack = start_stack()
    with channel(stack, "demo") as ch:
        assert RPC_KINDS[kind](ch, bearer(issuer_token(stack, "demo"))) is not None


def test_concurrent_streams_per_principal_are_capped_across_connections(start_stack: Any) -> None:
    """With max_streams_per_principal=3, a principal's 4th open stream (on any connection) is refused
    RESOURCE_EXHAUSTED and audited `stream_limit`; other principals and unary calls are unaffected;
    a slot comes back when a stream ends."""
    stack = limited(start_stack, max_streams_per_principal=3)
    demo = bearer(issuer_token(stack, "demo"))
    other = bearer(issuer_token(stack, "calc-only"))
    release = threading.Event()

    def held_open() -> Any:
        release.wait(15)
        yield calc.Number(value=1)

    channels = [channel(stack, "demo") for _ in range(3)]  # one stream per connection: not gRPC's per-connection cap
    try:
        held = [calc_grpc.CalculatorStub(ch).Sum.future(held_open(), metadata=demo, timeout=15) for ch in channels]
        wait_until(lambda: stack.server.streams.held(DEMO) == 3, what="three streams admitted")
        before = len(stack.audit_records())
        with channel(stack, "demo") as ch:
            fourth = run(lambda: calc_grpc.CalculatorStub(ch).Sum(iter(numbers([1])), metadata=demo, timeout=10))
            assert_denied(stack, before, fourth, grpc.StatusCode.RESOURCE_EXHAUSTED, "stream_limit")
            assert calc_grpc.CalculatorStub(ch).Add(calc.AddRequest(a=1, b=1), metadata=demo, timeout=10).sum == 2
        with channel(stack, "calc-only") as ch:
            assert calc_grpc.CalculatorStub(ch).Sum(iter(numbers([1, 2])), metadata=other, timeout=10).sum == 3
        release.set()
        assert [f.result(timeout=15).sum for f in held] == [1, 1, 1]
        with channel(stack, "demo") as ch:
            assert calc_grpc.CalculatorStub(ch).Sum(iter(numbers([4])), metadata=demo, timeout=10).sum == 4
    finally:
        release.set()
        for ch in channels:
            ch.close()
