"""Waiting for the end: the one signal-and-drain sequence the server and the standalone issuer share."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable


async def wait_for_shutdown(drain_seconds: float, drain: Callable[[], Awaitable[None]]) -> None:
    """Return once it is time to stop: after SIGTERM/SIGINT and `drain_seconds` of draining.

    `drain` runs first (readiness goes false, so the endpoints controller takes the pod out of its
    Services while calls are still served); a second signal ends the drain early.
    """
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    signalled.clear()
    if drain_seconds > 0:
        await drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signalled.wait(), drain_seconds)
