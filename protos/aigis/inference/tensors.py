"""Open Inference Protocol tensors <-> numpy, checked against a model's signature before allocating.

Hand-written, beside the generated code, because both sides of the wire need it: the server
(server/inference.py) and the SDK (client_sdk), which may import only the protocol package.

Everything a client sends is compared with what the model declares (name, datatype, rank, fixed
dimensions) and the data's size with shape x element size *before* any array is built, so a request
cannot make the server allocate more than it already sent: raw data is viewed in place
(`np.frombuffer`), typed contents are converted only when their length equals the element count.
Every mismatch raises TensorError (the server answers INVALID_ARGUMENT) naming the tensor and
what was expected. Outputs are always answered raw (`raw_output_contents`), as Triton does, so
`InferResult.as_numpy` works.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from aigis.inference import grpc_service_pb2 as pb


class TensorError(ValueError):
    """A tensor that does not fit what was expected; the message names it and says what was wrong."""


# Elements in one tensor. Raw data is bounded by the message size already; this also bounds typed
# contents and shapes whose product would otherwise only be checked against the data afterwards.
MAX_ELEMENTS = 64 * 1024 * 1024
MAX_RANK = 16
# BYTES elements are converted one by one (each may be empty, so 8 MiB could hold millions).
MAX_BYTES_ELEMENTS = 65_536


@dataclass(frozen=True, slots=True)
class DataType:
    """One protocol datatype: its numpy dtype and the typed-contents field that carries it."""

    name: str
    dtype: np.dtype
    contents_field: str  # "" : no typed field (FP16), raw only

    @property
    def itemsize(self) -> int:
        return 0 if self.name == "BYTES" else self.dtype.itemsize


def _dt(name: str, dtype: str | type, field: str) -> DataType:
    return DataType(name, np.dtype(dtype).newbyteorder("<") if name != "BYTES" else np.dtype(object), field)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, "bool_contents"),
        _dt("UINT8", np.uint8, "uint_contents"),
        _dt("UINT16", np.uint16, "uint_contents"),
        _dt("UINT32", np.uint32, "uint_contents"),
        _dt("UINT64", np.uint64, "uint64_contents"),
        _dt("INT8", np.int8, "int_contents"),
        _dt("INT16", np.int16, "int_contents"),
        _dt("INT32", np.int32, "int_contents"),
        _dt("INT64", np.int64, "int64_contents"),
        # The protocol has no typed field for 16-bit floats: FP16 travels raw only.
        _dt("FP16", np.float16, ""),
        _dt("FP32", np.float32, "fp32_contents"),
        _dt("FP64", np.float64, "fp64_contents"),
        _dt("BYTES", object, "bytes_contents"),
    )
}
_CONTENTS_FIELDS = tuple(sorted({d.contents_field for d in DATATYPES.values() if d.contents_field}))

# onnxruntime's type strings.
ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def datatype_of(array: np.ndarray) -> DataType:
    """The protocol datatype of a numpy array (object/str arrays are BYTES)."""
    if array.dtype.kind in "OUS":
        return DATATYPES["BYTES"]
    for d in DATATYPES.values():
        if d.name != "BYTES" and d.dtype == array.dtype.newbyteorder("<"):
            return d
    raise TensorError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the protocol describes it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None  # None: the model does not fix the rank

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=self.name, datatype=self.datatype, shape=list(self.shape or ())
        )

    def expected(self) -> str:
        dims = "any rank" if self.shape is None else "[" + ", ".join(str(d) for d in self.shape) + "]"
        return f"{self.datatype} {dims}"


def _check_shape(name: str, spec: TensorSpec, shape: Sequence[int]) -> int:
    """The element count of a requested shape that fits `spec`."""
    if len(shape) > MAX_RANK:
        raise TensorError(f"input {name!r}: rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    if spec.shape is not None:
        fits = len(shape) == len(spec.shape) and all(
            want == -1 or want == got for want, got in zip(spec.shape, shape, strict=True)
        )
        if not fits:
            raise TensorError(f"input {name!r}: shape {list(shape)} does not match the model's "
                                  f"{list(spec.shape)} (-1: any size)")
    count = math.prod(shape)
    limit = MAX_BYTES_ELEMENTS if spec.datatype == "BYTES" else MAX_ELEMENTS
    if count > limit:
        raise TensorError(f"input {name!r}: {count} elements; at most {limit} per {spec.datatype} tensor")
    return count


def _decode_bytes_raw(name: str, raw: bytes, count: int) -> np.ndarray:
    """BYTES raw layout: each element a 4-byte little-endian length, then that many bytes."""
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"input {name!r}: raw BYTES data ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"input {name!r}: raw BYTES element {i} claims {length} bytes; "
                                  f"only {len(raw) - offset} remain")
        out[i] = raw[offset:offset + length]
        offset += length
    if offset != len(raw):
        raise TensorError(f"input {name!r}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return out


def _decode_raw(name: str, dt: DataType, raw: bytes, shape: Sequence[int], count: int) -> np.ndarray:
    if dt.name == "BYTES":
        return _decode_bytes_raw(name, raw, count).reshape(shape)
    want = count * dt.itemsize
    if len(raw) != want:
        raise TensorError(f"input {name!r}: raw data has {len(raw)} bytes; shape {list(shape)} of "
                              f"{dt.name} needs {want}")
    array = np.frombuffer(raw, dtype=dt.dtype).reshape(shape)
    if dt.name == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise TensorError(f"input {name!r}: raw BOOL data must be bytes 0 or 1")
    return array


def _decode_typed(name: str, dt: DataType, contents: pb.InferTensorContents, shape: Sequence[int],
                  count: int) -> np.ndarray:
    if not dt.contents_field:
        raise TensorError(f"input {name!r}: {dt.name} has no typed contents field; send it in "
                              f"raw_input_contents")
    for field in _CONTENTS_FIELDS:
        if field != dt.contents_field and len(getattr(contents, field)):
            raise TensorError(f"input {name!r}: datatype {dt.name} is carried in {dt.contents_field}, "
                                  f"not {field}")
    values = getattr(contents, dt.contents_field)
    if len(values) != count:
        raise TensorError(f"input {name!r}: {len(values)} values in {dt.contents_field}; shape "
                              f"{list(shape)} needs {count}")
    if dt.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    # 8/16-bit integers travel in 32-bit fields: refuse values the datatype cannot hold rather
    # than let numpy wrap them around.
    wide = np.asarray(values)
    if dt.dtype.kind in "iu" and count:
        info = np.iinfo(dt.dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise TensorError(f"input {name!r}: values outside the range of {dt.name}")
    return wide.astype(dt.dtype, copy=False).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """The request's inputs as arrays, each checked against the model's `specs` first."""
    by_name = {s.name: s for s in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                              f"when used, it carries every input, in order")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = by_name.get(name)
        if spec is None:
            raise TensorError(f"input {name!r}: the model has no such input (inputs: {sorted(by_name)})")
        if name in arrays:
            raise TensorError(f"input {name!r}: given more than once")
        if tensor.datatype != spec.datatype:
            raise TensorError(f"input {name!r}: datatype {tensor.datatype!r}; the model takes {spec.datatype}")
        dt = DATATYPES[spec.datatype]
        count = _check_shape(name, spec, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise TensorError(f"input {name!r}: has both contents and raw_input_contents; send one")
            arrays[name] = _decode_raw(name, dt, raw[i], tensor.shape, count)
        else:
            arrays[name] = _decode_typed(name, dt, tensor.contents, tensor.shape, count)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise TensorError(f"input {missing[0]!r}: missing (the model takes {[s.name for s in specs]})")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> list[str]:
    """The output names to compute, in the order asked (all, in model order, when none is named)."""
    if not request.outputs:
        return [s.name for s in specs]
    known = {s.name for s in specs}
    names: list[str] = []
    for output in request.outputs:
        if output.name not in known:
            raise TensorError(f"output {output.name!r}: the model has no such output (outputs: {sorted(known)})")
        if output.name in names:
            raise TensorError(f"output {output.name!r}: requested more than once")
        names.append(output.name)
    return names


def _raw_bytes(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OUS":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_outputs(response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray]) -> None:
    """Append `outputs` (in their order) to `response` as raw tensors."""
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array).name, shape=array.shape)
        response.raw_output_contents.append(_raw_bytes(array))


def encode_inputs(request: pb.ModelInferRequest, inputs: Mapping[str, np.ndarray]) -> None:
    """Append `inputs` to `request` as raw tensors (the client side of `decode_inputs`)."""
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array).name, shape=array.shape)
        request.raw_input_contents.append(_raw_bytes(array))


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """A response's outputs as arrays (raw or typed), for clients. Raises TensorError on a bad response."""
    out: dict[str, np.ndarray] = {}
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        dt = DATATYPES.get(tensor.datatype)
        if dt is None:
            raise TensorError(f"output {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        spec = TensorSpec(tensor.name, dt.name, None)
        try:
            count = _check_shape(tensor.name, spec, tensor.shape)
            if raw:
                out[tensor.name] = _decode_raw(tensor.name, dt, raw[i], tensor.shape, count)
            else:
                out[tensor.name] = _decode_typed(tensor.name, dt, tensor.contents, tensor.shape, count)
        except IndexError:
            raise TensorError(f"output {tensor.name!r}: no raw_output_contents entry") from None
        except TensorError as exc:
            raise TensorError(str(exc).replace("input ", "output ", 1)) from None
    return out
