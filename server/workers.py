"""`aigis serve --workers N`: N full server processes sharing one port (SO_REUSEPORT).

One Python process tops out at one core for gRPC work; the kernel spreads new connections
across N processes bound to the same port. Worker 0 also runs the embedded token issuer; the
others trust it by URL. Each worker writes its own audit file (its own chain), which
`aigis audit show/verify` read together. The parent only supervises: it forwards SIGTERM/SIGINT
and waits for graceful shutdown.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aigis.server.config import Config, HostPort

log = logging.getLogger("aigis.workers")
READY_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: int
    pid: int
    port: int
    issuer_url: str | None
    metrics_port: int | None


def worker_config(config: Config, worker_id: int, port: int, issuer_url: str | None) -> Config:
    """The configuration of worker `worker_id` once worker 0 has bound `port` and the issuer."""
    metrics = config.metrics_listen
    if metrics is not None and metrics.port != 0:
        metrics = HostPort(metrics.host, metrics.port + worker_id)  # one scrape target per worker
    probes = config.probes_listen
    if probes is not None and probes.port != 0:
        probes = HostPort(probes.host, probes.port + worker_id)
    issuer = config.issuer
    if worker_id > 0:
        issuer = replace(issuer, enabled=False, url=issuer.url or issuer_url or "")
    return replace(
        config,
        listen=HostPort(config.listen.host, port),
        issuer=issuer,
        metrics_listen=metrics,
        probes_listen=probes,
        worker_id=worker_id,
    )


def _worker_main(config: Config, conn: multiprocessing.connection.Connection, log_level: str) -> None:
    """Entry point of one worker process (spawned, so nothing is inherited but `config`)."""
    import asyncio

    from aigis.server.app import StartupError, serve
    from aigis.server.logs import configure_logging

    configure_logging(log_level, config.log_format, static={"worker": config.worker_id})

    def ready(running: Any) -> None:
        issuer = running.issuer
        conn.send(("ready", running.port, issuer.url if issuer else None, running.metrics_port))

    try:
        asyncio.run(serve(config, ready=ready))
    except StartupError as exc:
        conn.send(("failed", str(exc), None, None))
    finally:
        conn.close()


def _start(ctx: Any, config: Config, log_level: str) -> tuple[Any, WorkerInfo]:
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_worker_main, args=(config, child, log_level), name=f"aigis-w{config.worker_id}")
    process.start()
    child.close()
    if not parent.poll(READY_TIMEOUT_SECONDS):
        process.terminate()
        raise RuntimeError(f"worker {config.worker_id} did not start within {READY_TIMEOUT_SECONDS:.0f} s")
    state, port_or_error, issuer_url, metrics_port = parent.recv()
    if state != "ready":
        process.join(10)
        raise RuntimeError(f"worker {config.worker_id}: {port_or_error}")
    return process, WorkerInfo(config.worker_id or 0, process.pid, port_or_error, issuer_url, metrics_port)


def run_workers(config: Config, workers: int, *, ready: Callable[[list[WorkerInfo]], None] | None = None) -> int:
    """Start `workers` server processes on one port and supervise them until a signal."""
    ctx = multiprocessing.get_context("spawn")
    log_level = logging.getLevelName(logging.getLogger().level)
    shared = replace(config, workers=workers)
    processes: list[Any] = []
    infos: list[WorkerInfo] = []
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        first, info = _start(ctx, worker_config(shared, 0, config.listen.port, None), log_level)
        processes.append(first)
        infos.append(info)
        for worker_id in range(1, workers):
            process, info = _start(ctx, worker_config(shared, worker_id, infos[0].port, infos[0].issuer_url), log_level)
            processes.append(process)
            infos.append(info)
        if ready is not None:
            ready(infos)
        multiprocessing.connection.wait([p.sentinel for p in processes])
        if not stopping:
            log.error("a worker exited unexpectedly; stopping the others")
        stop_all()
        for process in processes:
            process.join(config.grace_seconds + 10)
        return 0 if stopping else 1
    except Exception:
        stop_all()
        for process in processes:
            process.join(config.grace_seconds + 10)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
