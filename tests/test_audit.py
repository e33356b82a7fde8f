"""The audit log is tamper-evident and loss-free: a hash chain across rotated files, verified by
`aigis audit verify`; restarts and `kill -9` continue the chain; floods are counted, never lost
silently. Everything runs on real files (and real processes for the crash)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import RPC_KINDS, channel, run
from conftest import make_pki, stack_config

from aigis.auth.audit import OVERFLOW_EVENT, AuditError, AuditLog, Durability, read_records
from aigis.auth.audit_chain import (
    GENESIS,
    VerifyReport,
    canonical_json,
    load_hmac_key,
    log_layout,
    seal,
    verify_log,
    write_new_key,
)
from aigis.server.app import StartupError, start_server
from aigis.server.config import ConfigError, config_from_mapping
from aigis.tools.audit_cmd import summarize
from aigis.tools.cli import main

REPO = Path(__file__).resolve().parent.parent
A59_FIELDS = {
    "timestamp", "request_id", "rpc_method", "authorized", "reason", "principal", "peer",
    "client_id", "sub", "policy_name", "matched_rule",
}  # fmt: skip


def denial(i: int, reason: str = "scope_missing", principal: str = "spiffe://aigis.local/client/reader") -> dict:
    """A record shaped exactly like the interceptor's (fixed widths, so line lengths are stable)."""
    return {
        "timestamp": f"2026-11-25T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
        "request_id": f"{i:032x}",
        "rpc_method": "/aigis.calculator.v1.Calculator/Add",
        "authorized": False,
        "reason": reason,
        "principal": principal,
        "peer": "ipv4:127.0.0.1:52344",
        "client_id": "reader",
        "sub": "reader",
        "policy_name": "aigis-default",
        "matched_rule": "calculator",
    }


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A real 32-byte key, kept in its own directory apart from the log."""
    (tmp_path / "keys").mkdir()
    path = tmp_path / "keys" / "audit.key"
    write_new_key(path)
    return path


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    (tmp_path / "log").mkdir()
    return tmp_path / "log" / "audit.jsonl"


def write(path: Path, entries: list[dict], **options: Any) -> AuditLog:
    """Start a writer, hand it `entries`, wait for them, close it."""
    options.setdefault("fsync", False)
    audit = AuditLog(path, **options)
    audit.start()
    for entry in entries:
        audit.record(entry)
    assert audit.flush(timeout=30)
    audit.close()
    return audit


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def verdict(report: VerifyReport) -> tuple[bool, str | None, str | None, int | None, int | None]:
    """(ok, finding, file name, line, seq) of the first problem, else of the first warning."""
    found = (report.problems or report.warnings or [None])[0]
    if found is None:
        return (report.ok, None, None, None, None)
    return (report.ok, found.finding.value, found.file.name, found.line, found.seq)


# ---- the record and its chain -------------------------------------------------------------------


def test_records_keep_the_a59_fields_and_add_seq_prev_chain(log_path: Path, key_file: Path) -> None:
    """Each record is the interceptor's fields plus seq (1, 2, ...), prev (the previous chain) and chain."""
    write(log_path, [denial(i) for i in range(3)], hmac_key_file=key_file)
    records = read_records(log_path)
    assert [set(r) for r in records] == [A59_FIELDS | {"seq", "prev", "chain"}] * 3
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert [r["prev"] for r in records] == [GENESIS, records[0]["chain"], records[1]["chain"]]
    assert [r["request_id"] for r in records] == [denial(i)["request_id"] for i in range(3)]


@pytest.mark.parametrize("keyed", [True, False], ids=["hmac-sha256", "sha256"])
def test_chain_is_the_documented_mac_over_the_line_itself(log_path: Path, key_file: Path, keyed: bool) -> None:
    """chain = HMAC-SHA256(key, prev || canonical JSON) — or SHA-256 without a key — recomputable from the line."""
    write(log_path, [denial(1), denial(2)], hmac_key_file=key_file if keyed else None)
    key = key_file.read_bytes()
    for raw in lines(log_path):
        record = json.loads(raw)
        chain = record.pop("chain")
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        # The stored line is that canonical body with the chain inserted before the closing brace.
        assert raw == body[:-1] + f',"chain":"{chain}"}}\n'.encode()
        message = record["prev"].encode() + body
        expected = hmac.new(key, message, hashlib.sha256) if keyed else hashlib.sha256(message)
        assert chain == expected.hexdigest()


def test_log_file_is_private(log_path: Path) -> None:
    """The audit file names principals and peers: it is created mode 0600."""
    write(log_path, [denial(1)])
    assert log_path.stat().st_mode & 0o777 == 0o600


# ---- tampering ----------------------------------------------------------------------------------

PER_FILE = 10  # the tamper log: audit.jsonl.1 = seq 1-10, audit.jsonl.2 = 11-20, audit.jsonl = 21-30


def tamper_log(path: Path, key_file: Path, reason: str = "scope_missing") -> None:
    """30 records, exactly 10 per file, so every case below can name file, line and seq."""
    longest = len(seal(denial(30), 30, GENESIS, None)[0])
    entries = [denial(i, reason=reason) for i in range(1, 31)]
    write(path, entries, hmac_key_file=key_file, max_bytes=PER_FILE * longest)
    files = [p.name for p in log_layout(path)[0].files]
    assert files == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl"]
    assert [json.loads(raw)["seq"] for raw in lines(path.with_name("audit.jsonl.2"))] == list(range(11, 21))


def edit_line(path: Path, index: int, change: Callable[[bytes], bytes]) -> None:
    content = lines(path)
    content[index] = change(content[index])
    path.write_bytes(b"".join(content))


def other_log_file(path: Path, key_file: Path) -> bytes:
    """audit.jsonl.2 of a different log written with the same key (same seqs, another chain)."""
    other = path.parent.parent / "other" / "audit.jsonl"
    other.parent.mkdir()
    tamper_log(other, key_file, reason="token_missing")
    return other.with_name("audit.jsonl.2").read_bytes()


def forged_line(path: Path) -> bytes:
    """What an attacker without the key writes: a plausible record with a made-up chain value."""
    after = json.loads(lines(path)[1])
    forged = {**denial(99, reason="token_missing"), "seq": after["seq"] + 1, "prev": after["chain"]}
    return seal(forged, forged["seq"], forged["prev"], b"not-the-key" * 4)[0]


@dataclass(frozen=True)
class Tamper:
    act: Callable[[Path, Path], Any]  # (log dir, key file)
    expected: tuple[bool, str | None, str | None, int | None, int | None]
    verify_key: str = "right"  # "right", "wrong" or "none"


def _two(d: Path) -> Path:
    return d / "audit.jsonl.2"


def _swap(content: list[bytes], i: int) -> list[bytes]:
    content[i], content[i + 1] = content[i + 1], content[i]
    return content


TAMPERING = {
    "intact": Tamper(lambda d, k: None, (True, None, None, None, None)),
    "edit-a-field": Tamper(
        lambda d, k: edit_line(_two(d), 2, lambda raw: raw.replace(b"scope_missing", b"token_expired")),
        (False, "edited", "audit.jsonl.2", 3, 13),
    ),
    "edit-and-recompute-unkeyed-chain": Tamper(
        lambda d, k: edit_line(
            _two(d),
            2,
            lambda raw: seal({**json.loads(raw), "principal": "someone-else"}, 13, json.loads(raw)["prev"], None)[0],
        ),
        (False, "edited", "audit.jsonl.2", 3, 13),
    ),
    "delete-a-line": Tamper(
        lambda d, k: _two(d).write_bytes(b"".join(lines(_two(d))[:2] + lines(_two(d))[3:])),
        (False, "deleted", "audit.jsonl.2", 3, 14),
    ),
    "delete-the-first-line": Tamper(
        lambda d, k: (d / "audit.jsonl.1").write_bytes(b"".join(lines(d / "audit.jsonl.1")[1:])),
        (False, "deleted", "audit.jsonl.1", 1, 2),
    ),
    "swap-two-lines": Tamper(
        lambda d, k: _two(d).write_bytes(b"".join(_swap(lines(_two(d)), 2))),
        (False, "reordered", "audit.jsonl.2", 3, 14),
    ),
    "replay-a-line": Tamper(
        lambda d, k: _two(d).write_bytes(b"".join(lines(_two(d))[:2] + lines(_two(d))[1:])),
        (False, "reordered", "audit.jsonl.2", 3, 12),
    ),
    "insert-a-forged-line": Tamper(
        lambda d, k: _two(d).write_bytes(b"".join([*lines(_two(d))[:2], forged_line(_two(d)), *lines(_two(d))[2:]])),
        (False, "inserted", "audit.jsonl.2", 3, 13),
    ),
    "insert-garbage": Tamper(
        lambda d, k: _two(d).write_bytes(b"".join([*lines(_two(d))[:2], b"hello\n", *lines(_two(d))[2:]])),
        (False, "malformed", "audit.jsonl.2", 3, None),
    ),
    "truncate-mid-line": Tamper(
        lambda d, k: os.truncate(d / "audit.jsonl", (d / "audit.jsonl").stat().st_size - 40),
        (True, "incomplete_last_record", "audit.jsonl", 10, None),
    ),
    "truncate-a-rotated-file-mid-line": Tamper(
        lambda d, k: os.truncate(_two(d), _two(d).stat().st_size - 40),
        (False, "malformed", "audit.jsonl.2", 10, None),
    ),
    "remove-the-oldest-rotated-file": Tamper(
        lambda d, k: (d / "audit.jsonl.1").unlink(),
        (False, "missing_file", "audit.jsonl.2", 1, 11),
    ),
    "remove-the-newest-rotated-file": Tamper(
        lambda d, k: _two(d).unlink(),
        (False, "missing_file", "audit.jsonl", 1, 21),
    ),
    "remove-the-oldest-and-renumber": Tamper(
        lambda d, k: os.replace(_two(d), d / "audit.jsonl.1"),
        (False, "deleted", "audit.jsonl.1", 1, 11),
    ),
    "splice-a-file-from-another-chain": Tamper(
        lambda d, k: _two(d).write_bytes(other_log_file(d / "audit.jsonl", k)),
        (False, "chain_broken", "audit.jsonl.2", 1, 11),
    ),
    "wrong-hmac-key": Tamper(lambda d, k: None, (False, "wrong_key", "audit.jsonl.1", 1, 1), verify_key="wrong"),
    "no-key-for-a-keyed-log": Tamper(lambda d, k: None, (False, "wrong_key", "audit.jsonl.1", 1, 1), verify_key="none"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_names_the_first_bad_record(log_path: Path, key_file: Path, case: str) -> None:
    """Verify reports exactly where and how the log was changed (a torn last line is only a warning)."""
    tamper_log(log_path, key_file)
    tamper = TAMPERING[case]
    tamper.act(log_path.parent, key_file)
    key = {"right": key_file.read_bytes(), "wrong": os.urandom(32), "none": None}[tamper.verify_key]
    assert verdict(verify_log(log_path, key)) == tamper.expected


def test_unkeyed_chain_catches_edits_but_not_a_rebuild(log_path: Path) -> None:
    """Without a key, a naive edit is caught; rebuilding the whole chain is not (hence hmac_key_file)."""
    write(log_path, [denial(i) for i in range(5)])
    edit_line(log_path, 1, lambda raw: raw.replace(b"reader", b"writer"))
    assert verdict(verify_log(log_path, None)) == (False, "edited", "audit.jsonl", 2, 2)
    rebuilt, prev = [], GENESIS
    for seq, raw in enumerate(lines(log_path), start=1):
        line, prev = seal(json.loads(raw), seq, prev, None)
        rebuilt.append(line)
    log_path.write_bytes(b"".join(rebuilt))
    assert verify_log(log_path, None).ok


# ---- rotation, restart, crash --------------------------------------------------------------------


def test_rotation_keeps_the_chain(log_path: Path, key_file: Path) -> None:
    """Full files are renamed audit.jsonl.1, .2, ...; each new file's first prev is the last chain before it."""
    write(log_path, [denial(i) for i in range(200)], hmac_key_file=key_file, max_bytes=8_000)
    files = log_layout(log_path)[0].files
    assert len(files) > 10
    assert [p.name for p in files[:-1]] == [f"audit.jsonl.{i}" for i in range(1, len(files))]
    assert all(p.stat().st_size <= 8_000 for p in files)
    for before, after in itertools.pairwise(files):
        assert json.loads(lines(after)[0])["prev"] == json.loads(lines(before)[-1])["chain"]
    assert [r["seq"] for r in read_records(log_path)] == list(range(1, 201))
    assert verdict(verify_log(log_path, key_file.read_bytes())) == (True, None, None, None, None)


def test_restart_continues_the_chain(log_path: Path, key_file: Path) -> None:
    """A new writer on an existing log continues after its last seq and chain value."""
    write(log_path, [denial(i) for i in range(5)], hmac_key_file=key_file, max_bytes=2_000)
    write(log_path, [denial(i) for i in range(5, 12)], hmac_key_file=key_file, max_bytes=2_000)
    assert [r["seq"] for r in read_records(log_path)] == list(range(1, 13))
    report = verify_log(log_path, key_file.read_bytes())
    assert report.ok and report.chains[0].records == 12


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], 5, id="torn-half-line-is-cut-off"),
        pytest.param(lambda raw: raw[:-1], 6, id="whole-record-without-newline-is-kept"),
    ],
)
def test_restart_repairs_a_torn_last_line(
    log_path: Path, key_file: Path, tail: Callable[[bytes], bytes], kept: int
) -> None:
    """A crash mid-write leaves a torn line: verify warns; the next start repairs it and the chain goes on."""
    write(log_path, [denial(i) for i in range(6)], hmac_key_file=key_file)
    edit_line(log_path, 5, tail)
    key = key_file.read_bytes()
    if kept == 5:
        assert verdict(verify_log(log_path, key)) == (True, "incomplete_last_record", "audit.jsonl", 6, None)
    write(log_path, [denial(i) for i in range(6, 9)], hmac_key_file=key_file)
    assert [r["seq"] for r in read_records(log_path)] == list(range(1, kept + 4))
    assert verdict(verify_log(log_path, key)) == (True, None, None, None, None)


def test_restart_after_a_crash_between_rename_and_create(log_path: Path, key_file: Path) -> None:
    """If the active file is missing (crash during rotation), the chain continues from the newest rotated file."""
    write(log_path, [denial(i) for i in range(4)], hmac_key_file=key_file)
    os.rename(log_path, log_path.with_name("audit.jsonl.1"))
    write(log_path, [denial(i) for i in range(4, 6)], hmac_key_file=key_file)
    assert [r["seq"] for r in read_records(log_path)] == [1, 2, 3, 4, 5, 6]
    assert verify_log(log_path, key_file.read_bytes()).ok


def test_restart_refuses_an_unchained_tail(log_path: Path) -> None:
    """A log whose last line is not a chained record (e.g. hand-written) stops start-up rather than guessing."""
    log_path.write_text(json.dumps(denial(1)) + "\n")
    with pytest.raises(AuditError, match="not a chained audit record"):
        AuditLog(log_path).start()


CRASH_WRITER = """
import sys, time
from pathlib import Path
from aigis.auth.audit import AuditLog
path, key, max_bytes, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
audit = AuditLog(path, hmac_key_file=key, max_bytes=max_bytes, fsync=False)
audit.start()
for i in range(count):
    audit.record({"timestamp": "2026-11-25T10:00:00.000Z", "request_id": "%032x" % i, "authorized": False,
                  "reason": "token_missing", "principal": "", "rpc_method": "/aigis.calculator.v1.Calculator/Add"})
    if i % 500 == 0:
        time.sleep(0.0005)
audit.flush(60)
time.sleep(60)
"""


def _log_bytes(base: Path) -> int:
    """Bytes in every file of the log; a file renamed by rotation between listing and stat counts 0."""
    total = 0
    for writer in log_layout(base):
        for p in writer.files:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
    return total


def test_kill_9_mid_write_leaves_a_verifiable_log_and_the_chain_continues(log_path: Path, key_file: Path) -> None:
    """SIGKILL while writing (and rotating): the log verifies up to its last whole record; a restart continues it."""
    key = key_file.read_bytes()
    for round_ in range(3):
        before = len(read_records(log_path))
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(log_path), str(key_file), "200000", "400000"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while _log_bytes(log_path) < 1_000_000 * (round_ + 1):
                assert proc.poll() is None and time.monotonic() < deadline, "the writer did not get going"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        crashed = verify_log(log_path, key)
        assert crashed.ok, crashed.problems
        assert crashed.chains[0].records > before
        last_seq = crashed.chains[0].last_seq
        write(log_path, [denial(i) for i in range(10)], hmac_key_file=key_file, max_bytes=200_000)
        after = verify_log(log_path, key)
        assert verdict(after) == (True, None, None, None, None)
        assert after.chains[0].last_seq == last_seq + 10
    assert len(log_layout(log_path)[0].rotated) >= 3


# ---- floods and overflow ---------------------------------------------------------------------------


async def _flood(audit: AuditLog, count: int) -> float:
    """Call record() `count` times on this event loop, yielding now and then; the mean cost in µs."""
    spent = 0.0
    for start in range(0, count, 1000):
        begin = time.perf_counter()
        for i in range(start, min(start + 1000, count)):
            audit.record(denial(i, reason=("scope_missing", "token_missing")[i % 2]))
        spent += time.perf_counter() - begin
        await asyncio.sleep(0)
    return spent / count * 1e6


def test_a_flood_is_written_in_full(log_path: Path, key_file: Path) -> None:
    """50k denials recorded from the event loop: exactly 50k records, in order, chain intact, no overflow."""
    audit = AuditLog(log_path, hmac_key_file=key_file, queue_size=60_000)
    audit.start()
    asyncio.run(_flood(audit, 50_000))
    assert audit.flush(timeout=60)
    audit.close()
    records = read_records(log_path)
    assert len(records) == 50_000 == audit.written
    assert [r["request_id"] for r in records] == [f"{i:032x}" for i in range(50_000)]
    assert audit.dropped == 0 and not any("event" in r for r in records)
    assert verify_log(log_path, key_file.read_bytes()).ok


def test_a_full_queue_is_counted_in_an_overflow_record(log_path: Path, key_file: Path) -> None:
    """With room for 8, 1000 records become 8 records plus one chained audit_overflow record for 992."""
    audit = AuditLog(log_path, hmac_key_file=key_file, queue_size=8, fsync=False)
    for i in range(1000):  # before start(): nothing drains, so exactly 8 fit
        audit.record(denial(i, reason="token_missing" if i < 500 else "scope_missing"))
    assert audit.dropped == 992
    audit.start()
    assert audit.flush(timeout=10)
    audit.close()
    records = read_records(log_path)
    assert [r.get("event") for r in records] == [None] * 8 + [OVERFLOW_EVENT]
    overflow = records[-1]
    assert overflow["dropped"] == 992
    assert overflow["by_reason"] == {"token_missing": 492, "scope_missing": 500}
    assert overflow["causes"] == {"queue_full": 992}
    assert (overflow["first_timestamp"], overflow["last_timestamp"]) == (
        denial(8)["timestamp"], denial(999)["timestamp"]
    )  # fmt: skip
    assert verify_log(log_path, key_file.read_bytes()).ok
    summary = summarize(records)
    assert (summary.denials, summary.lost) == (8, 992)


def test_overflow_under_a_live_flood_accounts_for_every_record(log_path: Path) -> None:
    """A tiny queue under a 20k flood: written denials + the overflow counts = 20k exactly."""
    audit = AuditLog(log_path, queue_size=16, fsync=True)
    audit.start()
    asyncio.run(_flood(audit, 20_000))
    assert audit.flush(timeout=60)
    audit.close()
    records = read_records(log_path)
    denials = [r for r in records if "event" not in r]
    lost = sum(r["dropped"] for r in records if r.get("event") == OVERFLOW_EVENT)
    assert lost > 0
    assert len(denials) + lost == 20_000 == len(denials) + audit.dropped
    assert verify_log(log_path, None).ok


WRITE_FAILURE = """
import json, resource, signal, sys
from pathlib import Path
from aigis.auth.audit import AuditLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
path = Path(sys.argv[1])
denial = lambda i: {"timestamp": "2026-11-25T10:00:00.000Z", "request_id": "%032x" % i, "authorized": False,
                    "reason": "token_missing", "principal": ""}
audit = AuditLog(path, fsync=False)
audit.start()
for i in range(10):
    audit.record(denial(i))
assert audit.flush(5)
size = path.stat().st_size
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # room for part of one line only
for i in range(10, 20):
    audit.record(denial(i))
full = {"flushed": audit.flush(1), "dropped": audit.dropped, "size": path.stat().st_size == size}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
audit.record(denial(20))
full["flushed_after"] = audit.flush(5)
audit.close()
print(json.dumps(full))
"""


def test_a_failed_write_is_rolled_back_and_reported(log_path: Path) -> None:
    """Disk full (real EFBIG via RLIMIT_FSIZE): the file is cut back to whole records; the loss is chained later."""
    result = subprocess.run(
        [sys.executable, "-c", WRITE_FAILURE, str(log_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"flushed": False, "dropped": 10, "size": True, "flushed_after": True}
    records = read_records(log_path)
    assert [r["request_id"] for r in records[:11]] == [f"{i:032x}" for i in (*range(10), 20)]
    assert records[11]["event"] == OVERFLOW_EVENT
    assert (records[11]["dropped"], records[11]["causes"]) == (10, {"write_error": 10})
    assert verdict(verify_log(log_path, None)) == (True, None, None, None, None)


def test_record_after_close_is_not_queued(log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record handed over after close() is refused loudly, not queued into nothing."""
    audit = write(log_path, [denial(1)])
    audit.record(denial(2))
    assert "after close is lost" in caplog.text
    assert len(read_records(log_path)) == 1


# ---- several writers --------------------------------------------------------------------------------


def test_workers_write_their_own_chains_read_together(log_path: Path, key_file: Path) -> None:
    """Worker N writes audit.wN.jsonl with its own chain; show/verify read every writer from the base path."""
    writers = [AuditLog(log_path, hmac_key_file=key_file, worker_id=w, fsync=False) for w in (0, 1, 2)]
    for audit in writers:
        audit.start()
    for i in range(300):
        writers[i % 3].record(denial(i))
    for audit in writers:
        assert audit.flush(timeout=10)
        audit.close()
    assert [w.path.name for w in writers] == ["audit.w0.jsonl", "audit.w1.jsonl", "audit.w2.jsonl"]
    assert not log_path.exists()
    report = verify_log(log_path, key_file.read_bytes())
    assert report.ok
    assert [(c.writer, c.records, c.last_seq) for c in report.chains] == [(w, 100, 100) for w in ("0", "1", "2")]
    assert sorted(r["request_id"] for r in read_records(log_path)) == sorted(f"{i:032x}" for i in range(300))


def test_a_second_writer_on_the_same_file_is_refused(log_path: Path) -> None:
    """Two processes on one file would interleave two chains: the second is refused at start."""
    first = AuditLog(log_path, fsync=False)
    first.start()
    try:
        with pytest.raises(AuditError, match="another process is writing"):
            AuditLog(log_path, fsync=False).start()
    finally:
        first.close()
    again = AuditLog(log_path, fsync=False)
    again.start()  # free again once the first one closed
    again.close()


@pytest.mark.parametrize("worker_id", ["../x", "a b", "", "x" * 33], ids=["traversal", "space", "empty", "long"])
def test_worker_ids_are_safe_file_name_parts(log_path: Path, worker_id: str) -> None:
    """A worker id becomes part of a file name: only letters, digits, '_' and '-'."""
    with pytest.raises(ValueError, match="worker id"):
        AuditLog(log_path, worker_id=worker_id)


# ---- the key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        pytest.param(b"k" * 31, 0o600, "needs at least 32 bytes, has 31", id="too-short"),
        pytest.param(b"k" * 32, 0o640, "readable by others", id="group-readable"),
        pytest.param(b"k" * 32, 0o604, "readable by others", id="world-readable"),
        pytest.param(None, 0o600, "cannot read it", id="missing"),
    ],
)
def test_bad_key_files_are_refused_without_showing_the_key(
    tmp_path: Path, content: bytes | None, mode: int, message: str
) -> None:
    """The key file must exist, hold ≥ 32 bytes and be private; errors name the file, never the key."""
    path = tmp_path / "audit.key"
    if content is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        os.write(fd, content)
        os.close(fd)
        os.chmod(path, mode)
    with pytest.raises(AuditError, match=message) as raised:
        load_hmac_key(path)
    assert str(path) in str(raised.value) and "kkkk" not in str(raised.value)


# ---- configuration and the running server ------------------------------------------------------------


@pytest.mark.parametrize(
    ("audit", "error"),
    [
        pytest.param({"max_bytes": 0}, "audit.max_bytes: must be greater than 0", id="max-bytes-zero"),
        pytest.param({"queue_size": -1}, "audit.queue_size: must be greater than 0", id="queue-negative"),
        pytest.param({"durability": "yes"}, "audit.durability: expected one of fsync, write, background",
                     id="durability-unknown"),
        pytest.param({"hmac_key_file": ""}, "audit.hmac_key_file: must not be empty", id="key-file-empty"),
        pytest.param({"rotate": 1}, "audit.rotate: unknown key", id="unknown-key"),
    ],
)
def test_audit_config_errors_name_the_key(tmp_path: Path, audit: dict, error: str) -> None:
    """Invalid [audit] settings stop start-up with the key named."""
    with pytest.raises(ConfigError, match=error):
        config_from_mapping({"audit": audit}, tmp_path)


def test_audit_config_keys(tmp_path: Path) -> None:
    """[audit] hmac_key_file (relative to the file), max_bytes, queue_size and durability reach Config."""
    config = config_from_mapping(
        {"audit": {"hmac_key_file": "keys/audit.key", "max_bytes": 1024, "queue_size": 10, "durability": "write"}},
        tmp_path,
    )
    assert config.audit_hmac_key_file == (tmp_path / "keys" / "audit.key").resolve()
    assert (config.audit_max_bytes, config.audit_queue_size, config.audit_durability) == (1024, 10, Durability.WRITE)


def test_server_denials_under_load_are_all_in_the_keyed_chain(start_stack: Any, key_file: Path) -> None:
    """400 concurrent denied calls to a real server: 400 records, distinct request ids, chain verifies."""
    stack = start_stack(audit_hmac_key_file=key_file)
    with channel(stack, "demo") as ch, ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: run(lambda: RPC_KINDS["unary"](ch, ())), range(400)))
    assert {o.code for o in outcomes} == {grpc.StatusCode.UNAUTHENTICATED}
    records = stack.audit_records()
    assert sorted(r["request_id"] for r in records) == sorted(o.request_id for o in outcomes)
    assert verify_log(stack.audit_log, key_file.read_bytes()).ok


def test_server_refuses_to_start_with_a_bad_key_file(tmp_path: Path) -> None:
    """A configured but unusable key file stops start-up (fail closed), naming the file."""
    short = tmp_path / "short.key"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 8)
    os.close(fd)
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    config = stack_config(pki, tmp_path / "audit.jsonl", audit_hmac_key_file=short)
    with pytest.raises(StartupError, match=r"audit log: .*short.key: needs at least 32 bytes, has 8"):
        asyncio.run(start_server(config))


# ---- the command line -----------------------------------------------------------------------------------


def test_cli_verify_exit_codes_and_report(log_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aigis audit verify` exits 0 on an intact log and 1 naming file, line, seq and why otherwise."""
    tamper_log(log_path, key_file)
    args = ["audit", "verify", "--audit-log", str(log_path), "--hmac-key-file", str(key_file)]
    assert main(args) == 0
    assert "OK: 1 chain(s), 3 file(s), 30 record(s), HMAC-SHA256 chain intact" in capsys.readouterr().out
    edit_line(log_path, 4, lambda raw: raw.replace(b"reader", b"admin1"))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"FAIL {log_path} line 5 seq 25: edited:" in out and "FAILED: 1 chain(s) do not verify (HMAC-SHA256)" in out
    assert main(["audit", "verify", "--audit-log", str(log_path.with_name("nothing.jsonl"))]) == 2


def test_cli_verify_warns_about_a_torn_last_line(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A torn final line is a warning (exit 0), not tampering; the unkeyed chain gets a note."""
    write(log_path, [denial(i) for i in range(3)])
    os.truncate(log_path, log_path.stat().st_size - 10)
    assert main(["audit", "verify", "--audit-log", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {log_path} line 3: incomplete_last_record" in out
    assert "OK: 1 chain(s), 1 file(s), 2 record(s), SHA-256 (unkeyed) chain intact" in out
    assert "configure [audit] hmac_key_file" in out


def test_cli_show_summary_and_events(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`show --summary` counts denials by reason and principal; overflow records appear only with --json."""
    audit = AuditLog(log_path, queue_size=5, fsync=False)
    for i, (reason, who) in enumerate([("token_missing", "")] * 3 + [("scope_missing", "spiffe://x/client/a")] * 4):
        audit.record(denial(i, reason=reason, principal=who))
    audit.start()
    assert audit.flush(timeout=10)
    audit.close()
    assert main(["audit", "show", "--audit-log", str(log_path), "--summary"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "REASON         COUNT",
        "token_missing  3",
        "scope_missing  2",
        "",
        "PRINCIPAL            COUNT",
        "-                    3",
        "spiffe://x/client/a  2",
        "",
        "5 denial(s)",
        "2 record(s) lost to audit overflow (by reason: scope_missing 2)",
    ]
    assert main(["audit", "show", "--audit-log", str(log_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "5 record(s)"
    assert main(["audit", "show", "--audit-log", str(log_path), "--json"]) == 0
    events = [json.loads(line).get("event") for line in capsys.readouterr().out.splitlines()]
    assert events == [None] * 5 + [OVERFLOW_EVENT]


def test_cli_keygen_writes_a_private_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aigis audit keygen FILE` writes 32 random bytes with mode 0600 and never overwrites."""
    path = tmp_path / "audit.key"
    assert main(["audit", "keygen", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    first = path.read_bytes()
    assert main(["audit", "keygen", str(path)]) == 2
    assert path.read_bytes() == first and "not overwriting" in capsys.readouterr().err
    assert load_hmac_key(path) == first


def test_canonical_json_is_sorted_compact_ascii() -> None:
    """Canonical JSON: sorted keys, no spaces, non-ASCII escaped — one text per record."""
    assert canonical_json({"b": 1, "a": "é", "c": [True, None]}) == '{"a":"\\u00e9","b":1,"c":[true,null]}'


def test_verify_with_the_servers_anchor_catches_records_cut_off_the_end(
    log_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cutting whole records off the end leaves a valid chain; the (seq, chain) the server reported does not."""
    audit = write(log_path, [denial(i) for i in range(10)])
    seq, chain = audit.anchor
    assert seq == 10
    args = ["audit", "verify", "--audit-log", str(log_path)]
    assert main([*args, "--expect-seq", str(seq), "--expect-chain", chain]) == 0
    assert "OK: the log reaches seq 10 with the reported chain value" in capsys.readouterr().out
    log_path.write_bytes(b"".join(lines(log_path)[:7]))
    assert main(args) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert main([*args, "--expect-seq", str(seq)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {log_path} line 7 seq 7: truncated:" in out and "records 8..10 are cut off the end" in out
    assert main([*args, "--expect-seq", "7", "--expect-chain", chain]) == 1
    assert "anchor_mismatch" in capsys.readouterr().out
    assert main([*args, "--expect-chain", chain]) == 2
    assert "--expect-chain needs --expect-seq" in capsys.readouterr().err


def test_verify_anchor_names_the_worker_chain(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With several writers the anchor is about one of them, named with --writer."""
    for worker in (0, 1):
        write(log_path, [denial(i) for i in range(3 + worker)], worker_id=worker)
    args = ["audit", "verify", "--audit-log", str(log_path), "--expect-seq", "4"]
    assert main(args) == 1
    assert "name the chain with --writer (one of 0, 1)" in capsys.readouterr().out
    assert main([*args, "--writer", "1"]) == 0
    assert main([*args, "--writer", "0"]) == 1
    assert "record 4 is cut off the end" in capsys.readouterr().out


def test_record_durably_returns_once_the_record_is_in_the_file(log_path: Path) -> None:
    """The awaited record is in the file when record_durably returns: what the denial path relies on."""
    audit = AuditLog(log_path)  # durability fsync, the default
    audit.start()

    async def scenario() -> list[tuple[bool, bool]]:
        async def one(i: int) -> tuple[bool, bool]:
            entry = denial(i)
            durable = await audit.record_durably(entry)
            return durable, entry["request_id"] in await asyncio.to_thread(log_path.read_text)

        return await asyncio.gather(*(one(i) for i in range(50)))

    try:
        assert asyncio.run(scenario()) == [(True, True)] * 50
    finally:
        audit.close()


def test_a_record_arriving_during_close_is_refused_and_chained_as_a_shutdown_loss(log_path: Path) -> None:
    """A record that arrives while the log closes is not durable (the caller answers UNAVAILABLE) and
    is counted as `shutdown`, in the metric callback and in an overflow record written before the
    writer stops (when even that cannot be written, the count is carried to the next start: see
    tests/test_reliability.py's disk-full test)."""
    audit = AuditLog(log_path, fsync=False)
    dropped: list[str] = []
    audit.on_drop = lambda cause, n: dropped.append(cause)
    audit.start()
    audit.record(denial(1))
    with audit._cond:  # the instant close() has begun: closed, the writer still draining
        audit._closed = True
    assert asyncio.run(audit.record_durably(denial(2))) is False
    audit.close()
    assert dropped == ["shutdown"]
    assert not log_path.with_name(log_path.name + ".dropped").exists()
    overflow = [r for r in read_records(log_path) if r.get("event") == OVERFLOW_EVENT]
    assert [(r["dropped"], r["causes"]) for r in overflow] == [(1, {"shutdown": 1})]
    assert verify_log(log_path, None).ok
