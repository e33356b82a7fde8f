"""[audit] format = "grpc": records as gRPC's own A59 `grpc_audit_log` object (grpc-go / C++ stdout logger).

A pipeline that parses grpc-go's and gRPC C++'s audit lines finds the same object in aigis's; the
rest of aigis's record and the hash chain stay beside it, and aigis's own tools read both layouts.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import grpc
from calls import bearer, channel, issuer_token, run
from private_stack import private_stack

from aigis.auth.audit_chain import verify_log
from aigis.auth.audit_format import A59_FIELDS, GRPC_AUDIT_LOG, AuditFormat, flat, to_grpc
from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.tools.audit_cmd import select, summarize

SAMPLE = {
    "timestamp": "2026-01-01T00:00:00.000Z",
    "request_id": "r1",
    "rpc_method": "/aigis.calculator.v1.Calculator/Add",
    "authorized": False,
    "reason": "scope_missing",
    "principal": "spiffe://aigis.local/client/reader",
    "peer": "ipv4:127.0.0.1:1",
    "policy_name": "aigis-default",
    "matched_rule": "calculator",
}


def test_grpc_layout_nests_exactly_the_a59_fields() -> None:
    """The six A59 fields go into grpc_audit_log; aigis's own fields stay beside it; flat() undoes it."""
    record = to_grpc(SAMPLE)
    assert set(record[GRPC_AUDIT_LOG]) == set(A59_FIELDS)
    assert {k for k in record if k != GRPC_AUDIT_LOG} == {"request_id", "reason", "peer"}
    assert flat(record) == SAMPLE
    assert flat(SAMPLE) == SAMPLE


def test_events_keep_their_shape() -> None:
    """Overflow and loss events are not authorization decisions: no grpc_audit_log object."""
    event = {"event": "audit_overflow", "timestamp": "2026-01-01T00:00:00.000Z", "dropped": 3}
    assert to_grpc(event) == event


def test_denial_is_written_in_grpc_format_and_verifies(tmp_path: Path) -> None:
    """A real denial, as written: grpc-go's object (RFC 3339 timestamp), the chain intact, and
    `aigis audit summary/show` reading it."""
    with private_stack(tmp_path, audit_format=AuditFormat.GRPC) as stack:
        token = issuer_token(stack, "reader")  # classifier:predict only
        with channel(stack, "reader") as ch:
            stub = calc_grpc.CalculatorStub(ch)
            outcome = run(lambda: stub.Add(calc.AddRequest(a=1, b=2), metadata=bearer(token), timeout=10).sum)
        assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
        assert stack.server.audit.flush(timeout=5.0)
        lines = [json.loads(line) for line in stack.server.audit.path.read_text().splitlines()]
    (record,) = [r for r in lines if r.get("request_id") == outcome.request_id]
    entry = record[GRPC_AUDIT_LOG]
    assert entry == {
        "timestamp": entry["timestamp"],
        "rpc_method": "/aigis.calculator.v1.Calculator/Add",
        "principal": "spiffe://aigis.local/client/reader",
        "policy_name": "aigis-default",
        "matched_rule": "calculator",
        "authorized": False,
    }
    datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))  # RFC 3339
    assert record["reason"] == "scope_missing"
    assert {"seq", "prev", "chain"} <= record.keys()
    assert verify_log(stack.audit_log, None).ok
    assert summarize(lines).by_reason == [("scope_missing", 1)]
    assert select(lines, reason="scope_missing", principal="spiffe://aigis.local/client/reader") == [record]
