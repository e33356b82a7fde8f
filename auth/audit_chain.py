"""The audit log's on-disk format: the hash chain, the file layout, reading and verifying.

Every record carries `seq` (1, 2, 3, ... per writer), `prev` (the previous record's chain value,
64 zeros for the first record ever) and `chain`:

    chain = HMAC-SHA256(key, prev || canonical_json(record without "chain"))   with a key
    chain = SHA-256(prev || canonical_json(record without "chain"))            without one

where `prev` is the 64 hex characters and canonical JSON has sorted keys, compact separators and
ASCII escapes. A line on disk is exactly that canonical JSON with `,"chain":"<hex>"` inserted
before its closing brace, so the bytes that were hashed can be recovered from the line itself.
The keyed chain cannot be rebuilt without the key; the unkeyed one only catches edits made by
someone who does not bother to recompute it.

Files, for a configured path `audit.jsonl`: `audit.jsonl` is the file being written;
`audit.jsonl.1`, `audit.jsonl.2`, ... are rotated files, oldest first (rotation renames the
active file to the next free number, so names never shift). A worker process `N` writes
`audit.wN.jsonl` (and `audit.wN.jsonl.1`, ...) with its own chain. The chain runs on across a
writer's files: the first record of a new file names the last chain value of the previous one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MIN_KEY_BYTES = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WORKER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
# How far verify looks ahead to tell a reordered record from a deleted one.
_LOOKAHEAD = 256


class AuditError(Exception):
    """The audit log cannot be written as configured (key, lock, unreadable tail)."""


def canonical_json(record: Mapping[str, Any]) -> str:
    """Sorted keys, compact separators, ASCII only: one text for one record, in any language."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def chain_value(key: bytes | None, prev: str, body: str) -> str:
    """The chain value of a record whose canonical JSON (without `chain`) is `body`."""
    message = (prev + body).encode("ascii")
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.digest(key, message, "sha256").hex()


def seal(entry: Mapping[str, Any], seq: int, prev: str, key: bytes | None) -> tuple[bytes, str]:
    """The line (with newline) for `entry` as record `seq` after `prev`, and its chain value."""
    record = {k: v for k, v in entry.items() if k != "chain"}
    record["seq"] = seq
    record["prev"] = prev
    body = canonical_json(record)
    chain = chain_value(key, prev, body)
    return f'{body[:-1]},"chain":"{chain}"}}\n'.encode("ascii"), chain


def record_chain_ok(record: Mapping[str, Any], key: bytes | None) -> bool:
    """Does this parsed record's `chain` match its own content and `prev`?"""
    body = canonical_json({k: v for k, v in record.items() if k != "chain"})
    return hmac.compare_digest(chain_value(key, str(record["prev"]), body), str(record["chain"]))


def is_chained(record: Any) -> bool:
    """A JSON object with an integer `seq` and hex `prev`/`chain`: the shape every line must have."""
    return (
        isinstance(record, dict)
        and type(record.get("seq")) is int
        and isinstance(record.get("prev"), str)
        and isinstance(record.get("chain"), str)
        and _HEX64.fullmatch(record["prev"]) is not None
        and _HEX64.fullmatch(record["chain"]) is not None
    )


def load_hmac_key(path: Path) -> bytes:
    """The chain key: the raw bytes of `path`, at least 32 of them, readable by the owner only.

    The key must live apart from the log: whoever can read it can rebuild a forged chain.
    Messages name the file, never its content.
    """
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"audit HMAC key file {path}: cannot read it ({exc.strerror})") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise AuditError(f"audit HMAC key file {path}: readable by others; make it mode 0600")
    if len(data) < MIN_KEY_BYTES:
        raise AuditError(f"audit HMAC key file {path}: needs at least {MIN_KEY_BYTES} bytes, has {len(data)}")
    return data


def write_new_key(path: Path) -> None:
    """Create a new random key file (mode 0600 from the start; never overwrites)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(MIN_KEY_BYTES))


# ---- file layout ----------------------------------------------------------------------------------


def writer_path(base: Path, worker_id: int | str | None) -> Path:
    """The file one writer appends to: the base path, or `stem.wN.suffix` for worker N."""
    if worker_id is None:
        return base
    name = str(worker_id)
    if not _WORKER_ID.fullmatch(name):
        raise ValueError(f"worker id {name!r}: use 1-32 letters, digits, '_' or '-'")
    return base.with_name(f"{base.stem}.w{name}{base.suffix}")


def rotated_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def rotated_indexes(path: Path) -> list[int]:
    """The numbers of `path`'s rotated files that exist, ascending."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    if not path.parent.is_dir():
        return []
    found = (pattern.fullmatch(p.name) for p in path.parent.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


@dataclass(frozen=True)
class WriterFiles:
    """One writer's chain: its rotated files (by number) and its active file."""

    writer: str  # "" for the plain path, else the worker id
    active: Path
    rotated: tuple[tuple[int, Path], ...]

    @property
    def files(self) -> list[Path]:
        """Oldest first: rotated files by number, then the active file if it exists."""
        paths = [p for _, p in self.rotated]
        return [*paths, self.active] if self.active.exists() else paths


def log_layout(base: Path) -> list[WriterFiles]:
    """Every writer found for the configured path `base`: the plain writer first, then workers."""
    writers = [""] if base.exists() or rotated_indexes(base) else []
    pattern = re.compile(re.escape(base.stem) + r"\.w([A-Za-z0-9_-]{1,32})" + re.escape(base.suffix) + r"(?:\.\d+)?")
    if base.parent.is_dir():
        found = {m.group(1) for p in base.parent.iterdir() if (m := pattern.fullmatch(p.name))}
        writers += sorted(found, key=lambda w: (not w.isdigit(), int(w) if w.isdigit() else 0, w))
    layout = []
    for writer in writers:
        active = writer_path(base, writer or None)
        layout.append(WriterFiles(writer, active, tuple((i, rotated_path(active, i)) for i in rotated_indexes(active))))
    return layout


def read_writer_records(writer: WriterFiles) -> list[dict[str, Any]]:
    """One writer's whole records in the order written; torn or garbled lines are skipped."""
    return [entry.record for path in writer.files for entry in _entries(path) if isinstance(entry.record, dict)]


def read_records(base: Path) -> list[dict[str, Any]]:
    """Every whole record of the log at `base`: writer after writer, each oldest first."""
    return [record for writer in log_layout(base) for record in read_writer_records(writer)]


# ---- verification ---------------------------------------------------------------------------------


class Finding(StrEnum):
    """Why a record breaks the chain (or, for INCOMPLETE_LAST_RECORD, a warning only)."""

    EDITED = "edited"  # its content no longer matches its chain value
    INSERTED = "inserted"  # a line that is not part of the chain, between two that are
    DELETED = "deleted"  # seq jumps: records are missing
    REORDERED = "reordered"  # seq goes back, or a later record comes first
    CHAIN_BROKEN = "chain_broken"  # seq follows on but prev names another chain value
    MISSING_FILE = "missing_file"  # a rotated file is gone
    MALFORMED = "malformed"  # not a whole chained record (and not a torn last line)
    WRONG_KEY = "wrong_key"  # no record verifies: wrong key, or keyed vs unkeyed mix-up
    INCOMPLETE_LAST_RECORD = "incomplete_last_record"  # torn final line from a crash: warning
    TRUNCATED = "truncated"  # ends before the seq the server reported (only with an outside anchor)
    ANCHOR_MISMATCH = "anchor_mismatch"  # the record at the reported seq has another chain value


@dataclass(frozen=True)
class Problem:
    finding: Finding
    file: Path
    line: int  # 1-based line in `file`
    seq: int | None
    detail: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return f"{self.file} line {self.line}{seq}: {self.finding.value}: {self.detail}"


@dataclass(frozen=True)
class ChainReport:
    """The verdict on one writer's chain: the first problem, if any, and a torn-tail warning."""

    writer: str
    files: tuple[Path, ...]
    records: int  # records verified before the first problem
    last_seq: int
    problem: Problem | None = None
    warning: Problem | None = None


@dataclass(frozen=True)
class VerifyReport:
    keyed: bool
    chains: tuple[ChainReport, ...]

    @property
    def ok(self) -> bool:
        return all(c.problem is None for c in self.chains)

    @property
    def problems(self) -> list[Problem]:
        return [c.problem for c in self.chains if c.problem is not None]

    @property
    def warnings(self) -> list[Problem]:
        return [c.warning for c in self.chains if c.warning is not None]


@dataclass(frozen=True)
class _Entry:
    file: Path
    line: int
    complete: bool  # ended with a newline
    record: Any  # the parsed JSON, or None when the line does not parse


def _entries(path: Path) -> Iterator[_Entry]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            yield _Entry(path, number, raw.endswith(b"\n"), record)


class _Stream:
    """The entries of a chain's files in order, with look-ahead."""

    def __init__(self, files: list[Path]) -> None:
        self._it = (entry for path in files for entry in _entries(path))
        self._ahead: deque[_Entry] = deque()

    def peek(self, i: int = 0) -> _Entry | None:
        while len(self._ahead) <= i:
            entry = next(self._it, None)
            if entry is None:
                return None
            self._ahead.append(entry)
        return self._ahead[i]

    def next(self) -> _Entry | None:
        return self._ahead.popleft() if self._ahead else next(self._it, None)


def verify_log(base: Path, key: bytes | None) -> VerifyReport:
    """Check every writer's chain under `base`; each report names its first bad record."""
    return VerifyReport(key is not None, tuple(verify_chain(w, key) for w in log_layout(base)))


def verify_chain(writer: WriterFiles, key: bytes | None) -> ChainReport:
    files = writer.files
    # A rotated file is never renamed again, so a gap in the numbers is a removed file.
    after_gap: dict[Path, str] = {}
    expected = 1
    for index, path in writer.rotated:
        if index != expected:
            after_gap[path] = ", ".join(str(rotated_path(writer.active, i).name) for i in range(expected, index))
        expected = index + 1

    stream = _Stream(files)
    prev, last_seq, verified, current_file = GENESIS, 0, 0, None

    def report(finding: Finding, entry: _Entry, detail: str, *, warning: bool = False) -> ChainReport:
        seq = entry.record.get("seq") if isinstance(entry.record, dict) else None
        problem = Problem(finding, entry.file, entry.line, seq if type(seq) is int else None, detail)
        if warning:
            return ChainReport(writer.writer, tuple(files), verified, last_seq, warning=problem)
        return ChainReport(writer.writer, tuple(files), verified, last_seq, problem=problem)

    while (entry := stream.next()) is not None:
        first_in_file = entry.file != current_file
        current_file = entry.file
        if first_in_file and entry.file in after_gap:
            return report(Finding.MISSING_FILE, entry, f"{after_gap[entry.file]} is missing")
        record = entry.record
        if not is_chained(record):
            if stream.peek() is None and not entry.complete:
                return report(
                    Finding.INCOMPLETE_LAST_RECORD, entry,
                    "the last line is cut short (a crash while writing, not tampering); "
                    "the server cuts it off when it starts", warning=True,
                )  # fmt: skip
            return report(Finding.MALFORMED, entry, "not a whole chained audit record")
        seq = record["seq"]
        if not record_chain_ok(record, key):
            if verified == 0 and not _any_verifies(files, key):
                if key is not None:
                    how = "with this key (wrong key, or the log has no key)"
                else:
                    how = "without a key (the log was written with an HMAC key: pass --hmac-key-file)"
                return report(Finding.WRONG_KEY, entry, f"no record verifies {how}")
            following = stream.peek()
            if (
                following is not None
                and is_chained(following.record)
                and following.record["prev"] == prev
                and following.record["seq"] == last_seq + 1
                and record_chain_ok(following.record, key)
            ):
                return report(Finding.INSERTED, entry, "this line is not part of the chain")
            return report(Finding.EDITED, entry, "the content does not match its chain value (edited or forged)")
        if seq == last_seq + 1 and record["prev"] == prev:
            prev, last_seq, verified = record["chain"], seq, verified + 1
            continue
        if seq == last_seq + 1:
            return report(Finding.CHAIN_BROKEN, entry, "prev does not name the previous record (from another chain)")
        if seq <= last_seq:
            return report(Finding.REORDERED, entry, f"seq {seq} comes after seq {last_seq}")
        if _seen_ahead(stream, last_seq, seq):
            return report(Finding.REORDERED, entry, f"seq {seq} comes before seq {last_seq + 1}")
        missing = f"record {last_seq + 1} is" if seq == last_seq + 2 else f"records {last_seq + 1}..{seq - 1} are"
        if first_in_file and last_seq > 0:
            return report(
                Finding.MISSING_FILE, entry,
                f"{missing} missing before this file (a rotated file was removed, "
                "or the end of the previous one was cut)",
            )  # fmt: skip
        return report(Finding.DELETED, entry, f"{missing} missing")
    if after_gap:  # the file after the gap held no records
        missing = ", ".join(after_gap.values())
        problem = Problem(Finding.MISSING_FILE, next(iter(after_gap)), 0, None, f"{missing} is missing")
        return ChainReport(writer.writer, tuple(files), verified, last_seq, problem=problem)
    return ChainReport(writer.writer, tuple(files), verified, last_seq)


def _any_verifies(files: list[Path], key: bytes | None) -> bool:
    """Does any record of the chain verify? (a fresh pass, so memory stays bounded)"""
    return any(
        is_chained(entry.record) and record_chain_ok(entry.record, key) for path in files for entry in _entries(path)
    )


def _seen_ahead(stream: _Stream, after: int, before: int) -> bool:
    """Does a record with after < seq < before follow soon? (then this one came too early)"""
    for i in range(_LOOKAHEAD):
        entry = stream.peek(i)
        if entry is None:
            return False
        if is_chained(entry.record) and after < entry.record["seq"] < before:
            return True
    return False


# ---- an outside reference -------------------------------------------------------------------------


def check_anchor(base: Path, writer: str, seq: int, chain: str | None = None) -> Problem | None:
    """Hold one writer's chain against what the server reported elsewhere (its log or metrics).

    A chain cannot show that whole records were cut off its end; a (seq, chain) the server
    published before can: the log must reach `seq`, and the record there must carry `chain`.
    """
    found = [w for w in log_layout(base) if w.writer == writer]
    active = writer_path(base, writer or None)
    if not found:
        return Problem(Finding.TRUNCATED, active, 0, None, f"no file of this writer; the server reported seq {seq}")
    last: tuple[Path, int, dict[str, Any]] | None = None
    for path in found[0].files:
        for entry in _entries(path):
            if not is_chained(entry.record):
                continue
            last = (entry.file, entry.line, entry.record)
            if entry.record["seq"] == seq:
                if chain is not None and not hmac.compare_digest(str(entry.record["chain"]), chain):
                    return Problem(Finding.ANCHOR_MISMATCH, entry.file, entry.line, seq,
                                   "the server reported another chain value for this record (rewritten)")
                return None
    if last is None:
        return Problem(Finding.TRUNCATED, active, 0, None, f"no records; the server reported seq {seq}")
    file, line, record = last
    end = record["seq"]
    if end < seq:
        missing = f"record {seq} is" if end + 1 == seq else f"records {end + 1}..{seq} are"
        return Problem(Finding.TRUNCATED, file, line, end,
                       f"the log ends here, but the server reported seq {seq}: {missing} cut off the end")
    return Problem(Finding.TRUNCATED, file, line, end, f"seq {seq} is not in the log")
