"""The audit log: one JSON line per audited RPC, written by a background thread.

The request path only builds a small dict and puts it on a queue (no I/O, no JSON on the event
loop); the writer thread serialises, appends and flushes in batches. Field names follow gRFC A59
(rpc_method, principal, policy_name, matched_rule, authorized). Records never hold a token.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("aigis.audit")

_STOP = object()


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only JSON-lines audit log, written off the request path.

    `record()` never blocks and never raises; `close()` drains everything queued, so every record
    handed over before shutdown reaches the file.
    """

    def __init__(self, path: Path, *, max_batch: int = 512) -> None:
        self.path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._written = 0
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Denials name principals and peers: readable by the operator only.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="aigis-audit-writer", daemon=True)
        self._thread.start()

    def record(self, entry: Mapping[str, Any]) -> None:
        """Queue one record; called on the event loop, so it only enqueues."""
        with self._idle:
            self._pending += 1
        self._queue.put(entry)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is on disk (tests and shutdown use this)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self._file.close()

    @property
    def written(self) -> int:
        return self._written

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP or _STOP in batch:
                stopping = True
                batch = [entry for entry in batch if entry is not _STOP]
            self._write(batch)

    def _write(self, batch: list[Mapping[str, Any]]) -> None:
        if not batch:
            return
        try:
            self._file.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in batch))
            self._file.flush()
            self._written += len(batch)
        except Exception:
            # Losing audit records silently is not acceptable: say so loudly in the server log.
            log.exception("audit log write failed; %d record(s) lost", len(batch))
        finally:
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record in an audit log (a torn last line from a crash is skipped)."""
    records = []
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
