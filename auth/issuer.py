"""The OAuth2 authorization server: client-credentials grant (RFC 6749 §4.4) over HTTPS.

Clients authenticate with their certificate (RFC 8705 `tls_client_auth`) or a secret
(`client_secret_basic`, RFC 6749 §2.3.1) and receive a short-lived ES256 JWT access token in the
RFC 9068 profile, bound to the certificate when one was used (RFC 8705 §3.1 `cnf`). The server
verifies those tokens with the public keys this issuer publishes (jwks.json).

It is reachable without any credential, so it runs on aiohttp under auth/bounded_http.py (its own
event loop and thread, capped connections overall and per peer, whole-request deadlines), checks
secrets in a small bounded pool (scrypt costs ~16 MiB each) and throttles failed client
authentication per client id and per peer (auth/throttle.py). Client certificates pass the gRPC
server's own policy and CRL (auth/identity.py). The client registry, CRL, CA bundle, signing key
and JWKS are re-read when they change on disk, so `aigis certs issue/revoke` and `aigis keys
rotate` take effect without a restart; so does a replaced server certificate, for connections
accepted afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import enum
import hashlib
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aigis.auth.bounded_http import (
    SERVER_NAME,
    BodyError,
    BoundedHttpServer,
    ConnectionStats,
    HttpLimits,
    peer_slot,
    read_body,
)
from aigis.auth.certs import public_jwk
from aigis.auth.clients import (
    SCOPE_TOKEN_RE,
    ClientRegistry,
    RegisteredClient,
    RegistryError,
    SecretHash,
    burn_secret_check,
    load_registry,
    verify_secret,
)
from aigis.auth.defaults import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, MIN_TOKEN_TTL
from aigis.auth.identity import ClientCertificatePolicy, IdentityError, RevocationList, SharedRevocations
from aigis.auth.pki import PkiPaths
from aigis.auth.throttle import AuthThrottle, ThrottleKey, ThrottleLimits
from aigis.auth.tls import TlsError, load_tls_material
from aigis.auth.tokens import KeySetError, parse_jwks
from aigis.auth.urls import https_base_url

log = logging.getLogger("aigis.issuer")

TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a URL path, not a password
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_BODY_BYTES = 8 * 1024
MAX_FORM_FIELDS = 16
# How often the accept loop looks at the server certificate, key and CA bundle for a change.
TLS_CHECK_INTERVAL_S = 1.0
AUTH_REALM = "aigis"

AuthMethod = Literal["tls_client_auth", "client_secret_basic"]


class ErrorCode(enum.StrEnum):
    """RFC 6749 §5.2 token endpoint error codes (plus server_error for our own failures)."""

    INVALID_REQUEST = "invalid_request"
    INVALID_CLIENT = "invalid_client"
    INVALID_GRANT = "invalid_grant"
    UNAUTHORIZED_CLIENT = "unauthorized_client"
    UNSUPPORTED_GRANT_TYPE = "unsupported_grant_type"
    INVALID_SCOPE = "invalid_scope"
    SERVER_ERROR = "server_error"
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"  # RFC 6749 §4.1.2.1's code, with a 503


class IssuerError(Exception):
    """The issuer cannot start: its configuration or key material is wrong."""


class OAuthError(Exception):
    """A refused token request. `description` goes to the client; `log_reason` only to our log."""

    def __init__(
        self,
        error: ErrorCode,
        description: str,
        http_status: int = HTTPStatus.BAD_REQUEST,
        *,
        log_reason: str = "",
        client: str | None = None,
        throttled: ThrottleKey | None = None,
    ) -> None:
        super().__init__(f"{error}: {log_reason or description}")
        self.error = error
        self.description = description
        self.http_status = int(http_status)
        self.log_reason = log_reason or description
        self.client = client
        self.throttled = throttled

    def body(self) -> dict[str, str]:
        return {"error": str(self.error), "error_description": self.description}


def _client_failure(reason: str, client: str | None = None) -> OAuthError:
    # One answer for every authentication failure, so a caller learns nothing about which check
    # failed (unknown name vs wrong secret vs revoked); the reason goes to the log.
    return OAuthError(
        ErrorCode.INVALID_CLIENT,
        "client authentication failed",
        HTTPStatus.UNAUTHORIZED,
        log_reason=reason,
        client=client,
    )


@dataclass(frozen=True)
class IssuerConfig:
    """Where the issuer listens and what it writes into tokens."""

    paths: PkiPaths
    host: str = "127.0.0.1"
    port: int = 8443  # 0 = an ephemeral port (tests)
    issuer_url: str | None = None  # the `iss` claim and RFC 8414 `issuer`; None = this server's URL
    audience: str = "aigis"
    token_ttl: timedelta = DEFAULT_TOKEN_TTL
    trust_domain: str = ""  # SPIFFE trust domain of client certificates; "" = the client registry's
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)  # connections, deadlines, header sizes
    throttle: ThrottleLimits = dataclasses.field(default_factory=ThrottleLimits)  # failed client authentications
    secret_check_workers: int = 2  # concurrent scrypt checks (~16 MiB each)
    secret_check_queue: int = 16  # waiting beyond the workers; more are refused with 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if not self.audience:
            raise ValueError("audience: must not be empty")
        if not MIN_TOKEN_TTL <= self.token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl: must be between {MIN_TOKEN_TTL} and {MAX_TOKEN_TTL}")
        if self.issuer_url is not None:
            _validate_issuer_url(self.issuer_url)
        if not 1 <= self.secret_check_workers <= 16 or not 0 <= self.secret_check_queue <= 1024:
            raise ValueError("secret_check_workers / secret_check_queue: must be 1-16 / 0-1024")


def _validate_issuer_url(url: str) -> None:
    # RFC 8414 §2: "a URL that uses the https scheme and has no query or fragment components".
    # We also refuse a path, because the well-known URL would then move (RFC 8414 §3.1).
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"issuer_url: {url!r} must be an https:// URL")
    if parts.path not in ("",) or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"issuer_url: {url!r} must be scheme://host[:port] only, without a trailing slash")


@dataclass(frozen=True)
class TokenResponse:
    """RFC 6749 §5.1 successful response. The token itself stays out of repr (and so out of logs)."""

    access_token: str = dataclasses.field(repr=False)
    expires_in: int
    scope: str
    jti: str
    token_type: str = "Bearer"  # noqa: S105 - RFC 6750 token type, not a secret

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


@dataclass(frozen=True)
class Authenticated:
    """A client that proved who it is, and how."""

    client: RegisteredClient
    method: AuthMethod
    cert_der: bytes | None = dataclasses.field(default=None, repr=False)


def granted_scopes(client: RegisteredClient, scope_param: str | None) -> tuple[str, ...]:
    """The scopes to grant: what was asked for, if the client may have all of it (RFC 6749 §3.3)."""
    if scope_param is None:
        # "If the client omits the scope parameter ... the authorization server MUST either process
        # the request using a pre-defined default value or fail": the default is everything registered.
        return client.scopes
    requested = scope_param.split(" ")
    if any(not SCOPE_TOKEN_RE.fullmatch(s) for s in requested):
        raise OAuthError(ErrorCode.INVALID_SCOPE, "scope is malformed", client=client.name)
    not_allowed = [s for s in requested if s not in client.scopes]
    if not_allowed:
        raise OAuthError(
            ErrorCode.INVALID_SCOPE,
            "requested scope is not registered for this client",
            log_reason=f"scope not registered: {' '.join(not_allowed)}",
            client=client.name,
        )
    return tuple(dict.fromkeys(requested))


def x5t_s256(cert_der: bytes) -> str:
    """RFC 8705 §3.1 certificate thumbprint: base64url(SHA-256(DER)), no padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode("ascii")


class TokenService:
    """Mints RFC 9068 access tokens. Pure apart from the key it holds: the caller passes `now`."""

    def __init__(
        self,
        *,
        signing_key: ec.EllipticCurvePrivateKey,
        kid: str,
        issuer: str,
        audience: str,
        ttl: timedelta,
    ) -> None:
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise IssuerError("the token-signing key must be a P-256 key (ES256)")
        self._key = signing_key
        self.kid = kid
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl

    @classmethod
    def load(cls, paths: PkiPaths, *, issuer: str, audience: str, ttl: timedelta) -> TokenService:
        """Load the signing key; refuse to start if jwks.json does not publish its public half."""
        return _load_signing(paths, issuer=issuer, audience=audience, ttl=ttl)[0]

    def issue(
        self,
        client: RegisteredClient,
        scope_param: str | None,
        *,
        now: datetime,
        cert_der: bytes | None = None,
    ) -> TokenResponse:
        """A token for an authenticated client; raises OAuthError(invalid_scope) on a scope it may not have."""
        scopes = granted_scopes(client, scope_param)
        iat = int(now.timestamp())
        expires_in = int(self.ttl.total_seconds())
        jti = str(uuid.uuid4())
        scope = " ".join(scopes)
        # RFC 9068 §2.2: iss, exp, aud, sub, client_id, iat, jti; for client credentials the
        # subject is the client itself.
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client.name,
            "aud": self.audience,
            "client_id": client.name,
            "scope": scope,
            "iat": iat,
            "exp": iat + expires_in,
            "jti": jti,
        }
        if cert_der is not None:
            claims["cnf"] = {"x5t#S256": x5t_s256(cert_der)}
        # RFC 9068 §2.1: access tokens "MUST include this media type in the typ header ... at+jwt".
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": "at+jwt", "kid": self.kid})
        return TokenResponse(access_token=token, expires_in=expires_in, scope=scope, jti=jti)


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int

    @staticmethod
    def of(path: Path) -> _FileStamp | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


def _load_signing(
    paths: PkiPaths, *, issuer: str, audience: str, ttl: timedelta
) -> tuple[TokenService, dict[str, Any]]:
    """The active signing key as a TokenService, and the JWK Set to publish, checked to fit together."""
    try:
        key = serialization.load_pem_private_key(paths.signing_key.read_bytes(), password=None)
        jwks = json.loads(paths.jwks.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IssuerError(f"{exc.filename}: not found (run `aigis certs init`)") from None
    except (ValueError, TypeError, OSError) as exc:
        raise IssuerError(f"token-signing key or JWKS unreadable: {type(exc).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssuerError(f"{paths.signing_key}: not an EC private key")
    try:
        # The same checks the server applies; above all, never publish private key material.
        published = parse_jwks(jwks, str(paths.jwks)).keys
    except KeySetError as exc:
        raise IssuerError(str(exc)) from None
    kid = public_jwk(key.public_key())["kid"]
    if kid not in published:
        # Tokens signed with a key the server cannot find would all be refused: fail now instead.
        raise IssuerError(f"{paths.jwks} does not contain the signing key (kid {kid})")
    return TokenService(signing_key=key, kid=kid, issuer=issuer, audience=audience, ttl=ttl), jwks


class SigningKeys:
    """The active signing key (as a TokenService) and the JWK Set to publish, re-read when
    `aigis keys rotate` changes either file.

    Each token or JWKS request compares the two files' stamps (two stat calls). A changed pair that
    does not fit together (unreadable, or the key not published) is refused with an error log and
    the last good pair stays in service until a file changes again. `aigis keys rotate` writes in an
    order that never shows such a pair. Thread-safe: handler threads share one instance.
    """

    def __init__(self, paths: PkiPaths, *, issuer: str, audience: str, ttl: timedelta) -> None:
        self._paths = paths
        self._issuer, self._audience, self._ttl = issuer, audience, ttl
        self._lock = threading.Lock()
        stamps = self._stamps_now()
        self._current = _load_signing(paths, issuer=issuer, audience=audience, ttl=ttl)  # IssuerError at start-up
        self._stamps: tuple[_FileStamp | None, ...] = stamps
        self._refused: tuple[_FileStamp | None, ...] | None = None
        self.refused_reloads = 0

    def _stamps_now(self) -> tuple[_FileStamp | None, ...]:
        return (_FileStamp.of(self._paths.signing_key), _FileStamp.of(self._paths.jwks))

    def current(self) -> tuple[TokenService, dict[str, Any]]:
        """The TokenService to mint with and the JWK Set to serve, re-read if either file changed."""
        stamps = self._stamps_now()
        with self._lock:
            if stamps != self._stamps and stamps != self._refused:
                try:
                    self._current = _load_signing(
                        self._paths, issuer=self._issuer, audience=self._audience, ttl=self._ttl
                    )
                except IssuerError as exc:
                    self._refused = stamps
                    self.refused_reloads += 1
                    log.error(
                        "refusing the changed signing key or JWKS, still signing with kid %s: %s",
                        self._current[0].kid,
                        exc,
                    )
                else:
                    self._stamps = stamps
                    log.info(
                        "token-signing key %s active; JWKS publishes %d key(s)",
                        self._current[0].kid,
                        len(self._current[1]["keys"]),
                    )
            return self._current


# ----------------------------------------------------------------------------- authentication


@dataclass(frozen=True)
class IssuerEvents:
    """What the issuer reports to the server's metrics (auth never imports the server)."""

    reload_refused: Callable[[Path], None] = lambda _path: None  # a changed file refused, last good kept
    auth_throttled: Callable[[str], None] = lambda _key: None  # "client_id" | "peer"
    auth_failed: Callable[[], None] = lambda: None  # one failed client authentication
    secret_checks_shed: Callable[[], None] = lambda: None  # refused because the scrypt queue was full
    connection_refused: Callable[[str], None] = lambda _why: None  # "total" | "per_peer"


class SecretChecks:
    """scrypt verifications (~16 MiB, tens of ms each) in `workers` threads, `max_waiting` queued.

    Memory is bounded to ~workers x 16 MiB whatever the request rate; beyond the queue a request is
    refused at once (503) instead of waiting. Used from the issuer's event loop only.
    """

    def __init__(self, workers: int = 2, max_waiting: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aigis-scrypt")
        self._capacity = workers + max_waiting
        self.in_flight = 0

    async def verify(self, secret: str, stored: SecretHash | None) -> bool:
        """verify_secret off the loop; `stored` None burns the same work and answers False."""
        if self.in_flight >= self._capacity:
            raise OAuthError(
                ErrorCode.TEMPORARILY_UNAVAILABLE,
                "too many client authentications in progress; retry later",
                HTTPStatus.SERVICE_UNAVAILABLE,
                log_reason="secret-check queue full",
            )
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            if stored is None:
                await loop.run_in_executor(self._pool, burn_secret_check, secret)
                return False
            return await loop.run_in_executor(self._pool, verify_secret, secret, stored)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class _Trust:
    """What authentication reads, loaded together: registry, revocations, certificate policy."""

    registry: ClientRegistry
    revocations: RevocationList
    policy: ClientCertificatePolicy


class ClientAuthenticator:
    """Authenticates token requests against the registry, CRL and CA bundle, re-reading them when
    they change.

    The certificate policy and the CRL are the gRPC server's own (auth/identity.py): one rule for
    who is a valid client on both sides. A changed CRL or CA bundle that does not load is refused —
    reported once, counted, and the last good one stays (as on the gRPC side). The registry holds
    who may have tokens at all: while it is unreadable every grant fails closed (500).
    """

    def __init__(
        self,
        paths: PkiPaths,
        *,
        trust_domain: str = "",
        events: IssuerEvents = IssuerEvents(),
        secret_checks: SecretChecks | None = None,
        throttle: AuthThrottle | None = None,
        revocations: SharedRevocations | None = None,
    ) -> None:
        self._paths, self._trust_domain, self._events = paths, trust_domain, events
        self._shared = revocations  # the server's CRL reader, when embedded: this one reads no CRL
        self.secret_checks = secret_checks or SecretChecks()
        self.throttle = throttle or AuthThrottle()
        self._lock = threading.Lock()
        self._stamps: tuple[_FileStamp | None, ...] | None = None
        self._registry: ClientRegistry | None = None
        self._revocations: RevocationList | None = None
        self._anchors: tuple[x509.Certificate, ...] | None = None
        self._refused: dict[Path, _FileStamp | None] = {}
        try:
            self._anchors = _load_anchors(paths.ca_cert)
            self._revocations = revocations.current if revocations else RevocationList.load(paths.crl, paths.ca_cert)
        except (OSError, ValueError) as exc:
            raise IssuerError(f"cannot load the CA bundle or CRL from {paths.root}: {exc}") from None

    def _keep_last_good(self, path: Path, stamp: _FileStamp | None, exc: Exception) -> None:
        if self._refused.get(path, _NOT_REFUSED) != stamp:
            self._refused[path] = stamp
            log.error("refusing the changed %s, keeping the last good one: %s", path, exc)
            self._events.reload_refused(path)

    def snapshot(self) -> _Trust:
        """Registry, revocations and policy as of now, each re-read if its file changed."""
        paths = self._paths
        stamps = (_FileStamp.of(paths.clients_registry), _FileStamp.of(paths.crl), _FileStamp.of(paths.ca_cert))
        with self._lock:
            old = self._stamps or (None, None, None)
            if self._stamps is None or stamps[2] != old[2]:
                try:
                    self._anchors = _load_anchors(paths.ca_cert)
                    self._refused.pop(paths.ca_cert, None)
                except (OSError, ValueError) as exc:
                    self._keep_last_good(paths.ca_cert, stamps[2], exc)
            if self._shared is not None:
                self._revocations = self._shared.current
            elif self._stamps is not None and (stamps[1] != old[1] or stamps[2] != old[2]):
                try:
                    self._revocations = RevocationList.load(paths.crl, paths.ca_cert)
                    self._refused.pop(paths.crl, None)
                except (OSError, ValueError) as exc:
                    self._keep_last_good(paths.crl, stamps[1], exc)
            if self._registry is None or stamps[0] != old[0]:
                try:
                    self._registry = load_registry(paths.clients_registry)
                except RegistryError as exc:
                    # Fail closed: without the registry we cannot tell who may have tokens.
                    # Nothing is cached, so the next request tries again.
                    self._registry, self._stamps = None, None
                    raise OAuthError(
                        ErrorCode.SERVER_ERROR,
                        "the authorization server is misconfigured",
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        log_reason=f"cannot load the client registry: {exc}",
                    ) from None
                log.info("loaded %d clients", len(self._registry.clients))
            self._stamps = stamps
            assert self._anchors is not None and self._revocations is not None
            trust_domain = self._trust_domain or self._registry.trust_domain
            return _Trust(self._registry, self._revocations, ClientCertificatePolicy(self._anchors, trust_domain))

    async def authenticate(
        self,
        *,
        cert_der: bytes | None,
        authorization: str | None,
        form: Mapping[str, str],
        now: datetime,
    ) -> Authenticated:
        """Exactly one method: the TLS client certificate or HTTP Basic. Raises OAuthError."""
        trust = self.snapshot()
        if "client_secret" in form or "client_assertion" in form:
            raise _client_failure("unsupported client authentication method (client_secret_post / assertion)")
        # RFC 6749 §2.3: "The client MUST NOT use more than one authentication method in each request."
        if cert_der is not None and authorization is not None:
            raise _client_failure("both a client certificate and an Authorization header")
        if cert_der is not None:
            return self._by_certificate(trust, cert_der, form.get("client_id"), now)
        if authorization is not None:
            return await self._by_secret(trust, authorization, form.get("client_id"))
        raise _client_failure("no client authentication")

    def _by_certificate(self, trust: _Trust, cert_der: bytes, client_id: str | None, now: datetime) -> Authenticated:
        # TLS already checked the chain; the policy is the gRPC server's own (clientAuth EKU, not a
        # CA, one SPIFFE ID in our trust domain), so both ends agree on who is a valid client.
        try:
            identity = trust.policy.check(x509.load_der_x509_certificate(cert_der), [], now)
        except ValueError as exc:
            raise _client_failure(f"unparseable client certificate: {exc}") from None
        except IdentityError as exc:
            raise _client_failure(f"certificate fails the client policy: {exc.detail}") from None
        client = trust.registry.by_spiffe_id(identity.principal)
        if client is None:
            raise _client_failure(f"no client registered for {identity.principal!r}")
        # RFC 8705 §2: the certificate must match the client named by client_id.
        if client_id is not None and client_id != client.name:
            raise _client_failure(f"client_id {client_id!r} does not match the certificate", client.name)
        if trust.revocations.is_revoked(identity):
            raise _client_failure(f"certificate serial {identity.serial:x} is revoked", client.name)
        if client.revoked:
            raise _client_failure("client is revoked", client.name)
        if client.serial != identity.serial:
            raise _client_failure(f"certificate {identity.serial:x} is not the client's current one", client.name)
        return Authenticated(client, "tls_client_auth", cert_der)

    async def _by_secret(self, trust: _Trust, authorization: str, client_id_param: str | None) -> Authenticated:
        client_id, secret = _parse_basic(authorization)
        if client_id_param is not None and client_id_param != client_id:
            raise _client_failure("client_id parameter does not match the Basic credentials")
        if self.throttle.throttled(client_id=client_id, peer=None) is ThrottleKey.CLIENT_ID:
            raise _throttled(ThrottleKey.CLIENT_ID, client_id)
        client = trust.registry.by_name(client_id)
        if client is None or client.secret is None:
            # Same cost as a real check: names are not enumerable by timing.
            await self.secret_checks.verify(secret, None)
            raise _client_failure("unknown client or client without a secret", client_id)
        if not await self.secret_checks.verify(secret, client.secret):
            raise _client_failure("wrong secret", client.name)
        if client.revoked or (client.serial is not None and trust.revocations.is_serial_revoked(client.serial)):
            raise _client_failure("client is revoked", client.name)
        return Authenticated(client, "client_secret_basic")


_NOT_REFUSED = _FileStamp(-1, -1, -1)


def _load_anchors(path: Path) -> tuple[x509.Certificate, ...]:
    """Every CA in the bundle: during a CA rotation it holds the old and the new CA."""
    return tuple(x509.load_pem_x509_certificates(path.read_bytes()))


def _throttled(key: ThrottleKey, client: str | None) -> OAuthError:
    return OAuthError(
        ErrorCode.INVALID_CLIENT,
        "too many failed client authentications; retry later",
        HTTPStatus.TOO_MANY_REQUESTS,
        log_reason=f"throttled by {key}",
        client=client,
        throttled=key,
    )


def _parse_basic(authorization: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: Basic base64(urlencode(client_id) ":" urlencode(secret))."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise _client_failure(f"unsupported Authorization scheme {scheme[:20]!r}")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        raw_id, sep, raw_secret = decoded.partition(":")
        client_id = unquote_plus(raw_id, errors="strict")
        secret = unquote_plus(raw_secret, errors="strict")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _client_failure("malformed Basic credentials") from None
    if not sep or not client_id or not secret:
        raise _client_failure("malformed Basic credentials")
    return client_id, secret


# --------------------------------------------------------------------------------- HTTP layer


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(ErrorCode.INVALID_REQUEST, "request body is not a valid form") from None
    repeated = sorted(k for k, v in fields.items() if len(v) != 1)
    if repeated:
        # RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once."
        raise OAuthError(ErrorCode.INVALID_REQUEST, f"parameter repeated: {repeated[0]}")
    return {k: v[0] for k, v in fields.items()}


class _Issuer:
    """Everything a request needs, shared by the requests on the issuer's loop."""

    def __init__(
        self,
        keys: SigningKeys,
        authenticator: ClientAuthenticator,
        clock: Callable[[], datetime],
        events: IssuerEvents,
    ) -> None:
        self.keys = keys
        self.authenticator = authenticator
        self.clock = clock
        self.events = events

    @property
    def tokens(self) -> TokenService:
        """The TokenService of the active signing key."""
        return self.keys.current()[0]

    @property
    def jwks(self) -> dict[str, Any]:
        """Every published key: the active one and retired ones whose tokens may still be live."""
        return self.keys.current()[1]

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 §2 authorization server metadata."""
        registry = self.authenticator.snapshot().registry
        issuer = self.tokens.issuer
        return {
            "issuer": issuer,
            "token_endpoint": issuer + TOKEN_PATH,
            "jwks_uri": issuer + JWKS_PATH,
            "grant_types_supported": ["client_credentials"],
            # RFC 8414 §2 makes this REQUIRED and validators (authlib) refuse it empty or absent,
            # though no grant here uses an authorization endpoint. "none" (registered by OAuth 2.0
            # Multiple Response Type Encoding Practices) is the one value that promises nothing.
            "response_types_supported": ["none"],
            "token_endpoint_auth_methods_supported": ["tls_client_auth", "client_secret_basic"],
            "scopes_supported": list(registry.all_scopes()),
            "tls_client_certificate_bound_access_tokens": True,
        }

    async def token(
        self,
        *,
        content_type: str | None,
        body: bytes,
        authorization: str | None,
        cert_der: bytes | None,
    ) -> tuple[TokenResponse, Authenticated]:
        """One token request, in RFC order: request syntax, grant type, client, scope."""
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if media_type != FORM_CONTENT_TYPE:
            raise OAuthError(ErrorCode.INVALID_REQUEST, f"content type must be {FORM_CONTENT_TYPE}")
        form = _parse_form(body)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError(ErrorCode.INVALID_REQUEST, "grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError(ErrorCode.UNSUPPORTED_GRANT_TYPE, "only client_credentials is supported")
        now = self.clock()
        who = await self.authenticator.authenticate(cert_der=cert_der, authorization=authorization, form=form, now=now)
        response = self.tokens.issue(who.client, form.get("scope"), now=now, cert_der=who.cert_der)
        return response, who

    # ------------------------------------------------------------------------------ requests

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's request handler: route, answer, and never let an exception reach aiohttp."""
        slot = peer_slot(request)
        try:
            if request.method == "POST" and request.raw_path == TOKEN_PATH:
                return await self._token_endpoint(request, slot.peer)
            if request.method in ("GET", "HEAD"):
                if request.raw_path == JWKS_PATH:
                    return _json(HTTPStatus.OK, self.jwks, cache="public, max-age=60")
                if request.raw_path == METADATA_PATH:
                    return _json(HTTPStatus.OK, self.metadata(), cache="public, max-age=60")
            if request.raw_path == TOKEN_PATH:
                return _json(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"error": str(ErrorCode.INVALID_REQUEST), "error_description": "use POST"},
                    extra={"Allow": "POST"},
                )
            return _json(HTTPStatus.NOT_FOUND, {"error": "not_found"})
        except OAuthError as exc:
            log.error("issuer request refused: %s", exc.log_reason)
            return _json(exc.http_status, exc.body())
        except Exception:
            # Fail closed, and never send internals to the client.
            log.exception("issuer request failed unexpectedly")
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(ErrorCode.SERVER_ERROR)})

    async def _token_endpoint(self, request: web.BaseRequest, peer: str) -> web.StreamResponse:
        cert_der = _peer_certificate(request)
        throttle = self.authenticator.throttle
        try:
            if throttle.throttled(client_id=None, peer=peer) is not None:
                raise _throttled(ThrottleKey.PEER, None)
            try:
                body = await read_body(
                    request, max_bytes=MAX_BODY_BYTES, seconds=self.body_seconds, stats=self.connection_stats
                )
            except BodyError as exc:
                raise OAuthError(ErrorCode.INVALID_REQUEST, exc.description, exc.status) from None
            authorizations = request.headers.getall("Authorization", [])
            if len(authorizations) > 1:
                raise OAuthError(ErrorCode.INVALID_REQUEST, "more than one Authorization header")
            response, who = await self.token(
                content_type=request.headers.get("Content-Type"),
                body=body,
                authorization=authorizations[0] if authorizations else None,
                cert_der=cert_der,
            )
        except OAuthError as exc:
            return self._refuse(exc, peer=peer, cert_der=cert_der)
        log.info(
            "token issued: client=%s method=%s scope=%r jti=%s expires_in=%d",
            who.client.name,
            who.method,
            response.scope,
            response.jti,
            response.expires_in,
        )
        return _json(HTTPStatus.OK, response.to_json())

    body_seconds: float = 5.0
    connection_stats: ConnectionStats = ConnectionStats()

    def _refuse(self, exc: OAuthError, *, peer: str, cert_der: bytes | None) -> web.StreamResponse:
        extra: dict[str, str] = {}
        if exc.throttled is not None:
            # Counted, not logged: the throttle logged once when the budget ran out.
            self.events.auth_throttled(str(exc.throttled))
            extra["Retry-After"] = "5"
        elif exc.error is ErrorCode.TEMPORARILY_UNAVAILABLE:
            self.events.secret_checks_shed()
            extra["Retry-After"] = "1"
        else:
            if exc.error is ErrorCode.INVALID_CLIENT:
                self.events.auth_failed()
                self.authenticator.throttle.failed(client_id=exc.client, peer=peer)
            level = logging.ERROR if exc.error is ErrorCode.SERVER_ERROR else logging.WARNING
            log.log(
                level,
                "token refused: client=%r error=%s reason=%s peer=%s cert=%s",
                exc.client,
                exc.error,
                exc.log_reason,
                peer,
                "yes" if cert_der is not None else "no",
            )
        if exc.http_status == HTTPStatus.UNAUTHORIZED:
            # RFC 6749 §5.2: a 401 "MUST include the WWW-Authenticate response header field".
            extra["WWW-Authenticate"] = f'Basic realm="{AUTH_REALM}"'
        return _json(exc.http_status, exc.body(), extra=extra)


def _peer_certificate(request: web.BaseRequest) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def _json(
    status: int,
    payload: Mapping[str, Any],
    *,
    cache: str = "no-store",
    extra: Mapping[str, str] | None = None,
) -> web.Response:
    # RFC 6749 §5.1: responses carrying tokens (and §5.2 errors) are not to be cached.
    headers = {"Cache-Control": cache, "Server": SERVER_NAME}
    if cache == "no-store":
        headers["Pragma"] = "no-cache"
    headers |= dict(extra or {})
    response = web.Response(
        status=int(status), body=json.dumps(payload).encode("utf-8"), content_type="application/json", headers=headers
    )
    response.force_close()  # one request per connection: no idle keep-alive sockets to hold
    return response


def server_ssl_context(paths: PkiPaths) -> ssl.SSLContext:
    """TLS >= 1.2 with the server certificate; client certificates requested, verified, optional."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    missing = [p for p in (paths.server_cert, paths.server_key, paths.ca_cert) if not p.is_file()]
    if missing:
        raise IssuerError(f"{missing[0]}: not found (run `aigis certs init`)")
    try:
        context.load_cert_chain(paths.server_cert, paths.server_key)
        context.load_verify_locations(cafile=paths.ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise IssuerError(f"cannot load the server certificate, key or CA from {paths.root}: {exc}") from None
    # CERT_OPTIONAL: a presented certificate must verify against our CA, but a client may instead
    # authenticate with a secret. X509_STRICT refuses malformed certificates OpenSSL would tolerate.
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ServerTls:
    """The issuer's TLS context, rebuilt when the server certificate, key or CA bundle change.

    Used by the accept loop only (the issuer's event loop), which looks at the files at most once per
    TLS_CHECK_INTERVAL_S. Changed files are checked like the gRPC server checks them (auth/tls.py);
    files that do not validate are refused with an error log, and the last good context stays.
    """

    def __init__(
        self,
        paths: PkiPaths,
        *,
        clock: Callable[[], datetime] = _utc_now,
        on_refused: Callable[[Path], None] = lambda _path: None,
    ) -> None:
        self._paths, self._clock, self._on_refused = paths, clock, on_refused
        self._stamps = self._stamps_now()
        self._context = server_ssl_context(paths)  # IssuerError at start-up
        self._checked_at = time.monotonic()
        self._refused: tuple[_FileStamp | None, ...] | None = None
        self.refused_reloads = 0

    def _stamps_now(self) -> tuple[_FileStamp | None, ...]:
        return tuple(_FileStamp.of(p) for p in (self._paths.server_cert, self._paths.server_key, self._paths.ca_cert))

    def context(self) -> ssl.SSLContext:
        """The context for a connection accepted now."""
        checked = time.monotonic()
        if checked - self._checked_at < TLS_CHECK_INTERVAL_S:
            return self._context
        self._checked_at = checked
        stamps = self._stamps_now()
        if stamps in (self._stamps, self._refused):
            return self._context
        try:
            load_tls_material(self._paths, now=self._clock())
            context = server_ssl_context(self._paths)
        except (TlsError, IssuerError) as exc:
            self._refused = stamps
            self.refused_reloads += 1
            self._on_refused(self._paths.server_cert)
            log.error("refusing the changed server certificate, key or CA bundle, keeping the last good: %s", exc)
            return self._context
        self._context, self._stamps = context, stamps
        log.info("issuer TLS reloaded from %s", self._paths.root)
        return context


class IssuerServer:
    """The token endpoint, JWKS and metadata over HTTPS, on an event loop of its own (a thread).

    A small library API: construct, `start()`, `stop()` (or use it as a context manager). Whoever
    runs it — beside the gRPC server or alone — passes `events` to see its metrics.
    """

    def __init__(
        self,
        config: IssuerConfig,
        *,
        clock: Callable[[], datetime] = _utc_now,
        events: IssuerEvents = IssuerEvents(),
        revocations: SharedRevocations | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._events = events
        self._revocations = revocations  # None: the issuer reads crl.pem itself
        self._http: BoundedHttpServer | None = None
        self._issuer: _Issuer | None = None
        self._tls: ServerTls | None = None
        self._url = ""

    def start(self) -> None:
        """Load keys, registry and CRL, bind, and serve. Raises IssuerError on bad setup."""
        if self._http is not None:
            raise IssuerError("issuer already started")
        config, paths = self.config, self.config.paths
        tls = ServerTls(paths, on_refused=self._events.reload_refused)
        authenticator = ClientAuthenticator(
            paths,
            trust_domain=config.trust_domain,
            events=self._events,
            secret_checks=SecretChecks(config.secret_check_workers, config.secret_check_queue),
            throttle=AuthThrottle(config.throttle),
            revocations=self._revocations,
        )
        try:
            authenticator.snapshot()  # fail at start-up, not on the first request
        except OAuthError as exc:
            authenticator.secret_checks.close()
            raise IssuerError(exc.log_reason) from None
        try:
            http = BoundedHttpServer(
                self._handle,
                tls.context,
                host=config.host,
                port=config.port,
                limits=config.http,
                on_refused=self._events.connection_refused,
            )
        except OSError as exc:
            authenticator.secret_checks.close()
            raise IssuerError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
        try:
            host_url = https_base_url(config.host, http.port)
            issuer_url = config.issuer_url or host_url
            keys = SigningKeys(paths, issuer=issuer_url, audience=config.audience, ttl=config.token_ttl)
            issuer = _Issuer(keys, authenticator, self._clock, self._events)
            issuer.body_seconds = http.limits.body_seconds
            issuer.connection_stats = http.stats
            self._issuer, self._tls, self._url = issuer, tls, host_url
            http.start()
        except BaseException:
            http.stop()
            authenticator.secret_checks.close()
            self._issuer = None
            raise
        self._http = http
        log.info("issuer listening on %s (iss %s)", host_url, issuer_url)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._issuer is not None
        return await self._issuer.handle(request)

    def stop(self) -> None:
        """Stop accepting, close every connection and wait (bounded) for the serving thread."""
        http, issuer = self._http, self._issuer
        self._http = None
        if http is None:
            return
        http.stop()
        if issuer is not None:
            issuer.authenticator.secret_checks.close()

    @property
    def port(self) -> int:
        return self._require().port

    @property
    def url(self) -> str:
        """Base URL of this server as bound, e.g. https://127.0.0.1:8443."""
        self._require()
        return self._url

    @property
    def issuer_url(self) -> str:
        """The `iss` claim of the tokens it mints (config.issuer_url, else `url`)."""
        self._require()
        assert self._issuer is not None
        return self._issuer.tokens.issuer

    @property
    def signing_keys(self) -> SigningKeys:
        """The active signing key and the published JWKS, with the count of refused reloads."""
        self._require()
        assert self._issuer is not None
        return self._issuer.keys

    @property
    def tls(self) -> ServerTls:
        """The issuer's TLS context, with the count of refused reloads."""
        self._require()
        assert self._tls is not None
        return self._tls

    @property
    def connections(self) -> ConnectionStats:
        """Open, refused and timed-out connection counts."""
        return self._require().stats

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    def _require(self) -> BoundedHttpServer:
        if self._http is None:
            raise IssuerError("issuer is not running")
        return self._http

    def __enter__(self) -> IssuerServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
