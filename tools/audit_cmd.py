"""`aigis audit show`: read the audit log of denied requests, filtered, as a table or JSON lines."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from auth.audit import read_records

DEFAULT_AUDIT_LOG = Path("aigis-audit.jsonl")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime) -> datetime:
    """An RFC 3339 time, or a relative one like 15m / 2h / 1d before `now`."""
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {text!r} is neither RFC 3339 nor like 15m / 2h / 1d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def select(
    records: Iterable[dict[str, Any]],
    *,
    reason: str | None = None,
    principal: str | None = None,
    method: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    chosen = []
    for record in records:
        if reason and record.get("reason") != reason:
            continue
        if principal and record.get("principal") != principal:
            continue
        if method and method not in str(record.get("rpc_method", "")):
            continue
        if since is not None:
            try:
                stamp = datetime.fromisoformat(str(record.get("timestamp", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if stamp < since:
                continue
        chosen.append(record)
    return chosen


def format_table(records: list[dict[str, Any]]) -> str:
    columns = ("timestamp", "reason", "rpc_method", "principal", "client_id", "request_id")
    rows = [[str(r.get(c) or "-") for c in columns] for r in records]
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = subparsers.add_parser("audit", help="read the audit log of denied requests")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    show = audit_sub.add_parser("show", help="list audit records, oldest first")
    show.add_argument("--audit-log", type=Path, default=DEFAULT_AUDIT_LOG, help="audit log path")
    show.add_argument("--reason", help="only this reason code (e.g. token_expired)")
    show.add_argument("--principal", help="only this principal (e.g. spiffe://aigis.local/client/demo)")
    show.add_argument("--method", help="only RPC methods containing this text")
    show.add_argument("--since", help="only records at or after this time: RFC 3339, or 15m / 2h / 1d ago")
    show.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    show.set_defaults(func=show_main)


def show_main(args: argparse.Namespace) -> int:
    path: Path = args.audit_log
    if not path.exists():
        print(f"no audit log at {path}")
        return 1
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as exc:
        print(f"aigis audit show: {exc}")
        return 2
    records = select(
        read_records(path), reason=args.reason, principal=args.principal, method=args.method, since=since
    )
    if args.json:
        for record in records:
            print(json.dumps(record, separators=(",", ":")))
    else:
        print(format_table(records))
        print(f"{len(records)} record(s)")
    return 0
