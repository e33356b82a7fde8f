"""`aigis serve --workers 2`: two full server processes on one port, both serving, clean shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from calls import RPC_KINDS, bearer, channel, issuer_token
from conftest import make_pki
from flood import Seen, add_load
from serve_proc import serve

from aigis.auth.audit_chain import log_layout, read_writer_records, verify_log

REPO = Path(__file__).resolve().parent.parent


def requests_served(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("aigis_requests_total{") and "Calculator/Add" in line
    )


def test_two_workers_share_one_port(tmp_path: Path) -> None:
    """Both workers accept connections on the same port; tokens from worker 0's issuer work on both."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    ready = tmp_path / "ready.json"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aigis.tools.cli", "serve", "--workers", "2", "--certs", str(pki.root),
             "--listen", "127.0.0.1:0", "--issuer-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--audit-log", str(tmp_path / "audit.jsonl"), "--ready-file", str(ready)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert len(info["pids"]) == 2 and len(set(info["metrics_ports"])) == 2
        stack = SimpleNamespace(
            target=info["target"], token_url=info["issuer_url"] + "/oauth2/token",
            client_files=lambda name: (pki.ca_cert, pki.client_cert(name), pki.client_key(name)),
        )  # fmt: skip
        token = bearer(issuer_token(stack, "demo"))
        for _ in range(24):  # each channel is a new connection; the kernel picks a worker per connection
            with channel(stack, "demo") as ch:
                assert RPC_KINDS["unary"](ch, token) == 5
        served = [requests_served(port) for port in info["metrics_ports"]]
        assert sum(served) == 24
        assert all(n > 0 for n in served), served
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def _ready_pids(ready: Path) -> list[int]:
    try:
        return json.loads(ready.read_text())["pids"]
    except (OSError, ValueError):  # being replaced
        return []


async def _valid_load_on_fresh_connections(served: Any, token: str, seconds: float, connections: int = 6) -> Seen:
    """Valid Add on several connections at once (the kernel spreads them over the workers)."""
    seen = Seen()
    results = await asyncio.gather(*(
        add_load(served.target, served.pki, token=token, in_flight=4, seconds=seconds, max_calls=50_000,
                 wait_for_ready=True)
        for _ in range(connections)
    ))  # fmt: skip
    for result in results:
        seen.merge(result)
    return seen


async def _denials(served: Any, connections: int = 8) -> Seen:
    seen = Seen()
    for result in await asyncio.gather(*(add_load(served.target, served.pki, in_flight=1, max_calls=3)
                                         for _ in range(connections))):  # fmt: skip
        seen.merge(result)
    return seen


@pytest.mark.reliability
def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(tmp_path: Path) -> None:
    """kill -9 of worker 1 under load: only its calls in flight fail, it is back within seconds on
    the same port, its audit chain continues, and the service stops cleanly with 0."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    audit_log = tmp_path / "audit.jsonl"
    served = serve(tmp_path, pki, audit_log, args=["--workers", "2"], name="workers")
    ready = tmp_path / "workers.ready.json"
    try:
        pids = served.info["pids"]
        token = issuer_token(served.stack(), "demo")
        _wait_for(lambda: asyncio.run(_denials(served)) and log_layout(audit_log)[-1].writer == "1", 20, "w1 audit")
        w1_before = len(read_writer_records(log_layout(audit_log)[-1]))

        async def load_and_kill() -> tuple[Seen, float]:
            load = asyncio.create_task(_valid_load_on_fresh_connections(served, token, seconds=8))
            await asyncio.sleep(2)
            os.kill(pids[1], signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.to_thread(_wait_for, lambda: _ready_pids(ready)[1:] not in ([], [pids[1]]), 20, "restart")
            back_after = time.monotonic() - killed
            return await load, back_after

        seen, back_after = asyncio.run(load_and_kill())
        new_pids = _ready_pids(ready)
        assert new_pids[0] == pids[0] and new_pids[1] != pids[1], (pids, new_pids)
        failed = sum(n for code, n in seen.codes.items() if code != "OK")
        print(f"\nworker kill -9 under load: {seen.codes['OK']} calls OK, {failed} failed "
              f"({dict(seen.codes)}); worker back after {back_after:.1f} s")
        assert back_after < 15  # 0.5 s backoff + a spawned interpreter's start on a busy machine
        assert failed <= 24, seen.codes  # at most the 6 x 4 calls in flight; not later calls
        assert seen.codes["OK"] > 100
        # The restarted worker serves, and continues its own chain.
        _wait_for(lambda: asyncio.run(_denials(served)) and len(read_writer_records(log_layout(audit_log)[-1]))
                  > w1_before, 20, "w1 to serve again")  # fmt: skip
        report = verify_log(audit_log, None)
        assert report.ok, report.problems
        assert {c.writer for c in report.chains} == {"0", "1"}
    finally:
        assert served.kill(signal.SIGTERM) == 0, served.output()


@pytest.mark.reliability
def test_a_crash_loop_stops_the_service_with_a_failure_status(tmp_path: Path) -> None:
    """A worker that keeps dying is given up on: the supervisor stops everything and exits 1."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    served = serve(tmp_path, pki, tmp_path / "audit.jsonl", args=["--workers", "2"], name="loop",
                   config="[server]\nworker_restart_limit = 1\n")  # fmt: skip
    ready = tmp_path / "loop.ready.json"
    first = served.info["pids"][1]
    os.kill(first, signal.SIGKILL)
    _wait_for(lambda: _ready_pids(ready)[1:] not in ([], [first]), 20, "the first restart")
    os.kill(_ready_pids(ready)[1], signal.SIGKILL)
    assert served.proc.wait(60) == 1, served.output()
    assert "giving up, stopping all workers" in served.output()
    assert not any(_alive(pid) for pid in served.info["pids"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
