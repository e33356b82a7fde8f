"""The security path timed inside the aigis server, for `aigis bench --profile`.

A sampling profiler attached from outside slows the process it samples — here the aigis server far
more than the bare one (see README, issue 14) — so its per-call figure is an upper bound. This
times the pieces aigis adds around a servicer from inside, with `perf_counter` around each: the
method lookup that hands the call's metadata over, the admission (checks, caches, budget, policy;
the request decode, which the bare server does too, is subtracted), and the successful call's
metrics. For the common call those run on the event loop without awaiting, so their wall time is
the loop's CPU for them (a preemption inside one is counted too: an upper bound, but a tight one).
Not counted: the wrapper coroutine's own frame and the two `perf_counter` reads it makes.

Installed by patching `aigis.server.secured` and `Metrics.ok_recorder` before the server starts
(benchmark servers only; the product carries no timing code). Only admissions answered at once
are counted: under a steady valid load that is every call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from aigis.server import secured
from aigis.server.metrics import Metrics


class SecurityPathTimer:
    """Sums of the timed pieces while on; `stop` writes them to `out` (JSON, atomically)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.on = False
        self.lookup = self.admit = self.decode = self.metrics = 0.0
        self.calls = 0

    def install(self) -> None:
        timer = self
        lookup = secured._SecuredMethods.service
        admit_now = secured.SecurityInterceptor._admit_now
        decode_body = secured._decode_body
        ok_recorder = Metrics.ok_recorder

        def timed_lookup(routes: Any, details: Any) -> Any:
            started = perf_counter()
            handler = lookup(routes, details)
            if timer.on:
                timer.lookup += perf_counter() - started
            return handler

        def timed_admit(interceptor: Any, *args: Any) -> Any:
            started = perf_counter()
            admitted = admit_now(interceptor, *args)
            if timer.on and isinstance(admitted, tuple):
                timer.admit += perf_counter() - started
                timer.calls += 1
            return admitted

        def timed_decode(decode: Callable[[bytes], Any], raw: bytes) -> Any:
            started = perf_counter()
            message = decode_body(decode, raw)
            if timer.on:
                timer.decode += perf_counter() - started
            return message

        def timed_recorder(metrics: Metrics, method: str) -> Callable[[float], None]:
            ok = ok_recorder(metrics, method)

            def timed_ok(seconds: float) -> None:
                started = perf_counter()
                ok(seconds)
                if timer.on:
                    timer.metrics += perf_counter() - started

            return timed_ok

        secured._SecuredMethods.service = timed_lookup  # type: ignore[method-assign,assignment]
        secured.SecurityInterceptor._admit_now = timed_admit  # type: ignore[method-assign,assignment]
        secured._decode_body = timed_decode
        Metrics.ok_recorder = timed_recorder  # type: ignore[method-assign,assignment]

    def start(self) -> None:
        self.lookup = self.admit = self.decode = self.metrics = 0.0
        self.calls = 0
        self.on = True

    def stop(self) -> None:
        if not self.on:
            return
        self.on = False
        figures = {"calls": self.calls, "lookup_seconds": self.lookup, "admit_seconds": self.admit,
                   "decode_seconds": self.decode, "metrics_seconds": self.metrics}
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(figures), encoding="utf-8")
        os.replace(tmp, self.out)  # the parent waits for the file: it must appear whole


def per_call(figures: dict[str, Any]) -> dict[str, float]:
    """µs per call of each piece and of the security path (lookup + admission - decode + metrics)."""
    calls = max(int(figures["calls"]), 1)
    us = {key.removesuffix("_seconds"): figures[key] * 1e6 / calls
          for key in ("lookup_seconds", "admit_seconds", "decode_seconds", "metrics_seconds")}
    us["security_path"] = us["lookup"] + us["admit"] - us["decode"] + us["metrics"]
    return us
