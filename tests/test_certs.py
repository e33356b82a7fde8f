"""The certificate tool: what `aigis certs` writes, and that every verifier on the other side accepts it."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import shutil
import stat
import subprocess
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aigis.auth.certs import (
    DEMO_SCOPES,
    AlreadyExistsError,
    PkiError,
    init_pki,
    issue_client,
    list_clients,
    load_crl_serials,
    revoke_client,
)
from aigis.auth.clients import ClientRegistry, RegistryError, load_registry, save_registry, verify_secret
from aigis.auth.pki import PkiPaths
from aigis.tools.cli import main as cli_main

# A pinned clock for everything that does not need a live TLS handshake.
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OPENSSL = shutil.which("openssl")


@pytest.fixture
def paths(tmp_path: Path) -> PkiPaths:
    pki = PkiPaths(tmp_path / "certs")
    init_pki(pki, now=NOW, server_names=("aigis.example", "10.1.2.3"))
    return pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(paths: PkiPaths) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(paths.crl.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ init


def test_init_writes_every_file(tmp_path: Path) -> None:
    """init creates the CA, server cert, CRL, signing key, JWKS, registry and the demo client."""
    paths = PkiPaths(tmp_path / "certs")
    result = init_pki(paths, now=NOW)
    expected = [
        paths.ca_cert,
        paths.ca_key,
        paths.server_cert,
        paths.server_key,
        paths.crl,
        paths.signing_key,
        paths.jwks,
        paths.clients_registry,
        paths.client_cert("demo"),
        paths.client_key("demo"),
    ]
    assert all(p.is_file() for p in expected)
    assert set(result.written) == set(expected)
    assert result.demo.scopes == DEMO_SCOPES
    registry = load_registry(paths.clients_registry)
    assert registry.trust_domain == "aigis.local"
    assert [c.name for c in registry.clients] == ["demo"]
    assert load_crl_serials(paths) == frozenset()


def test_private_keys_and_registry_are_mode_0600(paths: PkiPaths) -> None:
    """Every private key and the registry (secret hashes) are readable by the owner only."""
    private = [paths.ca_key, paths.server_key, paths.signing_key, paths.client_key("demo"), paths.clients_registry]
    assert {p.name: _mode(p) for p in private} == {p.name: 0o600 for p in private}
    assert _mode(paths.root) == 0o700


def test_init_refuses_to_overwrite_without_force(paths: PkiPaths) -> None:
    """A second init names the existing file and changes nothing."""
    before = {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()}
    with pytest.raises(AlreadyExistsError, match=r"ca\.pem already exists"):
        init_pki(paths, now=NOW)
    assert {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()} == before


def test_init_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    """Even one leftover file (here the signing key) stops init before anything is written."""
    paths = PkiPaths(tmp_path / "certs")
    paths.root.mkdir()
    paths.signing_key.write_text("keep me")
    with pytest.raises(AlreadyExistsError, match=r"token-signing-key\.pem"):
        init_pki(paths, now=NOW)
    assert sorted(p.name for p in paths.root.iterdir()) == ["token-signing-key.pem"]


def test_init_with_force_replaces_the_pki_and_keeps_modes(paths: PkiPaths) -> None:
    """force writes a new CA and keys, still 0600, atomically replacing the old files."""
    old_ca = paths.ca_cert.read_bytes()
    paths.ca_key.chmod(0o644)  # a loosened old file must not pass its mode on
    init_pki(paths, now=NOW, force=True)
    assert paths.ca_cert.read_bytes() != old_ca
    assert _mode(paths.ca_key) == 0o600
    assert _cert(paths.client_cert("demo")).issuer == _cert(paths.ca_cert).subject


def test_init_requires_an_aware_clock(tmp_path: Path) -> None:
    """A naive datetime is refused: it would be read as UTC by some code and local time by other."""
    with pytest.raises(PkiError, match="aware"):
        init_pki(PkiPaths(tmp_path), now=datetime(2026, 1, 1))


# ---------------------------------------------------------------------------------- certificates


def test_ca_certificate_profile(paths: PkiPaths) -> None:
    """The CA may sign leaves and CRLs only: CA:TRUE pathlen 0 (critical), keyCertSign + cRLSign."""
    ca = _cert(paths.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert (bc.critical, bc.value.ca, bc.value.path_length) == (True, True, 0)
    assert (ku.critical, ku.value.key_cert_sign, ku.value.crl_sign, ku.value.digital_signature) == (
        True,
        True,
        True,
        False,
    )
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP256R1)


def test_server_certificate_names(paths: PkiPaths) -> None:
    """The server cert covers localhost, 127.0.0.1, ::1 and the given names (IPs detected), for serverAuth."""
    cert = _cert(paths.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "aigis.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://aigis.local/server"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    store = verification.Store([_cert(paths.ca_cert)])
    names: list[verification.Subject] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("::1"))]
    for name in names:
        verifier = verification.PolicyBuilder().store(store).time(NOW).build_server_verifier(name)
        verifier.verify(cert, [])


def test_client_certificate_profile(paths: PkiPaths) -> None:
    """A client cert: CN=name, exactly one SAN (its SPIFFE URI), clientAuth only, signing only, not a CA."""
    cert = _cert(paths.client_cert("demo"))
    assert cert.subject.rfc4514_string() == "CN=demo,O=aigis"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [(type(n), n.value) for n in san] == [
        (x509.UniformResourceIdentifier, "spiffe://aigis.local/client/demo")
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (ku.digital_signature, ku.key_cert_sign, ku.key_encipherment) == (True, False, False)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_client_verifier_accepts_client_certificate(paths: PkiPaths) -> None:
    """cryptography's client verifier (what the server uses) accepts the issued client cert."""
    issued = issue_client(paths, "alice", scopes=["calculator:compute"], now=NOW)
    store = verification.Store([_cert(paths.ca_cert)])
    verifier = verification.PolicyBuilder().store(store).time(NOW).build_client_verifier()
    verified = verifier.verify(_cert(issued.cert_path), [])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://aigis.local/client/alice")]


def test_client_verifier_rejects_server_certificate_as_client(paths: PkiPaths) -> None:
    """The server cert lacks clientAuth, so it cannot stand in for a client."""
    store = verification.Store([_cert(paths.ca_cert)])
    verifier = verification.PolicyBuilder().store(store).time(NOW).build_client_verifier()
    with pytest.raises(verification.VerificationError):
        verifier.verify(_cert(paths.server_cert), [])


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
@pytest.mark.parametrize(
    ("cert", "purpose"),
    [
        pytest.param("server.pem", "sslserver", id="server"),
        pytest.param("clients/demo.pem", "sslclient", id="demo-client"),
    ],
)
def test_openssl_verifies_certificates(paths: PkiPaths, cert: str, purpose: str) -> None:
    """`openssl verify` (strict, right purpose, with the CRL) accepts every issued certificate."""
    result = subprocess.run(
        [
            "openssl", "verify", "-x509_strict", "-purpose", purpose, "-attime", str(int(NOW.timestamp())),
            "-crl_check", "-CRLfile", str(paths.crl), "-CAfile", str(paths.ca_cert), str(paths.root / cert),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
def test_openssl_rejects_revoked_certificate(paths: PkiPaths) -> None:
    """After revocation, `openssl verify -crl_check` refuses the client certificate."""
    issued = issue_client(paths, "alice", scopes=["calculator:compute"], now=NOW)
    revoke_client(paths, "alice", now=NOW + timedelta(minutes=1))
    result = subprocess.run(
        [
            "openssl", "verify", "-attime", str(int((NOW + timedelta(minutes=2)).timestamp())),
            "-crl_check", "-CRLfile", str(paths.crl), "-CAfile", str(paths.ca_cert), str(issued.cert_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr


def test_server_certificate_passes_grpc_hostname_checks(tmp_path: Path) -> None:
    """gRPC's TLS accepts the server cert (SPIFFE URI SAN included) for localhost and 127.0.0.1 only."""
    paths = PkiPaths(tmp_path / "certs")
    init_pki(paths, now=datetime.now(UTC))  # a live handshake checks validity against the real clock
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server_creds = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=paths.ca_cert.read_bytes(),
            private_key=paths.client_key("demo").read_bytes(),
            certificate_chain=paths.client_cert("demo").read_bytes(),
        )
        outcomes = {}
        for target, override in (("localhost", None), ("127.0.0.1", None), ("127.0.0.1", "evil.example")):
            options = [] if override is None else [("grpc.ssl_target_name_override", override)]
            with grpc.secure_channel(f"{target}:{port}", creds, options=options) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    outcomes[override or target] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    outcomes[override or target] = exc.code().name
    finally:
        server.stop(None)
    assert outcomes == {"localhost": "SERVING", "127.0.0.1": "SERVING", "evil.example": "UNAVAILABLE"}


def test_jwks_publishes_the_signing_key_with_rfc7638_kid(paths: PkiPaths) -> None:
    """jwks.json holds the public half of the signing key, kid = RFC 7638 thumbprint, use sig, ES256."""
    (jwk,) = json.loads(paths.jwks.read_text())["keys"]
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}  # no private "d"
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    key = serialization.load_pem_private_key(paths.signing_key.read_bytes(), password=None)
    numbers = key.public_key().public_numbers()  # type: ignore[union-attr]

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    assert (jwk["x"], jwk["y"]) == (b64(numbers.x), b64(numbers.y))
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'.encode()
    expected_kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    assert jwk["kid"] == expected_kid


# --------------------------------------------------------------------------------------- clients


def test_issue_client_registers_it(paths: PkiPaths) -> None:
    """issue writes cert + 0600 key and records SPIFFE ID, serial, expiry and scopes; no secret by default."""
    issued = issue_client(paths, "alice", scopes=["calculator:compute", "calculator:compute"], now=NOW)
    assert issued.secret is None
    assert _mode(issued.key_path) == 0o600
    client = load_registry(paths.clients_registry).by_spiffe_id("spiffe://aigis.local/client/alice")
    assert client is not None
    assert (client.name, client.scopes, client.serial, client.revoked, client.secret) == (
        "alice",
        ("calculator:compute",),
        _cert(issued.cert_path).serial_number,
        False,
        None,
    )
    assert client.not_after == _cert(issued.cert_path).not_valid_after_utc == NOW + timedelta(days=365)


def test_issue_with_secret_stores_only_its_scrypt_hash(paths: PkiPaths) -> None:
    """The generated secret is returned once; the registry keeps an scrypt hash that verifies it."""
    issued = issue_client(paths, "alice", scopes=["calculator:compute"], now=NOW, with_secret=True)
    assert issued.secret is not None and len(issued.secret) >= 43
    assert issued.secret not in repr(issued)
    assert all(issued.secret not in p.read_text(errors="replace") for p in paths.root.rglob("*") if p.is_file())
    stored = load_registry(paths.clients_registry).by_name("alice")
    assert stored is not None and stored.secret is not None
    assert verify_secret(issued.secret, stored.secret)
    assert not verify_secret(issued.secret + "x", stored.secret)


def test_issue_refuses_an_existing_client_without_force(paths: PkiPaths) -> None:
    """Issuing `demo` again without force is refused and names the client."""
    with pytest.raises(AlreadyExistsError, match="client 'demo' already exists"):
        issue_client(paths, "demo", scopes=["calculator:compute"], now=NOW)


def test_reissue_revokes_the_superseded_certificate(paths: PkiPaths) -> None:
    """Re-issuing replaces the registration and puts the old serial on the CRL (reason superseded)."""
    first = issue_client(paths, "alice", scopes=["calculator:compute"], now=NOW, with_secret=True)
    revoke_client(paths, "alice", now=NOW)
    second = issue_client(paths, "alice", scopes=["classifier:predict"], now=NOW, force=True)
    third = issue_client(paths, "alice", scopes=["classifier:predict"], now=NOW, force=True)
    client = load_registry(paths.clients_registry).by_name("alice")
    assert client is not None
    assert (client.serial, client.scopes, client.revoked, client.secret) == (
        third.serial,
        ("classifier:predict",),
        False,
        None,
    )
    assert load_crl_serials(paths) == {first.serial, second.serial}
    entry = _crl(paths).get_revoked_certificate_by_serial_number(second.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded


@pytest.mark.parametrize(
    ("name", "scopes", "message"),
    [
        pytest.param("", ["a"], "invalid client name", id="empty-name"),
        pytest.param("Alice", ["a"], "invalid client name", id="uppercase-name"),
        pytest.param("-alice", ["a"], "invalid client name", id="leading-dash"),
        pytest.param("../etc", ["a"], "invalid client name", id="path-traversal"),
        pytest.param("a/b", ["a"], "invalid client name", id="slash"),
        pytest.param("a" * 64, ["a"], "invalid client name", id="too-long"),
        pytest.param("alice", [], "at least one scope", id="no-scope"),
        pytest.param("alice", ["two words"], "invalid scope", id="scope-with-space"),
        pytest.param("alice", ['say"hi'], "invalid scope", id="scope-with-quote"),
        pytest.param("alice", ["back\\slash"], "invalid scope", id="scope-with-backslash"),
        pytest.param("alice", ["caf\u00e9"], "invalid scope", id="scope-non-ascii"),
    ],
)
def test_issue_rejects_bad_input(paths: PkiPaths, name: str, scopes: list[str], message: str) -> None:
    """Names must be safe as file names and SPIFFE paths; scopes must be RFC 6749 scope tokens."""
    with pytest.raises(PkiError, match=message):
        issue_client(paths, name, scopes=scopes, now=NOW)
    assert not list(paths.clients_dir.glob("[!d]*"))  # nothing but demo's files


def test_issue_before_init_fails_clearly(tmp_path: Path) -> None:
    """Without a PKI, issue says to run init."""
    with pytest.raises(PkiError, match="aigis certs init"):
        issue_client(PkiPaths(tmp_path), "alice", scopes=["a"], now=NOW)


# ------------------------------------------------------------------------------------ revocation


def test_revoke_puts_serial_on_a_signed_crl(paths: PkiPaths) -> None:
    """revoke adds the serial to a CA-signed CRL, keeps earlier entries and bumps the CRL number."""
    alice = issue_client(paths, "alice", scopes=["calculator:compute"], now=NOW)
    bob = issue_client(paths, "bob", scopes=["calculator:compute"], now=NOW)
    first = revoke_client(paths, "alice", now=NOW + timedelta(hours=1))
    revoke_client(paths, "bob", now=NOW + timedelta(hours=2))
    crl = _crl(paths)
    ca = _cert(paths.ca_cert)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert crl.next_update_utc is not None and crl.next_update_utc > NOW + timedelta(hours=2)
    assert {e.serial_number: e.revocation_date_utc for e in crl} == {
        alice.serial: NOW + timedelta(hours=1),
        bob.serial: NOW + timedelta(hours=2),
    }
    assert (first.serial, first.already_revoked) == (alice.serial, False)
    registry = load_registry(paths.clients_registry)
    assert [(c.name, c.revoked) for c in registry.clients] == [("alice", True), ("bob", True), ("demo", False)]


def test_revoke_twice_is_harmless(paths: PkiPaths) -> None:
    """A second revoke reports already_revoked and leaves a single CRL entry."""
    revoke_client(paths, "demo", now=NOW)
    again = revoke_client(paths, "demo", now=NOW + timedelta(minutes=1))
    assert (again.already_revoked, again.revoked_at) == (True, NOW)
    assert len(list(_crl(paths))) == 1


def test_revoke_unknown_client_fails(paths: PkiPaths) -> None:
    """Revoking a name that is not registered is an error, not a silent no-op."""
    with pytest.raises(PkiError, match="no client named 'nobody'"):
        revoke_client(paths, "nobody", now=NOW)


def test_crl_not_signed_by_the_ca_is_refused(paths: PkiPaths) -> None:
    """A CRL signed by another key cannot un-revoke anything: loading it fails."""
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_cert(paths.ca_cert).subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
        .sign(other_key, hashes.SHA256())
    )
    paths.crl.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="signature does not verify"):
        load_crl_serials(paths)
    with pytest.raises(PkiError, match="signature does not verify"):
        revoke_client(paths, "demo", now=NOW)


def test_list_clients(paths: PkiPaths) -> None:
    """list shows every client with hex serial, expiry, revoked flag, scopes and whether it has a secret."""
    alice = issue_client(paths, "alice", scopes=["classifier:predict"], now=NOW, with_secret=True)
    revoke_client(paths, "alice", now=NOW)
    listed = list_clients(paths)
    assert [(c.name, c.revoked, c.scopes, c.has_secret) for c in listed] == [
        ("alice", True, ("classifier:predict",), True),
        ("demo", False, DEMO_SCOPES, False),
    ]
    assert listed[0].serial == format(alice.serial, "x")
    assert listed[0].not_after == alice.not_after


# -------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(lambda d: d.update(version=2), "version", id="unknown-version"),
        pytest.param(lambda d: d.pop("trust_domain"), "trust_domain", id="no-trust-domain"),
        pytest.param(
            lambda d: d["clients"].update(twin={**d["clients"]["demo"]}), "share a spiffe_id", id="shared-spiffe-id"
        ),
        pytest.param(lambda d: d["clients"]["demo"].update(scopes="all"), "scopes", id="scopes-not-a-list"),
        pytest.param(lambda d: d["clients"]["demo"].update(revoked="no"), "revoked", id="revoked-not-bool"),
        pytest.param(lambda d: d["clients"]["demo"].update(serial=12), "serial", id="serial-not-hex"),
        pytest.param(lambda d: d["clients"]["demo"].update(not_after="2030-01-01"), "not_after", id="naive-time"),
        pytest.param(
            lambda d: d["clients"]["demo"].update(
                secret={"alg": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
                        "hash": "AAAAAAAAAAAAAAAAAAAAAA=="}
            ),
            "out of range",
            id="scrypt-cost-too-high",
        ),
        pytest.param(lambda d: d["clients"]["demo"].update(secret={"alg": "md5"}), "scrypt", id="not-scrypt"),
        pytest.param(lambda d: d["clients"].update({"Bad Name": d["clients"].pop("demo")}), "name", id="bad-name"),
    ],
)
def test_malformed_registry_is_refused(
    paths: PkiPaths, mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    """Any malformed entry makes loading fail with a message naming the key: callers fail closed."""
    data = json.loads(paths.clients_registry.read_text())
    mutate(data)
    paths.clients_registry.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=message):
        load_registry(paths.clients_registry)


def test_registry_save_is_atomic_and_private(tmp_path: Path) -> None:
    """save_registry leaves no temp files and writes mode 0600, even over a looser file."""
    target = tmp_path / "clients.json"
    target.write_text("{}")
    target.chmod(0o644)
    save_registry(target, ClientRegistry(trust_domain="example.org"))
    assert [p.name for p in tmp_path.iterdir()] == ["clients.json"]
    assert _mode(target) == 0o600
    assert load_registry(target) == ClientRegistry(trust_domain="example.org")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_prints_no_private_key_and_the_secret_exactly_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aigis certs` output never contains key material; a new secret appears once, with a warning."""
    root = str(tmp_path / "certs")
    assert cli_main(["certs", "init", "--dir", root]) == 0
    assert cli_main(["certs", "issue", "alice", "--dir", root, "--scope", "a b", "--with-secret"]) == 0
    out, err = capsys.readouterr()
    stored = load_registry(PkiPaths(Path(root)).clients_registry).by_name("alice")
    assert stored is not None and stored.scopes == ("a", "b") and stored.secret is not None
    (secret_line,) = [line for line in out.splitlines() if line.startswith("client secret: ")]
    secret = secret_line.removeprefix("client secret: ")
    assert verify_secret(secret, stored.secret)
    assert (out + err).count(secret) == 1
    assert "shown only this once" in err
    assert cli_main(["certs", "revoke", "alice", "--dir", root]) == 0
    assert cli_main(["certs", "list", "--dir", root]) == 0
    out, err = capsys.readouterr()
    assert "PRIVATE KEY" not in out + err
    assert "alice            revoked" in out


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused operation (a usage mistake) exits 2 with a one-line error, not a traceback."""
    root = str(tmp_path / "certs")
    assert cli_main(["certs", "init", "--dir", root]) == 0
    assert cli_main(["certs", "init", "--dir", root]) == 2
    assert cli_main(["certs", "revoke", "nobody", "--dir", root]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"aigis certs: error: {root}/ca.pem already exists; use --force to overwrite it",
        "aigis certs: error: no client named 'nobody'",
    ]
