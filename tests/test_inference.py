"""The Open Inference Protocol service end to end: a real server over mTLS with real tokens, real ONNX
models (the bundled digits, and non-image models generated at test time), numbers checked."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from calls import bearer, channel, issuer_token, run
from onnx_models import IDENTITY_TYPES, affine_expected, write_affine, write_identity, write_two_inputs
from private_stack import private_stack

from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.inference import grpc_service_pb2 as pb
from aigis.inference import grpc_service_pb2_grpc as pb_grpc
from aigis.inference.tensors import DATATYPES, decode_outputs, encode_inputs
from aigis.server import images
from aigis.server.config import BUNDLED_MODELS
from aigis.server.model import ModelConfig

DIGITS = BUNDLED_MODELS / "digits"
BATCHING_TOML = """
[batching]
enabled = true
max_batch_size = 8
max_queue_delay_us = 20000
max_queue_size = 64
"""


def build_models(root: Path) -> Path:
    models = root / "models"
    shutil.copytree(DIGITS, models / "digits")
    write_affine(models / "affine" / "model.onnx")
    write_affine(models / "versioned" / "1" / "model.onnx", seed=1)  # Triton's layout
    write_affine(models / "versioned" / "2" / "model.onnx", seed=2)
    write_identity(models / "types" / "model.onnx")
    # FP16 has no typed contents field, so a model taking it cannot be fed typed contents.
    write_identity(models / "typed" / "model.onnx", tuple(t for t in IDENTITY_TYPES if t != "FP16"))
    write_two_inputs(models / "add2" / "model.onnx")
    write_affine(models / "batched" / "model.onnx")  # the same weights as `affine`
    (models / "batched" / "model.toml").write_text(BATCHING_TOML)
    return models


@pytest.fixture(scope="module")
def oip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("oip")
    with private_stack(root, models=build_models(root)) as stack:
        yield stack


@pytest.fixture(scope="module")
def call(oip: Any) -> Iterator[Any]:
    """call(method, request) with demo's certificate and token; returns an Outcome."""
    with channel(oip, "demo") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        metadata = bearer(issuer_token(oip, "demo"))

        def invoke(method: str, request: Any) -> Any:
            return run(lambda: getattr(stub, method)(request, metadata=metadata, timeout=10))

        invoke.stub = stub  # type: ignore[attr-defined]
        invoke.metadata = metadata  # type: ignore[attr-defined]
        yield invoke


def infer_request(model: str, inputs: dict[str, np.ndarray], **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    encode_inputs(request, inputs)
    return request


def x_rows(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_server_live_ready_and_metadata(call: Any) -> None:
    """ServerLive/Ready say yes; ServerMetadata names the server and no model."""
    assert call("ServerLive", pb.ServerLiveRequest()).value.live is True
    assert call("ServerReady", pb.ServerReadyRequest()).value.ready is True
    meta = call("ServerMetadata", pb.ServerMetadataRequest()).value
    assert meta.name == "aigis" and meta.version


def test_model_metadata_comes_from_the_onnx_session(call: Any) -> None:
    """A directory holding only model.onnx is served; its signature is read from the session."""
    meta = call("ModelMetadata", pb.ModelMetadataRequest(name="affine")).value
    assert (meta.name, list(meta.versions), meta.platform) == ("affine", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    assert outputs == [("y", "FP32", [-1, 3]), ("s", "FP32", [-1, 1])]
    digits = call("ModelMetadata", pb.ModelMetadataRequest(name="digits")).value
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.inputs] == [("pixels", "FP32", [-1, 64])]


def test_model_infer_numbers_raw_and_typed(call: Any) -> None:
    """Raw and typed inputs give the numbers numpy computes; the id is echoed; outputs come back raw."""
    x = x_rows(5)
    raw = call("ModelInfer", infer_request("affine", {"x": x}, id="req-1")).value
    typed_request = pb.ModelInferRequest(model_name="affine", id="req-2")
    tensor = typed_request.inputs.add(name="x", datatype="FP32", shape=[5, 4])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed = call("ModelInfer", typed_request).value
    expected = affine_expected(x)
    for response, request_id in ((raw, "req-1"), (typed, "req-2")):
        assert (response.id, response.model_name, response.model_version) == (request_id, "affine", "1")
        assert len(response.raw_output_contents) == 2
        out = decode_outputs(response)
        assert set(out) == {"y", "s"}
        for name in ("y", "s"):
            assert out[name].dtype == np.float32
            np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-5)
    assert decode_outputs(raw)["y"].tobytes() == decode_outputs(typed)["y"].tobytes()


def test_requested_outputs_subset_in_order(call: Any) -> None:
    """Only the requested outputs are answered, in the order asked."""
    request = infer_request("affine", {"x": x_rows(2)})
    request.outputs.add(name="s")
    response = call("ModelInfer", request).value
    assert [o.name for o in response.outputs] == ["s"]
    np.testing.assert_allclose(decode_outputs(response)["s"], affine_expected(x_rows(2))["s"], rtol=1e-5)


def test_triton_layout_serves_every_version_newest_by_default(call: Any) -> None:
    """<model>/<version>/model.onnx: versions listed, the newest answers when none is named."""
    meta = call("ModelMetadata", pb.ModelMetadataRequest(name="versioned")).value
    assert list(meta.versions) == ["1", "2"]
    x = x_rows(3)
    newest = call("ModelInfer", infer_request("versioned", {"x": x})).value
    first = call("ModelInfer", infer_request("versioned", {"x": x}, model_version="1")).value
    assert (newest.model_version, first.model_version) == ("2", "1")
    np.testing.assert_allclose(decode_outputs(newest)["y"], affine_expected(x, seed=2)["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode_outputs(first)["y"], affine_expected(x, seed=1)["y"], rtol=1e-5, atol=1e-5)
    assert call("ModelReady", pb.ModelReadyRequest(name="versioned", version="1")).value.ready


@pytest.mark.parametrize("datatype", sorted(IDENTITY_TYPES))
def test_every_datatype_round_trips(call: Any, datatype: str) -> None:
    """Each protocol datatype goes through the model and back unchanged, raw and (where the protocol has a
    typed field) typed; variable dimensions take any size."""
    rng = np.random.default_rng(3)
    shape = (2, 3)
    if datatype == "BYTES":
        value = np.array([[b"a", b"", "\u00e9\u6f22".encode()], [b"xyz", b"q" * 40, b"\x00"]], dtype=object)
    elif datatype == "BOOL":
        value = rng.integers(0, 2, shape).astype(bool)
    elif DATATYPES[datatype].dtype.kind == "f":
        value = rng.standard_normal(shape).astype(DATATYPES[datatype].dtype)
    else:
        info = np.iinfo(DATATYPES[datatype].dtype)
        value = rng.integers(info.min, info.max, shape, dtype=DATATYPES[datatype].dtype, endpoint=True)
    inputs = {f"in_{name}": np.zeros((1, 1), dtype=DATATYPES[name].dtype) if name != "BYTES"
              else np.array([[b""]], dtype=object) for name in IDENTITY_TYPES}
    inputs[f"in_{datatype}"] = value
    request = infer_request("types", inputs)
    request.outputs.add(name=f"out_{datatype}")
    out = decode_outputs(call("ModelInfer", request).value)[f"out_{datatype}"]
    assert out.shape == shape and out.tolist() == value.tolist()
    field = DATATYPES[datatype].contents_field
    if not field:
        return
    typed = pb.ModelInferRequest(model_name="typed")
    for name, array in inputs.items():
        if name == "in_FP16":
            continue
        tensor = typed.inputs.add(name=name, datatype=name[3:], shape=array.shape)
        getattr(tensor.contents, DATATYPES[name[3:]].contents_field).extend(array.reshape(-1).tolist())
    typed.outputs.add(name=f"out_{datatype}")
    assert decode_outputs(call("ModelInfer", typed).value)[f"out_{datatype}"].tolist() == value.tolist()


def _bad(mutate: Any, model: str = "affine") -> pb.ModelInferRequest:
    request = infer_request(model, {"x": x_rows(2)})
    mutate(request)
    return request


def _typed_x(values: list[float], shape: list[int], field: str = "fp32_contents") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _typed_model_request(bytes_input: np.ndarray) -> pb.ModelInferRequest:
    """A request for the `typed` model: `bytes_input` as in_BYTES, 1x1 zeros for the others."""
    return infer_request("typed", {f"in_{t}": bytes_input if t == "BYTES" else np.zeros((1, 1), DATATYPES[t].dtype)
                                   for t in IDENTITY_TYPES if t != "FP16"})


INVALID = {
    "unknown-input": (lambda: _bad(lambda r: setattr(r.inputs[0], "name", "nope")), "input 'nope': the model has no"),
    "missing-input": (lambda: pb.ModelInferRequest(model_name="affine"), "input 'x': missing"),
    "wrong-datatype": (lambda: _bad(lambda r: setattr(r.inputs[0], "datatype", "FP64")),
                       "input 'x': datatype 'FP64'; the model takes FP32"),
    "unknown-datatype": (lambda: _bad(lambda r: setattr(r.inputs[0], "datatype", "FLOAT")),
                         "input 'x': datatype 'FLOAT'"),
    "wrong-rank": (lambda: _bad(lambda r: r.inputs[0].shape.append(1)), "input 'x': shape [2, 4, 1] does not match"),
    "wrong-fixed-dim": (lambda: _bad(lambda r: r.inputs[0].shape.__setitem__(1, 5)), "input 'x': shape [2, 5]"),
    "negative-dim": (lambda: _bad(lambda r: r.inputs[0].shape.__setitem__(0, -2)), "negative dimension"),
    "raw-too-short": (lambda: _bad(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 31)),
                      "input 'x': raw data has 31 bytes; shape [2, 4] of FP32 needs 32"),
    "raw-too-long": (lambda: _bad(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 36)),
                     "raw data has 36 bytes"),
    "shape-claims-too-many": (lambda: _bad(lambda r: r.inputs[0].shape.__setitem__(0, 10**9)), "input 'x': "),
    "huge-shape-product": (lambda: _bad(lambda r: r.inputs[0].shape.__setitem__(0, 2**61)), "elements; at most"),
    "too-many-bytes-elements": (lambda: _typed_model_request(np.full((1, 70_000), b"", dtype=object)),
                                "input 'in_BYTES': 70000 elements; at most 65536 per BYTES tensor"),
    "typed-far-too-many-values": (lambda: _typed_x([1.0] * 20_000, [2, 4]),
                                  "input 'x': 20000 values in fp32_contents; shape [2, 4] needs 8"),
    "raw-and-typed": (lambda: _bad(lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
                      "input 'x': has both contents and raw_input_contents"),
    "raw-count-mismatch": (lambda: _bad(lambda r: r.raw_input_contents.append(b"")),
                           "raw_input_contents has 2 entries for 1 inputs"),
    "duplicate-input": (lambda: _bad(lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[2, 4]),
                                                r.raw_input_contents.append(b"\0" * 32))), "given more than once"),
    "typed-count": (lambda: _typed_x([1.0] * 7, [2, 4]), "input 'x': 7 values in fp32_contents; shape [2, 4] needs 8"),
    "typed-wrong-field": (lambda: _typed_x([1] * 8, [2, 4], "int_contents"),
                          "input 'x': datatype FP32 is carried in fp32_contents, not int_contents"),
    "bytes-not-utf8": (lambda: _typed_model_request(np.array([[b"\xff"]], dtype=object)),
                       "input 'in_BYTES': the model takes text; BYTES elements must be UTF-8"),
    "unknown-output": (lambda: _bad(lambda r: r.outputs.add(name="z")), "output 'z': the model has no such output"),
    "duplicate-output": (lambda: _bad(lambda r: (r.outputs.add(name="y"), r.outputs.add(name="y"))),
                         "output 'y': requested more than once"),
    "inconsistent-dims": (lambda: infer_request("add2", {"a": np.ones((2, 3), np.float32),
                                                         "b": np.ones((2, 5), np.float32)}),
                          "model 'add2' cannot run on these inputs"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_mismatch_is_invalid_argument_naming_the_tensor(call: Any, case: str) -> None:
    """Every mismatch is INVALID_ARGUMENT with a message that names the tensor and what was expected."""
    build, message = INVALID[case]
    outcome = call("ModelInfer", build())
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert message in outcome.details, outcome.details
    assert outcome.request_id


def test_typed_integers_out_of_range_are_refused(call: Any) -> None:
    """A typed INT8 value outside -128..127 is refused, not wrapped around."""
    request = pb.ModelInferRequest(model_name="typed")
    for name in IDENTITY_TYPES:
        if name == "FP16":
            continue
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=[1, 1])
        getattr(tensor.contents, DATATYPES[name].contents_field).append(b"" if name == "BYTES" else 300 if name ==
                                                                        "INT8" else 0)
    outcome = call("ModelInfer", request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_INT8': values outside the range of INT8" in outcome.details


@pytest.mark.parametrize(("name", "version"), [("nope", ""), ("affine", "2"), ("versioned", "9")])
def test_unknown_model_or_version_is_not_found(call: Any, name: str, version: str) -> None:
    """Unknown model or version: NOT_FOUND for every RPC that names one."""
    for method, request in (
        ("ModelInfer", infer_request(name, {"x": x_rows(1)}, model_version=version)),
        ("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version)),
        ("ModelReady", pb.ModelReadyRequest(name=name, version=version)),
    ):
        assert call(method, request).code == grpc.StatusCode.NOT_FOUND, method


def test_digits_by_image_and_by_tensor_agree(oip: Any, call: Any) -> None:
    """The bundled digits model answers ClassifyImage (an image) and ModelInfer (its preprocessed tensor)
    with the same probabilities."""
    config = ModelConfig.from_toml(DIGITS / "model.toml")
    with channel(oip, "demo") as ch:
        classifier = classifier_pb2_grpc.ImageClassificationServiceStub(ch)
        for digit in (0, 3, 7):
            png = (DIGITS / "samples" / f"{digit}.png").read_bytes()
            by_image = classifier.ClassifyImage(classifier_pb2.Image(data=png, model="digits", top_k=10),
                                                metadata=call.metadata, timeout=10)
            tensor = images.prepare(png, 0, 0, config, images.DEFAULT_LIMITS)
            response = call("ModelInfer", infer_request("digits", {"pixels": tensor})).value
            probabilities = decode_outputs(response)["probabilities"][0]
            labels = (DIGITS / "labels.txt").read_text().split()
            by_tensor = sorted(((labels[i], float(p)) for i, p in enumerate(probabilities)),
                               key=lambda lp: -lp[1])
            assert by_image.category == by_tensor[0][0] == str(digit)
            assert [(t.label, t.probability) for t in by_image.top] == [
                (label, np.float32(p)) for label, p in by_tensor
            ]


def test_stream_answers_in_order_and_reports_errors_in_stream(call: Any) -> None:
    """ModelStreamInfer answers each request in order; a bad one gets error_message and the stream goes on."""
    x = x_rows(2)
    requests = [
        infer_request("affine", {"x": x}, id="a"),
        _bad(lambda r: setattr(r.inputs[0], "datatype", "INT8")),
        infer_request("versioned", {"x": x}, id="c", model_version="1"),
    ]
    replies = list(call.stub.ModelStreamInfer(iter(requests), metadata=call.metadata, timeout=10))
    assert len(replies) == 3
    assert replies[0].infer_response.id == "a" and not replies[0].error_message
    assert "input 'x': datatype 'INT8'" in replies[1].error_message
    assert (replies[2].infer_response.id, replies[2].infer_response.model_version) == ("c", "1")
    np.testing.assert_allclose(decode_outputs(replies[2].infer_response)["y"], affine_expected(x, seed=1)["y"],
                               rtol=1e-5, atol=1e-5)


def test_dynamic_batching_is_bit_identical(oip: Any, call: Any) -> None:
    """Concurrent ModelInfer calls to a batching model share runs and get the same bits as unbatched."""
    batcher = oip.server.inference.batchers[("batched", "1")]
    before = batcher.stats()
    rows = [x_rows(1 + i % 3, seed=i) for i in range(24)]

    def one(x: np.ndarray) -> tuple[bytes, bytes]:
        batched = call.stub.ModelInfer(infer_request("batched", {"x": x}), metadata=call.metadata, timeout=10)
        alone = call.stub.ModelInfer(infer_request("affine", {"x": x}), metadata=call.metadata, timeout=10)
        return decode_outputs(batched)["y"].tobytes(), decode_outputs(alone)["y"].tobytes()

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, rows))
    assert all(batched == alone for batched, alone in results)
    after = batcher.stats()
    assert after.requests - before.requests == 24
    assert max(size for size, count in after.sizes.items() if count > before.sizes.get(size, 0)) > 3


def test_batching_refuses_a_request_larger_than_a_batch(call: Any) -> None:
    """A request whose first dimension exceeds max_batch_size is INVALID_ARGUMENT, naming the limit."""
    outcome = call("ModelInfer", infer_request("batched", {"x": x_rows(9)}))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "from 1 to 8" in outcome.details


def test_per_model_metrics(oip: Any, call: Any) -> None:
    """Inferences are counted per model and version."""
    call("ModelInfer", infer_request("versioned", {"x": x_rows(1)}, model_version="1"))
    registry = oip.server.metrics.registry
    value = registry.get_sample_value("aigis_model_inferences_total", {"model": "versioned", "version": "1"})
    assert value is not None and value >= 1


def test_no_token_is_unauthenticated(oip: Any) -> None:
    """The new service sits behind the same checks: no token, no inference."""
    with channel(oip, "demo") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        outcome = run(lambda: stub.ModelInfer(infer_request("affine", {"x": x_rows(1)}), timeout=10))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED and outcome.request_id
    assert any(r["request_id"] == outcome.request_id and r["reason"] == "token_missing" for r in oip.audit_records())
