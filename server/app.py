"""Assembles and runs the aigis server: one function builds it, one runs it until a signal.

TLS with a required client certificate is the only way in; there is no plaintext port. The
embedded token issuer starts first (its bound port names the `iss` the server trusts), then the
gRPC server with the security interceptor in front of every servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from cryptography import x509
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer

from aigis.auth.audit import AuditError, AuditLog
from aigis.auth.bounded_http import HttpLimits
from aigis.auth.clients import RegistryError, load_registry
from aigis.auth.denial_hold import DenialHold
from aigis.auth.enforcer import Enforcer
from aigis.auth.guard import Guard, RevokedClients
from aigis.auth.identity import ClientCertificatePolicy, IdentityCache, RevocationList, SharedRevocations
from aigis.auth.issuer import IssuerConfig, IssuerError, IssuerEvents, IssuerServer
from aigis.auth.pki import DEFAULT_TRUST_DOMAIN, PkiPaths
from aigis.auth.policy import ModelRef, Policy
from aigis.auth.ratelimit import RateLimit, RateLimiter
from aigis.auth.streams import StreamSlots
from aigis.auth.tls import TlsCredentialStore, TlsError, TlsMaterial
from aigis.auth.tokens import TokenVerifier, TrustedIssuer
from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.inference import grpc_service_pb2, grpc_service_pb2_grpc
from aigis.server import grpc_noise, tracing
from aigis.server.calculator import CalculatorServicer
from aigis.server.classifier import ImageClassificationServicer
from aigis.server.config import Config
from aigis.server.crl_freshness import CrlFreshness
from aigis.server.health import HealthServicer
from aigis.server.images import ImageLimits
from aigis.server.inference import InferenceServicer
from aigis.server.lifecycle import wait_for_shutdown
from aigis.server.metrics import Metrics
from aigis.server.probes import ProbeServer
from aigis.server.repository import ModelRepository
from aigis.server.secured import ModelOf, SecuredRegistrar, SecurityInterceptor
from aigis.server.tracing import RpcTracer

log = logging.getLogger("aigis.server")

SERVICE_NAMES = (
    calculator_pb2.DESCRIPTOR.services_by_name["Calculator"].full_name,
    classifier_pb2.DESCRIPTOR.services_by_name["ImageClassificationService"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
RELOAD_INTERVAL_SECONDS = 2.0


CLASSIFY_IMAGE = "/aigis.classifier.v1.ImageClassificationService/ClassifyImage"


def model_readers(repository: ModelRepository, default_classifier: str) -> dict[str, ModelOf]:
    """Which model each model-naming method's request names, for per-model policy rules. Resolved
    the way the servicers resolve it (empty name: default model; empty version: newest)."""
    classify = "/aigis.classifier.v1.ImageClassificationService/"
    infer = "/inference.GRPCInferenceService/"

    def image_model(request: Any) -> ModelRef:
        return repository.resolve(request.model or default_classifier)

    def infer_model(request: Any) -> ModelRef:
        return repository.resolve(request.model_name, request.model_version)

    def named_model(request: Any) -> ModelRef:
        return repository.resolve(request.name, request.version)

    return {
        f"{classify}ClassifyImage": image_model,
        f"{classify}ClassifyStream": image_model,
        f"{infer}ModelInfer": infer_model,
        f"{infer}ModelStreamInfer": infer_model,
        f"{infer}ModelMetadata": named_model,
        f"{infer}ModelReady": named_model,
    }


class StartupError(RuntimeError):
    """The server cannot start: a missing or invalid file, named in the message."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{what} {path}: {exc.strerror} (run `aigis certs init` first?)") from None


def server_credentials(pki: PkiPaths) -> TlsCredentialStore:
    """mTLS only: the handshake itself refuses clients without a certificate from our CA bundle.

    Rotatable without a restart: FileWatchers stage changed files for new connections (auth/tls.py).
    Blocking file reads.
    """
    try:
        return TlsCredentialStore(pki)
    except TlsError as exc:
        raise StartupError(str(exc)) from None


def trusted_issuers(config: Config, embedded_url: str | None) -> list[TrustedIssuer]:
    issuers = [
        TrustedIssuer(
            e.issuer,
            e.audience,
            jwks_file=e.jwks_file,
            jwks_url=e.jwks_url,
            ca_file=e.ca_file,
            token_types=e.token_types,
            scope_claim=e.scope_claim,
            max_lifetime=e.max_lifetime,
        )
        for e in config.external_issuers
    ]
    if embedded_url is not None or not issuers:
        url = embedded_url or config.issuer.issuer_url()
        issuers.append(TrustedIssuer(url, config.issuer.audience, jwks_file=config.pki.jwks))
    return issuers


def revoked_clients(pki: PkiPaths, issuers: list[TrustedIssuer]) -> RevokedClients:
    """Revoked client ids of the registry, for tokens of the issuer whose key set it publishes.

    No registry (a deployment trusting only external issuers): nothing to refuse. Blocking reads.
    """
    local = next((i.issuer for i in issuers if i.jwks_file == pki.jwks), None)
    if local is None or not pki.clients_registry.exists():
        return RevokedClients()
    registry = load_registry(pki.clients_registry)
    return RevokedClients(local, frozenset(c.name for c in registry.clients if c.revoked))


def grpc_options(config: Config) -> list[tuple[str, int]]:
    """Every transport limit stated explicitly (gRPC's defaults are not a security posture)."""
    limits = config.limits

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # The soft limit rejects at random between soft and hard; both equal makes it exact.
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_connection_age_ms", ms(limits.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(limits.max_connection_age_grace_seconds)),
        ("grpc.max_connection_idle_ms", ms(limits.max_connection_idle_seconds)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(limits.min_ping_interval_seconds)),
        ("grpc.http2.max_ping_strikes", limits.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", 0),
        # Only worker processes share a port; a lone server must not silently share one.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
    ]


def client_certificate_policy(config: Config, pki: PkiPaths) -> ClientCertificatePolicy:
    """Trust anchors from the CA bundle; trust domain from config, else from the client registry."""
    anchors = tuple(x509.load_pem_x509_certificates(_read(pki.ca_cert, "CA certificate")))
    trust_domain = config.trust_domain
    if not trust_domain:
        # No registry (a server whose clients are registered elsewhere): the default domain.
        registry = pki.clients_registry
        trust_domain = load_registry(registry).trust_domain if registry.exists() else DEFAULT_TRUST_DOMAIN
    return ClientCertificatePolicy(anchors, trust_domain)


T = TypeVar("T")


class FileWatcher(Generic[T]):
    """Reloads a file when it changes; a broken new file is refused, the last good kept.

    "Changes" means its (device, inode, size, mtime) changed, following symlinks: a Kubernetes
    Secret or ConfigMap volume updates by atomically re-pointing the `..data` symlink at a new
    directory, so a mounted `tls.crt -> ..data/tls.crt` becomes another inode, whatever its mtime.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[], T],
        apply: Callable[[T], None],
        refused: Callable[[Path], None] | None = None,
    ) -> None:
        self.path, self._load, self._apply, self._refused = path, load, apply, refused
        self._stamp = self._mtime()

    def _mtime(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    async def poll(self) -> None:
        stamp = await asyncio.to_thread(self._mtime)
        if stamp == self._stamp or stamp is None:
            return
        self._stamp = stamp
        try:
            value = await asyncio.to_thread(self._load)
        except Exception as exc:
            log.error("refusing changed %s, keeping the last good one: %s", self.path, exc)
            if self._refused is not None:
                self._refused(self.path)
            return
        self._apply(value)
        log.info("reloaded %s", self.path)


def issuer_library_config(config: Config, trust_domain: str) -> IssuerConfig:
    """The issuer library's settings from aigis.toml (embedded here, or alone: `aigis issuer`)."""
    settings = config.issuer
    timeout = settings.request_timeout_seconds
    return IssuerConfig(
        paths=config.pki,
        host=settings.listen.host,
        port=settings.listen.port,
        issuer_url=settings.url or None,
        audience=settings.audience,
        token_ttl=settings.token_ttl,
        trust_domain=trust_domain,
        http=HttpLimits(
            max_connections=settings.max_connections,
            max_connections_per_peer=settings.max_connections_per_peer,
            header_seconds=timeout,
            body_seconds=timeout,
            connection_seconds=max(15.0, 3 * timeout),
        ),
        secret_check_workers=settings.secret_check_threads,
    )


def issuer_events(metrics: Metrics) -> IssuerEvents:
    """The issuer's counters, as this server's metrics."""
    return IssuerEvents(
        reload_refused=lambda path: metrics.reload_failures.labels(path.name).inc(),
        auth_throttled=lambda key: metrics.issuer_auth_throttled.labels(key).inc(),
        auth_failed=metrics.issuer_auth_failures.inc,
        secret_checks_shed=metrics.issuer_secret_checks_shed.inc,
        connection_refused=lambda why: metrics.issuer_connections_refused.labels(why).inc(),
    )


@dataclass
class AigisServer:
    """A running aigis: the gRPC server, the embedded issuer, the audit writer."""

    config: Config
    server: aio.Server
    port: int
    issuer: IssuerServer | None
    audit: AuditLog
    executor: ThreadPoolExecutor
    health: HealthServicer
    watchers: list[FileWatcher]
    metrics: Metrics
    metrics_port: int | None = None
    methods: tuple[str, ...] = ()  # every method registered, all behind the security layer
    classifier: ImageClassificationServicer | None = None
    inference: InferenceServicer | None = None
    repository: ModelRepository | None = None
    _reload_task: asyncio.Task[None] | None = None
    crl: CrlFreshness | None = None  # the CRL's nextUpdate watched (and renewed where the CA key is)
    _crl_task: asyncio.Task[None] | None = None
    tls: TlsCredentialStore | None = None  # the served certificate and CA bundle, and reload counts
    models: ModelRepository | None = None
    guard: Guard | None = None  # the checks' current policy, CRL and token verifier (readiness)
    streams: StreamSlots | None = None  # streams open per principal (observable: tests wait on it)
    probes: ProbeServer | None = None
    probes_port: int | None = None
    draining: bool = False  # SIGTERM seen: /readyz fails, calls are still served

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_SECONDS)
            for watcher in self.watchers:
                await watcher.poll()

    async def reload_now(self) -> None:
        """Check watched files immediately (tests and SIGHUP)."""
        for watcher in self.watchers:
            await watcher.poll()

    async def readiness(self) -> dict[str, str | None]:
        """Each readiness check: None when it passes, else what fails (short, nothing secret)."""
        checks: dict[str, str | None] = {"draining": "shutting down" if self.draining else None}
        checks["models"] = None if self.models is not None and self.models.names else "no model loaded"
        now = datetime.now(UTC)
        if self.tls is None:
            checks["certificates"] = "not loaded"
        elif now >= self.tls.current.not_after:
            checks["certificates"] = "server certificate expired"
        else:
            checks["certificates"] = None
        guard = self.guard
        checks["policy"] = None if guard is not None and guard.policy is not None else "not loaded"
        checks["crl"] = None if guard is not None and guard.revocations is not None else "not loaded"
        if checks["crl"] is None and self.crl is not None and self.crl.stale and self.config.stale_crl == "unready":
            checks["crl"] = "stale: past its nextUpdate"
        missing = await guard.verifier.keys_unavailable() if guard is not None else ["all"]
        checks["token_keys"] = f"no keys for {', '.join(missing)}" if missing else None
        checks["audit"] = None if self.audit.running else "audit writer stopped"
        return checks

    async def drain(self) -> None:
        """Start draining: readiness and gRPC health say NOT_SERVING; calls are still served."""
        if self.draining:
            return
        self.draining = True
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining: not ready, still serving for %.1fs", self.config.drain_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: refuse new calls, let running ones finish within `grace`, then drain audit."""
        grace = self.config.grace_seconds if grace is None else grace
        self.draining = True
        await self.health.enter_graceful_shutdown()
        for task in (self._reload_task, self._crl_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.server.stop(grace)
        if self.classifier is not None:
            self.classifier.close()  # fail anything still queued for a batch, clearly
        if self.inference is not None:
            self.inference.close()
        if self.issuer is not None:
            await asyncio.to_thread(self.issuer.stop)
        await asyncio.to_thread(self.audit.close)
        self.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.metrics.stop)
        if self.probes is not None:  # last: /livez answers while the process still shuts down
            await self.probes.stop()


async def start_server(config: Config) -> AigisServer:
    """Build everything from `config` and start serving. Raises StartupError on bad input.

    Each part that starts (issuer, audit writer, metrics, thread pool, batchers, gRPC server) is
    pushed onto an exit stack as it starts, so a failure at any later step stops every part that had
    started: no thread or port outlives a failed start. On success the running server owns them.
    """
    async with contextlib.AsyncExitStack() as started:
        running = await _start(config, started)
        started.pop_all()
    return running


async def _start(config: Config, started: contextlib.AsyncExitStack) -> AigisServer:
    pki = config.pki
    tls = await asyncio.to_thread(server_credentials, pki)
    try:
        policy = await asyncio.to_thread(Policy.load, config.policy)
        shadow = await asyncio.to_thread(Policy.load, config.shadow_policy) if config.shadow_policy else None
        tracer = RpcTracer(tracing.setup_provider(config.tracing_service_name)) if config.tracing_enabled else None
        revocations = await asyncio.to_thread(RevocationList.load, pki.crl, pki.ca_cert)
        repository = await asyncio.to_thread(ModelRepository.load, config.models)
        cert_policy = await asyncio.to_thread(client_certificate_policy, config, pki)
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(str(exc)) from None

    metrics = Metrics()
    # One CRL reader: the server's watcher loads crl.pem; the embedded issuer reads what it loaded.
    shared_crl = SharedRevocations(revocations)
    issuer: IssuerServer | None = None
    if config.issuer.enabled:
        issuer = IssuerServer(
            issuer_library_config(config, cert_policy.trust_domain),
            events=issuer_events(metrics),
            revocations=shared_crl,
        )
        try:
            await asyncio.to_thread(issuer.start)
            started.callback(issuer.stop)
        except OSError as exc:
            raise StartupError(f"cannot listen for the token issuer on {config.issuer.listen}: "
                               f"{exc.strerror or exc}") from None
        except IssuerError as exc:
            raise StartupError(f"token issuer: {exc}") from None
    try:
        issuers = trusted_issuers(config, issuer.issuer_url if issuer is not None else None)
        # In a thread: key set files and TLS trust anchors are read here.
        verifier = await asyncio.to_thread(
            functools.partial(
                TokenVerifier,
                issuers,
                algorithms=config.algorithms,
                leeway=config.leeway,
                jwks_lifespan=timedelta(seconds=config.jwks_cache_seconds),
                jwks_cooldown=timedelta(seconds=config.jwks_min_refetch_seconds),
                on_jwks_fetch=metrics.jwks_fetch,
            )
        )
    except Exception as exc:
        raise StartupError(f"token verification keys: {exc}") from None
    try:
        revoked = await asyncio.to_thread(revoked_clients, pki, issuers)
    except RegistryError as exc:
        raise StartupError(str(exc)) from None

    limits = config.limits
    guard = Guard(
        verifier=verifier,
        policy=policy,
        shadow_policy=shadow,
        on_phase=tracing.phase_event if tracer is not None else None,
        revocations=revocations,
        identities=IdentityCache(cert_policy),
        rate_limiter=RateLimiter(RateLimit(limits.rate_per_second, limits.rate_burst))
        if limits.rate_per_second > 0
        else None,
        denial_budget=RateLimiter(RateLimit(limits.denial_rate_per_second, limits.denial_burst))
        if limits.denial_rate_per_second > 0
        else None,
        require_binding=config.require_bound_tokens,
        revoked_clients=revoked,
    )
    audit = AuditLog(
        config.audit_log, hmac_key_file=config.audit_hmac_key_file, worker_id=config.worker_id,
        max_bytes=config.audit_max_bytes, queue_size=config.audit_queue_size, durability=config.audit_durability,
        stdout=config.audit_output == "stdout", record_format=config.audit_format,
    )  # fmt: skip
    try:
        await asyncio.to_thread(audit.start)
    except (AuditError, OSError) as exc:
        raise StartupError(f"audit log: {exc}") from None
    started.callback(audit.close)
    # grpcio logs every non-UTF-8 metadata value with a traceback: remote input, dropped and counted.
    noise = grpc_noise.install()
    metrics.track_suppressed_log_lines(lambda: noise.suppressed)
    metrics.certificate_files({"server": pki.server_cert, "ca": pki.ca_cert})
    metrics.track_audit_queue(lambda: audit.pending)
    audit.on_drop = metrics.track_audit_log(audit.path.name, lambda: audit.anchor[0])
    metrics_port = None
    if config.metrics_listen is not None:
        try:
            metrics_port = metrics.serve(config.metrics_listen.host, config.metrics_listen.port)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.metrics_listen}: {exc.strerror}") from None
        started.callback(metrics.stop)
    server = aio.server(options=grpc_options(config))
    started.push_async_callback(server.stop, 0)
    # Every service registers through the registrar, which wraps each handler with the checks.
    stream_slots = StreamSlots(config.limits.max_streams_per_principal)
    hold = DenialHold(limits.denial_hold_seconds, limits.max_held_denials) if limits.denial_hold_seconds > 0 else None
    if hold is not None:
        metrics.track_denial_hold(lambda: hold.held, lambda: hold.overflow)
    enforcer = Enforcer(
        guard,
        audit,
        on_denial=metrics.denial_observer,
        on_shadow=metrics.shadow_observer,
        trace_id=tracing.current_trace_id if tracer is not None else None,
        streams=stream_slots,
        hold=hold,
    )
    classifiers = repository.classifiers()
    security = SecurityInterceptor(enforcer, max_stream_messages=limits.max_stream_messages, metrics=metrics,
                                   models=model_readers(repository, classifiers.default_name), tracer=tracer)
    registrar = SecuredRegistrar(server, security)
    executor = ThreadPoolExecutor(max_workers=config.inference_threads, thread_name_prefix="aigis-infer")
    started.callback(executor.shutdown, wait=False, cancel_futures=True)
    calculator_pb2_grpc.add_CalculatorServicer_to_server(CalculatorServicer(), registrar)
    # No image may be larger than the message that carries it.
    image_limits = ImageLimits(max_bytes=config.max_message_bytes)
    classifier = ImageClassificationServicer(classifiers, executor, image_limits)
    started.callback(classifier.close)
    # ListModels shows only the models this caller may classify with.
    classifier.may_use = functools.partial(enforcer.may_use, CLASSIFY_IMAGE)
    classifier.on_inference = metrics.inference
    for model_name, batcher in classifier.batchers.items():
        batcher.on_batch = metrics.batch_size.labels(model_name).observe
    classifier_pb2_grpc.add_ImageClassificationServiceServicer_to_server(classifier, registrar)
    inference = InferenceServicer(repository, executor)
    started.callback(inference.close)
    for (model_name, _version), tensor_batcher in inference.batchers.items():
        tensor_batcher.on_batch = metrics.batch_size.labels(model_name).observe
    inference.on_inference = metrics.inference
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, registrar)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    # enable_server_reflection() insists on a real aio.Server; register its aio servicer ourselves.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        AsyncReflectionServicer(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        ),
        registrar,
    )
    # Last: any path no service has still goes through the checks (denied and audited, or
    # UNIMPLEMENTED for a caller the policy allows), instead of grpc's unchecked UNIMPLEMENTED.
    registrar.add_unknown_method_handler()
    try:
        port = server.add_secure_port(str(config.listen), tls.credentials())
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {config.listen}: {exc}") from None
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def refused(path: Path) -> None:
        metrics.reload_failures.labels(path.name).inc()

    def apply_policy(value: object) -> None:
        guard.policy = value  # type: ignore[assignment]

    def apply_shadow(value: object) -> None:
        guard.shadow_policy = value  # type: ignore[assignment]

    def apply_revoked_clients(value: object) -> None:
        guard.revoked_clients = value  # type: ignore[assignment]

    def apply_crl(value: object) -> None:
        guard.revocations = shared_crl.current = value  # type: ignore[assignment]

    def load_tls() -> TlsMaterial:
        material = tls.read()
        metrics.certificate_files({"server": pki.server_cert, "ca": pki.ca_cert})
        return material

    def apply_tls(value: TlsMaterial) -> None:
        tls.stage(value)

    def load_ca() -> tuple[TlsMaterial, ClientCertificatePolicy]:
        return load_tls(), client_certificate_policy(config, pki)

    def apply_ca(value: tuple[TlsMaterial, ClientCertificatePolicy]) -> None:
        material, cert_policy = value
        tls.stage(material)
        guard.identities = IdentityCache(cert_policy)  # new anchors; no verdict kept from the old ones

    def apply_keys(_: object) -> None:
        # reload() swapped the keys in a thread; clearing again here, on the loop, also drops a token
        # that a verification racing with the swap cached under a key that is gone now.
        verifier.clear_cache()

    jwks_files = sorted({i.jwks_file for i in issuers if i.jwks_file is not None})
    watchers: list[FileWatcher[Any]] = [
        FileWatcher(config.policy, lambda: Policy.load(config.policy), apply_policy, refused),
        *(
            [FileWatcher(path, lambda: Policy.load(path), apply_shadow, refused)]
            if (path := config.shadow_policy) is not None
            else []
        ),
        FileWatcher(pki.crl, lambda: RevocationList.load(pki.crl, pki.ca_cert), apply_crl, refused),
        FileWatcher(pki.clients_registry, lambda: revoked_clients(pki, issuers), apply_revoked_clients, refused),
        # The CA bundle first: a rotation that changes it and the server certificate together then
        # updates the identity check in the same step as the handshake's trust anchors.
        FileWatcher(pki.ca_cert, load_ca, apply_ca, refused),
        FileWatcher(pki.server_cert, load_tls, apply_tls, refused),
        FileWatcher(pki.server_key, load_tls, apply_tls, refused),
        *(FileWatcher(path, verifier.reload, apply_keys, refused) for path in jwks_files),
    ]
    running = AigisServer(config, server, port, issuer, audit, executor, health, watchers, metrics, metrics_port)
    # From here on the running server stops every part, once.
    started.pop_all()
    started.push_async_callback(running.stop, 0)
    running.methods = tuple(registrar.methods)
    running.classifier = classifier
    running.inference = inference
    running.repository = repository
    running.tls = tls
    running.guard = guard
    running.streams = stream_slots
    running.models = repository
    running._reload_task = asyncio.create_task(running._reload_loop())
    # One process renews: a lone server, or worker 0 of `--workers N` (the others only report).
    running.crl = CrlFreshness(pki, metrics, may_renew=config.worker_id in (None, 0))
    await running.crl.check()
    running._crl_task = asyncio.create_task(running.crl.run())
    if config.probes_listen is not None:
        running.probes = ProbeServer(config.probes_listen, running.readiness)
        try:
            running.probes_port = await running.probes.start()
        except OSError as exc:
            running.probes = None
            raise StartupError(f"cannot serve probes on {config.probes_listen}: {exc.strerror}") from None
    log.info("aigis serving on %s (mTLS required)", config.listen.host + f":{port}")
    if issuer is not None:
        log.info("token issuer at %s", issuer.url)
    return running


async def serve(config: Config, *, ready: Callable[[AigisServer], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down without losing a call.

    First drain: readiness fails (the endpoints controller takes the pod out of its Services,
    clients re-resolve) while calls are still served for `drain_seconds`; a second signal ends the
    drain early. Then stop: new calls are refused, running ones get `grace_seconds`, then exit.
    """
    running = await start_server(config)
    if ready is not None:
        ready(running)
    try:
        await wait_for_shutdown(config.drain_seconds, running.drain)
    finally:
        log.info("shutting down (grace %.1fs)", config.grace_seconds)
        await running.stop()
