"""`aigis serve --workers 2`: two full server processes on one port, both serving, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from calls import RPC_KINDS, bearer, channel, issuer_token
from conftest import make_pki

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
