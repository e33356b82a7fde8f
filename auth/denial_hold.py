"""Answering a flooder late: the refusals of a principal whose denial budget is empty are held.

A client that floods with calls it will be refused — forged tokens, forbidden methods — mostly
waits for each answer before sending the next (HTTP/2 caps the calls in flight per connection).
Answering its `too_many_denials` refusals after `seconds` instead of at once cuts its rate to
about (calls in flight) / `seconds`, so the CPU it took goes back to honest callers, at the cost
of a timer per held call. Nothing else is delayed: valid calls never spend the denial budget, and
an honest principal only meets the hold after dozens of denials in a row. At most `max_held`
calls wait at once (memory is bounded); past that a refusal is answered at once and counted.
"""

from __future__ import annotations

import asyncio


class DenialHold:
    """A bounded set of refusals waiting `seconds` before their answer (event-loop thread only)."""

    def __init__(self, seconds: float, max_held: int) -> None:
        if seconds <= 0 or max_held < 1:
            raise ValueError("seconds must be > 0 and max_held >= 1")
        self.seconds = seconds
        self.max_held = max_held
        self.held = 0  # refusals waiting now
        self.overflow = 0  # refusals answered at once because `max_held` were already waiting

    async def hold(self) -> None:
        """Wait `seconds`, unless `max_held` refusals already wait (then return at once). A client
        that cancels its call ends the wait (grpc cancels the handler)."""
        if self.held >= self.max_held:
            self.overflow += 1
            return
        self.held += 1
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.held -= 1
