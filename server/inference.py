"""The Open Inference Protocol servicer (inference.GRPCInferenceService): thin, like the classifier's.

Convert protobuf to numpy (aigis.inference.tensors, which checks every tensor against the model's
signature before allocating), delegate to the model (on the server's executor, or through the
model's TensorBatcher when `[batching]` is on), convert back. The security layer has run before any
of this, including the per-model policy check. Bad input raises `server.errors` exceptions, which
the security layer turns into statuses; nothing here becomes INTERNAL on a client's input.

ModelStreamInfer (Triton's extension) answers each request in order. A request the model refuses
is answered in-stream with `error_message` and the stream goes on, as Triton does; a denial by the
policy ends the stream with PERMISSION_DENIED (the security layer's job, not this module's).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from importlib import metadata

import numpy as np
from grpc import aio

from aigis.inference import grpc_service_pb2 as pb
from aigis.inference import grpc_service_pb2_grpc as pb_grpc
from aigis.inference.tensors import TensorError, decode_inputs, encode_outputs, requested_outputs
from aigis.server.batching import TensorBatcher, executor_workers
from aigis.server.errors import InvalidArgument, ServiceError
from aigis.server.repository import PLATFORM, ModelRepository, OnnxModel

SERVER_NAME = "aigis"
# Requests declaring at most this many input elements are decoded on the event loop (~10 µs).
INLINE_DECODE_ELEMENTS = 4096


def _version() -> str:
    try:
        return metadata.version("aigis")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, executor: Executor, *,
                 max_batches_in_flight: int | None = None) -> None:
        self._repository = repository
        self._executor = executor
        self._version = _version()
        in_flight = max_batches_in_flight or executor_workers(executor)
        self.batchers: dict[tuple[str, str], TensorBatcher] = {
            (m.name, m.version): TensorBatcher(_runner(m), m.batching, executor, max_in_flight=in_flight,
                                               name=m.name)
            for m in repository.all() if m.batching.enabled and m.batching.max_batch_size > 1
        }
        # Told (model, version, seconds) after every inference (the server points it at metrics).
        self.on_inference: Callable[[str, str, float], None] | None = None

    def close(self) -> None:
        """Fail requests still queued for a batch (UNAVAILABLE); call on the loop after the graceful stop."""
        for batcher in self.batchers.values():
            batcher.close()

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One inference, from request message to response message."""
        loop = asyncio.get_running_loop()
        model = self._repository.get(request.model_name, request.model_version)
        # Decoding is linear in the elements (typed contents and BYTES are converted one by one):
        # small requests on the loop, anything larger on the executor.
        declared = sum(max(0, math.prod(t.shape)) for t in request.inputs)
        if declared <= INLINE_DECODE_ELEMENTS:
            inputs, outputs = _decode(request, model)
        else:
            inputs, outputs = await loop.run_in_executor(self._executor, _decode, request, model)
        started = loop.time()
        batcher = self.batchers.get((model.name, model.version))
        if batcher is not None:
            # Run every output, so batch-mates asking for different subsets share one run.
            every = await batcher.submit(inputs)  # type: ignore[arg-type]  # the batcher takes one array today
            results = {name: every[name] for name in outputs}
        else:
            if sum(a.size for a in inputs.values()) <= model.inline_max_elements:
                results = model.run(inputs, outputs)
            else:
                results = await loop.run_in_executor(self._executor, model.run, inputs, outputs)
        if self.on_inference is not None:
            self.on_inference(model.name, model.version, loop.time() - started)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        encode_outputs(response, results)
        return response

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        # Every model is loaded and checked before the server starts listening.
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        self._repository.get(request.name, request.version)  # NOT_FOUND for an unknown model
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        # Names no model: which models a caller may see is ModelMetadata's business, per model.
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=list(self._repository.versions(model.name)),
            platform=PLATFORM,
            inputs=[s.metadata() for s in model.inputs],
            outputs=[s.metadata() for s in model.outputs],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.infer(request)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self.infer(request)
            except ServiceError as exc:
                # Triton's streaming contract: the error travels in the stream and the stream goes on.
                yield pb.ModelStreamInferResponse(error_message=exc.message)
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)


def _decode(request: pb.ModelInferRequest, model: OnnxModel) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        return decode_inputs(request, model.inputs), requested_outputs(request, model.outputs)
    except TensorError as exc:
        raise InvalidArgument(str(exc)) from None


def _runner(model: OnnxModel) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return model.run(inputs, model.output_names)

    return run
