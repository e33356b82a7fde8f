"""A load generator process: N calls in flight on one mTLS channel, counted inside a time window.

Protocol with the parent (`tools/bench.py`), one JSON object per line:
  stdin  1: the spec (target, client certificate paths, token, mode, calls in flight, bounds)
  stdout 1: {"ready": true} once the channel is up and a first call has completed (or {"error": ...})
  stdin  2: {"start_at": t0, "end_at": t1} in wall-clock seconds, shared by every process of a run
  stdout 2: the result: completions inside [t0, t1) by status, and their latencies in microseconds

Calls run from the moment the channel is ready, so the window starts on a warm connection. The
token comes on stdin, never on the command line (which `ps` shows). Modes: `add` (Calculator.Add),
`classify` (ClassifyImage), `flood` (Add with tokens signed by a key nobody trusts, made here),
`infer` (Open Inference Protocol ModelInfer with raw input tensors; `plaintext` for a peer server
that offers no TLS, such as MLServer's gRPC port).
Every loop is bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.inference import grpc_service_pb2, grpc_service_pb2_grpc

MODES = ("add", "classify", "flood", "infer")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    mode: str
    target: str
    ca: Path
    cert: Path
    key: Path
    token: str | None
    in_flight: int
    max_requests: int  # over the whole life of the process, warm-up included
    max_seconds: float  # hard bound on the process's life
    call_timeout: float
    image: dict[str, Any] | None  # classify: data_b64, width, height, model
    forge: dict[str, Any] | None  # flood: issuer, audience, kid, subject, count
    tensor: dict[str, Any] | None = None  # infer: model, inputs [{name, datatype, shape, data_b64}]
    plaintext: bool = False  # infer against a server without TLS (MLServer)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        if data["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        return cls(
            mode=data["mode"],
            target=data["target"],
            ca=Path(data["ca"]),
            cert=Path(data["cert"]),
            key=Path(data["key"]),
            token=data.get("token"),
            in_flight=int(data["in_flight"]),
            max_requests=int(data["max_requests"]),
            max_seconds=float(data["max_seconds"]),
            call_timeout=float(data.get("call_timeout", 10.0)),
            image=data.get("image"),
            forge=data.get("forge"),
            tensor=data.get("tensor"),
            plaintext=bool(data.get("plaintext", False)),
        )


def forged_tokens(forge: dict[str, Any], count: int, now: float) -> list[str]:
    """Well-formed access tokens naming the real issuer and key id, signed by a throwaway key.

    They get past every cheap check (typ, alg, iss, kid) and fail only at the signature, so each
    one costs the server a full verification; all distinct, so no cache can answer them.
    """
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    wrong_key = ec.generate_private_key(ec.SECP256R1())
    headers = {"kid": forge["kid"], "typ": "at+jwt"}
    tokens = []
    for _ in range(count):
        claims = {
            "iss": forge["issuer"], "aud": forge["audience"], "sub": forge["subject"], "client_id": "flood",
            "scope": "calculator:compute", "iat": int(now), "exp": int(now) + 3600, "jti": uuid.uuid4().hex,
        }
        tokens.append(jwt.encode(claims, wrong_key, algorithm="ES256", headers=headers))
    return tokens


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Load:
    """The calls, the counters, and the window they are counted in."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.issued = 0
        self.codes: Counter[str] = Counter()
        self.latencies_us: list[int] = []
        self.window: tuple[float, float] | None = None  # perf_counter bounds once the parent sends them
        self.stop_at = time.perf_counter() + spec.max_seconds
        self.first_done = asyncio.Event()
        self.first_code: str | None = None
        self.truncated = False

    def _call(self, channel: aio.Channel) -> tuple[Any, Any, list[list[tuple[str, str]]]]:
        spec = self.spec
        if spec.mode == "classify":
            assert spec.image is not None
            stub = classifier_pb2_grpc.ImageClassificationServiceStub(channel)
            request: Any = classifier_pb2.Image(
                data=base64.b64decode(spec.image["data_b64"]), width=spec.image["width"],
                height=spec.image["height"], model=spec.image["model"], top_k=1,
            )
            return stub.ClassifyImage, request, [[("authorization", f"Bearer {spec.token}")]]
        if spec.mode == "infer":
            assert spec.tensor is not None
            infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = grpc_service_pb2.ModelInferRequest(model_name=spec.tensor["model"])
            for tensor in spec.tensor["inputs"]:
                request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
                request.raw_input_contents.append(base64.b64decode(tensor["data_b64"]))
            metadata = [("authorization", f"Bearer {spec.token}")] if spec.token else []
            return infer.ModelInfer, request, [metadata]
        stub_add = calculator_pb2_grpc.CalculatorStub(channel)
        request = calculator_pb2.AddRequest(a=2, b=3)
        if spec.mode == "flood":
            assert spec.forge is not None
            tokens = forged_tokens(spec.forge, int(spec.forge["count"]), time.time())
            return stub_add.Add, request, [[("authorization", f"Bearer {t}")] for t in tokens]
        return stub_add.Add, request, [[("authorization", f"Bearer {spec.token}")]]

    async def _worker(self, call: Any, request: Any, metadata: list[list[tuple[str, str]]], offset: int) -> None:
        n = len(metadata)
        i = offset
        while self.issued < self.spec.max_requests:
            started = time.perf_counter()
            if started >= self.stop_at or (self.window is not None and started >= self.window[1]):
                return
            self.issued += 1
            i = (i + 1) % n
            try:
                await call(request, metadata=metadata[i], timeout=self.spec.call_timeout)
                code = "OK"
            except aio.AioRpcError as err:
                code = err.code().name
            done = time.perf_counter()
            if self.first_code is None:
                self.first_code = code
                self.first_done.set()
            window = self.window
            if window is not None and window[0] <= done < window[1]:
                self.codes[code] += 1
                self.latencies_us.append(int((done - started) * 1e6))
        self.truncated = True

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if spec.plaintext:  # a peer server on loopback that offers no TLS at all (MLServer)
            opened = aio.insecure_channel(spec.target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(spec.ca.read_bytes(), spec.key.read_bytes(),
                                                       spec.cert.read_bytes())
            opened = aio.secure_channel(spec.target, credentials, options=options)
        async with opened as channel:
            call, request, metadata = self._call(channel)
            await asyncio.wait_for(channel.channel_ready(), timeout=spec.max_seconds)
            tasks = [asyncio.create_task(self._worker(call, request, metadata, k)) for k in range(spec.in_flight)]
            try:
                await asyncio.wait_for(self.first_done.wait(), timeout=spec.max_seconds)
                if spec.mode != "flood" and self.first_code != "OK":
                    return {"error": f"warm-up call failed with {self.first_code}"}
                emit({"ready": True})
                line = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), timeout=spec.max_seconds)
                if not line:
                    return {"error": "no start line from the parent"}
                bounds = json.loads(line)
                # Wall clock is what all processes share; perf_counter is what we time calls with.
                offset = time.perf_counter() - time.time()
                self.window = (bounds["start_at"] + offset, bounds["end_at"] + offset)
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=spec.max_seconds)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        assert self.window is not None
        return {
            "window_seconds": self.window[1] - self.window[0],
            "codes": dict(self.codes),
            "latencies_us": self.latencies_us,
            "issued": self.issued,
            "truncated": self.truncated,
        }


def main() -> int:
    try:
        spec = Spec.from_json(json.loads(sys.stdin.readline()))
        result = asyncio.run(Load(spec).run())
    except (TimeoutError, OSError, ValueError, KeyError, grpc.RpcError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    emit(result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
