"""Every RPC kind is denied before its servicer runs, with the exact status and audit reason.

Each case runs against the real server over real mTLS, with real tokens (from the real issuer, or
signed by the issuer's real key with one thing wrong). Each asserts: the status code, a generic
message, a request id in the trailers, exactly one new audit record with that request id and the
exact reason, and that the server still serves the next valid call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from calls import EXPECTED, RPC_KINDS, bearer, channel, issuer_token, run
from cryptography.hazmat.primitives import serialization
from jwt_factory import SigningKey, TokenFactory, generate_key

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def real_key(stack: Any) -> SigningKey:
    """The embedded issuer's own signing key, to forge tokens that differ in one claim only."""
    private_key = serialization.load_pem_private_key(stack.pki.signing_key.read_bytes(), password=None)
    kid = json.loads(stack.pki.jwks.read_text())["keys"][0]["kid"]
    return SigningKey(kid, "ES256", private_key)  # type: ignore[arg-type]


def factory(stack: Any) -> TokenFactory:
    return TokenFactory(real_key(stack), issuer=stack.issuer_url, audience="aigis", now=time.time())


def forged_same_kid(stack: Any) -> str:
    """Signed by an attacker's key that claims the issuer's kid."""
    attacker = generate_key("ES256", kid=real_key(stack).kid)
    return factory(stack).make(key=attacker, scope="calculator:compute classifier:predict")


@dataclass(frozen=True)
class Attack:
    client: str  # whose certificate the connection presents
    metadata: Callable[[Any], tuple[tuple[str, str], ...]]
    code: grpc.StatusCode
    reason: str


ALL_SCOPES = "calculator:compute classifier:predict"
ATTACKS = {
    "no-token": Attack("demo", lambda s: (), UNAUTH, "token_missing"),
    "bad-signature": Attack("demo", lambda s: bearer(forged_same_kid(s)), UNAUTH, "token_bad_signature"),
    "expired": Attack(
        "demo",
        lambda s: bearer(factory(s).make(iat=int(time.time()) - 3600, exp=int(time.time()) - 600, scope=ALL_SCOPES)),
        UNAUTH,
        "token_expired",
    ),
    "wrong-audience": Attack(
        "demo", lambda s: bearer(factory(s).make(aud="someone-else", scope=ALL_SCOPES)), UNAUTH, "token_wrong_audience"
    ),
    "wrong-issuer": Attack(
        "demo",
        lambda s: bearer(factory(s).make(iss="https://evil.example", scope=ALL_SCOPES)),
        UNAUTH,
        "token_wrong_issuer",
    ),
    "missing-scope": Attack("reader", lambda s: bearer(issuer_token(s, "reader")), DENIED, "scope_missing"),
    "revoked-certificate": Attack(
        "revoked",
        lambda s: bearer(factory(s).make(sub="revoked", client_id="revoked", scope=ALL_SCOPES)),
        UNAUTH,
        "cert_revoked",
    ),
    "policy-deny-rule": Attack("blocked", lambda s: bearer(issuer_token(s, "blocked")), DENIED, "policy_denied"),
}


@pytest.mark.parametrize("kind", list(RPC_KINDS))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_denied_before_servicer(stack: Any, attack: str, kind: str) -> None:
    """The attack is refused with its exact status and audit reason; the next valid call works."""
    case = ATTACKS[attack]
    before = len(stack.audit_records())
    with channel(stack, case.client) as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, case.metadata(stack)))
    assert outcome.code == case.code
    assert outcome.details in {"request could not be authenticated", "request is not permitted"}
    assert outcome.request_id
    records = stack.audit_records()[before:]
    assert len(records) == 1
    record = records[0]
    assert record["reason"] == case.reason
    assert record["request_id"] == outcome.request_id
    assert record["authorized"] is False
    assert record["rpc_method"].startswith("/aigis.calculator.v1.Calculator/")
    # The server keeps serving.
    with channel(stack, "demo") as ch:
        assert run(lambda: RPC_KINDS[kind](ch, bearer(issuer_token(stack, "demo")))).value == EXPECTED[kind]


def test_audit_record_has_the_a59_fields_and_no_token(stack: Any) -> None:
    """A denial record carries the documented fields and never the token."""
    token = issuer_token(stack, "reader")
    with channel(stack, "reader") as ch:
        outcome = run(lambda: RPC_KINDS["unary"](ch, bearer(token)))
    record = next(r for r in stack.audit_records() if r["request_id"] == outcome.request_id)
    assert set(record) == {
        "timestamp", "request_id", "rpc_method", "authorized", "reason", "principal", "peer",
        "client_id", "sub", "policy_name", "matched_rule", "seq", "prev", "chain",
    }  # fmt: skip
    assert record["principal"] == "spiffe://aigis.local/client/reader"
    assert record["client_id"] == record["sub"] == "reader"
    assert record["rpc_method"] == "/aigis.calculator.v1.Calculator/Add"
    assert record["policy_name"] and record["matched_rule"]
    assert record["timestamp"].endswith("Z")
    assert record["peer"].startswith("ipv")
    assert token not in stack.audit_log.read_text()
    assert token.split(".")[2] not in stack.audit_log.read_text()
