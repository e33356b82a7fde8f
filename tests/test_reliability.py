"""Fault tests that stay (issue 12): each provokes one fault on real processes and checks the promise.

Marked `reliability`; each is bounded in calls and seconds, and CI runs them with the suite. The
figures they print (`-s`) are the ones in the README's reliability table.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import make_pki
from flood import Seen, add_load
from serve_proc import Served, serve

from aigis.auth.audit import read_records
from aigis.auth.audit_chain import verify_log

pytestmark = pytest.mark.reliability

KILL_ROUNDS = 4
FLOOD_IN_FLIGHT = 64
# AIGIS_TEST_DURABILITY=background shows what the test catches without the durable default.
DURABILITY_CONFIG = f'[audit]\ndurability = "{os.environ.get("AIGIS_TEST_DURABILITY", "fsync")}"\n'


async def _flood_then_kill(served: Served, flood_seconds: float) -> Seen:
    """Flood denials for `flood_seconds`, kill -9 the server mid-flood, and return what clients saw."""
    stop = asyncio.Event()
    flood = asyncio.create_task(add_load(served.target, served.pki, in_flight=FLOOD_IN_FLIGHT, seconds=30, stop=stop))
    await asyncio.sleep(flood_seconds)
    served.proc.send_signal(signal.SIGKILL)
    await asyncio.sleep(0.5)  # calls in flight at the kill fail UNAVAILABLE; nothing is retried
    stop.set()
    return await flood


def test_kill_9_during_a_denial_flood_loses_no_denial_a_client_saw(tmp_path: Path) -> None:
    """kill -9 mid-flood, several times: every denial a client received is in the log, which verifies."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    audit_log = tmp_path / "audit.jsonl"
    seen = Seen()
    per_round = []
    for round_ in range(KILL_ROUNDS):
        served = serve(tmp_path, pki, audit_log, name=f"kill{round_}", config=DURABILITY_CONFIG)
        got = asyncio.run(_flood_then_kill(served, 1.0 + 0.3 * round_))
        assert served.proc.wait(30) == -signal.SIGKILL
        per_round.append(len(got.denial_ids))
        seen.merge(got)
    # A clean start after the last kill repairs any torn tail and continues the chain.
    served = serve(tmp_path, pki, audit_log, name="after")
    assert served.kill(signal.SIGTERM) == 0, served.output()
    records = read_records(audit_log)
    logged = {r.get("request_id") for r in records}
    missing = seen.denial_ids - logged
    report = verify_log(audit_log, None)
    print(f"\nkill -9 x{KILL_ROUNDS} during a denial flood: {len(seen.denial_ids)} denials seen by clients "
          f"(per round {per_round}), {len(records)} records, {len(missing)} missing; codes {dict(seen.codes)}")
    assert min(per_round) > 100, per_round  # the flood really ran in every round
    assert not missing, f"{len(missing)} client-seen denials missing from the audit log"
    assert report.ok, report.problems
