"""Server TLS that follows the files on disk: certificate and CA rotation without a restart.

The gRPC server serves `grpc.dynamic_ssl_server_credentials`, whose fetcher grpc calls on every new
handshake (from its own threads). So the fetcher reads no file: a watcher polls the files from a
worker thread (`read`, blocking) and `stage`s a validated new configuration; the fetcher hands that
to grpc once, and otherwise answers None ("no change"), which keeps the current one. Connections
already open keep the certificate they were made with.

A changed file that does not validate — bad PEM, a key that is not the certificate's, a certificate
that is expired or not yet valid, a CA bundle entry that is not a CA — is refused: it is counted in
`refused_reloads` and grpc keeps serving the last good configuration. Files are read one after the
other, so replacing a certificate and its key may be refused once in between; the next poll after
the second file lands stages both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aigis.auth.pki import PkiPaths

log = logging.getLogger("aigis.tls")


class TlsError(Exception):
    """Server TLS files that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class TlsMaterial:
    """A server key, its certificate chain and the CA bundle that client certificates must chain to,
    checked to fit together."""

    key_pem: bytes = dataclasses.field(repr=False)
    cert_chain_pem: bytes = dataclasses.field(repr=False)
    ca_bundle_pem: bytes = dataclasses.field(repr=False)
    serial: int  # the server certificate's
    not_after: datetime  # the server certificate's
    ca_subjects: tuple[str, ...]  # RFC 4514, one per CA in the bundle
    digest: str  # SHA-256 over all three files: a poll that changed nothing stages nothing

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_chain_pem)], root_certificates=self.ca_bundle_pem
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: {exc.strerror} (run `aigis certs init` first?)") from None


def load_tls_material(pki: PkiPaths, *, now: datetime) -> TlsMaterial:
    """Read server key, certificate chain and CA bundle, and refuse them unless they can be served at `now`."""
    key_pem, cert_pem, ca_pem = _read(pki.server_key), _read(pki.server_cert), _read(pki.ca_cert)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsError(f"{pki.server_cert}: not a PEM certificate chain") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # No exception text: it could describe the key's content.
        raise TlsError(f"{pki.server_key}: not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TlsError(f"{pki.server_key} is not the private key of {pki.server_cert}")
    if now < leaf.not_valid_before_utc:
        raise TlsError(f"{pki.server_cert}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if now >= leaf.not_valid_after_utc:
        raise TlsError(f"{pki.server_cert}: expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TlsError(f"{pki.ca_cert}: not a PEM certificate bundle") from None
    for index, ca in enumerate(cas):
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TlsError(f"{pki.ca_cert}: certificate {index + 1} ({ca.subject.rfc4514_string()}) is not a CA")
    digest = hashlib.sha256()
    for part in (key_pem, cert_pem, ca_pem):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return TlsMaterial(
        key_pem=key_pem,
        cert_chain_pem=cert_pem,
        ca_bundle_pem=ca_pem,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
        ca_subjects=tuple(ca.subject.rfc4514_string() for ca in cas),
        digest=digest.hexdigest(),
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TlsCredentialStore:
    """The server's mTLS credentials and the configuration grpc should switch to next.

    One store serves one `add_secure_port` (grpc asks one fetcher per listening port and we hand each
    staged configuration out once).
    """

    def __init__(self, pki: PkiPaths, *, clock: Callable[[], datetime] = _utc_now) -> None:
        """Load the files now; TlsError (naming the file) if they cannot be served."""
        self._pki, self._clock = pki, clock
        self.current = load_tls_material(pki, now=clock())  # what grpc serves, or will from the next handshake
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # the fetcher runs on grpc's threads, stage() on the event loop
        self.reloads = 0  # configurations staged after start-up
        self.refused_reloads = 0  # changed files refused; the last good configuration stayed

    def credentials(self) -> grpc.ServerCredentials:
        """mTLS only: a client without a certificate from the CA bundle fails the handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(), self.fetch, require_client_authentication=True
        )

    def read(self) -> TlsMaterial:
        """Re-read and validate the files. Blocking: call it from a thread. TlsError is counted."""
        try:
            return load_tls_material(self._pki, now=self._clock())
        except TlsError:
            with self._lock:
                self.refused_reloads += 1
            raise

    def stage(self, material: TlsMaterial) -> bool:
        """New handshakes use `material` from now on; False if it is what is already served."""
        if material.digest == self.current.digest:
            return False
        configuration = material.configuration()
        with self._lock:
            self.current, self._pending = material, configuration
            self.reloads += 1
        log.info(
            "server TLS reloaded: certificate serial %x (expires %s), %d CA(s) trusted for clients",
            material.serial,
            material.not_after.date(),
            len(material.ca_subjects),
        )
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-configuration fetcher: the staged configuration once, then None."""
        # Called on every new handshake, on grpc's threads: a lock and an attribute swap, nothing more.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
