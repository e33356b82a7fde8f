"""Token-signing key rotation: a new ES256 key signs from now on, and the old public key stays in
jwks.json until every token it signed has expired; a later rotation prunes it.

On disk (`PkiPaths`):

- `token-signing-key.pem` (0600): the active private key, the only private key kept. A retired
  key's private half has no use left (verifying needs only the public half) and would only be
  something to steal, so rotation overwrites it.
- `jwks.json` (0644): the published public keys, active first, then retired ones.
- `signing-keys.json` (0644): non-secret metadata per published kid: `created_at`, `retired_at`,
  `prune_after`. A PKI made before rotation existed has none; it is rebuilt conservatively.

A retired key stays published for `RETIRED_KEY_GRACE`: the longest token lifetime an issuer may be
configured with plus the largest verifier leeway, so no token that could still be accepted loses
its key. `force` instead drops every old key at once, for a compromised key.

Rotation writes in an order that keeps every intermediate state consistent for the running issuer
(which re-reads the key and JWKS when they change) and the server (which re-reads jwks.json):
the JWKS with both keys first, then the new private key, then the metadata, then the pruned JWKS.
A crash in between is repaired by the next `load_key_state`, which reconciles the three files.

Pure functions take `now`; `rotate_signing_key` and `list_signing_keys` do the file I/O, and only
the CLI (`tools/keys_cmd.py`) prints.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aigis.auth.certs import PkiError, _new_key, _require_aware, _write_file, _write_private_key, public_jwk
from aigis.auth.clients import parse_aware_time
from aigis.auth.defaults import MAX_TOKEN_TTL
from aigis.auth.pki import PkiPaths

# The largest `auth.leeway_seconds` server/config.py accepts: a verifier may accept a token this long
# after its `exp`.
MAX_VERIFIER_LEEWAY = timedelta(seconds=300)
RETIRED_KEY_GRACE = MAX_TOKEN_TTL + MAX_VERIFIER_LEEWAY
METADATA_VERSION = 1


class KeyRotationError(PkiError):
    """The signing keys on disk cannot be read or do not fit together; the message names the file."""


class KeyStatus(enum.StrEnum):
    ACTIVE = "active"  # signs new tokens
    RETIRED = "retired"  # published so that tokens it signed still verify
    PRUNABLE = "prunable"  # grace over: the next rotation removes it


@dataclass(frozen=True)
class KeyRecord:
    """One published signing key: its public JWK and when it was created and retired."""

    kid: str
    jwk: Mapping[str, Any] = field(repr=False)
    created_at: datetime | None = None  # None: made before key metadata existed
    retired_at: datetime | None = None  # None: the active key
    prune_after: datetime | None = None  # set on retirement: when no token it signed can still verify

    def status(self, now: datetime) -> KeyStatus:
        if self.retired_at is None:
            return KeyStatus.ACTIVE
        if self.prune_after is not None and self.prune_after <= now:
            return KeyStatus.PRUNABLE
        return KeyStatus.RETIRED


@dataclass(frozen=True)
class KeyState:
    """The published signing keys, the active one first."""

    keys: tuple[KeyRecord, ...]

    def __post_init__(self) -> None:
        if not self.keys or self.keys[0].retired_at is not None:
            raise ValueError("the first key must be the active one")
        if any(k.retired_at is None for k in self.keys[1:]):
            raise ValueError("only one key may be active")
        if len({k.kid for k in self.keys}) != len(self.keys):
            raise ValueError("duplicate kid")

    @property
    def active(self) -> KeyRecord:
        return self.keys[0]

    def jwks(self) -> dict[str, Any]:
        """The RFC 7517 JWK Set to publish: public members only, exactly as they were published."""
        return {"keys": [dict(k.jwk) for k in self.keys]}

    def metadata(self) -> dict[str, Any]:
        """signing-keys.json: no key material, only times."""
        return {
            "version": METADATA_VERSION,
            "keys": [
                {
                    "kid": k.kid,
                    "created_at": _iso(k.created_at),
                    "retired_at": _iso(k.retired_at),
                    "prune_after": _iso(k.prune_after),
                }
                for k in self.keys
            ],
        }


@dataclass(frozen=True)
class Rotation:
    """What `rotate_signing_key` did."""

    active: str  # the new key's kid
    retired: tuple[str, ...]  # kids that stopped signing now (the previous active key)
    pruned: tuple[str, ...]  # kids removed from jwks.json: grace over, or dropped by `force`
    published: tuple[str, ...]  # kids in jwks.json now, active first
    prune_after: datetime | None  # when the key retired now may leave jwks.json (None with force)


@dataclass(frozen=True)
class KeyInfo:
    """One row of `aigis keys list`."""

    kid: str
    status: KeyStatus
    created_at: datetime | None
    retired_at: datetime | None
    prune_after: datetime | None


# ------------------------------------------------------------------------------------ pure core


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any, where: str) -> datetime | None:
    return parse_aware_time(value, where, KeyRotationError)


def parse_metadata(data: Any, source: str) -> dict[str, KeyRecord]:
    """signing-keys.json as records by kid (without their JWKs, which live in jwks.json)."""
    if not isinstance(data, dict) or data.get("version") != METADATA_VERSION or not isinstance(data.get("keys"), list):
        raise KeyRotationError(f"{source}: not a version {METADATA_VERSION} signing-key metadata file")
    records: dict[str, KeyRecord] = {}
    for index, raw in enumerate(data["keys"]):
        where = f"{source}: keys[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str) or not raw["kid"]:
            raise KeyRotationError(f"{where}: needs a kid")
        records[raw["kid"]] = KeyRecord(
            kid=raw["kid"],
            jwk={},
            created_at=_parse_time(raw.get("created_at"), f"{where}.created_at"),
            retired_at=_parse_time(raw.get("retired_at"), f"{where}.retired_at"),
            prune_after=_parse_time(raw.get("prune_after"), f"{where}.prune_after"),
        )
    return records


def reconcile(
    active_kid: str,
    published: list[Mapping[str, Any]],
    metadata: Mapping[str, KeyRecord],
    *,
    now: datetime,
    grace: timedelta = RETIRED_KEY_GRACE,
) -> KeyState:
    """The key state the three files describe, with gaps filled on the safe side.

    The private key file decides which key is active (it is what the issuer signs with). A published
    key that the metadata does not show as retired — no metadata at all, or a rotation interrupted
    before the metadata was written — counts as retired `now`, so it keeps a full grace period.
    Metadata for keys no longer published is dropped.
    """
    by_kid: dict[str, Mapping[str, Any]] = {}
    for index, jwk in enumerate(published):
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise KeyRotationError(f"jwks.json: keys[{index}] has no kid")
        if kid in by_kid:
            raise KeyRotationError(f"jwks.json: duplicate kid {kid}")
        by_kid[kid] = jwk
    if active_kid not in by_kid:
        raise KeyRotationError(f"jwks.json does not publish the active signing key (kid {active_kid})")
    active_meta = metadata.get(active_kid)
    active = KeyRecord(active_kid, by_kid[active_kid], created_at=active_meta.created_at if active_meta else None)
    retired: list[KeyRecord] = []
    for kid, jwk in by_kid.items():
        if kid == active_kid:
            continue
        meta = metadata.get(kid)
        if meta is not None and meta.retired_at is not None and meta.prune_after is not None:
            retired.append(replace(meta, jwk=jwk))
        else:
            created = meta.created_at if meta is not None else None
            retired.append(KeyRecord(kid, jwk, created_at=created, retired_at=now, prune_after=now + grace))
    return KeyState((active, *retired))


def rotated(
    state: KeyState,
    new_jwk: Mapping[str, Any],
    *,
    now: datetime,
    grace: timedelta = RETIRED_KEY_GRACE,
    force: bool = False,
) -> KeyState:
    """`new_jwk` becomes active; the previous active key is retired for `grace` (force: dropped with
    every other key, so tokens they signed stop verifying at once)."""
    kid = new_jwk.get("kid")
    if not isinstance(kid, str) or not kid or any(k.kid == kid for k in state.keys):
        raise KeyRotationError("the new key needs a kid that is not already published")
    new = KeyRecord(kid, new_jwk, created_at=now)
    if force:
        return KeyState((new,))
    previous = replace(state.active, retired_at=now, prune_after=now + grace)
    return KeyState((new, previous, *state.keys[1:]))


def pruned(state: KeyState, *, now: datetime) -> KeyState:
    """Without the retired keys whose grace period has passed."""
    return KeyState(tuple(k for k in state.keys if k.status(now) is not KeyStatus.PRUNABLE))


# ------------------------------------------------------------------------------------------- I/O


def _read_active_kid(paths: PkiPaths) -> str:
    try:
        key = serialization.load_pem_private_key(paths.signing_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyRotationError(f"{paths.signing_key}: not found (run `aigis certs init` first)") from None
    except (ValueError, TypeError, OSError):
        raise KeyRotationError(f"{paths.signing_key}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyRotationError(f"{paths.signing_key}: not a P-256 (ES256) key")
    return public_jwk(key.public_key())["kid"]


def _read_json(path: Path, *, missing_ok: bool) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise KeyRotationError(f"{path}: not found (run `aigis certs init` first)") from None
    except (OSError, ValueError) as exc:
        raise KeyRotationError(f"{path}: unreadable ({type(exc).__name__})") from None


def load_key_state(paths: PkiPaths, *, now: datetime) -> KeyState:
    """Read the active key, jwks.json and signing-keys.json and reconcile them (see `reconcile`)."""
    _require_aware(now)
    active_kid = _read_active_kid(paths)
    jwks = _read_json(paths.jwks, missing_ok=False)
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not all(
        isinstance(k, dict) for k in jwks["keys"]
    ):
        raise KeyRotationError(f"{paths.jwks}: not a JWK Set object with a 'keys' list")
    raw_meta = _read_json(paths.signing_keys_metadata, missing_ok=True)
    metadata = {} if raw_meta is None else parse_metadata(raw_meta, str(paths.signing_keys_metadata))
    return reconcile(active_kid, jwks["keys"], metadata, now=now)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _write_file(path, json.dumps(data, indent=2).encode("utf-8") + b"\n", mode=0o644, overwrite=True)


def rotate_signing_key(
    paths: PkiPaths, *, now: datetime, force: bool = False, grace: timedelta = RETIRED_KEY_GRACE
) -> Rotation:
    """Make a new ES256 key the active one and prune retired keys whose grace has passed.

    `force` publishes only the new key: every token signed before stops verifying (after a key
    compromise). It also proceeds when the current files are unreadable, since it keeps nothing.
    """
    _require_aware(now)
    try:
        state: KeyState | None = load_key_state(paths, now=now)
    except KeyRotationError:
        if not force:
            raise
        state = None
    key = _new_key()
    jwk = public_jwk(key.public_key())
    if state is None:
        after = KeyState((KeyRecord(jwk["kid"], jwk, created_at=now),))
        before_kids: tuple[str, ...] = ()
    else:
        after = pruned(rotated(state, jwk, now=now, grace=grace, force=force), now=now)
        before_kids = tuple(k.kid for k in state.keys)
        # Publish the new key beside the old ones before anything signs with it: the issuer re-reads
        # key and JWKS on change, and a reader between two writes must always find its kid published.
        _write_json(paths.jwks, {"keys": [dict(after.active.jwk), *(dict(k.jwk) for k in state.keys)]})
    _write_private_key(paths.signing_key, key, overwrite=True)
    _write_json(paths.signing_keys_metadata, after.metadata())
    _write_json(paths.jwks, after.jwks())
    published = tuple(k.kid for k in after.keys)
    previous = next((k for k in after.keys[1:] if state is not None and k.kid == state.active.kid), None)
    return Rotation(
        active=after.active.kid,
        retired=(state.active.kid,) if state is not None else (),
        pruned=tuple(kid for kid in before_kids if kid not in published),
        published=published,
        prune_after=previous.prune_after if previous is not None else None,
    )


def list_signing_keys(paths: PkiPaths, *, now: datetime) -> list[KeyInfo]:
    """Every published signing key, active first; nothing is written."""
    state = load_key_state(paths, now=now)
    return [KeyInfo(k.kid, k.status(now), k.created_at, k.retired_at, k.prune_after) for k in state.keys]
