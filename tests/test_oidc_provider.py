"""A real external identity provider: node's oidc-provider (a certified OpenID provider) on loopback.

aigis is configured with the IdP's issuer URL alone; the key set is found by OpenID discovery. The
IdP issues ES256 JWT access tokens (typ at+jwt) by client credentials with a resource indicator,
unbound (client_secret_basic) or certificate-bound (tls_client_auth, RFC 8705). The IdP runs over
HTTPS with the test PKI's server certificate and client-certificate requests. `.ci/run` installs it
(`npm ci --prefix tests/idp`); without node or the package the module is skipped, except in CI.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from calls import Outcome, bearer, channel, run
from conftest import CALC, RunningStack, make_pki
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from jwt_factory import TokenFactory, generate_key
from private_stack import private_stack

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.server.config import ExternalIssuer

IDP_DIR = Path(__file__).parent / "idp"
RESOURCE = "https://aigis.test"
AUDIENCE = "aigis"
SPIFFE_DEMO = "spiffe://aigis.local/client/demo"
SECRET = "a-test-secret-of-the-plain-client-0123456789"


def _node_ready() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed (npm ci --prefix tests/idp)"
    return None


_missing = _node_ready()
if _missing is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the real-IdP tests: {_missing}")
    pytest.skip(_missing, allow_module_level=True)


def _signing_key(kid: str) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


@dataclass
class Idp:
    """A running oidc-provider and what tests need to ask it for tokens."""

    issuer: str
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    jwks_file: Path

    def token(self, stack: RunningStack, *, client: str | None = None, scope: str = CALC) -> str:
        """A token by client credentials: `client`'s certificate (tls_client_auth), else the secret."""
        context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
        form = {"grant_type": "client_credentials", "scope": scope}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if client is not None:
            context.load_cert_chain(str(stack.pki.client_cert(client)), str(stack.pki.client_key(client)))
            form["client_id"] = "bound"
        else:
            basic = base64.b64encode(f"plain:{SECRET}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        request = urllib.request.Request(
            self.issuer + "/token", data=urllib.parse.urlencode(form).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return json.loads(response.read())["access_token"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"IdP refused the token request: {err.code} {err.read()!r}") from None

    def rotate(self, keys: list[dict[str, Any]]) -> None:
        """Publish `keys` (first one signs) and wait until the IdP has reloaded them."""
        self.jwks_file.write_text(json.dumps({"keys": keys}))
        self.process.send_signal(signal.SIGHUP)
        self.wait_for("RELOADED ")

    def wait_for(self, prefix: str) -> str:
        """The next stdout line starting with `prefix` (oidc-provider prints notices there too)."""
        deadline = time.monotonic() + 30
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
        raise AssertionError(f"oidc-provider printed no {prefix.strip()!r} line within 30 s")


def _start_idp(root: Path, stack_pki: Any, keys: list[dict[str, Any]]) -> Idp:
    jwks_file = root / "idp-jwks.json"
    jwks_file.write_text(json.dumps({"keys": keys}))
    jwks_file.chmod(0o600)
    config = {
        "tls": {"cert": str(stack_pki.server_cert), "key": str(stack_pki.server_key), "ca": str(stack_pki.ca_cert)},
        "jwks_file": str(jwks_file),
        "resource": RESOURCE,
        "audience": AUDIENCE,
        "scope": f"{CALC} classifier:predict",
        "clients": [
            {
                "client_id": "plain",
                "client_secret": SECRET,
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "client_secret_basic",
            },
            {
                "client_id": "bound",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_san_uri": SPIFFE_DEMO,
                "tls_client_certificate_bound_access_tokens": True,
            },
        ],
    }
    config_file = root / "idp.json"
    config_file.write_text(json.dumps(config))
    process = subprocess.Popen(
        ["node", str(IDP_DIR / "idp.mjs"), str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=IDP_DIR,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, name="idp-stdout", daemon=True).start()
    idp = Idp("", process, lines, jwks_file)
    try:
        idp.issuer = idp.wait_for("ISSUER ").split(" ", 1)[1]
    except AssertionError:
        process.kill()
        process.wait(timeout=10)
        raise
    return idp


@dataclass
class World:
    idp: Idp
    stack: RunningStack
    first_key: dict[str, Any]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("oidc")
    first_key = _signing_key("idp-key-1")
    # The stack's PKI is made first (the IdP serves with its server certificate); the IdP's issuer
    # URL, known once it listens, is then the only thing aigis is told about it.
    pki, _ = make_pki(root / "certs", datetime.now(UTC))
    idp = _start_idp(root, pki, [first_key])
    try:
        external = ExternalIssuer(idp.issuer, AUDIENCE, ca_file=pki.ca_cert)
        with private_stack(
            root, pki=pki, external_issuers=(external,), jwks_min_refetch_seconds=1.0
        ) as stack:
            yield World(idp, stack, first_key)
    finally:
        idp.process.terminate()
        try:
            idp.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            idp.process.kill()
            idp.process.wait(timeout=10)
        if idp.process.stdout is not None:
            idp.process.stdout.close()


def add(stack: RunningStack, client: str, token: str) -> Outcome:
    with channel(stack, client) as ch:
        stub = calc_grpc.CalculatorStub(ch)
        return run(lambda: stub.Add(calc.AddRequest(a=2, b=3), metadata=bearer(token), timeout=10).sum)


def jwks_fetches(stack: RunningStack, issuer: str, result: str) -> float:
    """aigis_jwks_fetches_total for `issuer` and `result` (ok / failed)."""
    sample = stack.server.metrics.registry.get_sample_value(
        "aigis_jwks_fetches_total", {"issuer": issuer, "result": result}
    )
    return sample or 0.0


def _audit_reason(stack: RunningStack, request_id: str | None) -> str | None:
    assert request_id is not None
    for record in reversed(stack.audit_records()):
        if record.get("request_id") == request_id:
            return record.get("reason")
    raise AssertionError(f"no audit record for request {request_id}")


def test_idp_tokens_are_rfc9068_es256(world: World) -> None:
    """The IdP really issues what the tests claim: ES256, typ at+jwt, our audience, its issuer."""
    token = world.idp.token(world.stack)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (header["alg"], header["typ"], header["kid"]) == ("ES256", "at+jwt", "idp-key-1")
    assert (claims["iss"], claims["aud"], claims["client_id"]) == (world.idp.issuer, AUDIENCE, "plain")
    assert "cnf" not in claims


def test_unbound_token_from_the_idp_is_accepted_through_discovery(world: World) -> None:
    """Configured by issuer URL alone, aigis finds the IdP's keys and serves its token's call."""
    outcome = add(world.stack, "demo", world.idp.token(world.stack))
    assert (outcome.code, outcome.value) == (grpc.StatusCode.OK, 5)
    assert jwks_fetches(world.stack, world.idp.issuer, "ok") >= 1


def test_token_without_the_needed_scope_is_refused(world: World) -> None:
    """Scopes from the IdP's `scope` claim meet the policy: calculator needs calculator:compute."""
    outcome = add(world.stack, "demo", world.idp.token(world.stack, scope="classifier:predict"))
    assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
    assert _audit_reason(world.stack, outcome.request_id) == "scope_missing"


def test_certificate_bound_token_works_only_over_its_certificate(world: World) -> None:
    """tls_client_auth at the IdP gives a cnf-bound token: good over that certificate, refused over another."""
    token = world.idp.token(world.stack, client="demo")
    assert "x5t#S256" in jwt.decode(token, options={"verify_signature": False})["cnf"]
    assert add(world.stack, "demo", token).code is grpc.StatusCode.OK
    stolen = add(world.stack, "reader", token)
    assert stolen.code is grpc.StatusCode.UNAUTHENTICATED
    assert _audit_reason(world.stack, stolen.request_id) == "token_cert_mismatch"


def test_idp_key_rotation_is_followed(world: World) -> None:
    """A new signing key is fetched on its first token (after the 1 s refetch floor); once the old
    key is withdrawn, tokens it signed stop verifying, cached or not."""
    old_token = world.idp.token(world.stack)
    assert add(world.stack, "demo", old_token).code is grpc.StatusCode.OK
    new_key = _signing_key("idp-key-2")
    world.idp.rotate([new_key, world.first_key])
    new_token = world.idp.token(world.stack)
    assert jwt.get_unverified_header(new_token)["kid"] == "idp-key-2"
    deadline = time.monotonic() + 10
    outcome = add(world.stack, "demo", new_token)
    while outcome.code is not grpc.StatusCode.OK and time.monotonic() < deadline:
        assert _audit_reason(world.stack, outcome.request_id) == "token_unknown_key"  # until the refetch
        time.sleep(0.3)
        outcome = add(world.stack, "demo", new_token)
    assert outcome.code is grpc.StatusCode.OK
    assert add(world.stack, "demo", old_token).code is grpc.StatusCode.OK  # both keys published

    world.idp.rotate([new_key])  # the old key withdrawn
    time.sleep(1.2)  # past the refetch floor; an unknown kid makes aigis look again
    probe = TokenFactory(
        generate_key("ES256", kid="not-published"), issuer=world.idp.issuer, audience=AUDIENCE, now=time.time()
    )
    add(world.stack, "demo", probe.make(scope=CALC))  # refetches: the set changed
    refused = add(world.stack, "demo", old_token)
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert _audit_reason(world.stack, refused.request_id) == "token_unknown_key"
    assert add(world.stack, "demo", new_token).code is grpc.StatusCode.OK


def test_unreachable_idp_is_unavailable_not_unauthenticated(tmp_path: Path) -> None:
    """An issuer whose keys were never fetched and cannot be: UNAVAILABLE, audited as token_keys_unavailable."""
    dead = "https://localhost:9"  # discard port: nothing listens
    external = ExternalIssuer(dead, AUDIENCE)
    with private_stack(tmp_path, external_issuers=(external,)) as stack:
        token = TokenFactory(generate_key("ES256"), issuer=dead, audience=AUDIENCE, now=time.time()).make(scope=CALC)
        outcome = add(stack, "demo", token)
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
        assert "retry later" in outcome.details
        assert _audit_reason(stack, outcome.request_id) == "token_keys_unavailable"
        assert jwks_fetches(stack, dead, "failed") == 1
        assert jwks_fetches(stack, dead, "ok") == 0
