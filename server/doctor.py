"""`aigis doctor`: what will go wrong soon, checked before it does.

Each check is a value (name, status, detail) so the CLI only prints. Checks read files and make
short, bounded network calls (loopback ports, JWKS URLs, the issuer's Date header); nothing here
writes or changes anything.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from cryptography import x509

from aigis.auth.clients import RegistryError, load_registry
from aigis.auth.crl import CrlError, ca_key_available, crl_status
from aigis.auth.jwks import KeySet, KeySetError, discover_jwks_uri, fetch_json, load_jwks_file, parse_jwks
from aigis.auth.pki import PkiPaths
from aigis.auth.policy import Policy
from aigis.auth.urls import url_host
from aigis.server.config import Config, ExternalIssuer, HostPort

# A certificate or CRL closer than this to its end is a warning.
EXPIRY_WARNING = timedelta(days=30)
NETWORK_TIMEOUT_SECONDS = 3.0
METADATA_PATH = "/.well-known/oauth-authorization-server"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _remaining(not_after: datetime, now: datetime) -> str:
    left = not_after - now
    return f"expired {-left.days} day(s) ago" if left.total_seconds() <= 0 else f"{left.days} day(s) left"


def _expiry(name: str, not_after: datetime, now: datetime, what: str) -> Check:
    detail = f"{what} until {not_after:%Y-%m-%d %H:%M}Z ({_remaining(not_after, now)})"
    if not_after <= now:
        return Check(name, Status.FAIL, detail)
    return Check(name, Status.WARN if not_after - now < EXPIRY_WARNING else Status.OK, detail)


def check_certificates(pki: PkiPaths, now: datetime) -> list[Check]:
    checks = []
    for name, path in (("CA certificate", pki.ca_cert), ("server certificate", pki.server_cert)):
        try:
            cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError) as exc:
            checks.append(Check(name, Status.FAIL, f"{path}: {getattr(exc, 'strerror', None) or exc}"))
            continue
        checks.append(_expiry(name, cert.not_valid_after_utc, now, f"{path} valid"))
    try:
        clients = load_registry(pki.clients_registry).clients
    except RegistryError as exc:
        return [*checks, Check("client certificates", Status.WARN, str(exc))]
    active = [(c.not_after, c.name) for c in clients if not c.revoked and c.not_after is not None]
    expiring = sorted((when, name) for when, name in active if when - now < EXPIRY_WARNING)
    if expiring:
        names = ", ".join(f"{name} ({_remaining(when, now)})" for when, name in expiring)
        checks.append(Check("client certificates", Status.WARN, f"expiring or expired: {names}"))
    else:
        checks.append(Check("client certificates", Status.OK, f"{len(active)} active, none expiring within "
                                                              f"{EXPIRY_WARNING.days} days"))
    return checks


def check_crl(pki: PkiPaths, now: datetime) -> Check:
    try:
        status = crl_status(pki)
    except CrlError as exc:
        return Check("CRL", Status.FAIL, str(exc))
    if status.next_update is None:
        return Check("CRL", Status.WARN, f"{pki.crl} has no nextUpdate")
    renews = ("a running server renews it (it can read the CA key)" if ca_key_available(pki)
              else "renew with `aigis certs crl --renew` where the CA key is")
    detail = f"#{status.number}, {status.revoked} revoked, next update {status.next_update:%Y-%m-%d %H:%M}Z"
    if status.stale(now):
        return Check("CRL", Status.FAIL, f"STALE: {detail}; {renews}")
    if status.renewal_due(now):
        return Check("CRL", Status.WARN, f"{detail} ({_remaining(status.next_update, now)}); {renews}")
    return Check("CRL", Status.OK, f"{detail} ({_remaining(status.next_update, now)})")


def check_policy(config: Config) -> Check:
    try:
        policy = Policy.load(config.policy)
    except Exception as exc:  # any refusal is the finding
        return Check("policy", Status.FAIL, str(exc))
    return Check("policy", Status.OK, f"{config.policy}: {getattr(policy, 'name', '')!s} loads")


def _fetch(url: str, context: ssl.SSLContext) -> tuple[bytes, str | None]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - https only
    with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_SECONDS, context=context) as response:  # noqa: S310
        return response.read(1 << 20), response.headers.get("Date")


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


async def _remote_key_set(issuer: ExternalIssuer) -> tuple[str, KeySet]:
    """Fetch an external issuer's key set as the server does: its jwks_url, else by discovery."""
    context = _tls_context(str(issuer.ca_file) if issuer.ca_file else None)
    url = issuer.jwks_url or await discover_jwks_uri(issuer.issuer, context)
    return url, parse_jwks(await fetch_json(url, context), url)


def check_keys(config: Config, pki: PkiPaths) -> list[Check]:
    """The embedded issuer's JWKS file, and every external issuer's key set (fetched when remote)."""
    checks = []
    if config.issuer.enabled or not config.external_issuers:
        try:
            keys = load_jwks_file(pki.jwks)
            checks.append(Check("signing keys", Status.OK, f"{pki.jwks}: {len(keys.keys)} key(s)"))
        except KeySetError as exc:
            checks.append(Check("signing keys", Status.FAIL, str(exc)))
    for issuer in config.external_issuers:
        name = f"JWKS of {issuer.issuer}"
        try:
            if issuer.jwks_file is not None:
                source, keys = str(issuer.jwks_file), load_jwks_file(issuer.jwks_file)
            else:
                # auth.jwks bounds each fetch; discovery plus the key set is at most two of them.
                source, keys = asyncio.run(_remote_key_set(issuer))
            checks.append(Check(name, Status.OK, f"{source}: {len(keys.keys)} key(s)"))
        except KeySetError as exc:  # FetchError says why: TLS, connection, HTTP status, parse, issuer
            checks.append(Check(name, Status.FAIL, str(exc)))
    return checks


def _listening(address: HostPort) -> bool:
    host = "127.0.0.1" if address.host in ("0.0.0.0", "") else "::1" if address.host == "::" else address.host  # noqa: S104
    try:
        with socket.create_connection((host, address.port), timeout=NETWORK_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def check_ports(config: Config) -> list[Check]:
    """Whether something listens on each configured port (a running aigis, or a port `serve` will find busy)."""
    ports = [("gRPC port", config.listen)]
    if config.issuer.enabled:
        ports.append(("issuer port", config.issuer.listen))
    if config.metrics_listen is not None:
        ports.append(("metrics port", config.metrics_listen))
    checks = []
    for name, address in ports:
        if address.port == 0:
            checks.append(Check(name, Status.SKIP, f"{address}: ephemeral"))
            continue
        state = "in use (a running server, or `aigis serve` will find it busy)" if _listening(address) else "free"
        checks.append(Check(name, Status.OK, f"{address}: {state}"))
    return checks


def check_clock(config: Config, pki: PkiPaths, now: Callable[[], datetime]) -> Check:
    """Skew against the running issuer's HTTP Date header (1 s resolution), compared with the leeway."""
    if not config.issuer.enabled or not _listening(config.issuer.listen):
        return Check("clock skew", Status.SKIP, "no issuer running on " + str(config.issuer.listen))
    url = f"https://{url_host(config.issuer.listen.host)}:{config.issuer.listen.port}{METADATA_PATH}"
    try:
        before = now()
        started = time.monotonic()
        _body, date = _fetch(url, _tls_context(str(pki.ca_cert)))
        midpoint = before + timedelta(seconds=(time.monotonic() - started) / 2)
    except Exception as exc:
        return Check("clock skew", Status.WARN, f"cannot ask {url}: {getattr(exc, 'reason', None) or exc}")
    if not date:
        return Check("clock skew", Status.WARN, f"{url} sent no Date header")
    skew = (parsedate_to_datetime(date) - midpoint).total_seconds()
    # The Date header is truncated to whole seconds: up to 1 s of apparent skew is nothing.
    apparent = max(0.0, abs(skew + 0.5) - 0.5)
    leeway = config.leeway.total_seconds()
    detail = f"{apparent:.1f} s against {url.split('/.well-known')[0]} (token leeway {leeway:.0f} s)"
    if apparent > leeway:
        return Check("clock skew", Status.FAIL, detail)
    return Check("clock skew", Status.WARN if apparent > leeway / 2 else Status.OK, detail)


def run_checks(config: Config, now: Callable[[], datetime]) -> list[Check]:
    pki = config.pki
    moment = now()
    return [
        *check_certificates(pki, moment),
        check_crl(pki, moment),
        check_policy(config),
        *check_keys(config, pki),
        *check_ports(config),
        check_clock(config, pki, now),
    ]
