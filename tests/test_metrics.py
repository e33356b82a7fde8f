"""Prometheus metrics: requests by method and code, denials by reason, latency, certificate expiry."""

from __future__ import annotations

from typing import Any

from calls import RPC_KINDS, bearer, channel, issuer_token, run, sample, scrape


def test_metrics_count_calls_denials_and_latency(start_stack: Any) -> None:
    """Allowed calls, denials by reason and latency observations show up on /metrics, exactly: request
    counts, a consistent latency histogram (cumulative buckets, +Inf = _count = calls, a positive
    _sum, a _created series) and the certificate expiry."""
    stack = start_stack()
    with channel(stack, "demo") as ch:
        for _ in range(3):
            assert RPC_KINDS["unary"](ch, bearer(issuer_token(stack, "demo"))) == 5
        assert run(lambda: RPC_KINDS["unary"](ch, ())).request_id  # token_missing
    text = scrape(stack)
    add = "/aigis.calculator.v1.Calculator/Add"
    assert sample(text, "aigis_requests_total", method=add, code="OK") == 3
    assert sample(text, "aigis_requests_total", method=add, code="UNAUTHENTICATED") == 1
    assert sample(text, "aigis_denials_total", reason="token_missing") == 1
    assert sample(text, "aigis_request_duration_seconds_count", method=add) == 4
    buckets = [
        sample(text, "aigis_request_duration_seconds_bucket", method=add, le=le)
        for le in ("0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
                   "0.25", "0.5", "1.0", "2.5", "10.0", "+Inf")
    ]  # fmt: skip
    assert buckets == sorted(buckets) and buckets[-1] == 4
    assert 0 < sample(text, "aigis_request_duration_seconds_sum", method=add) < 4 * 10
    assert f'aigis_request_duration_seconds_created{{method="{add}"}}' in text
    expiry = sample(text, "aigis_certificate_expiry_timestamp_seconds", certificate="server")
    assert expiry > 1.7e9


def test_refused_reload_is_counted(start_stack: Any) -> None:
    """A broken policy file on reload is refused, counted, and the server keeps its last good policy."""
    stack = start_stack()
    policy_path = stack.server.config.policy
    policy_path.write_text("{ not json")
    stack.run(stack.server.reload_now())
    assert sample(scrape(stack), "aigis_reload_failures_total", file=policy_path.name) == 1
    with channel(stack, "demo") as ch:
        assert RPC_KINDS["unary"](ch, bearer(issuer_token(stack, "demo"))) == 5


def test_batch_sizes_are_exported(start_stack: Any, tmp_path: Any) -> None:
    """A batching model's batch sizes show up as a histogram on /metrics."""
    import shutil

    from calls import png_digit_request

    models = tmp_path / "models"
    shutil.copytree("server/models/digits", models / "digits")
    toml = models / "digits" / "model.toml"
    toml.write_text(toml.read_text() + "\n[batching]\nenabled = true\nmax_batch_size = 8\n")
    stack = start_stack(models=models)
    with channel(stack, "demo") as ch:
        for _ in range(3):
            png_digit_request(ch, bearer(issuer_token(stack, "demo")))
    assert sample(scrape(stack), "aigis_inference_batch_size_count", model="digits") == 3

