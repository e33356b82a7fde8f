"""Shadow (dry-run) policy: evaluated beside the enforced policy on every call, never enforcing.

Where it would have decided differently, the audit log gets a `dry_run: true` record (sharing the
call's request id) and `aigis_shadow_decisions_total` counts it; agreement is counted too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import Outcome, bearer, channel, issuer_token, run
from conftest import RunningStack
from private_stack import private_stack

from aigis.calculator.v1 import calculator_pb2 as calc
from aigis.calculator.v1 import calculator_pb2_grpc as calc_grpc
from aigis.server.app import StartupError
from aigis.server.config import BUNDLED_POLICY
from aigis.tools.audit_cmd import summarize

ADD = "/aigis.calculator.v1.Calculator/Add"
SPIFFE = "spiffe://aigis.local/client/"


def shadow_policy() -> dict[str, Any]:
    """The next policy being tried: it denies `demo` the calculator's Add, and drops the enforced
    policy's deny rule for `blocked`."""
    policy = json.loads(BUNDLED_POLICY.read_text())
    policy["name"] = "next-policy"
    policy["deny_rules"] = [
        {"name": "no-add-for-demo", "source": {"principals": [SPIFFE + "demo"]}, "request": {"paths": [ADD]}}
    ]
    return policy


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("shadow")
    path = root / "shadow.json"
    path.write_text(json.dumps(shadow_policy()))
    with private_stack(root, shadow_policy=path) as running:
        yield running


def add(stack: RunningStack, client: str) -> Outcome:
    token = issuer_token(stack, client)
    with channel(stack, client) as ch:
        stub = calc_grpc.CalculatorStub(ch)
        return run(lambda: stub.Add(calc.AddRequest(a=2, b=3), metadata=bearer(token), timeout=10).sum)


def shadow_count(stack: RunningStack, result: str) -> float:
    value = stack.server.metrics.registry.get_sample_value(
        "aigis_shadow_decisions_total", {"method": ADD, "result": result}
    )
    return value or 0.0


# client, enforced status, enforced reason (audit), shadow: would it allow, its reason, metric result
CASES = [
    pytest.param("demo", grpc.StatusCode.OK, None, False, "policy_denied", "would_deny", id="would-deny"),
    pytest.param(
        "blocked", grpc.StatusCode.PERMISSION_DENIED, "policy_denied", True, None, "would_allow", id="would-allow"
    ),
    pytest.param("calc-only", grpc.StatusCode.OK, None, None, None, "agree", id="both-allow"),
    pytest.param("reader", grpc.StatusCode.PERMISSION_DENIED, "scope_missing", None, None, "agree", id="both-deny"),
]


@pytest.mark.parametrize(("client", "code", "reason", "shadow_allows", "shadow_reason", "result"), CASES)
def test_shadow_policy_records_what_it_would_decide_differently(
    stack: RunningStack,
    client: str,
    code: grpc.StatusCode,
    reason: str | None,
    shadow_allows: bool | None,
    shadow_reason: str | None,
    result: str,
) -> None:
    """The enforced policy decides the call; a differing shadow decision is a dry_run record and a metric."""
    before, counted = len(stack.audit_records()), shadow_count(stack, result)
    outcome = add(stack, client)
    assert outcome.code is code
    records = stack.audit_records()[before:]
    enforced = [r for r in records if not r.get("dry_run")]
    dry_runs = [r for r in records if r.get("dry_run")]
    assert [(r["reason"], r["policy_name"]) for r in enforced] == ([(reason, "aigis-default")] if reason else [])
    if shadow_allows is None:
        assert dry_runs == []
    else:
        (dry_run,) = dry_runs
        assert dry_run["dry_run"] is True
        assert (dry_run["authorized"], dry_run["reason"]) == (shadow_allows, shadow_reason)
        assert (dry_run["enforced_authorized"], dry_run["enforced_reason"]) == (code is grpc.StatusCode.OK, reason)
        assert dry_run["policy_name"] == "next-policy"
        assert dry_run["principal"] == SPIFFE + client
        assert dry_run["rpc_method"] == ADD
        if enforced:  # the denial the client saw and its dry-run twin share the request id
            assert dry_run["request_id"] == enforced[0]["request_id"] == outcome.request_id
    assert shadow_count(stack, result) == counted + 1


def test_dry_run_records_are_not_counted_as_denials(stack: RunningStack) -> None:
    """`aigis audit summary` counts denials the clients saw, not what a shadow policy would deny."""
    add(stack, "demo")  # allowed; the shadow policy would deny it
    records = stack.audit_records()
    real = [r for r in records if r.get("authorized") is False and not r.get("dry_run")]
    assert any(r.get("dry_run") and r["authorized"] is False for r in records)
    assert summarize(records).denials == len(real)


def test_shadow_policy_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    """Editing the shadow policy file takes effect without a restart, like the enforced policy."""
    path = tmp_path / "shadow.json"
    path.write_text(BUNDLED_POLICY.read_text())  # agrees with the enforced policy for demo
    with private_stack(tmp_path, shadow_policy=path) as stack:
        add(stack, "demo")
        assert shadow_count(stack, "would_deny") == 0
        path.write_text(json.dumps(shadow_policy()))
        stack.run(stack.server.reload_now())
        assert add(stack, "demo").code is grpc.StatusCode.OK  # still not enforced
        assert shadow_count(stack, "would_deny") == 1


def test_invalid_shadow_policy_stops_start_up(tmp_path: Path) -> None:
    """A broken shadow policy is a configuration error naming the file, like the enforced one."""
    path = tmp_path / "shadow.json"
    path.write_text('{"name": "x", "allow_rules": []}')
    with pytest.raises(StartupError, match=r"shadow\.json: allow_rules"), private_stack(tmp_path, shadow_policy=path):
        pass
