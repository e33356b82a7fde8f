"""`aigis audit show | verify | keygen`: read, summarise and check the hash-chained audit log.

`show` and `verify` take the configured path and read every file behind it: rotated files
(`audit.jsonl.1`, ...) and worker files (`audit.wN.jsonl`, ...), see auth.audit_chain.
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aigis.auth.audit import OVERFLOW_EVENT
from aigis.auth.audit_chain import (
    AuditError,
    VerifyReport,
    check_anchor,
    load_hmac_key,
    log_layout,
    read_writer_records,
    verify_log,
    write_new_key,
)
from aigis.auth.audit_format import denial_count, flat
from aigis.auth.decision import Reason
from aigis.tools.config_cmd import configured_audit_log

REASON_NAMES = tuple(reason.value for reason in Reason)
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
    for raw in records:
        record = flat(raw)  # either layout ([audit] format)
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
        chosen.append(raw)
    return chosen


def terminal_safe(value: str) -> str:
    """`value` with every character a terminal would act on or hide escaped, Python-style.

    Audit records carry remote input (a principal, an external issuer's client_id): an escape
    sequence must not reach the terminal, nor a newline forge a table row. Control characters (C0,
    DEL, C1), format characters (bidi overrides, zero-width), line/paragraph separators and other
    non-printables become \\xNN / \\uNNNN / \\UNNNNNNNN; a backslash is doubled, so the text stays
    unambiguous. `--json` output needs none of this: JSON escapes control characters itself.
    """
    if value.isprintable() and "\\" not in value:
        return value
    out = []
    for char in value:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _cell(record: dict[str, Any], column: str) -> str:
    if column == "request_id" and denial_count(record) > 1:  # a shared refusal record
        return f"{record.get('request_id')} (+{denial_count(record) - 1} more)"
    return str(record.get(column) or "-")


def format_table(records: list[dict[str, Any]]) -> str:
    columns = ("timestamp", "reason", "rpc_method", "principal", "client_id", "request_id")
    rows = [[terminal_safe(_cell(r, c)) for c in columns] for r in records]
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def is_event(record: dict[str, Any]) -> bool:
    """Records the writer adds itself (e.g. audit_overflow), not an RPC's outcome."""
    return "event" in record


@dataclass(frozen=True)
class Summary:
    denials: int
    by_reason: list[tuple[str, int]]  # most frequent first
    by_principal: list[tuple[str, int]]
    lost: int  # counted in overflow records: denied (or audited) calls whose record was dropped
    lost_by_reason: list[tuple[str, int]]


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """Denials counted by reason and by principal, plus what overflow records say was lost."""
    reasons: Counter[str] = Counter()
    principals: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for record in map(flat, records):  # either layout ([audit] format)
        if record.get("event") == OVERFLOW_EVENT:
            by_reason = record.get("by_reason")
            if isinstance(by_reason, dict):
                lost.update({str(k): int(v) for k, v in by_reason.items() if isinstance(v, int)})
        elif not is_event(record) and record.get("authorized") is not True and record.get("dry_run") is not True:
            count = denial_count(record)  # a shared refusal record stands for `count` denials
            reasons[str(record.get("reason") or "-")] += count
            principals[str(record.get("principal") or "-")] += count
    return Summary(sum(reasons.values()), _ranked(reasons), _ranked(principals), sum(lost.values()), _ranked(lost))


def _count_table(title: str, rows: list[tuple[str, int]]) -> list[str]:
    safe = [(terminal_safe(name), count) for name, count in rows]
    width = max([len(title), *(len(name) for name, _ in safe)])
    return [f"{title.ljust(width)}  COUNT", *(f"{name.ljust(width)}  {count}" for name, count in safe)]


def format_summary(summary: Summary) -> str:
    lines = [*_count_table("REASON", summary.by_reason), "", *_count_table("PRINCIPAL", summary.by_principal), ""]
    lines.append(f"{summary.denials} denial(s)")
    if summary.lost:
        detail = ", ".join(f"{terminal_safe(reason)} {count}" for reason, count in summary.lost_by_reason)
        lines.append(f"{summary.lost} record(s) lost to audit overflow (by reason: {detail})")
    return "\n".join(lines)


def format_verify(report: VerifyReport) -> str:
    """One line per problem and warning, then the verdict."""
    lines = [f"FAIL {terminal_safe(str(problem))}" for problem in report.problems]
    lines += [f"warning: {terminal_safe(str(warning))}" for warning in report.warnings]
    files = sum(len(chain.files) for chain in report.chains)
    records = sum(chain.records for chain in report.chains)
    kind = "HMAC-SHA256" if report.keyed else "SHA-256 (unkeyed)"
    if report.ok:
        lines.append(f"OK: {len(report.chains)} chain(s), {files} file(s), {records} record(s), {kind} chain intact")
        if not report.keyed:
            lines.append(
                "note: an unkeyed chain catches edits, not someone who rebuilds it; configure [audit] hmac_key_file"
            )
    else:
        lines.append(f"FAILED: {len(report.problems)} chain(s) do not verify ({kind})")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="read the audit log of denied requests")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    show = audit_sub.add_parser("show", help="list audit records, oldest first")
    show.add_argument("--audit-log", type=Path, help="audit log path (default: [audit] path of the configuration, "
                      "i.e. ./aigis-audit.jsonl)")
    show.add_argument("--reason", choices=REASON_NAMES, metavar="REASON",
                      help="only this reason code (e.g. token_expired; one of the README's reason table)")
    show.add_argument("--principal", help="only this principal (e.g. spiffe://aigis.local/client/demo)")
    show.add_argument("--method", help="only RPC methods containing this text")
    show.add_argument("--since", help="only records at or after this time: RFC 3339, or 15m / 2h / 1d ago")
    show.add_argument("--json", action="store_true", help="print JSON lines (writer events included)")
    show.add_argument("--summary", action="store_true", help="count denials by reason and by principal")
    show.set_defaults(func=show_main)

    verify = audit_sub.add_parser(
        "verify", help="check the hash chain of every audit file; exit 1 naming the first bad record"
    )
    verify.add_argument("--audit-log", type=Path, help="audit log path (default: [audit] path of the configuration, "
                      "i.e. ./aigis-audit.jsonl)")
    verify.add_argument("--hmac-key-file", type=Path, help="the key the server chains with ([audit] hmac_key_file)")
    verify.add_argument("--expect-seq", type=int, metavar="SEQ",
                        help="the newest seq the server reported (its aigis_audit_last_seq metric or its "
                             "'audit log … at seq N (chain C)' log line): catches records cut off the end")
    verify.add_argument("--expect-chain", metavar="HEX", help="the chain value reported with --expect-seq")
    verify.add_argument("--writer", default=None,
                        help="whose chain --expect-seq is about: a worker id (audit.wN.jsonl -> N); "
                             "default the only chain")
    verify.set_defaults(func=verify_main)

    keygen = audit_sub.add_parser("keygen", help="create a new HMAC key file for the audit chain (mode 0600)")
    keygen.add_argument("file", type=Path, help="where to write it: keep it apart from the audit log")
    keygen.set_defaults(func=keygen_main)


def show_main(args: argparse.Namespace) -> int:
    path: Path = configured_audit_log(args)
    if not log_layout(path):
        print(f"aigis audit show: no audit log at {path}", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as exc:
        print(f"aigis audit show: {exc}", file=sys.stderr)
        return 2
    # Each writer's file order is the truth; several writers (workers) are merged by time.
    writers = [read_writer_records(writer) for writer in log_layout(path)]
    everything = heapq.merge(*writers, key=lambda r: str(r.get("timestamp", "")))
    records = select(everything, reason=args.reason, principal=args.principal, method=args.method, since=since)
    if args.summary:
        print(format_summary(summarize(records)))
    elif args.json:
        for record in records:
            print(json.dumps(record, separators=(",", ":")))
    else:
        records = [r for r in records if not is_event(r)]
        print(format_table(records))
        print(f"{len(records)} record(s)")
    return 0


def verify_main(args: argparse.Namespace) -> int:
    path: Path = configured_audit_log(args)
    try:
        key = load_hmac_key(args.hmac_key_file) if args.hmac_key_file else None
    except AuditError as exc:
        print(f"aigis audit verify: {exc}", file=sys.stderr)
        return 2
    if not log_layout(path):
        print(f"aigis audit verify: no audit log at {path}", file=sys.stderr)
        return 2
    if args.expect_chain is not None and args.expect_seq is None:
        print("aigis audit verify: --expect-chain needs --expect-seq", file=sys.stderr)
        return 2
    report = verify_log(path, key)
    print(format_verify(report))
    if args.expect_seq is None:
        return 0 if report.ok else 1
    writers = [chain.writer for chain in report.chains]
    writer = args.writer if args.writer is not None else (writers[0] if len(writers) == 1 else None)
    if writer is None:
        print(f"aigis audit verify: --expect-seq: name the chain with --writer (one of {', '.join(writers)})")
        return 1
    problem = check_anchor(path, writer, args.expect_seq, args.expect_chain)
    if problem is not None:
        print(f"FAIL {problem}")
        return 1
    matched = " with the reported chain value" if args.expect_chain else ""
    print(f"OK: the log reaches seq {args.expect_seq}{matched}")
    return 0 if report.ok else 1


def keygen_main(args: argparse.Namespace) -> int:
    try:
        write_new_key(args.file)
    except FileExistsError:
        print(f"aigis audit keygen: {args.file} exists; not overwriting it", file=sys.stderr)
        return 2
    print(f'wrote a new audit HMAC key to {args.file} (mode 0600); set [audit] hmac_key_file = "{args.file}"')
    return 0
