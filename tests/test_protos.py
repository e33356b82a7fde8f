"""The committed generated code matches the .proto sources and keeps the wire names."""

from __future__ import annotations

from aigis.calculator.v1 import calculator_pb2
from aigis.classifier.v1 import classifier_pb2
from aigis.tools.gen_protos import stale_files


def test_generated_code_is_not_stale() -> None:
    """Regenerating from the .proto files reproduces the committed code byte for byte."""
    assert stale_files() == []


def test_wire_names_are_versioned() -> None:
    """Service names are the documented, versioned wire names."""
    assert calculator_pb2.DESCRIPTOR.services_by_name["Calculator"].full_name == "aigis.calculator.v1.Calculator"
    service = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassificationService"]
    assert service.full_name == "aigis.classifier.v1.ImageClassificationService"
    assert set(service.methods_by_name) == {"ClassifyImage", "ClassifyStream", "ListModels"}


def test_seed_fields_keep_their_numbers() -> None:
    """The seed's field numbers are unchanged, so old clients stay compatible."""
    image = classifier_pb2.Image.DESCRIPTOR.fields_by_name
    result = classifier_pb2.ClassificationResult.DESCRIPTOR.fields_by_name
    add = calculator_pb2.AddRequest.DESCRIPTOR.fields_by_name
    assert (image["data"].number, result["category"].number, result["probability"].number) == (1, 1, 2)
    assert (add["a"].number, add["b"].number, calculator_pb2.AddReply.DESCRIPTOR.fields_by_name["sum"].number) == (
        1,
        2,
        1,
    )
