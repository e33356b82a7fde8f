"""Shared fixtures: a real PKI made at test time and a real aigis server on an ephemeral port.

The server runs in-process on its own event loop thread, listening on 127.0.0.1 port 0 with mTLS;
the embedded issuer listens on port 0 too. Tests talk to it over real TLS with real tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aigis.auth.audit import read_records
from aigis.auth.certs import init_pki, issue_client, revoke_client
from aigis.auth.pki import PkiPaths
from aigis.server.app import AigisServer, start_server
from aigis.server.config import BUNDLED_POLICY, Config, HostPort, IssuerSettings, Limits

CALC = "calculator:compute"
PREDICT = "classifier:predict"


@dataclass(frozen=True)
class RunningStack:
    """A running aigis server + issuer, and the PKI its clients use."""

    target: str
    pki: PkiPaths
    token_url: str
    issuer_url: str
    audit_log: Path
    secret: str  # the client secret of `secret-client`
    server: AigisServer
    loop: asyncio.AbstractEventLoop

    def client_files(self, name: str) -> tuple[Path, Path, Path]:
        return self.pki.ca_cert, self.pki.client_cert(name), self.pki.client_key(name)

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop (e.g. reload_now) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def audit_records(self) -> list[dict[str, Any]]:
        """Every audit record written so far, after the writer has caught up."""
        assert self.server.audit.flush(timeout=5.0), "audit writer did not catch up"
        return read_records(self.audit_log)


def make_pki(root: Path, now: datetime) -> tuple[PkiPaths, str]:
    """A full PKI: demo (both scopes), reader (predict only), calc-only, secret-client, revoked,
    and blocked (both scopes, but named by a deny rule in the test policy)."""
    pki = PkiPaths(root)
    init_pki(pki, now=now)
    issue_client(pki, "reader", scopes=[PREDICT], now=now)
    issue_client(pki, "calc-only", scopes=[CALC], now=now)
    issue_client(pki, "revoked", scopes=[CALC, PREDICT], now=now)
    issue_client(pki, "blocked", scopes=[CALC, PREDICT], now=now)
    secret = issue_client(pki, "secret-client", scopes=[CALC, PREDICT], now=now, with_secret=True).secret
    assert secret
    revoke_client(pki, "revoked", now=now)
    return pki, secret


class ServerThread:
    """Runs `start_server` on a private event loop in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aigis-test-server", daemon=True)
        self._thread.start()
        starting = asyncio.run_coroutine_threadsafe(start_server(config), self.loop)
        self.server: AigisServer = starting.result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def policy_with_deny_rule(directory: Path) -> Path:
    """The bundled default policy plus one deny rule, so deny-beats-allow is exercised end to end."""
    policy = json.loads(BUNDLED_POLICY.read_text())
    policy["deny_rules"] = [
        {"name": "deny-blocked-client", "source": {"principals": ["spiffe://aigis.local/client/blocked"]}}
    ]
    path = directory / "policy.json"
    path.write_text(json.dumps(policy, indent=2))
    return path


def stack_config(pki: PkiPaths, audit_log: Path, **changes: Any) -> Config:
    changes.setdefault("policy", policy_with_deny_rule(audit_log.parent))
    changes.setdefault("issuer", IssuerSettings(listen=HostPort("127.0.0.1", 0)))
    # The attack tables deny one principal hundreds of times on purpose: the denial budget (on by
    # default) would answer them `too_many_denials`. Tests of the budget pass their own limits.
    changes.setdefault("limits", replace(Limits(), denial_rate_per_second=0.0))
    return replace(
        Config(),
        listen=HostPort("127.0.0.1", 0),
        certs=pki.root,
        audit_log=audit_log,
        metrics_listen=HostPort("127.0.0.1", 0),
        grace_seconds=1.0,
        **changes,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("aigis")
    pki, secret = make_pki(root / "certs", datetime.now(UTC))
    runner = ServerThread(stack_config(pki, root / "audit.jsonl"))
    server = runner.server
    assert server.issuer is not None
    yield RunningStack(
        target=server.target,
        pki=pki,
        token_url=server.issuer.token_url,
        issuer_url=server.issuer.url,
        audit_log=root / "audit.jsonl",
        secret=secret,
        server=server,
        loop=runner.loop,
    )
    runner.stop()


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Callable[..., RunningStack]]:
    """Start a private server with Config changes (for tests that need their own policy etc.)."""
    runners: list[ServerThread] = []

    def start(pki: PkiPaths | None = None, **changes: Any) -> RunningStack:
        secret = ""
        if pki is None:
            pki, secret = make_pki(tmp_path / "certs", datetime.now(UTC))
        audit_log = tmp_path / f"audit-{len(runners)}.jsonl"
        runner = ServerThread(stack_config(pki, audit_log, **changes))
        runners.append(runner)
        issuer = runner.server.issuer
        return RunningStack(
            target=runner.server.target,
            pki=pki,
            token_url=issuer.token_url if issuer else "",
            issuer_url=issuer.url if issuer else "",
            audit_log=audit_log,
            secret=secret,
            server=runner.server,
            loop=runner.loop,
        )

    yield start
    for runner in runners:
        runner.stop()
