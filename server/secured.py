"""Every servicer behind the checks: handlers wrapped by RPC shape when services register.

The peer certificate exists only on the servicer context, so enforcement (aigis.auth.enforcer)
runs inside the handler: each method handler is wrapped by its shape (unary/stream in, unary/stream
out), and the wrapper enforces with the context in hand, then runs the servicer. The wrapping
happens once, when services are registered (`SecuredRegistrar`), not per call: a grpc.aio
`ServerInterceptor` would add a coroutine and a handler lookup to every RPC, and measured overhead
is what gets security switched off. `SecurityInterceptor` offers the same wrapping as an
interceptor for servers whose services we do not register ourselves.

The server side owns what is not a security decision: servicer ServiceErrors and anything
unexpected (INTERNAL) become statuses here, client streams are capped, metrics are counted. Every
failed call carries trailing metadata `aigis-request-id`; the client learns nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from time import perf_counter
from typing import Any, NoReturn

import grpc
from grpc import aio

from aigis.auth.enforcer import REQUEST_ID_KEY, Enforcer, new_request_id, release_nothing
from aigis.auth.guard import Verdict
from aigis.auth.policy import ANY_MODEL, CallModel, ModelRef
from aigis.server.errors import InvalidArgument, ResourceExhausted, ServiceError
from aigis.server.metrics import Metrics
from aigis.server.tracing import RpcTracer

log = logging.getLogger("aigis.secured")

_INTERNAL_MESSAGE = "internal error"
#: The metrics label of every path no service serves (their names are the caller's invention).
UNKNOWN_METHOD = "<unknown>"

# The verdict of the call's open and its metadata, handed to its per-message checks (same task, set
# just before).
_OPENED: ContextVar[tuple[Verdict, Sequence[Any]]] = ContextVar("aigis_opened")
# The task that looked the call's method up and the metadata it was given (see `_lookup_metadata`).
_LOOKUP: ContextVar[tuple[weakref.ref[asyncio.Task[Any]] | None, Sequence[Any]] | None] = ContextVar(
    "aigis_lookup", default=None)

#: An admitted call's request (decoded, for a unary request) and the release of its stream slot.
Admitted = tuple[Any, Callable[[], None]]

#: The model a request message names, resolved (empty name: the default model; empty version: the
#: newest). Must not raise: it only reads fields and looks names up.
ModelOf = Callable[[Any], ModelRef]


class SecuredRegistrar:
    """Stands in for the server when services register: every handler is wrapped on the way in.

    Generated `add_*Servicer_to_server(servicer, registrar)` functions call exactly these two
    methods, so a service registered through the registrar cannot reach the server unwrapped.

    Methods are served through one generic handler (`_SecuredMethods`), not registered with grpc:
    grpc.aio's server loop keeps one pending request per registered method and `asyncio.wait`s on
    all of them for every call (grpcio 1.85), so each registered method adds work to every call;
    and the lookup hands the call's metadata, which grpc builds for it anyway, to the checks.
    """

    def __init__(self, server: aio.Server, security: SecurityInterceptor) -> None:
        self._server = server
        self._security = security
        self.methods: list[str] = []  # every fully-qualified method registered, for logs
        self._routes = _SecuredMethods()
        server.add_generic_rpc_handlers((self._routes,))  # first: consulted before any other

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._routes.handlers[method] = self._security.wrap_handler(method, handler)
            self.methods.append(method)

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        """Generated code registers each service both ways; `_SecuredMethods` answers for the
        registered methods first, so these serve only services that register generically."""
        secured = tuple(_SecuredGenericHandler(g, self._security) for g in generic_handlers)
        self._server.add_generic_rpc_handlers(secured)

    def add_unknown_method_handler(self) -> None:
        """Register after every service: grpc consults generic handlers in order, after the
        registered methods, so this one sees exactly the paths nothing else serves."""
        self._server.add_generic_rpc_handlers((_UnknownMethods(self._security),))


class _SecuredMethods(grpc.GenericRpcHandler):
    """The secured handlers by full method path; the lookup also passes the call's metadata on."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.handlers.get(handler_call_details.method)
        if handler is not None:
            task = asyncio.current_task()
            # A weak reference: the value lives in the task's own context, and a strong one would make
            # every call's task a reference cycle, freed only by the garbage collector.
            _LOOKUP.set((weakref.ref(task) if task is not None else None, handler_call_details.invocation_metadata))
        return handler


def _lookup_metadata(context: aio.ServicerContext) -> Sequence[Any]:
    """The call's invocation metadata: what its method lookup saw (grpc builds it for the lookup;
    `context.invocation_metadata()` builds it again, ~2 µs), else from the context. The lookup
    runs in the call's own task just before the handler; the task check makes sure that what is
    read is this call's, whatever grpc does with tasks."""
    lookup = _LOOKUP.get()
    if lookup is not None and lookup[0] is not None and lookup[0]() is asyncio.current_task():
        return lookup[1]
    return context.invocation_metadata() or ()


class _UnknownMethods(grpc.GenericRpcHandler):
    """Every unknown path, checked as a proxy's RBAC would: an unauthenticated or unauthorized
    caller gets the usual audited denial, an allowed one UNIMPLEMENTED. Without it grpc answers
    UNIMPLEMENTED before any check, and a certificate holder could map the API without a token."""

    def __init__(self, security: SecurityInterceptor) -> None:
        self._security = security

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(handler_call_details.method)
        # Stream-stream with raw bytes fits every call shape on the wire; nothing is decoded.
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._security.refuse_unknown, method))


class _SecuredGenericHandler(grpc.GenericRpcHandler):
    """Looks a method up in the wrapped generic handler and returns its secured handler."""

    def __init__(self, inner: grpc.GenericRpcHandler, security: SecurityInterceptor) -> None:
        self._inner = inner
        self._security = security

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._security.wrap_handler(handler_call_details.method, handler)


class SecurityInterceptor(aio.ServerInterceptor):
    """Runs the Enforcer before every servicer; maps servicer errors to statuses; counts metrics."""

    def __init__(
        self,
        enforcer: Enforcer,
        *,
        max_stream_messages: int = 10_000,
        metrics: Metrics | None = None,
        models: Mapping[str, ModelOf] | None = None,
        tracer: RpcTracer | None = None,
    ) -> None:
        """`models` maps the methods whose requests name a model to how to read it: the policy then
        sees the model (rules with "models"), per message for request streams."""
        self._enforcer = enforcer
        self._models = dict(models or {})
        self._metrics = metrics
        self._tracer = tracer
        self._max_stream_messages = max_stream_messages
        # The generic handler returns the same RpcMethodHandler for a method every time, so the
        # wrapped handler is built once per method, not once per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        return self.wrap_handler(handler_call_details.method, handler)

    def wrap_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The secured version of `handler` (built once per method and handler, then reused)."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        # grpc would decode the body before any wrapper runs (a garbage body: UNKNOWN with the
        # library's exception name, or a logged traceback, without our checks): the handler gets the
        # raw bytes, and the wrapper decodes them after the check (FACTS.md).
        decode = handler.request_deserializer
        raw = handler._replace(request_deserializer=None)
        wrapped = grpc.experimental.wrap_server_method_handler(
            lambda behavior: self._traced(
                method, self._wrap_behavior(method, behavior, handler.request_streaming, decode)
            ),
            raw,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def refuse_unknown(self, method: str, request_iterator: Any, context: aio.ServicerContext) -> None:
        """An unknown `method`: the checks, then UNIMPLEMENTED. Metrics label it UNKNOWN_METHOD, so
        a client inventing paths cannot grow the metrics."""
        started = perf_counter()
        if await self._enforcer.enforce(method, context, _lookup_metadata(context), request_streaming=True) is None:
            self._count(UNKNOWN_METHOD, context, started)
            return
        if self._metrics is not None:
            self._metrics.done(UNKNOWN_METHOD, "UNIMPLEMENTED", perf_counter() - started)
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("unknown method")
        context.set_trailing_metadata(((REQUEST_ID_KEY, new_request_id()),))

    def _traced(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """Outermost: the span covers the checks, the servicer and the error mapping."""
        return behavior if self._tracer is None else self._tracer.wrap(method, behavior)

    def _wrap_behavior(
        self, method: str, behavior: Callable[..., Any], request_streaming: bool,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Callable[..., Any]:
        fail = self._fail
        ok = self._metrics.ok_recorder(method) if self._metrics is not None else None
        model_of = self._models.get(method)
        if request_streaming:
            behavior = _cap_request_stream(behavior, self._max_stream_messages)
            if model_of is not None:
                behavior = self._check_each_message(method, behavior, model_of)
            # Outermost, so applied first: each message is decoded as the servicer pulls it, which
            # is only after the open was checked.
            behavior = _decode_request_stream(behavior, decode)

        if inspect.isasyncgenfunction(behavior):

            async def checked_stream(raw: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = perf_counter()
                now = self._admit_now(method, decode, model_of, request_streaming, True, context, started, raw)
                admitted = now if isinstance(now, tuple) else await now
                if admitted is None:  # denied: the status is set
                    return
                request, release = admitted
                try:
                    async for response in behavior(request, context):
                        yield response
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(method, context, exc, started)
                finally:
                    release()
                if ok is not None:
                    ok(perf_counter() - started)

            return checked_stream

        if not inspect.iscoroutinefunction(behavior):
            if inspect.isgeneratorfunction(behavior):
                raise TypeError(f"{method}: streaming grpc.aio servicers must be async (got {behavior!r})")
            # A plain function (grpcio-health-checking's aio List is one): run it after the check.
            # It is called on the loop, so only non-blocking ones belong here.
            sync_behavior = behavior

            async def behavior(request: Any, context: aio.ServicerContext) -> Any:
                return sync_behavior(request, context)

        async def checked(raw: Any, context: aio.ServicerContext) -> Any:
            started = perf_counter()
            now = self._admit_now(method, decode, model_of, request_streaming, request_streaming, context,
                                  started, raw)
            admitted = now if isinstance(now, tuple) else await now
            if admitted is None:  # denied: the status is set, no response
                return None
            request, release = admitted
            try:
                response = await behavior(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                await fail(method, context, exc, started)
            finally:
                release()
            if ok is not None:
                ok(perf_counter() - started)
            return response

        return checked

    def _check_each_message(self, method: str, behavior: Callable[..., Any], model_of: ModelOf) -> Callable[..., Any]:
        """A request stream naming a model per message: each message is authorized with its model
        before the servicer sees it; a denial ends the stream there (audited, like any denial)."""
        enforcer = self._enforcer

        async def checked_messages(request_iterator: AsyncIterator[Any], context: aio.ServicerContext,
                                   opened: tuple[Verdict, Sequence[Any]]) -> AsyncIterator[Any]:
            verdict, metadata = opened
            async for message in request_iterator:
                await enforcer.enforce_model(method, context, metadata, verdict, model_of(message), abort=True)
                yield message

        if inspect.isasyncgenfunction(behavior):

            async def stream_checked(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in behavior(checked_messages(request_iterator, context, _OPENED.get()), context):
                    yield response

            return stream_checked

        async def unary_checked(request_iterator: Any, context: aio.ServicerContext) -> Any:
            return await behavior(checked_messages(request_iterator, context, _OPENED.get()), context)

        return unary_checked

    def _admit_now(self, method: str, decode: Callable[[bytes], Any] | None, model_of: ModelOf | None,
                   request_streaming: bool, streaming: bool, context: aio.ServicerContext, started: float,
                   raw: Any) -> Admitted | Awaitable[Admitted | None]:
        """Check the call, then decode a unary request body (only an allowed caller's; for a method
        whose request names a model, a caller allowed it for some model, whose named model the
        policy then judges); a stream takes one of its principal's slots. Returns the request and the
        slot's release — at once for the common call (a unary request from a caller known and
        allowed), else as an awaitable, which gives None when the call is denied (its status set,
        its code and duration counted)."""
        metadata = _lookup_metadata(context)
        # The model is in a unary body: may this caller use the method with any model? Only then
        # decode, and judge the model named (audited once, with that model).
        body_model = None if request_streaming else model_of
        model: CallModel = ANY_MODEL if model_of is not None else None
        first = self._enforcer.enforce_now(method, context, metadata, model, request_streaming=request_streaming,
                                           provisional=body_model is not None)
        if isinstance(first, Verdict) and body_model is None and not streaming:
            if decode is None:
                return raw, release_nothing
            try:
                return _decode_body(decode, raw), release_nothing
            except Exception:
                return self._undecodable(method, context, decode, started)
        return self._admit(first, method, decode, body_model, model, metadata, request_streaming, streaming,
                           context, started, raw)

    async def _admit(self, first: Verdict | Awaitable[Verdict | None], method: str,
                     decode: Callable[[bytes], Any] | None, body_model: ModelOf | None, model: CallModel,
                     metadata: Sequence[Any], request_streaming: bool, streaming: bool,
                     context: aio.ServicerContext, started: float, raw: Any) -> Admitted | None:
        """`_admit_now` from the enforcer's first answer on, for everything but the common call."""
        enforcer = self._enforcer
        verdict = first if isinstance(first, Verdict) else await first
        if verdict is None:
            self._count(method, context, started)
            return None
        request = raw
        if decode is not None and not request_streaming:
            try:
                request = _decode_body(decode, raw)
            except Exception:
                await self._undecodable(method, context, decode, started)
        if body_model is not None:
            model = body_model(request)
            verdict = await enforcer.enforce_model(method, context, metadata, verdict, model)
            if verdict is None:
                self._count(method, context, started)
                return None
        if not streaming:
            return request, release_nothing
        _OPENED.set((verdict, metadata))
        release = await enforcer.hold_stream(method, context, verdict, model, request_streaming=request_streaming)
        if release is None:
            self._count(method, context, started)
            return None
        return request, release

    async def _undecodable(self, method: str, context: aio.ServicerContext, decode: Callable[[bytes], Any],
                           started: float) -> NoReturn:
        """An allowed caller's body is not the method's message: INVALID_ARGUMENT naming the expected
        type, nothing more (ends the call: raises)."""
        await self._fail(method, context, InvalidArgument(_not_valid(decode)), started)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _count(self, method: str, context: aio.ServicerContext, started: float) -> None:
        """Count a denied call by its final code and duration."""
        if self._metrics is not None:
            code = context.code()
            self._metrics.done(method, code.name if code is not None else "UNKNOWN", perf_counter() - started)

    async def _fail(self, method: str, context: aio.ServicerContext, exc: Exception, started: float) -> None:
        """Turn a servicer exception into a status: ServiceErrors keep their message."""
        request_id = new_request_id()
        if isinstance(exc, ServiceError):
            code, message = exc.code, exc.message
        else:
            log.error("%s failed (request %s)", method, request_id, exc_info=exc)
            code, message = grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE
        if self._metrics is not None:
            self._metrics.done(method, code.name, perf_counter() - started)
        await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, request_id),))


def _decode_body(decode: Callable[[bytes], Any], raw: bytes) -> Any:
    """A function of its own so that profiles tell decoding (the bare server does it too) from checking."""
    return decode(raw)


def _not_valid(decode: Callable[[bytes], Any]) -> str:
    """What an allowed caller hears of a body that is not the method's message: its expected type."""
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    name = str(getattr(descriptor, "full_name", "")) or "protobuf"
    return f"request is not a valid {name} message"


def _decode_request_stream(behavior: Callable[..., Any], decode: Callable[[bytes], Any] | None) -> Callable[..., Any]:
    """Decode each message of a request stream as the servicer pulls it: INVALID_ARGUMENT if one is
    not the method's message."""
    if decode is None:
        return behavior

    async def decoded(request_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in request_iterator:
            try:
                message = decode(raw)
            except Exception:
                raise InvalidArgument(_not_valid(decode)) from None
            yield message

    return _on_request_stream(behavior, decoded)


def _cap_request_stream(behavior: Callable[..., Any], cap: int) -> Callable[..., Any]:
    """Bound the messages one client stream may send: an endless stream is cut off, not served."""

    async def capped(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        count = 0
        async for message in request_iterator:
            count += 1
            if count > cap:
                raise ResourceExhausted(f"a stream may carry at most {cap} messages")
            yield message

    return _on_request_stream(behavior, capped)


def _on_request_stream(
    behavior: Callable[..., Any], transform: Callable[[AsyncIterator[Any]], AsyncIterator[Any]]
) -> Callable[..., Any]:
    """`behavior` (client- or bidi-streaming) fed `transform(request_iterator)` instead."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(transform(request_iterator), context):
                yield response

        return streaming

    async def unary(request_iterator: Any, context: aio.ServicerContext) -> Any:
        return await behavior(transform(request_iterator), context)

    return unary
