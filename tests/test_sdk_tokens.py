"""SDK token providers against a real local HTTPS token endpoint (stdlib http.server + ssl, PKI made
by the certificate tool at test time). The endpoint answers from a script, so every OAuth2 error
and malformed response is exercised without an issuer; the real issuer is covered in test_sdk.py."""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aigis.auth.certs import init_pki
from aigis.auth.pki import PkiPaths
from aigis.client_sdk import ClientCredentials, StaticToken, TokenError, TokenProvider

SCOPES = ("calculator:compute", "classifier:predict")
# A secret with every character that needs form-encoding inside HTTP Basic (RFC 6749 §2.3.1).
AWKWARD_SECRET = "p@ss:wörd/+ %x"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # a dict/list is sent as JSON, bytes as is, None as a fresh token
    headers: tuple[tuple[str, str], ...] = ()
    expires_in: int = 300


@dataclass(frozen=True)
class Seen:
    """One request the endpoint received."""

    path: str
    headers: dict[str, str]
    form: dict[str, list[str]]
    peer_cert: dict[str, Any] | None


@dataclass
class TokenEndpoint:
    """A real HTTPS server on 127.0.0.1:0 that records requests and answers from `script`."""

    url: str
    seen: list[Seen]
    script: list[Reply]
    issued: list[str] = field(default_factory=list)
    default: Reply = Reply()

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth2/token"


def _handler(endpoint_ref: list[TokenEndpoint]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            endpoint = endpoint_ref[0]
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            endpoint.seen.append(Seen(self.path, dict(self.headers.items()), form, peer or None))
            reply = endpoint.script.pop(0) if endpoint.script else endpoint.default
            body = reply.body
            if body is None:
                token = secrets.token_urlsafe(24)
                endpoint.issued.append(token)
                body = {"access_token": token, "token_type": "Bearer", "expires_in": reply.expires_in}
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test asserts on `seen`, not on a log."""

    return Handler


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    paths = PkiPaths(tmp_path_factory.mktemp("sdk-tokens") / "certs")
    init_pki(paths, now=datetime.now(UTC))  # CA, server certificate (localhost), client "demo"
    return paths


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = PkiPaths(tmp_path_factory.mktemp("sdk-tokens-other") / "certs")
    init_pki(paths, now=datetime.now(UTC))
    return paths.ca_cert


@contextmanager
def serve(pki: PkiPaths, cert: Path, key: Path) -> Iterator[TokenEndpoint]:
    """Run the scripted endpoint over TLS with `cert` until the block ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=pki.ca_cert)
    # Optional so the same endpoint serves client_secret_basic (no certificate) and tls_client_auth.
    context.verify_mode = ssl.CERT_OPTIONAL
    ref: list[TokenEndpoint] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ref))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    ref.append(TokenEndpoint(f"https://localhost:{server.server_address[1]}", [], []))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield ref[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def endpoint(pki: PkiPaths) -> Iterator[TokenEndpoint]:
    with serve(pki, pki.server_cert, pki.server_key) as running:
        yield running


def server_cert_for(pki: PkiPaths, dns_name: str, directory: Path) -> tuple[Path, Path]:
    """A server certificate from the same CA for another host name (to test host-name checking)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "other-server.pem", directory / "other-server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_pem)
    return cert_path, key_path


class Clock:
    """A pinned clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def mtls(endpoint: TokenEndpoint, pki: PkiPaths, **kwargs: Any) -> ClientCredentials:
    return ClientCredentials(
        endpoint.token_url,
        ca=pki.ca_cert,
        cert=pki.client_cert("demo"),
        key=pki.client_key("demo"),
        client_id="demo",
        scopes=SCOPES,
        **kwargs,
    )


def basic(endpoint: TokenEndpoint, pki: PkiPaths, **kwargs: Any) -> ClientCredentials:
    return ClientCredentials(
        endpoint.token_url, ca=pki.ca_cert, client_id="secret client", client_secret=AWKWARD_SECRET, **kwargs
    )


def test_mtls_request_is_a_client_credentials_grant_with_certificate(
    endpoint: TokenEndpoint, pki: PkiPaths
) -> None:
    """tls_client_auth posts grant_type, scope and client_id, presents the certificate, sends no secret."""
    token = mtls(endpoint, pki).token()
    (seen,) = endpoint.seen
    assert token == endpoint.issued[0]
    assert seen.path == "/oauth2/token"
    assert seen.form == {
        "grant_type": ["client_credentials"],
        "scope": [" ".join(SCOPES)],
        "client_id": ["demo"],
    }
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in seen.headers
    assert seen.peer_cert is not None
    assert ("URI", "spiffe://aigis.local/client/demo") in seen.peer_cert["subjectAltName"]


def test_client_secret_basic_form_encodes_id_and_secret(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """client_secret_basic sends base64(urlencode(id):urlencode(secret)) and no certificate."""
    basic(endpoint, pki).token()
    (seen,) = endpoint.seen
    scheme, _, credentials = seen.headers["Authorization"].partition(" ")
    encoded_id, _, encoded_secret = base64.b64decode(credentials).decode().partition(":")
    assert scheme == "Basic"
    assert (urllib.parse.unquote_plus(encoded_id), urllib.parse.unquote_plus(encoded_secret)) == (
        "secret client",
        AWKWARD_SECRET,
    )
    assert ":" not in encoded_secret and " " not in encoded_secret
    assert seen.form == {"grant_type": ["client_credentials"]}
    assert seen.peer_cert is None


def test_token_is_cached_across_calls(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """Many token() calls inside the lifetime cost one fetch."""
    provider = mtls(endpoint, pki, clock=Clock())
    tokens = {provider.token() for _ in range(20)}
    assert tokens == {endpoint.issued[0]}
    assert len(endpoint.seen) == 1


def test_concurrent_callers_share_one_fetch(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """Threads asking at once wait for a single fetch instead of each fetching."""
    provider = mtls(endpoint, pki)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def ask() -> None:
        barrier.wait(timeout=10)
        results.append(provider.token())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [endpoint.issued[0]] * 8
    assert len(endpoint.seen) == 1


@pytest.mark.parametrize(
    ("expires_in", "margin", "still_cached_at", "refetched_at"),
    [
        pytest.param(300, 30, 269.9, 270.0, id="refresh-30s-before-expiry"),
        pytest.param(300, 0, 299.9, 300.0, id="zero-margin-refreshes-at-expiry"),
        pytest.param(20, 30, 9.9, 10.0, id="margin-capped-at-half-a-short-lifetime"),
    ],
)
def test_refreshes_within_margin_of_expiry(
    endpoint: TokenEndpoint, pki: PkiPaths, expires_in: int, margin: int, still_cached_at: float, refetched_at: float
) -> None:
    """The cached token is replaced once the pinned clock is within the refresh margin of expires_in."""
    endpoint.default = Reply(expires_in=expires_in)
    clock = Clock(1_000.0)
    provider = mtls(endpoint, pki, clock=clock, refresh_margin=timedelta(seconds=margin))
    first = provider.token()
    clock.now = 1_000.0 + still_cached_at
    assert provider.token() == first
    assert len(endpoint.seen) == 1
    clock.now = 1_000.0 + refetched_at
    second = provider.token()
    assert second != first
    assert second == endpoint.issued[1]
    assert len(endpoint.seen) == 2


def test_invalidate_drops_only_the_current_token(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """invalidate(old) after a refresh keeps the fresh token; invalidate(current) forces a fetch."""
    provider = mtls(endpoint, pki, clock=Clock())
    first = provider.token()
    provider.invalidate("not-the-current-token")
    assert provider.token() == first
    provider.invalidate(first)
    second = provider.token()
    assert second != first
    provider.invalidate(first)  # a late report about the old token
    assert provider.token() == second
    assert len(endpoint.seen) == 2


@pytest.mark.parametrize(
    ("reply", "error", "http_status"),
    [
        pytest.param(
            Reply(401, {"error": "invalid_client", "error_description": "client authentication failed"}),
            "invalid_client",
            401,
            id="invalid-client",
        ),
        pytest.param(Reply(400, {"error": "invalid_scope"}), "invalid_scope", 400, id="invalid-scope"),
        pytest.param(Reply(400, {"error": "unauthorized_client"}), "unauthorized_client", 400, id="unauthorized"),
        pytest.param(Reply(500, b"<html>oops</html>"), None, 500, id="server-error-not-json"),
        pytest.param(Reply(400, {"error": "bad\r\nX-Injected: 1"}), None, 400, id="error-code-not-a-token"),
        pytest.param(Reply(400, [1, 2]), None, 400, id="error-body-not-an-object"),
        pytest.param(Reply(200, b"not json"), "invalid_response", 200, id="ok-not-json"),
        pytest.param(Reply(200, ["token"]), "invalid_response", 200, id="ok-json-array"),
        pytest.param(
            Reply(200, {"token_type": "Bearer", "expires_in": 60}), "invalid_response", 200, id="no-access-token"
        ),
        pytest.param(
            Reply(200, {"access_token": "", "token_type": "Bearer", "expires_in": 60}),
            "invalid_response",
            200,
            id="empty-access-token",
        ),
        pytest.param(
            Reply(200, {"access_token": "abc\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": 60}),
            "invalid_response",
            200,
            id="header-injection-in-token",
        ),
        pytest.param(
            Reply(200, {"access_token": 12345, "token_type": "Bearer", "expires_in": 60}),
            "invalid_response",
            200,
            id="token-not-a-string",
        ),
        pytest.param(
            Reply(200, {"access_token": "abc", "token_type": "mac", "expires_in": 60}),
            "invalid_response",
            200,
            id="not-bearer",
        ),
        pytest.param(
            Reply(200, {"access_token": "abc", "token_type": "Bearer"}), "invalid_response", 200, id="no-expires-in"
        ),
        pytest.param(
            Reply(200, {"access_token": "abc", "token_type": "Bearer", "expires_in": -5}),
            "invalid_response",
            200,
            id="negative-expires-in",
        ),
        pytest.param(
            Reply(200, {"access_token": "abc", "token_type": "Bearer", "expires_in": "60"}),
            "invalid_response",
            200,
            id="string-expires-in",
        ),
        pytest.param(
            Reply(200, {"access_token": "abc", "token_type": "Bearer", "expires_in": True}),
            "invalid_response",
            200,
            id="bool-expires-in",
        ),
        pytest.param(
            Reply(200, {"access_token": "a" * 70_000, "token_type": "Bearer", "expires_in": 60}),
            "invalid_response",
            200,
            id="oversized-response",
        ),
    ],
)
def test_bad_token_responses_raise_token_error(
    endpoint: TokenEndpoint, pki: PkiPaths, reply: Reply, error: str | None, http_status: int
) -> None:
    """An OAuth2 error or an unusable response is a TokenError with the RFC 6749 code, never a token."""
    endpoint.script.append(reply)
    provider = basic(endpoint, pki)
    with pytest.raises(TokenError) as caught:
        provider.token()
    assert caught.value.error == error
    assert caught.value.http_status == (http_status if http_status != 200 else None)
    assert caught.value.code is None
    assert AWKWARD_SECRET not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_token_type_is_case_insensitive(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """RFC 6749 §7.1: token_type "bearer" is accepted like "Bearer"."""
    endpoint.script.append(Reply(body={"access_token": "abc.def", "token_type": "bearer", "expires_in": 60}))
    assert basic(endpoint, pki).token() == "abc.def"


def test_redirect_is_not_followed(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """A redirect is a TokenError, and the client secret is never resent to the redirect target."""
    endpoint.script.append(Reply(307, b"", headers=(("Location", f"{endpoint.url}/elsewhere"),)))
    with pytest.raises(TokenError) as caught:
        basic(endpoint, pki).token()
    assert caught.value.http_status == 307
    assert [seen.path for seen in endpoint.seen] == ["/oauth2/token"]


def test_untrusted_token_endpoint_is_refused(endpoint: TokenEndpoint, pki: PkiPaths, other_ca: Path) -> None:
    """A token endpoint whose certificate the pinned CA did not sign gets no request (and no secret)."""
    provider = ClientCredentials(endpoint.token_url, ca=other_ca, client_id="x", client_secret=AWKWARD_SECRET)
    with pytest.raises(TokenError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        provider.token()
    assert caught.value.error is None
    assert endpoint.seen == []


def test_wrong_host_name_is_refused(pki: PkiPaths, tmp_path: Path) -> None:
    """A certificate from the pinned CA for another host name is refused (PROTOCOL_TLS_CLIENT checks it)."""
    cert, key = server_cert_for(pki, "elsewhere.test", tmp_path)
    with serve(pki, cert, key) as other:
        provider = ClientCredentials(other.token_url, ca=pki.ca_cert, client_id="x", client_secret=AWKWARD_SECRET)
        with pytest.raises(TokenError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            provider.token()
        assert caught.value.error is None
        assert other.seen == []


def test_ca_may_be_given_as_pem_bytes(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """`ca` accepts PEM bytes as well as a path."""
    provider = ClientCredentials(
        endpoint.token_url, ca=pki.ca_cert.read_bytes(), client_id="x", client_secret=AWKWARD_SECRET
    )
    assert provider.token() == endpoint.issued[0]


def test_repr_never_shows_secret_or_token(endpoint: TokenEndpoint, pki: PkiPaths) -> None:
    """repr names the endpoint, method and client, never the secret or the cached token."""
    provider = basic(endpoint, pki)
    token = provider.token()
    text = repr(provider)
    assert AWKWARD_SECRET not in text and token not in text
    assert "client_secret_basic" in text and "secret client" in text
    assert repr(StaticToken("abc.def")) == "StaticToken(<redacted>)"


_GOOD: dict[str, Any] = {"token_url": "https://localhost:1/oauth2/token", "client_id": "a", "client_secret": "s"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"token_url": "http://localhost:1/oauth2/token"}, "https", id="plain-http"),
        pytest.param({"token_url": "https:///oauth2/token"}, "https", id="no-host"),
        pytest.param({"client_secret": None, "client_id": None}, "exactly one", id="no-client-auth"),
        pytest.param({"cert": "c.pem", "key": "k.pem"}, "exactly one", id="both-client-auths"),
        pytest.param({"cert": "c.pem"}, "together", id="cert-without-key"),
        pytest.param({"client_id": None}, "client_id", id="secret-without-id"),
        pytest.param({"scopes": ["a b"]}, "scope", id="scope-with-space"),
        pytest.param({"scopes": ['a"b']}, "scope", id="scope-with-quote"),
        pytest.param({"refresh_margin": timedelta(seconds=-1)}, "refresh_margin", id="negative-margin"),
        pytest.param({"timeout": 0}, "timeout", id="zero-timeout"),
        pytest.param({"timeout": float("inf")}, "timeout", id="infinite-timeout"),
    ],
)
def test_invalid_configuration_is_refused(pki: PkiPaths, changes: dict[str, Any], message: str) -> None:
    """A misconfigured provider fails at construction, naming what is wrong."""
    arguments = {**_GOOD, **changes}
    token_url = arguments.pop("token_url")
    with pytest.raises(ValueError, match=message):
        ClientCredentials(token_url, ca=pki.ca_cert, **arguments)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("abc\r\nX-Evil: 1", id="header-injection"),
        pytest.param("é", id="non-ascii"),
    ],
)
def test_static_token_refuses_non_bearer_values(token: str) -> None:
    """StaticToken accepts only RFC 6750 b64token characters, so it can never inject metadata."""
    with pytest.raises(ValueError):
        StaticToken(token)


def test_static_token_never_changes() -> None:
    """StaticToken returns its token, and invalidate cannot produce another (so no retry happens)."""
    provider = StaticToken("abc.def-ghi")
    provider.invalidate("abc.def-ghi")
    assert provider.token() == "abc.def-ghi"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda e, p: StaticToken("t"), id="static"),
        pytest.param(mtls, id="client-credentials"),
    ],
)
def test_providers_satisfy_the_protocol(
    endpoint: TokenEndpoint, pki: PkiPaths, make: Callable[[TokenEndpoint, PkiPaths], object]
) -> None:
    """Both providers are TokenProviders (the runtime-checkable protocol)."""
    assert isinstance(make(endpoint, pki), TokenProvider)
