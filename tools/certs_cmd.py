"""`aigis certs init|issue|revoke|list|crl`: the command line over auth/certs.py and auth/crl.py.

Only this module prints. It prints paths, serials and fingerprints, never a private key; a client
secret is printed once, when it is generated, because only its hash is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from aigis.auth import certs
from aigis.auth.crl import CrlStatus
from aigis.auth.pki import DEFAULT_TRUST_DOMAIN
from aigis.tools.config_cmd import configured_pki


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `certs` command and its subcommands; each sets `func(args) -> int`."""
    parser = subparsers.add_parser(
        "certs",
        help="manage the local PKI and the OAuth2 client registry",
        description="Manage the local CA, server and client certificates, CRL, token-signing key "
        "and OAuth2 client registry.",
    )
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="{init,issue,revoke,list,crl}")

    init = sub.add_parser("init", help="create the CA, server certificate, CRL, signing key and demo client")
    _add_dir(init)
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (%(default)s)")
    init.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address for the server certificate (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    init.add_argument("--validity-days", type=int, default=certs.LEAF_VALIDITY_DAYS, help="%(default)s")
    init.add_argument("--force", action="store_true", help="overwrite an existing PKI (invalidates every cert)")
    init.set_defaults(func=_cmd_init)

    issue = sub.add_parser("issue", help="issue a client certificate and register the client")
    _add_dir(issue)
    issue.add_argument("name", help="client name: the OAuth2 client_id and the certificate's SPIFFE ID")
    issue.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="SCOPE",
        help="scope the client may request (repeatable, or several separated by spaces)",
    )
    issue.add_argument(
        "--with-secret", action="store_true", help="also generate a client secret (shown once)"
    )
    issue.add_argument("--validity-days", type=int, default=certs.LEAF_VALIDITY_DAYS, help="%(default)s")
    issue.add_argument(
        "--force", action="store_true", help="re-issue: replace the registration and revoke the old certificate"
    )
    issue.set_defaults(func=_cmd_issue)

    revoke = sub.add_parser("revoke", help="revoke a client's certificate (CRL) and registration")
    _add_dir(revoke)
    revoke.add_argument("name")
    revoke.set_defaults(func=_cmd_revoke)

    listing = sub.add_parser("list", help="list the CA and server certificates, the CRL and the registered clients")
    _add_dir(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=_cmd_list)

    crl = sub.add_parser("crl", help="show the CRL's freshness; --renew re-signs it (needs the CA key)")
    _add_dir(crl)
    crl.add_argument("--renew", action="store_true",
                     help=f"re-sign the CRL now: same entries, valid {certs.CRL_VALIDITY.days} days from now")
    crl.add_argument("--json", action="store_true", help="print one JSON object")
    crl.set_defaults(func=_cmd_crl)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, help="certificate directory (default: [server] certs of the "
                        "configuration, i.e. ./certs)")


def _fail(exc: Exception) -> int:
    # A PKI refusal is a usage or configuration problem: a missing file, a name, no --force.
    print(f"aigis certs: error: {exc}", file=sys.stderr)
    return 2


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%SZ}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _crl_json(status: CrlStatus, now: datetime) -> dict[str, object]:
    return {"path": str(status.path), "number": status.number, "this_update": _iso(status.this_update),
            "next_update": _iso(status.next_update), "revoked": status.revoked, "stale": status.stale(now)}


def _crl_line(status: CrlStatus, now: datetime) -> str:
    state = "STALE (past nextUpdate: renew with `aigis certs crl --renew`)" if status.stale(now) else "current"
    return (f"CRL #{status.number}  {status.revoked} revoked  updated {_when(status.this_update)}  "
            f"next update {_when(status.next_update)}  {state}")


def _cmd_init(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    try:
        result = certs.init_pki(
            paths,
            trust_domain=args.trust_domain,
            server_names=tuple(args.server_name),
            now=datetime.now(UTC),
            force=args.force,
            validity_days=args.validity_days,
        )
    except certs.PkiError as exc:
        return _fail(exc)
    demo = result.demo
    print(f"Initialised the PKI in {paths.root} (trust domain {result.trust_domain})")
    print(f"  CA certificate      {paths.ca_cert}  SHA-256 {result.ca_fingerprint}")
    print(f"  server certificate  {paths.server_cert}  {', '.join(result.server_sans)}")
    print(f"  CRL                 {paths.crl}")
    print(f"  token-signing key   {paths.signing_key}  kid {result.kid}")
    print(f"  JWKS                {paths.jwks}")
    print(f"  client registry     {paths.clients_registry}")
    print(f"  client {demo.name:<12} {demo.cert_path}  {demo.spiffe_id}  scopes: {' '.join(demo.scopes)}")
    print("Private keys (*-key.pem) are mode 0600. Never commit or share them.")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    scopes = [s for group in args.scope for s in group.split()]
    try:
        issued = certs.issue_client(
            paths,
            args.name,
            scopes=scopes,
            now=datetime.now(UTC),
            force=args.force,
            with_secret=args.with_secret,
            validity_days=args.validity_days,
        )
    except certs.PkiError as exc:
        return _fail(exc)
    print(f"Issued client {issued.name}")
    print(f"  certificate  {issued.cert_path}  serial {issued.serial:x}  expires {issued.not_after:%Y-%m-%d}")
    print(f"  key          {issued.key_path}  (mode 0600)")
    print(f"  identity     {issued.spiffe_id}")
    print(f"  scopes       {' '.join(issued.scopes)}")
    if issued.superseded_serial is not None:
        print(f"  revoked the previous certificate, serial {issued.superseded_serial:x}")
    if issued.secret is not None:
        print(
            "WARNING: the client secret is shown only this once; only its hash is stored. "
            "Keep it somewhere safe.",
            file=sys.stderr,
        )
        print(f"client secret: {issued.secret}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    try:
        revocation = certs.revoke_client(paths, args.name, now=datetime.now(UTC))
    except certs.PkiError as exc:
        return _fail(exc)
    serial = "none" if revocation.serial is None else format(revocation.serial, "x")
    if revocation.already_revoked:
        print(f"Client {revocation.name} was already revoked (serial {serial}); CRL checked")
    else:
        print(f"Revoked client {revocation.name}: serial {serial} added to {paths.crl}")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    now = datetime.now(UTC)
    try:
        status = certs.renew_crl(paths, now=now) if args.renew else certs.pki_crl_status(paths)
    except certs.PkiError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({**_crl_json(status, now), "renewed": args.renew}))
    else:
        print(("Renewed: " if args.renew else "") + _crl_line(status, now))
    return 1 if status.stale(now) else 0


def _cmd_list(args: argparse.Namespace) -> int:
    paths = configured_pki(args)
    now = datetime.now(UTC)
    try:
        certificates = certs.list_pki_certificates(paths)
        crl = certs.pki_crl_status(paths)
        clients = certs.list_clients(paths)
    except certs.PkiError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({
            "certificates": [{"role": c.role, "path": str(c.path), "subject": c.subject, "serial": c.serial,
                              "not_after": _iso(c.not_after), "expired": c.not_after <= now} for c in certificates],
            "crl": _crl_json(crl, now),
            "clients": [{"name": c.name, "spiffe_id": c.spiffe_id, "status": "revoked" if c.revoked else "active",
                         "secret": c.has_secret, "not_after": _iso(c.not_after), "serial": c.serial,
                         "scopes": list(c.scopes)} for c in clients],
        }, indent=2))
        return 0
    print(f"{'CERTIFICATE':<12} {'EXPIRES':<21} {'SERIAL':<40} SUBJECT")
    for c in certificates:
        expired = "  EXPIRED" if c.not_after <= now else ""
        print(f"{c.role:<12} {_when(c.not_after):<21} {c.serial:<40} {c.subject}{expired}")
    print(_crl_line(crl, now))
    print()
    if not clients:
        print("no clients registered")
        return 0
    print(f"{'NAME':<16} {'STATUS':<8} {'SECRET':<6} {'EXPIRES':<10} {'SERIAL':<40} SCOPES")
    for client in clients:
        expires = "-" if client.not_after is None else f"{client.not_after:%Y-%m-%d}"
        status = "revoked" if client.revoked else "active"
        secret = "yes" if client.has_secret else "no"
        print(f"{client.name:<16} {status:<8} {secret:<6} {expires:<10} {client.serial:<40} {' '.join(client.scopes)}")
    return 0
