"""Server configuration: one TOML file (`aigis.toml`) into one frozen, validated object.

Every value has a safe default, so no file is needed for the embedded setup. Unknown keys and
invalid values stop start-up with a message naming the key (a typo must not silently fall back
to a default). Relative paths in the file are relative to the file; command-line overrides are
relative to the working directory.

Precedence, lowest first: built-in default < aigis.toml < `AIGIS_<SECTION>_<KEY>` environment
variable < command-line flag. `load_config` is the one entry point for all three (see its
docstring for how environment values are spelled).
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from aigis.auth.audit import Durability
from aigis.auth.audit_format import AuditFormat
from aigis.auth.defaults import (
    DEFAULT_ALGORITHMS,
    DEFAULT_MAX_LIFETIME,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    MIN_TOKEN_TTL,
    SUPPORTED_ALGORITHMS,
)
from aigis.auth.pki import PkiPaths
from aigis.auth.urls import https_base_url

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODELS = PACKAGE_DIR / "models"
BUNDLED_POLICY = PACKAGE_DIR / "policy.json"


TOML_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                   list: "an array", dict: "a table"}
ENV_PREFIX = "AIGIS_"
# The TOML tables an environment variable may set: AIGIS_SERVER_LISTEN is [server] listen.
ENV_SECTIONS = ("server", "auth", "issuer", "audit", "limits", "metrics", "files", "probes", "log", "tracing")
LOG_FORMATS = ("text", "json")
AUDIT_OUTPUTS = ("file", "stdout")


STALE_CRL_MODES = ("warn", "unready")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ExternalIssuer:
    """A token issuer other than the embedded one: tokens from it are trusted for this audience.

    Without `jwks_url` and `jwks_file`, the key set URL comes from the issuer's discovery document.
    """

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    ca_file: Path | None = None
    token_types: tuple[str, ...] = ("at+jwt",)  # accepted JWS typ values; RFC 9068's at+jwt by default
    scope_claim: str | None = None  # None: `scope`, else `scp`
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME  # longest exp - iat accepted from this issuer


@dataclass(frozen=True)
class IssuerSettings:
    """The embedded OAuth2 client-credentials issuer started beside the gRPC server."""

    enabled: bool = True
    listen: HostPort = HostPort("127.0.0.1", 8443)
    url: str = ""  # the `iss` value; empty means the listener's own URL, https://127.0.0.1:8443
    audience: str = "aigis"
    token_ttl: timedelta = DEFAULT_TOKEN_TTL
    # What unauthenticated strangers may hold (auth/bounded_http.py): connections overall and per
    # peer address, and the deadline for a request's head and for its body (each).
    max_connections: int = 256
    max_connections_per_peer: int = 32
    request_timeout_seconds: float = 5
    secret_check_threads: int = 2  # concurrent scrypt checks, ~16 MiB each

    def endpoint_url(self, port: int | None = None) -> str:
        """Where clients reach the issuer (auth.urls: the same rule the running issuer uses)."""
        return https_base_url(self.listen.host, port if port is not None else self.listen.port)

    def issuer_url(self, port: int | None = None) -> str:
        """The `iss` of its tokens: `url` when set, else the endpoint URL."""
        return self.url or self.endpoint_url(port)


@dataclass(frozen=True)
class FileLocations:
    """[files]: files that do not live under `certs` with aigis's own names.

    `tls_secret` is a mounted Kubernetes TLS Secret directory (tls.crt, tls.key, ca.crt); the
    explicit `server_cert` / `server_key` / `ca_bundle` keys win over it.
    """

    tls_secret: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    ca_bundle: Path | None = None  # CAs whose client certificates the server accepts
    crl: Path | None = None
    jwks: Path | None = None  # the embedded issuer's published keys, which the server trusts
    client_registry: Path | None = None
    signing_key: Path | None = None  # the issuer's active private key (`aigis issuer`)
    signing_keys_metadata: Path | None = None

    def pki(self, certs: Path) -> PkiPaths:
        base = PkiPaths(certs)
        if self.tls_secret is not None:
            base = base.with_tls_secret(self.tls_secret)
        return replace(
            base,
            server_cert_file=self.server_cert or base.server_cert_file,
            server_key_file=self.server_key or base.server_key_file,
            ca_cert_file=self.ca_bundle or base.ca_cert_file,
            crl_file=self.crl,
            jwks_file=self.jwks,
            clients_registry_file=self.client_registry,
            signing_key_file=self.signing_key,
            signing_keys_metadata_file=self.signing_keys_metadata,
        )


@dataclass(frozen=True)
class Limits:
    """Explicit resource limits; every one is enforced and tested (README "Limits")."""

    rate_per_second: float = 0.0  # per-principal token bucket refill; 0 turns rate limiting off
    rate_burst: int = 100
    # Per-principal budget that only denials spend: past `denial_burst` denials (refilled at
    # `denial_rate_per_second`) the principal is refused before token work; 0 turns it off.
    denial_rate_per_second: float = 5.0
    denial_burst: int = 50
    # Those refusals are answered this late (auth.denial_hold), at most `max_held_denials` at once
    # in the process; 0 answers them at once.
    denial_hold_seconds: float = 1.0
    max_held_denials: int = 1024
    max_metadata_bytes: int = 16 * 1024  # request headers, tokens included (gRPC's own hard limit)
    max_concurrent_streams: int = 100  # per connection
    max_stream_messages: int = 10_000  # per client stream (Sum, RunningSum, ClassifyStream, ...)
    # Streaming calls one principal may hold open at once in one process (across its connections).
    max_streams_per_principal: int = 64
    max_connection_age_seconds: float = 3600.0  # then the client reconnects (and re-handshakes)
    max_connection_age_grace_seconds: float = 30.0
    max_connection_idle_seconds: float = 600.0
    min_ping_interval_seconds: float = 60.0  # clients pinging more often than this get GOAWAY ...
    max_ping_strikes: int = 2  # ... after this many offences


@dataclass(frozen=True)
class Config:
    listen: HostPort = HostPort("127.0.0.1", 50051)
    certs: Path = Path("certs")
    models: Path = BUNDLED_MODELS
    policy: Path = BUNDLED_POLICY
    # A shadow (dry-run) policy in the same format: evaluated beside `policy` on every call, never
    # enforced; where it would decide differently, the audit log gets a `dry_run` record.
    shadow_policy: Path | None = None
    audit_log: Path = Path("aigis-audit.jsonl")
    # [audit]: the chain's HMAC key file, kept apart from the log (None: unkeyed SHA-256 chain);
    # the size at which a file is rotated; records the writer may fall behind by before it
    # counts them in an overflow record; when a denial is answered relative to its record reaching
    # the disk (auth.audit.Durability). Defaults match auth.audit.
    audit_hmac_key_file: Path | None = None
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_queue_size: int = 32_768
    audit_durability: Durability = Durability.FSYNC
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # room for a multi-megapixel encoded image
    grace_seconds: float = 5.0
    inference_threads: int = 2
    leeway: timedelta = timedelta(seconds=30)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    issuer: IssuerSettings = field(default_factory=IssuerSettings)
    limits: Limits = field(default_factory=Limits)
    # Prometheus /metrics over plain HTTP: loopback by default (it names methods and principals'
    # denial counts, never tokens); None turns it off.
    metrics_listen: HostPort | None = HostPort("127.0.0.1", 9464)
    # Client certificates must carry exactly one SPIFFE ID in this trust domain; empty means
    # "the one `aigis certs init` recorded in the client registry".
    trust_domain: str = ""
    # RFC 8705: refuse tokens that are not bound to a client certificate (cnf x5t#S256).
    require_bound_tokens: bool = False
    # A CRL past its nextUpdate is always still enforced and reported; "unready" also fails
    # /readyz (fail closed: the orchestrator stops routing to this replica), "warn" does not.
    stale_crl: str = "warn"
    # Server processes sharing the port (SO_REUSEPORT); set by `aigis serve --workers N`.
    workers: int = 1
    # The supervisor restarts a crashed worker (after 0.5 s, doubling to 30 s) unless it crashed
    # more than `worker_restart_limit` times within `worker_restart_window_seconds`: then it stops
    # the others and exits 1, for the service manager to act on.
    worker_restart_limit: int = 5
    worker_restart_window_seconds: float = 60.0
    # Which worker this process is (None when not started by the supervisor): names its audit file.
    worker_id: int | None = None
    # Trusted external issuers. When empty, tokens from the embedded issuer are trusted.
    external_issuers: tuple[ExternalIssuer, ...] = ()
    files: FileLocations = field(default_factory=FileLocations)
    # [log] format: "text" for people, "json" (one object per line on stdout) for log collectors.
    log_format: str = "text"
    # [audit] output: "file" (audit_log, rotated, resumed after a restart) or "stdout" (the same
    # chained JSON lines, for a collector; the chain starts afresh with each process).
    audit_output: str = "file"
    # [probes] listen: plain-HTTP /livez and /readyz for the kubelet; None (the default) is off.
    probes_listen: HostPort | None = None
    # [server] drain_seconds: after SIGTERM, /readyz fails and calls are still served this long
    # (endpoints controllers and clients move away) before the `grace_seconds` shutdown begins.
    drain_seconds: float = 0.0

    @property
    def pki(self) -> PkiPaths:
        """Every file location the server and issuer read, after [files]."""
        return self.files.pki(self.certs)
    # Remote (https) key sets: how long a fetched set is used before a refresh, and the least time
    # between two fetches (bounds what a stream of made-up `kid`s can make us do).
    jwks_cache_seconds: float = 300.0
    jwks_min_refetch_seconds: float = 30.0
    # [tracing]: OpenTelemetry spans per RPC (needs the [otel] extra); exported over OTLP as the
    # standard OTEL_EXPORTER_OTLP_* variables say, unless the process already set a tracer provider.
    # [audit] format: "aigis" (flat records) or "grpc" (A59's `grpc_audit_log` object, as grpc-go
    # and gRPC C++ write it, with aigis's fields beside it).
    audit_format: AuditFormat = AuditFormat.AIGIS
    tracing_enabled: bool = False
    tracing_service_name: str = "aigis"


def parse_host_port(value: Any, key: str) -> HostPort:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT with a port 0-65535, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and not all(part.isalnum() or "-" in part for part in host.split(".")):
            raise ConfigError(f"{key}: {host!r} is not a host name or IP address") from None
    return HostPort(host, int(port_text))


def environment_variable(section: str, key: str) -> str:
    """The variable that overrides `[section] key`: AIGIS_SERVER_LISTEN for [server] listen."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _from_environment(text: str, kinds: tuple[type, ...], variable: str) -> Any:
    """An environment value as the key's TOML type: numbers, true/false, comma-separated arrays."""
    if str in kinds:
        return text
    if bool in kinds:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{variable}: expected true or false, got {text!r}")
    if list in kinds:
        return [item.strip() for item in text.split(",") if item.strip()]
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    expected = " or ".join(TOML_TYPE_NAMES.get(k, k.__name__) for k in kinds)
    raise ConfigError(f"{variable}: expected {expected}, got {text!r}")


class _Section:
    """Typed reads from one TOML table (and its AIGIS_<SECTION>_<KEY> variables) that remember
    which keys were used."""

    def __init__(
        self, table: Mapping[str, Any], prefix: str, base: Path, environ: Mapping[str, str] | None = None,
        seen: set[str] | None = None,
    ) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix}: expected a table")
        self.table, self.prefix, self.base, self.used = table, prefix, base, set[str]()
        self.seen = seen  # every key read, dotted with its section: `accepted_keys()` lists them
        self.environ = environ or {}
        self.from_env: set[str] = set()  # keys whose value came from the environment

    def key(self, name: str) -> str:
        if name in self.from_env:
            return environment_variable(self.prefix, name)
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if self.seen is not None:
            self.seen.add(f"{self.prefix}.{name}" if self.prefix else name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        variable = environment_variable(self.prefix, name) if self.prefix else ""
        if variable in self.environ:
            if dict in kinds or name == "issuers":
                raise ConfigError(f"{variable}: [{self.prefix}] {name} can only be set in the file")
            self.from_env.add(name)
            return _from_environment(self.environ[variable], kinds, variable)
        if name not in self.table:
            return default
        value = self.table[name]
        # TOML booleans are Python ints; `true` is not a valid port or thread count.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(TOML_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise ConfigError(f"{self.key(name)}: expected {expected}, got {value!r}")
        return value

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self.get(name, str, None)
        if value is None:
            return default
        if not value:
            raise ConfigError(f"{self.key(name)}: must not be empty")
        if Path(value).is_absolute():
            return Path(value)
        # A relative path from the environment is relative to the working directory, like a flag.
        base = Path.cwd() if name in self.from_env else self.base
        return (base / value).resolve()

    def positive(self, name: str, default: float, kind: type | tuple[type, ...] = (int, float)) -> Any:
        value = self.get(name, kind, default)
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be greater than 0, got {value!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(f"{self.key(name)}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")
        prefix = environment_variable(self.prefix, "") if self.prefix else ""
        stray = sorted(v for v in self.environ if prefix and v.startswith(prefix) and v[len(prefix):].lower()
                       not in self.used)
        if stray:
            raise ConfigError(f"{stray[0]}: unknown setting (no [{self.prefix}] {stray[0][len(prefix):].lower()})")


def config_from_mapping(
    data: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None, *, seen: set[str] | None = None
) -> Config:
    """Validate a parsed TOML document; paths in it are relative to `base`. `environ`'s
    AIGIS_<SECTION>_<KEY> variables override the document's keys. `seen` collects every key the
    loader reads (present or not), for `accepted_keys()`."""
    default = Config()
    env = {k: v for k, v in (environ or {}).items() if k.startswith(ENV_PREFIX)}
    top = _Section(data, "", base, seen=seen)

    def section(name: str) -> _Section:
        return _Section(top.get(name, dict, {}), name, base, env, seen)

    server, auth, issuer, audit = section("server"), section("auth"), section("issuer"), section("audit")
    limits_table, metrics, files_table = section("limits"), section("metrics"), section("files")
    probes, log_table, tracing = section("probes"), section("log"), section("tracing")
    top.finish()
    probes_listen = probes.get("listen", str, None)
    metrics_listen = metrics.get("listen", str, None)
    metrics_enabled = metrics.get("enabled", bool, True)
    limits = _limits(limits_table)

    listen = server.get("listen", str, None)
    algorithms = auth.get("algorithms", list, list(default.algorithms))
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"auth.algorithms[{i}]: {alg!r} is not one of {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
    if not algorithms:
        raise ConfigError("auth.algorithms: must name at least one algorithm")
    leeway = auth.get("leeway_seconds", (int, float), default.leeway.total_seconds())
    if not 0 <= leeway <= 300:
        raise ConfigError(f"auth.leeway_seconds: must be between 0 and 300, got {leeway!r}")
    externals = tuple(
        _external_issuer(entry, f"auth.issuers[{i}]", base, seen)
        for i, entry in enumerate(auth.get("issuers", list, []))
    )
    issuer_listen = issuer.get("listen", str, None)
    issuer_url = issuer.get("url", str, "")
    if issuer_url and not issuer_url.startswith("https://"):
        raise ConfigError(f"issuer.url: must be an https:// URL, got {issuer_url!r}")
    issuer_settings = IssuerSettings(
        enabled=issuer.get("enabled", bool, True),
        listen=parse_host_port(issuer_listen, issuer.key("listen")) if issuer_listen else IssuerSettings.listen,
        url=issuer_url,
        audience=issuer.get("audience", str, "aigis") or _empty("issuer.audience"),
        token_ttl=_token_ttl(issuer.positive("token_ttl_seconds", int(DEFAULT_TOKEN_TTL.total_seconds()), int)),
        max_connections=issuer.positive("max_connections", IssuerSettings.max_connections, int),
        max_connections_per_peer=issuer.positive(
            "max_connections_per_peer", IssuerSettings.max_connections_per_peer, int
        ),
        request_timeout_seconds=issuer.positive("request_timeout_seconds", IssuerSettings.request_timeout_seconds),
        secret_check_threads=issuer.positive("secret_check_threads", IssuerSettings.secret_check_threads, int),
    )
    if issuer_settings.max_connections_per_peer > issuer_settings.max_connections:
        raise ConfigError("issuer.max_connections_per_peer: must not exceed issuer.max_connections")
    if issuer_settings.secret_check_threads > 16:
        raise ConfigError(f"issuer.secret_check_threads: at most 16, got {issuer_settings.secret_check_threads}")
    config = Config(
        listen=parse_host_port(listen, server.key("listen")) if listen else default.listen,
        certs=server.path("certs", default.certs) or default.certs,
        models=server.path("models", default.models) or default.models,
        policy=auth.path("policy", default.policy) or default.policy,
        shadow_policy=auth.path("shadow_policy", None),
        audit_log=audit.path("path", default.audit_log) or default.audit_log,
        audit_hmac_key_file=audit.path("hmac_key_file", None),
        audit_max_bytes=audit.positive("max_bytes", default.audit_max_bytes, int),
        audit_queue_size=audit.positive("queue_size", default.audit_queue_size, int),
        audit_durability=Durability(
            audit.choice("durability", tuple(d.value for d in Durability), default.audit_durability.value)
        ),
        max_message_bytes=server.positive("max_message_bytes", default.max_message_bytes, int),
        grace_seconds=server.positive("grace_seconds", default.grace_seconds),
        inference_threads=server.positive("inference_threads", default.inference_threads, int),
        workers=server.positive("workers", default.workers, int),
        worker_restart_limit=server.positive("worker_restart_limit", default.worker_restart_limit, int),
        worker_restart_window_seconds=server.positive(
            "worker_restart_window_seconds", default.worker_restart_window_seconds
        ),
        leeway=timedelta(seconds=leeway),
        algorithms=tuple(algorithms),
        issuer=issuer_settings,
        limits=limits,
        metrics_listen=(
            parse_host_port(metrics_listen, metrics.key("listen")) if metrics_listen else default.metrics_listen
        )
        if metrics_enabled
        else None,
        trust_domain=auth.get("trust_domain", str, ""),
        require_bound_tokens=auth.get("require_bound_tokens", bool, False),
        stale_crl=auth.choice("stale_crl", STALE_CRL_MODES, default.stale_crl),
        external_issuers=externals,
        files=FileLocations(
            **{name: files_table.path(name, None) for name in FileLocations.__dataclass_fields__}
        ),
        log_format=log_table.choice("format", LOG_FORMATS, default.log_format),
        audit_output=audit.choice("output", AUDIT_OUTPUTS, default.audit_output),
        probes_listen=parse_host_port(probes_listen, probes.key("listen")) if probes_listen else None,
        drain_seconds=_drain(server),
        jwks_cache_seconds=auth.positive("jwks_cache_seconds", default.jwks_cache_seconds),
        jwks_min_refetch_seconds=auth.positive("jwks_min_refetch_seconds", default.jwks_min_refetch_seconds),
        audit_format=AuditFormat(audit.choice("format", tuple(f.value for f in AuditFormat), default.audit_format)),
        tracing_enabled=tracing.get("enabled", bool, default.tracing_enabled),
        tracing_service_name=tracing.get("service_name", str, default.tracing_service_name)
        or _empty("tracing.service_name"),
    )
    for table in (server, auth, issuer, audit, limits_table, metrics, files_table, probes, log_table, tracing):
        table.finish()
    return config


def _drain(server: _Section) -> float:
    value = server.get("drain_seconds", (int, float), 0.0)
    if not 0 <= value <= 300:
        raise ConfigError(f"{server.key('drain_seconds')}: must be between 0 and 300, got {value!r}")
    return float(value)


def _limits(section: _Section) -> Limits:
    d = Limits()
    rate = section.get("rate_per_second", (int, float), d.rate_per_second)
    if rate < 0:
        raise ConfigError(f"limits.rate_per_second: must be 0 (off) or more, got {rate!r}")
    denial_rate = section.get("denial_rate_per_second", (int, float), d.denial_rate_per_second)
    if denial_rate < 0:
        raise ConfigError(f"limits.denial_rate_per_second: must be 0 (off) or more, got {denial_rate!r}")
    hold = section.get("denial_hold_seconds", (int, float), d.denial_hold_seconds)
    if not 0 <= hold <= 30:
        raise ConfigError(f"limits.denial_hold_seconds: must be between 0 (off) and 30, got {hold!r}")
    return Limits(
        rate_per_second=float(rate),
        rate_burst=section.positive("rate_burst", d.rate_burst, int),
        denial_rate_per_second=float(denial_rate),
        denial_burst=section.positive("denial_burst", d.denial_burst, int),
        denial_hold_seconds=float(hold),
        max_held_denials=section.positive("max_held_denials", d.max_held_denials, int),
        max_metadata_bytes=section.positive("max_metadata_bytes", d.max_metadata_bytes, int),
        max_concurrent_streams=section.positive("max_concurrent_streams", d.max_concurrent_streams, int),
        max_stream_messages=section.positive("max_stream_messages", d.max_stream_messages, int),
        max_streams_per_principal=section.positive("max_streams_per_principal", d.max_streams_per_principal, int),
        max_connection_age_seconds=section.positive("max_connection_age_seconds", d.max_connection_age_seconds),
        max_connection_age_grace_seconds=section.positive(
            "max_connection_age_grace_seconds", d.max_connection_age_grace_seconds
        ),
        max_connection_idle_seconds=section.positive("max_connection_idle_seconds", d.max_connection_idle_seconds),
        min_ping_interval_seconds=section.positive("min_ping_interval_seconds", d.min_ping_interval_seconds),
        max_ping_strikes=section.positive("max_ping_strikes", d.max_ping_strikes, int),
    )


def _token_ttl(seconds: int) -> timedelta:
    ttl = timedelta(seconds=seconds)
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise ConfigError(f"issuer.token_ttl_seconds: must be between {int(MIN_TOKEN_TTL.total_seconds())} and "
                          f"{int(MAX_TOKEN_TTL.total_seconds())}, got {seconds}")
    return ttl


def _empty(key: str) -> str:
    raise ConfigError(f"{key}: must not be empty")


def _external_issuer(entry: Any, prefix: str, base: Path, seen: set[str] | None = None) -> ExternalIssuer:
    section = _Section(entry, prefix, base, seen=seen)
    issuer = section.get("issuer", str, "") or _empty(f"{prefix}.issuer")
    audience = section.get("audience", str, "") or _empty(f"{prefix}.audience")
    jwks_url = section.get("jwks_url", str, None)
    jwks_file = section.path("jwks_file", None)
    ca_file = section.path("ca_file", None)
    token_types = section.get("token_types", list, ["at+jwt"])
    scope_claim = section.get("scope_claim", str, None)
    max_lifetime = section.get("max_token_lifetime_seconds", int, int(DEFAULT_MAX_LIFETIME.total_seconds()))
    section.finish()
    if not 1 <= max_lifetime <= 366 * 86400:
        raise ConfigError(f"{prefix}.max_token_lifetime_seconds: must be between 1 and {366 * 86400}")
    if jwks_url is not None and jwks_file is not None:
        raise ConfigError(f"{prefix}: set at most one of jwks_url and jwks_file (neither: discovery)")
    if jwks_url is not None and not jwks_url.startswith("https://"):
        raise ConfigError(f"{prefix}.jwks_url: must be an https:// URL, got {jwks_url!r}")
    if jwks_url is None and jwks_file is None and not issuer.startswith("https://"):
        raise ConfigError(f"{prefix}.issuer: discovery needs an https:// issuer URL, got {issuer!r}")
    if not token_types:
        raise ConfigError(f"{prefix}.token_types: must name at least one typ")
    for i, typ in enumerate(token_types):
        if not isinstance(typ, str) or not typ:
            raise ConfigError(f"{prefix}.token_types[{i}]: expected a non-empty string, got {typ!r}")
    if scope_claim == "":
        raise ConfigError(f"{prefix}.scope_claim: must not be empty")
    return ExternalIssuer(
        issuer, audience, jwks_url, jwks_file, ca_file, tuple(token_types), scope_claim, timedelta(seconds=max_lifetime)
    )


def load_config(path: Path | None, *, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """The configuration: defaults < the file `path` (if any) < environment < `overrides`.

    Environment: `AIGIS_<SECTION>_<KEY>` sets `[section] key` of aigis.toml, for every section
    (server, auth, issuer, audit, limits, metrics, files, probes, log) and every key except the
    `[[auth.issuers]]` tables; e.g. AIGIS_SERVER_LISTEN=0.0.0.0:50051, AIGIS_FILES_TLS_SECRET=/tls,
    AIGIS_AUDIT_OUTPUT=stdout. Values are spelled as on a command line: numbers, true/false,
    arrays comma-separated (AIGIS_AUTH_ALGORITHMS=ES256,RS256); relative paths are relative to
    the working directory. An AIGIS_<SECTION>_* variable naming no key stops start-up, like an
    unknown key in the file; other AIGIS_* variables (AIGIS_CONFIG) are not settings.
    `environ` defaults to os.environ.

    Overrides (command-line flags) use Config field names; None values are ignored. `listen` and
    `issuer_listen` take HOST:PORT strings.
    """
    environ = os.environ if environ is None else environ
    data: Mapping[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        base = path.resolve().parent
    config = config_from_mapping(data, base, environ)
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name == "listen":
            changes["listen"] = parse_host_port(value, "--listen")
        elif name == "metrics_listen":
            changes["metrics_listen"] = None if value == "off" else parse_host_port(value, "--metrics-listen")
        elif name == "issuer_listen":
            changes["issuer"] = replace(config.issuer, listen=parse_host_port(value, "--issuer-listen"))
        elif name == "workers":
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--workers: must be 1 or more, got {value!r}")
            changes["workers"] = value
        elif name in {"certs", "models", "policy", "audit_log"}:
            changes[name] = Path(value)
        else:
            raise ConfigError(f"unknown override {name!r}")
    return replace(config, **changes)


CONFIG_FILE_NAME = "aigis.toml"
CONFIG_VARIABLE = "AIGIS_CONFIG"


def find_config_file(
    explicit: Path | None, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """Which file configures this run: `--config FILE`, else $AIGIS_CONFIG, else ./aigis.toml when
    it exists, else none (the defaults). A named file that is missing is an error at load time."""
    if explicit is not None:
        return explicit
    named = (os.environ if environ is None else environ).get(CONFIG_VARIABLE)
    if named:
        return Path(named)
    candidate = (cwd or Path.cwd()) / CONFIG_FILE_NAME
    return candidate if candidate.is_file() else None


def accepted_keys() -> frozenset[str]:
    """Every key the loader accepts, dotted (`auth.issuers.jwks_url` for array-of-table entries).

    Found by running the loader itself, so a key added to it is listed without another table to
    keep in step (tests/test_config_docs.py checks aigis.toml documents each one).
    """
    seen: set[str] = set()
    example = {"issuer": "https://idp.example", "audience": "aigis"}
    config_from_mapping({"auth": {"issuers": [example]}}, Path("."), {}, seen=seen)
    keys = {key.replace("[0]", "") for key in seen}
    tables = {key.rsplit(".", 1)[0] for key in keys if "." in key} | {"auth.issuers"}
    return frozenset(keys - tables)


def _path_text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def config_to_mapping(config: Config) -> dict[str, Any]:
    """The TOML document that loads as `config` (`aigis config show`); unset optional keys left out."""
    metrics_listen = config.metrics_listen or Config().metrics_listen
    document: dict[str, dict[str, Any]] = {
        "server": {
            "listen": str(config.listen),
            "certs": str(config.certs),
            "models": str(config.models),
            "max_message_bytes": config.max_message_bytes,
            "grace_seconds": config.grace_seconds,
            "drain_seconds": config.drain_seconds,
            "inference_threads": config.inference_threads,
            "workers": config.workers,
            "worker_restart_limit": config.worker_restart_limit,
            "worker_restart_window_seconds": config.worker_restart_window_seconds,
        },
        "auth": {
            "policy": str(config.policy),
            "shadow_policy": _path_text(config.shadow_policy),
            "algorithms": list(config.algorithms),
            "leeway_seconds": config.leeway.total_seconds(),
            "jwks_cache_seconds": config.jwks_cache_seconds,
            "jwks_min_refetch_seconds": config.jwks_min_refetch_seconds,
            "trust_domain": config.trust_domain,
            "require_bound_tokens": config.require_bound_tokens,
            "stale_crl": config.stale_crl,
        },
        "issuer": {
            "enabled": config.issuer.enabled,
            "listen": str(config.issuer.listen),
            "url": config.issuer.url,
            "audience": config.issuer.audience,
            "token_ttl_seconds": int(config.issuer.token_ttl.total_seconds()),
            "max_connections": config.issuer.max_connections,
            "max_connections_per_peer": config.issuer.max_connections_per_peer,
            "request_timeout_seconds": config.issuer.request_timeout_seconds,
            "secret_check_threads": config.issuer.secret_check_threads,
        },
        "audit": {
            "path": str(config.audit_log),
            "output": config.audit_output,
            "format": config.audit_format.value,
            "hmac_key_file": _path_text(config.audit_hmac_key_file),
            "max_bytes": config.audit_max_bytes,
            "queue_size": config.audit_queue_size,
            "durability": config.audit_durability,
        },
        "limits": {name: getattr(config.limits, name) for name in Limits.__dataclass_fields__},
        "metrics": {"enabled": config.metrics_listen is not None, "listen": str(metrics_listen)},
        "probes": {"listen": None if config.probes_listen is None else str(config.probes_listen)},
        "log": {"format": config.log_format},
        "tracing": {"enabled": config.tracing_enabled, "service_name": config.tracing_service_name},
        "files": {name: _path_text(getattr(config.files, name)) for name in FileLocations.__dataclass_fields__},
    }
    issuers = [
        {
            "issuer": e.issuer,
            "audience": e.audience,
            "jwks_url": e.jwks_url,
            "jwks_file": _path_text(e.jwks_file),
            "ca_file": _path_text(e.ca_file),
            "token_types": list(e.token_types),
            "scope_claim": e.scope_claim,
            "max_token_lifetime_seconds": int(e.max_lifetime.total_seconds()),
        }
        for e in config.external_issuers
    ]
    if issuers:
        document["auth"]["issuers"] = [{k: v for k, v in i.items() if v is not None} for i in issuers]
    return {name: {k: v for k, v in table.items() if v is not None} for name, table in document.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value))


def to_toml(document: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text for `config_to_mapping`'s shape: tables of scalars and arrays, plus arrays of tables."""
    lines: list[str] = []
    for name, table in document.items():
        lines.append(f"[{name}]")
        nested = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], Mapping)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in nested]
        for key, entries in nested.items():
            for entry in entries:
                lines += ["", f"[[{name}.{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in entry.items())]
        lines.append("")
    return "\n".join(lines)
