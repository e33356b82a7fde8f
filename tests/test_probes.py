"""Kubelet probes without a client certificate (/livez, /readyz on their own plain-HTTP port), the
drain on SIGTERM, and a rolling update that loses no call."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from aigis.client_sdk import Client, ClientCredentials
from aigis.server.config import ExternalIssuer, HostPort, IssuerSettings
from tests.calls import RPC_KINDS, bearer, channel, issuer_token, run
from tests.conftest import make_pki
from tests.procs import AigisProcess

PROBES = HostPort("127.0.0.1", 0)


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, Any] | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body) if body else None
        except ValueError:
            return exc.code, None


def test_probe_port_is_off_by_default(start_stack: Any) -> None:
    """Without [probes] listen there is no probe listener."""
    stack = start_stack()
    assert stack.server.probes is None and stack.server.probes_port is None


def test_livez_and_readyz_answer_without_credentials(start_stack: Any) -> None:
    """Plain HTTP, no certificate, no token: /livez and /readyz say alive and ready."""
    stack = start_stack(probes_listen=PROBES)
    port = stack.server.probes_port
    assert get(port, "/livez") == (200, {"alive": True})
    assert get(port, "/readyz") == (200, {"ready": True, "failing": {}})
    assert get(port, "/readyz", "HEAD")[0] == 200


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/", "GET", 404),
        ("/metrics", "GET", 404),
        ("/livez/../readyz/x", "GET", 404),
        ("/oauth2/token", "POST", 404),
        ("/readyz", "POST", 405),
        ("/livez", "DELETE", 405),
    ],
)
def test_nothing_else_is_served(start_stack: Any, path: str, method: str, status: int) -> None:
    """Any other path or method is refused; the probe port serves nothing but the two probes."""
    stack = start_stack(probes_listen=PROBES)
    assert get(stack.server.probes_port, path, method)[0] == status


def test_readyz_fails_while_draining_but_calls_are_served(start_stack: Any) -> None:
    """drain(): readiness 503 naming `draining`, gRPC health NOT_SERVING, calls still answered."""
    stack = start_stack(probes_listen=PROBES)
    stack.run(stack.server.drain())
    status, body = get(stack.server.probes_port, "/readyz")
    assert (status, body) == (503, {"ready": False, "failing": {"draining": "shutting down"}})
    assert get(stack.server.probes_port, "/livez")[0] == 200
    with channel(stack, "demo") as ch:
        assert run(lambda: RPC_KINDS["unary"](ch, bearer(issuer_token(stack, "demo")))).value == 5


def test_readyz_fails_while_token_keys_cannot_be_fetched(start_stack: Any, tmp_path: Path) -> None:
    """A server that trusts an issuer whose JWKS URL does not answer is alive but not ready."""
    pki, _ = make_pki(tmp_path / "pki", datetime.now(UTC))
    down = ExternalIssuer(issuer="https://127.0.0.1:1", audience="aigis", jwks_url="https://127.0.0.1:1/jwks.json")
    stack = start_stack(pki, probes_listen=PROBES, issuer=IssuerSettings(enabled=False), external_issuers=(down,))
    port = stack.server.probes_port
    assert get(port, "/livez")[0] == 200
    status, body = get(port, "/readyz")
    assert status == 503 and body is not None
    assert body["failing"] == {"token_keys": "no keys for https://127.0.0.1:1"}


# ------------------------------------------------------------------ rolling update, real processes


def _replica(tmp_path: Path, name: str, pki_root: Path) -> AigisProcess:
    config = tmp_path / "aigis.toml"
    if not config.exists():
        config.write_text(
            '[server]\nlisten = "127.0.0.1:0"\ndrain_seconds = 3\ngrace_seconds = 2\n'
            f'certs = "{pki_root}"\n'
            '[issuer]\nlisten = "127.0.0.1:0"\nurl = "https://aigis-issuer.test"\n'
            '[probes]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        )
    return AigisProcess("serve", tmp_path / name, config=config)


def _adds_served(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = 'aigis_requests_total{code="OK",method="/aigis.calculator.v1.Calculator/Add"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_rolling_update_loses_no_call(tmp_path: Path) -> None:
    """Two replicas behind one round-robin SDK client under steady load; the old one gets SIGTERM:
    it turns unready (and NOT_SERVING, so the client sends it nothing new), keeps answering calls for
    drain_seconds, then stops; not one call fails."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    old, new = _replica(tmp_path, "old", pki.root), _replica(tmp_path, "new", pki.root)
    try:
        old_info, new_info = old.wait_ready(), new.wait_ready()
        files = {"ca": pki.ca_cert, "cert": pki.client_cert("demo"), "key": pki.client_key("demo")}
        tokens = ClientCredentials(new_info["issuer_url"] + "/oauth2/token", **files)
        target = f"ipv4:127.0.0.1:{old_info['port']},127.0.0.1:{new_info['port']}"
        stop, failures, answered = threading.Event(), [], []

        def load() -> None:
            with Client(target, **files, token_provider=tokens, default_timeout=10, server_name="localhost") as client:
                deadline = time.monotonic() + 40
                while not stop.is_set() and time.monotonic() < deadline and len(answered) < 20_000:
                    try:
                        assert client.add(2, 3) == 5
                        answered.append(time.monotonic())
                    except Exception as exc:
                        failures.append(repr(exc))

        worker = threading.Thread(target=load, name="load")
        worker.start()
        time.sleep(1.0)
        old.signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + 2
        while get(old_info["probes_port"], "/readyz")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(old_info["probes_port"], "/readyz")[0] == 503
        # The SDK watches grpc.health.v1 on each address: the draining replica gets no new calls.
        time.sleep(0.5)
        served_before = _adds_served(old_info["metrics_port"])
        time.sleep(1.0)
        assert _adds_served(old_info["metrics_port"]) == served_before
        # Still draining: the old replica answers calls made to it directly.
        ca, cert, key = (p.read_bytes() for p in (pki.ca_cert, pki.client_cert("demo"), pki.client_key("demo")))
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        with grpc.secure_channel(f"localhost:{old_info['port']}", credentials) as direct:
            outcome = run(lambda: RPC_KINDS["unary"](direct, bearer(tokens.token())))
        assert outcome.value == 5 and time.monotonic() - signalled < 3
        assert _adds_served(old_info["metrics_port"]) == served_before + 1
        assert old.wait(20) == 0
        exited = time.monotonic()
        assert exited - signalled >= 3  # the drain delay was kept
        time.sleep(1.0)
        stop.set()
        worker.join(30)
        assert not worker.is_alive()
        assert failures == []
        assert len([t for t in answered if t < signalled]) > 10
        assert len([t for t in answered if t > exited]) > 10  # the survivor carried on alone
    finally:
        old.stop()
        new.stop()


def test_second_signal_ends_the_drain_early(tmp_path: Path) -> None:
    """A second SIGTERM during a long drain stops the server at once (exit 0), e.g. for an operator
    who does not want to wait for drain_seconds."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    config = tmp_path / "aigis.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\ndrain_seconds = 60\ngrace_seconds = 1\ncerts = "{pki.root}"\n'
                      '[issuer]\nlisten = "127.0.0.1:0"\n[probes]\nlisten = "127.0.0.1:0"\n'
                      '[metrics]\nenabled = false\n')
    server = AigisProcess("serve", tmp_path / "run", config=config)
    try:
        info = server.wait_ready()
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while get(info["probes_port"], "/readyz")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
        assert time.monotonic() - started < 15
    finally:
        server.stop()
