"""The OAuth2 authorization server: client-credentials grant (RFC 6749 §4.4) over HTTPS.

Clients authenticate with their certificate (RFC 8705 `tls_client_auth`) or a secret
(`client_secret_basic`, RFC 6749 §2.3.1) and receive a short-lived ES256 JWT access token in the
RFC 9068 profile, bound to the certificate when one was used (RFC 8705 §3.1 `cnf`). The server
verifies those tokens with the public keys this issuer publishes (jwks.json).

It runs in a daemon thread beside the gRPC server, on the stdlib ThreadingHTTPServer. The TLS
handshake happens in the per-connection thread, so one slow client cannot stall accept().
The client registry, CRL, CA bundle, signing key and JWKS are re-read when they change on disk,
so `aigis certs issue/revoke` and `aigis keys rotate` take effect without a restart; so does a
replaced server certificate, for connections accepted afterwards.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import ipaddress
import json
import logging
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from aigis.auth.certs import PkiError, load_crl_serials, public_jwk
from aigis.auth.clients import (
    SCOPE_TOKEN_RE,
    ClientRegistry,
    RegisteredClient,
    RegistryError,
    burn_secret_check,
    load_registry,
    verify_secret,
)
from aigis.auth.pki import PkiPaths
from aigis.auth.tls import TlsError, load_tls_material
from aigis.auth.tokens import KeySetError, parse_jwks

log = logging.getLogger("aigis.issuer")

TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a URL path, not a password
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_BODY_BYTES = 8 * 1024
MAX_FORM_FIELDS = 16
MAX_DRAIN_BYTES = 64 * 1024  # an oversized body up to this size is read and discarded before the 413
MAX_TOKEN_TTL = timedelta(hours=24)
# Per-socket-operation timeout: bounds the handshake and a slow sender (slowloris).
SOCKET_TIMEOUT_S = 10.0
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
    ) -> None:
        super().__init__(f"{error}: {log_reason or description}")
        self.error = error
        self.description = description
        self.http_status = int(http_status)
        self.log_reason = log_reason or description
        self.client = client

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
    token_ttl: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if not self.audience:
            raise ValueError("audience: must not be empty")
        if not timedelta(seconds=1) <= self.token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl: must be between 1 s and {MAX_TOKEN_TTL}")
        if self.issuer_url is not None:
            _validate_issuer_url(self.issuer_url)


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
                    log.error("refusing the changed signing key or JWKS, still signing with kid %s: %s",
                              self._current[0].kid, exc)
                else:
                    self._stamps = stamps
                    log.info("token-signing key %s active; JWKS publishes %d key(s)",
                             self._current[0].kid, len(self._current[1]["keys"]))
            return self._current


# ----------------------------------------------------------------------------- authentication


def _load_ca_store(path: Path) -> verification.Store:
    """Every CA in the bundle: during a CA rotation it holds the old and the new CA."""
    try:
        return verification.Store(x509.load_pem_x509_certificates(path.read_bytes()))
    except FileNotFoundError:
        raise PkiError(f"{path}: not found (run `aigis certs init`)") from None
    except (ValueError, OSError) as exc:
        raise PkiError(f"{path}: unreadable: {exc}") from None


class ClientAuthenticator:
    """Authenticates token requests against the registry, CRL and CA bundle, re-reading them when
    they change.

    Thread-safe: handler threads share one instance.
    """

    def __init__(self, paths: PkiPaths) -> None:
        self._paths = paths
        try:
            self._store = _load_ca_store(paths.ca_cert)
        except PkiError as exc:
            raise IssuerError(str(exc)) from None
        self._lock = threading.Lock()
        self._stamps: tuple[_FileStamp | None, ...] | None = None
        self._state: tuple[ClientRegistry, frozenset[int]] | None = None

    def snapshot(self) -> tuple[ClientRegistry, frozenset[int]]:
        """The current registry and revoked serials; re-read (with the CA bundle) when a file changed."""
        paths = self._paths
        stamps = (_FileStamp.of(paths.clients_registry), _FileStamp.of(paths.crl), _FileStamp.of(paths.ca_cert))
        with self._lock:
            if self._state is None or stamps != self._stamps:
                try:
                    ca_changed = self._stamps is None or stamps[2] != self._stamps[2]
                    store = _load_ca_store(paths.ca_cert) if ca_changed else None
                    state = (load_registry(paths.clients_registry), load_crl_serials(paths))
                except (RegistryError, PkiError) as exc:
                    # Fail closed: without a readable registry and CRL we cannot tell who is revoked.
                    # Nothing is cached, so the next request tries again.
                    self._state = None
                    raise OAuthError(
                        ErrorCode.SERVER_ERROR,
                        "the authorization server is misconfigured",
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        log_reason=f"cannot load client registry, CRL or CA bundle: {exc}",
                    ) from None
                if store is not None:
                    self._store = store
                self._state, self._stamps = state, stamps
                log.info("loaded %d clients and %d revoked serials", len(state[0].clients), len(state[1]))
            return self._state

    def authenticate(
        self,
        *,
        cert_der: bytes | None,
        authorization: str | None,
        form: Mapping[str, str],
        now: datetime,
    ) -> Authenticated:
        """Exactly one method: the TLS client certificate or HTTP Basic. Raises OAuthError."""
        registry, revoked = self.snapshot()
        if "client_secret" in form or "client_assertion" in form:
            raise _client_failure("unsupported client authentication method (client_secret_post / assertion)")
        # RFC 6749 §2.3: "The client MUST NOT use more than one authentication method in each request."
        if cert_der is not None and authorization is not None:
            raise _client_failure("both a client certificate and an Authorization header")
        if cert_der is not None:
            return self._by_certificate(registry, revoked, cert_der, form.get("client_id"), now)
        if authorization is not None:
            return self._by_secret(registry, revoked, authorization, form.get("client_id"))
        raise _client_failure("no client authentication")

    def _by_certificate(
        self,
        registry: ClientRegistry,
        revoked: frozenset[int],
        cert_der: bytes,
        client_id: str | None,
        now: datetime,
    ) -> Authenticated:
        # TLS already checked the chain; the client verifier adds the same leaf policy the gRPC
        # server applies (clientAuth EKU, not a CA, SAN present), so both ends agree on who is valid.
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            verifier = verification.PolicyBuilder().store(self._store).time(now).build_client_verifier()
            verifier.verify(cert, [])
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, verification.VerificationError, x509.ExtensionNotFound) as exc:
            raise _client_failure(f"certificate fails the client policy: {exc}") from None
        spiffe_ids = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
        if len(spiffe_ids) != 1:
            raise _client_failure(f"certificate has {len(spiffe_ids)} SPIFFE IDs, expected exactly one")
        client = registry.by_spiffe_id(spiffe_ids[0])
        if client is None:
            raise _client_failure(f"no client registered for {spiffe_ids[0]!r}")
        # RFC 8705 §2: the certificate must match the client named by client_id.
        if client_id is not None and client_id != client.name:
            raise _client_failure(f"client_id {client_id!r} does not match the certificate", client.name)
        if cert.serial_number in revoked:
            raise _client_failure(f"certificate serial {cert.serial_number:x} is revoked", client.name)
        if client.revoked:
            raise _client_failure("client is revoked", client.name)
        if client.serial != cert.serial_number:
            raise _client_failure(f"certificate {cert.serial_number:x} is not the client's current one", client.name)
        return Authenticated(client, "tls_client_auth", cert_der)

    def _by_secret(
        self,
        registry: ClientRegistry,
        revoked: frozenset[int],
        authorization: str,
        client_id_param: str | None,
    ) -> Authenticated:
        client_id, secret = _parse_basic(authorization)
        if client_id_param is not None and client_id_param != client_id:
            raise _client_failure("client_id parameter does not match the Basic credentials")
        client = registry.by_name(client_id)
        if client is None or client.secret is None:
            burn_secret_check(secret)  # same cost as a real check: names are not enumerable by timing
            raise _client_failure("unknown client or client without a secret", client_id)
        if not verify_secret(secret, client.secret):
            raise _client_failure("wrong secret", client.name)
        if client.revoked or (client.serial is not None and client.serial in revoked):
            raise _client_failure("client is revoked", client.name)
        return Authenticated(client, "client_secret_basic")


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
    """Everything a request handler needs, shared by the handler threads."""

    def __init__(
        self,
        keys: SigningKeys,
        authenticator: ClientAuthenticator,
        clock: Callable[[], datetime],
    ) -> None:
        self.keys = keys
        self.authenticator = authenticator
        self.clock = clock

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
        registry, _ = self.authenticator.snapshot()
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

    def token(
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
        who = self.authenticator.authenticate(
            cert_der=cert_der, authorization=authorization, form=form, now=now
        )
        response = self.tokens.issue(who.client, form.get("scope"), now=now, cert_der=who.cert_der)
        return response, who


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "aigis-issuer"
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive sockets to hold
    timeout = SOCKET_TIMEOUT_S

    def setup(self) -> None:
        # The handshake runs here, in this connection's thread, under the socket timeout.
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:
        # Replaces the default stderr access log; request lines never carry credentials here.
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        issuer = self.server.issuer
        if self.path == JWKS_PATH:
            self._send_json(HTTPStatus.OK, issuer.jwks, cache="public, max-age=60")
        elif self.path == METADATA_PATH:
            try:
                self._send_json(HTTPStatus.OK, issuer.metadata(), cache="public, max-age=60")
            except OAuthError as exc:
                log.error("metadata unavailable: %s", exc.log_reason)
                self._send_json(exc.http_status, exc.body())
        elif self.path == TOKEN_PATH:
            self._send_json(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": str(ErrorCode.INVALID_REQUEST), "error_description": "use POST"},
                extra={"Allow": "POST"},
            )
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    def do_POST(self) -> None:
        if self.path != TOKEN_PATH:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not_found"})
            return
        cert_der = self.connection.getpeercert(binary_form=True)
        authorization = self.headers.get("Authorization")
        try:
            body = self._read_body()
            if len(self.headers.get_all("Authorization") or []) > 1:
                raise OAuthError(ErrorCode.INVALID_REQUEST, "more than one Authorization header")
            response, who = self.server.issuer.token(
                content_type=self.headers.get("Content-Type"),
                body=body,
                authorization=authorization,
                cert_der=cert_der,
            )
        except OAuthError as exc:
            self._refuse(exc, cert_der=cert_der)
            return
        except Exception:
            # Fail closed, and never send internals to the client.
            log.exception("token request failed unexpectedly")
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(ErrorCode.SERVER_ERROR)})
            return
        log.info(
            "token issued: client=%s method=%s scope=%r jti=%s expires_in=%d",
            who.client.name,
            who.method,
            response.scope,
            response.jti,
            response.expires_in,
        )
        self._send_json(HTTPStatus.OK, response.to_json())

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise OAuthError(ErrorCode.INVALID_REQUEST, "Transfer-Encoding is not supported")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.isdigit():
            raise OAuthError(ErrorCode.INVALID_REQUEST, "Content-Length is required")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            if length <= MAX_DRAIN_BYTES:
                # Read and drop it: closing with unread input makes TCP send a reset, and the
                # client would lose our answer.
                self.rfile.read(length)
            raise OAuthError(
                ErrorCode.INVALID_REQUEST, "request body too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        body = self.rfile.read(length)
        if len(body) != length:
            raise OAuthError(ErrorCode.INVALID_REQUEST, "request body truncated")
        return body

    def _refuse(self, exc: OAuthError, *, cert_der: bytes | None) -> None:
        level = logging.ERROR if exc.error is ErrorCode.SERVER_ERROR else logging.WARNING
        log.log(
            level,
            "token refused: client=%r error=%s reason=%s peer=%s cert=%s",
            exc.client,
            exc.error,
            exc.log_reason,
            self.client_address[0],
            "yes" if cert_der is not None else "no",
        )
        extra = {}
        if exc.http_status == HTTPStatus.UNAUTHORIZED:
            # RFC 6749 §5.2: a 401 "MUST include the WWW-Authenticate response header field".
            extra["WWW-Authenticate"] = f'Basic realm="{AUTH_REALM}"'
        self._send_json(exc.http_status, exc.body(), extra=extra)

    def _send_json(
        self,
        status: int,
        payload: Mapping[str, Any],
        *,
        cache: str = "no-store",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # RFC 6749 §5.1: responses carrying tokens (and §5.2 errors) are not to be cached.
        self.send_header("Cache-Control", cache)
        if cache == "no-store":
            self.send_header("Pragma", "no-cache")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    issuer: _Issuer  # set by IssuerServer.start once the port (and so the issuer URL) is known

    def __init__(self, address: tuple[str, int], tls: ServerTls) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.tls = tls
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we neither need nor want.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        # Each connection is wrapped with the context current when it is accepted, so a replaced
        # certificate or CA bundle applies to new connections. do_handshake_on_connect=False: the
        # handshake waits for the connection's own thread instead of blocking the accept loop.
        sock, address = self.socket.accept()
        try:
            return self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
        except BaseException:
            sock.close()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes and dropped connections are routine; the default prints a traceback.
        log.debug("connection from %s failed", client_address[0], exc_info=True)


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

    Used by the accept loop only (one thread), which looks at the files at most once per
    TLS_CHECK_INTERVAL_S. Changed files are checked like the gRPC server checks them (auth/tls.py);
    files that do not validate are refused with an error log, and the last good context stays.
    """

    def __init__(self, paths: PkiPaths, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._paths, self._clock = paths, clock
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
            log.error("refusing the changed server certificate, key or CA bundle, keeping the last good: %s", exc)
            return self._context
        self._context, self._stamps = context, stamps
        log.info("issuer TLS reloaded from %s", self._paths.root)
        return context


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard, not binding one
        return "localhost"
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


class IssuerServer:
    """The token endpoint, JWKS and metadata over HTTPS, served from a daemon thread."""

    def __init__(self, config: IssuerConfig, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.config = config
        self._clock = clock
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    def start(self) -> None:
        """Load keys, registry and CRL, bind, and serve in a thread. Raises IssuerError on bad setup."""
        if self._httpd is not None:
            raise IssuerError("issuer already started")
        paths = self.config.paths
        tls = ServerTls(paths)
        authenticator = ClientAuthenticator(paths)
        try:
            authenticator.snapshot()  # fail at start-up, not on the first request
        except OAuthError as exc:
            raise IssuerError(exc.log_reason) from None
        httpd = _HTTPServer((self.config.host, self.config.port), tls)
        try:
            host_url = f"https://{_url_host(self.config.host)}:{httpd.server_port}"
            issuer_url = self.config.issuer_url or host_url
            keys = SigningKeys(paths, issuer=issuer_url, audience=self.config.audience, ttl=self.config.token_ttl)
            httpd.issuer = _Issuer(keys, authenticator, self._clock)
        except BaseException:
            httpd.server_close()
            raise
        self._httpd = httpd
        self._url = host_url
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="aigis-issuer", daemon=True
        )
        self._thread.start()
        log.info("issuer listening on %s (iss %s)", host_url, issuer_url)

    def stop(self) -> None:
        """Stop accepting, close the socket and wait (bounded) for the serving thread."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        return self._require().server_port

    @property
    def url(self) -> str:
        """Base URL of this server as bound, e.g. https://127.0.0.1:8443."""
        self._require()
        return self._url

    @property
    def issuer_url(self) -> str:
        """The `iss` claim of the tokens it mints (config.issuer_url, else `url`)."""
        return self._require().issuer.tokens.issuer

    @property
    def signing_keys(self) -> SigningKeys:
        """The active signing key and the published JWKS, with the count of refused reloads."""
        return self._require().issuer.keys

    @property
    def tls(self) -> ServerTls:
        """The issuer's TLS context, with the count of refused reloads."""
        return self._require().tls

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    def _require(self) -> _HTTPServer:
        if self._httpd is None:
            raise IssuerError("issuer is not running")
        return self._httpd

    def __enter__(self) -> IssuerServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
