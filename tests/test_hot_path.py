"""The per-call hand-off from grpc's method lookup to the checks, on a real grpc.aio server.

aigis serves its methods through one generic handler (`_SecuredMethods`) instead of registering
them with grpc, and hands the invocation metadata grpc built for the lookup to the checks instead
of asking the context to build it again. The checks read the caller's token from it, so each call
must get its own — under concurrency, and never another task's.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest
from grpc import aio

from aigis.server.secured import _lookup_metadata, _SecuredMethods

ECHO = "/probe.Probe/Echo"
CALLS = 200


def _identity(raw: bytes) -> bytes:
    return raw


async def _echo(request: bytes, context: aio.ServicerContext) -> bytes:
    """Answers with what the lookup handed over, and whether it is the lookup's own tuple (read twice:
    the same object; the context builds a new one each time) and equal to the context's metadata."""
    first = _lookup_metadata(context)
    handed_over = first is _lookup_metadata(context) and first is not context.invocation_metadata()
    same = tuple(first) == tuple(context.invocation_metadata())
    # Another task — a child inherits this call's context variables — must not take them as its own.
    in_child = await asyncio.create_task(_in_task(context))
    child_ok = in_child is not first and tuple(in_child) == tuple(first)
    tag = dict(first).get("x-call", "")
    return f"{tag}|{handed_over}|{same}|{child_ok}".encode()


async def _in_task(context: aio.ServicerContext) -> Any:
    return _lookup_metadata(context)


@pytest.fixture
def echo_server() -> Any:
    loop = asyncio.new_event_loop()
    routes = _SecuredMethods()
    routes.handlers[ECHO] = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=_identity, response_serializer=_identity)

    async def start() -> tuple[aio.Server, int]:
        server = aio.server()
        server.add_generic_rpc_handlers((routes,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    yield loop, port
    loop.run_until_complete(server.stop(None))
    loop.close()


def test_each_call_gets_its_own_lookup_metadata(echo_server: Any) -> None:
    loop, port = echo_server

    async def calls() -> list[str]:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(ECHO, request_serializer=_identity, response_deserializer=_identity)
            replies = await asyncio.gather(*(echo(b"", metadata=(("x-call", str(i)),), timeout=30)
                                             for i in range(CALLS)))
        return [r.decode() for r in replies]

    replies = loop.run_until_complete(calls())
    assert replies == [f"{i}|True|True|True" for i in range(CALLS)]


def test_outside_a_looked_up_call_the_context_is_asked(echo_server: Any) -> None:
    """A handler grpc found some other way (an interceptor-wrapped server, the unknown-method handler)
    has no lookup metadata: the context's own is used."""
    loop, _port = echo_server
    seen: list[tuple[Any, ...]] = []

    async def plain(request: bytes, context: aio.ServicerContext) -> bytes:
        seen.append((tuple(_lookup_metadata(context)), tuple(context.invocation_metadata())))
        return b""

    class Plain(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return grpc.unary_unary_rpc_method_handler(plain, request_deserializer=_identity,
                                                       response_serializer=_identity)

    async def run() -> None:
        server = aio.server()
        server.add_generic_rpc_handlers((Plain(),))
        other = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{other}") as channel:
                call = channel.unary_unary("/probe.Probe/Other", request_serializer=_identity,
                                           response_deserializer=_identity)
                await call(b"", metadata=(("x-call", "plain"),), timeout=30)
        finally:
            await server.stop(None)

    loop.run_until_complete(run())
    ((looked_up, from_context),) = seen
    assert looked_up == from_context
    assert ("x-call", "plain") in looked_up


def test_a_finished_call_leaves_no_reference_cycle_through_its_task(echo_server: Any) -> None:
    """The hand-off lives in the call task's own context; holding that task strongly there would make
    every call a reference cycle (task → context → hand-off → task) that only the garbage collector
    frees. With the collector off, 200 finished calls must leave no task behind."""
    loop, port = echo_server

    async def calls() -> None:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(ECHO, request_serializer=_identity, response_deserializer=_identity)
            for i in range(CALLS):
                await echo(b"", metadata=(("x-call", str(i)),), timeout=30)

    def tasks() -> int:
        return sum(isinstance(o, asyncio.Task) for o in gc.get_objects())

    loop.run_until_complete(calls())  # warm: the channel, grpc's own tasks
    gc.collect()
    gc.disable()
    try:
        before = tasks()
        loop.run_until_complete(calls())
        left = tasks() - before
    finally:
        gc.enable()
    assert left < CALLS // 10, f"{left} tasks of {CALLS} finished calls are waiting for the garbage collector"
