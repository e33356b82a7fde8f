"""Bounded load for the fault tests: denials (no token) and valid calls on real mTLS channels.

Every loop stops at a deadline and a call count; each outcome is kept with its request id, so a
test can hold the audit log against exactly what the clients saw.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc

REQUEST_ID_KEY = "aigis-request-id"
# Every status a denial can carry (auth.decision.REASON_STATUS): each has an audit record.
DENIAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})  # fmt: skip


@dataclass
class Seen:
    """What the clients saw: status counts and the request ids of denials."""

    codes: Counter[str] = field(default_factory=Counter)
    denial_ids: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: Seen) -> None:
        self.codes.update(other.codes)
        self.denial_ids |= other.denial_ids
        self.latencies += other.latencies


def aio_channel(target: str, pki: Any, client: str) -> aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.client_key(client).read_bytes(), pki.client_cert(client).read_bytes()
    )
    return aio.secure_channel(target, credentials)


async def add_load(
    target: str,
    pki: Any,
    *,
    client: str = "demo",
    token: str | None = None,
    in_flight: int = 16,
    seconds: float = 2.0,
    max_calls: int = 100_000,
    stop: asyncio.Event | None = None,
    wait_for_ready: bool = False,
) -> Seen:
    """Calculator.Add from `in_flight` tasks on one channel until `seconds`, `max_calls` or `stop`.

    Without a token every call is a denial (token_missing) whose request id is collected.
    `wait_for_ready`: a call made while the channel reconnects waits instead of failing at once.
    """
    seen = Seen()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    deadline = time.monotonic() + seconds
    issued = 0
    async with aio_channel(target, pki, client) as channel:
        add = calc_grpc.CalculatorStub(channel).Add

        async def worker() -> None:
            nonlocal issued
            while issued < max_calls and time.monotonic() < deadline and not (stop and stop.is_set()):
                issued += 1
                started = time.perf_counter()
                try:
                    await add(calc.AddRequest(a=2, b=3), metadata=metadata, timeout=10, wait_for_ready=wait_for_ready)
                    seen.codes["OK"] += 1
                except aio.AioRpcError as err:
                    seen.codes[err.code().name] += 1
                    if err.code() in DENIAL_CODES:
                        trailers = dict(err.trailing_metadata() or ())
                        seen.denial_ids.add(str(trailers.get(REQUEST_ID_KEY)))
                    elif err.code() is grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(0.01)  # the server is down: do not spin
                        continue
                seen.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return seen
