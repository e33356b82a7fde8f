"""A private aigis server for one test module (conftest's `start_stack` is function-scoped).

The attack modules start one server per policy or limit setting and reuse it for every case in the
module; the certificates of extra clients are issued once, before the server starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import CALC, PREDICT, RunningStack, ServerThread, make_pki, stack_config

from aigis.auth.certs import issue_client
from aigis.auth.pki import PkiPaths


@contextmanager
def private_stack(
    root: Path,
    *,
    clients: Iterable[str] = (),
    policy: dict[str, Any] | None = None,
    pki: PkiPaths | None = None,
    **changes: Any,
) -> Iterator[RunningStack]:
    """A running server + issuer under `root`: the conftest PKI (or `pki`, made by `make_pki`) plus
    `clients` (both scopes), the given A43 `policy` (default: conftest's), and other Config `changes`."""
    now = datetime.now(UTC)
    secret = ""
    if pki is None:
        pki, secret = make_pki(root / "certs", now)
    for name in clients:
        issue_client(pki, name, scopes=[CALC, PREDICT], now=now)
    if policy is not None:
        path = root / "private-policy.json"  # conftest writes its own policy.json here
        path.write_text(json.dumps(policy, indent=2))
        changes["policy"] = path
    audit_log = root / "audit.jsonl"
    runner = ServerThread(stack_config(pki, audit_log, **changes))
    try:
        issuer = runner.server.issuer
        assert issuer is not None
        yield RunningStack(
            target=runner.server.target,
            pki=pki,
            token_url=issuer.token_url,
            issuer_url=issuer.url,
            audit_log=audit_log,
            secret=secret,
            server=runner.server,
            loop=runner.loop,
        )
    finally:
        runner.stop()
