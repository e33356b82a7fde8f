"""What tracing costs per call: aigis with `[tracing] enabled` vs without, same run, same machine.

    python -m aigis.benchmarks.tracing [--rounds 40] [--calls 200]

Two in-process servers (each on its own event-loop thread, loopback, mTLS, real tokens), one with
OpenTelemetry spans (SDK tracer provider, batch processor, an exporter that discards: the export
itself is the collector's cost, not ours), one without. Alternating batches of `--calls` sequential
unary Add calls from one sync client per server; prints the median latency per call of each and
the median paired difference (the per-call cost of the span, context extraction, phase events).
Requires the [otel] extra. Bounded: rounds x calls calls, each with a 10 s deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from aigis.auth.certs import init_pki
from aigis.auth.pki import PkiPaths
from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.client_sdk import ClientCredentials
from aigis.server.app import AigisServer, start_server
from aigis.server.config import Config, HostPort, IssuerSettings


class _Discard(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Server:
    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: AigisServer = asyncio.run_coroutine_threadsafe(start_server(config), self.loop).result(60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _token(pki: PkiPaths, token_url: str) -> str:
    tokens = ClientCredentials(
        token_url, ca=pki.ca_cert, cert=pki.client_cert("demo"), key=pki.client_key("demo"), client_id="demo"
    )
    return tokens.token()


class _Caller:
    """One mTLS channel with a token to one server; `batch` times sequential Add calls."""

    def __init__(self, target: str, pki: PkiPaths, token: str) -> None:
        credentials = grpc.ssl_channel_credentials(
            pki.ca_cert.read_bytes(), pki.client_key("demo").read_bytes(), pki.client_cert("demo").read_bytes()
        )
        self.channel = grpc.secure_channel(target, credentials)
        self.stub = calc_grpc.CalculatorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.batch(20)  # connect, warm the caches

    def batch(self, calls: int) -> float:
        """Median seconds per call over `calls` sequential calls."""
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            self.stub.Add(calc.AddRequest(a=1, b=1), metadata=self.metadata, timeout=10)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating batches per server")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per batch")
    args = parser.parse_args(argv)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    trace.set_tracer_provider(provider)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = PkiPaths(root / "certs")
        now = datetime.now(UTC)
        init_pki(pki, now=now)  # includes the `demo` client
        base = replace(
            Config(),
            listen=HostPort("127.0.0.1", 0),
            certs=pki.root,
            issuer=IssuerSettings(listen=HostPort("127.0.0.1", 0)),
            metrics_listen=None,
        )
        servers = {
            "off": _Server(replace(base, audit_log=root / "audit-off.jsonl")),
            "on": _Server(replace(base, audit_log=root / "audit-on.jsonl", tracing_enabled=True)),
        }
        try:
            tokens = {name: _token(pki, s.server.issuer.token_url) for name, s in servers.items()}  # type: ignore[union-attr]
            callers = {name: _Caller(s.server.target, pki, tokens[name]) for name, s in servers.items()}
            # Short alternating batches, paired: the machine's load drifts, a pair's difference less so.
            results: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for name, caller in callers.items():
                    results[name].append(caller.batch(args.calls))
            for caller in callers.values():
                caller.channel.close()
        finally:
            for running in servers.values():
                running.stop()
            provider.shutdown()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    paired = statistics.median(b - a for a, b in zip(results["off"], results["on"], strict=True))
    print(f"tracing off: {off * 1e6:.0f} µs/call (median of {args.rounds} batches x {args.calls} calls)")
    print(f"tracing on:  {on * 1e6:.0f} µs/call")
    print(f"difference:  {paired * 1e6:+.0f} µs/call (median of paired batches; {on / off:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
