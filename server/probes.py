"""Kubelet probes over plain HTTP: `/livez` and `/readyz`, and nothing else.

The gRPC port takes only mTLS callers, and the kubelet's probes carry no client certificate (its
native gRPC probe is plaintext), so probes get their own small listener, off unless `[probes]
listen` is set. It serves two fixed GET paths with fixed small answers, never reads a request
body, never needs credentials and reveals no more than which check fails.

- `/livez`: 200 while the process is alive and its event loop answers. The handler runs on the
  server's own loop, so a loop that is blocked or starved makes the probe time out: that is the
  responsiveness check.
- `/readyz`: 200 only when every readiness check passes (models loaded; certificates, CRL,
  policy and token keys loaded and valid; audit writer running; not draining), else 503 naming
  the failing checks.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from aigis.server.config import HostPort

log = logging.getLogger("aigis.probes")

LIVEZ_PATH, READYZ_PATH = "/livez", "/readyz"
# Probes are tiny GETs: small header limits and a short keep-alive bound what a stranger can hold.
_MAX_LINE_BYTES = 1024
_MAX_FIELD_BYTES = 1024
_KEEPALIVE_SECONDS = 5.0

# name -> None when the check passes, else a short, non-secret description of what fails
ReadinessChecks = Callable[[], Awaitable[Mapping[str, str | None]]]


def _answer(status: int, body: Mapping[str, object]) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, separators=(",", ":")),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class ProbeServer:
    """The probe listener on the caller's event loop."""

    def __init__(self, listen: HostPort, readiness: ReadinessChecks) -> None:
        self._listen, self._readiness = listen, readiness
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port (OSError when it cannot bind)."""
        app = web.Application(client_max_size=1024)
        app.router.add_get(LIVEZ_PATH, self._livez, allow_head=True)
        app.router.add_get(READYZ_PATH, self._readyz, allow_head=True)
        runner = web.AppRunner(
            app,
            access_log=None,  # a probe every few seconds is not worth a log line
            handle_signals=False,
            keepalive_timeout=_KEEPALIVE_SECONDS,
            max_line_size=_MAX_LINE_BYTES,
            max_field_size=_MAX_FIELD_BYTES,
        )
        await runner.setup()
        family = socket.AF_INET6 if ":" in self._listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._listen.host, self._listen.port))
            sock.listen(64)
            sock.setblocking(False)
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner, self.port = runner, sock.getsockname()[1]
        log.info("probes on http://%s:%d%s and %s", self._listen.host, self.port, LIVEZ_PATH, READYZ_PATH)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _livez(self, _request: web.Request) -> web.Response:
        return _answer(200, {"alive": True})

    async def _readyz(self, _request: web.Request) -> web.Response:
        try:
            checks = dict(await self._readiness())
        except Exception as exc:  # fail closed: a check that cannot run is a failed check
            log.exception("readiness checks failed to run")
            checks = {"checks": type(exc).__name__}
        failing = {name: problem for name, problem in checks.items() if problem is not None}
        return _answer(200 if not failing else 503, {"ready": not failing, "failing": failing})
