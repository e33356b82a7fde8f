"""The whole service over real mTLS with real tokens: every RPC succeeds for an allowed caller."""

from __future__ import annotations

import io
from typing import Any

import grpc
import numpy as np
import pytest
from calls import EXPECTED, RPC_KINDS, bearer, channel, issuer_token, numbers, run
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.classifier.v1 import classifier_pb2 as cls
from aigis.classifier.v1 import classifier_pb2_grpc as cls_grpc


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def token(stack: Any) -> tuple[tuple[str, str], ...]:
    return bearer(issuer_token(stack, "demo"))


@pytest.mark.parametrize("kind", list(RPC_KINDS))
def test_calculator_every_rpc_kind_succeeds(stack: Any, token: Any, kind: str) -> None:
    """An allowed caller gets the right answer from each of the four RPC kinds."""
    with channel(stack, "demo") as ch:
        assert RPC_KINDS[kind](ch, token) == EXPECTED[kind]


def test_secret_authenticated_client_token_works(stack: Any) -> None:
    """A token obtained with client_secret_basic is as good as one obtained over mTLS."""
    import base64
    import json
    import ssl
    import urllib.parse
    import urllib.request

    context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    basic = base64.b64encode(f"secret-client:{urllib.parse.quote(stack.secret, safe='')}".encode()).decode()
    request = urllib.request.Request(
        stack.token_url,
        data=b"grant_type=client_credentials",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {basic}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        access_token = json.loads(response.read())["access_token"]
    with channel(stack, "secret-client") as ch:
        assert RPC_KINDS["unary"](ch, bearer(access_token)) == 5


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        pytest.param(
            lambda stub, md: stub.Add(calc.AddRequest(a=2**31 - 1, b=1), metadata=md, timeout=10),
            grpc.StatusCode.OUT_OF_RANGE,
            "outside the int32 range",
            id="add-overflow",
        ),
        pytest.param(
            lambda stub, md: stub.Add(calc.AddRequest(a=-(2**31), b=-1), metadata=md, timeout=10),
            grpc.StatusCode.OUT_OF_RANGE,
            "outside the int32 range",
            id="add-underflow",
        ),
        pytest.param(
            lambda stub, md: list(stub.Fibonacci(calc.FibonacciRequest(count=48), metadata=md, timeout=10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "between 0 and 47",
            id="fibonacci-count-too-large",
        ),
        pytest.param(
            lambda stub, md: list(stub.Fibonacci(calc.FibonacciRequest(count=-1), metadata=md, timeout=10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "between 0 and 47",
            id="fibonacci-negative",
        ),
        pytest.param(
            lambda stub, md: stub.Sum(iter(numbers([2**31 - 1, 1])), metadata=md, timeout=10),
            grpc.StatusCode.OUT_OF_RANGE,
            "outside the int32 range",
            id="sum-overflow",
        ),
        pytest.param(
            lambda stub, md: list(stub.RunningSum(iter(numbers([2**31 - 1, 1])), metadata=md, timeout=10)),
            grpc.StatusCode.OUT_OF_RANGE,
            "outside the int32 range",
            id="running-sum-overflow",
        ),
    ],
)
def test_bad_arithmetic_gets_a_clear_status(stack: Any, token: Any, call: Any, code: Any, message: str) -> None:
    """Results outside int32 are OUT_OF_RANGE and bad counts INVALID_ARGUMENT, never a wrong number."""
    with channel(stack, "demo") as ch:
        outcome = run(lambda: call(calc_grpc.CalculatorStub(ch), token))
        assert outcome.code == code
        assert message in outcome.details
        assert outcome.request_id
        assert RPC_KINDS["unary"](ch, token) == 5  # still serving


def test_fibonacci_reaches_the_int32_limit(stack: Any, token: Any) -> None:
    """The documented upper bound, 47 values, ends with F46, the largest int32 Fibonacci number."""
    with channel(stack, "demo") as ch:
        values = [n.value for n in calc_grpc.CalculatorStub(ch).Fibonacci(calc.FibonacciRequest(count=47),
                                                                           metadata=token, timeout=10)]
    assert len(values) == 47 and values[-1] == 1_836_311_903


def test_classify_image_and_stream_and_list_models(stack: Any, token: Any) -> None:
    """ClassifyImage, ClassifyStream and ListModels answer for an allowed caller."""
    from aigis.tools.train_digits import heldout_split

    images, labels = heldout_split()
    with channel(stack, "demo") as ch:
        stub = cls_grpc.ImageClassificationServiceStub(ch)
        result = stub.ClassifyImage(cls.Image(data=png(images[0]), top_k=3), metadata=token, timeout=10)
        assert result.category == str(labels[0])
        assert result.model == "digits"
        assert result.top[0].label == result.category and len(result.top) == 3
        raw = stub.ClassifyImage(
            cls.Image(data=images[1].astype(np.uint8).tobytes(), width=8, height=8), metadata=token, timeout=10
        )
        assert raw.category == str(labels[1])
        streamed = list(
            stub.ClassifyStream(iter([cls.Image(data=png(img)) for img in images[:10]]), metadata=token, timeout=10)
        )
        assert [r.category for r in streamed] == [str(y) for y in labels[:10]]
        models = stub.ListModels(cls.ListModelsRequest(), metadata=token, timeout=10).models
        assert [m.name for m in models] == ["digits"]
        assert list(models[0].labels) == [str(i) for i in range(10)] and models[0].is_default


def test_heldout_accuracy_through_grpc(stack: Any, token: Any) -> None:
    """The bundled model classifies the held-out digits split at >= 95% through the secured gRPC path."""
    from aigis.tools.train_digits import heldout_split

    images, labels = heldout_split()
    with channel(stack, "demo") as ch:
        stub = cls_grpc.ImageClassificationServiceStub(ch)
        results = list(
            stub.ClassifyStream(iter([cls.Image(data=png(img)) for img in images]), metadata=token, timeout=60)
        )
    predicted = np.array([int(r.category) for r in results])
    accuracy = float((predicted == np.asarray(labels)).mean())
    assert len(results) == len(labels) >= 300
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize(
    ("image", "message"),
    [
        pytest.param(cls.Image(data=b""), "empty", id="empty"),
        pytest.param(cls.Image(data=b"\x89PNG\r\n\x1a\n garbage"), "", id="corrupt-png"),
        pytest.param(cls.Image(data=b"GIF89a" + b"\0" * 20), "", id="gif"),
        pytest.param(cls.Image(data=b"\0" * 10, width=8, height=8), "", id="raw-wrong-size"),
        pytest.param(cls.Image(data=png(np.zeros((8, 8))), model="nope"), "", id="unknown-model"),
        pytest.param(cls.Image(data=png(np.zeros((8, 8))), top_k=11), "", id="top-k-too-large"),
    ],
)
def test_bad_images_get_a_clear_status(stack: Any, token: Any, image: Any, message: str) -> None:
    """Bad images are INVALID_ARGUMENT (NOT_FOUND for an unknown model) with a message; serving continues."""
    with channel(stack, "demo") as ch:
        stub = cls_grpc.ImageClassificationServiceStub(ch)
        outcome = run(lambda: stub.ClassifyImage(image, metadata=token, timeout=10))
        expected = grpc.StatusCode.NOT_FOUND if image.model == "nope" else grpc.StatusCode.INVALID_ARGUMENT
        assert outcome.code == expected
        assert message in outcome.details and outcome.details and "Traceback" not in outcome.details
        assert outcome.request_id
        ok = stub.ClassifyImage(cls.Image(data=png(np.zeros((8, 8)))), metadata=token, timeout=10)
        assert ok.model == "digits"


def test_health_needs_only_the_certificate(stack: Any) -> None:
    """grpc.health.v1 answers SERVING to any verified mTLS peer, without a token."""
    with channel(stack, "reader") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="aigis.calculator.v1.Calculator"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _list_services(ch: grpc.Channel, md: Any) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          metadata=md, timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_needs_a_valid_token(stack: Any, token: Any) -> None:
    """Reflection lists the services for any caller with a valid token, and is denied without one."""
    with channel(stack, "demo") as ch:
        assert "aigis.calculator.v1.Calculator" in _list_services(ch, token)
        outcome = run(lambda: _list_services(ch, ()))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_and_certificateless_connections_are_refused(stack: Any) -> None:
    """No plaintext port and no certificate-less TLS: both fail before any servicer runs."""
    with grpc.insecure_channel(stack.target) as ch:
        assert run(lambda: RPC_KINDS["unary"](ch, ())).code == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    with grpc.secure_channel(stack.target, credentials) as ch:
        assert run(lambda: RPC_KINDS["unary"](ch, ())).code == grpc.StatusCode.UNAVAILABLE


def test_unknown_method_is_unimplemented(stack: Any, token: Any) -> None:
    """A method the server does not have is UNIMPLEMENTED, not a crash in the interceptor."""
    with channel(stack, "demo") as ch:
        call = ch.unary_unary("/aigis.calculator.v1.Calculator/Nope")
        assert run(lambda: call(b"", metadata=token, timeout=10)).code == grpc.StatusCode.UNIMPLEMENTED


def reflected_methods(ch: grpc.Channel, md: Any) -> list[str]:
    """Every method of every service the server advertises through reflection, as /service/method."""
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)

    def ask(**request: Any) -> Any:
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]),
                                            metadata=md, timeout=10)
        return next(iter(replies))

    methods = set()
    for service in (s.name for s in ask(list_services="").list_services_response.service):
        for raw in ask(file_containing_symbol=service).file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for declared in file.service:
                if f"{file.package}.{declared.name}".lstrip(".") == service:
                    methods.update(f"/{service}/{m.name}" for m in declared.method)
    return sorted(methods)


def test_every_advertised_method_is_behind_the_security_layer(stack: Any, token: Any) -> None:
    """Each method the server advertises (reflection) refuses a caller without a token; health needs none.

    The list comes from the server's own reflection, not from how services were registered, so a
    service that reached the server some other way would show up here too.
    """
    with channel(stack, "demo") as ch:
        methods = reflected_methods(ch, token)
        assert len(methods) >= 18, methods
        assert set(stack.server.methods) <= set(methods)
        for method in methods:
            if method.startswith("/grpc.health.v1.Health/"):
                # Open to any verified mTLS peer: the first answer (Watch streams on) is not a denial.
                replies = ch.unary_stream(method)(b"", timeout=10)
                outcome = run(lambda replies=replies: next(iter(replies)))
                replies.cancel()
                assert outcome.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                continue
            call = ch.stream_stream(method)
            outcome = run(lambda call=call: list(call(iter([b""]), timeout=10)))
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, method
            assert outcome.request_id, method
