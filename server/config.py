"""Server configuration: one TOML file (`aigis.toml`) into one frozen, validated object.

Every value has a safe default, so no file is needed for the embedded setup. Unknown keys and
invalid values stop start-up with a message naming the key (a typo must not silently fall back
to a default). Relative paths in the file are relative to the file; command-line overrides are
relative to the working directory.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODELS = PACKAGE_DIR / "models"
BUNDLED_POLICY = PACKAGE_DIR / "policy.json"
ALLOWED_ALGORITHMS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA")


TOML_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                   list: "an array", dict: "a table"}


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


@dataclass(frozen=True)
class IssuerSettings:
    """The embedded OAuth2 client-credentials issuer started beside the gRPC server."""

    enabled: bool = True
    listen: HostPort = HostPort("127.0.0.1", 8443)
    url: str = ""  # the `iss` value; empty means https://localhost:<port>
    audience: str = "aigis"
    token_ttl: timedelta = timedelta(minutes=5)

    def issuer_url(self, port: int | None = None) -> str:
        return self.url or f"https://localhost:{port if port is not None else self.listen.port}"


@dataclass(frozen=True)
class Limits:
    """Explicit resource limits; every one is enforced and tested (README "Limits")."""

    rate_per_second: float = 0.0  # per-principal token bucket refill; 0 turns rate limiting off
    rate_burst: int = 100
    max_metadata_bytes: int = 16 * 1024  # request headers, tokens included (gRPC's own hard limit)
    max_concurrent_streams: int = 100  # per connection
    max_stream_messages: int = 10_000  # per client stream (Sum, RunningSum, ClassifyStream, ...)
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
    audit_log: Path = Path("aigis-audit.jsonl")
    # [audit]: the chain's HMAC key file, kept apart from the log (None: unkeyed SHA-256 chain);
    # the size at which a file is rotated; records the writer may fall behind by before it
    # counts them in an overflow record; fsync after each batch. Defaults match auth.audit.
    audit_hmac_key_file: Path | None = None
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_queue_size: int = 32_768
    audit_fsync: bool = True
    max_message_bytes: int = 8 * 1024 * 1024  # room for a multi-megapixel encoded image
    grace_seconds: float = 5.0
    inference_threads: int = 2
    leeway: timedelta = timedelta(seconds=30)
    algorithms: tuple[str, ...] = ("ES256", "RS256", "EdDSA")
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
    # Server processes sharing the port (SO_REUSEPORT); set by `aigis serve --workers N`.
    workers: int = 1
    # Which worker this process is (None when not started by the supervisor): names its audit file.
    worker_id: int | None = None
    # Trusted external issuers. When empty, tokens from the embedded issuer are trusted.
    external_issuers: tuple[ExternalIssuer, ...] = ()


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


class _Section:
    """Typed reads from one TOML table that remember which keys were used."""

    def __init__(self, table: Mapping[str, Any], prefix: str, base: Path) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix}: expected a table")
        self.table, self.prefix, self.base, self.used = table, prefix, base, set[str]()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
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
        return (self.base / value).resolve() if not Path(value).is_absolute() else Path(value)

    def positive(self, name: str, default: float, kind: type | tuple[type, ...] = (int, float)) -> Any:
        value = self.get(name, kind, default)
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be greater than 0, got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def config_from_mapping(data: Mapping[str, Any], base: Path) -> Config:
    """Validate a parsed TOML document; paths in it are relative to `base`."""
    default = Config()
    top = _Section(data, "", base)
    server = _Section(top.get("server", dict, {}), "server", base)
    auth = _Section(top.get("auth", dict, {}), "auth", base)
    issuer = _Section(top.get("issuer", dict, {}), "issuer", base)
    audit = _Section(top.get("audit", dict, {}), "audit", base)
    limits_table = _Section(top.get("limits", dict, {}), "limits", base)
    metrics = _Section(top.get("metrics", dict, {}), "metrics", base)
    top.finish()
    metrics_listen = metrics.get("listen", str, None)
    metrics_enabled = metrics.get("enabled", bool, True)
    limits = _limits(limits_table)

    listen = server.get("listen", str, None)
    algorithms = auth.get("algorithms", list, list(default.algorithms))
    for i, alg in enumerate(algorithms):
        if alg not in ALLOWED_ALGORITHMS:
            raise ConfigError(f"auth.algorithms[{i}]: {alg!r} is not one of {', '.join(ALLOWED_ALGORITHMS)}")
    if not algorithms:
        raise ConfigError("auth.algorithms: must name at least one algorithm")
    leeway = auth.get("leeway_seconds", (int, float), default.leeway.total_seconds())
    if not 0 <= leeway <= 300:
        raise ConfigError(f"auth.leeway_seconds: must be between 0 and 300, got {leeway!r}")
    externals = tuple(
        _external_issuer(entry, f"auth.issuers[{i}]", base)
        for i, entry in enumerate(auth.get("issuers", list, []))
    )
    issuer_listen = issuer.get("listen", str, None)
    issuer_url = issuer.get("url", str, "")
    if issuer_url and not issuer_url.startswith("https://"):
        raise ConfigError(f"issuer.url: must be an https:// URL, got {issuer_url!r}")
    issuer_settings = IssuerSettings(
        enabled=issuer.get("enabled", bool, True),
        listen=parse_host_port(issuer_listen, "issuer.listen") if issuer_listen else IssuerSettings.listen,
        url=issuer_url,
        audience=issuer.get("audience", str, "aigis") or _empty("issuer.audience"),
        token_ttl=timedelta(seconds=issuer.positive("token_ttl_seconds", 300, int)),
    )
    config = Config(
        listen=parse_host_port(listen, "server.listen") if listen else default.listen,
        certs=server.path("certs", default.certs) or default.certs,
        models=server.path("models", default.models) or default.models,
        policy=auth.path("policy", default.policy) or default.policy,
        audit_log=audit.path("path", default.audit_log) or default.audit_log,
        audit_hmac_key_file=audit.path("hmac_key_file", None),
        audit_max_bytes=audit.positive("max_bytes", default.audit_max_bytes, int),
        audit_queue_size=audit.positive("queue_size", default.audit_queue_size, int),
        audit_fsync=audit.get("fsync", bool, default.audit_fsync),
        max_message_bytes=server.positive("max_message_bytes", default.max_message_bytes, int),
        grace_seconds=server.positive("grace_seconds", default.grace_seconds),
        inference_threads=server.positive("inference_threads", default.inference_threads, int),
        workers=server.positive("workers", default.workers, int),
        leeway=timedelta(seconds=leeway),
        algorithms=tuple(algorithms),
        issuer=issuer_settings,
        limits=limits,
        metrics_listen=(parse_host_port(metrics_listen, "metrics.listen") if metrics_listen else default.metrics_listen)
        if metrics_enabled
        else None,
        trust_domain=auth.get("trust_domain", str, ""),
        require_bound_tokens=auth.get("require_bound_tokens", bool, False),
        external_issuers=externals,
    )
    for section in (server, auth, issuer, audit, limits_table, metrics):
        section.finish()
    return config


def _limits(section: _Section) -> Limits:
    d = Limits()
    rate = section.get("rate_per_second", (int, float), d.rate_per_second)
    if rate < 0:
        raise ConfigError(f"limits.rate_per_second: must be 0 (off) or more, got {rate!r}")
    return Limits(
        rate_per_second=float(rate),
        rate_burst=section.positive("rate_burst", d.rate_burst, int),
        max_metadata_bytes=section.positive("max_metadata_bytes", d.max_metadata_bytes, int),
        max_concurrent_streams=section.positive("max_concurrent_streams", d.max_concurrent_streams, int),
        max_stream_messages=section.positive("max_stream_messages", d.max_stream_messages, int),
        max_connection_age_seconds=section.positive("max_connection_age_seconds", d.max_connection_age_seconds),
        max_connection_age_grace_seconds=section.positive(
            "max_connection_age_grace_seconds", d.max_connection_age_grace_seconds
        ),
        max_connection_idle_seconds=section.positive("max_connection_idle_seconds", d.max_connection_idle_seconds),
        min_ping_interval_seconds=section.positive("min_ping_interval_seconds", d.min_ping_interval_seconds),
        max_ping_strikes=section.positive("max_ping_strikes", d.max_ping_strikes, int),
    )


def _empty(key: str) -> str:
    raise ConfigError(f"{key}: must not be empty")


def _external_issuer(entry: Any, prefix: str, base: Path) -> ExternalIssuer:
    section = _Section(entry, prefix, base)
    issuer = section.get("issuer", str, "") or _empty(f"{prefix}.issuer")
    audience = section.get("audience", str, "") or _empty(f"{prefix}.audience")
    jwks_url = section.get("jwks_url", str, None)
    jwks_file = section.path("jwks_file", None)
    ca_file = section.path("ca_file", None)
    token_types = section.get("token_types", list, ["at+jwt"])
    scope_claim = section.get("scope_claim", str, None)
    section.finish()
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
    return ExternalIssuer(issuer, audience, jwks_url, jwks_file, ca_file, tuple(token_types), scope_claim)


def load_config(path: Path | None, **overrides: Any) -> Config:
    """Load `path` (or the defaults when None), then apply command-line overrides.

    Overrides use Config field names; None values are ignored. `listen` and `issuer_listen`
    take HOST:PORT strings.
    """
    if path is None:
        config = Config()
    else:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        config = config_from_mapping(data, path.resolve().parent)
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
