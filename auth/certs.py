"""The local PKI behind aigis: a CA, the server certificate, client certificates, a CRL, and the
token issuer's signing key — all ECDSA P-256, built with cryptography's x509 builders.

Pure functions: each takes the `PkiPaths` and the time `now` and returns a frozen result; only the
CLI (`tools/certs_cmd.py`) prints. Private keys are created with mode 0600 and never returned.
Every certificate is what the verifiers on the other side expect: OpenSSL's (`openssl verify`,
Python's ssl, gRPC's TLS stack) and cryptography's client verifier, which refuses a client
certificate without a SAN.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm

from aigis.auth import crl as auth_crl
from aigis.auth.clients import (
    CLIENT_NAME_RE,
    SCOPE_TOKEN_RE,
    ClientRegistry,
    RegisteredClient,
    RegistryError,
    hash_secret,
    load_registry,
    save_registry,
)
from aigis.auth.crl import CrlError, CrlStatus, build_crl, crl_status, read_ca_cert, read_crl
from aigis.auth.crl import renew_crl as auth_renew_crl
from aigis.auth.files import replace_atomically
from aigis.auth.pki import DEFAULT_TRUST_DOMAIN, PkiPaths, client_spiffe_id

ORGANIZATION = "aigis"
DEMO_CLIENT = "demo"
DEMO_SCOPES = ("calculator:compute", "classifier:predict")
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 365
# Every issue/revoke re-signs the CRL; this is how long a CRL stays current if nothing changes.
CRL_VALIDITY = auth_crl.CRL_VALIDITY
# Certificates start slightly in the past so a peer whose clock lags a little still accepts them.
BACKDATE = timedelta(minutes=5)
DEFAULT_SERVER_DNS = ("localhost",)
DEFAULT_SERVER_IPS = ("127.0.0.1", "::1")

# SPIFFE trust domain names: lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*")


class PkiError(Exception):
    """The PKI cannot do what was asked; the message says why, for the operator."""


class AlreadyExistsError(PkiError):
    """Refusing to overwrite something that exists without `force`."""

    def __init__(self, path: Path | str, what: str = "") -> None:
        super().__init__(f"{what or path} already exists; use --force to overwrite it")
        self.path = Path(path)


@dataclass(frozen=True)
class IssuedClient:
    """A client certificate just written, and its registration. `secret` is shown once, then gone."""

    name: str
    spiffe_id: str
    serial: int
    not_after: datetime
    scopes: tuple[str, ...]
    cert_path: Path
    key_path: Path
    secret: str | None = dataclasses.field(default=None, repr=False)
    superseded_serial: int | None = None  # the previous certificate, now on the CRL


@dataclass(frozen=True)
class PkiInit:
    """What `init_pki` created."""

    paths: PkiPaths
    trust_domain: str
    ca_fingerprint: str  # SHA-256 of the CA certificate, hex, for out-of-band comparison
    server_sans: tuple[str, ...]  # "DNS:localhost", "IP:127.0.0.1", "URI:spiffe://..."
    kid: str  # the token-signing key's id in jwks.json
    demo: IssuedClient
    written: tuple[Path, ...]


@dataclass(frozen=True)
class IssuedServer:
    """A server certificate and key just written over the previous pair."""

    serial: int
    not_after: datetime
    sans: tuple[str, ...]  # "DNS:localhost", "IP:127.0.0.1", "URI:spiffe://..."
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Revocation:
    name: str
    serial: int | None
    revoked_at: datetime
    already_revoked: bool


@dataclass(frozen=True)
class ClientInfo:
    name: str
    spiffe_id: str
    serial: str  # hex, as openssl prints it
    not_after: datetime | None
    revoked: bool
    scopes: tuple[str, ...]
    has_secret: bool


# ---------------------------------------------------------------------------------------- checks


def validate_client_name(name: str) -> str:
    """Client names become file names, SPIFFE path segments and the OAuth client_id: keep them plain."""
    if not CLIENT_NAME_RE.fullmatch(name):
        raise PkiError(f"invalid client name {name!r}: use 1-63 of a-z 0-9 _ - (starting with a-z or 0-9)")
    return name


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """RFC 6749 scope tokens, de-duplicated in order; at least one."""
    result: list[str] = []
    for scope in scopes:
        if not SCOPE_TOKEN_RE.fullmatch(scope):
            raise PkiError(f"invalid scope {scope!r}: printable ASCII without spaces, quotes or backslashes")
        if scope not in result:
            result.append(scope)
    if not result:
        raise PkiError("a client needs at least one scope")
    return tuple(result)


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise PkiError(f"invalid trust domain {trust_domain!r}: use a-z 0-9 . _ -")
    return trust_domain


def _require_aware(now: datetime) -> None:
    # A naive datetime would be read as UTC by cryptography and as local time by everything else.
    if now.tzinfo is None or now.utcoffset() is None:
        raise PkiError("now must be an aware datetime (datetime.now(timezone.utc))")


def _server_general_names(trust_domain: str, server_names: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in (*DEFAULT_SERVER_DNS, *DEFAULT_SERVER_IPS, *server_names):
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(raw))
        except ValueError:
            if not _DNS_NAME.fullmatch(raw):
                raise PkiError(f"invalid server name {raw!r}: expected a DNS name or an IP address") from None
            name = x509.DNSName(raw.lower())
        if name not in names:
            names.append(name)
    # A SPIFFE ID for the server too, so clients may pin it; hostname checks only read DNS/IP SANs.
    names.append(x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/server"))
    return names


def _describe(name: x509.GeneralName) -> str:
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    return f"DNS:{name.value}"


# ---------------------------------------------------------------------------------------- files


def _ensure_dir(path: Path) -> None:
    # The directory holds private keys: keep it private when we create it.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Create `path` with `mode` from the start (never chmod after), atomically when overwriting."""
    _ensure_dir(path.parent)
    if not overwrite:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise AlreadyExistsError(path) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    replace_atomically(path, data, mode)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, overwrite: bool) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(path, pem, mode=0o600, overwrite=overwrite)


def _write_cert(path: Path, cert: x509.Certificate, *, overwrite: bool) -> None:
    _write_file(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)


def _load_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename}: not found (run `aigis certs init` first)") from None
    except ValueError as exc:
        raise PkiError(f"CA certificate or key unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{paths.ca_key} is not the private key of {paths.ca_cert}")
    return cert, key


def _load_registry(paths: PkiPaths) -> ClientRegistry:
    try:
        return load_registry(paths.clients_registry)
    except RegistryError as exc:
        raise PkiError(str(exc)) from None


# ---------------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    # Built O then CN, so the RFC 4514 string reads "CN=<name>,O=aigis".
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _leaf_key_usage() -> x509.KeyUsage:
    # ECDSA leaves only sign (the TLS handshake); key agreement is ephemeral ECDHE.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime) -> x509.Certificate:
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    name = _name(f"aigis CA ({trust_domain})")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        # pathlen 0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    now: datetime,
    validity_days: int,
) -> x509.Certificate:
    if validity_days < 1:
        raise PkiError("validity must be at least one day")
    # A leaf never outlives its CA: verifiers would reject the tail end anyway.
    not_after = min(now + timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        # Non-critical EKU and SAN: cryptography's verifier refuses them critical under a subject.
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# ------------------------------------------------------------------------------------------- CRL


def _read_crl(paths: PkiPaths, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The current CRL, refused unless the CA signed it: a forged CRL could un-revoke certificates."""
    try:
        return read_crl(paths.crl, ca_cert, paths.ca_cert)
    except CrlError as exc:
        raise PkiError(str(exc)) from None


def load_crl_serials(paths: PkiPaths) -> frozenset[int]:
    """Serial numbers on the CA's CRL, after checking the CRL's issuer and signature."""
    try:
        ca_cert = read_ca_cert(paths.ca_cert)
    except CrlError as exc:
        raise PkiError(str(exc)) from None
    return frozenset(entry.serial_number for entry in _read_crl(paths, ca_cert))


def _write_crl(
    paths: PkiPaths,
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    previous: x509.CertificateRevocationList | None,
    add: Iterable[tuple[int, x509.ReasonFlags | None]],
    now: datetime,
    overwrite: bool,
) -> None:
    """Re-sign the CRL with every earlier entry kept and `add` (serial, reason) appended."""
    crl = build_crl(ca_cert=ca_cert, ca_key=ca_key, previous=previous, add=add, now=now)
    _write_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)


def renew_crl(paths: PkiPaths, *, now: datetime) -> CrlStatus:
    """`aigis certs crl --renew`: the same entries, signed anew (auth.crl.renew_crl)."""
    _require_aware(now)
    try:
        return auth_renew_crl(paths, now=now)
    except CrlError as exc:
        raise PkiError(str(exc)) from None


def pki_crl_status(paths: PkiPaths) -> CrlStatus:
    try:
        return crl_status(paths)
    except CrlError as exc:
        raise PkiError(str(exc)) from None


# ------------------------------------------------------------------------------------------ JWKS


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of an ES256 key, with kid = its RFC 7638 thumbprint."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    return {**jwk, "kid": jwk_thumbprint(jwk), "use": "sig", "alg": "ES256"}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members (crv, kty, x, y) in lexicographic order, no spaces."""
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")


# ------------------------------------------------------------------------------------ operations


def init_pki(
    paths: PkiPaths,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    server_names: Iterable[str] = (),
    now: datetime,
    force: bool = False,
    validity_days: int = LEAF_VALIDITY_DAYS,
) -> PkiInit:
    """Create the CA, server certificate, empty CRL, token-signing key, JWKS, registry and `demo`.

    Without `force`, nothing is written if any of these files already exists.
    """
    _require_aware(now)
    validate_trust_domain(trust_domain)
    sans = _server_general_names(trust_domain, server_names)
    targets = [
        paths.ca_cert,
        paths.ca_key,
        paths.server_cert,
        paths.server_key,
        paths.crl,
        paths.signing_key,
        paths.jwks,
        paths.clients_registry,
        paths.client_cert(DEMO_CLIENT),
        paths.client_key(DEMO_CLIENT),
    ]
    if not force:
        for path in targets:
            if path.exists():
                raise AlreadyExistsError(path)
    _ensure_dir(paths.root)

    ca_key = _new_key()
    ca_cert = _make_ca(ca_key, trust_domain, now)
    _write_private_key(paths.ca_key, ca_key, overwrite=force)
    _write_cert(paths.ca_cert, ca_cert, overwrite=force)

    server_key = _new_key()
    server_cert = _make_server_cert(ca_cert, ca_key, server_key, sans, now, validity_days)
    _write_private_key(paths.server_key, server_key, overwrite=force)
    _write_cert(paths.server_cert, server_cert, overwrite=force)

    _write_crl(paths, ca_cert=ca_cert, ca_key=ca_key, previous=None, add=(), now=now, overwrite=force)

    signing_key = _new_key()
    jwk = public_jwk(signing_key.public_key())
    _write_private_key(paths.signing_key, signing_key, overwrite=force)
    jwks = json.dumps({"keys": [jwk]}, indent=2).encode("utf-8") + b"\n"
    _write_file(paths.jwks, jwks, mode=0o644, overwrite=force)

    save_registry(paths.clients_registry, ClientRegistry(trust_domain=trust_domain))
    demo = issue_client(paths, DEMO_CLIENT, scopes=DEMO_SCOPES, now=now, force=force, validity_days=validity_days)
    return PkiInit(
        paths=paths,
        trust_domain=trust_domain,
        ca_fingerprint=ca_cert.fingerprint(hashes.SHA256()).hex(),
        server_sans=tuple(_describe(n) for n in sans),
        kid=jwk["kid"],
        demo=demo,
        written=tuple(targets),
    )


def _make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    now: datetime,
    validity_days: int,
) -> x509.Certificate:
    """The server's leaf: serverAuth only, the given SANs (init and rotation issue the same kind)."""
    return _make_leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        key=key,
        common_name="aigis server",
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        validity_days=validity_days,
    )


def issue_server_certificate(
    paths: PkiPaths,
    *,
    now: datetime,
    server_names: Iterable[str] = (),
    validity_days: int = LEAF_VALIDITY_DAYS,
) -> IssuedServer:
    """Replace the server key and certificate with a new pair from the CA (certificate rotation).

    The running gRPC server and issuer serve the new pair to new connections without a restart. The
    key is written first, then the certificate: a reload that falls between the two writes refuses the
    mismatched pair once and takes the new one on its next look.
    """
    _require_aware(now)
    trust_domain = _load_registry(paths).trust_domain
    sans = _server_general_names(trust_domain, server_names)
    ca_cert, ca_key = _load_ca(paths)
    key = _new_key()
    cert = _make_server_cert(ca_cert, ca_key, key, sans, now, validity_days)
    _write_private_key(paths.server_key, key, overwrite=True)
    _write_cert(paths.server_cert, cert, overwrite=True)
    return IssuedServer(
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        sans=tuple(_describe(n) for n in sans),
        cert_path=paths.server_cert,
        key_path=paths.server_key,
    )


def issue_client(
    paths: PkiPaths,
    name: str,
    *,
    scopes: Iterable[str],
    now: datetime,
    force: bool = False,
    with_secret: bool = False,
    validity_days: int = LEAF_VALIDITY_DAYS,
) -> IssuedClient:
    """Issue a client certificate (SPIFFE URI SAN, clientAuth only) and register the client.

    Re-issuing (`force`) replaces the registration — scopes, secret, revoked flag — and puts the
    previous certificate's serial on the CRL, so a superseded certificate stops working everywhere.
    """
    _require_aware(now)
    validate_client_name(name)
    granted = validate_scopes(scopes)
    registry = _load_registry(paths)
    ca_cert, ca_key = _load_ca(paths)
    previous = registry.by_name(name)
    if not force:
        if previous is not None:
            raise AlreadyExistsError(name, f"client {name!r}")
        for path in (paths.client_cert(name), paths.client_key(name)):
            if path.exists():
                raise AlreadyExistsError(path)
    crl = _read_crl(paths, ca_cert)

    spiffe_id = client_spiffe_id(registry.trust_domain, name)
    key = _new_key()
    cert = _make_leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        key=key,
        common_name=name,
        # Exactly one SAN, the SPIFFE ID: it is the identity the server and the issuer read.
        sans=[x509.UniformResourceIdentifier(spiffe_id)],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        validity_days=validity_days,
    )
    _ensure_dir(paths.clients_dir)
    _write_private_key(paths.client_key(name), key, overwrite=force)
    _write_cert(paths.client_cert(name), cert, overwrite=force)

    superseded = previous.serial if previous is not None else None
    if superseded is not None and crl.get_revoked_certificate_by_serial_number(superseded) is None:
        _write_crl(
            paths,
            ca_cert=ca_cert,
            ca_key=ca_key,
            previous=crl,
            add=[(superseded, x509.ReasonFlags.superseded)],
            now=now,
            overwrite=True,
        )

    secret = secrets.token_urlsafe(32) if with_secret else None
    client = RegisteredClient(
        name=name,
        spiffe_id=spiffe_id,
        scopes=granted,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        secret=None if secret is None else hash_secret(secret),
    )
    save_registry(paths.clients_registry, registry.with_client(client))
    return IssuedClient(
        name=name,
        spiffe_id=spiffe_id,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        scopes=granted,
        cert_path=paths.client_cert(name),
        key_path=paths.client_key(name),
        secret=secret,
        superseded_serial=superseded,
    )


def revoke_client(paths: PkiPaths, name: str, *, now: datetime) -> Revocation:
    """Put the client's current certificate on the CRL and mark the client revoked (secret included).

    Revoking twice is harmless and reports `already_revoked`.
    """
    _require_aware(now)
    registry = _load_registry(paths)
    client = registry.by_name(name)
    if client is None:
        raise PkiError(f"no client named {name!r}")
    ca_cert, ca_key = _load_ca(paths)
    crl = _read_crl(paths, ca_cert)
    if client.serial is not None and crl.get_revoked_certificate_by_serial_number(client.serial) is None:
        _write_crl(
            paths,
            ca_cert=ca_cert,
            ca_key=ca_key,
            previous=crl,
            add=[(client.serial, None)],  # RFC 5280 §5.3.1: omit reasonCode rather than "unspecified"
            now=now,
            overwrite=True,
        )
    if client.revoked:
        return Revocation(name, client.serial, client.revoked_at or now, already_revoked=True)
    save_registry(
        paths.clients_registry,
        registry.with_client(dataclasses.replace(client, revoked=True, revoked_at=now)),
    )
    return Revocation(name, client.serial, now, already_revoked=False)


def list_clients(paths: PkiPaths) -> list[ClientInfo]:
    """Every registered client, in name order."""
    return [
        ClientInfo(
            name=c.name,
            spiffe_id=c.spiffe_id,
            serial="" if c.serial is None else format(c.serial, "x"),
            not_after=c.not_after,
            revoked=c.revoked,
            scopes=c.scopes,
            has_secret=c.secret is not None,
        )
        for c in _load_registry(paths).clients
    ]


@dataclass(frozen=True)
class CertificateInfo:
    """A CA or server certificate as `aigis certs list` shows it."""

    role: str  # "ca" or "server"
    path: Path
    subject: str
    serial: str  # hex
    not_after: datetime


def list_pki_certificates(paths: PkiPaths) -> list[CertificateInfo]:
    """The CA certificate(s) of the bundle and the server certificate, with their expiry."""
    found: list[CertificateInfo] = []
    for role, path in (("ca", paths.ca_cert), ("server", paths.server_cert)):
        try:
            certificates = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            raise PkiError(f"{path}: not found (run `aigis certs init` first)") from None
        except ValueError as exc:
            raise PkiError(f"{path}: not a PEM certificate: {exc}") from None
        for cert in certificates if role == "ca" else certificates[:1]:
            found.append(CertificateInfo(role, path, cert.subject.rfc4514_string(), format(cert.serial_number, "x"),
                                         cert.not_valid_after_utc))
    return found
