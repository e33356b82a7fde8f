"""`aigis keys rotate|list`: the command line over auth/signing_keys.py.

Only this module prints. It prints key ids and times, never key material.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aigis.auth import signing_keys as keys
from aigis.auth.certs import PkiError
from aigis.tools.config_cmd import configured_pki


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `keys` command and its subcommands; each sets `func(args) -> int`."""
    parser = subparsers.add_parser(
        "keys",
        help="rotate and list the token-signing keys",
        description="Rotate the token issuer's ES256 signing key. Retired public keys stay in jwks.json "
        f"for {_hours(keys.RETIRED_KEY_GRACE)} (the longest token lifetime plus leeway), so tokens they "
        "signed keep verifying; the running issuer and server pick the change up without a restart.",
    )
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{rotate,list}")

    rotate = sub.add_parser("rotate", help="make a new signing key active and prune expired retired keys")
    _add_dir(rotate)
    rotate.add_argument(
        "--force",
        action="store_true",
        help="publish only the new key: every token signed with an older key stops verifying at once "
        "(use after a key compromise); also proceeds when the current key files are unreadable",
    )
    rotate.set_defaults(func=_cmd_rotate)

    listing = sub.add_parser("list", help="list the published signing keys")
    _add_dir(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=_cmd_list)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, help="certificate directory (default: [server] certs of the "
                        "configuration, i.e. ./certs)")


def _hours(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%SZ}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _fail(exc: Exception) -> int:
    # A refusal here is a usage or configuration problem (missing or unreadable key files).
    print(f"aigis keys: error: {exc}", file=sys.stderr)
    return 2


def _cmd_rotate(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    try:
        rotation = keys.rotate_signing_key(paths, now=datetime.now(UTC), force=args.force)
    except PkiError as exc:
        return _fail(exc)
    print(f"Rotated the token-signing key in {paths.root}")
    print(f"  active      {rotation.active}  ({paths.signing_key})")
    for kid in rotation.retired:
        if rotation.prune_after is not None:
            print(f"  retired     {kid}  stays in {paths.jwks.name} until {_when(rotation.prune_after)}")
        else:
            print(f"  dropped     {kid}  tokens it signed no longer verify")
    for kid in rotation.pruned:
        if kid not in rotation.retired:
            print(f"  pruned      {kid}")
    print(f"  published   {len(rotation.published)} key(s) in {paths.jwks}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        infos = keys.list_signing_keys(configured_pki(args), now=datetime.now(UTC))
    except PkiError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps([{"kid": k.kid, "status": k.status.value, "created_at": _iso(k.created_at),
                           "retired_at": _iso(k.retired_at), "prune_after": _iso(k.prune_after)} for k in infos],
                         indent=2))
        return 0
    print(f"{'KID':<44} {'STATUS':<9} {'CREATED':<21} {'RETIRED':<21} PRUNE AFTER")
    for k in infos:
        print(
            f"{k.kid:<44} {k.status.value:<9} {_when(k.created_at):<21} {_when(k.retired_at):<21} "
            f"{_when(k.prune_after)}"
        )
    return 0
