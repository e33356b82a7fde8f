"""Per-principal cap on concurrent streams: what one caller may hold open at once.

A stream costs the server memory for as long as it is open (its buffers are bounded by HTTP/2
flow control, since grpc.aio awaits each write), and gRPC's own limit is per connection: a caller
with many connections could hold any number of them. Counted per process, on the event loop (no
lock needed); a slot is released when the call ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable


class StreamSlots:
    """How many streaming calls each principal has open, up to `per_principal`."""

    def __init__(self, per_principal: int) -> None:
        if per_principal <= 0:
            raise ValueError("per_principal must be greater than 0")
        self.per_principal = per_principal
        self._open: dict[str, int] = {}

    def acquire(self, principal: str) -> Callable[[], None] | None:
        """Take a slot: the callable that gives it back (call it exactly once), or None when full."""
        held = self._open.get(principal, 0)
        if held >= self.per_principal:
            return None
        self._open[principal] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open[principal] - 1
            if left:
                self._open[principal] = left
            else:
                del self._open[principal]  # idle principals cost nothing

        return release

    def held(self, principal: str) -> int:
        return self._open.get(principal, 0)
