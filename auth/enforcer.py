"""Enforcement: guard → decision → audit → status, for one call, before any servicer code runs.

The peer certificate exists only on the servicer context, so enforcement runs inside the handler;
how handlers are wrapped by RPC shape, how servicer errors become statuses, the stream cap and the
metrics are the server's business (aigis.server.secured). This module is the whole security
decision for a call: it returns the verdict when the call may proceed; otherwise it sets the coarse
status from auth.decision.REASON_STATUS and trailing metadata `aigis-request-id` and returns None
(the wrapper then returns without a response); the audit log gets the reason. Any error while
checking denies (`check_error`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

from aigis.auth.audit import AuditLog, rfc3339_now
from aigis.auth.decision import CLIENT_MESSAGES, Decision, Reason
from aigis.auth.denial_hold import DenialHold
from aigis.auth.guard import Guard, TokenToVerify, Verdict
from aigis.auth.policy import ANY_MODEL, AuditCondition, CallModel, ModelRef
from aigis.auth.refusals import RefusalRecorder
from aigis.auth.streams import StreamSlots

log = logging.getLogger("aigis.enforcer")

REQUEST_ID_KEY = "aigis-request-id"
# A denied request-streaming call also carries its status code name in the response headers.
STATUS_HEADER = "aigis-status"

#: Called once per denied call with (method, decision), before the abort: the server counts it.
DenialObserver = Callable[[str, Decision], None]
#: Called once per call the shadow policy judged, with (method, enforced, shadow decision).
ShadowObserver = Callable[[str, Decision, Decision], None]
#: The current trace id (OpenTelemetry, when the server traces), for the audit record.
TraceIdSource = Callable[[], str | None]


def new_request_id() -> str:
    """32 hex digits, unique: a random prefix per process and a counter. Request ids are not secret
    (they tie a client's error to its audit record), and uuid4 reads the OS's random source on every
    call (~2-3 µs) — on every denial, which is what a flooder makes the server do."""
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count(1)


_id_prefix, _id_counter = "", itertools.count(1)
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)  # forked workers must not repeat ids


# The allowed caller of the call being served (set by `enforce`, in the call's own task): lets a
# servicer ask what else this caller may use (ListModels shows only those models).
_CALLER: ContextVar[tuple[Verdict, Sequence[Any]] | None] = ContextVar("aigis_caller", default=None)


class Enforcer:
    """Authenticates, authorizes and audits one RPC; aborts it when it is not allowed."""

    def __init__(
        self,
        guard: Guard,
        audit: AuditLog | None,
        *,
        on_denial: DenialObserver | None = None,
        on_shadow: ShadowObserver | None = None,
        trace_id: TraceIdSource | None = None,
        streams: StreamSlots | None = None,
        hold: DenialHold | None = None,
    ) -> None:
        """`hold`: how a principal refused for an empty denial budget is answered (late; see
        auth.denial_hold), so a flooder waiting for its answers sends fewer calls."""
        self._guard = guard
        self._hold = hold
        self._refusals = RefusalRecorder(audit) if audit is not None else None
        self._streams = streams
        self._audit = audit
        self._on_denial = on_denial
        self._on_shadow = on_shadow
        self._trace_id = trace_id

    def enforce_now(self, method: str, context: aio.ServicerContext, metadata: Sequence[Any],
                    model: CallModel = None, *, request_streaming: bool = False,
                    provisional: bool = False) -> Verdict | Awaitable[Verdict | None]:
        """`enforce` without a coroutine for the common call: the Verdict itself when the call may
        proceed at once (a known certificate and token, allowed, nothing to record); otherwise an
        awaitable of what `enforce` returns. Every RPC passes here, and each coroutine layer on
        that path is CPU per call."""
        try:
            checked = self._guard.check_now(method, context, metadata, model)
        except Exception:
            return self._check_failed(method, context, model, request_streaming)
        if isinstance(checked, TokenToVerify):
            return self._verified(checked, method, context, metadata, model, request_streaming, provisional)
        return self._proceed(checked, method, context, metadata, model, request_streaming, provisional)

    async def enforce(self, method: str, context: aio.ServicerContext, metadata: Sequence[Any],
                      model: CallModel = None, *, request_streaming: bool = False,
                      provisional: bool = False) -> Verdict | None:
        """The verdict when the call may proceed; None when it is denied: then it is audited and its
        status, details and trailing metadata are set, and the caller returns at once (no response).
        `metadata`: the call's invocation metadata (the server has it from the method lookup).

        `model` is the model the call names (None: it names none; ANY_MODEL: a stream whose
        messages name it, each then judged by `enforce_model`). `request_streaming`: the denial is
        also announced in the response headers (STATUS_HEADER), see `_deny`. `provisional` (with
        ANY_MODEL): a unary request that names its model in a body not yet decoded — an
        authenticated caller's verdict (allowed, or refused by the policy) is not settled here but
        handed to `enforce_model` once the body is decoded (decode after the check)."""
        now = self.enforce_now(method, context, metadata, model, request_streaming=request_streaming,
                               provisional=provisional)
        return now if isinstance(now, Verdict) else await now

    async def _check_failed(self, method: str, context: aio.ServicerContext, model: CallModel,
                            request_streaming: bool = False, *, abort: bool = False) -> None:
        """Fail closed: a bug or an unexpected input in a check is a denial, never a pass."""
        request_id = new_request_id()
        log.exception("check failed for %s (request %s); denying", method, request_id)
        await self._deny(method, context, Verdict(Decision.deny(Reason.CHECK_ERROR)), request_id, model,
                         announce=request_streaming, abort=abort)

    async def _verified(self, pending: TokenToVerify, method: str, context: aio.ServicerContext,
                        metadata: Sequence[Any], model: CallModel, request_streaming: bool,
                        provisional: bool) -> Verdict | None:
        """The rest of the checks once a token not seen before is verified."""
        try:
            verdict = await self._guard.complete(pending, method, model)
        except Exception:
            await self._check_failed(method, context, model, request_streaming)
            return None
        then = self._proceed(verdict, method, context, metadata, model, request_streaming, provisional)
        return then if isinstance(then, Verdict) else await then

    def _proceed(self, verdict: Verdict, method: str, context: aio.ServicerContext, metadata: Sequence[Any],
                 model: CallModel, request_streaming: bool, provisional: bool) -> Verdict | Awaitable[Verdict | None]:
        """After the checks: the Verdict when the call goes on at once (allowed with nothing to record,
        or a provisional one handed on); else the awaitable that records, dry-runs or denies."""
        decision = verdict.decision
        if decision.allowed and verdict.shadow is None and not self._audit_allows():
            if not provisional:
                _CALLER.set((verdict, metadata))
            return verdict
        if provisional and (decision.allowed or decision.status is grpc.StatusCode.PERMISSION_DENIED):
            # The caller is authenticated: its body may be decoded, and `enforce_model` decides (and
            # audits, with the model the body names). An unauthenticated caller is denied here, its
            # body unread (audited with model "*").
            return verdict
        return self._settle(method, context, metadata, verdict, model, announce=request_streaming)

    async def enforce_model(self, method: str, context: aio.ServicerContext, metadata: Sequence[Any],
                            verdict: Verdict, model: ModelRef, *, abort: bool = False) -> Verdict | None:
        """One more message of an allowed stream (or the decoded body of a provisional unary call),
        naming `model`: the policy again (identity and token were checked at the open). Denied:
        audited, and None — or, with `abort` (inside a running servicer), the call ends with the
        denial (raises)."""
        try:
            checked = self._guard.authorize(method, verdict, metadata, model)
        except Exception:
            await self._check_failed(method, context, model, abort=abort)
            return None
        return await self._settle(method, context, metadata, checked, model, abort=abort)

    async def _settle(self, method: str, context: aio.ServicerContext, metadata: Sequence[Any], verdict: Verdict,
                      model: CallModel, *, announce: bool = False, abort: bool = False) -> Verdict | None:
        # A dry-run record and the enforced record of the same call share one request id.
        shared_id = self._dry_run(method, context, verdict, model) if verdict.shadow is not None else None
        if verdict.decision.allowed:
            if self._audit is not None and self._audit_allows():
                self._audit.record(self._record(method, context, verdict, shared_id or new_request_id(), model))
            _CALLER.set((verdict, metadata))
            return verdict
        await self._deny(method, context, verdict, shared_id or new_request_id(), model, announce=announce,
                         abort=abort)
        return None

    def _audit_allows(self) -> bool:
        return self._audit is not None and self._guard.policy.audit_condition in _AUDIT_ALLOWS

    async def hold_stream(self, method: str, context: aio.ServicerContext, verdict: Verdict,
                          model: CallModel = None, *, request_streaming: bool = False) -> Callable[[], None] | None:
        """An allowed streaming call takes one of its principal's stream slots; the returned callable
        gives it back when the call ends. Over the cap: audited denial `stream_limit`, and None."""
        if self._streams is None or verdict.identity is None:
            return release_nothing
        release = self._streams.acquire(verdict.identity.principal)
        if release is not None:
            return release
        decision = Decision.deny(Reason.STREAM_LIMIT, verdict.decision.policy_name, verdict.decision.matched_rule)
        denied = Verdict(decision, verdict.identity, verdict.token)
        await self._deny(method, context, denied, new_request_id(), model, announce=request_streaming)
        return None

    def may_use(self, method: str, model: ModelRef) -> bool:
        """Whether the caller of the current call would be allowed `method` on `model` (no audit).
        False outside an allowed call, and on any error."""
        caller = _CALLER.get()
        if caller is None:
            return False
        verdict, metadata = caller
        try:
            return self._guard.authorize(method, verdict, metadata, model).decision.allowed
        except Exception:
            log.exception("may_use check failed for %s; treating as not allowed", method)
            return False

    def _dry_run(self, method: str, context: aio.ServicerContext, verdict: Verdict, model: CallModel) -> str | None:
        """Count the shadow decision; audit it when it differs. Returns the request id it used."""
        assert verdict.shadow is not None
        if self._on_shadow is not None:
            self._on_shadow(method, verdict.decision, verdict.shadow)
        if not verdict.shadow_differs or self._audit is None:
            return None
        request_id = new_request_id()
        self._audit.record(self._record(method, context, verdict, request_id, model, dry_run=True))
        return request_id

    def _record(self, method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str,
                model: CallModel, *, dry_run: bool = False) -> dict[str, Any]:
        make = dry_run_record if dry_run else audit_record
        record = make(method, context, verdict, request_id, model)
        if self._trace_id is not None and (trace_id := self._trace_id()) is not None:
            record["trace_id"] = trace_id
        return record

    async def _deny(self, method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str,
                    model: CallModel = None, *, announce: bool = False, abort: bool = False) -> None:
        """Audit (durably), count, hold a flooder's refusal, then set the call's status (or, with
        `abort`, end it: raises).

        Setting the status and returning costs about what a successful call costs; grpc's abort
        (an exception through grpc's handler machinery) measured 30-60 µs more, and denials are
        what a flooder makes the server do. `announce`: the client may still be sending its request
        stream, and grpc.aio clients can then lose the status (grpc/grpc#36066); the code and the
        request id also go out in the response headers, which those clients always receive."""
        code = verdict.decision.status
        self._guard.spend_denial(verdict)
        if self._audit is not None and self._guard.policy.audit_condition in _AUDIT_DENIALS:
            # A denial the client sees is on disk first (auth.audit.Durability); if it cannot be
            # made durable, the client sees UNAVAILABLE instead, never an unrecorded denial.
            if verdict.decision.reason is Reason.TOO_MANY_DENIALS and self._refusals is not None:
                # A flooder's refusals share records (auth.refusals), each still under its request id.
                principal = verdict.identity.principal if verdict.identity is not None else ""
                durable = await self._refusals.refuse(
                    (principal, method, context.peer()), request_id,
                    lambda: self._record(method, context, verdict, request_id, model),
                )
            else:
                durable = await self._audit.record_durably(self._record(method, context, verdict, request_id, model))
            if not durable:
                code = grpc.StatusCode.UNAVAILABLE
        if self._on_denial is not None:
            self._on_denial(method, verdict.decision)
        if self._hold is not None and verdict.decision.reason is Reason.TOO_MANY_DENIALS:
            await self._hold.hold()
        trailing = ((REQUEST_ID_KEY, request_id),)
        if announce:
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id), (STATUS_HEADER, code.name)))
        if abort:
            await context.abort(code, CLIENT_MESSAGES[code], trailing_metadata=trailing)
        context.set_code(code)
        context.set_details(CLIENT_MESSAGES[code])
        context.set_trailing_metadata(trailing)


def release_nothing() -> None:
    """The release of a call that took no stream slot (what `hold_stream` returns when no cap applies)."""


def audit_record(method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str,
                 model: CallModel = None) -> dict[str, Any]:
    """An A59-named audit record, plus `model`/`model_version` when the call names a model (a
    stream's open, whose messages name it, has `model` "*"). Never includes the token itself."""
    decision, identity, token = verdict.decision, verdict.identity, verdict.token
    record: dict[str, Any] = {
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
    if isinstance(model, ModelRef):
        record["model"], record["model_version"] = model.name, model.version
    elif model is ANY_MODEL:
        record["model"] = "*"
    return record


def dry_run_record(method: str, context: aio.ServicerContext, verdict: Verdict, request_id: str,
                   model: CallModel = None) -> dict[str, Any]:
    """What the shadow policy would have decided, marked `dry_run`; `enforced_*` says what happened."""
    assert verdict.shadow is not None
    record = audit_record(method, context, Verdict(verdict.shadow, verdict.identity, verdict.token), request_id,
                          model)
    record["dry_run"] = True
    record["enforced_authorized"] = verdict.decision.allowed
    record["enforced_reason"] = verdict.decision.reason.value if verdict.decision.reason is not None else None
    return record


# Tuples, not sets: `in` then compares by identity in C, where a set would call Enum's Python-level
# __hash__ on every call.
_AUDIT_DENIALS = (AuditCondition.ON_DENY, AuditCondition.ON_DENY_AND_ALLOW)
_AUDIT_ALLOWS = (AuditCondition.ON_ALLOW, AuditCondition.ON_DENY_AND_ALLOW)
