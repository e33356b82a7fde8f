"""A brake on guessing: failed client authentications are budgeted per client id and per peer.

Each failure spends one token from the client id's bucket and one from the peer address's bucket
(auth/ratelimit.py). A request whose client id or peer has an empty bucket is refused before any
secret is hashed, so a guesser gets `burst` tries and then `rate` per second, whatever scrypt costs.
Entering the throttled state is logged once per key and episode; every refusal is counted.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aigis.auth.ratelimit import RateLimit, RateLimiter

log = logging.getLogger("aigis.issuer")


class ThrottleKey(enum.StrEnum):
    """What a budget of failures belongs to (also the metric label)."""

    CLIENT_ID = "client_id"
    PEER = "peer"


@dataclass(frozen=True)
class ThrottleLimits:
    """Failures allowed before the brake: `burst` at once, then `rate` per second."""

    client_id: RateLimit = field(default_factory=lambda: RateLimit(rate=0.2, burst=10))  # 10 tries, then one every 5 s
    peer: RateLimit = field(default_factory=lambda: RateLimit(rate=1.0, burst=30))  # one address guessing many ids


class AuthThrottle:
    """Failure budgets per client id and per peer. Not thread-safe: one event loop owns it."""

    def __init__(self, limits: ThrottleLimits = ThrottleLimits(), *, clock: Callable[[], float] = time.monotonic):
        self._limiters = {
            ThrottleKey.CLIENT_ID: RateLimiter(limits.client_id, clock=clock, max_keys=16_384),
            ThrottleKey.PEER: RateLimiter(limits.peer, clock=clock, max_keys=16_384),
        }
        self._announced: set[tuple[ThrottleKey, str]] = set()

    def throttled(self, *, client_id: str | None, peer: str | None) -> ThrottleKey | None:
        """Which budget is spent, if any: such a request is refused without checking its secret."""
        if peer is not None and self._limiters[ThrottleKey.PEER].exhausted(peer):
            return ThrottleKey.PEER
        if client_id is not None and self._limiters[ThrottleKey.CLIENT_ID].exhausted(client_id):
            return ThrottleKey.CLIENT_ID
        return None

    def failed(self, *, client_id: str | None, peer: str | None) -> None:
        """Spend one failure from each budget; log once when a budget runs out."""
        for kind, value in ((ThrottleKey.PEER, peer), (ThrottleKey.CLIENT_ID, client_id)):
            if value is None:
                continue
            limiter = self._limiters[kind]
            limiter.allow(value)
            if not limiter.exhausted(value):
                self._announced.discard((kind, value))
            elif (kind, value) not in self._announced:
                if len(self._announced) >= 4096:
                    self._announced.clear()
                self._announced.add((kind, value))
                log.warning(
                    "throttling client authentication for %s=%r: too many failures "
                    "(further refusals are counted in aigis_issuer_auth_throttled_total, not logged)",
                    str(kind),
                    value[:80],
                )
