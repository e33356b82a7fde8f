"""The per-call series (plain ints exported at scrape time) against prometheus-client's own classes."""

from __future__ import annotations

import collections
import re
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from aigis.auth.decision import Decision, Reason
from aigis.server.metrics import LATENCY_BUCKETS, Metrics

# Below the first bound, on bounds, between them, above the last; ints and floats.
DURATIONS = (0.00005, 0.0001, 0.0003, 0.02, 0.1, 9.9, 10, 11, 2.5, 0.0001000001, 0.0, 0.5)
CREATED = re.compile(r"^(\w+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _reference() -> tuple[CollectorRegistry, Counter, Histogram, Counter]:
    """prometheus-client's own Counter/Histogram with today's names, help texts and buckets."""
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("aigis_requests", "RPCs by method and final status code.", ["method", "code"],
                       registry=registry)
    latency = Histogram("aigis_request_duration_seconds",
                        "Time from the interceptor's first check to the servicer's last response.",
                        ["method"], buckets=LATENCY_BUCKETS, registry=registry)
    denials = Counter("aigis_denials", "Denied RPCs by reason code.", ["reason"], registry=registry)
    return registry, requests, latency, denials


def _per_call_families(text: str) -> str:
    """The requests, latency and denials families of an exposition, `_created` times masked."""
    keep = [block for block in re.split(r"(?=^# HELP )", text, flags=re.MULTILINE)
            if re.match(r"# HELP aigis_(requests|request_duration_seconds|denials)[_ ]", block)]
    return CREATED.sub(r"\1 T", "".join(keep)).replace("# EOF\n", "")


def test_exposition_is_identical_to_prometheus_client_metrics() -> None:
    """Same names, types, help, labels, cumulative buckets, _sum, _count, _created as Counter/Histogram
    fed the same calls, in the text and the OpenMetrics format."""
    metrics = Metrics()
    registry, requests, latency, denials = _reference()
    for i, seconds in enumerate(DURATIONS):
        for method, code in (("/a.v1.S/B", "OK" if i % 3 else "UNAUTHENTICATED"), ("/c.v1.S/D", "OK")):
            metrics.done(method, code, seconds)
            requests.labels(method, code).inc()
            latency.labels(method).observe(seconds)
        reason = Reason.TOKEN_MISSING if i % 2 else Reason.SCOPE_MISSING
        metrics.denial_observer("/a.v1.S/B", Decision(allowed=False, reason=reason))
        denials.labels(reason.value).inc()
    for generate in (generate_latest, generate_openmetrics):
        ours, theirs = _per_call_families(generate(metrics.registry).decode()), generate(registry).decode()
        assert ours == _per_call_families(theirs) and "aigis_request_duration_seconds_bucket" in ours


def test_an_ok_recorder_counts_exactly_what_done_counts() -> None:
    """The wrapper's per-method recorder is `done(method, "OK", seconds)`: identical expositions, and
    no series before the first call (like `done`)."""
    with_done, with_recorder = Metrics(), Metrics()
    ok = with_recorder.ok_recorder("/a.v1.S/B")
    assert "/a.v1.S/B" not in generate_latest(with_recorder.registry).decode()
    for seconds in DURATIONS:
        with_done.done("/a.v1.S/B", "OK", seconds)
        ok(seconds)
    for generate in (generate_latest, generate_openmetrics):
        ours = _per_call_families(generate(with_recorder.registry).decode())
        assert ours == _per_call_families(generate(with_done.registry).decode()) and 'code="OK"' in ours


def test_request_samples_have_exact_values() -> None:
    """Known durations land in the right buckets (a value on a bound counts in that bucket)."""
    metrics = Metrics()
    for seconds in (0.00005, 0.0001, 0.0003, 0.02, 10, 11):
        metrics.done("/a.v1.S/B", "OK", seconds)
    metrics.done("/a.v1.S/B", "INTERNAL", 0.001)
    value = metrics.registry.get_sample_value
    method = {"method": "/a.v1.S/B"}
    assert value("aigis_requests_total", {**method, "code": "OK"}) == 6
    assert value("aigis_requests_total", {**method, "code": "INTERNAL"}) == 1
    expected = {"0.0001": 2, "0.00025": 2, "0.0005": 3, "0.001": 4, "0.0025": 4, "0.005": 4, "0.01": 4,
                "0.025": 5, "0.05": 5, "0.1": 5, "0.25": 5, "0.5": 5, "1.0": 5, "2.5": 5, "10.0": 6, "+Inf": 7}
    buckets = {le: value("aigis_request_duration_seconds_bucket", {**method, "le": le}) for le in expected}
    assert buckets == expected
    assert value("aigis_request_duration_seconds_count", method) == 7
    assert value("aigis_request_duration_seconds_sum", method) == 0.00005 + 0.0001 + 0.0003 + 0.02 + 10 + 11 + 0.001


def test_scrapes_during_calls_never_fail_and_counts_end_exact() -> None:
    """A scrape thread running while one thread counts calls (new label sets keep appearing, growing
    the dicts under the scrapes) and two threads count inferences: no exception, exact final counts."""
    metrics = Metrics()
    calls, inferences = 50_000, 5_000
    stop, errors, scrapes = threading.Event(), [], [0]

    def scrape() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and scrapes[0] < 20_000 and time.monotonic() < deadline:
            try:
                generate_latest(metrics.registry)
            except Exception as exc:  # any failure is the finding
                errors.append(exc)
                return
            scrapes[0] += 1

    def infer() -> None:
        for _ in range(inferences):
            metrics.inference("digits", "1", 0.0003)

    sent: collections.Counter[tuple[str, str]] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    scraper = threading.Thread(target=scrape)
    scraper.start()
    inferrers = [threading.Thread(target=infer) for _ in range(2)]
    for thread in inferrers:
        thread.start()
    try:
        for i in range(calls):
            method, code = f"/m.v1.S/M{i % (i // 250 + 1)}", f"C{i % 4}"  # a new method every 250 calls
            metrics.done(method, code, i * 1e-6)
            sent[(method, code)] += 1
            if i % 7 == 0:
                metrics.denied(f"reason_{i // 50}")
                reasons[f"reason_{i // 50}"] += 1
    finally:
        for thread in inferrers:
            thread.join(timeout=60)
        stop.set()
        scraper.join(timeout=60)
    assert errors == [] and scrapes[0] > 0
    samples = {(s.name, *s.labels.values()): s.value for family in metrics.registry.collect() for s in family.samples}
    assert {key: samples["aigis_requests_total", *key] for key in sent} == sent
    per_method: collections.Counter[str] = collections.Counter()
    for (method, _code), count in sent.items():
        per_method[method] += count
    assert {m: samples["aigis_request_duration_seconds_count", m] for m in per_method} == per_method
    assert {r: samples["aigis_denials_total", r] for r in reasons} == reasons
    assert samples["aigis_model_inferences_total", "digits", "1"] == 2 * inferences
    assert samples["aigis_model_inference_duration_seconds_count", "digits", "1"] == 2 * inferences
