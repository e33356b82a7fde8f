"""Non-image ONNX models built at test time with the `onnx` helper API (nothing committed).

- `write_affine`: y = x @ W + b (FP32, [N, 4] -> [N, 3]) and a second output s = sum(x, axis 1);
  the expected numbers are computed with numpy from the same W and b.
- `write_identity`: one Identity per protocol datatype (BOOL ... FP64, BYTES), so every datatype
  goes through the server and back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
IDENTITY_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def affine_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def affine_expected(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """What the affine model must answer, computed independently with numpy (float64, for tolerance)."""
    w, b = affine_weights(seed)
    return {"y": x.astype(np.float64) @ w + b, "s": x.astype(np.float64).sum(axis=1, keepdims=True)}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_affine(path: Path, seed: int = 0) -> Path:
    """model.onnx at `path`: inputs x FP32 [N, 4]; outputs y FP32 [N, 3], s FP32 [N, 1]."""
    w, b = affine_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _save(graph, path)


def write_identity(path: Path, datatypes: tuple[str, ...] = tuple(IDENTITY_TYPES)) -> Path:
    """model.onnx at `path`: for each datatype D an input in_D [-1, -1] and output out_D = in_D."""
    nodes, inputs, outputs = [], [], []
    for name in datatypes:
        elem = IDENTITY_TYPES[name]
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["A", "B"]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["A", "B"]))
    return _save(helper.make_graph(nodes, "identity", inputs, outputs), path)


def write_two_inputs(path: Path) -> Path:
    """model.onnx at `path`: z = a + b, a and b FP32 [N, K] with K variable (a mismatch fails inside)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["z"])],
        "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "K"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "K"])],
    )
    return _save(graph, path)
