"""The caller's mTLS identity, read from the servicer context's auth context, and revocation.

grpcio verifies the chain during the handshake (FACTS.md); this module then applies the client
certificate policy grpcio cannot express — cryptography's x509 client verifier (not a CA, the
clientAuth EKU, a SAN present) plus exactly one SPIFFE URI SAN in our trust domain — names the
caller, and checks the CRL (grpcio has none). Verification costs ~80 µs, so verdicts (good and
bad) are cached by the certificate's PEM bytes; a cache hit is a dict lookup and an expiry check.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from aigis.auth.decision import Reason

log = logging.getLogger("aigis.identity")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of the TLS connection, from its verified leaf certificate."""

    principal: str  # the SPIFFE URI SAN, else the first DNS SAN, else the subject (RFC 4514)
    uri_sans: tuple[str, ...]
    dns_sans: tuple[str, ...]
    subject: str  # RFC 4514 string, e.g. "CN=demo,O=aigis"
    serial: int
    issuer: str  # RFC 4514 string of the issuing CA's subject
    fingerprint: str  # base64url (no padding) SHA-256 of the DER certificate: RFC 8705 x5t#S256
    not_after: float = float("inf")  # POSIX seconds; a cached identity is refused after it


class IdentityError(Exception):
    """The connection carries no usable client certificate; `reason` says which way."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def identity_from_certificate(cert: x509.Certificate) -> PeerIdentity:
    """Name the caller: SPIFFE ID first (workload identity), then DNS name, then subject."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = (), ()
    subject = cert.subject.rfc4514_string()
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    # Several SPIFFE IDs make the workload ambiguous: none of them is taken as the principal.
    if len(spiffe) == 1:
        principal = spiffe[0]
    elif dns:
        principal = dns[0]
    else:
        principal = subject
    digest = base64.urlsafe_b64encode(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()).rstrip(b"=")
    return PeerIdentity(
        principal=principal,
        uri_sans=uris,
        dns_sans=dns,
        subject=subject,
        serial=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
        fingerprint=digest.decode(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


@dataclass(frozen=True)
class ClientCertificatePolicy:
    """What a client certificate must be, beyond chaining to our CA."""

    trust_anchors: tuple[x509.Certificate, ...]
    trust_domain: str

    def check(self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], now: datetime) -> PeerIdentity:
        """The caller's identity, or IdentityError(CERT_INVALID) saying what is wrong."""
        verifier = PolicyBuilder().store(Store(list(self.trust_anchors))).time(now).build_client_verifier()
        try:
            verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            raise IdentityError(Reason.CERT_INVALID, f"client verifier: {exc}") from None
        # The verifier checks the EKU only when present; a client certificate must state its purpose.
        try:
            purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise IdentityError(Reason.CERT_INVALID, "no extendedKeyUsage: clientAuth is required") from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
            raise IdentityError(Reason.CERT_INVALID, "extendedKeyUsage lacks clientAuth")
        identity = identity_from_certificate(leaf)
        spiffe = [u for u in identity.uri_sans if u.startswith("spiffe://")]
        if len(spiffe) != 1:
            raise IdentityError(Reason.CERT_INVALID, f"expected exactly one SPIFFE URI SAN, found {len(spiffe)}")
        if spiffe[0].split("/", 3)[2] != self.trust_domain:
            raise IdentityError(Reason.CERT_INVALID, f"SPIFFE ID {spiffe[0]} is outside {self.trust_domain}")
        return identity


class IdentityCache:
    """Client-certificate verdicts keyed by the leaf PEM grpcio hands us; bounded, insertion-ordered."""

    def __init__(self, policy: ClientCertificatePolicy | None = None, max_entries: int = 4096) -> None:
        self.policy = policy
        self._max = max_entries
        self._by_pem: dict[bytes, PeerIdentity | IdentityError] = {}

    def clear(self) -> None:
        self._by_pem = {}

    def from_auth_context(self, auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
        """The verified peer's identity; IdentityError when there is no acceptable certificate."""
        pems = auth_context.get("x509_pem_cert")
        if not pems:
            raise IdentityError(Reason.CERT_MISSING, "no peer certificate")
        pem = pems[0]
        verdict = self._by_pem.get(pem)
        if verdict is None:
            verdict = self._verify(pem, auth_context.get("x509_pem_cert_chain") or ())
            if len(self._by_pem) >= self._max:
                del self._by_pem[next(iter(self._by_pem))]
            self._by_pem[pem] = verdict
        if isinstance(verdict, IdentityError):
            raise verdict
        if time.time() >= verdict.not_after:  # a long-lived connection outlives its certificate
            raise IdentityError(Reason.CERT_INVALID, "certificate expired during the connection")
        return verdict

    def _verify(self, pem: bytes, chain: Sequence[bytes]) -> PeerIdentity | IdentityError:
        try:
            leaf = x509.load_pem_x509_certificate(pem)
            if self.policy is None:
                return identity_from_certificate(leaf)
            intermediates = [c for c in x509.load_pem_x509_certificates(b"".join(chain)) if c != leaf] if chain else []
            return self.policy.check(leaf, intermediates, datetime.now(UTC))
        except IdentityError as exc:
            return exc
        except ValueError as exc:
            return IdentityError(Reason.CERT_INVALID, f"unparseable peer certificate: {exc}")


class RevocationList:
    """Serials revoked by our CA, from the PEM CRL that `aigis certs revoke` writes.

    The CRL's signature is checked against the CA; a CRL that does not verify is refused (the
    caller keeps the previous list), because an attacker who can write it could un-revoke.
    """

    def __init__(self, revoked: frozenset[tuple[str, int]] = frozenset()) -> None:
        self._revoked = revoked
        self._serials = frozenset(serial for _issuer, serial in revoked)

    @classmethod
    def load(cls, crl_path: Path, ca_cert_path: Path) -> RevocationList:
        ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise ValueError(f"{crl_path}: CRL is not signed by the CA in {ca_cert_path}")
        issuer = crl.issuer.rfc4514_string()
        return cls(frozenset((issuer, entry.serial_number) for entry in crl))

    def is_revoked(self, identity: PeerIdentity) -> bool:
        return (identity.issuer, identity.serial) in self._revoked

    def is_serial_revoked(self, serial: int) -> bool:
        """Listed under any CA of the bundle (for a registered client known only by its serial)."""
        return serial in self._serials

    def __len__(self) -> int:
        return len(self._revoked)


class SharedRevocations:
    """The CRL as last loaded by whoever watches the file, read by everyone else (one CRL reader).

    The server's file watcher replaces `current` when crl.pem changes and keeps the last good list
    when it does not load; an embedded token issuer reads `current` instead of the file.
    """

    def __init__(self, current: RevocationList) -> None:
        self.current = current
