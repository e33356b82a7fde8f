"""Verify OAuth2 JWT access tokens (RFC 9068) presented as ``authorization: Bearer <jwt>`` (RFC 6750).

The hot path is a dict lookup: a token that verified before is served from a bounded cache until its
``exp``. A miss runs the checks below in this fixed order; the first failure decides, and every failure
is exactly one `Reason`:

====  ==============================================================  ===========================
step  check                                                           reason on failure
====  ==============================================================  ===========================
 0    one ``authorization`` entry, ``Bearer <token68>``, <= 8 KiB      TOKEN_MALFORMED
 1    compact JWS: three base64url segments, JSON object header        TOKEN_MALFORMED
      and payload (PyJWT ``DecodeError``)
 2    no ``crit`` header: we implement no JWS extension                TOKEN_INVALID
 3    ``typ`` is ``at+jwt`` or ``application/at+jwt`` (RFC 9068 §4),  TOKEN_WRONG_TYPE
      or another type the token's issuer opted in to (``token_types``)
 4    ``alg`` in our allow-list (stops ``none``, HS256-with-the-         TOKEN_BAD_ALGORITHM
      public-key, ... before any key is touched)
 5    unverified ``iss`` names a TrustedIssuer (absent: MISSING_CLAIM) TOKEN_WRONG_ISSUER
 6    ``kid`` names a signing key of *that* issuer's JWK Set           TOKEN_UNKNOWN_KEY
      (an https key set never fetched and unreachable now:             TOKEN_KEYS_UNAVAILABLE)
 7    ``jwt.decode`` with that one key and alg, ``require`` exp iat iss aud sub, ``issuer`` and
      ``audience``; PyJWT exceptions map as follows (subclasses first):
        ExpiredSignatureError -> TOKEN_EXPIRED, ImmatureSignatureError -> TOKEN_NOT_YET_VALID,
        InvalidAudienceError -> TOKEN_WRONG_AUDIENCE, InvalidIssuerError -> TOKEN_WRONG_ISSUER,
        MissingRequiredClaimError -> TOKEN_MISSING_CLAIM,
        InvalidSignatureError -> TOKEN_BAD_SIGNATURE (a DecodeError subclass, so tested first),
        InvalidAlgorithmError -> TOKEN_BAD_ALGORITHM (also: alg does not fit the key's type),
        DecodeError -> TOKEN_MALFORMED, anything else (InvalidKeyError for a short RSA key,
        InvalidSubjectError, InvalidJTIError, ...) -> TOKEN_INVALID
 8    ``exp`` > now - leeway                                           TOKEN_EXPIRED
      ``nbf`` (if present) and ``iat`` <= now + leeway                 TOKEN_NOT_YET_VALID
      ``exp - iat`` <= the issuer's ``max_lifetime`` (24 h default)     TOKEN_LIFETIME_TOO_LONG
      time claims that are not JSON numbers                            TOKEN_INVALID
 9    ``sub`` non-empty, ``client_id``/``jti`` strings, ``scope`` a     TOKEN_INVALID
      string (or ``scp``, or the issuer's ``scope_claim``, a string or
      list of strings)
10    ``cnf``, if present, an object holding exactly ``x5t#S256``       TOKEN_INVALID /
      (a SHA-256 thumbprint): any other confirmation method cannot be   TOKEN_BINDING_UNVERIFIABLE
      verified here, so the token is refused (RFC 7800 §3)
 *    any unexpected exception (fail closed)                           TOKEN_INVALID
====  ==============================================================  ===========================

PyJWT reads the wall clock itself, so its exp/nbf/iat checks are switched off and step 8 runs here
against the injected ``clock`` (tests pin it; the cache uses the same clock). ``jku``, ``x5u``,
``jwk`` and ``x5c`` headers are never read: keys come only from the configured JWK Sets.
A `TokenError` never carries the token, nor PyJWT's message (which may echo attacker input).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
from jwt import PyJWK

from aigis.auth.decision import Reason
from aigis.auth.defaults import DEFAULT_ALGORITHMS, DEFAULT_MAX_LIFETIME, SUPPORTED_ALGORITHMS
from aigis.auth.jwks import (
    KeySet,
    KeySetError,
    KeysUnavailable,
    RemoteKeys,
    load_jwks_file,
    parse_jwks,
    wait_bounded,
)

__all__ = [
    "KeySet",
    "KeySetError",
    "TokenError",
    "TokenVerifier",
    "TrustedIssuer",
    "VerifiedToken",
    "load_jwks_file",
    "parse_authorization",
    "parse_jwks",
]

log = logging.getLogger("aigis.tokens")

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token, and b64token is token68. We accept exactly one
# space. The auth-scheme is case-insensitive (RFC 9110 §11.1).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9\-._~+/]+=*)")
# grpc refuses metadata above ~8-16 KiB anyway; this bounds our parsing work before any crypto.
MAX_AUTHORIZATION_CHARS = 8 * 1024
# RFC 9068 §4: resource servers MUST verify typ is "at+jwt" or "application/at+jwt".
_ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
# RFC 8705 §3.1: x5t#S256 is base64url(SHA-256(DER)) without padding: 43 characters.
_X5T_S256 = re.compile(r"[A-Za-z0-9_-]{43}")

# Subclasses before their bases: InvalidSignatureError is a DecodeError.
_PYJWT_REASONS: tuple[tuple[type[Exception], Reason], ...] = (
    (jwt.ExpiredSignatureError, Reason.TOKEN_EXPIRED),
    (jwt.ImmatureSignatureError, Reason.TOKEN_NOT_YET_VALID),
    (jwt.InvalidAudienceError, Reason.TOKEN_WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, Reason.TOKEN_WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, Reason.TOKEN_MISSING_CLAIM),
    (jwt.InvalidSignatureError, Reason.TOKEN_BAD_SIGNATURE),
    (jwt.InvalidAlgorithmError, Reason.TOKEN_BAD_ALGORITHM),
    (jwt.DecodeError, Reason.TOKEN_MALFORMED),
)


class TokenError(Exception):
    """A token was refused. `reason` goes to the audit log; the message never contains the token."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(frozen=True)
class TrustedIssuer:
    """An authorization server whose access tokens we accept for `audience`.

    Keys come from `jwks_file`, from `jwks_url`, or, when neither is given, from the `jwks_uri` of
    the issuer's discovery document (OpenID Connect Discovery, else RFC 8414; auth/jwks.py).
    """

    issuer: str  # compared exactly with the token's `iss`
    audience: str  # this resource server's identifier, which must appear in `aud`
    jwks_file: Path | None = None
    jwks_url: str | None = None  # https only
    ca_file: Path | None = None  # trust anchor for a private-CA https `jwks_url` or discovery
    # Accepted JWS `typ` values, compared case-insensitively. RFC 9068 §4 wants at+jwt (which also
    # admits application/at+jwt); adding "JWT" is an explicit opt-in for IdPs that send it.
    token_types: tuple[str, ...] = ("at+jwt",)
    # The claim holding the scopes (a space-delimited string or a list of strings). None: RFC 9068
    # `scope`, else `scp`.
    scope_claim: str | None = None
    # The longest `exp - iat` accepted from this issuer: a token minted for centuries is refused.
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("TrustedIssuer needs a non-empty issuer and audience")
        if not timedelta(seconds=1) <= self.max_lifetime <= timedelta(days=366):
            raise ValueError(f"issuer {self.issuer!r}: max_lifetime must be between 1 s and 366 days")
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError(f"issuer {self.issuer!r}: give at most one of jwks_file and jwks_url")
        if self.jwks_url is not None and urlparse(self.jwks_url).scheme != "https":
            raise ValueError(f"issuer {self.issuer!r}: jwks_url must be https")
        if self.discovers and urlparse(self.issuer).scheme != "https":
            raise ValueError(f"issuer {self.issuer!r}: discovery needs an https issuer (or jwks_url/jwks_file)")
        if self.ca_file is not None and self.jwks_file is not None:
            raise ValueError(f"issuer {self.issuer!r}: ca_file does not apply to jwks_file")
        if not self.token_types or not all(isinstance(t, str) and t for t in self.token_types):
            raise ValueError(f"issuer {self.issuer!r}: token_types must list at least one non-empty typ")
        if self.scope_claim is not None and not self.scope_claim:
            raise ValueError(f"issuer {self.issuer!r}: scope_claim must not be empty")

    @property
    def discovers(self) -> bool:
        """True when the JWK Set URL comes from the issuer's discovery document."""
        return self.jwks_file is None and self.jwks_url is None

    def accepted_types(self) -> frozenset[str]:
        types = {t.lower() for t in self.token_types}
        if "at+jwt" in types:
            types |= _ACCESS_TOKEN_TYPES
        return frozenset(types)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims of a verified access token that authorization and audit use."""

    subject: str
    client_id: str  # `client_id` claim (RFC 9068 §2.2), else `sub`
    scopes: frozenset[str]
    issuer: str
    expires_at: float  # `exp`, seconds since the epoch
    jti: str | None
    cnf_x5t_s256: str | None  # RFC 8705 certificate thumbprint the token is bound to, if any


def parse_authorization(metadata: Iterable[Any] | None) -> str | None:
    """The bearer token from invocation metadata: None if absent, TokenError if malformed.

    `metadata` holds (key, value) pairs or grpc `_Metadatum` named tuples; grpc lowercases keys.
    """
    found: str | None = None
    count = 0
    for key, value in metadata or ():
        if key.lower() == "authorization":
            count += 1
            found = value
    if count == 0:
        return None
    if count > 1:
        raise TokenError(Reason.TOKEN_MALFORMED, "more than one authorization entry")
    token = _WELL_FORMED.get(found)  # type: ignore[arg-type]
    if token is not None:  # the same header as an earlier call: skip the regex (hot path)
        return token
    if not isinstance(found, str) or len(found) > MAX_AUTHORIZATION_CHARS:
        raise TokenError(Reason.TOKEN_MALFORMED, "authorization entry too large or not text")
    match = _BEARER.fullmatch(found)
    if match is None:
        raise TokenError(Reason.TOKEN_MALFORMED, "authorization is not 'Bearer <token68>'")
    if len(_WELL_FORMED) >= _WELL_FORMED_MAX:
        _WELL_FORMED.clear()
    _WELL_FORMED[found] = match.group(1)
    return match.group(1)


# Authorization values that parsed before -> their token. Parsing is pure, so remembering it is
# safe; the bound keeps a stream of distinct (forged) headers from growing it without limit.
_WELL_FORMED: dict[str, str] = {}
_WELL_FORMED_MAX = 4096


class _FileKeys:
    """Keys from a JWK Set file, read at construction and swapped in by TokenVerifier.reload().

    An unknown kid also re-reads the file (in a thread, at most once per `recheck` seconds): right
    after `aigis keys rotate` the issuer signs with a key the periodic reload has not seen yet, and
    those tokens must not be refused meanwhile. The re-read is single flight: callers that find
    an unknown kid while one is under way wait for it (at most KEY_REFRESH_WAIT_SECONDS) instead of
    being refused. A forged kid costs at most one file read a second.
    """

    def __init__(self, path: Path, on_change: Callable[[], None], recheck: float = 1.0) -> None:
        self.path = path
        self.key_set = load_jwks_file(path)
        self._on_change = on_change
        self._recheck = recheck
        self._checked_at = time.monotonic()
        self._rereading: asyncio.Future[None] | None = None
        self.rereads = 0  # for tests: how many times the file was read for an unknown kid

    async def get(self, kid: str) -> PyJWK | None:
        key = self.key_set.keys.get(kid)
        if key is not None:
            return key
        if self._rereading is None:
            if time.monotonic() - self._checked_at < self._recheck:
                return None
            self._checked_at = time.monotonic()
            self._rereading = asyncio.ensure_future(self._reread())
        await wait_bounded(self._rereading)
        return self.key_set.keys.get(kid)

    async def _reread(self) -> None:
        try:
            self.rereads += 1
            key_set = await asyncio.to_thread(load_jwks_file, self.path)
            if key_set.digest != self.key_set.digest:
                self.key_set = key_set
                self._on_change()  # a removed key must stop vouching for cached tokens
        except KeySetError as exc:
            log.error("unknown kid, and the JWK Set cannot be re-read: %s", exc)
        finally:
            self._rereading = None


def _reason_for(exc: Exception) -> Reason:
    for kind, reason in _PYJWT_REASONS:
        if isinstance(exc, kind):
            return reason
    return Reason.TOKEN_INVALID


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # RFC 7519 §2 NumericDate: a finite JSON number. bool is an int in Python, and Python's json
    # accepts Infinity/NaN and unbounded integers; refuse them all.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is not a NumericDate")
    try:
        number = float(value)
    except OverflowError:
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is out of range") from None
    if not math.isfinite(number):
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is not finite")
    return number


def _scopes(claims: Mapping[str, Any], claim: str | None) -> frozenset[str]:
    """RFC 9068 §2.2.3 `scope` (space-delimited string), else `scp`; or the issuer's own claim."""
    if claim is None:
        claim = "scope" if "scope" in claims else "scp"
        if claim == "scope" and not isinstance(claims["scope"], str):
            raise TokenError(Reason.TOKEN_INVALID, "scope is not a string")
    raw = claims.get(claim)
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        return frozenset(s for s in raw.split(" ") if s)
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return frozenset(s for s in raw if s)
    raise TokenError(Reason.TOKEN_INVALID, f"{claim} is not a string or a list of strings")


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is not a non-empty string")
    return value


def _certificate_binding(claims: Mapping[str, Any]) -> str | None:
    """The RFC 8705 thumbprint the token is bound to; None when it claims no binding.

    RFC 7800 §3: a token that says it is bound is only good when that binding is verified. The one
    confirmation method we can check is `x5t#S256` against the TLS client certificate; a `cnf`
    with anything else (`jkt`, `x5t`, `jwk`, `kid`, `jku`, an empty object, an extra member) is
    refused rather than used as a plain bearer token.
    """
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        raise TokenError(Reason.TOKEN_INVALID, "cnf is not an object")
    if set(cnf) != {"x5t#S256"}:
        raise TokenError(Reason.TOKEN_BINDING_UNVERIFIABLE, "cnf holds a confirmation method other than x5t#S256")
    thumbprint = cnf["x5t#S256"]
    if not isinstance(thumbprint, str) or not _X5T_S256.fullmatch(thumbprint):
        raise TokenError(Reason.TOKEN_BINDING_UNVERIFIABLE, "cnf x5t#S256 is not a SHA-256 thumbprint")
    return thumbprint


# Refusals that stay true for the same token while the keys and configuration stay the same (a key
# change clears them). Not remembered: a token not yet valid (it may become valid within seconds), an
# unknown kid (a rotation may bring it; that miss is what triggers the re-read), keys unavailable
# (transient), and anything unforeseen.
_REMEMBERED_REFUSALS = frozenset(Reason) - {
    Reason.TOKEN_NOT_YET_VALID, Reason.TOKEN_UNKNOWN_KEY, Reason.TOKEN_KEYS_UNAVAILABLE, Reason.TOKEN_INVALID,
}
_REFUSED_SECONDS = 5.0  # how long a refusal is remembered: bounded staleness whatever changes
_REFUSED_CACHE_SIZE = 1024  # tokens of at most MAX_AUTHORIZATION_CHARS each


class TokenVerifier:
    """Verifies bearer tokens from trusted issuers and caches the results until `exp`."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway: timedelta = timedelta(seconds=30),
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        jwks_lifespan: timedelta = timedelta(minutes=5),
        jwks_cooldown: timedelta = timedelta(seconds=30),
        jwks_file_recheck: timedelta = timedelta(seconds=1),
        on_jwks_fetch: Callable[[str, bool], None] | None = None,
    ) -> None:
        if not issuers:
            raise ValueError("at least one trusted issuer is required")
        unsupported = set(algorithms) - SUPPORTED_ALGORITHMS
        if unsupported or not algorithms:
            raise ValueError(f"unsupported token algorithms {sorted(unsupported)}; use {sorted(SUPPORTED_ALGORITHMS)}")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway.total_seconds()
        self._cache_size = cache_size
        self._clock = clock
        self._cache: dict[str, VerifiedToken] = {}
        # Recently refused tokens and why, until a deadline on the verifier's clock: the same forged or expired
        # token sent again is refused by one lookup, not another parse and signature check.
        self._refused: dict[str, tuple[Reason, float]] = {}
        self._generation = 0  # bumped when keys change, so an in-flight miss cannot repopulate the cache
        self._issuers: dict[str, tuple[TrustedIssuer, _FileKeys | RemoteKeys, frozenset[str]]] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            keys: _FileKeys | RemoteKeys
            if issuer.jwks_file is not None:
                keys = _FileKeys(issuer.jwks_file, self.clear_cache, jwks_file_recheck.total_seconds())
            else:
                keys = RemoteKeys(
                    issuer=issuer.issuer,
                    jwks_url=issuer.jwks_url,
                    ca_file=issuer.ca_file,
                    lifespan=jwks_lifespan.total_seconds(),
                    cooldown=jwks_cooldown.total_seconds(),
                    clock=clock,
                    on_change=self.clear_cache,
                    on_fetch=on_jwks_fetch,
                )
            self._issuers[issuer.issuer] = (issuer, keys, issuer.accepted_types())
        self._decode_options: Any = {
            "verify_signature": True,
            "require": _REQUIRED_CLAIMS,
            "verify_aud": True,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
            # Checked in _check_times against the injected clock instead.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "strict_aud": False,  # RFC 7519 allows an `aud` array; ours must be one of its members
            "enforce_minimum_key_length": True,  # refuse, not warn about, short RSA/HMAC keys
        }

    # The interceptor calls the function through the verifier; it needs no state.

    @property
    def cache(self) -> Mapping[str, VerifiedToken]:
        """Read-only view of the verified-token cache (for tests and metrics)."""
        return self._cache

    @property
    def refusals(self) -> Mapping[str, tuple[Reason, float]]:
        """Read-only view of the remembered refusals: token -> (reason, until) (for tests)."""
        return self._refused

    def clear_cache(self) -> None:
        self._generation += 1
        self._cache = {}
        self._refused = {}  # a new key may make a refused token good

    def reload(self) -> None:
        """Re-read JWK Set files (key rotation). Blocking: call it via asyncio.to_thread.

        Every file is read before any is swapped in, so one bad file leaves all issuers unchanged
        (KeySetError). Cached tokens are dropped when keys changed: a removed key must stop vouching
        for tokens at once. Remote key sets are marked stale and refetched on next use.
        """
        files = [keys for _, keys, _ in self._issuers.values() if isinstance(keys, _FileKeys)]
        loaded = [load_jwks_file(keys.path) for keys in files]
        changed = False
        for keys, key_set in zip(files, loaded, strict=True):
            changed |= key_set.digest != keys.key_set.digest
            keys.key_set = key_set
        for _, issuer_keys, _ in self._issuers.values():
            if isinstance(issuer_keys, RemoteKeys):
                issuer_keys.expire()
        if changed:
            self.clear_cache()

    async def keys_unavailable(self) -> list[str]:
        """Issuers whose keys are not loaded, after one fetch attempt (cooldown-bounded) for each
        remote key set never fetched yet; empty when every issuer can verify (readiness)."""
        missing = []
        for issuer, keys, _ in self._issuers.values():
            if isinstance(keys, RemoteKeys) and keys.key_set is None:
                await keys.refresh()
                if keys.key_set is None:
                    missing.append(issuer.issuer)
        return missing

    def cached(self, token: str) -> VerifiedToken | None:
        """The verified claims of `token` when verified before and not expired; else None (then
        `verify`). Synchronous: the per-call hot path awaits nothing for a token it has seen."""
        hit = self._cache.get(token)
        return hit if hit is not None and self._clock() < hit.expires_at else None

    async def verify(self, token: str) -> VerifiedToken:
        """The verified claims of `token`, or TokenError. Cache hit: one dict lookup and a clock read."""
        try:  # zero-cost in 3.11; keeps even a bad argument or clock failure closed
            hit = self.cached(token)
            if hit is not None:
                return hit
            refused = self._refused.get(token)
            if refused is not None and self._clock() < refused[1]:
                # A new exception each time: re-raising one instance would grow its traceback.
                raise TokenError(refused[0], "refused moments ago")
            generation = self._generation
            try:
                return await self._verify_uncached(token)
            except TokenError as exc:
                if exc.reason in _REMEMBERED_REFUSALS and generation == self._generation:
                    self._remember_refusal(token, exc.reason)
                raise
        except TokenError:
            raise
        except Exception as exc:  # fail closed on anything we did not foresee
            log.warning("unexpected error while verifying a token: %s", type(exc).__name__)
            raise TokenError(Reason.TOKEN_INVALID, type(exc).__name__) from None

    async def _verify_uncached(self, token: str) -> VerifiedToken:
        if not isinstance(token, str) or len(token) > MAX_AUTHORIZATION_CHARS:
            raise TokenError(Reason.TOKEN_MALFORMED, "token too large or not text")
        generation = self._generation
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenError(_reason_for(exc), type(exc).__name__) from None
        header, unverified_claims = unverified["header"], unverified["payload"]

        # RFC 7515 §4.1.11: a recipient MUST reject a JWS whose crit lists an extension it does not
        # understand; we understand none (PyJWT alone would accept b64).
        if "crit" in header:
            raise TokenError(Reason.TOKEN_INVALID, "crit header")
        iss = unverified_claims.get("iss")
        entry = self._issuers.get(iss) if isinstance(iss, str) else None
        # RFC 9068 §4: at+jwt, unless this issuer opted in to other types (unknown issuer: the default).
        typ = header.get("typ")
        accepted = entry[2] if entry is not None else _ACCESS_TOKEN_TYPES
        if not isinstance(typ, str) or typ.lower() not in accepted:
            raise TokenError(Reason.TOKEN_WRONG_TYPE, "typ not accepted for this issuer")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise TokenError(Reason.TOKEN_BAD_ALGORITHM, "alg not allowed")

        if iss is None:
            raise TokenError(Reason.TOKEN_MISSING_CLAIM, "iss")
        if entry is None:
            raise TokenError(Reason.TOKEN_WRONG_ISSUER, "untrusted iss")
        issuer, keys, _ = entry
        kid = header.get("kid")
        try:
            key = await keys.get(kid) if isinstance(kid, str) and kid else None
        except KeysUnavailable as exc:
            # Not the caller's fault: UNAVAILABLE, so clients retry rather than give up.
            raise TokenError(Reason.TOKEN_KEYS_UNAVAILABLE, str(exc)) from None
        if key is None:
            raise TokenError(Reason.TOKEN_UNKNOWN_KEY, "kid not in the issuer's key set")

        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                options=self._decode_options,
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason_for(exc), type(exc).__name__) from None

        expires_at = self._check_times(claims, issuer.max_lifetime.total_seconds())
        subject = claims["sub"]
        if not subject:
            raise TokenError(Reason.TOKEN_INVALID, "empty sub")
        verified = VerifiedToken(
            subject=subject,
            client_id=_optional_str(claims, "client_id") or subject,
            scopes=_scopes(claims, issuer.scope_claim),
            issuer=issuer.issuer,
            expires_at=expires_at,
            jti=_optional_str(claims, "jti"),
            cnf_x5t_s256=_certificate_binding(claims),
        )
        if self._cache_size and generation == self._generation and self._clock() < expires_at:
            self._remember(token, verified)
        return verified

    def _check_times(self, claims: Mapping[str, Any], max_lifetime: float) -> float:
        now, leeway = self._clock(), self._leeway
        exp = _time_claim(claims, "exp")
        iat = _time_claim(claims, "iat")
        nbf = _time_claim(claims, "nbf")
        assert exp is not None and iat is not None  # required by jwt.decode
        if exp <= now - leeway:
            raise TokenError(Reason.TOKEN_EXPIRED, "exp passed")
        if nbf is not None and nbf > now + leeway:
            raise TokenError(Reason.TOKEN_NOT_YET_VALID, "nbf in the future")
        if iat > now + leeway:
            raise TokenError(Reason.TOKEN_NOT_YET_VALID, "iat in the future")
        if exp - iat > max_lifetime:
            raise TokenError(Reason.TOKEN_LIFETIME_TOO_LONG, f"exp - iat = {exp - iat:.0f} s")
        return exp

    def _remember_refusal(self, token: str, reason: Reason) -> None:
        if not isinstance(token, str) or len(token) > MAX_AUTHORIZATION_CHARS:
            return
        if len(self._refused) >= _REFUSED_CACHE_SIZE:
            self._refused = {}  # all-different tokens only churn it; bounded at ~8 MiB either way
        self._refused[token] = (reason, self._clock() + _REFUSED_SECONDS)

    def _remember(self, token: str, verified: VerifiedToken) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            # Rebuild once per ~10% of capacity: drops expired entries and the oldest insertions.
            # O(n) every n/10 inserts is O(1) amortised, unlike popping a dict's head repeatedly.
            now = self._clock()
            keep = self._cache_size - max(1, self._cache_size // 10)
            items = islice(cache.items(), len(cache) - keep, None)
            self._cache = cache = {k: v for k, v in items if now < v.expires_at}
        cache[token] = verified
