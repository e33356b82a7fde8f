"""An HTTPS server (aiohttp) whose strangers cost bounded descriptors, time and log lines.

The token issuer is reachable without any credential, and it shares a process (and so a
descriptor limit) with the gRPC server. So this server owns its accept loop and admits a
connection only while it is under `max_connections` overall and `max_connections_per_peer` for
the peer's address; others are closed at once (their descriptor freed) and counted. Every admitted
connection has a whole-request budget: the TLS handshake and the complete request head within
`header_seconds` of the accept, the body within `body_seconds` after that, and the connection is
aborted at `connection_seconds` whatever it is doing. One request per connection: no idle
keep-alive sockets. Requests the HTTP parser refuses get a 400 with an RFC 6749 JSON body and one
debug line, never a traceback.

It runs on its own event loop in its own thread: the token endpoint's work (scrypt secret checks
in a small executor, signing) never runs on the gRPC server's loop. `start()` binds (errors are
raised in the caller) and `stop()` closes everything; both are synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("aigis.issuer")
# aiohttp's own loggers: parse errors and dropped connections are routine input, not errors.
_quiet = logging.getLogger("aigis.issuer.http")

SERVER_NAME = "aigis-issuer"  # no Python or aiohttp version in the Server header
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HttpLimits:
    """What one unauthenticated stranger may hold. The defaults fit a 1024-descriptor process."""

    max_connections: int = 256
    max_connections_per_peer: int = 32
    header_seconds: float = 5.0  # accept -> TLS handshake done and request head complete
    body_seconds: float = 5.0  # request head -> body complete
    connection_seconds: float = 15.0  # accept -> connection aborted, whatever state it is in
    max_header_bytes: int = 8190  # per line and per field
    max_headers: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.max_connections_per_peer <= self.max_connections:
            raise ValueError("max_connections_per_peer: must be between 1 and max_connections")
        if self.header_seconds <= 0 or self.body_seconds <= 0:
            raise ValueError("header_seconds and body_seconds: must be positive")
        if self.connection_seconds < self.header_seconds + self.body_seconds:
            raise ValueError("connection_seconds: must cover header_seconds + body_seconds")


def descriptor_budget(limits: HttpLimits) -> HttpLimits:
    """`limits` with max_connections cut to a quarter of the soft descriptor limit, if above it.

    The rest of the process (gRPC connections, files, the audit log) keeps three quarters.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = max(8, soft // 4) if soft != resource.RLIM_INFINITY else limits.max_connections
    if limits.max_connections <= budget:
        return limits
    log.warning(
        "issuer max_connections %d is over a quarter of the descriptor limit (%d): using %d",
        limits.max_connections, soft, budget,
    )  # fmt: skip
    per_peer = min(limits.max_connections_per_peer, budget)
    return HttpLimits(**{**limits.__dict__, "max_connections": budget, "max_connections_per_peer": per_peer})


class ConnectionStats:
    """Counters the server's metrics read (thread-safe enough: ints updated on one loop)."""

    def __init__(self) -> None:
        self.open = 0
        self.refused: Counter[str] = Counter()  # "total" | "per_peer" -> connections closed at accept
        self.evicted = 0  # connections without a complete request head, dropped for a new one at the cap
        self.timed_out: Counter[str] = Counter()  # "header" | "body" | "connection"
        self.bad_requests = 0  # refused by the HTTP parser


class _Slot:
    """One admitted connection: released exactly once, however it ends."""

    __slots__ = ("_release", "head_done", "peer", "task", "timers", "transport")

    def __init__(self, peer: str, release: Callable[[_Slot], None]) -> None:
        self.peer = peer
        self.head_done = False
        self.task: asyncio.Task[None] | None = None  # until the handshake completes
        self.transport: asyncio.Transport | None = None  # after it
        self.timers: list[asyncio.TimerHandle] = []  # its deadlines, dropped with it
        self._release: Callable[[_Slot], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            for timer in self.timers:
                timer.cancel()  # a closed connection's deadlines must not keep it alive until they fire
            self.timers.clear()
            release(self)

    @property
    def released(self) -> bool:
        return self._release is None

    def evict(self) -> None:
        """Give the slot back now and drop the connection."""
        self.release()
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None:
            self.task.cancel()


class _Handler(RequestHandler):
    """aiohttp's connection protocol, told which slot it holds and answering parse errors in JSON."""

    slot: _Slot | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.slot is not None:
            self.slot.release()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        # Replaces aiohttp's text body and its log_exception (an ERROR with traceback per bad request).
        stats: ConnectionStats = self._manager.aigis_stats  # type: ignore[union-attr]
        if status >= 500:
            log.error("issuer request failed: %s", type(exc).__name__ if exc else status)
            payload = {"error": "server_error"}
        else:
            stats.bad_requests += 1
            _quiet.debug("malformed HTTP request: %s", type(exc).__name__ if exc else status)
            payload = {"error": "invalid_request", "error_description": "malformed HTTP request"}
            status = 400 if status not in (408, 413, 431) else status
        response = web.Response(
            status=status,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache", "Server": SERVER_NAME},
        )
        response.force_close()
        return response


class _Server(web.Server):
    aigis_stats: ConnectionStats
    aigis_waiting: dict[_Slot, None]

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class BoundedHttpServer:
    """Serve `handler` over TLS on (host, port) under `limits`, from a thread of its own.

    `context()` is asked for the SSL context at every accept, so certificate rotation is its business.
    """

    def __init__(
        self,
        handler: Handler,
        context: Callable[[], ssl.SSLContext],
        *,
        host: str,
        port: int,
        limits: HttpLimits = HttpLimits(),
        on_refused: Callable[[str], None] = lambda _why: None,
    ) -> None:
        self._handler, self._context, self._on_refused = handler, context, on_refused
        self.limits = descriptor_budget(limits)
        self.stats = ConnectionStats()
        self._per_peer: Counter[str] = Counter()
        # Admitted connections whose request head is not complete yet, oldest first.
        self._waiting_for_head: dict[_Slot, None] = {}
        # Every admitted connection, so that stop() closes each one, whatever state it is in.
        self._live: dict[_Slot, None] = {}
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(128)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the loop thread and wait until it accepts."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="aigis-issuer", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=10):
            raise RuntimeError("issuer loop did not start")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection; wait (bounded) for the thread."""
        loop, thread = self._loop, self._thread
        if loop is not None and self._stopped is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._stopped.set)
            thread.join(timeout)
        self._sock.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop and return its result (for stats read from tests)."""
        if self._loop is None:
            return fn()
        return asyncio.run_coroutine_threadsafe(self._async(fn), self._loop).result(5)

    @staticmethod
    async def _async(fn: Callable[[], Any]) -> Any:
        return fn()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        server = _Server(
            self._handler,
            handler_cancellation=True,  # a closed connection cancels its handler (and its queued work)
            max_line_size=self.limits.max_header_bytes,
            max_field_size=self.limits.max_header_bytes,
            max_headers=self.limits.max_headers,
            keepalive_timeout=0,
            lingering_time=1.0,
            access_log=None,
            logger=_quiet,
        )
        server.aigis_stats = self.stats
        server.aigis_waiting = self._waiting_for_head
        self._web = server
        accept = asyncio.create_task(self._accept_loop(server))
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept
            server.pre_shutdown()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.shutdown(1.0), 2.0)
            # Connections aiohttp does not know yet (mid-handshake) or did not close: abort them, and
            # let their connection_lost run, so no transport outlives the loop.
            for slot in list(self._live):
                slot.evict()
            await asyncio.sleep(0.05)
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

    # ------------------------------------------------------------------------------ admission

    def _release(self, slot: _Slot) -> None:
        self._live.pop(slot, None)
        self._waiting_for_head.pop(slot, None)
        self.stats.open -= 1
        self._per_peer[slot.peer] -= 1
        if self._per_peer[slot.peer] <= 0:
            del self._per_peer[slot.peer]

    def _admit(self, peer: str) -> str | None:
        """Why a new connection from `peer` is refused, or None (after evicting a stalled one if full)."""
        if self._per_peer[peer] >= self.limits.max_connections_per_peer:
            return "per_peer"
        if self.stats.open >= self.limits.max_connections:
            # Full: the oldest connection still without a complete request head makes room. An
            # honest client sends its head within milliseconds, so this is where slow ones go.
            if not self._waiting_for_head:
                return "total"
            next(iter(self._waiting_for_head)).evict()
            self.stats.evicted += 1
        return None

    async def _accept_loop(self, server: _Server) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("issuer accept failed: %s", exc.strerror)
                await asyncio.sleep(0.1)
                continue
            peer = str(address[0])
            why = self._admit(peer)
            if why is not None:
                conn.close()
                self.stats.refused[why] += 1
                self._on_refused(why)
                continue
            self.stats.open += 1
            self._per_peer[peer] += 1
            slot = _Slot(peer, self._release)
            self._live[slot] = None
            self._waiting_for_head[slot] = None
            slot.task = asyncio.create_task(self._serve(server, conn, slot))
            self._tasks.add(slot.task)
            slot.task.add_done_callback(self._tasks.discard)

    async def _serve(self, server: _Server, conn: socket.socket, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        accepted = loop.time()

        def protocol() -> _Handler:
            handler = server()
            assert isinstance(handler, _Handler)
            handler.slot = slot
            return handler

        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol, conn, ssl=self._context(), ssl_handshake_timeout=limits.header_seconds
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError, asyncio.CancelledError):
            conn.close()  # handshake failed, timed out, or evicted
            slot.release()
            return
        slot.task, slot.transport = None, transport

        def head_deadline() -> None:
            if not slot.head_done and not transport.is_closing():
                self.stats.timed_out["header"] += 1
                transport.abort()

        def connection_deadline() -> None:
            if not transport.is_closing():
                self.stats.timed_out["connection"] += 1
                transport.abort()

        if slot.released:  # closed while the handshake finished
            return
        slot.timers += [
            loop.call_at(accepted + limits.header_seconds, head_deadline),
            loop.call_at(accepted + limits.connection_seconds, connection_deadline),
        ]


class BodyError(Exception):
    """The request body cannot be had: `status` (400, 408, 411, 413) and a description for the client."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status, self.description = status, description


async def read_body(request: web.BaseRequest, *, max_bytes: int, seconds: float, stats: ConnectionStats) -> bytes:
    """The whole body, by Content-Length only, within `seconds`; BodyError otherwise."""
    if "Transfer-Encoding" in request.headers:
        raise BodyError(400, "Transfer-Encoding is not supported")
    raw = request.headers.getall("Content-Length", [])
    # ASCII digits only: int() would also accept Unicode digits, signs, spaces and underscores.
    if len(raw) != 1 or not (raw[0].isascii() and raw[0].isdigit()) or len(raw[0]) > 12:
        raise BodyError(411 if not raw else 400, "one Content-Length of decimal digits is required")
    length = int(raw[0])
    if length > max_bytes:
        raise BodyError(413, "request body too large")
    try:
        async with asyncio.timeout(seconds):
            return await request.content.readexactly(length)
    except TimeoutError:
        stats.timed_out["body"] += 1
        raise BodyError(408, "request body not received in time") from None
    except asyncio.IncompleteReadError:
        raise BodyError(400, "request body shorter than its Content-Length") from None


def peer_slot(request: web.BaseRequest) -> _Slot:
    """The admission slot of the request's connection; marks its head as complete."""
    protocol = request.protocol
    slot = protocol.slot if isinstance(protocol, _Handler) else None
    if slot is None:
        raise RuntimeError("request did not come through BoundedHttpServer")
    slot.head_done = True
    server = protocol._manager  # the aiohttp Server: its owner keeps the waiting list
    waiting = getattr(server, "aigis_waiting", None)
    if waiting is not None:
        waiting.pop(slot, None)
    return slot
