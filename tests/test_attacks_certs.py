"""Attacks with client certificates, against the real server over real mTLS.

Two layers refuse bad certificates. The TLS handshake (grpc's BoringSSL, `require_client_auth`)
refuses what does not chain to our CA or is out of date or of the wrong purpose: the client sees
UNAVAILABLE and no Python runs, so these attempts cannot be audited per request (README). What the
handshake lets through meets the client-certificate policy (auth/identity.py: cryptography's client
verifier, exactly one SPIFFE ID in `aigis.local`) and the CRL: UNAUTHENTICATED, audited.

Every bad certificate is built once per module with cryptography (tests/pki_factory.py), signed by
the stack's real CA key, another CA, or itself; each case presents a token that would otherwise be
accepted, so the certificate is the only thing wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from calls import RPC_KINDS, assert_denied, assert_serving, bearer, channel, pem_channel, run
from cryptography import x509
from forge import factory, valid_claims
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki_factory import SERVER_AUTH, Authority, ClientCert, intermediate, leaf, spiffe

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
ANY_EKU = x509.ObjectIdentifier("2.5.29.37.0")  # anyExtendedKeyUsage (RFC 5280 §4.2.1.12)


@dataclass(frozen=True)
class Keys:
    """Signers for the bad certificates: our real CA, an attacker's CA, and one named like ours."""

    ca: Authority
    other: Authority
    lookalike: Authority
    now: datetime


Builder = Callable[[Keys], ClientCert]


def _under_rogue_ca(keys: Keys) -> ClientCert:
    rogue = intermediate(keys.ca, keys.now)
    return leaf(rogue, keys.now, chain=[rogue.cert])


# Refused by the TLS handshake: UNAVAILABLE, nothing audited.
HANDSHAKE_REFUSED: dict[str, Builder] = {
    "self-signed": lambda k: leaf(None, k.now),
    "signed-by-another-ca": lambda k: leaf(k.other, k.now),
    "another-ca-with-our-ca-name": lambda k: leaf(k.lookalike, k.now),
    "expired": lambda k: leaf(k.ca, k.now, not_before=timedelta(days=-30), not_after=timedelta(days=-1)),
    "not-yet-valid": lambda k: leaf(k.ca, k.now, not_before=timedelta(days=1), not_after=timedelta(days=30)),
    "server-auth-eku-only": lambda k: leaf(k.ca, k.now, eku=[SERVER_AUTH]),
    "any-eku-only": lambda k: leaf(k.ca, k.now, eku=[ANY_EKU]),
    "ca-certificate-without-digital-signature": lambda k: leaf(k.ca, k.now, ca=True, digital_signature=False),
}

# Through the handshake, refused by the client-certificate policy: UNAUTHENTICATED cert_invalid.
POLICY_REFUSED: dict[str, Builder] = {
    # BoringSSL accepts a CA certificate as a TLS client certificate; our policy does not.
    "ca-certificate-as-client": lambda k: leaf(k.ca, k.now, ca=True),
    # BoringSSL does not enforce our CA's pathlen:0 here: a CA:TRUE certificate our CA signed
    # (e.g. the one above) could mint clients the handshake accepts. The policy refuses the chain.
    "leaf-under-rogue-intermediate": _under_rogue_ca,
    "dns-san-only": lambda k: leaf(k.ca, k.now, sans=[x509.DNSName("demo.aigis.local")]),
    "no-san-at-all": lambda k: leaf(k.ca, k.now, sans=[]),
    "non-spiffe-uri-san": lambda k: leaf(
        k.ca, k.now, sans=[x509.UniformResourceIdentifier("https://aigis.local/demo")]
    ),
    "two-spiffe-uri-sans": lambda k: leaf(k.ca, k.now, sans=[spiffe("client/demo"), spiffe("client/admin")]),
    "spiffe-id-in-another-trust-domain": lambda k: leaf(k.ca, k.now, sans=[spiffe("client/demo", "evil.local")]),
    "trust-domain-as-prefix": lambda k: leaf(k.ca, k.now, sans=[spiffe("client/demo", "aigis.local.evil.example")]),
    "trust-domain-in-uppercase": lambda k: leaf(k.ca, k.now, sans=[spiffe("client/demo", "AIGIS.LOCAL")]),
    "trust-domain-with-userinfo": lambda k: leaf(k.ca, k.now, sans=[spiffe("client/demo", "evil@aigis.local")]),
    # Both BoringSSL and cryptography's client verifier accept a certificate without an EKU; the
    # policy requires clientAuth to be stated.
    "no-eku-extension": lambda k: leaf(k.ca, k.now, eku=None),
}


@pytest.fixture(scope="module")
def keys(stack: Any) -> Keys:
    now = datetime.now(UTC)
    real = Authority.load(stack.pki)
    common_name = real.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    lookalike = Authority.create(str(common_name), now)
    assert lookalike.cert.subject == real.cert.subject
    return Keys(real, Authority.create("attacker CA", now), lookalike, now)


@pytest.fixture(scope="module")
def bad_certs(keys: Keys) -> dict[str, ClientCert]:
    """Every bad certificate, generated once for the module."""
    return {name: build(keys) for name, build in (HANDSHAKE_REFUSED | POLICY_REFUSED).items()}


def _token(stack: Any) -> tuple[tuple[str, str], ...]:
    """A token that is valid in every respect (so only the certificate can be wrong)."""
    return bearer(factory(stack).make(**valid_claims("demo")))


@pytest.mark.parametrize("kind", ["unary", "bidi"])
@pytest.mark.parametrize("attack", list(HANDSHAKE_REFUSED))
def test_handshake_refuses_certificate(stack: Any, bad_certs: dict[str, ClientCert], attack: str, kind: str) -> None:
    """The TLS handshake refuses the certificate: UNAVAILABLE, no audit record; the server still serves."""
    cert = bad_certs[attack]
    before = len(stack.audit_records())
    with pem_channel(stack, cert.chain_pem, cert.key_pem) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, _token(stack)))
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.request_id is None
    assert stack.audit_records()[before:] == []
    assert_serving(stack, kind)


@pytest.mark.parametrize("kind", ["unary", "bidi"])
def test_no_client_certificate_fails_the_handshake(stack: Any, kind: str) -> None:
    """A TLS client without a certificate is refused in the handshake: UNAVAILABLE, nothing audited."""
    before = len(stack.audit_records())
    with pem_channel(stack, None, None) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, _token(stack)))
    assert (outcome.code, outcome.request_id) == (grpc.StatusCode.UNAVAILABLE, None)
    assert stack.audit_records()[before:] == []
    assert_serving(stack, kind)


@pytest.mark.parametrize("kind", ["unary", "bidi"])
def test_server_certificate_used_as_client_fails_the_handshake(stack: Any, kind: str) -> None:
    """The server's own certificate and key (serverAuth EKU) do not work as a client: UNAVAILABLE."""
    before = len(stack.audit_records())
    with pem_channel(stack, stack.pki.server_cert.read_bytes(), stack.pki.server_key.read_bytes()) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, _token(stack)))
    assert (outcome.code, outcome.request_id) == (grpc.StatusCode.UNAVAILABLE, None)
    assert stack.audit_records()[before:] == []
    assert_serving(stack, kind)


@pytest.mark.parametrize("kind", list(RPC_KINDS))
@pytest.mark.parametrize("attack", list(POLICY_REFUSED))
def test_client_certificate_policy_refuses(
    stack: Any, bad_certs: dict[str, ClientCert], attack: str, kind: str
) -> None:
    """A certificate the handshake accepts but the policy does not: UNAUTHENTICATED `cert_invalid`, audited."""
    cert = bad_certs[attack]
    before = len(stack.audit_records())
    with pem_channel(stack, cert.chain_pem, cert.key_pem) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, _token(stack)))
    record = assert_denied(stack, before, outcome, UNAUTH, "cert_invalid")
    assert record["principal"] == ""  # an unacceptable certificate names nobody
    assert record["rpc_method"].startswith("/aigis.calculator.v1.Calculator/")
    assert_serving(stack, kind)


def _health(ch: grpc.Channel, md: Any) -> Any:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), metadata=md, timeout=10)


REVOKED = {
    # Revocation is checked before the token: no token is needed to be refused as revoked.
    "revoked-without-token": (lambda ch: RPC_KINDS["unary"](ch, ()), "/aigis.calculator.v1.Calculator/Add"),
    "revoked-on-streaming-without-token": (
        lambda ch: RPC_KINDS["client_streaming"](ch, ()),
        "/aigis.calculator.v1.Calculator/Sum",
    ),
    # Health needs only a certificate, and a revoked one is not enough.
    "revoked-on-health-check": (lambda ch: _health(ch, ()), "/grpc.health.v1.Health/Check"),
}


@pytest.mark.parametrize("attack", list(REVOKED))
def test_revoked_certificate_is_refused_everywhere(stack: Any, attack: str) -> None:
    """A revoked certificate is UNAUTHENTICATED `cert_revoked` before any token or policy check."""
    call, method = REVOKED[attack]
    before = len(stack.audit_records())
    with channel(stack, "revoked") as ch:
        outcome = run(lambda: call(ch))
    record = assert_denied(stack, before, outcome, UNAUTH, "cert_revoked")
    assert record["rpc_method"] == method
    assert record["principal"] == "spiffe://aigis.local/client/revoked"
    assert_serving(stack)
