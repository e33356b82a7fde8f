"""The check pipeline every RPC goes through, in a fixed order, producing a Decision.

certificate identity (client-certificate policy) -> revocation -> denial budget -> rate limit ->
bearer token -> certificate binding (RFC 8705) -> authorization policy. The first failure decides;
any unexpected error is a denial (fail closed). Every denial of an identified principal spends one
token of its denial budget; a principal whose budget is empty is refused (`too_many_denials`)
before any token work, so a flooder of forged tokens or forbidden calls is contained while a busy
principal that is not denied is never slowed. Everything repeatable is cached: parsed
certificates (IdentityCache), verified tokens (TokenVerifier), and policy decisions for
(certificate, method, scopes) when the policy does not look at headers.

A shadow (dry-run) policy, when set, is evaluated beside the enforced one on every call that
reaches the policy step; its decision rides along in the Verdict and never decides anything. An
error in it is logged and leaves the call as the enforced policy decided (dry-run must not deny).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aigis.auth.decision import Decision, Reason
from aigis.auth.identity import IdentityCache, IdentityError, PeerIdentity, RevocationList
from aigis.auth.policy import CallModel, Policy
from aigis.auth.ratelimit import RateLimiter
from aigis.auth.tokens import TokenError, TokenVerifier, VerifiedToken, parse_authorization

log = logging.getLogger("aigis.guard")

_DECISION_CACHE_MAX = 16_384

#: Told each check phase's outcome as it completes: (phase name, attributes). The server makes
#: these OpenTelemetry span events; attributes never hold a token or secret.
PhaseObserver = Callable[[str, Mapping[str, str | bool]], None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A Decision plus what the checks learned about the caller (for the audit log)."""

    decision: Decision
    identity: PeerIdentity | None = None
    token: VerifiedToken | None = None
    shadow: Decision | None = None  # what the shadow policy would have decided (never enforced)

    @property
    def shadow_differs(self) -> bool:
        """The shadow policy would have allowed what was denied, or denied what was allowed."""
        return self.shadow is not None and self.shadow.allowed != self.decision.allowed


@dataclass(frozen=True, slots=True)
class TokenToVerify:
    """Where `Guard.check_now` stopped: the caller is identified, its token not yet verified."""

    raw: str
    identity: PeerIdentity
    metadata: Sequence[Any]


@dataclass(frozen=True, slots=True)
class RevokedClients:
    """Client ids revoked in the client registry, for the tokens of the issuer that registry serves.

    A token obtained with a client secret is not bound to a certificate, so the CRL does not stop
    it: it is refused by its `client_id` instead, from the moment `aigis certs revoke` runs.
    """

    issuer: str = ""
    client_ids: frozenset[str] = frozenset()

    def covers(self, token: VerifiedToken) -> bool:
        return token.client_id in self.client_ids and token.issuer == self.issuer


class Guard:
    """Decides one RPC from its servicer context. Policy and CRL can be swapped while serving."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        policy: Policy,
        revocations: RevocationList | None = None,
        identities: IdentityCache | None = None,
        rate_limiter: RateLimiter | None = None,
        denial_budget: RateLimiter | None = None,
        require_binding: bool = False,
        shadow_policy: Policy | None = None,
        on_phase: PhaseObserver | None = None,
        revoked_clients: RevokedClients | None = None,
    ) -> None:
        self.verifier = verifier
        self.revoked_clients = revoked_clients or RevokedClients()
        self.identities = identities or IdentityCache()
        self._rate_limiter = rate_limiter
        self._denial_budget = denial_budget
        self._require_binding = require_binding
        self._revocations = revocations or RevocationList()
        self._decisions: dict[tuple[str, str, frozenset[str] | None, CallModel], Verdict] = {}
        self._policy = policy
        self._shadow = shadow_policy
        self._on_phase = on_phase

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy
        self._decisions = {}

    @property
    def shadow_policy(self) -> Policy | None:
        return self._shadow

    @shadow_policy.setter
    def shadow_policy(self, policy: Policy | None) -> None:
        self._shadow = policy
        self._decisions = {}

    @property
    def revocations(self) -> RevocationList:
        return self._revocations

    @revocations.setter
    def revocations(self, revocations: RevocationList) -> None:
        self._revocations = revocations

    def check_now(self, method: str, context: Any, metadata: Sequence[Any],
                  model: CallModel = None) -> Verdict | TokenToVerify:
        """The pipeline up to where it would wait: the Verdict, or what `complete` needs when a token
        must be verified first (one not seen before: a signature check, maybe a key fetch).
        `metadata` is the call's invocation metadata.

        Every RPC runs this, so the common call — a token verified earlier — awaits nothing, and the
        grpc accessor is read once (it builds new objects per call: auth_context() ~4 µs)."""
        phase = self._on_phase
        identity = self._identify(context.auth_context(), phase)
        if isinstance(identity, Verdict):
            return self._observed(identity)
        try:
            raw = parse_authorization(metadata)
        except TokenError as exc:
            return self._observed(Verdict(Decision.deny(exc.reason), identity))
        if raw is None:
            return self._with_token(method, identity, metadata, None, model)
        token = self.verifier.cached(raw)
        if token is None:
            return TokenToVerify(raw, identity, metadata)
        return self._with_token(method, identity, metadata, token, model)

    async def complete(self, pending: TokenToVerify, method: str, model: CallModel = None) -> Verdict:
        """The rest of the pipeline once `pending.raw` is verified (or refused)."""
        try:
            token = await self.verifier.verify(pending.raw)
        except TokenError as exc:
            return self._observed(Verdict(Decision.deny(exc.reason), pending.identity))
        return self._with_token(method, pending.identity, pending.metadata, token, model)

    def _with_token(self, method: str, identity: PeerIdentity, metadata: Sequence[Any], token: VerifiedToken | None,
                    model: CallModel) -> Verdict:
        """Token revocation and certificate binding, then the policy."""
        if token is not None:
            if self._on_phase is not None:
                self._on_phase("token", {"aigis.client_id": token.client_id, "aigis.token_issuer": token.issuer})
            if self.revoked_clients.covers(token):
                return self._observed(Verdict(Decision.deny(Reason.TOKEN_CLIENT_REVOKED), identity, token))
            # RFC 8705 §3: a certificate-bound token is only good over the certificate it names.
            bound_to = token.cnf_x5t_s256
            if bound_to is not None and bound_to != identity.fingerprint:
                return self._observed(Verdict(Decision.deny(Reason.TOKEN_CERT_MISMATCH), identity, token))
            if bound_to is None and self._require_binding:
                return self._observed(Verdict(Decision.deny(Reason.TOKEN_UNBOUND), identity, token))
        return self._observed(self._decide(method, identity, metadata, token, model))

    def _observed(self, verdict: Verdict) -> Verdict:
        """Report the final decision (and the shadow policy's) to the phase observer, if any."""
        phase = self._on_phase
        if phase is not None:
            phase("decision", _outcome(verdict.decision))
            if verdict.shadow is not None:
                phase("shadow_policy", {"aigis.authorized": verdict.shadow.allowed,
                                        "aigis.differs": verdict.shadow_differs})
        return verdict

    def _identify(self, auth_context: Mapping[str, Sequence[bytes]],
                  phase: PhaseObserver | None) -> PeerIdentity | Verdict:
        """The caller's certificate identity, or the Verdict refusing it: no certificate or one the
        policy refuses, revoked, denial budget empty, over its rate limit (all before token work)."""
        try:
            identity = self.identities.from_auth_context(auth_context)
        except IdentityError as exc:
            return Verdict(Decision.deny(exc.reason))
        if self._revocations.is_revoked(identity):
            return Verdict(Decision.deny(Reason.CERT_REVOKED), identity)
        if phase is not None:
            phase("certificate", {"aigis.principal": identity.principal})
        if self._denial_budget is not None and self._denial_budget.exhausted(identity.principal):
            return Verdict(Decision.deny(Reason.TOO_MANY_DENIALS), identity)
        if self._rate_limiter is not None and not self._rate_limiter.allow(identity.principal):
            return Verdict(Decision.deny(Reason.RATE_LIMITED), identity)
        return identity

    def spend_denial(self, verdict: Verdict) -> None:
        """A denial of an identified principal spends one token of its denial budget (the enforcer
        calls this for every denial it answers: check, stream cap, per-message policy). A refusal for
        an empty budget spends none, so the budget refills at its rate however hard the flood."""
        budget, identity = self._denial_budget, verdict.identity
        if budget is not None and identity is not None and verdict.decision.reason is not Reason.TOO_MANY_DENIALS:
            budget.allow(identity.principal)

    def authorize(self, method: str, verdict: Verdict, metadata: Sequence[Any], model: CallModel) -> Verdict:
        """The policy alone, again, for a caller already authenticated (`verdict` allowed it): each
        message of a stream that names a model. Identity and token are not re-checked."""
        identity = verdict.identity
        if identity is None:  # an allowed verdict always carries the identity
            return Verdict(Decision.deny(Reason.CHECK_ERROR), None, verdict.token)
        again = self._decide(method, identity, metadata, verdict.token, model)
        if self._on_phase is not None:
            self._on_phase("message_decision", _outcome(again.decision))
        return again

    def _decide(self, method: str, identity: PeerIdentity, metadata: Sequence[Any], token: VerifiedToken | None,
                model: CallModel) -> Verdict:
        policy, shadow = self._policy, self._shadow
        if policy.uses_headers or (shadow is not None and shadow.uses_headers):
            decision = policy.evaluate(method, identity, metadata, token, model)
            return Verdict(decision, identity, token, _dry_run(shadow, method, identity, metadata, token, model))
        key = (identity.fingerprint, method, token.scopes if token is not None else None, model)
        cached = self._decisions.get(key)
        if cached is not None:
            # Same key, same decisions; the Verdict itself is reused for the same identity and token
            # objects (the caches hand out one per certificate and per token), the common case.
            if cached.identity is identity and cached.token is token:
                return cached
            return Verdict(cached.decision, identity, token, cached.shadow)
        verdict = Verdict(
            policy.evaluate(method, identity, metadata, token, model), identity, token,
            _dry_run(shadow, method, identity, metadata, token, model),
        )
        if len(self._decisions) >= _DECISION_CACHE_MAX:
            self._decisions.clear()
        self._decisions[key] = verdict
        return verdict


def _outcome(decision: Decision) -> dict[str, str | bool]:
    """A decision as span-event attributes."""
    outcome: dict[str, str | bool] = {"aigis.authorized": decision.allowed}
    if decision.reason is not None:
        outcome["aigis.reason"] = decision.reason.value
    if decision.policy_name:
        outcome |= {"aigis.policy_name": decision.policy_name, "aigis.matched_rule": decision.matched_rule}
    return outcome


def _dry_run(
    shadow: Policy | None,
    method: str,
    identity: PeerIdentity,
    metadata: Sequence[Any],
    token: VerifiedToken | None,
    model: CallModel = None,
) -> Decision | None:
    """The shadow policy's decision, or None (no shadow policy, or it failed: never a denial)."""
    if shadow is None:
        return None
    try:
        return shadow.evaluate(method, identity, metadata, token, model)
    except Exception:
        log.exception("shadow policy %s failed for %s; ignored (dry-run never decides)", shadow.name, method)
        return None
