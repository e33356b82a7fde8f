"""Per-principal token buckets: each caller gets `rate` requests per second with bursts of `burst`.

Checked right after the certificate names the caller and before any token work, so a caller
flooding forged tokens is cut off before it costs a signature check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    rate: float  # tokens added per second; 0 disables limiting
    burst: int  # bucket size


class RateLimiter:
    """Token buckets keyed by principal; bounded (idle full buckets are dropped first)."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 65_536):
        if limit.rate < 0 or limit.burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.limit = limit
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # principal -> [tokens, last refill time]

    def allow(self, principal: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(principal)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict(now)
            self._buckets[principal] = [self.limit.burst - 1.0, now]
            return True
        tokens = min(self.limit.burst, bucket[0] + (now - bucket[1]) * self.limit.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def exhausted(self, key: str) -> bool:
        """True when `key` has no token left now; consumes nothing (a check before costly work)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return False
        return min(self.limit.burst, bucket[0] + (self._clock() - bucket[1]) * self.limit.rate) < 1.0

    def _evict(self, now: float) -> None:
        """Drop buckets that have refilled completely: forgetting them changes nothing."""
        full_after = self.limit.burst / self.limit.rate if self.limit.rate else float("inf")
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < full_after}
        while len(self._buckets) >= self._max_keys:
            del self._buckets[next(iter(self._buckets))]
