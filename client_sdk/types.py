"""Results the SDK returns: frozen dataclasses, so callers never handle protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass

from aigis.calculator.v1 import calculator_pb2
from aigis.classifier.v1 import classifier_pb2
from aigis.inference import grpc_service_pb2 as inference_pb2


@dataclass(frozen=True, slots=True)
class SumResult:
    """The total of a streamed Sum and how many numbers the server added."""

    sum: int
    count: int

    @staticmethod
    def from_proto(reply: calculator_pb2.SumReply) -> SumResult:
        return SumResult(sum=reply.sum, count=reply.count)


@dataclass(frozen=True, slots=True)
class LabelProbability:
    label: str
    probability: float


@dataclass(frozen=True, slots=True)
class Classification:
    """The best label, its probability, the model that answered, and the top-k labels best first."""

    category: str
    probability: float
    model: str
    top: tuple[LabelProbability, ...]

    @staticmethod
    def from_proto(result: classifier_pb2.ClassificationResult) -> Classification:
        return Classification(
            category=result.category,
            probability=result.probability,
            model=result.model,
            top=tuple(LabelProbability(item.label, item.probability) for item in result.top),
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the server hosts and how it prepares images for it."""

    name: str
    version: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    color_mode: str
    image_width: int
    image_height: int
    is_default: bool

    @staticmethod
    def from_proto(info: classifier_pb2.ModelInfo) -> ModelInfo:
        return ModelInfo(
            name=info.name,
            version=info.version,
            input_shape=tuple(info.input_shape),
            labels=tuple(info.labels),
            color_mode=info.color_mode,
            image_width=info.image_width,
            image_height=info.image_height,
            is_default=info.is_default,
        )


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One input or output of a model: name, protocol datatype (FP32, INT64, ...), shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What the Open Inference Protocol says about a model (ModelMetadata)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @staticmethod
    def from_proto(reply: inference_pb2.ModelMetadataResponse) -> ModelMetadata:
        def tensors(items: object) -> tuple[TensorInfo, ...]:
            return tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in items)  # type: ignore[attr-defined]

        return ModelMetadata(
            name=reply.name,
            versions=tuple(reply.versions),
            platform=reply.platform,
            inputs=tensors(reply.inputs),
            outputs=tensors(reply.outputs),
        )
