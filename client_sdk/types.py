"""Results the SDK returns: frozen dataclasses, so callers never handle protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass

from aigis.calculator.v1 import calculator_pb2
from aigis.classifier.v1 import classifier_pb2


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
