"""The SDK balances over every address of its target (round_robin) and retries an idempotent call
that failed UNAVAILABLE on another address: loopback replicas, no network namespaces needed."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aigis.client_sdk import Client, ClientCredentials
from aigis.server.config import HostPort, IssuerSettings
from tests.conftest import make_pki

SHARED_ISS = IssuerSettings(listen=HostPort("127.0.0.1", 0), url="https://aigis-issuer.test")


def _adds(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = 'aigis_requests_total{code="OK",method="/aigis.calculator.v1.Calculator/Add"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture
def replicas(start_stack: Any, tmp_path: Path) -> list[Any]:
    """Two servers on loopback from one PKI, both trusting the same `iss`."""
    pki, _ = make_pki(tmp_path / "pki", datetime.now(UTC))
    return [start_stack(pki, issuer=SHARED_ISS) for _ in range(2)]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else gets it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _client(stack: Any, target: str) -> Client:
    files = {"ca": stack.pki.ca_cert, "cert": stack.pki.client_cert("demo"), "key": stack.pki.client_key("demo")}
    tokens = ClientCredentials(stack.token_url, **files)
    return Client(target, **files, token_provider=tokens, default_timeout=10, server_name="localhost")


def test_sdk_spreads_calls_over_every_address(replicas: list[Any]) -> None:
    """`ipv4:a,b`: both replicas answer a share of 40 calls."""
    before = [_adds(r.server.metrics_port) for r in replicas]
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.server.port}" for r in replicas)
    with _client(replicas[0], target) as client:
        assert [client.add(i, 1) for i in range(40)] == [i + 1 for i in range(40)]
    served = [_adds(r.server.metrics_port) - b for r, b in zip(replicas, before, strict=True)]
    assert all(count >= 10 for count in served), served


def test_unavailable_address_is_retried_on_another(replicas: list[Any], refused_port: int) -> None:
    """One address refuses connections: no call fails, every call is answered by the live one."""
    live = replicas[0]
    before = _adds(live.server.metrics_port)
    with _client(live, f"ipv4:127.0.0.1:{refused_port},127.0.0.1:{live.server.port}") as client:
        assert [client.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    assert _adds(live.server.metrics_port) - before == 20
