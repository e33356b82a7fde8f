"""Attacks on the authorization policy, against a private server running the policy below.

The caller is always identified (a good certificate from our CA, and a real token from the embedded
issuer unless the case says otherwise), so a refusal is PERMISSION_DENIED with `policy_denied`,
`no_matching_rule` or `scope_missing`, or UNAUTHENTICATED `token_missing` when a matching rule needs a
token. Each case asserts the audit record's reason and matched rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from calls import EXPECTED, RPC_KINDS, assert_denied, assert_serving, bearer, channel, issuer_token, run
from forge import factory, valid_claims
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt_factory import REMOVE
from private_stack import private_stack

from aigis.classifier.v1 import classifier_pb2 as cls
from aigis.classifier.v1 import classifier_pb2_grpc as cls_grpc

CALCULATOR = "/aigis.calculator.v1.Calculator/*"
CLIENT = "spiffe://aigis.local/client/"
POLICY = {
    "name": "attack-policy",
    "deny_rules": [
        {"name": "deny-intruder", "source": {"principals": [CLIENT + "intruder"]}},
        {"name": "deny-red-tenant", "request": {"headers": [{"key": "x-tenant", "values": ["red"]}]}},
    ],
    "allow_rules": [
        # Would allow the intruder everything on the calculator, without a token: the deny rule wins.
        {
            "name": "intruder-calculator",
            "source": {"principals": [CLIENT + "intruder"]},
            "request": {"paths": [CALCULATOR]},
        },
        {
            "name": "team-calculator",
            "source": {"principals": [CLIENT + "team-*"]},
            "request": {"paths": [CALCULATOR]},
            "scopes": ["calculator:compute"],
        },
        {
            "name": "ops-add",
            "source": {"principals": ["*-ops"]},
            "request": {"paths": ["/aigis.calculator.v1.Calculator/Add"]},
        },
        {
            "name": "gated-calculator",
            "source": {"principals": [CLIENT + "gated"]},
            "request": {"paths": [CALCULATOR], "headers": [{"key": "x-tenant", "values": ["blue", "green-*"]}]},
            "scopes": ["calculator:compute"],
        },
    ],
}
CLIENTS = ("team-alpha", "teamalpha", "db-ops", "db-ops-evil", "intruder", "gated", "outsider")

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def pstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with private_stack(tmp_path_factory.mktemp("attack-policy"), clients=CLIENTS, policy=POLICY) as running:
        yield running


def real(client: str, scope: str | None = None) -> Callable[[Any], Metadata]:
    """A real token from the issuer over `client`'s certificate (bound to it)."""
    return lambda s: bearer(issuer_token(s, client, scope))


def forged(client: str, **claims: Any) -> Callable[[Any], Metadata]:
    """A token from the real issuer key for `client`, with `claims` overridden (REMOVE drops one)."""
    return lambda s: bearer(factory(s).make(**{**valid_claims(client), **claims}))


def with_headers(token: Callable[[Any], Metadata], *headers: tuple[str, str]) -> Callable[[Any], Metadata]:
    return lambda s: (*token(s), *headers)


def _classify(ch: grpc.Channel, md: Metadata) -> Any:
    return cls_grpc.ImageClassificationServiceStub(ch).ClassifyImage(cls.Image(data=b"x"), metadata=md, timeout=10)


def _classify_stream(ch: grpc.Channel, md: Metadata) -> Any:
    stub = cls_grpc.ImageClassificationServiceStub(ch)
    return list(stub.ClassifyStream(iter([cls.Image(data=b"x")]), metadata=md, timeout=10))


def _health(ch: grpc.Channel, md: Metadata) -> Any:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)


CALLS: dict[str, Callable[[grpc.Channel, Metadata], Any]] = {
    **RPC_KINDS,
    "classify": _classify,
    "classify_stream": _classify_stream,
    "health": _health,
}


@dataclass(frozen=True)
class Attack:
    client: str  # whose certificate the connection presents
    metadata: Callable[[Any], Metadata]
    code: grpc.StatusCode
    reason: str
    matched_rule: str = ""


def every(kinds: list[str], attack: Attack) -> dict[str, Attack]:
    return {kind: attack for kind in kinds}


ALL_KINDS = list(RPC_KINDS)
# attack -> call -> expected outcome
ATTACKS: dict[str, dict[str, Attack]] = {
    "deny-rule-beats-allow-rule": every(
        ALL_KINDS, Attack("intruder", real("intruder"), DENIED, "policy_denied", "deny-intruder")
    ),
    "deny-rule-on-header-value": every(
        ["unary", "bidi"],
        Attack(
            "team-alpha",
            with_headers(real("team-alpha"), ("x-tenant", "red")),
            DENIED,
            "policy_denied",
            "deny-red-tenant",
        ),
    ),
    "principal-prefix-lookalike": every(["unary"], Attack("teamalpha", real("teamalpha"), DENIED, "no_matching_rule")),
    "principal-suffix-lookalike": every(
        ["unary"], Attack("db-ops-evil", real("db-ops-evil"), DENIED, "no_matching_rule")
    ),
    "suffix-principal-on-unlisted-method": every(
        ["client_streaming", "server_streaming"], Attack("db-ops", real("db-ops"), DENIED, "no_matching_rule")
    ),
    "path-wildcard-does-not-reach-other-service": every(
        ["classify", "classify_stream"], Attack("team-alpha", real("team-alpha"), DENIED, "no_matching_rule")
    ),
    "standard-service-not-in-policy": every(
        ["health"], Attack("team-alpha", real("team-alpha"), DENIED, "no_matching_rule")
    ),
    "principal-in-no-rule": every(["unary", "bidi"], Attack("outsider", real("outsider"), DENIED, "no_matching_rule")),
    "required-header-absent": every(["unary", "bidi"], Attack("gated", real("gated"), DENIED, "no_matching_rule")),
    "required-header-wrong-value": every(
        ["unary"], Attack("gated", with_headers(real("gated"), ("x-tenant", "purple")), DENIED, "no_matching_rule")
    ),
    "required-header-value-with-suffix": every(
        ["unary"], Attack("gated", with_headers(real("gated"), ("x-tenant", "blueish")), DENIED, "no_matching_rule")
    ),
    "required-header-value-in-uppercase": every(
        ["unary"], Attack("gated", with_headers(real("gated"), ("x-tenant", "BLUE")), DENIED, "no_matching_rule")
    ),
    "required-header-repeated": every(  # A41: repeated values are joined: "blue,blue" is not "blue"
        ["unary"],
        Attack(
            "gated", with_headers(real("gated"), ("x-tenant", "blue"), ("x-tenant", "blue")), DENIED, "no_matching_rule"
        ),
    ),
    "required-header-right-but-no-token": every(
        ["unary"], Attack("gated", lambda s: (("x-tenant", "blue"),), UNAUTH, "token_missing", "gated-calculator")
    ),
    "token-missing-for-scoped-rule": every(
        ALL_KINDS, Attack("team-alpha", lambda s: (), UNAUTH, "token_missing", "team-calculator")
    ),
    "scope-missing": every(
        ["unary", "bidi"],
        Attack("team-alpha", real("team-alpha", "classifier:predict"), DENIED, "scope_missing", "team-calculator"),
    ),
    "scope-lookalikes": every(
        ["unary"],
        Attack(
            "team-alpha",
            forged("team-alpha", scope="calculator:compute-all calculator: Calculator:compute"),
            DENIED,
            "scope_missing",
            "team-calculator",
        ),
    ),
    "scope-as-one-comma-separated-token": every(
        ["unary"],
        Attack(
            "team-alpha",
            forged("team-alpha", scope="classifier:predict,calculator:compute"),
            DENIED,
            "scope_missing",
            "team-calculator",
        ),
    ),
    "scp-list-without-the-scope": every(
        ["unary"],
        Attack(
            "team-alpha",
            forged("team-alpha", scope=REMOVE, scp=["classifier:predict"]),
            DENIED,
            "scope_missing",
            "team-calculator",
        ),
    ),
    "scope-wins-over-scp": every(  # RFC 9068 `scope` is read; a broader `scp` beside it is ignored
        ["unary"],
        Attack(
            "team-alpha",
            forged("team-alpha", scope="classifier:predict", scp=["calculator:compute"]),
            DENIED,
            "scope_missing",
            "team-calculator",
        ),
    ),
    # A rule that needs no token does not make a bad token acceptable: every presented token is verified.
    "bad-token-where-none-is-needed": every(
        ["unary"], Attack("db-ops", lambda s: bearer("not-a-jwt"), UNAUTH, "token_malformed")
    ),
}
CASES = [pytest.param(attack, call, id=f"{attack}-{call}") for attack, calls in ATTACKS.items() for call in calls]


@pytest.mark.parametrize(("attack", "call"), CASES)
def test_policy_refuses(pstack: Any, attack: str, call: str) -> None:
    """The policy refuses the call with the exact status, reason and matched rule; the server still serves."""
    case = ATTACKS[attack][call]
    md = case.metadata(pstack)
    before = len(pstack.audit_records())
    with channel(pstack, case.client) as ch:
        outcome = run(lambda: CALLS[call](ch, md))
    record = assert_denied(pstack, before, outcome, case.code, case.reason)
    assert record["principal"] == CLIENT + case.client
    assert record["matched_rule"] == case.matched_rule
    if case.reason in {"policy_denied", "no_matching_rule", "scope_missing", "token_missing"}:
        assert record["policy_name"] == "attack-policy"
    assert_serving(pstack, call if call in RPC_KINDS else "unary", client="team-alpha")


# What the same policy allows, next to what it refuses.
ALLOWED: dict[str, tuple[str, str, Callable[[Any], Metadata]]] = {
    "prefix-principal-with-scope": ("team-alpha", "bidi", real("team-alpha")),
    "suffix-principal-without-token": ("db-ops", "unary", lambda s: ()),
    "required-header-exact-value": ("gated", "unary", with_headers(real("gated"), ("x-tenant", "blue"))),
    "required-header-prefix-value": (
        "gated",
        "client_streaming",
        with_headers(real("gated"), ("x-tenant", "green-east")),
    ),
    "scp-list-instead-of-scope": (
        "team-alpha",
        "unary",
        forged("team-alpha", scope=REMOVE, scp=["calculator:compute"]),
    ),
    "scp-string-instead-of-scope": (
        "team-alpha",
        "unary",
        forged("team-alpha", scope=REMOVE, scp="calculator:compute"),
    ),
}


@pytest.mark.parametrize("case", list(ALLOWED))
def test_policy_allows(pstack: Any, case: str) -> None:
    """The policy allows these calls: the right answer and no audit record (ON_DENY)."""
    client, kind, metadata = ALLOWED[case]
    before = len(pstack.audit_records())
    with channel(pstack, client) as ch:
        assert RPC_KINDS[kind](ch, metadata(pstack)) == EXPECTED[kind]
    assert pstack.audit_records()[before:] == []
