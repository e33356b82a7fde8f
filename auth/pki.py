"""Where the certificate tool writes the PKI, and where the server, issuer and SDK read it.

One layout, one place: every component takes a `PkiPaths` instead of spelling file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRUST_DOMAIN = "aigis.local"


@dataclass(frozen=True)
class PkiPaths:
    """File layout under a certificate directory (default ./certs)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def signing_key(self) -> Path:
        """The token issuer's active ES256 private key (`aigis keys rotate` replaces it)."""
        return self.root / "token-signing-key.pem"

    @property
    def jwks(self) -> Path:
        """The issuer's published public keys (RFC 7517 JWK Set): the active key and retired keys
        whose tokens may still be live. The server verifies tokens with it."""
        return self.root / "jwks.json"

    @property
    def signing_keys_metadata(self) -> Path:
        """Non-secret facts about each published signing key: when it was created and retired, and
        when it may leave jwks.json (`aigis keys list`)."""
        return self.root / "signing-keys.json"

    @property
    def clients_registry(self) -> Path:
        """Registered OAuth2 clients: certificate identity, allowed scopes, scrypt secret hash."""
        return self.root / "clients.json"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    def client_cert(self, name: str) -> Path:
        return self.clients_dir / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.clients_dir / f"{name}-key.pem"


def client_spiffe_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/client/{name}"
