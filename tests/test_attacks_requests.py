"""Bad input and abusive call patterns from a fully authorized caller, and per-principal rate limits.

Bad input is not a denial: each case asserts the exact status and message, a request id in the
trailers (none when gRPC's transport refuses the call itself), that no audit record was written,
and that the server still serves the next valid call. The server is a private one with a small
per-stream message cap, so "endless" streams are cut off after a bounded number of messages.
Rate limits run on a second private server with a tiny token bucket: those refusals are audited.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
from calls import RPC_KINDS, assert_denied, assert_serving, bearer, channel, issuer_token, numbers, run
from forge import factory, real_key, valid_claims
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt_factory import generate_key
from PIL import Image
from private_stack import private_stack

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.classifier.v1 import classifier_pb2 as cls
from aigis.classifier.v1 import classifier_pb2_grpc as cls_grpc
from aigis.server.config import Limits

STREAM_CAP = 16  # max_stream_messages on the private server
INT32_MAX = 2**31 - 1
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    limits = replace(Limits(), max_stream_messages=STREAM_CAP)
    with private_stack(tmp_path_factory.mktemp("attack-requests"), limits=limits) as running:
        yield running


@pytest.fixture(scope="module")
def md(rstack: Any) -> Metadata:
    return bearer(issuer_token(rstack, "demo"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, pixels: bytes = b"\0" * 64) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit gray) over a few bytes of real image data:
    a decompression bomb's header, without the bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(pixels))
        + png_chunk(b"IEND", b"")
    )


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


GOOD_PNG = png(np.zeros((8, 8)))


def calculator(ch: grpc.Channel) -> calc_grpc.CalculatorStub:
    return calc_grpc.CalculatorStub(ch)


def classifier(ch: grpc.Channel) -> cls_grpc.ImageClassificationServiceStub:
    return cls_grpc.ImageClassificationServiceStub(ch)


def classify(image: cls.Image) -> Callable[[grpc.Channel, Metadata], Any]:
    return lambda ch, md: classifier(ch).ClassifyImage(image, metadata=md, timeout=10)


def classify_stream(images: list[cls.Image]) -> Callable[[grpc.Channel, Metadata], Any]:
    return lambda ch, md: list(classifier(ch).ClassifyStream(iter(images), metadata=md, timeout=10))


def int32_message(what: str, value: int) -> str:
    return f"{what} {value} is outside the int32 range [-2147483648, 2147483647]"


def endless(limit: int) -> Iterator[calc.Number]:
    """A client stream that would go on for ever, bounded at `limit` messages (cap + 10)."""
    for _ in range(limit):
        yield calc.Number(value=1)


OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_IMAGE = "image data is not a valid PNG or JPEG image"
TOO_MANY_PIXELS = "image declares too many pixels; the limit is 4096x4096"
NEEDS_POSITIVE = "width and height must both be positive for raw grayscale pixels (or both 0 for an encoded PNG/JPEG)"
CAP_MESSAGE = f"a stream may carry at most {STREAM_CAP} messages"

# name -> (call, status, exact message)
BAD_REQUESTS: dict[str, tuple[Callable[[grpc.Channel, Metadata], Any], grpc.StatusCode, str]] = {
    # int32 arithmetic never wraps
    "add-int32-overflow": (
        lambda ch, md: calculator(ch).Add(calc.AddRequest(a=INT32_MAX, b=1), metadata=md, timeout=10),
        OUT_OF_RANGE,
        int32_message("sum", 2**31),
    ),
    "add-int32-underflow": (
        lambda ch, md: calculator(ch).Add(calc.AddRequest(a=-(2**31), b=-1), metadata=md, timeout=10),
        OUT_OF_RANGE,
        int32_message("sum", -(2**31) - 1),
    ),
    "sum-int32-overflow": (
        lambda ch, md: calculator(ch).Sum(iter(numbers([INT32_MAX, 1])), metadata=md, timeout=10),
        OUT_OF_RANGE,
        int32_message("sum", 2**31),
    ),
    "sum-overflow-then-back-in-range": (  # refused at the first overflow, not judged by the final total
        lambda ch, md: calculator(ch).Sum(iter(numbers([INT32_MAX, 1, -2])), metadata=md, timeout=10),
        OUT_OF_RANGE,
        int32_message("sum", 2**31),
    ),
    "running-sum-int32-overflow": (
        lambda ch, md: list(calculator(ch).RunningSum(iter(numbers([INT32_MAX, 1])), metadata=md, timeout=10)),
        OUT_OF_RANGE,
        int32_message("running sum", 2**31),
    ),
    # Fibonacci count bounds
    "fibonacci-count-48": (
        lambda ch, md: list(calculator(ch).Fibonacci(calc.FibonacciRequest(count=48), metadata=md, timeout=10)),
        INVALID,
        "count must be between 0 and 47 (larger values overflow int32); got 48",
    ),
    "fibonacci-count-negative": (
        lambda ch, md: list(calculator(ch).Fibonacci(calc.FibonacciRequest(count=-1), metadata=md, timeout=10)),
        INVALID,
        "count must be between 0 and 47 (larger values overflow int32); got -1",
    ),
    "fibonacci-count-int32-max": (
        lambda ch, md: list(calculator(ch).Fibonacci(calc.FibonacciRequest(count=INT32_MAX), metadata=md, timeout=10)),
        INVALID,
        f"count must be between 0 and 47 (larger values overflow int32); got {INT32_MAX}",
    ),
    # hostile images
    "corrupt-png": (classify(cls.Image(data=b"\x89PNG\r\n\x1a\n garbage")), INVALID, "image header is corrupt"),
    "gif-not-allowed": (classify(cls.Image(data=b"GIF89a" + b"\0" * 20)), INVALID, BAD_IMAGE),
    "png-declaring-0x0": (classify(cls.Image(data=png_header_only(0, 0))), INVALID, BAD_IMAGE),
    "truncated-png-data": (
        classify(cls.Image(data=png_header_only(8, 8, pixels=b"\0" * 3))),
        INVALID,
        "image data is corrupt or truncated",
    ),
    "decompression-bomb-20000x20000": (
        classify(cls.Image(data=png_header_only(20000, 20000))),
        INVALID,
        TOO_MANY_PIXELS,
    ),
    "png-declaring-5000x5000": (
        classify(cls.Image(data=png_header_only(5000, 5000))),
        INVALID,
        "image is 5000x5000 pixels; the limit is 4096x4096",
    ),
    "png-declaring-50000x1": (
        classify(cls.Image(data=png_header_only(50000, 1))),
        INVALID,
        "image is 50000x1 pixels; the limit is 4096x4096",
    ),
    "raw-pixels-wrong-length": (
        classify(cls.Image(data=b"\0" * 10, width=8, height=8)),
        INVALID,
        "raw grayscale data must be width*height = 64 bytes, got 10",
    ),
    "raw-pixels-width-without-height": (classify(cls.Image(data=b"\0" * 64, width=64)), INVALID, NEEDS_POSITIVE),
    "raw-pixels-negative-size": (classify(cls.Image(data=b"\0" * 64, width=-8, height=-8)), INVALID, NEEDS_POSITIVE),
    "raw-pixels-huge-size": (
        classify(cls.Image(data=b"\0" * 64, width=INT32_MAX, height=INT32_MAX)),
        INVALID,
        f"image is {INT32_MAX}x{INT32_MAX} pixels; the limit is 4096x4096",
    ),
    "top-k-negative": (
        classify(cls.Image(data=GOOD_PNG, top_k=-1)),
        INVALID,
        "top_k must be between 0 and the model's label count 10; got -1",
    ),
    "unknown-model-name-not-echoed": (
        classify(cls.Image(data=GOOD_PNG, model="../../etc/passwd")),
        grpc.StatusCode.NOT_FOUND,
        "unknown model: ListModels names the models this server hosts",
    ),
    "bad-image-mid-stream": (
        classify_stream([cls.Image(data=GOOD_PNG), cls.Image(data=b""), cls.Image(data=GOOD_PNG)]),
        INVALID,
        "image data is empty",
    ),
    # "endless" client streams are cut off at max_stream_messages (bounded here at cap + 10)
    "endless-sum-stream": (
        lambda ch, md: calculator(ch).Sum(endless(STREAM_CAP + 10), metadata=md, timeout=10),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        CAP_MESSAGE,
    ),
    "endless-running-sum-stream": (
        lambda ch, md: list(calculator(ch).RunningSum(endless(STREAM_CAP + 10), metadata=md, timeout=10)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        CAP_MESSAGE,
    ),
    "endless-classify-stream": (
        classify_stream([cls.Image(data=GOOD_PNG)] * (STREAM_CAP + 10)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        CAP_MESSAGE,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_status(rstack: Any, md: Metadata, case: str) -> None:
    """Bad input: the exact status and message, a request id, no audit record; the server still serves."""
    call, code, message = BAD_REQUESTS[case]
    before = len(rstack.audit_records())
    with channel(rstack, "demo") as ch:
        outcome = run(lambda: call(ch, md))
    assert (outcome.code, outcome.details) == (code, message)
    assert outcome.request_id
    assert rstack.audit_records()[before:] == []
    assert_serving(rstack, "client_streaming")


def test_image_over_the_message_limit_is_refused_by_grpc(rstack: Any, md: Metadata) -> None:
    """A 9 MiB image exceeds max_message_bytes (8 MiB): gRPC's RESOURCE_EXHAUSTED, no request id, no audit."""
    limit = rstack.server.config.max_message_bytes
    image = cls.Image(data=b"\0" * (limit + 1024 * 1024))
    before = len(rstack.audit_records())
    with channel(rstack, "demo") as ch:
        outcome = run(lambda: classify(image)(ch, md))
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome.details == f"SERVER: Received message larger than max ({image.ByteSize()} vs. {limit})"
    assert outcome.request_id is None
    assert rstack.audit_records()[before:] == []
    assert_serving(rstack)


def test_image_limit_follows_max_message_bytes(start_stack: Callable[..., Any]) -> None:
    """With max_message_bytes raised to 12 MiB, a 9 MiB raw image is classified: one limit, not two."""
    stack = start_stack(max_message_bytes=12 * 1024 * 1024)
    side = 3072  # 9 MiB of raw 8-bit grayscale
    image = cls.Image(data=bytes(side * side), width=side, height=side)
    with channel(stack, "demo") as ch:
        reply = classifier(ch).ClassifyImage(image, metadata=bearer(issuer_token(stack, "demo")), timeout=30)
    assert reply.category


EMPTY_STREAMS: dict[str, tuple[Callable[[grpc.Channel, Metadata], Any], Any]] = {
    "sum-of-nothing": (
        lambda ch, md: calculator(ch).Sum(iter([]), metadata=md, timeout=10),
        calc.SumReply(sum=0, count=0),
    ),
    "running-sum-of-nothing": (
        lambda ch, md: list(calculator(ch).RunningSum(iter([]), metadata=md, timeout=10)),
        [],
    ),
    "classify-stream-of-nothing": (classify_stream([]), []),
    "fibonacci-count-0": (
        lambda ch, md: list(calculator(ch).Fibonacci(calc.FibonacciRequest(count=0), metadata=md, timeout=10)),
        [],
    ),
    "sum-of-exactly-the-cap": (
        lambda ch, md: calculator(ch).Sum(endless(STREAM_CAP), metadata=md, timeout=10),
        calc.SumReply(sum=STREAM_CAP, count=STREAM_CAP),
    ),
}


@pytest.mark.parametrize("case", list(EMPTY_STREAMS))
def test_empty_and_boundary_streams_are_valid(rstack: Any, md: Metadata, case: str) -> None:
    """Empty streams and a stream of exactly the cap are valid calls with the obvious answer."""
    call, expected = EMPTY_STREAMS[case]
    before = len(rstack.audit_records())
    with channel(rstack, "demo") as ch:
        assert call(ch, md) == expected
    assert rstack.audit_records()[before:] == []


def _held_open(release: threading.Event) -> Iterator[calc.Number]:
    """One message, then the client keeps the stream open (bounded) until released."""
    yield calc.Number(value=1)
    release.wait(10)


def test_client_cancelling_a_stream_leaves_the_server_serving(rstack: Any, md: Metadata) -> None:
    """A client that cancels a long bidi stream gets CANCELLED; nothing is audited and the server serves on."""
    release = threading.Event()
    before = len(rstack.audit_records())
    with channel(rstack, "demo") as ch:
        call = calculator(ch).RunningSum(_held_open(release), metadata=md, timeout=10)
        assert next(call).value == 1
        call.cancel()
        release.set()
        outcome = run(lambda: list(call))
        assert (outcome.code, outcome.request_id) == (grpc.StatusCode.CANCELLED, None)
        release_sum = threading.Event()
        future = calculator(ch).Sum.future(_held_open(release_sum), metadata=md, timeout=10)
        assert future.cancel()
        release_sum.set()
        assert future.cancelled()
    assert rstack.audit_records()[before:] == []
    assert_serving(rstack, "bidi")


def test_deadline_cuts_off_a_stream_the_client_keeps_open(rstack: Any, md: Metadata) -> None:
    """A stream held open past its deadline ends in DEADLINE_EXCEEDED; nothing is audited, serving continues."""
    release = threading.Event()
    before = len(rstack.audit_records())
    with channel(rstack, "demo") as ch:
        call = calculator(ch).RunningSum(_held_open(release), metadata=md, timeout=0.3)
        outcome = run(lambda: list(call))
        release.set()
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rstack.audit_records()[before:] == []
    assert_serving(rstack, "bidi")


# ---- rate limiting: a second private server with a tiny per-principal bucket -------------------

BURST = 2
RATE_CASES = [*RPC_KINDS, "health", "forged-tokens"]
# Each case gets a fresh principal to exhaust and another to show the server still serves.
RATE_CLIENTS = [f"{role}-{case.replace('_', '-')}" for case in RATE_CASES for role in ("rl", "ok")]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # 0.001 tokens/s: nothing refills during the test, so the outcome is exact without sleeping.
    limits = replace(Limits(), rate_per_second=0.001, rate_burst=BURST)
    with private_stack(tmp_path_factory.mktemp("attack-rate"), clients=RATE_CLIENTS, limits=limits) as running:
        yield running


def _health(ch: grpc.Channel, md: Metadata) -> Any:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)


@pytest.mark.parametrize("case", RATE_CASES)
def test_principal_over_its_rate_is_refused_and_audited(limited: Any, case: str) -> None:
    """Past its burst a principal gets RESOURCE_EXHAUSTED `rate_limited` (audited) before any token check;
    other principals are still served."""
    client = f"rl-{case.replace('_', '-')}"
    call: Callable[[grpc.Channel, Metadata], Any]
    warmup_reason: str | None
    if case == "forged-tokens":
        # A flood of forged tokens is cut off by the bucket before it costs a signature check.
        attacker = generate_key("ES256", kid=real_key(limited).kid)
        md = bearer(factory(limited).make(key=attacker, **valid_claims(client)))
        call, warmup_reason = RPC_KINDS["unary"], "token_bad_signature"
    else:
        call = _health if case == "health" else RPC_KINDS[case]
        warmup_reason = None
        md = bearer(issuer_token(limited, client))
    with channel(limited, client) as ch:
        for _ in range(BURST):
            before = len(limited.audit_records())
            warmup = run(lambda: call(ch, md))
            if warmup_reason is None:
                assert warmup.code == grpc.StatusCode.OK
                assert limited.audit_records()[before:] == []
            else:
                assert_denied(limited, before, warmup, grpc.StatusCode.UNAUTHENTICATED, warmup_reason)
        before = len(limited.audit_records())
        outcome = run(lambda: call(ch, md))
    record = assert_denied(limited, before, outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
    assert record["principal"] == f"spiffe://aigis.local/client/{client}"
    assert record["client_id"] is None  # refused before the token was looked at
    assert_serving(limited, "unary", client=client.replace("rl-", "ok-", 1))
