"""Real signed access tokens for tests, with keyword overrides for attack cases.

Keys are generated at test time with cryptography; tokens are signed by PyJWT. The raw helpers build
tokens PyJWT refuses to make (alg none, HS256 keyed with a public key PEM, tampered segments).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

ISSUER = "https://issuer.test"
AUDIENCE = "aigis"
NOW = 1_750_000_000.0  # the pinned clock every token test starts from
_REMOVE = object()


@dataclass(frozen=True)
class SigningKey:
    """A private key, its algorithm and kid; `public_jwk` is what a JWKS publishes."""

    kid: str
    alg: str
    private_key: PrivateKey

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk = json.loads(get_default_algorithms()[self.alg].to_jwk(self.private_key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def generate_key(alg: str, kid: str | None = None) -> SigningKey:
    """A fresh key for ES256 (P-256), RS256 (RSA 2048) or EdDSA (Ed25519)."""
    private_key: PrivateKey
    if alg == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "EdDSA":
        private_key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"no test key type for {alg}")
    return SigningKey(kid or f"{alg.lower()}-key", alg, private_key)


def jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    return {"keys": [key.public_jwk for key in keys]}


def write_jwks(path: Path, keys: Iterable[SigningKey]) -> Path:
    path.write_text(json.dumps(jwks(keys)), encoding="utf-8")
    return path


def b64url(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """A compact JWS assembled by hand, signature as given (empty for alg none)."""
    return f"{b64url(header)}.{b64url(claims)}.{b64url(signature)}"


def hs256_token(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    """HMAC-signed by hand: PyJWT refuses to use a PEM public key as an HMAC secret, attackers do not."""
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def replace_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


def tamper_claims(token: str, **changes: Any) -> str:
    """Rewrite the payload and keep the original signature (which then no longer verifies)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return replace_segment(token, 1, b64url({**claims, **changes}))


class TokenFactory:
    """Makes tokens signed by `key` for `issuer`/`audience`, valid at `now` unless overridden."""

    def __init__(
        self,
        key: SigningKey,
        *,
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        now: float = NOW,
        lifetime: float = 300,
    ) -> None:
        self.key, self.issuer, self.audience, self.now, self.lifetime = key, issuer, audience, now, lifetime

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Default RFC 9068 claims; `name=REMOVE` (see `remove`) drops a claim."""
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "client-demo",
            "client_id": "client-demo",
            "iat": int(self.now),
            "exp": int(self.now + self.lifetime),
            "jti": "jti-1",
            "scope": "calculator:compute",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not _REMOVE}

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"typ": "at+jwt", "alg": self.key.alg, "kid": self.key.kid}
        header.update(overrides)
        return {k: v for k, v in header.items() if v is not _REMOVE}

    def make(
        self,
        *,
        header: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        remove_header: Iterable[str] = (),
        key: SigningKey | None = None,
        **claim_overrides: Any,
    ) -> str:
        """A token signed with `key` (default: the factory's key) after applying the overrides.

        `header` overrides header fields (e.g. {"typ": "JWT"}, {"jku": "..."}); `alg` in it only
        changes the label, the signature is made with the key's own algorithm.
        """
        signer = key or self.key
        claims = self.claims(**claim_overrides)
        for name in remove:
            claims.pop(name, None)
        fields = self.header(**{"kid": signer.kid, "alg": signer.alg, **(header or {})})
        for name in remove_header:
            fields.pop(name, None)
        return _sign(claims, signer, fields)


def _sign(claims: Mapping[str, Any], signer: SigningKey, header: Mapping[str, Any]) -> str:
    # Signed with PyJWT's algorithm objects over exactly this header: jwt.encode would add its own
    # "typ": "JWT" and refuse a mislabelled alg, both of which attack cases need.
    signing_input = f"{b64url(header)}.{b64url(claims)}".encode()
    signature = get_default_algorithms()[signer.alg].sign(signing_input, signer.private_key)
    return f"{signing_input.decode()}.{b64url(signature)}"


REMOVE: Any = _REMOVE
