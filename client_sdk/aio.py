"""The asyncio aigis client: the same methods as `Client`, awaited, on a `grpc.aio` channel.

Same rules as the blocking client (see client.py): a deadline on every call, the bearer token over
mutual TLS, one refresh-and-retry on UNAUTHENTICATED for replayable requests. Nothing blocks the
event loop: certificate files, image paths and token fetches are read in a thread. Request streams
accept sync or async iterables; only a list or tuple is replayed.

Known grpc.aio limitation (grpc/grpc#36066, grpcio 1.85): when the server ends a request stream
while requests are still being written, grpc.aio may report INTERNAL "Internal error from Core"
instead of the server's status. aigis's server repeats a denial's code and request id in the
response headers of request-streaming calls, which arrive regardless, so the SDK reports the real
status and request id (and refreshes a refused token and retries, as for any call). Only a stream
ended by anything else mid-way (a bad item after answers were sent) can still surface as
`StatusLostError`. The blocking `Client` is not affected.
"""

# ruff: noqa: ASYNC109 - `timeout` is the gRPC deadline sent to the server, not a local asyncio timeout.
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.client_sdk._common import (
    Deadline,
    ImageSource,
    PemSource,
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
from aigis.client_sdk.errors import (
    REQUEST_ID_KEY,
    StatusLostError,
    error_from_rpc,
    status_from_headers,
    status_lost,
)
from aigis.client_sdk.tokens import TokenProvider
from aigis.client_sdk.types import Classification, ModelInfo, ModelMetadata, SumResult
from aigis.inference import grpc_service_pb2 as inference_pb2
from aigis.inference import grpc_service_pb2_grpc as inference_pb2_grpc

T = TypeVar("T")
M = TypeVar("M")
_Payload = Any


class AsyncRequestStream(Generic[T, M]):
    """Converts the caller's items (from a sync or async iterable) to request messages for one
    attempt, keeping any exception raised: grpc.aio would only cancel the call."""

    def __init__(self, source: Iterable[T] | AsyncIterable[T], convert: Callable[[T], Awaitable[M]]) -> None:
        self._source = source
        self._convert = convert
        self.error: Exception | None = None

    def __aiter__(self) -> AsyncIterator[M]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[M]:
        try:
            if isinstance(self._source, AsyncIterable):
                async for item in self._source:
                    yield await self._convert(item)
            else:
                for item in self._source:
                    yield await self._convert(item)
        except Exception as exc:
            self.error = exc
            raise


@dataclass(frozen=True, slots=True)
class _Stubs:
    calculator: calculator_pb2_grpc.CalculatorStub
    classifier: classifier_pb2_grpc.ImageClassificationServiceStub
    health: health_pb2_grpc.HealthStub
    inference: inference_pb2_grpc.GRPCInferenceServiceStub


class AsyncClient:
    """An asyncio connection to an aigis server: `async with AsyncClient(...) as client:`.

    The channel is opened by `open()` / `async with` (certificate files are read in a thread, and
    a grpc.aio channel belongs to the running loop) and closed by `close()`.
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
        self._target = target
        self._pem = (ca, cert, key)
        if not isinstance(token_provider, TokenProvider):
            raise TypeError("token_provider must have token() and invalidate(token)")
        self._provider = token_provider
        self._default_timeout = check_timeout(default_timeout, "default_timeout")
        self._options = channel_options(server_name, options)
        self._channel: aio.Channel | None = None
        self._open_stubs: _Stubs | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._channel is not None:
            return
        ca, cert, key = self._pem
        credentials = await asyncio.to_thread(channel_credentials, ca, cert, key, self._provider)
        channel = self._channel = aio.secure_channel(self._target, credentials, options=self._options)
        self._open_stubs = _Stubs(
            calculator_pb2_grpc.CalculatorStub(channel),
            classifier_pb2_grpc.ImageClassificationServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            inference_pb2_grpc.GRPCInferenceServiceStub(channel),
        )

    async def close(self) -> None:
        channel, self._channel, self._open_stubs = self._channel, None, None
        if channel is not None:
            await channel.close()

    # Calculator

    async def add(self, a: int, b: int, *, timeout: float | None = None) -> int:
        """a + b; OutOfRangeError if the sum does not fit int32."""
        request = calculator_pb2.AddRequest(a=a, b=b)
        reply = await self._unary(self._stubs().calculator.Add, lambda: request, True, timeout)
        return int(reply.sum)

    async def sum(
        self, numbers: Iterable[int] | AsyncIterable[int], *, timeout: float | None = None
    ) -> SumResult:
        """The total of `numbers` and how many there were (client streaming)."""
        reply = await self._unary(
            self._stubs().calculator.Sum, lambda: AsyncRequestStream(numbers, _number), is_replayable(numbers), timeout
        )
        return SumResult.from_proto(reply)

    async def fibonacci(self, count: int, *, timeout: float | None = None) -> AsyncIterator[int]:
        """The first `count` Fibonacci numbers (0 <= count <= 47); `timeout` bounds the stream."""
        request = calculator_pb2.FibonacciRequest(count=count)
        async for reply in self._stream(self._stubs().calculator.Fibonacci, lambda: request, True, timeout):
            yield int(reply.value)

    async def running_sum(
        self, numbers: Iterable[int] | AsyncIterable[int], *, timeout: float | None = None
    ) -> AsyncIterator[int]:
        """The running total after each of `numbers` (bidirectional streaming)."""
        replies = self._stream(
            self._stubs().calculator.RunningSum,
            lambda: AsyncRequestStream(numbers, _number),
            is_replayable(numbers),
            timeout,
        )
        async for reply in replies:
            yield int(reply.value)

    # Classifier

    async def classify(
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
            data=await _image_bytes(image), model=model, top_k=top_k, width=width, height=height
        )
        reply = await self._unary(self._stubs().classifier.ClassifyImage, lambda: request, True, timeout)
        return Classification.from_proto(reply)

    async def classify_stream(
        self,
        images: Iterable[ImageSource] | AsyncIterable[ImageSource],
        *,
        model: str = "",
        top_k: int = 1,
        timeout: float | None = None,
    ) -> AsyncIterator[Classification]:
        """Classify each encoded image in turn (bidirectional streaming); paths are read lazily."""

        async def convert(image: ImageSource) -> classifier_pb2.Image:
            return classifier_pb2.Image(data=await _image_bytes(image), model=model, top_k=top_k)

        replies = self._stream(
            self._stubs().classifier.ClassifyStream,
            lambda: AsyncRequestStream(images, convert),
            is_replayable(images),
            timeout,
        )
        async for reply in replies:
            yield Classification.from_proto(reply)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        request = classifier_pb2.ListModelsRequest()
        reply = await self._unary(self._stubs().classifier.ListModels, lambda: request, True, timeout)
        return [ModelInfo.from_proto(info) for info in reply.models]

    # Open Inference Protocol (KServe v2)

    async def infer(
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
        return infer_outputs(await self._unary(self._stubs().inference.ModelInfer, lambda: request, True, timeout))

    async def infer_stream(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """One inference per item of `inputs` over one stream (ModelStreamInfer), answers in order.
        A request the server refuses raises its error (InvalidArgumentError, ...) and ends the stream."""

        async def convert(item: Mapping[str, Any]) -> inference_pb2.ModelInferRequest:
            return infer_request(model, item, outputs, version)

        replies = self._stream(
            self._stubs().inference.ModelStreamInfer,
            lambda: AsyncRequestStream(inputs, convert),
            is_replayable(inputs),
            timeout,
        )
        async for reply in replies:
            yield stream_reply(reply)

    async def model_metadata(self, model: str, version: str | None = None, *, timeout: float | None = None
                             ) -> ModelMetadata:
        """A model's versions, platform and input/output tensors."""
        request = inference_pb2.ModelMetadataRequest(name=model, version=version or "")
        reply = await self._unary(self._stubs().inference.ModelMetadata, lambda: request, True, timeout)
        return ModelMetadata.from_proto(reply)

    async def model_ready(self, model: str, version: str | None = None, *, timeout: float | None = None) -> bool:
        request = inference_pb2.ModelReadyRequest(name=model, version=version or "")
        return bool((await self._unary(self._stubs().inference.ModelReady, lambda: request, True, timeout)).ready)

    # Health (no token needed)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = the server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        deadline = Deadline(self._timeout(timeout))
        try:
            reply = await self._stubs().health.Check(request, timeout=deadline.remaining(), metadata=trace_metadata())
        except aio.AioRpcError as exc:
            failure = exc
        else:
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        raise error_from_rpc(failure) from None

    # Plumbing

    def _stubs(self) -> _Stubs:
        if self._open_stubs is None:
            raise RuntimeError("AsyncClient is not open: use `async with` or `await client.open()`")
        return self._open_stubs

    def _timeout(self, timeout: float | None) -> float:
        return self._default_timeout if timeout is None else check_timeout(timeout)

    async def _unary(
        self, method: Callable[..., Any], payload: Callable[[], _Payload], replayable: bool, timeout: float | None
    ) -> Any:
        """One response: a unary or client-streaming call, retried once on a refused token."""
        deadline = Deadline(self._timeout(timeout))
        for attempt in (1, 2):
            token = await asyncio.to_thread(self._provider.token)
            request = payload()
            unary_call = method(request, timeout=deadline.remaining(), metadata=trace_metadata())
            try:
                return await unary_call
            except aio.AioRpcError as exc:
                failure = await _recovered(exc, unary_call)
            except asyncio.CancelledError:
                # grpc.aio cancels the call when the request iterable raises; surface that error
                # instead. A genuine cancellation of our task propagates unchanged.
                _reraise_request_error(request)
                raise
            if is_refusal(failure) and await self._retry_after_refusal(token, attempt == 1 and replayable):
                continue
            raise _failure(failure, request) from None
        raise AssertionError("unreachable")

    async def _stream(
        self, method: Callable[..., Any], payload: Callable[[], _Payload], replayable: bool, timeout: float | None
    ) -> AsyncIterator[Any]:
        """A response stream, retried once on a refused token if nothing was received yet."""
        deadline = Deadline(self._timeout(timeout))
        for attempt in (1, 2):
            token = await asyncio.to_thread(self._provider.token)
            request = payload()
            call = method(request, timeout=deadline.remaining(), metadata=trace_metadata())
            received = False
            try:
                async for reply in call:
                    received = True
                    yield reply
                return
            except aio.AioRpcError as exc:
                failure = await _recovered(exc, call)
            except asyncio.CancelledError:
                _reraise_request_error(request)
                raise
            finally:
                # No-op once the call is over; stops it when the caller abandons the iterator.
                call.cancel()
            may_retry = attempt == 1 and replayable and not received
            if is_refusal(failure) and await self._retry_after_refusal(token, may_retry):
                continue
            raise _failure(failure, request) from None

    async def _retry_after_refusal(self, token: str, may_retry: bool) -> bool:
        return await asyncio.to_thread(retry_after_refusal, self._provider, token, may_retry)


async def _number(value: int) -> calculator_pb2.Number:
    return calculator_pb2.Number(value=value)


async def _image_bytes(image: ImageSource) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return await asyncio.to_thread(read_image, image)


async def _recovered(exc: aio.AioRpcError, call: Any) -> aio.AioRpcError:
    """The server's own status for a call whose status grpc.aio lost (grpc/grpc#36066): a denied
    request stream repeats it, with the request id, in the response headers (which always arrive).
    Any other failure is returned as it is."""
    if not status_lost(exc):
        return exc
    try:
        announced = status_from_headers(await call.initial_metadata())
    except (aio.AioRpcError, AttributeError):
        return exc
    if announced is None:
        return exc
    code, request_id = announced
    trailers = aio.Metadata((REQUEST_ID_KEY, request_id)) if request_id else aio.Metadata()
    return aio.AioRpcError(code, aio.Metadata(), trailers, details=f"{code.name} (status read from the response "
                           "headers: grpc.aio lost the trailers, grpc/grpc#36066)")  # fmt: skip


def _reraise_request_error(request: _Payload) -> None:
    task = asyncio.current_task()
    if isinstance(request, AsyncRequestStream) and request.error is not None:
        if task is None or task.cancelling() == 0:
            raise request.error from None


def _failure(exc: aio.AioRpcError, request: _Payload) -> Exception:
    if isinstance(request, AsyncRequestStream):
        if request.error is not None:
            return request.error
        if status_lost(exc):
            return StatusLostError(
                "the server ended the stream while requests were still being sent, and grpc.aio lost "
                "its status (grpc/grpc#36066)",
                grpc.StatusCode.INTERNAL,
            )
    return error_from_rpc(exc)

