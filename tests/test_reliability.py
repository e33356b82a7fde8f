"""Fault tests that stay (issue 12): each provokes one fault on real processes and checks the promise.

Marked `reliability`; each is bounded in calls and seconds, and CI runs them with the suite. The
figures they print (`-s`) are the ones in the README's reliability table.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from calls import issuer_token
from conftest import make_pki
from cryptography.hazmat.primitives import serialization
from flood import Seen, add_load, aio_channel
from serve_proc import Served, serve

from aigis.auth.audit import read_records
from aigis.auth.audit_chain import verify_log
from aigis.auth.audit_format import request_ids
from aigis.auth.clients import load_registry
from aigis.auth.issuer import TokenService
from aigis.auth.signing_keys import rotate_signing_key
from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc

pytestmark = pytest.mark.reliability

KILL_ROUNDS = 4
FLOOD_IN_FLIGHT = 64
# AIGIS_TEST_DURABILITY=background shows what the test catches without the durable default.
# These tests need thousands of denials a second to stress the audit log: the denial hold (which
# answers a flooder's refusals late, tests/test_denial_budget.py) would cut the flood to a trickle.
NO_HOLD = "[limits]\ndenial_hold_seconds = 0\n"
DURABILITY_CONFIG = f'[audit]\ndurability = "{os.environ.get("AIGIS_TEST_DURABILITY", "fsync")}"\n' + NO_HOLD


async def _flood_then_kill(served: Served, flood_seconds: float) -> Seen:
    """Flood denials for `flood_seconds`, kill -9 the server mid-flood, and return what clients saw."""
    stop = asyncio.Event()
    flood = asyncio.create_task(add_load(served.target, served.pki, in_flight=FLOOD_IN_FLIGHT, seconds=30, stop=stop))
    await asyncio.sleep(flood_seconds)
    served.proc.send_signal(signal.SIGKILL)
    await asyncio.sleep(0.5)  # calls in flight at the kill fail UNAVAILABLE; nothing is retried
    stop.set()
    return await flood


def test_kill_9_during_a_denial_flood_loses_no_denial_a_client_saw(tmp_path: Path) -> None:
    """kill -9 mid-flood, several times: every denial a client received is in the log, which verifies."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    audit_log = tmp_path / "audit.jsonl"
    seen = Seen()
    per_round = []
    for round_ in range(KILL_ROUNDS):
        served = serve(tmp_path, pki, audit_log, name=f"kill{round_}", config=DURABILITY_CONFIG)
        got = asyncio.run(_flood_then_kill(served, 1.0 + 0.3 * round_))
        assert served.proc.wait(30) == -signal.SIGKILL
        per_round.append(len(got.denial_ids))
        seen.merge(got)
    # A clean start after the last kill repairs any torn tail and continues the chain.
    served = serve(tmp_path, pki, audit_log, name="after")
    assert served.kill(signal.SIGTERM) == 0, served.output()
    records = read_records(audit_log)
    logged = {rid for r in records for rid in request_ids(r)}
    missing = seen.denial_ids - logged
    report = verify_log(audit_log, None)
    print(f"\nkill -9 x{KILL_ROUNDS} during a denial flood: {len(seen.denial_ids)} denials seen by clients "
          f"(per round {per_round}), {len(records)} records, {len(missing)} missing; codes {dict(seen.codes)}")
    assert min(per_round) > 50, per_round  # the flood really ran in every round
    assert not missing, f"{len(missing)} client-seen denials missing from the audit log"
    assert report.ok, report.problems


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample from the server's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0] == wanted)


def _file_size_limit(soft: int) -> None:
    """In the child: files may not grow past `soft` bytes (EFBIG: a disk that is full for us); the
    hard limit stays unlimited, so the test can lift it again (`resource.prlimit`) without root."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_disk_full_every_loss_is_chained_counted_and_logged_briefly(tmp_path: Path) -> None:
    """The log's disk fills during a flood: clients see UNAVAILABLE (never an unrecorded denial), the
    losses are chained once space is back and counted in aigis_audit_dropped_total, a few ERROR lines
    only; losses still unwritten at shutdown are chained at the next start."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    audit_log = tmp_path / "audit.jsonl"
    limit = 48 * 1024  # about 150 records, then every write fails
    served = serve(tmp_path, pki, audit_log, name="full", config=NO_HOLD, preexec=lambda: _file_size_limit(limit))
    port = served.info["metrics_port"]
    try:
        seen = asyncio.run(add_load(served.target, served.pki, in_flight=32, seconds=3, max_calls=20_000))
        unavailable = seen.codes["UNAVAILABLE"]
        assert unavailable > 100 and len(seen.denial_ids) > 50, seen.codes
        dropped = metric(port, "aigis_audit_dropped_total", 'cause="write_error"')
        assert dropped == unavailable, (dropped, seen.codes)
        assert audit_log.stat().st_size <= limit
        # Space is back: the writer chains the losses within its retry second, with no new traffic.
        resource.prlimit(served.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        def chained() -> int:  # small overflow records may fit even while full batches do not
            return sum(r["dropped"] for r in read_records(audit_log) if r.get("event") == "audit_overflow")

        _wait_for(lambda: chained() >= unavailable, 10, "the overflow records")
        overflow = [r for r in read_records(audit_log) if r.get("event") == "audit_overflow"]
        assert chained() == unavailable
        assert sum(r["causes"].get("write_error", 0) for r in overflow) == unavailable
        logged = {rid for r in read_records(audit_log) for rid in request_ids(r)}
        assert seen.denial_ids <= logged
        # The outside reference for `aigis audit verify --expect-seq`: the newest seq on disk.
        assert metric(port, "aigis_audit_last_seq", 'file="audit.jsonl"') == read_records(audit_log)[-1]["seq"]
        # Full again, and stopped while full: the losses go to the carry-over file.
        size = audit_log.stat().st_size
        resource.prlimit(served.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        again = asyncio.run(add_load(served.target, served.pki, in_flight=8, seconds=1, max_calls=2_000))
        assert again.codes["UNAVAILABLE"] > 0 and not again.denial_ids - logged, again.codes
    finally:
        assert served.kill(signal.SIGTERM) == 0, served.output()
    errors = [line for line in served.output().splitlines() if " ERROR " in line]
    carried = audit_log.with_name(audit_log.name + ".dropped")
    assert carried.exists(), served.output()
    print(f"\ndisk full: {len(seen.denial_ids)} denials recorded, {unavailable} calls answered UNAVAILABLE and "
          f"chained later; {again.codes['UNAVAILABLE']} more lost at shutdown, carried over; "
          f"{len(errors)} ERROR log lines")
    assert len(errors) <= 6, "\n".join(errors)
    restarted = serve(tmp_path, pki, audit_log, name="after-full")
    assert restarted.kill(signal.SIGTERM) == 0
    assert not carried.exists()
    last = [r for r in read_records(audit_log) if r.get("event") == "audit_overflow"][-1]
    assert last["carried_over"] is True and last["dropped"] >= again.codes["UNAVAILABLE"], last
    assert verify_log(audit_log, None).ok


ROTATIONS = 3
CALLERS = 64  # calls at once, each with a token the verifier has not seen, signed with the new key


def test_key_rotation_under_load_refuses_no_valid_call(start_stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`keys rotate` while many callers arrive at once with tokens under the new kid: they wait for
    the one re-read of the JWK Set (single flight) instead of being refused token_unknown_key."""
    monkeypatch.setattr("aigis.server.app.RELOAD_INTERVAL_SECONDS", 3600.0)  # only the unknown-kid path finds keys
    stack = start_stack()
    demo = load_registry(stack.pki.clients_registry).by_name("demo")
    assert demo is not None and stack.server.issuer is not None
    old_token = issuer_token(stack, "demo")
    totals: Counter[str] = Counter()

    async def burst(tokens: list[str]) -> Seen:
        """Every token used by CALLERS // len(tokens) calls, all started together, beside old-token load."""
        seen = Seen()
        background = asyncio.create_task(add_load(stack.target, stack.pki, token=old_token, in_flight=8, seconds=1))
        each = CALLERS // len(tokens)
        results = await asyncio.gather(*(
            add_load(stack.target, stack.pki, token=token, in_flight=each, max_calls=each) for token in tokens
        ))  # fmt: skip
        for result in [*results, await background]:
            seen.merge(result)
        return seen

    for _ in range(ROTATIONS):
        time.sleep(1.1)  # a made-up kid may make the server re-read the file at most once a second
        rotation = rotate_signing_key(stack.pki, now=datetime.now(UTC))
        key = serialization.load_pem_private_key(stack.pki.signing_key.read_bytes(), password=None)
        signer = TokenService(signing_key=key, kid=rotation.active, issuer=stack.server.issuer.issuer_url,
                              audience="aigis", ttl=timedelta(minutes=5))  # type: ignore[arg-type]  # fmt: skip
        now = datetime.now(UTC)
        tokens = [signer.issue(demo, None, now=now + timedelta(milliseconds=i)).access_token for i in range(16)]
        totals.update(asyncio.run(burst(tokens)).codes)
    print(f"\nkey rotation x{ROTATIONS} with {CALLERS} new-kid callers at once + old-token load: {dict(totals)}")
    assert set(totals) == {"OK"}, totals
    assert totals["OK"] >= ROTATIONS * CALLERS


NEVER_READ_STREAMS = 200  # asked for by one principal, over 4 connections
NEVER_READ_MESSAGES = 2_000  # each stream sends this many and reads no answer
MEMORY_BUDGET_MB = 64  # stated in the README: what never-reading streams may add to the server's RSS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_never_reading_streams_stay_within_a_memory_budget_while_valid_calls_are_served(tmp_path: Path) -> None:
    """One principal opens 200 bidi streams that send and never read: 64 are served (the per-principal
    cap, default), the rest refused stream_limit; flow control holds the writers (grpc.aio awaits each
    write), so the server's memory stays under budget, and another principal's calls are served."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    served = serve(tmp_path, pki, tmp_path / "audit.jsonl", name="noread")
    token = issuer_token(served.stack(), "demo")
    other = issuer_token(served.stack(), "calc-only")
    metadata = (("authorization", f"Bearer {token}"),)
    before = rss_mb(served.proc.pid)

    async def scenario() -> tuple[float, Seen]:
        channels = [aio_channel(served.target, pki, "demo") for _ in range(4)]

        async def numbers() -> AsyncIterator[calc.Number]:
            for _ in range(NEVER_READ_MESSAGES):
                yield calc.Number(value=1)

        calls = [calc_grpc.CalculatorStub(channels[i % 4]).RunningSum(numbers(), metadata=metadata, timeout=60)
                 for i in range(NEVER_READ_STREAMS)]  # fmt: skip
        await asyncio.sleep(5)  # the streams send what flow control lets through; nobody reads
        peak = rss_mb(served.proc.pid)
        seen = await add_load(served.target, pki, client="calc-only", token=other, in_flight=4, seconds=2)
        peak = max(peak, rss_mb(served.proc.pid))
        for call in calls:
            call.cancel()
        for ch in channels:
            await ch.close()
        return peak, seen

    try:
        peak, seen = asyncio.run(scenario())
        port = served.info["metrics_port"]
        over_cap = metric(port, "aigis_denials_total", 'reason="stream_limit"')
        # Past its denial budget the principal is refused before any check (too_many_denials).
        refused = over_cap + metric(port, "aigis_denials_total", 'reason="too_many_denials"')
    finally:
        assert served.kill(signal.SIGTERM) == 0, served.output()
    p50 = sorted(seen.latencies)[len(seen.latencies) // 2] * 1000
    print(f"\n{NEVER_READ_STREAMS} never-reading streams x {NEVER_READ_MESSAGES} messages from one principal: "
          f"{NEVER_READ_STREAMS - refused:.0f} served, {refused:.0f} refused ({over_cap:.0f} stream_limit, the "
          f"rest too_many_denials); server RSS "
          f"{before:.0f} -> {peak:.0f} MB (+{peak - before:.0f}); another principal meanwhile: "
          f"{dict(seen.codes)}, p50 {p50:.1f} ms")
    assert refused == NEVER_READ_STREAMS - 64 and over_cap > 0
    assert peak - before < MEMORY_BUDGET_MB
    assert set(seen.codes) == {"OK"} and seen.codes["OK"] > 10
