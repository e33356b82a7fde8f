"""Raw gRPC calls for the end-to-end and attack tests (no SDK, so metadata is fully ours)."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc

REQUEST_ID_KEY = "aigis-request-id"


def channel(stack: Any, client: str) -> grpc.Channel:
    """An mTLS channel presenting `client`'s certificate."""
    ca, cert, key = stack.client_files(client)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.secure_channel(stack.target, credentials)


def issuer_token(stack: Any, client: str, scope: str | None = None) -> str:
    """A real access token from the embedded issuer, authenticated by `client`'s certificate."""
    ca, cert, key = stack.client_files(client)
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    form = {"grant_type": "client_credentials"}
    if scope is not None:
        form["scope"] = scope
    request = urllib.request.Request(
        stack.token_url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())["access_token"]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Outcome:
    """What a call returned: its status, its answer (if OK), and the request id (if any)."""

    code: grpc.StatusCode
    value: Any = None
    details: str = ""
    request_id: str | None = None


def run(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(grpc.StatusCode.OK, call())
    except grpc.RpcError as err:
        trailers = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
        return Outcome(err.code(), None, err.details(), trailers.get(REQUEST_ID_KEY))  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds (a readiness wait on evidence, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def numbers(values: Sequence[int]) -> list[calc.Number]:
    return [calc.Number(value=v) for v in values]


# One call of each RPC kind, all on the calculator, each returning a comparable value.
def _unary(ch: grpc.Channel, md: Sequence[tuple[str, str]]) -> Any:
    return calc_grpc.CalculatorStub(ch).Add(calc.AddRequest(a=2, b=3), metadata=md, timeout=10).sum


def _server_streaming(ch: grpc.Channel, md: Sequence[tuple[str, str]]) -> Any:
    stream = calc_grpc.CalculatorStub(ch).Fibonacci(calc.FibonacciRequest(count=6), metadata=md, timeout=10)
    return [n.value for n in stream]


def _client_streaming(ch: grpc.Channel, md: Sequence[tuple[str, str]]) -> Any:
    return calc_grpc.CalculatorStub(ch).Sum(iter(numbers([1, 2, 3])), metadata=md, timeout=10).sum


def _bidi(ch: grpc.Channel, md: Sequence[tuple[str, str]]) -> Any:
    stream = calc_grpc.CalculatorStub(ch).RunningSum(iter(numbers([1, 2, 3])), metadata=md, timeout=10)
    return [n.value for n in stream]


RPC_KINDS: dict[str, Callable[[grpc.Channel, Sequence[tuple[str, str]]], Any]] = {
    "unary": _unary,
    "server_streaming": _server_streaming,
    "client_streaming": _client_streaming,
    "bidi": _bidi,
}
EXPECTED = {"unary": 5, "server_streaming": [0, 1, 1, 2, 3, 5], "client_streaming": 6, "bidi": [1, 3, 6]}


# ---- helpers for the attack suite (tests/test_attacks_*.py) ----------------------------------

# Spelled out rather than imported from auth.decision: a change to what clients read must show up here.
DENIAL_MESSAGES = {
    grpc.StatusCode.UNAUTHENTICATED: "request could not be authenticated",
    grpc.StatusCode.PERMISSION_DENIED: "request is not permitted",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate limit exceeded; retry later",
}


def pem_channel(stack: Any, chain_pem: bytes | None, key_pem: bytes | None) -> grpc.Channel:
    """An mTLS channel presenting an arbitrary certificate chain (None: no client certificate)."""
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes(), key_pem, chain_pem)
    return grpc.secure_channel(stack.target, credentials)


def assert_denied(stack: Any, before: int, outcome: Outcome, code: grpc.StatusCode, reason: str) -> dict[str, Any]:
    """The call was denied with `code` and the generic message, and exactly one audit record was
    written after the first `before`: the denial with `reason`, under the trailer's request id."""
    # Plain asserts in a helper module are not rewritten by pytest: say what differed.
    assert (outcome.code, outcome.details) == (code, DENIAL_MESSAGES[code]), outcome
    assert outcome.request_id, outcome
    records = stack.audit_records()[before:]
    got = [(r["request_id"], r["reason"], r["authorized"]) for r in records]
    assert got == [(outcome.request_id, reason, False)], f"audit records {got}, expected one {reason!r}"
    return records[0]


def assert_serving(stack: Any, kind: str = "unary", client: str = "demo") -> None:
    """The server still answers a valid call of `kind` from `client` with the right value."""
    with channel(stack, client) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, bearer(issuer_token(stack, client))))
    assert outcome.value == EXPECTED[kind], outcome


def png_digit_request(ch: grpc.Channel, md: Sequence[tuple[str, str]]) -> Any:
    """Classify the bundled sample digit 7; returns the ClassificationResult."""
    from pathlib import Path

    from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc

    sample = Path(__file__).resolve().parent.parent / "server" / "models" / "digits" / "samples" / "7.png"
    stub = classifier_pb2_grpc.ImageClassificationServiceStub(ch)
    return stub.ClassifyImage(classifier_pb2.Image(data=sample.read_bytes()), metadata=md, timeout=10)


def served_serial(port: int, ca: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate a server presents on a new TLS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def scrape(stack: Any) -> str:
    """The server's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line, 0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0
