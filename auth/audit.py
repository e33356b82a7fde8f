"""The audit log: one hash-chained JSON line per audited RPC, written by a background thread.

The request path only counts and enqueues the dict the interceptor built (no I/O, no JSON on the
event loop); the writer thread seals each record into the chain (auth.audit_chain), appends a
batch with one write, and fsyncs it. Field names follow gRFC A59 (rpc_method, principal,
policy_name, matched_rule, authorized). Records never hold a token.

Durability (`Durability`): by default a denial is answered only once its record is on disk
(`record_durably`). That costs no extra write per denial: whatever queued while the writer was
busy goes out in the next batch with one write and one fsync (group commit), and the writer wakes
the event loop once per batch, not once per record. So a flood makes bigger batches, and a
`kill -9` loses nothing a client has seen.

Nothing is lost silently: the queue is bounded, and a record that finds it full is counted
instead; the writer then appends an `audit_overflow` record (how many, their reasons, when) into
the chain as soon as it has caught up. Blocking the event loop would stall every RPC, and an
unbounded queue would let a flood of denials exhaust memory, so a counted, chained gap is the
honest third choice.

Crash safety: at start the writer cuts a torn last line (a crash mid-write) off the active
file, then continues the chain from the last whole record, so `aigis audit verify` passes again.

`stdout=True` (in a container, for a log collector) writes the same sealed lines to standard
output instead, one write per line, so each line stays whole beside JSON log lines (a line under
PIPE_BUF, 4 KiB, is written atomically to a pipe). There is nothing to resume from: the chain
starts at seq 1 with each process, and nothing is rotated or fsynced (the collector owns that).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aigis.auth.audit_chain import (
    GENESIS,
    AuditError,
    is_chained,
    load_hmac_key,
    read_records,
    record_chain_ok,
    rotated_indexes,
    rotated_path,
    seal,
    writer_path,
)
from aigis.auth.audit_format import AuditFormat, denial_count, to_grpc

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_QUEUE_SIZE", "DURABLE_WAIT_SECONDS", "AuditError", "AuditLog", "Durability",
    "read_records", "rfc3339_now",
]  # fmt: skip

log = logging.getLogger("aigis.audit")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# ~1.2 KB per queued record: about 40 MB at most, several seconds of a full-speed denial flood
# while the disk stalls (the writer drains >100k records/s otherwise).
DEFAULT_QUEUE_SIZE = 32_768
# How long a denial waits for its record to reach the disk before it is answered UNAVAILABLE
# instead (a stalled disk must not hold calls forever; the client then saw no denial).
DURABLE_WAIT_SECONDS = 5.0
OVERFLOW_EVENT = "audit_overflow"
# While the disk is full every batch fails: one error line per this many seconds, not one per batch.
ERROR_LOG_INTERVAL_SECONDS = 30.0
# The server logs its chain's newest seq and chain value this often (when it moved): an anchor
# outside the file, for `aigis audit verify --expect-seq/--expect-chain`.
ANCHOR_LOG_INTERVAL_SECONDS = 60.0
_STOP = object()
_TAIL_CHUNK = 64 * 1024


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Durability(enum.StrEnum):
    """When a denial is answered, relative to its audit record reaching the disk."""

    # After write(2) and fsync(2) of the batch that holds it: survives kill -9, OS crash, power loss.
    FSYNC = "fsync"
    # After write(2); no fsync: survives kill -9 of the server, not an OS crash or a power cut.
    WRITE = "write"
    # At once; written behind (fsync per batch): a kill -9 loses the records still queued (up to
    # `queue_size`, in practice one batch), and those clients did see their denials.
    BACKGROUND = "background"


@dataclass
class _Drops:
    """Records that could not be queued or written, summed up for one overflow record."""

    count: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    causes: Counter[str] = field(default_factory=Counter)
    first: str | None = None
    last: str | None = None

    def add(self, entry: Mapping[str, Any], cause: str) -> int:
        """Count `entry` as the calls it stands for (a shared refusal record: each refusal); returns that."""
        calls = denial_count(entry)
        self.count += calls
        self.by_reason[str(entry.get("reason") or entry.get("event") or "-")] += calls
        self.causes[cause] += calls
        stamp = entry.get("timestamp")
        if isinstance(stamp, str):
            self.first = self.first or stamp
            self.last = stamp
        return calls

    def merge_older(self, other: _Drops) -> None:
        self.count += other.count
        self.by_reason.update(other.by_reason)
        self.causes.update(other.causes)
        self.first = other.first or self.first
        self.last = self.last or other.last

    def event(self) -> dict[str, Any]:
        return {
            "event": OVERFLOW_EVENT,
            "timestamp": rfc3339_now(),
            "dropped": self.count,
            "by_reason": dict(self.by_reason),
            "causes": dict(self.causes),
            "first_timestamp": self.first,
            "last_timestamp": self.last,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> _Drops:
        """The counts an overflow event (e.g. one persisted at shutdown) holds."""
        drops = cls(int(event["dropped"]), Counter(event.get("by_reason") or {}), Counter(event.get("causes") or {}))
        drops.first, drops.last = event.get("first_timestamp"), event.get("last_timestamp")
        if drops.count < 0 or not all(isinstance(v, int) for v in (*drops.by_reason.values(), *drops.causes.values())):
            raise ValueError("not an overflow record")
        return drops


class _LimitedLog:
    """One kind of error, logged at most once per interval; the lines held back are counted in the next.

    While a disk is full every write fails, and one line per denial would bury everything else
    (and fill the log's own disk); one line per interval still says it is going on.
    """

    def __init__(self, interval: float = ERROR_LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def error(self, message: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return
            held, self._held, self._next = self._held, 0, now + self._interval
        if held:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, held, self._interval)
        log.error(message, *args, exc_info=exc_info)


class AuditLog:
    """Append-only, hash-chained JSON-lines audit log, written off the request path.

    `record()` never blocks and never raises; `close()` drains everything queued. `path` is the
    file this process writes: the configured path, or `stem.wN.suffix` for worker N.
    """

    def __init__(
        self,
        path: Path,
        *,
        hmac_key_file: Path | None = None,
        worker_id: int | str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_batch: int = 512,
        durability: Durability = Durability.FSYNC,
        fsync: bool | None = None,
        durable_wait: float = DURABLE_WAIT_SECONDS,
        stdout: bool = False,
        record_format: AuditFormat = AuditFormat.AIGIS,
    ) -> None:
        if max_bytes <= 0 or queue_size <= 0 or max_batch <= 0:
            raise ValueError("max_bytes, queue_size and max_batch must be greater than 0")
        self.base = path
        self.path = writer_path(path, worker_id)
        self._key_file = hmac_key_file
        self._key: bytes | None = None
        self._max_bytes = max_bytes
        self._queue_size = queue_size
        self._max_batch = max_batch
        self.durability = durability
        self._durable_wait = durable_wait
        # Only WRITE skips fsync (tests may switch it off to run faster); stdout cannot be fsynced.
        self._fsync = (durability is not Durability.WRITE if fsync is None else fsync) and not stdout
        self._stdout = stdout
        self._grpc_format = record_format is AuditFormat.GRPC
        # On a shared stdout, the writer's name tells one worker's chain from another's.
        self._tag = {"writer": str(worker_id)} if stdout and worker_id is not None else None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition(threading.Lock())
        self._pending = 0  # queued or being written; bounded by queue_size
        self._drops = _Drops()  # not yet reported in an overflow record
        self._draining = False  # an overflow record is being written
        self._closed = False
        self._persisted = False  # close() saved unwritten drops for the next start
        # Called (cause, count) for every record lost: the server's aigis_audit_dropped_total.
        self.on_drop: Callable[[str, int], None] | None = None
        self._write_errors = _LimitedLog()
        self._late_records = _LimitedLog()
        self._anchor_logged = (0, 0.0)  # seq, monotonic time
        self._dropped_total = 0
        self._written = 0
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._lock_fd = -1
        self._seq = 0
        self._chain = GENESIS
        self._size = 0  # of the file being written
        self._rotate_at = max_bytes
        self._rotation = 0

    # ---- the event-loop side -------------------------------------------------------------------

    def record(self, entry: Mapping[str, Any]) -> None:
        """Queue one record without waiting for it (allowed calls, writer events)."""
        self._submit(entry, None)

    async def record_durably(self, entry: Mapping[str, Any]) -> bool:
        """Queue one record and return True once it is on disk, per `durability`.

        False: this very record is not on disk (queue full, write failed, not written within
        `durable_wait` s, log closed); it is counted as lost, and the caller must not show the
        client a denial for it. Call on the event loop.
        """
        if self.durability is Durability.BACKGROUND:
            self._submit(entry, None)
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._submit(entry, waiter)
        if waiter.done():
            return waiter.result()
        timer = loop.call_later(self._durable_wait, _settle_now, [waiter], False)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _submit(self, entry: Mapping[str, Any], waiter: asyncio.Future[bool] | None) -> None:
        with self._cond:
            if self._closed:
                if waiter is not None:
                    waiter.set_result(False)
                if not self._persisted:  # close() will save it with the other drops
                    self._drop(entry, "shutdown")
                    return
                self._late_records.error("audit record after close is lost (request %s)", entry.get("request_id"))
                return
            if self._pending >= self._queue_size:
                self._drop(entry, "queue_full")
                if waiter is not None:
                    waiter.set_result(False)
                return
            self._pending += 1
            # Inside the lock, so nothing can be queued behind close()'s stop marker.
            self._queue.put((entry, waiter))

    def _drop(self, entry: Mapping[str, Any], cause: str) -> None:
        """Count a lost record (as the calls it stands for) for the next overflow record and the metric
        (caller holds the lock)."""
        calls = self._drops.add(entry, cause)
        self._dropped_total += calls
        if self.on_drop is not None:
            self.on_drop(cause, calls)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far (and any overflow record) is on disk."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending == 0 and self._drops.count == 0 and not self._draining, timeout
            )

    @property
    def written(self) -> int:
        """Lines written by this process (records and overflow records)."""
        return self._written

    @property
    def running(self) -> bool:
        """The writer thread is alive and accepting records (readiness)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def pending(self) -> int:
        """Records handed over but not yet on disk (the metrics' audit queue depth)."""
        return self._pending

    @property
    def anchor(self) -> tuple[int, str]:
        """(seq, chain) of the newest record on disk: compare with `aigis audit verify --expect-seq`."""
        return self._seq, self._chain

    @property
    def dropped(self) -> int:
        """Audited calls whose record never reached the file (each counted in an overflow record)."""
        return self._dropped_total

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the key, take the writer lock, resume the chain, start the writer thread.

        Blocking file I/O: call it in a thread when an event loop is running.
        """
        self._key = load_hmac_key(self._key_file) if self._key_file is not None else None
        if self._stdout:
            self._fd, self._rotate_at = os.dup(1), float("inf")  # type: ignore[assignment]
            self._thread = threading.Thread(target=self._run, name="aigis-audit-writer", daemon=True)
            self._thread.start()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AuditError(
                f"{self.path}: another process is writing this audit log (give each process its own worker id)"
            ) from None
        try:
            self._resume()
            # Denials name principals and peers: readable by the operator only.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._fd).st_size
            self._sync_dir()
            self._carry_over()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._run, name="aigis-audit-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write everything queued, then stop the writer; later records are refused (and logged)."""
        with self._cond:
            self._closed = True
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        os.close(self._fd)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        # An anchor outside the file: cutting whole records off its end is the one change a
        # chain alone cannot show.
        log.info("audit log %s closed at seq %d (chain %s)", self.path, self._seq, self._chain)
        with self._cond:
            drops, self._drops, self._persisted = self._drops, _Drops(), True
        if drops.count:
            self._persist_drops(drops)

    # ---- losses that outlive the process ---------------------------------------------------------

    @property
    def carry_over_path(self) -> Path:
        """Where close() keeps the count of records it could not write, for the next start's chain."""
        return self.path.with_name(self.path.name + ".dropped")

    def _persist_drops(self, drops: _Drops) -> None:
        """Save what could not be chained at shutdown (merged with an older file), so the next start chains it."""
        if self._stdout:
            log.error("audit: %d record(s) were never written (causes %s)", drops.count, dict(drops.causes))
            return
        try:
            older = _Drops.from_event(json.loads(self.carry_over_path.read_bytes()))
            drops.merge_older(older)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            log.exception("%s is unreadable; it is replaced", self.carry_over_path)
        try:
            tmp = self.carry_over_path.with_name(self.carry_over_path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(drops.event()).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.carry_over_path)
            self._sync_dir()
        except OSError as exc:
            log.error("audit: %d record(s) were never written and cannot be saved for the next start (%s); "
                      "causes %s", drops.count, exc.strerror, dict(drops.causes))  # fmt: skip
            return
        log.error("audit: %d record(s) were never written (causes %s); saved in %s, chained at the next start",
                  drops.count, dict(drops.causes), self.carry_over_path)  # fmt: skip

    def _carry_over(self) -> None:
        """At start: chain the losses a previous run saved (the file goes once the record is on disk)."""
        try:
            data = self.carry_over_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            event = {**_Drops.from_event(json.loads(data)).event(), "carried_over": True}
        except (ValueError, KeyError, TypeError):
            # Something was lost, but how much is unknown: say exactly that in the chain.
            event = {"event": OVERFLOW_EVENT, "timestamp": rfc3339_now(), "dropped": None, "carried_over": True,
                     "detail": f"{self.carry_over_path.name} was unreadable"}  # fmt: skip
        if self._append([event]):
            self.carry_over_path.unlink()
            self._sync_dir()
            log.warning("audit: chained %s record(s) lost by the previous run", event["dropped"])

    # ---- resuming after a restart or crash -------------------------------------------------------

    def _resume(self) -> None:
        rotated = rotated_indexes(self.path)
        self._rotation = rotated[-1] if rotated else 0
        if self.path.exists():
            _repair_torn_tail(self.path)
        candidates = [self.path, *(rotated_path(self.path, i) for i in reversed(rotated))]
        for path in candidates:
            last = _last_line(path) if path.exists() else None
            if last is None:
                continue
            try:
                record = json.loads(last)
            except ValueError:
                record = None
            if not is_chained(record):
                raise AuditError(f"{path}: its last line is not a chained audit record; move the file aside")
            if not record_chain_ok(record, self._key):
                # Not fatal: the chain continues from what is there and `aigis audit verify` names it.
                log.error("%s: the last record (seq %s) does not verify with the configured key", path, record["seq"])
            self._seq, self._chain = record["seq"], record["chain"]
            log.info("audit log %s continues after seq %d", self.path, self._seq)
            return

    # ---- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                # With losses not yet chained (disk full), retry their record now and then.
                batch = [self._queue.get(timeout=1.0 if self._drops.count else None)]
            except queue.Empty:
                self._report_drops()
                continue
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            try:
                written = self._append([entry for entry, _ in batch]) if batch else 0
            except Exception:
                self._write_errors.error("audit writer failed; %d record(s) will be reported lost", len(batch),
                                         exc_info=True)  # fmt: skip
                written = 0
            with self._cond:
                for entry, _ in batch[written:]:
                    self._drop(entry, "write_error")
                self._pending -= len(batch)
                self._cond.notify_all()
            _settle([waiter for _, waiter in batch[:written] if waiter is not None], True)
            _settle([waiter for _, waiter in batch[written:] if waiter is not None], False)
            self._report_drops()
            self._log_anchor()

    def _log_anchor(self) -> None:
        seq, when = self._anchor_logged
        now = time.monotonic()
        if seq != self._seq and now - when >= ANCHOR_LOG_INTERVAL_SECONDS:
            self._anchor_logged = (self._seq, now)
            log.info("audit log %s at seq %d (chain %s)", self.path, self._seq, self._chain)

    def _report_drops(self) -> None:
        """Append one overflow record for everything dropped so far (put back if that fails too)."""
        with self._cond:
            if self._drops.count == 0:
                return
            drops, self._drops, self._draining = self._drops, _Drops(), True
        written = self._append([drops.event()])
        with self._cond:
            if not written:
                self._drops.merge_older(drops)
            self._draining = False
            self._cond.notify_all()

    def _append(self, entries: list[Mapping[str, Any]]) -> int:
        """Seal and append `entries` (rotating when a file is full); how many reached the file.

        On a write error the file is cut back to its last whole record and the chain state is
        rolled back, so the file stays verifiable and the lost entries can be reported.
        """
        lines: list[bytes] = []
        size, done = self._size, 0
        seq, chain = self._seq, self._chain
        for entry in entries:
            if self._tag is not None:
                entry = {**entry, **self._tag}
            if self._grpc_format:  # here, on the writer thread: no work on the event loop
                entry = to_grpc(entry)
            try:
                line, next_chain = seal(entry, seq + 1, chain, self._key)
            except (TypeError, ValueError):
                log.exception("audit record cannot be serialised (request %s)", entry.get("request_id"))
                unserialisable = {
                    "event": "audit_unserialisable",
                    "timestamp": rfc3339_now(),
                    "request_id": str(entry.get("request_id")),
                }
                line, next_chain = seal(unserialisable, seq + 1, chain, self._key)
            if size > 0 and size + len(line) > self._rotate_at:
                if not self._commit(lines, seq, chain):
                    return done
                done += len(lines)
                lines = []
                self._rotate()
                size = self._size
            lines.append(line)
            size += len(line)
            seq, chain = seq + 1, next_chain
        if self._commit(lines, seq, chain):
            done += len(lines)
        return done

    def _commit(self, lines: list[bytes], seq: int, chain: str) -> bool:
        if not lines:
            return True
        data = b"".join(lines)
        try:
            for chunk in lines if self._stdout else [data]:  # a pipe: one write per line keeps lines whole
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view) :]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._write_errors.error(
                "audit log write failed (%s); %d record(s) will be reported lost", exc.strerror, len(lines)
            )
            if self._stdout:
                return False
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("cannot cut %s back to its last whole record", self.path)
            return False
        self._size += len(data)
        self._seq, self._chain = seq, chain
        self._written += len(lines)
        return True

    def _rotate(self) -> None:
        """Rename the full file to the next number and start a new one; the chain runs on.

        A failed rotation is not a lost record: writing goes on in the current file and the next
        attempt waits for another `max_bytes`.
        """
        self._rotate_at = self._size + self._max_bytes
        target = rotated_path(self.path, self._rotation + 1)
        try:
            if target.exists():
                raise OSError(errno.EEXIST, "rotated file already exists", str(target))
            os.rename(self.path, target)
            self._rotation += 1
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            log.exception("cannot rotate %s; writing on", self.path)
            return
        os.close(self._fd)
        self._fd, self._size, self._rotate_at = fd, 0, self._max_bytes
        self._sync_dir()

    def _sync_dir(self) -> None:
        """Make a new or renamed file's name durable too (only when fsync is on)."""
        if not self._fsync:
            return
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _settle_now(waiters: list[asyncio.Future[bool]], ok: bool) -> None:
    """On the waiters' loop: answer every waiter still waiting (one may have timed out or been cancelled)."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(ok)


def _settle(waiters: list[asyncio.Future[bool]], ok: bool) -> None:
    """From the writer thread: one wake-up per event loop for a whole batch, not one per record."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
    for waiter in waiters:
        by_loop.setdefault(waiter.get_loop(), []).append(waiter)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_now, group, ok)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _repair_torn_tail(path: Path) -> None:
    """Cut off a last line without a newline (a crash mid-write), unless it is a whole record."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = _line_start(f, size)
        f.seek(start)
        tail = f.read()
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            f.write(b"\n")
            log.warning("%s: the last record had no newline; added it", path)
        else:
            f.truncate(start)
            log.warning("%s: cut off an incomplete last record (%d bytes) left by a crash", path, size - start)
        f.flush()
        os.fsync(f.fileno())


def _line_start(f: Any, end: int) -> int:
    """Offset where the line that ends at `end` begins (reading backwards in chunks)."""
    pos = end
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        f.seek(pos - step)
        newline = f.read(step).rfind(b"\n")
        if newline >= 0:
            return pos - step + newline + 1
        pos -= step
    return 0


def _last_line(path: Path) -> bytes | None:
    """The last newline-terminated line of `path`, or None when it has none."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = _line_start(f, size - 1)  # skip the final newline itself
        f.seek(start)
        return f.read(size - start)
