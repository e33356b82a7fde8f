"""`aigis issuer`: the OAuth2 token issuer as a process of its own (its own Deployment).

The same endpoints as the embedded issuer (token, JWKS, RFC 8414 metadata, over HTTPS), built from
the same aigis.toml ([issuer], [files], [probes], [metrics], [log]); server replicas then trust it
by its JWKS URL ([[auth.issuers]] with `jwks_url`) and verify statelessly. Replicas of the issuer
share one signing key set: mount the same Secret (signing key + jwks.json) into each, and every
replica signs with the same key and publishes the same JWK Set; `aigis keys rotate` on the Secret
reaches them all when the kubelet swaps the volume's `..data` link.

This module only assembles and supervises: the issuer itself is `aigis.auth.issuer.IssuerServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aigis.auth.issuer import IssuerConfig, IssuerError, IssuerServer
from aigis.server.app import StartupError, issuer_events, issuer_library_config
from aigis.server.config import Config
from aigis.server.crl_freshness import CrlFreshness
from aigis.server.lifecycle import wait_for_shutdown
from aigis.server.metrics import Metrics
from aigis.server.probes import ProbeServer

log = logging.getLogger("aigis.issuer_role")


def issuer_config(config: Config) -> IssuerConfig:
    """The issuer library's settings from aigis.toml."""
    return issuer_library_config(config, config.trust_domain)


@dataclass
class RunningIssuer:
    """A running `aigis issuer`: the issuer, its probes and its metrics."""

    config: Config
    issuer: IssuerServer
    metrics: Metrics
    metrics_port: int | None = None
    probes: ProbeServer | None = None
    probes_port: int | None = None
    draining: bool = False
    crl: CrlFreshness | None = None  # the CRL's nextUpdate watched (and renewed where the CA key is)
    _crl_task: asyncio.Task[None] | None = None

    async def readiness(self) -> dict[str, str | None]:
        """Ready when the signing key and JWK Set load and fit, and not draining."""
        checks: dict[str, str | None] = {"draining": "shutting down" if self.draining else None}
        try:
            await asyncio.to_thread(self.issuer.signing_keys.current)
            checks["signing_keys"] = None
        except Exception:  # IssuerError, or the issuer stopped: either way not ready
            checks["signing_keys"] = "not loaded"
        if self.crl is not None and self.crl.stale and self.config.stale_crl == "unready":
            checks["crl"] = "stale: past its nextUpdate"
        return checks

    async def stop(self) -> None:
        self.draining = True
        if self._crl_task is not None:
            self._crl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._crl_task
        await asyncio.to_thread(self.issuer.stop)
        await asyncio.to_thread(self.metrics.stop)
        if self.probes is not None:
            await self.probes.stop()


async def start_issuer(config: Config) -> RunningIssuer:
    """Start the issuer alone. Raises StartupError (naming the file or setting) on bad input."""
    metrics = Metrics()
    try:
        issuer = IssuerServer(issuer_config(config), events=issuer_events(metrics))
        await asyncio.to_thread(issuer.start)
    except (IssuerError, ValueError) as exc:
        raise StartupError(f"issuer: {exc}") from None
    running = RunningIssuer(config, issuer, metrics)
    # The issuer reads the CRL too (revoked clients get no tokens): keep it fresh where the CA key is.
    running.crl = CrlFreshness(config.pki, metrics, may_renew=True)
    await running.crl.check()
    running._crl_task = asyncio.create_task(running.crl.run())
    try:
        if config.metrics_listen is not None:
            running.metrics_port = metrics.serve(config.metrics_listen.host, config.metrics_listen.port)
        if config.probes_listen is not None:
            running.probes = ProbeServer(config.probes_listen, running.readiness)
            running.probes_port = await running.probes.start()
    except OSError as exc:
        await running.stop()
        raise StartupError(f"cannot listen for metrics or probes: {exc.strerror}") from None
    log.info("token issuer at %s (iss %s)", issuer.url, issuer.issuer_url)
    return running


async def run_issuer(config: Config, *, ready: Callable[[RunningIssuer], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT; drain (not ready, still issuing) for drain_seconds, then stop."""
    running = await start_issuer(config)
    if ready is not None:
        ready(running)

    async def drain() -> None:
        running.draining = True
        log.info("draining: not ready, still issuing for %.1fs", config.drain_seconds)

    try:
        await wait_for_shutdown(config.drain_seconds, drain)
    finally:
        log.info("issuer shutting down")
        await running.stop()
