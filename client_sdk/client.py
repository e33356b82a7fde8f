"""The blocking aigis client: one typed method per RPC, errors as `AigisError`, never `grpc.RpcError`.

Every call has a deadline (the client's `default_timeout` unless the call passes `timeout`; a retry
shares it) and sends the provider's bearer token over mutual TLS. When the server answers
UNAUTHENTICATED the client invalidates the token it sent, so no later call reuses it, and retries
the call exactly once with a fresh token if the request can be replayed (unary requests, and
request streams given as a list or tuple — never a one-shot iterator), no reply has been received
yet, and the provider has a different token to offer (a `StaticToken` does not, so it never
retries). The server never says why it refused a token, so any UNAUTHENTICATED qualifies, even
one caused by the certificate: that costs one token fetch and one extra call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.client_sdk._common import (
    Deadline,
    ImageSource,
    PemSource,
    RequestStream,
    channel_credentials,
    channel_options,
    check_timeout,
    infer_outputs,
    infer_request,
    is_refusal,
    is_replayable,
    read_image,
    retry_after_refusal,
    stream_reply,
    trace_metadata,
)
from aigis.client_sdk.errors import error_from_rpc
from aigis.client_sdk.tokens import TokenProvider
from aigis.client_sdk.types import Classification, ModelInfo, ModelMetadata, SumResult
from aigis.inference import grpc_service_pb2 as inference_pb2
from aigis.inference import grpc_service_pb2_grpc as inference_pb2_grpc

# One attempt's request: a message, or a stream of them.
_Payload = Any


class Client:
    """A connection to an aigis server. Use as a context manager so the channel is closed.

    `ca`, `cert` and `key` are PEM paths or bytes: the CA that signed the server's certificate,
    and this client's certificate and private key. `server_name` overrides the host name checked
    against the server's certificate (only when given).
    """

    def __init__(
        self,
        target: str,
        *,
        ca: PemSource,
        cert: PemSource,
        key: PemSource,
        token_provider: TokenProvider,
        default_timeout: float = 10.0,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._default_timeout = check_timeout(default_timeout, "default_timeout")
        if not isinstance(token_provider, TokenProvider):
            raise TypeError("token_provider must have token() and invalidate(token)")
        self._provider = token_provider
        self._channel = grpc.secure_channel(
            target,
            channel_credentials(ca, cert, key, token_provider),
            options=channel_options(server_name, options),
        )
        self._calculator = calculator_pb2_grpc.CalculatorStub(self._channel)
        self._classifier = classifier_pb2_grpc.ImageClassificationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # Calculator

    def add(self, a: int, b: int, *, timeout: float | None = None) -> int:
        """a + b; OutOfRangeError if the sum does not fit int32."""
        request = calculator_pb2.AddRequest(a=a, b=b)
        reply = self._unary(self._calculator.Add, lambda: request, True, timeout)
        return int(reply.sum)

    def sum(self, numbers: Iterable[int], *, timeout: float | None = None) -> SumResult:
        """The total of `numbers` and how many there were (client streaming)."""
        reply = self._unary(
            self._calculator.Sum, lambda: RequestStream(numbers, _number), is_replayable(numbers), timeout
        )
        return SumResult.from_proto(reply)

    def fibonacci(self, count: int, *, timeout: float | None = None) -> Iterator[int]:
        """The first `count` Fibonacci numbers (0 <= count <= 47), streamed. The call starts when
        iteration does; `timeout` bounds the whole stream."""
        request = calculator_pb2.FibonacciRequest(count=count)
        for reply in self._stream(self._calculator.Fibonacci, lambda: request, True, timeout):
            yield int(reply.value)

    def running_sum(self, numbers: Iterable[int], *, timeout: float | None = None) -> Iterator[int]:
        """The running total after each of `numbers` (bidirectional streaming)."""
        replies = self._stream(
            self._calculator.RunningSum, lambda: RequestStream(numbers, _number), is_replayable(numbers), timeout
        )
        for reply in replies:
            yield int(reply.value)

    # Classifier

    def classify(
        self,
        image: ImageSource,
        *,
        model: str = "",
        top_k: int = 1,
        width: int = 0,
        height: int = 0,
        timeout: float | None = None,
    ) -> Classification:
        """Classify an encoded image (bytes or a path), or raw 8-bit grayscale pixels when `width`
        and `height` are set. An empty `model` means the server's default."""
        request = classifier_pb2.Image(
            data=read_image(image), model=model, top_k=top_k, width=width, height=height
        )
        return Classification.from_proto(self._unary(self._classifier.ClassifyImage, lambda: request, True, timeout))

    def classify_stream(
        self, images: Iterable[ImageSource], *, model: str = "", top_k: int = 1, timeout: float | None = None
    ) -> Iterator[Classification]:
        """Classify each encoded image in turn (bidirectional streaming); paths are read lazily."""

        def convert(image: ImageSource) -> classifier_pb2.Image:
            return classifier_pb2.Image(data=read_image(image), model=model, top_k=top_k)

        replies = self._stream(
            self._classifier.ClassifyStream, lambda: RequestStream(images, convert), is_replayable(images), timeout
        )
        for reply in replies:
            yield Classification.from_proto(reply)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        request = classifier_pb2.ListModelsRequest()
        reply = self._unary(self._classifier.ListModels, lambda: request, True, timeout)
        return [ModelInfo.from_proto(info) for info in reply.models]

    # Open Inference Protocol (KServe v2)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `model` (the newest version unless `version`) on `inputs` (input name -> numpy array,
        sent raw); returns the outputs by name, all of them unless `outputs` names some."""
        request = infer_request(model, inputs, outputs, version)
        return infer_outputs(self._unary(self._inference.ModelInfer, lambda: request, True, timeout))

    def infer_stream(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One inference per item of `inputs` over one stream (ModelStreamInfer), answers in order.
        A request the server refuses raises its error (InvalidArgumentError, ...) and ends the stream."""

        def convert(item: Mapping[str, Any]) -> inference_pb2.ModelInferRequest:
            return infer_request(model, item, outputs, version)

        replies = self._stream(
            self._inference.ModelStreamInfer, lambda: RequestStream(inputs, convert), is_replayable(inputs), timeout
        )
        for reply in replies:
            yield stream_reply(reply)

    def model_metadata(self, model: str, version: str | None = None, *, timeout: float | None = None
                       ) -> ModelMetadata:
        """A model's versions, platform and input/output tensors."""
        request = inference_pb2.ModelMetadataRequest(name=model, version=version or "")
        return ModelMetadata.from_proto(self._unary(self._inference.ModelMetadata, lambda: request, True, timeout))

    def model_ready(self, model: str, version: str | None = None, *, timeout: float | None = None) -> bool:
        request = inference_pb2.ModelReadyRequest(name=model, version=version or "")
        return bool(self._unary(self._inference.ModelReady, lambda: request, True, timeout).ready)

    # Health (no token needed)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = the server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        deadline = Deadline(self._timeout(timeout))
        try:
            reply = self._health.Check(request, timeout=deadline.remaining(), metadata=trace_metadata())
        except grpc.RpcError as exc:
            failure = exc
        else:
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        raise error_from_rpc(failure) from None

    # Plumbing

    def _timeout(self, timeout: float | None) -> float:
        return self._default_timeout if timeout is None else check_timeout(timeout)

    def _unary(
        self, method: Callable[..., Any], payload: Callable[[], _Payload], replayable: bool, timeout: float | None
    ) -> Any:
        """One response: a unary or client-streaming call, retried once on a refused token."""
        deadline = Deadline(self._timeout(timeout))
        for attempt in (1, 2):
            token = self._provider.token()
            request = payload()
            try:
                return method(_send(request), timeout=deadline.remaining(), metadata=trace_metadata())
            except grpc.RpcError as exc:
                failure = exc
            # Outside the except block, so a TokenError from the refresh does not drag the RpcError along.
            if is_refusal(failure) and retry_after_refusal(self._provider, token, attempt == 1 and replayable):
                continue
            raise _failure(failure, request) from None
        raise AssertionError("unreachable")

    def _stream(
        self, method: Callable[..., Any], payload: Callable[[], _Payload], replayable: bool, timeout: float | None
    ) -> Iterator[Any]:
        """A response stream, retried once on a refused token if nothing was received yet."""
        deadline = Deadline(self._timeout(timeout))
        for attempt in (1, 2):
            token = self._provider.token()
            request = payload()
            call = method(_send(request), timeout=deadline.remaining(), metadata=trace_metadata())
            received = False
            try:
                for reply in call:
                    received = True
                    yield reply
                return
            except grpc.RpcError as exc:
                failure = exc
            finally:
                # No-op once the call is over; stops it when the caller abandons the iterator.
                call.cancel()
            may_retry = attempt == 1 and replayable and not received
            if is_refusal(failure) and retry_after_refusal(self._provider, token, may_retry):
                continue
            raise _failure(failure, request) from None


def _number(value: int) -> calculator_pb2.Number:
    return calculator_pb2.Number(value=value)


def _send(request: _Payload) -> _Payload:
    # The sync channel wants an iterator for a request stream; a fresh one per attempt.
    return iter(request) if isinstance(request, RequestStream) else request


def _failure(exc: grpc.RpcError, request: _Payload) -> Exception:
    """The caller's own exception if their request iterable raised it, else the call's AigisError."""
    if isinstance(request, RequestStream) and request.error is not None:
        return request.error
    return error_from_rpc(exc)
