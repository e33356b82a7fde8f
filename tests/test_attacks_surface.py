"""The request surface (issue 11, items 7-10): checks before parsing, unknown methods through the
checks, Health/List, and remote input that must not flood the log.

Real server, real TLS, real tokens. Raw calls use identity serializers so a body is sent exactly as
given; non-UTF-8 metadata goes over python-hyper's h2 (grpc clients refuse to send it).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import Outcome, assert_denied, assert_serving, bearer, channel, issuer_token, run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from private_stack import private_stack
from raw_h2 import raw_grpc_call

from aigis.server.secured import UNKNOWN_METHOD

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
CALC = "/aigis.calculator.v1.Calculator"
CLASSIFIER = "/aigis.classifier.v1.ImageClassificationService"
Raw = Callable[[grpc.Channel, str, bytes, Any], Any]


def _unary(ch: grpc.Channel, path: str, body: bytes, md: Any) -> Any:
    return ch.unary_unary(path)(body, metadata=md, timeout=10)


def _server_streaming(ch: grpc.Channel, path: str, body: bytes, md: Any) -> Any:
    return list(ch.unary_stream(path)(body, metadata=md, timeout=10))


def _client_streaming(ch: grpc.Channel, path: str, body: bytes, md: Any) -> Any:
    return ch.stream_unary(path)(iter([body]), metadata=md, timeout=10)


def _bidi(ch: grpc.Channel, path: str, body: bytes, md: Any) -> Any:
    return list(ch.stream_stream(path)(iter([body]), metadata=md, timeout=10))


# path -> (how to call it, the request type its error names). Every shape, and both kinds of model
# method (the policy judges their model after decoding).
METHODS: dict[str, tuple[Raw, str]] = {
    f"{CALC}/Add": (_unary, "aigis.calculator.v1.AddRequest"),
    f"{CALC}/Fibonacci": (_server_streaming, "aigis.calculator.v1.FibonacciRequest"),
    f"{CALC}/Sum": (_client_streaming, "aigis.calculator.v1.Number"),
    f"{CALC}/RunningSum": (_bidi, "aigis.calculator.v1.Number"),
    f"{CLASSIFIER}/ClassifyImage": (_unary, "aigis.classifier.v1.Image"),
    f"{CLASSIFIER}/ClassifyStream": (_bidi, "aigis.classifier.v1.Image"),
}
# Bytes that are not a valid protobuf message of any type: a truncated varint, a truncated
# length-delimited field, an end-group tag with no group, a reserved wire type.
GARBAGE = {
    "truncated-varint": b"\x08\xff\xff\xff",
    "truncated-length": b"\x0a\x10abc",
    "stray-end-group": b"\x0c",
    "wire-type-7": b"\x0f\x01",
}


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with private_stack(tmp_path_factory.mktemp("surface")) as stack:
        yield stack


def _call(stack: Any, path: str, body: bytes, md: Any, client: str = "demo") -> Outcome:
    call, _ = METHODS.get(path, (_unary, ""))
    with channel(stack, client) as ch:
        return run(lambda: call(ch, path, body, md))


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [(r.name, r.getMessage()[:120]) for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == []


# ------------------------------------------------------------------- item 7: check before parsing


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("path", list(METHODS))
def test_undecodable_body_without_token_is_the_usual_audited_denial(
    surface: Any, caplog: pytest.LogCaptureFixture, path: str, garbage: str
) -> None:
    """No token: the body is never decoded; UNAUTHENTICATED, audited token_missing, no traceback."""
    before = len(surface.audit_records())
    with caplog.at_level(logging.INFO):
        outcome = _call(surface, path, GARBAGE[garbage], ())
    assert_denied(surface, before, outcome, UNAUTH, "token_missing")
    _no_errors(caplog)


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("path", list(METHODS))
def test_undecodable_body_from_an_authenticated_caller_is_invalid_argument(
    surface: Any, caplog: pytest.LogCaptureFixture, path: str, garbage: str
) -> None:
    """A valid token: INVALID_ARGUMENT naming only the expected type, a request id, no traceback,
    and the server keeps serving."""
    _, type_name = METHODS[path]
    md = bearer(issuer_token(surface, "demo"))
    with caplog.at_level(logging.INFO):
        outcome = _call(surface, path, GARBAGE[garbage], md)
    assert (outcome.code, outcome.details) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {type_name} message"
    ), outcome
    assert outcome.request_id
    _no_errors(caplog)
    assert_serving(surface)


@pytest.mark.timeout(120)
def test_random_bodies_never_reach_the_library_unchecked(surface: Any, caplog: pytest.LogCaptureFixture) -> None:
    """400 random bodies without a token: every one UNAUTHENTICATED and audited; 400 with one: each
    decoded after the check (OK or INVALID_ARGUMENT/OUT_OF_RANGE, never UNKNOWN or INTERNAL); no
    ERROR line at all."""
    rng = random.Random(7)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(200)]
    md = bearer(issuer_token(surface, "demo"))
    before = len(surface.audit_records())
    codes: dict[str, set[grpc.StatusCode]] = {"none": set(), "token": set()}
    with caplog.at_level(logging.INFO), channel(surface, "demo") as ch:
        for body in bodies:
            for path in (f"{CALC}/Add", f"{CALC}/RunningSum"):
                call, _ = METHODS[path]
                for key, metadata in (("none", ()), ("token", md)):
                    codes[key].add(run(functools.partial(call, ch, path, body, metadata)).code)
    assert codes["none"] == {UNAUTH}
    assert codes["token"] <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}
    denials = [r for r in surface.audit_records()[before:] if r.get("authorized") is False]
    assert len(denials) == 400 and {r["reason"] for r in denials} == {"token_missing"}
    _no_errors(caplog)


# --------------------------------------------------------------------- item 8: unknown methods

UNKNOWN_PATHS = {
    "unknown-service": "/no.such.v1.Service/Method",
    "unknown-method-of-a-known-service": f"{CALC}/Divide",
    "admin-looking": "/grpc.admin.v1.Admin/Shutdown",
    "no-method-part": "/aigis.calculator.v1.Calculator",
    "long-path": "/x." + "a" * 2000 + "/M",
}


# (path, with a token?) -> what the checks say. The bundled policy allows the calculator's paths by
# prefix (with its scope) and nothing else: like a proxy's RBAC, it judges the path, known or not.
UNKNOWN_CASES = {
    ("unknown-service", False): (DENIED, "no_matching_rule"),
    ("unknown-service", True): (DENIED, "no_matching_rule"),
    ("unknown-method-of-a-known-service", False): (UNAUTH, "token_missing"),
    ("unknown-method-of-a-known-service", True): (grpc.StatusCode.UNIMPLEMENTED, None),
    ("admin-looking", False): (DENIED, "no_matching_rule"),
    ("admin-looking", True): (DENIED, "no_matching_rule"),
    ("no-method-part", False): (DENIED, "no_matching_rule"),
    ("no-method-part", True): (DENIED, "no_matching_rule"),
    ("long-path", False): (DENIED, "no_matching_rule"),
    ("long-path", True): (DENIED, "no_matching_rule"),
}


@pytest.mark.parametrize(("name", "token"), list(UNKNOWN_CASES), ids=[f"{n}-{'token' if t else 'no-token'}"
                                                                       for n, t in UNKNOWN_CASES])  # fmt: skip
def test_unknown_method_goes_through_the_checks(
    surface: Any, caplog: pytest.LogCaptureFixture, name: str, token: bool
) -> None:
    """Unknown paths are judged like known ones: a denial is audited with the path; a caller the
    policy allows gets UNIMPLEMENTED (with a request id). Without the checks, grpc answered
    UNIMPLEMENTED to anyone, and a certificate holder could map the API without a token."""
    code, reason = UNKNOWN_CASES[(name, token)]
    md = bearer(issuer_token(surface, "demo")) if token else ()
    before = len(surface.audit_records())
    with caplog.at_level(logging.INFO):
        outcome = _call(surface, UNKNOWN_PATHS[name], b"", md)
    if reason is None:
        assert (outcome.code, outcome.details) == (code, "unknown method"), outcome
        assert outcome.request_id
        assert [r for r in surface.audit_records()[before:] if r.get("authorized") is False] == []
    else:
        record = assert_denied(surface, before, outcome, code, reason)
        assert record["rpc_method"] == UNKNOWN_PATHS[name]
    _no_errors(caplog)
    assert_serving(surface)


def test_unknown_method_is_unauthenticated_without_a_usable_certificate_identity(tmp_path: Path) -> None:
    """A revoked certificate on an unknown path: UNAUTHENTICATED, audited cert_revoked."""
    with private_stack(tmp_path) as stack:
        before = len(stack.audit_records())
        outcome = _call(stack, "/no.such.v1.Service/Method", b"", (), client="revoked")
        assert_denied(stack, before, outcome, UNAUTH, "cert_revoked")


def test_an_allowed_caller_gets_unimplemented_for_an_unknown_method(tmp_path: Path) -> None:
    """When the policy allows the path (a wildcard rule), the answer is UNIMPLEMENTED with a request
    id; metrics count unknown paths under one label."""
    policy = {
        "name": "wide",
        "allow_rules": [{"name": "calculator-anything", "source": {"principals": ["*"]},
                         "request": {"paths": [f"{CALC}/*"]}}],
    }  # fmt: skip
    with private_stack(tmp_path, policy=policy) as stack:
        outcome = _call(stack, f"{CALC}/Divide", b"", bearer(issuer_token(stack, "demo")))
        assert (outcome.code, outcome.details) == (grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        assert outcome.request_id
        labels = {"method": UNKNOWN_METHOD, "code": "UNIMPLEMENTED"}
        assert stack.server.metrics.registry.get_sample_value("aigis_requests_total", labels) == 1


# ------------------------------------------------------------------------- item 9: Health/List


@pytest.mark.parametrize("token", [False, True], ids=["no-token", "token"])
def test_health_list_answers_every_service_status(surface: Any, caplog: pytest.LogCaptureFixture, token: bool) -> None:
    """grpc.health.v1.Health/List (advertised) lists the statuses, instead of INTERNAL and a traceback."""
    md = bearer(issuer_token(surface, "demo")) if token else ()
    with caplog.at_level(logging.INFO), channel(surface, "demo") as ch:
        reply = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), metadata=md, timeout=10)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {"", "aigis.calculator.v1.Calculator"} <= set(reply.statuses)
    assert {s.status for s in reply.statuses.values()} == {serving}
    _no_errors(caplog)


# --------------------------------------------------------------- item 10: non-UTF-8 metadata


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"\xff\xfe", id="invalid-start-bytes"),
        pytest.param(b"caf\xe9", id="latin-1"),
        pytest.param(b"\xc3", id="truncated-sequence"),
        pytest.param(b"\xed\xa0\x80", id="utf-16-surrogate"),
    ],
)
def test_non_utf8_metadata_does_not_flood_the_log(surface: Any, caplog: pytest.LogCaptureFixture, value: bytes) -> None:
    """50 requests carrying a non-UTF-8 header value: no ERROR line or traceback, at most one summary
    WARNING, every dropped line counted in aigis_grpc_log_lines_suppressed_total; calls still answered."""
    token = issuer_token(surface, "demo").encode()
    counter = surface.server.metrics.registry.get_sample_value
    before = counter("aigis_grpc_log_lines_suppressed_total") or 0
    with caplog.at_level(logging.DEBUG):
        statuses = [
            raw_grpc_call(surface, "demo", f"{CALC}/Add", [(b"authorization", b"Bearer " + token), (b"x-note", value)])
            for _ in range(50)
        ]
    assert None not in statuses
    _no_errors(caplog)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "suppressed" in r.getMessage()]
    assert len(warnings) <= 1
    assert (counter("aigis_grpc_log_lines_suppressed_total") or 0) - before >= 50
    assert_serving(surface)
