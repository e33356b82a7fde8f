"""Keep remote input from flooding the log through grpcio's own logger.

grpcio's asyncio server logs an ERROR with a traceback ("Invalid encoding on b'...'") for every
request metadata value that is not UTF-8 — several per request — so any client can write the
server's log at will. These records are dropped, counted (`aigis_grpc_log_lines_suppressed_total`),
and summarised in one WARNING line at most once a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

GRPC_LOGGER = "grpc._cython.cygrpc"
# Message prefixes of grpcio log records that only echo a remote peer's bad input.
_REMOTE_NOISE = ("Invalid encoding on",)
SUMMARY_INTERVAL_S = 60.0

log = logging.getLogger("aigis.server")


class RemoteNoiseFilter(logging.Filter):
    """Drops grpcio's per-request records about a peer's malformed metadata; counts them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, interval: float = SUMMARY_INTERVAL_S) -> None:
        super().__init__()
        self._clock, self._interval = clock, interval
        self._lock = threading.Lock()
        self.suppressed = 0  # ever, for the metric
        self._since_summary = 0
        self._summary_at = clock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(_REMOTE_NOISE)):
            return True
        with self._lock:
            self.suppressed += 1
            self._since_summary += 1
            now = self._clock()
            due = now - self._summary_at >= self._interval or self.suppressed == 1
            if due:
                count, self._since_summary, self._summary_at = self._since_summary, 0, now
        if due:
            log.warning(
                "suppressed %d grpc log line(s) about request metadata that is not UTF-8 "
                "(remote input; counted in aigis_grpc_log_lines_suppressed_total, summarised at most once a minute)",
                count,
            )
        return False


_FILTER: RemoteNoiseFilter | None = None
_INSTALL = threading.Lock()


def install() -> RemoteNoiseFilter:
    """The process's one filter on grpcio's logger (installed once; later calls return it)."""
    global _FILTER
    with _INSTALL:
        if _FILTER is None:
            _FILTER = RemoteNoiseFilter()
            logging.getLogger(GRPC_LOGGER).addFilter(_FILTER)
        return _FILTER
