"""Rotation without a restart: token-signing keys (`aigis keys rotate`), the server certificate and
the CA bundle, with broken new files refused and the last good ones kept.

Key logic is tested as pure functions with a pinned `now`; the running-server tests use a real PKI,
real TLS handshakes and real tokens, and call `reload_now()` to make the server look at its files
(the background poll is pushed out of the way so each test decides when a change is seen).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt import PyJWKSet

from aigis.auth import certs
from aigis.auth.clients import load_registry
from aigis.auth.issuer import TokenService
from aigis.auth.pki import PkiPaths
from aigis.auth.signing_keys import (
    RETIRED_KEY_GRACE,
    KeyRecord,
    KeyRotationError,
    KeyStatus,
    list_signing_keys,
    load_key_state,
    reconcile,
    rotate_signing_key,
    rotated,
)
from aigis.auth.tls import TlsCredentialStore, TlsError, load_tls_material
from aigis.auth.tokens import load_jwks_file
from aigis.server.app import StartupError, start_server
from aigis.tools.cli import main as cli_main
from tests.calls import RPC_KINDS, Outcome, bearer, channel, issuer_token, run, served_serial
from tests.conftest import stack_config

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    paths = PkiPaths(tmp_path / "certs")
    certs.init_pki(paths, now=NOW)
    return paths


@pytest.fixture
def polled_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only reload_now polls the server's files; the issuer looks at its TLS files on every accept."""
    monkeypatch.setattr("aigis.server.app.RELOAD_INTERVAL_SECONDS", 3600.0)
    monkeypatch.setattr("aigis.auth.issuer.TLS_CHECK_INTERVAL_S", 0.0)


def _kids(jwks: dict[str, Any]) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def _add(stack: Any, token: str | None, client: str = "demo", *, ca: Path | None = None) -> Outcome:
    """Add over a new mTLS channel; `ca` overrides the trust anchor the client checks the server with."""
    trusted, cert, key = stack.client_files(client)
    credentials = grpc.ssl_channel_credentials((ca or trusted).read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(stack.target, credentials) as ch:
        return run(lambda: RPC_KINDS["unary"](ch, bearer(token) if token else ()))


def _reason(stack: Any, outcome: Outcome) -> str:
    return next(r["reason"] for r in stack.audit_records() if r["request_id"] == outcome.request_id)


def _grpc_serial(stack: Any, ca: Path | None = None) -> int:
    trusted, cert, key = stack.client_files("demo")
    return served_serial(stack.server.port, ca or trusted, cert, key)


def _issuer_serial(stack: Any, ca: Path | None = None) -> int:
    trusted, cert, key = stack.client_files("demo")
    return served_serial(stack.server.issuer.port, ca or trusted, cert, key)


def _issuer_jwks(stack: Any) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    with urllib.request.urlopen(stack.server.issuer.jwks_url, context=context, timeout=10) as response:
        return json.loads(response.read())


def _refusals(stack: Any, path: Path) -> float:
    value = stack.server.metrics.registry.get_sample_value("aigis_reload_failures_total", {"file": path.name})
    return value or 0.0


def _health(stack: Any, ca: Path, cert: Path, key: Path) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(stack.target, credentials) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def _leaf(paths: PkiPaths, key: ec.EllipticCurvePrivateKey, *, now: datetime, days: int = 1) -> bytes:
    """A server certificate for `key` from the PKI's CA, valid from `now` for `days`."""
    ca_cert, ca_key = certs._load_ca(paths)
    cert = certs._make_leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        key=key,
        common_name="aigis server",
        sans=[x509.DNSName("localhost")],
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        validity_days=days,
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------ signing keys: pure core


def _record(kid: str, **times: datetime | None) -> KeyRecord:
    return KeyRecord(kid, {"kid": kid}, **times)


def test_rotated_retires_the_active_key_for_the_grace_period() -> None:
    """The new key becomes active; the previous one is retired now and may be pruned after the grace."""
    state = reconcile("a", [{"kid": "a"}], {}, now=NOW)
    after = rotated(state, {"kid": "b"}, now=NOW)
    assert [(k.kid, k.status(NOW)) for k in after.keys] == [("b", KeyStatus.ACTIVE), ("a", KeyStatus.RETIRED)]
    assert after.keys[1].prune_after == NOW + RETIRED_KEY_GRACE
    assert after.keys[1].status(NOW + RETIRED_KEY_GRACE) is KeyStatus.PRUNABLE


def test_grace_covers_the_longest_token_lifetime_and_leeway() -> None:
    """A retired key outlives any token it can have signed: 24 h maximum TTL + 300 s maximum leeway."""
    assert timedelta(hours=24, seconds=300) == RETIRED_KEY_GRACE


def test_rotated_with_force_publishes_only_the_new_key() -> None:
    """force drops every older key at once (key compromise)."""
    state = reconcile("a", [{"kid": "a"}, {"kid": "z"}], {}, now=NOW)
    assert [k.kid for k in rotated(state, {"kid": "b"}, now=NOW, force=True).keys] == ["b"]


def test_rotated_refuses_a_kid_already_published() -> None:
    """A new key must not shadow a published one."""
    state = reconcile("a", [{"kid": "a"}], {}, now=NOW)
    with pytest.raises(KeyRotationError, match="not already published"):
        rotated(state, {"kid": "a"}, now=NOW)


@pytest.mark.parametrize(
    ("active", "published", "metadata", "expected"),
    [
        pytest.param(
            "a", ["a"], {}, [("a", None, None)], id="pki-from-before-rotation-existed",
        ),
        pytest.param(
            "b", ["b", "a"], {"a": _record("a", created_at=NOW - SECOND)},
            [("b", None, None), ("a", NOW, NOW + RETIRED_KEY_GRACE)],
            id="crashed-after-the-key-was-replaced",
        ),
        pytest.param(
            "a", ["b", "a"], {"a": _record("a")},
            [("a", None, None), ("b", NOW, NOW + RETIRED_KEY_GRACE)],
            id="crashed-after-the-new-key-was-published",
        ),
        pytest.param(
            "a", ["a", "c"],
            {"c": _record("c", retired_at=NOW - SECOND, prune_after=NOW + SECOND), "gone": _record("gone")},
            [("a", None, None), ("c", NOW - SECOND, NOW + SECOND)],
            id="metadata-of-a-pruned-key-is-dropped",
        ),
    ],
)
def test_reconcile_fills_gaps_on_the_safe_side(
    active: str,
    published: list[str],
    metadata: dict[str, KeyRecord],
    expected: list[tuple[str, datetime | None, datetime | None]],
) -> None:
    """The key file names the active key; a published key without retirement facts gets a full grace."""
    state = reconcile(active, [{"kid": kid} for kid in published], metadata, now=NOW)
    assert [(k.kid, k.retired_at, k.prune_after) for k in state.keys] == expected


# ------------------------------------------------------------------------ signing keys: on disk


def test_rotate_writes_the_new_key_and_keeps_the_old_public_key(pki: PkiPaths) -> None:
    """The new private key replaces the old (0600); jwks.json publishes both; metadata says when the old may go."""
    old_pem = pki.signing_key.read_bytes()
    (old_kid,) = _kids(json.loads(pki.jwks.read_text()))
    rotation = rotate_signing_key(pki, now=NOW)

    assert pki.signing_key.read_bytes() != old_pem
    assert certs.public_jwk(_private_key(pki.signing_key).public_key())["kid"] == rotation.active
    assert (rotation.retired, rotation.pruned, rotation.published) == ((old_kid,), (), (rotation.active, old_kid))
    assert rotation.prune_after == NOW + RETIRED_KEY_GRACE
    assert {p.name: _mode(p) for p in (pki.signing_key, pki.jwks, pki.signing_keys_metadata)} == {
        "token-signing-key.pem": 0o600,
        "jwks.json": 0o644,
        "signing-keys.json": 0o644,
    }
    # The retired private key is gone: the active one is the only signing key on disk.
    private = {p.name for p in pki.root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert private == {"ca-key.pem", "server-key.pem", "token-signing-key.pem", "demo-key.pem"}
    jwks = json.loads(pki.jwks.read_text())
    assert _kids(jwks) == [rotation.active, old_kid]
    assert not any("d" in k for k in jwks["keys"])
    # Both the verifier's loader and PyJWT accept the file as it is.
    assert set(load_jwks_file(pki.jwks).keys) == {rotation.active, old_kid}
    assert {k.key_id for k in PyJWKSet.from_dict(jwks).keys} == {rotation.active, old_kid}
    metadata = json.loads(pki.signing_keys_metadata.read_text())
    assert metadata["keys"] == [
        {"kid": rotation.active, "created_at": NOW.isoformat(), "retired_at": None, "prune_after": None},
        {"kid": old_kid, "created_at": None, "retired_at": NOW.isoformat(),
         "prune_after": (NOW + RETIRED_KEY_GRACE).isoformat()},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("later", "kept"),
    [
        pytest.param(RETIRED_KEY_GRACE - SECOND, True, id="grace-not-over"),
        pytest.param(RETIRED_KEY_GRACE, False, id="grace-just-over"),
        pytest.param(RETIRED_KEY_GRACE + timedelta(days=30), False, id="long-after"),
    ],
)
def test_rotate_prunes_retired_keys_after_the_grace(pki: PkiPaths, later: timedelta, kept: bool) -> None:
    """A retired key stays published until its grace has passed; the next rotation then removes it."""
    (first,) = _kids(json.loads(pki.jwks.read_text()))
    second = rotate_signing_key(pki, now=NOW).active
    third = rotate_signing_key(pki, now=NOW + later)
    assert third.retired == (second,)
    assert third.pruned == (() if kept else (first,))
    assert _kids(json.loads(pki.jwks.read_text())) == [third.active, second, *([first] if kept else [])]


def test_rotate_with_force_drops_every_older_key(pki: PkiPaths) -> None:
    """force leaves only the new key in jwks.json, at once."""
    first = rotate_signing_key(pki, now=NOW)
    forced = rotate_signing_key(pki, now=NOW + SECOND, force=True)
    assert forced.prune_after is None
    assert set(forced.pruned) == set(first.published)
    assert _kids(json.loads(pki.jwks.read_text())) == [forced.active]
    assert [(k.kid, k.status) for k in list_signing_keys(pki, now=NOW + SECOND)] == [
        (forced.active, KeyStatus.ACTIVE)
    ]


BROKEN_KEY_FILES: list[Any] = [
    pytest.param(lambda p: p.signing_key.unlink(), r"token-signing-key\.pem: not found", id="no-signing-key"),
    pytest.param(lambda p: p.signing_key.write_text("junk"), "not an unencrypted PEM", id="garbage-signing-key"),
    pytest.param(
        lambda p: p.signing_key.write_bytes(
            ec.generate_private_key(ec.SECP384R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        ),
        r"not a P-256 \(ES256\) key",
        id="p384-signing-key",
    ),
    pytest.param(lambda p: p.jwks.write_text("{"), r"jwks\.json: unreadable", id="jwks-not-json"),
    pytest.param(lambda p: p.jwks.write_text('{"keys": {}}'), "not a JWK Set", id="jwks-not-a-set"),
    pytest.param(lambda p: p.jwks.write_text('{"keys": [{"kty": "EC"}]}'), "has no kid", id="jwks-key-without-kid"),
    pytest.param(
        lambda p: p.jwks.write_text('{"keys": [{"kid": "x"}]}'), "does not publish the active", id="active-unpublished"
    ),
    pytest.param(
        lambda p: p.signing_keys_metadata.write_text('{"version": 1, "keys": [{"kid": "k", "retired_at": "soon"}]}'),
        r"keys\[0\]\.retired_at: expected an ISO 8601 time",
        id="metadata-bad-time",
    ),
    pytest.param(
        lambda p: p.signing_keys_metadata.write_text('{"version": 9}'), "not a version 1", id="metadata-unknown-version"
    ),
]


@pytest.mark.parametrize(("breakage", "message"), BROKEN_KEY_FILES)
def test_rotate_refuses_key_files_that_do_not_fit(
    pki: PkiPaths, breakage: Callable[[PkiPaths], None], message: str
) -> None:
    """An inconsistent key directory is named in the error and left untouched; force starts afresh."""
    breakage(pki)
    before = {p.name: p.read_bytes() for p in pki.root.iterdir() if p.is_file()}
    with pytest.raises(KeyRotationError, match=message):
        rotate_signing_key(pki, now=NOW)
    assert {p.name: p.read_bytes() for p in pki.root.iterdir() if p.is_file()} == before
    forced = rotate_signing_key(pki, now=NOW, force=True)
    assert _kids(json.loads(pki.jwks.read_text())) == [forced.active]
    assert load_key_state(pki, now=NOW).active.kid == forced.active


def test_keys_cli_rotates_and_lists(pki: PkiPaths, capsys: pytest.CaptureFixture[str]) -> None:
    """`aigis keys rotate` then `aigis keys list` show the active and retired kids and no key material."""
    (old_kid,) = _kids(json.loads(pki.jwks.read_text()))
    assert cli_main(["keys", "rotate", "--dir", str(pki.root)]) == 0
    new_kid = load_key_state(pki, now=datetime.now(UTC)).active.kid
    assert cli_main(["keys", "list", "--dir", str(pki.root)]) == 0
    out = capsys.readouterr().out
    assert f"active      {new_kid}" in out
    assert f"retired     {old_kid}" in out
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith((new_kid, old_kid))]
    assert rows == [[new_kid, "active"], [old_kid, "retired"]]
    assert "PRIVATE" not in out and '"d"' not in out


def test_keys_cli_names_the_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a PKI the command fails with exit code 1 and points at `aigis certs init`."""
    assert cli_main(["keys", "list", "--dir", str(tmp_path)]) == 2
    assert "aigis keys: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------ TLS material


def test_tls_store_hands_a_staged_configuration_to_grpc_once(pki: PkiPaths) -> None:
    """The fetcher returns a new configuration once, then None; re-staging identical files is a no-op."""
    store = TlsCredentialStore(pki, clock=lambda: NOW)
    assert store.fetch() is None
    assert not store.stage(store.read())
    issued = certs.issue_server_certificate(pki, now=NOW)
    assert store.stage(store.read())
    assert store.current.serial == issued.serial
    assert isinstance(store.fetch(), grpc.ServerCertificateConfiguration)
    assert store.fetch() is None
    assert (store.reloads, store.refused_reloads) == (1, 0)


BROKEN_TLS_FILES: list[Any] = [
    pytest.param("server_cert", lambda p: b"junk", "not a PEM certificate chain", id="server-cert-garbage"),
    pytest.param("server_key", lambda p: b"junk", "not an unencrypted PEM private key", id="server-key-garbage"),
    pytest.param(
        "server_cert",
        lambda p: _leaf(p, ec.generate_private_key(ec.SECP256R1()), now=datetime.now(UTC)),
        r"server-key\.pem is not the private key of .*server\.pem",
        id="cert-for-another-key",
    ),
    pytest.param(
        "server_cert",
        lambda p: _leaf(p, _private_key(p.server_key), now=datetime.now(UTC) - timedelta(days=3)),
        "server.pem: expired at",
        id="expired-cert",
    ),
    pytest.param(
        "server_cert",
        lambda p: _leaf(p, _private_key(p.server_key), now=datetime.now(UTC) + timedelta(days=3)),
        "server.pem: not valid before",
        id="not-yet-valid-cert",
    ),
    pytest.param("ca_cert", lambda p: b"junk", "not a PEM certificate bundle", id="ca-bundle-garbage"),
    pytest.param(
        "ca_cert",
        lambda p: p.ca_cert.read_bytes() + p.server_cert.read_bytes(),
        r"certificate 2 \(CN=aigis server,O=aigis\) is not a CA",
        id="leaf-in-ca-bundle",
    ),
]


@pytest.mark.parametrize(("file", "content", "message"), BROKEN_TLS_FILES)
def test_broken_tls_file_stops_start_up_naming_it(
    tmp_path: Path, file: str, content: Callable[[PkiPaths], bytes], message: str
) -> None:
    """A server certificate, key or CA bundle that cannot be served stops start-up with the file named."""
    paths = PkiPaths(tmp_path / "certs")
    certs.init_pki(paths, now=datetime.now(UTC))
    path: Path = getattr(paths, file)
    path.write_bytes(content(paths))
    with pytest.raises(TlsError, match=message):
        load_tls_material(paths, now=datetime.now(UTC))
    with pytest.raises(StartupError, match=message):
        asyncio.run(start_server(stack_config(paths, tmp_path / "audit.jsonl")))


# --------------------------------------------------------------------- running server: keys


def test_rotation_keeps_old_tokens_valid_and_signs_new_ones_with_the_new_key(
    start_stack: Any, polled_by_hand: None
) -> None:
    """After `keys rotate`, a token signed before still verifies, new tokens carry the new kid, and
    the issuer publishes both keys — without a restart."""
    stack = start_stack()
    old_token = issuer_token(stack, "demo")
    assert _add(stack, old_token).value == 5
    rotation = rotate_signing_key(stack.pki, now=datetime.now(UTC))
    stack.run(stack.server.reload_now())

    new_token = issuer_token(stack, "demo")
    assert _kid_of(old_token) == rotation.retired[0]
    assert _kid_of(new_token) == rotation.active
    assert _add(stack, new_token).value == 5
    assert _add(stack, old_token).value == 5  # re-verified: the key change emptied the token cache
    assert _kids(_issuer_jwks(stack)) == [rotation.active, rotation.retired[0]]


def test_pruned_key_no_longer_verifies_its_tokens(start_stack: Any, polled_by_hand: None) -> None:
    """Once its grace has passed and a rotation pruned it, a token signed with the old key (same kid)
    is refused with token_unknown_key."""
    stack = start_stack()
    old_key = _private_key(stack.pki.signing_key)
    old_kid = certs.public_jwk(old_key.public_key())["kid"]
    demo = load_registry(stack.pki.clients_registry).by_name("demo")
    assert demo is not None
    old_signer = TokenService(
        signing_key=old_key, kid=old_kid, issuer=stack.server.issuer.issuer_url, audience="aigis",
        ttl=timedelta(minutes=5),
    )  # fmt: skip
    now = datetime.now(UTC)

    rotate_signing_key(stack.pki, now=now)
    stack.run(stack.server.reload_now())
    within_grace = old_signer.issue(demo, None, now=datetime.now(UTC)).access_token
    assert _add(stack, within_grace).value == 5

    later = rotate_signing_key(stack.pki, now=now + RETIRED_KEY_GRACE + SECOND)
    assert old_kid in later.pruned
    stack.run(stack.server.reload_now())
    assert old_kid not in _kids(_issuer_jwks(stack))
    for token in (within_grace, old_signer.issue(demo, None, now=datetime.now(UTC)).access_token):
        outcome = _add(stack, token)
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(stack, outcome) == "token_unknown_key"
    assert _add(stack, issuer_token(stack, "demo")).value == 5


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{ not json", id="not-json"),
        pytest.param('{"keys": []}', id="no-keys"),
        pytest.param("private-key-published", id="private-key-published"),
    ],
)
def test_broken_jwks_keeps_the_last_good_keys(
    start_stack: Any, polled_by_hand: None, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    """A broken jwks.json is refused (error log, counted): fresh tokens still verify with the kept keys,
    and the issuer keeps signing and publishing the last good pair."""
    stack = start_stack()
    good = json.loads(stack.pki.jwks.read_text())
    if content == "private-key-published":
        private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(_private_key(stack.pki.signing_key)))
        content = json.dumps({"keys": [{**good["keys"][0], "d": private["d"]}]})
    stack.pki.jwks.write_text(content)
    with caplog.at_level(logging.ERROR):
        stack.run(stack.server.reload_now())
    assert _refusals(stack, stack.pki.jwks) == 1
    assert any("refusing changed" in r.getMessage() and "jwks.json" in r.getMessage() for r in caplog.records)
    fresh = issuer_token(stack, "demo")
    assert _kid_of(fresh) == good["keys"][0]["kid"]
    assert _add(stack, fresh).value == 5
    assert _issuer_jwks(stack) == good


def test_issuer_keeps_signing_when_the_new_key_file_is_broken(start_stack: Any) -> None:
    """A signing key that no longer loads is refused by the issuer, which keeps the last good key."""
    stack = start_stack()
    kid = _kid_of(issuer_token(stack, "demo"))
    stack.pki.signing_key.write_text("junk")
    assert _kid_of(issuer_token(stack, "demo")) == kid
    assert stack.server.issuer.signing_keys.refused_reloads == 1


# ---------------------------------------------------------------------- running server: TLS


def test_replaced_server_certificate_is_served_to_new_connections(start_stack: Any, polled_by_hand: None) -> None:
    """A new server certificate from the same CA reaches new connections of both the gRPC server and
    the issuer without a restart; a connection opened before keeps working."""
    stack = start_stack()
    before = _grpc_serial(stack)
    assert _issuer_serial(stack) == before
    with channel(stack, "demo") as open_channel:
        assert RPC_KINDS["unary"](open_channel, bearer(issuer_token(stack, "demo"))) == 5
        issued = certs.issue_server_certificate(stack.pki, now=datetime.now(UTC))
        assert issued.serial != before
        stack.run(stack.server.reload_now())
        assert _grpc_serial(stack) == issued.serial
        assert _issuer_serial(stack) == issued.serial
        assert RPC_KINDS["unary"](open_channel, bearer(issuer_token(stack, "demo"))) == 5
    assert _add(stack, issuer_token(stack, "demo")).value == 5
    assert (stack.server.tls.reloads, stack.server.tls.refused_reloads) == (1, 0)


def test_ca_bundle_with_a_second_ca_accepts_its_clients(
    start_stack: Any, polled_by_hand: None, tmp_path: Path
) -> None:
    """Adding a second CA to ca.pem lets a client certificate from it through the handshake and the
    identity check on a new connection, at the gRPC server and at the issuer."""
    stack = start_stack()
    second = PkiPaths(tmp_path / "second-ca")
    certs.init_pki(second, now=datetime.now(UTC))
    newcomer = (stack.pki.ca_cert, second.client_cert("demo"), second.client_key("demo"))
    assert _health(stack, *newcomer) == grpc.StatusCode.UNAVAILABLE  # handshake refused
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _token_request(stack, *newcomer)

    stack.pki.ca_cert.write_bytes(stack.pki.ca_cert.read_bytes() + second.ca_cert.read_bytes())
    stack.run(stack.server.reload_now())

    assert _health(stack, *newcomer) == grpc.StatusCode.OK
    assert stack.server.tls.current.ca_subjects == (
        "CN=aigis CA (aigis.local),O=aigis",
        "CN=aigis CA (aigis.local),O=aigis",
    )
    # Past the handshake and the certificate policy: what is missing now is only the token.
    ca, cert, key = newcomer
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(stack.target, credentials) as ch:
        outcome = run(lambda: RPC_KINDS["unary"](ch, ()))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(stack, outcome) == "token_missing"
    # The issuer completes the handshake too; the certificate is simply not a registered client's.
    with pytest.raises(urllib.error.HTTPError) as refused:
        _token_request(stack, *newcomer)
    assert refused.value.code == 401
    refused.value.close()  # an HTTPError holds the response, and with it the socket
    # Clients of the first CA are unaffected.
    assert _add(stack, issuer_token(stack, "demo")).value == 5


def _token_request(stack: Any, ca: Path, cert: Path, key: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    request = urllib.request.Request(
        stack.token_url,
        data=b"grant_type=client_credentials",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return response.read()


@pytest.mark.parametrize(("file", "content", "message"), BROKEN_TLS_FILES)
def test_broken_tls_file_is_refused_and_serving_continues(
    start_stack: Any,
    polled_by_hand: None,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    file: str,
    content: Callable[[PkiPaths], bytes],
    message: str,
) -> None:
    """A changed certificate, key or CA bundle that cannot be served is refused with an error log and
    counted; new connections still get the last good certificate, and calls keep working."""
    stack = start_stack()
    before = _grpc_serial(stack)
    token = issuer_token(stack, "demo")  # the issuer fails closed while it cannot read the CA bundle
    trusted = tmp_path / "trusted-ca.pem"  # what clients keep trusting, whatever happens to ca.pem
    trusted.write_bytes(stack.pki.ca_cert.read_bytes())
    path: Path = getattr(stack.pki, file)
    path.write_bytes(content(stack.pki))
    with caplog.at_level(logging.ERROR):
        stack.run(stack.server.reload_now())
    assert stack.server.tls.refused_reloads == 1
    assert _refusals(stack, path) == 1
    assert any(r.levelno == logging.ERROR and re.search(message, r.getMessage()) for r in caplog.records)
    assert _grpc_serial(stack, trusted) == before
    assert _issuer_serial(stack, trusted) == before
    assert _add(stack, token, ca=trusted).value == 5


def test_fixing_a_refused_file_is_picked_up(start_stack: Any, polled_by_hand: None) -> None:
    """After a refused change, writing a good pair is served at the next poll."""
    stack = start_stack()
    stack.pki.server_cert.write_text("junk")
    stack.run(stack.server.reload_now())
    issued = certs.issue_server_certificate(stack.pki, now=datetime.now(UTC))
    stack.run(stack.server.reload_now())
    assert _grpc_serial(stack) == issued.serial
    assert (stack.server.tls.reloads, stack.server.tls.refused_reloads) == (1, 1)
