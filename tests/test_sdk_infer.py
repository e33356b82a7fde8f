"""The SDK's Open Inference Protocol calls (sync and asyncio) against the real stack: numbers equal to
the model run locally, streams, metadata, and the same typed errors with request ids."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from aigis.client_sdk import (
    AsyncClient,
    Client,
    ClientCredentials,
    InvalidArgumentError,
    ModelMetadata,
    NotFoundError,
    PermissionDeniedError,
    TensorInfo,
)
from aigis.server.config import BUNDLED_MODELS
from aigis.server.model import OnnxClassifier
from tests.conftest import CALC, PREDICT, RunningStack

SCOPES = {"demo": (CALC, PREDICT), "calc-only": (CALC,)}


def _kwargs(stack: RunningStack, name: str) -> dict[str, Any]:
    ca, cert, key = stack.client_files(name)
    tokens = ClientCredentials(stack.token_url, ca=ca, cert=cert, key=key, client_id=name, scopes=SCOPES[name])
    return {"ca": ca, "cert": cert, "key": key, "token_provider": tokens}


@pytest.fixture(scope="module")
def digits() -> OnnxClassifier:
    return OnnxClassifier.load(BUNDLED_MODELS / "digits")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32)


def test_infer_sync_matches_the_model_run_locally(stack: RunningStack, digits: OnnxClassifier) -> None:
    """infer() returns numpy arrays equal, bit for bit, to the same ONNX model run in-process."""
    x = pixels(3)
    with Client(stack.target, **_kwargs(stack, "demo")) as client:
        out = client.infer("digits", {"pixels": x})
        subset = client.infer("digits", {"pixels": x}, outputs=["probabilities"], version="1")
        meta = client.model_metadata("digits")
        assert client.model_ready("digits")
    assert set(out) == {"probabilities"}
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (3, 10)
    assert out["probabilities"].tobytes() == digits.predict(x).tobytes() == subset["probabilities"].tobytes()
    assert meta == ModelMetadata("digits", ("1",), "onnxruntime_onnx", (TensorInfo("pixels", "FP32", (-1, 64)),),
                                 (TensorInfo("probabilities", "FP32", (-1, 10)),))


def test_infer_stream_sync_answers_in_order_and_raises_at_a_refused_request(stack: RunningStack,
                                                                          digits: OnnxClassifier) -> None:
    """infer_stream yields one result per input, in order; a refused request raises its typed error."""
    items = [{"pixels": pixels(1, seed)} for seed in range(3)]
    with Client(stack.target, **_kwargs(stack, "demo")) as client:
        results = list(client.infer_stream("digits", items))
        got: list[Any] = []
        with pytest.raises(InvalidArgumentError, match="input 'pixels': shape \\[1, 63\\]"):
            for result in client.infer_stream("digits", [items[0], {"pixels": np.zeros((1, 63), np.float32)}]):
                got.append(result)
    assert [r["probabilities"].tobytes() for r in results] == [digits.predict(i["pixels"]).tobytes() for i in items]
    assert len(got) == 1


@pytest.mark.parametrize(("client_name", "model", "error"), [
    ("demo", "nope", NotFoundError),
    ("calc-only", "digits", PermissionDeniedError),
])
def test_infer_errors_are_typed_with_request_id(stack: RunningStack, client_name: str, model: str,
                                                error: type[Exception]) -> None:
    """Failures are the SDK's typed errors carrying the server's request id (also in the audit log when denied)."""
    with Client(stack.target, **_kwargs(stack, client_name)) as client, pytest.raises(error) as raised:
        client.infer(model, {"pixels": pixels(1)})
    request_id = raised.value.request_id  # type: ignore[attr-defined]
    assert request_id
    if error is PermissionDeniedError:
        assert any(r["request_id"] == request_id and r["model"] == "digits" for r in stack.audit_records())


def test_bad_inputs_are_refused_before_sending(stack: RunningStack) -> None:
    """An input that is not a mapping of arrays is a TypeError in the caller, not a server round trip."""
    with Client(stack.target, **_kwargs(stack, "demo")) as client:
        with pytest.raises(TypeError):
            client.infer("digits", {})
        with pytest.raises(TypeError, match="no Open Inference Protocol datatype"):
            client.infer("digits", {"pixels": np.zeros((1, 64), np.complex64)})


def test_infer_aio(stack: RunningStack, digits: OnnxClassifier) -> None:
    """The asyncio client: infer, infer_stream (from an async iterable), metadata, typed errors."""
    x = pixels(2)

    async def items() -> Any:
        for seed in range(2):
            yield {"pixels": pixels(1, seed)}

    async def scenario() -> tuple[Any, ...]:
        async with AsyncClient(stack.target, **_kwargs(stack, "demo")) as client:
            out = await client.infer("digits", {"pixels": x})
            streamed = [r async for r in client.infer_stream("digits", items())]
            meta = await client.model_metadata("digits")
            ready = await client.model_ready("digits", "1")
            try:
                await client.infer("nope", {"pixels": x})
            except NotFoundError as exc:
                missing = exc
            return out, streamed, meta, ready, missing

    out, streamed, meta, ready, missing = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert out["probabilities"].tobytes() == digits.predict(x).tobytes()
    assert [r["probabilities"].tobytes() for r in streamed] == [digits.predict(pixels(1, s)).tobytes() for s in (0, 1)]
    assert meta.name == "digits" and ready
    assert missing.request_id
