"""Access-token verification: RFC 6750 header parsing, RFC 9068 checks, attacks, cache, key sets."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc._cython.cygrpc import _Metadatum
from jwt_factory import (
    AUDIENCE,
    ISSUER,
    NOW,
    REMOVE,
    SigningKey,
    TokenFactory,
    b64url,
    generate_key,
    hs256_token,
    jwks,
    raw_token,
    replace_segment,
    tamper_claims,
    write_jwks,
)

from aigis.auth.decision import REASON_STATUS, Reason
from aigis.auth.tokens import (
    KeySetError,
    TokenError,
    TokenVerifier,
    TrustedIssuer,
    VerifiedToken,
    parse_authorization,
)

LEEWAY = 30


class Clock:
    """A pinned clock tests move by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Keys:
    es256: SigningKey
    rs256: SigningKey
    eddsa: SigningKey
    attacker: SigningKey  # never published

    def by_alg(self, alg: str) -> SigningKey:
        return {"ES256": self.es256, "RS256": self.rs256, "EdDSA": self.eddsa}[alg]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        generate_key("ES256"), generate_key("RS256"), generate_key("EdDSA"), generate_key("ES256", kid="attacker-key")
    )


@pytest.fixture
def jwks_path(tmp_path: Path, keys: Keys) -> Path:
    return write_jwks(tmp_path / "jwks.json", [keys.es256, keys.rs256, keys.eddsa])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(jwks_path: Path, clock: Clock) -> TokenVerifier:
    return TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=jwks_path)], clock=clock)


@pytest.fixture
def factory(keys: Keys) -> TokenFactory:
    return TokenFactory(keys.es256)


def verify(verifier: TokenVerifier, token: str) -> VerifiedToken:
    return asyncio.run(verifier.verify(token))


def refused(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as caught:
        verify(verifier, token)
    return caught.value


# ---- authorization metadata (RFC 6750 §2.1) ----------------------------------------------------

JWT_LIKE = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"

PARSE_OK = [
    pytest.param((), None, id="no-metadata"),
    pytest.param((("x-other", "1"),), None, id="no-authorization-entry"),
    pytest.param((("authorization", f"Bearer {JWT_LIKE}"),), JWT_LIKE, id="bearer"),
    pytest.param((("authorization", f"bearer {JWT_LIKE}"),), JWT_LIKE, id="scheme-lowercase"),
    pytest.param((("authorization", f"BEARER {JWT_LIKE}"),), JWT_LIKE, id="scheme-uppercase"),
    pytest.param((("authorization", "Bearer a+b/c=="),), "a+b/c==", id="token68-padding"),
    pytest.param((_Metadatum("authorization", f"Bearer {JWT_LIKE}"),), JWT_LIKE, id="grpc-metadatum"),
]


@pytest.mark.parametrize(("metadata", "expected"), PARSE_OK)
def test_parse_authorization_accepts(metadata: Any, expected: str | None) -> None:
    """Exactly one well-formed `Bearer <token68>` entry yields the token; none yields None."""
    assert parse_authorization(metadata) == expected


PARSE_BAD = [
    pytest.param((("authorization", f"Bearer {JWT_LIKE}"),) * 2, id="two-authorization-entries"),
    pytest.param((("authorization", f"Bearer {JWT_LIKE}"), ("authorization", "Bearer x")), id="two-different-entries"),
    pytest.param((("authorization", f"Basic {JWT_LIKE}"),), id="wrong-scheme-basic"),
    pytest.param((("authorization", f"DPoP {JWT_LIKE}"),), id="wrong-scheme-dpop"),
    pytest.param((("authorization", JWT_LIKE),), id="no-scheme"),
    pytest.param((("authorization", f"Bearer  {JWT_LIKE}"),), id="two-spaces"),
    pytest.param((("authorization", f"Bearer\t{JWT_LIKE}"),), id="tab-separator"),
    pytest.param((("authorization", f" Bearer {JWT_LIKE}"),), id="leading-space"),
    pytest.param((("authorization", f"Bearer {JWT_LIKE} "),), id="trailing-space"),
    pytest.param((("authorization", f"Bearer {JWT_LIKE}\n"),), id="trailing-newline"),
    pytest.param((("authorization", "Bearer"),), id="empty-no-space"),
    pytest.param((("authorization", "Bearer "),), id="empty-token"),
    pytest.param((("authorization", ""),), id="empty-value"),
    pytest.param((("authorization", "Bearer a b"),), id="space-inside-token"),
    pytest.param((("authorization", "Bearer a=b"),), id="padding-not-at-end"),
    pytest.param((("authorization", "Bearer ab$c"),), id="non-token68-char"),
    pytest.param((("authorization", "Bearer ab\u00e9"),), id="non-ascii"),
    pytest.param((("authorization", b"Bearer abc"),), id="bytes-value"),
    pytest.param((("authorization", "Bearer " + "a" * 8200),), id="oversized"),
]


@pytest.mark.parametrize("metadata", PARSE_BAD)
def test_parse_authorization_refuses(metadata: Any) -> None:
    """Anything but one well-formed bearer entry is TOKEN_MALFORMED."""
    with pytest.raises(TokenError) as caught:
        parse_authorization(metadata)
    assert caught.value.reason is Reason.TOKEN_MALFORMED


# ---- successful verification -------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_verifies_each_algorithm(verifier: TokenVerifier, keys: Keys, alg: str) -> None:
    """A token signed by a published ES256, RS256 or Ed25519 key verifies to its claims."""
    token = TokenFactory(keys.by_alg(alg)).make(
        sub="svc-1",
        client_id="client-7",
        jti="j-42",
        scope="calculator:compute classifier:predict",
        cnf={"x5t#S256": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"},
    )
    assert verify(verifier, token) == VerifiedToken(
        subject="svc-1",
        client_id="client-7",
        scopes=frozenset({"calculator:compute", "classifier:predict"}),
        issuer=ISSUER,
        expires_at=NOW + 300,
        jti="j-42",
        cnf_x5t_s256="BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc",
    )


def test_client_id_defaults_to_subject(verifier: TokenVerifier, factory: TokenFactory) -> None:
    """Without a client_id claim the client is the subject; jti and cnf are optional."""
    token = verify(verifier, factory.make(sub="svc-2", client_id=REMOVE, jti=REMOVE))
    assert (token.client_id, token.jti, token.cnf_x5t_s256) == ("svc-2", None, None)


SCOPES = [
    pytest.param({"scope": "a b"}, {"a", "b"}, id="scope-space-delimited"),
    pytest.param({"scope": "a"}, {"a"}, id="scope-single"),
    pytest.param({"scope": ""}, set(), id="scope-empty"),
    pytest.param({"scope": REMOVE}, set(), id="no-scope-claim"),
    pytest.param({"scope": REMOVE, "scp": ["a", "b"]}, {"a", "b"}, id="scp-list"),
    pytest.param({"scope": REMOVE, "scp": "a b"}, {"a", "b"}, id="scp-string"),
    pytest.param({"scope": "a", "scp": ["b"]}, {"a"}, id="scope-wins-over-scp"),
]


@pytest.mark.parametrize(("claims", "expected"), SCOPES)
def test_scope_claims(
    verifier: TokenVerifier, factory: TokenFactory, claims: dict[str, Any], expected: set[str]
) -> None:
    """Scopes come from RFC 9068 `scope`, else `scp` as a list or a space-delimited string."""
    assert verify(verifier, factory.make(**claims)).scopes == frozenset(expected)


ACCEPTED = [
    pytest.param({"header": {"typ": "application/at+jwt"}}, id="typ-application-at+jwt"),
    pytest.param({"header": {"typ": "AT+JWT"}}, id="typ-case-insensitive"),
    pytest.param({"aud": ["other", AUDIENCE]}, id="aud-list-containing-us"),
    pytest.param({"exp": int(NOW) - LEEWAY + 5, "iat": int(NOW) - 600}, id="expired-within-leeway"),
    pytest.param({"nbf": int(NOW) + LEEWAY - 5}, id="nbf-within-leeway"),
    pytest.param({"iat": int(NOW) + LEEWAY - 5}, id="iat-within-leeway"),
    pytest.param(
        {"header": {"jku": "https://127.0.0.1:9/jwks.json", "x5u": "https://127.0.0.1:9/c.pem"}},
        id="jku-x5u-ignored-when-our-key-signed",
    ),
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_accepts_edge_cases(verifier: TokenVerifier, factory: TokenFactory, overrides: dict[str, Any]) -> None:
    """Accepted variants: typ spellings, aud arrays, clock skew within leeway, ignored URL headers."""
    assert verify(verifier, factory.make(**overrides)).subject == "client-demo"


# ---- attacks and bad tokens: each refused with its exact reason --------------------------------

Build = Callable[[TokenFactory, Keys], str]


def _case(case_id: str, reason: Reason, build: Build) -> Any:
    return pytest.param(build, reason, id=case_id)


def _impostor(keys: Keys) -> SigningKey:
    """The attacker's private key wearing our published kid."""
    return SigningKey(keys.es256.kid, "ES256", keys.attacker.private_key)


ATTACKS = [
    # Algorithm attacks are stopped before any key is touched.
    _case("alg-none", Reason.TOKEN_BAD_ALGORITHM, lambda f, k: raw_token(f.header(alg="none"), f.claims())),
    _case("alg-None-capitalised", Reason.TOKEN_BAD_ALGORITHM, lambda f, k: raw_token(f.header(alg="None"), f.claims())),
    _case("alg-missing", Reason.TOKEN_BAD_ALGORITHM, lambda f, k: f.make(remove_header=["alg"])),
    _case(
        "hs256-signed-with-public-key-pem",
        Reason.TOKEN_BAD_ALGORITHM,
        lambda f, k: hs256_token(f.header(alg="HS256"), f.claims(), k.es256.public_pem),
    ),
    _case(
        "hs256-signed-with-public-jwk-json",
        Reason.TOKEN_BAD_ALGORITHM,
        lambda f, k: hs256_token(f.header(alg="HS256"), f.claims(), json.dumps(k.es256.public_jwk).encode()),
    ),
    _case("es384-not-allowed", Reason.TOKEN_BAD_ALGORITHM, lambda f, k: f.make(header={"alg": "ES384"})),
    _case(
        "alg-does-not-fit-key-type",
        Reason.TOKEN_BAD_ALGORITHM,
        lambda f, k: f.make(key=k.rs256, header={"kid": k.es256.kid}),
    ),
    # Keys come only from our JWK Set.
    _case("unknown-kid", Reason.TOKEN_UNKNOWN_KEY, lambda f, k: f.make(header={"kid": "nope"})),
    _case("missing-kid", Reason.TOKEN_UNKNOWN_KEY, lambda f, k: f.make(remove_header=["kid"])),
    _case("kid-not-string", Reason.TOKEN_INVALID, lambda f, k: f.make(header={"kid": 7})),
    _case("wrong-key-same-kid", Reason.TOKEN_BAD_SIGNATURE, lambda f, k: f.make(key=_impostor(k))),
    _case(
        "jwk-header-embeds-attacker-key",
        Reason.TOKEN_BAD_SIGNATURE,
        lambda f, k: f.make(key=_impostor(k), header={"jwk": k.attacker.public_jwk}),
    ),
    _case(
        "jku-header-points-at-attacker-jwks",
        Reason.TOKEN_UNKNOWN_KEY,
        lambda f, k: f.make(key=k.attacker, header={"jku": "https://127.0.0.1:9/jwks.json"}),
    ),
    _case(
        "x5u-header-points-at-attacker-cert",
        Reason.TOKEN_BAD_SIGNATURE,
        lambda f, k: f.make(key=_impostor(k), header={"x5u": "https://127.0.0.1:9/cert.pem"}),
    ),
    _case(
        "tampered-scope",
        Reason.TOKEN_BAD_SIGNATURE,
        lambda f, k: tamper_claims(f.make(), scope="calculator:compute admin"),
    ),
    _case("signature-stripped", Reason.TOKEN_BAD_SIGNATURE, lambda f, k: replace_segment(f.make(), 2, "")),
    _case(
        "signature-from-other-token",
        Reason.TOKEN_BAD_SIGNATURE,
        lambda f, k: replace_segment(f.make(sub="a"), 2, f.make(sub="b").split(".")[2]),
    ),
    # Time.
    _case("expired", Reason.TOKEN_EXPIRED, lambda f, k: f.make(iat=int(NOW) - 600, exp=int(NOW) - LEEWAY - 1)),
    _case("nbf-future", Reason.TOKEN_NOT_YET_VALID, lambda f, k: f.make(nbf=int(NOW) + LEEWAY + 1)),
    _case("iat-future", Reason.TOKEN_NOT_YET_VALID, lambda f, k: f.make(iat=int(NOW) + LEEWAY + 1, exp=int(NOW) + 600)),
    _case("exp-not-a-number", Reason.TOKEN_INVALID, lambda f, k: f.make(exp="tomorrow")),
    _case("exp-boolean", Reason.TOKEN_INVALID, lambda f, k: f.make(exp=True)),
    _case("iat-not-a-number", Reason.TOKEN_INVALID, lambda f, k: f.make(iat="now")),
    _case("exp-infinity", Reason.TOKEN_INVALID, lambda f, k: f.make(exp=float("inf"))),
    _case("exp-nan", Reason.TOKEN_INVALID, lambda f, k: f.make(exp=float("nan"))),
    _case("exp-huge-integer", Reason.TOKEN_INVALID, lambda f, k: f.make(exp=10**400)),
    # Required claims, issuer, audience.
    *[
        _case(f"missing-{claim}", Reason.TOKEN_MISSING_CLAIM, lambda f, k, c=claim: f.make(remove=[c]))
        for claim in ("exp", "iat", "iss", "aud", "sub")
    ],
    _case("aud-empty-list", Reason.TOKEN_MISSING_CLAIM, lambda f, k: f.make(aud=[])),
    _case("wrong-iss", Reason.TOKEN_WRONG_ISSUER, lambda f, k: f.make(iss="https://evil.test")),
    _case("iss-trailing-slash", Reason.TOKEN_WRONG_ISSUER, lambda f, k: f.make(iss=ISSUER + "/")),
    _case("iss-not-string", Reason.TOKEN_WRONG_ISSUER, lambda f, k: f.make(iss=[ISSUER])),
    _case("wrong-aud", Reason.TOKEN_WRONG_AUDIENCE, lambda f, k: f.make(aud="other-service")),
    _case("aud-list-without-us", Reason.TOKEN_WRONG_AUDIENCE, lambda f, k: f.make(aud=["a", "b"])),
    # Token type (RFC 9068 §4) and critical headers (RFC 7515 §4.1.11).
    _case("typ-jwt", Reason.TOKEN_WRONG_TYPE, lambda f, k: f.make(header={"typ": "JWT"})),
    _case("typ-id-token-style", Reason.TOKEN_WRONG_TYPE, lambda f, k: f.make(header={"typ": "id_token+jwt"})),
    _case("typ-missing", Reason.TOKEN_WRONG_TYPE, lambda f, k: f.make(remove_header=["typ"])),
    _case(
        "crit-unknown-extension",
        Reason.TOKEN_INVALID,
        lambda f, k: f.make(header={"crit": ["http://example.com/ext"], "http://example.com/ext": 1}),
    ),
    _case("crit-b64-true", Reason.TOKEN_INVALID, lambda f, k: f.make(header={"crit": ["b64"], "b64": True})),
    _case(
        "crit-b64-false-unencoded-payload",
        Reason.TOKEN_MALFORMED,
        lambda f, k: f.make(header={"crit": ["b64"], "b64": False}),
    ),
    _case("crit-empty-list", Reason.TOKEN_INVALID, lambda f, k: f.make(header={"crit": []})),
    # Claim types.
    _case("sub-not-string", Reason.TOKEN_INVALID, lambda f, k: f.make(sub=123)),
    _case("sub-empty", Reason.TOKEN_INVALID, lambda f, k: f.make(sub="")),
    _case("jti-not-string", Reason.TOKEN_INVALID, lambda f, k: f.make(jti=5)),
    _case("client-id-not-string", Reason.TOKEN_INVALID, lambda f, k: f.make(client_id=["a"])),
    _case("scope-not-string", Reason.TOKEN_INVALID, lambda f, k: f.make(scope=["calculator:compute"])),
    _case("scp-not-strings", Reason.TOKEN_INVALID, lambda f, k: f.make(scope=REMOVE, scp=[1])),
    _case("cnf-not-object", Reason.TOKEN_INVALID, lambda f, k: f.make(cnf="x")),
    # Structure.
    _case("two-segments", Reason.TOKEN_MALFORMED, lambda f, k: ".".join(f.make().split(".")[:2])),
    _case("not-a-jwt", Reason.TOKEN_MALFORMED, lambda f, k: "hello"),
    _case("header-bad-base64", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 0, "e!!!")),
    _case("header-not-json", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 0, b64url("{nope"))),
    _case("header-json-array", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 0, b64url("[1]"))),
    _case("payload-not-json", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 1, b64url("x"))),
    _case("payload-json-string", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 1, b64url('"x"'))),
    _case("signature-bad-base64", Reason.TOKEN_MALFORMED, lambda f, k: replace_segment(f.make(), 2, "a!b")),
    _case("oversized", Reason.TOKEN_MALFORMED, lambda f, k: f.make(padding="x" * 9000)),
    _case("empty", Reason.TOKEN_MALFORMED, lambda f, k: ""),
]


@pytest.mark.parametrize(("build", "reason"), ATTACKS)
def test_refuses_attack(
    verifier: TokenVerifier, factory: TokenFactory, keys: Keys, build: Build, reason: Reason
) -> None:
    """Each attack or defect is refused with exactly its reason, and the error never echoes the token."""
    token = build(factory, keys)
    error = refused(verifier, token)
    assert error.reason is reason
    if token:
        assert token not in str(error)
        assert all(part not in str(error) for part in token.split(".") if len(part) > 8)
    assert token not in verifier.cache


def test_keys_are_scoped_to_their_issuer(tmp_path: Path, keys: Keys, clock: Clock) -> None:
    """A token naming issuer B but signed with issuer A's key (and kid) is refused: no cross-issuer keys."""
    verifier = TokenVerifier(
        [
            TrustedIssuer(ISSUER, AUDIENCE, jwks_file=write_jwks(tmp_path / "a.json", [keys.es256])),
            TrustedIssuer("https://b.test", AUDIENCE, jwks_file=write_jwks(tmp_path / "b.json", [keys.eddsa])),
        ],
        clock=clock,
    )
    assert verify(verifier, TokenFactory(keys.eddsa, issuer="https://b.test").make()).issuer == "https://b.test"
    assert refused(verifier, TokenFactory(keys.es256, issuer="https://b.test").make()).reason is (
        Reason.TOKEN_UNKNOWN_KEY
    )


def test_short_rsa_key_is_refused_not_warned(tmp_path: Path, clock: Clock) -> None:
    """A 1024-bit RSA key in the JWK Set cannot vouch for a token (PyJWT would only warn)."""
    weak = SigningKey("weak", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505 - the point of the test
    verifier = TokenVerifier(
        [TrustedIssuer(ISSUER, AUDIENCE, jwks_file=write_jwks(tmp_path / "j.json", [weak]))], clock=clock
    )
    assert refused(verifier, TokenFactory(weak).make()).reason is Reason.TOKEN_INVALID


# ---- cache -------------------------------------------------------------------------------------


def test_cache_hit_returns_the_same_verified_token(verifier: TokenVerifier, factory: TokenFactory) -> None:
    """A second verify of the same token is a cache hit: the identical object, no re-verification."""
    token = factory.make()
    first = verify(verifier, token)
    assert verifier.cache[token] is first
    assert verify(verifier, token) is first


def test_expired_cache_entry_is_not_served(verifier: TokenVerifier, factory: TokenFactory, clock: Clock) -> None:
    """Once the clock passes exp (plus leeway) a cached token is verified again and refused."""
    token = factory.make()
    verify(verifier, token)
    clock.now = NOW + 300 + LEEWAY
    assert refused(verifier, token).reason is Reason.TOKEN_EXPIRED


def test_token_accepted_within_leeway_is_not_cached(verifier: TokenVerifier, factory: TokenFactory) -> None:
    """A token already past exp (inside leeway) is accepted but never cached."""
    token = factory.make(exp=int(NOW) - 1, iat=int(NOW) - 300)
    verify(verifier, token)
    assert token not in verifier.cache


def test_cache_is_bounded(jwks_path: Path, factory: TokenFactory, clock: Clock) -> None:
    """The cache never exceeds cache_size and keeps the most recent tokens."""
    verifier = TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=jwks_path)], cache_size=10, clock=clock)
    tokens = [factory.make(jti=f"j{i}") for i in range(25)]
    for token in tokens:
        verify(verifier, token)
        assert len(verifier.cache) <= 10
    assert tokens[-1] in verifier.cache
    assert tokens[0] not in verifier.cache


def test_a_refused_token_sent_again_is_refused_from_memory(verifier: TokenVerifier, keys: Keys, clock: Clock) -> None:
    """The same forged token again is refused with the same reason by one lookup (no second parse or
    signature check), for a bounded 5 s; then it is checked afresh."""
    forged = TokenFactory(keys.es256).make(key=SigningKey(keys.es256.kid, "ES256", keys.attacker.private_key))
    assert refused(verifier, forged).reason is Reason.TOKEN_BAD_SIGNATURE
    assert verifier.refusals[forged][0] is Reason.TOKEN_BAD_SIGNATURE
    assert refused(verifier, forged).reason is Reason.TOKEN_BAD_SIGNATURE
    clock.now += 6
    assert verifier.refusals[forged][1] < clock.now
    assert refused(verifier, forged).reason is Reason.TOKEN_BAD_SIGNATURE
    assert verifier.refusals[forged][1] > clock.now


def test_a_token_not_yet_valid_is_not_remembered(verifier: TokenVerifier, factory: TokenFactory, clock: Clock) -> None:
    """A token refused as not yet valid is good a moment later: that refusal is not remembered."""
    early = factory.make(nbf=int(NOW) + LEEWAY + 1)
    assert refused(verifier, early).reason is Reason.TOKEN_NOT_YET_VALID
    assert early not in verifier.refusals
    clock.now += 2
    assert verify(verifier, early).subject == "client-demo"


def test_a_key_change_forgets_refusals(verifier: TokenVerifier, jwks_path: Path, keys: Keys) -> None:
    """When the key set changes, a token refused under the old keys is checked again at once."""
    signed_by_next_key = SigningKey(keys.es256.kid, "ES256", keys.attacker.private_key)
    token = TokenFactory(keys.es256).make(key=signed_by_next_key)
    assert refused(verifier, token).reason is Reason.TOKEN_BAD_SIGNATURE
    write_jwks(jwks_path, [signed_by_next_key])
    verifier.reload()
    assert verifier.refusals == {}
    assert verify(verifier, token).subject == "client-demo"


# ---- key sets: files, rotation, configuration --------------------------------------------------


def test_reload_rotates_keys_and_drops_cached_tokens(verifier: TokenVerifier, jwks_path: Path, keys: Keys) -> None:
    """After reload() a removed key no longer vouches, even for a token that was cached."""
    old_token = TokenFactory(keys.es256).make()
    verify(verifier, old_token)
    new_key = generate_key("ES256", kid="es256-2")
    write_jwks(jwks_path, [new_key])
    verifier.reload()
    assert refused(verifier, old_token).reason is Reason.TOKEN_UNKNOWN_KEY
    assert verify(verifier, TokenFactory(new_key).make()).subject == "client-demo"


def test_reload_with_a_bad_file_keeps_the_old_keys(
    verifier: TokenVerifier, jwks_path: Path, factory: TokenFactory
) -> None:
    """A broken JWK Set on reload raises KeySetError and leaves the previous keys in service."""
    jwks_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(KeySetError):
        verifier.reload()
    assert verify(verifier, factory.make()).subject == "client-demo"


BAD_KEY_SETS = [
    pytest.param(lambda k: {"keys": [{**k.es256.public_jwk, "d": "AAAA"}]}, id="private-key-material"),
    pytest.param(lambda k: {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}, id="symmetric-key"),
    pytest.param(lambda k: {"keys": []}, id="no-keys"),
    pytest.param(lambda k: {"keys": [{**k.es256.public_jwk, "kid": ""}]}, id="no-kid"),
    pytest.param(lambda k: {"keys": [{**k.es256.public_jwk, "use": "enc"}]}, id="encryption-key-only"),
    pytest.param(lambda k: {"keys": [k.es256.public_jwk, k.es256.public_jwk]}, id="duplicate-kid"),
    pytest.param(lambda k: [k.es256.public_jwk], id="not-an-object"),
    pytest.param(lambda k: {"keys": [{**k.es256.public_jwk, "alg": "none"}]}, id="alg-none-key"),
    pytest.param(lambda k: {"keys": [{**k.es256.public_jwk, "alg": "HS256"}]}, id="hs256-labelled-key"),
]


@pytest.mark.parametrize("content", BAD_KEY_SETS)
def test_bad_jwks_file_stops_startup(tmp_path: Path, keys: Keys, content: Callable[[Keys], Any]) -> None:
    """A JWK Set that is unusable or leaks secret material is a configuration error."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(content(keys)), encoding="utf-8")
    with pytest.raises(KeySetError) as caught:
        TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path)])
    assert "AAAA" not in str(caught.value) and "c2VjcmV0" not in str(caught.value)


BAD_CONFIG = [
    pytest.param(
        lambda p: TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p)], algorithms=["HS256"]),
        id="hs256-algorithm",
    ),
    pytest.param(
        lambda p: TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p)], algorithms=["none"]),
        id="none-algorithm",
    ),
    pytest.param(lambda p: TokenVerifier([]), id="no-issuers"),
    pytest.param(lambda p: TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p)] * 2), id="issuer-twice"),
    pytest.param(lambda p: TrustedIssuer("http://idp.example", AUDIENCE), id="discovery-over-http"),
    pytest.param(lambda p: TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p, token_types=()), id="no-token-types"),
    pytest.param(lambda p: TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p, scope_claim=""), id="empty-scope-claim"),
    pytest.param(lambda p: TrustedIssuer(ISSUER, AUDIENCE, jwks_file=p, jwks_url="https://x/j"), id="two-key-sources"),
    pytest.param(lambda p: TrustedIssuer(ISSUER, AUDIENCE, jwks_url="http://x/jwks.json"), id="plain-http-jwks"),
    pytest.param(lambda p: TrustedIssuer("", AUDIENCE, jwks_file=p), id="empty-issuer"),
]


@pytest.mark.parametrize("build", BAD_CONFIG)
def test_bad_configuration_is_refused(jwks_path: Path, build: Callable[[Path], Any]) -> None:
    """Symmetric/none algorithms, ambiguous key sources and plain-http JWKS or discovery are refused."""
    with pytest.raises(ValueError):
        build(jwks_path)


# ---- remote JWKS over real HTTPS ---------------------------------------------------------------


@dataclass
class JwksServer:
    url: str  # the JWK Set, at /jwks.json
    ca_file: Path
    body: dict[str, Any] | None  # None: answer 500
    hits: int = 0
    origin: str = ""  # https://127.0.0.1:<port>
    # Other paths: a JSON value, or (status, raw bytes). Anything else answers 404.
    documents: dict[str, Any] = field(default_factory=dict)


def _tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (written 0600 for the key)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test jwks ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return ca_file, cert_file, key_file


@pytest.fixture
def jwks_server(tmp_path: Path, keys: Keys) -> Iterator[JwksServer]:
    ca_file, cert_file, key_file = _tls_files(tmp_path)
    state = JwksServer("", ca_file, jwks([keys.es256]))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            status, payload = 200, b""
            if self.path == "/jwks.json" and state.body is not None:
                payload = json.dumps(state.body).encode()
            elif self.path == "/jwks.json":
                status = 500
            elif self.path in state.documents:
                document = state.documents[self.path]
                status, payload = document if isinstance(document, tuple) else (200, json.dumps(document).encode())
            else:
                status = 404
            if status != 200:
                self.send_error(status)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.origin = f"https://127.0.0.1:{server.server_address[1]}"
    state.url = state.origin + "/jwks.json"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _remote_verifier(server: JwksServer, clock: Clock, *, ca: bool = True) -> TokenVerifier:
    issuer = TrustedIssuer(ISSUER, AUDIENCE, jwks_url=server.url, ca_file=server.ca_file if ca else None)
    return TokenVerifier([issuer], clock=clock, jwks_lifespan=timedelta(minutes=5), jwks_cooldown=timedelta(seconds=30))


def test_remote_jwks_fetched_once_and_cached(jwks_server: JwksServer, keys: Keys, clock: Clock) -> None:
    """Keys are fetched over HTTPS (private CA) once, then served from the key cache."""
    verifier = _remote_verifier(jwks_server, clock)
    factory = TokenFactory(keys.es256)

    async def scenario() -> None:
        await verifier.verify(factory.make(jti="1"))
        await verifier.verify(factory.make(jti="2"))

    asyncio.run(scenario())
    assert jwks_server.hits == 1


def test_remote_unknown_kid_refetches_at_most_once_per_cooldown(
    jwks_server: JwksServer, keys: Keys, clock: Clock
) -> None:
    """An unknown kid triggers a refetch only after the cooldown; then a rotated-in key works."""
    verifier = _remote_verifier(jwks_server, clock)
    new_key = generate_key("EdDSA", kid="rotated")

    async def scenario() -> None:
        await verifier.verify(TokenFactory(keys.es256).make())
        jwks_server.body = jwks([keys.es256, new_key])
        for jti in ("a", "b", "c"):  # inside the cooldown: no fetch, fail closed
            with pytest.raises(TokenError) as caught:
                await verifier.verify(TokenFactory(new_key).make(jti=jti))
            assert caught.value.reason is Reason.TOKEN_UNKNOWN_KEY
        assert jwks_server.hits == 1
        clock.now += 31
        assert (await verifier.verify(TokenFactory(new_key, now=clock.now).make())).subject == "client-demo"
        assert jwks_server.hits == 2

    asyncio.run(scenario())


def test_remote_refetch_is_single_flight_for_concurrent_callers(
    jwks_server: JwksServer, keys: Keys, clock: Clock
) -> None:
    """Many callers with a rotated-in kid at once: one fetch, and every caller waits for it (none is
    refused token_unknown_key because another caller's fetch was still under way)."""
    verifier = _remote_verifier(jwks_server, clock)
    new_key = generate_key("ES256", kid="rotated")

    async def scenario() -> list[str]:
        await verifier.verify(TokenFactory(keys.es256).make())
        jwks_server.body = jwks([keys.es256, new_key])
        clock.now += 31
        tokens = [TokenFactory(new_key, now=clock.now).make(jti=str(i)) for i in range(32)]
        verified = await asyncio.gather(*(verifier.verify(token) for token in tokens))
        return [v.subject for v in verified]

    assert asyncio.run(scenario()) == ["client-demo"] * 32
    assert jwks_server.hits == 2


def test_file_reread_is_single_flight_for_concurrent_callers(tmp_path: Path, keys: Keys, clock: Clock) -> None:
    """Right after a rotation, many callers with the new kid at once: one file read, none refused."""
    path = write_jwks(tmp_path / "jwks.json", [keys.es256])
    verifier = TokenVerifier(
        [TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path)], clock=clock, jwks_file_recheck=timedelta(seconds=0.2)
    )
    new_key = generate_key("ES256", kid="new-key")
    write_jwks(path, [new_key, keys.es256])
    time.sleep(0.3)  # past the re-read interval: the first caller re-reads, the others must wait for it

    async def scenario() -> list[str]:
        tokens = [TokenFactory(new_key).make(jti=str(i)) for i in range(32)]
        return [v.subject for v in await asyncio.gather(*(verifier.verify(token) for token in tokens))]

    assert asyncio.run(scenario()) == ["client-demo"] * 32


def test_remote_fetch_failure_keeps_cached_keys(jwks_server: JwksServer, keys: Keys, clock: Clock) -> None:
    """When the JWKS endpoint fails, known keys keep working and unknown kids fail closed."""
    verifier = _remote_verifier(jwks_server, clock)

    async def scenario() -> None:
        await verifier.verify(TokenFactory(keys.es256).make(jti="1"))
        jwks_server.body = None
        clock.now += 600  # key cache expired: a refresh is attempted and fails
        later = TokenFactory(keys.es256, now=clock.now)
        assert (await verifier.verify(later.make(jti="2"))).subject == "client-demo"
        with pytest.raises(TokenError) as caught:
            await verifier.verify(TokenFactory(keys.eddsa, now=clock.now).make())
        assert caught.value.reason is Reason.TOKEN_UNKNOWN_KEY

    asyncio.run(scenario())
    assert jwks_server.hits == 2


def test_remote_jwks_from_untrusted_server_is_not_used(jwks_server: JwksServer, keys: Keys, clock: Clock) -> None:
    """Without the private CA the TLS handshake fails, so no key is trusted: UNAVAILABLE, saying why."""
    verifier = _remote_verifier(jwks_server, clock, ca=False)
    error = refused(verifier, TokenFactory(keys.es256).make())
    assert error.reason is Reason.TOKEN_KEYS_UNAVAILABLE
    assert "TLS certificate verification failed" in str(error)
    assert REASON_STATUS[error.reason] is grpc.StatusCode.UNAVAILABLE


# ---- discovery, fetch failures, per-issuer typ and scope claim ---------------------------------


def _discovering_verifier(server: JwksServer, clock: Clock, issuer: str, **options: Any) -> TokenVerifier:
    trusted = TrustedIssuer(issuer, AUDIENCE, ca_file=server.ca_file, **options)
    return TokenVerifier([trusted], clock=clock, jwks_cooldown=timedelta(seconds=30))


@pytest.mark.parametrize(
    ("issuer_path", "metadata_path"),
    [
        pytest.param("", "/.well-known/openid-configuration", id="openid-discovery"),
        pytest.param("/tenant", "/.well-known/openid-configuration", id="openid-discovery-with-path"),
        pytest.param("/tenant", "/.well-known/oauth-authorization-server/tenant", id="rfc8414-fallback"),
    ],
)
def test_issuer_url_alone_finds_its_keys(
    jwks_server: JwksServer, keys: Keys, clock: Clock, issuer_path: str, metadata_path: str
) -> None:
    """Configured by its issuer URL alone, an issuer's jwks_uri comes from its discovery document."""
    issuer = jwks_server.origin + issuer_path
    if metadata_path.startswith("/.well-known/openid") and issuer_path:
        metadata_path = issuer_path + metadata_path  # OpenID: appended to the issuer's path
    jwks_server.documents[metadata_path] = {"issuer": issuer, "jwks_uri": jwks_server.url}
    verifier = _discovering_verifier(jwks_server, clock, issuer)
    assert verify(verifier, TokenFactory(keys.es256, issuer=issuer).make()).issuer == issuer


BAD_KEY_SOURCES = [
    pytest.param({}, "HTTP status 404", id="no-discovery-document"),
    pytest.param({"/.well-known/openid-configuration": "ISSUER"}, "is not a JSON object", id="metadata-not-object"),
    pytest.param(
        {"/.well-known/openid-configuration": {"issuer": "https://evil.test", "jwks_uri": "JWKS"}},
        "names issuer 'https://evil.test'",
        id="metadata-for-another-issuer",
    ),
    pytest.param(
        {"/.well-known/openid-configuration": {"issuer": "ISSUER", "jwks_uri": "http://127.0.0.1/jwks.json"}},
        "no https jwks_uri",
        id="plain-http-jwks-uri",
    ),
    pytest.param(
        {"/.well-known/openid-configuration": {"issuer": "ISSUER", "jwks_uri": "ORIGIN/keys"}, "/keys": (200, b"{")},
        "not JSON",
        id="jwks-not-json",
    ),
    pytest.param(
        {"/.well-known/openid-configuration": {"issuer": "ISSUER", "jwks_uri": "ORIGIN/keys"}, "/keys": {"k": []}},
        "not a JWK Set",
        id="jwks-not-a-key-set",
    ),
    pytest.param(
        {"/.well-known/openid-configuration": {"issuer": "ISSUER", "jwks_uri": "ORIGIN/keys"}, "/keys": (500, b"")},
        "HTTP status 500",
        id="jwks-server-error",
    ),
    pytest.param(
        {
            "/.well-known/openid-configuration": {"issuer": "ISSUER", "jwks_uri": "ORIGIN/keys"},
            "/keys": (200, b" " * (600 * 1024)),
        },
        "larger than",
        id="jwks-too-large",
    ),
]


@pytest.mark.parametrize(("documents", "cause"), BAD_KEY_SOURCES)
def test_key_set_that_cannot_be_fetched_says_why(
    jwks_server: JwksServer, keys: Keys, clock: Clock, documents: dict[str, Any], cause: str
) -> None:
    """No keys cached and none fetchable: TOKEN_KEYS_UNAVAILABLE (UNAVAILABLE), naming the cause."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("ISSUER", jwks_server.origin).replace("ORIGIN", jwks_server.origin)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    jwks_server.documents.update({path: fill(doc) for path, doc in documents.items()})
    verifier = _discovering_verifier(jwks_server, clock, jwks_server.origin)
    error = refused(verifier, TokenFactory(keys.es256, issuer=jwks_server.origin).make())
    assert error.reason is Reason.TOKEN_KEYS_UNAVAILABLE
    assert cause in str(error)


def test_unreachable_key_set_recovers_after_the_cooldown(jwks_server: JwksServer, keys: Keys, clock: Clock) -> None:
    """Once the issuer answers again (after the cooldown), the same token verifies."""
    verifier = _discovering_verifier(jwks_server, clock, jwks_server.origin)
    token = TokenFactory(keys.es256, issuer=jwks_server.origin).make()
    assert refused(verifier, token).reason is Reason.TOKEN_KEYS_UNAVAILABLE
    jwks_server.documents["/.well-known/openid-configuration"] = {
        "issuer": jwks_server.origin,
        "jwks_uri": jwks_server.url,
    }
    assert refused(verifier, token).reason is Reason.TOKEN_KEYS_UNAVAILABLE  # within the cooldown
    clock.now += 31
    assert verify(verifier, token).issuer == jwks_server.origin


def test_typ_jwt_only_for_the_issuer_that_opted_in(tmp_path: Path, keys: Keys, clock: Clock) -> None:
    """token_types=["at+jwt", "JWT"] on one issuer admits typ JWT from it, and from no other."""
    path = write_jwks(tmp_path / "jwks.json", [keys.es256])
    other = write_jwks(tmp_path / "other.json", [keys.rs256])
    verifier = TokenVerifier(
        [
            TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path, token_types=("at+jwt", "JWT")),
            TrustedIssuer("https://strict.test", AUDIENCE, jwks_file=other),
        ],
        clock=clock,
    )
    assert verify(verifier, TokenFactory(keys.es256).make(header={"typ": "JWT"})).issuer == ISSUER
    assert verify(verifier, TokenFactory(keys.es256).make(jti="2")).issuer == ISSUER  # at+jwt still
    strict = TokenFactory(keys.rs256, issuer="https://strict.test")
    assert refused(verifier, strict.make(header={"typ": "JWT"})).reason is Reason.TOKEN_WRONG_TYPE
    assert refused(verifier, TokenFactory(keys.es256).make(header={"typ": "at+jwt2"})).reason is (
        Reason.TOKEN_WRONG_TYPE
    )


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param({"roles": ["calculator:compute", "admin"]}, {"calculator:compute", "admin"}, id="list"),
        pytest.param({"roles": "a b"}, {"a", "b"}, id="space-delimited"),
        pytest.param({}, set(), id="absent"),
    ],
)
def test_scope_claim_mapping(
    tmp_path: Path, keys: Keys, clock: Clock, claims: dict[str, Any], expected: set[str]
) -> None:
    """scope_claim names the claim an issuer puts its scopes in; `scope` is then ignored."""
    path = write_jwks(tmp_path / "jwks.json", [keys.es256])
    verifier = TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path, scope_claim="roles")], clock=clock)
    assert verify(verifier, TokenFactory(keys.es256).make(scope="ignored", **claims)).scopes == expected


def test_key_added_to_jwks_file_is_found_on_unknown_kid(tmp_path: Path, keys: Keys, clock: Clock) -> None:
    """Right after a key rotation, a token with the new kid verifies without waiting for a reload."""
    path = write_jwks(tmp_path / "jwks.json", [keys.es256])
    verifier = TokenVerifier(
        [TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path)], clock=clock, jwks_file_recheck=timedelta(0)
    )
    rotated = TokenFactory(generate_key("ES256", kid="rotated-key")).make()
    assert refused(verifier, rotated).reason is Reason.TOKEN_UNKNOWN_KEY
    write_jwks(path, [TokenFactory(generate_key("ES256", kid="other")).key, keys.es256])
    assert refused(verifier, rotated).reason is Reason.TOKEN_UNKNOWN_KEY  # a different new key
    new_key = generate_key("ES256", kid="new-key")
    write_jwks(path, [new_key, keys.es256])
    assert verify(verifier, TokenFactory(new_key).make()).subject == "client-demo"


def test_unknown_kid_rereads_the_file_at_most_once_per_interval(tmp_path: Path, keys: Keys, clock: Clock) -> None:
    """A flood of forged kids does not turn into a flood of file reads."""
    path = write_jwks(tmp_path / "jwks.json", [keys.es256])
    verifier = TokenVerifier([TrustedIssuer(ISSUER, AUDIENCE, jwks_file=path)], clock=clock)  # 1 s recheck
    new_key = generate_key("ES256", kid="new-key")
    write_jwks(path, [new_key, keys.es256])
    # Within the first second after loading, the file is not read again: the kid stays unknown.
    assert refused(verifier, TokenFactory(new_key).make()).reason is Reason.TOKEN_UNKNOWN_KEY


# ---- binding and lifetime (issue 11 items 4-5) -----------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "max_lifetime", "reason"),
    [
        pytest.param(600, timedelta(minutes=10), None, id="exactly-the-maximum"),
        pytest.param(601, timedelta(minutes=10), Reason.TOKEN_LIFETIME_TOO_LONG, id="one-second-over"),
        pytest.param(86_400, TrustedIssuer(ISSUER, AUDIENCE).max_lifetime, None, id="default-24h"),
        pytest.param(10**10, timedelta(days=366), Reason.TOKEN_LIFETIME_TOO_LONG, id="centuries"),
    ],
)
def test_maximum_lifetime_is_per_issuer(
    jwks_path: Path, keys: Keys, clock: Clock, lifetime: int, max_lifetime: timedelta, reason: Reason | None
) -> None:
    """exp - iat above the issuer's max_lifetime is token_lifetime_too_long, whatever exp says."""
    verifier = TokenVerifier(
        [TrustedIssuer(ISSUER, AUDIENCE, jwks_file=jwks_path, max_lifetime=max_lifetime)], clock=clock
    )
    iat = int(clock())
    token = TokenFactory(keys.es256).make(iat=iat, exp=iat + lifetime)
    if reason is None:
        assert verify(verifier, token).expires_at == iat + lifetime
    else:
        assert refused(verifier, token).reason is reason


@pytest.mark.parametrize(
    "cnf",
    [
        pytest.param({}, id="empty"),
        pytest.param({"jkt": "A" * 43}, id="jkt"),
        pytest.param({"x5t": "A" * 27}, id="x5t-sha1"),
        pytest.param({"jwk": {"kty": "oct"}}, id="jwk"),
        pytest.param({"jku": "https://evil.test/jwks"}, id="jku"),
        pytest.param({"x5t#S256": "A" * 43, "kid": "k"}, id="extra-member"),
        pytest.param({"x5t#S256": "A" * 42}, id="short-thumbprint"),
        pytest.param({"x5t#S256": "A" * 42 + "="}, id="padded-thumbprint"),
        pytest.param({"x5t#S256": ["A" * 43]}, id="thumbprint-list"),
    ],
)
def test_a_binding_that_cannot_be_verified_is_refused(
    verifier: TokenVerifier, factory: TokenFactory, cnf: dict[str, Any]
) -> None:
    """RFC 7800 §3: a cnf other than one x5t#S256 thumbprint is token_binding_unverifiable, not a bearer token."""
    assert refused(verifier, factory.make(cnf=cnf)).reason is Reason.TOKEN_BINDING_UNVERIFIABLE
