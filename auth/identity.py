"""The caller's mTLS identity, read from the servicer context's auth context, and revocation.

grpcio verifies the chain during the handshake (FACTS.md), so what reaches us is a certificate
already signed by our CA; this module names the caller and checks what grpcio cannot: the CRL.
Parsing costs tens of microseconds, so identities are cached by the certificate's PEM bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

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


class IdentityError(Exception):
    """The connection carries no usable client certificate."""


def identity_from_certificate(cert: x509.Certificate) -> PeerIdentity:
    """Name the caller: SPIFFE ID first (workload identity), then DNS name, then subject."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
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
    der = cert.public_bytes(Encoding.DER)
    digest = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    return PeerIdentity(
        principal=principal,
        uri_sans=uris,
        dns_sans=dns,
        subject=subject,
        serial=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
        fingerprint=digest,
    )


class IdentityCache:
    """Parsed peer identities keyed by the leaf PEM grpcio hands us; bounded, insertion-ordered."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._by_pem: dict[bytes, PeerIdentity] = {}

    def from_auth_context(self, auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
        """The verified peer's identity; IdentityError when the connection has no certificate."""
        pems = auth_context.get("x509_pem_cert")
        if not pems:
            raise IdentityError("no peer certificate")
        pem = pems[0]
        identity = self._by_pem.get(pem)
        if identity is None:
            try:
                identity = identity_from_certificate(x509.load_pem_x509_certificate(pem))
            except ValueError as exc:
                raise IdentityError("unparseable peer certificate") from exc
            if len(self._by_pem) >= self._max:
                del self._by_pem[next(iter(self._by_pem))]
            self._by_pem[pem] = identity
        return identity


class RevocationList:
    """Serials revoked by our CA, from the PEM CRL that `aigis certs revoke` writes.

    The CRL's signature is checked against the CA; a CRL that does not verify is refused (the
    caller keeps the previous list), because an attacker who can write it could un-revoke.
    """

    def __init__(self, revoked: frozenset[tuple[str, int]] = frozenset()) -> None:
        self._revoked = revoked

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

    def __len__(self) -> int:
        return len(self._revoked)
