"""Attacks with bearer tokens, over a valid client certificate (`demo`), against the real server.

Forged tokens are signed by the stack's real issuer key (tests/forge.py) and differ from a valid
token in exactly the one way the case names, or are signed by a fresh attacker key. Each case runs
as a unary call and as a bidirectional stream (the interceptor wraps each RPC shape separately) and
asserts the exact audit reason. tests/test_denials.py already covers: no token, an attacker's key
under our kid, a long-expired token, a foreign `iss` and `aud`; this table covers the rest of
auth/tokens.py's steps.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import EXPECTED, RPC_KINDS, assert_denied, assert_serving, bearer, channel, issuer_token, run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from forge import ALL_SCOPES, factory, real_key, valid_claims
from jwt_factory import REMOVE, b64url, generate_key, hs256_token, raw_token, replace_segment, tamper_claims
from private_stack import private_stack

from aigis.auth.certs import revoke_client
from aigis.auth.tokens import MAX_AUTHORIZATION_CHARS

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
KINDS = ["unary", "bidi"]
Metadata = tuple[tuple[str, str], ...]


def token(stack: Any, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A token for `demo` from the real issuer key with `claims`/`header` overridden (REMOVE drops one)."""
    return factory(stack).make(header=header, **{**valid_claims("demo"), **claims})


def auth(value: str) -> Metadata:
    return (("authorization", value),)


def attacker_signed(stack: Any, kid: str, **header: Any) -> str:
    """Signed by a fresh attacker key; `header` carries the attacker's tricks (jku, jwk, x5c, ...)."""
    attacker = generate_key("ES256", kid=kid)
    values = {name: (value(attacker) if callable(value) else value) for name, value in header.items()}
    return factory(stack).make(key=attacker, header=values, **valid_claims("demo"))


def attacker_x5c(key: Any) -> list[str]:
    """A self-signed certificate for the attacker's key, as a JWS x5c header (RFC 7515 §4.1.6)."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "aigis issuer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key.private_key, hashes.SHA256())
    )
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]


def hs256_with_public_key(stack: Any, secret: Callable[[Any], bytes]) -> str:
    """Key confusion: HS256 keyed with something public about the issuer's key."""
    key = real_key(stack)
    header = {"typ": "at+jwt", "alg": "HS256", "kid": key.kid}
    return hs256_token(header, factory(stack).claims(**valid_claims("demo")), secret(key))


def demo_thumbprint(stack: Any) -> str:
    """demo's real x5t#S256, so only the extra cnf member is wrong."""
    cert = x509.load_pem_x509_certificate(stack.pki.client_cert("demo").read_bytes())
    return b64url(cert.fingerprint(hashes.SHA256()))


def padded(stack: Any, length: int) -> str:
    """A validly signed token of about `length` characters (an extra claim pads it)."""
    base = len(token(stack))
    return token(stack, pad="x" * max(0, (length - base) * 3 // 4))


def now() -> int:
    return int(time.time())


# name -> (metadata for the call, audit reason). Checks are listed in auth/tokens.py's order.
ATTACKS: dict[str, tuple[Callable[[Any], Metadata], str]] = {
    # step 0: exactly one "authorization: Bearer <token68>" of at most 8 KiB (RFC 6750 §2.1)
    "empty-authorization": (lambda s: auth(""), "token_malformed"),
    "bearer-with-space-no-token": (lambda s: auth("Bearer "), "token_malformed"),
    "bearer-word-only": (lambda s: auth("Bearer"), "token_malformed"),
    "token-without-scheme": (lambda s: auth(token(s)), "token_malformed"),
    "basic-scheme": (lambda s: auth("Basic ZGVtbzpzZWNyZXQ="), "token_malformed"),
    "dpop-scheme": (lambda s: auth("DPoP " + token(s)), "token_malformed"),
    "two-spaces-after-bearer": (lambda s: auth("Bearer  " + token(s)), "token_malformed"),
    "trailing-space": (lambda s: auth("Bearer " + token(s) + " "), "token_malformed"),
    "leading-space": (lambda s: auth(" Bearer " + token(s)), "token_malformed"),
    "comma-joined-two-tokens": (lambda s: auth(f"Bearer {token(s)}, Bearer {token(s)}"), "token_malformed"),
    "two-authorization-entries": (lambda s: auth("Bearer " + token(s)) * 2, "token_malformed"),
    "valid-and-garbage-authorization-entries": (
        lambda s: (*auth("Bearer " + token(s)), *auth("Bearer x")),
        "token_malformed",
    ),
    "token-over-8-kib": (lambda s: bearer(padded(s, 10 * 1024)), "token_malformed"),
    # step 1: a compact JWS of JSON objects
    "two-segments": (lambda s: bearer(token(s).rsplit(".", 1)[0]), "token_malformed"),
    "four-segments": (lambda s: bearer(token(s) + ".e30"), "token_malformed"),
    "header-not-base64url": (lambda s: bearer(replace_segment(token(s), 0, "A")), "token_malformed"),
    "header-not-json": (lambda s: bearer(replace_segment(token(s), 0, b64url("not json"))), "token_malformed"),
    "header-json-array": (lambda s: bearer(replace_segment(token(s), 0, b64url("[1, 2]"))), "token_malformed"),
    "payload-not-json": (lambda s: bearer(replace_segment(token(s), 1, b64url("not json"))), "token_malformed"),
    "payload-json-array": (lambda s: bearer(replace_segment(token(s), 1, b64url("[]"))), "token_malformed"),
    # step 2: crit (RFC 7515 §4.1.11)
    "unknown-crit-header": (lambda s: bearer(token(s, header={"crit": ["exp-ext"], "exp-ext": 1})), "token_invalid"),
    # RFC 7797 unencoded payload: PyJWT refuses b64=false without a detached payload, before step 2.
    "b64-false-crit-header": (lambda s: bearer(token(s, header={"crit": ["b64"], "b64": False})), "token_malformed"),
    # step 3: typ (RFC 9068 §4)
    "typ-jwt": (lambda s: bearer(token(s, header={"typ": "JWT"})), "token_wrong_type"),
    "typ-missing": (lambda s: bearer(token(s, header={"typ": REMOVE})), "token_wrong_type"),
    "typ-id-token-lookalike": (lambda s: bearer(token(s, header={"typ": "at+jwt; id"})), "token_wrong_type"),
    # step 4: alg allow-list, before any key is touched
    "alg-none": (
        lambda s: bearer(raw_token({"typ": "at+jwt", "alg": "none"}, factory(s).claims(**valid_claims("demo")))),
        "token_bad_algorithm",
    ),
    "alg-none-mixed-case": (
        lambda s: bearer(raw_token({"typ": "at+jwt", "alg": "nOnE"}, factory(s).claims(**valid_claims("demo")))),
        "token_bad_algorithm",
    ),
    "hs256-keyed-with-public-key-pem": (
        lambda s: bearer(hs256_with_public_key(s, lambda k: k.public_pem)),
        "token_bad_algorithm",
    ),
    "hs256-keyed-with-public-jwk": (
        lambda s: bearer(hs256_with_public_key(s, lambda k: json.dumps(k.public_jwk).encode())),
        "token_bad_algorithm",
    ),
    "es512-label-not-allowed": (lambda s: bearer(token(s, header={"alg": "ES512"})), "token_bad_algorithm"),
    "rs256-label-on-es256-key": (lambda s: bearer(token(s, header={"alg": "RS256"})), "token_bad_algorithm"),
    # step 5-6: trusted issuer and one of its kids
    "iss-with-trailing-slash": (lambda s: bearer(token(s, iss=s.issuer_url + "/")), "token_wrong_issuer"),
    "iss-not-a-string": (lambda s: bearer(token(s, iss=[s.issuer_url])), "token_wrong_issuer"),
    "unknown-kid": (lambda s: bearer(token(s, header={"kid": "not-our-key"})), "token_unknown_key"),
    "kid-missing": (lambda s: bearer(token(s, header={"kid": REMOVE})), "token_unknown_key"),
    "kid-path-traversal": (lambda s: bearer(token(s, header={"kid": "../../jwks.json"})), "token_unknown_key"),
    "kid-not-a-string": (lambda s: bearer(token(s, header={"kid": 1})), "token_invalid"),  # PyJWT refuses it
    # header tricks: keys only ever come from our JWK Set
    "jku-to-attacker-jwks": (
        lambda s: bearer(attacker_signed(s, "attacker-1", jku="https://attacker.example/jwks.json")),
        "token_unknown_key",
    ),
    "x5u-to-attacker-cert": (
        lambda s: bearer(attacker_signed(s, "attacker-1", x5u="https://attacker.example/cert.pem")),
        "token_unknown_key",
    ),
    "embedded-jwk-attacker-kid": (
        lambda s: bearer(attacker_signed(s, "attacker-1", jwk=lambda k: k.public_jwk)),
        "token_unknown_key",
    ),
    "embedded-jwk-under-our-kid": (
        lambda s: bearer(attacker_signed(s, real_key(s).kid, jwk=lambda k: k.public_jwk)),
        "token_bad_signature",
    ),
    "embedded-x5c-attacker-cert": (
        lambda s: bearer(attacker_signed(s, "attacker-1", x5c=attacker_x5c)),
        "token_unknown_key",
    ),
    "jku-under-our-kid": (
        lambda s: bearer(attacker_signed(s, real_key(s).kid, jku="https://attacker.example/jwks.json")),
        "token_bad_signature",
    ),
    # step 7: signature and required claims
    "signature-stripped": (lambda s: bearer(token(s).rsplit(".", 1)[0] + "."), "token_bad_signature"),
    "scope-added-to-signed-payload": (
        lambda s: bearer(tamper_claims(token(s, scope="classifier:predict"), scope=ALL_SCOPES)),
        "token_bad_signature",
    ),
    "signature-of-another-token": (
        lambda s: bearer(replace_segment(token(s, jti="a"), 2, token(s, jti="b").split(".")[2])),
        "token_bad_signature",
    ),
    "missing-exp": (lambda s: bearer(token(s, exp=REMOVE)), "token_missing_claim"),
    "missing-iat": (lambda s: bearer(token(s, iat=REMOVE)), "token_missing_claim"),
    "missing-iss": (lambda s: bearer(token(s, iss=REMOVE)), "token_missing_claim"),
    "missing-aud": (lambda s: bearer(token(s, aud=REMOVE)), "token_missing_claim"),
    "missing-sub": (lambda s: bearer(token(s, sub=REMOVE)), "token_missing_claim"),
    "aud-empty-string": (lambda s: bearer(token(s, aud="")), "token_missing_claim"),  # PyJWT: empty is absent
    "aud-list-without-us": (lambda s: bearer(token(s, aud=["other-api", "aigis-admin"])), "token_wrong_audience"),
    "aud-case-changed": (lambda s: bearer(token(s, aud="AIGIS")), "token_wrong_audience"),
    # step 8: times, against the server's clock with 30 s leeway
    "expired-just-beyond-leeway": (lambda s: bearer(token(s, iat=now() - 300, exp=now() - 40)), "token_expired"),
    "nbf-in-the-future": (lambda s: bearer(token(s, nbf=now() + 600)), "token_not_yet_valid"),
    "iat-in-the-future": (lambda s: bearer(token(s, iat=now() + 600, exp=now() + 900)), "token_not_yet_valid"),
    "exp-as-string": (lambda s: bearer(token(s, exp=str(now() + 300))), "token_invalid"),
    "exp-infinity": (lambda s: bearer(token(s, exp=float("inf"))), "token_invalid"),
    "exp-true": (lambda s: bearer(token(s, exp=True)), "token_invalid"),
    # step 9: claim shapes
    "sub-empty": (lambda s: bearer(token(s, sub="")), "token_invalid"),
    "sub-not-a-string": (lambda s: bearer(token(s, sub=42)), "token_invalid"),
    "jti-not-a-string": (lambda s: bearer(token(s, jti=42)), "token_invalid"),
    "scope-as-list": (lambda s: bearer(token(s, scope=["calculator:compute"])), "token_invalid"),
    "cnf-not-an-object": (lambda s: bearer(token(s, cnf="x5t")), "token_invalid"),
    # RFC 7800 §3: a token claiming a binding aigis cannot verify is refused, not used as a bearer
    "cnf-jkt": (lambda s: bearer(token(s, cnf={"jkt": b64url(b"\1" * 32)})), "token_binding_unverifiable"),
    "cnf-x5t-sha1": (lambda s: bearer(token(s, cnf={"x5t": b64url(b"\1" * 20)})), "token_binding_unverifiable"),
    "cnf-empty-object": (lambda s: bearer(token(s, cnf={})), "token_binding_unverifiable"),
    "cnf-jwk": (
        lambda s: bearer(token(s, cnf={"jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}})),
        "token_binding_unverifiable",
    ),
    "cnf-kid": (lambda s: bearer(token(s, cnf={"kid": "k1"})), "token_binding_unverifiable"),
    "cnf-x5t-s256-plus-jkt": (
        lambda s: bearer(token(s, cnf={"x5t#S256": demo_thumbprint(s), "jkt": b64url(b"\1" * 32)})),
        "token_binding_unverifiable",
    ),
    "cnf-x5t-s256-not-a-sha256": (lambda s: bearer(token(s, cnf={"x5t#S256": "abc"})), "token_binding_unverifiable"),
    "cnf-x5t-s256-a-number": (lambda s: bearer(token(s, cnf={"x5t#S256": 7})), "token_binding_unverifiable"),
    "cnf-null": (lambda s: bearer(token(s, cnf=None)), "token_invalid"),
    # A per-issuer maximum lifetime (exp - iat, 24 h by default)
    "exp-centuries-ahead": (
        lambda s: bearer(token(s, iat=now(), exp=now() + 300 * 365 * 86400)), "token_lifetime_too_long"
    ),
    "lifetime-24h-plus-1s": (lambda s: bearer(token(s, iat=now(), exp=now() + 86401)), "token_lifetime_too_long"),
    "iat-years-ago-exp-soon": (
        lambda s: bearer(token(s, iat=now() - 5 * 365 * 86400, exp=now() + 300)), "token_lifetime_too_long"
    ),
    # RFC 8705: a certificate-bound token works only over the certificate it names
    "token-issued-to-another-client": (lambda s: bearer(issuer_token(s, "calc-only")), "token_cert_mismatch"),
    "token-bound-to-another-thumbprint": (
        lambda s: bearer(token(s, cnf={"x5t#S256": b64url(b"\0" * 32)})),
        "token_cert_mismatch",
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_token_attack_is_refused(stack: Any, attack: str, kind: str) -> None:
    """The token is refused: UNAUTHENTICATED, exact audit reason, one record; the server still serves."""
    metadata, reason = ATTACKS[attack]
    md = metadata(stack)
    before = len(stack.audit_records())
    with channel(stack, "demo") as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, md))
    record = assert_denied(stack, before, outcome, UNAUTH, reason)
    assert record["principal"] == "spiffe://aigis.local/client/demo"
    log_text = stack.audit_log.read_text()
    for _, value in md:  # the audit log never holds any part of the token
        assert not [part for part in value.split(".") if len(part) >= 16 and part in log_text]
    assert_serving(stack, kind)


def test_tab_in_authorization_is_refused_by_the_grpc_client(stack: Any) -> None:
    """A tab in a gRPC header value is refused by the client library (INTERNAL) and never sent."""
    before = len(stack.audit_records())
    with channel(stack, "demo") as ch:
        outcome = run(lambda: RPC_KINDS["unary"](ch, auth("Bearer\t" + token(stack))))
    assert (outcome.code, outcome.details, outcome.request_id) == (grpc.StatusCode.INTERNAL, "Invalid metadata", None)
    assert stack.audit_records()[before:] == []


# A token above gRPC's metadata limit (the server's max_metadata_size, 16 KiB) never reaches our token
# code: the client sees RESOURCE_EXHAUSTED from the transport, with no request id. For unary and
# server-streaming calls grpc drops the call: nothing is audited. For request-streaming calls grpc
# still dispatches the call, with the metadata parsed before the oversized entry only, so the guard
# sees no token and audits `token_missing` (fail closed; the client cannot match the record, having
# no request id).
OVER_GRPC_LIMIT = {
    "unary": [],
    "server_streaming": [],
    "client_streaming": ["token_missing"],
    "bidi": ["token_missing"],
}


@pytest.mark.parametrize("kind", list(RPC_KINDS))
def test_token_over_grpc_metadata_limit_never_reaches_token_checks(stack: Any, kind: str) -> None:
    """A 17 KiB token is refused by gRPC (RESOURCE_EXHAUSTED, no request id); at most `token_missing` is audited."""
    md = bearer(padded(stack, 17 * 1024))
    before = len(stack.audit_records())
    with channel(stack, "demo") as ch:
        outcome = run(lambda: RPC_KINDS[kind](ch, md))
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome.details.startswith("received metadata size exceeds hard limit")
    assert outcome.request_id is None
    assert [r["reason"] for r in stack.audit_records()[before:]] == OVER_GRPC_LIMIT[kind]
    assert_serving(stack, kind)


def test_oversized_header_before_the_token_drops_the_token(stack: Any) -> None:
    """An oversized header ahead of a valid token on a stream: grpc drops both, the guard denies `token_missing`."""
    md = (("x-padding", "p" * 17 * 1024), *bearer(issuer_token(stack, "demo")))
    before = len(stack.audit_records())
    with channel(stack, "demo") as ch:
        outcome = run(lambda: RPC_KINDS["bidi"](ch, md))
    assert (outcome.code, outcome.request_id) == (grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert [r["reason"] for r in stack.audit_records()[before:]] == ["token_missing"]
    assert_serving(stack, "bidi")


# What auth/tokens.py deliberately accepts, next to the attacks it refuses.
ACCEPTED: dict[str, Callable[[Any], Metadata]] = {
    "scheme-lowercase": lambda s: auth("bearer " + token(s)),  # RFC 9110 §11.1: case-insensitive
    "scheme-uppercase": lambda s: auth("BEARER " + token(s)),
    "token-of-7-kib": lambda s: bearer(padded(s, 7 * 1024)),
    "aud-list-with-us": lambda s: bearer(token(s, aud=["other-api", "aigis"])),
    "typ-application-at-jwt": lambda s: bearer(token(s, header={"typ": "application/at+jwt"})),
    "expired-within-leeway": lambda s: bearer(token(s, iat=now() - 300, exp=now() - 10)),
    "scp-list-instead-of-scope": lambda s: bearer(token(s, scope=REMOVE, scp=["calculator:compute"])),
    "x5u-header-is-ignored": lambda s: bearer(token(s, header={"x5u": "https://attacker.example/cert.pem"})),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(ACCEPTED))
def test_token_variant_is_accepted(stack: Any, variant: str, kind: str) -> None:
    """These tokens are valid: the call succeeds and nothing is audited."""
    md = ACCEPTED[variant](stack)
    assert len(md[0][1]) <= MAX_AUTHORIZATION_CHARS
    before = len(stack.audit_records())
    with channel(stack, "demo") as ch:
        assert RPC_KINDS[kind](ch, md) == EXPECTED[kind]
    assert stack.audit_records()[before:] == []


def _secret_token(stack: Any, client: str, secret: str) -> str:
    """A token by client_secret_basic: not bound to any certificate."""
    context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    request = urllib.request.Request(
        stack.token_url,
        data=b"grant_type=client_credentials",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


@pytest.mark.parametrize("kind", KINDS)
def test_token_of_a_client_revoked_in_the_registry_is_refused(tmp_path: Path, kind: str) -> None:
    """An unbound token obtained with a secret stops working as soon as its client is revoked
    (token_client_revoked), although it has not expired; other clients' tokens keep working."""
    with private_stack(tmp_path) as stack:
        stolen = bearer(_secret_token(stack, "secret-client", stack.secret))
        with channel(stack, "demo") as ch:
            assert run(lambda: RPC_KINDS[kind](ch, stolen)).code == grpc.StatusCode.OK
            revoke_client(stack.pki, "secret-client", now=datetime.now(UTC))
            stack.run(stack.server.reload_now())
            before = len(stack.audit_records())
            outcome = run(lambda: RPC_KINDS[kind](ch, stolen))
        assert_denied(stack, before, outcome, UNAUTH, "token_client_revoked")
        assert_serving(stack, kind)
