"""`aigis config show | check`: the effective configuration, and whether it loads.

Both read what `aigis serve` reads (`--config FILE`, else ./aigis.toml when it exists, else the
built-in defaults), so what they print is what the server will use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aigis.auth.pki import PkiPaths
from aigis.server.config import ConfigError, config_to_mapping, find_config_file, load_config, to_toml


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show or check the configuration `aigis serve` would use")
    sub = parser.add_subparsers(dest="config_command", required=True)
    show = sub.add_parser("show", help="print the effective configuration, defaults included, as TOML")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=show_main)
    check = sub.add_parser("check", help="validate the configuration; exit 2 naming the first bad key")
    check.set_defaults(func=check_main)


def _source(path: Path | None) -> str:
    return str(path) if path is not None else "no file (built-in defaults; ./aigis.toml not found)"


def show_main(args: argparse.Namespace) -> int:
    path = find_config_file(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"aigis config show: invalid configuration: {exc}", file=sys.stderr)
        return 2
    document = config_to_mapping(config)
    if args.json:
        print(json.dumps({"source": None if path is None else str(path), "config": document}, indent=2))
    else:
        print(f"# effective configuration from {_source(path)}")
        print(to_toml(document), end="")
    return 0


def check_main(args: argparse.Namespace) -> int:
    path = find_config_file(args.config)
    try:
        load_config(path)
    except ConfigError as exc:
        print(f"aigis config check: invalid configuration: {exc}", file=sys.stderr)
        return 2
    print(f"OK: {_source(path)}")
    return 0


def configured_pki(args: argparse.Namespace) -> PkiPaths:
    """`--dir DIR` when given, else where the configuration puts the PKI files ([server] certs,
    [files]): the file tools then write and read what the server reads. ConfigError if invalid."""
    if getattr(args, "dir", None) is not None:
        return PkiPaths(args.dir)
    return load_config(find_config_file(getattr(args, "config", None))).pki


def configured_audit_log(args: argparse.Namespace) -> Path:
    """`--audit-log PATH` when given, else the configuration's [audit] path."""
    if getattr(args, "audit_log", None) is not None:
        return Path(args.audit_log)
    return load_config(find_config_file(getattr(args, "config", None))).audit_log
