"""The registry of OAuth2 clients (certs/clients.json): who may ask the issuer for tokens, with what.

Written by the certificate tool (`aigis certs`), read by the token issuer on every change. A client
is known by its name (the OAuth2 client_id and token `sub`) and by the SPIFFE URI in its certificate.
A client secret, when one exists, is stored only as an scrypt hash.

File format (version 1)::

    {"version": 1, "trust_domain": "aigis.local",
     "clients": {"demo": {"spiffe_id": "spiffe://aigis.local/client/demo",
                          "scopes": ["calculator:compute"], "serial": "5f3a...",
                          "not_after": "2026-01-01T00:00:00+00:00", "revoked": false,
                          "revoked_at": null,
                          "secret": {"alg": "scrypt", "n": 16384, "r": 8, "p": 1,
                                     "salt": "<base64>", "hash": "<base64>"} | null}}}
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aigis.auth.files import replace_atomically

REGISTRY_VERSION = 1

# scrypt cost: ~16 MiB and tens of milliseconds per check, acceptable at a token endpoint and
# expensive for an offline guesser. Stored per hash so it can be raised without breaking old ones.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds on parameters read back from disk, so a tampered file cannot make verification eat the host.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
# Secrets we generate are 43 characters; anything far longer is not ours and is not worth hashing.
MAX_SECRET_BYTES = 512

# Client names become file names, SPIFFE path segments, the OAuth client_id and the token `sub`.
CLIENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class RegistryError(Exception):
    """clients.json is missing, unreadable or malformed; callers must fail closed."""


@dataclass(frozen=True, slots=True)
class SecretHash:
    """An scrypt hash of a client secret with the parameters that produced it."""

    n: int
    r: int
    p: int
    salt: bytes = dataclasses.field(repr=False)
    hash: bytes = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "alg": "scrypt",
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "hash": base64.b64encode(self.hash).decode("ascii"),
        }

    @staticmethod
    def from_json(data: Any) -> SecretHash:
        if not isinstance(data, dict) or data.get("alg") != "scrypt":
            raise RegistryError("secret: expected an object with alg 'scrypt'")
        n, r, p = _int(data, "n"), _int(data, "r"), _int(data, "p")
        if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
            raise RegistryError("secret: scrypt parameters out of range")
        try:
            salt = base64.b64decode(data.get("salt", ""), validate=True)
            digest = base64.b64decode(data.get("hash", ""), validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise RegistryError("secret: salt and hash must be base64") from exc
        if len(salt) < 16 or len(digest) < 16:
            raise RegistryError("secret: salt or hash too short")
        return SecretHash(n=n, r=r, p=p, salt=salt, hash=digest)


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RegistryError(f"secret.{key}: expected an integer")
    return value


def _scrypt(secret: bytes, *, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs about 128*r*(n+p+2) bytes; the default 32 MiB cap would refuse larger n.
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_secret(secret: str) -> SecretHash:
    """Hash a client secret with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, length=HASH_BYTES)
    return SecretHash(n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=salt, hash=digest)


def verify_secret(secret: str, stored: SecretHash) -> bool:
    """True iff `secret` hashes to `stored`; the comparison is constant-time."""
    raw = secret.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_SECRET_BYTES:
        return False
    digest = _scrypt(raw, salt=stored.salt, n=stored.n, r=stored.r, p=stored.p, length=len(stored.hash))
    return hmac.compare_digest(digest, stored.hash)


# Spent on unknown client names so that "no such client" and "wrong secret" take the same time.
_DUMMY_HASH = SecretHash(
    n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=b"\x00" * SALT_BYTES, hash=b"\x00" * HASH_BYTES
)


def burn_secret_check(secret: str) -> None:
    """Do the work of one secret verification and discard it (timing equaliser for unknown clients)."""
    verify_secret(secret, _DUMMY_HASH)


@dataclass(frozen=True, slots=True)
class RegisteredClient:
    """One client: its identity, what it may ask for, and whether it is still trusted."""

    name: str
    spiffe_id: str
    scopes: tuple[str, ...]
    serial: int | None = None  # serial of the client's current certificate
    not_after: datetime | None = None  # expiry of that certificate
    revoked: bool = False
    revoked_at: datetime | None = None
    secret: SecretHash | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "spiffe_id": self.spiffe_id,
            "scopes": list(self.scopes),
            "serial": None if self.serial is None else format(self.serial, "x"),
            "not_after": None if self.not_after is None else self.not_after.isoformat(),
            "revoked": self.revoked,
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "secret": None if self.secret is None else self.secret.to_json(),
        }

    @staticmethod
    def from_json(name: str, data: Any) -> RegisteredClient:
        where = f"clients.{name}"
        if not isinstance(data, dict):
            raise RegistryError(f"{where}: expected an object")
        spiffe_id = data.get("spiffe_id")
        scopes = data.get("scopes")
        revoked = data.get("revoked", False)
        if not CLIENT_NAME_RE.fullmatch(name):
            raise RegistryError(f"{where}: invalid client name")
        if not isinstance(spiffe_id, str) or not spiffe_id.startswith("spiffe://"):
            raise RegistryError(f"{where}.spiffe_id: expected a spiffe:// URI")
        if not isinstance(scopes, list) or not all(
            isinstance(s, str) and SCOPE_TOKEN_RE.fullmatch(s) for s in scopes
        ):
            raise RegistryError(f"{where}.scopes: expected a list of RFC 6749 scope tokens")
        if not isinstance(revoked, bool):
            raise RegistryError(f"{where}.revoked: expected true or false")
        try:
            secret = None if data.get("secret") is None else SecretHash.from_json(data["secret"])
        except RegistryError as exc:
            raise RegistryError(f"{where}.{exc}") from None
        return RegisteredClient(
            name=name,
            spiffe_id=spiffe_id,
            scopes=tuple(scopes),
            serial=_parse_serial(data.get("serial"), f"{where}.serial"),
            not_after=_parse_time(data.get("not_after"), f"{where}.not_after"),
            revoked=revoked,
            revoked_at=_parse_time(data.get("revoked_at"), f"{where}.revoked_at"),
            secret=secret,
        )


def _parse_serial(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RegistryError(f"{where}: expected a hex string")
    try:
        return int(value, 16)
    except ValueError:
        raise RegistryError(f"{where}: expected a hex string") from None


def parse_aware_time(value: Any, where: str, error: type[Exception] = ValueError) -> datetime | None:
    """None, or an ISO 8601 time that carries a UTC offset (naive times are refused as `error`)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise error(f"{where}: expected an ISO 8601 time with a UTC offset")
    return parsed


def _parse_time(value: Any, where: str) -> datetime | None:
    return parse_aware_time(value, where, RegistryError)


@dataclass(frozen=True, slots=True)
class ClientRegistry:
    """All registered clients of one trust domain, in name order."""

    trust_domain: str
    clients: tuple[RegisteredClient, ...] = ()

    def by_name(self, name: str) -> RegisteredClient | None:
        return next((c for c in self.clients if c.name == name), None)

    def by_spiffe_id(self, spiffe_id: str) -> RegisteredClient | None:
        return next((c for c in self.clients if c.spiffe_id == spiffe_id), None)

    def with_client(self, client: RegisteredClient) -> ClientRegistry:
        """A copy with `client` added, or replacing the client of the same name."""
        others = [c for c in self.clients if c.name != client.name]
        return dataclasses.replace(self, clients=tuple(sorted([*others, client], key=lambda c: c.name)))

    def all_scopes(self) -> tuple[str, ...]:
        return tuple(sorted({s for c in self.clients for s in c.scopes}))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REGISTRY_VERSION,
            "trust_domain": self.trust_domain,
            "clients": {c.name: c.to_json() for c in self.clients},
        }

    @staticmethod
    def from_json(data: Any) -> ClientRegistry:
        if not isinstance(data, dict):
            raise RegistryError("expected a JSON object")
        if data.get("version") != REGISTRY_VERSION:
            raise RegistryError(f"version: expected {REGISTRY_VERSION}, got {data.get('version')!r}")
        trust_domain = data.get("trust_domain")
        clients = data.get("clients")
        if not isinstance(trust_domain, str) or not trust_domain:
            raise RegistryError("trust_domain: expected a non-empty string")
        if not isinstance(clients, dict):
            raise RegistryError("clients: expected an object")
        parsed = tuple(RegisteredClient.from_json(name, entry) for name, entry in sorted(clients.items()))
        spiffe_ids = [c.spiffe_id for c in parsed]
        if len(set(spiffe_ids)) != len(spiffe_ids):
            # Two clients behind one certificate identity would make tls_client_auth ambiguous.
            raise RegistryError("clients: two clients share a spiffe_id")
        return ClientRegistry(trust_domain=trust_domain, clients=parsed)


def load_registry(path: Path) -> ClientRegistry:
    """Read and validate clients.json; any problem raises RegistryError naming the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: not found (run `aigis certs init`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: unreadable: {exc}") from None
    try:
        return ClientRegistry.from_json(data)
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None


def save_registry(path: Path, registry: ClientRegistry) -> None:
    """Write clients.json atomically (temp file + os.replace) with mode 0600: it holds secret hashes."""
    text = json.dumps(registry.to_json(), indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, text.encode("utf-8"), 0o600)
