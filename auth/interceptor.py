"""The security layer: runs the Guard before any servicer code, for all four RPC kinds.

The peer certificate exists only on the servicer context, so the check must run inside the
handler: each method handler is wrapped by its shape (unary/stream in, unary/stream out) and the
wrapper checks with the context in hand, then runs the servicer. The wrapping happens once, when
services are registered (`SecuredRegistrar`), not per call: a grpc.aio `ServerInterceptor` would
add a coroutine and a handler lookup to every RPC, and measured overhead is what gets security
switched off. `SecurityInterceptor` offers the same wrapping as an interceptor for servers whose
services we do not register ourselves.

This is also the one place where outcomes become statuses: deny reasons (via
auth.decision.REASON_STATUS), servicer ServiceErrors, and anything unexpected (INTERNAL). Every
denied or failed call carries trailing metadata `aigis-request-id`; the client learns nothing
else about why.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc
from grpc import aio

from aigis.auth.audit import AuditLog, rfc3339_now
from aigis.auth.decision import CLIENT_MESSAGES, Decision, Reason
from aigis.auth.guard import Guard, Verdict
from aigis.auth.policy import AuditCondition
from aigis.server.errors import ResourceExhausted, ServiceError
from aigis.server.metrics import Metrics

log = logging.getLogger("aigis.interceptor")

REQUEST_ID_KEY = "aigis-request-id"
_INTERNAL_MESSAGE = "internal error"


def new_request_id() -> str:
    return uuid.uuid4().hex


class SecuredRegistrar:
    """Stands in for the server when services register: every handler is wrapped on the way in.

    Generated `add_*Servicer_to_server(servicer, registrar)` functions call exactly these two
    methods, so a service registered through the registrar cannot reach the server unwrapped.
    """

    def __init__(self, server: aio.Server, security: SecurityInterceptor) -> None:
        self._server = server
        self._security = security
        self.methods: list[str] = []  # every fully-qualified method registered, for tests and logs

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        secured = {name: self._security.wrap_handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        self.methods += [f"/{service}/{name}" for name in handlers]
        self._server.add_registered_method_handlers(service, secured)

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        secured = tuple(_SecuredGenericHandler(g, self._security) for g in generic_handlers)
        self._server.add_generic_rpc_handlers(secured)


class _SecuredGenericHandler(grpc.GenericRpcHandler):
    """Looks a method up in the wrapped generic handler and returns its secured handler."""

    def __init__(self, inner: grpc.GenericRpcHandler, security: SecurityInterceptor) -> None:
        self._inner = inner
        self._security = security

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._security.wrap_handler(handler_call_details.method, handler)  # type: ignore[attr-defined]


class SecurityInterceptor(aio.ServerInterceptor):
    """Authenticates, authorizes and audits every RPC before its servicer runs."""

    def __init__(
        self,
        guard: Guard,
        audit: AuditLog | None,
        *,
        max_stream_messages: int = 10_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._guard = guard
        self._audit = audit
        self._metrics = metrics
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
        return self.wrap_handler(handler_call_details.method, handler)  # type: ignore[attr-defined]

    def wrap_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The secured version of `handler` (built once per method and handler, then reused)."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.experimental.wrap_server_method_handler(
            lambda behavior: self._wrap_behavior(method, behavior, handler.request_streaming), handler
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_behavior(
        self, method: str, behavior: Callable[..., Any], request_streaming: bool
    ) -> Callable[..., Any]:
        authorize = self._authorize
        fail = self._fail
        metrics = self._metrics
        if request_streaming:
            behavior = _cap_request_stream(behavior, self._max_stream_messages)

        if inspect.isasyncgenfunction(behavior):

            async def checked_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = perf_counter()
                await authorize(method, context, started)
                try:
                    async for response in behavior(request, context):
                        yield response
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(method, context, exc, started)
                if metrics is not None:
                    metrics.done(method, "OK", perf_counter() - started)

            return checked_stream

        if not inspect.iscoroutinefunction(behavior):
            if inspect.isgeneratorfunction(behavior):
                raise TypeError(f"{method}: streaming grpc.aio servicers must be async (got {behavior!r})")
            # A plain function (grpcio-health-checking's aio List is one): run it after the check.
            # It is called on the loop, so only non-blocking ones belong here.
            sync_behavior = behavior

            async def behavior(request: Any, context: aio.ServicerContext) -> Any:
                return sync_behavior(request, context)

        async def checked(request: Any, context: aio.ServicerContext) -> Any:
            started = perf_counter()
            await authorize(method, context, started)
            try:
                response = await behavior(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                await fail(method, context, exc, started)
            if metrics is not None:
                metrics.done(method, "OK", perf_counter() - started)
            return response

        return checked

    async def _authorize(self, method: str, context: aio.ServicerContext, started: float) -> None:
        """Return when the call may proceed; otherwise audit and abort it."""
        try:
            verdict = await self._guard.check(method, context)
        except Exception:
            # Fail closed: a bug or an unexpected input in a check is a denial, never a pass.
            request_id = new_request_id()
            log.exception("check failed for %s (request %s); denying", method, request_id)
            verdict = Verdict(Decision.deny(Reason.CHECK_ERROR))
            await self._deny(method, context, verdict, request_id, started)
            return
        if verdict.decision.allowed:
            if self._audit is not None and self._guard.policy.audit_condition in _AUDIT_ALLOWS:
                self._audit.record(self._record(method, context, verdict, new_request_id()))
            return
        await self._deny(method, context, verdict, new_request_id(), started)

    async def _deny(
        self, method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str, started: float
    ) -> None:
        if self._audit is not None and self._guard.policy.audit_condition in _AUDIT_DENIALS:
            self._audit.record(self._record(method, context, verdict, request_id))
        code = verdict.decision.status
        if self._metrics is not None:
            self._metrics.denied(verdict.decision.reason.value if verdict.decision.reason else "")
            self._metrics.done(method, code.name, perf_counter() - started)
        await context.abort(code, CLIENT_MESSAGES[code], trailing_metadata=((REQUEST_ID_KEY, request_id),))

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

    @staticmethod
    def _record(
        method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str
    ) -> dict[str, Any]:
        """An A59-named audit record. Never includes the token itself."""
        decision, identity, token = verdict.decision, verdict.identity, verdict.token
        return {
            "timestamp": rfc3339_now(),
            "request_id": request_id,
            "rpc_method": method,
            "authorized": decision.allowed,
            "reason": decision.reason.value if decision.reason is not None else None,
            "principal": identity.principal if identity is not None else "",
            "peer": context.peer(),
            "client_id": token.client_id if token is not None else None,
            "sub": token.subject if token is not None else None,
            "policy_name": decision.policy_name,
            "matched_rule": decision.matched_rule,
        }


def _cap_request_stream(behavior: Callable[..., Any], cap: int) -> Callable[..., Any]:
    """Bound the messages one client stream may send: an endless stream is cut off, not served."""

    async def capped(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        count = 0
        async for message in request_iterator:
            count += 1
            if count > cap:
                raise ResourceExhausted(f"a stream may carry at most {cap} messages")
            yield message

    if inspect.isasyncgenfunction(behavior):

        async def stream_with_cap(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(capped(request_iterator), context):
                yield response

        return stream_with_cap

    async def with_cap(request_iterator: Any, context: aio.ServicerContext) -> Any:
        return await behavior(capped(request_iterator), context)

    return with_cap


_AUDIT_DENIALS = frozenset({AuditCondition.ON_DENY, AuditCondition.ON_DENY_AND_ALLOW})
_AUDIT_ALLOWS = frozenset({AuditCondition.ON_ALLOW, AuditCondition.ON_DENY_AND_ALLOW})
