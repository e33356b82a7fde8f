"""protos/aigis/inference/grpc_service.proto is the published Open Inference Protocol, field for field.

The reference is the descriptor tritonclient ships (Triton's grpc_service.proto, which carries the
KServe v2 messages plus the streaming extension). Both register the same `inference.*` symbols in
protobuf's default pool, so the reference is read in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from google.protobuf import descriptor_pb2

from aigis.inference import grpc_service_pb2

_DUMP = """
import json, sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2
fd = descriptor_pb2.FileDescriptorProto()
service_pb2.DESCRIPTOR.CopyToProto(fd)
sys.stdout.write(fd.SerializeToString().hex())
"""


def _reference() -> descriptor_pb2.FileDescriptorProto:
    out = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True, timeout=60, check=True)
    return descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(out.stdout))


def _ours() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    grpc_service_pb2.DESCRIPTOR.CopyToProto(fd)
    return fd


def _shape(message: descriptor_pb2.DescriptorProto) -> dict[str, object]:
    """What the wire and the JSON mapping depend on: names, numbers, types, labels, oneofs, nesting."""
    return {
        "fields": sorted(
            (f.name, f.number, f.type, f.label, f.type_name, f.oneof_index if f.HasField("oneof_index") else -1)
            for f in message.field
        ),
        "oneofs": [o.name for o in message.oneof_decl],
        "map_entry": message.options.map_entry,
        "nested": {n.name: _shape(n) for n in message.nested_type},
    }


def test_package_and_service_name_are_the_protocols() -> None:
    """Clients call /inference.GRPCInferenceService/<Method>."""
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(service.methods_by_name) == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
    }


def test_every_message_and_method_matches_tritonclients_descriptor() -> None:
    """Each message we declare exists in the reference with identical fields; each rpc has its types and streaming."""
    reference, ours = _reference(), _ours()
    assert ours.package == reference.package == "inference"
    theirs = {m.name: m for m in reference.message_type}
    for message in ours.message_type:
        assert message.name in theirs, message.name
        expected = json.dumps(_shape(theirs[message.name]), sort_keys=True)
        assert json.dumps(_shape(message), sort_keys=True) == expected, message.name
    their_methods = {m.name: m for m in reference.service[0].method}
    for method in ours.service[0].method:
        ref = their_methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            ref.input_type, ref.output_type, ref.client_streaming, ref.server_streaming,
        ), method.name
