"""The real tritonclient (`tritonclient.grpc.InferenceServerClient`) against aigis over mTLS with bearer
tokens: every RPC it uses for metadata, inference and streaming, datatypes as it encodes them, and
denials (no token, a forbidden model) with aigis's request id and audit record.

tritonclient and aigis.inference define the same protobuf symbols, so the client runs in a child
process (tests/triton_driver.py) and reports JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from calls import issuer_token
from onnx_models import affine_expected, write_affine, write_identity
from private_stack import private_stack

from aigis.server.config import BUNDLED_MODELS

DRIVER = Path(__file__).resolve().parent / "triton_driver.py"
CLIENT = "spiffe://aigis.local/client/"
INFER = "/inference.GRPCInferenceService/"
POLICY = {
    "name": "triton",
    "allow_rules": [
        {"name": "demo", "source": {"principals": [CLIENT + "demo"]}, "request": {"paths": [INFER + "*"]},
         "scopes": ["classifier:predict"]},
        {"name": "reader-affine", "source": {"principals": [CLIENT + "reader"]}, "request": {"paths": [INFER + "*"]},
         "models": ["affine"], "scopes": ["classifier:predict"]},
    ],
}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any], np.ndarray]]:
    """A server with a per-model policy, and what the tritonclient driver reported against it."""
    root = tmp_path_factory.mktemp("triton")
    models = root / "models"
    shutil.copytree(BUNDLED_MODELS / "digits", models / "digits")
    write_affine(models / "affine" / "model.onnx")
    write_affine(models / "secret" / "model.onnx", seed=5)
    write_identity(models / "types" / "model.onnx", ("FP16", "BOOL", "INT64", "UINT8", "BYTES"))
    with private_stack(root, policy=POLICY, models=models) as stack:
        x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
        spec = {
            "target": stack.target,
            "ca": str(stack.pki.ca_cert),
            "clients": {name: {"cert": str(stack.pki.client_cert(name)), "key": str(stack.pki.client_key(name))}
                        for name in ("demo", "reader")},
            "tokens": {name: issuer_token(stack, name) for name in ("demo", "reader")},
            "x": x.tolist(),
        }
        done = subprocess.run([sys.executable, str(DRIVER)], input=json.dumps(spec), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        yield stack, json.loads(done.stdout), x


def test_health_and_metadata(triton: Any) -> None:
    """is_server_live/ready, get_server_metadata, get_model_metadata, is_model_ready work with the token."""
    _, out, _ = triton
    assert out["live"] == {"ok": True} and out["ready"] == {"ok": True} and out["model_ready"] == {"ok": True}
    assert out["server_metadata"]["ok"]["name"] == "aigis"
    meta = out["model_metadata"]["ok"]
    assert (meta["name"], meta["platform"], meta["versions"]) == ("affine", "onnxruntime_onnx", ["1"])
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]


def test_infer_returns_the_models_numbers(triton: Any) -> None:
    """infer(): the id is echoed, only the requested output comes back, as_numpy gives the right numbers."""
    _, out, x = triton
    result = out["infer"]["ok"]
    assert (result["id"], result["model"], result["version"], result["outputs"]) == ("req-1", "affine", "1", ["y"])
    np.testing.assert_allclose(result["y"], affine_expected(x)["y"], rtol=1e-5, atol=1e-5)


def test_datatypes_as_tritonclient_encodes_them(triton: Any) -> None:
    """FP16, BOOL, INT64, UINT8 and BYTES (tritonclient's length-prefixed encoding) round-trip."""
    _, out, _ = triton
    assert out["datatypes"] == {"ok": {"FP16": True, "BOOL": True, "INT64": True, "UINT8": True, "BYTES": True}}


def test_errors_reach_tritonclient_with_their_status(triton: Any) -> None:
    """Unknown model: NOT_FOUND; a wrong shape: INVALID_ARGUMENT naming the tensor; both with a request id."""
    _, out, _ = triton
    assert out["unknown_model"]["error"]["status"] == "StatusCode.NOT_FOUND"
    bad = out["bad_shape"]["error"]
    assert bad["status"] == "StatusCode.INVALID_ARGUMENT" and "input 'x': shape [2, 3]" in bad["message"]
    assert bad["request_id"]


@pytest.mark.parametrize(("case", "status", "reason", "model"), [
    # Unauthenticated: refused before its body is decoded (issue 11: check before parse), so the
    # record names no particular model.
    ("no_token", "StatusCode.UNAUTHENTICATED", "token_missing", "*"),
    ("no_token_live", "StatusCode.UNAUTHENTICATED", "token_missing", None),
    ("reader_forbidden", "StatusCode.PERMISSION_DENIED", "no_matching_rule", "secret"),
    ("reader_metadata_forbidden", "StatusCode.PERMISSION_DENIED", "no_matching_rule", "secret"),
])
def test_denials_carry_the_request_id_of_their_audit_record(triton: Any, case: str, status: str, reason: str,
                                                             model: str | None) -> None:
    """A refused tritonclient call gets the coarse status; its request id finds the audit record with the reason."""
    stack, out, _ = triton
    error = out[case]["error"]
    assert error["status"] == status and error["request_id"]
    records = [r for r in stack.audit_records() if r["request_id"] == error["request_id"]]
    assert [(r["reason"], r.get("model")) for r in records] == [(reason, model)]


def test_plugin_token_and_per_model_allow(triton: Any) -> None:
    """The token from a client plugin works; the reader may use `affine`."""
    _, out, x = triton
    np.testing.assert_allclose(out["reader_allowed"]["ok"]["y"], affine_expected(x)["y"], rtol=1e-5, atol=1e-5)


def test_stream_answers_in_order_with_errors_in_stream(triton: Any) -> None:
    """start_stream/async_stream_infer: answers in order; a bad tensor and an unknown model come back as
    in-stream errors (Triton's behaviour) and the stream goes on."""
    _, out, x = triton
    first, second, third = out["stream"]
    assert first["id"] == "s-1"
    np.testing.assert_allclose(first["y"], affine_expected(x)["y"], rtol=1e-5, atol=1e-5)
    assert "input 'x': shape [2, 3]" in second["error"]["message"]
    assert third["id"] == "s-3" and third["model"] == "secret"  # demo may use every model


def test_stream_ends_with_permission_denied_at_a_forbidden_model(triton: Any) -> None:
    """The reader's stream: `affine` is answered, the message naming `secret` ends it with PERMISSION_DENIED,
    audited with the model."""
    stack, out, _ = triton
    replies = out["reader_stream"]
    assert replies[0]["id"] == "rs-1"
    assert replies[-1]["error"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert len(replies) == 2
    denied = [r for r in stack.audit_records() if r["rpc_method"] == INFER + "ModelStreamInfer"]
    assert [(r["reason"], r["model"]) for r in denied] == [("no_matching_rule", "secret")]
