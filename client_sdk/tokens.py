"""Where the SDK gets access tokens: a fixed token, or OAuth2 client credentials (RFC 6749 §4.4).

A provider hands out a bearer token and can be told that a token was refused (`invalidate`), so
the client can fetch a fresh one and retry once. `ClientCredentials` authenticates to the token
endpoint either with the TLS client certificate (RFC 8705 `tls_client_auth`) or with a client
secret (`client_secret_basic`), caches the token and refreshes it shortly before it expires.
"""

from __future__ import annotations

import base64
import json
import math
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from os import PathLike
from typing import Protocol, runtime_checkable

from aigis.client_sdk.errors import TokenError

# RFC 6750 §2.1 b64token: the only characters a bearer token may have. Checking it also keeps a
# hostile token endpoint from injecting header lines through the token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 §3.3 scope-token: %x21 / %x23-5B / %x5D-7E.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# A token response is a few KiB; the metadata limit rejects anything above ~8 KiB anyway.
_MAX_RESPONSE_BYTES = 64 * 1024
_MAX_DESCRIPTION = 200


@runtime_checkable
class TokenProvider(Protocol):
    """Supplies bearer tokens to a client. Implementations must be thread-safe."""

    def token(self) -> str:
        """A token to send now. May block on network I/O; raises TokenError on failure."""
        ...

    def invalidate(self, token: str) -> None:
        """The server refused `token`: stop handing it out (no-op if it is no longer current)."""
        ...


class StaticToken:
    """A fixed token, e.g. from an environment variable. It cannot be refreshed, so a client
    using it never retries a call the server refused."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or not _B64TOKEN.fullmatch(token):
            raise ValueError("token must be a non-empty RFC 6750 bearer token")
        self._token = token

    def token(self) -> str:
        return self._token

    def invalidate(self, token: str) -> None:
        """Nothing to refresh: the same token will be returned again."""

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"


@dataclass(frozen=True, slots=True)
class _CachedToken:
    value: str = field(repr=False)
    # In the provider's clock: when to fetch a new one (expiry minus the refresh margin).
    refresh_at: float


class ClientCredentials:
    """OAuth2 client-credentials grant against `token_url` (https only), with a cached token.

    Exactly one client authentication: `cert` + `key` (mutual TLS, RFC 8705) or `client_id` +
    `client_secret` (HTTP Basic, RFC 6749 §2.3.1). `ca` pins the token endpoint's CA (path or PEM
    bytes); the system trust store is not used. The token is refreshed once the clock is within
    `refresh_margin` of `expires_in` (at most half the token's lifetime, so a short-lived token is
    not refetched on every call). `clock` measures seconds; it defaults to `time.monotonic`
    because `expires_in` is a duration and a monotonic clock cannot jump. Thread-safe: concurrent
    callers wait for one fetch. Construction reads the certificate files; fetches do network I/O,
    so asyncio code calls `token()` in a thread (AsyncClient does).
    """

    def __init__(
        self,
        token_url: str,
        *,
        ca: str | PathLike[str] | bytes,
        cert: str | PathLike[str] | None = None,
        key: str | PathLike[str] | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        scopes: Iterable[str] = (),
        refresh_margin: timedelta = timedelta(seconds=30),
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urllib.parse.urlsplit(token_url)
        if url.scheme != "https" or not url.hostname:
            raise ValueError("token_url must be an https:// URL")
        if (cert is None) != (key is None):
            raise ValueError("cert and key must be given together")
        if client_secret is not None and not client_id:
            raise ValueError("client_secret needs a client_id")
        if (cert is not None) == (client_secret is not None):
            raise ValueError("give exactly one client authentication: cert+key or client_id+client_secret")
        self._scopes = tuple(scopes)
        for scope in self._scopes:
            if not _SCOPE_TOKEN.fullmatch(scope):
                raise ValueError(f"invalid scope {scope!r}")
        if refresh_margin < timedelta(0):
            raise ValueError("refresh_margin must not be negative")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a positive number of seconds")

        self._token_url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._margin = refresh_margin.total_seconds()
        self._timeout = timeout
        self._clock = clock
        self._opener = _opener(_ssl_context(ca, cert, key))
        self._lock = threading.Lock()
        self._cached: _CachedToken | None = None

    @property
    def auth_method(self) -> str:
        """The RFC 7591 name of the client authentication in use."""
        return "client_secret_basic" if self._secret is not None else "tls_client_auth"

    def token(self) -> str:
        with self._lock:
            cached = self._cached
            if cached is None or self._clock() >= cached.refresh_at:
                cached = self._cached = self._fetch()
            return cached.value

    def invalidate(self, token: str) -> None:
        with self._lock:
            # Compare with the cached one so a late report about an old token does not throw away
            # a fresh one another thread just fetched.
            if self._cached is not None and self._cached.value == token:
                self._cached = None

    def __repr__(self) -> str:
        return (
            f"ClientCredentials(token_url={self._token_url!r}, auth_method={self.auth_method!r}, "
            f"client_id={self._client_id!r}, scopes={self._scopes!r})"
        )

    def _fetch(self) -> _CachedToken:
        form = {"grant_type": "client_credentials"}
        if self._scopes:
            form["scope"] = " ".join(self._scopes)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self._secret is not None:
            headers["Authorization"] = _basic_auth(self._client_id or "", self._secret)
        elif self._client_id:
            # RFC 8705 §2: with tls_client_auth the client_id identifies the client in the body.
            form["client_id"] = self._client_id
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be https
            self._token_url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST"
        )
        started = self._clock()
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                body = response.read(_MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                raise _oauth_error(exc.code, exc.read(_MAX_RESPONSE_BYTES + 1)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise TokenError(f"token endpoint unreachable: {type(reason).__name__}: {reason}") from None
        return _parse_token(body, started, self._margin)


def _parse_token(body: bytes, started: float, margin: float) -> _CachedToken:
    payload = _json_object(body)
    if payload is None:
        raise TokenError("token endpoint sent an invalid response", error="invalid_response")
    value = payload.get("access_token")
    token_type = payload.get("token_type")
    expires_in = payload.get("expires_in")
    if not isinstance(value, str) or not _B64TOKEN.fullmatch(value):
        raise TokenError("token response has no valid access_token", error="invalid_response")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":  # RFC 6749 §7.1: case-insensitive
        raise TokenError("token response is not a Bearer token", error="invalid_response")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise TokenError("token response has no valid expires_in", error="invalid_response")
    # Measured from before the request, so the cached expiry is never later than the real one.
    return _CachedToken(value, started + expires_in - min(margin, expires_in / 2))


def _oauth_error(status: int, body: bytes) -> TokenError:
    payload = _json_object(body) or {}
    error = payload.get("error")
    description = payload.get("error_description")
    if not isinstance(error, str) or not _SCOPE_TOKEN.fullmatch(error):
        return TokenError(f"token endpoint answered HTTP {status}", http_status=status)
    message = f"token request refused: {error}"
    if isinstance(description, str) and description:
        printable = "".join(c if c.isprintable() else "?" for c in description[:_MAX_DESCRIPTION])
        message += f": {printable}"
    return TokenError(message, error=error, http_status=status)


def _json_object(body: bytes) -> dict[str, object] | None:
    if len(body) > _MAX_RESPONSE_BYTES:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _basic_auth(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts form-urlencoded before base64, so ":" in either survives.
    pair = f"{urllib.parse.quote_plus(client_id, safe='')}:{urllib.parse.quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _ssl_context(
    ca: str | PathLike[str] | bytes, cert: str | PathLike[str] | None, key: str | PathLike[str] | None
) -> ssl.SSLContext:
    # PROTOCOL_TLS_CLIENT verifies the certificate and the host name; only the pinned CA is trusted.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if isinstance(ca, bytes):
        context.load_verify_locations(cadata=ca.decode("ascii"))
    else:
        context.load_verify_locations(cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A token endpoint has no reason to redirect, and following one would resend the
    Authorization header (the client secret) to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())



def decode_unverified(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """The (header, claims) of a JWS compact token, for display only: the signature is NOT checked.

    `aigis token --decode` shows what the issuer granted; never base a decision on this.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a JWS compact token (expected three dot-separated parts)")
    decoded: list[dict[str, object]] = []
    for part in parts[:2]:
        try:
            value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise TokenError("not a JWS compact token (header or claims are not base64url JSON objects)")
        decoded.append(value)
    return decoded[0], decoded[1]
