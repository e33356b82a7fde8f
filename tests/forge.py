"""Tokens forged with the running stack's real issuer key, differing from a valid one in one way.

The embedded issuer signs with `certs/token-signing-key.pem`; a test holding that key can make a
token that is valid in every respect but the one an attack case changes. Tokens signed by any other
key are what an attacker can make.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from jwt_factory import SigningKey, TokenFactory

ALL_SCOPES = "calculator:compute classifier:predict"


def real_key(stack: Any) -> SigningKey:
    """The embedded issuer's own signing key, to forge tokens that differ in one claim only."""
    private_key = serialization.load_pem_private_key(stack.pki.signing_key.read_bytes(), password=None)
    kid = json.loads(stack.pki.jwks.read_text())["keys"][0]["kid"]
    return SigningKey(kid, "ES256", private_key)  # type: ignore[arg-type]


def factory(stack: Any, now: float | None = None) -> TokenFactory:
    """Tokens from the stack's issuer for audience `aigis`, valid at `now` (default: the wall clock,
    which is the server's clock)."""
    return TokenFactory(
        real_key(stack), issuer=stack.issuer_url, audience="aigis", now=time.time() if now is None else now
    )


def valid_claims(client: str, scope: str = ALL_SCOPES) -> dict[str, Any]:
    """Claim overrides that make a factory token look issued to `client` (unbound: no cnf)."""
    return {"sub": client, "client_id": client, "scope": scope}
