"""A burst of `too_many_denials` refusals shares audit records, and every refused request is named.

A flooder over its denial budget would otherwise cost a full audit record per refusal (about twice
a valid call); auth.refusals writes one record per principal, method and connection per 50 ms
window, listing every request id. Real AuditLog on a real file, a real event loop; no mocks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from aigis.auth.audit import AuditLog, read_records
from aigis.auth.audit_format import denial_count, request_ids
from aigis.auth.refusals import RefusalRecorder
from aigis.tools.audit_cmd import format_table, summarize

PRINCIPAL = "spiffe://aigis.local/client/flooder"


def refusal(request_id: str, *, method: str = "/aigis.calculator.v1.Calculator/Add",
            peer: str = "ipv4:127.0.0.1:50000") -> dict[str, Any]:
    return {"timestamp": "2026-11-30T23:00:00.000Z", "request_id": request_id, "rpc_method": method,
            "authorized": False, "reason": "too_many_denials", "principal": PRINCIPAL, "peer": peer,
            "client_id": None, "sub": None, "policy_name": "", "matched_rule": ""}


def _refuse(recorder: RefusalRecorder, record: dict[str, Any]) -> Any:
    """Hand `record` to the recorder as the enforcer does: its key, its id, the record itself."""
    key = (record["principal"], record["rpc_method"], record["peer"])
    return recorder.refuse(key, record["request_id"], lambda: record)


async def _refuse_all(audit: AuditLog, entries: list[dict[str, Any]], **options: Any) -> list[bool]:
    recorder = RefusalRecorder(audit, **options)
    return list(await asyncio.gather(*(_refuse(recorder, e) for e in entries)))


@pytest.fixture
def audit(tmp_path: Path) -> Any:
    log = AuditLog(tmp_path / "audit.jsonl")  # the default: durable (fsync) before answering
    log.start()
    yield log
    log.close()


def test_a_burst_is_one_record_naming_every_request(audit: AuditLog) -> None:
    """Ten refusals at once: one record, `request_ids` in arrival order, `count` 10, each durable."""
    ids = [f"{i:032x}" for i in range(10)]
    assert asyncio.run(_refuse_all(audit, [refusal(i) for i in ids])) == [True] * 10
    (record,) = read_records(audit.path)
    assert request_ids(record) == ids and record["request_id"] == ids[0] and denial_count(record) == 10
    assert record["reason"] == "too_many_denials" and record["principal"] == PRINCIPAL


def test_records_are_split_by_size_method_and_connection(audit: AuditLog) -> None:
    """At most `max_ids` per record; different methods or connections never share one."""
    entries = [refusal(f"a{i}") for i in range(10)]
    entries += [refusal("m0", method="/aigis.calculator.v1.Calculator/Sum"), refusal("p0", peer="ipv4:127.0.0.1:1")]
    assert all(asyncio.run(_refuse_all(audit, entries, max_ids=4)))
    records = read_records(audit.path)
    assert sorted(len(request_ids(r)) for r in records) == [1, 1, 2, 4, 4]
    assert sorted(rid for r in records for rid in request_ids(r)) == sorted(e["request_id"] for e in entries)
    assert {r["rpc_method"] for r in records if request_ids(r) == ["m0"]} == {"/aigis.calculator.v1.Calculator/Sum"}


def test_refusals_apart_in_time_are_separate_records(audit: AuditLog) -> None:
    """The window closes: a refusal after it starts a new record."""

    async def two_bursts() -> None:
        recorder = RefusalRecorder(audit, window=0.02)
        assert await _refuse(recorder, refusal("first"))
        assert await _refuse(recorder, refusal("second"))

    asyncio.run(two_bursts())
    assert [request_ids(r) for r in read_records(audit.path)] == [["first"], ["second"]]


def test_a_cancelled_refusal_does_not_disturb_the_others(audit: AuditLog) -> None:
    """A client that gives up (its handler cancelled) leaves the shared record and the other
    refusals' answers intact; its request id is still written (it was refused, just not answered)."""

    async def one_cancelled() -> list[bool]:
        recorder = RefusalRecorder(audit, window=0.05)
        tasks = [asyncio.create_task(_refuse(recorder, refusal(f"r{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return [d for d in done if not isinstance(d, BaseException)]

    assert asyncio.run(one_cancelled()) == [True, True]
    (record,) = read_records(audit.path)
    assert request_ids(record) == ["r0", "r1", "r2"]


def test_not_durable_means_false_for_every_refusal_in_the_record(tmp_path: Path) -> None:
    """If the shared record cannot be made durable (here: the log is closed), every refusal in it
    learns so, and the enforcer answers UNAVAILABLE instead of an unrecorded denial."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.start()
    log.close()
    assert asyncio.run(_refuse_all(log, [refusal("x"), refusal("y")])) == [False, False]


def test_audit_show_counts_and_lists_shared_records() -> None:
    """`aigis audit show --summary` counts a shared record as its `count` denials; the table names
    the first request id and how many more the record holds."""
    shared = {**refusal("aaaa"), "request_ids": ["aaaa", "bbbb", "cccc"], "count": 3}
    summary = summarize([shared, {**refusal("dddd"), "reason": "token_bad_signature"}])
    assert summary.denials == 4
    assert dict(summary.by_reason) == {"too_many_denials": 3, "token_bad_signature": 1}
    assert "aaaa (+2 more)" in format_table([shared])
