"""Where the certificate tool writes the PKI, and where the server, issuer and SDK read it.

One layout, one place: every component takes a `PkiPaths` instead of spelling file names. Each
file the server and issuer read may be placed elsewhere (`[files]` in aigis.toml): on Kubernetes
the server certificate comes from a TLS Secret as `tls.crt`, `tls.key` and `ca.crt`
(`PkiPaths.with_tls_secret`), the policy and CRL from ConfigMaps, the signing keys from another Secret.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_TRUST_DOMAIN = "aigis.local"
# The key names of a Kubernetes TLS Secret (type kubernetes.io/tls; ca.crt as cert-manager adds it).
TLS_SECRET_CERT, TLS_SECRET_KEY, TLS_SECRET_CA = "tls.crt", "tls.key", "ca.crt"


@dataclass(frozen=True)
class PkiPaths:
    """File layout under a certificate directory (default ./certs); any file may be elsewhere."""

    root: Path
    # Each None means "under root, with aigis's own name".
    server_cert_file: Path | None = None
    server_key_file: Path | None = None
    ca_cert_file: Path | None = None
    crl_file: Path | None = None
    jwks_file: Path | None = None
    signing_key_file: Path | None = None
    signing_keys_metadata_file: Path | None = None
    clients_registry_file: Path | None = None

    def with_tls_secret(self, directory: Path) -> PkiPaths:
        """Server certificate, key and CA bundle from a mounted `kubernetes.io/tls` Secret
        (cert-manager writes `ca.crt` into it too)."""
        return replace(
            self,
            server_cert_file=directory / TLS_SECRET_CERT,
            server_key_file=directory / TLS_SECRET_KEY,
            ca_cert_file=directory / TLS_SECRET_CA,
        )

    @property
    def ca_cert(self) -> Path:
        return self.ca_cert_file or self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.server_cert_file or self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.server_key_file or self.root / "server-key.pem"

    @property
    def crl(self) -> Path:
        return self.crl_file or self.root / "crl.pem"

    @property
    def signing_key(self) -> Path:
        """The token issuer's active ES256 private key (`aigis keys rotate` replaces it)."""
        return self.signing_key_file or self.root / "token-signing-key.pem"

    @property
    def jwks(self) -> Path:
        """The issuer's published public keys (RFC 7517 JWK Set): the active key and retired keys
        whose tokens may still be live. The server verifies tokens with it."""
        return self.jwks_file or self.root / "jwks.json"

    @property
    def signing_keys_metadata(self) -> Path:
        """Non-secret facts about each published signing key: when it was created and retired, and
        when it may leave jwks.json (`aigis keys list`)."""
        return self.signing_keys_metadata_file or self.root / "signing-keys.json"

    @property
    def clients_registry(self) -> Path:
        """Registered OAuth2 clients: certificate identity, allowed scopes, scrypt secret hash."""
        return self.clients_registry_file or self.root / "clients.json"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    def client_cert(self, name: str) -> Path:
        return self.clients_dir / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.clients_dir / f"{name}-key.pem"


def client_spiffe_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/client/{name}"
