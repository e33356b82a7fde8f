"""`aigis doctor`: print server/doctor.py's checks; exit 1 when any fails, 2 when the configuration does not load."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from aigis.server.config import ConfigError, find_config_file, load_config
from aigis.server.doctor import Status, run_checks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check certificates, CRL, policy, signing keys, JWKS URLs, ports and clock skew",
        description="Reads the configuration `aigis serve` would use and checks what will fail soon: "
        "certificate and CRL expiry, the policy, the signing keys and every external issuer's JWKS, "
        "the configured ports, and the clock against a running issuer. Exit 0: no failure "
        "(warnings allowed); 1: a check failed; 2: the configuration does not load.",
    )
    parser.add_argument("--certs", type=Path,
                        help="certificate directory (default: [server] certs of the configuration)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of {name, status, detail}")
    parser.set_defaults(func=doctor_main)


def doctor_main(args: argparse.Namespace) -> int:
    path = find_config_file(args.config)
    try:
        config = load_config(path, certs=args.certs)
    except ConfigError as exc:
        print(f"aigis doctor: invalid configuration: {exc}", file=sys.stderr)
        return 2
    checks = run_checks(config, lambda: datetime.now(UTC))
    if args.json:
        print(json.dumps([{"name": c.name, "status": c.status.value, "detail": c.detail} for c in checks], indent=2))
    else:
        print(f"configuration: {path if path is not None else 'built-in defaults'}")
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status.value.upper():<4}  {c.name.ljust(width)}  {c.detail}")
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    if not args.json:
        print(f"{failed} failed, {warned} warning(s)")
    return 1 if failed else 0
