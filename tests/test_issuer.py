"""The OAuth2 token issuer: real PKI, real HTTPS on 127.0.0.1:0, real ES256 tokens checked with PyJWT."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aigis.auth.certs import init_pki, issue_client, public_jwk, revoke_client
from aigis.auth.clients import RegisteredClient
from aigis.auth.issuer import (
    JWKS_PATH,
    METADATA_PATH,
    TOKEN_PATH,
    ErrorCode,
    IssuerConfig,
    IssuerError,
    IssuerServer,
    OAuthError,
    TokenService,
    granted_scopes,
)
from aigis.auth.pki import PkiPaths

FORM = "application/x-www-form-urlencoded"
GRANT = "grant_type=client_credentials"
REQUIRED_CLAIMS = ["iss", "sub", "aud", "client_id", "scope", "iat", "exp", "jti"]


@dataclass(frozen=True)
class Pki:
    """A PKI with clients in every state the issuer must tell apart."""

    paths: PkiPaths
    now: datetime
    secrets: dict[str, str]
    certs: dict[str, tuple[Path, Path]]  # name -> (cert, key) presented over TLS


def _make_pki(root: Path) -> Pki:
    # A live TLS handshake checks validity against the real clock, so this PKI starts at real
    # time; the issuer's own clock is then pinned to the same instant.
    now = datetime.now(UTC).replace(microsecond=0)
    paths = PkiPaths(root / "certs")
    init_pki(paths, now=now)
    secrets: dict[str, str] = {}
    for name in ("alice", "revoked"):
        issued = issue_client(paths, name, scopes=["calculator:compute"], now=now, with_secret=True)
        assert issued.secret is not None
        secrets[name] = issued.secret
    revoke_client(paths, "revoked", now=now)
    # A certificate that was valid for "rotated" until it was re-issued.
    issue_client(paths, "rotated", scopes=["calculator:compute"], now=now)
    stale = (root / "stale.pem", root / "stale-key.pem")
    shutil.copy(paths.client_cert("rotated"), stale[0])
    shutil.copy(paths.client_key("rotated"), stale[1])
    issue_client(paths, "rotated", scopes=["calculator:compute"], now=now, force=True)
    # A client certificate from a different CA, and the server certificate offered as a client's.
    foreign = PkiPaths(root / "foreign")
    init_pki(foreign, now=now)
    certs = {
        name: (paths.client_cert(name), paths.client_key(name)) for name in ("demo", "alice", "revoked", "rotated")
    }
    certs |= {
        "stale": stale,
        "foreign-ca": (foreign.client_cert("demo"), foreign.client_key("demo")),
        "server-cert": (paths.server_cert, paths.server_key),
    }
    return Pki(paths=paths, now=now, secrets=secrets, certs=certs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def issuer(pki: Pki) -> Iterator[IssuerServer]:
    with IssuerServer(IssuerConfig(paths=pki.paths, port=0), clock=lambda: pki.now) as server:
        yield server


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: dict[str, Any] = field(repr=False)


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: form-urlencode each part before base64.
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
    if cert is not None:
        certfile, keyfile = pki.certs[cert]
        context.load_cert_chain(certfile, keyfile)
    return context


def call(
    server: IssuerServer,
    pki: Pki,
    *,
    cert: str | None = None,
    basic: tuple[str, str] | None = None,
    body: bytes | None = GRANT.encode(),
    headers: dict[str, str] | None = None,
    path: str = TOKEN_PATH,
    method: str = "POST",
) -> Reply:
    """One real HTTPS request; `basic` secrets of the form "$name" mean that client's real secret."""
    all_headers = {"Content-Type": FORM} if body is not None else {}
    if basic is not None:
        client_id, secret = basic
        secret = pki.secrets[secret[1:]] if secret.startswith("$") else secret
        all_headers["Authorization"] = _basic(client_id, secret)
    all_headers |= headers or {}
    request = urllib.request.Request(server.url + path, data=body, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, context=_context(pki, cert), timeout=10) as response:
            return Reply(response.status, response.headers, json.loads(response.read()))
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, json.loads(error.read()))


def _published_key(pki: Pki) -> jwt.PyJWK:
    (jwk,) = json.loads(pki.paths.jwks.read_text())["keys"]
    return jwt.PyJWK(jwk)


def _decode(token: str, pki: Pki, server: IssuerServer) -> dict[str, Any]:
    return jwt.decode(
        token,
        _published_key(pki),
        algorithms=["ES256"],
        audience="aigis",
        issuer=server.issuer_url,
        options={"require": REQUIRED_CLAIMS},
        leeway=timedelta(minutes=1),
    )


# --------------------------------------------------------------------------------------- grants


def test_token_via_mtls_is_an_rfc9068_jwt_bound_to_the_certificate(issuer: IssuerServer, pki: Pki) -> None:
    """tls_client_auth yields an at+jwt ES256 token with every RFC 9068 claim and the cert's x5t#S256."""
    reply = call(issuer, pki, cert="demo", body=f"{GRANT}&client_id=demo".encode())
    assert reply.status == 200
    assert (reply.headers["Cache-Control"], reply.headers["Content-Type"]) == ("no-store", "application/json")
    assert {k: v for k, v in reply.body.items() if k != "access_token"} == {
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "calculator:compute classifier:predict",
    }
    token = reply.body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": _published_key(pki).key_id}
    claims = _decode(token, pki, issuer)
    cert_der = x509.load_pem_x509_certificate(pki.certs["demo"][0].read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode()
    iat = int(pki.now.timestamp())
    assert {k: v for k, v in claims.items() if k != "jti"} == {
        "iss": issuer.url,
        "sub": "demo",
        "aud": "aigis",
        "client_id": "demo",
        "scope": "calculator:compute classifier:predict",
        "iat": iat,
        "exp": iat + 300,
        "cnf": {"x5t#S256": thumbprint},
    }
    assert len(claims["jti"]) >= 32


def test_token_via_client_secret_basic(issuer: IssuerServer, pki: Pki) -> None:
    """client_secret_basic yields a token for the named client, not bound to any certificate."""
    reply = call(issuer, pki, basic=("alice", "$alice"), body=f"{GRANT}&scope=calculator%3Acompute".encode())
    assert reply.status == 200
    claims = _decode(reply.body["access_token"], pki, issuer)
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("alice", "alice", "calculator:compute")
    assert "cnf" not in claims


def test_requested_scopes_are_narrowed_to_the_request(issuer: IssuerServer, pki: Pki) -> None:
    """A client asking for a subset of its scopes gets exactly that subset."""
    reply = call(issuer, pki, cert="demo", body=f"{GRANT}&scope=classifier%3Apredict".encode())
    assert (reply.status, reply.body["scope"]) == (200, "classifier:predict")
    assert _decode(reply.body["access_token"], pki, issuer)["scope"] == "classifier:predict"


def test_every_token_has_a_fresh_jti(issuer: IssuerServer, pki: Pki) -> None:
    """Two grants at the same (pinned) instant still differ: jti is unique."""
    tokens = [call(issuer, pki, cert="demo").body["access_token"] for _ in range(2)]
    assert len({_decode(t, pki, issuer)["jti"] for t in tokens}) == 2


# ------------------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    cert: str | None = None
    basic: tuple[str, str] | None = None
    body: bytes = GRANT.encode()
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 401
    error: str = "invalid_client"


REFUSALS = [
    pytest.param(Refusal(basic=("alice", "wrong-secret")), id="wrong-secret"),
    pytest.param(Refusal(basic=("nobody", "$alice")), id="unknown-client"),
    pytest.param(Refusal(basic=("demo", "$alice")), id="client-without-secret"),
    pytest.param(Refusal(cert="revoked"), id="revoked-client-by-cert"),
    pytest.param(Refusal(basic=("revoked", "$revoked")), id="revoked-client-by-secret"),
    pytest.param(Refusal(cert="stale"), id="superseded-certificate"),
    pytest.param(Refusal(), id="no-client-auth"),
    pytest.param(Refusal(cert="demo", basic=("alice", "$alice")), id="both-auth-methods"),
    pytest.param(Refusal(cert="demo", body=f"{GRANT}&client_id=alice".encode()), id="client-id-mismatching-cert"),
    pytest.param(
        Refusal(basic=("alice", "$alice"), body=f"{GRANT}&client_id=demo".encode()), id="client-id-mismatching-basic"
    ),
    pytest.param(
        Refusal(body=f"{GRANT}&client_id=alice&client_secret=anything".encode()), id="client-secret-in-body"
    ),
    pytest.param(Refusal(headers={"Authorization": "Bearer abc.def.ghi"}), id="bearer-instead-of-basic"),
    pytest.param(Refusal(headers={"Authorization": "Basic !!not-base64!!"}), id="malformed-basic"),
    pytest.param(
        Refusal(headers={"Authorization": "Basic " + base64.b64encode(b"alice").decode()}), id="basic-without-colon"
    ),
    pytest.param(
        Refusal(cert="demo", body=f"{GRANT}&scope=admin".encode(), status=400, error="invalid_scope"),
        id="scope-not-registered",
    ),
    pytest.param(
        Refusal(
            basic=("alice", "$alice"),
            body=f"{GRANT}&scope=calculator%3Acompute+classifier%3Apredict".encode(),
            status=400,
            error="invalid_scope",
        ),
        id="scope-partly-registered",
    ),
    pytest.param(
        Refusal(cert="demo", body=f"{GRANT}&scope=".encode(), status=400, error="invalid_scope"), id="scope-empty"
    ),
    pytest.param(
        Refusal(cert="demo", body=b"grant_type=password", status=400, error="unsupported_grant_type"),
        id="unsupported-grant-type",
    ),
    pytest.param(
        Refusal(cert="demo", body=b"scope=calculator%3Acompute", status=400, error="invalid_request"),
        id="missing-grant-type",
    ),
    pytest.param(
        Refusal(cert="demo", body=f"{GRANT}&{GRANT}".encode(), status=400, error="invalid_request"),
        id="repeated-parameter",
    ),
    pytest.param(
        Refusal(
            cert="demo",
            body=b'{"grant_type": "client_credentials"}',
            headers={"Content-Type": "application/json"},
            status=400,
            error="invalid_request",
        ),
        id="wrong-content-type",
    ),
    pytest.param(
        Refusal(cert="demo", body=b"grant_type=\xff\xfe", status=400, error="invalid_request"), id="non-ascii-body"
    ),
    pytest.param(
        Refusal(cert="demo", body=f"{GRANT}&pad={'A' * 9000}".encode(), status=413, error="invalid_request"),
        id="oversized-body",
    ),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_token_request_is_refused(issuer: IssuerServer, pki: Pki, case: Refusal) -> None:
    """Each bad request gets its RFC 6749 §5.2 error code and status, uncached, and no token."""
    reply = call(issuer, pki, cert=case.cert, basic=case.basic, body=case.body, headers=case.headers)
    assert (reply.status, reply.body.get("error")) == (case.status, case.error)
    assert "access_token" not in reply.body
    assert reply.headers["Cache-Control"] == "no-store"
    if case.status == 401:
        # RFC 6749 §5.2: a 401 MUST carry WWW-Authenticate; every failure reads the same to the client.
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="aigis"'
        assert reply.body["error_description"] == "client authentication failed"


@pytest.mark.parametrize(
    "cert",
    [
        pytest.param("foreign-ca", id="client-cert-from-another-ca"),
        pytest.param("server-cert", id="server-cert-as-client-cert"),
    ],
)
def test_untrusted_client_certificate_fails_the_handshake(issuer: IssuerServer, pki: Pki, cert: str) -> None:
    """A certificate the CA did not issue for clientAuth never reaches the token endpoint."""
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, http.client.HTTPException)):
        call(issuer, pki, cert=cert)


def test_two_authorization_headers_are_refused(issuer: IssuerServer, pki: Pki) -> None:
    """Repeated Authorization headers are ambiguous credentials: invalid_request, no token."""
    connection = http.client.HTTPSConnection("127.0.0.1", issuer.port, context=_context(pki, None), timeout=10)
    try:
        connection.putrequest("POST", TOKEN_PATH)
        connection.putheader("Content-Type", FORM)
        connection.putheader("Content-Length", str(len(GRANT)))
        connection.putheader("Authorization", _basic("alice", pki.secrets["alice"]))
        connection.putheader("Authorization", _basic("demo", "guess"))
        connection.endheaders(GRANT.encode())
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())["error"]) == (400, "invalid_request")
    finally:
        connection.close()


def test_a_stalled_handshake_does_not_block_other_clients(issuer: IssuerServer, pki: Pki) -> None:
    """A connection that never sends a ClientHello does not hold up the accept loop."""
    with socket.create_connection(("127.0.0.1", issuer.port), timeout=5):
        assert call(issuer, pki, cert="demo").status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        pytest.param("GET", TOKEN_PATH, 405, "invalid_request", id="get-token-endpoint"),
        pytest.param("POST", "/oauth2/authorize", 404, "not_found", id="post-unknown-path"),
        pytest.param("GET", "/", 404, "not_found", id="get-root"),
        pytest.param("POST", TOKEN_PATH + "?grant_type=client_credentials", 404, "not_found", id="query-string"),
    ],
)
def test_other_routes_are_refused(
    issuer: IssuerServer, pki: Pki, method: str, path: str, status: int, error: str
) -> None:
    """Only POST /oauth2/token and the two well-known GETs exist."""
    body = GRANT.encode() if method == "POST" else None
    reply = call(issuer, pki, cert="demo", method=method, path=path, body=body)
    assert (reply.status, reply.body["error"]) == (status, error)


# ----------------------------------------------------------------------------------- discovery


def test_jwks_endpoint_serves_the_public_key_set(issuer: IssuerServer, pki: Pki) -> None:
    """GET /.well-known/jwks.json returns jwks.json: public keys only."""
    reply = call(issuer, pki, method="GET", path=JWKS_PATH, body=None)
    assert reply.status == 200
    assert reply.body == json.loads(pki.paths.jwks.read_text())
    assert all("d" not in key for key in reply.body["keys"])


def test_tokens_verify_with_pyjwkclient_against_the_jwks_endpoint(issuer: IssuerServer, pki: Pki) -> None:
    """A resource server fetching keys from jwks_uri (as the gRPC server will) verifies our tokens."""
    token = call(issuer, pki, cert="demo").body["access_token"]
    client = jwt.PyJWKClient(issuer.jwks_url, ssl_context=_context(pki, None), timeout=10)
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token, key, algorithms=["ES256"], audience="aigis", issuer=issuer.issuer_url, leeway=timedelta(minutes=1)
    )
    assert claims["sub"] == "demo"


def test_metadata_endpoint_is_rfc8414(issuer: IssuerServer, pki: Pki) -> None:
    """GET /.well-known/oauth-authorization-server describes this issuer, its endpoints and methods."""
    reply = call(issuer, pki, method="GET", path=METADATA_PATH, body=None)
    assert reply.status == 200
    assert reply.body == {
        "issuer": issuer.issuer_url,
        "token_endpoint": issuer.token_url,
        "jwks_uri": issuer.jwks_url,
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": ["tls_client_auth", "client_secret_basic"],
        "scopes_supported": ["calculator:compute", "classifier:predict"],
        "tls_client_certificate_bound_access_tokens": True,
    }


def test_metadata_passes_authlib_validation(issuer: IssuerServer, pki: Pki) -> None:
    """authlib's RFC 8414 validator (as used by its clients) accepts our metadata as served."""
    reply = call(issuer, pki, method="GET", path=METADATA_PATH, body=None)
    AuthorizationServerMetadata(reply.body).validate()


# ------------------------------------------------------------------------------- live changes


def test_issue_and_revoke_take_effect_without_restart(tmp_path: Path) -> None:
    """A client issued after start gets tokens; once revoked, it does not — same running issuer."""
    pki = _make_pki(tmp_path)
    with IssuerServer(IssuerConfig(paths=pki.paths, port=0), clock=lambda: pki.now) as server:
        assert call(server, pki, basic=("carol", "not-yet-issued")).status == 401
        issued = issue_client(pki.paths, "carol", scopes=["classifier:predict"], now=pki.now, with_secret=True)
        assert issued.secret is not None
        pki.secrets["carol"] = issued.secret
        pki.certs["carol"] = (issued.cert_path, issued.key_path)
        assert call(server, pki, cert="carol").status == 200
        assert call(server, pki, basic=("carol", "$carol")).status == 200
        revoke_client(pki.paths, "carol", now=pki.now)
        assert call(server, pki, cert="carol").status == 401
        assert call(server, pki, basic=("carol", "$carol")).status == 401


def test_unreadable_registry_fails_closed(tmp_path: Path) -> None:
    """A corrupt clients.json refuses every grant (500 server_error) until it is fixed."""
    pki = _make_pki(tmp_path)
    with IssuerServer(IssuerConfig(paths=pki.paths, port=0), clock=lambda: pki.now) as server:
        good = pki.paths.clients_registry.read_text()
        pki.paths.clients_registry.write_text('{"version": 1, "trust_domain": "aigis.local", "clients": [')
        reply = call(server, pki, cert="demo")
        assert (reply.status, reply.body["error"]) == (500, "server_error")
        assert "access_token" not in reply.body
        pki.paths.clients_registry.write_text(good)
        assert call(server, pki, cert="demo").status == 200


def test_logs_name_client_and_reason_but_never_credentials(
    issuer: IssuerServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Grants and refusals are logged with client and reason; secrets, tokens and headers are not."""
    with caplog.at_level(logging.DEBUG, logger="aigis.issuer"):
        granted = call(issuer, pki, basic=("alice", "$alice"))
        call(issuer, pki, basic=("alice", "wrong-secret"))
        call(issuer, pki, cert="revoked")
    text = caplog.text
    assert "token issued: client=alice method=client_secret_basic" in text
    assert "token refused: client='alice' error=invalid_client reason=wrong secret" in text
    assert "token refused: client='revoked' error=invalid_client reason=certificate serial" in text
    for secret in (pki.secrets["alice"], "wrong-secret", granted.body["access_token"], "Basic "):
        assert secret not in text


# -------------------------------------------------------------------------------- pure core


FIXED_NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLIENT = RegisteredClient(
    name="alice", spiffe_id="spiffe://aigis.local/client/alice", scopes=("calculator:compute", "classifier:predict")
)


@pytest.mark.parametrize(
    ("scope_param", "expected"),
    [
        pytest.param(None, ("calculator:compute", "classifier:predict"), id="omitted-means-all-registered"),
        pytest.param("classifier:predict", ("classifier:predict",), id="subset"),
        pytest.param("classifier:predict classifier:predict", ("classifier:predict",), id="duplicates-collapsed"),
        pytest.param("admin", ErrorCode.INVALID_SCOPE, id="unregistered"),
        pytest.param("", ErrorCode.INVALID_SCOPE, id="empty"),
        pytest.param("calculator:compute  classifier:predict", ErrorCode.INVALID_SCOPE, id="double-space"),
        pytest.param('calculator:compute "x"', ErrorCode.INVALID_SCOPE, id="quote"),
    ],
)
def test_granted_scopes(scope_param: str | None, expected: tuple[str, ...] | ErrorCode) -> None:
    """The scope parameter must be space-separated scope tokens, all registered for the client."""
    if isinstance(expected, ErrorCode):
        with pytest.raises(OAuthError) as raised:
            granted_scopes(CLIENT, scope_param)
        assert (raised.value.error, raised.value.http_status) == (expected, 400)
    else:
        assert granted_scopes(CLIENT, scope_param) == expected


def test_token_service_mints_with_the_given_clock(tmp_path: Path) -> None:
    """TokenService is testable without HTTP: iat/exp come from `now`, kid from the key's thumbprint."""
    paths = PkiPaths(tmp_path / "certs")
    init_pki(paths, now=FIXED_NOW)
    service = TokenService.load(paths, issuer="https://issuer.example", audience="aigis", ttl=timedelta(minutes=2))
    response = service.issue(CLIENT, "calculator:compute", now=FIXED_NOW, cert_der=None)
    assert "access_token" not in repr(response)
    claims = jwt.decode(
        response.access_token,
        _published_key(Pki(paths, FIXED_NOW, {}, {})),
        algorithms=["ES256"],
        audience="aigis",
        issuer="https://issuer.example",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (claims["iat"], claims["exp"], claims["scope"]) == (
        int(FIXED_NOW.timestamp()),
        int(FIXED_NOW.timestamp()) + 120,
        "calculator:compute",
    )
    assert (response.expires_in, service.kid) == (120, json.loads(paths.jwks.read_text())["keys"][0]["kid"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"issuer_url": "http://localhost:8443"}, "https", id="http-issuer"),
        pytest.param({"issuer_url": "https://localhost:8443/"}, "trailing slash", id="issuer-with-path"),
        pytest.param({"issuer_url": "https://localhost?x=1"}, "scheme://host", id="issuer-with-query"),
        pytest.param({"token_ttl": timedelta(0)}, "token_ttl", id="zero-ttl"),
        pytest.param({"token_ttl": timedelta(days=2)}, "token_ttl", id="ttl-too-long"),
        pytest.param({"port": 70000}, "port", id="bad-port"),
        pytest.param({"audience": ""}, "audience", id="empty-audience"),
    ],
)
def test_issuer_config_is_validated(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    """Invalid configuration stops start-up with a message naming the key."""
    with pytest.raises(ValueError, match=message):
        IssuerConfig(paths=PkiPaths(tmp_path), **overrides)


def test_start_without_pki_fails_clearly(tmp_path: Path) -> None:
    """Starting on an empty directory raises IssuerError pointing at `aigis certs init`."""
    with pytest.raises(IssuerError, match=r"server\.pem: not found \(run `aigis certs init`\)"):
        IssuerServer(IssuerConfig(paths=PkiPaths(tmp_path), port=0)).start()


def test_start_refuses_a_signing_key_missing_from_jwks(tmp_path: Path) -> None:
    """If jwks.json does not publish the signing key, every token would be refused: do not start."""
    paths = PkiPaths(tmp_path / "certs")
    init_pki(paths, now=FIXED_NOW)
    other = PkiPaths(tmp_path / "other")
    init_pki(other, now=FIXED_NOW)
    paths.jwks.write_text(other.jwks.read_text())
    key = serialization.load_pem_private_key(paths.signing_key.read_bytes(), password=None)
    kid = public_jwk(key.public_key())["kid"]  # type: ignore[arg-type]
    server = IssuerServer(IssuerConfig(paths=paths, port=0))
    with pytest.raises(IssuerError, match=f"does not contain the signing key \\(kid {kid}\\)"):
        server.start()
