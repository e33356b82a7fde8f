"""Authorization policy: gRFC A43 semantics, A59 audit options, the scopes extension, validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from jwt_factory import AUDIENCE, ISSUER, NOW, REMOVE, TokenFactory, generate_key, write_jwks

from aigis.auth.decision import Decision, Reason
from aigis.auth.identity import PeerIdentity
from aigis.auth.policy import AuditCondition, Policy, PolicyError, StringMatcher, header_view
from aigis.auth.tokens import TokenVerifier, TrustedIssuer, VerifiedToken

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "server" / "policy.json"


def peer(uris: tuple[str, ...] = (), dns: tuple[str, ...] = (), subject: str = "CN=demo,O=aigis") -> PeerIdentity:
    principal = uris[0] if uris else dns[0] if dns else subject
    return PeerIdentity(principal, uris, dns, subject, 1, "CN=aigis CA", "fp")


def token(*scopes: str) -> VerifiedToken:
    return VerifiedToken("client-demo", "client-demo", frozenset(scopes), ISSUER, NOW + 300, None, None)


CLIENT = peer(uris=("spiffe://aigis.local/client/demo",))


def policy(document: dict[str, Any]) -> Policy:
    return Policy.from_json(json.dumps(document))


# ---- the A43 document's example and grpc-go's SDK end-to-end cases -----------------------------

A43_EXAMPLE = {
    "name": "example-policy",
    "allow_rules": [
        {
            "name": "admin-access",
            "source": {"principals": ["spiffe://foo.com/sa/admin1", "spiffe://foo.com/sa/admin2"]},
            "request": {"paths": ["/pkg.service/*"]},
        },
        {
            "name": "dev-access",
            "source": {"principals": ["*", ""]},
            "request": {
                "paths": ["/pkg.service/foo", "/pkg.service/bar"],
                "headers": [{"key": "dev-path", "values": ["/dev/path/*"]}],
            },
        },
    ],
    "deny_rules": [{"name": "deny-access", "request": {"paths": ["*/secret"]}}],
}
ADMIN = peer(uris=("spiffe://foo.com/sa/admin1",))
DEV = peer(uris=("spiffe://foo.com/sa/dev7",))

A43_CASES = [
    pytest.param(
        ADMIN, "/pkg.service/anything", (), Decision.allow("example-policy", "admin-access"), id="admin-any-method"
    ),
    pytest.param(
        ADMIN,
        "/pkg.service/secret",
        (),
        Decision.deny(Reason.POLICY_DENIED, "example-policy", "deny-access"),
        id="admin-secret-denied",
    ),
    pytest.param(
        DEV,
        "/pkg.service/foo",
        (("dev-path", "/dev/path/x"),),
        Decision.allow("example-policy", "dev-access"),
        id="dev-foo-with-header",
    ),
    pytest.param(
        None,
        "/pkg.service/bar",
        (("dev-path", "/dev/path/"),),
        Decision.allow("example-policy", "dev-access"),
        id="no-client-cert-matches-empty-principal",
    ),
    pytest.param(
        DEV,
        "/pkg.service/foo",
        (),
        Decision.deny(Reason.NO_MATCHING_RULE, "example-policy"),
        id="dev-foo-without-header",
    ),
    pytest.param(
        DEV,
        "/pkg.service/foo",
        (("dev-path", "/prod/path/x"),),
        Decision.deny(Reason.NO_MATCHING_RULE, "example-policy"),
        id="dev-foo-wrong-header",
    ),
    pytest.param(
        DEV,
        "/pkg.service/baz",
        (("dev-path", "/dev/path/x"),),
        Decision.deny(Reason.NO_MATCHING_RULE, "example-policy"),
        id="dev-other-method",
    ),
    pytest.param(
        DEV,
        "/pkg.service/secret",
        (("dev-path", "/dev/path/x"),),
        Decision.deny(Reason.POLICY_DENIED, "example-policy", "deny-access"),
        id="dev-secret-denied",
    ),
]


@pytest.mark.parametrize(("caller", "method", "metadata", "expected"), A43_CASES)
def test_a43_example_policy(caller: PeerIdentity | None, method: str, metadata: Any, expected: Decision) -> None:
    """The example policy from gRFC A43 decides as the document describes."""
    assert policy(A43_EXAMPLE).evaluate(method, caller, metadata, None) == expected


UNARY = "/grpc.testing.TestService/UnaryCall"
GRPC_GO_SDK_CASES = [
    pytest.param(
        {
            "allow_rules": [
                {
                    "name": "allow_StreamingOutputCall",
                    "request": {"paths": ["/grpc.testing.TestService/StreamingOutputCall"]},
                }
            ],
            "deny_rules": [
                {
                    "name": "deny_TestServiceCalls",
                    "request": {
                        "paths": ["/grpc.testing.TestService/*"],
                        "headers": [{"key": "key-abc", "values": ["val-abc", "val-def"]}],
                    },
                }
            ],
        },
        (("key-abc", "val-abc"),),
        Reason.POLICY_DENIED,
        id="DeniesRPCMatchInDenyNoMatchInAllow",
    ),
    pytest.param(
        {
            "allow_rules": [{"name": "allow_all", "request": {"paths": ["*"]}}],
            "deny_rules": [{"name": "deny_all", "request": {"paths": ["*"]}}],
        },
        (),
        Reason.POLICY_DENIED,
        id="DeniesRPCMatchInDenyAndAllow",
    ),
    pytest.param(
        {
            "allow_rules": [{"name": "allow_all"}],
            "deny_rules": [
                {
                    "name": "deny_TestServiceCalls",
                    "request": {
                        "paths": [UNARY, "/grpc.testing.TestService/StreamingInputCall"],
                        "headers": [{"key": "key-abc", "values": ["val-abc", "val-def"]}],
                    },
                }
            ],
        },
        (("key-xyz", "val-xyz"),),
        None,
        id="AllowsRPCNoMatchInDenyMatchInAllow",
    ),
    pytest.param(
        {
            "allow_rules": [{"name": "allow_some_user", "source": {"principals": ["some_user"]}}],
            "deny_rules": [
                {
                    "name": "deny_StreamingOutputCall",
                    "request": {"paths": ["/grpc.testing.TestService/StreamingOutputCall"]},
                }
            ],
        },
        (),
        Reason.NO_MATCHING_RULE,
        id="DeniesRPCNoMatchInDenyAndAllow",
    ),
    pytest.param(
        {
            "allow_rules": [
                {"name": "allow_UnaryCall", "request": {"paths": [UNARY]}},
                {
                    "name": "allow_StreamingInputCall",
                    "request": {"paths": ["/grpc.testing.TestService/StreamingInputCall"]},
                },
            ]
        },
        (),
        None,
        id="AllowsRPCEmptyDenyMatchInAllow",
    ),
    pytest.param(
        {
            "allow_rules": [
                {
                    "name": "allow_StreamingOutputCall",
                    "request": {"paths": ["/grpc.testing.TestService/StreamingOutputCall"]},
                }
            ]
        },
        (),
        Reason.NO_MATCHING_RULE,
        id="DeniesRPCEmptyDenyNoMatchInAllow",
    ),
    pytest.param(
        {
            "allow_rules": [
                {
                    "name": "allow_TestServiceCalls",
                    "request": {
                        "paths": ["/grpc.testing.TestService/*"],
                        "headers": [{"key": "key-abc", "values": ["*"]}],
                    },
                }
            ]
        },
        (("key-abc", ""),),
        Reason.NO_MATCHING_RULE,
        id="DeniesRPCRequestNoMatchInAllowFailsPresenceMatch",
    ),
]


@pytest.mark.parametrize(("rules", "metadata", "reason"), GRPC_GO_SDK_CASES)
def test_grpc_go_sdk_cases(rules: dict[str, Any], metadata: Any, reason: Reason | None) -> None:
    """grpc-go's authz SDK end-to-end policies reach the same allow/deny outcome here."""
    decision = policy({"name": "authz", **rules}).evaluate(UNARY, CLIENT, metadata, None)
    assert (decision.allowed, decision.reason) == (reason is None, reason)


# ---- matching semantics ------------------------------------------------------------------------

PATTERNS = [
    ("*", "a", True),
    ("*", "", False),
    ("abc*", "abc", True),
    ("abc*", "abcd", True),
    ("abc*", "ab", False),
    ("abc*", "xabc", False),
    ("*abc", "abc", True),
    ("*abc", "xabc", True),
    ("*abc", "abcx", False),
    ("abc", "abc", True),
    ("abc", "abcd", False),
    ("abc", "ABC", False),
    ("", "", True),
    ("", "a", False),
    # A trailing "*" wins (grpc-go order): "*abc*" is the literal prefix "*abc", not "contains".
    ("*abc*", "*abcd", True),
    ("*abc*", "xabcx", False),
    ("a*c", "a*c", True),
    ("a*c", "abc", False),
]


@pytest.mark.parametrize(("pattern", "value", "matches"), PATTERNS, ids=[f"{p!r}~{v!r}" for p, v, _ in PATTERNS])
def test_pattern_semantics(pattern: str, value: str, matches: bool) -> None:
    """Exact, prefix `abc*`, suffix `*abc` and presence `*` match as gRFC A43 defines."""
    assert StringMatcher.compile([pattern])(value) is matches


PRINCIPALS = [
    pytest.param(peer(uris=("spiffe://a/x",), dns=("svc.test",)), "spiffe://a/*", True, id="uri-san"),
    pytest.param(
        peer(uris=("spiffe://a/x",), dns=("svc.test",)), "svc.test", False, id="dns-not-consulted-when-uri-present"
    ),
    pytest.param(
        peer(uris=("spiffe://a/x",), subject="CN=admin"), "CN=admin", False, id="subject-not-consulted-when-uri-present"
    ),
    pytest.param(peer(uris=("spiffe://a/x", "spiffe://b/y")), "spiffe://b/y", True, id="any-uri-san"),
    pytest.param(peer(dns=("one.test", "two.test")), "two.test", True, id="dns-san-when-no-uri"),
    pytest.param(
        peer(dns=("svc.test",), subject="CN=svc"), "CN=svc", False, id="subject-not-consulted-when-dns-present"
    ),
    pytest.param(peer(subject="CN=demo,O=aigis"), "CN=demo,O=aigis", True, id="subject-when-no-san"),
    pytest.param(peer(uris=("",), dns=("svc.test",)), "svc.test", True, id="empty-uri-is-not-an-identity"),
    pytest.param(None, "", True, id="no-cert-matches-empty"),
    pytest.param(None, "*", False, id="no-cert-fails-presence"),
    pytest.param(peer(subject="CN=x"), "", False, id="cert-never-matches-empty"),
]


@pytest.mark.parametrize(("caller", "principal", "matches"), PRINCIPALS)
def test_principal_semantics(caller: PeerIdentity | None, principal: str, matches: bool) -> None:
    """Principals match URI SANs, else DNS SANs, else the subject — only the first kind present (A41)."""
    rules = {"name": "p", "allow_rules": [{"name": "r", "source": {"principals": [principal]}}]}
    assert policy(rules).evaluate("/a.B/C", caller, (), None).allowed is matches


HEADER_RULES = {
    "name": "headers",
    "allow_rules": [
        {
            "name": "tenant",
            "request": {
                "headers": [{"key": "X-Tenant", "values": ["acme", "beta*"]}, {"key": "x-env", "values": ["*"]}]
            },
        }
    ],
}
HEADER_CASES = [
    pytest.param((("x-tenant", "acme"), ("x-env", "prod")), True, id="all-headers-match"),
    pytest.param((("x-tenant", "beta-2"), ("x-env", "prod")), True, id="prefix-value"),
    pytest.param((("x-tenant", "acme"),), False, id="second-header-absent"),
    pytest.param((("x-tenant", "acme"), ("x-env", "")), False, id="presence-needs-non-empty"),
    pytest.param((("x-tenant", "other"), ("x-env", "prod")), False, id="value-mismatch"),
    pytest.param(
        (("x-tenant", "acme"), ("x-tenant", "other"), ("x-env", "p")), False, id="repeated-header-joined-with-comma"
    ),
    pytest.param((("X-Tenant", "acme"), ("x-env", "p")), True, id="metadata-key-case-insensitive"),
]


@pytest.mark.parametrize(("metadata", "allowed"), HEADER_CASES)
def test_header_rules(metadata: Any, allowed: bool) -> None:
    """Headers are ANDed, values ORed; repeated metadata is one comma-joined value (A41)."""
    assert policy(HEADER_RULES).evaluate("/a.B/C", CLIENT, metadata, None).allowed is allowed


def test_header_view_joins_and_encodes_binary() -> None:
    """Repeated keys join with ',' and -bin values are seen as unpadded base64."""
    assert header_view([("a", "1"), ("a", "2"), ("x-bin", b"\x00\x01")]) == {"a": "1,2", "x-bin": "AAE"}


def test_uses_headers_flag() -> None:
    """Only a policy with header conditions needs metadata; otherwise decisions are cacheable."""
    assert policy(HEADER_RULES).uses_headers is True
    assert Policy.load(DEFAULT_POLICY).uses_headers is False


# ---- deny/allow order and the scopes extension --------------------------------------------------

SCOPED = {
    "name": "scoped",
    "deny_rules": [{"name": "no-admin-rpc", "request": {"paths": ["/svc.Admin/*"]}}],
    "allow_rules": [
        {"name": "compute", "request": {"paths": ["/svc.Calc/*"]}, "scopes": ["calc:compute"]},
        {"name": "compute-fallback", "request": {"paths": ["/svc.Calc/Add"]}, "scopes": ["calc:add"]},
        {"name": "any-token", "request": {"paths": ["/svc.Meta/*"]}, "scopes": []},
        {"name": "admin-by-cert", "source": {"principals": ["spiffe://aigis.local/admin"]}},
    ],
}
ADMIN_CERT = peer(uris=("spiffe://aigis.local/admin",))
SCOPE_CASES = [
    pytest.param(
        CLIENT, "/svc.Calc/Add", token("calc:compute"), Decision.allow("scoped", "compute"), id="scope-present"
    ),
    pytest.param(
        CLIENT,
        "/svc.Calc/Add",
        token("calc:compute", "other"),
        Decision.allow("scoped", "compute"),
        id="extra-scopes-fine",
    ),
    pytest.param(
        CLIENT,
        "/svc.Calc/Add",
        token("calc:add"),
        Decision.allow("scoped", "compute-fallback"),
        id="later-rule-matches-fully",
    ),
    pytest.param(
        CLIENT,
        "/svc.Calc/Sum",
        token("other"),
        Decision.deny(Reason.SCOPE_MISSING, "scoped", "compute"),
        id="scope-missing",
    ),
    pytest.param(
        CLIENT,
        "/svc.Calc/Sum",
        token(),
        Decision.deny(Reason.SCOPE_MISSING, "scoped", "compute"),
        id="token-without-scopes",
    ),
    pytest.param(
        CLIENT, "/svc.Calc/Sum", None, Decision.deny(Reason.TOKEN_MISSING, "scoped", "compute"), id="token-missing"
    ),
    pytest.param(
        CLIENT, "/svc.Meta/Info", token(), Decision.allow("scoped", "any-token"), id="empty-scopes-any-valid-token"
    ),
    pytest.param(
        CLIENT,
        "/svc.Meta/Info",
        None,
        Decision.deny(Reason.TOKEN_MISSING, "scoped", "any-token"),
        id="empty-scopes-still-need-token",
    ),
    pytest.param(
        ADMIN_CERT,
        "/svc.Calc/Add",
        None,
        Decision.allow("scoped", "admin-by-cert"),
        id="rule-without-scopes-needs-no-token",
    ),
    pytest.param(
        ADMIN_CERT,
        "/svc.Admin/Reset",
        token("calc:compute"),
        Decision.deny(Reason.POLICY_DENIED, "scoped", "no-admin-rpc"),
        id="deny-beats-allow",
    ),
    pytest.param(
        CLIENT,
        "/svc.Other/X",
        token("calc:compute"),
        Decision.deny(Reason.NO_MATCHING_RULE, "scoped"),
        id="no-matching-rule",
    ),
]


@pytest.mark.parametrize(("caller", "method", "tok", "expected"), SCOPE_CASES)
def test_scopes_extension(caller: PeerIdentity, method: str, tok: VerifiedToken | None, expected: Decision) -> None:
    """`scopes` requires a verified token holding all listed scopes; denial says which part failed."""
    assert policy(SCOPED).evaluate(method, caller, (), tok) == expected


def test_scope_granted_through_scp_claim(tmp_path: Path) -> None:
    """A real token carrying its scopes in `scp` satisfies a rule's scopes once verified."""
    key = generate_key("ES256")
    verifier = TokenVerifier(
        [TrustedIssuer(ISSUER, AUDIENCE, jwks_file=write_jwks(tmp_path / "j.json", [key]))], clock=lambda: NOW
    )
    raw = TokenFactory(key).make(scope=REMOVE, scp=["calc:compute"])
    verified = asyncio.run(verifier.verify(raw))
    assert policy(SCOPED).evaluate("/svc.Calc/Add", CLIENT, (), verified) == Decision.allow("scoped", "compute")


# ---- the bundled default policy -----------------------------------------------------------------

CALC, CLASSIFY = "/aigis.calculator.v1.Calculator/Add", "/aigis.classifier.v1.ImageClassificationService/ClassifyImage"
HEALTH = "/grpc.health.v1.Health/Check"
DEFAULT_CASES = [
    pytest.param(CALC, token("calculator:compute"), None, "calculator", id="calculator-with-scope"),
    pytest.param(CALC, token("classifier:predict"), Reason.SCOPE_MISSING, "calculator", id="calculator-wrong-scope"),
    pytest.param(CALC, None, Reason.TOKEN_MISSING, "calculator", id="calculator-no-token"),
    pytest.param(CLASSIFY, token("classifier:predict"), None, "classifier", id="classifier-with-scope"),
    pytest.param(
        CLASSIFY, token("calculator:compute"), Reason.SCOPE_MISSING, "classifier", id="classifier-wrong-scope"
    ),
    pytest.param(HEALTH, None, None, "health", id="health-no-token"),
    pytest.param("/grpc.health.v1.Health/Watch", token(), None, "health", id="health-with-token"),
    pytest.param(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        token(),
        None,
        "reflection",
        id="reflection-v1alpha-any-token",
    ),
    pytest.param(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        None,
        Reason.TOKEN_MISSING,
        "reflection",
        id="reflection-v1-needs-token",
    ),
    pytest.param(
        "/aigis.calculator.v2.Calculator/Add",
        token("calculator:compute"),
        Reason.NO_MATCHING_RULE,
        "",
        id="unknown-service",
    ),
]


@pytest.mark.parametrize(("method", "tok", "reason", "rule"), DEFAULT_CASES)
def test_default_policy(method: str, tok: VerifiedToken | None, reason: Reason | None, rule: str) -> None:
    """server/policy.json: per-service scopes, health for any mTLS peer, reflection for any token."""
    loaded = Policy.load(DEFAULT_POLICY)
    decision = loaded.evaluate(method, CLIENT, (), tok)
    assert (decision.allowed, decision.reason, decision.matched_rule) == (reason is None, reason, rule)
    assert loaded.audit_condition is AuditCondition.ON_DENY


def test_default_policy_requires_a_certificate_identity() -> None:
    """Every default rule needs a non-empty certificate principal, even health."""
    assert Policy.load(DEFAULT_POLICY).evaluate(HEALTH, None, (), None).reason is Reason.NO_MATCHING_RULE


# ---- audit options (gRFC A59) ------------------------------------------------------------------

AUDIT_CASES = [
    pytest.param(None, AuditCondition.ON_DENY, id="absent-defaults-to-on-deny"),
    pytest.param({}, AuditCondition.ON_DENY, id="empty-defaults-to-on-deny"),
    *[pytest.param({"audit_condition": c.value}, c, id=c.value) for c in AuditCondition],
    pytest.param(
        {"audit_condition": "ON_DENY", "audit_loggers": [{"name": "stdout_logger", "config": {}, "is_optional": True}]},
        AuditCondition.ON_DENY,
        id="optional-logger-ignored",
    ),
]


@pytest.mark.parametrize(("options", "expected"), AUDIT_CASES)
def test_audit_condition(options: dict[str, Any] | None, expected: AuditCondition) -> None:
    """audit_condition parses A59's four values; omitted means ON_DENY in aigis (A59 says NONE)."""
    document: dict[str, Any] = {"name": "p", "allow_rules": [{"name": "r"}]}
    if options is not None:
        document["audit_logging_options"] = options
    assert policy(document).audit_condition is expected


@pytest.mark.parametrize(
    ("condition", "on_allow", "on_deny"),
    [
        (AuditCondition.NONE, False, False),
        (AuditCondition.ON_DENY, False, True),
        (AuditCondition.ON_ALLOW, True, False),
        (AuditCondition.ON_DENY_AND_ALLOW, True, True),
    ],
)
def test_audit_condition_audits(condition: AuditCondition, on_allow: bool, on_deny: bool) -> None:
    """Each condition audits exactly the decisions A59 names."""
    assert (condition.audits(True), condition.audits(False)) == (on_allow, on_deny)


# ---- invalid policies: each refused with the offending key path --------------------------------


def _with_rule(rule: dict[str, Any], where: str = "allow_rules") -> str:
    document: dict[str, Any] = {"name": "p", "allow_rules": [{"name": "ok"}]}
    document[where] = [*document.get(where, []), rule] if where == "allow_rules" else [rule]
    return json.dumps(document)


def _header(key: Any, values: Any = ("v",)) -> str:
    return _with_rule({"name": "h", "request": {"headers": [{"key": key, "values": list(values)}]}})


INVALID = [
    pytest.param("{", "invalid JSON", id="not-json"),
    pytest.param("[]", "expected an object", id="top-level-array"),
    pytest.param('{"allow_rules": [{"name": "r"}]}', "name: is required", id="name-missing"),
    pytest.param('{"name": "", "allow_rules": [{"name": "r"}]}', "name: must not be empty", id="name-empty"),
    pytest.param('{"name": 5, "allow_rules": [{"name": "r"}]}', "name: expected a string", id="name-not-string"),
    pytest.param('{"name": "p"}', "allow_rules: is required", id="allow-rules-missing"),
    pytest.param('{"name": "p", "allow_rules": []}', "allow_rules: must be a non-empty list", id="allow-rules-empty"),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], "allow_rule": []}',
        "allow_rule: unknown field",
        id="unknown-top-field",
    ),
    pytest.param(
        '{"name": "p", "name": "q", "allow_rules": [{"name": "r"}]}', "duplicate key 'name'", id="duplicate-json-key"
    ),
    pytest.param(
        _with_rule({"name": "r", "sources": {}}), "allow_rules[1].sources: unknown field", id="unknown-rule-field"
    ),
    pytest.param(
        _with_rule({"name": "r", "source": {"principal": ["x"]}}),
        "allow_rules[1].source.principal: unknown field",
        id="unknown-source-field",
    ),
    pytest.param(
        _with_rule({"name": "r", "request": {"methods": ["x"]}}),
        "allow_rules[1].request.methods: unknown field",
        id="unknown-request-field",
    ),
    pytest.param(
        _with_rule({"name": "r", "request": {"headers": [{"key": "a", "values": ["b"], "regex": 1}]}}),
        "allow_rules[1].request.headers[0].regex: unknown field",
        id="unknown-header-field",
    ),
    pytest.param(_with_rule({"source": {}}), "allow_rules[1].name: is required", id="rule-name-missing"),
    pytest.param(_with_rule({"name": "ok"}), "allow_rules[1].name: duplicate rule name", id="duplicate-rule-name"),
    pytest.param(
        _with_rule({"name": "r", "source": {"principals": "x"}}),
        "allow_rules[1].source.principals: expected a list",
        id="principals-not-list",
    ),
    pytest.param(
        _with_rule({"name": "r", "request": {"paths": ["/a", 7]}}),
        "allow_rules[1].request.paths[1]: expected a string",
        id="path-not-string",
    ),
    pytest.param(
        _header("grpc-timeout"), "allow_rules[1].request.headers[0].key: unsupported header", id="header-grpc-prefixed"
    ),
    pytest.param(_header(":path"), "allow_rules[1].request.headers[0].key: unsupported header", id="header-pseudo"),
    pytest.param(_header(":authority"), "unsupported header", id="header-authority"),
    pytest.param(
        _header("Host"), "allow_rules[1].request.headers[0].key: unsupported header 'host'", id="header-host-any-case"
    ),
    *[
        pytest.param(_header(name), "unsupported header", id=f"header-hop-by-hop-{name}")
        for name in (
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        )
    ],
    pytest.param(_header("authorization"), "use the rule's scopes", id="header-authorization-aigis"),
    pytest.param(_header(""), "allow_rules[1].request.headers[0].key: must not be empty", id="header-key-empty"),
    pytest.param(_header("bad key"), "not a valid header name", id="header-key-invalid-chars"),
    pytest.param(
        _header("x-a", values=()),
        "allow_rules[1].request.headers[0].values: must not be empty",
        id="header-values-empty",
    ),
    pytest.param(
        _with_rule({"name": "d", "scopes": ["a"]}, where="deny_rules"),
        "deny_rules[0].scopes: scopes are only allowed in allow_rules",
        id="scopes-in-deny-rule",
    ),
    pytest.param(
        _with_rule({"name": "r", "scopes": "calc:compute"}),
        "allow_rules[1].scopes: expected a list",
        id="scopes-not-list",
    ),
    pytest.param(
        _with_rule({"name": "r", "scopes": ["a b"]}), "allow_rules[1].scopes[0]: 'a b' is not", id="scope-with-space"
    ),
    pytest.param(_with_rule({"name": "r", "scopes": [""]}), "allow_rules[1].scopes[0]", id="scope-empty"),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], "deny_rules": {}}',
        "deny_rules: expected a list",
        id="deny-rules-not-list",
    ),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], "audit_logging_options": {"audit_condition": "ALL"}}',
        "audit_logging_options.audit_condition: 'ALL' is not one of",
        id="audit-condition-unknown",
    ),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], "audit_logging_options": {"condition": "NONE"}}',
        "audit_logging_options.condition: unknown field",
        id="audit-unknown-field",
    ),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], '
        '"audit_logging_options": {"audit_loggers": [{"name": "stdout_logger"}]}}',
        "audit_logging_options.audit_loggers[0].name: audit logger 'stdout_logger' is not supported",
        id="audit-logger-not-optional",
    ),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], '
        '"audit_logging_options": {"audit_loggers": [{"name": "x", "is_optional": "yes"}]}}',
        "audit_loggers[0].is_optional: expected a boolean",
        id="audit-logger-optional-not-bool",
    ),
    pytest.param(
        '{"name": "p", "allow_rules": [{"name": "r"}], '
        '"audit_logging_options": {"audit_loggers": [{"name": "x", "is_optional": true, "typed": 1}]}}',
        "audit_loggers[0].typed: unknown field",
        id="audit-logger-unknown-field",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_policy_is_refused(text: str, message: str) -> None:
    """An invalid policy raises PolicyError naming the source and the offending key path."""
    with pytest.raises(PolicyError) as caught:
        Policy.from_json(text, source="test.json")
    assert str(caught.value).startswith("test.json: ")
    assert message in str(caught.value)


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    """An unreadable policy file is a PolicyError naming the path."""
    missing = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match=r"nope\.json"):
        Policy.load(missing)


def test_load_from_file(tmp_path: Path) -> None:
    """Policy.load reads a file and records it as the source."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(A43_EXAMPLE), encoding="utf-8")
    loaded = Policy.load(path)
    assert (loaded.name, loaded.source, [r.name for r in loaded.allow_rules]) == (
        "example-policy",
        str(path),
        ["admin-access", "dev-access"],
    )
