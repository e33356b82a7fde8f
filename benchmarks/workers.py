"""Throughput of `aigis serve --workers 1` vs `--workers 2` (issue: scale past one process).

    python -m aigis.benchmarks.workers [--rounds 3] [--seconds 4] [--clients 4] [--in-flight 32] [--quiet-wait 15]

Alternating rounds (1 worker, 2 workers, 1, 2, ...) on loopback; each round starts a fresh
`aigis serve --workers N` and drives Calculator.Add from several load-generator processes
(benchmarks/load.py), each on its own connection so the kernel spreads them over the workers.
SO_REUSEPORT spreads connections by a hash, not evenly: mid-window each round counts the established
connections each worker process holds (/proc) and says when one worker got none, so a "2 workers"
figure that was really one worker is marked, not averaged in silently. Prints req/s per round, the
medians (of the rounds that spread, when any did) and the ratio. On a 2-core machine the load generators share
the cores with the servers, so the ratio is a lower bound on what a second process buys.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from aigis.auth.pki import PkiPaths
from aigis.benchmarks.harness import machine_lock, wait_for_quiet
from aigis.client_sdk import ClientCredentials

REPO = Path(__file__).resolve().parent.parent


def connections_per_worker(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to local `port` (IPv4 or IPv6) held by each of the processes `pids`."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "01":  # 01 = ESTABLISHED
                established.add(fields[9])  # socket inode
    counts: dict[int, int] = {}
    for worker in pids:
        held = 0
        try:
            for fd in Path(f"/proc/{worker}/fd").iterdir():
                target = fd.readlink().name if fd.is_symlink() else ""
                held += target.startswith("socket:[") and target[8:-1] in established
        except OSError:
            continue
        counts[worker] = held
    return counts


def _token(pki: PkiPaths, issuer_url: str) -> str:
    """A real access token for client "demo" from the embedded issuer (client credentials over mTLS)."""
    credentials = ClientCredentials(
        issuer_url + "/oauth2/token", ca=pki.ca_cert, cert=pki.client_cert("demo"), key=pki.client_key("demo")
    )
    return credentials.token()


def one_round(pki: PkiPaths, work: Path, workers: int, clients: int, in_flight: int,
              seconds: float) -> tuple[float, list[int]]:
    """req/s of one round, and the connections each worker held mid-window."""
    ready = work / f"ready-{workers}-{time.monotonic_ns()}.json"
    with (work / "serve.log").open("a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "aigis.tools.cli", "--log-level", "WARNING", "serve", "--workers", str(workers),
             "--certs", str(pki.root), "--listen", "127.0.0.1:0", "--issuer-listen", "127.0.0.1:0",
             "--metrics-listen", "off", "--audit-log", str(work / "audit.jsonl"), "--ready-file", str(ready)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    loads: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {work / 'serve.log'}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        token = _token(pki, info["issuer_url"])
        spec = {
            "mode": "add", "target": info["target"], "ca": str(pki.ca_cert),
            "cert": str(pki.client_cert("demo")), "key": str(pki.client_key("demo")),
            "token": token, "in_flight": in_flight, "max_requests": 2_000_000, "max_seconds": seconds + 60,
            "call_timeout": 10.0, "image": None, "forge": None,
        }  # fmt: skip
        for _ in range(clients):
            p = subprocess.Popen([sys.executable, "-m", "aigis.benchmarks.load"], cwd=REPO, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert p.stdin is not None
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
            loads.append(p)
        for p in loads:
            line = p.stdout.readline() if p.stdout else ""
            if "ready" not in line:
                raise RuntimeError(f"load generator failed: {line.strip()}")
        start = time.time() + 1.0
        for p in loads:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"start_at": start, "end_at": start + seconds}) + "\n")
            p.stdin.flush()
        time.sleep(max(0.0, start + seconds / 2 - time.time()))
        port = int(str(info["target"]).rsplit(":", 1)[1])
        spread = sorted(connections_per_worker(info.get("pids") or [server.pid], port).values())
        total = 0.0
        for p in loads:
            result = json.loads(p.stdout.readline() if p.stdout else "{}")
            if "error" in result:
                raise RuntimeError(result["error"])
            total += result["codes"].get("OK", 0) / result["window_seconds"]
        return total, spread
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
            p.wait()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--quiet-wait", type=float, default=15.0,
                        help="seconds to wait for other work on the machine to go quiet before each round")
    args = parser.parse_args(argv)
    from aigis.auth.certs import init_pki

    with tempfile.TemporaryDirectory(prefix="aigis-workers-") as tmp:
        work = Path(tmp)
        pki = PkiPaths(work / "certs")
        init_pki(pki, now=datetime.now(UTC))
        figures: dict[int, list[float]] = {1: [], 2: []}
        spread_rounds: list[float] = []  # 2-worker rounds in which every worker held a connection
        spreads: list[list[int]] = []
        for r in range(args.rounds):
            for workers in (1, 2):
                # One window at a time across `aigis bench` runs on this machine, after other work quiets.
                with machine_lock(900.0):
                    wait_for_quiet(args.quiet_wait)
                    rps, spread = one_round(pki, work, workers, args.clients, args.in_flight, args.seconds)
                figures[workers].append(rps)
                note = ""
                if workers == 2:
                    spreads.append(spread)
                    if len(spread) == 2 and min(spread) > 0:
                        spread_rounds.append(rps)
                    else:
                        note = " — NOT SPREAD: one worker served every connection (SO_REUSEPORT hash)"
                print(f"round {r + 1}: {workers} worker(s): {rps:,.0f} req/s, connections per worker {spread}{note}",
                      flush=True)
        one = statistics.median(figures[1])
        two = statistics.median(spread_rounds or figures[2])
        which = (f"{len(spread_rounds)} of {len(figures[2])} rounds spread over both workers" if spread_rounds
                 else "no round spread over both workers: the 2-worker figure is really one worker")
        print(f"median: 1 worker {one:,.0f} req/s, 2 workers {two:,.0f} req/s, ratio {two / one:.2f} ({which})")
        print(json.dumps({"workers_1": figures[1], "workers_2": figures[2], "connections_per_worker": spreads,
                          "spread_rounds": len(spread_rounds), "ratio": two / one}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
