"""Drives aigis with the real `tritonclient.grpc.InferenceServerClient`, in a process of its own.

tritonclient registers the same `inference.*` protobuf symbols as aigis.inference, and protobuf's
default descriptor pool refuses a second definition, so the two cannot share a process. The test
(tests/test_tritonclient.py) runs this script, passing a JSON spec on stdin (tokens never appear
on a command line), and reads one JSON document of results from stdout. Only tritonclient and
numpy are imported here.

Two ways to send the token, both as a user would: `headers=` on each call, and a client plugin.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.utils import InferenceServerException


class BearerToken(InferenceServerClientPlugin):
    """Adds `authorization: Bearer <token>` to every call the client makes (streams included)."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def __call__(self, request: Any) -> None:
        request.headers["authorization"] = self._value


def client(spec: dict[str, Any], name: str) -> grpcclient.InferenceServerClient:
    files = spec["clients"][name]
    return grpcclient.InferenceServerClient(
        spec["target"], ssl=True, root_certificates=spec["ca"], private_key=files["key"],
        certificate_chain=files["cert"],
    )


def failure(exc: InferenceServerException) -> dict[str, Any]:
    """Status, message and aigis's request id. tritonclient drops trailing metadata, but raises its
    exception from the grpc error (`raise ... from None` keeps it as __context__)."""
    cause = exc.__context__
    trailers = dict(cause.trailing_metadata() or ()) if hasattr(cause, "trailing_metadata") else {}
    return {"status": exc.status(), "message": exc.message(), "request_id": trailers.get("aigis-request-id")}


def attempt(call: Any) -> dict[str, Any]:
    try:
        return {"ok": call()}
    except InferenceServerException as exc:
        return {"error": failure(exc)}


def affine_inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def infer_affine(c: grpcclient.InferenceServerClient, model: str, x: np.ndarray, request_id: str,
                 headers: dict[str, str] | None) -> dict[str, Any]:
    result = c.infer(model, affine_inputs(x), outputs=[grpcclient.InferRequestedOutput("y")],
                     request_id=request_id, headers=headers)
    response = result.get_response()
    return {"id": response.id, "model": response.model_name, "version": response.model_version,
            "outputs": [o.name for o in response.outputs], "y": result.as_numpy("y").tolist()}


def stream(c: grpcclient.InferenceServerClient, requests: list[tuple[str, np.ndarray, str]],
           headers: dict[str, str] | None) -> list[dict[str, Any]]:
    """start_stream / async_stream_infer / stop_stream; every callback's result or error, in order."""
    results: queue.Queue[dict[str, Any]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            results.put({"error": {"status": error.status(), "message": error.message()}})
        else:
            response = result.get_response()
            results.put({"id": response.id, "model": response.model_name, "y": result.as_numpy("y").tolist()})

    c.start_stream(callback=callback, headers=headers, stream_timeout=20)
    for model, x, request_id in requests:
        try:
            c.async_stream_infer(model, affine_inputs(x), request_id=request_id,
                                 outputs=[grpcclient.InferRequestedOutput("y")])
        except InferenceServerException:
            break  # the server already ended the stream (a denial); the callback has the status
    c.stop_stream()  # waits for the stream to end
    out = []
    while not results.empty():
        out.append(results.get_nowait())
    return out


def every_datatype(c: grpcclient.InferenceServerClient, headers: dict[str, str]) -> dict[str, Any]:
    """FP16, BOOL, INT64, UINT8 and BYTES through the identity model and back, as tritonclient encodes them."""
    values = {
        "FP16": np.array([[1.5, -2.25]], dtype=np.float16),
        "BOOL": np.array([[True, False]]),
        "INT64": np.array([[2**40, -7]], dtype=np.int64),
        "UINT8": np.array([[0, 255]], dtype=np.uint8),
        "BYTES": np.array([[b"caf\xc3\xa9", b""]], dtype=np.object_),
    }
    inputs = []
    for datatype, array in values.items():
        tensor = grpcclient.InferInput(f"in_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = c.infer("types", inputs, headers=headers)
    return {d: result.as_numpy(f"out_{d}").tolist() == values[d].tolist() for d in values}


def main() -> int:
    spec = json.load(sys.stdin)
    x = np.array(spec["x"], dtype=np.float32)
    demo_headers = {"authorization": f"Bearer {spec['tokens']['demo']}"}
    out: dict[str, Any] = {}
    with client(spec, "demo") as demo:
        out["live"] = attempt(lambda: demo.is_server_live(headers=demo_headers))
        out["ready"] = attempt(lambda: demo.is_server_ready(headers=demo_headers))
        out["server_metadata"] = attempt(lambda: demo.get_server_metadata(headers=demo_headers, as_json=True))
        out["model_metadata"] = attempt(lambda: demo.get_model_metadata("affine", headers=demo_headers, as_json=True))
        out["model_ready"] = attempt(lambda: demo.is_model_ready("affine", headers=demo_headers))
        out["infer"] = attempt(lambda: infer_affine(demo, "affine", x, "req-1", demo_headers))
        out["datatypes"] = attempt(lambda: every_datatype(demo, demo_headers))
        out["unknown_model"] = attempt(lambda: infer_affine(demo, "nope", x, "req-2", demo_headers))
        out["bad_shape"] = attempt(lambda: infer_affine(demo, "affine", x[:, :3].copy(), "req-3", demo_headers))
        out["no_token"] = attempt(lambda: infer_affine(demo, "affine", x, "req-4", None))
        out["no_token_live"] = attempt(lambda: demo.is_server_live())
        out["stream"] = stream(demo, [("affine", x, "s-1"), ("affine", x[:, :3].copy(), "s-2"),
                                      ("secret", x, "s-3")], demo_headers)
    with client(spec, "reader") as reader:
        reader.register_plugin(BearerToken(spec["tokens"]["reader"]))  # the token on every call
        out["reader_allowed"] = attempt(lambda: infer_affine(reader, "affine", x, "r-1", None))
        out["reader_forbidden"] = attempt(lambda: infer_affine(reader, "secret", x, "r-2", None))
        out["reader_metadata_forbidden"] = attempt(lambda: reader.get_model_metadata("secret", as_json=True))
        out["reader_stream"] = stream(reader, [("affine", x, "rs-1"), ("secret", x, "rs-2"), ("affine", x, "rs-3")],
                                      None)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
