"""JWK Sets: validation, files, and https endpoints, found by discovery when only the issuer is known.

An external issuer can be configured by its issuer URL alone: the JWK Set URL is the ``jwks_uri`` of
its OpenID Connect Discovery document (``<issuer>/.well-known/openid-configuration``) or, if that is
absent (404), of its RFC 8414 metadata (``/.well-known/oauth-authorization-server`` inserted before
the issuer's path). Both specifications require the document's ``issuer`` to equal the configured
one exactly (RFC 8414 §3.3, OpenID Discovery §4.3); otherwise a metadata document could name keys
for an issuer it does not speak for.

Fetching is asynchronous (aiohttp), bounded in time and size, never follows redirects, and a
failure says why: TLS verification, connection, HTTP status, size, or parse error. One short-lived
client session per fetch: fetches happen once per key lifespan or cooldown, so a long-lived session
would only add a resource to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
from jwt import PyJWK, PyJWKSet

log = logging.getLogger("aigis.jwks")

FETCH_TIMEOUT_SECONDS = 10.0
MAX_DOCUMENT_BYTES = 512 * 1024  # a JWK Set or metadata document; real ones are a few KiB
OPENID_CONFIGURATION = "/.well-known/openid-configuration"
OAUTH_METADATA = "/.well-known/oauth-authorization-server"

# JWK members that only private or symmetric keys have (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeySetError(Exception):
    """A JWK Set (file or URL) could not be loaded; the message says which and why."""


class FetchError(KeySetError):
    """An https document could not be fetched or parsed; the message names the URL and the cause."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status when the server answered with another than 200


class KeysUnavailable(KeySetError):
    """An issuer's keys are not cached and cannot be fetched now (not the caller's fault)."""


@dataclass(frozen=True)
class KeySet:
    """A validated JWK Set."""

    keys: dict[str, PyJWK]  # kid -> key, signing keys only
    digest: str  # canonical JSON of the published keys: tells whether a reload changed anything


def parse_jwks(data: Any, source: str) -> KeySet:
    """Validate a JWK Set (RFC 7517 §5) and index its signing keys by kid."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeySetError(f"{source}: not a JWK Set object with a 'keys' list")
    for raw in data["keys"]:
        # A published set must never carry a private or symmetric key; refuse rather than skip, so
        # the mistake is noticed (and never echo the key material).
        if isinstance(raw, dict) and _SECRET_MEMBERS & raw.keys():
            raise KeySetError(f"{source}: a key (kid {raw.get('kid')!r}) contains private or secret material")
    try:
        jwk_set = PyJWKSet.from_dict(data)
    except Exception as exc:  # PyJWTError, or NotImplementedError for a key with "alg": "none"
        raise KeySetError(f"{source}: no usable keys ({type(exc).__name__})") from None
    keys: dict[str, PyJWK] = {}
    for key in jwk_set.keys:
        if key.public_key_use not in ("sig", None) or not isinstance(key.key_id, str) or not key.key_id:
            continue
        if key.key_id in keys:
            raise KeySetError(f"{source}: duplicate kid {key.key_id!r}")
        keys[key.key_id] = key
    if not keys:
        raise KeySetError(f"{source}: no signing keys with a kid")
    return KeySet(keys, json.dumps(data["keys"], sort_keys=True))


def load_jwks_file(path: Path) -> KeySet:
    """Read and validate a JWK Set file. Blocking file I/O."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KeySetError(f"{path}: cannot read JWK Set ({type(exc).__name__}: {exc})") from None
    return parse_jwks(data, str(path))


def discovery_urls(issuer: str) -> tuple[str, str]:
    """The OpenID Connect Discovery URL and the RFC 8414 metadata URL of `issuer`."""
    parsed = urlparse(issuer)
    origin = f"{parsed.scheme}://{parsed.netloc}"
    path = parsed.path.rstrip("/")
    # OpenID Discovery §4: append to the issuer (its trailing "/" removed). RFC 8414 §3.1: insert
    # the well-known segment between the host and the issuer's path.
    return origin + path + OPENID_CONFIGURATION, origin + OAUTH_METADATA + path


async def fetch_json(url: str, context: ssl.SSLContext) -> Any:
    """GET a JSON document over https; FetchError says what went wrong (never a traceback)."""
    # A one-off connection: closed by abort, not by a TLS close_notify exchange that a server may
    # never answer, so nothing is left half-closed behind the fetch.
    connector = aiohttp.TCPConnector(limit=1, force_close=True)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, connector_owner=False, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
            ) as session,
            session.get(url, ssl=context, allow_redirects=False, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                raise FetchError(f"{url}: HTTP status {response.status}", response.status)
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:  # stop reading: a huge body costs us nothing more
                    raise FetchError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    except aiohttp.ClientConnectorCertificateError as exc:
        raise FetchError(f"{url}: TLS certificate verification failed ({_verify_message(exc)})") from None
    except aiohttp.ClientSSLError as exc:
        raise FetchError(f"{url}: TLS handshake failed ({type(exc.os_error).__name__})") from None
    except aiohttp.ClientConnectorError as exc:
        raise FetchError(f"{url}: cannot connect ({exc.strerror or type(exc.os_error).__name__})") from None
    except TimeoutError:
        raise FetchError(f"{url}: no answer within {FETCH_TIMEOUT_SECONDS:g} s") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"{url}: HTTP error ({type(exc).__name__})") from None
    finally:
        await connector.close(abort_ssl=True)
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise FetchError(f"{url}: not JSON ({exc.msg} at position {exc.pos})") from None
    except ValueError:
        raise FetchError(f"{url}: not JSON (undecodable text)") from None


def _verify_message(exc: aiohttp.ClientConnectorCertificateError) -> str:
    error = exc.certificate_error
    return str(getattr(error, "verify_message", None) or getattr(error, "reason", None) or type(error).__name__)


async def discover_jwks_uri(issuer: str, context: ssl.SSLContext) -> str:
    """The `jwks_uri` of `issuer`'s discovery document (OpenID first, then RFC 8414)."""
    openid, oauth = discovery_urls(issuer)
    try:
        document = await fetch_json(openid, context)
        url = openid
    except FetchError as exc:
        if exc.status != 404:
            raise
        document = await fetch_json(oauth, context)
        url = oauth
    if not isinstance(document, dict):
        raise FetchError(f"{url}: metadata is not a JSON object")
    if document.get("issuer") != issuer:
        # RFC 8414 §3.3 / OpenID Discovery §4.3: MUST be identical to the issuer used to build the URL.
        raise FetchError(f"{url}: metadata names issuer {document.get('issuer')!r}, not {issuer!r}")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or urlparse(jwks_uri).scheme != "https":
        raise FetchError(f"{url}: metadata has no https jwks_uri")
    return jwks_uri


# How long a caller with an unknown kid waits for a key-set refresh another caller started.
KEY_REFRESH_WAIT_SECONDS = 5.0


async def wait_bounded(refresh: asyncio.Future[None]) -> None:
    """Wait for a refresh under way, at most KEY_REFRESH_WAIT_SECONDS; giving up (or being
    cancelled) never cancels the refresh the other callers wait for."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(refresh), KEY_REFRESH_WAIT_SECONDS)


class RemoteKeys:
    """An issuer's keys from an https JWK Set URL, given or discovered, cached by us.

    A failed refresh leaves the last good keys in service. Any fetch (expiry refresh or unknown kid)
    happens at most once per cooldown, which also bounds what a stream of made-up kids can make us
    do. While no key set was ever fetched, lookups raise KeysUnavailable with the last failure.
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str | None,
        ca_file: Path | None,
        lifespan: float,
        cooldown: float,
        clock: Callable[[], float],
        on_change: Callable[[], None],
        on_fetch: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.issuer = issuer
        self._on_fetch = on_fetch  # told (issuer, succeeded) after each attempt: the server counts them
        self.configured_url = jwks_url  # None: discover it from the issuer
        self.url: str | None = jwks_url
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        self._lifespan, self._cooldown = lifespan, cooldown
        self._clock, self._on_change = clock, on_change
        self.key_set: KeySet | None = None
        self.last_error: str | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._fetching: asyncio.Future[None] | None = None  # done when the fetch under way ends
        self.fetches = 0  # attempts made, for tests and metrics

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._cooldown

    async def get(self, kid: str) -> PyJWK | None:
        now = self._clock()
        key = self.key_set.keys.get(kid) if self.key_set is not None else None
        fresh = self._fetched_at is not None and now - self._fetched_at < self._lifespan
        if key is not None and (fresh or self._lock.locked()):
            return key  # a stale key keeps serving while a refresh is under way
        if self._may_fetch(now):
            await self.refresh()
        elif self._fetching is not None:  # single flight: wait for the fetch under way, then look
            await wait_bounded(self._fetching)
        if self.key_set is None:
            raise KeysUnavailable(self.last_error or f"keys of {self.issuer} not fetched yet")
        return self.key_set.keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the key set now (subject to the cooldown); on failure keep the last good keys."""
        async with self._lock:
            now = self._clock()
            if not self._may_fetch(now):  # another task fetched while we waited for the lock
                return
            self._attempted_at = now
            self.fetches += 1
            self._fetching = fetching = asyncio.get_running_loop().create_future()
            try:
                await self._fetch()
            finally:
                fetching.set_result(None)
                self._fetching = None

    async def _fetch(self) -> None:
        try:
            if self.url is None:
                self.url = await discover_jwks_uri(self.issuer, self._context)
            key_set = parse_jwks(await fetch_json(self.url, self._context), self.url)
        except KeySetError as exc:
            if self.configured_url is None:
                self.url = None  # rediscover next time: the jwks_uri may have moved
            self.last_error = str(exc)
            kept = "keeping the previous keys" if self.key_set is not None else "no keys cached"
            log.warning("JWK Set of %s unavailable (%s); %s", self.issuer, exc, kept)
            if self._on_fetch is not None:
                self._on_fetch(self.issuer, False)
            return
        self.last_error = None
        if self._on_fetch is not None:
            self._on_fetch(self.issuer, True)
        changed = self.key_set is not None and key_set.digest != self.key_set.digest
        self.key_set, self._fetched_at = key_set, self._clock()
        if changed:
            self._on_change()

    def expire(self) -> None:
        """Make the next lookup refetch (still subject to the cooldown)."""
        self._fetched_at = None
