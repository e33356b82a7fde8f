"""`aigis serve --workers N`: N full server processes sharing one port (SO_REUSEPORT).

One Python process tops out at one core for gRPC work; the kernel spreads new connections
across N processes bound to the same port. Worker 0 also runs the embedded token issuer; the
others trust it by URL. Each worker writes its own audit file (its own chain), which
`aigis audit show/verify` read together. The parent only supervises: it restarts a worker that
dies (backoff, crash-loop limit, then exit 1), forwards SIGTERM/SIGINT and waits for graceful
shutdown.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aigis.server.config import Config, HostPort

log = logging.getLogger("aigis.workers")
READY_TIMEOUT_SECONDS = 60.0
RESTART_FIRST_DELAY_SECONDS = 0.5
RESTART_MAX_DELAY_SECONDS = 30.0
SUPERVISOR_TICK_SECONDS = 0.5  # how often the supervisor looks at its stop flag while waiting


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


def restart_config(config: Config, worker_id: int, first: WorkerInfo) -> Config:
    """A restarted worker binds what its first start bound: the shared port, and for worker 0 the
    issuer's port and URL (tokens name it as `iss`, the other workers fetch its keys from it)."""
    restarted = worker_config(config, worker_id, first.port, first.issuer_url)
    if worker_id == 0 and first.issuer_url is not None:
        issuer_port = urllib.parse.urlsplit(first.issuer_url).port
        if issuer_port is not None:
            issuer = replace(
                restarted.issuer, listen=HostPort(restarted.issuer.listen.host, issuer_port), url=first.issuer_url
            )
            restarted = replace(restarted, issuer=issuer)
    return restarted


@dataclass
class _Worker:
    """One supervised worker: its process, what it reported, and when it crashed lately."""

    worker_id: int
    process: Any
    info: WorkerInfo
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # set while it waits for its backoff


def run_workers(config: Config, workers: int, *, ready: Callable[[list[WorkerInfo]], None] | None = None) -> int:
    """Start `workers` server processes on one port and supervise them until a signal.

    A worker that exits on its own is restarted after a backoff (0.5 s, doubling to 30 s) while
    the others go on serving; one that crashes more than `config.worker_restart_limit` times
    within `config.worker_restart_window_seconds` makes the supervisor stop them all and return 1
    (a crash loop is for the service manager to see). A signal stops all and returns 0. `ready`
    is called with every worker's info at start and again after each restart.
    """
    ctx = multiprocessing.get_context("spawn")
    log_level = logging.getLevelName(logging.getLogger().level)
    shared = replace(config, workers=workers)
    pool: list[_Worker] = []
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for worker in pool:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)

    def report() -> None:
        if ready is not None:
            ready([w.info for w in pool])

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        process, first = _start(ctx, worker_config(shared, 0, config.listen.port, None), log_level)
        pool.append(_Worker(0, process, first))
        for worker_id in range(1, workers):
            process, info = _start(ctx, worker_config(shared, worker_id, first.port, first.issuer_url), log_level)
            pool.append(_Worker(worker_id, process, info))
        report()
        gave_up = _supervise(ctx, shared, pool, first, log_level, lambda: stopping, report)
        stop_all()
        for worker in pool:
            worker.process.join(config.grace_seconds + 10)
        return 1 if gave_up else 0
    except Exception:
        stop_all()
        for worker in pool:
            worker.process.join(config.grace_seconds + 10)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(
    ctx: Any, config: Config, pool: list[_Worker], first: WorkerInfo, log_level: str,
    stopping: Callable[[], bool], report: Callable[[], None],
) -> bool:  # fmt: skip
    """Restart workers that exit until a signal (False) or a crash loop (True)."""
    while not stopping():
        now = time.monotonic()
        waiting = [w.restart_at for w in pool if w.restart_at is not None]
        timeout = max(0.0, min([SUPERVISOR_TICK_SECONDS, *(t - now for t in waiting)]))
        running = {w.process.sentinel: w for w in pool if w.restart_at is None}
        for sentinel in multiprocessing.connection.wait(list(running), timeout):
            worker = running[sentinel]
            worker.process.join()
            if stopping():
                return False
            if _crashed(config, worker):
                return True
        for worker in pool:
            if worker.restart_at is None or worker.restart_at > time.monotonic() or stopping():
                continue
            try:
                worker.process, worker.info = _start(ctx, restart_config(config, worker.worker_id, first), log_level)
            except RuntimeError as exc:
                log.error("worker %d did not come back: %s", worker.worker_id, exc)
                if _crashed(config, worker):
                    return True
                continue
            worker.restart_at = None
            log.warning("worker %d restarted (pid %d)", worker.worker_id, worker.info.pid)
            report()
    return False


def _crashed(config: Config, worker: _Worker) -> bool:
    """Count a crash; schedule the restart, or say it is a crash loop (True)."""
    now = time.monotonic()
    worker.crashes.append(now)
    while worker.crashes and worker.crashes[0] < now - config.worker_restart_window_seconds:
        worker.crashes.popleft()
    code = worker.process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    if len(worker.crashes) > config.worker_restart_limit:
        log.error("worker %d %s, its %d%s crash within %.0f s: giving up, stopping all workers",
                  worker.worker_id, how, len(worker.crashes), _ordinal(len(worker.crashes)),
                  config.worker_restart_window_seconds)  # fmt: skip
        return True
    delay = min(RESTART_MAX_DELAY_SECONDS, RESTART_FIRST_DELAY_SECONDS * 2 ** (len(worker.crashes) - 1))
    worker.restart_at = now + delay
    log.error("worker %d (pid %d) %s; restarting it in %.1f s (the others keep serving)",
              worker.worker_id, worker.info.pid, how, delay)  # fmt: skip
    return False


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
