"""Keeps the CRL from going stale where the CA key is at hand, and says so when it is stale.

A CRL past its nextUpdate is still enforced: every serial on it stays revoked (revocation only
ever grows), so refusing every caller would punish the innocent for an operator's lapse. It is
reported instead: a warning on every check, `aigis_crl_stale` = 1, and `aigis doctor` fails.
Renewal writes a new file; the server's CRL watcher loads it like any other change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from aigis.auth.crl import CrlError, CrlStatus, ca_key_available, crl_status, renew_crl
from aigis.auth.pki import PkiPaths
from aigis.server.metrics import Metrics

log = logging.getLogger("aigis.crl")

# How often the CRL's dates are checked; renewal is due weeks ahead, so this only bounds how late
# a stale CRL is noticed.
CHECK_INTERVAL_SECONDS = 300.0


class CrlFreshness:
    """Checks the CRL's nextUpdate; renews it when due and `may_renew` and the CA key is readable."""

    def __init__(self, pki: PkiPaths, metrics: Metrics, *, may_renew: bool,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.pki, self.metrics, self.may_renew, self.clock = pki, metrics, may_renew, clock
        self.status: CrlStatus | None = None
        self.stale = False

    async def check(self, now: datetime | None = None) -> CrlStatus | None:
        """One check; never raises (a broken CRL file is the reload watcher's to refuse)."""
        now = now or self.clock()
        try:
            status = await asyncio.to_thread(crl_status, self.pki)
            if status.renewal_due(now) and self.may_renew and await asyncio.to_thread(ca_key_available, self.pki):
                status = await asyncio.to_thread(renew_crl, self.pki, now=now)
                log.info("renewed the CRL %s: #%d, next update %s", self.pki.crl, status.number,
                         status.next_update)
        except (CrlError, OSError) as exc:
            log.error("cannot check the CRL's freshness: %s", exc)
            return self.status
        self.status = status
        self.stale = status.stale(now)
        if status.next_update is not None:
            self.metrics.crl_next_update.set(status.next_update.timestamp())
        self.metrics.crl_stale.set(1 if self.stale else 0)
        if self.stale:
            log.warning(
                "the CRL %s is stale: its nextUpdate %s has passed; still enforcing its %d revocation(s); "
                "renew it with `aigis certs crl --renew` where the CA key is", self.pki.crl, status.next_update,
                status.revoked,
            )
        return status

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)
            await self.check()
