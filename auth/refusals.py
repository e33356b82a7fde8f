"""One audit record for a burst of `too_many_denials` refusals, naming every refused request.

A principal over its denial budget is refused before any token work (auth.guard), but a record
per refusal would still make each refusal cost about twice a valid call (building and sealing the
record, the writer's write, the hand-back to the event loop), and refusals are exactly what a
flooder makes the server do. So refusals of one principal, method and connection that arrive
within `window` seconds share one record: the first refusal's fields, `request_ids` (every
refused request, in order; `request_id` is the first), `count` and `last_timestamp`. Each refusal
is answered only once that record is durable (auth.audit.Durability), like any denial: every
refusal a client saw is in the log under its own request id. At most `max_ids` per record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aigis.auth.audit import AuditLog, rfc3339_now

DEFAULT_WINDOW_SECONDS = 0.05
DEFAULT_MAX_IDS = 256


@dataclass
class _Burst:
    record: dict[str, Any]
    timer: asyncio.TimerHandle | None = None
    ids: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)


class RefusalRecorder:
    """Collects refusals into shared audit records (event-loop thread only)."""

    def __init__(self, audit: AuditLog, *, window: float = DEFAULT_WINDOW_SECONDS,
                 max_ids: int = DEFAULT_MAX_IDS) -> None:
        if window <= 0 or max_ids < 1:
            raise ValueError("window must be > 0 and max_ids >= 1")
        self._audit = audit
        self._window = window
        self._max_ids = max_ids
        self._open: dict[tuple[str, str, str], _Burst] = {}
        self._writing: set[asyncio.Task[None]] = set()

    async def refuse(self, key: tuple[str, str, str], request_id: str,
                     make_record: Callable[[], dict[str, Any]]) -> bool:
        """Add one refusal of (principal, method, peer) `key`; True once the shared record holding its
        request id is on disk, False if it could not be (the caller then answers UNAVAILABLE).
        `make_record` is called only for the first refusal of a record: the others add an id."""
        loop = asyncio.get_running_loop()
        burst = self._open.get(key)
        if burst is None:
            burst = self._open[key] = _Burst(make_record())
            burst.timer = loop.call_later(self._window, self._close, key)
        burst.ids.append(request_id)
        waiter: asyncio.Future[bool] = loop.create_future()
        burst.waiters.append(waiter)
        if len(burst.ids) >= self._max_ids:
            self._close(key)
        return await waiter

    def _close(self, key: tuple[str, str, str]) -> None:
        """Write the burst under `key` as one record; answer its refusals when it is durable."""
        burst = self._open.pop(key, None)
        if burst is None:
            return
        if burst.timer is not None:
            burst.timer.cancel()
        record = {**burst.record, "request_id": burst.ids[0], "request_ids": burst.ids, "count": len(burst.ids),
                  "last_timestamp": rfc3339_now()}
        task = asyncio.get_running_loop().create_task(self._write(record, burst.waiters))
        self._writing.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._writing.discard)

    async def _write(self, record: dict[str, Any], waiters: list[asyncio.Future[bool]]) -> None:
        durable = False
        try:
            durable = await self._audit.record_durably(record)
        finally:
            for waiter in waiters:
                if not waiter.done():  # a refusal whose client gave up was cancelled
                    waiter.set_result(durable)
