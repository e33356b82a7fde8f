"""Prometheus metrics (prometheus-client) on their own HTTP port.

Each server has its own CollectorRegistry, so several servers in one process (tests, benchmarks)
do not mix. The per-call series (requests, latency, denials, model inferences) are plain Python
ints and lists exported by collectors at scrape time: prometheus-client's Counter/Histogram take
a lock per increment and walk the buckets in Python (~1.8 µs per call here, 5 to 8 µs under load);
these cost ~0.5 µs. Everything else stays on prometheus-client's own metric classes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path

import prometheus_client.metrics
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from aigis.auth.decision import Decision

log = logging.getLogger("aigis.metrics")

# From 100 µs (a cached-token Add) to 10 s (a long stream).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _CallbackCounter(Collector):
    """A counter whose value lives elsewhere (read at scrape time)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self._name, self._documentation, self._value = name, documentation, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._value())


def _created_series() -> bool:
    """Whether prometheus-client's own metrics export `_created` samples (on unless
    PROMETHEUS_DISABLE_CREATED_SERIES / disable_created_metrics()); the plain series follow it."""
    return bool(prometheus_client.metrics._use_created)


class _PlainCounter(Collector):
    """A labelled counter kept as plain ints and exported at scrape time, like Counter's output.

    `inc` takes no lock: callers are one thread (the event loop) or serialise themselves. The
    scrape thread copies the dicts first — dict.copy() does not release the GIL, so a first
    increment of a new label set cannot resize a dict under its iteration; a count a few
    increments old is fine.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._values: dict[tuple[str, ...], int] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...]) -> None:
        try:
            self._values[labels] += 1
        except KeyError:
            self._created[labels] = time.time()  # first: a scrape that sees the value finds it
            self._values[labels] = 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = self._values.copy()
        created = self._created.copy()
        with_created = _created_series()
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in values.items():
            family.add_metric(labels, value, created=created[labels] if with_created else None)
        yield family


class _PlainHistogram(Collector):
    """A labelled histogram kept as plain lists, exported like Histogram's output (threads as in
    _PlainCounter). Per label set one list: the count in each bucket (not cumulative) and the sum
    last, so one slice copies buckets and sum from the same moment."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...]) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._bounds = (*map(float, buckets), math.inf)
        self._le = [floatToGoString(bound) for bound in self._bounds]
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self._series.get(labels)
        if counts is None:
            self._created[labels] = time.time()
            counts = self._series[labels] = [0] * len(self._bounds) + [0.0]
        # The first bound >= value: prometheus-client's `value <= bound`.
        counts[bisect_left(self._bounds, value)] += 1
        counts[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        series = self._series.copy()
        created = self._created.copy()
        with_created = _created_series()
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, live in series.items():
            counts = live[:]
            buckets = [(le, float(n)) for le, n in zip(self._le, accumulate(counts[:-1]), strict=True)]
            family.add_metric(labels, buckets, counts[-1])
            if with_created:
                family.samples.append(
                    Sample(f"{self._name}_created", dict(zip(self._labelnames, labels, strict=True)), created[labels])
                )
        yield family


class Metrics:
    """Everything aigis exports. Methods are cheap and safe to call from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = _PlainCounter("aigis_requests", "RPCs by method and final status code.", ("method", "code"))
        self._latency = _PlainHistogram(
            "aigis_request_duration_seconds",
            "Time from the interceptor's first check to the servicer's last response.",
            ("method",),
            LATENCY_BUCKETS,
        )
        self._denials = _PlainCounter("aigis_denials", "Denied RPCs by reason code.", ("reason",))
        for collector in (self._requests, self._latency, self._denials):
            self.registry.register(collector)
        self.batch_size = Histogram(
            "aigis_inference_batch_size", "Rows (images, tensor rows) per batch.", ["model"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._model_inferences = _PlainCounter(
            "aigis_model_inferences", "Inferences by model and version (ModelInfer, streams, ClassifyImage).",
            ("model", "version"),
        )
        self._model_latency = _PlainHistogram(
            "aigis_model_inference_duration_seconds", "Time in the model (queueing for a batch included).",
            ("model", "version"), LATENCY_BUCKETS,
        )
        self.registry.register(self._model_inferences)
        self.registry.register(self._model_latency)
        self._models_lock = threading.Lock()
        self.audit_queue = Gauge("aigis_audit_queue_depth", "Audit records not yet on disk.", registry=self.registry)
        self.audit_dropped = Counter(
            "aigis_audit_dropped", "Audited calls whose record was lost (a shared refusal record counts each "
            "refusal), by cause; each also counted in an audit_overflow record.",
            ["cause"], registry=self.registry,
        )
        for cause in ("queue_full", "write_error", "shutdown"):
            self.audit_dropped.labels(cause)
        self.audit_last_seq = Gauge(
            "aigis_audit_last_seq", "seq of the newest audit record on disk (an outside reference for "
            "`aigis audit verify --expect-seq`).", ["file"], registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "aigis_certificate_expiry_timestamp_seconds", "notAfter of the certificates in use (POSIX time).",
            ["certificate"], registry=self.registry,
        )
        self.reload_failures = Counter(
            "aigis_reload_failures", "Changed files refused on reload (last good kept).", ["file"],
            registry=self.registry,
        )
        self.issuer_connections_refused = Counter(
            "aigis_issuer_connections_refused", "Issuer connections closed at accept (over a cap).", ["reason"],
            registry=self.registry,
        )
        self.issuer_auth_failures = Counter(
            "aigis_issuer_auth_failures", "Failed client authentications at the token endpoint.", registry=self.registry
        )
        self.issuer_auth_throttled = Counter(
            "aigis_issuer_auth_throttled", "Token requests refused unchecked: too many failures by client id or peer.",
            ["key"], registry=self.registry,
        )
        self.issuer_secret_checks_shed = Counter(
            "aigis_issuer_secret_checks_shed", "Token requests refused (503): the secret-check queue was full.",
            registry=self.registry,
        )
        self.shadow = Counter(
            "aigis_shadow_decisions",
            "Shadow (dry-run) policy decisions next to the enforced ones: agree, would_allow (enforced "
            "denied), would_deny (enforced allowed).",
            ["method", "result"],
            registry=self.registry,
        )
        self.crl_next_update = Gauge(
            "aigis_crl_next_update_timestamp_seconds", "nextUpdate of the CRL in use (POSIX time).",
            registry=self.registry,
        )
        self.crl_stale = Gauge(
            "aigis_crl_stale", "1 while the CRL in use is past its nextUpdate (still enforced), else 0.",
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "aigis_jwks_fetches",
            "Fetches of external issuers' JWK Sets (discovery included), by issuer and result (ok, failed); "
            "the log says why one failed.",
            ["issuer", "result"],
            registry=self.registry,
        )
        self._shadow: dict[tuple[str, bool, bool], Counter] = {}

    def done(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC. On the event-loop thread only: the series take no lock."""
        self._requests.inc((method, code))
        self._latency.observe((method,), seconds)

    def ok_recorder(self, method: str) -> Callable[[float], None]:
        """`done(method, "OK", seconds)` for one method, with its label tuples built once: what the
        secured wrapper calls after every successful call (same thread rule as `done`)."""
        requests, latency = self._requests, self._latency
        ok_labels, method_labels = (method, "OK"), (method,)

        def ok(seconds: float) -> None:
            requests.inc(ok_labels)
            latency.observe(method_labels, seconds)

        return ok

    def inference(self, model: str, version: str, seconds: float) -> None:
        """One inference of `model`/`version` (labels only take configured model names, never input).
        Locked: the servicers call it on the loop today, but a model may report from its threads."""
        labels = (model, version)
        with self._models_lock:
            self._model_inferences.inc(labels)
            self._model_latency.observe(labels, seconds)

    def denied(self, reason: str) -> None:
        """One denial by reason code. On the event-loop thread only (the Enforcer's hook)."""
        self._denials.inc((reason,))

    def denial_observer(self, method: str, decision: Decision) -> None:
        """The Enforcer's hook: count a denial by reason (its code and latency are counted by the wrapper)."""
        self.denied(decision.reason.value if decision.reason is not None else "")

    def shadow_observer(self, method: str, enforced: Decision, shadow: Decision) -> None:
        """The Enforcer's hook for a dry-run decision: count agreement and each kind of difference."""
        key = (method, enforced.allowed, shadow.allowed)
        child = self._shadow.get(key)
        if child is None:
            differs = "would_allow" if shadow.allowed else "would_deny"
            result = "agree" if enforced.allowed == shadow.allowed else differs
            child = self._shadow[key] = self.shadow.labels(method, result)
        child.inc()

    def jwks_fetch(self, issuer: str, succeeded: bool) -> None:
        """The token verifier's hook: one JWK Set fetch attempt (labels: configured issuers only)."""
        self.jwks_fetches.labels(issuer, "ok" if succeeded else "failed").inc()

    def track_suppressed_log_lines(self, count: Callable[[], float]) -> None:
        """Export a process-wide count of log lines dropped as remote noise (server/grpc_noise.py)."""
        self.registry.register(_CallbackCounter(
            "aigis_grpc_log_lines_suppressed",
            "grpcio log lines about a peer's malformed request metadata, dropped instead of logged.",
            count,
        ))  # fmt: skip

    def track_denial_hold(self, held: Callable[[], float], overflow: Callable[[], float]) -> None:
        """Export the refusals held now (auth.denial_hold) and those answered at once because the
        hold was full."""
        Gauge("aigis_denials_held", "too_many_denials refusals waiting to be answered (denial_hold_seconds).",
              registry=self.registry).set_function(held)
        self.registry.register(_CallbackCounter(
            "aigis_denial_hold_overflow",
            "too_many_denials refusals answered at once because max_held_denials were already waiting.",
            overflow,
        ))  # fmt: skip

    def track_audit_queue(self, depth: Callable[[], float]) -> None:
        self.audit_queue.set_function(depth)

    def track_audit_log(self, file: str, last_seq: Callable[[], float]) -> Callable[[str, int], None]:
        """Export the log's newest seq; returns the callback that counts its losses by cause."""
        self.audit_last_seq.labels(file).set_function(last_seq)

        def dropped(cause: str, count: int) -> None:
            self.audit_dropped.labels(cause).inc(count)

        return dropped

    def certificate_files(self, files: dict[str, Path]) -> None:
        """Publish notAfter of each certificate file (first certificate in it)."""
        for name, path in files.items():
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s for its expiry metric: %s", path, exc)
                continue
            self.cert_expiry.labels(name).set(cert.not_valid_after_utc.timestamp())

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
