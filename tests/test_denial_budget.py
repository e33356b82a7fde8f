"""A principal that floods with denials is contained before token work; a busy honest one is not.

Each principal has a budget only its denials spend ([limits] denial_burst, refilled at
denial_rate_per_second). Every way of being denied spends it: forged tokens, missing scopes, deny
rules. Once it is empty the principal is refused RESOURCE_EXHAUSTED `too_many_denials` (audited)
before its token is looked at, while other principals — and valid calls in any number — are served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import pytest
from calls import RPC_KINDS, assert_denied, bearer, channel, issuer_token, run, sample, scrape, wait_until
from forge import factory, real_key, valid_claims
from jwt_factory import generate_key
from private_stack import private_stack

from aigis.auth.audit_format import request_ids
from aigis.server.config import Limits

BUDGET = 3  # denial_burst on the private server
Metadata = tuple[tuple[str, str], ...]


def _forged(stack: Any, client: str) -> Metadata:
    attacker = generate_key("ES256", kid=real_key(stack).kid)
    return bearer(factory(stack).make(key=attacker, **valid_claims(client)))


def _scope_missing(stack: Any, client: str) -> Metadata:
    return bearer(factory(stack).make(**valid_claims(client, scope="classifier:predict")))


def _valid(stack: Any, client: str) -> Metadata:
    return bearer(issuer_token(stack, client))


# case id -> (principal that floods, its call's metadata, the status and reason of each denial)
CASES: dict[str, tuple[str, Callable[[Any, str], Metadata], grpc.StatusCode, str]] = {
    "forged-tokens": ("db-forged", _forged, grpc.StatusCode.UNAUTHENTICATED, "token_bad_signature"),
    "forbidden-calls": ("db-scope", _scope_missing, grpc.StatusCode.PERMISSION_DENIED, "scope_missing"),
    "deny-rule": ("blocked", _valid, grpc.StatusCode.PERMISSION_DENIED, "policy_denied"),
}
HONEST = "db-honest"


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # 0.001 tokens/s: nothing refills during the test, so each outcome is exact without sleeping.
    limits = replace(Limits(), denial_rate_per_second=0.001, denial_burst=BUDGET)
    clients = ["db-forged", "db-scope", HONEST]
    with private_stack(tmp_path_factory.mktemp("denial-budget"), clients=clients, limits=limits) as running:
        yield running


@pytest.mark.parametrize("case", list(CASES))
def test_principal_denied_too_often_is_refused_before_token_work(budgeted: Any, case: str) -> None:
    """After `denial_burst` denials the flooder gets RESOURCE_EXHAUSTED `too_many_denials` (audited,
    its token no longer checked); an honest principal's calls beside it all succeed."""
    client, metadata, code, reason = CASES[case]
    md = metadata(budgeted, client)
    with channel(budgeted, client) as ch:
        for _ in range(BUDGET):
            before = len(budgeted.audit_records())
            assert_denied(budgeted, before, run(lambda: RPC_KINDS["unary"](ch, md)), code, reason)
        for _ in range(2):  # a refusal spends nothing, and the budget stays empty
            before = len(budgeted.audit_records())
            outcome = run(lambda: RPC_KINDS["unary"](ch, md))
            record = assert_denied(budgeted, before, outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_denials")
            assert record["principal"] == f"spiffe://aigis.local/client/{client}"
            assert record["client_id"] is None  # refused before the token was verified
    honest = _valid(budgeted, HONEST)
    with channel(budgeted, HONEST) as ch:
        # Busy and never denied: many times the budget, no refusal.
        assert [RPC_KINDS["unary"](ch, honest) for _ in range(4 * BUDGET)] == [5] * (4 * BUDGET)


def test_budget_refills_and_valid_calls_do_not_spend_it(start_stack: Any) -> None:
    """A flooder that stops is served again once its budget refills (rate-limited recovery), and
    from then on its valid calls, however many, do not drain it."""
    stack = start_stack(limits=replace(Limits(), denial_rate_per_second=1.0, denial_burst=2))
    forged, valid = _forged(stack, "demo"), _valid(stack, "demo")
    with channel(stack, "demo") as ch:
        # 10 denials in well under 8 s (one refill per second) must empty a budget of 2.
        codes = [run(lambda: RPC_KINDS["unary"](ch, forged)).code for _ in range(10)]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        wait_until(lambda: run(lambda: RPC_KINDS["unary"](ch, valid)).code == grpc.StatusCode.OK, 10.0,
                   "the refilled budget lets a valid call through")
        assert [RPC_KINDS["unary"](ch, valid) for _ in range(20)] == [5] * 20
    reasons = {r["reason"] for r in stack.audit_records()}
    assert reasons == {"token_bad_signature", "too_many_denials"}


HOLD = 1.5  # denial_hold_seconds on the holding server
MAX_HELD = 2
FLOODER = "dh-flooder"


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    limits = replace(Limits(), denial_rate_per_second=0.001, denial_burst=1, denial_hold_seconds=HOLD,
                     max_held_denials=MAX_HELD)
    with private_stack(tmp_path_factory.mktemp("denial-hold"), clients=[FLOODER, HONEST], limits=limits) as running:
        with channel(running, FLOODER) as ch:  # one forged call empties a budget of 1
            run(lambda: RPC_KINDS["unary"](ch, _forged(running, FLOODER)))
        yield running


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    outcome = run(call)
    return outcome, time.monotonic() - started


@pytest.mark.parametrize("kind", list(RPC_KINDS))
def test_flooders_refusals_are_answered_late_while_others_are_served(holding: Any, kind: str) -> None:
    """A principal with an empty denial budget gets its refusal (every RPC kind) only after
    `denial_hold_seconds`, audited `too_many_denials` with the trailer's request id; meanwhile an
    honest principal is answered at once."""
    forged, honest = _forged(holding, FLOODER), _valid(holding, HONEST)
    before = len(holding.audit_records())
    with channel(holding, FLOODER) as flood_ch, channel(holding, HONEST) as honest_ch, \
            ThreadPoolExecutor(1) as pool:
        refusal = pool.submit(_timed, lambda: RPC_KINDS[kind](flood_ch, forged))
        wait_until(lambda: len(holding.audit_records()) > before, 10.0, "the refusal's audit record")
        served, served_in = _timed(lambda: RPC_KINDS[kind](honest_ch, honest))
        outcome, refused_in = refusal.result(timeout=30)
    assert served.code == grpc.StatusCode.OK and served_in < HOLD / 2, (served, served_in)
    assert refused_in >= HOLD * 0.95, refused_in
    assert_denied(holding, before, outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_denials")


def test_held_refusals_are_bounded(holding: Any) -> None:
    """At most `max_held_denials` refusals wait at once: the others are answered at once (memory
    stays bounded however many calls a flooder opens), every one audited, and counted in
    aigis_denial_hold_overflow_total."""
    forged = _forged(holding, FLOODER)
    before = len(holding.audit_records())
    overflow_before = sample(scrape(holding), "aigis_denial_hold_overflow_total")
    calls = 2 * MAX_HELD
    with channel(holding, FLOODER) as ch, ThreadPoolExecutor(calls) as pool:
        results = list(pool.map(lambda _: _timed(lambda: RPC_KINDS["unary"](ch, forged)), range(calls)))
    held = sorted(elapsed for _, elapsed in results)
    assert all(elapsed >= HOLD * 0.95 for elapsed in held[-MAX_HELD:]), held
    assert all(elapsed < HOLD * 0.8 for elapsed in held[:-MAX_HELD]), held
    codes = {outcome.code for outcome, _ in results}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    records = holding.audit_records()[before:]
    # Refusals arriving together share a record that names each of them (auth.refusals).
    assert sorted(rid for r in records for rid in request_ids(r)) == sorted(o.request_id for o, _ in results)
    assert sum(r.get("count", 1) for r in records) == calls
    assert {r["reason"] for r in records} == {"too_many_denials"}
    metrics = scrape(holding)
    assert sample(metrics, "aigis_denial_hold_overflow_total") == overflow_before + calls - MAX_HELD
    assert sample(metrics, "aigis_denials_held") == 0
