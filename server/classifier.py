"""The image classification servicer: convert protobuf, delegate to images/model, convert back.

Decoding and inference are CPU work, so they never run on the event loop: encoded images are
decoded on threads of their own (a hostile image costs its bounded decode there, never an inference
thread; small raw images, whose cost is bounded, on the loop), then inference runs on the executor
the server owns. A model with `[batching] enabled` in its model.toml gets a DynamicBatcher: the
decoded tensor joins a batch (server/batching.py); answers are the same bits as unbatched. Bad input
raises `server.errors` exceptions; the interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from grpc import aio

from aigis.auth.policy import ModelRef
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.server import images
from aigis.server.batching import DynamicBatcher
from aigis.server.errors import InvalidArgument
from aigis.server.images import DEFAULT_LIMITS, ImageLimits
from aigis.server.model import ModelRegistry, OnnxClassifier

# Raw images and model inputs up to this many values are prepared on the event loop in the batched
# path (see _cheap_to_prepare): 64x64 raw pixels into the 8x8 digits model measured ~22 µs.
INLINE_MAX_VALUES = 4096
# Threads that decode encoded images (PNG/JPEG), apart from the inference threads.
DECODE_THREADS = 2


def resolve_top_k(top_k: int, n_labels: int) -> int:
    """The proto's top_k: 0 means 1; negative or more than the model's labels is refused."""
    if top_k == 0:
        return 1
    if not 1 <= top_k <= n_labels:
        raise InvalidArgument(f"top_k must be between 0 and the model's label count {n_labels}; got {top_k}")
    return top_k


class ImageClassificationServicer(classifier_pb2_grpc.ImageClassificationServiceServicer):
    def __init__(self, registry: ModelRegistry, executor: Executor,
                 limits: ImageLimits = DEFAULT_LIMITS, *, max_batches_in_flight: int | None = None,
                 decode_threads: int = DECODE_THREADS) -> None:
        """`max_batches_in_flight` (default: the executor's thread count) caps each batcher.

        Encoded images are decoded on `decode_threads` threads of their own, so costly decodes
        queue behind each other and never hold the inference threads (`executor`).
        """
        self._registry = registry
        self._executor = executor
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="aigis-decode")
        self._limits = limits
        # Whether the current caller may use a model (set by the server from its policy); None: all.
        self.may_use: Callable[[ModelRef], bool] | None = None
        # Told (model, version, seconds) after every classification (the server points it at metrics).
        self.on_inference: Callable[[str, str, float], None] | None = None
        self.batchers: dict[str, DynamicBatcher] = {
            m.name: DynamicBatcher.for_model(m, executor, max_in_flight=max_batches_in_flight)
            for m in registry.models if m.config.batching.enabled
        }

    def close(self) -> None:
        """Fail requests still queued for a batch (UNAVAILABLE); call on the loop, after the server's
        graceful stop has let running calls finish."""
        for batcher in self.batchers.values():
            batcher.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _classify(self, request: classifier_pb2.Image) -> classifier_pb2.ClassificationResult:
        """The whole unbatched path in the calling thread (a reference for tests and tools)."""
        model = self._registry.get(request.model)
        k = resolve_top_k(request.top_k, len(model.labels))
        return _result(model, model.top(_predict_one(model, self._prepare(request, model)), k))

    def _prepare(self, request: classifier_pb2.Image, model: OnnxClassifier,
                 budget: images.DecodeBudget | None = None) -> np.ndarray:
        """Decode and normalise, one image without the batch dimension (a decoding thread)."""
        return images.prepare(request.data, request.width, request.height, model.config, self._limits, budget)[0]

    async def _run(self, request: classifier_pb2.Image,
                   context: aio.ServicerContext | None = None) -> classifier_pb2.ClassificationResult:
        started = time.perf_counter()
        result = await self._answer(request, context)
        if self.on_inference is not None:
            self.on_inference(result.model, self._registry.get(result.model).config.version,
                              time.perf_counter() - started)
        return result

    async def _answer(self, request: classifier_pb2.Image,
                      context: aio.ServicerContext | None = None) -> classifier_pb2.ClassificationResult:
        loop = asyncio.get_running_loop()
        model = self._registry.get(request.model)
        k = resolve_top_k(request.top_k, len(model.labels))
        if _cheap_to_prepare(request, model):
            # A thread hop per request for ~20 µs of bounded work cost 0.13 ms p50 at 1 in flight
            # (digits, measured).
            row = self._prepare(request, model)
        else:
            # Stops at its next checkpoint once the call is cancelled or past its deadline.
            budget = images.DecodeBudget.for_call(context.time_remaining() if context else None, self._limits)
            try:
                row = await loop.run_in_executor(self._decoder, self._prepare, request, model, budget)
            except asyncio.CancelledError:
                budget.cancel()
                raise
        batcher = self.batchers.get(model.name)
        if batcher is None:
            probabilities = await loop.run_in_executor(self._executor, _predict_one, model, row)
        else:
            probabilities = await batcher.submit(row)
        return _result(model, model.top(probabilities, k))

    async def ClassifyImage(
        self, request: classifier_pb2.Image, context: aio.ServicerContext
    ) -> classifier_pb2.ClassificationResult:
        return await self._run(request, context)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[classifier_pb2.Image], context: aio.ServicerContext
    ) -> AsyncIterator[classifier_pb2.ClassificationResult]:
        # One at a time keeps replies in request order; a bad image ends the stream with its status.
        async for request in request_iterator:
            yield await self._run(request, context)

    async def ListModels(
        self, request: classifier_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> classifier_pb2.ListModelsReply:
        # Only what this caller may classify with: a model it cannot use is not even named.
        may_use = self.may_use
        return classifier_pb2.ListModelsReply(
            models=[_model_info(m, m.name == self._registry.default_name) for m in self._registry.models
                    if may_use is None or may_use(ModelRef(m.name, m.config.version))]
        )


def _predict_one(model: OnnxClassifier, row: np.ndarray) -> np.ndarray:
    """Runs on an inference thread: the model's output for one image."""
    return model.predict(row[np.newaxis])[0]


def _cheap_to_prepare(request: classifier_pb2.Image, model: OnnxClassifier) -> bool:
    """Raw pixels into a small model: bounded work (~15-25 µs), cheaper than the thread hop it saves.

    Only raw grayscale qualifies: its cost is fixed by `len(data)` and the model's input size. An
    encoded PNG/JPEG does not, however few bytes it has: its header may declare 4096x4096 pixels.
    """
    config = model.config
    return (request.width > 0 and request.height > 0
            and len(request.data) <= INLINE_MAX_VALUES
            and request.width * request.height <= INLINE_MAX_VALUES
            and config.width * config.height * config.channels <= INLINE_MAX_VALUES)


def _result(model: OnnxClassifier, top: list[tuple[str, float]]) -> classifier_pb2.ClassificationResult:
    return classifier_pb2.ClassificationResult(
        category=top[0][0],
        probability=top[0][1],
        model=model.name,
        top=[classifier_pb2.LabelProbability(label=label, probability=p) for label, p in top],
    )


def _model_info(model: OnnxClassifier, is_default: bool) -> classifier_pb2.ModelInfo:
    info = model.info
    return classifier_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        input_shape=list(info.input_shape),
        labels=list(info.labels),
        color_mode=info.color_mode,
        image_width=info.image_width,
        image_height=info.image_height,
        is_default=is_default,
    )
