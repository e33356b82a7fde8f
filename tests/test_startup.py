"""A start that fails late stops every part that had started: no thread, socket or port left behind.

Each case lets the issuer, the audit writer, the metrics endpoint, the thread pool and the gRPC
server come up, then fails one of the last steps — the gRPC port or the probe port is taken — and
compares the process's threads and open sockets with what it had before the attempt.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aigis.server.app import StartupError, start_server
from aigis.server.config import HostPort
from tests.conftest import make_pki, stack_config


def _sockets() -> set[str]:
    """The inodes of this process's open sockets."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def _threads() -> set[int]:
    """Threads of this process, but not the event loop's default executor ("asyncio_N"): it belongs
    to the caller's loop and grows on demand with asyncio.to_thread, whoever calls it."""
    return {t.ident for t in threading.enumerate() if t.ident is not None and not t.name.startswith("asyncio_")}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held by a plain listening socket (no SO_REUSEPORT), so nothing else can bind it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("taken", ["grpc", "probes"])
def test_a_failed_start_leaves_no_thread_or_socket(tmp_path: Path, taken_port: int, taken: str) -> None:
    """The gRPC (or probe) port is busy: StartupError names it, and every started part is stopped."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    busy = HostPort("127.0.0.1", taken_port)
    config = stack_config(pki, tmp_path / "audit.jsonl")
    config = replace(config, listen=busy) if taken == "grpc" else replace(config, probes_listen=busy)
    # A warm-up start and stop, so that lazily created process-wide helpers (grpc's, asyncio's
    # default executor) exist before the baseline is taken.
    loop = asyncio.new_event_loop()
    try:
        warm = loop.run_until_complete(start_server(stack_config(pki, tmp_path / "warm.jsonl")))
        loop.run_until_complete(warm.stop(0))
        threads_before, sockets_before = _threads(), _sockets()
        with pytest.raises(StartupError, match=str(taken_port)):
            loop.run_until_complete(start_server(config))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_threads() - threads_before or _sockets() - sockets_before):
            time.sleep(0.05)
        left = [t.name for t in threading.enumerate() if t.ident in _threads() - threads_before]
        assert left == [], f"threads left behind: {left}"
        assert _sockets() - sockets_before == set(), "sockets left behind"
    finally:
        loop.close()


def test_without_a_client_registry_the_trust_domain_is_the_default(tmp_path: Path) -> None:
    """No trust domain configured and no clients.json: the default domain, not a failed start."""
    from aigis.auth.pki import DEFAULT_TRUST_DOMAIN
    from aigis.server.app import client_certificate_policy

    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    pki.clients_registry.unlink()
    policy = client_certificate_policy(stack_config(pki, tmp_path / "audit.jsonl"), pki)
    assert policy.trust_domain == DEFAULT_TRUST_DOMAIN
