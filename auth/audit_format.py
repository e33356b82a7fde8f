"""Audit record layouts: aigis's flat record, or gRPC's own A59 `grpc_audit_log` object.

grpc-go's and gRPC C++'s stdout audit logger (gRFC A59) write one JSON object per line:
``{"grpc_audit_log": {"timestamp", "rpc_method", "principal", "policy_name", "matched_rule",
"authorized"}}``. With ``[audit] format = "grpc"`` aigis writes exactly that object, so one
pipeline can parse both kinds of server; everything aigis knows beyond A59 (request_id, reason,
peer, client_id, trace_id, dry_run, ...) and the hash chain (seq, prev, chain) stay beside it at
the top level. Events (overflow, losses) are not authorization decisions and keep their shape.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

GRPC_AUDIT_LOG = "grpc_audit_log"
# gRFC A59's audit context, in grpc-go's JSON names (the timestamp is the logger's, RFC 3339).
A59_FIELDS = ("timestamp", "rpc_method", "principal", "policy_name", "matched_rule", "authorized")


class AuditFormat(enum.StrEnum):
    AIGIS = "aigis"  # one flat object per line (A59's field names among aigis's own)
    GRPC = "grpc"  # A59's fields inside a `grpc_audit_log` object, as grpc-go / C++ write them


def to_grpc(entry: Mapping[str, Any]) -> dict[str, Any]:
    """`entry` with its A59 fields moved into a `grpc_audit_log` object (events unchanged)."""
    if "rpc_method" not in entry:
        return dict(entry)
    nested = {name: entry[name] for name in A59_FIELDS if name in entry}
    return {GRPC_AUDIT_LOG: nested, **{k: v for k, v in entry.items() if k not in nested}}


def flat(record: Mapping[str, Any]) -> dict[str, Any]:
    """One view of a record in either layout: `grpc_audit_log`'s fields lifted to the top level."""
    nested = record.get(GRPC_AUDIT_LOG)
    if not isinstance(nested, dict):
        return dict(record)
    return {**nested, **{k: v for k, v in record.items() if k != GRPC_AUDIT_LOG}}


def request_ids(record: Mapping[str, Any]) -> list[str]:
    """Every request a record answers for: one, or all of a shared refusal record (auth.refusals)."""
    many = record.get("request_ids")
    if isinstance(many, list):
        return [str(rid) for rid in many]
    one = record.get("request_id")
    return [str(one)] if one is not None else []


def denial_count(record: Mapping[str, Any]) -> int:
    """How many denied calls a record stands for (`count` of a shared refusal record, else 1)."""
    count = record.get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
