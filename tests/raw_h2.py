"""A raw HTTP/2 gRPC call (python-hyper's h2) for what grpc clients refuse to send, such as request
metadata that is not UTF-8. Real TLS with the client's certificate; one call per connection."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Any

import h2.config
import h2.connection
import h2.events


def raw_grpc_call(
    stack: Any, client: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> int | None:
    """Send one unary gRPC request with `headers` added verbatim; the grpc-status answered (None: none)."""
    ca, cert, key = stack.client_files(client)
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    port = int(stack.target.rsplit(":", 1)[1])
    # Header validation off: sending what a grpc client would refuse is the point.
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(
        raw, server_hostname="localhost"
    ) as tls:
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        request = [
            (b":method", b"POST"), (b":scheme", b"https"), (b":path", path.encode()), (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ]  # fmt: skip
        conn.send_headers(1, request + headers)
        conn.send_data(1, b"\x00" + struct.pack(">I", len(body)) + body, end_stream=True)
        tls.sendall(conn.data_to_send())
        status: int | None = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = tls.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = next((int(v) for k, v in event.headers if k == b"grpc-status"), status)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status
            tls.sendall(conn.data_to_send())
        return status
