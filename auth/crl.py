"""The CA's certificate revocation list: read (signature checked), describe, sign, and renew.

A CRL says when its successor is due (`nextUpdate`); OpenSSL, nginx and Envoy treat a CRL past it
as fatal. aigis re-signs the CRL on every issue and revoke, `aigis certs crl --renew` re-signs it
on demand, and a server that can read the CA key renews it on its own once less than
RENEW_BEFORE is left (server/app.py). A stale CRL is still enforced — every serial it lists stays
revoked — and reported: a log line, `aigis_crl_stale`, and `aigis doctor` (README "CRL freshness").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aigis.auth.files import replace_atomically
from aigis.auth.pki import PkiPaths

# How long a freshly signed CRL stays current (its nextUpdate - thisUpdate).
CRL_VALIDITY = timedelta(days=90)
# Automatic renewal re-signs the CRL once less than this is left before nextUpdate.
RENEW_BEFORE = timedelta(days=30)


class CrlError(ValueError):
    """The CRL cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class CrlStatus:
    """What a verified CRL says about itself."""

    path: Path
    number: int
    this_update: datetime
    next_update: datetime | None  # optional in RFC 5280; aigis always writes it
    revoked: int

    def stale(self, now: datetime) -> bool:
        """Past nextUpdate: a relying party should have a newer CRL by now."""
        return self.next_update is not None and now >= self.next_update

    def renewal_due(self, now: datetime) -> bool:
        return self.next_update is None or self.next_update - now < RENEW_BEFORE


def read_ca_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CrlError(f"{path}: not found (run `aigis certs init` first)") from None
    except ValueError as exc:
        raise CrlError(f"{path}: not a PEM certificate: {exc}") from None


def read_crl(crl_path: Path, ca_cert: x509.Certificate, ca_cert_path: Path | None = None) -> (
        x509.CertificateRevocationList):
    """The CRL at `crl_path`, refused unless `ca_cert` signed it: a forged CRL could un-revoke."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except FileNotFoundError:
        raise CrlError(f"{crl_path}: not found (run `aigis certs init` first)") from None
    except ValueError as exc:
        raise CrlError(f"{crl_path}: not a PEM CRL: {exc}") from None
    ca_name = ca_cert_path or "the CA certificate"
    ca_public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise CrlError(f"{crl_path}: not issued by {ca_name}")
    if not crl.is_signature_valid(ca_public):
        raise CrlError(f"{crl_path}: signature does not verify with the key of {ca_name}")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def describe(crl: x509.CertificateRevocationList, path: Path) -> CrlStatus:
    return CrlStatus(path, crl_number(crl), crl.last_update_utc, crl.next_update_utc, len(crl))


def crl_status(paths: PkiPaths) -> CrlStatus:
    """The verified CRL's status (CrlError when it is missing, unreadable or not the CA's)."""
    return describe(read_crl(paths.crl, read_ca_cert(paths.ca_cert), paths.ca_cert), paths.crl)


def build_crl(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    previous: x509.CertificateRevocationList | None,
    add: Iterable[tuple[int, x509.ReasonFlags | None]],
    now: datetime,
) -> x509.CertificateRevocationList:
    """Sign a CRL with every earlier entry kept and `add` (serial, reason) appended."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        # RFC 5280 §5.2.3: conforming CRL issuers MUST include a monotonically increasing CRL number.
        .add_extension(x509.CRLNumber(1 if previous is None else crl_number(previous) + 1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    listed: set[int] = set()
    for entry in previous or ():
        builder = builder.add_revoked_certificate(entry)
        listed.add(entry.serial_number)
    for serial, reason in add:
        if serial in listed:
            continue
        revoked = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        if reason is not None:
            revoked = revoked.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
        listed.add(serial)
    return builder.sign(ca_key, hashes.SHA256())


def ca_key_available(paths: PkiPaths) -> bool:
    """Whether this process can sign: the CA key file exists and is readable here."""
    try:
        with paths.ca_key.open("rb"):
            return True
    except OSError:
        return False


def renew_crl(paths: PkiPaths, *, now: datetime) -> CrlStatus:
    """Re-sign the CRL with the same entries, a new thisUpdate/nextUpdate and the next number."""
    ca_cert = read_ca_cert(paths.ca_cert)
    previous = read_crl(paths.crl, ca_cert, paths.ca_cert)
    try:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except OSError as exc:
        raise CrlError(f"{paths.ca_key}: cannot read the CA key ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise CrlError(f"{paths.ca_key}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CrlError(f"{paths.ca_key}: not an EC key")
    crl = build_crl(ca_cert=ca_cert, ca_key=ca_key, previous=previous, add=(), now=now)
    replace_atomically(paths.crl, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return describe(crl, paths.crl)
