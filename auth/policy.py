"""The authorization policy: gRFC A43's JSON, A59's audit options, and one documented extension.

Format (gRFC A43 "gRPC authorization API", as translated by grpc-go ``authz/rbac_translator.go``)::

    {"name": "...",                                  required, non-empty
     "deny_rules": [rule, ...],                      optional, evaluated first: a match denies
     "allow_rules": [rule, ...],                     required, non-empty: a match allows
     "audit_logging_options": {                      gRFC A59, optional
         "audit_condition": "NONE|ON_DENY|ON_ALLOW|ON_DENY_AND_ALLOW",
         "audit_loggers": [{"name": "...", "config": {...}, "is_optional": bool}]}}
    rule = {"name": "...",                           required, unique within its list
            "source": {"principals": ["..."]},       ORed; empty or absent: any caller
            "request": {"paths": ["/pkg.Service/Method", ...],           ORed
                        "headers": [{"key": "...", "values": ["..."]}]}, ANDed; values ORed
            "scopes": ["calculator:compute", ...],   aigis extension, allow rules only
            "models": ["digits", "net/2", "team-*"]} aigis extension, allow and deny rules

Patterns (principals, paths, header values): ``"*"`` matches any non-empty value, ``"abc*"`` a
prefix, ``"*abc"`` a suffix, anything else exactly (so ``""`` matches only the empty value). No
match, default deny. Unknown fields and duplicate JSON keys are errors (A43: an unknown field must
not be silently ignored, or a newer policy would allow more than it says).

Principals (A41 ``authenticated.principal_name``, which A43 reuses): a certificate's URI SANs are
checked if it has any; otherwise its DNS SANs if it has any; otherwise its subject (RFC 4514/2253).
A43's prose reads as "fall through to the next kind when nothing matched", but A41 and grpc-go
(PR #9111, an authorization-bypass fix) consult only the first kind present; we do the same, so a
SPIFFE certificate can never be matched by a DNS name or CN it also carries. A connection without a
client certificate (``peer=None``) matches only the principal ``""``.

Headers: keys are lowercased; ``:``-prefixed pseudo-headers, ``grpc-*``, ``host`` and hop-by-hop
headers are refused as A43 requires, and (aigis) so is ``authorization``: the bearer token is
verified and matched through ``scopes``, never compared as a string. Repeated metadata is joined
with ``,``; binary (``-bin``) values are matched in unpadded base64 (A41).

Extension: ``"scopes"`` on an allow rule means the call must carry a verified access token whose
scopes include all of those listed; ``"scopes": []`` requires a valid token with any scopes. A rule
without ``scopes`` is plain A43 (certificate only). Deny rules cannot carry scopes.

Extension: ``"models"`` on any rule means the rule matches a call only when the call names a model
and that model matches one of the patterns: ``"name"`` (any version), ``"name/version"``, ``"*"``
(any model) or a ``"prefix*"`` (on the name, or on ``name/version`` when the pattern has a ``/``).
Which model a call names is the server's business (ModelInfer's ``model_name``/``model_version``,
ClassifyImage's ``model``, ...), resolved before matching: an empty name is the default model, an
empty version the newest. A call that names no model never matches a rule with ``models``, so
paths-only rules keep their meaning. For a stream that names a model per message, the open is
judged with the model unknown (`ANY_MODEL`: allow rules as if their models matched, deny rules
with models skipped) and every message again with its model.

Audit: A59 defaults ``audit_condition`` to NONE. aigis promises an audit record for every denied
request, so an omitted condition here means ON_DENY: forgetting the option must not silently turn
the denial trail off. An explicit value is honoured. A59 also says an unsupported audit logger makes
the policy invalid unless ``is_optional``; aigis writes its own audit log and supports no policy-
configured logger, so only optional loggers are accepted (and ignored).
"""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigis.auth.decision import Decision, Reason
from aigis.auth.identity import PeerIdentity
from aigis.auth.tokens import VerifiedToken


class PolicyError(ValueError):
    """The policy is invalid; the message names the source and the offending key path."""


class AuditCondition(enum.StrEnum):
    """gRFC A59: which authorization decisions are audited."""

    NONE = "NONE"
    ON_DENY = "ON_DENY"
    ON_ALLOW = "ON_ALLOW"
    ON_DENY_AND_ALLOW = "ON_DENY_AND_ALLOW"

    def audits(self, allowed: bool) -> bool:
        if allowed:
            return self in (AuditCondition.ON_ALLOW, AuditCondition.ON_DENY_AND_ALLOW)
        return self in (AuditCondition.ON_DENY, AuditCondition.ON_DENY_AND_ALLOW)


# aigis default: see the module docstring (A59's own default is NONE).
DEFAULT_AUDIT_CONDITION = AuditCondition.ON_DENY

# A43 (and grpc-go's unsupportedHeaders): Host and RFC 7230 §6.1 hop-by-hop headers. ":"-prefixed and
# "grpc-"-prefixed keys are refused separately.
_UNSUPPORTED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aigis: the bearer token is checked by verification and `scopes`, never matched as a string.
_AIGIS_RESERVED_HEADERS = frozenset({"authorization"})
_HEADER_NAME = re.compile(r"[0-9a-z!#$%&'*+\-.^_`|~]+")  # RFC 9110 §5.1 token, lowercased
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
# name, name/version, "*", or either with a trailing "*" (prefix). No leading "*": a suffix match on
# model names has no use and would only make a rule harder to read.
_MODEL_PATTERN = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[\x21-\x7e]{0,64})?\*?")


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """A43 patterns ORed together, grouped so a match is a set lookup and two C-level str calls."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    non_empty: bool  # "*" was among the patterns

    @staticmethod
    def compile(patterns: Iterable[str]) -> StringMatcher:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        non_empty = False
        for pattern in patterns:
            # Same precedence as grpc-go getStringMatcher: "*", then trailing "*", then leading "*".
            if pattern == "*":
                non_empty = True
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            else:
                exact.add(pattern)
        return StringMatcher(frozenset(exact), tuple(prefixes), tuple(suffixes), non_empty)

    def __call__(self, value: str) -> bool:
        return (
            value in self.exact
            or (self.non_empty and value != "")
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The model a call names, resolved by the server: name, and version ("" when it has none)."""

    name: str
    version: str

    @property
    def qualified(self) -> str:
        return f"{self.name}/{self.version}"


class AnyModel:
    """The model of a stream whose messages are yet to come: judged again per message."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY_MODEL"


# A sentinel compared by identity, so no client-chosen model name can ever stand for it.
ANY_MODEL = AnyModel()
CallModel = ModelRef | AnyModel | None


@dataclass(frozen=True, slots=True)
class ModelMatcher:
    """A rule's `models`: patterns without "/" match the name, patterns with "/" match name/version."""

    names: StringMatcher | None
    qualified: StringMatcher | None

    @staticmethod
    def compile(patterns: Iterable[str]) -> ModelMatcher:
        patterns = list(patterns)
        names = [p for p in patterns if "/" not in p]
        qualified = [p for p in patterns if "/" in p]
        return ModelMatcher(StringMatcher.compile(names) if names else None,
                            StringMatcher.compile(qualified) if qualified else None)

    def __call__(self, model: ModelRef) -> bool:
        return (self.names is not None and self.names(model.name)) or (
            self.qualified is not None and self.qualified(model.qualified)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. A None matcher means "not constrained" (A43: absent or empty list)."""

    name: str
    principals: StringMatcher | None
    paths: StringMatcher | None
    headers: tuple[tuple[str, StringMatcher], ...]
    scopes: frozenset[str] | None  # None: no token needed; a set (maybe empty): token with these scopes
    models: ModelMatcher | None = None  # None: any call; else only calls naming a matching model

    def matches_request(self, method: str, peer: PeerIdentity | None, headers: Mapping[str, str] | None,
                        model: CallModel = None) -> bool:
        """Principal, path, headers and model match (scopes are judged by the caller).

        With `model` ANY_MODEL a rule's models are taken as matching; the caller skips deny rules
        with models then (a stream's open: its messages are judged one by one)."""
        if self.paths is not None and not self.paths(method):
            return False
        if self.models is not None and not (
            model is ANY_MODEL or (isinstance(model, ModelRef) and self.models(model))
        ):
            return False
        if self.principals is not None and not _principal_matches(self.principals, peer):
            return False
        if self.headers:
            if headers is None:
                return False
            for key, matcher in self.headers:
                value = headers.get(key)
                if value is None or not matcher(value):
                    return False
        return True


def _principal_matches(matcher: StringMatcher, peer: PeerIdentity | None) -> bool:
    if peer is None:
        return matcher("")
    # Only the first kind of identity the certificate has (A41; grpc-go #9111). Empty entries are
    # not an identity (grpc-go #9123).
    for names in (peer.uri_sans, peer.dns_sans):
        if any(names):
            for name in names:
                if name and matcher(name):
                    return True
            return False
    return matcher(peer.subject)


def header_view(metadata: Iterable[Any] | None) -> dict[str, str]:
    """Invocation metadata as A41 sees it: lowercase keys, repeated values joined by ","."""
    joined: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii").rstrip("=")
        joined.setdefault(key.lower(), []).append(value)
    return {key: ",".join(values) for key, values in joined.items()}


@dataclass(frozen=True)
class Policy:
    """A compiled, validated policy. Build it with `load` or `from_json`."""

    name: str
    deny_rules: tuple[Rule, ...]
    allow_rules: tuple[Rule, ...]
    audit_condition: AuditCondition
    uses_headers: bool  # False: a decision depends only on (peer, method, token scopes) — cacheable
    source: str = "<string>"

    @staticmethod
    def load(path: Path) -> Policy:
        """Read and compile a policy file. Blocking file I/O: at start-up or in a thread."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{path}: cannot read policy ({type(exc).__name__}: {exc})") from None
        return Policy.from_json(text, source=str(path))

    @staticmethod
    def from_json(text: str, *, source: str = "<string>") -> Policy:
        try:
            document = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:
            raise PolicyError(f"{source}: invalid JSON: {exc}") from None
        try:
            return _compile(document, source)
        except _Invalid as exc:
            raise PolicyError(f"{source}: {exc.path}: {exc.message}") from None

    def evaluate(
        self,
        method: str,
        peer: PeerIdentity | None,
        metadata: Iterable[Any] | None,
        token: VerifiedToken | None,
        model: CallModel = None,
    ) -> Decision:
        """Decide one RPC: deny rules first, then allow rules, else deny (A43).

        `method` is the full method name ("/pkg.Service/Method"); `metadata` is only read when a
        rule looks at headers. When nothing allows, the denial says why as precisely as it can:
        TOKEN_MISSING if some allow rule matched but needs a token and there is none, SCOPE_MISSING
        if one matched but the token lacks a scope (matched_rule names that rule), else
        NO_MATCHING_RULE.
        """
        headers = header_view(metadata) if self.uses_headers else None
        for rule in self.deny_rules:
            if model is ANY_MODEL and rule.models is not None:
                continue  # judged per message, with the model the message names
            if rule.matches_request(method, peer, headers, model):
                return Decision.deny(Reason.POLICY_DENIED, self.name, rule.name)
        near_miss: Rule | None = None
        for rule in self.allow_rules:
            if not rule.matches_request(method, peer, headers, model):
                continue
            if rule.scopes is None or (token is not None and rule.scopes <= token.scopes):
                return Decision.allow(self.name, rule.name)
            if near_miss is None:
                near_miss = rule
        if near_miss is not None:
            reason = Reason.TOKEN_MISSING if token is None else Reason.SCOPE_MISSING
            return Decision.deny(reason, self.name, near_miss.name)
        return Decision.deny(Reason.NO_MATCHING_RULE, self.name)


# ---- parsing and validation ------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # json gives no position here; the key name is what the author needs.
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _object(value: Any, path: str, allowed: frozenset[str], required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected an object, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise _Invalid(_join(path, key), f"unknown field (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in value:
            raise _Invalid(_join(path, key), "is required")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _string(value: Any, path: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"expected a string, got {type(value).__name__}")
    if non_empty and not value:
        raise _Invalid(path, "must not be empty")
    return value


def _strings(value: Any, path: str, *, non_empty_list: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list of strings, got {type(value).__name__}")
    if non_empty_list and not value:
        raise _Invalid(path, "must not be empty")
    return [_string(item, f"{path}[{i}]") for i, item in enumerate(value)]


_TOP_FIELDS = frozenset({"name", "deny_rules", "allow_rules", "audit_logging_options"})
_RULE_FIELDS = frozenset({"name", "source", "request", "scopes", "models"})
_SOURCE_FIELDS = frozenset({"principals"})
_REQUEST_FIELDS = frozenset({"paths", "headers"})
_HEADER_FIELDS = frozenset({"key", "values"})
_AUDIT_FIELDS = frozenset({"audit_condition", "audit_loggers"})
_LOGGER_FIELDS = frozenset({"name", "config", "is_optional"})


def _compile(document: Any, source: str) -> Policy:
    top = _object(document, "", _TOP_FIELDS, required=("name", "allow_rules"))
    name = _string(top["name"], "name", non_empty=True)
    deny_rules = _rules(top.get("deny_rules", []), "deny_rules", allow_scopes=False)
    if not isinstance(top["allow_rules"], list) or not top["allow_rules"]:
        raise _Invalid("allow_rules", "must be a non-empty list (A43: allow_rules is required)")
    allow_rules = _rules(top["allow_rules"], "allow_rules", allow_scopes=True)
    audit_condition = _audit_options(top.get("audit_logging_options"))
    uses_headers = any(rule.headers for rule in (*deny_rules, *allow_rules))
    return Policy(name, deny_rules, allow_rules, audit_condition, uses_headers, source)


def _rules(value: Any, path: str, *, allow_scopes: bool) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list of rules, got {type(value).__name__}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        rule = _rule(item, f"{path}[{i}]", allow_scopes=allow_scopes)
        if rule.name in seen:
            # Names identify the matched rule in the audit log; they must be unambiguous.
            raise _Invalid(f"{path}[{i}].name", f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _rule(value: Any, path: str, *, allow_scopes: bool) -> Rule:
    rule = _object(value, path, _RULE_FIELDS, required=("name",))
    name = _string(rule["name"], f"{path}.name", non_empty=True)

    principals: StringMatcher | None = None
    if "source" in rule:
        src = _object(rule["source"], f"{path}.source", _SOURCE_FIELDS)
        patterns = _strings(src.get("principals", []), f"{path}.source.principals")
        principals = StringMatcher.compile(patterns) if patterns else None

    paths: StringMatcher | None = None
    headers: tuple[tuple[str, StringMatcher], ...] = ()
    if "request" in rule:
        req = _object(rule["request"], f"{path}.request", _REQUEST_FIELDS)
        patterns = _strings(req.get("paths", []), f"{path}.request.paths")
        paths = StringMatcher.compile(patterns) if patterns else None
        headers = _headers(req.get("headers", []), f"{path}.request.headers")

    scopes: frozenset[str] | None = None
    if "scopes" in rule:
        if not allow_scopes:
            raise _Invalid(
                f"{path}.scopes",
                "scopes are only allowed in allow_rules (a deny rule cannot depend on a token)",
            )
        listed = _strings(rule["scopes"], f"{path}.scopes")
        for i, scope in enumerate(listed):
            if not _SCOPE_TOKEN.fullmatch(scope):
                raise _Invalid(f"{path}.scopes[{i}]", f"{scope!r} is not an RFC 6749 scope token")
        scopes = frozenset(listed)

    models: ModelMatcher | None = None
    if "models" in rule:
        listed = _strings(rule["models"], f"{path}.models", non_empty_list=True)
        for i, pattern in enumerate(listed):
            if not _MODEL_PATTERN.fullmatch(pattern):
                raise _Invalid(f"{path}.models[{i}]", f"{pattern!r} is not a model pattern (name, name/version, "
                                                      "'*' or a prefix ending in '*')")
        models = ModelMatcher.compile(listed)
    return Rule(name, principals, paths, headers, scopes, models)


def _headers(value: Any, path: str) -> tuple[tuple[str, StringMatcher], ...]:
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list of headers, got {type(value).__name__}")
    compiled: list[tuple[str, StringMatcher]] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        header = _object(item, where, _HEADER_FIELDS, required=("key", "values"))
        key = _string(header["key"], f"{where}.key", non_empty=True).lower()
        if key.startswith(":") or key.startswith("grpc-") or key in _UNSUPPORTED_HEADERS:
            raise _Invalid(f"{where}.key", f"unsupported header {key!r} (gRFC A43)")
        if key in _AIGIS_RESERVED_HEADERS:
            raise _Invalid(f"{where}.key", f"{key!r} cannot be matched; use the rule's scopes")
        if not _HEADER_NAME.fullmatch(key):
            raise _Invalid(f"{where}.key", f"{key!r} is not a valid header name")
        values = _strings(header["values"], f"{where}.values", non_empty_list=True)
        compiled.append((key, StringMatcher.compile(values)))
    return tuple(compiled)


def _audit_options(value: Any) -> AuditCondition:
    if value is None:
        return DEFAULT_AUDIT_CONDITION
    path = "audit_logging_options"
    options = _object(value, path, _AUDIT_FIELDS)
    condition = DEFAULT_AUDIT_CONDITION
    if "audit_condition" in options:
        raw = _string(options["audit_condition"], f"{path}.audit_condition")
        try:
            condition = AuditCondition(raw)
        except ValueError:
            allowed = ", ".join(c.value for c in AuditCondition)
            raise _Invalid(f"{path}.audit_condition", f"{raw!r} is not one of {allowed}") from None
    loggers = options.get("audit_loggers", [])
    if not isinstance(loggers, list):
        raise _Invalid(f"{path}.audit_loggers", "expected a list")
    for i, item in enumerate(loggers):
        where = f"{path}.audit_loggers[{i}]"
        logger = _object(item, where, _LOGGER_FIELDS, required=("name",))
        logger_name = _string(logger["name"], f"{where}.name", non_empty=True)
        if "config" in logger and not isinstance(logger["config"], dict):
            raise _Invalid(f"{where}.config", "expected an object")
        optional = logger.get("is_optional", False)
        if not isinstance(optional, bool):
            raise _Invalid(f"{where}.is_optional", "expected a boolean")
        if not optional:
            # A59: an unsupported logger that is not optional makes the policy invalid.
            raise _Invalid(
                f"{where}.name",
                f"audit logger {logger_name!r} is not supported (aigis writes its own audit log; "
                "set is_optional to ignore it)",
            )
    return condition
