"""Authorization decisions as values, and the one table that maps deny reasons to gRPC status codes.

The checks produce a `Decision`; the interceptor turns it into a status, and the audit log into a
record. Clients only ever see the coarse status code; the reason is for the audit log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class Reason(enum.StrEnum):
    """Stable deny-reason codes written to the audit log (documented in README.md)."""

    # The caller could not be identified: UNAUTHENTICATED.
    CERT_MISSING = "cert_missing"  # no verified peer certificate on the connection
    CERT_INVALID = "cert_invalid"  # certificate unparseable or fails the client-certificate policy
    CERT_REVOKED = "cert_revoked"  # serial listed in the CA's CRL
    TOKEN_MISSING = "token_missing"  # a rule needs a token and the call carried none
    TOKEN_MALFORMED = "token_malformed"  # not exactly one well-formed "authorization: Bearer <jwt>"
    TOKEN_BAD_SIGNATURE = "token_bad_signature"  # signature does not verify with the issuer's key
    TOKEN_UNKNOWN_KEY = "token_unknown_key"  # kid not in the trusted issuer's key set
    TOKEN_BAD_ALGORITHM = "token_bad_algorithm"  # alg not in the allow-list (none, HS256, ...)
    TOKEN_EXPIRED = "token_expired"  # exp in the past (beyond leeway)
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # nbf or iat in the future (beyond leeway)
    TOKEN_WRONG_ISSUER = "token_wrong_issuer"  # iss not a trusted issuer
    TOKEN_WRONG_AUDIENCE = "token_wrong_audience"  # aud does not name this server
    TOKEN_WRONG_TYPE = "token_wrong_type"  # typ header is not at+jwt (RFC 9068)
    TOKEN_MISSING_CLAIM = "token_missing_claim"  # one of exp iat iss aud sub absent
    TOKEN_INVALID = "token_invalid"  # any other token failure (e.g. unknown crit header)
    TOKEN_CERT_MISMATCH = "token_cert_mismatch"  # certificate-bound token (RFC 8705 cnf) on another certificate
    TOKEN_UNBOUND = "token_unbound"  # binding is required and the token carries no cnf x5t#S256
    TOKEN_BINDING_UNVERIFIABLE = "token_binding_unverifiable"  # cnf claims a binding we cannot check (RFC 7800 §3)
    TOKEN_LIFETIME_TOO_LONG = "token_lifetime_too_long"  # exp - iat above the issuer's maximum lifetime
    TOKEN_CLIENT_REVOKED = "token_client_revoked"  # the token's client_id is revoked in the client registry
    CHECK_ERROR = "check_error"  # an unexpected error while checking: fail closed
    # Not the caller's fault, retry later: UNAVAILABLE.
    TOKEN_KEYS_UNAVAILABLE = "token_keys_unavailable"  # the issuer's JWK Set is not cached and cannot be fetched
    # The caller is identified but not allowed: PERMISSION_DENIED.
    SCOPE_MISSING = "scope_missing"  # a rule matched but the token lacks a required scope
    POLICY_DENIED = "policy_denied"  # a deny rule matched
    NO_MATCHING_RULE = "no_matching_rule"  # no allow rule matched (default deny)
    # Identified and allowed, but over its request budget: RESOURCE_EXHAUSTED.
    RATE_LIMITED = "rate_limited"  # the principal's token bucket is empty
    STREAM_LIMIT = "stream_limit"  # the principal already holds its maximum of concurrent streams
    TOO_MANY_DENIALS = "too_many_denials"  # the principal was denied too often lately (its denial budget is empty)


# The one place a deny reason becomes a status code. Unidentified -> UNAUTHENTICATED,
# identified but not allowed -> PERMISSION_DENIED.
_OVER_BUDGET = {Reason.RATE_LIMITED, Reason.STREAM_LIMIT, Reason.TOO_MANY_DENIALS}
_PERMISSION_DENIED = {Reason.SCOPE_MISSING, Reason.POLICY_DENIED, Reason.NO_MATCHING_RULE}
REASON_STATUS: dict[Reason, grpc.StatusCode] = {
    reason: (
        grpc.StatusCode.RESOURCE_EXHAUSTED
        if reason in _OVER_BUDGET
        else grpc.StatusCode.UNAVAILABLE
        if reason is Reason.TOKEN_KEYS_UNAVAILABLE
        else grpc.StatusCode.PERMISSION_DENIED
        if reason in _PERMISSION_DENIED
        else grpc.StatusCode.UNAUTHENTICATED
    )
    for reason in Reason
}

# What a denied client reads: deliberately the same whatever check failed.
CLIENT_MESSAGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAUTHENTICATED: "request could not be authenticated",
    grpc.StatusCode.PERMISSION_DENIED: "request is not permitted",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate limit exceeded; retry later",
    # Also a denial whose audit record could not be written (disk full, writer stalled): refused
    # all the same, but not shown as a denial the audit log does not hold.
    grpc.StatusCode.UNAVAILABLE: "authentication is temporarily unavailable; retry later",
}


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of checking one RPC. `reason` is None exactly when `allowed` is True."""

    allowed: bool
    reason: Reason | None = None
    policy_name: str = ""
    matched_rule: str = ""

    @property
    def status(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK if self.reason is None else REASON_STATUS[self.reason]

    @staticmethod
    def allow(policy_name: str, matched_rule: str) -> Decision:
        return Decision(True, None, policy_name, matched_rule)

    @staticmethod
    def deny(reason: Reason, policy_name: str = "", matched_rule: str = "") -> Decision:
        return Decision(False, reason, policy_name, matched_rule)
